//! Kubernetes API-server emulator: an in-memory API server as an axum `Router`, used
//! in-process by controller tests (`ApiServer::client()`) and as a process by kubectl
//! (`guestcred-lab apiserver`).
//!
//! What it does:
//! - discovery (`/version`, `/api`, `/api/v1`, `/apis`, `/apis/<g>`, `/apis/<g>/<v>`; the
//!   legacy documents, and aggregated discovery apidiscovery.k8s.io/v2 on /api and /apis
//!   when the Accept header asks for it; v2beta1-only requests get 406) and
//!   `/openapi/v3` (index + one document per group-version, CRD schemas included) and
//!   `/openapi/v2` (JSON, or gnostic protobuf when asked first, as kubectl 1.27 does);
//! - protobuf request bodies for Namespace, Secret, ConfigMap, ServiceAccount and
//!   SelfSubjectAccessReview (what kubectl 1.32+ sends; other kinds 415), answered as JSON;
//! - SelfSubjectAccessReview: always allowed, with a reason saying there is no RBAC;
//! - the real server's size limits and answers (`limits.rs`): 413 over 3 MiB bodies, 422
//!   for Secret/ConfigMap data over 1 MiB and JSON-patch copies over 3 MiB, etcd's 500s for
//!   stored objects over 1.5 MiB / 2 MiB (estimated from the emulator's JSON);
//! - built-in kinds listed in `resources.rs` (one line each) and kinds from CRDs: applying a
//!   CRD serves its versions, sets `NamesAccepted`/`Established`, honours scope, shortNames,
//!   categories, `subresources.status` and `additionalPrinterColumns`; deleting it deletes
//!   its objects;
//! - create (generateName, 409 AlreadyExists, namespace must exist), get, list (label and
//!   field selectors), update (409 on a stale resourceVersion), status subresource, merge /
//!   JSON / strategic (approximate) / apply patches, delete with finalizers
//!   (deletionTimestamp, removed when the last finalizer goes), ownerReference GC
//!   (background cascade; Orphan honoured), deletecollection, namespace deletion deletes its
//!   contents;
//! - watch: ADDED/MODIFIED/DELETED/BOOKMARK/ERROR, resume from a resourceVersion within the
//!   last 10k events, 410 Gone when older, `sendInitialEvents`, timeoutSeconds, filtered
//!   watches see objects leave (DELETED) and enter (ADDED) their selector;
//! - `Table` rendering for `kubectl get` (`Accept: ...;as=Table`), and metadata-only gets,
//!   lists and watches (`as=PartialObjectMetadata[List]`, kube-rs `PartialObjectMeta`);
//! - Events: core/v1 and events.k8s.io/v1 Events are one store with two views, as on the
//!   real server: an Event written through either API is read, listed, watched (field
//!   selectors included), patched and deleted through both. events.k8s.io `regarding`,
//!   `note`, `reportingController`, `deprecatedSource`, `deprecatedCount`,
//!   `deprecatedFirstTimestamp`, `deprecatedLastTimestamp` are core `involvedObject`,
//!   `message`, `reportingComponent`, `source`, `count`, `firstTimestamp`, `lastTimestamp`;
//!   other fields share their names. Unlike the real server, reads also fill unset fields
//!   from the other shape's (core `count` from `series.count`, `first/lastTimestamp` from
//!   `eventTime`/`series`, `source` from `reportingComponent`/`reportingInstance`, and the
//!   reverse), so `kubectl describe` lists kube-rs `Recorder` Events with their counts; see
//!   `views.rs`;
//! - test faults ([`Faults`]): injected 409s on status writes, expired watches, a stale
//!   relist; a count of answered requests by method and path ([`ApiServer::requests`]).
//!
//! - pruning: custom objects lose fields their CRD's structural schema does not declare
//!   (properties, additionalProperties, items, x-kubernetes-preserve-unknown-fields,
//!   x-kubernetes-embedded-resource), on every write, as on a real cluster.
//!
//! What it does NOT do (never rely on it): OpenAPI schema validation, defaulting,
//! CEL (`x-kubernetes-validations`), version conversion (objects are served at the requested
//! version unchanged), server-side-apply field ownership (apply = create-or-merge-patch,
//! and fields the same `fieldManager` applied before and omits now are removed; but no
//! conflicts are ever reported, `force` is accepted and ignored, lists are atomic, and
//! another manager's fields are never protected), managedFields, authentication/RBAC/admission
//! (TokenReview always answers unauthenticated), protobuf responses and protobuf bodies of
//! other kinds (415), aggregated discovery
//! v2beta1, list snapshots (pages after the first are read from the current state, at the first
//! page's resourceVersion: see `paging`), dryRun, foreground
//! deletion (treated as background), namespace termination waiting for finalizers, and
//! naming events.k8s.io in errors about its Events (they say `events "x"`, as core's do).
//! Strategic merge patch merges keyed lists only for well-known fields (containers, env,
//! volumes, conditions, ...). Field selectors: metadata.name, metadata.namespace,
//! spec.nodeName and status.phase on every kind, plus Events' `involvedObject.*` /
//! `regarding.*`, `reason`, `type` and Secrets' `type`; anything else is 400.

mod error;
mod http;
mod limits;
mod openapi;
mod openapi_v2;
mod paging;
mod patch;
mod protobuf;
mod prune;
mod resources;
mod selector;
mod store;
mod table;
mod views;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::broadcast;

/// The Kubernetes release the emulator claims to be (`/version`, OpenAPI info).
pub(crate) const GIT_VERSION: &str = "v1.33.0";

use error::ApiError;
use resources::ResourceType;
/// The `selectors` fuzz target's body (fuzz/, and its corpus replay in lab/tests/).
pub use selector::fuzz_selectors;
use store::{BUS_CAPACITY, Inner};

/// State shared by all requests.
pub(crate) struct Shared {
    inner: Mutex<Inner>,
    status_conflicts: AtomicU32,
    /// While true, status writes wait before they are handled ([`Faults::hold_status_writes`]).
    status_hold: tokio::sync::watch::Sender<bool>,
    /// Stale copies the next full LIST of a resource (by plural) serves in place of the
    /// stored objects of the same namespace and name ([`Faults::serve_stale_list_once`]).
    stale_lists: Mutex<HashMap<String, Vec<serde_json::Value>>>,
    /// Requests answered, for tests that count API traffic.
    requests: RequestCounts,
    /// Of those, the ones that asked to be served metadata only (`as=PartialObjectMetadata`).
    metadata_requests: RequestCounts,
}

/// Requests answered, by "METHOD /path" (no query string).
#[derive(Default)]
struct RequestCounts(Mutex<HashMap<String, u64>>);

impl RequestCounts {
    fn counts(&self) -> MutexGuard<'_, HashMap<String, u64>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn add(&self, key: &str) {
        *self.counts().entry(key.to_string()).or_default() += 1;
    }

    fn get(&self, method: &str, path: &str) -> u64 {
        let key = format!("{method} {path}");
        self.counts().get(&key).copied().unwrap_or(0)
    }
}

impl Shared {
    pub(crate) fn count_request(&self, method: &str, path: &str, metadata_only: bool) {
        let key = format!("{method} {path}");
        if metadata_only {
            self.metadata_requests.add(&key);
        }
        self.requests.add(&key);
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data (writes are single steps).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Returns once status writes are not held ([`Faults::hold_status_writes`]).
    pub(crate) async fn status_write_released(&self) {
        let mut held = self.status_hold.subscribe();
        // The sender lives as long as `self`: the wait ends only on a release.
        let _ = held.wait_for(|held| !held).await;
    }

    /// Consumes one injected status-write conflict, if any is pending.
    fn take_status_conflict(&self, rt: &ResourceType, name: &str) -> Result<(), ApiError> {
        let took = self
            .status_conflicts
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if took {
            return Err(ApiError::conflict(
                &rt.qualified(),
                &rt.plural,
                &rt.group,
                name,
            ));
        }
        Ok(())
    }

    /// The stale copies injected for the next full LIST of `plural`, taken (one shot).
    pub(crate) fn take_stale_list(&self, plural: &str) -> Option<Vec<serde_json::Value>> {
        let mut stale = self.stale_lists.lock().unwrap_or_else(|e| e.into_inner());
        stale.remove(plural)
    }
}

/// Fault injection for tests.
pub struct Faults {
    shared: Arc<Shared>,
}

impl Faults {
    /// The next `n` status writes (PUT/PATCH on `/status`) answer 409 Conflict.
    pub fn conflict_next_status_writes(&self, n: u32) {
        self.shared.status_conflicts.store(n, Ordering::SeqCst);
    }

    /// Status writes (PUT/PATCH on `/status`) wait, unanswered, until the returned guard
    /// is dropped: a loaded API server (or etcd) slow to commit them. Other requests are
    /// answered as usual meanwhile.
    pub fn hold_status_writes(&self) -> StatusWritesHeld {
        self.shared.status_hold.send_replace(true);
        StatusWritesHeld {
            shared: self.shared.clone(),
        }
    }

    /// Ends every open watch with a 410 Gone ERROR event and forgets the event history, so
    /// resuming from any earlier resourceVersion gets 410 too (clients must relist).
    pub fn expire_watches(&self) {
        self.shared.lock().expire_watches();
    }

    /// The next full LIST of `plural` (any namespace, any page) answers with `objects` in
    /// place of the stored objects of the same namespace and name, at the current list
    /// resourceVersion. A client's cache then holds the old copies until the objects change
    /// again: the state a controller is in when its watch lags far behind the writes (on a
    /// loaded real server), or a relist is served from a stale cache (`resourceVersion=0`,
    /// which kube-rs does not send by default). One shot; `expire_watches` makes clients
    /// relist.
    pub fn serve_stale_list_once(&self, plural: &str, objects: Vec<serde_json::Value>) {
        let mut stale = (self.shared.stale_lists.lock()).unwrap_or_else(|e| e.into_inner());
        stale.insert(plural.to_string(), objects);
    }

    /// Whether the stale copies of [`Faults::serve_stale_list_once`] are still unserved.
    pub fn stale_list_pending(&self, plural: &str) -> bool {
        let stale = (self.shared.stale_lists.lock()).unwrap_or_else(|e| e.into_inner());
        stale.contains_key(plural)
    }
}

/// Status writes wait while this lives ([`Faults::hold_status_writes`]).
pub struct StatusWritesHeld {
    shared: Arc<Shared>,
}

impl Drop for StatusWritesHeld {
    fn drop(&mut self) {
        self.shared.status_hold.send_replace(false);
    }
}

struct State {
    shared: Arc<Shared>,
    faults: Faults,
}

/// The emulated API server. Cheap to clone; clones share the same objects.
#[derive(Clone)]
pub struct ApiServer {
    state: Arc<State>,
}

impl Default for ApiServer {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiServer {
    /// A server with namespaces `default`, `kube-system` and `kube-public`.
    pub fn new() -> Self {
        let (bus, _) = broadcast::channel(BUS_CAPACITY);
        let mut inner = Inner::new(bus);
        for ns in ["default", "kube-system", "kube-public"] {
            if let Some(rt) = inner.lookup("", "v1", "namespaces") {
                let obj = serde_json::json!({"metadata": {"name": ns}});
                if let Err(e) = inner.create(&rt, "v1", None, obj) {
                    tracing::error!(error = %e, namespace = ns, "cannot pre-create namespace");
                }
            }
        }
        let shared = Arc::new(Shared {
            inner: Mutex::new(inner),
            status_conflicts: AtomicU32::new(0),
            status_hold: tokio::sync::watch::Sender::new(false),
            stale_lists: Mutex::default(),
            requests: RequestCounts::default(),
            metadata_requests: RequestCounts::default(),
        });
        Self {
            state: Arc::new(State {
                faults: Faults {
                    shared: shared.clone(),
                },
                shared,
            }),
        }
    }

    /// The whole API as a router (merge extra routes before the fallback takes them).
    pub fn router(&self) -> axum::Router {
        axum::Router::new()
            .fallback(http::dispatch)
            // Bodies are limited as on the real server (`limits`), not by axum's 2 MB default.
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(self.state.shared.clone())
    }

    /// An in-process client: requests go straight to the router, no sockets.
    pub fn client(&self) -> kube::Client {
        kube::Client::new(self.router(), "default")
    }

    /// Serves the API (plus `extra` routes, e.g. KubeVirt subresources) on `listener`.
    pub async fn serve(
        &self,
        listener: tokio::net::TcpListener,
        extra: axum::Router,
    ) -> std::io::Result<()> {
        let app = extra.merge(self.router());
        axum::serve(listener, app).await
    }

    pub fn faults(&self) -> &Faults {
        &self.state.faults
    }

    /// How many `method` requests to exactly `path` (no query string) were answered so far,
    /// e.g. `requests("GET", "/api/v1/namespaces/default/secrets/pw")`.
    pub fn requests(&self, method: &str, path: &str) -> u64 {
        self.state.shared.requests.get(method, path)
    }

    /// How many of [`Self::requests`] asked for metadata only (`Accept: ...;as=PartialObjectMetadata`
    /// or `...List`), as kube-rs's `metadata_watcher` and `get_metadata` do.
    pub fn metadata_requests(&self, method: &str, path: &str) -> u64 {
        self.state.shared.metadata_requests.get(method, path)
    }

    /// Every request answered so far: "METHOD /path" (no query string) and how many.
    pub fn all_requests(&self) -> std::collections::BTreeMap<String, u64> {
        let counts = self.state.shared.requests.counts();
        counts.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

/// Writes a kubeconfig (context `guestcred-lab`, namespace `default`, no credentials)
/// that both kubectl and kube-rs accept.
pub fn write_kubeconfig(path: &Path, server_url: &str) -> std::io::Result<()> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "guestcred-lab", "cluster": {"server": server_url}}],
        "users": [{"name": "guestcred-lab", "user": {}}],
        "contexts": [{"name": "guestcred-lab",
                      "context": {"cluster": "guestcred-lab", "user": "guestcred-lab",
                                  "namespace": "default"}}],
        "current-context": "guestcred-lab",
        "preferences": {},
    });
    let yaml = serde_yaml::to_string(&config).map_err(std::io::Error::other)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    // Write then rename: whoever waits for the file never reads half of it.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, yaml)?;
    std::fs::rename(&tmp, path)
}

/// `guestcred-lab apiserver` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct ApiServerArgs {
    /// Address to listen on (plain HTTP; keep it on loopback).
    #[arg(
        long,
        default_value = "127.0.0.1:6443",
        env = "GUESTCRED_LAB_APISERVER_LISTEN"
    )]
    pub listen: SocketAddr,
    /// Write a kubeconfig pointing at this server here.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
}

/// Runs the emulator as a process until it is killed.
pub async fn run(args: ApiServerArgs) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    let url = format!("http://{addr}");
    if let Some(path) = &args.kubeconfig {
        write_kubeconfig(path, &url)?;
        tracing::info!(kubeconfig = %path.display(), "kubeconfig written");
    }
    tracing::info!(%url, "lab API server listening");
    ApiServer::new().serve(listener, axum::Router::new()).await
}
