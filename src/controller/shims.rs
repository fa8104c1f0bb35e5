//! Finds the shim serving a node: a Pod in the shim namespace, owned by the shim DaemonSet,
//! with the shim labels, scheduled on that node, Running with a pod IP. A small reflector
//! keeps the (few) shim pods in memory, so a bulk run does not list pods once per target.
//! Shims are called over https with mutual TLS ([`ShimTransport::MutualTls`]); the only
//! other transport is plain HTTP for in-process test worlds, which no flag selects.
use super::error::Error;
use super::shim_client::{ShimApi, ShimClient};
use crate::tls::client::ReloadingHttpClient;
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::reflector::ObjectRef;
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

/// Name of the chart's shim DaemonSet for a release named `guestcred`
/// (`--shim-daemonset-name`; the chart passes its own name).
pub const DEFAULT_SHIM_DAEMONSET: &str = "guestcred-shim";

/// How the controller talks to shims.
#[derive(Clone, Debug)]
pub enum ShimTransport {
    /// https with mutual TLS: the reloading client (CA, client certificate, expected shim
    /// name). The only transport of the product.
    MutualTls(Arc<ReloadingHttpClient>),
    /// Plain HTTP without authentication, for in-process test worlds (guestcred-lab) whose
    /// shims serve `router_without_auth_for_test_worlds`. No flag of the controller selects it.
    PlainHttpForTestWorlds,
}

/// How to reach shims.
#[derive(Clone, Debug)]
pub struct ShimAccess {
    /// Namespace of the shim pods; pods elsewhere are never called.
    pub namespace: String,
    /// Name of the shim DaemonSet; only pods it owns are called.
    pub daemonset: String,
    pub port: u16,
    pub token: Option<SecretString>,
    pub transport: ShimTransport,
    /// Bound for one shim request (above the shim's agent timeout).
    pub request_timeout: Duration,
}

/// Whether `pod` belongs to the shim DaemonSet `daemonset`: a controller ownerReference of
/// kind DaemonSet (apps) with that name. Another pod with the shim labels in the namespace
/// (a debug pod, a copy) is never taken for a shim.
pub fn owned_by_shim_daemonset(pod: &Pod, daemonset: &str) -> bool {
    pod.metadata.owner_references.iter().flatten().any(|o| {
        o.kind == "DaemonSet"
            && o.api_version.starts_with("apps/")
            && o.name == daemonset
            && o.controller == Some(true)
    })
}

/// A shim pod as the directory keeps it: what finding and calling a node's shim reads
/// (name, namespace, uid, resourceVersion, owners, deletion, node, phase, pod IP), nothing
/// else. A real API server's pod also carries managed fields, defaulted container specs,
/// volumes and tolerations, kept for every node's shim otherwise. kube-rs's documented way
/// to keep a reflector small (`WatchStreamExt::modify`).
fn slim_pod(p: &mut Pod) {
    let m = std::mem::take(&mut p.metadata);
    p.metadata = kube::api::ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        owner_references: m.owner_references,
        deletion_timestamp: m.deletion_timestamp,
        ..Default::default()
    };
    p.spec = p.spec.take().map(|s| k8s_openapi::api::core::v1::PodSpec {
        node_name: s.node_name,
        ..Default::default()
    });
    p.status = p
        .status
        .take()
        .map(|s| k8s_openapi::api::core::v1::PodStatus {
            phase: s.phase,
            pod_ip: s.pod_ip,
            ..Default::default()
        });
}

/// The pod IP of a Running pod.
fn running_ip(p: &Pod) -> Option<&str> {
    let status = p.status.as_ref()?;
    (status.phase.as_deref() == Some("Running"))
        .then_some(status.pod_ip.as_deref())
        .flatten()
}

pub struct ShimDirectory {
    store: reflector::Store<Pod>,
    access: ShimAccess,
    clients: Mutex<HashMap<String, ShimClient>>,
    /// Node → the shim pod last found there. Only a hint: the pod is read again from the
    /// store (a hash lookup) and checked as a fresh find would check it.
    last_found: Mutex<HashMap<String, ObjectRef<Pod>>>,
}

impl ShimDirectory {
    /// Start watching shim pods. The returned future drives the reflector and must be spawned.
    pub fn start(
        client: Client,
        access: ShimAccess,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let api: Api<Pod> = Api::namespaced(client, &access.namespace);
        let (store, writer) = reflector::store();
        let stream = reflector(
            writer,
            watcher(api, watcher::Config::default().labels(SHIM_POD_SELECTOR)).modify(slim_pod),
        )
        .default_backoff()
        .applied_objects()
        .for_each(|_| futures::future::ready(()));
        (Self::over(store, access), stream)
    }

    fn over(store: reflector::Store<Pod>, access: ShimAccess) -> Self {
        Self {
            store,
            access,
            clients: Mutex::new(HashMap::new()),
            last_found: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `p` is a shim that can be called on `node` now.
    fn serves(&self, p: &Pod, node: &str) -> bool {
        p.metadata.deletion_timestamp.is_none()
            && p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
            && owned_by_shim_daemonset(p, &self.access.daemonset)
            && running_ip(p).is_some()
    }

    /// The shim pod serving `node`: the one found there last while it still serves it (a
    /// hash lookup), else a look through the store (every pod, once per node, not once
    /// per agent call: at 1,000 nodes that look was 3.5% of the controller's CPU in P6).
    fn shim_pod(&self, node: &str) -> Option<Arc<Pod>> {
        let lock = || self.last_found.lock().unwrap_or_else(|p| p.into_inner());
        let hint = lock().get(node).cloned();
        if let Some(pod) = hint
            .and_then(|r| self.store.get(&r))
            .filter(|p| self.serves(p, node))
        {
            return Some(pod);
        }
        let pod = self.store.find(|p| self.serves(p, node))?;
        lock().insert(node.to_string(), ObjectRef::from_obj(&*pod));
        Some(pod)
    }

    /// Wait until the first list of shim pods arrived.
    pub async fn ready(&self) {
        let _ = self.store.wait_until_ready().await;
    }

    /// The shim client for `node`, or ShimUnavailable saying why there is none.
    pub fn for_node(&self, node: &str) -> Result<Arc<dyn ShimApi>, Error> {
        let ip = self
            .shim_pod(node)
            .and_then(|p| running_ip(&p).map(str::to_string))
            .ok_or_else(|| {
                Error::ShimUnavailable(format!(
                    "no running guestcred shim pod on node {node} (pods of DaemonSet {}/{})",
                    self.access.namespace, self.access.daemonset
                ))
            })?;
        // IPv6 pod IPs need brackets in a URL.
        let host = if ip.contains(':') {
            format!("[{ip}]")
        } else {
            ip
        };
        match &self.access.transport {
            ShimTransport::MutualTls(tls) => {
                // The reloading client hands out a new connection pool whenever the
                // certificate files changed.
                let http = tls
                    .http()
                    .map_err(|e| Error::ShimUnavailable(format!("shim TLS client: {e}")))?;
                let base = format!("https://{host}:{}", self.access.port);
                Ok(Arc::new(ShimClient::with_http_client(
                    base,
                    self.access.token.clone(),
                    http,
                )))
            }
            ShimTransport::PlainHttpForTestWorlds => {
                let base = format!("http://{host}:{}", self.access.port);
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    fn pod(owner: Option<(&str, &str, &str, bool)>) -> Pod {
        let mut p = Pod::default();
        p.metadata.owner_references = owner.map(|(api_version, kind, name, controller)| {
            vec![OwnerReference {
                api_version: api_version.into(),
                kind: kind.into(),
                name: name.into(),
                uid: "u".into(),
                controller: Some(controller),
                ..Default::default()
            }]
        });
        p
    }

    fn shim_pod(name: &str, node: &str, ip: &str, phase: &str) -> Pod {
        let mut p = pod(Some(("apps/v1", "DaemonSet", DEFAULT_SHIM_DAEMONSET, true)));
        p.metadata.name = Some(name.into());
        p.metadata.namespace = Some("shims".into());
        p.spec = Some(k8s_openapi::api::core::v1::PodSpec {
            node_name: Some(node.into()),
            ..Default::default()
        });
        p.status = Some(k8s_openapi::api::core::v1::PodStatus {
            phase: Some(phase.into()),
            pod_ip: Some(ip.into()),
            ..Default::default()
        });
        p
    }

    fn directory() -> (ShimDirectory, reflector::store::Writer<Pod>) {
        let (store, writer) = reflector::store();
        let access = ShimAccess {
            namespace: "shims".into(),
            daemonset: DEFAULT_SHIM_DAEMONSET.into(),
            port: 8443,
            token: None,
            transport: ShimTransport::PlainHttpForTestWorlds,
            request_timeout: Duration::from_secs(5),
        };
        (ShimDirectory::over(store, access), writer)
    }

    fn found_on(dir: &ShimDirectory, node: &str) -> Option<String> {
        dir.shim_pod(node).and_then(|p| p.metadata.name.clone())
    }

    #[test]
    fn a_slimmed_shim_pod_is_still_found_and_called_and_keeps_nothing_else() {
        let mut full = shim_pod("a", "n1", "10.0.0.1", "Running");
        full.metadata.managed_fields = Some(vec![Default::default()]);
        full.metadata.labels = Some([("app".to_string(), "shim".to_string())].into());
        if let Some(spec) = full.spec.as_mut() {
            spec.containers = vec![Default::default()];
        }
        if let Some(status) = full.status.as_mut() {
            status.conditions = Some(vec![Default::default()]);
        }
        let mut slim = full.clone();
        slim_pod(&mut slim);
        assert_eq!(slim, shim_pod("a", "n1", "10.0.0.1", "Running"));
        let (dir, mut pods) = directory();
        pods.apply_watcher_event(&watcher::Event::Apply(slim));
        assert_eq!(found_on(&dir, "n1").as_deref(), Some("a"));
        assert!(dir.for_node("n1").is_ok());
    }

    #[test]
    fn a_node_s_shim_is_the_pod_serving_it_now_after_a_replacement_or_a_stop() {
        let (dir, mut pods) = directory();
        let apply = |w: &mut reflector::store::Writer<Pod>, p: Pod| {
            w.apply_watcher_event(&watcher::Event::Apply(p));
        };
        apply(&mut pods, shim_pod("a", "n1", "10.0.0.1", "Running"));
        apply(&mut pods, shim_pod("b", "n2", "10.0.0.2", "Running"));
        assert_eq!(found_on(&dir, "n1").as_deref(), Some("a"));
        assert_eq!(found_on(&dir, "n2").as_deref(), Some("b"));
        // The DaemonSet replaces the pod: the new one is called, not the one found before.
        pods.apply_watcher_event(&watcher::Event::Delete(shim_pod(
            "a", "n1", "10.0.0.1", "Running",
        )));
        apply(&mut pods, shim_pod("c", "n1", "10.0.0.3", "Running"));
        assert_eq!(found_on(&dir, "n1").as_deref(), Some("c"));
        // The pod found before stops running: no shim serves the node.
        apply(&mut pods, shim_pod("c", "n1", "10.0.0.3", "Pending"));
        assert_eq!(found_on(&dir, "n1"), None);
        assert!(dir.for_node("n1").is_err());
        // A pod moved to another node (same name) no longer serves the first.
        apply(&mut pods, shim_pod("b", "n3", "10.0.0.2", "Running"));
        assert_eq!(found_on(&dir, "n2"), None);
        assert_eq!(found_on(&dir, "n3").as_deref(), Some("b"));
    }

    #[test]
    fn only_pods_the_shim_daemonset_controls_are_shims() {
        let ds = DEFAULT_SHIM_DAEMONSET;
        assert!(owned_by_shim_daemonset(
            &pod(Some(("apps/v1", "DaemonSet", ds, true))),
            ds
        ));
        for other in [
            None,
            Some(("apps/v1", "DaemonSet", "someone-else", true)),
            Some(("apps/v1", "ReplicaSet", ds, true)),
            Some(("example.com/v1", "DaemonSet", ds, true)),
            Some(("apps/v1", "DaemonSet", ds, false)),
        ] {
            assert!(!owned_by_shim_daemonset(&pod(other), ds), "{other:?}");
        }
    }
}
