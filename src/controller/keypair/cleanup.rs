//! Deleting a KeypairRebuild removes the keys it added (`spec.onDelete: Remove`, the
//! default): the keys of every target that succeeded (and did not expire yet) and of its
//! `status.pendingExpiries`, but only the ones guestcred added itself (the VM's
//! `keys.guestcred.io/<user>` record, see `key_ownership`) and no other live
//! KeypairRebuild still grants on the same VM and user. Removed by fingerprint through the
//! agent, as a TTL expiry does, and released from the record.
//!
//! A VM that is gone, stopped or unreachable does not hold the deletion forever: it is
//! retried until `EngineSettings::cleanup_wait` after the deletionTimestamp, then a Warning
//! Event (`KeysLeftBehind`) names the VMs and fingerprints left and the finalizer goes. A
//! guest whose agent cannot remove keys (no guest-ssh-*, e.g. keys delivered by Rebuild)
//! is reported at once: removing them would take another VM restart, which a deletion
//! does not do.
use super::{ManagedKeys, update_record};
use crate::api::keypair::OnDelete;
use crate::api::{KeypairRebuild, RunStatus, TargetState};
use crate::controller::context::Context;
use crate::controller::engine::{self, Cleanup};
use crate::controller::error::Error;
use crate::controller::keys::remove_keys;
use crate::controller::targets;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::events::{Event, EventType};
use kube::{Resource, ResourceExt};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tracing::{info, warn};

/// The finalizer on every KeypairRebuild (removed once its keys are).
pub const KEYS_FINALIZER: &str = "guestcred.io/keys";
/// Warning Event reason: deleting the object left keys in guests.
pub const KEYS_LEFT_BEHIND: &str = "KeysLeftBehind";
/// How often an unreachable VM is tried again while the deletion waits for it.
const RETRY: Duration = Duration::from_secs(2);

type Fingerprints = BTreeSet<String>;
/// (VM, user as recorded; `None`: the default user the target resolved to).
type GrantKey = (String, Option<String>);

/// Keys an object put in place and that are still there, by VM and user.
fn grants(status: Option<&RunStatus>) -> BTreeMap<GrantKey, Fingerprints> {
    let mut out: BTreeMap<GrantKey, Fingerprints> = BTreeMap::new();
    let Some(st) = status else { return out };
    for t in &st.targets {
        let expired = t.reason.as_deref() == Some(crate::api::Reason::Expired.as_str());
        if t.state == TargetState::Succeeded && !expired && !t.keys.is_empty() {
            out.entry((t.vm.clone(), t.user.clone()))
                .or_default()
                .extend(t.keys.iter().cloned());
        }
    }
    for p in &st.pending_expiries {
        out.entry((p.vm.clone(), p.user.clone()))
            .or_default()
            .extend(p.keys.iter().cloned());
    }
    out
}

/// What other live KeypairRebuilds of the namespace grant, by VM and user: kept.
async fn granted_by_others(
    kr: &KeypairRebuild,
    ctx: &Context,
) -> Result<BTreeMap<GrantKey, Fingerprints>, Error> {
    let ns = kr.namespace();
    let mut out: BTreeMap<GrantKey, Fingerprints> = BTreeMap::new();
    for other in ctx.rebuilds.state() {
        if other.namespace() != ns
            || other.uid() == kr.uid()
            || other.metadata.deletion_timestamp.is_some()
        {
            continue;
        }
        let theirs = engine::full_status(other.as_ref(), ctx).await?;
        for (key, fps) in grants(Some(&theirs)) {
            out.entry(key).or_default().extend(fps);
        }
    }
    Ok(out)
}

/// Remove one grant's keys from its VM; returns how many lines were removed.
async fn remove_grant(
    kr: &KeypairRebuild,
    ctx: &Context,
    (vm, user): &GrantKey,
    keys: &Fingerprints,
    kept: &Fingerprints,
) -> Result<usize, Error> {
    let ns = kr.namespace().unwrap_or_default();
    let call = targets::prepare_call(ctx, &ns, vm, user.as_deref(), None).await?;
    let (me, _, record) = kr.ownership(ctx, &call).await;
    // What it granted or holds there and guestcred added (a key the person had stays).
    let candidates: Fingerprints = keys
        .union(&record.held_by(&me))
        .filter(|k| record.owned().contains(*k))
        .cloned()
        .collect();
    if candidates.is_empty() {
        return Ok(0);
    }
    if !ctx.leadership.is_leading().await {
        return Err(Error::ShimUnavailable(
            "this replica is not the leader; the leader removes the keys".into(),
        ));
    }
    // Let go on a fresh read: what another live object holds or grants stays.
    let ours = update_record(ctx, &call, |r, live| {
        r.release(&me, &candidates, live, kept)
    })
    .await?;
    let removed = remove_keys(&call, &ours).await?;
    if !ours.is_empty() {
        update_record(ctx, &call, |r, live| r.forget(&ours, live)).await?;
    }
    Ok(removed)
}

/// `RunKind::cleanup` of KeypairRebuild.
pub(super) async fn remove_granted_keys(
    kr: &KeypairRebuild,
    ctx: &Context,
) -> Result<Cleanup, Error> {
    if kr.spec.on_delete == OnDelete::Keep {
        return Ok(Cleanup::Done);
    }
    // What the others grant needs every live object listed (right after a start the
    // cache may still be filling). Err only when the cache's writer is gone.
    let _ = ctx.rebuilds.wait_until_ready().await;
    let others = granted_by_others(kr, ctx).await?;
    let mine = engine::full_status(kr, ctx).await?;
    let mut left: Vec<String> = Vec::new();
    let mut may_come_back = false;
    for (key, keys) in grants(Some(&mine)) {
        let kept = others.get(&key).cloned().unwrap_or_default();
        match remove_grant(kr, ctx, &key, &keys, &kept).await {
            Ok(n) => {
                info!(object = %kr.name_any(), vm = %key.0, removed = n, "keys of a deleted object removed");
            }
            Err(e) => {
                // Gone (maybe stopped, maybe coming back) or unreachable for now: wait for
                // it, within the bound. Anything else will not change by waiting.
                let waits = e.is_transient() || matches!(e, Error::VmNotFound(_));
                may_come_back |= waits;
                warn!(object = %kr.name_any(), vm = %key.0, error = %e, waits, "cannot remove the keys of a deleted object");
                let fps: Vec<&str> = keys.difference(&kept).map(String::as_str).collect();
                left.push(format!("{} ({}): {e}", key.0, fps.join(", ")));
            }
        }
    }
    if left.is_empty() {
        return Ok(Cleanup::Done);
    }
    if may_come_back {
        let since = kr
            .metadata
            .deletion_timestamp
            .as_ref()
            .map_or_else(Timestamp::now, |t| t.0);
        let until = since + ctx.settings.cleanup_wait;
        let remaining = until.duration_since(Timestamp::now());
        if remaining.is_positive() {
            let remaining = Duration::try_from(remaining).unwrap_or(RETRY);
            return Ok(Cleanup::RetryAfter(remaining.min(RETRY)));
        }
    }
    let note = format!(
        "deleted without removing every key it added; left in place: {}",
        left.join("; ")
    );
    let ev = Event {
        type_: EventType::Warning,
        reason: KEYS_LEFT_BEHIND.into(),
        note: Some(note),
        action: "Cleanup".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &kr.object_ref(&())).await {
        warn!(object = %kr.name_any(), error = %e, "could not publish event");
    }
    Ok(Cleanup::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{PendingExpiry, TargetStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn target(vm: &str, state: TargetState, reason: &str, keys: &[&str]) -> TargetStatus {
        TargetStatus {
            vm: vm.into(),
            user: Some("alice".into()),
            state,
            reason: Some(reason.into()),
            keys: keys.iter().map(|k| k.to_string()).collect(),
            ..TargetStatus::default()
        }
    }

    #[test]
    fn grants_are_succeeded_unexpired_targets_and_pending_expiries() {
        let st = RunStatus {
            targets: vec![
                target("a", TargetState::Succeeded, "Verified", &["k1"]),
                target("b", TargetState::Succeeded, "Expired", &["k2"]),
                target("c", TargetState::Failed, "VerificationFailed", &["k3"]),
            ],
            pending_expiries: vec![PendingExpiry {
                vm: "a".into(),
                user: Some("alice".into()),
                keys: vec!["k0".into()],
                expires_at: Time(Timestamp::now()),
            }],
            ..RunStatus::default()
        };
        let g = grants(Some(&st));
        assert_eq!(g.len(), 1, "{g:?}");
        assert_eq!(
            g[&("a".to_string(), Some("alice".to_string()))],
            ["k0", "k1"].iter().map(|s| s.to_string()).collect()
        );
    }
}
