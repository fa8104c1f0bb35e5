//! Cases about targets: missing, stopped, both or neither of vmName and selector, a
//! selector that matches nothing, and a target changed after the run started.
use super::*;
use serde_json::json;

#[test]
fn reset_of_a_missing_vm_fails_with_vm_not_found() {
    let mut objs = reset_with_password("missing-vm", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["target"]["vmName"] = json!("no-such-vm");
    apply(&objs);
    expect_target_failed(
        "gpr",
        "missing-vm",
        "VMNotFound",
        "no-such-vm not found; check spec.target",
    );
}

#[test]
fn keys_for_a_missing_vm_fail_with_vm_not_found() {
    apply(&[rebuild("k-missing-vm")
        .set("spec.target.vmName", json!("no-such-vm"))
        .v()]);
    expect_target_failed("kpr", "k-missing-vm", "VMNotFound", "check spec.target");
}

#[test]
fn reset_of_a_stopped_vm_retries_as_vm_not_running_until_its_deadline() {
    let mut objs = reset_with_password("stopped-vm", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["target"]["vmName"] = json!("vm-stopped");
    objs[1]["spec"]["deadlineSeconds"] = json!(10);
    apply(&objs);
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
    let mut objs = reset_with_password("both-targets", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["target"]["selector"] = json!({"matchLabels": {"suite": "bad-input"}});
    if applied_unless_the_server_refuses(
        &objs,
        "spec.target: Invalid value: set exactly one of target.vmName and target.selector",
    ) {
        expect_stalled(
            "gpr",
            "both-targets",
            "InvalidSpec",
            "set exactly one of target.vmName and target.selector",
        );
    }
}

#[test]
fn keys_with_neither_vm_name_nor_selector_is_invalid_spec() {
    if applied_unless_the_server_refuses(
        &[rebuild("k-no-target").set("spec.target", json!({})).v()],
        "spec.target: Invalid value: set exactly one of target.vmName and target.selector",
    ) {
        expect_stalled(
            "kpr",
            "k-no-target",
            "InvalidSpec",
            "set exactly one of target.vmName and target.selector",
        );
    }
}

#[test]
fn reset_with_neither_vm_name_nor_selector_is_invalid_spec() {
    let mut objs = reset_with_password("no-target", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["target"] = json!({});
    if applied_unless_the_server_refuses(
        &objs,
        "spec.target: Invalid value: set exactly one of target.vmName and target.selector",
    ) {
        expect_stalled(
            "gpr",
            "no-target",
            "InvalidSpec",
            "set exactly one of target.vmName and target.selector",
        );
    }
}

#[test]
fn selector_matching_nothing_waits_with_no_targets() {
    let mut objs = reset_with_password("no-match", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["target"] = json!({"selector": {"matchLabels": {"suite": "nothing"}}});
    apply(&objs);
    let o = expect_stalled("gpr", "no-match", "NoTargets", "matches selector");
    assert_eq!(
        o["status"]["phase"], "Pending",
        "a matching VM may still come"
    );
}

#[test]
fn keys_selector_matching_nothing_waits_with_no_targets() {
    apply(&[rebuild("k-no-match")
        .set(
            "spec.target",
            json!({"selector": {"matchLabels": {"suite": "nothing"}}}),
        )
        .v()]);
    expect_stalled("kpr", "k-no-match", "NoTargets", "matches selector");
}

#[test]
fn changing_the_target_of_a_started_reset_is_invalid_spec() {
    apply(&reset_with_password("retarget", GOOD_PASSWORD.as_bytes()));
    poll("gpr", "retarget", "a started run", |o| {
        o["status"]["targetSpec"]["vmName"] == "vm-a"
    });
    if applied_unless_the_server_refuses(
        &[reset("retarget")
            .set("spec.target.vmName", json!("vm-b"))
            .v()],
        "spec.target is immutable; create a new object for other VMs",
    ) {
        expect_stalled("gpr", "retarget", "InvalidSpec", "spec.target is immutable");
    }
}

#[test]
fn changing_the_target_of_started_keys_is_invalid_spec() {
    apply(&[rebuild("k-retarget").v()]);
    poll("kpr", "k-retarget", "a started run", |o| {
        o["status"]["targetSpec"]["vmName"] == "vm-a"
    });
    if applied_unless_the_server_refuses(
        &[rebuild("k-retarget")
            .set("spec.target.vmName", json!("vm-b"))
            .v()],
        "spec.target is immutable; create a new object for other VMs",
    ) {
        expect_stalled(
            "kpr",
            "k-retarget",
            "InvalidSpec",
            "spec.target is immutable",
        );
    }
}
