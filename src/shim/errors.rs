//! Turning agent and libvirt failures into wire reasons, shared by both backends.
//!
//! qemu-ga reports most failures as a GenericError with free text, and libvirt wraps them
//! in code 1 (internal error) with the same text, so part of the mapping reads the message.
//! The texts below are those of qemu-ga 7.x (commands-posix.c, commands-posix-ssh.c):
//! - "failed to lookup user 'x'": getpwnam failed in a guest-ssh-* call: the user does not
//!   exist. Reliable.
//! - "child process has failed to set user password": chpasswd exited non-zero. The usual
//!   cause is an unknown user, but PAM or a read-only /etc give the same text. Backends
//!   therefore confirm with a read-only `guest-ssh-get-authorized-keys` lookup where the
//!   agent has it (see [`password_failure`]); without it we fall back to UserNotFound.
//! - "Command X has been disabled" / "The command X has not been found": old or locked-down
//!   agent: Unsupported.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::api::wire::{ShimError, ShimErrorReason};

/// Reason for an error text reported by the guest agent itself.
pub fn classify_agent_text(text: &str) -> ShimErrorReason {
    let t = text.to_ascii_lowercase();
    if t.contains("has been disabled") || t.contains("has not been found") {
        ShimErrorReason::Unsupported
    } else if t.contains("failed to lookup user") || t.contains("failed to set user password") {
        ShimErrorReason::UserNotFound
    } else if t.contains("failed to create directory") && t.contains("/.ssh") {
        // qemu-ga creates ~/.ssh but not the home directory itself.
        ShimErrorReason::UserHomeMissing
    } else {
        ShimErrorReason::Internal
    }
}

/// Error for an agent-reported failure, with the agent's text as message.
pub fn from_agent_text(text: &str) -> ShimError {
    ShimError::new(classify_agent_text(text), format!("guest agent: {text}"))
}

/// qemu-ga's error when a user's authorized_keys file does not exist yet. The user lookup
/// happens before the read, so this text also proves that the user exists.
pub fn is_missing_authorized_keys(text: &str) -> bool {
    text.contains("authorized_keys") && text.contains("No such file")
}

/// Outcome of the read-only user check done after a failed password set.
pub enum UserCheck {
    /// The agent says the user does not exist.
    Missing,
    /// The user exists (so the password failure has another cause).
    Exists,
    /// The agent could not tell (no guest-ssh-* support, or another error).
    Unknown,
}

impl UserCheck {
    /// Classify the result of a `get authorized keys` call used as a user-existence check.
    pub fn from_get_keys<T>(result: &Result<T, ShimError>) -> Self {
        match result {
            Ok(_) => Self::Exists,
            Err(e) if e.reason == ShimErrorReason::UserNotFound => Self::Missing,
            Err(_) => Self::Unknown,
        }
    }
}

/// Refine a failed `set password` with what the user check found.
pub fn password_failure(err: ShimError, check: UserCheck) -> ShimError {
    if err.reason != ShimErrorReason::UserNotFound {
        return err;
    }
    match check {
        UserCheck::Missing | UserCheck::Unknown => err,
        UserCheck::Exists => ShimError::internal(format!(
            "{} (the user exists; chpasswd in the guest failed for another reason)",
            err.message
        )),
    }
}

/// libvirt error codes we act on (virterror.h).
pub mod libvirt_codes {
    pub const INTERNAL_ERROR: u32 = 1;
    pub const NO_SUPPORT: u32 = 3;
    pub const NO_CONNECT: u32 = 5;
    pub const INVALID_CONN: u32 = 6;
    pub const SYSTEM_ERROR: u32 = 38;
    pub const RPC: u32 = 39;
    pub const NO_DOMAIN: u32 = 42;
    pub const OPERATION_INVALID: u32 = 55;
    pub const OPERATION_TIMEOUT: u32 = 68;
    pub const OPERATION_UNSUPPORTED: u32 = 84;
    pub const AGENT_UNRESPONSIVE: u32 = 86;
    pub const AGENT_UNSYNCED: u32 = 97;
    pub const AGENT_COMMAND_TIMEOUT: u32 = 112;
    pub const AGENT_COMMAND_FAILED: u32 = 113;
}

/// Whether a libvirt error means the connection itself is gone (libvirtd restarted).
pub fn is_connection_error(code: u32) -> bool {
    use libvirt_codes::*;
    matches!(code, NO_CONNECT | INVALID_CONN | SYSTEM_ERROR | RPC)
}

/// Reason for a libvirt error code and message.
pub fn classify_libvirt(code: u32, message: &str) -> ShimErrorReason {
    use libvirt_codes::*;
    let lower = message.to_ascii_lowercase();
    match code {
        AGENT_UNRESPONSIVE | AGENT_UNSYNCED => {
            // libvirt 9 prefixes even "not connected" with "Guest agent is not responding:",
            // so "not connected" wins over the timeout words.
            if lower.contains("not connected") {
                ShimErrorReason::AgentNotConnected
            } else if lower.contains("not responding")
                || lower.contains("timeout")
                || lower.contains("timed out")
            {
                ShimErrorReason::AgentTimeout
            } else {
                ShimErrorReason::AgentNotConnected
            }
        }
        AGENT_COMMAND_TIMEOUT | OPERATION_TIMEOUT => ShimErrorReason::AgentTimeout,
        OPERATION_INVALID => ShimErrorReason::DomainNotRunning,
        NO_DOMAIN => ShimErrorReason::DomainNotFound,
        NO_SUPPORT | OPERATION_UNSUPPORTED => ShimErrorReason::Unsupported,
        INTERNAL_ERROR | AGENT_COMMAND_FAILED => classify_agent_text(message),
        _ => ShimErrorReason::Internal,
    }
}

/// Error for a libvirt failure.
pub fn from_libvirt(code: u32, message: &str) -> ShimError {
    ShimError::new(
        classify_libvirt(code, message),
        format!("libvirt error {code}: {message}"),
    )
}

/// A [`ShimError`] as an HTTP response: advisory status, typed JSON body.
#[derive(Debug)]
pub struct ApiError(pub ShimError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.reason.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.0)).into_response()
    }
}

impl From<ShimError> for ApiError {
    fn from(e: ShimError) -> Self {
        Self(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ShimErrorReason::*;

    #[test]
    fn agent_not_connected_wins_over_the_not_responding_prefix() {
        assert_eq!(
            classify_libvirt(
                86,
                "Guest agent is not responding: QEMU guest agent is not connected"
            ),
            AgentNotConnected
        );
    }

    #[test]
    fn agent_not_connected_is_code_86_without_timeout_words() {
        assert_eq!(
            classify_libvirt(86, "QEMU guest agent is not connected"),
            AgentNotConnected
        );
    }

    #[test]
    fn agent_not_responding_is_a_timeout() {
        assert_eq!(
            classify_libvirt(
                86,
                "Guest agent is not responding: Guest agent not available for now"
            ),
            AgentTimeout
        );
    }

    #[test]
    fn paused_domain_is_not_running() {
        assert_eq!(
            classify_libvirt(
                55,
                "Requested operation is not valid: domain is not running"
            ),
            DomainNotRunning
        );
    }

    #[test]
    fn unknown_domain_is_not_found() {
        assert_eq!(
            classify_libvirt(42, "Domain not found: no domain with matching name 'x'"),
            DomainNotFound
        );
    }

    #[test]
    fn unknown_user_texts_map_to_user_not_found() {
        assert_eq!(
            classify_libvirt(
                1,
                "internal error: unable to execute QEMU agent command 'guest-ssh-get-authorized-keys': failed to lookup user 'bob': Success"
            ),
            UserNotFound
        );
        assert_eq!(
            classify_agent_text("child process has failed to set user password"),
            UserNotFound
        );
    }

    #[test]
    fn disabled_or_unknown_commands_are_unsupported() {
        assert_eq!(
            classify_agent_text("Command guest-ssh-add-authorized-keys has been disabled"),
            Unsupported
        );
        assert_eq!(
            classify_agent_text("The command guest-ssh-get-authorized-keys has not been found"),
            Unsupported
        );
    }

    #[test]
    fn other_agent_failures_are_internal() {
        assert_eq!(
            classify_libvirt(1, "internal error: something else"),
            Internal
        );
    }

    #[test]
    fn password_failure_for_an_existing_user_is_internal() {
        let err = from_agent_text("child process has failed to set user password");
        assert_eq!(
            password_failure(err.clone(), UserCheck::Exists).reason,
            Internal
        );
        assert_eq!(
            password_failure(err.clone(), UserCheck::Missing).reason,
            UserNotFound
        );
        assert_eq!(
            password_failure(err, UserCheck::Unknown).reason,
            UserNotFound
        );
    }

    #[test]
    fn missing_authorized_keys_file_is_recognised() {
        assert!(is_missing_authorized_keys(
            "failed to read '/home/alice/.ssh/authorized_keys': Failed to open file: No such file or directory"
        ));
        assert!(!is_missing_authorized_keys("failed to lookup user 'x'"));
    }

    #[test]
    fn connection_errors_are_recognised() {
        assert!(is_connection_error(38));
        assert!(is_connection_error(39));
        assert!(!is_connection_error(42));
    }

    #[test]
    fn missing_home_directory_is_its_own_reason() {
        let text = "failed to create directory '/home/nohome/.ssh': No such file or directory";
        assert_eq!(classify_agent_text(text), ShimErrorReason::UserHomeMissing);
    }
}
