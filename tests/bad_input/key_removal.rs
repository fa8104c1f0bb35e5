//! Cases about removing keys by fingerprint (`removeFingerprints`) and reading them
//! (`mode: Inspect`): a key the guest does not have, malformed or repeated fingerprints,
//! and the combinations the CRD's CEL rules refuse (checked again by the controller).
use super::*;
use serde_json::json;

/// A KeypairRebuild for alice on vm-a with neither keys to add nor to remove yet.
fn bare(name: &str) -> Obj {
    rebuild(name).remove("spec.publicKeys")
}

/// What the CRD's CEL rule says of an object that adds, removes and inspects keys in
/// other than exactly one way; the controller says the same up to "Inspect".
const ONE_WAY: &str = "spec: Invalid value: set exactly one of publicKeys (keys to add), removeFingerprints (keys to remove) and mode: Inspect (read the keys, change nothing)";
const ONE_WAY_CONTROLLER: &str = "set exactly one of publicKeys (keys to add), removeFingerprints (keys to remove) and mode: Inspect";

#[test]
fn removing_a_key_the_guest_does_not_have_fails_with_key_not_found() {
    apply_and_expect_target_failed(
        &[bare("k-rm-absent")
            .set("spec.removeFingerprints", json!([ABSENT]))
            .v()],
        "KeyNotFound",
        &format!("user alice in vm-a has no key {ABSENT}"),
    );
}

#[test]
fn a_malformed_fingerprint_is_invalid_spec() {
    invalid_spec(
        bare("k-rm-malformed").set("spec.removeFingerprints", json!(["MD5:16:27:ac:a5"])),
        "spec.removeFingerprints: Invalid value: removeFingerprints: each entry is a SHA256 fingerprint like SHA256:<43 base64 characters>",
        "each entry is a SHA256 fingerprint like SHA256:<43 base64 characters>",
    );
}

#[test]
fn a_repeated_fingerprint_is_invalid_spec() {
    invalid_spec(
        bare("k-rm-repeated").set("spec.removeFingerprints", json!([ABSENT, ABSENT])),
        &format!("spec.removeFingerprints[1]: Duplicate value: \"{ABSENT}\""),
        &format!("removeFingerprints[1] repeats {ABSENT}"),
    );
}

#[test]
fn removing_and_adding_keys_in_one_object_is_invalid_spec() {
    invalid_spec(
        rebuild("k-rm-and-add").set("spec.removeFingerprints", json!([ABSENT])),
        ONE_WAY,
        ONE_WAY_CONTROLLER,
    );
}

#[test]
fn keys_with_nothing_to_add_remove_or_inspect_is_invalid_spec() {
    invalid_spec(bare("k-nothing"), ONE_WAY, ONE_WAY_CONTROLLER);
}

#[test]
fn removal_with_a_ttl_is_invalid_spec() {
    invalid_spec(
        bare("k-rm-ttl")
            .set("spec.removeFingerprints", json!([ABSENT]))
            .set("spec.ttlSeconds", json!(60)),
        "spec: Invalid value: ttlSeconds and replaceAll apply to keys being added (publicKeys); removeFingerprints and mode Inspect take neither",
        "ttlSeconds and replaceAll apply to keys being added",
    );
}

#[test]
fn removal_with_mode_rebuild_is_invalid_spec() {
    invalid_spec(
        bare("k-rm-rebuild")
            .set("spec.removeFingerprints", json!([ABSENT]))
            .set("spec.mode", json!("Rebuild")),
        "spec: Invalid value: removeFingerprints needs mode Live or Auto",
        "removeFingerprints needs mode Live or Auto",
    );
}

#[test]
fn inspect_by_selector_is_invalid_spec() {
    invalid_spec(
        bare("k-inspect-selector")
            .set("spec.mode", json!("Inspect"))
            .set(
                "spec.target",
                json!({"selector": {"matchLabels": {"suite": "bad-input"}}}),
            ),
        "spec: Invalid value: mode Inspect reads one VM's keys: set target.vmName",
        "mode Inspect reads one VM's keys: set target.vmName",
    );
}

#[test]
fn inspect_with_keys_to_add_is_invalid_spec() {
    invalid_spec(
        rebuild("k-inspect-keys").set("spec.mode", json!("Inspect")),
        ONE_WAY,
        ONE_WAY_CONTROLLER,
    );
}

#[test]
fn inspect_of_a_user_unknown_in_the_guest_fails_with_user_not_found() {
    apply_and_expect_target_failed(
        &[bare("k-inspect-ghost")
            .set("spec.mode", json!("Inspect"))
            .set("spec.user", json!("ghost"))
            .v()],
        "UserNotFound",
        "ghost",
    );
}
