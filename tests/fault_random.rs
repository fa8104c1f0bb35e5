//! A seeded, randomized fault run over both kinds (issue 17's proof). Each seed drives, at
//! once: a generated-password bulk (root), a crypted-password bulk from a Secret that is
//! rotated mid-run (alice), a generated-password bulk sealed to an age key (bob), a TTL key
//! grant (Append) and a permanent key (Replace), over six
//! VMs with real qemu-ga agents on two nodes, while it kills and restarts the controller and
//! shims, moves the leader Lease, injects status conflicts, freezes agents, pauses and
//! resumes an object. The controller is two leader-elected replicas on one Lease: killing
//! the controller crashes the leader and restarts it under its name (it still holds the
//! Lease, so it leads again at once); moving the Lease crashes the leader and waits until
//! the other replica has taken the Lease over (after it expired) before a replacement
//! joins. Then it checks, on the guests themselves:
//! - every generated password in its Secret is the one the guest holds, and every sealed
//!   one decrypts (with the test's identity) to the one the guest holds;
//! - no VM was given the superseded crypted value after the newer one (a sampler watches
//!   each guest's shadow file throughout);
//! - a VM whose agent came up only after the rotation never holds the superseded value:
//!   `vm-late` has no agent until a second after the Secret changed, so every run is still
//!   retrying it then; a retry that went on with the old value would set it (a fast
//!   sampler watches that guest);
//! - the key a person added by hand is still there;
//! - no key of the expired grant remains, and the permanent one does;
//! - no password appears in logs, Events, status or metrics (plaintext or base64).
//!
//! The seeds: `GUESTCRED_FAULT_SEEDS` (comma-separated), default 1-5 in `make test`;
//! `make soak` runs many more. Each seed prints itself first, so a failure can be replayed
//! with `GUESTCRED_FAULT_SEEDS=<seed> cargo test -p guestcred --test fault_random`.
use guestcred::api::keypair::{KeyMode, KeyStrategy};
use guestcred::api::{GuestPasswordReset, KeypairRebuild, Phase};
use guestcred_lab::hostqga::HostQga;
use guestcred_lab::kubevirt::vm;
use guestcred_lab::replicas::InProcessReplicas;
use guestcred_lab::testing::*;
use guestcred_lab::world::{World, WorldOptions};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const VMS: usize = 6;
const TTL: u32 = 12;
/// The TTL grant's and the permanent key (the shared test keys).
const GRANT: &str = KEY1;
const PERM: &str = KEY2;
/// Two real sha512crypt hashes: the first, then the rotated one.
const OLD: &str = SHA512;
const NEW: &str = SHA512_OTHER;

fn seeds() -> Vec<u64> {
    std::env::var("GUESTCRED_FAULT_SEEDS")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .filter(|v: &Vec<u64>| !v.is_empty())
        .unwrap_or_else(|| (1..=5).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seeded_fault_runs_keep_every_credential_exact() {
    for seed in seeds() {
        println!("fault_random: seed {seed}");
        run_seed(seed).await;
    }
}

fn vm_name(i: usize) -> String {
    format!("vm-{i}")
}

fn node_of(i: usize) -> &'static str {
    if i.is_multiple_of(2) {
        "node-1"
    } else {
        "node-2"
    }
}

/// Every value each VM's alice had, in order, as seen by a sampler.
type History = Arc<Mutex<BTreeMap<String, Vec<String>>>>;

/// The VM whose agent starts only after the rotation (on node-1, with the others).
const LATE: &str = "vm-late";

/// Samples `late`'s alice every 10 ms until `stop`, into the returned history.
fn sample_late(late: Arc<Mutex<Option<HostQga>>>, stop: Arc<AtomicBool>) -> History {
    let history: History = Arc::default();
    let h = history.clone();
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            let guard = late.lock().unwrap_or_else(|e| e.into_inner());
            // The guest's files go with the world: a read after it ended is no sample.
            if let Some(now) = guard.as_ref().and_then(|q| q.shadow_hash("alice").ok()) {
                let now = now.unwrap_or_default();
                let mut h = h.lock().expect("history");
                let seen = h.entry(LATE.to_string()).or_default();
                if seen.last() != Some(&now) {
                    seen.push(now);
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    history
}

fn sample_alice(agents: &BTreeMap<String, HostQga>, history: &History) {
    let mut h = history.lock().expect("history");
    for (name, qga) in agents {
        let now = qga.shadow_hash("alice").ok().flatten().unwrap_or_default();
        let seen = h.entry(name.clone()).or_default();
        if seen.last() != Some(&now) {
            seen.push(now);
        }
    }
}

/// `obj` for `user` on every VM of the fleet (`fleet=all`), as each object of a seed runs:
/// it may fail on every VM (the faults decide) and has 120 s.
fn over_the_fleet<K: TargetedTest>(obj: K, user: &str) -> K {
    obj.selector("fleet", "all")
        .user(user)
        .max_failures(VMS as u32)
        .deadline_seconds(120)
}

fn gen_reset(max_concurrency: u32, paused: bool) -> GuestPasswordReset {
    let r = over_the_fleet(GuestPasswordReset::test("gen"), "root")
        .generate(24)
        .max_concurrency(max_concurrency);
    if paused { r.paused() } else { r }
}

/// The guest users: alice (crypted Secret, keys), root (generated), bob (sealed).
fn guest_users() -> guestcred_lab::hostqga::HostQgaOptions {
    alice().user("bob")
}

/// On a failed seed, keeps what the controller, shims and lab logged: written to a file in
/// the temp directory, its last lines printed with the failure (CI shows only the output).
struct KeepLogsOnFailure(u64);

impl Drop for KeepLogsOnFailure {
    #[allow(clippy::disallowed_methods)] // a failing test may block to keep its evidence
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let logs = LogCapture::get().logs();
        let path = std::env::temp_dir().join(format!("fault_random-seed-{}.log", self.0));
        let _ = std::fs::write(&path, &logs);
        let lines: Vec<&str> = logs.lines().collect();
        eprintln!(
            "fault_random: seed {} failed; its logs are in {} (last 200 lines follow)",
            self.0,
            path.display()
        );
        for line in &lines[lines.len().saturating_sub(200)..] {
            eprintln!("{line}");
        }
    }
}

/// Crashes the replica that leads now (waiting up to 30 s for one); returns its identity.
async fn kill_the_leader(replicas: &mut InProcessReplicas<'_>) -> String {
    let leader = replicas
        .leader(Duration::from_secs(30))
        .await
        .expect("a leader");
    replicas.kill(&leader);
    leader
}

async fn run_seed(seed: u64) {
    let _keep_logs = KeepLogsOnFailure(seed);
    let mut rng = StdRng::seed_from_u64(seed);
    let w = World::start(WorldOptions {
        nodes: 2,
        agent_timeout: Duration::from_secs(2),
        capture_logs: true,
        start_controller: false,
        ..WorldOptions::fault_lab()
    })
    .await
    .expect("the fault lab starts");
    let mut replicas = InProcessReplicas::new(&w);
    replicas.start();
    replicas
        .leader(Duration::from_secs(30))
        .await
        .expect("the first replica leads");
    replicas.start();
    let mut agents = BTreeMap::new();
    for i in 0..VMS {
        let d = vm(NS, &vm_name(i), node_of(i)).label("fleet", "all");
        let qga = w
            .add_vm(&d, Some(guest_users()))
            .await
            .expect("vm")
            .expect("agent");
        qga.seed_authorized_keys("alice", &[HAND])
            .expect("hand key");
        agents.insert(vm_name(i), qga);
    }
    // vm-late: a VM of the fleet with no agent yet (every run retries it).
    let late_vm = vm(NS, LATE, "node-1").label("fleet", "all");
    w.add_vm(&late_vm, None).await.expect("vm-late");
    let late: Arc<Mutex<Option<HostQga>>> = Arc::default();
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let late_history = sample_late(late.clone(), stop_sampling.clone());
    let history: History = Arc::default();
    sample_alice(&agents, &history);

    let conc = rng.random_range(1..=3);
    w.apply(&secret("pw", "password", OLD))
        .await
        .expect("secret");
    w.apply(&gen_reset(conc, false)).await.expect("gen");
    let fixed = over_the_fleet(GuestPasswordReset::test("fixed"), "alice")
        .from_secret("pw")
        .crypted()
        .max_concurrency(rng.random_range(1..=3));
    w.apply(&fixed).await.expect("fixed");
    let identity = age::x25519::Identity::generate();
    let sealed = over_the_fleet(GuestPasswordReset::test("sealed"), "bob")
        .generate(24)
        .sealed_to(&identity.to_public().to_string())
        .max_concurrency(rng.random_range(1..=3));
    w.apply(&sealed).await.expect("sealed");
    // The grant names the hand-added key too: it must stay the person's.
    let grant = over_the_fleet(KeypairRebuild::test("grant"), "alice")
        .inline_keys([GRANT, HAND])
        .mode(KeyMode::Live)
        .strategy(KeyStrategy::Append)
        .ttl(TTL);
    w.apply(&grant).await.expect("grant");
    let perm = over_the_fleet(KeypairRebuild::test("perm"), "alice")
        .inline_keys([PERM])
        .mode(KeyMode::Live)
        .strategy(KeyStrategy::Replace);
    w.apply(&perm).await.expect("perm");

    // Faults, at seeded moments over the first seconds of the runs.
    let rotated = Arc::new(AtomicBool::new(false));
    let mut steps: Vec<u8> = vec![0, 1, 2, 3, 4, 5, 6];
    let mut lease_moves = 0;
    for i in (1..steps.len()).rev() {
        steps.swap(i, rng.random_range(0..=i));
    }
    println!("fault_random: seed {seed} faults in order {steps:?}");
    for step in steps {
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..900))).await;
        sample_alice(&agents, &history);
        match step {
            0 => {
                let leader = kill_the_leader(&mut replicas).await;
                tokio::time::sleep(Duration::from_millis(rng.random_range(50..500))).await;
                replicas.restart(&leader);
            }
            1 => {
                let node = if rng.random_bool(0.5) {
                    "node-1"
                } else {
                    "node-2"
                };
                w.kill_shim(node);
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..800))).await;
                w.restart_shim(node).await;
            }
            2 => w
                .api()
                .faults()
                .conflict_next_status_writes(rng.random_range(1..6)),
            3 => {
                let frozen = &agents[&vm_name(rng.random_range(0..VMS))];
                signal(frozen, "-STOP");
                tokio::time::sleep(Duration::from_millis(rng.random_range(500..3000))).await;
                signal(frozen, "-CONT");
            }
            4 => {
                w.apply(&secret("pw", "password", NEW))
                    .await
                    .expect("rotate");
                rotated.store(true, Ordering::SeqCst);
                // The controller sees the new version within this second; only then does
                // vm-late answer.
                tokio::time::sleep(Duration::from_secs(1)).await;
                let qga = w
                    .start_agent(&late_vm, &guest_users())
                    .expect("vm-late's agent");
                *late.lock().expect("late") = Some(qga);
            }
            6 => {
                let old = kill_the_leader(&mut replicas).await;
                let new = replicas
                    .leader(Duration::from_secs(30))
                    .await
                    .filter(|new| *new != old);
                assert!(new.is_some(), "seed {seed}: no replica took the Lease over");
                lease_moves += 1;
                replicas.start();
            }
            _ => {
                w.apply(&gen_reset(conc, true)).await.expect("pause");
                tokio::time::sleep(Duration::from_millis(rng.random_range(100..1500))).await;
                w.apply(&gen_reset(conc, false)).await.expect("resume");
            }
        }
    }
    assert!(rotated.load(Ordering::SeqCst));
    assert_eq!(lease_moves, 1, "seed {seed}: the Lease moved once");

    // Everything settles: all four objects finished on their latest spec.
    let started = Instant::now();
    let deadline = started + Duration::from_secs(150);
    loop {
        sample_alice(&agents, &history);
        let generated_reset: GuestPasswordReset = w.get(NS, "gen").await;
        let fixed: GuestPasswordReset = w.get(NS, "fixed").await;
        let grant: KeypairRebuild = w.get(NS, "grant").await;
        let perm: KeypairRebuild = w.get(NS, "perm").await;
        let sealed: GuestPasswordReset = w.get(NS, "sealed").await;
        let settled = phase(&generated_reset) == Some(Phase::Succeeded)
            && phase(&sealed) == Some(Phase::Succeeded)
            && phase(&fixed) == Some(Phase::Succeeded)
            && phase(&grant) == Some(Phase::Succeeded)
            && phase(&perm) == Some(Phase::Succeeded)
            && agents.values().all(|a| alice_hash(a) == NEW)
            && late
                .lock()
                .expect("late")
                .as_ref()
                .map(alice_hash)
                .as_deref()
                == Some(NEW);
        if settled {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: not settled: gen {:?} sealed {:?} fixed {:?} grant {:?} perm {:?}",
            generated_reset.status,
            sealed.status,
            fixed.status,
            grant.status,
            perm.status
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Generated passwords: the one in each VM's output Secret is the one in the guest.
    let generated_reset: GuestPasswordReset = w.get(NS, "gen").await;
    let mut generated = Vec::new();
    for t in &generated_reset.status.as_ref().expect("status").run.targets {
        let name = t.output_secret.clone().expect("output secret in status");
        let s: k8s_openapi::api::core::v1::Secret = w.get(NS, &name).await;
        let pw = String::from_utf8(s.data.expect("data")["password"].0.clone()).expect("utf-8");
        let guard = late.lock().expect("late");
        let agent = agents
            .get(&t.vm)
            .or(guard.as_ref())
            .expect("the VM's agent");
        let hash = agent
            .shadow_hash("root")
            .expect("shadow")
            .unwrap_or_default();
        assert!(
            verifies(&pw, &hash),
            "seed {seed}: {}'s root password is not the one in Secret {name}",
            t.vm
        );
        generated.push(pw);
    }

    // Sealed passwords: each target's Secret decrypts to the one bob has in the guest.
    let sealed_reset: GuestPasswordReset = w.get(NS, "sealed").await;
    for t in &sealed_reset.status.as_ref().expect("status").run.targets {
        let name = t.output_secret.clone().expect("output secret in status");
        let s: k8s_openapi::api::core::v1::Secret = w.get(NS, &name).await;
        let data = s.data.expect("data");
        assert!(
            !data.contains_key("password"),
            "seed {seed}: sealed Secret {name} holds a plaintext"
        );
        let armored = &data["password.age"].0;
        let pw =
            String::from_utf8(age::decrypt(&identity, armored).expect("decrypts")).expect("utf-8");
        let guard = late.lock().expect("late");
        let agent = agents
            .get(&t.vm)
            .or(guard.as_ref())
            .expect("the VM's agent");
        assert!(
            agent.password_matches("bob", &pw).expect("shadow"),
            "seed {seed}: {}'s bob password is not the one sealed in Secret {name}",
            t.vm
        );
        generated.push(pw);
    }

    // vm-late came up after the rotation: it never held the superseded value.
    stop_sampling.store(true, Ordering::SeqCst);
    let late_seen = late_history.lock().expect("history")[LATE].clone();
    assert!(
        !late_seen.iter().any(|h| h == OLD),
        "seed {seed}: vm-late was given the superseded value after the rotation: {late_seen:?}"
    );

    // The crypted value: never the superseded one after the newer one.
    for (vm, seen) in history.lock().expect("history").iter() {
        if let Some(first_new) = seen.iter().position(|h| h == NEW) {
            assert!(
                !seen[first_new..].iter().any(|h| h == OLD),
                "seed {seed}: {vm} got the superseded value after the newer one: {seen:?}"
            );
        }
    }

    // Keys: the hand-added one stays, the permanent one is there, the grant goes at its TTL.
    let expiry_deadline = Instant::now() + Duration::from_secs(u64::from(TTL) + 40);
    loop {
        let mut all_expired = true;
        for (name, qga) in &agents {
            let keys = key_comments(&qga.authorized_keys("alice").expect("keys"));
            assert!(
                keys.contains(&"hand@added".to_string()),
                "seed {seed}: {name} lost the hand-added key: {keys:?}"
            );
            assert!(
                keys.contains(&"key2@test".to_string()),
                "seed {seed}: {name} lacks the permanent key: {keys:?}"
            );
            all_expired &= !keys.contains(&"key1@test".to_string());
        }
        // vm-late had no hand-added key; the grant and the permanent key as everywhere.
        if let Some(qga) = late.lock().expect("late").as_ref() {
            let keys = key_comments(&qga.authorized_keys("alice").expect("keys"));
            assert!(
                keys.contains(&"key2@test".to_string()),
                "seed {seed}: vm-late lacks the permanent key: {keys:?}"
            );
            all_expired &= !keys.contains(&"key1@test".to_string());
        }
        if all_expired {
            break;
        }
        assert!(
            Instant::now() < expiry_deadline,
            "seed {seed}: the TTL grant outlived its TTL"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let mut secrets: Vec<&str> = generated.iter().map(String::as_str).collect();
    secrets.extend([OLD, NEW]);
    w.assert_not_leaked(&secrets).await;
    println!(
        "fault_random: seed {seed} settled in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}
