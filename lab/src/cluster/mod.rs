//! The lab cluster: `guestcred-lab up/down/status/exec/pause/resume`. One `serve` process
//! (API-server emulator + kubevirt-lite + the nodes' private libvirtds and their guests),
//! one real `guestcred shim` per node on 127.0.0.<10+i>, and optionally the real
//! `guestcred controller`, all detached and recorded in `<state>/lab.json` ([`LabState`]).
//! Shims serve mutual TLS only, with certificates minted at `up` ([`tls::LabTls`]);
//! their health and metrics are on a plain-HTTP port of their own.
//!
//! With [`ControlPlane::Real`] (`up --control-plane real`) a real kube-apiserver, etcd and
//! kube-controller-manager (`lab/controlplane`) replace the emulator, the chart is
//! installed by helm and the controller runs as its ServiceAccount (see [`real`]).
//!
//! ```no_run
//! # async fn demo() -> Result<(), guestcred_lab::cluster::ClusterError> {
//! use guestcred_lab::cluster::*;
//! let opts = UpOptions { state_dir: "/tmp/lab".into(), ..UpOptions::default() };
//! let state = up(&opts).await?.into_state();
//! let out = exec(&state.state_dir, "vm-1-1", &["id".to_string()]).await?;
//! assert_eq!(out.exit_code, 0);
//! down(&state.state_dir, true).await?;
//! # Ok(()) }
//! ```
mod control;
pub mod kubevirt_lite;
pub mod procs;
pub mod real;
pub mod serve;
pub mod state;
pub mod tls;

use std::path::PathBuf;
use std::time::Duration;

pub use control::{
    DownReport, ExtraVm, GuestStatus, LabStatus, NodeStatus, UpOptions, UpOutcome, down, exec,
    lab_binary, pause, resume, start_controller_replica, status, up,
};
pub use real::ControlPlane;
pub use state::{
    AGENT_LABEL, AgentKind, CONTROLLER_NAMESPACE, LabState, NODE_LABEL, NodeState, Phase,
    ProcessInfo, SHIM_NAMESPACE, STATE_ENV, STATE_FILE, VmState, default_state_dir,
};

use crate::guest::LabError;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("lab state {path}: {detail}")]
    State { path: PathBuf, detail: String },
    #[error("the lab is not up (no {0})")]
    NotUp(PathBuf),
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{what} is missing: {hint}")]
    Missing { what: String, hint: String },
    #[error("timed out after {after:?} waiting for {what}")]
    Timeout { what: String, after: Duration },
    #[error("invalid lab input: {0}")]
    Invalid(String),
    /// Processes or mounts survived `down`.
    #[error("the lab left things behind: {}", .0.join("; "))]
    Leftovers(Vec<String>),
    #[error("{0}")]
    Failed(String),
}

impl From<WorkerPanicked> for ClusterError {
    fn from(e: WorkerPanicked) -> ClusterError {
        ClusterError::Failed(format!("lab worker panicked: {}", e.0))
    }
}

/// Blocking lab work (libvirt, child processes, files) that panicked instead of answering.
#[derive(Debug)]
pub(crate) struct WorkerPanicked(tokio::task::JoinError);

/// Runs blocking lab work on tokio's blocking pool, so that the async tasks (API server,
/// pollers, waits) go on meanwhile; a panic in `f` becomes an `E` too.
pub(crate) async fn blocking<T, E>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, E>
where
    T: Send + 'static,
    E: From<WorkerPanicked> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| E::from(WorkerPanicked(e)))?
}

impl ClusterError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> ClusterError {
        ClusterError::Io {
            context: context.into(),
            source,
        }
    }
}
