//! A simulated guest agent, for scale only: a [`GuestAgent`] that answers like qemu-ga
//! (set-password, SSH keys get/add/replace/remove, probe with `guest-ssh-*` supported, OS
//! info) without any VM or process behind it, so one machine can stand in for many nodes'
//! shims (each a real [`ShimApp`](guestcred::shim::server::ShimApp) on its own loopback
//! address, 127.0.x.y, so the shims' node checks hold).
//!
//! **Real qemu-ga stays the proof of correctness** (`hostqga`, the TCG guests of `guest`):
//! this agent only knows what it was told a guest does. Use it where the number of guests,
//! not their behaviour, is what is tested; a test or benchmark that uses it says so.
//!
//! What it models:
//! - **Latency** per operation from a [`Latency`] distribution. The default,
//!   [`OpLatencies::tcg_guest`], is what LAB.md measured on the lab's QEMU TCG guest through
//!   libvirt: crypted set-password 70–90 ms, plaintext ~350 ms (the guest hashes with
//!   yescrypt), SSH key calls 1–10 ms, probe ~1–3 ms. [`OpLatencies::host_qemu_ga`] is a
//!   host-run qemu-ga's (crypted ~8 ms, plaintext ~29 ms).
//! - **One command at a time per guest**, as on the agent's virtio-serial channel: calls to
//!   one VM queue; calls to different VMs run in parallel.
//! - **Failures** (`failure_rate`): the call fails at once with `failure_reason` and changes
//!   nothing. **Stalls** (`hang_rate`): the agent takes `hang_for` (default 4 s) over the
//!   call; past the shim's agent `timeout` (default 3 s) the caller gets `AgentTimeout`,
//!   and with `hang_applies` (the default) the guest still applies the call when it gets to
//!   it, as a real agent that wakes up does (an unknown outcome, LAB.md "Timeouts"). The
//!   same holds for calls queued behind a slow one and for calls whose caller hangs up.
//!   [`Behavior::Hang`] freezes one VM's agent (as SIGSTOP) until the test resumes it.
//!   Randomness comes from `seed`, drawn per (domain, n-th call to that domain), so a
//!   seed gives every VM the same fate whatever the interleaving of calls across VMs.
//! - **Guest state**: per VM and user a password record (a keyed digest of the value, never
//!   the value) and an authorized_keys list (append skips duplicates, replace, exact-line
//!   remove; get returns the keys in reverse file order, as qemu-ga 7.2 does).
//! - **A record of every call**: domain, operation, user, the digest of the password or
//!   keys, start and end ([`tokio::time::Instant`], so tests may run on paused time) and
//!   the outcome, for checks such as "every guest holds the new value"
//!   ([`SimAgent::holds_password`]) and "no call after a success"
//!   ([`SimAgent::calls_after_success`]).
use async_trait::async_trait;
use guestcred::api::validate::{Password, PublicKeys, UserName, ValidDomain};
use guestcred::api::wire::{GuestOsInfo, ProbeResponse, ShimError, ShimErrorReason};
use guestcred::shim::agent::{AgentCall, AgentReply, GuestAgent};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// A latency distribution.
#[derive(Clone, Debug, PartialEq)]
pub enum Latency {
    Fixed(Duration),
    /// Uniform between `min` and `max` (inclusive).
    Uniform {
        min: Duration,
        max: Duration,
    },
    /// One of these measured samples, each equally likely.
    Samples(Vec<Duration>),
}

impl Latency {
    pub fn uniform_ms(min: u64, max: u64) -> Latency {
        Latency::Uniform {
            min: Duration::from_millis(min),
            max: Duration::from_millis(max),
        }
    }

    /// A latency from the uniform draw `u` in [0, 1).
    fn pick(&self, u: f64) -> Duration {
        match self {
            Latency::Fixed(d) => *d,
            Latency::Uniform { min, max } => {
                let (lo, hi) = (min.as_secs_f64(), max.as_secs_f64().max(min.as_secs_f64()));
                Duration::from_secs_f64(lo + (hi - lo) * u)
            }
            Latency::Samples(s) if s.is_empty() => Duration::ZERO,
            Latency::Samples(s) => s[((u * s.len() as f64) as usize).min(s.len() - 1)],
        }
    }
}

/// Latency of each kind of agent call.
#[derive(Clone, Debug, PartialEq)]
pub struct OpLatencies {
    pub probe: Latency,
    pub set_password_crypted: Latency,
    pub set_password_plain: Latency,
    pub keys: Latency,
}

impl OpLatencies {
    /// The lab's QEMU TCG guest, measured through libvirt (LAB.md "What the agent does"):
    /// crypted set 70–90 ms, plaintext 300–400 ms (~350), keys 1–10 ms, probe 1–3 ms
    /// (guest-ping ~1.4 ms; a probe is guest-info plus guest-get-osinfo). The default.
    pub fn tcg_guest() -> Self {
        Self {
            probe: Latency::uniform_ms(1, 3),
            set_password_crypted: Latency::uniform_ms(70, 90),
            set_password_plain: Latency::uniform_ms(300, 400),
            keys: Latency::uniform_ms(1, 10),
        }
    }

    /// A host-run qemu-ga (`hostqga`): crypted ~8 ms, plaintext ~29 ms, keys 1–10 ms.
    pub fn host_qemu_ga() -> Self {
        Self {
            probe: Latency::uniform_ms(1, 2),
            set_password_crypted: Latency::uniform_ms(6, 10),
            set_password_plain: Latency::uniform_ms(25, 33),
            keys: Latency::uniform_ms(1, 10),
        }
    }

    /// No latency at all (tests of the agent's bookkeeping).
    pub fn zero() -> Self {
        let z = Latency::Fixed(Duration::ZERO);
        Self {
            probe: z.clone(),
            set_password_crypted: z.clone(),
            set_password_plain: z.clone(),
            keys: z,
        }
    }
}

impl Default for OpLatencies {
    fn default() -> Self {
        Self::tcg_guest()
    }
}

#[derive(Clone, Debug)]
pub struct SimAgentOptions {
    pub latency: OpLatencies,
    /// Probability that a call fails at once with `failure_reason`, changing nothing.
    pub failure_rate: f64,
    pub failure_reason: ShimErrorReason,
    /// Probability that the agent stalls for `hang_for` on a call (the caller gets
    /// `AgentTimeout` at `timeout` when `hang_for` is longer).
    pub hang_rate: f64,
    /// How long a random stall lasts (default 4 s: past the default 3 s timeout, then the
    /// guest applies the call, as an agent that wakes up).
    pub hang_for: Duration,
    /// Whether a call the caller gave up on (timeout, hang-up) is still applied by the
    /// guest when it gets to it (real agents do; `false` drops it).
    pub hang_applies: bool,
    /// The shim's agent timeout (the real backends take it as an argument too).
    pub timeout: Duration,
    pub seed: u64,
    /// Users every guest has; `None`: any user exists (with a home directory).
    pub users: Option<BTreeSet<String>>,
    /// Answer for VMs never added with [`SimAgent::add_domain`] (created on first call);
    /// `false`: such a VM is `DomainNotFound`, as the qga-socket backend answers when the
    /// VM has no socket on this node.
    pub auto_create_domains: bool,
    pub agent_version: String,
    pub os: GuestOsInfo,
}

impl Default for SimAgentOptions {
    fn default() -> Self {
        Self {
            latency: OpLatencies::default(),
            failure_rate: 0.0,
            failure_reason: ShimErrorReason::AgentNotConnected,
            hang_rate: 0.0,
            hang_for: Duration::from_secs(4),
            hang_applies: true,
            timeout: Duration::from_secs(3),
            seed: 0,
            users: None,
            auto_create_domains: true,
            agent_version: "7.2.19".into(),
            os: GuestOsInfo {
                id: Some("debian".into()),
                name: Some("Debian GNU/Linux".into()),
                pretty_name: Some("Debian GNU/Linux 12 (bookworm)".into()),
                version_id: Some("12".into()),
                kernel_release: Some("6.1.0-sim".into()),
            },
        }
    }
}

/// The agent commands a simulated guest reports as enabled.
pub const SUPPORTED_COMMANDS: &[&str] = &[
    "guest-ping",
    "guest-info",
    "guest-sync",
    "guest-get-osinfo",
    "guest-set-user-password",
    "guest-ssh-get-authorized-keys",
    "guest-ssh-add-authorized-keys",
    "guest-ssh-remove-authorized-keys",
];

/// What a call asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SimOp {
    Probe,
    SetPassword,
    GetKeys,
    AddKeys,
    /// `add_ssh_keys` with `reset`: the file is replaced.
    ReplaceKeys,
    RemoveKeys,
}

impl SimOp {
    pub fn as_str(self) -> &'static str {
        match self {
            SimOp::Probe => "probe",
            SimOp::SetPassword => "set-password",
            SimOp::GetKeys => "ssh-keys-get",
            SimOp::AddKeys => "ssh-keys-add",
            SimOp::ReplaceKeys => "ssh-keys-replace",
            SimOp::RemoveKeys => "ssh-keys-remove",
        }
    }

    /// Whether the op changes the guest (everything but probe and get).
    pub fn changes_guest(self) -> bool {
        !matches!(self, SimOp::Probe | SimOp::GetKeys)
    }
}

/// How a call ended for its caller (whether the guest changed is
/// [`CallRecord::applied_at`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimOutcome {
    Ok,
    /// Answered with this reason; nothing changed.
    Failed(ShimErrorReason),
    /// Answered `AgentTimeout`: an unknown outcome (the guest may apply it later).
    TimedOut,
    /// The caller went away (e.g. the shim's client hung up) before an answer.
    Cancelled,
}

/// One recorded call. Never holds a password or key, only [`SimAgent::digest`]s.
#[derive(Clone, Debug)]
pub struct CallRecord {
    /// Order in which calls started, over this agent.
    pub seq: u64,
    /// `namespace/name`.
    pub domain: String,
    pub op: SimOp,
    pub user: Option<String>,
    /// Digest of the password (set-password) or of the keys, one per line (key changes).
    pub digest: Option<String>,
    pub crypted: Option<bool>,
    pub started: Instant,
    pub finished: Instant,
    pub outcome: SimOutcome,
    /// When the guest applied the call: with an `Ok` answer, or later for a call whose
    /// caller timed out or went away (with `hang_applies`).
    pub applied_at: Option<Instant>,
}

impl CallRecord {
    /// The guest applied this call (so far).
    pub fn applied(&self) -> bool {
        self.applied_at.is_some()
    }
}

/// The call log, and guest-side applies of calls whose record is not written yet.
#[derive(Default)]
struct Log {
    records: Vec<CallRecord>,
    late: HashMap<u64, Instant>,
}

impl Log {
    fn applied_late(&mut self, seq: u64, at: Instant) {
        match self.records.iter_mut().rev().find(|r| r.seq == seq) {
            Some(r) => r.applied_at = Some(at),
            None => {
                self.late.insert(seq, at);
            }
        }
    }

    fn push(&mut self, mut record: CallRecord) {
        if let Some(at) = self.late.remove(&record.seq) {
            record.applied_at = record.applied_at.or(Some(at));
        }
        self.records.push(record);
    }
}

/// A call's record, written when the call ends or, if its caller drops it, then.
struct PendingRecord {
    log: Arc<Mutex<Log>>,
    record: Option<CallRecord>,
}

impl PendingRecord {
    fn finish(&mut self, at: Instant, outcome: SimOutcome, applied_at: Option<Instant>) {
        if let Some(r) = self.record.as_mut() {
            r.finished = at;
            r.outcome = outcome;
            r.applied_at = applied_at;
        }
    }
}

impl Drop for PendingRecord {
    fn drop(&mut self) {
        if let Some(mut r) = self.record.take() {
            if r.outcome == SimOutcome::Cancelled {
                r.finished = Instant::now();
            }
            lock(&self.log).push(r);
        }
    }
}

/// A guest's password for one user, as the agent stored it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PasswordRecord {
    /// [`SimAgent::digest`] of the value sent (a crypt string is stored verbatim by the
    /// guest, a plaintext one hashed: either way the digest identifies the input).
    pub digest: String,
    pub crypted: bool,
    /// How many times it was set (applied calls).
    pub sets: u32,
}

/// What a test makes one VM do, besides the random draws.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Behavior {
    #[default]
    Normal,
    /// The agent is frozen (as by SIGSTOP): calls queue and time out; when the behavior
    /// changes back, the queued calls run (with `hang_applies`).
    Hang,
    /// Every call fails with this reason.
    Fail(ShimErrorReason),
    /// The agent is not connected: probes answer `agent_connected: false`, calls fail with
    /// `AgentNotConnected`.
    Disconnected,
}

#[derive(Default)]
struct GuestState {
    passwords: BTreeMap<String, PasswordRecord>,
    /// authorized_keys per user, in file order.
    keys: BTreeMap<String, Vec<String>>,
}

struct SimVm {
    /// The agent's channel: one command at a time, the guest's state behind it.
    channel: tokio::sync::Mutex<GuestState>,
    calls: Mutex<u64>,
    behavior: tokio::sync::watch::Sender<Behavior>,
}

impl SimVm {
    fn new() -> Arc<SimVm> {
        Arc::new(SimVm {
            channel: tokio::sync::Mutex::new(GuestState::default()),
            calls: Mutex::new(0),
            behavior: tokio::sync::watch::Sender::new(Behavior::Normal),
        })
    }
}

/// The simulated agent of one node's guests. Cheap to share (`Arc`); hand it to
/// `ShimApp::new(agent, auth)` as the shim's backend.
pub struct SimAgent {
    opts: SimAgentOptions,
    /// Key of the digests: records and state never hold a value that could be looked up.
    digest_key: [u8; 16],
    vms: Mutex<HashMap<String, Arc<SimVm>>>,
    log: Arc<Mutex<Log>>,
    seq: Mutex<u64>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// SplitMix64: a small, stable generator (the draws must not change with a crate version).
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn unit(state: &mut u64) -> f64 {
    (splitmix(state) >> 11) as f64 / (1u64 << 53) as f64
}

/// FNV-1a, for a stable per-domain stream.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn key_of(domain: &ValidDomain) -> String {
    format!("{}/{}", domain.namespace(), domain.name())
}

/// The random fate of one call.
struct Draw {
    fail: bool,
    hang: bool,
    latency_u: f64,
}

impl SimAgent {
    pub fn new(opts: SimAgentOptions) -> SimAgent {
        SimAgent {
            opts,
            digest_key: rand::random(),
            vms: Mutex::new(HashMap::new()),
            log: Arc::default(),
            seq: Mutex::new(0),
        }
    }

    pub fn options(&self) -> &SimAgentOptions {
        &self.opts
    }

    /// The digest records and password records hold for `value` (keyed per agent).
    pub fn digest(&self, value: &str) -> String {
        let mut h = Sha256::new();
        h.update(self.digest_key);
        h.update(value.as_bytes());
        hex::encode(&h.finalize()[..16])
    }

    /// Add a VM (needed when `auto_create_domains` is off).
    pub fn add_domain(&self, namespace: &str, name: &str) {
        lock(&self.vms)
            .entry(format!("{namespace}/{name}"))
            .or_insert_with(SimVm::new);
    }

    /// Remove a VM and its state (as the VM being deleted); its records stay.
    pub fn remove_domain(&self, namespace: &str, name: &str) {
        lock(&self.vms).remove(&format!("{namespace}/{name}"));
    }

    /// The VMs this agent knows, `namespace/name`, sorted.
    pub fn domains(&self) -> Vec<String> {
        let mut d: Vec<String> = lock(&self.vms).keys().cloned().collect();
        d.sort();
        d
    }

    /// Make one VM hang, fail or lose its agent (from its next call), or behave again.
    pub fn set_behavior(&self, namespace: &str, name: &str, behavior: Behavior) {
        let vm = lock(&self.vms)
            .entry(format!("{namespace}/{name}"))
            .or_insert_with(SimVm::new)
            .clone();
        vm.behavior.send_replace(behavior);
    }

    fn vm(&self, domain: &ValidDomain) -> Result<Arc<SimVm>, ShimError> {
        let key = key_of(domain);
        let mut vms = lock(&self.vms);
        match vms.get(&key) {
            Some(vm) => Ok(vm.clone()),
            None if self.opts.auto_create_domains => {
                Ok(vms.entry(key).or_insert_with(SimVm::new).clone())
            }
            None => Err(ShimError::new(
                ShimErrorReason::DomainNotFound,
                format!("no simulated guest {domain} on this node"),
            )),
        }
    }

    fn draw(&self, domain: &str, vm: &SimVm) -> Draw {
        let n = {
            let mut calls = lock(&vm.calls);
            *calls += 1;
            *calls
        };
        let mut state = self.opts.seed ^ fnv(domain) ^ n.wrapping_mul(0xD6E8_FEB8_6659_FD93);
        Draw {
            fail: unit(&mut state) < self.opts.failure_rate,
            hang: unit(&mut state) < self.opts.hang_rate,
            latency_u: unit(&mut state),
        }
    }

    fn next_seq(&self) -> u64 {
        let mut s = lock(&self.seq);
        *s += 1;
        *s
    }

    fn known_user(&self, user: &str) -> bool {
        self.opts.users.as_ref().is_none_or(|u| u.contains(user))
    }

    /// Runs one call: its draw, then the guest side (the channel, the latency, `apply` on
    /// the guest state) as a task of its own, which goes on when the caller gives up at the
    /// timeout or goes away, as a real agent does. Every call is recorded, even one whose
    /// caller is dropped (outcome `Cancelled`).
    #[allow(clippy::too_many_arguments)]
    async fn call<T: Send + 'static>(
        &self,
        domain: &ValidDomain,
        op: SimOp,
        user: Option<&UserName>,
        digest: Option<String>,
        crypted: Option<bool>,
        latency: &Latency,
        apply: impl FnOnce(&mut GuestState) -> Result<T, ShimError> + Send + 'static,
    ) -> Result<T, ShimError> {
        let started = Instant::now();
        let seq = self.next_seq();
        let key = key_of(domain);
        let mut pending = PendingRecord {
            log: self.log.clone(),
            record: Some(CallRecord {
                seq,
                domain: key.clone(),
                op,
                user: user.map(|u| u.as_str().to_string()),
                digest,
                crypted,
                started,
                finished: started,
                outcome: SimOutcome::Cancelled,
                applied_at: None,
            }),
        };
        let result = self.run(seq, &key, domain, latency, started, apply).await;
        let now = Instant::now();
        let outcome = match &result {
            Ok(_) => SimOutcome::Ok,
            Err(e) if e.reason == ShimErrorReason::AgentTimeout => SimOutcome::TimedOut,
            Err(e) => SimOutcome::Failed(e.reason),
        };
        pending.finish(now, outcome, result.is_ok().then_some(now));
        result
    }

    async fn run<T: Send + 'static>(
        &self,
        seq: u64,
        key: &str,
        domain: &ValidDomain,
        latency: &Latency,
        started: Instant,
        apply: impl FnOnce(&mut GuestState) -> Result<T, ShimError> + Send + 'static,
    ) -> Result<T, ShimError> {
        let vm = self.vm(domain)?;
        let behavior = *vm.behavior.borrow();
        let draw = self.draw(key, &vm);
        match behavior {
            Behavior::Fail(reason) => return Err(ShimError::new(reason, "simulated failure")),
            Behavior::Disconnected => {
                return Err(ShimError::new(
                    ShimErrorReason::AgentNotConnected,
                    "simulated guest agent is not connected",
                ));
            }
            Behavior::Normal | Behavior::Hang => {}
        }
        if draw.fail {
            return Err(ShimError::new(
                self.opts.failure_reason,
                "simulated agent failure",
            ));
        }
        let delay = if draw.hang {
            self.opts.hang_for
        } else {
            latency.pick(draw.latency_u)
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let log = self.log.clone();
        let guest_side = tokio::spawn(async move {
            let mut guest = vm.channel.lock().await;
            tokio::time::sleep(delay).await;
            // A hung agent (SIGSTOP) answers nothing until it is resumed.
            let mut behavior = vm.behavior.subscribe();
            let _ = behavior.wait_for(|b| *b != Behavior::Hang).await;
            let result = apply(&mut guest);
            let applied = result.is_ok();
            if tx.send(result).is_err() && applied {
                // The caller is gone (timed out or dropped): the guest applied it anyway.
                lock(&log).applied_late(seq, Instant::now());
            }
        });
        let deadline = started + self.opts.timeout;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ShimError::internal(
                "simulated guest side ended without an answer",
            )),
            Err(_) => {
                if !self.opts.hang_applies {
                    guest_side.abort();
                }
                let timeout = self.opts.timeout;
                Err(ShimError::new(
                    ShimErrorReason::AgentTimeout,
                    format!("simulated guest agent of {domain} did not answer within {timeout:?}"),
                ))
            }
        }
    }

    /// Every call so far, in the order they finished.
    pub fn records(&self) -> Vec<CallRecord> {
        lock(&self.log).records.clone()
    }

    /// How many calls have started (finished or not): with [`SimAgent::records`]' length,
    /// whether a call is in progress.
    pub fn calls_started(&self) -> usize {
        usize::try_from(*lock(&self.seq)).unwrap_or(usize::MAX)
    }

    /// How many calls of `op` were made (any outcome).
    pub fn count(&self, op: SimOp) -> usize {
        lock(&self.log)
            .records
            .iter()
            .filter(|r| r.op == op)
            .count()
    }

    /// How many calls of `op` were answered `Ok` (cheap enough to poll: no records are
    /// copied).
    pub fn successes(&self, op: SimOp) -> usize {
        lock(&self.log)
            .records
            .iter()
            .filter(|r| r.op == op && r.outcome == SimOutcome::Ok)
            .count()
    }

    /// The password record of `user` on VM `namespace/name`.
    pub fn password(&self, namespace: &str, name: &str, user: &str) -> Option<PasswordRecord> {
        let vm = lock(&self.vms).get(&format!("{namespace}/{name}"))?.clone();
        let guest = vm.channel.try_lock().ok()?;
        guest.passwords.get(user).cloned()
    }

    /// Whether VM `namespace/name` holds `value` as `user`'s password. A call still in
    /// progress on that VM counts as not holding it.
    pub fn holds_password(&self, namespace: &str, name: &str, user: &str, value: &str) -> bool {
        self.password(namespace, name, user)
            .is_some_and(|p| p.digest == self.digest(value))
    }

    /// `user`'s authorized_keys on VM `namespace/name`, in file order, read once no call is
    /// in progress on that VM (a call holds the VM's channel while the guest works on it).
    /// It waits rather than answer nothing: a check of "the key is still there" that read
    /// an empty file whenever the controller happened to be reading the VM's keys failed
    /// fleet_scale's overlap test now and then.
    pub async fn authorized_keys(&self, namespace: &str, name: &str, user: &str) -> Vec<String> {
        let Some(vm) = lock(&self.vms).get(&format!("{namespace}/{name}")).cloned() else {
            return Vec::new();
        };
        let guest = vm.channel.lock().await;
        guest.keys.get(user).cloned().unwrap_or_default()
    }

    /// Calls of `op` that started after a call of `op` to the same VM and user had
    /// succeeded (answered `Ok`): the second calls a controller must not make once it has
    /// a success. Empty when there were none.
    pub fn calls_after_success(&self, op: SimOp) -> Vec<CallRecord> {
        let log = lock(&self.log);
        let records = &log.records;
        let mut first_ok: BTreeMap<(&str, Option<&str>), Instant> = BTreeMap::new();
        for r in records.iter().filter(|r| r.op == op) {
            if r.outcome == SimOutcome::Ok {
                let k = (r.domain.as_str(), r.user.as_deref());
                let t = first_ok.entry(k).or_insert(r.finished);
                *t = (*t).min(r.finished);
            }
        }
        records
            .iter()
            .filter(|r| r.op == op)
            .filter(|r| {
                first_ok
                    .get(&(r.domain.as_str(), r.user.as_deref()))
                    .is_some_and(|ok| r.started >= *ok)
            })
            .cloned()
            .collect()
    }

    fn keys_digest(&self, keys: &PublicKeys) -> String {
        self.digest(&keys.as_slice().join("\n"))
    }

    fn user_check(&self, user: &UserName) -> Result<(), ShimError> {
        if self.known_user(user.as_str()) {
            Ok(())
        } else {
            Err(ShimError::new(
                ShimErrorReason::UserNotFound,
                format!("failed to lookup user '{user}'"),
            ))
        }
    }
}

impl SimAgent {
    async fn guest_info(&self, domain: &ValidDomain) -> Result<ProbeResponse, ShimError> {
        let version = self.opts.agent_version.clone();
        let os = self.opts.os.clone();
        self.call(
            domain,
            SimOp::Probe,
            None,
            None,
            None,
            &self.opts.latency.probe,
            move |_| {
                Ok(ProbeResponse {
                    agent_connected: true,
                    agent_version: Some(version),
                    supported_commands: SUPPORTED_COMMANDS.iter().map(|c| c.to_string()).collect(),
                    os: Some(os),
                })
            },
        )
        .await
        .or_else(|e| match e.reason {
            // As the qga-socket backend: no agent on the channel is a probe answer.
            ShimErrorReason::AgentNotConnected => Ok(ProbeResponse::default()),
            _ => Err(e),
        })
    }

    async fn set_user_password(
        &self,
        domain: &ValidDomain,
        user: &UserName,
        password: &Password,
    ) -> Result<(), ShimError> {
        let digest = self.digest(password.secret().expose_secret());
        let crypted = password.crypted();
        let latency = if crypted {
            &self.opts.latency.set_password_crypted
        } else {
            &self.opts.latency.set_password_plain
        };
        let known = self.user_check(user);
        let name = user.as_str().to_string();
        let stored = digest.clone();
        self.call(
            domain,
            SimOp::SetPassword,
            Some(user),
            Some(digest),
            Some(crypted),
            latency,
            move |g| {
                known?;
                let p = g.passwords.entry(name).or_insert(PasswordRecord {
                    digest: String::new(),
                    crypted,
                    sets: 0,
                });
                p.digest = stored;
                p.crypted = crypted;
                p.sets += 1;
                Ok(())
            },
        )
        .await
    }

    /// A call on `user`'s authorized_keys file (in file order), refused for an unknown
    /// user as qemu-ga's user lookup does.
    async fn keys_call<T: Send + 'static>(
        &self,
        domain: &ValidDomain,
        op: SimOp,
        user: &UserName,
        keys: Option<&PublicKeys>,
        apply: impl FnOnce(&mut BTreeMap<String, Vec<String>>, String) -> T + Send + 'static,
    ) -> Result<T, ShimError> {
        let known = self.user_check(user);
        let name = user.as_str().to_string();
        self.call(
            domain,
            op,
            Some(user),
            keys.map(|k| self.keys_digest(k)),
            None,
            &self.opts.latency.keys,
            move |g| {
                known?;
                Ok(apply(&mut g.keys, name))
            },
        )
        .await
    }
}

#[async_trait]
impl GuestAgent for SimAgent {
    async fn execute(
        &self,
        domain: &ValidDomain,
        call: AgentCall<'_>,
    ) -> Result<AgentReply, ShimError> {
        let done = |()| AgentReply::Done;
        match call {
            AgentCall::Probe => self.guest_info(domain).await.map(AgentReply::Probe),
            AgentCall::SetPassword { user, password } => self
                .set_user_password(domain, user, password)
                .await
                .map(done),
            AgentCall::GetSshKeys { user } => self
                .keys_call(domain, SimOp::GetKeys, user, None, |files, name| {
                    // qemu-ga answers in reverse file order.
                    files
                        .get(&name)
                        .map(|k| k.iter().rev().cloned().collect())
                        .unwrap_or_default()
                })
                .await
                .map(AgentReply::Keys),
            AgentCall::AddSshKeys { user, keys, reset } => {
                let op = if reset {
                    SimOp::ReplaceKeys
                } else {
                    SimOp::AddKeys
                };
                let new = keys.as_slice().to_vec();
                self.keys_call(domain, op, user, Some(keys), move |files, name| {
                    let file = files.entry(name).or_default();
                    if reset {
                        file.clear();
                    }
                    for k in new {
                        if !file.contains(&k) {
                            file.push(k);
                        }
                    }
                })
                .await
                .map(done)
            }
            AgentCall::RemoveSshKeys { user, keys } => {
                let gone = keys.as_slice().to_vec();
                self.keys_call(
                    domain,
                    SimOp::RemoveKeys,
                    user,
                    Some(keys),
                    move |files, name| {
                        if let Some(file) = files.get_mut(&name) {
                            file.retain(|k| !gone.contains(k));
                        }
                    },
                )
                .await
                .map(done)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guestcred::api::validate;
    use guestcred::api::wire::DomainRef;
    use secrecy::SecretString;

    const HASH: &str = "$6$gcTestSalt$U5mGf0Yd1K8Zz3n7u3f9p8m2q6E4rT1yW0xV5cB7nM9kL3jH2gF6dS4aQ8wE1rT5yU7iO9pA2sD4fG6hJ8kL0.";
    const KEY_A: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl a@lab";
    const KEY_B: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHv4VWz3l5JrSNDNqm1uXbQ5oQ0ZWTnQ2EUUdbK1Wk4f b@lab";

    fn dom(name: &str) -> ValidDomain {
        validate::domain(&DomainRef::new("default", name)).expect("domain")
    }
    fn user(u: &str) -> UserName {
        validate::user(u).expect("user")
    }
    fn crypted(h: &str) -> Password {
        validate::password(&SecretString::from(h), true).expect("hash")
    }
    fn plain(p: &str) -> Password {
        validate::password(&SecretString::from(p), false).expect("password")
    }
    fn keys(k: &[&str]) -> PublicKeys {
        let k: Vec<String> = k.iter().map(|s| s.to_string()).collect();
        validate::public_keys(&k).expect("keys")
    }
    fn agent(opts: SimAgentOptions) -> SimAgent {
        SimAgent::new(opts)
    }

    #[test]
    fn uniform_latency_spans_its_range_and_samples_pick_one_of_theirs() {
        let l = Latency::uniform_ms(70, 90);
        assert_eq!(l.pick(0.0), Duration::from_millis(70));
        assert_eq!(l.pick(0.5), Duration::from_millis(80));
        assert!(l.pick(0.999_999) <= Duration::from_millis(90));
        let s = Latency::Samples(vec![Duration::from_millis(1), Duration::from_millis(9)]);
        assert_eq!(s.pick(0.2), Duration::from_millis(1));
        assert_eq!(s.pick(0.99), Duration::from_millis(9));
    }

    #[tokio::test(start_paused = true)]
    async fn a_crypted_set_takes_the_tcg_guests_latency_and_the_guest_holds_the_value() {
        let a = agent(SimAgentOptions::default());
        let t0 = Instant::now();
        a.set_password(&dom("vm-0"), &user("root"), &crypted(HASH))
            .await
            .expect("set");
        let took = t0.elapsed();
        assert!(
            (Duration::from_millis(70)..=Duration::from_millis(90)).contains(&took),
            "{took:?}"
        );
        assert!(a.holds_password("default", "vm-0", "root", HASH));
        assert!(!a.holds_password("default", "vm-0", "root", "other"));
        let r = &a.records()[0];
        assert_eq!((r.op, r.outcome), (SimOp::SetPassword, SimOutcome::Ok));
        assert_eq!(r.domain, "default/vm-0");
        assert_eq!(r.user.as_deref(), Some("root"));
        assert_eq!(r.crypted, Some(true));
        assert_eq!(r.finished - r.started, took);
        // The record names the value by its digest only.
        assert_eq!(r.digest.as_deref(), Some(a.digest(HASH).as_str()));
        assert!(!format!("{:?}", a.records()).contains(HASH));
    }

    #[tokio::test(start_paused = true)]
    async fn plaintext_is_slower_than_crypted_and_host_qemu_ga_is_faster() {
        let a = agent(SimAgentOptions::default());
        let t0 = Instant::now();
        a.set_password(&dom("vm-0"), &user("root"), &plain("correct horse"))
            .await
            .expect("set");
        assert!(t0.elapsed() >= Duration::from_millis(300));
        let h = agent(SimAgentOptions {
            latency: OpLatencies::host_qemu_ga(),
            ..Default::default()
        });
        let t0 = Instant::now();
        h.set_password(&dom("vm-0"), &user("root"), &crypted(HASH))
            .await
            .expect("set");
        assert!(t0.elapsed() <= Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn calls_to_one_guest_queue_and_calls_to_different_guests_run_in_parallel() {
        let a = agent(SimAgentOptions {
            latency: OpLatencies {
                set_password_crypted: Latency::Fixed(Duration::from_millis(80)),
                ..OpLatencies::zero()
            },
            ..Default::default()
        });
        let (root, p) = (user("root"), crypted(HASH));
        let t0 = Instant::now();
        let (d0, d1) = (dom("vm-0"), dom("vm-1"));
        let (x, y) = tokio::join!(
            a.set_password(&d0, &root, &p),
            a.set_password(&d1, &root, &p)
        );
        x.and(y).expect("both");
        assert_eq!(t0.elapsed(), Duration::from_millis(80));
        let t0 = Instant::now();
        let (x, y) = tokio::join!(
            a.set_password(&d0, &root, &p),
            a.set_password(&d0, &root, &p)
        );
        x.and(y).expect("both");
        assert_eq!(t0.elapsed(), Duration::from_millis(160));
        assert_eq!(a.password("default", "vm-0", "root").expect("set").sets, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_answers_agent_timeout_at_the_timeout_and_the_guest_applies_it_later() {
        let a = agent(SimAgentOptions {
            hang_rate: 1.0,
            timeout: Duration::from_secs(3),
            hang_for: Duration::from_secs(4),
            ..Default::default()
        });
        let t0 = Instant::now();
        let e = a
            .set_password(&dom("vm-0"), &user("root"), &crypted(HASH))
            .await
            .expect_err("stalls");
        assert_eq!(e.reason, ShimErrorReason::AgentTimeout);
        assert_eq!(t0.elapsed(), Duration::from_secs(3));
        assert!(!a.holds_password("default", "vm-0", "root", HASH));
        assert_eq!(a.records()[0].outcome, SimOutcome::TimedOut);
        assert!(!a.records()[0].applied());
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(a.holds_password("default", "vm-0", "root", HASH));
        assert_eq!(a.records()[0].applied_at, Some(t0 + Duration::from_secs(4)));

        let b = agent(SimAgentOptions {
            hang_rate: 1.0,
            hang_applies: false,
            ..Default::default()
        });
        b.set_password(&dom("vm-0"), &user("root"), &crypted(HASH))
            .await
            .expect_err("stalls");
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(b.password("default", "vm-0", "root").is_none());
        assert!(!b.records()[0].applied());
    }

    #[tokio::test(start_paused = true)]
    async fn a_frozen_agent_queues_calls_and_runs_them_when_it_resumes() {
        let a = agent(SimAgentOptions::default());
        a.set_behavior("default", "vm-0", Behavior::Hang);
        let (d, root) = (dom("vm-0"), user("root"));
        let (p1, p2) = (plain("first"), crypted(HASH));
        let (x, y) = tokio::join!(a.set_password(&d, &root, &p1), async {
            tokio::time::sleep(Duration::from_millis(1)).await;
            a.set_password(&d, &root, &p2).await
        });
        assert_eq!(x.expect_err("frozen").reason, ShimErrorReason::AgentTimeout);
        assert_eq!(y.expect_err("queued").reason, ShimErrorReason::AgentTimeout);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(a.records().iter().all(|r| !r.applied()));
        a.set_behavior("default", "vm-0", Behavior::Normal);
        tokio::time::sleep(Duration::from_secs(1)).await;
        // Both ran, in order, once the agent resumed.
        assert!(a.records().iter().all(|r| r.applied()));
        assert!(a.holds_password("default", "vm-0", "root", HASH));
        assert_eq!(a.password("default", "vm-0", "root").expect("set").sets, 2);
        a.set_password(&d, &root, &p1).await.expect("healthy again");
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_whose_caller_goes_away_is_recorded_and_still_applied() {
        let a = agent(SimAgentOptions::default());
        let (d, root, p) = (dom("vm-0"), user("root"), crypted(HASH));
        let call = a.set_password(&d, &root, &p);
        assert!(
            tokio::time::timeout(Duration::from_millis(10), call)
                .await
                .is_err()
        );
        assert_eq!(a.records()[0].outcome, SimOutcome::Cancelled);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(a.records()[0].applied());
        assert!(a.holds_password("default", "vm-0", "root", HASH));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_change_nothing_and_rates_follow_the_seed() {
        let opts = SimAgentOptions {
            failure_rate: 0.3,
            latency: OpLatencies::zero(),
            seed: 42,
            ..Default::default()
        };
        let run = |opts: SimAgentOptions| async move {
            let a = agent(opts);
            let mut failed = Vec::new();
            for i in 0..1000 {
                let d = dom(&format!("vm-{i}"));
                if let Err(e) = a.set_password(&d, &user("root"), &crypted(HASH)).await {
                    assert_eq!(e.reason, ShimErrorReason::AgentNotConnected);
                    assert!(a.password("default", &format!("vm-{i}"), "root").is_none());
                    failed.push(i);
                }
            }
            failed
        };
        let first = run(opts.clone()).await;
        assert!((250..350).contains(&first.len()), "{}", first.len());
        assert_eq!(
            first,
            run(opts.clone()).await,
            "the same seed, the same fates"
        );
        let other = run(SimAgentOptions { seed: 7, ..opts }).await;
        assert_ne!(first, other);
    }

    #[tokio::test(start_paused = true)]
    async fn hang_rate_is_drawn_per_call() {
        let a = agent(SimAgentOptions {
            hang_rate: 0.1,
            latency: OpLatencies::zero(),
            timeout: Duration::from_secs(1),
            seed: 3,
            ..Default::default()
        });
        let t0 = Instant::now();
        let mut hung = 0;
        for i in 0..200 {
            let d = dom(&format!("vm-{i}"));
            if a.get_ssh_keys(&d, &user("root")).await.is_err() {
                hung += 1;
            }
        }
        assert!((10..=35).contains(&hung), "{hung}");
        assert_eq!(t0.elapsed(), Duration::from_secs(hung));
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_appended_without_duplicates_replaced_removed_and_read_in_reverse() {
        let a = agent(SimAgentOptions::default());
        let (d, u) = (dom("vm-0"), user("alice"));
        assert!(a.get_ssh_keys(&d, &u).await.expect("get").is_empty());
        a.add_ssh_keys(&d, &u, &keys(&[KEY_A]), false)
            .await
            .expect("add");
        a.add_ssh_keys(&d, &u, &keys(&[KEY_A, KEY_B]), false)
            .await
            .expect("add");
        assert_eq!(
            a.authorized_keys("default", "vm-0", "alice").await,
            [KEY_A, KEY_B]
        );
        assert_eq!(a.get_ssh_keys(&d, &u).await.expect("get"), [KEY_B, KEY_A]);
        a.remove_ssh_keys(&d, &u, &keys(&[KEY_A]))
            .await
            .expect("remove");
        assert_eq!(a.authorized_keys("default", "vm-0", "alice").await, [KEY_B]);
        a.add_ssh_keys(&d, &u, &keys(&[KEY_A]), true)
            .await
            .expect("replace");
        assert_eq!(a.authorized_keys("default", "vm-0", "alice").await, [KEY_A]);
        let ops: Vec<SimOp> = a.records().iter().map(|r| r.op).collect();
        assert_eq!(
            ops,
            [
                SimOp::GetKeys,
                SimOp::AddKeys,
                SimOp::AddKeys,
                SimOp::GetKeys,
                SimOp::RemoveKeys,
                SimOp::ReplaceKeys
            ]
        );
        assert!(!format!("{:?}", a.records()).contains("AAAAC3"));
    }

    #[tokio::test(start_paused = true)]
    async fn the_file_read_while_a_call_on_the_vm_is_in_progress_is_the_file_not_nothing() {
        let a = Arc::new(agent(SimAgentOptions::default()));
        let (d, u) = (dom("vm-0"), user("alice"));
        a.add_ssh_keys(&d, &u, &keys(&[KEY_A]), false)
            .await
            .expect("add");
        let busy = {
            let (a, d, u) = (a.clone(), d.clone(), u.clone());
            tokio::spawn(async move { a.get_ssh_keys(&d, &u).await })
        };
        // The read takes 1-10 ms of the guest's time: 100 µs in, it holds the VM's channel.
        tokio::time::sleep(Duration::from_micros(100)).await;
        assert_eq!(a.calls_started(), 2);
        assert_eq!(a.records().len(), 1, "the read is still in progress");
        assert_eq!(a.authorized_keys("default", "vm-0", "alice").await, [KEY_A]);
        busy.await.expect("joined").expect("read");
    }

    #[tokio::test(start_paused = true)]
    async fn probe_reports_ssh_support_and_os_and_a_lost_agent_as_not_connected() {
        let a = agent(SimAgentOptions::default());
        let p = a.probe(&dom("vm-0")).await.expect("probe");
        assert!(p.agent_connected && p.supports_ssh_keys() && p.supports_set_password());
        assert_eq!(p.os.and_then(|o| o.id).as_deref(), Some("debian"));
        a.set_behavior("default", "vm-0", Behavior::Disconnected);
        assert!(!a.probe(&dom("vm-0")).await.expect("probe").agent_connected);
        let e = a
            .set_password(&dom("vm-0"), &user("root"), &crypted(HASH))
            .await
            .expect_err("no agent");
        assert_eq!(e.reason, ShimErrorReason::AgentNotConnected);
    }

    #[tokio::test(start_paused = true)]
    async fn unknown_users_and_unknown_domains_are_refused() {
        let a = agent(SimAgentOptions {
            users: Some(["root".to_string()].into()),
            auto_create_domains: false,
            ..Default::default()
        });
        let e = a.probe(&dom("vm-0")).await.expect_err("unknown VM");
        assert_eq!(e.reason, ShimErrorReason::DomainNotFound);
        a.add_domain("default", "vm-0");
        let e = a
            .set_password(&dom("vm-0"), &user("mallory"), &crypted(HASH))
            .await
            .expect_err("unknown user");
        assert_eq!(e.reason, ShimErrorReason::UserNotFound);
        a.set_password(&dom("vm-0"), &user("root"), &crypted(HASH))
            .await
            .expect("root");
        assert_eq!(a.domains(), ["default/vm-0"]);
    }

    /// root's password on vm-0: one call that fails (Internal), then one that succeeds.
    async fn set_root_password_after_a_failure(a: &SimAgent) {
        let (d, root) = (dom("vm-0"), user("root"));
        a.set_behavior("default", "vm-0", Behavior::Fail(ShimErrorReason::Internal));
        a.set_password(&d, &root, &crypted(HASH))
            .await
            .expect_err("fails");
        a.set_behavior("default", "vm-0", Behavior::Normal);
        a.set_password(&d, &root, &crypted(HASH)).await.expect("ok");
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_call_after_a_success_is_reported_and_retries_after_failures_are_not() {
        let a = agent(SimAgentOptions::default());
        let (d, root) = (dom("vm-0"), user("root"));
        set_root_password_after_a_failure(&a).await;
        // Another user and another op are other targets.
        a.set_password(&d, &user("alice"), &crypted(HASH))
            .await
            .expect("ok");
        a.get_ssh_keys(&d, &root).await.expect("get");
        assert!(a.calls_after_success(SimOp::SetPassword).is_empty());
        a.set_password(&d, &root, &crypted(HASH))
            .await
            .expect("again");
        let second = a.calls_after_success(SimOp::SetPassword);
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].user.as_deref(), Some("root"));
        assert_eq!(a.count(SimOp::SetPassword), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn successes_count_only_calls_answered_ok_of_that_op() {
        let a = agent(SimAgentOptions::default());
        let (d, root) = (dom("vm-0"), user("root"));
        set_root_password_after_a_failure(&a).await;
        a.get_ssh_keys(&d, &root).await.expect("get");
        assert_eq!(a.successes(SimOp::SetPassword), 1);
        assert_eq!(a.successes(SimOp::GetKeys), 1);
        assert_eq!(a.successes(SimOp::AddKeys), 0);
    }
}
