//! The run engine shared by both kinds: validate → read the input → freeze the targets →
//! drive them with bounded concurrency, retries, deadlines and a failure budget → write
//! status (batched) and Events.
//!
//! A run lives inside one reconcile call; kube-runtime never reconciles the same object
//! twice at once, and other objects proceed in parallel. A controller restart resumes the
//! targets that were not finished: every agent call is idempotent for the same input, and
//! generated passwords are stored before they are applied.
use super::context::Context;
use super::error::Error;
use super::targets::{self, TargetCall};
use crate::api::conditions::{self, RunConditions, STALLED};
use crate::api::{
    Phase, Reason, RolloutSpec, RunStatus, SecretKeyRef, TargetSpec, TargetState, TargetStatus,
};
use crate::metrics::TargetResult;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing::{info, warn};

/// What a successful target reports.
#[derive(Debug, Default)]
pub struct Outcome {
    pub reason: Option<Reason>,
    pub message: String,
    pub output_secret: Option<String>,
    pub mode: Option<String>,
    pub keys: Vec<String>,
    pub verified: Option<bool>,
    pub expires_at: Option<Time>,
}

/// A run's input as `RunKind::prepare` read it.
pub struct Prepared<I> {
    pub input: I,
    /// Keyed hash that changes with the input (see `RunStatus::input_hash`).
    pub hash: String,
    /// resourceVersion of the Secret the input was read from, if any.
    pub secret_version: Option<String>,
}

impl<I> Prepared<I> {
    /// An input read from no Secret (inline or generated).
    pub fn inline(input: I, hash: String) -> Self {
        Self {
            input,
            hash,
            secret_version: None,
        }
    }
}

/// One custom resource kind driven by the engine.
pub trait RunKind:
    Resource<DynamicType = (), Scope = NamespaceResourceScope>
    + Clone
    + Debug
    + DeserializeOwned
    + Serialize
    + Send
    + Sync
    + 'static
{
    /// Prepared input of a run (secret values live in `secrecy` types).
    type Input: Send + Sync;

    fn target(&self) -> &TargetSpec;
    fn rollout(&self) -> &RolloutSpec;
    fn spec_user(&self) -> Option<&str>;
    /// The Secret the input comes from, if any (watched: a change starts a new run).
    fn input_secret(&self) -> Option<&SecretKeyRef>;
    fn run_status(&self) -> Option<&RunStatus>;
    /// The latest copy of this object in the controller's cache.
    fn latest(&self, ctx: &Context) -> Option<Arc<Self>>;
    /// Spec checks: the CRD's CEL rules (the emulator and old clusters lack CEL) and ours.
    fn validate(&self) -> Result<(), Error>;
    /// Read and check the input; returns it with a keyed hash that changes with it.
    fn prepare(
        &self,
        ctx: &Context,
    ) -> impl Future<Output = Result<Prepared<Self::Input>, Error>> + Send;
    /// Undo a succeeded target's change once its `expiresAt` passed (keys with a TTL).
    /// Returns what was done, for status and the Event.
    fn expire(
        &self,
        _ctx: &Context,
        _call: &TargetCall,
        _target: &TargetStatus,
    ) -> impl Future<Output = Result<String, Error>> + Send {
        async { Ok(String::new()) }
    }
    /// Apply the input to one target (one attempt).
    fn apply(
        &self,
        ctx: &Context,
        input: &Self::Input,
        call: &TargetCall,
    ) -> impl Future<Output = Result<Outcome, Error>> + Send;
}

/// Suffix of a target message while a transient failure is being retried.
const RETRYING: &str = "; retrying";

fn now() -> Time {
    Time(Timestamp::now())
}

/// Reconcile entry point for both kinds.
pub async fn reconcile<K: RunKind>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error> {
    if obj.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let mut status = obj.run_status().cloned().unwrap_or_default();

    let checked = validate_target_immutable(obj.as_ref(), &status)
        .and_then(|()| obj.rollout().check().map_err(Error::InvalidSpec))
        .and_then(|()| obj.validate());
    if let Err(e) = checked {
        stall(&ctx, obj.as_ref(), &mut status, &e).await?;
        return Ok(Action::await_change());
    }
    if input_unchanged_since_run(obj.as_ref(), &ctx, &status) {
        // Finished, same spec, same Secret: nothing to read (a restart resyncs in memory).
        return finished(obj.as_ref(), &ctx, status).await;
    }
    let prepared = match obj.prepare(&ctx).await {
        Ok(v) => v,
        Err(e @ Error::Kube(_)) => return Err(e),
        Err(e) => {
            // A missing or bad Secret: wait for the Secret to change (watched).
            stall(&ctx, obj.as_ref(), &mut status, &e).await?;
            return Ok(Action::requeue(Duration::from_secs(300)));
        }
    };
    let hash = prepared.hash.as_str();
    let mut obj = obj;
    if has_work(&status, hash) {
        // The cache may lag behind our own last status write (a reconcile queued during a
        // run sees the object as it was mid-run). Never act on that: read it fresh.
        let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
        match api.get_opt(&obj.name_any()).await? {
            Some(fresh) if fresh.meta().deletion_timestamp.is_none() => obj = Arc::new(fresh),
            _ => return Ok(Action::await_change()),
        }
        status = obj.run_status().cloned().unwrap_or_default();
    }
    let generation = obj.meta().generation;
    if status.input_hash.as_deref() != Some(hash) {
        let ns = obj.namespace().unwrap_or_default();
        let vms = match targets::resolve(&ctx.client, &ns, obj.target()).await {
            Ok(vms) => vms,
            Err(e @ Error::Kube(_)) => return Err(e),
            Err(e) => {
                stall(&ctx, obj.as_ref(), &mut status, &e).await?;
                return Ok(Action::requeue(Duration::from_secs(60)));
            }
        };
        info!(object = %obj.name_any(), targets = vms.len(), "starting a run");
        status.input_hash = Some(hash.to_string());
        status.target_spec = Some(obj.target().clone());
        status.targets = vms
            .into_iter()
            .map(|vm| TargetStatus {
                vm,
                ..TargetStatus::default()
            })
            .collect();
    }
    // The hash matches this version of the Secret (also when only its metadata changed).
    status.input_secret_version = prepared.secret_version;
    status.observed_generation = generation;
    if !has_work(&status, hash) {
        return finished(obj.as_ref(), &ctx, status).await;
    }
    drive(obj, ctx, Arc::new(prepared.input), status).await
}

/// A finished object: only TTL expiries and a refreshed observedGeneration remain.
async fn finished<K: RunKind>(
    obj: &K,
    ctx: &Context,
    mut status: RunStatus,
) -> Result<Action, Error> {
    let generation = obj.meta().generation;
    status.observed_generation = generation;
    let before = obj.run_status().cloned().unwrap_or_default();
    finish(&mut status, generation, None);
    let next_expiry = expire_due(obj, ctx, &mut status).await;
    if status != before {
        write_status(ctx, obj, &status).await?;
    }
    Ok(next_expiry.map_or_else(Action::await_change, Action::requeue))
}

/// Whether a finished run's input is known unchanged without reading it: the spec is the
/// one the run saw and the Secret (in the controller's metadata cache) still has the
/// resourceVersion the input hash was computed from. Anything unknown means "read it".
fn input_unchanged_since_run<K: RunKind>(obj: &K, ctx: &Context, status: &RunStatus) -> bool {
    let (Some(secret), Some(version)) = (obj.input_secret(), &status.input_secret_version) else {
        return false;
    };
    let finished = status.input_hash.is_some()
        && status.targets.iter().all(|t| t.state.is_terminal())
        && status.observed_generation == obj.meta().generation;
    finished
        && ctx
            .secret_version(&obj.namespace().unwrap_or_default(), &secret.name)
            .is_some_and(|v| v == *version)
}

/// A run to start (new input) or to continue (unfinished targets).
fn has_work(status: &RunStatus, hash: &str) -> bool {
    status.input_hash.as_deref() != Some(hash)
        || status.targets.iter().any(|t| !t.state.is_terminal())
}

fn validate_target_immutable<K: RunKind>(obj: &K, status: &RunStatus) -> Result<(), Error> {
    match &status.target_spec {
        Some(started) if started != obj.target() => Err(Error::InvalidSpec(
            "spec.target is immutable once a run started; create a new object for other VMs".into(),
        )),
        _ => Ok(()),
    }
}

/// Mark the object Stalled with the error's reason and write it.
async fn stall<K: RunKind>(
    ctx: &Context,
    obj: &K,
    status: &mut RunStatus,
    e: &Error,
) -> Result<(), Error> {
    let t = now();
    let reason = e.reason();
    let generation = obj.meta().generation;
    let msg = e.to_string();
    status.observed_generation = generation;
    if status.targets.iter().all(|t| !t.state.is_terminal()) {
        // Waiting for something that may appear by itself (a Secret, a matching VM) is
        // Pending; a spec the user must edit is Failed.
        let waiting = matches!(
            reason,
            Reason::SecretNotFound | Reason::SecretKeyMissing | Reason::NoTargets
        );
        status.phase = Some(if waiting {
            Phase::Pending
        } else {
            Phase::Failed
        });
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
        &t,
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
        write_status(ctx, obj, status).await?;
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

/// Shared between the target tasks and the status flusher.
struct RunState {
    status: RunStatus,
    dirty: bool,
}

type Shared = Arc<Mutex<RunState>>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, RunState> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

async fn drive<K: RunKind>(
    obj: Arc<K>,
    ctx: Arc<Context>,
    input: Arc<K::Input>,
    status: RunStatus,
) -> Result<Action, Error> {
    let _run_timer = ctx.metrics.run_started(&K::kind(&()));
    let shared: Shared = Arc::new(Mutex::new(RunState {
        status,
        dirty: true,
    }));
    let mut in_flight = FuturesUnordered::new();
    let mut next = 0usize;
    let mut flush = tokio::time::interval(ctx.settings.status_flush_interval);
    let mut stop_reason: Option<Reason> = None;

    loop {
        // Start as many targets as the (latest) rollout settings allow.
        while stop_reason.is_none() {
            let Some(latest) = obj.latest(&ctx) else {
                // Deleted: start nothing new; calls in flight finish.
                stop_reason = Some(Reason::Failed);
                break;
            };
            let rollout = latest.rollout().clone();
            if latest.meta().deletion_timestamp.is_some() {
                stop_reason = Some(Reason::Failed);
                break;
            }
            if latest.meta().generation > obj.meta().generation {
                // The spec changed under us (pause, limits, input): finish what is in
                // flight, then reconcile again with the new spec.
                stop_reason = Some(Reason::InProgress);
                break;
            }
            if rollout.paused {
                stop_reason = Some(Reason::Paused);
                break;
            }
            let failed = lock(&shared)
                .status
                .targets
                .iter()
                .filter(|t| t.state == TargetState::Failed)
                .count();
            if failed as u32 > rollout.max_failures {
                skip_rest::<K>(&ctx, &shared, next);
                stop_reason = Some(Reason::FailureBudgetExhausted);
                break;
            }
            if in_flight.len() >= rollout.max_concurrency.max(1) as usize {
                break;
            }
            let idx = {
                let st = lock(&shared);
                (next..st.status.targets.len()).find(|&i| !st.status.targets[i].state.is_terminal())
            };
            let Some(idx) = idx else { break };
            next = idx + 1;
            in_flight.push(run_target(
                obj.clone(),
                ctx.clone(),
                input.clone(),
                shared.clone(),
                idx,
            ));
        }
        if in_flight.is_empty() {
            break;
        }
        tokio::select! {
            _ = in_flight.next() => {}
            _ = flush.tick() => { flush_status(&ctx, obj.as_ref(), &shared).await; }
        }
    }

    // Final status.
    let mut status = lock(&shared).status.clone();
    finish(&mut status, obj.meta().generation, stop_reason);
    let next_expiry = expire_due(obj.as_ref(), &ctx, &mut status).await;
    write_status(&ctx, obj.as_ref(), &status).await?;
    Ok(match stop_reason {
        Some(Reason::InProgress) => Action::requeue(Duration::from_millis(100)),
        Some(Reason::Paused) => Action::await_change(),
        _ if status.targets.iter().any(|t| !t.state.is_terminal()) => {
            Action::requeue(Duration::from_secs(5))
        }
        _ => match next_expiry {
            Some(wait) => Action::requeue(wait),
            None => Action::await_change(),
        },
    })
}

/// Undo the targets whose TTL ran out; returns how long until the next one is due. The
/// deadline lives in status (`expiresAt`), so a controller restart does not lose it.
async fn expire_due<K: RunKind>(
    obj: &K,
    ctx: &Context,
    status: &mut RunStatus,
) -> Option<Duration> {
    let ns = obj.namespace().unwrap_or_default();
    let mut next: Option<Duration> = None;
    for t in status.targets.iter_mut() {
        let Some(at) = t.expires_at.clone() else {
            continue;
        };
        if t.state != TargetState::Succeeded
            || t.reason.as_deref() == Some(Reason::Expired.as_str())
        {
            continue;
        }
        let left =
            Duration::try_from(at.0.duration_since(Timestamp::now())).unwrap_or(Duration::ZERO);
        if !left.is_zero() {
            next = Some(next.map_or(left, |n| n.min(left)));
            continue;
        }
        let user = t.user.clone();
        let result = match targets::prepare_call(ctx, &ns, &t.vm, user.as_deref(), None).await {
            Ok(call) => obj.expire(ctx, &call, t).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(done) => {
                ctx.metrics.target(
                    &K::kind(&()),
                    TargetResult::Expired,
                    Reason::Expired.as_str(),
                );
                t.reason = Some(Reason::Expired.as_str().into());
                t.message = Some(done.clone());
                t.verified = None;
                publish(
                    ctx,
                    obj,
                    EventType::Normal,
                    Reason::Expired.as_str(),
                    "Expire",
                    format!("{}: {done}", t.vm),
                )
                .await;
            }
            Err(e) => {
                t.message = Some(format!("removing expired keys failed: {e}; retrying"));
                let retry = Duration::from_secs(10);
                next = Some(next.map_or(retry, |n| n.min(retry)));
            }
        }
    }
    next
}

fn skip_rest<K: RunKind>(ctx: &Context, shared: &Shared, from: usize) {
    let mut st = lock(shared);
    for t in st.status.targets.iter_mut().skip(from) {
        if t.state == TargetState::Pending {
            ctx.metrics.target(
                &K::kind(&()),
                TargetResult::Skipped,
                Reason::FailureBudgetExhausted.as_str(),
            );
            t.state = TargetState::Skipped;
            t.reason = Some(Reason::FailureBudgetExhausted.as_str().into());
            t.message = Some("not started: the failure budget (maxFailures) is exhausted".into());
        }
    }
    st.dirty = true;
}

/// Summary, phase and conditions from the targets.
fn finish(status: &mut RunStatus, generation: Option<i64>, stop: Option<Reason>) {
    let t = now();
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
        _ => match stop {
            Some(Reason::Paused) => (
                false,
                false,
                Reason::Paused,
                "paused: no new targets are started".to_string(),
            ),
            _ => (
                false,
                true,
                Reason::InProgress,
                format!(
                    "{}/{} targets finished",
                    s.total - s.pending - s.running,
                    s.total
                ),
            ),
        },
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
        &t,
    );
}

async fn flush_status<K: RunKind>(ctx: &Context, obj: &K, shared: &Shared) {
    let snapshot = {
        let mut st = lock(shared);
        if !st.dirty {
            return;
        }
        st.dirty = false;
        let mut s = st.status.clone();
        s.recount();
        let t = now();
        let msg = format!(
            "{}/{} targets finished",
            s.summary.succeeded + s.summary.failed + s.summary.skipped,
            s.summary.total
        );
        let g = obj.meta().generation;
        conditions::set_run_conditions(
            &mut s.conditions,
            RunConditions {
                ready: false,
                progressing: true,
                stalled: false,
            },
            Reason::InProgress.as_str(),
            &msg,
            g,
            &t,
        );
        st.status.conditions = s.conditions.clone();
        s
    };
    if let Err(e) = write_status(ctx, obj, &snapshot).await {
        warn!(object = %obj.name_any(), error = %e, "status write failed; will retry");
        lock(shared).dirty = true;
    }
}

/// Merge-patch the whole status, retrying a few times on conflicts.
async fn write_status<K: RunKind>(ctx: &Context, obj: &K, status: &RunStatus) -> Result<(), Error> {
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

async fn publish<K: RunKind>(
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

/// Drive one target to a terminal state: retries transient failures with exponential
/// backoff until its deadline (counted from its first start, so restarts don't extend it).
async fn run_target<K: RunKind>(
    obj: Arc<K>,
    ctx: Arc<Context>,
    input: Arc<K::Input>,
    shared: Shared,
    idx: usize,
) {
    let _in_flight = ctx.metrics.target_started(&K::kind(&()));
    let deadline_secs = obj.rollout().deadline_seconds;
    let (vm, started) = {
        let mut st = lock(&shared);
        let t = &mut st.status.targets[idx];
        t.state = TargetState::Running;
        let started = t.start_time.get_or_insert_with(now).clone();
        st.dirty = true;
        (st.status.targets[idx].vm.clone(), started)
    };
    let deadline_at = started.0 + Duration::from_secs(deadline_secs.into());
    let mut backoff = ctx.settings.initial_backoff;
    loop {
        let remaining = deadline_at.duration_since(Timestamp::now());
        let remaining = Duration::try_from(remaining).unwrap_or(Duration::ZERO);
        let last = lock(&shared).status.targets[idx]
            .message
            .as_deref()
            .unwrap_or_default()
            .trim_end_matches(RETRYING)
            .to_string();
        if remaining.is_zero() {
            let e = Error::DeadlineExceeded {
                seconds: deadline_secs,
                last,
            };
            return fail(&ctx, obj.as_ref(), &shared, idx, &e).await;
        }
        lock(&shared).status.targets[idx].attempts += 1;
        let attempt = attempt_once(obj.as_ref(), &ctx, &input, &shared, idx, &vm);
        match tokio::time::timeout(remaining, attempt).await {
            Err(_) => {
                let last = if last.is_empty() {
                    "the only attempt did not finish in time".to_string()
                } else {
                    format!("the last attempt did not finish in time; before it: {last}")
                };
                let e = Error::DeadlineExceeded {
                    seconds: deadline_secs,
                    last,
                };
                return fail(&ctx, obj.as_ref(), &shared, idx, &e).await;
            }
            Ok(Ok(outcome)) => return succeed(&ctx, obj.as_ref(), &shared, idx, outcome).await,
            Ok(Err(e)) if e.is_transient() => {
                let wait = backoff.min(remaining);
                {
                    let mut st = lock(&shared);
                    let t = &mut st.status.targets[idx];
                    t.reason = Some(e.reason().as_str().into());
                    t.message = Some(format!("{e}{RETRYING}"));
                    t.next_attempt_time = Some(Time(Timestamp::now() + wait));
                    st.dirty = true;
                }
                info!(object = %obj.name_any(), vm = %vm, reason = %e.reason(), "transient failure; retrying");
                tokio::time::sleep(wait).await;
                backoff = (backoff * 2).min(ctx.settings.max_backoff);
            }
            Ok(Err(e)) => return fail(&ctx, obj.as_ref(), &shared, idx, &e).await,
        }
    }
}

async fn attempt_once<K: RunKind>(
    obj: &K,
    ctx: &Context,
    input: &K::Input,
    shared: &Shared,
    idx: usize,
    vm: &str,
) -> Result<Outcome, Error> {
    let ns = obj.namespace().unwrap_or_default();
    let output_secret = lock(shared).status.targets[idx].output_secret.clone();
    let call = targets::prepare_call(ctx, &ns, vm, obj.spec_user(), output_secret).await?;
    {
        let mut st = lock(shared);
        let t = &mut st.status.targets[idx];
        t.node = Some(call.node.clone());
        t.user = Some(call.user.clone());
        t.user_source = Some(call.user_source);
        st.dirty = true;
    }
    let conflict = call.conflicts_with_access_credentials.then(|| {
        format!(
            "{}: VM {vm} propagates credentials for user {} through KubeVirt accessCredentials, which will overwrite this change",
            Reason::ConflictWithAccessCredentials,
            call.user
        )
    });
    if let Some(warning) = &conflict {
        publish(
            ctx,
            obj,
            EventType::Warning,
            Reason::ConflictWithAccessCredentials.as_str(),
            "Apply",
            warning.clone(),
        )
        .await;
    }
    let mut outcome = obj
        .apply(ctx, input, &call)
        .await
        .map_err(|e| e.for_user(&call.user, vm))?;
    if let Some(warning) = conflict {
        outcome.message = format!("{}; warning: {warning}", outcome.message);
    }
    Ok(outcome)
}

async fn succeed<K: RunKind>(ctx: &Context, obj: &K, shared: &Shared, idx: usize, o: Outcome) {
    let reason = o.reason.unwrap_or(Reason::Applied);
    ctx.metrics
        .target(&K::kind(&()), TargetResult::Succeeded, reason.as_str());
    let (vm, note) = {
        let mut st = lock(shared);
        let t = &mut st.status.targets[idx];
        t.state = TargetState::Succeeded;
        t.reason = Some(reason.as_str().into());
        t.message = Some(o.message.clone());
        t.completion_time = Some(now());
        t.next_attempt_time = None;
        t.output_secret = o.output_secret.or(t.output_secret.take());
        t.mode = o.mode.or(t.mode.take());
        t.keys = o.keys;
        t.verified = o.verified;
        t.expires_at = o.expires_at;
        let vm = t.vm.clone();
        st.dirty = true;
        (vm, o.message)
    };
    info!(object = %obj.name_any(), vm = %vm, %reason, "target succeeded");
    publish(
        ctx,
        obj,
        EventType::Normal,
        reason.as_str(),
        "Apply",
        format!("{vm}: {note}"),
    )
    .await;
}

async fn fail<K: RunKind>(ctx: &Context, obj: &K, shared: &Shared, idx: usize, e: &Error) {
    let reason = e.reason();
    ctx.metrics
        .target(&K::kind(&()), TargetResult::Failed, reason.as_str());
    let vm = {
        let mut st = lock(shared);
        let t = &mut st.status.targets[idx];
        t.state = TargetState::Failed;
        t.reason = Some(reason.as_str().into());
        t.message = Some(e.to_string());
        t.completion_time = Some(now());
        t.next_attempt_time = None;
        let vm = t.vm.clone();
        st.dirty = true;
        vm
    };
    warn!(object = %obj.name_any(), vm = %vm, %reason, "target failed");
    publish(
        ctx,
        obj,
        EventType::Warning,
        reason.as_str(),
        "Apply",
        format!("{vm}: {e}"),
    )
    .await;
}
