//! Cases about public keys: lines that are not keys, private keys, duplicates, none.
use super::*;
use serde_json::json;

#[test]
fn invalid_public_key_line_is_invalid_public_key() {
    apply(&[rebuild("k-garbage")
        .set(
            "spec.publicKeys.inline",
            json!([ED25519, "ssh-rsa AAAAnot-base64!! someone@host"]),
        )
        .v()]);
    expect_stalled(
        "kpr",
        "k-garbage",
        "InvalidPublicKey",
        "line 2 is not an OpenSSH public key",
    );
}

#[test]
fn private_key_pasted_instead_of_a_public_key_is_refused_and_not_leaked() {
    let body = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW";
    let private =
        format!("-----BEGIN OPENSSH PRIVATE KEY-----\n{body}\n-----END OPENSSH PRIVATE KEY-----\n");
    apply(&[
        secret("k-private-keys", "authorized_keys", private.as_bytes()),
        rebuild("k-private")
            .set(
                "spec.publicKeys",
                json!({"secretRef": {"name": "k-private-keys", "key": "authorized_keys"}}),
            )
            .v(),
    ]);
    expect_stalled(
        "kpr",
        "k-private",
        "InvalidPublicKey",
        "put only public keys",
    );
    assert_not_leaked(body);
}

#[test]
fn duplicate_keys_are_invalid_public_key() {
    apply(&[rebuild("k-dup")
        .set("spec.publicKeys.inline", json!([ED25519, ED25519]))
        .v()]);
    expect_stalled(
        "kpr",
        "k-dup",
        "InvalidPublicKey",
        "line 2 repeats the key of entry 1",
    );
}

#[test]
fn empty_key_list_is_invalid_public_key() {
    apply(&[rebuild("k-empty")
        .set("spec.publicKeys.inline", json!([]))
        .v()]);
    expect_stalled("kpr", "k-empty", "InvalidPublicKey", "no public keys given");
}

#[test]
fn key_secret_with_only_comments_is_invalid_public_key() {
    apply(&[
        secret("k-comments-keys", "authorized_keys", b"# keys go here\n\n"),
        rebuild("k-comments")
            .set(
                "spec.publicKeys",
                json!({"secretRef": {"name": "k-comments-keys", "key": "authorized_keys"}}),
            )
            .v(),
    ]);
    expect_stalled(
        "kpr",
        "k-comments",
        "InvalidPublicKey",
        "no public keys given",
    );
}
