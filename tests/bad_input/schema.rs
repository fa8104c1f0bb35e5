//! Fields the schema refuses. A real API server refuses them up front (its message is
//! the case's outcome there); the emulator has no schema validation or CEL, and the
//! controller must refuse them itself, naming the field. Unknown fields are refused by
//! both (kubectl asks for strict field validation); with `--validate=false` they are
//! dropped, and what is left goes the way of any other object.
use super::*;
use serde_json::json;

/// `o` holds a misspelled field, `unknown`: kubectl's strict field validation has the
/// server refuse it. Without it the field is pruned, and what is left is refused for
/// `what_is_left`: by a real API server's schema or CEL rule, else by the controller
/// (Stalled, InvalidSpec).
fn expect_misspelled(o: Obj, unknown: &str, what_is_left: &str) {
    expect_refused_by_the_server(
        &o.0,
        &format!("strict decoding error: unknown field \"{unknown}\""),
    );
    if lab().world.control_plane().kind() == ControlPlaneKind::Real {
        let err = lab()
            .kubectl
            .try_run(
                &["apply", "--validate=false", "-f", "-"],
                Some(&o.0.to_string()),
            )
            .expect_err("what is left is refused");
        assert!(err.contains(what_is_left), "{err}");
        return;
    }
    let (kind, name) = kind_and_name(&o.0);
    apply_without_validation(&[o.v()]);
    expect_stalled(&kind, &name, "InvalidSpec", what_is_left);
}

#[test]
fn misspelled_required_field_is_invalid_spec_naming_it() {
    // Without strict validation `passwrd` is pruned; what is left lacks `password`: a real
    // API server says "spec.password: Required value", the controller "missing field
    // `password`".
    let o = reset("typo-field").remove("spec.password").set(
        "spec.passwrd",
        json!({"secretRef": {"name": "typo-field-pw", "key": "password"}}),
    );
    let what_is_left = if lab().world.control_plane().kind() == ControlPlaneKind::Real {
        "spec.password: Required value"
    } else {
        "missing field `password`"
    };
    expect_misspelled(o, "spec.passwrd", what_is_left);
}

#[test]
fn misspelled_target_field_is_invalid_spec() {
    // Without strict validation `vmname` is pruned, leaving no target.
    expect_misspelled(
        rebuild("k-typo-target").set("spec.target", json!({"vmname": "vm-a"})),
        "spec.target.vmname",
        "set exactly one of target.vmName and target.selector",
    );
}

#[test]
fn unknown_extra_field_is_dropped_and_the_reset_still_works() {
    let mut objs = reset_with_password("extra-field", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["color"] = json!("blue");
    apply(&objs[..1]);
    expect_refused_by_the_server(
        &objs[1],
        "strict decoding error: unknown field \"spec.color\"",
    );
    apply_without_validation(&objs[1..]);
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
    invalid_spec(
        rebuild("k-mode-case").set("spec.mode", json!("live")),
        "spec.mode: Unsupported value: \"live\"",
        "spec.mode: unknown variant `live`",
    );
}

#[test]
fn negative_max_concurrency_is_invalid_spec_naming_the_field() {
    invalid_spec(
        reset("neg-concurrency").set("spec.maxConcurrency", json!(-1)),
        "spec.maxConcurrency in body should be greater than or equal to 1",
        "spec.maxConcurrency",
    );
}

#[test]
fn huge_max_concurrency_is_invalid_spec() {
    invalid_spec(
        rebuild("k-huge-concurrency").set("spec.maxConcurrency", json!(5000)),
        "spec.maxConcurrency in body should be less than or equal to 1000",
        "maxConcurrency must be 1-1000, got 5000",
    );
}

#[test]
fn zero_max_concurrency_is_invalid_spec() {
    invalid_spec(
        reset("zero-concurrency").set("spec.maxConcurrency", json!(0)),
        "spec.maxConcurrency in body should be greater than or equal to 1",
        "maxConcurrency must be 1-1000, got 0",
    );
}

#[test]
fn negative_deadline_is_invalid_spec_naming_the_field() {
    invalid_spec(
        rebuild("k-neg-deadline").set("spec.deadlineSeconds", json!(-30)),
        "spec.deadlineSeconds in body should be greater than or equal to 10",
        "spec.deadlineSeconds",
    );
}

#[test]
fn huge_deadline_is_invalid_spec() {
    invalid_spec(
        reset("huge-deadline").set("spec.deadlineSeconds", json!(10_000_000)),
        "spec.deadlineSeconds in body should be less than or equal to 86400",
        "deadlineSeconds must be 10-86400, got 10000000",
    );
}

#[test]
fn deadline_beyond_32_bits_is_invalid_spec_naming_the_field() {
    invalid_spec(
        reset("overflow-deadline").set("spec.deadlineSeconds", json!(99_999_999_999_i64)),
        "spec.deadlineSeconds in body should be less than or equal to 86400",
        "spec.deadlineSeconds",
    );
}

#[test]
fn negative_ttl_is_invalid_spec_naming_the_field() {
    invalid_spec(
        rebuild("k-neg-ttl").set("spec.ttlSeconds", json!(-5)),
        "spec.ttlSeconds in body should be greater than or equal to 10",
        "spec.ttlSeconds",
    );
}

#[test]
fn huge_ttl_is_invalid_spec() {
    invalid_spec(
        rebuild("k-huge-ttl").set("spec.ttlSeconds", json!(1_000_000_000)),
        "spec.ttlSeconds in body should be less than or equal to 31536000",
        "ttlSeconds must be 10-31536000, got 1000000000",
    );
}

#[test]
fn number_given_as_a_string_is_invalid_spec_naming_the_field() {
    invalid_spec(
        reset("string-number").set("spec.maxFailures", json!("two")),
        "spec.maxFailures in body must be of type integer: \"string\"",
        "spec.maxFailures",
    );
}
