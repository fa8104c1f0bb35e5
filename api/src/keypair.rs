//! `KeypairRebuild`: put new SSH public keys into guests, live or by rebuilding the VM.
use super::common::{RunSpec, RunStatus, SecretKeyRef};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Desired keys: which VMs, which user, which keys, how they are delivered.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "guestcred.io",
    version = "v1alpha1",
    kind = "KeypairRebuild",
    plural = "keypairrebuilds",
    shortname = "kpr",
    category = "guestcred",
    namespaced,
    status = "KeypairRebuildStatus",
    cel,
    doc = "Puts SSH public keys into a guest user's authorized_keys in one or many VMs, live through the QEMU guest agent (touching only keys guestcred added), and verifies them by reading them back. The declarative form of OpenStack Nova's rebuild with a new key_name.",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Targets","type":"string","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.spec.target == oldSelf.spec.target").message("spec.target is immutable; create a new object for other VMs")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.ttlSeconds) || !has(self.mode) || self.mode != 'Rebuild'").message("ttlSeconds needs mode Live (or Auto on guests whose agent has guest-ssh-*): keys written by a rebuild into cloud-init user data cannot be removed on time"))]
pub struct KeypairRebuildSpec {
    /// The target VMs, the guest user and the rollout settings (shared with
    /// GuestPasswordReset; flattened: `spec.target`, `spec.user`, `spec.maxConcurrency`, ...).
    #[serde(flatten)]
    pub common: RunSpec,
    /// The public keys to install.
    pub public_keys: PublicKeySource,
    /// Live (through the agent), Rebuild (new cloud-init keys and a restart) or Auto (Live
    /// when the agent supports guest-ssh-*, else Rebuild).
    #[serde(default)]
    pub mode: KeyMode,
    /// Replace: remove the keys this operator added before, keep keys added by hand.
    /// Append: only add.
    #[serde(default)]
    pub strategy: KeyStrategy,
    /// Make authorized_keys exactly the given keys (removes hand-added keys too).
    #[serde(default)]
    pub replace_all: bool,
    /// Remove the added keys again after this many seconds (10-31536000). Live delivery
    /// only: refused with mode Rebuild, and a target that Auto delivers by rebuilding
    /// fails with InvalidSpec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 31536000))]
    pub ttl_seconds: Option<u32>,
    /// What deleting this object does to the keys it added. Remove (the default): the
    /// controller removes them from every VM where they were put in place (only keys
    /// guestcred added itself; a VM that is gone or unreachable is given up after a
    /// bounded wait, with a Warning Event naming the keys left behind). Keep: the keys
    /// stay in the guests.
    #[serde(default)]
    pub on_delete: OnDelete,
}

/// Exactly one of `secretRef` and `inline`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.secretRef) != has(self.inline)").message("set exactly one of publicKeys.secretRef and publicKeys.inline"))]
pub struct PublicKeySource {
    /// Secret key holding keys in authorized_keys format (one per line, # comments allowed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    /// Public keys in OpenSSH format.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inline: Option<Vec<String>>,
}

/// How keys reach the guest.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum KeyMode {
    #[default]
    Auto,
    Live,
    Rebuild,
}

/// What deleting a KeypairRebuild does to the keys it added.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum OnDelete {
    /// Remove the keys this object added (that guestcred owns) from the guests.
    #[default]
    Remove,
    /// Leave the keys in the guests.
    Keep,
}

/// What happens to keys already in the guest.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum KeyStrategy {
    #[default]
    Replace,
    Append,
}

/// Observed state of a KeypairRebuild.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeypairRebuildStatus {
    #[serde(flatten)]
    pub run: RunStatus,
}
