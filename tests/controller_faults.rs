//! Faults during work: a hung agent, a controller killed mid-call, and secret hygiene
//! across everything the operator writes and logs.
use guestcred::api::{GuestPasswordReset, Phase};
use guestcred_lab::kubevirt::vm;
use guestcred_lab::testing::*;
use guestcred_lab::world::{World, WorldOptions};
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::ListParams;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(60);

/// A reset of alice's password on `vm` (the source is up to the test).
fn reset(name: &str, vm: &str) -> GuestPasswordReset {
    GuestPasswordReset::test(name).vm(vm).user("alice")
}

/// The default world, with shims that give up on an agent after 2 s.
async fn world_with_short_agent_timeout() -> World {
    let opts = WorldOptions {
        agent_timeout: Duration::from_secs(2),
        ..WorldOptions::default()
    };
    World::start(opts).await.expect("world")
}

#[tokio::test]
async fn a_restart_between_storing_and_applying_applies_the_stored_password() {
    let mut w = world_with_short_agent_timeout().await;
    let qga = w.add_guest(&vm(NS, "vm-a", "node-1")).await;
    signal(&qga, "-STOP");
    w.put(&reset("gen", "vm-a").generate(24)).await;
    // Stored, then the call hangs in the frozen agent and times out: unknown outcome.
    w.wait_for::<GuestPasswordReset>(NS, "gen", WAIT, target_reason("AgentTimeout"))
        .await
        .expect("AgentTimeout while the agent is frozen");
    let stored = w.output_password(NS, "gen", "vm-a").await;
    w.kill_controller();
    signal(&qga, "-CONT");
    w.start_controller();
    let r: GuestPasswordReset = w
        .wait_for(NS, "gen", WAIT, finished)
        .await
        .expect("finishes after restart");
    assert_eq!(r.status.expect("status").run.phase, Some(Phase::Succeeded));
    assert_eq!(
        w.output_password(NS, "gen", "vm-a").await,
        stored,
        "never a second password"
    );
    let hash = hash_of(&qga, "alice").expect("hash");
    assert!(
        verifies(&stored, &hash),
        "the guest's hash verifies the stored password"
    );
}

#[tokio::test]
async fn a_hung_agent_times_out_while_other_vms_proceed() {
    let w = world_with_short_agent_timeout().await;
    let hung = w.add_guest(&vm(NS, "vm-hung", "node-1")).await;
    let ok = w.add_guest(&vm(NS, "vm-ok", "node-1")).await;
    signal(&hung, "-STOP");
    w.password_secret("pw", "Hung-Agent-Test-Pw-1").await;
    let hung_reset = reset("hung", "vm-hung")
        .from_secret("pw")
        .deadline_seconds(10);
    w.put(&hung_reset).await;
    w.put(&reset("ok", "vm-ok").from_secret("pw")).await;
    let okr: GuestPasswordReset = w
        .wait_for(NS, "ok", WAIT, finished)
        .await
        .expect("the healthy VM finishes");
    assert_eq!(
        okr.status.expect("status").run.phase,
        Some(Phase::Succeeded)
    );
    let hr: GuestPasswordReset = w
        .wait_for(NS, "hung", WAIT, finished)
        .await
        .expect("the hung VM ends");
    let t = &hr.status.expect("status").run.targets[0];
    assert_eq!(t.reason.as_deref(), Some("DeadlineExceeded"));
    assert!(
        t.message
            .as_deref()
            .unwrap_or_default()
            .contains("AgentTimeout"),
        "{t:?}"
    );
    signal(&hung, "-CONT");
    assert!(hash_of(&ok, "alice").is_some());
}

#[tokio::test]
async fn no_secret_appears_in_logs_events_or_status() {
    let w = World::start(WorldOptions {
        capture_logs: true,
        ..WorldOptions::default()
    })
    .await
    .expect("world");
    let _a = w.add_guest(&vm(NS, "vm-a", "node-1")).await;
    const PLAIN: &str = "Leak-Canary-Plain-7f3a9";
    const BAD: &str = "Leak-Canary-Bad\nsecond-line";
    w.password_secret("good", PLAIN).await;
    w.password_secret("bad", BAD).await;
    w.put(&reset("good", "vm-a").from_secret("good")).await;
    w.put(&reset("bad", "vm-a").from_secret("bad")).await;
    w.put(&reset("gen", "vm-a").generate(24)).await;
    let unknown_user = reset("nouser", "vm-a").from_secret("good").user("mallory");
    w.put(&unknown_user).await;
    for name in ["good", "gen", "nouser"] {
        w.wait_for::<GuestPasswordReset>(NS, name, WAIT, finished)
            .await
            .expect("finishes");
    }
    w.wait_for::<GuestPasswordReset>(NS, "bad", WAIT, condition_reason("InvalidPassword"))
        .await
        .expect("bad password refused");
    let generated_pw = w.output_password(NS, "gen", "vm-a").await;

    let haystack = w.everything_visible().await;
    let events: Api<Event> = Api::all(w.client.clone());
    let n_events = events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .len();
    assert!(n_events >= 3, "events were published ({n_events})");
    assert!(
        haystack.contains("UserNotFound"),
        "the scan sees what the operator wrote"
    );
    assert_not_leaked(
        &haystack,
        "logs, Events or status",
        &[
            PLAIN,
            "Leak-Canary-Bad",
            "second-line",
            generated_pw.as_str(),
        ],
    );
}
