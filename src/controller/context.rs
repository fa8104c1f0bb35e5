//! State shared by every reconcile.
use super::shims::ShimDirectory;
use crate::api::{GuestPasswordReset, KeypairRebuild};
use kube::Client;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use std::time::Duration;

/// Tunables of the run engine.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// First retry delay after a transient failure; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Status of a running bulk run is written at most this often (batched).
    pub status_flush_interval: Duration,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            status_flush_interval: Duration::from_millis(250),
        }
    }
}

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub shims: ShimDirectory,
    pub settings: EngineSettings,
    /// Latest view of the objects, to notice pause, spec changes and deletion mid-run.
    pub resets: Store<GuestPasswordReset>,
    pub rebuilds: Store<KeypairRebuild>,
}
