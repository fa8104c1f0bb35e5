//! `mode: Inspect`: read a guest user's authorized_keys through the agent and report each
//! key in the target's status (`guestKeys`): its SHA256 fingerprint, type and comment,
//! whether guestcred manages it (the VM's `keys.guestcred.io/<user>` record) and when a
//! KeypairRebuild's TTL removes it. Nothing in the guest changes.
//!
//! The engine records a target's outcome with the fields every kind shares; the key list
//! is written right after the run's own status write, by [`publish_guest_keys`] (called
//! when the reconcile of the object returns): `apply` leaves the report in
//! [`KeyReports`](crate::controller::context::KeyReports), and the follow-up write puts it into the target, with the
//! resourceVersion it read, so it never lands over newer status. A report lost on the way
//! (a controller restart in between, a new leader) is read from the guest again.
use super::{ManagedKeys, require_agent};
use crate::api::keypair::{GuestKey, GuestKeys, KeyMode, MAX_GUEST_KEYS, display_comment};
use crate::api::{KeypairRebuild, Reason, TargetState, TargetStatus};
use crate::controller::context::Context;
use crate::controller::engine::Outcome;
use crate::controller::error::Error;
use crate::controller::targets::{self, TargetCall};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::{Api, ResourceExt};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tracing::{info, warn};

const GET_KEYS: &str = "guest-ssh-get-authorized-keys";
/// How soon a target whose report could not be written or read is looked at again.
const RETRY: Duration = Duration::from_secs(5);

/// `RunKind::apply` of a KeypairRebuild with mode Inspect.
pub(super) async fn inspect_keys(
    kr: &KeypairRebuild,
    ctx: &Context,
    call: &TargetCall,
) -> Result<Outcome, Error> {
    require_agent(call, &[GET_KEYS], "mode Inspect").await?;
    let report = read_report(kr, ctx, call).await?;
    let managed = report.keys.iter().filter(|k| k.managed).count();
    let mut message = format!(
        "read {} key(s) of user {}: {managed} managed by guestcred, {} not",
        report.total,
        call.user,
        report.keys.len() - managed
    );
    if report.not_shown > 0 {
        message.push_str(&format!(
            " (the first {MAX_GUEST_KEYS} listed, {} more not shown)",
            report.not_shown
        ));
    }
    if report.unreadable_lines > 0 {
        message.push_str(&format!(
            "; {} line(s) that are not keys",
            report.unreadable_lines
        ));
    }
    ctx.key_reports
        .put(&kr.uid().unwrap_or_default(), &call.vm, &call.user, report);
    Ok(Outcome {
        reason: Some(Reason::Inspected),
        message,
        mode: Some("Inspect".into()),
        ..Outcome::default()
    })
}

/// Read the keys of `call`'s user and describe each.
async fn read_report(
    kr: &KeypairRebuild,
    ctx: &Context,
    call: &TargetCall,
) -> Result<GuestKeys, Error> {
    let lines = call.shim.get_ssh_keys(&call.domain, &call.user).await?;
    let owned = kr.ownership(ctx, call).await.2.owned();
    let expiries = ttl_expiries(ctx, &kr.namespace().unwrap_or_default(), call);
    Ok(describe(&lines, &owned, &expiries, Time(Timestamp::now())))
}

/// The report of the lines a guest returned: each distinct key once, in file order, the
/// first [`MAX_GUEST_KEYS`] listed.
fn describe(
    lines: &[String],
    owned: &BTreeSet<String>,
    expiries: &BTreeMap<String, Time>,
    now: Time,
) -> GuestKeys {
    let mut seen = BTreeSet::new();
    let mut report = GuestKeys {
        read_at: Some(now),
        ..GuestKeys::default()
    };
    for line in lines {
        match crate::api::authorized_keys::parse_line(line) {
            Ok(Some(entry)) => {
                if !seen.insert(entry.fingerprint.clone()) {
                    continue;
                }
                report.total += 1;
                if report.keys.len() >= MAX_GUEST_KEYS {
                    report.not_shown += 1;
                    continue;
                }
                let managed = owned.contains(&entry.fingerprint);
                let comment = display_comment(entry.key.comment());
                report.keys.push(GuestKey {
                    key_type: entry.key.algorithm().as_str().to_string(),
                    comment: (!comment.is_empty()).then_some(comment),
                    managed,
                    // A TTL removes only keys guestcred added (see key_ownership).
                    expires_at: managed
                        .then(|| expiries.get(&entry.fingerprint).cloned())
                        .flatten(),
                    fingerprint: entry.fingerprint,
                });
            }
            Ok(None) => {}
            Err(_) => report.unreadable_lines += 1,
        }
    }
    report
}

/// When a TTL removes each key granted on this VM and user, from the grants of the live
/// KeypairRebuilds of the namespace (their current targets and the earlier runs' grants in
/// `pendingExpiries`): see [`effective_expiries`].
fn ttl_expiries(ctx: &Context, ns: &str, call: &TargetCall) -> BTreeMap<String, Time> {
    let mut grants: Vec<(String, Option<Time>)> = Vec::new();
    let same = |vm: &str, user: Option<&str>| vm == call.vm && user == Some(call.user.as_str());
    for o in ctx.rebuilds.state() {
        if o.namespace().as_deref() != Some(ns) || o.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let Some(st) = o.status.as_ref().map(|s| &s.run) else {
            continue;
        };
        for t in &st.targets {
            let live = t.state == TargetState::Succeeded
                && t.reason.as_deref() != Some(Reason::Expired.as_str());
            if live && same(&t.vm, t.user.as_deref()) {
                grants.extend(t.keys.iter().map(|fp| (fp.clone(), t.expires_at.clone())));
            }
        }
        for p in &st.pending_expiries {
            if same(&p.vm, p.user.as_deref()) {
                grants.extend(
                    p.keys
                        .iter()
                        .map(|fp| (fp.clone(), Some(p.expires_at.clone()))),
                );
            }
        }
    }
    effective_expiries(grants)
}

/// When each key goes, from its live grants (fingerprint, TTL end; None: no TTL): a TTL
/// removes a key only once no other live object still grants it (see `key_ownership`),
/// so at the latest TTL end of its grants, and never while one grants it without a TTL.
fn effective_expiries(
    grants: impl IntoIterator<Item = (String, Option<Time>)>,
) -> BTreeMap<String, Time> {
    let mut latest: BTreeMap<String, Option<Time>> = BTreeMap::new();
    for (fp, at) in grants {
        let entry = latest.entry(fp).or_insert_with(|| at.clone());
        *entry = match (entry.take(), at) {
            (Some(a), Some(b)) => Some(if b.0 > a.0 { b } else { a }),
            _ => None,
        };
    }
    latest
        .into_iter()
        .filter_map(|(fp, at)| Some((fp, at?)))
        .collect()
}

/// After a reconcile of `kr`: put the key reports of its finished Inspect targets into
/// their status (see the module docs). Returns when to look again if a report is still
/// missing.
pub async fn publish_guest_keys(kr: &KeypairRebuild, ctx: &Context) -> Option<Duration> {
    if kr.spec.mode != KeyMode::Inspect || kr.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let ns = kr.namespace().unwrap_or_default();
    let name = kr.name_any();
    let api: Api<KeypairRebuild> = Api::namespaced(ctx.client.clone(), &ns);
    for _ in 0..5 {
        let fresh = match api.get_opt(&name).await {
            Ok(Some(o)) => o,
            Ok(None) => return None,
            Err(e) => {
                warn!(object = %name, error = %e, "cannot read the object to write its key report");
                return Some(RETRY);
            }
        };
        if fresh.spec.mode != KeyMode::Inspect || fresh.metadata.deletion_timestamp.is_some() {
            return None;
        }
        let uid = fresh.uid().unwrap_or_default();
        let mut targets = fresh.status.as_ref().map(|s| s.run.targets.clone())?;
        let mut written: Vec<String> = Vec::new();
        let mut missing = false;
        for t in targets.iter_mut().filter(|t| needs_report(t)) {
            let user = t.user.clone().unwrap_or_default();
            let report = match ctx.key_reports.get(&uid, &t.vm, &user) {
                Some(r) => Some(r),
                None => read_again(&fresh, ctx, t).await,
            };
            match report {
                Some(r) => {
                    t.guest_keys = Some(r);
                    written.push(t.vm.clone());
                }
                None => missing |= !gave_up(&fresh, t),
            }
        }
        if written.is_empty() {
            return missing.then_some(RETRY);
        }
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": fresh.resource_version()},
            "status": {"targets": targets},
        });
        match api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                for vm in &written {
                    ctx.key_reports.forget(&uid, vm);
                }
                info!(object = %name, vms = ?written, "guest key report written");
                return missing.then_some(RETRY);
            }
            // Someone wrote the object meanwhile: read it again and redo.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => {
                warn!(object = %name, error = %e, "cannot write the guest key report; retrying");
                return Some(RETRY);
            }
        }
    }
    Some(RETRY)
}

/// A finished Inspect target whose report is not in status yet.
fn needs_report(t: &TargetStatus) -> bool {
    t.state == TargetState::Succeeded
        && t.reason.as_deref() == Some(Reason::Inspected.as_str())
        && t.guest_keys.is_none()
}

/// A report that could not be read again for longer than the target's deadline is given
/// up on (the target keeps its outcome; a new object reads the guest again).
fn gave_up(kr: &KeypairRebuild, t: &TargetStatus) -> bool {
    let deadline = Duration::from_secs(kr.spec.common.rollout.deadline_seconds.into());
    t.completion_time
        .as_ref()
        .is_some_and(|done| Timestamp::now() > done.0 + deadline)
}

/// The report of a finished target read from the guest once more (the one `apply` read
/// is gone: a restart or a new leader in between). Only the leader calls agents.
async fn read_again(kr: &KeypairRebuild, ctx: &Context, t: &TargetStatus) -> Option<GuestKeys> {
    if !ctx.leadership.is_leading().await {
        return None;
    }
    let ns = kr.namespace().unwrap_or_default();
    let user = t.user.as_deref().or(kr.spec.common.user.as_deref());
    let result = async {
        let call = targets::prepare_call(ctx, &ns, &t.vm, user, None).await?;
        require_agent(&call, &[GET_KEYS], "mode Inspect").await?;
        read_report(kr, ctx, &call).await
    }
    .await;
    match result {
        Ok(r) => Some(r),
        Err(e) => {
            warn!(object = %kr.name_any(), vm = %t.vm, error = %e, "cannot read the guest's keys again for the report");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJF3X2of517d5Kg00cGhwfj7PqWgUgbbxnZyL96Twgi5 test@example";
    const OTHER: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ+B4jIlELcMrHzsE1Ryt7XpT2gUKy/XZ+lbyfbQ9TZh key1@test";

    fn fp(line: &str) -> String {
        crate::api::authorized_keys::fingerprint(line).expect("a key")
    }

    #[test]
    fn a_key_expires_at_its_latest_grant_s_ttl_and_never_while_one_grants_it_for_good() {
        let t = |s: i64| Time(Timestamp::from_second(1_800_000_000 + s).expect("time"));
        let got = effective_expiries([
            ("a".to_string(), Some(t(10))),
            ("a".to_string(), Some(t(30))),
            ("a".to_string(), Some(t(20))),
            ("b".to_string(), Some(t(10))),
            ("b".to_string(), None),
            ("c".to_string(), None),
            ("c".to_string(), Some(t(5))),
            ("d".to_string(), Some(t(7))),
        ]);
        assert_eq!(
            got,
            [("a".to_string(), t(30)), ("d".to_string(), t(7))].into()
        );
    }

    #[test]
    fn each_key_once_with_ownership_and_only_managed_keys_expire() {
        let lines = vec![
            format!("restrict {ED25519}"),
            ED25519.to_string(),
            "not a key".to_string(),
            OTHER.to_string(),
        ];
        let at = Time(Timestamp::now());
        let owned: BTreeSet<String> = [fp(OTHER)].into();
        let expiries: BTreeMap<String, Time> =
            [(fp(OTHER), at.clone()), (fp(ED25519), at.clone())].into();
        let r = describe(&lines, &owned, &expiries, at.clone());
        assert_eq!((r.total, r.not_shown, r.unreadable_lines), (2, 0, 1));
        assert_eq!(r.keys[0].fingerprint, fp(ED25519));
        assert_eq!(r.keys[0].key_type, "ssh-ed25519");
        assert_eq!(r.keys[0].comment.as_deref(), Some("test@example"));
        assert!(!r.keys[0].managed);
        assert_eq!(r.keys[0].expires_at, None, "a TTL never removes a hand key");
        assert!(r.keys[1].managed);
        assert_eq!(r.keys[1].expires_at, Some(at));
    }

    #[test]
    fn the_list_stops_at_the_cap_and_counts_the_rest() {
        use ssh_key::public::{Ed25519PublicKey, KeyData};
        let lines: Vec<String> = (0..MAX_GUEST_KEYS + 3)
            .map(|i| {
                let mut bytes = [7u8; 32];
                bytes[..8].copy_from_slice(&(i as u64).to_le_bytes());
                let key = ssh_key::PublicKey::new(
                    KeyData::Ed25519(Ed25519PublicKey(bytes)),
                    format!("n{i}"),
                );
                key.to_openssh().expect("openssh")
            })
            .collect();
        let r = describe(
            &lines,
            &BTreeSet::new(),
            &BTreeMap::new(),
            Time(Timestamp::now()),
        );
        assert_eq!(r.total as usize, MAX_GUEST_KEYS + 3);
        assert_eq!(r.keys.len(), MAX_GUEST_KEYS);
        assert_eq!(r.not_shown, 3);
    }
}
