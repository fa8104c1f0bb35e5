//! Finds the shim serving a node: a Pod with the shim labels, scheduled on that node,
//! Running with a pod IP. A small reflector keeps the (few) shim pods in memory, so a
//! bulk run does not list pods once per target.
use super::error::Error;
use super::shim_client::{ShimApi, ShimClient};
use crate::tls::client::{ClientTlsFiles, ReloadingHttpClient};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Api, Client};
use secrecy::SecretString;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

/// Label selector the Helm chart and the lab put on shim pods.
pub const SHIM_POD_SELECTOR: &str =
    "app.kubernetes.io/name=guestcred,app.kubernetes.io/component=shim";

/// How to reach shims.
#[derive(Clone, Debug)]
pub struct ShimAccess {
    /// Namespace of the shim pods; None = all namespaces.
    pub namespace: Option<String>,
    pub port: u16,
    /// "http" or "https"; `tls` set means https.
    pub scheme: String,
    pub token: Option<SecretString>,
    /// Mutual TLS to the shims (CA, client certificate, expected shim name); reloaded
    /// when the files change.
    pub tls: Option<ClientTlsFiles>,
    /// Bound for one shim request (above the shim's agent timeout).
    pub request_timeout: Duration,
}

pub struct ShimDirectory {
    store: reflector::Store<Pod>,
    access: ShimAccess,
    clients: Mutex<HashMap<String, ShimClient>>,
    tls: Option<ReloadingHttpClient>,
}

impl ShimDirectory {
    /// Start watching shim pods. The returned future drives the reflector and must be spawned.
    pub fn start(
        client: Client,
        access: ShimAccess,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let api: Api<Pod> = match &access.namespace {
            Some(ns) => Api::namespaced(client, ns),
            None => Api::all(client),
        };
        let (store, writer) = reflector::store();
        let stream = reflector(
            writer,
            watcher(api, watcher::Config::default().labels(SHIM_POD_SELECTOR)),
        )
        .default_backoff()
        .applied_objects()
        .for_each(|_| futures::future::ready(()));
        // Unreadable TLS files are reported per call (ShimUnavailable) until they appear.
        let tls = access.tls.clone().and_then(|files| {
            ReloadingHttpClient::new(files, access.request_timeout)
                .inspect_err(|e| tracing::error!(error = %e, "cannot load the shim TLS files"))
                .ok()
        });
        let dir = Self {
            store,
            access,
            clients: Mutex::new(HashMap::new()),
            tls,
        };
        (dir, stream)
    }

    /// Wait until the first list of shim pods arrived.
    pub async fn ready(&self) {
        let _ = self.store.wait_until_ready().await;
    }

    /// The shim client for `node`, or ShimUnavailable saying why there is none.
    pub fn for_node(&self, node: &str) -> Result<Arc<dyn ShimApi>, Error> {
        let ip = self
            .store
            .state()
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
            .filter_map(|p| {
                let status = p.status.as_ref()?;
                (status.phase.as_deref() == Some("Running"))
                    .then(|| status.pod_ip.clone())
                    .flatten()
            })
            .next()
            .ok_or_else(|| {
                Error::ShimUnavailable(format!("no running guestcred shim pod on node {node}"))
            })?;
        if let Some(files) = &self.access.tls {
            return Ok(Arc::new(self.tls_client(files, &ip)?));
        }
        let base = format!("{}://{}:{}", self.access.scheme, ip, self.access.port);
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(&base) {
            return Ok(Arc::new(c.clone()));
        }
        let c = ShimClient::new(
            base.clone(),
            self.access.token.clone(),
            self.access.request_timeout,
        )?;
        clients.insert(base, c.clone());
        Ok(Arc::new(c))
    }

    /// An HTTPS client for the shim at `ip`: the reloading client hands out a new
    /// connection pool whenever the certificate files changed.
    fn tls_client(&self, files: &ClientTlsFiles, ip: &str) -> Result<ShimClient, Error> {
        // IPv6 pod IPs need brackets in a URL.
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip.to_string()
        };
        let base = format!("https://{host}:{}", self.access.port);
        let http = match &self.tls {
            Some(t) => t.http(),
            None => ReloadingHttpClient::new(files.clone(), self.access.request_timeout)
                .and_then(|t| t.http()),
        }
        .map_err(|e| Error::ShimUnavailable(format!("shim TLS client: {e}")))?;
        Ok(ShimClient::with_http_client(
            base,
            self.access.token.clone(),
            http,
        ))
    }
}
