//! Fields the schema would refuse (the emulator has no schema validation or CEL): the
//! controller must refuse them itself, naming the field.
use super::*;
use serde_json::json;

#[test]
fn misspelled_required_field_is_invalid_spec_naming_it() {
    // `passwrd` is pruned as an unknown field; what is left lacks `password`.
    let o = reset("typo-field").remove("spec.password").set(
        "spec.passwrd",
        json!({"secretRef": {"name": "typo-field-pw", "key": "password"}}),
    );
    apply(&[o.v()]);
    expect_stalled(
        "gpr",
        "typo-field",
        "InvalidSpec",
        "missing field `password`",
    );
}

#[test]
fn misspelled_target_field_is_invalid_spec() {
    apply(&[rebuild("k-typo-target")
        .set("spec.target", json!({"vmname": "vm-a"}))
        .v()]);
    expect_stalled(
        "kpr",
        "k-typo-target",
        "InvalidSpec",
        "set exactly one of target.vmName and target.selector",
    );
}

#[test]
fn unknown_extra_field_is_dropped_and_the_reset_still_works() {
    let mut objs = reset_with_password("extra-field", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["color"] = json!("blue");
    apply(&objs);
    let o = poll("gpr", "extra-field", "Succeeded", |o| {
        o["status"]["phase"] == "Succeeded"
    });
    assert!(
        o["spec"].get("color").is_none(),
        "pruned like a real API server"
    );
    assert_controller_alive();
}

#[test]
fn enum_value_in_the_wrong_case_is_invalid_spec_naming_the_field() {
    apply(&[rebuild("k-mode-case").set("spec.mode", json!("live")).v()]);
    expect_stalled(
        "kpr",
        "k-mode-case",
        "InvalidSpec",
        "spec.mode: unknown variant `live`",
    );
}

#[test]
fn negative_max_concurrency_is_invalid_spec_naming_the_field() {
    let mut objs = reset_with_password("neg-concurrency", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["maxConcurrency"] = json!(-1);
    apply(&objs);
    expect_stalled(
        "gpr",
        "neg-concurrency",
        "InvalidSpec",
        "spec.maxConcurrency",
    );
}

#[test]
fn huge_max_concurrency_is_invalid_spec() {
    apply(&[rebuild("k-huge-concurrency")
        .set("spec.maxConcurrency", json!(5000))
        .v()]);
    expect_stalled(
        "kpr",
        "k-huge-concurrency",
        "InvalidSpec",
        "maxConcurrency must be 1-1000, got 5000",
    );
}

#[test]
fn zero_max_concurrency_is_invalid_spec() {
    let mut objs = reset_with_password("zero-concurrency", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["maxConcurrency"] = json!(0);
    apply(&objs);
    expect_stalled(
        "gpr",
        "zero-concurrency",
        "InvalidSpec",
        "maxConcurrency must be 1-1000, got 0",
    );
}

#[test]
fn negative_deadline_is_invalid_spec_naming_the_field() {
    apply(&[rebuild("k-neg-deadline")
        .set("spec.deadlineSeconds", json!(-30))
        .v()]);
    expect_stalled(
        "kpr",
        "k-neg-deadline",
        "InvalidSpec",
        "spec.deadlineSeconds",
    );
}

#[test]
fn huge_deadline_is_invalid_spec() {
    let mut objs = reset_with_password("huge-deadline", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["deadlineSeconds"] = json!(10_000_000);
    apply(&objs);
    expect_stalled(
        "gpr",
        "huge-deadline",
        "InvalidSpec",
        "deadlineSeconds must be 10-86400, got 10000000",
    );
}

#[test]
fn deadline_beyond_32_bits_is_invalid_spec_naming_the_field() {
    let mut objs = reset_with_password("overflow-deadline", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["deadlineSeconds"] = json!(99_999_999_999_i64);
    apply(&objs);
    expect_stalled(
        "gpr",
        "overflow-deadline",
        "InvalidSpec",
        "spec.deadlineSeconds",
    );
}

#[test]
fn negative_ttl_is_invalid_spec_naming_the_field() {
    apply(&[rebuild("k-neg-ttl").set("spec.ttlSeconds", json!(-5)).v()]);
    expect_stalled("kpr", "k-neg-ttl", "InvalidSpec", "spec.ttlSeconds");
}

#[test]
fn huge_ttl_is_invalid_spec() {
    apply(&[rebuild("k-huge-ttl")
        .set("spec.ttlSeconds", json!(1_000_000_000))
        .v()]);
    expect_stalled(
        "kpr",
        "k-huge-ttl",
        "InvalidSpec",
        "ttlSeconds must be 10-31536000, got 1000000000",
    );
}

#[test]
fn number_given_as_a_string_is_invalid_spec_naming_the_field() {
    let mut objs = reset_with_password("string-number", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["maxFailures"] = json!("two");
    apply(&objs);
    expect_stalled("gpr", "string-number", "InvalidSpec", "spec.maxFailures");
}
