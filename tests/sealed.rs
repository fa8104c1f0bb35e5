//! Sealed generated passwords (`spec.password.generate.sealTo.age`), on a real guest (host
//! qemu-ga): the output Secret holds only an age ciphertext that decrypts, with the matching
//! identity, to exactly the password the guest's /etc/shadow verifies; the plaintext is in
//! no log (every level), Event, status or metric. And the crash path: a controller killed
//! after sealing, while the call hangs in a frozen agent, cannot read its ciphertext back,
//! so after the restart it seals a new value into a new Secret and applies that; the first
//! Secret stays untouched until the newer value is verified in the guest, and only then is
//! it pruned.
use guestcred::api::{GuestPasswordReset, Phase, TargetState};
use guestcred_lab::kubevirt::vm;
use guestcred_lab::testing::*;
use guestcred_lab::world::{OutputSecret, World, WorldOptions};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(90);

/// A world whose shims give up on an agent after 2 s, with logs captured for the scan at
/// every level (trace included: this binary's first capture).
async fn world() -> World {
    let _ = LogCapture::every_level();
    World::start(WorldOptions::fault_lab())
        .await
        .expect("test world starts")
}

/// alice's generated password (no target yet), sealed to `id`'s recipient.
fn sealed_reset(name: &str, id: &age::x25519::Identity) -> GuestPasswordReset {
    GuestPasswordReset::test(name)
        .user("alice")
        .generate(24)
        .sealed_to(&id.to_public().to_string())
}

/// How many sealed plaintexts the controller holds in memory, from its metrics.
fn held_in_memory(w: &World) -> i64 {
    w.metrics
        .encode()
        .lines()
        .find_map(|l| l.strip_prefix("guestcred_sealed_values_held "))
        .and_then(|v| v.trim().parse().ok())
        .expect("guestcred_sealed_values_held in the controller's metrics")
}

/// The plaintext of an armored ciphertext, decrypted with `id`.
fn unseal(id: &age::x25519::Identity, armored: &str) -> String {
    let plain = age::decrypt(id, armored.as_bytes()).expect("decrypts with the identity");
    String::from_utf8(plain).expect("utf-8")
}

/// Reset `name` once its run ended (`when` says when that is expected), checked to have
/// succeeded.
async fn succeeded(w: &World, name: &str, when: &str) -> GuestPasswordReset {
    let r: GuestPasswordReset = w
        .wait_for(NS, name, WAIT, finished)
        .await
        .unwrap_or_else(|e| panic!("{name} {when}: {e:#}"));
    assert_eq!(phase(&r), Some(Phase::Succeeded), "{:?}", r.status);
    r
}

/// The plaintext sealed in `secret`, checked to be alice's password in the guest of
/// `qga` (`what` says which value that is).
fn unseal_as_alice_s(
    id: &age::x25519::Identity,
    secret: &OutputSecret,
    qga: &guestcred_lab::hostqga::HostQga,
    what: &str,
) -> String {
    let password = unseal(id, secret.sealed.as_deref().expect("ciphertext"));
    let hash = hash_of(qga, "alice").expect("alice has a password");
    assert!(verifies(&password, &hash), "the guest holds {what}");
    password
}

/// The one output Secret of reset `reset` once its target is retrying with `reason` (the
/// value was sealed and stored before the call that could not get through).
async fn sealed_before_the_call(w: &World, reset: &str, reason: &'static str) -> OutputSecret {
    w.wait_for::<GuestPasswordReset>(NS, reset, WAIT, target_reason(reason))
        .await
        .unwrap_or_else(|e| panic!("{reason} before the crash: {e:#}"));
    let first = sealed_secrets(w, reset).await;
    assert_eq!(first.len(), 1, "one sealed Secret before the crash");
    first.into_iter().next().expect("one")
}

/// The output Secrets of reset `reset` once there are `n` (waiting up to 60 s), as
/// [`sealed_secrets`] gives them; what there is then, if never `n`.
async fn sealed_secrets_once(w: &World, reset: &str, n: usize) -> Vec<OutputSecret> {
    let mut all = sealed_secrets(w, reset).await;
    for _ in 0..600 {
        if all.len() == n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        all = sealed_secrets(w, reset).await;
    }
    all
}

/// The output Secrets of reset `reset`, each checked to hold a ciphertext only, in the
/// order they were written (by resourceVersion; none is ever rewritten).
async fn sealed_secrets(w: &World, reset: &str) -> Vec<OutputSecret> {
    let mut all = w
        .output_secrets(NS, &format!("guestcred.io/reset={reset}"))
        .await;
    for s in &all {
        assert!(
            s.sealed.is_some() && s.password.is_empty(),
            "Secret {} holds a ciphertext only: {}",
            s.name,
            s.stored
        );
    }
    all.sort_by_key(|s| s.resource_version.parse::<u64>().unwrap_or(u64::MAX));
    all
}

#[tokio::test]
async fn a_sealed_password_decrypts_to_what_the_guest_holds_and_is_nowhere_in_the_clear() {
    let w = world().await;
    let qga = w.guest("vm-a").await;
    let id = age::x25519::Identity::generate();
    w.put(&sealed_reset("sealed", &id).vm("vm-a")).await;
    let r = succeeded(&w, "sealed", "the run ends").await;
    assert_eq!(held_in_memory(&w), 0, "erased once the target finished");
    let name = target0(&r)
        .and_then(|t| t.output_secret.clone())
        .expect("status names the output Secret");
    let stored = sealed_secrets(&w, "sealed").await;
    assert_eq!(stored.len(), 1, "one Secret");
    let secret = &stored[0];
    assert_eq!(secret.name, name);
    let armored = secret.sealed.as_deref().expect("ciphertext");
    assert!(armored.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"));
    let password = unseal(&id, armored);
    assert_eq!(password.len(), 24);
    let hash = hash_of(&qga, "alice").expect("alice has a password");
    assert!(
        verifies(&password, &hash),
        "the guest's shadow hash verifies exactly the decrypted password"
    );
    assert!(
        age::decrypt(&age::x25519::Identity::generate(), armored.as_bytes()).is_err(),
        "another identity does not decrypt it"
    );
    assert_not_leaked(&secret.stored, "the sealed Secret", &[&password]);
    assert!(
        LogCapture::get().logs().contains(" TRACE "),
        "the scan covers trace-level logs"
    );
    w.assert_not_leaked(&[&password]).await;
}

#[tokio::test]
async fn a_restart_after_sealing_keeps_the_first_ciphertext_applies_a_new_one_and_prunes_only_then()
{
    let mut w = world().await;
    let qga = w.add_guest(&vm(NS, "vm-a", "node-1")).await;
    let id = age::x25519::Identity::generate();
    // keepPrevious 0: once a newer value is verified, every earlier Secret may go.
    let reset = sealed_reset("crash", &id)
        .vm("vm-a")
        .rotate_every("720h", 0);
    signal(&qga, "-STOP");
    w.put(&reset).await;
    // Sealed and stored, then the call hangs in the frozen agent: unknown outcome, the
    // value may reach the guest when it thaws.
    let first = sealed_before_the_call(&w, "crash", "AgentTimeout").await;

    w.kill_controller();
    w.start_controller();
    // The new process cannot read the first value back: a second Secret, a new value.
    let both = sealed_secrets_once(&w, "crash", 2).await;
    assert_eq!(both.len(), 2, "a new Secret after the restart");
    let kept = both
        .iter()
        .find(|s| s.name == first.name)
        .expect("the first Secret is kept while the new value is not verified");
    assert_eq!(
        (&kept.resource_version, &kept.sealed),
        (&first.resource_version, &first.sealed),
        "the first ciphertext is never overwritten"
    );
    let second = both
        .iter()
        .find(|s| s.name != first.name)
        .expect("new")
        .clone();
    let (a, b) = (
        unseal(&id, first.sealed.as_deref().expect("a")),
        unseal(&id, second.sealed.as_deref().expect("b")),
    );
    assert_ne!(a, b, "a new value, not a guess at the old one");

    signal(&qga, "-CONT");
    let r = succeeded(&w, "crash", "finishes once the agent thaws").await;
    assert_eq!(
        target0(&r).and_then(|t| t.output_secret.clone()),
        Some(second.name.clone()),
        "status names the newer Secret"
    );
    assert_eq!(unseal_as_alice_s(&id, &second, &qga, "the newer value"), b);
    // Verified in the guest: now (after the run's status is written) the first may go.
    let left = sealed_secrets_once(&w, "crash", 1).await;
    let names: Vec<&str> = left.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [second.name.as_str()],
        "the first is pruned after the newer value was verified"
    );
    w.assert_not_leaked(&[&a, &b]).await;
}

#[tokio::test]
async fn retries_in_the_same_process_resend_the_same_sealed_value() {
    let w = world().await;
    let qga = w.add_guest(&vm(NS, "vm-a", "node-1")).await;
    let id = age::x25519::Identity::generate();
    signal(&qga, "-STOP");
    w.put(&sealed_reset("retry", &id).vm("vm-a")).await;
    // Three calls sent and timed out in the frozen agent.
    w.wait_for::<GuestPasswordReset>(NS, "retry", WAIT, |r: &GuestPasswordReset| {
        target0(r).is_some_and(|t| t.attempts >= 3)
    })
    .await
    .expect("three attempts while the agent is frozen");
    assert_eq!(held_in_memory(&w), 1, "held for the retries");
    signal(&qga, "-CONT");
    succeeded(&w, "retry", "finishes once the agent thaws").await;
    assert_eq!(held_in_memory(&w), 0, "erased once the target finished");
    let stored = sealed_secrets(&w, "retry").await;
    assert_eq!(stored.len(), 1, "every retry re-sent the one sealed value");
    let password = unseal_as_alice_s(&id, &stored[0], &qga, "it");
    w.assert_not_leaked(&[&password]).await;
}

#[tokio::test]
async fn a_restart_before_any_call_got_through_applies_a_new_sealed_value_from_a_new_secret() {
    let mut w = world().await;
    let qga = w.add_guest(&vm(NS, "vm-a", "node-1")).await;
    let id = age::x25519::Identity::generate();
    // The node's shim is down: the value is sealed and stored, its calls go nowhere.
    w.kill_shim("node-1");
    w.put(
        &sealed_reset("early", &id)
            .vm("vm-a")
            .rotate_every("720h", 0),
    )
    .await;
    let first = sealed_before_the_call(&w, "early", "ShimUnavailable").await;

    w.kill_controller();
    w.restart_shim("node-1").await;
    w.start_controller();
    let r = succeeded(&w, "early", "finishes after the restart").await;
    let now = target0(&r)
        .and_then(|t| t.output_secret.clone())
        .expect("output Secret");
    assert_ne!(
        now, first.name,
        "a new Secret, not the unreadable first one"
    );
    let stored = sealed_secrets(&w, "early").await;
    let current = stored
        .iter()
        .find(|s| s.name == now)
        .expect("the applied value is stored");
    let b = unseal_as_alice_s(&id, current, &qga, "the new value");
    let a = unseal(&id, first.sealed.as_deref().expect("ciphertext"));
    let left = sealed_secrets_once(&w, "early", 1).await;
    let names: Vec<&str> = left.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [now.as_str()],
        "the first is pruned once the new one is verified"
    );
    w.assert_not_leaked(&[&a, &b]).await;
}

#[tokio::test]
async fn a_finished_targets_value_is_erased_while_another_target_still_retries() {
    let w = world().await;
    let guests = w.guests_in_tier("seal", &["node-1", "node-1"]).await;
    let id = age::x25519::Identity::generate();
    signal(&guests[1], "-STOP");
    w.put(&sealed_reset("bulk", &id).selector("tier", "seal"))
        .await;
    // seal-0 is done; seal-1 retries in its frozen agent.
    w.wait_for::<GuestPasswordReset>(NS, "bulk", WAIT, |r: &GuestPasswordReset| {
        let targets = r
            .status
            .as_ref()
            .map(|s| s.run.targets.clone())
            .unwrap_or_default();
        let done = vms_in_state(r, TargetState::Succeeded) == ["seal-0"];
        done && targets.iter().any(|t| t.vm == "seal-1" && t.attempts >= 2)
    })
    .await
    .expect("seal-0 succeeded while seal-1 retries");
    assert_eq!(
        held_in_memory(&w),
        1,
        "only the value of the target still retrying is held"
    );
    signal(&guests[1], "-CONT");
    succeeded(&w, "bulk", "the run ends").await;
    assert_eq!(
        held_in_memory(&w),
        0,
        "nothing held once every target finished"
    );
    let stored = sealed_secrets(&w, "bulk").await;
    assert_eq!(stored.len(), 2, "one Secret per VM");
    let mut plain = Vec::new();
    for (i, qga) in guests.iter().enumerate() {
        let vm = format!("seal-{i}");
        let s = stored.iter().find(|s| s.vm == vm).expect("a Secret per VM");
        let password = unseal_as_alice_s(&id, s, qga, &format!("{vm}'s own value"));
        plain.push(password);
    }
    let plain: Vec<&str> = plain.iter().map(String::as_str).collect();
    w.assert_not_leaked(&plain).await;
}
