//! The controller against the API-server emulator, with real shims and real qemu-ga agents
//! (host-run, one per VM; see `guestcred_lab::world`). Each test builds its own world.
use guestcred::api::kubevirt::ADMIN_USER_ANNOTATION;
use guestcred::api::{GuestPasswordReset, Phase, TargetState, UserSource};
use guestcred_lab::kubevirt::vm;
use guestcred_lab::testing::*;
use guestcred_lab::world::{World, WorldOptions};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);
const PLAIN: &str = "correct-horse-battery-staple";

/// Reset "r" of VM `vm_name` from Secret "pw": what most tests here apply.
fn reset_of(vm_name: &str) -> GuestPasswordReset {
    GuestPasswordReset::test("r").vm(vm_name).from_secret("pw")
}

/// Secret "pw" holding [`SHA512`] and reset "r" of alice on VM `vm_name` from it (crypted),
/// run to the end.
async fn crypted_reset_of_alice(w: &World, vm_name: &str) -> GuestPasswordReset {
    w.password_secret("pw", SHA512).await;
    w.run_to_end(&reset_of(vm_name).crypted().user("alice"))
        .await
}

/// `r` succeeded and alice's hash in the guest of `qga` is [`SHA512`], verbatim.
fn assert_sha512_landed_for_alice(r: &GuestPasswordReset, qga: &guestcred_lab::hostqga::HostQga) {
    assert_eq!(phase(r), Some(Phase::Succeeded), "{:#?}", r.status);
    assert_eq!(hash_of(qga, "alice").as_deref(), Some(SHA512));
}

#[tokio::test]
async fn missing_vm_is_reported_as_vm_not_found() {
    let w = world().await;
    w.password_secret("pw", PLAIN).await;
    let r = w.run_to_end(&reset_of("ghost")).await;
    let t = target0(&r).expect("a target");
    assert_eq!(t.state, TargetState::Failed);
    assert_eq!(t.reason.as_deref(), Some("VMNotFound"));
}

#[tokio::test]
async fn both_vm_name_and_selector_is_invalid_spec() {
    let w = world().await;
    let mut r = GuestPasswordReset::test("r")
        .selector("tier", "db")
        .from_secret("pw");
    r.spec.common.target.vm_name = Some("db-0".into());
    w.put(&r).await;
    let r: GuestPasswordReset = w.once("r", stalled_with("InvalidSpec")).await;
    let c = r.status.expect("status").run.conditions;
    let stalled = c.iter().find(|c| c.type_ == "Stalled").expect("Stalled");
    assert!(
        stalled
            .message
            .contains("exactly one of target.vmName and target.selector"),
        "{}",
        stalled.message
    );
}

#[tokio::test]
async fn cross_namespace_secret_reference_is_refused() {
    let w = world().await;
    let r = GuestPasswordReset::test("r").vm("vm-a").from_secret_key(
        "pw",
        "password",
        Some("kube-system"),
    );
    w.put(&r).await;
    let r: GuestPasswordReset = w.once("r", stalled_with("InvalidSpec")).await;
    let msg = &r.status.expect("status").run.conditions[0].message;
    assert!(msg.contains("cross-namespace"), "{msg}");
}

#[tokio::test]
async fn missing_secret_stalls_with_secret_not_found_and_recovers_when_created() {
    let (w, _qga) = world_with_guest("vm-a").await;
    w.apply_until(&reset_of("vm-a"), stalled_with("SecretNotFound"))
        .await;
    w.password_secret("pw", PLAIN).await;
    let r: GuestPasswordReset = w.once("r", finished).await;
    assert_eq!(phase(&r), Some(Phase::Succeeded));
}

#[tokio::test]
async fn missing_key_in_secret_is_secret_key_missing() {
    let w = world().await;
    w.put(&secret("pw", "other", PLAIN)).await;
    w.apply_until(&reset_of("vm-a"), stalled_with("SecretKeyMissing"))
        .await;
}

#[tokio::test]
async fn password_from_secret_is_set_in_the_guest() {
    let (w, qga) = world_with_guest("vm-a").await;
    let before = hash_of(&qga, "root");
    w.password_secret("pw", PLAIN).await;
    let r = w.run_to_end(&reset_of("vm-a")).await;
    let st = r.status.expect("status").run;
    assert_eq!(st.phase, Some(Phase::Succeeded), "{st:#?}");
    let t = &st.targets[0];
    assert_eq!(
        (t.user.as_deref(), t.user_source),
        (Some("root"), Some(UserSource::GuestOS))
    );
    assert_eq!(t.node.as_deref(), Some("node-1"));
    let after = hash_of(&qga, "root").expect("root has a hash");
    assert_ne!(Some(after.clone()), before);
    assert!(after.starts_with('$'), "a crypt hash, got {after}");
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    );
}

#[tokio::test]
async fn crypted_hash_lands_verbatim() {
    let (w, qga) = world_with_guest("vm-a").await;
    let r = crypted_reset_of_alice(&w, "vm-a").await;
    assert_sha512_landed_for_alice(&r, &qga);
}

#[tokio::test]
async fn admin_user_annotation_picks_the_user() {
    let w = world().await;
    let desc = vm(NS, "vm-a", "node-1").annotation(ADMIN_USER_ANNOTATION, "alice");
    let qga = w.add_guest(&desc).await;
    w.password_secret("pw", SHA512).await;
    let r = w.run_to_end(&reset_of("vm-a").crypted()).await;
    let t = target0(&r).expect("a target");
    assert_eq!(
        (t.user.as_deref(), t.user_source),
        (Some("alice"), Some(UserSource::Annotation))
    );
    assert_eq!(hash_of(&qga, "alice").as_deref(), Some(SHA512));
}

#[tokio::test]
async fn crypted_hash_for_a_windows_guest_is_unsupported_for_os() {
    let w = world().await;
    let _qga = w.add_guest(&vm(NS, "win", "node-1").os("mswindows")).await;
    let r = crypted_reset_of_alice(&w, "win").await;
    assert_eq!(
        r.status.expect("status").run.targets[0].reason.as_deref(),
        Some("UnsupportedForOS")
    );
}

#[tokio::test]
async fn unknown_guest_user_fails_at_once_with_user_not_found() {
    let (w, _qga) = world_with_guest("vm-a").await;
    w.password_secret("pw", PLAIN).await;
    let r = w.run_to_end(&reset_of("vm-a").user("mallory")).await;
    let t = target0(&r).expect("a target");
    assert_eq!(
        (t.state, t.reason.as_deref(), t.attempts),
        (TargetState::Failed, Some("UserNotFound"), 1)
    );
}

#[tokio::test]
async fn generated_password_is_stored_in_an_owned_secret_and_applied() {
    let (w, qga) = world_with_guest("vm-a").await;
    let r = w
        .run_to_end(&GuestPasswordReset::test("r").vm("vm-a").generate(20))
        .await;
    let st = r.status.expect("status").run;
    let name = st.targets[0]
        .output_secret
        .clone()
        .expect("output secret named in status");
    let secrets: Api<Secret> = Api::namespaced(w.client.clone(), NS);
    let s = secrets.get(&name).await.expect("output secret exists");
    let owner = &s.metadata.owner_references.expect("owned")[0];
    assert_eq!(owner.kind, "GuestPasswordReset");
    let password = s.data.expect("data")["password"].0.clone();
    assert_eq!(password.len(), 20);
    assert!(hash_of(&qga, "root").is_some());
}

#[tokio::test]
async fn selector_targets_every_matching_running_vm_with_bounded_concurrency() {
    let w = world_on_nodes(2).await;
    let agents = w
        .guests_in_tier("db", &["node-1", "node-2", "node-1", "node-2"])
        .await;
    let _other = w
        .add_guest(&vm(NS, "web-0", "node-1").label("tier", "web"))
        .await;
    w.password_secret("pw", SHA512).await;
    w.put(
        &GuestPasswordReset::test("bulk")
            .selector("tier", "db")
            .from_secret("pw")
            .crypted()
            .max_concurrency(2),
    )
    .await;
    let r: GuestPasswordReset = w.once("bulk", finished).await;
    let st = r.status.expect("status").run;
    assert_eq!(st.phase, Some(Phase::Succeeded));
    let vms: Vec<&str> = st.targets.iter().map(|t| t.vm.as_str()).collect();
    assert_eq!(vms, ["db-0", "db-1", "db-2", "db-3"]);
    let nodes: std::collections::BTreeSet<_> =
        st.targets.iter().filter_map(|t| t.node.clone()).collect();
    assert_eq!(nodes.len(), 2);
    for a in &agents {
        assert_eq!(hash_of(a, "root").as_deref(), Some(SHA512));
    }
    assert_eq!(st.progress.as_deref(), Some("4/4"));
}

/// A crypted reset "r" selecting `tier=db` in a world with no such VM: it waits with NoTargets.
async fn reset_waiting_for_db_vms(w: &World) {
    w.password_secret("pw", SHA512).await;
    w.put(
        &GuestPasswordReset::test("r")
            .selector("tier", "db")
            .from_secret("pw")
            .crypted(),
    )
    .await;
    w.once::<GuestPasswordReset>("r", stalled_with("NoTargets"))
        .await;
}

#[tokio::test]
async fn selector_waiting_for_vms_runs_as_soon_as_a_matching_vm_appears() {
    let w = world().await;
    reset_waiting_for_db_vms(&w).await;
    let agent = w
        .add_guest(&vm(NS, "db-0", "node-1").label("tier", "db"))
        .await;
    // The NoTargets retry is a minute away: finishing within WAIT means the VMI watch
    // triggered the run.
    let r: GuestPasswordReset = w.once("r", finished).await;
    assert_eq!(phase(&r), Some(Phase::Succeeded));
    assert_eq!(hash_of(&agent, "root").as_deref(), Some(SHA512));
}

#[tokio::test]
async fn a_waiting_object_retriggered_without_news_writes_no_status() {
    let w = world().await;
    reset_waiting_for_db_vms(&w).await;
    let status_path =
        format!("/apis/guestcred.io/v1alpha1/namespaces/{NS}/guestpasswordresets/r/status");
    let vmi_lists = format!("/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachineinstances");
    let (writes, lists) = (
        w.api().requests("PATCH", &status_path),
        w.api().requests("GET", &vmi_lists),
    );
    // A matching VMI that is not running: the object is reconciled, and still has no targets.
    w.vm_without_agent(
        &vm(NS, "db-0", "node-1")
            .label("tier", "db")
            .phase("Scheduling"),
    )
    .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while w.api().requests("GET", &vmi_lists) == lists {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no reconcile after the VMI appeared"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Let that reconcile finish whatever it would write.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(w.api().requests("PATCH", &status_path), writes);
}

#[tokio::test]
async fn failure_budget_skips_the_remaining_targets() {
    let w = world().await;
    let mut agents = Vec::new();
    for i in 0..3 {
        let d = vm(NS, &format!("vm-{i}"), "node-1").label("tier", "db");
        agents.push(w.add_guest(&d).await);
    }
    w.password_secret("pw", PLAIN).await;
    let r = GuestPasswordReset::test("r")
        .selector("tier", "db")
        .from_secret("pw")
        .user("mallory")
        .max_concurrency(1)
        .max_failures(0);
    let r = w.run_to_end(&r).await;
    let st = r.status.expect("status").run;
    let states: Vec<TargetState> = st.targets.iter().map(|t| t.state).collect();
    assert_eq!(
        states,
        [
            TargetState::Failed,
            TargetState::Skipped,
            TargetState::Skipped
        ]
    );
    assert_eq!(
        st.targets[1].reason.as_deref(),
        Some("FailureBudgetExhausted")
    );
    assert_eq!(st.phase, Some(Phase::Failed));
    // No other test here exhausts a budget: these two are this run's.
    let metrics = w.metrics.encode();
    assert!(
        metrics.contains(r#"guestcred_targets_total{kind="GuestPasswordReset",result="skipped",reason="FailureBudgetExhausted"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn paused_reset_starts_nothing_until_unpaused() {
    let (w, qga) = world_with_guest("vm-a").await;
    w.password_secret("pw", SHA512).await;
    w.put(&reset_of("vm-a").crypted().paused()).await;
    let paused: GuestPasswordReset = w.once("r", condition_reason("Paused")).await;
    assert_eq!(
        paused.status.expect("status").run.targets[0].state,
        TargetState::Pending
    );
    assert_ne!(hash_of(&qga, "root").as_deref(), Some(SHA512));
    let unpause = serde_json::json!({"spec": {"paused": false}});
    w.merge_patch::<GuestPasswordReset>("r", unpause).await;
    w.once::<GuestPasswordReset>("r", finished).await;
    assert_eq!(hash_of(&qga, "root").as_deref(), Some(SHA512));
}

/// Reset `name` of VM `vm_name` whose Secret `secret_name` holds a crypt(3) hash.
fn crypted_reset(name: &str, vm_name: &str, secret_name: &str) -> GuestPasswordReset {
    GuestPasswordReset::test(name)
        .vm(vm_name)
        .from_secret(secret_name)
        .crypted()
}

/// A crypted reset of `vm` from Secret `secret` (both created), run to the end.
async fn finished_reset_from_secret(w: &World, name: &str, vm_name: &str, secret_name: &str) {
    w.password_secret(secret_name, SHA512).await;
    w.put(&crypted_reset(name, vm_name, secret_name)).await;
    w.once::<GuestPasswordReset>(name, finished).await;
}

fn secret_path(name: &str) -> String {
    format!("/api/v1/namespaces/{NS}/secrets/{name}")
}

#[tokio::test]
async fn restarted_controller_resyncs_a_finished_reset_without_reading_its_unchanged_secret() {
    let mut w = world().await;
    let _a = w.guest("vm-a").await;
    let _b = w.guest("vm-b").await;
    finished_reset_from_secret(&w, "done", "vm-a", "pw").await;
    let version = w.get::<Secret>(NS, "pw").await.metadata.resource_version;
    let done = |r: GuestPasswordReset| r.status.expect("status");
    let status = done(w.get(NS, "done").await);
    assert_eq!(status.run.input_secret_version, version);

    w.kill_controller();
    let reads_before = w.api().requests("GET", &secret_path("pw"));
    // Work for the restarted controller: once it is done, the resync has happened.
    w.password_secret("pw2", SHA512).await;
    w.put(&crypted_reset("new", "vm-b", "pw2")).await;
    w.start_controller();
    w.once::<GuestPasswordReset>("new", finished).await;

    assert_eq!(w.api().requests("GET", &secret_path("pw")), reads_before);
    let after = done(w.get(NS, "done").await);
    assert_eq!(after.run.input_hash, status.run.input_hash);
    assert_eq!(after.run.targets[0].attempts, 1);
}

#[tokio::test]
async fn secret_rotated_while_the_controller_was_down_runs_again_after_restart() {
    let (mut w, qga) = world_with_guest("vm-a").await;
    finished_reset_from_secret(&w, "r", "vm-a", "pw").await;
    let first: GuestPasswordReset = w.get(NS, "r").await;
    let first_hash = first.status.expect("status").run.input_hash;

    w.kill_controller();
    let rotated = SHA512.replace("gcTestSalt", "gcWhileDown");
    w.password_secret("pw", &rotated).await;
    w.start_controller();
    w.once("r", |r: &GuestPasswordReset| {
        finished(r) && r.status.as_ref().map(|s| &s.run.input_hash) != Some(&first_hash)
    })
    .await;
    assert_eq!(hash_of(&qga, "root"), Some(rotated));
}

#[tokio::test]
async fn rapid_secret_rotations_end_with_the_last_value_in_the_guest() {
    let (w, qga) = world_with_guest("vm-a").await;
    finished_reset_from_secret(&w, "r", "vm-a", "pw").await;
    let mut last = String::new();
    for i in 0..5 {
        last = SHA512.replace("gcTestSalt", &format!("gcRapid{i:03}"));
        w.password_secret("pw", &last).await;
    }
    w.once("r", |r: &GuestPasswordReset| {
        finished(r) && qga.shadow_hash("root").ok().flatten().as_deref() == Some(last.as_str())
    })
    .await;
}

#[tokio::test]
async fn changed_secret_runs_again_once_and_unchanged_never() {
    let (w, qga) = world_with_guest("vm-a").await;
    w.password_secret("pw", SHA512).await;
    w.put(&reset_of("vm-a").crypted()).await;
    let first: GuestPasswordReset = w.once("r", finished).await;
    let first_hash = first.status.expect("status").run.input_hash.expect("hash");
    // Touch the Secret without changing its value: no new run.
    let touch = serde_json::json!({"metadata": {"labels": {"touched": "yes"}}});
    w.merge_patch::<Secret>("pw", touch).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let api: Api<GuestPasswordReset> = Api::namespaced(w.client.clone(), NS);
    let same = api.get("r").await.expect("get").status.expect("status").run;
    assert_eq!(same.input_hash.as_deref(), Some(first_hash.as_str()));
    assert_eq!(same.targets[0].attempts, 1);
    // Change the value: one new run.
    let rotated = SHA512.replace("gcTestSalt", "gcRotated1");
    w.password_secret("pw", &rotated).await;
    let second: GuestPasswordReset = w
        .once("r", |r: &GuestPasswordReset| {
            finished(r)
                && r.status.as_ref().and_then(|s| s.run.input_hash.as_deref())
                    != Some(first_hash.as_str())
        })
        .await;
    assert_eq!(second.status.expect("status").run.targets[0].attempts, 1);
    assert_eq!(hash_of(&qga, "root"), Some(rotated));
}

#[tokio::test]
async fn vm_without_agent_retries_then_fails_with_the_deadline() {
    let w = world().await;
    // The VM exists but its agent socket does not: the shim reports it, we retry.
    w.vm_without_agent(&vm(NS, "vm-a", "node-1")).await;
    w.password_secret("pw", PLAIN).await;
    let r = w.run_to_end(&reset_of("vm-a").deadline_seconds(10)).await;
    let t = target0(&r).expect("a target");
    assert_eq!(t.reason.as_deref(), Some("DeadlineExceeded"));
    assert!(t.attempts > 1, "retried: {t:?}");
}

#[tokio::test]
async fn vm_not_running_is_reported_while_retrying() {
    let w = world().await;
    w.vm_without_agent(&vm(NS, "vm-a", "node-1").phase("Scheduling"))
        .await;
    w.password_secret("pw", PLAIN).await;
    w.apply_until(&reset_of("vm-a"), retrying_with("VMNotRunning"))
        .await;
}

#[tokio::test]
async fn dead_shim_is_reported_as_shim_unavailable() {
    let (w, _a) = world_with_guest("vm-a").await;
    w.kill_shim("node-1");
    w.password_secret("pw", PLAIN).await;
    w.apply_until(&reset_of("vm-a"), target_reason("ShimUnavailable"))
        .await;
}

#[tokio::test]
async fn kubevirt_access_credentials_for_the_same_user_are_flagged_as_a_conflict() {
    let w = world().await;
    let desc = vm(NS, "vm-a", "node-1").access_credentials_for("root");
    let _qga = w.add_guest(&desc).await;
    w.password_secret("pw", SHA512).await;
    let r = w.run_to_end(&reset_of("vm-a").crypted()).await;
    let t = target0(&r).expect("a target");
    assert_eq!(t.state, TargetState::Succeeded);
    let msg = t.message.clone().unwrap_or_default();
    assert!(msg.contains("ConflictWithAccessCredentials"), "{msg}");
    let conflicts = w.events_with_reason("ConflictWithAccessCredentials").await;
    assert!(
        conflicts.iter().any(|e| e.starts_with("Warning: ")),
        "a Warning event names the conflict: {conflicts:?}"
    );
}

/// A reset that names its user needs nothing from the VirtualMachine: the user is the
/// spec's and KubeVirt propagates accessCredentials from the running VMI's spec (read fresh
/// anyway), so no GET of the VM is made (one per target saved at fleet scale, bench P6).
#[tokio::test]
async fn a_reset_naming_its_user_reads_no_virtual_machine() {
    let (w, qga) = world_with_guest("vm-a").await;
    let r = crypted_reset_of_alice(&w, "vm-a").await;
    assert_sha512_landed_for_alice(&r, &qga);
    let vm_path = format!("/apis/kubevirt.io/v1/namespaces/{NS}/virtualmachines/vm-a");
    assert_eq!(w.api().requests("GET", &vm_path), 0, "GETs of {vm_path}");
}

/// The conflict is still flagged when the user is named: from the running VMI's spec.
#[tokio::test]
async fn kubevirt_access_credentials_of_the_running_vmi_are_flagged_for_a_named_user() {
    let w = world().await;
    let desc = vm(NS, "vm-a", "node-1").access_credentials_for("alice");
    let _qga = w.add_guest(&desc).await;
    let r = crypted_reset_of_alice(&w, "vm-a").await;
    let t = target0(&r).expect("a target");
    assert_eq!(t.state, TargetState::Succeeded);
    let msg = t.message.clone().unwrap_or_default();
    assert!(msg.contains("ConflictWithAccessCredentials"), "{msg}");
}

/// Namespaced mode (`--watch-namespaces team-a`, the chart's `watchNamespaces`): a reset in
/// team-a is reconciled and applied; one in team-b is never seen (no status at all), and
/// no request went to a cluster-wide collection of the kinds the controller watches, nor
/// any list, watch or write to team-b. On a real API server with the chart's namespaced
/// Roles: tests/real_control_plane_namespaced.rs.
#[tokio::test]
async fn namespaced_mode_reconciles_only_the_watched_namespaces() {
    let w = World::start(WorldOptions {
        namespaces: vec!["team-a".into(), "team-b".into()],
        watch_namespaces: vec!["team-a".into()],
        ..WorldOptions::default()
    })
    .await
    .expect("world");
    let qga = w
        .add_vm(&vm("team-a", "vm-a", "node-1"), Some(alice()))
        .await
        .expect("vm")
        .expect("agent");
    let _other = w
        .add_vm(&vm("team-b", "vm-b", "node-1"), Some(alice()))
        .await
        .expect("vm");
    for ns in ["team-a", "team-b"] {
        let mut s = secret("pw", "password", PLAIN);
        s.metadata.namespace = Some(ns.into());
        w.apply(&s).await.expect("secret");
    }
    for (ns, vm_name) in [("team-b", "vm-b"), ("team-a", "vm-a")] {
        w.apply(&reset_of(vm_name).in_namespace(ns))
            .await
            .unwrap_or_else(|e| panic!("reset in {ns}: {e}"));
    }
    let r: GuestPasswordReset = w
        .wait_for("team-a", "r", WAIT, finished)
        .await
        .expect("team-a's reset finishes");
    assert_eq!(r.status.expect("status").run.phase, Some(Phase::Succeeded));
    assert!(qga.shadow_hash("root").expect("shadow").is_some());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let outside: GuestPasswordReset = w.get("team-b", "r").await;
    assert!(
        outside.status.is_none(),
        "the reset outside the watched namespaces was reconciled: {:?}",
        outside.status
    );
    let requests = w.api().all_requests();
    let cluster_wide = [
        "GET /api/v1/secrets",
        "GET /apis/guestcred.io/v1alpha1/guestpasswordresets",
        "GET /apis/guestcred.io/v1alpha1/keypairrebuilds",
        "GET /apis/kubevirt.io/v1/virtualmachineinstances",
    ];
    for path in cluster_wide {
        assert!(!requests.contains_key(path), "{path}: {requests:#?}");
    }
    for path in [
        "GET /api/v1/namespaces/team-a/secrets",
        "GET /apis/guestcred.io/v1alpha1/namespaces/team-a/guestpasswordresets",
        "GET /apis/guestcred.io/v1alpha1/namespaces/team-a/keypairrebuilds",
        "GET /apis/kubevirt.io/v1/namespaces/team-a/virtualmachineinstances",
    ] {
        assert!(
            requests.contains_key(path),
            "no watch {path}: {requests:#?}"
        );
    }
    // In team-b, only what this test (apply, get) and the world (the VM) asked for: the
    // controller listed, watched, read and wrote nothing there.
    let in_team_b: Vec<&str> = requests
        .keys()
        .filter(|k| k.contains("/namespaces/team-b/"))
        .map(String::as_str)
        .collect();
    assert_eq!(
        in_team_b,
        [
            "GET /apis/guestcred.io/v1alpha1/namespaces/team-b/guestpasswordresets/r",
            "PATCH /api/v1/namespaces/team-b/secrets/pw",
            "PATCH /apis/guestcred.io/v1alpha1/namespaces/team-b/guestpasswordresets/r",
            "PATCH /apis/kubevirt.io/v1/namespaces/team-b/virtualmachineinstances/vm-b/status",
            "POST /apis/kubevirt.io/v1/namespaces/team-b/virtualmachineinstances",
            "POST /apis/kubevirt.io/v1/namespaces/team-b/virtualmachines",
        ]
    );
}

/// The collection paths (LIST and WATCH) of `plural` the emulator was asked for.
fn collection_requests(w: &World, plural: &str) -> Vec<String> {
    let suffix = format!("/{plural}");
    w.api()
        .all_requests()
        .into_keys()
        .filter(|k| k.starts_with("GET ") && k.ends_with(&suffix))
        .map(|k| k.trim_start_matches("GET ").to_string())
        .collect()
}

#[tokio::test]
async fn the_controller_watches_secrets_and_vmis_as_metadata_only() {
    let w = world().await;
    // A Secret that is not guestcred's: its data must not reach the controller.
    w.password_secret("someone-elses", PLAIN).await;
    let _a = w.guest("vm-a").await;
    // Both watches listed and are watching (no object selects anything: nothing else
    // in the world lists Secrets or VMIs).
    let deadline = tokio::time::Instant::now() + WAIT;
    let calls = |plural: &str| -> u64 {
        collection_requests(&w, plural)
            .iter()
            .map(|p| w.api().requests("GET", p))
            .sum()
    };
    while calls("secrets") < 2 || calls("virtualmachineinstances") < 2 {
        assert!(tokio::time::Instant::now() < deadline, "no watches started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for plural in ["secrets", "virtualmachineinstances"] {
        for path in collection_requests(&w, plural) {
            assert_eq!(
                w.api().metadata_requests("GET", &path),
                w.api().requests("GET", &path),
                "GET {path}: every list and watch asks for metadata only"
            );
        }
    }
}
