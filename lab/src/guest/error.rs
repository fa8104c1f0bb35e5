//! The lab's error type.
use std::path::PathBuf;
use std::time::Duration;

/// libvirt error codes the lab (and its tests) care about.
pub mod codes {
    /// `VIR_ERR_INTERNAL_ERROR`: also the agent's own failure ("has been disabled", ...).
    pub const INTERNAL_ERROR: i32 = 1;
    /// `VIR_ERR_NO_DOMAIN`.
    pub const NO_DOMAIN: i32 = 42;
    /// `VIR_ERR_OPERATION_INVALID`: e.g. the domain is paused or not running.
    pub const OPERATION_INVALID: i32 = 55;
    /// `VIR_ERR_AGENT_UNRESPONSIVE`: agent not connected, or not answering.
    pub const AGENT_UNRESPONSIVE: i32 = 86;
}

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A host tool or package is not there; `hint` says what to run.
    #[error("{what} is missing: {hint}")]
    Missing { what: String, hint: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A helper process failed; `output` is the tail of what it printed.
    #[error("`{command}` failed ({status}): {output}")]
    Command {
        command: String,
        status: String,
        output: String,
    },
    /// A libvirt call failed. Never carries the arguments of agent commands (they may
    /// hold passwords), only what was attempted.
    #[error("{context}: {message} (libvirt code {code})")]
    Libvirt {
        context: String,
        code: i32,
        message: String,
    },
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    /// libvirtd exited while starting; `log` is the tail of its log file.
    #[error("libvirtd exited during start ({status}); log {log_path}:\n{log}")]
    LibvirtdDied {
        status: String,
        log_path: PathBuf,
        log: String,
    },
    #[error("unexpected agent reply to {command}: {detail}")]
    AgentReply { command: String, detail: String },
    #[error("invalid lab input: {0}")]
    Invalid(String),
}

impl LabError {
    /// The libvirt error code, when this error came from libvirt.
    pub fn libvirt_code(&self) -> Option<i32> {
        match self {
            LabError::Libvirt { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> LabError {
        LabError::Io {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn libvirt(context: impl Into<String>, err: &virt::error::Error) -> LabError {
        LabError::Libvirt {
            context: context.into(),
            code: err.code().to_raw() as i32,
            message: err.message().to_string(),
        }
    }
}
