//! Writing what the engine decided: the object's status (batched while a run goes on),
//! the Stalled condition, and Events.
use super::decide;
use super::shards::{self as store, ShardSet, ShardWrite};
use super::{RunKind, now};
use crate::api::conditions::{self, RunConditions, STALLED};
use crate::api::shards;
use crate::api::{RunStatus, Tally, TargetState, TargetStatus};
use crate::controller::context::Context;
use crate::controller::error::Error;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, ResourceExt};
use std::sync::{Arc, Mutex, MutexGuard};
use tracing::warn;

/// What a status write is computed from: the object's resourceVersion and status as this
/// controller last read or wrote them. Every write carries that resourceVersion, so it can
/// never land over newer state: the API server refuses it (409) when anything changed.
#[derive(Clone, Debug, Default)]
pub(super) struct Basis {
    pub resource_version: Option<String>,
    pub status: Option<RunStatus>,
}

impl Basis {
    pub fn of<K: RunKind>(obj: &K) -> Self {
        Self {
            resource_version: obj.meta().resource_version.clone(),
            status: obj.run_status().cloned(),
        }
    }
}

pub(super) use super::decide::Written;

/// One run's status, shared between the target tasks and the status flusher.
pub(super) struct RunState {
    /// Every target's record (the stored form of a large run lists only some: see
    /// `api::shards`).
    pub status: RunStatus,
    /// Changed since the last write.
    pub dirty: bool,
    pub basis: Basis,
    /// A write found newer status from someone else: start no more agent calls.
    pub superseded: bool,
    pub events: decide::EventBudget,
    /// Where a large run's records are stored; `None`: in status.
    pub shards: Option<ShardSet>,
    /// Targets failed so far (the failure budget is checked before each start).
    pub failed: usize,
    /// Shards no status will name once the next write is done (a replaced run's): deleted
    /// after it.
    pub retired: Vec<String>,
    /// `status.targets` counted, kept up to date by [`RunState::update`]: a status write
    /// takes its counts and listed targets from here instead of walking every record.
    tally: Tally,
}

impl RunState {
    pub fn new(
        status: RunStatus,
        basis: Basis,
        shards: Option<ShardSet>,
        retired: Vec<String>,
        budget: u32,
    ) -> Self {
        let failed = status
            .targets
            .iter()
            .filter(|t| t.state == TargetState::Failed)
            .count();
        let ended = status
            .targets
            .iter()
            .filter(|t| t.state.is_terminal())
            .filter_map(|t| t.reason.as_deref());
        let events = decide::EventBudget::resumed(budget, ended);
        Self {
            tally: Tally::of(&status.targets),
            status,
            dirty: true,
            basis,
            superseded: false,
            events,
            shards,
            failed,
            retired,
        }
    }

    /// Change target `idx`'s record with `f`: marks it (and its shard) for the next write
    /// and keeps the run's counts.
    pub fn update<R>(&mut self, idx: usize, f: impl FnOnce(&mut TargetStatus) -> R) -> R {
        self.dirty = true;
        if let Some(s) = &mut self.shards {
            s.touch(idx);
        }
        let t = &mut self.status.targets[idx];
        self.tally.remove(idx, t);
        let out = f(t);
        self.tally.add(idx, t);
        out
    }

    /// Every record from `idx` on was changed in `status.targets` directly: marks them
    /// for the next write and counts the run again.
    pub fn touch_from(&mut self, idx: usize) {
        self.dirty = true;
        self.tally = Tally::of(&self.status.targets);
        if let Some(s) = &mut self.shards {
            for i in (idx..self.status.targets.len()).step_by(crate::api::shards::SHARD_SIZE) {
                s.touch(i);
            }
            if let Some(last) = self.status.targets.len().checked_sub(1) {
                s.touch(last);
            }
        }
    }

    /// The run's status replaced whole (a finished run's): counted again, and marked for
    /// the next write.
    pub fn replace_status(&mut self, status: RunStatus) {
        self.tally = Tally::of(&status.targets);
        self.status = status;
        self.dirty = true;
    }

    /// Set the status's counts (summary, reasons, progress, phase) from the tally.
    pub fn count(&mut self) {
        self.tally.set_counts(&mut self.status);
    }

    /// What to write now: the dirty shards' records and the stored status (see
    /// `api::shards::compact`). Clears the dirty marks; a failed write sets them again.
    fn snapshot(&mut self) -> Snapshot {
        self.dirty = false;
        let Some(set) = &mut self.shards else {
            return Snapshot {
                stored: shards::compact_counted(&self.status, &[], &self.tally),
                writes: Vec::new(),
            };
        };
        let writes = std::mem::take(&mut set.dirty)
            .into_iter()
            .filter_map(|k| {
                let r = set.refs.get(k)?;
                let range = r.first as usize..(r.first + r.count) as usize;
                Some(ShardWrite {
                    k,
                    name: r.name.clone(),
                    version: set.versions.get(k).cloned().flatten(),
                    records: self.status.targets.get(range.clone())?.to_vec(),
                    first: range.start,
                })
            })
            .collect();
        Snapshot {
            stored: shards::compact_counted(&self.status, &set.refs, &self.tally),
            writes,
        }
    }
}

struct Snapshot {
    stored: RunStatus,
    writes: Vec<ShardWrite>,
}

pub(super) type Shared = Arc<Mutex<RunState>>;

pub(super) fn lock(shared: &Shared) -> MutexGuard<'_, RunState> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// Mark the object Stalled with the error's reason and write it (only if that changes
/// anything); the Warning Event is published once per reason and message.
pub(super) async fn stall<K: RunKind>(
    ctx: &Context,
    obj: &K,
    status: &mut RunStatus,
    e: &Error,
) -> Result<(), Error> {
    let reason = e.reason();
    let generation = obj.meta().generation;
    let msg = e.to_string();
    status.observed_generation = generation;
    if let Some(phase) = decide::stalled_phase(reason, status) {
        status.phase = Some(phase);
    }
    conditions::set_run_conditions(
        &mut status.conditions,
        RunConditions {
            ready: false,
            progressing: false,
            stalled: true,
        },
        reason.as_str(),
        &msg,
        generation,
        &now(),
    );
    let already = obj.run_status().is_some_and(|s| {
        s.conditions.iter().any(|c| {
            c.type_ == STALLED
                && c.status == "True"
                && c.reason == reason.as_str()
                && c.message == msg
        })
    });
    // Re-triggered while still stuck on the same thing (e.g. a VMI update for a selector
    // that still matches nothing running): the status is unchanged, so write nothing.
    if obj.run_status() != Some(&*status)
        && write(ctx, obj, status, &mut Basis::of(obj)).await? != Written::Done
    {
        // Newer state (or none): the next event reconciles again from it.
        return Ok(());
    }
    if !already {
        warn!(object = %obj.name_any(), %reason, "stalled");
        publish(
            ctx,
            obj,
            EventType::Warning,
            reason.as_str(),
            "Validate",
            msg,
        )
        .await;
    }
    Ok(())
}

/// Write a running run's status if it changed since the last write (Progressing, with
/// the count of finished targets). A failed write is tried again at the next tick.
pub(super) async fn flush<K: RunKind>(ctx: &Context, obj: &K, shared: &Shared) {
    {
        let mut st = lock(shared);
        if !st.dirty {
            return;
        }
        st.count();
        let msg = decide::progress_message(&st.status);
        conditions::set_run_conditions(
            &mut st.status.conditions,
            RunConditions {
                ready: false,
                progressing: true,
                stalled: false,
            },
            crate::api::Reason::InProgress.as_str(),
            &msg,
            obj.meta().generation,
            &now(),
        );
    }
    if let Err(e) = persist(ctx, obj, shared).await {
        warn!(object = %obj.name_any(), error = %e, "status write failed; will retry");
    }
}

/// Write what changed since the last write: first the changed shards of a large run (each
/// with its resourceVersion), then the status that names them (with the basis's). Newer
/// state from someone else stops the run (`superseded`); an error leaves everything
/// marked changed, for the next try.
pub(super) async fn persist<K: RunKind>(
    ctx: &Context,
    obj: &K,
    shared: &Shared,
) -> Result<Written, Error> {
    let snap = {
        let mut st = lock(shared);
        if !st.dirty {
            return Ok(Written::Done);
        }
        st.snapshot()
    };
    let mut failed = None;
    let mut outcome = Written::Done;
    for w in &snap.writes {
        if failed.is_some() || outcome != Written::Done {
            // Not written this time: stays marked for the next.
            if let Some(s) = &mut lock(shared).shards {
                s.dirty.insert(w.k);
            }
            continue;
        }
        match store::write(ctx, obj, w).await {
            Ok((Written::Done, version)) => {
                if let Some(s) = &mut lock(shared).shards
                    && let Some(v) = s.versions.get_mut(w.k)
                {
                    *v = version;
                }
            }
            Ok((other, _)) => outcome = other,
            Err(e) => {
                if let Some(s) = &mut lock(shared).shards {
                    s.dirty.insert(w.k);
                }
                failed = Some(e);
            }
        }
    }
    if outcome != Written::Done {
        lock(shared).superseded = true;
        return Ok(outcome);
    }
    if let Some(e) = failed {
        lock(shared).dirty = true;
        return Err(e);
    }
    let mut basis = lock(shared).basis.clone();
    let result = write(ctx, obj, &snap.stored, &mut basis).await;
    let retired = {
        let mut st = lock(shared);
        st.basis = basis;
        match &result {
            Ok(Written::Done) => std::mem::take(&mut st.retired),
            Ok(Written::Superseded | Written::Gone) => {
                st.superseded = true;
                Vec::new()
            }
            Err(_) => {
                st.dirty = true;
                Vec::new()
            }
        }
    };
    if !retired.is_empty() {
        store::delete(ctx, obj, &retired).await;
    }
    result
}

/// Merge-patch the whole status with the basis's resourceVersion as a precondition. On a
/// conflict the object is read fresh: if only other parts changed (a spec edit, labels),
/// the write is retried on the fresh resourceVersion; if the status itself changed, this
/// write is stale and is dropped (`Superseded`).
pub(super) async fn write<K: RunKind>(
    ctx: &Context,
    obj: &K,
    status: &RunStatus,
    basis: &mut Basis,
) -> Result<Written, Error> {
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let name = obj.name_any();
    let mut last_conflict = None;
    for _ in 0..5 {
        let mut patch = serde_json::json!({ "status": merge_patch(basis.status.as_ref(), status) });
        if let Some(rv) = &basis.resource_version {
            patch["metadata"] = serde_json::json!({ "resourceVersion": rv });
        }
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(written) => {
                basis.resource_version = written.meta().resource_version.clone();
                // The status as the server stored it, not as sent: a later conflict compares
                // the object's status with this, and the two may be written differently.
                basis.status = Some(
                    written
                        .run_status()
                        .cloned()
                        .unwrap_or_else(|| status.clone()),
                );
                return Ok(Written::Done);
            }
            // Deleted while running: nothing left to report on.
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(Written::Gone),
            // RBAC refuses the status write: the object cannot carry the reason, an Event
            // can (the Recorder folds repeats into one series).
            Err(e @ kube::Error::Api(_)) if matches!(&e, kube::Error::Api(s) if s.code == 403) => {
                let e = Error::from(e);
                publish(
                    ctx,
                    obj,
                    EventType::Warning,
                    e.reason().as_str(),
                    "WriteStatus",
                    e.to_string(),
                )
                .await;
                return Err(e);
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                last_conflict = Some(kube::Error::Api(s));
                let Some(fresh) = api.get_opt(&name).await? else {
                    return Ok(Written::Gone);
                };
                if fresh.run_status() != basis.status.as_ref() {
                    warn!(object = %name, "status changed by someone else meanwhile; this write is dropped");
                    return Ok(Written::Superseded);
                }
                basis.resource_version = fresh.meta().resource_version.clone();
            }
            Err(e) => return Err(e.into()),
        }
    }
    // Conflicts kept coming while the status itself stayed ours (the resourceVersion kept
    // moving, or a server answering 409 for a while): an error, so the write is tried
    // again later (a running run keeps it dirty; a reconcile is requeued), never dropped.
    warn!(object = %name, "status kept conflicting; retrying later");
    Err(last_conflict.map_or_else(
        || Error::InvalidSpec(format!("status of {name} kept conflicting")),
        Error::from,
    ))
}

/// The merge patch (RFC 7386) that turns `old` into `new`: `new` itself, plus a `null` for
/// every field `old` has and `new` leaves out (a field left out of a merge patch is kept:
/// an emptied list, skipped when serialized, would otherwise stay as it was). Nested
/// objects (the `reasons` map) are handled alike; lists replace lists whole.
fn merge_patch(old: Option<&RunStatus>, new: &RunStatus) -> serde_json::Value {
    let mut patch = serde_json::to_value(new).unwrap_or_default();
    if let Some(old) = old.and_then(|o| serde_json::to_value(o).ok()) {
        null_removed(&old, &mut patch);
    }
    patch
}

fn null_removed(old: &serde_json::Value, new: &mut serde_json::Value) {
    let (Some(old), Some(new)) = (old.as_object(), new.as_object_mut()) else {
        return;
    };
    for (k, v) in old {
        match new.get_mut(k) {
            None => {
                new.insert(k.clone(), serde_json::Value::Null);
            }
            Some(n) => null_removed(v, n),
        }
    }
}

/// A per-target Event, within the run's Event budget (see `decide::EventBudget`).
pub(super) async fn publish_target<K: RunKind>(
    ctx: &Context,
    obj: &K,
    shared: &Shared,
    type_: EventType,
    reason: &str,
    note: String,
) {
    let admitted = lock(shared).events.admit(reason);
    if admitted {
        publish(ctx, obj, type_, reason, "Apply", note).await;
    }
}

/// One Event per reason for the per-target Events the budget held back.
pub(super) async fn publish_held<K: RunKind>(ctx: &Context, obj: &K, budget: &decide::EventBudget) {
    for (reason, n) in budget.held() {
        use crate::api::Reason;
        let fine = [
            Reason::Applied,
            Reason::Verified,
            Reason::Removed,
            Reason::Inspected,
        ]
        .iter()
        .any(|r| r.as_str() == reason);
        let type_ = if fine {
            EventType::Normal
        } else {
            EventType::Warning
        };
        let note = format!(
            "{n} more target(s): {reason} (per-target Events are capped at {} per run; status and metrics count every target)",
            budget.limit()
        );
        // Its own action: the Recorder folds Events of one object, reason and action into
        // one series, which would keep only the first note.
        publish(ctx, obj, type_, reason, "Summary", note).await;
    }
}

/// The Event that ends a run: its Ready condition's reason and message, once the run is
/// over (Succeeded, PartiallySucceeded, Failed); `None` while it is not.
pub(super) fn run_summary(status: &RunStatus) -> Option<(EventType, String, String)> {
    use crate::api::Phase;
    let type_ = match status.phase? {
        Phase::Succeeded => EventType::Normal,
        Phase::PartiallySucceeded | Phase::Failed => EventType::Warning,
        Phase::Pending | Phase::Running => return None,
    };
    let ready = status
        .conditions
        .iter()
        .find(|c| c.type_ == conditions::READY)?;
    Some((type_, ready.reason.clone(), ready.message.clone()))
}

/// Publish an Event about `obj` (a failure to publish is logged, never fatal).
pub(super) async fn publish<K: RunKind>(
    ctx: &Context,
    obj: &K,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let ev = Event {
        type_,
        reason: reason.to_string(),
        note: Some(note),
        action: action.to_string(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &obj.object_ref(&())).await {
        warn!(object = %obj.name_any(), error = %e, "could not publish event");
    }
}

#[cfg(test)]
mod tests {
    use super::super::shards::ShardSet;
    use super::{Basis, RunState, merge_patch};
    use crate::api::shards::{self, compact};
    use crate::api::{RunStatus, TargetState, TargetStatus};
    use std::collections::BTreeMap;

    fn large_run(total: usize) -> RunState {
        let status = RunStatus {
            targets: (0..total)
                .map(|i| TargetStatus {
                    vm: format!("vm-{i}"),
                    ..TargetStatus::default()
                })
                .collect(),
            ..RunStatus::default()
        };
        let refs = shards::refs(total, |k| format!("run-targets-abc-{k}"));
        let set = ShardSet {
            versions: vec![None; refs.len()],
            refs,
            ..ShardSet::default()
        };
        RunState::new(status, Basis::default(), Some(set), Vec::new(), 5)
    }

    /// Targets 0..2000 of `st` run and end: every 50th fails, every 50th (+1) waits to be
    /// retried, the rest succeed.
    fn run_first_2000(st: &mut RunState) {
        for idx in 0..2000 {
            st.update(idx, |t| t.state = TargetState::Running);
            st.update(idx, |t| {
                (t.state, t.reason) = match idx % 50 {
                    0 => (TargetState::Failed, Some("AgentTimeout".into())),
                    1 => (TargetState::Running, Some("ShimUnavailable".into())),
                    _ => (TargetState::Succeeded, Some("Applied".into())),
                };
            });
        }
    }

    /// What the run's next write stores, and what a fresh count of every record gives.
    fn written_and_fresh(st: &mut RunState) -> (RunStatus, RunStatus) {
        st.count();
        let written = st.snapshot().stored;
        let fresh = compact(&st.status, &written.shards);
        (written, fresh)
    }

    #[test]
    fn the_status_written_mid_run_counts_and_lists_what_a_fresh_count_of_every_record_does() {
        let mut st = large_run(2500);
        run_first_2000(&mut st);
        let (written, fresh) = written_and_fresh(&mut st);
        assert_eq!(written, fresh);
        assert_eq!(
            (written.summary.succeeded, written.summary.running),
            (1920, 40)
        );
        assert_eq!(written.progress.as_deref(), Some("1960/2500"));
    }

    #[test]
    fn records_changed_in_place_are_counted_again_when_touched() {
        let mut st = large_run(2500);
        run_first_2000(&mut st);
        // The failure budget skips the rest: changed in place, then touched.
        crate::controller::engine::decide::skip_pending(&mut st.status.targets, 2400);
        st.touch_from(2400);
        let (written, fresh) = written_and_fresh(&mut st);
        assert_eq!(written, fresh);
        assert_eq!(written.summary.skipped, 100);
    }

    #[test]
    fn a_merge_patch_removes_what_the_new_status_leaves_out() {
        let old = RunStatus {
            targets: vec![TargetStatus {
                vm: "a".into(),
                ..TargetStatus::default()
            }],
            unlisted_targets: Some(3),
            reasons: BTreeMap::from([("Applied".into(), 2), ("AgentTimeout".into(), 1)]),
            ..RunStatus::default()
        };
        let new = RunStatus {
            reasons: BTreeMap::from([("Applied".into(), 3)]),
            ..RunStatus::default()
        };
        let patch = merge_patch(Some(&old), &new);
        assert_eq!(patch["targets"], serde_json::Value::Null);
        assert_eq!(patch["unlistedTargets"], serde_json::Value::Null);
        assert_eq!(
            patch["reasons"],
            serde_json::json!({"Applied": 3, "AgentTimeout": null})
        );
    }

    #[test]
    fn a_first_status_write_is_the_status_itself() {
        let new = RunStatus::default();
        assert_eq!(
            merge_patch(None, &new),
            serde_json::to_value(&new).expect("json")
        );
    }
}
