//! The run engine shared by both kinds: validate → read the input → freeze the targets →
//! drive them with bounded concurrency, retries, deadlines and a failure budget → write
//! status (batched) and Events.
//!
//! - [`reconcile`] (this file): the flow of one reconcile;
//! - [`decide`]: every decision as a pure function (what starts next, why a run stops,
//!   whether there is work, the phase of a stall, finishing a run, requeue, retry waits);
//! - [`schedule`]: one run's loop, TTL expiries;
//! - [`target`]: one target's attempts;
//! - [`status`]: status writes, the Stalled condition and Events.
//!
//! A run lives inside one reconcile call; kube-runtime never reconciles the same object
//! twice at once, and other objects proceed in parallel. A controller restart resumes the
//! targets that were not finished: every agent call is idempotent for the same input, and
//! generated passwords are stored before they are applied.
//!
//! # The life of a password
//! A user applies a GuestPasswordReset whose `spec.password.secretRef` names a Secret. The
//! kind's watch (or, later, the Secret watch in `controller/mod.rs`, `secret_versions`)
//! queues the object, and [`reconcile`] runs: `RunKind::validate` (`password.rs`: the CRD's
//! CEL rules compiled once in `api::rules`, plus ranges) and then `RunKind::prepare`
//! (`password.rs`) reads the Secret with `secrets::read_key`, checks the value with
//! `api::validate::password` and keys a hash of it (`secrets::keyed_hash`), so status can
//! tell a new input from an applied one without holding the value. A new hash freezes the
//! targets (`targets::resolve` lists the VMIs) into status. [`schedule::drive`] starts
//! targets as [`decide::next_step`] allows; each runs [`target::run_target`]:
//! `targets::prepare_call` finds the VMI's node, the shim pod on that node
//! (`shims::ShimDirectory`) and the guest user; `RunKind::apply` (`password.rs`) — for a
//! generated password, first storing it in an owned Secret (`secrets::ensure_generated`) —
//! sends `POST /v1/password` through `shim_client::ShimApi::set_password`. On the node,
//! `shim::server` checks the caller's certificate (`shim::auth`) and the node, validates
//! the request again (`api::validate`), and the backend (`shim::libvirt`:
//! virDomainSetUserPassword, or `shim::qga`: guest-set-user-password) reaches qemu-ga in
//! the guest, which runs chpasswd. The answer comes back as a typed reason
//! (`shim::errors`), is mapped to a condition reason in one place (`controller::error`),
//! and lands in status ([`status::flush`], then [`decide::finish`]) and in an Event
//! ([`status::publish`]).
pub mod decide;
mod finalize;
mod observe;
mod schedule;
mod shards;
mod status;
mod target;
mod vmi_feed;

use super::context::Context;
use super::error::Error;
use super::targets::{self, TargetCall};
use crate::api::{RolloutSpec, RunSpec, RunStatus, SecretKeyRef, TargetSpec, TargetStatus};
use decide::Requeue;
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use shards::ShardSet;
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tracing::info;

pub use finalize::Cleanup;

/// What a successful target reports.
#[derive(Debug, Default)]
pub struct Outcome {
    pub reason: Option<crate::api::Reason>,
    pub message: String,
    pub output_secret: Option<String>,
    pub mode: Option<String>,
    pub keys: Vec<String>,
    pub verified: Option<bool>,
    pub expires_at: Option<Time>,
    /// Keys with an overlap: the keys replaced, still in place until `replaced_keys_remove_at`.
    pub replaced_keys: Vec<String>,
    pub replaced_keys_remove_at: Option<Time>,
}

/// What of a succeeded target's change [`RunKind::undo`] undoes, now that it is due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Undo {
    /// The change itself, once its `expiresAt` passed (keys with a TTL).
    Expired,
    /// What the change replaced and kept for an overlap, once the overlap ended: the
    /// engine then clears the target's `replacedKeys` and `replacedKeysRemoveAt`.
    OverlapEnded,
}

/// A run's input as `RunKind::prepare` read it.
pub struct Prepared<I> {
    pub input: I,
    /// Keyed hash that changes with the input (see `RunStatus::input_hash`).
    pub hash: String,
    /// The same input's hash as an older controller recorded it, if it hashed differently:
    /// a status holding it is taken as this input, and rewritten with `hash`.
    pub legacy_hash: Option<String>,
    /// resourceVersion of the Secret the input was read from, if any.
    pub secret_version: Option<String>,
    /// Scheduled rotation: when the present interval began and the next one begins.
    pub rotation: Option<(Time, Time)>,
}

impl<I> Prepared<I> {
    /// An input read from no Secret (inline or generated).
    pub fn inline(input: I, hash: String) -> Self {
        Self {
            input,
            hash,
            legacy_hash: None,
            secret_version: None,
            rotation: None,
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

    /// The spec both kinds share (target, user, rollout).
    fn common(&self) -> &RunSpec;
    fn target(&self) -> &TargetSpec {
        &self.common().target
    }
    fn rollout(&self) -> &RolloutSpec {
        &self.common().rollout
    }
    fn spec_user(&self) -> Option<&str> {
        self.common().user.as_deref()
    }
    /// What an agent call of this kind needs from the target's VirtualMachine.
    fn vm_read(&self) -> targets::VmRead {
        targets::VmRead::Always
    }
    /// Whether a target's first attempt may read its VMI from the run's feed (a watch, see
    /// `vmi_feed`) rather than a GET. Not where a stale VMI could cost more than a retry:
    /// a rebuild compares the VMI's uid with its marker to decide on a restart.
    fn reads_vmi_from_feed(&self) -> bool {
        true
    }
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
    /// After a run ended with every target finished and its status written: tidy up what
    /// earlier runs left (scheduled rotation prunes old generated Secrets).
    fn after_run(&self, _ctx: &Context, _status: &RunStatus) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// Whether the targets' changes expire (keys with a TTL, or replaced keys kept for an
    /// overlap): a finished large run's records are then read back to find the ones due.
    fn grants_expire(&self) -> bool {
        false
    }
    /// When a succeeded target's overlap ends (keys with `overlapSeconds`: the keys it
    /// replaced are removed then); None: no overlap pending. Kept in the target's record
    /// (`replacedKeysRemoveAt`), so a controller restart keeps it.
    fn overlap_ends_at(&self, _target: &TargetStatus) -> Option<Timestamp> {
        None
    }
    /// Undo what of a succeeded target's change is due ([`Undo`]). Returns what was done,
    /// for status and the Event.
    fn undo(
        &self,
        _ctx: &Context,
        _call: &TargetCall,
        _target: &TargetStatus,
        _due: Undo,
    ) -> impl Future<Output = Result<String, Error>> + Send {
        async { Ok(String::new()) }
    }
    /// The finalizer this kind's objects carry when deleting one undoes something (see
    /// `finalize`); `None`: deletion just stops the run.
    fn finalizer() -> Option<&'static str> {
        None
    }
    /// Undo what the object did, once it is being deleted (kinds with a finalizer).
    fn cleanup(&self, _ctx: &Context) -> impl Future<Output = Result<Cleanup, Error>> + Send {
        async { Ok(Cleanup::Done) }
    }
    /// Apply the input to one target (one attempt).
    fn apply(
        &self,
        ctx: &Context,
        input: &Self::Input,
        call: &TargetCall,
    ) -> impl Future<Output = Result<Outcome, Error>> + Send;
}

fn now() -> Time {
    Time(Timestamp::now())
}

fn action(requeue: Requeue) -> Action {
    match requeue {
        Requeue::After(wait) => Action::requeue(wait),
        Requeue::OnChange => Action::await_change(),
    }
}

/// Reconcile entry point for both kinds (through the finalizer helper for kinds with one).
pub async fn reconcile<K: RunKind>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error> {
    finalize::reconcile(obj, ctx).await
}

/// The object's input read and checked (`RunKind::prepare`); a missing or bad Secret
/// stalls the object (status written) and gives the action to return instead.
async fn prepare_or_stall<K: RunKind>(
    obj: &K,
    ctx: &Context,
    status: &mut RunStatus,
) -> Result<Result<Prepared<K::Input>, Action>, Error> {
    match obj.prepare(ctx).await {
        Ok(v) => Ok(Ok(v)),
        Err(e @ Error::Kube(_)) => Err(e),
        Err(e) => {
            // A missing or bad Secret: wait for the Secret to change (watched).
            status::stall(ctx, obj, status, &e).await?;
            Ok(Err(Action::requeue(Duration::from_secs(300))))
        }
    }
}

/// The spec's own checks: the target is the one the run froze, the rollout fields hold
/// together, the kind's rules pass. A spec that fails them stalls the object (status
/// written) and gives the action to return instead.
async fn check_or_stall<K: RunKind>(
    obj: &K,
    ctx: &Context,
    status: &mut RunStatus,
) -> Result<Option<Action>, Error> {
    let checked = decide::target_unchanged(status, obj.target())
        .map_err(Error::InvalidSpec)
        .and_then(|()| obj.rollout().check().map_err(Error::InvalidSpec))
        .and_then(|()| obj.validate());
    match checked {
        Ok(()) => Ok(None),
        Err(e) => {
            status::stall(ctx, obj, status, &e).await?;
            Ok(Some(Action::await_change()))
        }
    }
}

/// A status recorded with the input's legacy hash takes the current hash (same input).
fn adopt_legacy<I>(prepared: &Prepared<I>, status: &mut RunStatus) {
    if prepared.legacy_hash.is_some() && status.input_hash == prepared.legacy_hash {
        status.input_hash = Some(prepared.hash.clone());
    }
}

/// One reconcile of an object that is not being cleaned up.
async fn run<K: RunKind>(obj: Arc<K>, ctx: Arc<Context>) -> Result<Action, Error> {
    if obj.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let mut status = obj.run_status().cloned().unwrap_or_default();

    if let Some(action) = check_or_stall(obj.as_ref(), &ctx, &mut status).await? {
        return Ok(action);
    }
    let cached_secret_version = obj
        .input_secret()
        .and_then(|s| ctx.secret_version(&obj.namespace().unwrap_or_default(), &s.name));
    if decide::input_unchanged_since_run(
        &status,
        obj.meta().generation,
        cached_secret_version.as_deref(),
    ) {
        // Finished, same spec, same Secret: nothing to read (a restart resyncs in memory).
        return finished(obj.as_ref(), &ctx, status).await;
    }
    let mut prepared = match prepare_or_stall(obj.as_ref(), &ctx, &mut status).await? {
        Ok(p) => p,
        Err(action) => return Ok(action),
    };
    adopt_legacy(&prepared, &mut status);
    let mut obj = obj;
    let mut stored_shards = None;
    if decide::has_work(&status, &prepared.hash) {
        // The cache may lag behind our own last status write (a reconcile queued during a
        // run sees the object as it was mid-run). Never act on that: read it fresh.
        let api: Api<K> = Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
        let fresh = match api.get_opt(&obj.name_any()).await? {
            Some(fresh) if fresh.meta().deletion_timestamp.is_none() => Arc::new(fresh),
            _ => return Ok(Action::await_change()),
        };
        // The input too comes from the fresh object: a spec read from a lagging cache
        // (say, the keys of the run before) must never start a run under the newer run's
        // status. Without this, a cached object from the middle of run 1, reconciled after
        // run 2 had finished, would start a run with run 1's keys that lets go of run 2's
        // (a watch that lags far behind the writes leaves such a copy in the cache).
        // controller_keys'
        // `a_stale_cached_copy_from_before_a_spec_change_starts_no_run_with_its_old_keys`
        // puts one there with the emulator's stale-list fault.
        status = fresh.run_status().cloned().unwrap_or_default();
        if fresh.meta().resource_version != obj.meta().resource_version {
            if let Some(action) = check_or_stall(fresh.as_ref(), &ctx, &mut status).await? {
                return Ok(action);
            }
            prepared = match prepare_or_stall(fresh.as_ref(), &ctx, &mut status).await? {
                Ok(p) => p,
                Err(action) => return Ok(action),
            };
        }
        obj = fresh;
        adopt_legacy(&prepared, &mut status);
        // A large run: every target's record comes back from its shards.
        (status, stored_shards) = expand(obj.as_ref(), &ctx, status).await?;
    }
    let hash = prepared.hash.as_str();
    let generation = obj.meta().generation;
    let mut retired = Vec::new();
    if status.input_hash.as_deref() != Some(hash) {
        let ns = obj.namespace().unwrap_or_default();
        let vms = match targets::resolve(&ctx.client, &ns, obj.target()).await {
            Ok(vms) => vms,
            Err(e @ Error::Kube(_)) => return Err(e),
            Err(e) => {
                status::stall(&ctx, obj.as_ref(), &mut status, &e).await?;
                return Ok(Action::requeue(Duration::from_secs(60)));
            }
        };
        info!(object = %obj.name_any(), targets = vms.len(), "starting a run");
        // TTL grants of the run being replaced keep their expiry (stored below).
        let carried = decide::carry_expiries(&status.targets);
        status.input_hash = Some(hash.to_string());
        status.target_spec = Some(obj.target().clone());
        status.targets = vms
            .into_iter()
            .map(|vm| TargetStatus {
                vm,
                ..TargetStatus::default()
            })
            .collect();
        // The replaced run's shards, and any a stopped controller left unnamed, go once
        // the new run's status is written.
        let was_sharded = stored_shards.take().is_some() || status.is_sharded();
        status.shards.clear();
        status.unlisted_targets = None;
        stored_shards = ShardSet::new_run(obj.as_ref(), status.targets.len());
        if was_sharded || stored_shards.is_some() {
            let keep: Vec<String> = status
                .pending_expiry_shards
                .iter()
                .map(|r| r.name.clone())
                .collect();
            retired = shards::orphans(&ctx, obj.as_ref(), &keep).await?;
        }
        if crate::api::shards::sharded(carried.len()) {
            let stored = shards::store_expiries(&ctx, obj.as_ref(), carried).await?;
            status.pending_expiry_shards.extend(stored);
        } else {
            status.pending_expiries.extend(carried);
        }
    }
    // The hash matches this version of the Secret (also when only its metadata changed).
    status.input_secret_version = prepared.secret_version;
    if let Some((last, next)) = prepared.rotation {
        status.last_rotation = Some(last);
        status.next_rotation = Some(next);
    }
    status.observed_generation = generation;
    if !decide::has_work(&status, hash) {
        return finished(obj.as_ref(), &ctx, status).await;
    }
    schedule::drive(
        obj,
        ctx,
        Arc::new(prepared.input),
        status,
        stored_shards,
        retired,
    )
    .await
}

/// The status with every target's record: a large run's stored status lists only some,
/// the rest come back from its shards. Shards that are gone or unreadable lose the run's
/// records: the run starts again (a Warning Event says so; generated passwords are found
/// again in their Secrets, which are named after the run and the VM).
async fn expand<K: RunKind>(
    obj: &K,
    ctx: &Context,
    stored: RunStatus,
) -> Result<(RunStatus, Option<ShardSet>), Error> {
    if !stored.is_sharded() {
        return Ok((stored, None));
    }
    match shards::load(ctx, obj, &stored).await {
        Ok((full, set)) => Ok((full, Some(set))),
        Err(shards::LoadError::Api(e)) => Err(e),
        Err(shards::LoadError::Lost(why)) => {
            tracing::warn!(object = %obj.name_any(), %why, "the run's records are lost; it starts again");
            status::publish(
                ctx,
                obj,
                kube::runtime::events::EventType::Warning,
                crate::api::Reason::InProgress.as_str(),
                "Resume",
                format!("{why}: the run starts again"),
            )
            .await;
            let mut restart = stored;
            restart.input_hash = None;
            Ok((restart, None))
        }
    }
}

/// `obj`'s status with every target's record (read from its shards for a large run).
/// (Grants kept in expiry shards are put back in `pendingExpiries`.)
pub async fn full_status<K: RunKind>(obj: &K, ctx: &Context) -> Result<RunStatus, Error> {
    let lost = |e| match e {
        shards::LoadError::Api(e) => e,
        shards::LoadError::Lost(why) => Error::InvalidSpec(why),
    };
    let stored = obj.run_status().cloned().unwrap_or_default();
    let mut full = if stored.is_sharded() {
        shards::load(ctx, obj, &stored).await.map_err(lost)?.0
    } else {
        stored
    };
    for r in std::mem::take(&mut full.pending_expiry_shards) {
        let (grants, _) = shards::load_expiries(ctx, obj, &r).await.map_err(lost)?;
        full.pending_expiries.extend(grants);
    }
    Ok(full)
}

/// A finished object: only TTL expiries and a refreshed observedGeneration remain.
async fn finished<K: RunKind>(
    obj: &K,
    ctx: &Context,
    mut status: RunStatus,
) -> Result<Action, Error> {
    if status.is_sharded()
        && obj.grants_expire()
        && let (full, Some(set)) = expand(obj, ctx, status.clone()).await?
    {
        // Expiries are in the targets' records: bring them back, then finish as a run does.
        let shared: status::Shared = Arc::new(std::sync::Mutex::new(status::RunState::new(
            full,
            status::Basis::of(obj),
            Some(set),
            Vec::new(),
            ctx.settings.max_target_events,
        )));
        let (_, next_expiry) = schedule::finish_and_write(obj, ctx, &shared, None).await?;
        let next = decide::sooner(
            next_expiry,
            decide::rotation_due_in(&status, Timestamp::now()),
        );
        return Ok(next.map_or_else(Action::await_change, Action::requeue));
    }
    let generation = obj.meta().generation;
    status.observed_generation = generation;
    let before = obj.run_status().cloned().unwrap_or_default();
    decide::finish(&mut status, generation, None, &now());
    let (next_expiry, _) = schedule::expire_due(obj, ctx, &mut status).await;
    if status != before {
        status::write(ctx, obj, &status, &mut status::Basis::of(obj)).await?;
    }
    let next = decide::sooner(
        next_expiry,
        decide::rotation_due_in(&status, Timestamp::now()),
    );
    Ok(next.map_or_else(Action::await_change, Action::requeue))
}
