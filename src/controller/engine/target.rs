//! One target's attempts: find its node, shim and user, apply, retry transient failures
//! with jittered exponential backoff until the target's deadline, and record the outcome.
use super::decide;
use super::observe::Observed;
use super::status::{self, Shared, lock};
use super::vmi_feed::RunVmis;
use super::{Outcome, RunKind, now};
use crate::api::kubevirt::VirtualMachineInstance;
use crate::api::{Reason, TargetState};
use crate::controller::context::Context;
use crate::controller::error::Error;
use crate::controller::targets;
use crate::metrics::TargetResult;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::events::EventType;
use std::sync::Arc;
use tracing::{info, warn};

/// Suffix of a target message while a transient failure is being retried.
const RETRYING: &str = "; retrying";

/// Drive one target to a terminal state: retries transient failures with exponential
/// backoff until its deadline (counted from its first start, so restarts don't extend it).
pub(super) async fn run_target<K: RunKind>(
    obj: Arc<K>,
    ctx: Arc<Context>,
    input: Arc<K::Input>,
    shared: Shared,
    idx: usize,
    run_secret_version: Option<String>,
    feed: Option<Arc<RunVmis>>,
) {
    let _in_flight = ctx.metrics.target_started(&K::kind(&()));
    let deadline_secs = obj.rollout().deadline_seconds;
    let (vm, started) = {
        lock(&shared).update(idx, |t| {
            t.state = TargetState::Running;
            let started = t.start_time.get_or_insert_with(now).clone();
            (t.vm.clone(), started)
        })
    };
    let deadline_at = decide::deadline(started.0, deadline_secs);
    // The first attempt reads the VMI from the run's feed if it has it; retries read fresh.
    let mut first_read = feed.and_then(|f| f.take(&vm));
    let mut backoff = ctx.settings.initial_backoff;
    loop {
        let remaining = decide::remaining(deadline_at, Timestamp::now());
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
        // Pause, deletion, a newer spec or input, or a lost lease: no new agent call, not
        // even a retry; the target waits for the next run (a call sent already finished).
        let observed = Observed::now(obj.as_ref(), &ctx, run_secret_version.as_deref()).await;
        let superseded = lock(&shared).superseded.then_some(decide::Stop::Superseded);
        if let Some(stop) = superseded.or_else(|| observed.halt()) {
            lock(&shared).update(idx, |t| {
                t.state = TargetState::Pending;
                t.next_attempt_time = None;
                t.message = Some(format!("not started again: {}", stop.note()));
            });
            return;
        }
        lock(&shared).update(idx, |t| t.attempts += 1);
        let attempt = attempt_once(
            obj.as_ref(),
            &ctx,
            &input,
            &shared,
            idx,
            &vm,
            first_read.take(),
        );
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
                let wait = decide::retry_wait(backoff, rand::random::<f64>(), remaining);
                lock(&shared).update(idx, |t| {
                    t.reason = Some(e.reason().as_str().into());
                    t.message = Some(format!("{e}{RETRYING}"));
                    t.next_attempt_time = Some(Time(Timestamp::now() + wait));
                });
                info!(object = %obj.name_any(), vm = %vm, reason = %e.reason(), "transient failure; retrying");
                tokio::time::sleep(wait).await;
                backoff = decide::next_backoff(backoff, ctx.settings.max_backoff);
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
    read: Option<VirtualMachineInstance>,
) -> Result<Outcome, Error> {
    let ns = obj.namespace().unwrap_or_default();
    let output_secret = lock(shared).status.targets[idx].output_secret.clone();
    let call = targets::prepare_call_reading(
        ctx,
        &ns,
        vm,
        obj.spec_user(),
        output_secret,
        obj.vm_read(),
        read,
    )
    .await?;
    lock(shared).update(idx, |t| {
        t.node = Some(call.node.clone());
        t.user = Some(call.user.clone());
        t.user_source = Some(call.user_source);
    });
    let conflict = call.conflicts_with_access_credentials.then(|| {
        format!(
            "{}: VM {vm} propagates credentials for user {} through KubeVirt accessCredentials, which will overwrite this change",
            Reason::ConflictWithAccessCredentials,
            call.user
        )
    });
    if let Some(warning) = &conflict {
        status::publish_target(
            ctx,
            obj,
            shared,
            EventType::Warning,
            Reason::ConflictWithAccessCredentials.as_str(),
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
    let message = o.message.clone();
    let vm = lock(shared).update(idx, |t| {
        t.state = TargetState::Succeeded;
        t.reason = Some(reason.as_str().into());
        t.message = Some(o.message);
        t.completion_time = Some(now());
        t.next_attempt_time = None;
        t.output_secret = o.output_secret.or(t.output_secret.take());
        t.mode = o.mode.or(t.mode.take());
        t.keys = o.keys;
        t.verified = o.verified;
        t.expires_at = o.expires_at;
        t.replaced_keys = o.replaced_keys;
        t.replaced_keys_remove_at = o.replaced_keys_remove_at;
        t.vm.clone()
    });
    info!(object = %obj.name_any(), vm = %vm, %reason, "target succeeded");
    status::publish_target(
        ctx,
        obj,
        shared,
        EventType::Normal,
        reason.as_str(),
        format!("{vm}: {message}"),
    )
    .await;
}

async fn fail<K: RunKind>(ctx: &Context, obj: &K, shared: &Shared, idx: usize, e: &Error) {
    let reason = e.reason();
    ctx.metrics
        .target(&K::kind(&()), TargetResult::Failed, reason.as_str());
    let vm = {
        let mut st = lock(shared);
        st.failed += 1;
        st.update(idx, |t| {
            t.state = TargetState::Failed;
            t.reason = Some(reason.as_str().into());
            t.message = Some(e.to_string());
            t.completion_time = Some(now());
            t.next_attempt_time = None;
            t.vm.clone()
        })
    };
    warn!(object = %obj.name_any(), vm = %vm, %reason, "target failed");
    status::publish_target(
        ctx,
        obj,
        shared,
        EventType::Warning,
        reason.as_str(),
        format!("{vm}: {e}"),
    )
    .await;
}
