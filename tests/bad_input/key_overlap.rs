//! Cases about `overlapSeconds` (key replacement with an overlap): out of bounds, or with
//! settings that replace nothing or everything at once. A real API server refuses each at
//! apply (schema range or CEL rule); the controller refuses them again with `InvalidSpec`.
use super::*;
use serde_json::json;

/// [`rebuild`] with a 60 s overlap and `field` set to `value`.
fn overlap_with(name: &str, field: &str, value: Value) -> Obj {
    rebuild(name)
        .set("spec.overlapSeconds", json!(60))
        .set(field, value)
}

#[test]
fn overlap_shorter_than_10_seconds_is_invalid_spec() {
    invalid_spec(
        rebuild("k-overlap-short").set("spec.overlapSeconds", json!(5)),
        "spec.overlapSeconds in body should be greater than or equal to 10",
        "overlapSeconds must be 10-604800, got 5",
    );
}

#[test]
fn overlap_longer_than_a_week_is_invalid_spec() {
    invalid_spec(
        rebuild("k-overlap-long").set("spec.overlapSeconds", json!(700_000)),
        "spec.overlapSeconds in body should be less than or equal to 604800",
        "overlapSeconds must be 10-604800, got 700000",
    );
}

#[test]
fn overlap_with_strategy_append_is_invalid_spec() {
    invalid_spec(
        overlap_with("k-overlap-append", "spec.strategy", json!("Append")),
        "spec: Invalid value: overlapSeconds needs strategy Replace",
        "overlapSeconds needs strategy Replace: with Append no key is replaced",
    );
}

#[test]
fn overlap_with_replace_all_is_invalid_spec() {
    invalid_spec(
        overlap_with("k-overlap-all", "spec.replaceAll", json!(true)),
        "spec: Invalid value: overlapSeconds cannot be combined with replaceAll",
        "overlapSeconds cannot be combined with replaceAll",
    );
}

#[test]
fn overlap_with_mode_rebuild_is_invalid_spec() {
    invalid_spec(
        overlap_with("k-overlap-rebuild", "spec.mode", json!("Rebuild")),
        "spec: Invalid value: overlapSeconds needs mode Live",
        "overlapSeconds needs mode Live (or Auto on guests whose agent has guest-ssh-*)",
    );
}

#[test]
fn overlap_with_remove_fingerprints_is_invalid_spec() {
    invalid_spec(
        rebuild("k-overlap-remove")
            .remove("spec.publicKeys")
            .set("spec.removeFingerprints", json!([ABSENT]))
            .set("spec.overlapSeconds", json!(60)),
        "spec: Invalid value: overlapSeconds applies to keys being added (publicKeys)",
        "overlapSeconds applies to keys being added (publicKeys)",
    );
}
