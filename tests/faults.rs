//! Faults during work: the shim killed mid-call and restarted, the controller killed
//! mid-bulk and restarted, hung and paused agents, VMs paused, deleted and restarted
//! mid-operation, 409s on status writes, 410s on watches, and the shim unreachable for a
//! while. Every object reaches the right terminal state within its deadline, generated
//! passwords are applied once each, and no secret leaks into logs, Events, status,
//! metrics or panic output. (libvirtd restarts: `shim_reconnects_after_libvirtd_restarts`
//! in tests/shim_libvirt.rs, on the real-guest lab.)
//!
//! Each test has its own fault lab (`FaultLab`): the emulator, one node whose shim can be
//! killed and restarted on the same address, real qemu-ga agents, and a controller that
//! can be killed and restarted.
mod fault_lab;

use fault_lab::*;
use guestcred::api::kubevirt::VirtualMachineInstance;
use guestcred::api::{Phase, TargetState};
use guestcred_lab::kubevirt::vm;
use kube::Api;
use kube::api::DeleteParams;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;

// ---------------------------------------------------------------------------------------
// The shim.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shim_killed_mid_call_and_restarted_finishes_every_target() {
    let mut lab = FaultLab::start().await;
    let mut agents = Vec::new();
    for i in 0..3 {
        let d = vm(NS, &format!("vm-{i}"), NODE).label("bulk", "shim");
        agents.push(lab.add_vm(&d).await);
    }
    const PW: &str = "Shim-Restart-Canary-31f0";
    lab.apply(&secret("pw", PW)).await;
    // The first agent hangs, so the kill lands while its call is in the shim.
    signal(&agents[0], "-STOP");
    let mut r = reset("bulk", labelled("shim"), from_secret("pw"));
    r.spec.rollout.max_concurrency = 1;
    r.spec.rollout.deadline_seconds = 60;
    lab.apply(&r).await;
    lab.wait_for("bulk", "a call in flight", |r| {
        r.status
            .as_ref()
            .is_some_and(|s| s.run.targets.first().is_some_and(|t| t.attempts >= 1))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    lab.kill_shim();
    signal(&agents[0], "-CONT");
    lab.wait_for("bulk", "ShimUnavailable while the shim is down", |r| {
        first_target_reason(r).as_deref() == Some("ShimUnavailable")
            || first_target_reason(r).as_deref() == Some("AgentTimeout")
    })
    .await;
    lab.restart_shim().await;
    let done = lab.wait_finished("bulk").await;
    assert_eq!(phase(&done), Some(Phase::Succeeded), "{:#?}", done.status);
    for a in &agents {
        assert!(verifies(PW, &hash_of(a)), "{} has the password", a.name());
    }
    assert!(lab.controller_alive());
    lab.assert_not_leaked(&[PW]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_shim_is_retried_until_it_is_back() {
    let lab = FaultLab::start().await;
    let a = lab.add_vm(&vm(NS, "vm-a", NODE)).await;
    const PW: &str = "Unreachable-Shim-Canary-9c4e";
    lab.apply(&secret("pw", PW)).await;
    lab.set_shim_pod_ip("127.0.3.250").await;
    lab.apply(&reset("r", one("vm-a"), from_secret("pw"))).await;
    let r = lab
        .wait_for("r", "ShimUnavailable; retrying", |r| {
            first_target_reason(r).as_deref() == Some("ShimUnavailable")
        })
        .await;
    assert!(
        first_target_message(&r).ends_with("; retrying"),
        "{}",
        first_target_message(&r)
    );
    lab.set_shim_pod_ip(&lab.shim_ip.clone()).await;
    let done = lab.wait_finished("r").await;
    assert_eq!(phase(&done), Some(Phase::Succeeded), "{:#?}", done.status);
    assert!(verifies(PW, &hash_of(&a)));
    lab.assert_not_leaked(&[PW]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shim_gone_for_longer_than_the_deadline_fails_with_deadline_exceeded() {
    let mut lab = FaultLab::start().await;
    let _a = lab.add_vm(&vm(NS, "vm-a", NODE)).await;
    lab.apply(&secret("pw", "Gone-Shim-Canary-0b8d")).await;
    lab.kill_shim();
    let mut r = reset("r", one("vm-a"), from_secret("pw"));
    r.spec.rollout.deadline_seconds = 10;
    lab.apply(&r).await;
    let done = lab.wait_finished("r").await;
    assert_eq!(phase(&done), Some(Phase::Failed));
    assert_eq!(
        first_target_reason(&done).as_deref(),
        Some("DeadlineExceeded")
    );
    assert!(
        first_target_message(&done).contains("shim unreachable"),
        "{}",
        first_target_message(&done)
    );
    assert!(lab.controller_alive());
}

// ---------------------------------------------------------------------------------------
// The controller.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_mid_bulk_applies_each_generated_password_once() {
    let mut lab = FaultLab::start().await;
    let mut agents = BTreeMap::new();
    for i in 0..6 {
        let name = format!("vm-{i}");
        let d = vm(NS, &name, NODE).label("bulk", "gen");
        agents.insert(name, lab.add_vm(&d).await);
    }
    let mut r = reset("gen", labelled("gen"), generated());
    r.spec.rollout.max_concurrency = 1;
    lab.apply(&r).await;
    lab.wait_for("gen", "two targets done", |r| {
        r.status
            .as_ref()
            .is_some_and(|s| s.run.summary.succeeded >= 2)
    })
    .await;
    lab.kill_controller();
    let before = lab.output_passwords().await;
    let done_before: Vec<String> = lab
        .reset("gen")
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
        .map(|vm| (vm.clone(), hash_of(&agents[vm])))
        .collect();
    lab.start_controller();
    let done = lab.wait_finished("gen").await;
    assert_eq!(phase(&done), Some(Phase::Succeeded), "{:#?}", done.status);

    let after = lab.output_passwords().await;
    assert_eq!(
        after.len(),
        agents.len(),
        "one output Secret per VM, none skipped"
    );
    for (vm, (rv, pw)) in &before {
        assert_eq!(
            after.get(vm).map(|(rv, _)| rv),
            Some(rv),
            "{vm}: the stored password was never rewritten"
        );
        assert_eq!(after.get(vm).map(|(_, p)| p), Some(pw));
    }
    for (vm, hash) in &hashes_before {
        assert_eq!(
            &hash_of(&agents[vm]),
            hash,
            "{vm}: finished before the crash, not applied again"
        );
    }
    for (vm, qga) in &agents {
        let (_, pw) = &after[vm];
        assert!(
            verifies(pw, &hash_of(qga)),
            "{vm}: guest has its stored password"
        );
    }
    let pws: Vec<&str> = after.values().map(|(_, p)| p.as_str()).collect();
    lab.assert_not_leaked(&pws).await;
}

// ---------------------------------------------------------------------------------------
// The agent and the VM.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_agent_times_out_and_the_target_finishes_after_resume() {
    let lab = FaultLab::start().await;
    let a = lab.add_vm(&vm(NS, "vm-a", NODE)).await;
    const PW: &str = "Paused-Agent-Canary-e51a";
    lab.apply(&secret("pw", PW)).await;
    signal(&a, "-STOP");
    let mut r = reset("r", one("vm-a"), from_secret("pw"));
    r.spec.rollout.deadline_seconds = 60;
    lab.apply(&r).await;
    lab.wait_for("r", "AgentTimeout; retrying", |r| {
        first_target_reason(r).as_deref() == Some("AgentTimeout")
    })
    .await;
    signal(&a, "-CONT");
    let done = lab.wait_finished("r").await;
    assert_eq!(phase(&done), Some(Phase::Succeeded), "{:#?}", done.status);
    assert!(verifies(PW, &hash_of(&a)));
    lab.assert_not_leaked(&[PW]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_paused_mid_operation_is_retried_until_it_resumes() {
    let lab = FaultLab::start().await;
    let d = vm(NS, "vm-a", NODE);
    let a = lab.add_vm(&d).await;
    const PW: &str = "Paused-Vm-Canary-44d2";
    lab.apply(&secret("pw", PW)).await;
    let paused = json!({"conditions": [
        {"type": "AgentConnected", "status": "True"},
        {"type": "Paused", "status": "True", "reason": "PausedByUser"}
    ]});
    lab.set_vmi_status("vm-a", paused).await;
    signal(&a, "-STOP");
    let mut r = reset("r", one("vm-a"), from_secret("pw"));
    r.spec.rollout.deadline_seconds = 60;
    lab.apply(&r).await;
    let r = lab
        .wait_for("r", "VMNotRunning (paused)", |r| {
            first_target_reason(r).as_deref() == Some("VMNotRunning")
        })
        .await;
    assert!(
        first_target_message(&r).contains("is paused"),
        "{}",
        first_target_message(&r)
    );
    signal(&a, "-CONT");
    lab.set_vmi_status("vm-a", json!({"conditions": d.vmi_status().conditions}))
        .await;
    let done = lab.wait_finished("r").await;
    assert_eq!(phase(&done), Some(Phase::Succeeded), "{:#?}", done.status);
    assert!(verifies(PW, &hash_of(&a)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_deleted_mid_operation_fails_with_vm_not_found() {
    let lab = FaultLab::start().await;
    let d = vm(NS, "vm-a", NODE).phase("Scheduling");
    d.create(&lab.client).await.expect("vm");
    lab.apply(&secret("pw", "Deleted-Vm-Canary-7a10")).await;
    let mut r = reset("r", one("vm-a"), from_secret("pw"));
    r.spec.rollout.deadline_seconds = 60;
    lab.apply(&r).await;
    lab.wait_for("r", "VMNotRunning while it starts", |r| {
        first_target_reason(r).as_deref() == Some("VMNotRunning")
    })
    .await;
    let vmis: Api<VirtualMachineInstance> = Api::namespaced(lab.client.clone(), NS);
    vmis.delete("vm-a", &DeleteParams::default())
        .await
        .expect("delete vmi");
    let done = lab.wait_finished("r").await;
    assert_eq!(phase(&done), Some(Phase::Failed));
    assert_eq!(first_target_reason(&done).as_deref(), Some("VMNotFound"));
    assert!(lab.controller_alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_restarted_mid_operation_gets_the_password_after_it_is_back() {
    let lab = FaultLab::start().await;
    let d = vm(NS, "vm-a", NODE);
    let mut old = lab.add_vm(&d).await;
    const PW: &str = "Restarted-Vm-Canary-c3b9";
    lab.apply(&secret("pw", PW)).await;
    // The VM goes down: agent gone, VMI Scheduling again.
    old.stop().expect("stop the old agent");
    lab.set_vmi_status(
        "vm-a",
        json!({"phase": "Scheduling", "activePods": null, "conditions": [
            {"type": "AgentConnected", "status": "False"}]}),
    )
    .await;
    let mut r = reset("r", one("vm-a"), from_secret("pw"));
    r.spec.rollout.deadline_seconds = 60;
    lab.apply(&r).await;
    lab.wait_for("r", "VMNotRunning while it restarts", |r| {
        first_target_reason(r).as_deref() == Some("VMNotRunning")
    })
    .await;
    // Back: a fresh agent and a Running VMI.
    let fresh = lab.start_agent(&d);
    lab.set_vmi_status(
        "vm-a",
        serde_json::to_value(d.vmi_status()).expect("status"),
    )
    .await;
    let done = lab.wait_finished("r").await;
    assert_eq!(phase(&done), Some(Phase::Succeeded), "{:#?}", done.status);
    assert!(verifies(PW, &hash_of(&fresh)));
}

// ---------------------------------------------------------------------------------------
// The API server.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_write_conflicts_are_retried() {
    let lab = FaultLab::start().await;
    let a = lab.add_vm(&vm(NS, "vm-a", NODE)).await;
    const PW: &str = "Conflict-Canary-2dd7";
    lab.apply(&secret("pw", PW)).await;
    lab.api.faults().conflict_next_status_writes(3);
    lab.apply(&reset("r", one("vm-a"), from_secret("pw"))).await;
    let done = lab.wait_finished("r").await;
    assert_eq!(phase(&done), Some(Phase::Succeeded), "{:#?}", done.status);
    assert!(verifies(PW, &hash_of(&a)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_status_conflicts_never_apply_a_second_generated_password() {
    let lab = FaultLab::start().await;
    let a = lab.add_vm(&vm(NS, "vm-a", NODE)).await;
    // More 409s than one status write retries: the reconcile fails and runs again.
    lab.api.faults().conflict_next_status_writes(15);
    lab.apply(&reset("gen", one("vm-a"), generated())).await;
    let done = lab.wait_finished("gen").await;
    assert_eq!(phase(&done), Some(Phase::Succeeded), "{:#?}", done.status);
    let stored = lab.output_passwords().await;
    assert_eq!(stored.len(), 1);
    let (_, pw) = &stored["vm-a"];
    assert!(
        verifies(pw, &hash_of(&a)),
        "the guest has the stored password"
    );
    lab.assert_not_leaked(&[pw.as_str()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_watches_are_relisted_and_work_continues() {
    let lab = FaultLab::start().await;
    let a = lab.add_vm(&vm(NS, "vm-a", NODE)).await;
    let b = lab.add_vm(&vm(NS, "vm-b", NODE)).await;
    const PW: &str = "Expired-Watch-Canary-5e6f";
    lab.apply(&secret("pw", PW)).await;
    lab.apply(&reset("first", one("vm-a"), from_secret("pw")))
        .await;
    lab.api.faults().expire_watches();
    lab.apply(&reset("second", one("vm-b"), from_secret("pw")))
        .await;
    lab.api.faults().expire_watches();
    for name in ["first", "second"] {
        let done = lab.wait_finished(name).await;
        assert_eq!(
            phase(&done),
            Some(Phase::Succeeded),
            "{name}: {:#?}",
            done.status
        );
    }
    assert!(verifies(PW, &hash_of(&a)));
    assert!(verifies(PW, &hash_of(&b)));
    assert!(lab.controller_alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_panic_was_seen_in_this_binary_so_far() {
    // Runs alongside the others; every panic message is also scanned for secrets.
    let lab = FaultLab::start().await;
    let _a = lab.add_vm(&vm(NS, "vm-a", NODE)).await;
    lab.apply(&secret("pw", "Panic-Scan-Canary-18ab")).await;
    lab.apply(&reset("r", one("vm-a"), from_secret("pw"))).await;
    lab.wait_finished("r").await;
    let panics = panic_output().lock().expect("panics").clone();
    let ours: Vec<&String> = panics
        .iter()
        .filter(|p| !p.contains("tests/faults.rs"))
        .collect();
    assert!(ours.is_empty(), "product code panicked: {ours:?}");
    lab.assert_not_leaked(&["Panic-Scan-Canary-18ab"]).await;
}
