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
use std::time::Duration;
use tracing::warn;

/// One run's status, shared between the target tasks and the status flusher.
pub(super) struct RunState {
    pub status: RunStatus,
    /// Changed since the last write.
    pub dirty: bool,
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
    if obj.run_status() != Some(&*status) {
        write(ctx, obj, status).await?;
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
    let snapshot = {
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
        s
    };
    if let Err(e) = write(ctx, obj, &snapshot).await {
        warn!(object = %obj.name_any(), error = %e, "status write failed; will retry");
        lock(shared).dirty = true;
    }
}

/// Merge-patch the whole status, retrying a few times on conflicts.
pub(super) async fn write<K: RunKind>(
    ctx: &Context,
    obj: &K,
    status: &RunStatus,
) -> Result<(), Error> {
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let patch = Patch::Merge(serde_json::json!({ "status": status }));
    let mut attempt = 0;
    loop {
        match api
            .patch_status(&obj.name_any(), &PatchParams::default(), &patch)
            .await
        {
            Ok(_) => return Ok(()),
            // Deleted while running: nothing left to report on.
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(()),
            Err(kube::Error::Api(s)) if s.code == 409 && attempt < 5 => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
            }
            Err(e) => return Err(e.into()),
        }
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
