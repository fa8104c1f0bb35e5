//! Two controller replicas against one API server: only the lease holder reconciles, and
//! when it dies without releasing the lease the other takes over after the lease expires.
use guestcred::api::GuestPasswordReset;
use guestcred::controller::context::EngineSettings;
use guestcred::controller::leader::LeaseSettings;
use guestcred_lab::testing::*;
use guestcred_lab::world::{World, WorldOptions};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use kube::{Api, Client};
use std::time::{Duration, Instant};

/// The lease both replicas compete for; `identity` names the replica (and its Events).
fn lease(identity: &str) -> LeaseSettings {
    LeaseSettings {
        name: "guestcred-controller".into(),
        namespace: "default".into(),
        identity: identity.into(),
        duration_seconds: 3,
        grace_seconds: 1,
    }
}

fn reset_for_missing_vm(name: &str) -> GuestPasswordReset {
    GuestPasswordReset::test(name)
        .vm("ghost")
        .user("root")
        .generate(20)
}

async fn holder(client: &Client) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "default");
    leases
        .get_opt("guestcred-controller")
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
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
    let a = w.spawn_replica(lease("replica-a"));
    let start = Instant::now();
    let first = loop {
        if let Some(h) = holder(&client).await {
            break h;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "nobody took the lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let b = w.spawn_replica(lease("replica-b"));
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
    while holder(&client).await.as_deref() != Some(survivor) {
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
