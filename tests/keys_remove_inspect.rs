//! Removal by fingerprint (`spec.removeFingerprints`) and the read-only report
//! (`mode: Inspect`) against the controller with real shims and real qemu-ga guests: the
//! paths a plugin run does not reach. A retry that finds its key already gone (an unknown
//! outcome before it) succeeds instead of failing with KeyNotFound; a report lost between
//! the run's status write and its own is read from the guest again; a removal by selector
//! revokes a key on every VM that has it; deleting an Inspect object changes nothing.
use guestcred::api::kubevirt::VirtualMachine;
use guestcred::api::{KeypairRebuild, Phase, TargetState};
use guestcred_lab::testing::*;
use guestcred_lab::world::World;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};

fn fingerprint(key: &str) -> String {
    guestcred::api::authorized_keys::fingerprint(key).expect("a valid test key")
}

/// KeypairRebuild `name` removing the hand-added key from alice's keys on vm-a.
fn remove_hand(name: &str) -> KeypairRebuild {
    of_alice(name)
        .vm("vm-a")
        .remove_fingerprints([fingerprint(HAND)])
}

/// KeypairRebuild `name` of alice's keys (no target yet).
fn of_alice(name: &str) -> KeypairRebuild {
    KeypairRebuild::test(name).user("alice")
}

/// KeypairRebuild `name` once its current spec's run ended in `phase`.
async fn ended_in(w: &World, name: &str, phase: Phase) -> KeypairRebuild {
    w.once(name, move |k: &KeypairRebuild| {
        k.status.as_ref().is_some_and(|s| {
            s.run.phase == Some(phase) && s.run.observed_generation == k.metadata.generation
        })
    })
    .await
}

/// The first target's Inspect report is in status.
fn has_report(k: &KeypairRebuild) -> bool {
    target0(k).is_some_and(|t| t.guest_keys.is_some())
}

#[tokio::test]
async fn a_retry_that_finds_its_key_already_gone_succeeds() {
    let (w, qga) = world_with_guest("vm-a").await;
    qga.seed_authorized_keys("alice", &[HAND, KEY2])
        .expect("keys");
    // Created paused: its UID is known before anything runs.
    let k = w.put(&remove_hand("rm").paused()).await;
    // As after an agent call whose answer never came: the key is gone and the VM records
    // that this object was removing it.
    qga.seed_authorized_keys("alice", &[KEY2]).expect("keys");
    let marker = format!("{}={}", k.uid().expect("uid"), fingerprint(HAND));
    w.merge_patch::<VirtualMachine>(
        "vm-a",
        serde_json::json!({"metadata": {"annotations": {
            "removed-keys.guestcred.io/alice": marker,
        }}}),
    )
    .await;
    w.merge_patch::<KeypairRebuild>("rm", serde_json::json!({"spec": {"paused": false}}))
        .await;
    let done = ended_in(&w, "rm", Phase::Succeeded).await;
    let t = &done.status.expect("status").run.targets[0];
    assert_eq!(t.reason.as_deref(), Some("Removed"));
    assert!(
        t.message
            .as_deref()
            .is_some_and(|m| m.contains("by an earlier attempt")),
        "{t:?}"
    );
    assert_eq!(keys_of(&qga, "alice"), ["key2@test"]);
    // Another object naming the same absent key was not the one removing it.
    w.put(&remove_hand("rm-other")).await;
    let other = ended_in(&w, "rm-other", Phase::Failed).await;
    assert_eq!(
        other.status.expect("status").run.targets[0]
            .reason
            .as_deref(),
        Some("KeyNotFound")
    );
}

#[tokio::test]
async fn a_key_report_lost_before_its_write_is_read_from_the_guest_again() {
    let (w, qga) = world_with_guest("vm-a").await;
    qga.seed_authorized_keys("alice", &[HAND]).expect("keys");
    let k = w
        .apply_until(&of_alice("look").vm("vm-a").inspect(), has_report)
        .await;
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
    let k: KeypairRebuild = w.once("look", has_report).await;
    let again = k.status.expect("status").run.targets[0]
        .guest_keys
        .clone()
        .expect("report");
    assert_eq!(again.total, 2, "{again:?}");
    // Deleting an Inspect object removes nothing (it granted nothing).
    w.delete::<KeypairRebuild>("look").await;
    w.gone::<KeypairRebuild>("look", STEP_WAIT).await;
    assert_eq!(keys_of(&qga, "alice"), ["hand@added", "key2@test"]);
}

#[tokio::test]
async fn a_removal_by_selector_revokes_the_key_on_every_vm_that_has_it() {
    let w = world().await;
    let web = w
        .guests_in_tier("web", &["node-1", "node-1", "node-1"])
        .await;
    let seeded: [&[&str]; 3] = [&[KEY1, KEY2], &[KEY1], &[KEY2]];
    for (qga, keys) in web.iter().zip(seeded) {
        qga.seed_authorized_keys("alice", keys).expect("keys");
    }
    w.put(
        &of_alice("revoke")
            .selector("tier", "web")
            .max_failures(1)
            .remove_fingerprints([fingerprint(KEY1)]),
    )
    .await;
    let k = ended_in(&w, "revoke", Phase::PartiallySucceeded).await;
    assert_eq!(vms_in_state(&k, TargetState::Succeeded), ["web-0", "web-1"]);
    assert_eq!(vms_in_state(&k, TargetState::Failed), ["web-2"]);
    assert_eq!(keys_of(&web[0], "alice"), ["key2@test"]);
    assert!(web[1].authorized_keys("alice").expect("keys").is_empty());
    assert_eq!(
        keys_of(&web[2], "alice"),
        ["key2@test"],
        "a VM without the key is left as it was"
    );
}
