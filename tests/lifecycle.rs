//! Credential lifecycle (issue 17): keys a person had before a grant named them stay
//! theirs; each run of a generated password gets a Secret of its own that no other object
//! or run shares. (To move beside their kinds' suites once the shared builders land.)
use guestcred::api::keypair::{KeyMode, KeyStrategy};
use guestcred::api::{GuestPasswordReset, KeypairRebuild, Phase};
use guestcred_lab::hostqga::{HostQga, HostQgaOptions};
use guestcred_lab::kubevirt::{VmDescription, vm};
use guestcred_lab::testing::{HAND, KEY1, KEY2, KeysTest};
use guestcred_lab::world::{World, WorldOptions};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use kube::api::DeleteParams;
use std::time::Duration;

const NS: &str = "default";
const WAIT: Duration = Duration::from_secs(30);

/// KeypairRebuild "k": `keys` for alice on vm-a, live, with `strategy`.
fn rebuild(keys: &[&str], strategy: KeyStrategy) -> KeypairRebuild {
    KeypairRebuild::test("k")
        .vm("vm-a")
        .user("alice")
        .inline_keys(keys.iter().copied())
        .mode(KeyMode::Live)
        .strategy(strategy)
}

fn comments(keys: &[String]) -> Vec<String> {
    let mut c: Vec<String> = keys
        .iter()
        .filter_map(|k| k.split_whitespace().nth(2).map(str::to_string))
        .collect();
    c.sort();
    c
}

/// Apply `r` (a new spec of "k") and wait until the run of that spec succeeded.
async fn run_to_success(w: &World, r: &KeypairRebuild) {
    w.apply(r).await.expect("apply");
    w.wait_for(NS, "k", WAIT, |r: &KeypairRebuild| {
        r.status.as_ref().is_some_and(|s| {
            s.run.phase == Some(Phase::Succeeded)
                && s.run.observed_generation == r.metadata.generation
        })
    })
    .await
    .expect("the run of this spec succeeds");
}

/// A world with VM vm-a whose guest has a user alice.
async fn world_with_alice() -> (World, HostQga) {
    let w = World::start(WorldOptions::default()).await.expect("world");
    let qga = w
        .add_vm(
            &vm(NS, "vm-a", "node-1"),
            Some(HostQgaOptions::default().user("alice")),
        )
        .await
        .expect("vm")
        .expect("agent");
    (w, qga)
}

/// A world with VM vm-a whose user alice already has a key she added by hand.
async fn world_with_a_hand_added_key() -> (World, HostQga) {
    let (w, qga) = world_with_alice().await;
    qga.seed_authorized_keys("alice", &[HAND])
        .expect("hand key");
    (w, qga)
}

#[tokio::test]
async fn a_key_the_user_had_before_a_ttl_grant_named_it_survives_the_expiry() {
    let (w, qga) = world_with_a_hand_added_key().await;
    let mut r = rebuild(&[HAND, KEY1], KeyStrategy::Replace);
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
    let (w, qga) = world_with_a_hand_added_key().await;
    run_to_success(&w, &rebuild(&[HAND, KEY1], KeyStrategy::Replace)).await;
    run_to_success(&w, &rebuild(&[KEY2], KeyStrategy::Replace)).await;
    assert_eq!(
        comments(&qga.authorized_keys("alice").expect("keys")),
        ["hand@added", "key2@test"]
    );
}

fn generated(name: &str, vm: &str, length: u32) -> GuestPasswordReset {
    GuestPasswordReset::test(name)
        .vm(vm)
        .user("root")
        .generate(length)
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

/// VM `d` with a real agent whose guest has the default users.
async fn guest(w: &World, d: VmDescription) -> HostQga {
    w.add_vm(&d, Some(HostQgaOptions::default()))
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

/// Once reset `name`'s run of generated passwords of `length` succeeded: the reset, and
/// the output Secret and password of its only target.
async fn stored_after_success(
    w: &World,
    name: &str,
    length: usize,
) -> (GuestPasswordReset, String, String) {
    let r = w
        .wait_for(NS, name, WAIT, reset_succeeded_with_length(length))
        .await
        .unwrap_or_else(|e| panic!("{name} succeeds with length {length}: {e:?}"));
    let (secret, password) = stored_password(w, &r).await;
    (r, secret, password)
}

/// A world whose VM vm-a got a generated password (20 characters) from reset "r": the
/// world, vm-a's agent, the reset, and its output Secret and password.
async fn world_with_a_generated_password() -> (World, HostQga, GuestPasswordReset, String, String) {
    let w = World::start(WorldOptions::default()).await.expect("world");
    let qga = guest(&w, vm(NS, "vm-a", "node-1")).await;
    w.apply(&generated("r", "vm-a", 20)).await.expect("apply");
    let (r, secret, password) = stored_after_success(&w, "r", 20).await;
    (w, qga, r, secret, password)
}

#[tokio::test]
async fn a_new_run_after_a_spec_change_generates_stores_and_applies_a_new_password() {
    let (w, qga, _, first_secret, first_pw) = world_with_a_generated_password().await;
    assert!(qga.password_matches("root", &first_pw).expect("crypt"));

    w.apply(&generated("r", "vm-a", 24)).await.expect("apply");
    let (_, second_secret, second_pw) = stored_after_success(&w, "r", 24).await;
    assert_ne!(
        first_secret, second_secret,
        "a new run stores in a new Secret"
    );
    assert_eq!(second_pw.len(), 24);
    assert!(qga.password_matches("root", &second_pw).expect("crypt"));
    // The earlier Secret is kept (owned): the guest held its password until this run.
    let secrets: Api<Secret> = Api::namespaced(w.client.clone(), NS);
    assert!(secrets.get_opt(&first_secret).await.expect("get").is_some());
}

#[tokio::test]
async fn objects_and_vms_whose_names_join_alike_never_share_a_generated_password() {
    let w = World::start(WorldOptions::default()).await.expect("world");
    let c = guest(&w, vm(NS, "c", "node-1")).await;
    let b_c = guest(&w, vm(NS, "b-c", "node-1")).await;
    w.apply(&generated("a-b", "c", 20)).await.expect("apply");
    w.apply(&generated("a", "b-c", 20)).await.expect("apply");
    let (_, s1, p1) = stored_after_success(&w, "a-b", 20).await;
    let (_, s2, p2) = stored_after_success(&w, "a", 20).await;
    assert_ne!(s1, s2);
    assert_ne!(p1, p2);
    assert!(c.password_matches("root", &p1).expect("crypt"));
    assert!(b_c.password_matches("root", &p2).expect("crypt"));
}

#[tokio::test]
async fn a_recreated_reset_stores_its_password_in_a_secret_of_its_own() {
    let (w, qga, first, first_secret, _) = world_with_a_generated_password().await;
    let resets: Api<GuestPasswordReset> = Api::namespaced(w.client.clone(), NS);
    resets
        .delete("r", &DeleteParams::default())
        .await
        .expect("delete");
    w.apply(&generated("r", "vm-a", 20))
        .await
        .expect("recreate");
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

// ---------------------------------------------------------------------------------------
// Runs: pause, deletion, a newer input and a lost lease stop agent calls at once.
// ---------------------------------------------------------------------------------------
use guestcred::controller::leader::{Leadership, LeaseGuard, LeaseSettings};
use guestcred_lab::testing::{
    ResetTest, TargetedTest, TestObject, condition_reason, secret, target0,
};
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Patch, PatchParams};
use std::sync::Arc;

/// Two real sha512crypt hashes, set verbatim: the first and the rotated one.
const V1: &str = guestcred_lab::testing::SHA512;
const V2: &str = guestcred_lab::testing::SHA512_OTHER;

/// A world whose reset "r" keeps retrying: its VM vm-a has no agent.
async fn world_with_a_retrying_reset() -> World {
    let w = World::start(WorldOptions::default()).await.expect("world");
    w.add_vm(&vm(NS, "vm-a", "node-1"), None).await.expect("vm");
    apply_with_secret(&w, V1, &crypted_reset_of_vm_a()).await;
    w.wait_for(NS, "r", WAIT, attempts_at_least(2))
        .await
        .expect("retrying");
    w
}

/// Reset "r" of vm-a from Secret "pw" (a crypt hash, set verbatim), with a long deadline.
fn crypted_reset_of_vm_a() -> GuestPasswordReset {
    GuestPasswordReset::test("r")
        .vm("vm-a")
        .from_secret("pw")
        .crypted()
        .deadline_seconds(300)
}

/// Secret "pw" holding `value`, then the reset `r`.
async fn apply_with_secret(w: &World, value: &str, r: &GuestPasswordReset) {
    w.apply(&secret("pw", "password", value))
        .await
        .expect("secret");
    w.apply(r).await.expect("reset");
}

fn attempts_at_least(n: u32) -> impl Fn(&GuestPasswordReset) -> bool {
    move |r: &GuestPasswordReset| target0(r).is_some_and(|t| t.attempts >= n)
}

/// No set-password agent call starts within the next `seconds` seconds.
async fn assert_no_set_password_call_for(w: &World, seconds: u64, what: &str) {
    let calls = w.agent_calls("set-password");
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    assert_eq!(w.agent_calls("set-password"), calls, "{what}");
}

async fn attempts(w: &World) -> u32 {
    let r: GuestPasswordReset = w.get(NS, "r").await;
    target0(&r).map_or(0, |t| t.attempts)
}

#[tokio::test]
async fn pausing_stops_the_retries_of_a_target_already_in_flight() {
    let w = world_with_a_retrying_reset().await;
    w.apply(&crypted_reset_of_vm_a().paused())
        .await
        .expect("pause");
    w.wait_for::<GuestPasswordReset>(NS, "r", WAIT, condition_reason("Paused"))
        .await
        .expect("the run stopped for the pause");
    let seen = attempts(&w).await;
    assert_no_set_password_call_for(&w, 3, "no agent call after the pause").await;
    assert_eq!(attempts(&w).await, seen, "no attempt after the pause");
}

#[tokio::test]
async fn deleting_stops_the_retries_of_a_target_already_in_flight() {
    let w = world_with_a_retrying_reset().await;
    let resets: Api<GuestPasswordReset> = Api::namespaced(w.client.clone(), NS);
    resets
        .delete("r", &DeleteParams::default())
        .await
        .expect("delete");
    // A call already sent may still finish; none starts after it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_no_set_password_call_for(&w, 3, "no agent call after deletion").await;
}

#[tokio::test]
async fn a_secret_rotated_mid_run_is_the_only_value_later_targets_get() {
    let w = World::start(WorldOptions {
        nodes: 2,
        ..WorldOptions::default()
    })
    .await
    .expect("world");
    let a = guest(&w, vm(NS, "vm-a", "node-1").label("tier", "db")).await;
    // vm-b has no agent yet: the run waits on it (retrying) with vm-c not started.
    w.add_vm(&vm(NS, "vm-b", "node-1").label("tier", "db"), None)
        .await
        .expect("vm");
    let c = guest(&w, vm(NS, "vm-c", "node-2").label("tier", "db")).await;
    let r = GuestPasswordReset::test("r")
        .selector("tier", "db")
        .from_secret("pw")
        .crypted()
        .max_concurrency(1)
        .deadline_seconds(300);
    apply_with_secret(&w, V1, &r).await;
    w.wait_for(NS, "r", WAIT, |r: &GuestPasswordReset| {
        r.status.as_ref().is_some_and(|s| {
            s.run
                .targets
                .iter()
                .any(|t| t.vm == "vm-b" && t.attempts >= 2)
        })
    })
    .await
    .expect("vm-b retrying");
    assert_eq!(a.shadow_hash("root").expect("shadow").as_deref(), Some(V1));
    w.apply(&secret("pw", "password", V2))
        .await
        .expect("rotate");
    // Give the controller time to see the new version, then let vm-b answer.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let b = w
        .start_agent(&vm(NS, "vm-b", "node-1"), &HostQgaOptions::default())
        .expect("agent");
    let done: GuestPasswordReset = w
        .wait_for(
            NS,
            "r",
            Duration::from_secs(60),
            |r: &GuestPasswordReset| {
                r.status.as_ref().is_some_and(|s| {
                    s.run.phase == Some(Phase::Succeeded)
                        && s.run.observed_generation == r.metadata.generation
                        && s.run.targets.len() == 3
                }) && a.shadow_hash("root").ok().flatten().as_deref() == Some(V2)
            },
        )
        .await
        .expect("the run finishes with the new value");
    for (vm, agent) in [("vm-a", &a), ("vm-b", &b), ("vm-c", &c)] {
        assert_eq!(
            agent.shadow_hash("root").expect("shadow").as_deref(),
            Some(V2),
            "{vm} ends with the newest value"
        );
    }
    // vm-c (alone on node-2) was not started before the rotation: it got V2 only, once.
    assert_eq!(w.agent_calls_on("node-2", "set-password"), 1, "{done:#?}");
}

#[tokio::test]
async fn a_replica_whose_lease_ran_out_starts_no_agent_call() {
    let mut w = World::start(WorldOptions {
        start_controller: false,
        ..WorldOptions::default()
    })
    .await
    .expect("world");
    // The test plays the elector: the Lease names "old" until it runs out.
    let leases: Api<Lease> = Api::namespaced(w.client.clone(), NS);
    let hold = |holder: &str| Lease {
        metadata: kube::api::ObjectMeta {
            name: Some("gc-lease".into()),
            ..Default::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(4),
            renew_time: Some(MicroTime(k8s_openapi::jiff::Timestamp::now())),
            ..Default::default()
        }),
    };
    let pp = PatchParams::apply("test-elector").force();
    leases
        .patch("gc-lease", &pp, &Patch::Apply(hold("old")))
        .await
        .expect("lease");
    let settings = LeaseSettings {
        name: "gc-lease".into(),
        namespace: NS.into(),
        identity: "old".into(),
        duration_seconds: 4,
        grace_seconds: 1,
    };
    w.start_controller_with(Leadership::Lease(Arc::new(LeaseGuard::new(
        w.client.clone(),
        &settings,
    ))));
    w.add_vm(&vm(NS, "vm-a", "node-1"), None).await.expect("vm");
    apply_with_secret(&w, V1, &crypted_reset_of_vm_a()).await;
    w.wait_for(NS, "r", WAIT, attempts_at_least(1))
        .await
        .expect("calls while leading");
    // "old" stops renewing; once the lease ran out, "new" takes it.
    tokio::time::sleep(Duration::from_secs(4)).await;
    leases
        .patch("gc-lease", &pp, &Patch::Apply(hold("new")))
        .await
        .expect("takeover");
    assert_no_set_password_call_for(
        &w,
        3,
        "the old leader called an agent after the new one took over",
    )
    .await;
}

#[tokio::test]
async fn a_run_never_writes_over_status_someone_else_wrote_meanwhile() {
    let w = world_with_a_retrying_reset().await;
    let running: GuestPasswordReset = w.get(NS, "r").await;
    // Another writer (a newer leader) finished this same run meanwhile.
    let mut finished = running.status.expect("status").run;
    finished.targets[0].state = guestcred::api::TargetState::Succeeded;
    finished.targets[0].reason = Some("Applied".into());
    finished.recount();
    let resets: Api<GuestPasswordReset> = Api::namespaced(w.client.clone(), NS);
    let newer = serde_json::json!({ "status": finished });
    resets
        .patch_status("r", &PatchParams::default(), &Patch::Merge(&newer))
        .await
        .expect("newer status");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r: GuestPasswordReset = w.get(NS, "r").await;
    assert_eq!(
        target0(&r).map(|t| t.state),
        Some(guestcred::api::TargetState::Succeeded),
        "the stale run put a finished target back: {r:#?}"
    );
    assert_no_set_password_call_for(&w, 2, "the superseded run stopped").await;
}

#[tokio::test]
async fn an_update_that_makes_the_spec_unreadable_stops_the_run_with_invalid_spec() {
    let w = world_with_a_retrying_reset().await;
    // An API server without schema validation (the emulator, an old cluster) lets this in.
    let dynamic = kube::api::ApiResource::erase::<GuestPasswordReset>(&());
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(w.client.clone(), NS, &dynamic);
    let bad = serde_json::json!({"spec": {"maxConcurrency": -1}});
    raw.patch("r", &PatchParams::default(), &Patch::Merge(&bad))
        .await
        .expect("unreadable update");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let o = raw.get("r").await.expect("get");
        let stalled = o.data["status"]["conditions"].as_array().is_some_and(|cs| {
            cs.iter().any(|c| {
                c["type"] == "Stalled" && c["status"] == "True" && c["reason"] == "InvalidSpec"
            })
        });
        if stalled {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no InvalidSpec: {o:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_no_set_password_call_for(&w, 3, "the old spec is still driven").await;
}

#[tokio::test]
async fn a_ttl_grant_is_removed_on_time_although_a_spec_change_started_a_new_run() {
    let (w, qga) = world_with_alice().await;
    run_to_success(&w, &rebuild(&[KEY1], KeyStrategy::Append).ttl(10)).await;
    // A new run for another key, without a TTL, before KEY1's TTL passed.
    run_to_success(&w, &rebuild(&[KEY2], KeyStrategy::Append)).await;
    assert_eq!(
        comments(&qga.authorized_keys("alice").expect("keys")),
        ["key1@test", "key2@test"]
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(40);
    while comments(&qga.authorized_keys("alice").expect("keys")) != ["key2@test"] {
        assert!(
            std::time::Instant::now() < deadline,
            "KEY1 outlived its TTL: {:?}",
            qga.authorized_keys("alice")
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

// ---------------------------------------------------------------------------------------
// status.inputHash: keyed with a key only the controller holds.
// ---------------------------------------------------------------------------------------

/// The hash an older controller recorded: keyed with the object's UID (readable by anyone
/// who can read the object).
fn uid_keyed(r: &GuestPasswordReset, value: &str) -> String {
    guestcred::controller::secrets::keyed_hash(
        r.metadata.uid.as_deref().expect("uid"),
        &[value.as_bytes(), &[1], b""],
    )
}

/// A world whose reset "r" of vm-a (V1 from Secret "pw") has finished: the world, vm-a's
/// agent and the reset.
async fn world_with_a_finished_crypted_reset() -> (World, HostQga, GuestPasswordReset) {
    let w = World::start(WorldOptions::default()).await.expect("world");
    let a = guest(&w, vm(NS, "vm-a", "node-1")).await;
    apply_with_secret(&w, V1, &crypted_reset_of_vm_a()).await;
    let r = w
        .wait_for(NS, "r", WAIT, guestcred_lab::testing::finished)
        .await
        .expect("finishes");
    (w, a, r)
}

#[tokio::test]
async fn a_guessed_password_cannot_be_checked_against_the_status_hash() {
    let (w, _a, r) = world_with_a_finished_crypted_reset().await;
    let recorded = r
        .status
        .as_ref()
        .and_then(|s| s.run.input_hash.clone())
        .expect("hash");
    // A reader of the object who guessed the value right cannot confirm the guess.
    assert_ne!(recorded, uid_keyed(&r, V1));
    let secrets: Api<Secret> = Api::namespaced(w.client.clone(), NS);
    let key = secrets
        .get(guestcred::controller::INPUT_KEY_SECRET)
        .await
        .expect("the controller's key Secret");
    assert_eq!(key.data.expect("data")["key"].0.len(), 32);
}

#[tokio::test]
async fn a_status_hash_from_before_the_key_is_taken_as_the_same_input() {
    let (mut w, _a, r) = world_with_a_finished_crypted_reset().await;
    w.kill_controller();
    // As an older controller left it.
    let resets: Api<GuestPasswordReset> = Api::namespaced(w.client.clone(), NS);
    let old =
        serde_json::json!({"status": {"inputHash": uid_keyed(&r, V1), "inputSecretVersion": null}});
    resets
        .patch_status("r", &PatchParams::default(), &Patch::Merge(&old))
        .await
        .expect("old status");
    let calls = w.agent_calls("set-password");
    w.start_controller();
    let migrated: GuestPasswordReset = w
        .wait_for(NS, "r", WAIT, |o: &GuestPasswordReset| {
            o.status
                .as_ref()
                .and_then(|s| s.run.input_hash.as_deref())
                .is_some_and(|h| h.starts_with("hmac-sha256k:"))
        })
        .await
        .expect("rewritten with the keyed hash");
    assert_eq!(
        w.agent_calls("set-password"),
        calls,
        "no re-run: {migrated:#?}"
    );
}

// ---------------------------------------------------------------------------------------
// Events stay bounded per run.
// ---------------------------------------------------------------------------------------

/// A world whose runs publish at most 3 per-target Events, with 8 guests labelled
/// tier=bulk on node-1, and reset `r` of alice's password on them, one at a time.
async fn capped_events_world() -> (World, GuestPasswordReset, Vec<HostQga>) {
    let w = World::start(WorldOptions {
        settings: guestcred::controller::context::EngineSettings {
            max_target_events: 3,
            ..guestcred_lab::world::fast_settings()
        },
        ..WorldOptions::default()
    })
    .await
    .expect("world");
    let mut agents = Vec::new();
    for i in 0..8 {
        let d = vm(NS, &format!("bulk-{i}"), "node-1").label("tier", "bulk");
        agents.push(w.add_guest(&d).await);
    }
    let r = GuestPasswordReset::test("r")
        .selector("tier", "bulk")
        .user("alice")
        .from_secret("pw")
        .crypted()
        .max_concurrency(1);
    (w, r, agents)
}

/// Reset r's Applied Events published one by one, and the notes of its Summary Events.
async fn applied_events_and_summaries(w: &World) -> (u32, Vec<String>) {
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(w.client.clone(), NS);
    // The summary Event is published before the final status write.
    let about_r: Vec<_> = guestcred_lab::testing::list_all(&events)
        .await
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("r"))
        .collect();
    // The Recorder folds repeats of one reason and action into a series: count publishes.
    let one_by_one = about_r
        .iter()
        .filter(|e| e.reason.as_deref() == Some("Applied") && e.action.as_deref() == Some("Apply"))
        .map(|e| e.series.as_ref().map_or(1, |s| s.count.max(1) as u32))
        .sum();
    let summaries = about_r
        .iter()
        .filter(|e| e.action.as_deref() == Some("Summary"))
        .filter_map(|e| e.note.clone())
        .collect();
    (one_by_one, summaries)
}

const FIVE_MORE_APPLIED: &str = "5 more target(s): Applied (per-target Events are capped at 3 per run; status and metrics count every target)";

#[tokio::test]
async fn per_target_events_are_capped_per_run_and_the_rest_summed_per_reason() {
    let (w, r, _agents) = capped_events_world().await;
    apply_with_secret(&w, V1, &r).await;
    let done: GuestPasswordReset = w
        .wait_for(NS, "r", WAIT, guestcred_lab::testing::finished)
        .await
        .expect("finishes");
    assert_eq!(done.status.expect("status").run.summary.succeeded, 8);
    let (one_by_one, summaries) = applied_events_and_summaries(&w).await;
    assert_eq!(one_by_one, 3, "one by one up to the cap");
    assert_eq!(summaries, [FIVE_MORE_APPLIED]);
}

/// Issue 19: the cap is per run, not per controller process. A controller restarted in
/// the middle of a run counts the targets the run already ended against the cap (their
/// Events were published or counted before), so it publishes no second batch of 3.
#[tokio::test]
async fn the_per_target_event_cap_holds_across_a_controller_restart() {
    let (mut w, r, agents) = capped_events_world().await;
    // One target at a time, in name order: the run stops at bulk-4, whose agent is frozen.
    guestcred_lab::testing::signal(&agents[4], "-STOP");
    apply_with_secret(&w, V1, &r).await;
    w.wait_for(NS, "r", WAIT, |r: &GuestPasswordReset| {
        r.status
            .as_ref()
            .is_some_and(|s| s.run.summary.succeeded == 4)
    })
    .await
    .expect("4 targets recorded as done");
    w.kill_controller();
    guestcred_lab::testing::signal(&agents[4], "-CONT");
    w.start_controller();
    let done: GuestPasswordReset = w
        .wait_for(NS, "r", WAIT, guestcred_lab::testing::finished)
        .await
        .expect("finishes after the restart");
    assert_eq!(done.status.expect("status").run.summary.succeeded, 8);
    let (one_by_one, summaries) = applied_events_and_summaries(&w).await;
    assert_eq!(
        one_by_one, 3,
        "one by one up to the cap, over both processes"
    );
    assert_eq!(summaries, [FIVE_MORE_APPLIED]);
}
