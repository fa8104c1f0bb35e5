//! State shared by every reconcile.
use super::shims::ShimDirectory;
use crate::api::keypair::GuestKeys;
use crate::api::{GuestPasswordReset, KeypairRebuild};
use crate::metrics::ControllerMetrics;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::core::PartialObjectMeta;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::{ObjectRef, Store};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Tunables of the run engine.
#[derive(Clone, Debug)]
pub struct EngineSettings {
    /// First retry delay after a transient failure; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Status of a running bulk run is written at most this often (batched).
    pub status_flush_interval: Duration,
    /// How long, from an object's deletionTimestamp, its cleanup waits for a VM that is gone
    /// or unreachable before giving up on it (a Warning Event names what was left behind).
    pub cleanup_wait: Duration,
    /// Per-target Events published one by one per run; the rest are summed per reason
    /// into one Event each at the end of the run.
    pub max_target_events: u32,
}

impl Default for EngineSettings {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
            status_flush_interval: Duration::from_millis(250),
            cleanup_wait: Duration::from_secs(60),
            max_target_events: 20,
        }
    }
}

pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub shims: ShimDirectory,
    pub settings: EngineSettings,
    /// Where reconciles and targets are counted (served on the admin port).
    pub metrics: Arc<ControllerMetrics>,
    /// Hashes password inputs for status (see `secrets::InputKey`).
    pub input_key: super::secrets::InputKey,
    /// Whether this replica may start agent calls (checked before each one).
    pub leadership: super::leader::Leadership,
    /// Latest view of the objects, to notice pause, spec changes and deletion mid-run.
    pub resets: Store<GuestPasswordReset>,
    pub rebuilds: Store<KeypairRebuild>,
    /// Secrets' names and resourceVersions (metadata watch, everything else dropped).
    pub secret_versions: Store<PartialObjectMeta<Secret>>,
    /// Guest key reports of KeypairRebuilds with mode Inspect, read by a target and not
    /// yet written to its status (see `keypair::publish_guest_keys`).
    pub key_reports: KeyReports,
    /// Plaintexts of sealed generated passwords until their target is finished (retries
    /// re-send the same value; see `sealed`).
    pub sealed: super::sealed::SealedValues,
}

impl Context {
    /// The resourceVersion of Secret `ns/name` as last seen by the watch.
    pub fn secret_version(&self, ns: &str, name: &str) -> Option<String> {
        let key = ObjectRef::new(name).within(ns);
        self.secret_versions
            .get(&key)
            .and_then(|s| s.metadata.resource_version.clone())
    }
}

/// Reports held at most (normally each is written within its own reconcile).
const REPORTS_HELD: usize = 256;

/// Reports read by `apply` and not yet written to status, by (object UID, VM): the user
/// they were read for and the keys.
#[derive(Default)]
pub struct KeyReports(Mutex<HashMap<(String, String), (String, GuestKeys)>>);

impl KeyReports {
    pub(crate) fn put(&self, uid: &str, vm: &str, user: &str, keys: GuestKeys) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= REPORTS_HELD {
            // Only reports whose write never came (objects deleted meanwhile): a target
            // that still needs one reads its guest again.
            m.clear();
        }
        m.insert((uid.into(), vm.into()), (user.into(), keys));
    }

    pub(crate) fn get(&self, uid: &str, vm: &str, user: &str) -> Option<GuestKeys> {
        let m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&(uid.into(), vm.into()))
            .filter(|(u, _)| u == user)
            .map(|(_, k)| k.clone())
    }

    pub(crate) fn forget(&self, uid: &str, vm: &str) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(&(uid.into(), vm.into()));
    }
}
