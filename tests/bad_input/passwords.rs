//! Cases about Secrets and passwords: missing Secrets and keys, values a guest must not
//! get, crypted values that are not crypt strings, generate ranges, cross-namespace refs.
use super::*;
use serde_json::json;

#[test]
fn missing_secret_waits_with_secret_not_found() {
    apply(&[reset("no-secret").v()]);
    let o = expect_stalled("gpr", "no-secret", "SecretNotFound", "no-secret-pw");
    assert_eq!(o["status"]["phase"], "Pending", "the Secret may still come");
}

#[test]
fn keys_from_a_missing_secret_wait_with_secret_not_found() {
    apply(&[rebuild("k-no-secret")
        .set(
            "spec.publicKeys",
            json!({"secretRef": {"name": "k-no-secret-keys", "key": "authorized_keys"}}),
        )
        .v()]);
    expect_stalled("kpr", "k-no-secret", "SecretNotFound", "k-no-secret-keys");
}

#[test]
fn missing_key_in_secret_waits_with_secret_key_missing() {
    apply(&[
        secret("no-key-pw", "passwd", GOOD_PASSWORD.as_bytes()),
        reset("no-key").v(),
    ]);
    expect_stalled(
        "gpr",
        "no-key",
        "SecretKeyMissing",
        "has no key \"password\"",
    );
}

#[test]
fn keys_secret_without_the_key_waits_with_secret_key_missing() {
    apply(&[
        secret("k-no-key-keys", "keys", ED25519.as_bytes()),
        rebuild("k-no-key")
            .set(
                "spec.publicKeys",
                json!({"secretRef": {"name": "k-no-key-keys", "key": "authorized_keys"}}),
            )
            .v(),
    ]);
    expect_stalled("kpr", "k-no-key", "SecretKeyMissing", "authorized_keys");
}

#[test]
fn empty_password_is_invalid_password() {
    apply(&reset_with_password("empty-pw", b""));
    expect_stalled("gpr", "empty-pw", "InvalidPassword", "must not be empty");
}

#[test]
fn password_with_a_newline_is_invalid_password_and_not_leaked() {
    let canary = "Canary-Newline-Pw-8e21";
    apply(&reset_with_password(
        "newline-pw",
        format!("{canary}\nroot:x").as_bytes(),
    ));
    expect_stalled(
        "gpr",
        "newline-pw",
        "InvalidPassword",
        "must not contain newlines",
    );
    assert_not_leaked(canary);
}

#[test]
fn password_with_a_nul_is_invalid_password_and_not_leaked() {
    let canary = "Canary-Nul-Pw-5b07";
    apply(&reset_with_password(
        "nul-pw",
        format!("{canary}\0tail").as_bytes(),
    ));
    expect_stalled("gpr", "nul-pw", "InvalidPassword", "NUL");
    assert_not_leaked(canary);
}

#[test]
fn over_long_password_is_invalid_password() {
    let long = "Canary-Long-Pw-".repeat(20);
    apply(&reset_with_password("long-pw", long.as_bytes()));
    expect_stalled("gpr", "long-pw", "InvalidPassword", "at most 256 bytes");
    assert_not_leaked(&long);
}

#[test]
fn password_that_is_not_utf8_is_invalid_password() {
    apply(&reset_with_password("latin1-pw", b"caf\xe9-Latin1-Pw"));
    expect_stalled("gpr", "latin1-pw", "InvalidPassword", "not valid UTF-8");
}

#[test]
fn crypted_value_that_is_not_a_crypt_string_is_invalid_password() {
    let canary = "Canary-Plain-Not-Crypt-77aa";
    let mut objs = reset_with_password("not-crypt", canary.as_bytes());
    objs[1]["spec"]["password"]["crypted"] = json!(true);
    apply(&objs);
    expect_stalled(
        "gpr",
        "not-crypt",
        "InvalidPassword",
        "crypt(3) hash like $6$",
    );
    assert_not_leaked(canary);
}

#[test]
fn crypted_password_for_a_windows_guest_is_unsupported_for_os() {
    let hash = "$6$saltsalt$Yf1mS1uGxQmFvTq0m1cZ2H5mCqGk6x8Yb0cI4bZ2bAqk5v0hJ9e8P0dQd1X2n7Lr3oQ4wT9uV6sY1aB2cD3eF.";
    let mut objs = reset_with_password("win-crypt", hash.as_bytes());
    objs[1]["spec"]["target"]["vmName"] = json!("vm-win");
    objs[1]["spec"]["password"]["crypted"] = json!(true);
    objs[1]["spec"]["user"] = json!("Administrator");
    apply(&objs);
    expect_target_failed(
        "gpr",
        "win-crypt",
        "UnsupportedForOS",
        "use a plaintext or generated password",
    );
    assert_not_leaked(hash);
}

#[test]
fn generated_password_shorter_than_16_is_invalid_spec() {
    if applied_unless_the_server_refuses(
        &[reset("short-gen")
            .set("spec.password", json!({"generate": {"length": 8}}))
            .v()],
        "spec.password.generate.length in body should be greater than or equal to 16",
    ) {
        expect_stalled("gpr", "short-gen", "InvalidSpec", "length must be 16-128");
    }
}

#[test]
fn generated_password_longer_than_128_is_invalid_spec() {
    if applied_unless_the_server_refuses(
        &[reset("long-gen")
            .set("spec.password", json!({"generate": {"length": 100000}}))
            .v()],
        "spec.password.generate.length in body should be less than or equal to 128",
    ) {
        expect_stalled("gpr", "long-gen", "InvalidSpec", "length must be 16-128");
    }
}

#[test]
fn seal_to_that_is_not_an_age_recipient_is_invalid_spec() {
    // An SSH public key where an age recipient belongs: refused before anything is sealed.
    if applied_unless_the_server_refuses(
        &[reset("seal-ssh")
            .set(
                "spec.password",
                json!({"generate": {"sealTo": {"age": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJF3X2of"}}}),
            )
            .v()],
        "password.generate.sealTo.age must be an age X25519 recipient",
    ) {
        expect_stalled(
            "gpr",
            "seal-ssh",
            "InvalidSpec",
            "password.generate.sealTo.age must be an age X25519 recipient",
        );
    }
}

#[test]
fn seal_to_with_a_bad_checksum_is_invalid_spec() {
    // The right shape (the CEL rule lets it through) with one character changed: the
    // controller parses it and refuses it before any password is generated.
    const TYPO: &str = "age1ql3z7hjy54pw3hyww5ayyfg7zqgvc7w3j2elw8zmrj2kg5sfn9aqmcac8q";
    apply(&[reset("seal-typo")
        .set(
            "spec.password",
            json!({"generate": {"sealTo": {"age": TYPO}}}),
        )
        .v()]);
    expect_stalled(
        "gpr",
        "seal-typo",
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
    let mut objs = reset_with_password("two-sources", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["password"]["generate"] = json!({"length": 20});
    if applied_unless_the_server_refuses(
        &objs,
        "spec.password: Invalid value: set exactly one of password.secretRef and password.generate",
    ) {
        expect_stalled(
            "gpr",
            "two-sources",
            "InvalidSpec",
            "set exactly one of password.secretRef and password.generate",
        );
    }
}

#[test]
fn cross_namespace_password_secret_is_invalid_spec() {
    let mut objs = reset_with_password("cross-ns", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["password"]["secretRef"]["namespace"] = json!("other");
    apply(&objs);
    expect_stalled(
        "gpr",
        "cross-ns",
        "InvalidSpec",
        "cross-namespace Secret references are refused",
    );
}

#[test]
fn cross_namespace_keys_secret_is_invalid_spec() {
    apply(&[rebuild("k-cross-ns")
        .set(
            "spec.publicKeys",
            json!({"secretRef": {"name": "keys", "key": "authorized_keys", "namespace": "other"}}),
        )
        .v()]);
    expect_stalled(
        "kpr",
        "k-cross-ns",
        "InvalidSpec",
        "cross-namespace Secret references are refused",
    );
}
