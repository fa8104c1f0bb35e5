//! KeypairRebuild live mode through the controller, real shims and real qemu-ga agents.
#![allow(clippy::disallowed_methods)] // tests may block: clippy.toml's file-system rule is for src/
use guestcred::api::keypair::{KeyMode, KeyStrategy, OnDelete};
use guestcred::api::kubevirt::VirtualMachine;
use guestcred::api::{KeypairRebuild, Phase, TargetState, TargetStatus};
use guestcred::controller::keypair::MANAGED_KEYS_ANNOTATION_PREFIX;
use guestcred_lab::hostqga::SSH_COMMANDS;
use guestcred_lab::kubevirt::vm;
use guestcred_lab::testing::*;
use guestcred_lab::world::{World, WorldOptions};
use k8s_openapi::api::core::v1::Secret;
use kube::{Api, ResourceExt};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// KeypairRebuild `name` of alice's keys on VM `vm_name`: what most tests here apply.
fn grant(name: &str, vm_name: &str) -> KeypairRebuild {
    KeypairRebuild::test(name).vm(vm_name).user("alice")
}

#[tokio::test]
async fn live_keys_are_added_verified_and_fingerprinted() {
    let (w, qga) = world_with_guest("vm-a").await;
    let r = w
        .run_to_end(&grant("k", "vm-a").inline_keys([KEY1, KEY2]))
        .await;
    let st = r.status.expect("status").run;
    assert_eq!(st.phase, Some(Phase::Succeeded), "{st:#?}");
    let t = &st.targets[0];
    assert_eq!(
        (t.verified, t.mode.as_deref(), t.reason.as_deref()),
        (Some(true), Some("Live"), Some("Verified"))
    );
    assert_eq!(t.keys.len(), 2);
    assert!(t.keys.iter().all(|k| k.starts_with("SHA256:")));
    assert_eq!(keys_of(&qga, "alice"), ["key1@test", "key2@test"]);
}

#[tokio::test]
async fn replace_removes_only_keys_guestcred_added_and_keeps_hand_added_ones() {
    let (w, qga) = world_with_guest("vm-a").await;
    qga.seed_authorized_keys("alice", &[HAND])
        .expect("hand-added key");
    let mut k1 = grant("k1", "vm-a").inline_keys([KEY1]);
    k1.spec.on_delete = OnDelete::Keep;
    w.run_to_end(&k1).await;
    w.delete::<KeypairRebuild>("k1").await;
    w.gone::<KeypairRebuild>("k1", WAIT).await;
    // A second object (e.g. next quarter's rotation) replaces key1, which no live object
    // holds any more, with key2.
    let r = w.run_to_end(&grant("k2", "vm-a").inline_keys([KEY2])).await;
    assert_eq!(r.status.expect("status").run.phase, Some(Phase::Succeeded));
    assert_eq!(keys_of(&qga, "alice"), ["hand@added", "key2@test"]);
    // The VM remembers what guestcred manages, so the next Replace works without k1.
    let vms: Api<VirtualMachine> = Api::namespaced(w.client.clone(), NS);
    let ann = vms
        .get("vm-a")
        .await
        .expect("vm")
        .annotations()
        .get(&format!("{MANAGED_KEYS_ANNOTATION_PREFIX}alice"))
        .cloned();
    assert_eq!(ann.map(|a| a.split(',').count()), Some(1));
}

/// Issue 17: two Replace objects on one VM and user (e.g. both resumed at the same instant
/// by a new leader) each remove only what they added: B's run keeps A's key, and A's next
/// run keeps B's, so neither ends VerificationFailed and neither key goes missing.
#[tokio::test]
async fn two_replace_objects_on_one_vm_and_user_never_remove_each_other_s_keys() {
    let (w, qga) = world_with_guest("vm-a").await;
    w.run_to_end(&grant("a", "vm-a").inline_keys([KEY1])).await;
    let b = w.run_to_end(&grant("b", "vm-a").inline_keys([KEY2])).await;
    assert_eq!(phase(&b), Some(Phase::Succeeded), "{b:#?}");
    assert_eq!(sorted(keys_of(&qga, "alice")), ["key1@test", "key2@test"]);
    // A runs again (a new spec): it replaces only its own keys.
    let a = w
        .apply_until(
            &grant("a", "vm-a").inline_keys([KEY3]),
            finished_with_key(KEY3),
        )
        .await;
    assert_eq!(phase(&a), Some(Phase::Succeeded), "{a:#?}");
    assert_eq!(sorted(keys_of(&qga, "alice")), ["key2@test", "key3@test"]);
}

/// Every key operation the shims finished, on every node.
fn key_calls(w: &World) -> u64 {
    [
        "get-ssh-keys",
        "add-ssh-keys",
        "replace-ssh-keys",
        "remove-ssh-keys",
    ]
    .iter()
    .map(|op| w.agent_calls(op))
    .sum()
}

/// Issue 17: a relist served from a lagging watch cache hands the controller the object as
/// it was before its spec changed. After the newer run has finished, that stale copy starts
/// nothing: its reconcile reads the object fresh and takes the input from it, so no agent
/// call is made, the newer key stays and the older one does not come back.
#[tokio::test]
async fn a_stale_cached_copy_from_before_a_spec_change_starts_no_run_with_its_old_keys() {
    let (w, qga) = world_with_guest("vm-a").await;
    // The copy a lagging cache keeps: the object in the middle of its first run (held
    // there by a frozen agent).
    signal(&qga, "-STOP");
    w.put(&grant("k", "vm-a").inline_keys([KEY1])).await;
    let mid_run = w
        .once::<KeypairRebuild>("k", |k| phase(k) == Some(Phase::Running))
        .await;
    let stale = serde_json::to_value(&mid_run).expect("the object mid-run");
    signal(&qga, "-CONT");
    w.once::<KeypairRebuild>("k", finished_with_key(KEY1)).await;
    let newer = grant("k", "vm-a").inline_keys([KEY2]);
    w.apply_until(&newer, finished_with_key(KEY2)).await;
    assert_eq!(keys_of(&qga, "alice"), ["key2@test"]);
    let (calls, status) = (key_calls(&w), w.get::<KeypairRebuild>(NS, "k").await.status);

    let path = format!("/apis/guestcred.io/v1alpha1/namespaces/{NS}/keypairrebuilds/k");
    let reads = w.api().requests("GET", &path);
    w.api()
        .faults()
        .serve_stale_list_once("keypairrebuilds", vec![stale]);
    w.api().faults().expire_watches();
    // The relist served the stale copy, and its reconcile read the object fresh.
    let deadline = std::time::Instant::now() + WAIT;
    while w.api().faults().stale_list_pending("keypairrebuilds")
        || w.api().requests("GET", &path) == reads
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no reconcile of the stale copy"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A run would have started right after that read; give it time to show.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(key_calls(&w), calls, "no agent call for the stale copy");
    assert_eq!(keys_of(&qga, "alice"), ["key2@test"]);
    let now = w.get::<KeypairRebuild>(NS, "k").await.status;
    assert_eq!(now, status, "the finished run's status stays as it was");
}

/// The scenario of issue 17's report: both Replace objects changed while the controller
/// was down, so the restarted controller runs them at the same instant. Each lets go of
/// only its own old key; both end Verified and the guest holds exactly both new keys.
/// (The test above reproduces the defect deterministically; this one the timing.)
#[tokio::test]
async fn two_replace_objects_resumed_at_the_same_instant_both_verify_and_keep_each_other_s_keys() {
    let (mut w, qga) = world_with_guest("vm-a").await;
    w.run_to_end(&grant("a", "vm-a").inline_keys([KEY1])).await;
    // HAND serves as a fourth key here: b adds it (the guest did not have it).
    w.run_to_end(&grant("b", "vm-a").inline_keys([HAND])).await;
    w.kill_controller();
    w.put(&grant("a", "vm-a").inline_keys([KEY3])).await;
    w.put(&grant("b", "vm-a").inline_keys([KEY2])).await;
    w.start_controller();
    for (name, key) in [("a", KEY3), ("b", KEY2)] {
        let k: KeypairRebuild = w
            .wait_for(NS, name, WAIT, finished_with_key(key))
            .await
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let t = target0(&k).expect("a target");
        assert_eq!(
            (t.state, t.reason.as_deref()),
            (TargetState::Succeeded, Some("Verified")),
            "{name}: {t:#?}"
        );
    }
    assert_eq!(sorted(keys_of(&qga, "alice")), ["key2@test", "key3@test"]);
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[tokio::test]
async fn replace_all_makes_the_file_exactly_the_given_keys() {
    let (w, qga) = world_with_guest("vm-a").await;
    qga.seed_authorized_keys("alice", &[HAND])
        .expect("hand-added key");
    let r = grant("k", "vm-a").inline_keys([KEY3]).replace_all();
    w.run_to_end(&r).await;
    assert_eq!(keys_of(&qga, "alice"), ["key3@test"]);
}

#[tokio::test]
async fn append_keeps_earlier_keys() {
    let (w, qga) = world_with_guest("vm-a").await;
    w.run_to_end(&grant("k1", "vm-a").inline_keys([KEY1])).await;
    let r = grant("k2", "vm-a")
        .inline_keys([KEY2])
        .strategy(KeyStrategy::Append);
    w.run_to_end(&r).await;
    assert_eq!(keys_of(&qga, "alice"), ["key1@test", "key2@test"]);
}

#[tokio::test]
async fn agent_without_ssh_commands_is_unsupported_by_agent() {
    let w = world().await;
    let old = alice().block(SSH_COMMANDS);
    let _qga = w
        .add_vm(&vm(NS, "vm-old", "node-1"), Some(old))
        .await
        .expect("vm");
    let r = w
        .run_to_end(&grant("k", "vm-old").inline_keys([KEY1]))
        .await;
    let t = target0(&r).expect("a target");
    assert_eq!(
        (t.state, t.reason.as_deref()),
        (TargetState::Failed, Some("UnsupportedByAgent"))
    );
}

#[tokio::test]
async fn invalid_key_line_in_a_secret_names_the_line_and_nothing_else() {
    let w = world().await;
    let secret = Secret::test("keys").string_data(
        "authorized_keys",
        &format!("# team\n{KEY1}\nssh-ed25519 AAAAnotakey topsecretcomment\n"),
    );
    w.put(&secret).await;
    let r = grant("k", "vm-a").keys_from_secret("keys", "authorized_keys");
    let r = w
        .apply_until(&r, condition_reason("InvalidPublicKey"))
        .await;
    let c = &r.status.expect("status").run.conditions[0];
    assert!(c.message.contains("line 3"), "{}", c.message);
    assert!(!c.message.contains("topsecretcomment"), "{}", c.message);
}

#[tokio::test]
async fn keys_with_a_ttl_are_removed_after_it() {
    let (w, qga) = world_with_guest("vm-a").await;
    qga.seed_authorized_keys("alice", &[HAND])
        .expect("hand-added key");
    let r = grant("k", "vm-a").inline_keys([KEY1]).ttl(10);
    let done = w.run_to_end(&r).await;
    assert!(
        done.status.expect("status").run.targets[0]
            .expires_at
            .is_some()
    );
    assert_eq!(keys_of(&qga, "alice"), ["hand@added", "key1@test"]);
    let expired: KeypairRebuild = w
        .wait_for(NS, "k", Duration::from_secs(40), |r: &KeypairRebuild| {
            r.status
                .as_ref()
                .is_some_and(|s| s.run.targets[0].reason.as_deref() == Some("Expired"))
        })
        .await
        .expect("expires");
    assert_eq!(keys_of(&qga, "alice"), ["hand@added"]);
    assert_eq!(
        expired.status.expect("status").run.targets[0].state,
        TargetState::Succeeded
    );
    let metrics = w.metrics.encode();
    assert!(
        metrics.contains(
            r#"guestcred_targets_total{kind="KeypairRebuild",result="expired",reason="Expired"}"#
        ),
        "{metrics}"
    );
}

/// A fault injector between the shim and a real qemu-ga: everything is passed through,
/// except that key lists the agent returns lose the keys whose comment is `dropped`, as if
/// the guest had removed them right after they were added.
async fn key_dropping_proxy(
    listen: std::path::PathBuf,
    upstream: std::path::PathBuf,
    dropped: &'static str,
) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let _ = std::fs::create_dir_all(listen.parent().expect("parent"));
    let listener = tokio::net::UnixListener::bind(&listen).expect("proxy listens");
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::UnixStream::connect(&upstream).await else {
                continue;
            };
            let (mut client_rd, mut client_wr) = client.into_split();
            let (mut server_rd, mut server_wr) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut client_rd, &mut server_wr).await;
            });
            tokio::spawn(async move {
                let mut lines = BufReader::new(&mut server_rd);
                let mut buf = Vec::new();
                while lines.read_until(b'\n', &mut buf).await.unwrap_or(0) > 0 {
                    let out = match serde_json::from_slice::<serde_json::Value>(&buf) {
                        Ok(mut v) => {
                            if let Some(keys) =
                                v.pointer_mut("/return/keys").and_then(|k| k.as_array_mut())
                            {
                                keys.retain(|k| !k.as_str().is_some_and(|s| s.ends_with(dropped)));
                            }
                            let mut line = serde_json::to_vec(&v).expect("json");
                            line.push(b'\n');
                            line
                        }
                        // The guest-sync-delimited sentinel and anything else: as is.
                        Err(_) => buf.clone(),
                    };
                    if client_wr.write_all(&out).await.is_err() {
                        break;
                    }
                    buf.clear();
                }
            });
        }
    });
}

/// The default world with VM `vm-a` on node-1, whose agent (a real qemu-ga, guest user
/// alice, returned too) is behind a [`key_dropping_proxy`] that drops `key2@test`.
async fn world_with_key2_dropping_guest() -> (World, guestcred_lab::hostqga::HostQga) {
    let w = world().await;
    let dir = w.agent_socket_dir("node-1").expect("node-1").to_path_buf();
    // The real agent runs under another name; the VM's socket is the proxy.
    let real =
        guestcred_lab::hostqga::HostQga::start_with(&dir, "real-agent", &alice()).expect("qemu-ga");
    key_dropping_proxy(
        dir.join("default_vm-a/qga.sock"),
        real.socket_path().to_path_buf(),
        "key2@test",
    )
    .await;
    w.vm_without_agent(&vm(NS, "vm-a", "node-1")).await;
    (w, real)
}

#[tokio::test]
async fn verification_fails_when_the_guest_drops_a_key() {
    let (w, _real) = world_with_key2_dropping_guest().await;
    let r = w
        .run_to_end(&grant("k", "vm-a").inline_keys([KEY1, KEY2]))
        .await;
    let t = target0(&r).expect("a target");
    assert_eq!(
        (t.state, t.reason.as_deref()),
        (TargetState::Failed, Some("VerificationFailed"))
    );
    let msg = t.message.clone().unwrap_or_default();
    assert!(msg.contains("missing"), "{msg}");
    assert_ne!(t.verified, Some(true));
}

#[tokio::test]
async fn keys_reach_every_vm_of_a_selector_across_two_nodes() {
    let w = world_on_nodes(2).await;
    let agents = w
        .guests_in_tier("web", &["node-1", "node-2", "node-2"])
        .await;
    let r = KeypairRebuild::test("k")
        .selector("tier", "web")
        .user("alice")
        .inline_keys([KEY1])
        .max_concurrency(2);
    let done = w.run_to_end(&r).await;
    let st = done.status.expect("status").run;
    assert_eq!(st.phase, Some(Phase::Succeeded));
    assert!(st.targets.iter().all(|t| t.verified == Some(true)));
    for a in &agents {
        assert_eq!(keys_of(a, "alice"), ["key1@test"]);
    }
}

/// The uid of VMI `name` (a restart replaces the VMI, so a new uid means a restart).
async fn vmi_uid(w: &World, name: &str) -> String {
    w.get::<guestcred::api::kubevirt::VirtualMachineInstance>(NS, name)
        .await
        .uid()
        .expect("uid")
}

#[tokio::test]
async fn ttl_with_mode_rebuild_is_refused_with_invalid_spec() {
    let (w, _qga) = world_with_guest("vm-a").await;
    let before = vmi_uid(&w, "vm-a").await;
    let r = grant("k", "vm-a")
        .inline_keys([KEY1])
        .mode(KeyMode::Rebuild)
        .ttl(60);
    let r = w.apply_until(&r, condition_reason("InvalidSpec")).await;
    let st = r.status.expect("status").run;
    let c = st
        .conditions
        .iter()
        .find(|c| c.reason == "InvalidSpec")
        .expect("condition");
    assert!(c.message.contains("ttlSeconds"), "{}", c.message);
    assert!(st.targets.iter().all(|t| t.attempts == 0), "{st:#?}");
    assert_eq!(
        vmi_uid(&w, "vm-a").await,
        before,
        "the VM was not restarted"
    );
}

#[tokio::test]
async fn ttl_with_auto_that_would_rebuild_fails_the_target_with_invalid_spec() {
    let w = world().await;
    let _qga = w
        .add_vm(
            &vm(NS, "vm-old", "node-1"),
            Some(alice().block(SSH_COMMANDS)),
        )
        .await
        .expect("vm");
    let before = vmi_uid(&w, "vm-old").await;
    let r = grant("k", "vm-old")
        .inline_keys([KEY1])
        .mode(KeyMode::Auto)
        .ttl(60);
    let r = w.run_to_end(&r).await;
    let t = target0(&r).expect("a target");
    assert_eq!(
        (t.state, t.reason.as_deref()),
        (TargetState::Failed, Some("InvalidSpec")),
        "{t:#?}"
    );
    let msg = t.message.clone().unwrap_or_default();
    assert!(
        msg.contains("ttlSeconds") && msg.contains("guest-ssh-"),
        "{msg}"
    );
    assert_eq!(
        vmi_uid(&w, "vm-old").await,
        before,
        "the VM was not restarted"
    );
}

/// What VM `vm` (in [`NS`]) records as guestcred's keys of `user` (its managed-keys
/// annotation, one entry a key).
async fn managed(w: &World, vm: &str, user: &str) -> Vec<String> {
    let vm: VirtualMachine = w.get(NS, vm).await;
    vm.annotations()
        .get(&format!("{MANAGED_KEYS_ANNOTATION_PREFIX}{user}"))
        .map(|v| {
            v.split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn deleting_a_keypair_rebuild_removes_the_keys_it_added_and_nothing_else() {
    let (w, qga) = world_with_guest("vm-a").await;
    qga.seed_authorized_keys("alice", &[HAND])
        .expect("hand-added key");
    // Another object's grant on the same VM stays.
    w.run_to_end(
        &grant("other", "vm-a")
            .inline_keys([KEY3])
            .strategy(KeyStrategy::Append),
    )
    .await;
    // A TTL grant (KEY1) replaced by a new run (KEY2): KEY1 waits in pendingExpiries.
    let k = grant("k", "vm-a")
        .inline_keys([HAND, KEY1])
        .strategy(KeyStrategy::Append)
        .ttl(3600);
    w.run_to_end(&k).await;
    let r = w
        .apply_until(&k.clone().inline_keys([KEY2]), |r: &KeypairRebuild| {
            finished(r)
                && r.status
                    .as_ref()
                    .is_some_and(|s| s.run.targets[0].keys.len() == 1)
        })
        .await;
    let st = r.status.expect("status").run;
    assert_eq!(st.pending_expiries.len(), 1, "{st:#?}");
    assert!(
        r.metadata
            .finalizers
            .unwrap_or_default()
            .contains(&"guestcred.io/keys".to_string())
    );
    assert_eq!(
        keys_of(&qga, "alice"),
        ["hand@added", "key1@test", "key2@test", "key3@test"]
    );

    w.delete::<KeypairRebuild>("k").await;
    w.gone::<KeypairRebuild>("k", WAIT).await;
    assert_eq!(
        keys_of(&qga, "alice"),
        ["hand@added", "key3@test"],
        "the deleted object's keys are gone; the hand-added key and the other object's stay"
    );
    assert_eq!(
        managed(&w, "vm-a", "alice").await.len(),
        1,
        "only the other object's key stays recorded"
    );
}

#[tokio::test]
async fn on_delete_keep_leaves_the_keys_in_the_guest() {
    let (w, qga) = world_with_guest("vm-a").await;
    let mut k = grant("k", "vm-a").inline_keys([KEY1]);
    k.spec.on_delete = OnDelete::Keep;
    w.run_to_end(&k).await;
    w.delete::<KeypairRebuild>("k").await;
    w.gone::<KeypairRebuild>("k", WAIT).await;
    assert_eq!(keys_of(&qga, "alice"), ["key1@test"]);
}

#[tokio::test]
async fn an_unreachable_vm_holds_deletion_only_for_the_bounded_wait_then_names_the_keys_left() {
    let w = World::start(WorldOptions {
        settings: guestcred::controller::context::EngineSettings {
            cleanup_wait: Duration::from_secs(4),
            ..guestcred_lab::world::fast_settings()
        },
        ..WorldOptions::default()
    })
    .await
    .expect("world");
    let qga = w.guest("vm-a").await;
    let done = w.run_to_end(&grant("k", "vm-a").inline_keys([KEY1])).await;
    let fp = done.status.expect("status").run.targets[0].keys[0].clone();
    // The guest's agent goes away (the VMI stays Running: only the agent is unreachable).
    drop(qga);
    let start = std::time::Instant::now();
    w.delete::<KeypairRebuild>("k").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let api: Api<KeypairRebuild> = Api::namespaced(w.client.clone(), NS);
    assert!(
        api.get_opt("k").await.expect("get").is_some(),
        "still waiting for the VM"
    );
    w.gone::<KeypairRebuild>("k", Duration::from_secs(20)).await;
    // The bound counts from the deletionTimestamp (whole seconds).
    assert!(
        start.elapsed() >= Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let left = w.events_with_reason("KeysLeftBehind").await;
    assert_eq!(left.len(), 1, "{left:?}");
    assert!(
        left[0].starts_with("Warning: ") && left[0].contains("vm-a") && left[0].contains(&fp),
        "{left:?}"
    );
}

/// The target of KeypairRebuild "k" once it finished (a rebuild may take a minute); it
/// must have succeeded, verified, by a rebuild.
async fn verified_by_rebuild(w: &World) -> TargetStatus {
    let r: KeypairRebuild = w
        .wait_for(NS, "k", Duration::from_secs(60), finished)
        .await
        .expect("finishes");
    let t = target0(&r).expect("a target").clone();
    assert_eq!(
        (t.state, t.reason.as_deref(), t.mode.as_deref()),
        (TargetState::Succeeded, Some("Verified"), Some("Rebuild")),
        "{t:#?}"
    );
    t
}

/// KeypairRebuild "k": alice's `key` on vm-a, by a rebuild (a restart with new user data).
fn rebuild_of_vm_a(key: &str) -> KeypairRebuild {
    grant("k", "vm-a").inline_keys([key]).mode(KeyMode::Rebuild)
}

fn rebuild_marker(vm: &VirtualMachine) -> Option<String> {
    vm.annotations()
        .get(guestcred::controller::rebuild::REBUILD_ANNOTATION)
        .cloned()
}

#[tokio::test]
async fn a_crash_after_kubevirt_accepted_the_restart_does_not_restart_the_vm_twice() {
    let (mut w, qga) = world_with_guest("vm-a").await;
    let old = vmi_uid(&w, "vm-a").await;
    // KubeVirt accepts the restart but its answer never reaches the controller: it dies.
    w.kubevirt().hold_answers(true);
    w.put(&rebuild_of_vm_a(KEY1)).await;
    let start = std::time::Instant::now();
    while w.kubevirt().restarts_requested(NS, "vm-a") == 0 {
        assert!(start.elapsed() < WAIT, "no restart requested");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    w.kill_controller();
    w.kubevirt().hold_answers(false);
    w.start_controller();
    let t = verified_by_rebuild(&w).await;
    let new = vmi_uid(&w, "vm-a").await;
    assert_ne!(new, old, "a new VMI");
    assert!(
        t.message.as_deref().unwrap_or_default().contains(&new),
        "verified on the new VMI: {t:#?}"
    );
    assert_eq!(
        w.kubevirt().restarts_requested(NS, "vm-a"),
        1,
        "one restart"
    );
    assert_eq!(w.kubevirt().restarts_done(NS, "vm-a"), 1);
    assert_eq!(keys_of(&qga, "alice"), ["key1@test"]);
}

#[tokio::test]
async fn a_controller_restarted_while_the_vm_restarts_verifies_on_the_new_vmi() {
    let (mut w, qga) = world_with_guest("vm-a").await;
    let old = vmi_uid(&w, "vm-a").await;
    w.put(&rebuild_of_vm_a(KEY1)).await;
    // The controller dies right after it marked the VM (the old VMI still runs).
    w.once::<VirtualMachine>("vm-a", |vm| rebuild_marker(vm).is_some())
        .await;
    w.kill_controller();
    w.start_controller();
    let t = verified_by_rebuild(&w).await;
    let new = vmi_uid(&w, "vm-a").await;
    assert_ne!(new, old);
    assert!(
        t.message.as_deref().unwrap_or_default().contains(&new),
        "{t:#?}"
    );
    assert_eq!(w.kubevirt().restarts_requested(NS, "vm-a"), 1);
    assert_eq!(keys_of(&qga, "alice"), ["key1@test"]);
}

#[tokio::test]
async fn a_restart_request_that_failed_after_the_marker_is_sent_again_once() {
    let (w, _qga) = world_with_guest("vm-a").await;
    let old = vmi_uid(&w, "vm-a").await;
    w.kubevirt().refuse_next_restarts(1);
    w.put(&rebuild_of_vm_a(KEY1)).await;
    verified_by_rebuild(&w).await;
    assert_ne!(vmi_uid(&w, "vm-a").await, old);
    assert_eq!(
        w.kubevirt().restarts_requested(NS, "vm-a"),
        2,
        "one refused, one sent again"
    );
    assert_eq!(w.kubevirt().restarts_done(NS, "vm-a"), 1);
}

const USER_DATA: &str = "#cloud-config
# Platform baseline: keep this header.
hostname: vm-a  # short name
users:
  - default
  # the deploy user
  - name: alice
    ssh_authorized_keys:
      - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOimy32Onc7iJCyVgWcE+d/LHx1OCqkqfeeXY5QKiYXE hand@added
write_files:
  - path: /etc/motd  # greeting
    content: hello
";

#[tokio::test]
async fn rebuild_of_a_vm_with_user_data_from_a_secret_writes_guestcred_s_own_copy() {
    let (w, qga) = world_with_guest("vm-a").await;
    let user_secret = Secret::test("vm-a-userdata").data("userdata", USER_DATA);
    w.put(&user_secret).await;
    let before: Secret = w.get(NS, "vm-a-userdata").await;
    let volumes = serde_json::json!({"spec": {"template": {"spec": {"volumes": [
        {"name": "rootdisk", "containerDisk": {"image": "debian"}},
        {"name": "cloudinitdisk", "cloudInitNoCloud": {"userDataSecretRef": {"name": "vm-a-userdata"}}}
    ]}}}});
    w.merge_patch::<VirtualMachine>("vm-a", volumes).await;
    let old = vmi_uid(&w, "vm-a").await;
    w.put(&rebuild_of_vm_a(KEY2)).await;
    verified_by_rebuild(&w).await;
    assert_ne!(vmi_uid(&w, "vm-a").await, old, "restarted");
    assert!(keys_of(&qga, "alice").contains(&"key2@test".into()));
    // The user's Secret is untouched.
    let after: Secret = w.get(NS, "vm-a-userdata").await;
    assert_eq!(after.data, before.data);
    assert_eq!(after.resource_version(), before.resource_version());
    // The VM now reads guestcred's copy, owned by the VM, with the key and every comment.
    let vm_obj: VirtualMachine = w.get(NS, "vm-a").await;
    let volume = vm_obj.spec.rest["template"]["spec"]["volumes"][1].clone();
    let copy_name = volume["cloudInitNoCloud"]["userDataSecretRef"]["name"]
        .as_str()
        .expect("a secret ref")
        .to_string();
    assert_ne!(copy_name, "vm-a-userdata");
    assert_eq!(
        vm_obj.spec.rest["template"]["spec"]["volumes"][0],
        serde_json::json!({"name": "rootdisk", "containerDisk": {"image": "debian"}})
    );
    let copy: Secret = w.get(NS, &copy_name).await;
    assert_eq!(
        copy.owner_references()
            .iter()
            .map(|o| (o.kind.as_str(), o.name.as_str()))
            .collect::<Vec<_>>(),
        [("VirtualMachine", "vm-a")]
    );
    assert_eq!(
        copy.annotations()
            .get("guestcred.io/user-data-from")
            .map(String::as_str),
        Some("userDataSecretRef/vm-a-userdata")
    );
    let text = String::from_utf8(copy.data.expect("data")["userdata"].0.clone()).expect("utf-8");
    for kept in [
        "# Platform baseline: keep this header.",
        "hostname: vm-a  # short name",
        "  # the deploy user",
        "hand@added",
        "  - path: /etc/motd  # greeting",
    ] {
        assert!(text.contains(kept), "{kept:?} lost:\n{text}");
    }
    assert!(text.contains(KEY2), "{text}");
    // The copy outlives the KeypairRebuild: the VM boots from it.
    w.delete::<KeypairRebuild>("k").await;
    w.gone::<KeypairRebuild>("k", WAIT).await;
    let secrets: Api<Secret> = Api::namespaced(w.client.clone(), NS);
    assert!(secrets.get_opt(&copy_name).await.expect("get").is_some());
}

fn fingerprint(key: &str) -> String {
    guestcred::api::authorized_keys::fingerprint(key).expect("a valid test key")
}

/// KeypairRebuild `name` once its first target has no replaced keys left: the overlap
/// passed and they were removed (within 90 s).
async fn overlap_ended(w: &World, name: &str) -> KeypairRebuild {
    w.wait_for(NS, name, Duration::from_secs(90), |k: &KeypairRebuild| {
        target0(k).is_some_and(|t| t.replaced_keys.is_empty())
    })
    .await
    .unwrap_or_else(|e| panic!("the overlap of {name} ends: {e:#}"))
}

/// The first target of `k` once its run for `key` finished.
fn finished_with_key(key: &'static str) -> impl Fn(&KeypairRebuild) -> bool {
    move |k| finished(k) && target0(k).is_some_and(|t| t.keys == [fingerprint(key)])
}

/// KeypairRebuild `k` of alice's keys on vm-a run with KEY1, then again with KEY2 and an
/// overlap of `overlap_seconds`: the object once its second run finished.
async fn key1_replaced_by_key2(w: &World, overlap_seconds: u32) -> KeypairRebuild {
    w.run_to_end(&grant("k", "vm-a").inline_keys([KEY1])).await;
    w.apply_until(
        &grant("k", "vm-a")
            .inline_keys([KEY2])
            .overlap(overlap_seconds),
        finished_with_key(KEY2),
    )
    .await
}

/// Issue 21 item 2: with `overlapSeconds`, the new key is added and read back first; the
/// key it replaces stays (both read back through the agent by a mode Inspect object) until
/// the overlap passes, then only the new one is left. The hand-added key is never touched.
#[tokio::test]
async fn replace_with_an_overlap_keeps_the_old_key_until_the_overlap_passes() {
    let (w, qga) = world_with_guest("vm-a").await;
    qga.seed_authorized_keys("alice", &[HAND])
        .expect("hand-added key");
    let k = key1_replaced_by_key2(&w, 30).await;
    assert_eq!(phase(&k), Some(Phase::Succeeded), "{k:#?}");
    let t = target0(&k).expect("a target").clone();
    assert_eq!(t.verified, Some(true));
    assert_eq!(
        t.replaced_keys,
        [fingerprint(KEY1)],
        "status shows the old set"
    );
    let remove_at = t
        .replaced_keys_remove_at
        .clone()
        .expect("when the old key goes");
    // During the overlap both keys are in the guest, read back through the agent.
    w.put(&grant("look", "vm-a").inspect()).await;
    let look = w
        .wait_for(NS, "look", WAIT, |k: &KeypairRebuild| {
            target0(k).is_some_and(|t| t.guest_keys.is_some())
        })
        .await
        .expect("the Inspect report");
    let report = target0(&look)
        .and_then(|t| t.guest_keys.clone())
        .expect("report");
    let read_at = report.read_at.clone().expect("readAt");
    assert!(read_at.0 < remove_at.0, "read during the overlap");
    let mut guestcred_s: Vec<&str> = report
        .keys
        .iter()
        .filter(|k| k.managed)
        .map(|k| k.fingerprint.as_str())
        .collect();
    guestcred_s.sort();
    let mut both = [fingerprint(KEY1), fingerprint(KEY2)];
    both.sort();
    assert_eq!(guestcred_s, both, "{report:#?}");
    // After the overlap only the new key (and the person's) is left.
    let after = overlap_ended(&w, "k").await;
    let t = target0(&after).expect("a target");
    assert_eq!(t.replaced_keys_remove_at, None);
    assert_eq!(t.state, TargetState::Succeeded);
    assert!(
        t.message
            .as_deref()
            .is_some_and(|m| m.contains("removed the 1 key(s) they replaced")),
        "{t:#?}"
    );
    assert_eq!(keys_of(&qga, "alice"), ["hand@added", "key2@test"]);
    assert_eq!(
        managed(&w, "vm-a", "alice").await.len(),
        1,
        "only key2 stays recorded"
    );
}

/// Issue 21 item 2: a new key that cannot be added (here: the guest drops it, so it never
/// reads back) fails the target, and the key it would have replaced stays in place.
#[tokio::test]
async fn a_failed_add_with_an_overlap_leaves_the_old_key_in_place() {
    let (w, real) = world_with_key2_dropping_guest().await;
    w.run_to_end(&grant("k", "vm-a").inline_keys([KEY1])).await;
    let k = w
        .apply_until(&grant("k", "vm-a").inline_keys([KEY2]).overlap(10), |k| {
            finished(k) && target0(k).is_some_and(|t| t.state == TargetState::Failed)
        })
        .await;
    let t = target0(&k).expect("a target");
    assert_eq!(t.reason.as_deref(), Some("VerificationFailed"), "{t:#?}");
    assert!(
        t.replaced_keys.is_empty(),
        "no removal is scheduled: {t:#?}"
    );
    let keys = keys_of(&real, "alice");
    assert!(
        keys.contains(&"key1@test".to_string()),
        "the old key stays: {keys:?}"
    );
    assert!(
        managed(&w, "vm-a", "alice")
            .await
            .iter()
            .any(|e| e.starts_with(&fingerprint(KEY1))),
        "still guestcred's"
    );
}

/// The end of an overlap is kept in status: a controller that restarts during the overlap
/// still removes the replaced key when it passes, and not before.
#[tokio::test]
async fn a_controller_restarted_during_an_overlap_removes_the_replaced_key_when_it_passes() {
    let (mut w, qga) = world_with_guest("vm-a").await;
    let k = key1_replaced_by_key2(&w, 15).await;
    let remove_at = target0(&k)
        .and_then(|t| t.replaced_keys_remove_at.clone())
        .expect("when the old key goes");
    w.kill_controller();
    w.start_controller();
    let after = overlap_ended(&w, "k").await;
    assert!(
        k8s_openapi::jiff::Timestamp::now() >= remove_at.0,
        "not removed before its time"
    );
    let t = target0(&after).expect("a target");
    assert_eq!(t.state, TargetState::Succeeded, "{t:#?}");
    assert_eq!(keys_of(&qga, "alice"), ["key2@test"]);
}
