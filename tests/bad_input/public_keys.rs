//! Cases about public keys: lines that are not keys, private keys, duplicates, none.
use super::*;
use serde_json::json;

#[test]
fn invalid_public_key_line_is_invalid_public_key() {
    apply_and_expect_stalled(
        &[rebuild("k-garbage")
            .set(
                "spec.publicKeys.inline",
                json!([ED25519, "ssh-rsa AAAAnot-base64!! someone@host"]),
            )
            .v()],
        "InvalidPublicKey",
        "line 2 is not an OpenSSH public key",
    );
}

#[test]
fn private_key_pasted_instead_of_a_public_key_is_refused_and_not_leaked() {
    let body = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW";
    let private =
        format!("-----BEGIN OPENSSH PRIVATE KEY-----\n{body}\n-----END OPENSSH PRIVATE KEY-----\n");
    apply_and_expect_stalled(
        &[
            secret("k-private-keys", "authorized_keys", private.as_bytes()),
            rebuild_from_secret("k-private").v(),
        ],
        "InvalidPublicKey",
        "put only public keys",
    );
    assert_not_leaked(body);
}

#[test]
fn duplicate_keys_are_invalid_public_key() {
    apply_and_expect_stalled(
        &[rebuild("k-dup")
            .set("spec.publicKeys.inline", json!([ED25519, ED25519]))
            .v()],
        "InvalidPublicKey",
        "line 2 repeats the key of entry 1",
    );
}

#[test]
fn empty_key_list_is_invalid_public_key() {
    apply_and_expect_stalled(
        &[rebuild("k-empty")
            .set("spec.publicKeys.inline", json!([]))
            .v()],
        "InvalidPublicKey",
        "no public keys given",
    );
}

#[test]
fn key_secret_with_only_comments_is_invalid_public_key() {
    apply_and_expect_stalled(
        &[
            secret("k-comments-keys", "authorized_keys", b"# keys go here\n\n"),
            rebuild_from_secret("k-comments").v(),
        ],
        "InvalidPublicKey",
        "no public keys given",
    );
}
