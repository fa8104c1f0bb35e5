//! Which keys in a guest are guestcred's, and which KeypairRebuild holds each: only keys
//! guestcred added itself are its own. A key that was in authorized_keys before guestcred
//! added it stays the person's who put it there, even when a KeypairRebuild names it too,
//! so Replace, TTL expiry and deletion never remove it.
//!
//! The record is per VM and user (the `keys.guestcred.io/<user>` annotation on the VM), so
//! it survives deleted objects and controller restarts. For each key guestcred added it
//! lists the objects that hold it (a short id of each object's UID, [`holder_id`]): the one
//! that added it and every other that wants it since. A Replace, a TTL expiry or a deletion
//! by object A lets go of A's hold only; the key leaves the guest once no live object holds
//! it and no other live object's status grants it on that VM and user. So two objects on
//! one VM and user (two Replace runs resumed at the same instant by a new leader, say)
//! never remove each other's keys.
//!
//! Format: `fp=h1+h2,fp2=h3,fp3`: a fingerprint with its holders' ids after `=`; a bare
//! fingerprint is guestcred's with holders unknown, which is how records written before
//! holders were kept (`fp,fp2`) read. Holders are written *before* the guest changes
//! (everything that may be added) and let go of before a key is removed (a key nobody
//! holds stays recorded, as `fp=`, until it is gone from the guest): a crash in between can
//! only leave guestcred owning a key nobody holds, which a later Replace removes, never a
//! key of guestcred's it no longer knows about.
//!
//! The record is bounded: at most [`MAX_HOLDERS`] holders per key and [`MAX_RECORD_BYTES`]
//! in all. Past either bound a key's holders become unknown (a bare fingerprint, the
//! largest entries first): it is then removed only when no live object's status grants it
//! on that VM and user, as for records written before holders were kept.
use crate::api::keypair::KeyStrategy;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};

type Fingerprints = BTreeSet<String>;
/// Holder ids ([`holder_id`]).
pub type HolderIds = BTreeSet<String>;

/// Most objects recorded as holding one key; past it the key's holders become unknown.
pub const MAX_HOLDERS: usize = 8;
/// Longest record (annotation value) written; past it the largest entries lose their
/// holder lists (VM annotations share a 256 KiB limit).
pub const MAX_RECORD_BYTES: usize = 32 * 1024;

/// The id an object is recorded under: 16 hex digits of the SHA-256 of its UID (64 bits:
/// short enough that a key with several holders stays small, long enough that two live
/// objects never share one).
pub fn holder_id(uid: &str) -> String {
    hex::encode(&Sha256::digest(uid.as_bytes())[..8])
}

/// Who holds one key guestcred added.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holders {
    /// These objects (possibly none: let go of, not yet removed from the guest).
    Known(HolderIds),
    /// Not recorded (a record from before holders were kept, or past a bound).
    Unknown,
}

/// The keys guestcred added to one VM for one user, with their holders.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    keys: BTreeMap<String, Holders>,
}

impl Record {
    /// Read an annotation value, in the current format or the one before it.
    pub fn parse(value: Option<&str>) -> Record {
        let mut keys = BTreeMap::new();
        for entry in value.unwrap_or_default().split(',') {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            let (fp, holders) = match entry.split_once('=') {
                Some((fp, ids)) => (
                    fp,
                    Holders::Known(
                        ids.split('+')
                            .filter(|s| !s.is_empty())
                            .map(str::to_string)
                            .collect(),
                    ),
                ),
                None => (entry, Holders::Unknown),
            };
            keys.insert(fp.to_string(), holders);
        }
        Record { keys }
    }

    /// The annotation value, within [`MAX_RECORD_BYTES`] where holder lists can be dropped.
    pub fn to_value(&self) -> String {
        let mut rec = self.clone();
        loop {
            let value = rec.format();
            if value.len() <= MAX_RECORD_BYTES {
                return value;
            }
            // The entry with most holders loses its list (becomes unknown).
            let largest = rec
                .keys
                .iter()
                .filter_map(|(fp, h)| match h {
                    Holders::Known(ids) if !ids.is_empty() => Some((ids.len(), fp.clone())),
                    _ => None,
                })
                .max();
            match largest {
                Some((_, fp)) => {
                    rec.keys.insert(fp, Holders::Unknown);
                }
                // Bare fingerprints only: nothing left to shorten (the API server refuses
                // an annotation past its limit, and the run fails before the guest changes).
                None => return value,
            }
        }
    }

    fn format(&self) -> String {
        self.keys
            .iter()
            .map(|(fp, h)| match h {
                Holders::Unknown => fp.clone(),
                Holders::Known(ids) => {
                    format!("{fp}={}", ids.iter().cloned().collect::<Vec<_>>().join("+"))
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every key guestcred added (and has not seen removed).
    pub fn owned(&self) -> Fingerprints {
        self.keys.keys().cloned().collect()
    }

    /// The keys `me` holds.
    pub fn held_by(&self, me: &str) -> Fingerprints {
        self.keys
            .iter()
            .filter(|(_, h)| matches!(h, Holders::Known(ids) if ids.contains(me)))
            .map(|(fp, _)| fp.clone())
            .collect()
    }

    /// Whether no live object is recorded as holding `fp` (unknown holders: not known to
    /// be held; the callers then ask the live objects' statuses).
    fn unheld(&self, fp: &str, live: &HolderIds) -> bool {
        match self.keys.get(fp) {
            Some(Holders::Known(ids)) => ids.iter().all(|id| !live.contains(id)),
            Some(Holders::Unknown) => true,
            None => false,
        }
    }

    /// `me` holds `fps` (added by it, or already guestcred's and wanted by it too). Holders
    /// that are no longer live are dropped; past [`MAX_HOLDERS`] the holders are unknown.
    pub fn hold(&mut self, me: &str, fps: &Fingerprints, live: &HolderIds) {
        for fp in fps {
            let entry = self
                .keys
                .entry(fp.clone())
                .or_insert_with(|| Holders::Known(HolderIds::new()));
            if let Holders::Known(ids) = entry {
                ids.retain(|id| id == me || live.contains(id));
                ids.insert(me.to_string());
                if ids.len() > MAX_HOLDERS {
                    *entry = Holders::Unknown;
                }
            }
        }
    }

    /// `me` lets go of `fps`; returns the ones now to remove from the guest: guestcred's,
    /// held by no live object, and granted by no other live object (`others`, from their
    /// statuses). They stay recorded until [`Record::forget`] after the removal.
    pub fn release(
        &mut self,
        me: &str,
        fps: &Fingerprints,
        live: &HolderIds,
        others: &Fingerprints,
    ) -> Fingerprints {
        for fp in fps {
            if let Some(Holders::Known(ids)) = self.keys.get_mut(fp) {
                ids.retain(|id| id != me && live.contains(id));
            }
        }
        fps.iter()
            .filter(|fp| self.unheld(fp, live) && !others.contains(*fp))
            .cloned()
            .collect()
    }

    /// `fps` are gone from the guest: no longer guestcred's. A key some live object held
    /// again meanwhile (it is adding it back) stays recorded.
    pub fn forget(&mut self, fps: &Fingerprints, live: &HolderIds) {
        for fp in fps {
            if self.unheld(fp, live) {
                self.keys.remove(fp);
            }
        }
    }

    /// `fps` were removed by name (`removeFingerprints`): forgotten whoever held them.
    pub fn drop_keys(&mut self, fps: &Fingerprints) {
        for fp in fps {
            self.keys.remove(fp);
        }
    }
}

/// What one live run does with the keys, as fingerprints.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyPlan {
    /// Wanted keys the guest does not have yet: guestcred adds them.
    pub to_add: Fingerprints,
    /// Keys this object holds from now on (recorded before the guest changes): the ones it
    /// adds and the wanted ones that are guestcred's already.
    pub to_hold: Fingerprints,
    /// Keys this object lets go of (Replace): its own that it no longer wants, and
    /// guestcred's that no live object holds. [`Record::release`] says which of them leave
    /// the guest.
    pub let_go: Fingerprints,
}

/// Plan a live run of object `me` from what is wanted, what the guest has, and the record.
/// `replace_all` makes the file exactly the wanted keys at the user's explicit request;
/// removing the rest is then the agent's job, not a decision about ownership.
pub fn plan_live(
    me: &str,
    wanted: &Fingerprints,
    present_before: &Fingerprints,
    record: &Record,
    live: &HolderIds,
    strategy: KeyStrategy,
    replace_all: bool,
) -> KeyPlan {
    let owned = record.owned();
    let to_add: Fingerprints = wanted.difference(present_before).cloned().collect();
    let to_hold: Fingerprints = wanted
        .iter()
        .filter(|fp| to_add.contains(*fp) || owned.contains(*fp))
        .cloned()
        .collect();
    let let_go: Fingerprints = if strategy == KeyStrategy::Replace && !replace_all {
        let mine = record.held_by(me);
        owned
            .intersection(present_before)
            .filter(|fp| !wanted.contains(*fp))
            .filter(|fp| mine.contains(*fp) || record.unheld(fp, live))
            .cloned()
            .collect()
    } else {
        Fingerprints::new()
    };
    KeyPlan {
        to_add,
        to_hold,
        let_go,
    }
}

/// What a removal by `me` of `fps` would take out of the guest, judged on `record` without
/// changing it (a rebuild decides its user data from it; see [`Record::release`]).
pub fn removable(
    record: &Record,
    me: &str,
    fps: &Fingerprints,
    live: &HolderIds,
    others: &Fingerprints,
) -> Fingerprints {
    record.clone().release(me, fps, live, others)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(fps: &[&str]) -> Fingerprints {
        fps.iter().map(|s| s.to_string()).collect()
    }

    /// A VM and user: the guest's keys, the record, and the live objects.
    struct Vm {
        guest: Fingerprints,
        record: Record,
        live: HolderIds,
    }

    impl Vm {
        /// A guest with the keys `guest`, an empty record and the live objects `live`.
        fn new(guest: &[&str], live: &[&str]) -> Self {
            Vm {
                guest: set(guest),
                record: Record::default(),
                live: set(live),
            }
        }

        /// Object `me` runs `wanted` against the guest's keys and the record, as `apply`
        /// does: hold, let go, remove, add, forget. Returns what it removed.
        fn run(&mut self, me: &str, wanted: &[&str], strategy: KeyStrategy) -> Fingerprints {
            let wanted = set(wanted);
            let plan = self.plan(me, &wanted, strategy);
            self.record.hold(me, &plan.to_hold, &self.live);
            let removed = self
                .record
                .release(me, &plan.let_go, &self.live, &Fingerprints::new());
            self.guest.retain(|k| !removed.contains(k));
            self.guest.extend(wanted.iter().cloned());
            self.record.forget(&removed, &self.live);
            removed
        }

        fn replace(&mut self, me: &str, wanted: &[&str]) -> Fingerprints {
            self.run(me, wanted, KeyStrategy::Replace)
        }

        fn append(&mut self, me: &str, wanted: &[&str]) -> Fingerprints {
            self.run(me, wanted, KeyStrategy::Append)
        }

        /// What `me` plans for `wanted` on this guest and record (not replacing all).
        fn plan(&self, me: &str, wanted: &Fingerprints, strategy: KeyStrategy) -> KeyPlan {
            plan_live(
                me,
                wanted,
                &self.guest,
                &self.record,
                &self.live,
                strategy,
                false,
            )
        }
    }

    #[test]
    fn a_wanted_key_the_guest_already_has_is_not_taken_over() {
        let plan =
            Vm::new(&["hand"], &["A"]).plan("A", &set(&["hand", "new"]), KeyStrategy::Append);
        assert_eq!(plan.to_add, set(&["new"]));
        assert_eq!(plan.to_hold, set(&["new"]));
    }

    #[test]
    fn replace_removes_only_its_own_keys_that_are_no_longer_wanted() {
        let mut vm = Vm::new(&["hand"], &["A"]);
        vm.replace("A", &["a"]);
        let removed = vm.replace("A", &["b"]);
        assert_eq!(removed, set(&["a"]));
        assert_eq!(vm.guest, set(&["hand", "b"]));
        assert_eq!(vm.record.owned(), set(&["b"]));
    }

    #[test]
    fn replace_never_removes_a_person_s_key_a_previous_grant_also_named() {
        let mut vm = Vm::new(&["hand"], &["A"]);
        vm.replace("A", &["hand", "a"]);
        let removed = vm.replace("A", &["b"]);
        assert_eq!(removed, set(&["a"]));
        assert!(vm.guest.contains("hand"));
        assert!(!vm.record.owned().contains("hand"));
    }

    #[test]
    fn two_replace_objects_on_one_vm_and_user_never_remove_each_other_s_keys() {
        // Object A adds "a", then object B adds "b" (both Replace, same VM and user);
        // then A runs again (e.g. resumed by a new leader at the same instant as B).
        let mut vm = Vm::new(&[], &["A", "B"]);
        vm.replace("A", &["a"]);
        let by_b = vm.replace("B", &["b"]);
        assert!(by_b.is_empty(), "B removes A's key: {by_b:?}");
        let by_a = vm.replace("A", &["a"]);
        assert!(by_a.is_empty(), "A removes B's key: {by_a:?}");
        assert_eq!(vm.guest, set(&["a", "b"]));
    }

    #[test]
    fn interleaved_replace_runs_of_two_objects_keep_both_keys() {
        // A and B both plan from the same snapshot (neither sees the other's key yet),
        // then both write their holds and let go: nothing of the other's is removed.
        let mut vm = Vm::new(&[], &["A", "B"]);
        let plan_a = vm.plan("A", &set(&["a"]), KeyStrategy::Replace);
        let plan_b = vm.plan("B", &set(&["b"]), KeyStrategy::Replace);
        vm.record.hold("A", &plan_a.to_hold, &vm.live);
        vm.record.hold("B", &plan_b.to_hold, &vm.live);
        // A's next attempt sees both keys in the guest.
        vm.guest = set(&["a", "b"]);
        let again = vm.plan("A", &set(&["a"]), KeyStrategy::Replace);
        assert!(again.let_go.is_empty(), "{again:?}");
        assert!(
            vm.record
                .release("A", &plan_a.let_go, &vm.live, &Fingerprints::new())
                .is_empty()
        );
    }

    #[test]
    fn a_key_two_objects_hold_stays_until_the_last_lets_go() {
        let mut vm = Vm::new(&[], &["A", "B"]);
        vm.replace("A", &["k"]);
        vm.replace("B", &["k"]);
        assert!(vm.replace("A", &["a"]).is_empty());
        assert!(vm.guest.contains("k"));
        assert_eq!(vm.replace("B", &["b"]), set(&["k"]));
        assert_eq!(vm.guest, set(&["a", "b"]));
    }

    #[test]
    fn a_key_of_a_deleted_object_is_replaced_by_the_next_replace() {
        let mut vm = Vm::new(&[], &["OLD"]);
        vm.replace("OLD", &["old"]);
        // OLD is gone (deleted with onDelete: Keep); NEW's Replace takes its key out.
        vm.live = set(&["NEW"]);
        let removed = vm.replace("NEW", &["new"]);
        assert_eq!(removed, set(&["old"]));
    }

    #[test]
    fn append_keeps_holding_what_it_added_before() {
        let mut vm = Vm::new(&[], &["A"]);
        vm.append("A", &["a"]);
        assert!(vm.append("A", &["b"]).is_empty());
        assert_eq!(vm.record.held_by("A"), set(&["a", "b"]));
    }

    #[test]
    fn a_record_of_the_format_before_holders_reads_as_guestcred_s_with_unknown_holders() {
        let mut record = Record::parse(Some("SHA256:x,SHA256:y"));
        assert_eq!(record.owned(), set(&["SHA256:x", "SHA256:y"]));
        let live = set(&["A", "B"]);
        // Removed only when no other live object's status grants it.
        let others = set(&["SHA256:y"]);
        let out = record.release("A", &set(&["SHA256:x", "SHA256:y"]), &live, &others);
        assert_eq!(out, set(&["SHA256:x"]));
        record.hold("A", &set(&["SHA256:z"]), &live);
        assert_eq!(
            Record::parse(Some(&record.to_value())),
            record,
            "written in the new format, read back the same"
        );
        assert_eq!(
            record.to_value(),
            format!("SHA256:x,SHA256:y,SHA256:z={}", "A")
        );
    }

    #[test]
    fn past_the_holder_bound_a_key_s_holders_become_unknown() {
        let ids: Vec<String> = (0..=MAX_HOLDERS).map(|i| format!("h{i}")).collect();
        let live: HolderIds = ids.iter().cloned().collect();
        let mut record = Record::default();
        for id in &ids {
            record.hold(id, &set(&["k"]), &live);
        }
        assert_eq!(record.to_value(), "k");
        // Unknown holders: removed only when no live object's status grants it.
        assert!(
            record
                .release("h0", &set(&["k"]), &live, &set(&["k"]))
                .is_empty()
        );
    }

    #[test]
    fn the_record_stays_within_its_byte_bound() {
        let live: HolderIds = (0..MAX_HOLDERS)
            .map(|i| holder_id(&i.to_string()))
            .collect();
        let mut record = Record::default();
        for n in 0..400 {
            let fp = format!("SHA256:{n:043}");
            for id in &live {
                record.hold(id, &set(&[&fp]), &live);
            }
        }
        let value = record.to_value();
        assert!(value.len() <= MAX_RECORD_BYTES, "{}", value.len());
        let back = Record::parse(Some(&value));
        assert_eq!(back.owned().len(), 400, "no key is dropped");
    }

    #[test]
    fn holders_that_are_no_longer_live_are_dropped() {
        let mut record = Record::default();
        record.hold("GONE", &set(&["k"]), &set(&["GONE"]));
        record.hold("A", &set(&["k"]), &set(&["A"]));
        assert_eq!(record.to_value(), "k=A");
    }

    #[test]
    fn a_key_held_again_while_it_was_removed_stays_recorded() {
        let live = set(&["A", "B"]);
        let mut record = Record::default();
        record.hold("A", &set(&["k"]), &live);
        let out = record.release("A", &set(&["k"]), &live, &Fingerprints::new());
        assert_eq!(out, set(&["k"]));
        record.hold("B", &set(&["k"]), &live);
        record.forget(&out, &live);
        assert_eq!(record.held_by("B"), set(&["k"]));
    }

    #[test]
    fn holder_ids_are_short_and_stable() {
        let id = holder_id("0b7a2a4e-3f1c-4d2e-9a8b-1c2d3e4f5a6b");
        assert_eq!(id.len(), 16);
        assert_eq!(id, holder_id("0b7a2a4e-3f1c-4d2e-9a8b-1c2d3e4f5a6b"));
        assert_ne!(id, holder_id("0b7a2a4e-3f1c-4d2e-9a8b-1c2d3e4f5a6c"));
    }
}
