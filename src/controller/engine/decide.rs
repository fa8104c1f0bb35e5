//! The engine's decisions, as pure functions of status, spec and the current time: which
//! target starts next and why a run stops, whether there is work, the phase of a stalled
//! object, how a run finishes, when to look again, and how long to wait before a retry.
//! Everything here is unit-tested without a cluster, a socket, a sleep or a clock.
use crate::api::conditions::{self, RunConditions};
use crate::api::{Phase, Reason, RolloutSpec, RunStatus, TargetSpec, TargetState, TargetStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use std::time::Duration;

/// Why a run stops starting targets (calls already in flight still finish).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The object is gone or being deleted.
    Deleted,
    /// The spec changed under the run: reconcile again with the new one.
    SpecChanged,
    /// The input Secret changed under the run: no call with the older value starts; the
    /// run starts again with the newest value.
    InputChanged,
    /// This replica no longer holds the leader Lease: another one drives the object now.
    LostLeadership,
    /// Someone else wrote the object's status since this run last read or wrote it (a
    /// newer leader, or a cache that lagged): that newer state wins, this run stops.
    Superseded,
    /// `spec.paused` was set.
    Paused,
    /// More targets failed than `maxFailures` allows: the rest are skipped.
    FailureBudgetExhausted,
}

impl Stop {
    /// Why, for a target's message.
    pub fn note(self) -> &'static str {
        match self {
            Self::Deleted => "the object was deleted, or an update made its spec unreadable",
            Self::SpecChanged => "the spec changed; the next run uses the new one",
            Self::InputChanged => "the input Secret changed; the next run uses the new value",
            Self::LostLeadership => "this controller replica is no longer the leader",
            Self::Superseded => "the object's status was written by someone else meanwhile",
            Self::Paused => "paused",
            Self::FailureBudgetExhausted => "the failure budget (maxFailures) is exhausted",
        }
    }
}

/// What the scheduler does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Start target `idx`.
    Start(usize),
    /// Start nothing now: wait for a call in flight to finish (or, with none in flight,
    /// the run is over).
    Wait,
    Stop(Stop),
}

/// The latest copy of the object as the scheduler sees it before each start.
#[derive(Clone, Debug)]
pub struct Latest<'a> {
    pub deleting: bool,
    /// Its generation is newer than the one the run started from.
    pub spec_changed: bool,
    /// The input Secret's resourceVersion (in the controller's cache) is not the one the
    /// run read.
    pub input_changed: bool,
    /// This replica holds the leader Lease (always, without leader election).
    pub leading: bool,
    pub rollout: &'a RolloutSpec,
}

/// Whether no agent call may start now for this object (a new target or a retry): it is
/// gone or being deleted, this replica lost the lease, its spec or input changed, or it
/// is paused. Calls already sent finish (or time out).
pub fn halt(latest: Option<&Latest<'_>>) -> Option<Stop> {
    let Some(latest) = latest else {
        return Some(Stop::Deleted);
    };
    if latest.deleting {
        Some(Stop::Deleted)
    } else if !latest.leading {
        Some(Stop::LostLeadership)
    } else if latest.spec_changed {
        Some(Stop::SpecChanged)
    } else if latest.input_changed {
        Some(Stop::InputChanged)
    } else if latest.rollout.paused {
        Some(Stop::Paused)
    } else {
        None
    }
}

/// The next step of a run: checks the object ([`halt`]), the failure budget and the
/// concurrency limit, then picks the first unfinished target at or after `cursor`
/// (targets before it were started already).
pub fn next_step(
    latest: Option<&Latest<'_>>,
    targets: &[TargetStatus],
    cursor: usize,
    in_flight: usize,
    failed: usize,
) -> Next {
    if let Some(stop) = halt(latest) {
        return Next::Stop(stop);
    }
    let Some(latest) = latest else {
        return Next::Stop(Stop::Deleted);
    };
    if failed > latest.rollout.max_failures as usize {
        return Next::Stop(Stop::FailureBudgetExhausted);
    }
    if in_flight >= latest.rollout.max_concurrency.max(1) as usize {
        return Next::Wait;
    }
    targets
        .iter()
        .enumerate()
        .skip(cursor)
        .find(|(_, t)| !t.state.is_terminal())
        .map_or(Next::Wait, |(idx, _)| Next::Start(idx))
}

/// A run to start (the input changed) or to continue (unfinished targets).
pub fn has_work(status: &RunStatus, hash: &str) -> bool {
    status.input_hash.as_deref() != Some(hash) || status.unfinished() > 0
}

/// Whether a finished run's input is known unchanged without reading it: the spec is the
/// one the run saw, and the input Secret's resourceVersion in the controller's cache is the
/// one the run recorded. Anything unknown (no Secret, no cache entry) means "read it".
pub fn input_unchanged_since_run(
    status: &RunStatus,
    generation: Option<i64>,
    cached_secret_version: Option<&str>,
) -> bool {
    let Some(recorded) = status.input_secret_version.as_deref() else {
        return false;
    };
    status.input_hash.is_some()
        && status.unfinished() == 0
        && status.observed_generation == generation
        && cached_secret_version == Some(recorded)
}

/// `spec.target` may not change once a run froze its targets.
pub fn target_unchanged(status: &RunStatus, current: &TargetSpec) -> Result<(), String> {
    match &status.target_spec {
        Some(started) if started != current => Err(
            "spec.target is immutable once a run started; create a new object for other VMs".into(),
        ),
        _ => Ok(()),
    }
}

/// The phase of an object stalled for `reason`, when none of its targets finished yet:
/// waiting for something that may appear by itself (a Secret, a matching VM) is Pending,
/// a spec the user must edit is Failed. `None`: keep the phase its targets give.
pub fn stalled_phase(reason: Reason, status: &RunStatus) -> Option<Phase> {
    if status.finished_targets() > 0 {
        return None;
    }
    let waiting = matches!(
        reason,
        Reason::SecretNotFound | Reason::SecretKeyMissing | Reason::NoTargets
    );
    Some(if waiting {
        Phase::Pending
    } else {
        Phase::Failed
    })
}

/// "finished/total" for messages (skipped and failed targets are finished too).
pub fn progress_message(status: &RunStatus) -> String {
    let s = &status.summary;
    format!(
        "{}/{} targets finished",
        s.succeeded + s.failed + s.skipped,
        s.total
    )
}

/// Recount, then set phase-derived Ready/Progressing/Stalled with one reason and message.
/// A run that is not over is Progressing, unless it stopped for `Paused`.
pub fn finish(status: &mut RunStatus, generation: Option<i64>, stop: Option<Stop>, now: &Time) {
    status.recount();
    let s = status.summary.clone();
    let (ready, progressing, reason, msg) = match status.phase {
        Some(Phase::Succeeded) => (
            true,
            false,
            Reason::Succeeded,
            format!("all {} targets succeeded", s.total),
        ),
        Some(Phase::PartiallySucceeded) => (
            false,
            false,
            Reason::PartiallySucceeded,
            format!(
                "{} of {} targets succeeded, {} failed, {} skipped",
                s.succeeded, s.total, s.failed, s.skipped
            ),
        ),
        Some(Phase::Failed) => (
            false,
            false,
            Reason::Failed,
            format!("{} failed, {} skipped of {}", s.failed, s.skipped, s.total),
        ),
        _ if stop == Some(Stop::Paused) => (
            false,
            false,
            Reason::Paused,
            "paused: no new targets are started".to_string(),
        ),
        _ => (false, true, Reason::InProgress, progress_message(status)),
    };
    let stalled = matches!(status.phase, Some(Phase::Failed));
    conditions::set_run_conditions(
        &mut status.conditions,
        RunConditions {
            ready,
            progressing,
            stalled,
        },
        reason.as_str(),
        &msg,
        generation,
        now,
    );
}

/// Mark every target not started yet as skipped by the failure budget; returns how many.
pub fn skip_pending(targets: &mut [TargetStatus], from: usize) -> usize {
    let mut skipped = 0;
    for t in targets.iter_mut().skip(from) {
        if t.state == TargetState::Pending {
            t.state = TargetState::Skipped;
            t.reason = Some(Reason::FailureBudgetExhausted.as_str().into());
            t.message = Some("not started: the failure budget (maxFailures) is exhausted".into());
            skipped += 1;
        }
    }
    skipped
}

/// The sooner of two optional waits.
pub fn sooner(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// The longest wait for a rotation: a schedule's next time may be years away (`0 0 29 2 *`),
/// further than the runtime's timers reach; the object is looked at again meanwhile.
pub const ROTATION_RECHECK: Duration = Duration::from_secs(3600);

/// How long until the next scheduled rotation, if the object rotates (at most
/// [`ROTATION_RECHECK`]).
pub fn rotation_due_in(status: &RunStatus, now: Timestamp) -> Option<Duration> {
    let next = status.next_rotation.as_ref()?;
    // A moment after the interval begins, so the new interval is the one computed.
    Some((remaining(next.0, now) + Duration::from_millis(200)).min(ROTATION_RECHECK))
}

/// Progress Events of a long run come at most this often.
pub const PROGRESS_EVENT_EVERY: Duration = Duration::from_secs(30);

/// Whether a running run publishes a progress Event now: only runs with more targets than
/// the per-target Event cap (a smaller run's per-target Events tell it all), and at most
/// one per [`PROGRESS_EVENT_EVERY`].
pub fn progress_event_due(targets: usize, event_cap: u32, since_last: Duration) -> bool {
    targets > event_cap as usize && since_last >= PROGRESS_EVENT_EVERY
}

/// A progress Event's note: counts, and the rate since the run started.
pub fn progress_note(s: &crate::api::Summary, elapsed: Duration) -> String {
    let done = s.succeeded + s.failed + s.skipped;
    let rate = f64::from(done) / elapsed.as_secs_f64().max(0.001);
    format!(
        "{done}/{} targets finished ({} succeeded, {} failed, {} skipped), {rate:.0} targets/s",
        s.total, s.succeeded, s.failed, s.skipped
    )
}

/// How a status write ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    Done,
    /// Someone else wrote the status since our basis: nothing was written.
    Superseded,
    /// The object is gone.
    Gone,
}

/// When the engine looks at an object again after a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requeue {
    After(Duration),
    /// Only when the object (or a watched input) changes.
    OnChange,
}

/// After a run: a changed spec or input is picked up at once; a paused object waits for
/// its spec; a replica whose leadership was not confirmed looks again in a few seconds (a
/// replica that really lost the lease stops its controllers anyway); a run that
/// found newer state than its own (a status or shard written by someone else) looks again
/// from a fresh read in a few seconds (a shard's change does not trigger a reconcile);
/// unfinished targets (e.g. the object was gone mid-run) are looked at again in a few
/// seconds; otherwise the next TTL expiry, if any.
pub fn requeue_after_run(
    stop: Option<Stop>,
    unfinished: bool,
    next_expiry: Option<Duration>,
) -> Requeue {
    match stop {
        Some(Stop::SpecChanged | Stop::InputChanged) => Requeue::After(Duration::from_millis(100)),
        Some(Stop::Paused) => Requeue::OnChange,
        // Leadership not confirmed at a call: if the Lease is really gone this replica's
        // controllers stop anyway; if it was only about to be renewed, this replica must
        // come back to the object (no other replica can take it over meanwhile).
        Some(Stop::LostLeadership) => Requeue::After(Duration::from_secs(2)),
        Some(Stop::Superseded) => Requeue::After(Duration::from_secs(2)),
        _ if unfinished => Requeue::After(Duration::from_secs(5)),
        _ => next_expiry.map_or(Requeue::OnChange, Requeue::After),
    }
}

/// The TTL grants of a run's targets that must outlive the run when a new one replaces its
/// targets: succeeded, with an `expiresAt`, not expired yet.
pub fn carry_expiries(targets: &[TargetStatus]) -> Vec<crate::api::PendingExpiry> {
    targets
        .iter()
        .filter(|t| t.state == TargetState::Succeeded && !t.keys.is_empty())
        .filter(|t| t.reason.as_deref() != Some(Reason::Expired.as_str()))
        .filter_map(|t| {
            Some(crate::api::PendingExpiry {
                vm: t.vm.clone(),
                user: t.user.clone(),
                keys: t.keys.clone(),
                expires_at: t.expires_at.clone()?,
            })
        })
        .collect()
}

/// The keys of a pending expiry to remove now: minus those the current run grants for
/// longer on the same VM and user (no TTL, or a later one).
pub fn keys_to_expire(
    pending: &crate::api::PendingExpiry,
    current: &[TargetStatus],
) -> Vec<String> {
    let kept: std::collections::BTreeSet<&String> = current
        .iter()
        .filter(|t| t.vm == pending.vm && t.user == pending.user)
        .filter(|t| t.state != TargetState::Failed && t.state != TargetState::Skipped)
        .filter(|t| t.reason.as_deref() != Some(Reason::Expired.as_str()))
        .filter(|t| {
            t.expires_at
                .as_ref()
                .is_none_or(|at| at.0 > pending.expires_at.0)
        })
        .flat_map(|t| t.keys.iter())
        .collect();
    pending
        .keys
        .iter()
        .filter(|k| !kept.contains(k))
        .cloned()
        .collect()
}

/// Where a succeeded target stands with its TTL (`expiresAt`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// No TTL, not succeeded, or already expired.
    None,
    DueIn(Duration),
    Due,
}

pub fn expiry(target: &TargetStatus, now: Timestamp) -> Expiry {
    let Some(at) = &target.expires_at else {
        return Expiry::None;
    };
    if target.state != TargetState::Succeeded
        || target.reason.as_deref() == Some(Reason::Expired.as_str())
    {
        return Expiry::None;
    }
    match remaining(at.0, now) {
        left if left.is_zero() => Expiry::Due,
        left => Expiry::DueIn(left),
    }
}

/// Time from `now` until `at`, zero once it passed.
pub fn remaining(at: Timestamp, now: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(now)).unwrap_or(Duration::ZERO)
}

/// A target's deadline, counted from its first start (a restart does not extend it).
pub fn deadline(started: Timestamp, deadline_seconds: u32) -> Timestamp {
    started + Duration::from_secs(deadline_seconds.into())
}

/// The wait before the next attempt after a transient failure: "equal jitter" on the
/// current backoff (half of it fixed, half spread by `jitter` in [0, 1)), so a thousand
/// targets failing together do not retry in lockstep; never past the deadline.
pub fn retry_wait(backoff: Duration, jitter: f64, remaining: Duration) -> Duration {
    let jitter = if jitter.is_finite() {
        jitter.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let half = backoff / 2;
    (half + half.mul_f64(jitter)).min(remaining)
}

/// Per-target Events of one run, capped: the first `limit` are published one by one; the
/// rest are counted per reason and published once each when the run ends, so a bulk run
/// over 100,000 VMs writes a bounded number of Events.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    limit: u32,
    sent: u32,
    held: std::collections::BTreeMap<String, u32>,
}

impl EventBudget {
    pub fn new(limit: u32) -> Self {
        Self {
            limit,
            ..Self::default()
        }
    }

    /// The budget of a run taken up again (by a restarted controller, or after a
    /// superseded write) with targets it already ended: each of those used one admission
    /// when it ended, so the ended targets are admitted again, in target order, before any
    /// new one, and a restart never publishes a second batch. The totals are exact; how
    /// the held ones split over reasons follows target order, not the order they ended in.
    pub fn resumed<'a>(limit: u32, ended: impl IntoIterator<Item = &'a str>) -> Self {
        let mut budget = Self::new(limit);
        for reason in ended {
            budget.admit(reason);
        }
        budget
    }

    /// Whether a per-target Event with `reason` is published now (else it is counted).
    pub fn admit(&mut self, reason: &str) -> bool {
        if self.sent < self.limit {
            self.sent += 1;
            true
        } else {
            *self.held.entry(reason.to_string()).or_default() += 1;
            false
        }
    }

    /// The held Events: how many per reason, to publish as one Event each.
    pub fn held(&self) -> impl Iterator<Item = (&str, u32)> {
        self.held.iter().map(|(r, n)| (r.as_str(), *n))
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }
}

/// Whether a drive that ends publishes the per-target Events its budget held back: when
/// the run has ended (no unfinished target, or it stops for good: deleted, out of failure
/// budget, replaced by a run with the newer input). A run that another drive takes up
/// again (a new leader, a newer status, a pause, a spec change) leaves them: that drive
/// counts the ended targets again (`EventBudget::resumed`) and publishes them all once, at
/// the run's end. (A spec change that also changes the input starts a new run, and the
/// old run's held counts go unpublished; status and metrics still count every target.)
pub fn held_events_due(stop: Option<Stop>, superseded: bool, unfinished: usize) -> bool {
    if superseded {
        return false;
    }
    unfinished == 0
        || matches!(
            stop,
            Some(Stop::Deleted | Stop::FailureBudgetExhausted | Stop::InputChanged)
        )
}

/// Exponential backoff: doubles, up to `max`.
pub fn next_backoff(backoff: Duration, max: Duration) -> Duration {
    backoff.saturating_mul(2).min(max)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failures(ts: &[TargetStatus]) -> usize {
        ts.iter().filter(|t| t.state == TargetState::Failed).count()
    }

    fn of_targets(ts: &[TargetStatus]) -> RunStatus {
        RunStatus {
            targets: ts.to_vec(),
            ..RunStatus::default()
        }
    }
    use crate::api::Summary;

    fn target(state: TargetState) -> TargetStatus {
        TargetStatus {
            vm: "vm".into(),
            state,
            ..TargetStatus::default()
        }
    }

    fn targets(states: &[TargetState]) -> Vec<TargetStatus> {
        states.iter().copied().map(target).collect()
    }

    fn rollout(max_concurrency: u32, max_failures: u32) -> RolloutSpec {
        RolloutSpec {
            max_concurrency,
            max_failures,
            ..RolloutSpec::default()
        }
    }

    fn latest(rollout: &RolloutSpec) -> Latest<'_> {
        Latest {
            deleting: false,
            spec_changed: false,
            input_changed: false,
            leading: true,
            rollout,
        }
    }

    fn at(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).expect("valid")
    }

    use TargetState::{Failed, Pending, Running, Skipped, Succeeded};

    /// The next step for an object as `latest` says, of a run of targets in `states`,
    /// with the cursor at `cursor` and `in_flight` targets running.
    fn step(
        latest: Option<&Latest>,
        states: &[TargetState],
        cursor: usize,
        in_flight: usize,
    ) -> Next {
        let ts = targets(states);
        next_step(latest, &ts, cursor, in_flight, failures(&ts))
    }

    /// [`step`] for a leading object with `rollout` and no change.
    fn step_of(
        rollout: &RolloutSpec,
        states: &[TargetState],
        cursor: usize,
        in_flight: usize,
    ) -> Next {
        step(Some(&latest(rollout)), states, cursor, in_flight)
    }

    /// [`step`] for one pending target of an object with `rollout`, changed as `change` says.
    fn step_when(rollout: &RolloutSpec, change: impl FnOnce(&mut Latest)) -> Next {
        let mut changed = latest(rollout);
        change(&mut changed);
        step(Some(&changed), &[Pending], 0, 0)
    }

    fn paused() -> RolloutSpec {
        RolloutSpec {
            paused: true,
            ..rollout(10, 0)
        }
    }

    #[test]
    fn the_first_unfinished_target_at_or_after_the_cursor_starts_next() {
        let ts = [Succeeded, Running, Pending, Pending];
        assert_eq!(step_of(&rollout(10, 0), &ts, 2, 1), Next::Start(2));
    }

    #[test]
    fn a_target_before_the_cursor_is_not_started_again() {
        let ts = [Running, Succeeded];
        assert_eq!(step_of(&rollout(10, 0), &ts, 1, 1), Next::Wait);
    }

    #[test]
    fn nothing_starts_beyond_max_concurrency() {
        let ts = [Running, Running, Pending];
        assert_eq!(step_of(&rollout(2, 0), &ts, 2, 2), Next::Wait);
    }

    #[test]
    fn a_zero_concurrency_still_runs_one_target_at_a_time() {
        assert_eq!(step_of(&rollout(0, 0), &[Pending], 0, 0), Next::Start(0));
    }

    #[test]
    fn a_deleted_or_deleting_object_starts_nothing() {
        assert_eq!(step(None, &[Pending], 0, 0), Next::Stop(Stop::Deleted));
        let deleting = step_when(&rollout(10, 0), |l| l.deleting = true);
        assert_eq!(deleting, Next::Stop(Stop::Deleted));
    }

    #[test]
    fn a_changed_spec_stops_the_run_before_pause_is_considered() {
        let changed = step_when(&paused(), |l| l.spec_changed = true);
        assert_eq!(changed, Next::Stop(Stop::SpecChanged));
    }

    #[test]
    fn a_changed_input_secret_stops_the_run() {
        let changed = step_when(&rollout(10, 0), |l| l.input_changed = true);
        assert_eq!(changed, Next::Stop(Stop::InputChanged));
    }

    #[test]
    fn a_replica_without_the_lease_starts_nothing_whatever_else_holds() {
        let r = paused();
        let follower = Latest {
            leading: false,
            spec_changed: true,
            input_changed: true,
            ..latest(&r)
        };
        assert_eq!(halt(Some(&follower)), Some(Stop::LostLeadership));
    }

    #[test]
    fn nothing_halts_a_leading_unchanged_unpaused_object() {
        let r = rollout(10, 0);
        assert_eq!(halt(Some(&latest(&r))), None);
    }

    #[test]
    fn a_paused_object_starts_nothing() {
        assert_eq!(
            step_of(&paused(), &[Pending], 0, 0),
            Next::Stop(Stop::Paused)
        );
    }

    #[test]
    fn failures_up_to_the_budget_keep_the_run_going() {
        let ts = [Failed, Pending];
        assert_eq!(step_of(&rollout(10, 1), &ts, 1, 0), Next::Start(1));
    }

    #[test]
    fn one_failure_past_the_budget_stops_the_run() {
        let ts = [Failed, Failed, Pending];
        assert_eq!(
            step_of(&rollout(10, 1), &ts, 2, 0),
            Next::Stop(Stop::FailureBudgetExhausted)
        );
    }

    #[test]
    fn skipping_marks_only_targets_not_started() {
        let mut ts = targets(&[Failed, Running, Pending, Pending]);
        assert_eq!(skip_pending(&mut ts, 1), 2);
        let states: Vec<_> = ts.iter().map(|t| t.state).collect();
        assert_eq!(states, [Failed, Running, Skipped, Skipped]);
        assert_eq!(ts[2].reason.as_deref(), Some("FailureBudgetExhausted"));
    }

    fn status(hash: Option<&str>, states: &[TargetState]) -> RunStatus {
        RunStatus {
            input_hash: hash.map(Into::into),
            targets: targets(states),
            ..RunStatus::default()
        }
    }

    #[test]
    fn a_new_input_is_work() {
        assert!(has_work(&status(Some("old"), &[Succeeded]), "new"));
        assert!(has_work(&status(None, &[]), "new"));
    }

    #[test]
    fn an_unfinished_target_is_work() {
        assert!(has_work(&status(Some("h"), &[Succeeded, Running]), "h"));
    }

    #[test]
    fn a_finished_run_of_the_same_input_is_no_work() {
        assert!(!has_work(
            &status(Some("h"), &[Succeeded, Failed, Skipped]),
            "h"
        ));
    }

    fn finished_with_secret(version: &str, generation: i64) -> RunStatus {
        RunStatus {
            input_secret_version: Some(version.into()),
            observed_generation: Some(generation),
            ..status(Some("h"), &[Succeeded])
        }
    }

    #[test]
    fn a_finished_run_whose_secret_kept_its_version_is_unchanged() {
        let st = finished_with_secret("7", 2);
        assert!(input_unchanged_since_run(&st, Some(2), Some("7")));
    }

    #[test]
    fn a_new_secret_version_a_new_generation_or_an_empty_cache_mean_read_it() {
        let st = finished_with_secret("7", 2);
        assert!(!input_unchanged_since_run(&st, Some(2), Some("8")));
        assert!(!input_unchanged_since_run(&st, Some(3), Some("7")));
        assert!(!input_unchanged_since_run(&st, Some(2), None));
    }

    #[test]
    fn an_unfinished_run_or_one_without_a_secret_is_never_known_unchanged() {
        let mut running = finished_with_secret("7", 2);
        running.targets[0].state = Running;
        assert!(!input_unchanged_since_run(&running, Some(2), Some("7")));
        let inline = status(Some("h"), &[Succeeded]);
        assert!(!input_unchanged_since_run(&inline, None, None));
    }

    #[test]
    fn the_target_may_not_change_once_a_run_froze_it() {
        let a = TargetSpec {
            vm_name: Some("a".into()),
            selector: None,
        };
        let b = TargetSpec {
            vm_name: Some("b".into()),
            selector: None,
        };
        let mut st = RunStatus::default();
        assert!(target_unchanged(&st, &b).is_ok());
        st.target_spec = Some(a.clone());
        assert!(target_unchanged(&st, &a).is_ok());
        let err = target_unchanged(&st, &b).expect_err("changed target");
        assert!(err.contains("immutable"), "{err}");
    }

    #[test]
    fn waiting_for_an_input_or_a_vm_is_pending_and_a_bad_spec_is_failed() {
        let ts = targets(&[Pending]);
        for waiting in [
            Reason::SecretNotFound,
            Reason::SecretKeyMissing,
            Reason::NoTargets,
        ] {
            assert_eq!(
                stalled_phase(waiting, &of_targets(&ts)),
                Some(Phase::Pending)
            );
        }
        assert_eq!(
            stalled_phase(Reason::InvalidSpec, &of_targets(&ts)),
            Some(Phase::Failed)
        );
    }

    #[test]
    fn a_stall_after_some_targets_finished_keeps_their_phase() {
        let ts = targets(&[Succeeded, Pending]);
        assert_eq!(
            stalled_phase(Reason::SecretNotFound, &of_targets(&ts)),
            None
        );
    }

    fn condition<'a>(st: &'a RunStatus, type_: &str) -> (&'a str, &'a str) {
        let c = st
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .expect("condition");
        (c.status.as_str(), c.reason.as_str())
    }

    /// The status of a run of targets in `states` once [`finish`] ran, stopped for `stop`.
    fn finished(states: &[TargetState], stop: Option<Stop>) -> RunStatus {
        let mut st = status(Some("h"), states);
        finish(&mut st, None, stop, &Time(at(0)));
        st
    }

    #[test]
    fn an_all_succeeded_run_finishes_ready() {
        let mut st = status(Some("h"), &[Succeeded, Succeeded]);
        finish(&mut st, Some(3), None, &Time(at(0)));
        assert_eq!(st.phase, Some(Phase::Succeeded));
        assert_eq!(condition(&st, "Ready"), ("True", "Succeeded"));
        assert_eq!(condition(&st, "Progressing"), ("False", "Succeeded"));
        assert_eq!(condition(&st, "Stalled"), ("False", "Succeeded"));
        assert_eq!(st.conditions[0].observed_generation, Some(3));
        assert_eq!(
            st.summary,
            Summary {
                total: 2,
                succeeded: 2,
                ..Summary::default()
            }
        );
    }

    #[test]
    fn a_run_with_no_success_finishes_failed_and_stalled() {
        let st = finished(&[Failed, Skipped], Some(Stop::FailureBudgetExhausted));
        assert_eq!(st.phase, Some(Phase::Failed));
        assert_eq!(condition(&st, "Ready"), ("False", "Failed"));
        assert_eq!(condition(&st, "Stalled"), ("True", "Failed"));
    }

    #[test]
    fn a_mixed_run_finishes_partially_succeeded_and_not_stalled() {
        let st = finished(&[Succeeded, Failed], None);
        assert_eq!(st.phase, Some(Phase::PartiallySucceeded));
        assert_eq!(condition(&st, "Ready"), ("False", "PartiallySucceeded"));
        assert_eq!(condition(&st, "Stalled"), ("False", "PartiallySucceeded"));
    }

    #[test]
    fn a_paused_run_is_neither_ready_nor_progressing() {
        let st = finished(&[Succeeded, Pending], Some(Stop::Paused));
        assert_eq!(condition(&st, "Ready"), ("False", "Paused"));
        assert_eq!(condition(&st, "Progressing"), ("False", "Paused"));
    }

    #[test]
    fn an_unfinished_run_is_progressing_with_its_count() {
        let st = finished(&[Succeeded, Running, Pending], None);
        assert_eq!(condition(&st, "Progressing"), ("True", "InProgress"));
        let msg = &st.conditions[1].message;
        assert_eq!(msg, "1/3 targets finished");
    }

    #[test]
    fn finishing_twice_keeps_the_transition_time() {
        let mut st = status(Some("h"), &[Succeeded]);
        finish(&mut st, None, None, &Time(at(0)));
        finish(&mut st, None, None, &Time(at(60)));
        assert_eq!(st.conditions[0].last_transition_time, Time(at(0)));
    }

    /// When an object whose run stopped for `stop`, with work left and no expiry due, is
    /// looked at again.
    fn requeue_after(stop: Stop) -> Requeue {
        requeue_after_run(Some(stop), true, None)
    }

    fn after_seconds(seconds: u64) -> Requeue {
        Requeue::After(Duration::from_secs(seconds))
    }

    #[test]
    fn a_changed_spec_or_input_is_picked_up_at_once() {
        for stop in [Stop::SpecChanged, Stop::InputChanged] {
            assert_eq!(
                requeue_after(stop),
                Requeue::After(Duration::from_millis(100))
            );
        }
    }

    #[test]
    fn a_run_stopped_for_unconfirmed_leadership_is_looked_at_again_soon() {
        // The replica may still hold the Lease (its renewal was only about to run out):
        // waiting for a change would leave the object unfinished with nobody to drive it.
        assert_eq!(requeue_after(Stop::LostLeadership), after_seconds(2));
    }

    #[test]
    fn a_superseded_run_looks_again_from_a_fresh_read_soon() {
        assert_eq!(requeue_after(Stop::Superseded), after_seconds(2));
    }

    #[test]
    fn a_paused_object_waits_for_its_spec_even_with_work_left() {
        assert_eq!(
            requeue_after_run(Some(Stop::Paused), true, Some(Duration::from_secs(1))),
            Requeue::OnChange
        );
    }

    #[test]
    fn unfinished_targets_are_looked_at_again_soon() {
        assert_eq!(requeue_after(Stop::Deleted), after_seconds(5));
    }

    #[test]
    fn a_finished_run_waits_for_its_next_expiry_or_a_change() {
        let ttl = Duration::from_secs(3600);
        assert_eq!(
            requeue_after_run(None, false, Some(ttl)),
            Requeue::After(ttl)
        );
        assert_eq!(requeue_after_run(None, false, None), Requeue::OnChange);
    }

    fn with_ttl(state: TargetState, expires: Timestamp, reason: Option<&str>) -> TargetStatus {
        TargetStatus {
            expires_at: Some(Time(expires)),
            reason: reason.map(Into::into),
            ..target(state)
        }
    }

    #[test]
    fn a_grant_expires_when_its_time_comes() {
        let t = with_ttl(Succeeded, at(100), Some("Verified"));
        assert_eq!(expiry(&t, at(40)), Expiry::DueIn(Duration::from_secs(60)));
        assert_eq!(expiry(&t, at(100)), Expiry::Due);
        assert_eq!(expiry(&t, at(500)), Expiry::Due);
    }

    #[test]
    fn an_expired_a_failed_or_a_ttl_less_target_has_no_expiry() {
        assert_eq!(
            expiry(&with_ttl(Succeeded, at(0), Some("Expired")), at(9)),
            Expiry::None
        );
        assert_eq!(expiry(&with_ttl(Failed, at(0), None), at(9)), Expiry::None);
        assert_eq!(expiry(&target(Succeeded), at(9)), Expiry::None);
    }

    #[test]
    fn a_new_run_carries_the_unexpired_grants_of_the_old_one() {
        let granted = TargetStatus {
            keys: vec!["SHA256:a".into()],
            ..with_ttl(Succeeded, at(100), Some("Verified"))
        };
        let expired = TargetStatus {
            keys: vec!["SHA256:b".into()],
            ..with_ttl(Succeeded, at(0), Some("Expired"))
        };
        let permanent = TargetStatus {
            keys: vec!["SHA256:c".into()],
            ..target(Succeeded)
        };
        let carried = carry_expiries(&[granted, expired, permanent]);
        assert_eq!(carried.len(), 1);
        assert_eq!(carried[0].keys, ["SHA256:a"]);
        assert_eq!(carried[0].expires_at, Time(at(100)));
    }

    #[test]
    fn a_pending_expiry_spares_keys_the_current_run_grants_for_longer() {
        let pending = crate::api::PendingExpiry {
            vm: "vm".into(),
            user: None,
            keys: vec!["SHA256:a".into(), "SHA256:b".into(), "SHA256:c".into()],
            expires_at: Time(at(100)),
        };
        let forever = TargetStatus {
            keys: vec!["SHA256:a".into()],
            ..target(Succeeded)
        };
        let sooner = TargetStatus {
            keys: vec!["SHA256:b".into()],
            ..with_ttl(Succeeded, at(50), Some("Verified"))
        };
        assert_eq!(
            keys_to_expire(&pending, &[forever, sooner]),
            ["SHA256:b", "SHA256:c"]
        );
    }

    #[test]
    fn the_deadline_counts_from_the_first_start() {
        assert_eq!(deadline(at(0), 300), at(300));
        assert_eq!(remaining(at(300), at(100)), Duration::from_secs(200));
        assert_eq!(remaining(at(300), at(301)), Duration::ZERO);
    }

    #[test]
    fn retries_wait_between_half_and_all_of_the_backoff() {
        let b = Duration::from_secs(8);
        let long = Duration::from_secs(100);
        assert_eq!(retry_wait(b, 0.0, long), Duration::from_secs(4));
        assert_eq!(retry_wait(b, 0.5, long), Duration::from_secs(6));
        assert!(retry_wait(b, 0.999, long) < b);
    }

    #[test]
    fn jittered_waits_of_many_targets_spread_out() {
        let b = Duration::from_secs(8);
        let long = Duration::from_secs(100);
        let waits: std::collections::BTreeSet<Duration> = (0..100)
            .map(|i| retry_wait(b, f64::from(i) / 100.0, long))
            .collect();
        assert_eq!(waits.len(), 100, "no two of 100 targets retry at once");
    }

    #[test]
    fn a_retry_never_waits_past_the_deadline() {
        let b = Duration::from_secs(8);
        assert_eq!(
            retry_wait(b, 0.9, Duration::from_secs(1)),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn a_nonsense_jitter_value_falls_back_to_half_the_backoff() {
        let b = Duration::from_secs(8);
        let long = Duration::from_secs(100);
        assert_eq!(retry_wait(b, f64::NAN, long), Duration::from_secs(4));
        assert_eq!(retry_wait(b, 7.0, long), b);
    }

    #[test]
    fn per_target_events_beyond_the_cap_are_counted_per_reason() {
        let mut b = EventBudget::new(2);
        assert!(b.admit("Applied"));
        assert!(b.admit("UserNotFound"));
        assert!(!b.admit("Applied"));
        assert!(!b.admit("Applied"));
        assert!(!b.admit("UserNotFound"));
        let held: Vec<(&str, u32)> = b.held().collect();
        assert_eq!(held, [("Applied", 2), ("UserNotFound", 1)]);
    }

    #[test]
    fn a_resumed_run_counts_its_ended_targets_against_the_cap() {
        let mut b = EventBudget::resumed(2, ["Applied", "Applied", "UserNotFound"]);
        assert!(!b.admit("Applied"), "the cap was used before the restart");
        let held: Vec<(&str, u32)> = b.held().collect();
        assert_eq!(held, [("Applied", 1), ("UserNotFound", 1)]);
        let mut fresh = EventBudget::resumed(2, []);
        assert!(
            fresh.admit("Applied"),
            "a run that ended nothing starts with the cap"
        );
    }

    #[test]
    fn held_events_are_published_once_when_the_run_ends_and_not_when_it_continues_elsewhere() {
        assert!(held_events_due(None, false, 0), "the run ended");
        assert!(held_events_due(
            Some(Stop::FailureBudgetExhausted),
            false,
            3
        ));
        assert!(held_events_due(Some(Stop::Deleted), false, 3));
        assert!(
            held_events_due(Some(Stop::InputChanged), false, 3),
            "a new run"
        );
        for goes_on in [
            Stop::LostLeadership,
            Stop::Superseded,
            Stop::Paused,
            Stop::SpecChanged,
        ] {
            assert!(!held_events_due(Some(goes_on), false, 3), "{goes_on:?}");
        }
        assert!(
            !held_events_due(None, true, 0),
            "a newer status owns the run"
        );
    }

    #[test]
    fn a_zero_cap_publishes_no_per_target_event() {
        let mut b = EventBudget::new(0);
        assert!(!b.admit("Applied"));
        assert_eq!(b.held().count(), 1);
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let max = Duration::from_secs(30);
        assert_eq!(
            next_backoff(Duration::from_secs(1), max),
            Duration::from_secs(2)
        );
        assert_eq!(next_backoff(Duration::from_secs(20), max), max);
        assert_eq!(next_backoff(Duration::MAX, max), max);
    }

    #[test]
    fn a_large_run_publishes_progress_at_most_every_30_seconds() {
        assert!(!progress_event_due(5_000, 20, Duration::from_secs(29)));
        assert!(progress_event_due(5_000, 20, Duration::from_secs(30)));
    }

    #[test]
    fn a_run_within_the_per_target_event_cap_publishes_no_progress() {
        assert!(!progress_event_due(20, 20, Duration::from_secs(3600)));
    }

    #[test]
    fn a_progress_note_gives_counts_and_rate() {
        let s = crate::api::Summary {
            total: 5_000,
            succeeded: 2_490,
            failed: 10,
            skipped: 0,
            pending: 2_000,
            running: 500,
        };
        assert_eq!(
            progress_note(&s, Duration::from_secs(10)),
            "2500/5000 targets finished (2490 succeeded, 10 failed, 0 skipped), 250 targets/s"
        );
    }

    #[test]
    fn an_object_rotating_is_looked_at_again_when_the_next_interval_begins() {
        let now = Timestamp::from_second(1_800_000_000).expect("time");
        let status = RunStatus {
            next_rotation: Some(Time(now + Duration::from_secs(30))),
            ..RunStatus::default()
        };
        assert_eq!(
            rotation_due_in(&status, now),
            Some(Duration::from_millis(30_200))
        );
        assert_eq!(rotation_due_in(&RunStatus::default(), now), None);
        assert_eq!(
            sooner(Some(Duration::from_secs(5)), rotation_due_in(&status, now)),
            Some(Duration::from_secs(5))
        );
    }

    #[test]
    fn a_rotation_years_away_is_looked_at_again_within_the_hour() {
        let now = Timestamp::from_second(1_800_000_000).expect("time");
        let status = RunStatus {
            next_rotation: Some(Time(Timestamp::MAX)),
            ..RunStatus::default()
        };
        assert_eq!(rotation_due_in(&status, now), Some(ROTATION_RECHECK));
    }
}
