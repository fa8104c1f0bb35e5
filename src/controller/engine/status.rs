//! Writing what the engine decided: the object's status (batched while a run goes on),
//! the Stalled condition, and Events.
use super::decide;
use super::{RunKind, now};
use crate::api::RunStatus;
use crate::api::conditions::{self, RunConditions, STALLED};
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

/// How a status write ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Written {
    Done,
    /// Someone else wrote the status since our basis: nothing was written.
    Superseded,
    /// The object is gone.
    Gone,
}

/// One run's status, shared between the target tasks and the status flusher.
pub(super) struct RunState {
    pub status: RunStatus,
    /// Changed since the last write.
    pub dirty: bool,
    pub basis: Basis,
    /// A write found newer status from someone else: start no more agent calls.
    pub superseded: bool,
    pub events: decide::EventBudget,
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
    if let Some(phase) = decide::stalled_phase(reason, &status.targets) {
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
/// the count of finished targets).
pub(super) async fn flush<K: RunKind>(ctx: &Context, obj: &K, shared: &Shared) {
    let (snapshot, mut basis) = {
        let mut st = lock(shared);
        if !st.dirty {
            return;
        }
        st.dirty = false;
        let mut s = st.status.clone();
        s.recount();
        let msg = decide::progress_message(&s);
        conditions::set_run_conditions(
            &mut s.conditions,
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
        st.status.conditions = s.conditions.clone();
        (s, st.basis.clone())
    };
    let result = write(ctx, obj, &snapshot, &mut basis).await;
    let mut st = lock(shared);
    st.basis = basis;
    match result {
        Ok(Written::Done) => {}
        Ok(Written::Superseded | Written::Gone) => st.superseded = true,
        Err(e) => {
            warn!(object = %obj.name_any(), error = %e, "status write failed; will retry");
            st.dirty = true;
        }
    }
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
        let mut patch = serde_json::json!({ "status": status });
        if let Some(rv) = &basis.resource_version {
            patch["metadata"] = serde_json::json!({ "resourceVersion": rv });
        }
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(written) => {
                basis.resource_version = written.meta().resource_version.clone();
                basis.status = Some(status.clone());
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
        let fine = [crate::api::Reason::Applied, crate::api::Reason::Verified]
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
