//! One run's loop: start targets as [`decide::next_step`] allows, flush status on a timer,
//! then finish; and the TTL expiries of finished targets.
use super::decide::{self, Expiry, Next, Stop};
use super::observe::Observed;
use super::shards::{self, ShardSet};
use super::status::{self, Basis, RunState, Shared, Written, lock};
use super::target::run_target;
use super::vmi_feed::{self, Feed, RunVmis};
use super::{RunKind, Undo, action, now};
use crate::api::{PendingExpiry, Reason, RunStatus, TargetStatus};
use crate::controller::context::Context;
use crate::controller::error::Error;
use crate::controller::targets;
use crate::metrics::TargetResult;
use futures::StreamExt;
use futures::future::{FusedFuture, FutureExt};
use futures::stream::FuturesUnordered;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Drive a run until no target is left to start and none is in flight.
pub(super) async fn drive<K: RunKind>(
    obj: Arc<K>,
    ctx: Arc<Context>,
    input: Arc<K::Input>,
    status: RunStatus,
    shards: Option<ShardSet>,
    retired: Vec<String>,
) -> Result<Action, Error> {
    let _run_timer = ctx.metrics.run_started(&K::kind(&()));
    // `obj` was read fresh when this run was decided on: its resourceVersion is the basis.
    let shared: Shared = Arc::new(Mutex::new(RunState::new(
        status,
        Basis::of(obj.as_ref()),
        shards,
        retired,
        ctx.settings.max_target_events,
    )));
    let mut in_flight = FuturesUnordered::new();
    let mut cursor = 0usize;
    let mut flush = tokio::time::interval(ctx.settings.status_flush_interval);
    let mut stop: Option<Stop> = None;
    let run_secret_version = lock(&shared).status.input_secret_version.clone();
    let total = lock(&shared).status.targets.len();
    let started = Instant::now();
    let mut last_progress = started;
    // A status tick (its writes: changed shards, then the status; maybe a progress Event)
    // runs beside the targets in flight, which go on being answered and started: on a
    // loaded API server those writes take long, and a run that waited for them stopped
    // every target each tick (bench P6 on the real control plane). One tick at a time.
    let ticking = futures::future::Fuse::terminated();
    tokio::pin!(ticking);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A fleet run's VMI feed (one LIST and a WATCH instead of a GET per target), followed
    // beside the targets until the run ends or the feed breaks.
    let feed = feed_for(obj.as_ref(), &lock(&shared).status);
    let feeding = match &feed {
        Some((vmis, selector)) => vmi_feed::follow(
            ctx.client.clone(),
            obj.namespace().unwrap_or_default(),
            selector.clone(),
            vmis.clone(),
        )
        .boxed()
        .fuse(),
        None => futures::future::Fuse::terminated(),
    };
    tokio::pin!(feeding);
    let feed = feed.map(|(vmis, _)| vmis);
    let mut feed_progress = feed.as_ref().map(|f| f.progress());

    loop {
        // The next target's start waits for the feed to list its VMI (see `Feed::covers`).
        let mut waiting_for_feed = false;
        if let Some(progress) = &mut feed_progress {
            progress.borrow_and_update();
        }
        // Start as many targets as the (latest) rollout settings allow.
        while stop.is_none() {
            let observed = Observed::now(obj.as_ref(), &ctx, run_secret_version.as_deref()).await;
            let next = {
                let st = lock(&shared);
                let view = observed.view();
                if st.superseded {
                    Next::Stop(Stop::Superseded)
                } else {
                    decide::next_step(
                        view.as_ref(),
                        &st.status.targets,
                        cursor,
                        in_flight.len(),
                        st.failed,
                    )
                }
            };
            match next {
                Next::Start(idx) => {
                    if let Some(f) = &feed
                        && !f.covers(&lock(&shared).status.targets[idx].vm)
                    {
                        waiting_for_feed = true;
                        break;
                    }
                    cursor = idx + 1;
                    in_flight.push(run_target(
                        obj.clone(),
                        ctx.clone(),
                        input.clone(),
                        shared.clone(),
                        idx,
                        run_secret_version.clone(),
                        feed.clone(),
                    ));
                }
                Next::Wait => break,
                Next::Stop(why) => {
                    if why == Stop::FailureBudgetExhausted {
                        let mut st = lock(&shared);
                        let skipped = decide::skip_pending(&mut st.status.targets, cursor);
                        st.touch_from(cursor);
                        for _ in 0..skipped {
                            ctx.metrics.target(
                                &K::kind(&()),
                                TargetResult::Skipped,
                                Reason::FailureBudgetExhausted.as_str(),
                            );
                        }
                    }
                    stop = Some(why);
                }
            }
        }
        if in_flight.is_empty() && !waiting_for_feed {
            // The run's last write comes after the tick's, never beside it.
            if !ticking.is_terminated() {
                (&mut ticking).await;
            }
            break;
        }
        tokio::select! {
            _ = in_flight.next(), if !in_flight.is_empty() => {}
            _ = flush.tick(), if ticking.is_terminated() => {
                ticking.set(tick(&ctx, obj.as_ref(), &shared, total, last_progress, started).fuse());
            }
            progress_shown = &mut ticking, if !ticking.is_terminated() => {
                if let Some(at) = progress_shown {
                    last_progress = at;
                }
            }
            () = &mut feeding, if !feeding.is_terminated() => {}
            _ = listed_further(&mut feed_progress), if waiting_for_feed => {}
        }
    }
    if let Some(vmis) = &feed {
        let (served, missed) = vmis.counts();
        tracing::info!(object = %obj.name_any(), served, missed, "VMI reads of the run's first attempts: from its feed, and with a GET");
    }

    let (superseded, events, unfinished) = {
        let st = lock(&shared);
        (st.superseded, st.events.clone(), st.status.unfinished())
    };
    if decide::held_events_due(stop, superseded, unfinished) {
        status::publish_held(&ctx, obj.as_ref(), &events).await;
    }
    if superseded || matches!(stop, Some(Stop::LostLeadership | Stop::Superseded)) {
        // A new leader, or newer state, owns the object's status now: write nothing.
        let stop = if superseded {
            Some(Stop::Superseded)
        } else {
            stop
        };
        return Ok(action(decide::requeue_after_run(stop, true, None)));
    }
    let (written, next_expiry) = finish_and_write(obj.as_ref(), &ctx, &shared, stop).await?;
    if written != Written::Done {
        return Ok(Action::await_change());
    }
    let summary = status::run_summary(&lock(&shared).status);
    if let Some((type_, reason, note)) = summary {
        status::publish(&ctx, obj.as_ref(), type_, &reason, "Finish", note).await;
    }
    let (unfinished, rotation) = {
        let st = lock(&shared);
        (
            st.status.unfinished() > 0,
            decide::rotation_due_in(&st.status, Timestamp::now()),
        )
    };
    if !unfinished && stop.is_none() {
        let status = lock(&shared).status.clone();
        obj.after_run(&ctx, &status).await;
    }
    Ok(action(decide::requeue_after_run(
        stop,
        unfinished,
        decide::sooner(next_expiry, rotation),
    )))
}

/// Until the feed's list gets further (never without a feed).
async fn listed_further(progress: &mut Option<tokio::sync::watch::Receiver<u64>>) {
    let Some(rx) = progress else {
        return std::future::pending().await;
    };
    if rx.changed().await.is_err() {
        std::future::pending().await
    }
}

/// A feed for a selector run that is [`vmi_feed::worth_a_feed`], and
/// its selector as a list query (the run's frozen one: the targets were resolved with it).
fn feed_for<K: RunKind>(obj: &K, status: &RunStatus) -> Option<(Arc<RunVmis>, String)> {
    if !obj.reads_vmi_from_feed() {
        return None;
    }
    let spec = status.target_spec.as_ref().unwrap_or(obj.target());
    let selector = targets::selector_query(spec.selector.as_ref()?).ok()?;
    if !vmi_feed::worth_a_feed(status.targets.iter().map(|t| t.state.is_terminal())) {
        return None;
    }
    let to_start = status.targets.iter().filter(|t| !t.state.is_terminal());
    let feed = Feed::for_targets(to_start.map(|t| t.vm.as_str()));
    Some((Arc::new(RunVmis::new(feed)), selector))
}

/// One status tick of a running run: write what changed, then publish a progress Event
/// if one is due. Returns when it published one.
async fn tick<K: RunKind>(
    ctx: &Context,
    obj: &K,
    shared: &Shared,
    total: usize,
    last_progress: Instant,
    started: Instant,
) -> Option<Instant> {
    status::flush(ctx, obj, shared).await;
    let cap = ctx.settings.max_target_events;
    if !decide::progress_event_due(total, cap, last_progress.elapsed()) {
        return None;
    }
    let note = decide::progress_note(&lock(shared).status.summary, started.elapsed());
    status::publish(
        ctx,
        obj,
        EventType::Normal,
        Reason::InProgress.as_str(),
        "Progress",
        note,
    )
    .await;
    Some(Instant::now())
}

/// Finish a run (conditions, phase), undo what expired, and write it all.
pub(super) async fn finish_and_write<K: RunKind>(
    obj: &K,
    ctx: &Context,
    shared: &Shared,
    stop: Option<Stop>,
) -> Result<(Written, Option<Duration>), Error> {
    let mut status = std::mem::take(&mut lock(shared).status);
    decide::finish(&mut status, obj.meta().generation, stop, &now());
    let (next_expiry, changed) = expire_due(obj, ctx, &mut status).await;
    {
        let mut st = lock(shared);
        st.replace_status(status);
        for idx in changed {
            st.update(idx, |_| ());
        }
    }
    Ok((status::persist(ctx, obj, shared).await?, next_expiry))
}

/// Undo what of target `t` is `due`, on its VM and user.
async fn undo_on<K: RunKind>(
    obj: &K,
    ctx: &Context,
    ns: &str,
    t: &TargetStatus,
    due: Undo,
) -> Result<String, Error> {
    let call = targets::prepare_call(ctx, ns, &t.vm, t.user.as_deref(), None).await?;
    obj.undo(ctx, &call, t, due).await
}

/// Undo the targets whose TTL ran out; returns how long until the next one is due. The
/// deadline lives in status (`expiresAt`), so a controller restart does not lose it.
pub(super) async fn expire_due<K: RunKind>(
    obj: &K,
    ctx: &Context,
    status: &mut RunStatus,
) -> (Option<Duration>, Vec<usize>) {
    let ns = obj.namespace().unwrap_or_default();
    let mut next: Option<Duration> = None;
    let mut changed = Vec::new();
    let mut sooner = |wait: Duration| next = Some(next.map_or(wait, |n: Duration| n.min(wait)));
    for (idx, t) in status.targets.iter_mut().enumerate() {
        // An overlap that ended: the keys the target replaced go now.
        if let Some(at) = obj.overlap_ends_at(t) {
            let left = decide::remaining(at, Timestamp::now());
            if left.is_zero() {
                changed.push(idx);
                let result = undo_on(obj, ctx, &ns, t, Undo::OverlapEnded).await;
                match result {
                    Ok(done) => {
                        t.replaced_keys.clear();
                        t.replaced_keys_remove_at = None;
                        t.message = Some(done);
                    }
                    Err(e) => {
                        t.message = Some(format!(
                            "removing the replaced keys after the overlap failed: {e}; retrying"
                        ));
                        sooner(Duration::from_secs(10));
                    }
                }
            } else {
                sooner(left);
            }
        }
        match decide::expiry(t, Timestamp::now()) {
            Expiry::None => continue,
            Expiry::DueIn(left) => {
                sooner(left);
                continue;
            }
            Expiry::Due => {}
        }
        let result = undo_on(obj, ctx, &ns, t, Undo::Expired).await;
        changed.push(idx);
        match result {
            Ok(done) => {
                t.reason = Some(Reason::Expired.as_str().into());
                t.message = Some(done.clone());
                t.verified = None;
                expired(ctx, obj, format!("{}: {done}", t.vm)).await;
            }
            Err(e) => {
                t.message = Some(format!("removing expired keys failed: {e}; retrying"));
                sooner(Duration::from_secs(10));
            }
        }
    }
    // Grants of replaced runs: removed when due, then forgotten.
    let pending = std::mem::take(&mut status.pending_expiries);
    status.pending_expiries =
        expire_pending(obj, ctx, &ns, pending, &status.targets, &mut sooner).await;
    // Those of replaced large runs, kept in shards: only a shard with a grant due is read.
    let mut kept = Vec::new();
    for r in std::mem::take(&mut status.pending_expiry_shards) {
        let left = decide::remaining(r.expires_at.0, Timestamp::now());
        if !left.is_zero() {
            sooner(left);
            kept.push(r);
            continue;
        }
        let (grants, version) = match shards::load_expiries(ctx, obj, &r).await {
            Ok(v) => v,
            Err(shards::LoadError::Api(e)) => {
                tracing::warn!(object = %obj.name_any(), shard = %r.name, error = %e, "reading grants to expire failed; retrying");
                sooner(Duration::from_secs(10));
                kept.push(r);
                continue;
            }
            Err(shards::LoadError::Lost(why)) => {
                status::publish(
                    ctx,
                    obj,
                    EventType::Warning,
                    Reason::Expired.as_str(),
                    "Expire",
                    format!("{why}: the grants it held could not be removed on time"),
                )
                .await;
                continue;
            }
        };
        let left = expire_pending(obj, ctx, &ns, grants, &status.targets, &mut sooner).await;
        match shards::rewrite_expiries(ctx, obj, &r, version, left).await {
            Ok(Some(next)) => {
                sooner(decide::remaining(next.expires_at.0, Timestamp::now()));
                kept.push(next);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(object = %obj.name_any(), shard = %r.name, error = %e, "writing the grants left to expire failed; retrying");
                sooner(Duration::from_secs(10));
                kept.push(r);
            }
        }
    }
    status.pending_expiry_shards = kept;
    (next, changed)
}

/// Remove the keys of the grants in `pending` that are due (minus those the current run
/// grants for longer); returns the grants still to remove.
async fn expire_pending<K: RunKind>(
    obj: &K,
    ctx: &Context,
    ns: &str,
    pending: Vec<PendingExpiry>,
    current: &[TargetStatus],
    sooner: &mut impl FnMut(Duration),
) -> Vec<PendingExpiry> {
    let mut still_pending = Vec::new();
    for pending in pending {
        let left = decide::remaining(pending.expires_at.0, Timestamp::now());
        if !left.is_zero() {
            sooner(left);
            still_pending.push(pending);
            continue;
        }
        let granted = TargetStatus {
            vm: pending.vm.clone(),
            user: pending.user.clone(),
            keys: decide::keys_to_expire(&pending, current),
            ..TargetStatus::default()
        };
        let result = match targets::prepare_call(
            ctx,
            ns,
            &pending.vm,
            pending.user.as_deref(),
            None,
        )
        .await
        {
            Ok(call) => obj.undo(ctx, &call, &granted, Undo::Expired).await,
            // The VM is gone: so are the keys in it.
            Err(Error::VmNotFound(_)) => Ok("the VM is gone".to_string()),
            Err(e) => Err(e),
        };
        match result {
            Ok(done) => {
                let note = format!("{} (an earlier run's grant): {done}", pending.vm);
                expired(ctx, obj, note).await;
            }
            Err(e) => {
                tracing::warn!(object = %obj.name_any(), vm = %pending.vm, error = %e, "removing an earlier run's expired keys failed; retrying");
                sooner(Duration::from_secs(10));
                still_pending.push(pending);
            }
        }
    }
    still_pending
}

/// A grant's TTL passed and its keys were removed: counted and told in an Event.
async fn expired<K: RunKind>(ctx: &Context, obj: &K, note: String) {
    ctx.metrics.target(
        &K::kind(&()),
        TargetResult::Expired,
        Reason::Expired.as_str(),
    );
    status::publish(
        ctx,
        obj,
        EventType::Normal,
        Reason::Expired.as_str(),
        "Expire",
        note,
    )
    .await;
}
