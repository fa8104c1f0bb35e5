//! Which keys in a guest are guestcred's: only the ones it added itself. A key that was in
//! authorized_keys before guestcred added it stays the person's who put it there, even when
//! a KeypairRebuild names it too, so Replace, TTL expiry and deletion never remove it.
//!
//! Ownership is recorded per VM and user (the `keys.guestcred.io/<user>` annotation on the
//! VM), so it survives deleted objects and controller restarts. It is written *before* the
//! guest changes (everything that may be added) and narrowed after: a crash in between can
//! only make guestcred think it owns a key it did not get to add, never lose track of one
//! it did add.
use crate::api::keypair::KeyStrategy;
use std::collections::BTreeSet;

type Fingerprints = BTreeSet<String>;

/// What one live run does with the keys, as fingerprints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyPlan {
    /// Wanted keys the guest does not have yet: guestcred adds them, so they are its own.
    pub to_add: Fingerprints,
    /// guestcred's own keys no longer wanted (Replace): removed from the guest.
    pub stale: Fingerprints,
    /// Ownership to record before touching the guest.
    pub owned_while_applying: Fingerprints,
    /// Ownership once the run succeeded.
    pub owned_after: Fingerprints,
}

/// Plan a live run from what is wanted, what the guest has, and what guestcred owned.
/// `replace_all` makes the file exactly the wanted keys at the user's explicit request;
/// removing the rest is then the agent's job, not a decision about ownership.
pub fn plan_live(
    wanted: &Fingerprints,
    present_before: &Fingerprints,
    owned_before: &Fingerprints,
    strategy: KeyStrategy,
    replace_all: bool,
) -> KeyPlan {
    let to_add: Fingerprints = wanted.difference(present_before).cloned().collect();
    let stale: Fingerprints = if strategy == KeyStrategy::Replace && !replace_all {
        owned_before
            .intersection(present_before)
            .filter(|fp| !wanted.contains(*fp))
            .cloned()
            .collect()
    } else {
        Fingerprints::new()
    };
    let owned_while_applying = owned_before.union(&to_add).cloned().collect();
    let kept: Fingerprints = match strategy {
        KeyStrategy::Append if !replace_all => owned_before.clone(),
        _ => owned_before.intersection(wanted).cloned().collect(),
    };
    let owned_after = kept.union(&to_add).cloned().collect();
    KeyPlan {
        to_add,
        stale,
        owned_while_applying,
        owned_after,
    }
}

/// The keys a grant's TTL removes: the ones it names that guestcred owns.
pub fn expiring(granted: &Fingerprints, owned: &Fingerprints) -> Fingerprints {
    granted.intersection(owned).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(fps: &[&str]) -> Fingerprints {
        fps.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_wanted_key_the_guest_already_has_is_not_taken_over() {
        let plan = plan_live(
            &set(&["hand", "new"]),
            &set(&["hand"]),
            &set(&[]),
            KeyStrategy::Append,
            false,
        );
        assert_eq!(plan.to_add, set(&["new"]));
        assert_eq!(plan.owned_after, set(&["new"]));
    }

    #[test]
    fn replace_removes_only_its_own_keys_that_are_no_longer_wanted() {
        let plan = plan_live(
            &set(&["b"]),
            &set(&["hand", "a", "b"]),
            &set(&["a", "b"]),
            KeyStrategy::Replace,
            false,
        );
        assert_eq!(plan.stale, set(&["a"]));
        assert_eq!(plan.owned_after, set(&["b"]));
    }

    #[test]
    fn replace_never_removes_a_person_s_key_a_previous_grant_also_named() {
        // First grant named "hand" (already present) and "a"; the second names "b".
        let first = plan_live(
            &set(&["hand", "a"]),
            &set(&["hand"]),
            &set(&[]),
            KeyStrategy::Replace,
            false,
        );
        let second = plan_live(
            &set(&["b"]),
            &set(&["hand", "a"]),
            &first.owned_after,
            KeyStrategy::Replace,
            false,
        );
        assert_eq!(second.stale, set(&["a"]));
        assert!(!second.owned_after.contains("hand"));
    }

    #[test]
    fn append_keeps_owning_what_it_added_before() {
        let plan = plan_live(
            &set(&["b"]),
            &set(&["a"]),
            &set(&["a"]),
            KeyStrategy::Append,
            false,
        );
        assert!(plan.stale.is_empty());
        assert_eq!(plan.owned_after, set(&["a", "b"]));
    }

    #[test]
    fn ownership_is_widened_before_the_guest_changes() {
        let plan = plan_live(
            &set(&["b"]),
            &set(&["a"]),
            &set(&["a"]),
            KeyStrategy::Replace,
            false,
        );
        assert_eq!(plan.owned_while_applying, set(&["a", "b"]));
        assert_eq!(plan.owned_after, set(&["b"]));
    }

    #[test]
    fn a_ttl_removes_only_the_granted_keys_guestcred_owns() {
        assert_eq!(
            expiring(&set(&["hand", "new"]), &set(&["new", "other"])),
            set(&["new"])
        );
    }
}
