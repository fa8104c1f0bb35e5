//! Fields the schema refuses. A real API server refuses them up front (its message is
//! the case's outcome there); the emulator has no schema validation or CEL, and the
//! controller must refuse them itself, naming the field. Unknown fields are refused by
//! both (kubectl asks for strict field validation); with `--validate=false` they are
//! dropped, and what is left goes the way of any other object.
use super::*;
use serde_json::json;

#[test]
fn misspelled_required_field_is_invalid_spec_naming_it() {
    let o = reset("typo-field").remove("spec.password").set(
        "spec.passwrd",
        json!({"secretRef": {"name": "typo-field-pw", "key": "password"}}),
    );
    expect_refused_by_the_server(
        &o.0,
        "strict decoding error: unknown field \"spec.passwrd\"",
    );
    // Without strict validation `passwrd` is pruned; what is left lacks `password`.
    if lab().world.control_plane().kind() == ControlPlaneKind::Real {
        let err = lab()
            .kubectl
            .try_run(
                &["apply", "--validate=false", "-f", "-"],
                Some(&o.0.to_string()),
            )
            .expect_err("a reset without a password is refused");
        assert!(err.contains("spec.password: Required value"), "{err}");
        return;
    }
    apply_without_validation(&[o.v()]);
    expect_stalled(
        "gpr",
        "typo-field",
        "InvalidSpec",
        "missing field `password`",
    );
}

#[test]
fn misspelled_target_field_is_invalid_spec() {
    let o = rebuild("k-typo-target").set("spec.target", json!({"vmname": "vm-a"}));
    expect_refused_by_the_server(
        &o.0,
        "strict decoding error: unknown field \"spec.target.vmname\"",
    );
    // Without strict validation `vmname` is pruned, leaving no target.
    if lab().world.control_plane().kind() == ControlPlaneKind::Real {
        let err = lab()
            .kubectl
            .try_run(
                &["apply", "--validate=false", "-f", "-"],
                Some(&o.0.to_string()),
            )
            .expect_err("keys without a target are refused");
        assert!(
            err.contains("set exactly one of target.vmName and target.selector"),
            "{err}"
        );
        return;
    }
    apply_without_validation(&[o.v()]);
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
    if applied_unless_the_server_refuses(
        &[rebuild("k-mode-case").set("spec.mode", json!("live")).v()],
        "spec.mode: Unsupported value: \"live\"",
    ) {
        expect_stalled(
            "kpr",
            "k-mode-case",
            "InvalidSpec",
            "spec.mode: unknown variant `live`",
        );
    }
}

#[test]
fn negative_max_concurrency_is_invalid_spec_naming_the_field() {
    let mut objs = reset_with_password("neg-concurrency", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["maxConcurrency"] = json!(-1);
    if applied_unless_the_server_refuses(
        &objs,
        "spec.maxConcurrency in body should be greater than or equal to 1",
    ) {
        expect_stalled(
            "gpr",
            "neg-concurrency",
            "InvalidSpec",
            "spec.maxConcurrency",
        );
    }
}

#[test]
fn huge_max_concurrency_is_invalid_spec() {
    if applied_unless_the_server_refuses(
        &[rebuild("k-huge-concurrency")
            .set("spec.maxConcurrency", json!(5000))
            .v()],
        "spec.maxConcurrency in body should be less than or equal to 1000",
    ) {
        expect_stalled(
            "kpr",
            "k-huge-concurrency",
            "InvalidSpec",
            "maxConcurrency must be 1-1000, got 5000",
        );
    }
}

#[test]
fn zero_max_concurrency_is_invalid_spec() {
    let mut objs = reset_with_password("zero-concurrency", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["maxConcurrency"] = json!(0);
    if applied_unless_the_server_refuses(
        &objs,
        "spec.maxConcurrency in body should be greater than or equal to 1",
    ) {
        expect_stalled(
            "gpr",
            "zero-concurrency",
            "InvalidSpec",
            "maxConcurrency must be 1-1000, got 0",
        );
    }
}

#[test]
fn negative_deadline_is_invalid_spec_naming_the_field() {
    if applied_unless_the_server_refuses(
        &[rebuild("k-neg-deadline")
            .set("spec.deadlineSeconds", json!(-30))
            .v()],
        "spec.deadlineSeconds in body should be greater than or equal to 10",
    ) {
        expect_stalled(
            "kpr",
            "k-neg-deadline",
            "InvalidSpec",
            "spec.deadlineSeconds",
        );
    }
}

#[test]
fn huge_deadline_is_invalid_spec() {
    let mut objs = reset_with_password("huge-deadline", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["deadlineSeconds"] = json!(10_000_000);
    if applied_unless_the_server_refuses(
        &objs,
        "spec.deadlineSeconds in body should be less than or equal to 86400",
    ) {
        expect_stalled(
            "gpr",
            "huge-deadline",
            "InvalidSpec",
            "deadlineSeconds must be 10-86400, got 10000000",
        );
    }
}

#[test]
fn deadline_beyond_32_bits_is_invalid_spec_naming_the_field() {
    let mut objs = reset_with_password("overflow-deadline", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["deadlineSeconds"] = json!(99_999_999_999_i64);
    if applied_unless_the_server_refuses(
        &objs,
        "spec.deadlineSeconds in body should be less than or equal to 86400",
    ) {
        expect_stalled(
            "gpr",
            "overflow-deadline",
            "InvalidSpec",
            "spec.deadlineSeconds",
        );
    }
}

#[test]
fn negative_ttl_is_invalid_spec_naming_the_field() {
    if applied_unless_the_server_refuses(
        &[rebuild("k-neg-ttl").set("spec.ttlSeconds", json!(-5)).v()],
        "spec.ttlSeconds in body should be greater than or equal to 10",
    ) {
        expect_stalled("kpr", "k-neg-ttl", "InvalidSpec", "spec.ttlSeconds");
    }
}

#[test]
fn huge_ttl_is_invalid_spec() {
    if applied_unless_the_server_refuses(
        &[rebuild("k-huge-ttl")
            .set("spec.ttlSeconds", json!(1_000_000_000))
            .v()],
        "spec.ttlSeconds in body should be less than or equal to 31536000",
    ) {
        expect_stalled(
            "kpr",
            "k-huge-ttl",
            "InvalidSpec",
            "ttlSeconds must be 10-31536000, got 1000000000",
        );
    }
}

#[test]
fn number_given_as_a_string_is_invalid_spec_naming_the_field() {
    let mut objs = reset_with_password("string-number", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["maxFailures"] = json!("two");
    if applied_unless_the_server_refuses(
        &objs,
        "spec.maxFailures in body must be of type integer: \"string\"",
    ) {
        expect_stalled("gpr", "string-number", "InvalidSpec", "spec.maxFailures");
    }
}
