//! Everything that can go wrong in a reconcile, mapped to a condition reason in one place.
use super::shim_client::ShimCallError;
use crate::api::Reason;
use crate::api::wire::ShimErrorReason;

/// Controller errors. Messages say what to fix and never contain secret values.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidSpec(String),
    #[error("Secret {0} not found in this namespace")]
    SecretNotFound(String),
    #[error("Secret {secret} has no key {key:?}")]
    SecretKeyMissing { secret: String, key: String },
    #[error("{0}")]
    InvalidPassword(String),
    #[error("{0}")]
    InvalidPublicKey(String),
    #[error("{0}")]
    InvalidUser(String),
    #[error("{0}")]
    NoTargets(String),
    #[error("{0}")]
    UnsupportedForOs(String),
    #[error("VirtualMachineInstance {0} not found; check spec.target (kubectl get vmi)")]
    VmNotFound(String),
    #[error("{0}")]
    VmNotRunning(String),
    #[error("{0}")]
    ShimUnavailable(String),
    #[error("{reason}: {message}")]
    Shim {
        reason: ShimErrorReason,
        message: String,
    },
    #[error("{0}")]
    VerificationFailed(String),
    /// `removeFingerprints` names a key the guest user does not have.
    #[error("{0}")]
    KeyNotFound(String),
    #[error("{0}")]
    OutputSecretConflict(String),
    #[error("deadline of {seconds}s exceeded; last error: {last}")]
    DeadlineExceeded { seconds: u32, last: String },
    #[error("{}", kube_message(.0))]
    Kube(#[from] kube::Error),
}

/// The API server's 403, if `e` is one.
fn forbidden(e: &kube::Error) -> Option<&kube::core::Status> {
    match e {
        kube::Error::Api(status) if status.code == 403 => Some(status),
        _ => None,
    }
}

/// The word after `prefix` in `text`, without quotes (`cannot get resource "secrets"`).
fn word_after<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let rest = &text[text.find(prefix)? + prefix.len()..];
    let word = rest.split_whitespace().next()?.trim_matches('"');
    (!word.is_empty()).then_some(word)
}

/// "forbidden: cannot <verb> <resource> in namespace <ns> (<the server's message>)" for a
/// 403, built from what the error carries: kube-apiserver says `<resource> "<name>" is
/// forbidden: User "…" cannot <verb> resource "<resource>" in API group "…" in the
/// namespace "…"`, and its details name the resource (kind) and group.
fn kube_message(e: &kube::Error) -> String {
    let Some(status) = forbidden(e) else {
        return format!("Kubernetes API error: {e}");
    };
    let m = &status.message;
    let verb = word_after(m, " cannot ").unwrap_or("access");
    let resource = word_after(m, " resource ")
        .map(str::to_owned)
        .or_else(|| {
            status.details.as_ref().map(|d| match d.group.as_str() {
                "" => d.kind.clone(),
                g => format!("{}.{g}", d.kind),
            })
        })
        .filter(|r| !r.is_empty())
        .unwrap_or_else(|| "a resource".into());
    let scope = match word_after(m, " in the namespace ") {
        Some(ns) => format!(" in namespace {ns}"),
        None => " at cluster scope".into(),
    };
    format!(
        "forbidden: cannot {verb} {resource}{scope}; grant it to the controller's ServiceAccount (API server: {m})"
    )
}

impl Error {
    /// The reason users see for this error on the target and in conditions.
    pub fn reason(&self) -> Reason {
        match self {
            Self::InvalidSpec(_) => Reason::InvalidSpec,
            Self::SecretNotFound(_) => Reason::SecretNotFound,
            Self::SecretKeyMissing { .. } => Reason::SecretKeyMissing,
            Self::InvalidPassword(_) => Reason::InvalidPassword,
            Self::InvalidPublicKey(_) => Reason::InvalidPublicKey,
            Self::InvalidUser(_) => Reason::InvalidUser,
            Self::NoTargets(_) => Reason::NoTargets,
            Self::UnsupportedForOs(_) => Reason::UnsupportedForOS,
            Self::VmNotFound(_) => Reason::VMNotFound,
            Self::VmNotRunning(_) => Reason::VMNotRunning,
            Self::ShimUnavailable(_) => Reason::ShimUnavailable,
            Self::Shim { reason, .. } => match reason {
                ShimErrorReason::AgentNotConnected => Reason::AgentNotConnected,
                ShimErrorReason::AgentTimeout => Reason::AgentTimeout,
                ShimErrorReason::UserNotFound => Reason::UserNotFound,
                ShimErrorReason::UserHomeMissing => Reason::UserHomeMissing,
                // The VMI says Running on this node but the node has no such domain (yet):
                // it is starting or migrating, so retry like a VM that is not running.
                ShimErrorReason::DomainNotFound | ShimErrorReason::DomainNotRunning => {
                    Reason::VMNotRunning
                }
                ShimErrorReason::Unsupported => Reason::UnsupportedByAgent,
                ShimErrorReason::InvalidArgument => Reason::InvalidSpec,
                ShimErrorReason::Unauthenticated
                | ShimErrorReason::Forbidden
                | ShimErrorReason::Internal => Reason::ShimError,
            },
            Self::VerificationFailed(_) => Reason::VerificationFailed,
            Self::KeyNotFound(_) => Reason::KeyNotFound,
            Self::OutputSecretConflict(_) => Reason::OutputSecretConflict,
            Self::DeadlineExceeded { .. } => Reason::DeadlineExceeded,
            // RBAC refusals are named as such (and retried: a fix needs no spec edit).
            Self::Kube(e) if forbidden(e).is_some() => Reason::Forbidden,
            // API hiccups are retried; they surface only when they outlast the deadline.
            Self::Kube(_) => Reason::ShimError,
        }
    }

    /// Name the user and the fix when the guest has no such user (the agent's own text
    /// says only that chpasswd failed).
    pub fn for_user(self, user: &str, vm: &str) -> Self {
        match self {
            Self::Shim {
                reason: ShimErrorReason::UserNotFound,
                message,
            } => Self::Shim {
                reason: ShimErrorReason::UserNotFound,
                message: format!(
                    "user {user:?} does not exist in the guest of {vm} ({message}); create it in the guest or set spec.user (or the VM's guestcred.io/admin-user annotation)"
                ),
            },
            other => other,
        }
    }

    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Kube(_)) || self.reason().is_transient()
    }
}

impl From<ShimCallError> for Error {
    fn from(e: ShimCallError) -> Self {
        match e {
            ShimCallError::Unreachable(m) => {
                Self::ShimUnavailable(format!("shim unreachable: {m}"))
            }
            ShimCallError::Shim(e) => Self::Shim {
                reason: e.reason,
                message: e.message,
            },
            ShimCallError::Protocol { status, message } => Self::Shim {
                reason: ShimErrorReason::Internal,
                message: format!("unexpected shim answer (HTTP {status}): {message}"),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `e` maps to `reason`, and is retried exactly when `transient`.
    fn assert_maps(e: Error, reason: Reason, transient: bool) {
        assert_eq!(e.reason(), reason, "{e}");
        assert_eq!(e.is_transient(), transient, "{e}");
    }

    fn shim_error(reason: ShimErrorReason, message: &str) -> Error {
        Error::Shim {
            reason,
            message: message.into(),
        }
    }

    #[test]
    fn agent_timeout_is_transient_and_keeps_its_name() {
        let e = shim_error(ShimErrorReason::AgentTimeout, "no answer");
        assert_maps(e, Reason::AgentTimeout, true);
    }

    #[test]
    fn unknown_user_is_permanent() {
        let e = shim_error(ShimErrorReason::UserNotFound, "no user bob");
        assert_maps(e, Reason::UserNotFound, false);
    }

    #[test]
    fn unreachable_shim_maps_to_shim_unavailable() {
        let e: Error = ShimCallError::Unreachable("connection refused".into()).into();
        assert_maps(e, Reason::ShimUnavailable, true);
    }

    #[test]
    fn forbidden_from_the_api_server_is_its_own_transient_reason_naming_verb_and_resource() {
        let status = kube::core::Status {
            code: 403,
            reason: "Forbidden".into(),
            message: r#"secrets "db-pw" is forbidden: User "system:serviceaccount:guestcred-system:guestcred-controller" cannot get resource "secrets" in API group "" in the namespace "prod""#.into(),
            ..Default::default()
        };
        let e = Error::Kube(kube::Error::Api(Box::new(status)));
        assert_eq!(e.reason().as_str(), "Forbidden");
        assert!(e.is_transient(), "RBAC fixes apply without a spec edit");
        let message = e.to_string();
        assert!(
            message.starts_with("forbidden: cannot get secrets in namespace prod"),
            "{message}"
        );
    }
}
