//! Cases about targets: missing, stopped, both or neither of vmName and selector, a
//! selector that matches nothing, and a target changed after the run started.
use super::*;
use serde_json::json;

/// What the CRD's CEL rule and the controller both say of a target that names neither or
/// both of vmName and selector.
const ONE_TARGET: &str = "set exactly one of target.vmName and target.selector";

/// A selector of no VM in the lab.
fn no_match() -> Value {
    json!({"selector": {"matchLabels": {"suite": "nothing"}}})
}

#[test]
fn reset_of_a_missing_vm_fails_with_vm_not_found() {
    apply_and_expect_target_failed(
        &with_good_password(reset("missing-vm").set("spec.target.vmName", json!("no-such-vm"))),
        "VMNotFound",
        "no-such-vm not found; check spec.target",
    );
}

#[test]
fn keys_for_a_missing_vm_fail_with_vm_not_found() {
    apply_and_expect_target_failed(
        &[rebuild("k-missing-vm")
            .set("spec.target.vmName", json!("no-such-vm"))
            .v()],
        "VMNotFound",
        "check spec.target",
    );
}

#[test]
fn reset_of_a_stopped_vm_retries_as_vm_not_running_until_its_deadline() {
    apply(&with_good_password(
        reset("stopped-vm")
            .set("spec.target.vmName", json!("vm-stopped"))
            .set("spec.deadlineSeconds", json!(10)),
    ));
    poll("gpr", "stopped-vm", "VMNotRunning while retrying", |o| {
        let t = target0(o);
        t["reason"] == "VMNotRunning"
            && t["message"]
                .as_str()
                .is_some_and(|m| m.contains("not Running"))
    });
    expect_target_failed(
        "gpr",
        "stopped-vm",
        "DeadlineExceeded",
        "is Stopped, not Running",
    );
}

#[test]
fn both_vm_name_and_selector_is_invalid_spec() {
    expect_refused_or_stalled(
        &with_good_password(reset("both-targets").set(
            "spec.target.selector",
            json!({"matchLabels": {"suite": "bad-input"}}),
        )),
        &format!("spec.target: Invalid value: {ONE_TARGET}"),
        "InvalidSpec",
        ONE_TARGET,
    );
}

#[test]
fn keys_with_neither_vm_name_nor_selector_is_invalid_spec() {
    expect_refused_or_stalled(
        &[rebuild("k-no-target").set("spec.target", json!({})).v()],
        &format!("spec.target: Invalid value: {ONE_TARGET}"),
        "InvalidSpec",
        ONE_TARGET,
    );
}

#[test]
fn reset_with_neither_vm_name_nor_selector_is_invalid_spec() {
    expect_refused_or_stalled(
        &with_good_password(reset("no-target").set("spec.target", json!({}))),
        &format!("spec.target: Invalid value: {ONE_TARGET}"),
        "InvalidSpec",
        ONE_TARGET,
    );
}

#[test]
fn selector_matching_nothing_waits_with_no_targets() {
    let o = apply_and_expect_stalled(
        &with_good_password(reset("no-match").set("spec.target", no_match())),
        "NoTargets",
        "matches selector",
    );
    assert_eq!(
        o["status"]["phase"], "Pending",
        "a matching VM may still come"
    );
}

#[test]
fn keys_selector_matching_nothing_waits_with_no_targets() {
    apply_and_expect_stalled(
        &[rebuild("k-no-match").set("spec.target", no_match()).v()],
        "NoTargets",
        "matches selector",
    );
}

/// Applies `started` and waits until its run has started on vm-a; then `started` moved to
/// vm-b is refused by a real API server, or ends Stalled with InvalidSpec.
fn expect_the_target_immutable(started: impl Fn() -> Obj) {
    let first = started().v();
    let (kind, name) = kind_and_name(&first);
    apply(&[first]);
    poll(&kind, &name, "a started run", |o| {
        o["status"]["targetSpec"]["vmName"] == "vm-a"
    });
    expect_refused_or_stalled(
        &[started().set("spec.target.vmName", json!("vm-b")).v()],
        "spec.target is immutable; create a new object for other VMs",
        "InvalidSpec",
        "spec.target is immutable",
    );
}

#[test]
fn changing_the_target_of_a_started_reset_is_invalid_spec() {
    apply(&[secret("retarget-pw", "password", GOOD_PASSWORD.as_bytes())]);
    expect_the_target_immutable(|| reset("retarget"));
}

#[test]
fn changing_the_target_of_started_keys_is_invalid_spec() {
    expect_the_target_immutable(|| rebuild("k-retarget"));
}
