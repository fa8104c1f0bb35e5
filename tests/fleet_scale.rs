//! SCALE TEST with simulated guest agents (`guestcred_lab::simagent`): the controller, the
//! shims, the API server emulator (with the real server's size limits) and the HTTP
//! between them are the real code; no qemu-ga answers. Real agents prove correctness in
//! the other suites; this one proves that a large run stays small on the API server and
//! survives a controller restart.
use guestcred::api::shards::{OWNER_UID_LABEL, SHARD_KEY, decode};
use guestcred::api::{GuestPasswordReset, KeypairRebuild, Phase, TargetState};
use guestcred_lab::simagent::{Latency, OpLatencies, SimAgentOptions, SimOp};
use guestcred_lab::testing::*;
use guestcred_lab::world::{ControlPlaneKind, World, WorldOptions};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::time::Instant;

const NODES: usize = 10;
const VMS: usize = 5_000;
/// How long a run over the whole fleet may take (each half of the 5,000-VM run).
const FLEET_WAIT: Duration = Duration::from_secs(300);
/// What guestcred allows any object it writes to weigh.
const OBJECT_LIMIT: usize = 256 * 1024;

fn vm_name(i: usize) -> String {
    format!("fleet-{i:05}")
}

async fn fleet_world(vms: usize) -> World {
    fleet_world_with(vms, WorldOptions::default(), OpLatencies::default()).await
}

/// [`fleet_world`] on `options`' control plane, with guests that take `latency` to answer.
async fn fleet_world_with(vms: usize, options: WorldOptions, latency: OpLatencies) -> World {
    let w = World::start(WorldOptions {
        nodes: NODES,
        sim_agent: Some(SimAgentOptions {
            auto_create_domains: false,
            seed: 5,
            latency,
            ..SimAgentOptions::default()
        }),
        ..options
    })
    .await
    .expect("test world starts");
    let names: Vec<String> = (0..vms).map(vm_name).collect();
    w.sim_fleet("all", &names, NODES).await;
    w
}

/// The world on the API-server emulator (request counts and injected faults need it).
fn on_the_emulator() -> WorldOptions {
    WorldOptions {
        control_plane: ControlPlaneKind::Emulator,
        ..WorldOptions::default()
    }
}

/// Fails the test unless each of the first `fleet` VMs holds the [`SHA512`] password.
fn assert_every_guest_holds_the_password(w: &World, fleet: usize) {
    for i in 0..fleet {
        let sim = w.sim_agent(&node_of(i, NODES)).expect("simulated agent");
        assert!(
            sim.holds_password(NS, &vm_name(i), "root", SHA512),
            "{} does not hold the new password",
            vm_name(i)
        );
    }
}

/// The reset and its shards as the API server holds them, each with its size as JSON.
async fn stored_objects(w: &World, reset: &str) -> Vec<(String, usize)> {
    let r: GuestPasswordReset = w.get(NS, reset).await;
    let mut out = vec![(
        format!("GuestPasswordReset {reset}"),
        serde_json::to_vec(&r).expect("json").len(),
    )];
    let cms: Api<ConfigMap> = Api::namespaced(w.client.clone(), NS);
    let uid = r.uid().unwrap_or_default();
    let shards = cms
        .list(&ListParams::default().labels(&format!("{OWNER_UID_LABEL}={uid}")))
        .await
        .expect("list shards");
    for cm in shards {
        let size = serde_json::to_vec(&cm).expect("json").len();
        out.push((format!("ConfigMap {}", cm.name_any()), size));
    }
    out
}

/// VMs whose success the stored run records (read back from the shards the status names).
async fn recorded_successes(w: &World, reset: &str) -> BTreeSet<String> {
    let r: GuestPasswordReset = w.get(NS, reset).await;
    let status = r.status.expect("status").run;
    let cms: Api<ConfigMap> = Api::namespaced(w.client.clone(), NS);
    let mut done = BTreeSet::new();
    for shard in &status.shards {
        let cm = cms.get(&shard.name).await.expect("shard named by status");
        let bytes = cm
            .binary_data
            .as_ref()
            .and_then(|d| d.get(SHARD_KEY))
            .expect("shard data");
        for t in decode(&bytes.0, shard).expect("shard decodes") {
            if t.state == TargetState::Succeeded {
                done.insert(t.vm);
            }
        }
    }
    done
}

/// KeypairRebuild `name` of root's key `key` on every VM of the fleet, 64 VMs at a time.
fn root_key_on_the_fleet(name: &str, key: &str) -> KeypairRebuild {
    KeypairRebuild::test(name)
        .selector("fleet", "all")
        .user("root")
        .inline_keys([key])
        .max_concurrency(64)
}

/// `k` applied, once `pred` holds for it (within 120 s; `what` is that moment).
async fn keys_applied_until(
    w: &World,
    k: &KeypairRebuild,
    pred: impl Fn(&KeypairRebuild) -> bool,
    what: &str,
) -> KeypairRebuild {
    w.apply(k).await.expect("apply");
    let name = k.metadata.name.as_deref().unwrap_or_default();
    w.wait_for(NS, name, Duration::from_secs(120), pred)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:#}"))
}

/// Does the fleet's `i`-th (simulated) VM hold `key` (its base64 body) in root's
/// authorized_keys? (Read once no agent call is in progress on the VM.)
async fn holds_key(w: &World, i: usize, key: &str) -> bool {
    let body = key.split_whitespace().nth(1).unwrap_or_default();
    let sim = w.sim_agent(&node_of(i, NODES)).expect("simulated agent");
    sim.authorized_keys(NS, &vm_name(i), "root")
        .await
        .join("\n")
        .contains(body)
}

/// The fleet's VMs (their indexes) that hold `key`, or (`holding` false) that do not.
async fn vms_with_key(w: &World, fleet: usize, key: &str, holding: bool) -> Vec<usize> {
    let mut out = Vec::new();
    for i in 0..fleet {
        if holds_key(w, i, key).await == holding {
            out.push(i);
        }
    }
    out
}

fn assert_small(objects: &[(String, usize)]) {
    for (what, size) in objects {
        assert!(
            *size < OBJECT_LIMIT,
            "{what} weighs {size} bytes, over {OBJECT_LIMIT}"
        );
    }
}

/// A reset over 5,000 VMs keeps every object under 256 KiB while it runs and when it is
/// done; a controller killed half-way resumes the run: no VM whose success was recorded is
/// called again, and every VM ends up holding the value.
#[tokio::test]
async fn a_5000_target_reset_stays_small_and_resumes_after_a_restart_without_a_second_call() {
    let mut w = fleet_world(VMS).await;
    w.crypted_fleet_reset("all").await;

    let _: GuestPasswordReset = w
        .wait_for(NS, "fleet", FLEET_WAIT, succeeded_at_least(VMS / 2))
        .await
        .expect("half the targets finish");
    w.kill_controller();
    let killed_at = Instant::now();
    // Let calls that were in flight end before reading what is recorded.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mid_run = stored_objects(&w, "fleet").await;
    assert!(
        mid_run.len() > 1,
        "a 5,000-target run keeps its records in shards: {mid_run:?}"
    );
    assert_small(&mid_run);
    let recorded = recorded_successes(&w, "fleet").await;
    assert!(recorded.len() >= VMS / 2, "{} recorded", recorded.len());
    assert!(recorded.len() < VMS, "the run was over before the kill");

    w.start_controller();
    let r: GuestPasswordReset = w.succeeded_within("fleet", FLEET_WAIT).await;
    let run = r.status.as_ref().expect("status").run.clone();
    assert_eq!(run.summary.succeeded as usize, VMS);
    assert_eq!(run.reasons.get("Applied").copied(), Some(VMS as u32));
    assert_eq!(run.unlisted_targets, Some(VMS as u32));
    assert!(
        run.targets.is_empty(),
        "nothing needs attention: {:#?}",
        run.targets
    );
    assert_small(&stored_objects(&w, "fleet").await);

    let mut called_again = Vec::new();
    for n in 1..=NODES {
        let sim = w.sim_agent(&format!("node-{n}")).expect("simulated agent");
        for rec in sim.records() {
            let vm = rec.domain.trim_start_matches(&format!("{NS}/")).to_string();
            if rec.op == SimOp::SetPassword && rec.started > killed_at && recorded.contains(&vm) {
                called_again.push(vm);
            }
        }
    }
    assert!(
        called_again.is_empty(),
        "{} VMs whose success was recorded were called again after the restart, e.g. {:?}",
        called_again.len(),
        called_again.iter().take(5).collect::<Vec<_>>()
    );
    assert_every_guest_holds_the_password(&w, VMS);
}

/// A run goes on setting targets while its status writes wait on a slow API server: it
/// does not hold every target until a status write is answered. On the emulator in both
/// of `make test`'s passes: holding writes is an injected fault, which a real server
/// cannot be made to produce on demand.
#[tokio::test]
async fn targets_go_on_being_set_while_the_status_writes_wait() {
    const FLEET: usize = 40;
    let slow_guests = OpLatencies {
        set_password_crypted: Latency::uniform_ms(200, 200),
        ..OpLatencies::default()
    };
    let w = fleet_world_with(FLEET, on_the_emulator(), slow_guests).await;
    w.crypted_fleet_reset_at("all", 4).await;
    let _: GuestPasswordReset = w
        .wait_for(NS, "fleet", FLEET_WAIT, succeeded_at_least(1))
        .await
        .expect("the run starts and records a first success");

    // 40 targets, 4 at a time, 200 ms each: about 2 s of calls, none of whose records can
    // be written while the hold lasts.
    let held = w.api().faults().hold_status_writes();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut set = 0;
        for i in 0..FLEET {
            let sim = w.sim_agent(&node_of(i, NODES)).expect("simulated agent");
            if sim.holds_password(NS, &vm_name(i), "root", SHA512) {
                set += 1;
            }
        }
        if set == FLEET {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {set} of {FLEET} guests were set in 60 s while status writes waited"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(held);
    let r: GuestPasswordReset = w.succeeded_within("fleet", FLEET_WAIT).await;
    let run = &r.status.as_ref().expect("status").run;
    assert_eq!(run.summary.succeeded as usize, FLEET);
}

/// A run over hundreds of VMs reads them with one paged list and a watch of its selector,
/// not with a GET each: a target's first attempt takes its VMI from the run's feed (its
/// start waits until the list has passed its name). On the emulator: it counts the
/// requests by path.
#[tokio::test]
async fn a_fleet_run_reads_its_vmis_from_one_list_and_a_watch_not_a_get_each() {
    const FLEET: usize = 600;
    const AT_ONCE: u32 = 16;
    let w = fleet_world_with(FLEET, on_the_emulator(), OpLatencies::default()).await;
    w.crypted_fleet_reset_at("all", AT_ONCE).await;
    let r: GuestPasswordReset = w.succeeded_within("fleet", FLEET_WAIT).await;
    assert_eq!(
        r.status.as_ref().expect("status").run.summary.succeeded as usize,
        FLEET
    );
    assert_every_guest_holds_the_password(&w, FLEET);
    let item_path = format!("/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances/");
    let gets: u64 = w
        .api()
        .all_requests()
        .iter()
        .filter(|(k, _)| {
            k.strip_prefix("GET ")
                .is_some_and(|p| p.starts_with(&item_path))
        })
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        gets, 0,
        "VMI GETs for {FLEET} targets that all read from the feed"
    );
}

/// Key grants with a TTL of a run over more than 100 VMs outlive the run when a spec change
/// replaces it: they are kept in shards (not in status, which stays small), and the keys
/// are removed from every VM when the TTL passes.
#[tokio::test]
async fn ttl_grants_of_a_replaced_run_over_150_vms_are_kept_in_shards_and_removed_on_time() {
    const FLEET: usize = 150;
    let w = fleet_world(FLEET).await;
    let grant = |key: &str| root_key_on_the_fleet("keys", key);
    keys_applied_until(
        &w,
        &grant(KEY1).ttl(20),
        finished,
        "the TTL grant is in place",
    )
    .await;
    // A new run replaces the first: KEY2 for good, KEY1's grants still to expire.
    let replaced = |k: &KeypairRebuild| {
        k.status.as_ref().is_some_and(|s| {
            s.run.observed_generation == k.metadata.generation
                && finished(k)
                && !s.run.pending_expiry_shards.is_empty()
        })
    };
    let k = keys_applied_until(
        &w,
        &grant(KEY2),
        replaced,
        "the new run finishes with the old grants in expiry shards",
    )
    .await;
    let run = &k.status.as_ref().expect("status").run;
    assert!(
        run.pending_expiries.is_empty(),
        "{:?}",
        run.pending_expiries
    );
    assert_eq!(
        run.pending_expiry_shards
            .iter()
            .map(|r| r.count as usize)
            .sum::<usize>(),
        FLEET
    );
    assert!(serde_json::to_vec(&k).expect("json").len() < 64 * 1024);

    let expired = |k: &KeypairRebuild| {
        k.status
            .as_ref()
            .is_some_and(|s| s.run.pending_expiry_shards.is_empty())
    };
    let _: KeypairRebuild = w
        .wait_for(NS, "keys", Duration::from_secs(120), expired)
        .await
        .expect("the old grants expire");
    let outlived = vms_with_key(&w, FLEET, KEY1, true).await;
    assert!(outlived.is_empty(), "KEY1 outlived its TTL on {outlived:?}");
    let lost = vms_with_key(&w, FLEET, KEY2, false).await;
    assert!(lost.is_empty(), "KEY2 is gone from {lost:?}");
    let cms: Api<ConfigMap> = Api::namespaced(w.client.clone(), NS);
    let left = cms
        .list(&ListParams::default().labels(OWNER_UID_LABEL))
        .await
        .expect("list")
        .items
        .into_iter()
        .map(|c| c.name_any())
        .filter(|n| n.contains("-expiries-"))
        .collect::<Vec<_>>();
    assert!(left.is_empty(), "expiry shards left: {left:?}");
}

/// Replace with an overlap over more than 100 VMs: the replaced keys and when they go are
/// kept in each target's record (shards, not status, which stays small); every VM holds
/// both keys during the overlap and only the new one after it.
#[tokio::test]
async fn an_overlap_over_150_vms_keeps_both_keys_then_removes_the_old_one_from_every_vm() {
    const FLEET: usize = 150;
    let w = fleet_world(FLEET).await;
    let keys = |key: &str| root_key_on_the_fleet("rotate", key);
    keys_applied_until(&w, &keys(KEY1), finished, "KEY1 in place").await;
    let rotated = |k: &KeypairRebuild| {
        k.status
            .as_ref()
            .is_some_and(|s| s.run.observed_generation == k.metadata.generation && finished(k))
    };
    let k = keys_applied_until(&w, &keys(KEY2).overlap(60), rotated, "the new run finishes").await;
    let run = &k.status.as_ref().expect("status").run;
    assert_eq!(run.phase, Some(Phase::Succeeded), "{:?}", run.summary);
    assert!(!run.shards.is_empty(), "the records are in shards");
    assert!(serde_json::to_vec(&k).expect("json").len() < 64 * 1024);
    for key in [KEY1, KEY2] {
        let without = vms_with_key(&w, FLEET, key, false).await;
        assert!(
            without.is_empty(),
            "both keys during the overlap: {without:?}"
        );
    }
    let start = Instant::now();
    loop {
        let with_key1 = vms_with_key(&w, FLEET, KEY1, true).await;
        if with_key1.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(180),
            "KEY1 outlived the overlap on {:?}",
            with_key1.into_iter().map(vm_name).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let lost = vms_with_key(&w, FLEET, KEY2, false).await;
    assert!(
        lost.is_empty(),
        "KEY2 stays everywhere; it is gone from {}",
        lost.iter()
            .map(|&i| calls_to(&w, i))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// The fleet's `i`-th VM with every agent call it got, in order, for a failure message.
fn calls_to(w: &World, i: usize) -> String {
    let sim = w.sim_agent(&node_of(i, NODES)).expect("simulated agent");
    let domain = format!("{NS}/{}", vm_name(i));
    let calls: Vec<String> = sim
        .records()
        .into_iter()
        .filter(|r| r.domain == domain)
        .map(|r| format!("#{} {:?} {:?} {:?}", r.seq, r.op, r.outcome, r.digest))
        .collect();
    format!("{domain}: {}", calls.join("; "))
}
