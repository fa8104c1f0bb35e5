//! Two controller replicas against one API server: only the lease holder reconciles, and
//! when it dies without releasing the lease the other takes over after the lease expires.
//! A leader frozen past its lease (SIGSTOP, as a node under memory pressure or a long
//! pause does) starts no agent call when it is thawed: real controller processes against
//! the served emulator and a simulated agent that records every call.
use guestcred::api::{GuestPasswordReset, Phase};
use guestcred::controller::context::EngineSettings;
use guestcred_lab::kubevirt::vm;
use guestcred_lab::replicas::{Replica, lease_holder, lease_settings, mtls_files};
use guestcred_lab::simagent::{Latency, OpLatencies, SimAgentOptions, SimOp};
use guestcred_lab::testing::*;
use guestcred_lab::world::{World, WorldOptions};
use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use kube::{Api, Client};
use std::time::{Duration, Instant};

fn reset_for_missing_vm(name: &str) -> GuestPasswordReset {
    GuestPasswordReset::test(name)
        .vm("ghost")
        .user("root")
        .generate(20)
}

/// Reporters of the Events about `object`, waiting until at least one exists.
async fn reporters(client: &Client, object: &str) -> Vec<String> {
    let events: Api<Event> = Api::all(client.clone());
    let start = Instant::now();
    loop {
        let list = events.list(&ListParams::default()).await.expect("events");
        let found: Vec<String> = list
            .items
            .iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(object))
            .filter_map(|e| e.reporting_controller.clone())
            .collect();
        if !found.is_empty() {
            return found;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no event about {object}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_reconciles_and_a_follower_takes_over_when_it_dies() {
    // No controller of its own: the replicas are the controllers.
    let w = World::start(WorldOptions {
        nodes: 0,
        start_controller: false,
        settings: EngineSettings::default(),
        request_timeout: Some(Duration::from_secs(1)),
        ..WorldOptions::default()
    })
    .await
    .expect("world");
    let client = w.client.clone();
    // The second replica starts once the first holds the lease: the emulator has no
    // server-side-apply conflict detection, which is what keeps two simultaneous first
    // acquisitions apart on a real API server (documented emulator gap).
    let a = w.spawn_replica(lease_settings("replica-a"));
    let start = Instant::now();
    let first = loop {
        if let Some(h) = lease_holder(&client).await {
            break h;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nobody took the lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let b = w.spawn_replica(lease_settings("replica-b"));
    w.apply(&reset_for_missing_vm("one")).await.expect("apply");
    let who = reporters(&client, "one").await;
    assert!(
        who.iter().all(|r| *r == first),
        "only the leader {first} reports: {who:?}"
    );

    // The leader dies without releasing the lease.
    let (dead, survivor) = if first == "replica-a" {
        (a, "replica-b")
    } else {
        (b, "replica-a")
    };
    dead.abort();
    let start = Instant::now();
    while lease_holder(&client).await.as_deref() != Some(survivor) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{survivor} never took over"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    w.apply(&reset_for_missing_vm("two")).await.expect("apply");
    let who = reporters(&client, "two").await;
    assert!(
        who.iter().all(|r| r == survivor),
        "the new leader {survivor} reports: {who:?}"
    );
}

/// Polls `what` every 100 ms until it holds; fails the test after `limit`.
async fn until<F: AsyncFnMut() -> bool>(what: &str, limit: Duration, mut check: F) {
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Two `guestcred controller` processes on one 3 s Lease drive a 30-VM reset, one call at
/// a time. The leader is frozen mid-run past its lease; the other takes over and goes on.
/// Then the new leader is frozen too and the first one thawed: whatever the agent records
/// from then on comes from the thawed replica, and it must be nothing (its LeaseGuard
/// reads the Lease before any call once its trust window has passed, sees the new holder,
/// and the process exits on the lost lease). The new leader finishes the run, every guest
/// holds the password, and no two set-password calls ever overlapped (two replicas never
/// drove the object at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_frozen_past_its_lease_starts_no_agent_call_once_thawed() {
    let tls_dir = tempfile::tempdir().expect("tempdir");
    let tls = mtls_files(tls_dir.path()).expect("lab certificates");
    let w = World::start(WorldOptions {
        nodes: 1,
        serve: true,
        start_controller: false,
        mtls: Some(tls.clone()),
        agent_timeout: Duration::from_secs(3),
        sim_agent: Some(SimAgentOptions {
            latency: OpLatencies {
                set_password_crypted: Latency::uniform_ms(150, 250),
                ..OpLatencies::host_qemu_ga()
            },
            ..SimAgentOptions::default()
        }),
        ..WorldOptions::default()
    })
    .await
    .expect("world");
    let sim = w.sim_agent("node-1").expect("simulated agent").clone();
    const VMS: usize = 30;
    for i in 0..VMS {
        w.add_sim_vm(&vm(NS, &format!("vm-{i:02}"), "node-1").label("bulk", "lease"))
            .await
            .expect("vm");
    }
    w.apply(&secret("pw", "password", SHA512))
        .await
        .expect("secret");
    let guestcred = std::path::Path::new(env!("CARGO_BIN_EXE_guestcred"));
    let mut a = Replica::start(guestcred, &w, &tls, "replica-a", 3).expect("replica a");
    let client = w.client.clone();
    until("replica-a to lead", Duration::from_secs(30), async || {
        lease_holder(&client).await.as_deref() == Some("replica-a")
    })
    .await;
    let b = Replica::start(guestcred, &w, &tls, "replica-b", 3).expect("replica b");
    w.apply(
        &GuestPasswordReset::test("bulk")
            .selector("bulk", "lease")
            .user("root")
            .from_secret("pw")
            .crypted()
            .max_concurrency(1)
            .deadline_seconds(600),
    )
    .await
    .expect("reset");
    until(
        "the leader's first calls",
        Duration::from_secs(60),
        async || sim.successes(SimOp::SetPassword) >= 3,
    )
    .await;

    // Frozen mid-call: once thawed, its next step would be the next target's call.
    let start = Instant::now();
    while sim.calls_started() == sim.records().len() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no call in progress"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    a.signal("STOP");
    until(
        "replica-b to take over",
        Duration::from_secs(30),
        async || lease_holder(&client).await.as_deref() == Some("replica-b"),
    )
    .await;
    let at_takeover = sim.successes(SimOp::SetPassword);
    until(
        "the new leader's calls",
        Duration::from_secs(60),
        async || sim.successes(SimOp::SetPassword) >= at_takeover + 2,
    )
    .await;

    // Freeze the new leader; once its last call has ended, only the thawed one can call.
    b.signal("STOP");
    until("no call in progress", Duration::from_secs(30), async || {
        sim.calls_started() == sim.records().len()
    })
    .await;
    let thawed_at = tokio::time::Instant::now();
    a.signal("CONT");
    until(
        "the thawed replica to exit",
        Duration::from_secs(60),
        async || a.exit_status().is_some(),
    )
    .await;
    let from_thawed: Vec<_> = sim
        .records()
        .into_iter()
        .filter(|r| r.started >= thawed_at)
        .collect();
    assert!(
        from_thawed.is_empty(),
        "the thawed replica called the agent after losing its lease: {from_thawed:#?}\n{}",
        a.log()
    );
    assert!(
        a.log().contains("no longer the leader") || a.log().contains("lost the leader lease"),
        "{}",
        a.log()
    );

    b.signal("CONT");
    let done = w
        .wait_for::<GuestPasswordReset>(NS, "bulk", Duration::from_secs(120), finished)
        .await
        .expect("the run finishes");
    assert_eq!(phase(&done), Some(Phase::Succeeded), "{:#?}", done.status);
    for i in 0..VMS {
        let name = format!("vm-{i:02}");
        assert!(sim.holds_password(NS, &name, "root", SHA512), "{name}");
    }
    let mut calls: Vec<_> = sim
        .records()
        .into_iter()
        .filter(|r| r.op == SimOp::SetPassword)
        .collect();
    calls.sort_by_key(|r| r.started);
    for pair in calls.windows(2) {
        assert!(
            pair[1].started >= pair[0].finished,
            "two set-password calls at once: {pair:#?}"
        );
    }
}
