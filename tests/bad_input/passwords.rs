//! Cases about Secrets and passwords: missing Secrets and keys, values a guest must not
//! get, crypted values that are not crypt strings, generate ranges, cross-namespace refs.
use super::*;
use serde_json::json;

/// The controller's refusal of a Secret in another namespace.
const CROSS_NAMESPACE: &str = "cross-namespace Secret references are refused";

#[test]
fn missing_secret_waits_with_secret_not_found() {
    let o = apply_and_expect_stalled(&[reset("no-secret").v()], "SecretNotFound", "no-secret-pw");
    assert_eq!(o["status"]["phase"], "Pending", "the Secret may still come");
}

#[test]
fn keys_from_a_missing_secret_wait_with_secret_not_found() {
    apply_and_expect_stalled(
        &[rebuild_from_secret("k-no-secret").v()],
        "SecretNotFound",
        "k-no-secret-keys",
    );
}

/// `obj` reads Secret `secret_name`, which holds `value` under `other_key` only: the
/// object waits with SecretKeyMissing and `hint`.
fn expect_secret_key_missing(obj: Obj, secret_name: &str, other_key: &str, hint: &str) {
    let value = GOOD_PASSWORD.as_bytes();
    apply_and_expect_stalled(
        &[secret(secret_name, other_key, value), obj.v()],
        "SecretKeyMissing",
        hint,
    );
}

#[test]
fn missing_key_in_secret_waits_with_secret_key_missing() {
    expect_secret_key_missing(
        reset("no-key"),
        "no-key-pw",
        "passwd",
        "has no key \"password\"",
    );
}

#[test]
fn keys_secret_without_the_key_waits_with_secret_key_missing() {
    let keys = rebuild_from_secret("k-no-key");
    expect_secret_key_missing(keys, "k-no-key-keys", "keys", "authorized_keys");
}

/// The reset `reset` of `password` ends Stalled with InvalidPassword and `hint`, and
/// `canary` (a part of the password), if given, shows nowhere.
fn invalid_password(reset: Obj, password: &[u8], hint: &str, canary: Option<&str>) {
    apply_and_expect_stalled(&with_password(reset, password), "InvalidPassword", hint);
    if let Some(canary) = canary {
        assert_not_leaked(canary);
    }
}

#[test]
fn empty_password_is_invalid_password() {
    invalid_password(reset("empty-pw"), b"", "must not be empty", None);
}

#[test]
fn password_with_a_newline_is_invalid_password_and_not_leaked() {
    let canary = "Canary-Newline-Pw-8e21";
    let password = format!("{canary}\nroot:x");
    invalid_password(
        reset("newline-pw"),
        password.as_bytes(),
        "must not contain newlines",
        Some(canary),
    );
}

#[test]
fn password_with_a_nul_is_invalid_password_and_not_leaked() {
    let canary = "Canary-Nul-Pw-5b07";
    let password = format!("{canary}\0tail");
    invalid_password(reset("nul-pw"), password.as_bytes(), "NUL", Some(canary));
}

#[test]
fn over_long_password_is_invalid_password() {
    let long = "Canary-Long-Pw-".repeat(20);
    invalid_password(
        reset("long-pw"),
        long.as_bytes(),
        "at most 256 bytes",
        Some(&long),
    );
}

#[test]
fn password_that_is_not_utf8_is_invalid_password() {
    invalid_password(
        reset("latin1-pw"),
        b"caf\xe9-Latin1-Pw",
        "not valid UTF-8",
        None,
    );
}

#[test]
fn crypted_value_that_is_not_a_crypt_string_is_invalid_password() {
    let canary = "Canary-Plain-Not-Crypt-77aa";
    invalid_password(
        reset("not-crypt").set("spec.password.crypted", json!(true)),
        canary.as_bytes(),
        "crypt(3) hash like $6$",
        Some(canary),
    );
}

#[test]
fn crypted_password_for_a_windows_guest_is_unsupported_for_os() {
    let hash = "$6$saltsalt$Yf1mS1uGxQmFvTq0m1cZ2H5mCqGk6x8Yb0cI4bZ2bAqk5v0hJ9e8P0dQd1X2n7Lr3oQ4wT9uV6sY1aB2cD3eF.";
    let windows = reset("win-crypt")
        .set("spec.target.vmName", json!("vm-win"))
        .set("spec.password.crypted", json!(true))
        .set("spec.user", json!("Administrator"));
    apply_and_expect_target_failed(
        &with_password(windows, hash.as_bytes()),
        "UnsupportedForOS",
        "use a plaintext or generated password",
    );
    assert_not_leaked(hash);
}

#[test]
fn generated_password_shorter_than_16_is_invalid_spec() {
    invalid_spec(
        reset("short-gen").set("spec.password", json!({"generate": {"length": 8}})),
        "spec.password.generate.length in body should be greater than or equal to 16",
        "length must be 16-128",
    );
}

#[test]
fn generated_password_longer_than_128_is_invalid_spec() {
    invalid_spec(
        reset("long-gen").set("spec.password", json!({"generate": {"length": 100000}})),
        "spec.password.generate.length in body should be less than or equal to 128",
        "length must be 16-128",
    );
}

#[test]
fn seal_to_that_is_not_an_age_recipient_is_invalid_spec() {
    // An SSH public key where an age recipient belongs: refused before anything is sealed.
    invalid_spec(
        reset("seal-ssh").set(
            "spec.password",
            json!({"generate": {"sealTo": {"age": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJF3X2of"}}}),
        ),
        "password.generate.sealTo.age must be an age X25519 recipient",
        "password.generate.sealTo.age must be an age X25519 recipient",
    );
}

#[test]
fn seal_to_with_a_bad_checksum_is_invalid_spec() {
    // The right shape (the CEL rule lets it through) with one character changed: the
    // controller parses it and refuses it before any password is generated.
    const TYPO: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8q";
    apply_and_expect_stalled(
        &[reset("seal-typo")
            .set(
                "spec.password",
                json!({"generate": {"sealTo": {"age": TYPO}}}),
            )
            .v()],
        "InvalidSpec",
        "password.generate.sealTo.age is not an age X25519 recipient",
    );
    let secrets = lab().kubectl.run(&[
        "get",
        "secrets",
        "-n",
        NS,
        "-l",
        "guestcred.io/reset=seal-typo",
        "-o",
        "name",
    ]);
    assert_eq!(secrets.trim(), "", "no Secret was written");
}

#[test]
fn both_secret_ref_and_generate_is_invalid_spec() {
    invalid_spec(
        reset("two-sources").set("spec.password.generate", json!({"length": 20})),
        "spec.password: Invalid value: set exactly one of password.secretRef and password.generate",
        "set exactly one of password.secretRef and password.generate",
    );
}

#[test]
fn cross_namespace_password_secret_is_invalid_spec() {
    apply_and_expect_stalled(
        &with_good_password(
            reset("cross-ns").set("spec.password.secretRef.namespace", json!("other")),
        ),
        "InvalidSpec",
        CROSS_NAMESPACE,
    );
}

#[test]
fn cross_namespace_keys_secret_is_invalid_spec() {
    apply_and_expect_stalled(
        &[rebuild("k-cross-ns")
            .set(
                "spec.publicKeys",
                json!({"secretRef": {"name": "keys", "key": "authorized_keys", "namespace": "other"}}),
            )
            .v()],
        "InvalidSpec",
        CROSS_NAMESPACE,
    );
}
