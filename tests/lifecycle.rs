//! Credential lifecycle (issue 17): keys a person had before a grant named them stay
//! theirs; each run of a generated password gets a Secret of its own that no other object
//! or run shares. (To move beside their kinds' suites once the shared builders land.)
use guestcred::api::keypair::{KeyMode, KeyStrategy, PublicKeySource};
use guestcred::api::password::{GeneratePolicy, PasswordSource};
use guestcred::api::{
    GuestPasswordReset, GuestPasswordResetSpec, KeypairRebuild, KeypairRebuildSpec, Phase,
    RolloutSpec, TargetSpec,
};
use guestcred_lab::hostqga::{HostQga, HostQgaOptions};
use guestcred_lab::kubevirt::vm;
use guestcred_lab::world::{World, WorldOptions};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::DeleteParams;
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

fn generated(name: &str, vm: &str, length: u32) -> GuestPasswordReset {
    let mut r = GuestPasswordReset::new(
        name,
        GuestPasswordResetSpec {
            target: TargetSpec {
                vm_name: Some(vm.into()),
                selector: None,
            },
            user: Some("root".into()),
            password: PasswordSource {
                generate: Some(GeneratePolicy {
                    length,
                    charset: Default::default(),
                }),
                ..Default::default()
            },
            rollout: RolloutSpec::default(),
        },
    );
    r.metadata.namespace = Some(NS.into());
    r
}

/// The output Secret a finished reset names for its only target, and its password.
async fn stored_password(w: &World, r: &GuestPasswordReset) -> (String, String) {
    let st = &r.status.as_ref().expect("status").run;
    assert_eq!(st.phase, Some(Phase::Succeeded), "{st:#?}");
    let name = st.targets[0].output_secret.clone().expect("output secret");
    let secrets: Api<Secret> = Api::namespaced(w.client.clone(), NS);
    let s = secrets.get(&name).await.expect("output secret exists");
    let bytes = s.data.expect("data")["password"].0.clone();
    (name, String::from_utf8(bytes).expect("utf-8"))
}

async fn guest(w: &World, name: &str) -> HostQga {
    w.add_vm(&vm(NS, name, "node-1"), Some(HostQgaOptions::default()))
        .await
        .expect("vm")
        .expect("agent")
}

fn reset_succeeded_with_length(length: usize) -> impl Fn(&GuestPasswordReset) -> bool {
    move |r: &GuestPasswordReset| {
        r.status.as_ref().is_some_and(|s| {
            s.run.phase == Some(Phase::Succeeded)
                && s.run.observed_generation == r.metadata.generation
                && s.run.targets[0].output_secret.is_some()
        }) && r.spec.password.generate.as_ref().map(|g| g.length as usize) == Some(length)
    }
}

#[tokio::test]
async fn a_new_run_after_a_spec_change_generates_stores_and_applies_a_new_password() {
    let w = World::start(WorldOptions::default()).await.expect("world");
    let qga = guest(&w, "vm-a").await;
    w.apply(&generated("r", "vm-a", 20)).await.expect("apply");
    let first: GuestPasswordReset = w
        .wait_for(NS, "r", WAIT, reset_succeeded_with_length(20))
        .await
        .expect("first run");
    let (first_secret, first_pw) = stored_password(&w, &first).await;
    assert!(qga.password_matches("root", &first_pw).expect("crypt"));

    w.apply(&generated("r", "vm-a", 24)).await.expect("apply");
    let second: GuestPasswordReset = w
        .wait_for(NS, "r", WAIT, reset_succeeded_with_length(24))
        .await
        .expect("second run");
    let (second_secret, second_pw) = stored_password(&w, &second).await;
    assert_ne!(first_secret, second_secret, "a new run stores in a new Secret");
    assert_eq!(second_pw.len(), 24);
    assert!(qga.password_matches("root", &second_pw).expect("crypt"));
    // The earlier Secret is kept (owned): the guest held its password until this run.
    let secrets: Api<Secret> = Api::namespaced(w.client.clone(), NS);
    assert!(secrets.get_opt(&first_secret).await.expect("get").is_some());
}

#[tokio::test]
async fn objects_and_vms_whose_names_join_alike_never_share_a_generated_password() {
    let w = World::start(WorldOptions::default()).await.expect("world");
    let c = guest(&w, "c").await;
    let b_c = guest(&w, "b-c").await;
    w.apply(&generated("a-b", "c", 20)).await.expect("apply");
    w.apply(&generated("a", "b-c", 20)).await.expect("apply");
    let one: GuestPasswordReset = w
        .wait_for(NS, "a-b", WAIT, reset_succeeded_with_length(20))
        .await
        .expect("a-b finishes");
    let two: GuestPasswordReset = w
        .wait_for(NS, "a", WAIT, reset_succeeded_with_length(20))
        .await
        .expect("a finishes");
    let (s1, p1) = stored_password(&w, &one).await;
    let (s2, p2) = stored_password(&w, &two).await;
    assert_ne!(s1, s2);
    assert_ne!(p1, p2);
    assert!(c.password_matches("root", &p1).expect("crypt"));
    assert!(b_c.password_matches("root", &p2).expect("crypt"));
}

#[tokio::test]
async fn a_recreated_reset_stores_its_password_in_a_secret_of_its_own() {
    let w = World::start(WorldOptions::default()).await.expect("world");
    let qga = guest(&w, "vm-a").await;
    w.apply(&generated("r", "vm-a", 20)).await.expect("apply");
    let first: GuestPasswordReset = w
        .wait_for(NS, "r", WAIT, reset_succeeded_with_length(20))
        .await
        .expect("first");
    let (first_secret, _) = stored_password(&w, &first).await;
    let resets: Api<GuestPasswordReset> = Api::namespaced(w.client.clone(), NS);
    resets
        .delete("r", &DeleteParams::default())
        .await
        .expect("delete");
    w.apply(&generated("r", "vm-a", 20)).await.expect("recreate");
    let second: GuestPasswordReset = w
        .wait_for(NS, "r", WAIT, |r: &GuestPasswordReset| {
            r.metadata.uid != first.metadata.uid && reset_succeeded_with_length(20)(r)
        })
        .await
        .expect("second");
    let (second_secret, second_pw) = stored_password(&w, &second).await;
    assert_ne!(first_secret, second_secret);
    assert!(qga.password_matches("root", &second_pw).expect("crypt"));
}
