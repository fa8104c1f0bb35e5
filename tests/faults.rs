//! Faults during work: the shim killed mid-call and restarted, the controller killed
//! mid-bulk and restarted, hung and paused agents, VMs paused, deleted and restarted
//! mid-operation, 409s on status writes, 410s on watches, and the shim unreachable for a
//! while. Every object reaches the right terminal state within its deadline, generated
//! passwords are applied once each, and no secret leaks into logs, Events, status,
//! metrics or panic output. (libvirtd restarts: `shim_reconnects_after_libvirtd_restarts`
//! in tests/shim_libvirt.rs, on the real-guest lab.)
//!
//! Each test has its own fault lab (`WorldOptions::fault_lab()`): the emulator, one node
//! whose shim can be killed and restarted on the same address, real qemu-ga agents, and a
//! controller that can be killed and restarted.
use guestcred::api::kubevirt::VirtualMachineInstance;
use guestcred::api::{GuestPasswordReset, Phase, TargetState};
use guestcred_lab::kubevirt::vm;
use guestcred_lab::testing::*;
use guestcred_lab::world::{World, WorldOptions};
use kube::Api;
use kube::api::DeleteParams;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

const NODE: &str = "node-1";
const WAIT: Duration = Duration::from_secs(90);

/// A fault lab whose Secret "pw" holds `password`.
async fn fault_lab_with_password(password: &str) -> World {
    let lab = World::start(WorldOptions::fault_lab())
        .await
        .expect("the fault lab starts");
    lab.apply(&secret("pw", "password", password))
        .await
        .expect("apply");
    lab
}

/// Reset `name`: alice's password on VM `vm` from the Secret "pw".
fn alice_from_pw(name: &str, vm: &str) -> GuestPasswordReset {
    GuestPasswordReset::test(name)
        .vm(vm)
        .user("alice")
        .from_secret("pw")
}

/// Reset "r" (alice on vm-a from "pw", deadline 60 s) applied, once its target is being
/// retried with `reason`.
async fn retrying_reset(lab: &World, reason: &'static str) -> GuestPasswordReset {
    lab.apply(&alice_from_pw("r", "vm-a").deadline_seconds(60))
        .await
        .expect("apply");
    lab.wait_for::<GuestPasswordReset>(NS, "r", WAIT, target_reason(reason))
        .await
        .expect(reason)
}

/// Reset `name` once it reached a terminal phase.
async fn finished_reset(lab: &World, name: &str) -> GuestPasswordReset {
    lab.wait_for::<GuestPasswordReset>(NS, name, WAIT, finished)
        .await
        .expect("a terminal phase")
}

/// Reset `name` reaches a terminal phase, and it is Succeeded.
async fn assert_succeeds(lab: &World, name: &str) {
    let done = finished_reset(lab, name).await;
    assert_eq!(
        phase(&done),
        Some(Phase::Succeeded),
        "{name}: {:#?}",
        done.status
    );
}

// ---------------------------------------------------------------------------------------
// The shim.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shim_killed_mid_call_and_restarted_finishes_every_target() {
    const PW: &str = "Shim-Restart-Canary-31f0";
    let lab = fault_lab_with_password(PW).await;
    let mut agents = Vec::new();
    for i in 0..3 {
        let d = vm(NS, &format!("vm-{i}"), NODE).label("bulk", "shim");
        agents.push(lab.add_guest(&d).await);
    }
    // The first agent hangs, so the kill lands while its call is in the shim.
    signal(&agents[0], "-STOP");
    let r = GuestPasswordReset::test("bulk")
        .selector("bulk", "shim")
        .user("alice")
        .from_secret("pw")
        .max_concurrency(1)
        .deadline_seconds(60);
    lab.apply(&r).await.expect("apply");
    lab.wait_for::<GuestPasswordReset>(NS, "bulk", WAIT, |r| {
        r.status
            .as_ref()
            .is_some_and(|s| s.run.targets.first().is_some_and(|t| t.attempts >= 1))
    })
    .await
    .expect("a call in flight");
    tokio::time::sleep(Duration::from_millis(300)).await;
    lab.kill_shim(NODE);
    signal(&agents[0], "-CONT");
    lab.wait_for::<GuestPasswordReset>(NS, "bulk", WAIT, |r| {
        reason(r).as_deref() == Some("ShimUnavailable")
            || reason(r).as_deref() == Some("AgentTimeout")
    })
    .await
    .expect("ShimUnavailable while the shim is down");
    lab.restart_shim(NODE).await;
    assert_succeeds(&lab, "bulk").await;
    for a in &agents {
        assert!(
            verifies(PW, &alice_hash(a)),
            "{} has the password",
            a.name()
        );
    }
    assert!(lab.controller_alive());
    lab.assert_not_leaked(&[PW]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_shim_is_retried_until_it_is_back() {
    const PW: &str = "Unreachable-Shim-Canary-9c4e";
    let lab = fault_lab_with_password(PW).await;
    let a = lab.add_guest(&vm(NS, "vm-a", NODE)).await;
    lab.set_shim_pod_ip(NODE, "127.0.3.250").await;
    lab.apply(&alice_from_pw("r", "vm-a")).await.expect("apply");
    let r = lab
        .wait_for::<GuestPasswordReset>(NS, "r", WAIT, target_reason("ShimUnavailable"))
        .await
        .expect("ShimUnavailable; retrying");
    assert!(message(&r).ends_with("; retrying"), "{}", message(&r));
    lab.set_shim_pod_ip(NODE, lab.shim_ip(NODE)).await;
    assert_succeeds(&lab, "r").await;
    assert!(verifies(PW, &alice_hash(&a)));
    lab.assert_not_leaked(&[PW]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shim_gone_for_longer_than_the_deadline_fails_with_deadline_exceeded() {
    let lab = fault_lab_with_password("Gone-Shim-Canary-0b8d").await;
    let _a = lab.add_guest(&vm(NS, "vm-a", NODE)).await;
    lab.kill_shim(NODE);
    lab.apply(&alice_from_pw("r", "vm-a").deadline_seconds(10))
        .await
        .expect("apply");
    let done = finished_reset(&lab, "r").await;
    assert_eq!(phase(&done), Some(Phase::Failed));
    assert_eq!(reason(&done).as_deref(), Some("DeadlineExceeded"));
    assert!(
        message(&done).contains("shim unreachable"),
        "{}",
        message(&done)
    );
    assert!(lab.controller_alive());
}

// ---------------------------------------------------------------------------------------
// The controller.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_mid_bulk_applies_each_generated_password_once() {
    let mut lab = World::start(WorldOptions::fault_lab())
        .await
        .expect("the fault lab starts");
    let agents = lab
        .bulk_guests((0..6).map(|i| format!("vm-{i}")), NODE, ("bulk", "gen"))
        .await;
    let r = GuestPasswordReset::test("gen")
        .selector("bulk", "gen")
        .user("alice")
        .generate(24)
        .max_concurrency(1);
    lab.apply(&r).await.expect("apply");
    lab.wait_for::<GuestPasswordReset>(NS, "gen", WAIT, succeeded_at_least(2))
        .await
        .expect("two targets done");
    lab.kill_controller();
    let before = lab.output_passwords(NS, "guestcred.io/reset").await;
    let done_before: Vec<String> = lab
        .get::<GuestPasswordReset>(NS, "gen")
        .await
        .status
        .expect("status")
        .run
        .targets
        .iter()
        .filter(|t| t.state == TargetState::Succeeded)
        .map(|t| t.vm.clone())
        .collect();
    let hashes_before: BTreeMap<String, String> = done_before
        .iter()
        .map(|vm| (vm.clone(), alice_hash(&agents[vm])))
        .collect();
    lab.start_controller();
    assert_succeeds(&lab, "gen").await;

    let after = lab.output_passwords(NS, "guestcred.io/reset").await;
    assert_eq!(
        after.len(),
        agents.len(),
        "one output Secret per VM, none skipped"
    );
    assert_never_rewritten(&before, &after, "");
    for (vm, hash) in &hashes_before {
        assert_eq!(
            &alice_hash(&agents[vm]),
            hash,
            "{vm}: finished before the crash, not applied again"
        );
    }
    assert_alice_has_stored_passwords(&agents, &after, "");
    let pws: Vec<&str> = after.values().map(|(_, p)| p.as_str()).collect();
    lab.assert_not_leaked(&pws).await;
}

// ---------------------------------------------------------------------------------------
// The agent and the VM.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_agent_times_out_and_the_target_finishes_after_resume() {
    const PW: &str = "Paused-Agent-Canary-e51a";
    let lab = fault_lab_with_password(PW).await;
    let a = lab.add_guest(&vm(NS, "vm-a", NODE)).await;
    signal(&a, "-STOP");
    retrying_reset(&lab, "AgentTimeout").await;
    signal(&a, "-CONT");
    assert_succeeds(&lab, "r").await;
    assert!(verifies(PW, &alice_hash(&a)));
    lab.assert_not_leaked(&[PW]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_paused_mid_operation_is_retried_until_it_resumes() {
    const PW: &str = "Paused-Vm-Canary-44d2";
    let lab = fault_lab_with_password(PW).await;
    let d = vm(NS, "vm-a", NODE);
    let a = lab.add_guest(&d).await;
    let paused = json!({"conditions": [
        {"type": "AgentConnected", "status": "True"},
        {"type": "Paused", "status": "True", "reason": "PausedByUser"}
    ]});
    lab.set_vmi_status(NS, "vm-a", paused).await;
    signal(&a, "-STOP");
    let r = retrying_reset(&lab, "VMNotRunning").await;
    assert!(message(&r).contains("is paused"), "{}", message(&r));
    signal(&a, "-CONT");
    lab.set_vmi_status(NS, "vm-a", json!({"conditions": d.vmi_status().conditions}))
        .await;
    assert_succeeds(&lab, "r").await;
    assert!(verifies(PW, &alice_hash(&a)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_deleted_mid_operation_fails_with_vm_not_found() {
    let lab = fault_lab_with_password("Deleted-Vm-Canary-7a10").await;
    let d = vm(NS, "vm-a", NODE).phase("Scheduling");
    d.create(&lab.client).await.expect("vm");
    retrying_reset(&lab, "VMNotRunning").await;
    let vmis: Api<VirtualMachineInstance> = Api::namespaced(lab.client.clone(), NS);
    vmis.delete("vm-a", &DeleteParams::default())
        .await
        .expect("delete vmi");
    let done = finished_reset(&lab, "r").await;
    assert_eq!(phase(&done), Some(Phase::Failed));
    assert_eq!(reason(&done).as_deref(), Some("VMNotFound"));
    assert!(lab.controller_alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_restarted_mid_operation_gets_the_password_after_it_is_back() {
    const PW: &str = "Restarted-Vm-Canary-c3b9";
    let lab = fault_lab_with_password(PW).await;
    let d = vm(NS, "vm-a", NODE);
    let mut old = lab.add_guest(&d).await;
    // The VM goes down: agent gone, VMI Scheduling again.
    old.stop().expect("stop the old agent");
    lab.set_vmi_status(
        NS,
        "vm-a",
        json!({"phase": "Scheduling", "activePods": null, "conditions": [
            {"type": "AgentConnected", "status": "False"}]}),
    )
    .await;
    retrying_reset(&lab, "VMNotRunning").await;
    // Back: a fresh agent and a Running VMI.
    let fresh = lab.start_agent(&d, &alice()).expect("a fresh agent");
    lab.set_vmi_status(
        NS,
        "vm-a",
        serde_json::to_value(d.vmi_status()).expect("status"),
    )
    .await;
    assert_succeeds(&lab, "r").await;
    assert!(verifies(PW, &alice_hash(&fresh)));
}

// ---------------------------------------------------------------------------------------
// The API server.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_write_conflicts_are_retried() {
    const PW: &str = "Conflict-Canary-2dd7";
    let lab = fault_lab_with_password(PW).await;
    let a = lab.add_guest(&vm(NS, "vm-a", NODE)).await;
    lab.api().faults().conflict_next_status_writes(3);
    lab.apply(&alice_from_pw("r", "vm-a")).await.expect("apply");
    assert_succeeds(&lab, "r").await;
    assert!(verifies(PW, &alice_hash(&a)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_status_conflicts_never_apply_a_second_generated_password() {
    let lab = World::start(WorldOptions::fault_lab())
        .await
        .expect("the fault lab starts");
    let a = lab.add_guest(&vm(NS, "vm-a", NODE)).await;
    // More 409s than one status write retries: the reconcile fails and runs again.
    lab.api().faults().conflict_next_status_writes(15);
    lab.apply(
        &GuestPasswordReset::test("gen")
            .vm("vm-a")
            .user("alice")
            .generate(24),
    )
    .await
    .expect("apply");
    assert_succeeds(&lab, "gen").await;
    let stored = lab.output_passwords(NS, "guestcred.io/reset").await;
    assert_eq!(stored.len(), 1);
    let (_, pw) = &stored["vm-a"];
    assert!(
        verifies(pw, &alice_hash(&a)),
        "the guest has the stored password"
    );
    lab.assert_not_leaked(&[pw.as_str()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_watches_are_relisted_and_work_continues() {
    const PW: &str = "Expired-Watch-Canary-5e6f";
    let lab = fault_lab_with_password(PW).await;
    let a = lab.add_guest(&vm(NS, "vm-a", NODE)).await;
    let b = lab.add_guest(&vm(NS, "vm-b", NODE)).await;
    lab.apply(&alice_from_pw("first", "vm-a"))
        .await
        .expect("apply");
    lab.api().faults().expire_watches();
    lab.apply(&alice_from_pw("second", "vm-b"))
        .await
        .expect("apply");
    lab.api().faults().expire_watches();
    for name in ["first", "second"] {
        assert_succeeds(&lab, name).await;
    }
    assert!(verifies(PW, &alice_hash(&a)));
    assert!(verifies(PW, &alice_hash(&b)));
    assert!(lab.controller_alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_panic_was_seen_in_this_binary_so_far() {
    // Runs alongside the others; every panic message is also scanned for secrets.
    let lab = fault_lab_with_password("Panic-Scan-Canary-18ab").await;
    let _a = lab.add_guest(&vm(NS, "vm-a", NODE)).await;
    lab.apply(&alice_from_pw("r", "vm-a")).await.expect("apply");
    finished_reset(&lab, "r").await;
    let panics = LogCapture::get().panics();
    let ours: Vec<&String> = panics
        .iter()
        .filter(|p| !p.contains("tests/faults.rs"))
        .collect();
    assert!(ours.is_empty(), "product code panicked: {ours:?}");
    lab.assert_not_leaked(&["Panic-Scan-Canary-18ab"]).await;
}
