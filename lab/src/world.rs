//! An in-process test world: the API-server emulator, KubeVirt's CRDs, lab nodes each with
//! a real shim (qga-socket backend) on its own loopback address, real qemu-ga instances as
//! the guests' agents, and the real controller. Only the VMs themselves are replaced (by
//! host-run qemu-ga, see `hostqga`); everything the operator talks to is the real thing.
use super::apiserver::ApiServer;
use super::hostqga::{HostQga, HostQgaError, HostQgaOptions};
use super::kubevirt::{VmDescription, create_node_with_shim, install_crds};
use guestcred::controller::context::EngineSettings;
use guestcred::controller::shims::ShimAccess;
use guestcred::metrics::ControllerMetrics;
use guestcred::shim::auth::Auth;
use guestcred::shim::qga::QgaSocketAgent;
use guestcred::shim::server;
use guestcred::tls::client::ClientTlsFiles;
use guestcred::tls::server::{ReloadingServerConfig, ServerTlsFiles};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Namespace of the lab's shim pods.
pub const SHIM_NAMESPACE: &str = "guestcred-system";

#[derive(Clone, Debug)]
pub struct WorldOptions {
    pub nodes: usize,
    pub agent_timeout: Duration,
    pub settings: EngineSettings,
    /// Mutual TLS between the controller and the shims (every shim serves the same
    /// certificate, as the chart's DaemonSet does); plain HTTP without auth when `None`.
    pub mtls: Option<WorldTls>,
}

/// Certificate files for [`WorldOptions::mtls`].
#[derive(Clone, Debug)]
pub struct WorldTls {
    pub shim: ServerTlsFiles,
    /// Allowed client identities (DNS SANs) of the shims.
    pub allowed_clients: Vec<String>,
    pub controller: ClientTlsFiles,
}

impl Default for WorldOptions {
    fn default() -> Self {
        Self {
            nodes: 1,
            agent_timeout: Duration::from_secs(3),
            settings: EngineSettings {
                initial_backoff: Duration::from_millis(200),
                max_backoff: Duration::from_secs(1),
                status_flush_interval: Duration::from_millis(50),
            },
            mtls: None,
        }
    }
}

pub struct World {
    pub api: ApiServer,
    pub client: Client,
    dir: tempfile::TempDir,
    nodes: Vec<LabNode>,
    shutdown: watch::Sender<bool>,
    controller: Option<tokio::task::JoinHandle<()>>,
    /// The controller's metrics (kept across controller restarts, like a scrape history).
    pub metrics: Arc<ControllerMetrics>,
    access: ShimAccess,
    settings: EngineSettings,
}

struct LabNode {
    name: String,
    sockets: PathBuf,
    shim: tokio::task::JoinHandle<()>,
}

impl World {
    /// Start the emulator, `opts.nodes` nodes with shims, and the controller.
    pub async fn start(opts: WorldOptions) -> anyhow::Result<World> {
        let api = ApiServer::new();
        let client = api.client();
        install_crds(&client).await?;
        let ns_api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        let ns = serde_json::from_value(serde_json::json!({"metadata": {"name": SHIM_NAMESPACE}}))?;
        ns_api.create(&Default::default(), &ns).await?;
        let dir = tempfile::Builder::new().prefix("gcw").tempdir()?;
        let mut nodes = Vec::new();
        let mut port = 0u16;
        for i in 0..opts.nodes {
            let name = format!("node-{}", i + 1);
            let ip = format!("127.0.0.{}", 10 + i);
            let sockets = dir.path().join(&name);
            std::fs::create_dir_all(&sockets)?;
            let listener = tokio::net::TcpListener::bind((ip.as_str(), port)).await?;
            port = listener.local_addr()?.port();
            let template = format!("{}/{{namespace}}_{{name}}/qga.sock", sockets.display());
            let agent = Arc::new(QgaSocketAgent::new(template, opts.agent_timeout));
            let (auth, serve_opts) = match &opts.mtls {
                Some(tls) => (
                    Auth::client_cert(tls.allowed_clients.clone(), None),
                    server::ServeOptions {
                        tls: Some(Arc::new(ReloadingServerConfig::new(tls.shim.clone())?)),
                        ..Default::default()
                    },
                ),
                None => (Auth::Disabled, server::ServeOptions::default()),
            };
            // The node check is on, as in production: the controller names the node.
            let app = server::ShimApp::new(agent, auth)
                .node(&name)
                .backend("qga-socket")
                .router();
            let shim = tokio::spawn(async move {
                let _ = server::serve_with(listener, app, serve_opts, std::future::pending()).await;
            });
            create_node_with_shim(&client, &name, SHIM_NAMESPACE, &ip).await?;
            nodes.push(LabNode {
                name,
                sockets,
                shim,
            });
        }
        let access = ShimAccess {
            namespace: Some(SHIM_NAMESPACE.into()),
            port,
            scheme: if opts.mtls.is_some() { "https" } else { "http" }.into(),
            token: None,
            tls: opts.mtls.as_ref().map(|t| t.controller.clone()),
            request_timeout: opts.agent_timeout + Duration::from_secs(5),
        };
        let (shutdown, _) = watch::channel(false);
        let mut world = World {
            api,
            client,
            dir,
            nodes,
            shutdown,
            controller: None,
            metrics: Arc::new(ControllerMetrics::new()),
            access,
            settings: opts.settings,
        };
        world.start_controller();
        Ok(world)
    }

    /// (Re)start the controller, as after a crash: nothing survives but the API objects.
    pub fn start_controller(&mut self) {
        let mut rx = self.shutdown.subscribe();
        let _ = self.shutdown.send(false);
        let stop = async move {
            let _ = rx.wait_for(|v| *v).await;
        };
        let client = self.client.clone();
        let access = self.access.clone();
        let settings = self.settings.clone();
        let metrics = self.metrics.clone();
        self.controller = Some(tokio::spawn(async move {
            guestcred::controller::start(client, access, "guestcred-test", settings, metrics, stop)
                .await;
        }));
    }

    /// Kill the controller at once (in-flight calls are dropped, like a crash).
    pub fn kill_controller(&mut self) {
        if let Some(c) = self.controller.take() {
            c.abort();
        }
    }

    /// Stop a node's shim process (its pod stays: the controller sees a dead shim).
    pub fn kill_shim(&self, node: &str) {
        if let Some(n) = self.nodes.iter().find(|n| n.name == node) {
            n.shim.abort();
        }
    }

    /// Create a VM (VM + VMI objects) and, unless it has no agent, a real qemu-ga for it on
    /// its node. The returned instance stops when dropped.
    pub async fn add_vm(
        &self,
        vm: &VmDescription,
        agent: Option<HostQgaOptions>,
    ) -> anyhow::Result<Option<HostQga>> {
        vm.create(&self.client).await?;
        let Some(opts) = agent else { return Ok(None) };
        let node = self
            .nodes
            .iter()
            .find(|n| n.name == vm.node)
            .ok_or_else(|| anyhow::anyhow!("no lab node {}", vm.node))?;
        let name = format!("{}_{}", vm.namespace, vm.name);
        let qga = HostQga::start_with(&node.sockets, &name, &opts).map_err(|e: HostQgaError| {
            anyhow::anyhow!("qemu-ga for {name} must start (needs root, unshare, overlayfs, qemu-ga: scripts/install-deps.sh): {e}")
        })?;
        Ok(Some(qga))
    }

    /// Create or update any object with server-side apply, as `kubectl apply` would.
    pub async fn apply<K>(&self, obj: &K) -> kube::Result<K>
    where
        K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
            + Clone
            + Debug
            + Serialize
            + DeserializeOwned,
    {
        let ns = obj
            .meta()
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = obj.meta().name.clone().unwrap_or_default();
        let api: Api<K> = Api::namespaced(self.client.clone(), &ns);
        api.patch(
            &name,
            &PatchParams::apply("test").force(),
            &Patch::Apply(obj),
        )
        .await
    }

    /// Poll `ns/name` until `pred` holds; fails with the last seen object after `timeout`.
    pub async fn wait_for<K>(
        &self,
        ns: &str,
        name: &str,
        timeout: Duration,
        pred: impl Fn(&K) -> bool,
    ) -> anyhow::Result<K>
    where
        K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
            + Clone
            + Debug
            + DeserializeOwned,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), ns);
        let start = Instant::now();
        loop {
            let last = api.get_opt(name).await?;
            if let Some(o) = &last
                && pred(o)
            {
                return Ok(o.clone());
            }
            if start.elapsed() > timeout {
                anyhow::bail!(
                    "timed out after {timeout:?} waiting for {ns}/{name}; last seen: {last:#?}"
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Where node `node`'s shim looks for agent sockets (`<dir>/<ns>_<name>/qga.sock`), for
    /// tests that put something of their own between the shim and an agent.
    pub fn agent_socket_dir(&self, node: &str) -> Option<&std::path::Path> {
        self.nodes
            .iter()
            .find(|n| n.name == node)
            .map(|n| n.sockets.as_path())
    }

    pub fn temp_dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
        self.kill_controller();
        for n in &self.nodes {
            n.shim.abort();
        }
    }
}
