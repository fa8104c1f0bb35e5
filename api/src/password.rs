//! `GuestPasswordReset`: set a guest user's password through the QEMU guest agent.
use super::common::{RunSpec, RunStatus, SecretKeyRef};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// Desired password reset: which VMs, which user, which password, how fast.
#[derive(CustomResource, KubeSchema, Clone, Debug, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "guestcred.io",
    version = "v1alpha1",
    kind = "GuestPasswordReset",
    plural = "guestpasswordresets",
    shortname = "gpr",
    category = "guestcred",
    namespaced,
    status = "GuestPasswordResetStatus",
    cel,
    doc = "Sets a guest user's password in one or many running VMs through the QEMU guest agent (the declarative form of OpenStack Nova's set-admin-password). Each input is applied once: a run starts again only when the referenced Secret's value changes, never periodically, so hand-made changes in the guest are not overwritten.",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Targets","type":"string","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    validation = Rule::new("self.spec.target == oldSelf.spec.target").message("spec.target is immutable; create a new object for other VMs"),
    validation = Rule::new("!has(self.spec.rotation) || has(self.spec.password.generate)").message("rotation applies to generated passwords only (password.generate)")
)]
#[serde(rename_all = "camelCase")]
pub struct GuestPasswordResetSpec {
    /// The target VMs, the guest user and the rollout settings (shared with
    /// KeypairRebuild; flattened: `spec.target`, `spec.user`, `spec.maxConcurrency`, ...).
    #[serde(flatten)]
    pub common: RunSpec,
    /// Where the password comes from.
    pub password: PasswordSource,
    /// Generated passwords only: set a new one on every VM at this interval or schedule (each rotation
    /// is a run with the guarantees of any run: stored before applied, bounded
    /// concurrency, failure budget). Rotations missed while the controller was down run
    /// once, not once per missed interval; `paused` stops them too. The annotation
    /// `guestcred.io/rotate-now` (any new value) starts one at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationPolicy>,
}

/// How often generated passwords are rotated, and how many earlier ones are kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.every) != has(self.schedule)").message("set exactly one of rotation.every and rotation.schedule"))]
#[x_kube(validation = Rule::new("!has(self.every) || duration(self.every) >= duration('10s')").message("rotation.every must be a duration of at least 10s, e.g. 720h"))]
#[x_kube(validation = Rule::new("!has(self.timeZone) || has(self.schedule)").message("rotation.timeZone applies only to rotation.schedule"))]
pub struct RotationPolicy {
    /// Interval, counted from the object's creation, as a Go duration: `720h`, `30m`, `10s`
    /// (at least 10s). Exactly one of `every` and `schedule`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every: Option<String>,
    /// A cron schedule of five fields (minute hour day-of-month month day-of-week, as a
    /// CronJob's `schedule`: `0 3 * * 0` is Sundays at 03:00), or a macro such as
    /// `@daily` or `@weekly`. The first password is set at creation; a new one at each
    /// time the schedule names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub schedule: Option<String>,
    /// IANA time zone of `schedule` (`Europe/Berlin`); UTC when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub time_zone: Option<String>,
    /// Generated Secrets of earlier rotations kept per VM (0-10, default 1); older ones
    /// are deleted once the VM holds the newer password.
    #[serde(default = "default_keep_previous")]
    #[schemars(range(min = 0, max = 10))]
    pub keep_previous: u32,
}

fn default_keep_previous() -> u32 {
    1
}

/// Exactly one of `secretRef` and `generate`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.secretRef) != has(self.generate)").message("set exactly one of password.secretRef and password.generate"))]
#[x_kube(validation = Rule::new("!(has(self.generate) && self.crypted)").message("password.crypted applies only to secretRef"))]
pub struct PasswordSource {
    /// Secret key holding the password (same namespace only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<SecretKeyRef>,
    /// The Secret's value is already a crypt(3) hash (e.g. `$6$...`) and is set verbatim.
    /// Not supported for Windows guests.
    #[serde(default)]
    pub crypted: bool,
    /// Generate a random password per target; each is stored in its own Secret (owned by
    /// this object) before it is applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generate: Option<GeneratePolicy>,
}

/// Parameters of generated passwords.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct GeneratePolicy {
    /// Password length (16-128).
    #[serde(default = "default_length")]
    #[schemars(range(min = 16, max = 128))]
    pub length: u32,
    /// Characters to draw from.
    #[serde(default)]
    pub charset: Charset,
    /// Seal each generated password to this public key: its output Secret holds only the
    /// armored age ciphertext (key `password.age`), never the password, so no reader of
    /// Secrets can learn it; decrypt with the matching identity
    /// (`kubectl guestcred show-password NAME --identity key.txt`, or `age -d -i key.txt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seal_to: Option<SealTo>,
}

/// The public key generated passwords are sealed to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.age.matches('^age1[qpzry9x8gf2tvdw0s3jn54khce6mua7l]{58}$')").message("password.generate.sealTo.age must be an age X25519 recipient: age1 and 58 lower-case bech32 characters, as age-keygen prints it"))]
pub struct SealTo {
    /// An age X25519 recipient (`age1…`, 62 characters), as `age-keygen` prints it.
    #[schemars(length(max = 100))]
    pub age: String,
}

fn default_length() -> u32 {
    24
}

/// Character set for generated passwords.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum Charset {
    /// A-Z, a-z, 0-9.
    #[default]
    Alphanumeric,
    /// Alphanumeric plus shell-safe punctuation.
    AlphanumericSymbols,
}

/// Observed state of a GuestPasswordReset.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestPasswordResetStatus {
    #[serde(flatten)]
    pub run: RunStatus,
}
