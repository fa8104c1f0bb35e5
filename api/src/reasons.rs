//! Condition and target reasons: the CamelCase words users see in status and Events.
//! Every error the controller can meet maps to exactly one of these (see
//! `controller::error::Error::reason`).

/// Stable reason strings. `as_str` is the wire form.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    // Success.
    Applied,
    Verified,
    Expired,
    /// `removeFingerprints`: the named keys were removed and read back as gone.
    Removed,
    /// Mode Inspect: the guest's keys were read (status.targets[].guestKeys).
    Inspected,
    // Spec and input problems (permanent).
    InvalidSpec,
    SecretNotFound,
    SecretKeyMissing,
    InvalidPassword,
    InvalidPublicKey,
    InvalidUser,
    NoTargets,
    UnsupportedForOS,
    // Target problems.
    /// A generated password's output Secret name is taken by a Secret this object does
    /// not own: it is neither reused nor overwritten.
    OutputSecretConflict,
    VMNotFound,
    VMNotRunning,
    AgentNotConnected,
    AgentTimeout,
    UserNotFound,
    UserHomeMissing,
    UnsupportedByAgent,
    ShimUnavailable,
    ShimError,
    /// The Kubernetes API server refused the controller (403): its RBAC lacks a verb on a
    /// resource. Retried: an RBAC fix takes effect without a spec edit.
    Forbidden,
    DeadlineExceeded,
    VerificationFailed,
    /// `removeFingerprints` names a key the guest user does not have: nothing was removed.
    KeyNotFound,
    ConflictWithAccessCredentials,
    // Run progress.
    Waiting,
    InProgress,
    Paused,
    FailureBudgetExhausted,
    Succeeded,
    PartiallySucceeded,
    Failed,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Applied => "Applied",
            Self::Verified => "Verified",
            Self::Expired => "Expired",
            Self::Removed => "Removed",
            Self::Inspected => "Inspected",
            Self::InvalidSpec => "InvalidSpec",
            Self::SecretNotFound => "SecretNotFound",
            Self::SecretKeyMissing => "SecretKeyMissing",
            Self::InvalidPassword => "InvalidPassword",
            Self::InvalidPublicKey => "InvalidPublicKey",
            Self::InvalidUser => "InvalidUser",
            Self::NoTargets => "NoTargets",
            Self::UnsupportedForOS => "UnsupportedForOS",
            Self::OutputSecretConflict => "OutputSecretConflict",
            Self::VMNotFound => "VMNotFound",
            Self::VMNotRunning => "VMNotRunning",
            Self::AgentNotConnected => "AgentNotConnected",
            Self::AgentTimeout => "AgentTimeout",
            Self::UserNotFound => "UserNotFound",
            Self::UserHomeMissing => "UserHomeMissing",
            Self::UnsupportedByAgent => "UnsupportedByAgent",
            Self::ShimUnavailable => "ShimUnavailable",
            Self::ShimError => "ShimError",
            Self::Forbidden => "Forbidden",
            Self::DeadlineExceeded => "DeadlineExceeded",
            Self::VerificationFailed => "VerificationFailed",
            Self::KeyNotFound => "KeyNotFound",
            Self::ConflictWithAccessCredentials => "ConflictWithAccessCredentials",
            Self::Waiting => "Waiting",
            Self::InProgress => "InProgress",
            Self::Paused => "Paused",
            Self::FailureBudgetExhausted => "FailureBudgetExhausted",
            Self::Succeeded => "Succeeded",
            Self::PartiallySucceeded => "PartiallySucceeded",
            Self::Failed => "Failed",
        }
    }

    /// Transient reasons are retried with backoff until the target's deadline; all
    /// others end the target at once.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            Self::VMNotRunning
                | Self::AgentNotConnected
                | Self::AgentTimeout
                | Self::ShimUnavailable
                | Self::ShimError
                | Self::Forbidden
        )
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
