//! `overlapSeconds`: key replacement that never locks anyone out. A Replace run with an
//! overlap adds the new keys and reads them back first, and removes nothing; the target's
//! record then names the keys it replaces (`replacedKeys`) and when they go
//! (`replacedKeysRemoveAt`). That time lives in the record (status or its shard, like a
//! TTL's `expiresAt`), so a controller restart keeps it; when it passes, the engine calls
//! [`end`], which lets go of them as a Replace without overlap would have (only keys this
//! object holds or no live object holds, and no other live object grants: see
//! `key_ownership`), removes those from the guest and reads back that they are gone.
//!
//! If the new keys cannot be added or read back, the target fails and the old keys stay:
//! nothing was let go of. A new run before the overlap ends (a spec change) lets go of the
//! same keys again by itself: the object still holds them in the VM's record.
use super::{ManagedKeys, update_record};
use crate::api::{KeypairRebuild, KeypairRebuildSpec, TargetState, TargetStatus};
use crate::controller::context::Context;
use crate::controller::error::Error;
use crate::controller::keys::{remove_keys, verify_gone};
use crate::controller::targets::TargetCall;
use k8s_openapi::jiff::Timestamp;
use std::collections::BTreeSet;

/// Bounds of `overlapSeconds` (as the CRD schema states them).
pub const MIN_OVERLAP: u32 = 10;
pub const MAX_OVERLAP: u32 = 604_800;

type Fingerprints = BTreeSet<String>;

/// The controller's own check of `overlapSeconds` (the CRD's schema and CEL rules state
/// the same; an API server without them lets anything through).
pub(super) fn check(spec: &KeypairRebuildSpec) -> Result<(), Error> {
    let Some(overlap) = spec.overlap_seconds else {
        return Ok(());
    };
    let refuse = |m: &str| Err(Error::InvalidSpec(m.into()));
    if !(MIN_OVERLAP..=MAX_OVERLAP).contains(&overlap) {
        return Err(Error::InvalidSpec(format!(
            "overlapSeconds must be {MIN_OVERLAP}-{MAX_OVERLAP}, got {overlap}"
        )));
    }
    if spec.public_keys.is_none() {
        return refuse(
            "overlapSeconds applies to keys being added (publicKeys): removeFingerprints and mode Inspect replace nothing",
        );
    }
    if spec.strategy != crate::api::keypair::KeyStrategy::Replace {
        return refuse("overlapSeconds needs strategy Replace: with Append no key is replaced");
    }
    if spec.replace_all {
        return refuse(
            "overlapSeconds cannot be combined with replaceAll, which makes authorized_keys exactly the given keys at once",
        );
    }
    if spec.mode == crate::api::keypair::KeyMode::Rebuild {
        return refuse(
            "overlapSeconds needs mode Live (or Auto on guests whose agent has guest-ssh-*): keys written by a rebuild into cloud-init user data cannot be removed after the overlap",
        );
    }
    Ok(())
}

/// When the keys a target replaced are removed: only once its new keys were verified
/// (a succeeded target) and while some are still waiting.
pub(super) fn removal_at(target: &TargetStatus) -> Option<Timestamp> {
    let waiting = target.state == TargetState::Succeeded
        && target.verified == Some(true)
        && !target.replaced_keys.is_empty();
    waiting
        .then(|| target.replaced_keys_remove_at.as_ref().map(|t| t.0))
        .flatten()
}

/// The keys the end of a target's overlap lets go of: the replaced ones it does not grant
/// itself now.
fn letting_go(target: &TargetStatus) -> Fingerprints {
    target
        .replaced_keys
        .iter()
        .filter(|k| !target.keys.contains(*k))
        .cloned()
        .collect()
}

/// `RunKind::undo` of a KeypairRebuild once its overlap ended: let go of the replaced keys, remove those
/// no other live object holds or grants, and read back that they are gone.
pub(super) async fn end(
    kr: &KeypairRebuild,
    ctx: &Context,
    call: &TargetCall,
    target: &TargetStatus,
) -> Result<String, Error> {
    let (me, _, _) = kr.ownership(ctx, call).await;
    let let_go = letting_go(target);
    let others = kr.granted_by_others(ctx, call);
    let gone = update_record(ctx, call, |r, live| r.release(&me, &let_go, live, &others)).await?;
    if !gone.is_empty() {
        remove_keys(call, &gone).await?;
        verify_gone(call, &gone).await?;
        update_record(ctx, call, |r, live| r.forget(&gone, live)).await?;
    }
    let kept = let_go.len() - gone.len();
    Ok(format!(
        "{} key(s) in place for user {} and verified; overlap ended: removed the {} key(s) they replaced{}",
        target.keys.len(),
        call.user,
        gone.len(),
        if kept == 0 {
            String::new()
        } else {
            format!(" ({kept} kept: another KeypairRebuild holds or grants them)")
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::keypair::{KeyMode, KeyStrategy, PublicKeySource};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).expect("time")
    }

    fn overlapping(state: TargetState, verified: Option<bool>) -> TargetStatus {
        TargetStatus {
            vm: "vm-a".into(),
            state,
            verified,
            keys: vec!["new".into()],
            replaced_keys: vec!["old".into()],
            replaced_keys_remove_at: Some(Time(at(60))),
            ..TargetStatus::default()
        }
    }

    #[test]
    fn replaced_keys_go_at_the_end_of_the_overlap_once_the_new_ones_verified() {
        let t = overlapping(TargetState::Succeeded, Some(true));
        assert_eq!(removal_at(&t), Some(at(60)));
        assert_eq!(letting_go(&t), ["old".to_string()].into());
    }

    #[test]
    fn replaced_keys_stay_while_the_new_ones_are_not_verified() {
        for (state, verified) in [
            (TargetState::Failed, None),
            (TargetState::Running, None),
            (TargetState::Succeeded, Some(false)),
        ] {
            assert_eq!(removal_at(&overlapping(state, verified)), None, "{state:?}");
        }
    }

    #[test]
    fn nothing_is_due_once_the_replaced_keys_are_gone() {
        let mut t = overlapping(TargetState::Succeeded, Some(true));
        t.replaced_keys.clear();
        assert_eq!(removal_at(&t), None);
    }

    #[test]
    fn a_key_the_run_grants_again_is_not_let_go_of() {
        let mut t = overlapping(TargetState::Succeeded, Some(true));
        t.replaced_keys.push("new".into());
        assert_eq!(letting_go(&t), ["old".to_string()].into());
    }

    fn spec(overlap: u32) -> KeypairRebuildSpec {
        KeypairRebuildSpec {
            common: Default::default(),
            public_keys: Some(PublicKeySource {
                secret_ref: None,
                inline: Some(vec!["k".into()]),
            }),
            mode: KeyMode::Live,
            strategy: KeyStrategy::Replace,
            replace_all: false,
            ttl_seconds: None,
            overlap_seconds: Some(overlap),
            on_delete: Default::default(),
            remove_fingerprints: Vec::new(),
        }
    }

    fn refusal(s: &KeypairRebuildSpec) -> String {
        check(s).expect_err("refused").to_string()
    }

    #[test]
    fn overlap_is_refused_out_of_bounds_and_with_what_replaces_nothing_at_once() {
        assert!(check(&spec(10)).is_ok());
        assert!(check(&spec(604_800)).is_ok());
        assert_eq!(refusal(&spec(5)), "overlapSeconds must be 10-604800, got 5");
        assert!(refusal(&spec(700_000)).contains("10-604800"));
        let mut append = spec(60);
        append.strategy = KeyStrategy::Append;
        assert!(refusal(&append).contains("needs strategy Replace"));
        let mut all = spec(60);
        all.replace_all = true;
        assert!(refusal(&all).contains("replaceAll"));
        let mut rebuild = spec(60);
        rebuild.mode = KeyMode::Rebuild;
        assert!(refusal(&rebuild).contains("needs mode Live"));
        let mut removal = spec(60);
        removal.public_keys = None;
        removal.remove_fingerprints = vec!["SHA256:x".into()];
        assert!(refusal(&removal).contains("applies to keys being added"));
    }
}
