//! Spec and status pieces shared by both custom resources.
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::KubeSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Which VirtualMachineInstances a request applies to, in the object's own namespace.
/// Exactly one of `vmName` and `selector` must be set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.vmName) != has(self.selector)").message("set exactly one of target.vmName and target.selector"))]
pub struct TargetSpec {
    /// Name of one VirtualMachineInstance in this namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm_name: Option<String>,
    /// Label selector over VirtualMachineInstances in this namespace. The matching running
    /// VMIs are resolved once when the run starts and frozen in `status.targets`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// A key in a Secret. The Secret must live in the same namespace as the object that
/// references it: cross-namespace references are refused.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    /// Name of the Secret.
    pub name: String,
    /// Key inside the Secret's data.
    pub key: String,
    /// Must be empty or equal to this object's namespace; present only so that a
    /// cross-namespace reference gets a clear error instead of being silently ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

/// How many targets run at once, how many failures are tolerated, and how long each may take.
/// What both kinds' specs share: the VMs a run targets, the guest user, and how the run
/// rolls out. Flattened into each spec, so the fields stand directly under `spec`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunSpec {
    /// The VM(s) to act on: exactly one of a VM name or a label selector. Immutable once a
    /// run started.
    pub target: TargetSpec,
    /// Guest user. Default: the VM's `guestcred.io/admin-user` annotation, else Administrator
    /// for Windows guests and root for all others.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 32))]
    pub user: Option<String>,
    /// Concurrency, failure budget, per-target deadline and pause.
    #[serde(flatten)]
    pub rollout: RolloutSpec,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// At most this many targets are in flight at once (1-1000).
    #[serde(default = "default_max_concurrency")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_concurrency: u32,
    /// Stop starting new targets once this many have failed; the rest are marked Skipped.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100000))]
    pub max_failures: u32,
    /// Per-target deadline in seconds (10-86400); a target still unfinished by then fails
    /// with DeadlineExceeded.
    #[serde(default = "default_deadline_seconds")]
    #[schemars(range(min = 10, max = 86400))]
    pub deadline_seconds: u32,
    /// While true, no new targets are started; targets in flight finish.
    #[serde(default)]
    pub paused: bool,
}

pub fn default_max_concurrency() -> u32 {
    10
}
pub fn default_deadline_seconds() -> u32 {
    300
}

impl RolloutSpec {
    /// The schema's ranges, checked again by the controller: API servers without schema
    /// validation (and old objects) must not get past them either.
    pub fn check(&self) -> Result<(), String> {
        if !(1..=1000).contains(&self.max_concurrency) {
            return Err(format!(
                "maxConcurrency must be 1-1000, got {}",
                self.max_concurrency
            ));
        }
        if self.max_failures > 100_000 {
            return Err(format!(
                "maxFailures must be 0-100000, got {}",
                self.max_failures
            ));
        }
        if !(10..=86_400).contains(&self.deadline_seconds) {
            return Err(format!(
                "deadlineSeconds must be 10-86400, got {}",
                self.deadline_seconds
            ));
        }
        Ok(())
    }
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self {
            max_concurrency: default_max_concurrency(),
            max_failures: 0,
            deadline_seconds: default_deadline_seconds(),
            paused: false,
        }
    }
}

/// Overall state of a run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Phase {
    Pending,
    Running,
    Succeeded,
    PartiallySucceeded,
    Failed,
}

/// State of one target.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum TargetState {
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
    Skipped,
}

impl TargetState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Skipped)
    }
}

/// Where the guest user name came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum UserSource {
    /// `spec.user`.
    Spec,
    /// The VM's `guestcred.io/admin-user` annotation.
    Annotation,
    /// The guest OS reported by the agent (Windows: Administrator, else root).
    GuestOS,
}

/// Counts over `status.targets`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Summary {
    pub total: u32,
    pub succeeded: u32,
    pub failed: u32,
    pub skipped: u32,
    pub pending: u32,
    pub running: u32,
}

/// Result for one VM.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetStatus {
    /// VirtualMachineInstance name.
    pub vm: String,
    /// Node the VMI ran on when it was last called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Guest user that was (or will be) changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_source: Option<UserSource>,
    pub state: TargetState,
    /// CamelCase reason of the last outcome (e.g. Applied, VMNotFound, AgentTimeout).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail; never contains secret values.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Number of agent calls made for this target.
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// Earliest time of the next retry after a transient failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_time: Option<Time>,
    /// Generated passwords: the Secret holding this target's password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_secret: Option<String>,
    /// Keypair rebuilds: how the keys were delivered (Live or Rebuild).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Keypair rebuilds: SHA256 fingerprints of the keys put in place.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<String>,
    /// Keypair rebuilds: true once the keys were read back from the guest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<bool>,
    /// Keypair rebuilds with a TTL: when the added keys are removed again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// Keypair rebuilds with mode Inspect: the keys read from the guest (at most 100 listed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_keys: Option<GuestKeys>,
    /// Keypair rebuilds with `overlapSeconds`: SHA256 fingerprints of the keys `keys`
    /// replace, still in the guest until `replacedKeysRemoveAt` (the new keys were read
    /// back first). Empty once they are removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replaced_keys: Vec<String>,
    /// ... when they are removed (the end of the overlap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_keys_remove_at: Option<Time>,
}

/// Observed state common to both kinds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default)]
    pub summary: Summary,
    /// HMAC-SHA256 of the input (Secret value or key list, user, mode) keyed with this
    /// object's UID, never the input: a change starts a new run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_hash: Option<String>,
    /// resourceVersion of the referenced Secret when `inputHash` was computed. While the
    /// Secret keeps it, a restarted controller knows the input is unchanged without reading
    /// the Secret again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_secret_version: Option<String>,
    /// `spec.target` as it was when the first run started; the target may not change after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_spec: Option<TargetSpec>,
    /// Per-target results of the current run (its target list is frozen when the run
    /// starts). A run of at most 100 targets lists every target here. A larger run lists
    /// only the targets that need attention (running or retrying, failed, skipped; at most
    /// 20, see `unlistedTargets`) and keeps every target's record in `shards`, so the
    /// object stays small at any fleet size.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub targets: Vec<TargetStatus>,
    /// Runs of more than 100 targets: how many targets `targets` does not list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unlisted_targets: Option<u32>,
    /// Runs of more than 100 targets: the ConfigMaps, owned by this object, that hold every
    /// target's record (gzip'd JSON under `targets.json.gz`, 1000 targets each, in the
    /// order of the frozen target list). `kubectl guestcred status` reads them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shards: Vec<ShardRef>,
    /// How many targets of the current run ended with each reason (e.g. Applied: 99998,
    /// AgentNotConnected: 2).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reasons: BTreeMap<String, u32>,
    /// Ready, Progressing and Stalled, with observedGeneration.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Human-readable count of finished targets, e.g. "3/4" (for printer columns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Grants of earlier runs whose TTL has not passed yet: their keys are removed at
    /// `expiresAt` even though a newer run (a spec or input change) replaced the targets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_expiries: Vec<PendingExpiry>,
    /// GuestPasswordResets with `rotation`: when the current rotation's interval began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation: Option<Time>,
    /// ... and when the next one is due.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation: Option<Time>,
    /// The same for a replaced run of more than 100 targets: its grants are kept in
    /// ConfigMaps owned by this object (1000 each), so status stays small.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending_expiry_shards: Vec<ExpiryShardRef>,
}

/// A ConfigMap holding grants of a replaced large run that are still to expire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ExpiryShardRef {
    /// ConfigMap name, in this object's namespace.
    pub name: String,
    /// How many grants (one per VM and user) it holds.
    pub count: u32,
    /// When the first of them is due.
    pub expires_at: Time,
}

/// One ConfigMap holding the records of consecutive targets of a large run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardRef {
    /// ConfigMap name, in this object's namespace.
    pub name: String,
    /// Index (in the frozen target list) of the shard's first target.
    pub first: u32,
    /// How many targets the shard holds.
    pub count: u32,
}

/// Keys an earlier run added with a TTL, still to be removed from one VM.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingExpiry {
    pub vm: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// SHA256 fingerprints of the keys to remove.
    pub keys: Vec<String>,
    pub expires_at: Time,
}

impl RunStatus {
    /// This status without its target records (every other field cloned).
    pub fn clone_without_targets(&self) -> RunStatus {
        let RunStatus {
            observed_generation,
            phase,
            summary,
            input_hash,
            input_secret_version,
            target_spec,
            targets: _,
            unlisted_targets,
            shards,
            reasons,
            conditions,
            progress,
            pending_expiries,
            last_rotation,
            next_rotation,
            pending_expiry_shards,
        } = self;
        RunStatus {
            observed_generation: *observed_generation,
            phase: *phase,
            summary: summary.clone(),
            input_hash: input_hash.clone(),
            input_secret_version: input_secret_version.clone(),
            target_spec: target_spec.clone(),
            targets: Vec::new(),
            unlisted_targets: *unlisted_targets,
            shards: shards.clone(),
            reasons: reasons.clone(),
            conditions: conditions.clone(),
            progress: progress.clone(),
            pending_expiries: pending_expiries.clone(),
            last_rotation: last_rotation.clone(),
            next_rotation: next_rotation.clone(),
            pending_expiry_shards: pending_expiry_shards.clone(),
        }
    }

    /// Whether this is the stored form of a large run: `targets` lists only some targets,
    /// and `summary` and `reasons` (not `targets`) are the counts.
    pub fn is_sharded(&self) -> bool {
        !self.shards.is_empty()
    }

    /// Targets not finished yet (counted from `summary` in the sharded form).
    pub fn unfinished(&self) -> usize {
        if self.is_sharded() {
            (self.summary.pending + self.summary.running) as usize
        } else {
            self.targets
                .iter()
                .filter(|t| !t.state.is_terminal())
                .count()
        }
    }

    /// Targets finished (succeeded, failed or skipped).
    pub fn finished_targets(&self) -> usize {
        if self.is_sharded() {
            (self.summary.succeeded + self.summary.failed + self.summary.skipped) as usize
        } else {
            self.targets
                .iter()
                .filter(|t| t.state.is_terminal())
                .count()
        }
    }

    /// Recompute summary, reasons, progress and phase from the targets. The sharded form
    /// lists only some targets: its counts were computed from all of them and are kept.
    pub fn recount(&mut self) {
        if self.is_sharded() {
            return;
        }
        let targets = std::mem::take(&mut self.targets);
        self.recount_from(&targets);
        self.targets = targets;
    }

    /// Set summary, reasons, progress and phase from `targets` (every target of the run).
    pub fn recount_from(&mut self, targets: &[TargetStatus]) {
        Tally::of(targets).set_counts(self);
    }
}

impl TargetStatus {
    /// Whether the stored status of a large run lists this target, and how early (lower
    /// first): running or being retried, then failed, then skipped. Pending targets not
    /// tried yet and successes are only counted.
    pub fn attention_rank(&self) -> Option<u8> {
        match self.state {
            TargetState::Running => Some(0),
            TargetState::Failed => Some(1),
            TargetState::Skipped => Some(2),
            TargetState::Pending if self.attempts > 0 => Some(0),
            TargetState::Pending | TargetState::Succeeded => None,
        }
    }
}

/// A run's counts (summary, reasons) and the targets that need attention, kept up to date
/// one change at a time: [`Tally::remove`] a target's record before it changes and
/// [`Tally::add`] it after. The engine keeps one per run so that writing the status of a
/// 100,000-target run does not walk every record: that walk (counting, then finding the
/// targets to list) cost ~3.6 ms of CPU per status flush, four flushes a second (bench P6).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Tally {
    summary: Summary,
    reasons: BTreeMap<String, u32>,
    /// (attention rank, target index) of every target that has one.
    attention: std::collections::BTreeSet<(u8, usize)>,
}

impl Tally {
    /// Count `targets` (every target of a run, at its index) from scratch.
    pub fn of(targets: &[TargetStatus]) -> Self {
        let mut tally = Self::default();
        for (idx, t) in targets.iter().enumerate() {
            tally.add(idx, t);
        }
        tally
    }

    /// Count target `idx` as `t` says.
    pub fn add(&mut self, idx: usize, t: &TargetStatus) {
        self.summary.total += 1;
        *self.state_count(t.state) += 1;
        if let Some(r) = &t.reason {
            // Looked up by &str: a String per target showed in profiles at 100,000 targets.
            match self.reasons.get_mut(r.as_str()) {
                Some(n) => *n += 1,
                None => {
                    self.reasons.insert(r.clone(), 1);
                }
            }
        }
        if let Some(rank) = t.attention_rank() {
            self.attention.insert((rank, idx));
        }
    }

    /// Stop counting target `idx` as `t` (its record as last added) says.
    pub fn remove(&mut self, idx: usize, t: &TargetStatus) {
        self.summary.total = self.summary.total.saturating_sub(1);
        let n = self.state_count(t.state);
        *n = n.saturating_sub(1);
        if let Some(r) = &t.reason
            && let Some(n) = self.reasons.get_mut(r.as_str())
        {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.reasons.remove(r.as_str());
            }
        }
        if let Some(rank) = t.attention_rank() {
            self.attention.remove(&(rank, idx));
        }
    }

    fn state_count(&mut self, state: TargetState) -> &mut u32 {
        let s = &mut self.summary;
        match state {
            TargetState::Pending => &mut s.pending,
            TargetState::Running => &mut s.running,
            TargetState::Succeeded => &mut s.succeeded,
            TargetState::Failed => &mut s.failed,
            TargetState::Skipped => &mut s.skipped,
        }
    }

    pub fn summary(&self) -> &Summary {
        &self.summary
    }

    /// The indexes of the targets that need attention, the most urgent first.
    pub fn needing_attention(&self) -> impl Iterator<Item = usize> + '_ {
        self.attention.iter().map(|&(_, idx)| idx)
    }

    /// How many targets need attention.
    pub fn needing_attention_count(&self) -> usize {
        self.attention.len()
    }

    /// Set `status`'s summary, reasons, progress and phase from these counts.
    pub fn set_counts(&self, status: &mut RunStatus) {
        let s = &self.summary;
        status.reasons = self.reasons.clone();
        let done = s.succeeded + s.failed + s.skipped;
        status.progress = Some(format!("{done}/{}", s.total));
        status.phase = Some(if s.total == 0 || (s.pending == s.total) {
            Phase::Pending
        } else if done < s.total {
            Phase::Running
        } else if s.succeeded == s.total {
            Phase::Succeeded
        } else if s.succeeded > 0 {
            Phase::PartiallySucceeded
        } else {
            Phase::Failed
        });
        status.summary = s.clone();
    }
}

/// The keys read from one guest user's authorized_keys (mode Inspect), one entry per
/// distinct key, in file order.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestKeys {
    /// When the guest was read (a later change in the guest is not seen: create a new
    /// object, or run `kubectl guestcred list-keys` again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_at: Option<Time>,
    /// How many distinct keys the file holds.
    pub total: u32,
    /// Keys not listed in `keys` (it stops at 100).
    #[serde(default)]
    pub not_shown: u32,
    /// Lines that are neither keys, comments nor blank (sshd ignores them too).
    #[serde(default)]
    pub unreadable_lines: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<GuestKey>,
}

/// One key in a guest.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestKey {
    /// SHA256 fingerprint of the key (options and comment play no part).
    pub fingerprint: String,
    /// Key type, e.g. ssh-ed25519.
    #[serde(rename = "type")]
    pub key_type: String,
    /// The key's comment as the guest has it (at most 100 characters; control and
    /// formatting characters shown as '?').
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// True: guestcred added this key (recorded on the VM), so Replace, a TTL or deleting
    /// the object that added it may remove it. False: someone else put it there; only an
    /// explicit removeFingerprints removes it.
    pub managed: bool,
    /// When a KeypairRebuild's ttlSeconds removes this key (the earliest such grant).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(n: usize) -> Vec<TargetStatus> {
        (0..n)
            .map(|i| TargetStatus {
                vm: format!("vm-{i}"),
                ..TargetStatus::default()
            })
            .collect()
    }

    /// Change target `idx` as a run does: out of the tally, changed, back in.
    fn change(
        tally: &mut Tally,
        targets: &mut [TargetStatus],
        idx: usize,
        f: impl FnOnce(&mut TargetStatus),
    ) {
        tally.remove(idx, &targets[idx]);
        f(&mut targets[idx]);
        tally.add(idx, &targets[idx]);
    }

    fn ended(state: TargetState, reason: &str) -> impl FnOnce(&mut TargetStatus) {
        move |t| {
            t.state = state;
            t.reason = Some(reason.into());
        }
    }

    #[test]
    fn a_tally_kept_one_change_at_a_time_counts_what_a_fresh_count_does() {
        let mut targets = pending(60);
        let mut tally = Tally::of(&targets);
        for idx in 0..60 {
            change(&mut tally, &mut targets, idx, |t| {
                t.state = TargetState::Running;
                t.attempts = 1;
            });
            assert_eq!(tally, Tally::of(&targets), "after starting {idx}");
            let end = match idx % 5 {
                0 => ended(TargetState::Failed, "AgentTimeout"),
                1 => ended(TargetState::Skipped, "FailureBudgetExhausted"),
                // Waiting for its next attempt: pending, with a reason, still listed.
                2 => ended(TargetState::Pending, "ShimUnavailable"),
                3 => ended(TargetState::Succeeded, "AlreadySet"),
                _ => ended(TargetState::Succeeded, "Applied"),
            };
            change(&mut tally, &mut targets, idx, end);
            assert_eq!(tally, Tally::of(&targets), "after ending {idx}");
        }
        let mut status = RunStatus::default();
        tally.set_counts(&mut status);
        assert_eq!((status.summary.succeeded, status.summary.failed), (24, 12));
        assert_eq!(status.phase, Some(Phase::Running), "12 wait for a retry");
    }

    #[test]
    fn a_reason_no_target_has_any_more_is_not_counted_at_zero() {
        let mut targets = pending(2);
        let mut tally = Tally::of(&targets);
        change(
            &mut tally,
            &mut targets,
            0,
            ended(TargetState::Pending, "ShimUnavailable"),
        );
        change(
            &mut tally,
            &mut targets,
            0,
            ended(TargetState::Succeeded, "Applied"),
        );
        let mut status = RunStatus::default();
        tally.set_counts(&mut status);
        assert_eq!(status.reasons, BTreeMap::from([("Applied".to_string(), 1)]));
        assert_eq!(status.progress.as_deref(), Some("1/2"));
    }

    #[test]
    fn targets_needing_attention_come_running_first_then_failed_then_skipped() {
        let mut targets = pending(6);
        let mut tally = Tally::of(&targets);
        change(
            &mut tally,
            &mut targets,
            0,
            ended(TargetState::Skipped, "FailureBudgetExhausted"),
        );
        change(
            &mut tally,
            &mut targets,
            1,
            ended(TargetState::Failed, "AgentTimeout"),
        );
        change(
            &mut tally,
            &mut targets,
            2,
            ended(TargetState::Succeeded, "Applied"),
        );
        change(&mut tally, &mut targets, 4, |t| {
            t.state = TargetState::Running
        });
        change(&mut tally, &mut targets, 5, |t| t.attempts = 1);
        assert_eq!(tally.needing_attention().collect::<Vec<_>>(), [4, 5, 1, 0]);
        assert_eq!(tally.needing_attention_count(), 4);
    }
}
