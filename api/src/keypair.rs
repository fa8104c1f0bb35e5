//! `KeypairRebuild`: put new SSH public keys into guests, live or by rebuilding the VM.
use super::common::{RunSpec, RunStatus, SecretKeyRef};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Most fingerprints one object may remove (`spec.removeFingerprints`).
pub const MAX_REMOVE_FINGERPRINTS: usize = 100;
/// Most keys a target's `guestKeys` lists (mode Inspect); the rest are counted in
/// `notShown`, so one object's status stays small whatever the guest holds.
pub const MAX_GUEST_KEYS: usize = 100;
/// Longest key comment `guestKeys` repeats, in characters (a longer one is cut).
pub const MAX_GUEST_KEY_COMMENT: usize = 100;

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
    doc = "Puts SSH public keys into a guest user's authorized_keys in one or many VMs, live through the QEMU guest agent (touching only keys guestcred added), and verifies them by reading them back. The declarative form of OpenStack Nova's rebuild with a new key_name. Also removes named keys (removeFingerprints: any key, guestcred's or added by hand, but only the ones named) and reads a VM's keys without changing anything (mode Inspect: status.targets[].guestKeys).",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Targets","type":"string","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.spec.target == oldSelf.spec.target").message("spec.target is immutable; create a new object for other VMs")
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.ttlSeconds) || !has(self.mode) || self.mode != 'Rebuild'").message("ttlSeconds needs mode Live (or Auto on guests whose agent has guest-ssh-*): keys written by a rebuild into cloud-init user data cannot be removed on time"))]
#[x_kube(validation = Rule::new("(has(self.publicKeys) ? 1 : 0) + (has(self.removeFingerprints) ? 1 : 0) + (has(self.mode) && self.mode == 'Inspect' ? 1 : 0) == 1").message("set exactly one of publicKeys (keys to add), removeFingerprints (keys to remove) and mode: Inspect (read the keys, change nothing)"))]
#[x_kube(validation = Rule::new("!has(self.mode) || self.mode != 'Inspect' || has(self.target.vmName)").message("mode Inspect reads one VM's keys: set target.vmName (the keys of every VM a selector matches would not fit in one object's status)"))]
#[x_kube(validation = Rule::new("!(has(self.removeFingerprints) || (has(self.mode) && self.mode == 'Inspect')) || (!has(self.ttlSeconds) && !(has(self.replaceAll) && self.replaceAll))").message("ttlSeconds and replaceAll apply to keys being added (publicKeys); removeFingerprints and mode Inspect take neither"))]
#[x_kube(validation = Rule::new("!has(self.overlapSeconds) || has(self.publicKeys)").message("overlapSeconds applies to keys being added (publicKeys): removeFingerprints and mode Inspect replace nothing"))]
#[x_kube(validation = Rule::new("!has(self.overlapSeconds) || !has(self.strategy) || self.strategy == 'Replace'").message("overlapSeconds needs strategy Replace: with Append no key is replaced"))]
#[x_kube(validation = Rule::new("!has(self.overlapSeconds) || !has(self.replaceAll) || !self.replaceAll").message("overlapSeconds cannot be combined with replaceAll, which makes authorized_keys exactly the given keys at once"))]
#[x_kube(validation = Rule::new("!has(self.overlapSeconds) || !has(self.mode) || self.mode != 'Rebuild'").message("overlapSeconds needs mode Live (or Auto on guests whose agent has guest-ssh-*): keys written by a rebuild into cloud-init user data cannot be removed after the overlap"))]
#[x_kube(validation = Rule::new("!has(self.removeFingerprints) || !has(self.mode) || self.mode != 'Rebuild'").message("removeFingerprints needs mode Live or Auto: the guest agent removes the keys (guest-ssh-remove-authorized-keys); a rebuild cannot take a key out"))]
pub struct KeypairRebuildSpec {
    /// The target VMs, the guest user and the rollout settings (shared with
    /// GuestPasswordReset; flattened: `spec.target`, `spec.user`, `spec.maxConcurrency`, ...).
    #[serde(flatten)]
    pub common: RunSpec,
    /// The public keys to install. Exactly one of publicKeys, removeFingerprints and
    /// mode Inspect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_keys: Option<PublicKeySource>,
    /// Live (through the agent), Rebuild (new cloud-init keys and a restart), Auto (Live
    /// when the agent supports guest-ssh-*, else Rebuild), or Inspect: read the user's
    /// authorized_keys and report every key in status.targets[].guestKeys (its SHA256
    /// fingerprint, type, comment, whether guestcred manages it and when a TTL removes it),
    /// changing nothing. Inspect takes target.vmName and no publicKeys, removeFingerprints,
    /// ttlSeconds or replaceAll.
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
    /// Replace with overlap: the new keys are added and read back first; the keys they
    /// replace stay in the guest this many seconds more (10-604800), then are removed
    /// (status.targets[].replacedKeys and replacedKeysRemoveAt say which and when; the
    /// time is kept in status, so a controller restart keeps it). If the new keys cannot
    /// be added or read back, the old ones stay. Strategy Replace and live delivery only:
    /// refused with strategy Append, replaceAll, mode Rebuild, removeFingerprints and mode
    /// Inspect; a target that Auto delivers by rebuilding fails with InvalidSpec.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 10, max = 604800))]
    pub overlap_seconds: Option<u32>,
    /// What deleting this object does to the keys it added. Remove (the default): the
    /// controller removes them from every VM where they were put in place (only keys
    /// guestcred added itself; a VM that is gone or unreachable is given up after a
    /// bounded wait, with a Warning Event naming the keys left behind). Keep: the keys
    /// stay in the guests.
    #[serde(default)]
    pub on_delete: OnDelete,
    /// Remove the keys with these SHA256 fingerprints (as `ssh-keygen -lf KEYFILE` prints
    /// them: SHA256:<43 base64 characters>; 1-100) from the user's authorized_keys, live
    /// through the guest agent, and verify by reading back that they are gone. Naming a
    /// fingerprint is an explicit request: the key is removed whether guestcred added it
    /// or a person did, and guestcred's record of it is dropped. Nothing that is not named
    /// is ever removed. A target whose guest has none of the lines of a named fingerprint
    /// fails with KeyNotFound and is not changed at all. A KeypairRebuild that still grants
    /// a removed key puts it back on its next run (the target's message names it). Not
    /// with publicKeys, ttlSeconds, replaceAll, or mode Rebuild or Inspect.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(min = 1, max = 100), inner(length(max = 50)))]
    #[x_kube(validation = Rule::new("self.all(f, f.matches('^SHA256:[A-Za-z0-9+/]{43}$'))").message("removeFingerprints: each entry is a SHA256 fingerprint like SHA256:<43 base64 characters>, as ssh-keygen -lf KEYFILE prints it"), merge_strategy = ListMerge::Set)]
    pub remove_fingerprints: Vec<String>,
}

impl KeypairRebuildSpec {
    /// What the object asks for, from the fields that select it (the CEL rules make it
    /// exactly one; [`KeypairRebuildSpec::action`] is how the controller checks again).
    pub fn action(&self) -> Result<KeyAction, String> {
        let inspect = self.mode == KeyMode::Inspect;
        let removing = !self.remove_fingerprints.is_empty();
        match (self.public_keys.is_some(), removing, inspect) {
            (true, false, false) => Ok(KeyAction::Add),
            (false, true, false) => Ok(KeyAction::Remove),
            (false, false, true) => Ok(KeyAction::Inspect),
            _ => Err("set exactly one of publicKeys (keys to add), removeFingerprints (keys to remove) and mode: Inspect (read the keys, change nothing)".into()),
        }
    }
}

/// What a KeypairRebuild does (see [`KeypairRebuildSpec::action`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyAction {
    /// `publicKeys`: add (and with Replace, rotate) keys.
    Add,
    /// `removeFingerprints`: remove the named keys.
    Remove,
    /// `mode: Inspect`: read the keys, change nothing.
    Inspect,
}

/// Whether `s` is a SHA256 key fingerprint as OpenSSH prints it: `SHA256:` and the 32-byte
/// digest in unpadded base64 (43 characters).
pub fn is_fingerprint(s: &str) -> bool {
    s.strip_prefix("SHA256:").is_some_and(|b64| {
        b64.len() == 43
            && b64
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'+' || c == b'/')
    })
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
    /// Read the keys and report them in status; change nothing.
    Inspect,
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

pub use super::common::{GuestKey, GuestKeys};

/// A key comment as status may repeat it: at most [`MAX_GUEST_KEY_COMMENT`] characters,
/// control and formatting characters (escape sequences, bidirectional overrides) as '?'.
pub fn display_comment(comment: &str) -> String {
    comment
        .chars()
        .take(MAX_GUEST_KEY_COMMENT)
        .map(|c| {
            let format = matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}');
            if c.is_control() || format { '?' } else { c }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_sha256_in_unpadded_base64() {
        assert!(is_fingerprint(
            "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"
        ));
        assert!(!is_fingerprint("SHA256:abc"));
        assert!(!is_fingerprint(
            "MD5:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU"
        ));
        assert!(!is_fingerprint(
            "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuF="
        ));
    }

    #[test]
    fn comments_lose_control_and_direction_characters_and_stay_short() {
        assert_eq!(display_comment("a\u{1b}[31mb\u{202e}c"), "a?[31mb?c");
        assert_eq!(display_comment(&"x".repeat(500)).chars().count(), 100);
    }
}
