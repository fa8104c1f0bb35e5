//! Removal by fingerprint (`spec.removeFingerprints`) and the read-only report
//! (`mode: Inspect`) against the controller with real shims and real qemu-ga guests: the
//! paths a plugin run does not reach. A retry that finds its key already gone (an unknown
//! outcome before it) succeeds instead of failing with KeyNotFound; a report lost between
//! the run's status write and its own is read from the guest again; a removal by selector
//! revokes a key on every VM that has it; deleting an Inspect object changes nothing.
use guestcred::api::kubevirt::VirtualMachine;
use guestcred::api::{KeypairRebuild, Phase, TargetState};
use guestcred_lab::kubevirt::vm;
use guestcred_lab::testing::*;
use guestcred_lab::world::{World, WorldOptions};
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn fingerprint(key: &str) -> String {
    guestcred::api::authorized_keys::fingerprint(key).expect("a valid test key")
}

fn finished_with(phase: Phase) -> impl Fn(&KeypairRebuild) -> bool {
    move |k| {
        k.status.as_ref().is_some_and(|s| {
            s.run.phase == Some(phase) && s.run.observed_generation == k.metadata.generation
        })
    }
}

#[tokio::test]
async fn a_retry_that_finds_its_key_already_gone_succeeds() {
    let w = World::start(WorldOptions::default()).await.expect("world");
    let qga = w.add_guest(&vm(NS, "vm-a", "node-1")).await;
    qga.seed_authorized_keys("alice", &[HAND, KEY2])
        .expect("keys");
    // Created paused: its UID is known before anything runs.
    let k = w
        .apply(
            &KeypairRebuild::test("rm")
                .vm("vm-a")
                .user("alice")
                .remove_fingerprints([fingerprint(HAND)])
                .paused(),
        )
        .await
        .expect("apply");
    // As after an agent call whose answer never came: the key is gone and the VM records
    // that this object was removing it.
    qga.seed_authorized_keys("alice", &[KEY2]).expect("keys");
    let vms: Api<VirtualMachine> = Api::namespaced(w.client.clone(), NS);
    let marker = format!("{}={}", k.uid().expect("uid"), fingerprint(HAND));
    vms.patch(
        "vm-a",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"annotations": {
            "removed-keys.guestcred.io/alice": marker,
        }}})),
    )
    .await
    .expect("marker");
    let api: Api<KeypairRebuild> = Api::namespaced(w.client.clone(), NS);
    api.patch(
        "rm",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"paused": false}})),
    )
    .await
    .expect("unpause");
    let done = w
        .wait_for(NS, "rm", WAIT, finished_with(Phase::Succeeded))
        .await
        .expect("succeeds");
    let t = &done.status.expect("status").run.targets[0];
    assert_eq!(t.reason.as_deref(), Some("Removed"));
    assert!(
        t.message
            .as_deref()
            .is_some_and(|m| m.contains("by an earlier attempt")),
        "{t:?}"
    );
    assert_eq!(
        key_comments(&qga.authorized_keys("alice").expect("keys")),
        ["key2@test"]
    );
    // Another object naming the same absent key was not the one removing it.
    w.apply(
        &KeypairRebuild::test("rm-other")
            .vm("vm-a")
            .user("alice")
            .remove_fingerprints([fingerprint(HAND)]),
    )
    .await
    .expect("apply");
    let other = w
        .wait_for(NS, "rm-other", WAIT, finished_with(Phase::Failed))
        .await
        .expect("fails");
    assert_eq!(
        other.status.expect("status").run.targets[0]
            .reason
            .as_deref(),
        Some("KeyNotFound")
    );
}

#[tokio::test]
async fn a_key_report_lost_before_its_write_is_read_from_the_guest_again() {
    let w = World::start(WorldOptions::default()).await.expect("world");
    let qga = w.add_guest(&vm(NS, "vm-a", "node-1")).await;
    qga.seed_authorized_keys("alice", &[HAND]).expect("keys");
    w.apply(
        &KeypairRebuild::test("look")
            .vm("vm-a")
            .user("alice")
            .inspect(),
    )
    .await
    .expect("apply");
    let has_report = |k: &KeypairRebuild| {
        k.status
            .as_ref()
            .and_then(|s| s.run.targets.first())
            .is_some_and(|t| t.guest_keys.is_some())
    };
    let k = w
        .wait_for(NS, "look", WAIT, has_report)
        .await
        .expect("report");
    let first = k.status.expect("status").run.targets[0].clone();
    assert_eq!(first.state, TargetState::Succeeded);
    assert_eq!(first.reason.as_deref(), Some("Inspected"));
    assert_eq!(first.keys, Vec::<String>::new(), "Inspect grants nothing");
    let report = first.guest_keys.clone().expect("report");
    assert_eq!((report.total, report.keys.len()), (1, 1));
    assert_eq!(report.keys[0].fingerprint, fingerprint(HAND));
    assert!(!report.keys[0].managed);
    // The report is gone from status (as if the controller died between the run's write
    // and the report's), and the guest changed meanwhile: it is read again.
    qga.seed_authorized_keys("alice", &[HAND, KEY2])
        .expect("keys");
    let api: Api<KeypairRebuild> = Api::namespaced(w.client.clone(), NS);
    let mut without = first.clone();
    without.guest_keys = None;
    api.patch_status(
        "look",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"status": {"targets": [without]}})),
    )
    .await
    .expect("drop the report");
    let k = w
        .wait_for(NS, "look", WAIT, has_report)
        .await
        .expect("report again");
    let again = k.status.expect("status").run.targets[0]
        .guest_keys
        .clone()
        .expect("report");
    assert_eq!(again.total, 2, "{again:?}");
    // Deleting an Inspect object removes nothing (it granted nothing).
    api.delete("look", &DeleteParams::default())
        .await
        .expect("delete");
    let start = std::time::Instant::now();
    while api.get_opt("look").await.expect("get").is_some() {
        assert!(start.elapsed() < WAIT, "the Inspect object is deleted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        key_comments(&qga.authorized_keys("alice").expect("keys")),
        ["hand@added", "key2@test"]
    );
}

#[tokio::test]
async fn a_removal_by_selector_revokes_the_key_on_every_vm_that_has_it() {
    let w = World::start(WorldOptions::default()).await.expect("world");
    let a = w
        .add_guest(&vm(NS, "web-a", "node-1").label("tier", "web"))
        .await;
    let b = w
        .add_guest(&vm(NS, "web-b", "node-1").label("tier", "web"))
        .await;
    let c = w
        .add_guest(&vm(NS, "web-c", "node-1").label("tier", "web"))
        .await;
    a.seed_authorized_keys("alice", &[KEY1, KEY2])
        .expect("keys");
    b.seed_authorized_keys("alice", &[KEY1]).expect("keys");
    c.seed_authorized_keys("alice", &[KEY2]).expect("keys");
    w.apply(
        &KeypairRebuild::test("revoke")
            .selector("tier", "web")
            .user("alice")
            .max_failures(1)
            .remove_fingerprints([fingerprint(KEY1)]),
    )
    .await
    .expect("apply");
    let k = w
        .wait_for(NS, "revoke", WAIT, finished_with(Phase::PartiallySucceeded))
        .await
        .expect("finishes");
    assert_eq!(vms_in_state(&k, TargetState::Succeeded), ["web-a", "web-b"]);
    assert_eq!(vms_in_state(&k, TargetState::Failed), ["web-c"]);
    assert_eq!(
        key_comments(&a.authorized_keys("alice").expect("keys")),
        ["key2@test"]
    );
    assert!(b.authorized_keys("alice").expect("keys").is_empty());
    assert_eq!(
        key_comments(&c.authorized_keys("alice").expect("keys")),
        ["key2@test"],
        "a VM without the key is left as it was"
    );
}
