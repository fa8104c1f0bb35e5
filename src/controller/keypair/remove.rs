//! `spec.removeFingerprints`: remove the named keys from a guest user's authorized_keys,
//! live through the agent, and verify by reading back that they are gone.
//!
//! Naming a fingerprint is an explicit request, so the key goes whoever added it (guestcred
//! or a person); nothing that is not named is touched. A fingerprint the guest does not
//! have fails the target with `KeyNotFound` before anything changes, unless this very
//! object removed it in an earlier attempt: before the agent call, the VM records which
//! fingerprints which object (by UID) is removing (the `removed-keys.guestcred.io/<user>`
//! annotation, the last few objects only), so a retry after an unknown outcome (an agent
//! timeout, a controller restart) finds the key gone and succeeds instead of failing.
use super::{ManagedKeys, require_agent, update_record, update_vm_annotation};
use crate::api::wire::KeyOp;
use crate::api::{KeypairRebuild, Reason, TargetState};
use crate::controller::context::Context;
use crate::controller::engine::Outcome;
use crate::controller::error::Error;
use crate::controller::keys::{fingerprint_of, verify_gone};
use crate::controller::targets::TargetCall;
use kube::ResourceExt;
use std::collections::BTreeSet;

/// Annotation prefix on a VM: the fingerprints recent KeypairRebuilds removed for a user.
pub const REMOVED_KEYS_ANNOTATION_PREFIX: &str = "removed-keys.guestcred.io/";
/// How many objects' removals the annotation remembers per user (the newest).
const REMOVALS_KEPT: usize = 8;

type Fingerprints = BTreeSet<String>;

/// `uid=fp,fp;uid=fp` → [(uid, fps)], oldest first.
fn parse_removals(value: Option<&String>) -> Vec<(String, Fingerprints)> {
    value
        .map(|v| {
            v.split(';')
                .filter_map(|entry| {
                    let (uid, fps) = entry.split_once('=')?;
                    let fps = fps
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string)
                        .collect();
                    Some((uid.to_string(), fps))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The annotation value after `uid` records `fps` (joined with what it recorded before),
/// keeping the newest [`REMOVALS_KEPT`] objects; None when nothing changes.
fn record_removal(value: Option<&String>, uid: &str, fps: &Fingerprints) -> Option<String> {
    let mut entries = parse_removals(value);
    let mut mine: Fingerprints = Fingerprints::new();
    entries.retain(|(u, f)| {
        if u == uid {
            mine.extend(f.iter().cloned());
            false
        } else {
            true
        }
    });
    mine.extend(fps.iter().cloned());
    entries.push((uid.to_string(), mine));
    let skip = entries.len().saturating_sub(REMOVALS_KEPT);
    let after = entries
        .iter()
        .skip(skip)
        .map(|(u, f)| format_entry(u, f))
        .collect::<Vec<_>>()
        .join(";");
    (value != Some(&after)).then_some(after)
}

fn format_entry(uid: &str, fps: &Fingerprints) -> String {
    format!(
        "{uid}={}",
        fps.iter().cloned().collect::<Vec<_>>().join(",")
    )
}

/// What `uid` recorded as removed on the target's VM for its user.
fn removed_by(call: &TargetCall, uid: &str) -> Fingerprints {
    let annotations = match &call.vm_object {
        Some(vm) => vm.annotations(),
        None => call.vmi.annotations(),
    };
    let key = format!("{REMOVED_KEYS_ANNOTATION_PREFIX}{}", call.user);
    parse_removals(annotations.get(&key))
        .into_iter()
        .filter(|(u, _)| u == uid)
        .flat_map(|(_, f)| f)
        .collect()
}

/// Other live KeypairRebuilds of the namespace that still grant one of `fps` on this VM
/// and user: their next run puts it back.
fn still_granted(
    kr: &KeypairRebuild,
    ctx: &Context,
    call: &TargetCall,
    fps: &Fingerprints,
) -> Vec<String> {
    let mut names: Vec<String> = ctx
        .rebuilds
        .state()
        .iter()
        .filter(|o| {
            o.namespace() == kr.namespace()
                && o.uid() != kr.uid()
                && o.metadata.deletion_timestamp.is_none()
        })
        .filter(|o| {
            o.status.as_ref().is_some_and(|s| {
                s.run.targets.iter().any(|t| {
                    t.vm == call.vm
                        && t.user.as_deref() == Some(call.user.as_str())
                        && t.state == TargetState::Succeeded
                        && t.reason.as_deref() != Some(Reason::Expired.as_str())
                        && t.keys.iter().any(|k| fps.contains(k))
                })
            })
        })
        .map(|o| o.name_any())
        .collect();
    names.sort();
    names
}

/// `RunKind::apply` of a KeypairRebuild with `removeFingerprints`.
pub(super) async fn remove_keys(
    kr: &KeypairRebuild,
    ctx: &Context,
    call: &TargetCall,
    fps: &Fingerprints,
) -> Result<Outcome, Error> {
    require_agent(
        call,
        &[
            "guest-ssh-get-authorized-keys",
            "guest-ssh-remove-authorized-keys",
        ],
        "removeFingerprints",
    )
    .await?;
    let uid = kr.uid().unwrap_or_default();
    let current = call.shim.get_ssh_keys(&call.domain, &call.user).await?;
    let total = current
        .iter()
        .filter_map(|l| fingerprint_of(l))
        .collect::<Fingerprints>()
        .len();
    // Every line of a named key: the same key may stand on several lines (other options or
    // comments), and qemu-ga removes by exact line.
    let lines: Vec<String> = current
        .into_iter()
        .filter(|l| fingerprint_of(l).is_some_and(|fp| fps.contains(&fp)))
        .collect();
    let present: Fingerprints = lines.iter().filter_map(|l| fingerprint_of(l)).collect();
    let earlier = removed_by(call, &uid);
    let unknown: Vec<&str> = fps
        .iter()
        .filter(|fp| !present.contains(*fp) && !earlier.contains(*fp))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        return Err(Error::KeyNotFound(format!(
            "user {} in {} has no key {} ({total} key(s) there; kubectl guestcred list-keys {} --user {} shows them); nothing was removed",
            call.user,
            call.vm,
            unknown.join(", "),
            call.vm,
            call.user
        )));
    }
    let owned = kr.ownership(ctx, call).await.2.owned();
    if !lines.is_empty() {
        // Recorded before the guest changes: a retry that finds the key gone knows why.
        update_vm_annotation(
            ctx,
            call,
            &format!("{REMOVED_KEYS_ANNOTATION_PREFIX}{}", call.user),
            |old| record_removal(old, &uid, fps),
        )
        .await?;
        call.shim
            .ssh_keys(&call.domain, &call.user, KeyOp::Remove, lines)
            .await?;
    }
    verify_gone(call, fps).await?;
    // Gone from the guest: no longer guestcred's to track, expire or remove.
    update_record(ctx, call, |r, _| r.drop_keys(fps)).await?;
    let described: Vec<String> = fps
        .iter()
        .map(|fp| {
            let whose = if owned.contains(fp) {
                "added by guestcred"
            } else {
                "not added by guestcred"
            };
            let when = if present.contains(fp) {
                ""
            } else {
                ", by an earlier attempt"
            };
            format!("{fp} ({whose}{when})")
        })
        .collect();
    let mut message = format!(
        "removed {} key(s) from user {} and verified they are gone: {}",
        fps.len(),
        call.user,
        described.join(", ")
    );
    let granting = still_granted(kr, ctx, call, fps);
    if !granting.is_empty() {
        message.push_str(&format!(
            "; warning: KeypairRebuild {} still grants it, and its next run puts it back (delete that object to keep the key out)",
            granting.join(", ")
        ));
    }
    Ok(Outcome {
        reason: Some(Reason::Removed),
        message,
        mode: Some("Live".into()),
        verified: Some(true),
        ..Outcome::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(fps: &[&str]) -> Fingerprints {
        fps.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn removals_are_recorded_per_object_and_only_the_newest_are_kept() {
        let v = record_removal(None, "u1", &set(&["a", "b"])).expect("new");
        assert_eq!(v, "u1=a,b");
        assert_eq!(record_removal(Some(&v), "u1", &set(&["a"])), None);
        let v = record_removal(Some(&v), "u2", &set(&["c"])).expect("second object");
        assert_eq!(v, "u1=a,b;u2=c");
        let v = record_removal(Some(&v), "u1", &set(&["d"])).expect("moves to the end");
        assert_eq!(v, "u2=c;u1=a,b,d");
        let mut v = v;
        for i in 0..20 {
            v = record_removal(Some(&v), &format!("x{i}"), &set(&["e"])).expect("grows");
        }
        let entries = parse_removals(Some(&v));
        assert_eq!(entries.len(), REMOVALS_KEPT);
        assert_eq!(entries.last().map(|e| e.0.as_str()), Some("x19"));
    }
}
