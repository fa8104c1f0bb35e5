//! Scratch (moves into controller_keys.rs): keys a person had before a grant named them
//! stay theirs.
use guestcred::api::keypair::{KeyMode, KeyStrategy, PublicKeySource};
use guestcred::api::{KeypairRebuild, KeypairRebuildSpec, Phase, RolloutSpec, TargetSpec};
use guestcred_lab::hostqga::HostQgaOptions;
use guestcred_lab::kubevirt::vm;
use guestcred_lab::world::{World, WorldOptions};
use std::time::Duration;

const NS: &str = "default";
const WAIT: Duration = Duration::from_secs(30);
const KEY1: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ+B4jIlELcMrHzsE1Ryt7XpT2gUKy/XZ+lbyfbQ9TZh key1@test";
const KEY2: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMJKojGo/i5K/TGJ8PutquWzCrCg7RrbK5WgjGBkcoBs key2@test";
const HAND: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOimy32Onc7iJCyVgWcE+d/LHx1OCqkqfeeXY5QKiYXE hand@added";

fn rebuild(keys: &[&str]) -> KeypairRebuild {
    let mut r = KeypairRebuild::new(
        "k",
        KeypairRebuildSpec {
            target: TargetSpec {
                vm_name: Some("vm-a".into()),
                selector: None,
            },
            user: Some("alice".into()),
            public_keys: PublicKeySource {
                secret_ref: None,
                inline: Some(keys.iter().map(|k| k.to_string()).collect()),
            },
            mode: KeyMode::Live,
            strategy: KeyStrategy::Replace,
            replace_all: false,
            ttl_seconds: None,
            rollout: RolloutSpec::default(),
        },
    );
    r.metadata.namespace = Some(NS.into());
    r
}

fn comments(keys: &[String]) -> Vec<String> {
    let mut c: Vec<String> = keys
        .iter()
        .filter_map(|k| k.split_whitespace().nth(2).map(str::to_string))
        .collect();
    c.sort();
    c
}

fn succeeded(r: &KeypairRebuild) -> bool {
    r.status
        .as_ref()
        .is_some_and(|s| s.run.phase == Some(Phase::Succeeded))
}

#[tokio::test]
async fn a_key_the_user_had_before_a_ttl_grant_named_it_survives_the_expiry() {
    let w = World::start(WorldOptions::default()).await.expect("world");
    let qga = w
        .add_vm(
            &vm(NS, "vm-a", "node-1"),
            Some(HostQgaOptions::default().user("alice")),
        )
        .await
        .expect("vm")
        .expect("agent");
    qga.seed_authorized_keys("alice", &[HAND])
        .expect("hand key");
    let mut r = rebuild(&[HAND, KEY1]);
    r.spec.ttl_seconds = Some(10);
    w.apply(&r).await.expect("apply");
    w.wait_for(NS, "k", Duration::from_secs(40), |r: &KeypairRebuild| {
        r.status
            .as_ref()
            .is_some_and(|s| s.run.targets[0].reason.as_deref() == Some("Expired"))
    })
    .await
    .expect("expires");
    assert_eq!(
        comments(&qga.authorized_keys("alice").expect("keys")),
        ["hand@added"]
    );
}

#[tokio::test]
async fn replace_keeps_a_key_the_user_had_before_a_grant_named_it() {
    let w = World::start(WorldOptions::default()).await.expect("world");
    let qga = w
        .add_vm(
            &vm(NS, "vm-a", "node-1"),
            Some(HostQgaOptions::default().user("alice")),
        )
        .await
        .expect("vm")
        .expect("agent");
    qga.seed_authorized_keys("alice", &[HAND])
        .expect("hand key");
    w.apply(&rebuild(&[HAND, KEY1])).await.expect("apply");
    w.wait_for(NS, "k", WAIT, succeeded)
        .await
        .expect("first run");
    w.apply(&rebuild(&[KEY2])).await.expect("apply");
    w.wait_for(NS, "k", WAIT, |r: &KeypairRebuild| {
        succeeded(r)
            && r.status
                .as_ref()
                .is_some_and(|s| s.run.targets[0].keys.len() == 1)
    })
    .await
    .expect("second run");
    assert_eq!(
        comments(&qga.authorized_keys("alice").expect("keys")),
        ["hand@added", "key2@test"]
    );
}
