//! Scheduled rotation of generated passwords (`spec.rotation`), on a real guest (host
//! qemu-ga): each interval sets a new password that is stored first and is the one in the
//! guest; earlier Secrets are pruned to `keepPrevious`; intervals missed while the
//! controller was down come to one run; `guestcred.io/rotate-now` rotates at once.
use guestcred::api::GuestPasswordReset;
use guestcred_lab::testing::*;
use guestcred_lab::world::World;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// Every generated Secret of reset `reset`: name → password.
async fn stored(w: &World, reset: &str) -> BTreeMap<String, String> {
    w.output_secrets(NS, &format!("guestcred.io/reset={reset}"))
        .await
        .into_iter()
        .map(|s| (s.name, s.password))
        .collect()
}

const WAIT: Duration = Duration::from_secs(90);

fn rotating(name: &str) -> GuestPasswordReset {
    GuestPasswordReset::test(name)
        .vm("vm-a")
        .generate(20)
        .rotate_every("10s", 1)
}

/// The reset's `lastRotation`, once its run for that interval has succeeded.
fn rotated_since(after: Option<String>) -> impl Fn(&GuestPasswordReset) -> bool {
    move |r| {
        let Some(s) = r.status.as_ref().map(|s| &s.run) else {
            return false;
        };
        let last = s.last_rotation.as_ref().map(|t| t.0.to_string());
        last.is_some() && last != after && phase(r) == Some(guestcred::api::Phase::Succeeded)
    }
}

fn last_rotation(r: &GuestPasswordReset) -> Option<String> {
    r.status
        .as_ref()
        .and_then(|s| s.run.last_rotation.as_ref())
        .map(|t| t.0.to_string())
}

/// Three intervals: three different passwords, each stored and then the one in the guest;
/// with `keepPrevious: 1` the current Secret and one earlier one are left.
#[tokio::test]
async fn every_interval_sets_a_new_stored_password_and_old_secrets_are_pruned() {
    let (w, qga) = world_with_guest("vm-a").await;
    w.apply(&rotating("rot")).await.expect("apply");
    let mut seen = BTreeSet::new();
    let mut last = None;
    for round in 0..3 {
        let r: GuestPasswordReset = w
            .wait_for(NS, "rot", WAIT, rotated_since(last.clone()))
            .await
            .unwrap_or_else(|e| panic!("rotation {round}: {e}"));
        last = last_rotation(&r);
        let next = r.status.as_ref().and_then(|s| s.run.next_rotation.clone());
        assert!(next.is_some(), "status.nextRotation is set");
        let secret = target0(&r)
            .and_then(|t| t.output_secret.clone())
            .expect("output secret");
        let now = stored(&w, "rot")
            .await
            .remove(&secret)
            .unwrap_or_else(|| panic!("rotation {round}: Secret {secret} is stored"));
        assert!(
            qga.password_matches("root", &now).expect("crypt"),
            "rotation {round}: the guest holds the stored password"
        );
        assert!(
            seen.insert(now),
            "rotation {round} set a password used before"
        );
    }
    // Pruning runs after the run's status is written: give it a moment.
    let secrets = || async { stored(&w, "rot").await.len() };
    for _ in 0..50 {
        if secrets().await <= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        secrets().await,
        2,
        "the current Secret and one earlier are kept"
    );
}

/// A controller down across two intervals runs once when it is back (the present interval),
/// not once per missed interval.
#[tokio::test]
async fn intervals_missed_while_the_controller_was_down_run_once() {
    let (mut w, _qga) = world_with_guest("vm-a").await;
    w.apply(&rotating("missed")).await.expect("apply");
    let r: GuestPasswordReset = w
        .wait_for(NS, "missed", WAIT, rotated_since(None))
        .await
        .expect("first interval");
    let before = last_rotation(&r);
    w.kill_controller();
    tokio::time::sleep(Duration::from_secs(25)).await;
    let calls = w.agent_calls("set-password");
    w.start_controller();
    let _: GuestPasswordReset = w
        .wait_for(NS, "missed", WAIT, rotated_since(before))
        .await
        .expect("a rotation after the restart");
    // Well inside the next interval: no second catch-up run.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        w.agent_calls("set-password") - calls,
        1,
        "two missed intervals came to one run"
    );
}

/// A new value of the annotation `guestcred.io/rotate-now` rotates at once.
#[tokio::test]
async fn the_rotate_now_annotation_rotates_at_once() {
    let (w, qga) = world_with_guest("vm-a").await;
    let mut r = GuestPasswordReset::test("now").vm("vm-a").generate(20);
    w.apply(&r).await.expect("apply");
    let done: GuestPasswordReset = w
        .wait_for(NS, "now", WAIT, finished)
        .await
        .expect("first run");
    let first = target0(&done)
        .and_then(|t| t.output_secret.clone())
        .expect("secret");
    r.metadata.annotations =
        Some([("guestcred.io/rotate-now".to_string(), "1".to_string())].into());
    w.apply(&r).await.expect("annotate");
    let rotated: GuestPasswordReset = w
        .wait_for(NS, "now", WAIT, |r: &GuestPasswordReset| {
            finished(r) && target0(r).and_then(|t| t.output_secret.clone()) != Some(first.clone())
        })
        .await
        .expect("rotated");
    let secret = target0(&rotated)
        .and_then(|t| t.output_secret.clone())
        .expect("secret");
    let all = stored(&w, "now").await;
    assert_eq!(
        all.len(),
        2,
        "the earlier Secret is kept (no rotation policy prunes it)"
    );
    assert!(
        qga.password_matches("root", &all[&secret]).expect("crypt"),
        "the guest holds the new password"
    );
}
