//! An in-process test world: an API server (the emulator; see [`ControlPlane`]), KubeVirt's
//! CRDs, lab nodes each with a real shim (qga-socket backend) on its own loopback address,
//! real qemu-ga instances as the guests' agents, and the real controller. Only the VMs
//! themselves are replaced (by host-run qemu-ga, see `hostqga`); everything the operator
//! talks to is the real thing.
//!
//! Every test binary that runs a controller starts it through [`World`]; what a test needs
//! beyond the defaults is a [`WorldOptions`] field or a method here (a kubeconfig served
//! over TCP for kubectl, log capture for the secret scan, shims killed and restarted on
//! their address, leader-elected replicas, a world on its own runtime for `#[test]`s).
//!
//! `GUESTCRED_CONTROL_PLANE=real` (or [`WorldOptions::control_plane`]) runs a world on a
//! real kube-apiserver + etcd + kube-controller-manager instead of the emulator: see
//! [`real`]. Everything else (shims, agents, controller, HostKubevirt) is the same.
pub mod real;
pub mod responses;
use super::apiserver::{ApiServer, write_kubeconfig};
use super::hostkubevirt::HostKubevirt;
use super::hostqga::{HostQga, HostQgaError, HostQgaOptions};
use super::kubevirt::{VmDescription, create_node_with_shim, install_crds, kubevirt_crds};
use super::simagent::{SimAgent, SimAgentOptions};
use super::testing::{Kubectl, LogCapture};
use guestcred::api::kubevirt::VirtualMachineInstance;
use guestcred::api::{GuestPasswordReset, KeypairRebuild};
use guestcred::controller::context::EngineSettings;
use guestcred::controller::leader::{LeaseSettings, acquire};
use guestcred::controller::namespaces::WatchScope;
use guestcred::controller::shims::{DEFAULT_SHIM_DAEMONSET, ShimAccess, ShimTransport};
use guestcred::metrics::ControllerMetrics;
use guestcred::shim::agent::GuestAgent;
use guestcred::shim::auth::Auth;
use guestcred::shim::qga::QgaSocketAgent;
use guestcred::shim::server::{self, ShimApp};
use guestcred::tls::client::{ClientTlsFiles, ReloadingHttpClient};
use guestcred::tls::server::{ReloadingServerConfig, ServerTlsFiles};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Namespace of the lab's shim pods.
pub const SHIM_NAMESPACE: &str = "guestcred-system";

/// Which API server a world runs against, from `GUESTCRED_CONTROL_PLANE`: `emulator` (the
/// default) is the in-process emulator; `real` is a real kube-apiserver, etcd and
/// kube-controller-manager (lab/controlplane) of the world's own ([`real`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ControlPlaneKind {
    #[default]
    Emulator,
    Real,
}

impl ControlPlaneKind {
    pub fn from_env() -> anyhow::Result<Self> {
        match std::env::var("GUESTCRED_CONTROL_PLANE").as_deref() {
            Err(_) | Ok("") | Ok("emulator") => Ok(Self::Emulator),
            Ok("real") => Ok(Self::Real),
            Ok(other) => anyhow::bail!("GUESTCRED_CONTROL_PLANE={other}: use emulator or real"),
        }
    }
}

/// The running API server of a world. Everything a world does goes through `client` (and
/// the kubeconfig when served); only emulator-specific checks (request counters, injected
/// faults) need [`ControlPlane::emulator`].
pub enum ControlPlane {
    Emulator(ApiServer),
    // Boxed: it is much larger than the emulator's handle.
    Real(Box<real::RealControlPlane>),
}

impl ControlPlane {
    /// Starts the API server of `kind`; with `serve`, also reachable over TCP, and the
    /// returned URL is where.
    async fn start(
        kind: ControlPlaneKind,
        serve: bool,
        responses: &responses::Responses,
    ) -> anyhow::Result<(Self, Client, Option<String>)> {
        match kind {
            ControlPlaneKind::Emulator => {
                let api = ApiServer::new();
                let client = api.client();
                let url = if serve {
                    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                    let url = format!("http://{}", listener.local_addr()?);
                    let serving = api.clone();
                    tokio::spawn(async move { serving.serve(listener, axum::Router::new()).await });
                    Some(url)
                } else {
                    None
                };
                Ok((ControlPlane::Emulator(api), client, url))
            }
            ControlPlaneKind::Real => {
                // Always served: the kubeconfig is the control plane's admin one.
                let (cp, client) = real::RealControlPlane::start(responses).await?;
                Ok((ControlPlane::Real(Box::new(cp)), client, None))
            }
        }
    }

    pub fn emulator(&self) -> Option<&ApiServer> {
        match self {
            ControlPlane::Emulator(api) => Some(api),
            ControlPlane::Real(_) => None,
        }
    }

    /// The real control plane (its kubeconfig, audit log).
    pub fn real(&self) -> Option<&real::RealControlPlane> {
        match self {
            ControlPlane::Real(cp) => Some(cp),
            ControlPlane::Emulator(_) => None,
        }
    }

    pub fn kind(&self) -> ControlPlaneKind {
        match self {
            ControlPlane::Emulator(_) => ControlPlaneKind::Emulator,
            ControlPlane::Real(_) => ControlPlaneKind::Real,
        }
    }
}

/// The kinds a test reads and writes through a [`World`]: namespaced, typed objects.
pub trait Namespaced:
    Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
    + Clone
    + Debug
    + DeserializeOwned
{
}

impl<K> Namespaced for K where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + Debug
        + DeserializeOwned
{
}

#[derive(Clone, Debug)]
pub struct WorldOptions {
    pub nodes: usize,
    pub agent_timeout: Duration,
    /// The controller's timeout for one shim call; `None`: the agent timeout plus 5 s.
    pub request_timeout: Option<Duration>,
    pub settings: EngineSettings,
    /// Mutual TLS between the controller and the shims (every shim serves the same
    /// certificate, as the chart's DaemonSet does); plain HTTP without auth when `None`
    /// (served by [`serve_plain_http`], lab code: the shim binary has no such mode).
    pub mtls: Option<WorldTls>,
    /// The controller's name (the reporter of its Events).
    pub controller_name: String,
    /// Start the controller with the world (else [`World::start_controller`] or
    /// [`World::spawn_replica`] later).
    pub start_controller: bool,
    /// Install guestcred's CRDs (KubeVirt's are always there), as after `kubectl apply -f
    /// crds/`; `false` leaves that to the test.
    pub guestcred_crds: bool,
    /// Namespaces to create besides `default` and the shims' namespace.
    pub namespaces: Vec<String>,
    /// Serve the API over TCP and write a kubeconfig, for kubectl and processes.
    pub serve: bool,
    /// Capture the process's logs and panics, for [`World::assert_not_leaked`].
    pub capture_logs: bool,
    pub control_plane: ControlPlaneKind,
    /// Back every node's shim with a simulated guest agent ([`SimAgent`], one per node)
    /// instead of host qemu-ga sockets: for scale tests only (real qemu-ga stays the proof
    /// of correctness). Its `timeout` is replaced by `agent_timeout`, and its `seed` is
    /// offset by the node's index. Add VMs with [`World::add_sim_vm`].
    pub sim_agent: Option<SimAgentOptions>,
    /// The controller's `--watch-namespaces` (the chart's `watchNamespaces`); empty:
    /// every namespace.
    pub watch_namespaces: Vec<String>,
}

/// Certificate files for [`WorldOptions::mtls`].
#[derive(Clone, Debug)]
pub struct WorldTls {
    pub shim: ServerTlsFiles,
    /// Allowed client identities (DNS SANs) of the shims.
    pub allowed_clients: Vec<String>,
    pub controller: ClientTlsFiles,
}

/// The engine settings of tests: short backoffs, frequent status flushes.
pub fn fast_settings() -> EngineSettings {
    EngineSettings {
        initial_backoff: Duration::from_millis(200),
        max_backoff: Duration::from_secs(1),
        status_flush_interval: Duration::from_millis(50),
        cleanup_wait: Duration::from_secs(60),
        max_target_events: 20,
    }
}

impl Default for WorldOptions {
    fn default() -> Self {
        Self {
            nodes: 1,
            agent_timeout: Duration::from_secs(3),
            request_timeout: None,
            settings: fast_settings(),
            mtls: None,
            controller_name: "guestcred-test".into(),
            start_controller: true,
            guestcred_crds: true,
            namespaces: Vec::new(),
            serve: false,
            capture_logs: false,
            control_plane: ControlPlaneKind::from_env().unwrap_or_default(),
            sim_agent: None,
            watch_namespaces: Vec::new(),
        }
    }
}

impl WorldOptions {
    /// The fault lab of tests/faults.rs and tests/soak.rs: agent calls time out after 2 s,
    /// shim calls after 6 s, and logs and panics are captured for the secret scan.
    pub fn fault_lab() -> Self {
        Self {
            agent_timeout: Duration::from_secs(2),
            request_timeout: Some(Duration::from_secs(6)),
            controller_name: "guestcred-faults".into(),
            capture_logs: true,
            ..Self::default()
        }
    }
}

pub struct World {
    control_plane: ControlPlane,
    pub client: Client,
    dir: tempfile::TempDir,
    kubeconfig: Option<PathBuf>,
    nodes: Vec<LabNode>,
    port: u16,
    tls: Option<WorldTls>,
    shutdown: watch::Sender<bool>,
    controller: Option<tokio::task::JoinHandle<()>>,
    /// The controller's metrics (kept across controller restarts, like a scrape history).
    pub metrics: Arc<ControllerMetrics>,
    access: ShimAccess,
    settings: EngineSettings,
    controller_name: String,
    watch: WatchScope,
    logs: Option<LogCapture>,
    runtime: tokio::runtime::Handle,
    /// KubeVirt's restart subresource for the world's VMs (see `hostkubevirt`).
    kubevirt: Arc<HostKubevirt>,
    /// What the API server answered `client` (see [`World::responses`]).
    responses: responses::Responses,
}

struct LabNode {
    name: String,
    ip: String,
    sockets: PathBuf,
    app: ShimApp,
    /// The simulated agent behind the shim ([`WorldOptions::sim_agent`]).
    sim: Option<Arc<SimAgent>>,
    /// The shim's authentication; `None`: plain HTTP without auth (lab only).
    auth: Option<Auth>,
    /// The shim "process": its own runtime, so killing it drops every connection too.
    process: Mutex<Option<tokio::runtime::Runtime>>,
}

/// Each node of each world gets its own loopback address, so a killed shim can come back
/// on its address and port while other worlds of the process run side by side.
fn next_node_ip() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    format!("127.0.{}.{}", 2 + n / 200, 10 + n % 200)
}

/// Serve a shim's router over plain HTTP without authentication: the lab's in-process
/// shims when a world runs without mutual TLS, and shim tests that are not about TLS. Lab
/// code on purpose: the product's shim serves mutual TLS only.
pub async fn serve_plain_http(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

impl World {
    /// Start the API server, `opts.nodes` nodes with shims, and (unless told not to) the
    /// controller.
    pub async fn start(opts: WorldOptions) -> anyhow::Result<World> {
        let logs = opts.capture_logs.then(LogCapture::get);
        let responses = responses::Responses::default();
        let (mut control_plane, client, url) =
            ControlPlane::start(opts.control_plane, opts.serve, &responses).await?;
        // KubeVirt's restart subresource (Rebuild mode): beside the emulated API, or an
        // aggregated API of the real one.
        let kubevirt = Arc::new(HostKubevirt::default());
        let client = match &mut control_plane {
            ControlPlane::Emulator(api) => {
                kube::client::ClientBuilder::new(kubevirt.router().merge(api.router()), "default")
                    .with_layer(&responses.layer())
                    .build()
            }
            ControlPlane::Real(cp) => {
                cp.serve_restart_api(&client, kubevirt.router()).await?;
                client
            }
        };
        kubevirt.set_client(client.clone());
        let dir = tempfile::Builder::new().prefix("gcw").tempdir()?;
        let kubeconfig = match (&control_plane, url) {
            (ControlPlane::Real(cp), _) => Some(cp.kubeconfig().to_path_buf()),
            (_, Some(url)) => {
                let path = dir.path().join("kubeconfig");
                write_kubeconfig(&path, &url)?;
                Some(path)
            }
            (_, None) => None,
        };
        if opts.guestcred_crds {
            install_crds(&client).await?;
        } else {
            let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
            for crd in kubevirt_crds() {
                let pp = PatchParams::apply("test").force();
                crds.patch(&crd.name_any(), &pp, &Patch::Apply(&crd))
                    .await?;
            }
        }
        let ns_api: Api<Namespace> = Api::all(client.clone());
        for name in
            std::iter::once(SHIM_NAMESPACE).chain(opts.namespaces.iter().map(String::as_str))
        {
            let ns = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
            ns_api.create(&Default::default(), &ns).await?;
        }
        let shim_daemonset_uid = match control_plane {
            ControlPlane::Real(_) => Some(
                real::create_shim_daemonset(&client, SHIM_NAMESPACE, DEFAULT_SHIM_DAEMONSET)
                    .await?,
            ),
            ControlPlane::Emulator(_) => None,
        };
        let mut port = 0u16;
        let request_timeout = opts
            .request_timeout
            .unwrap_or(opts.agent_timeout + Duration::from_secs(5));
        let mut world = World {
            control_plane,
            client,
            dir,
            kubeconfig,
            nodes: Vec::new(),
            port,
            tls: opts.mtls.clone(),
            shutdown: watch::channel(false).0,
            controller: None,
            metrics: Arc::new(ControllerMetrics::new()),
            access: ShimAccess {
                namespace: SHIM_NAMESPACE.into(),
                daemonset: DEFAULT_SHIM_DAEMONSET.into(),
                port,
                token: None,
                transport: match &opts.mtls {
                    Some(t) => ShimTransport::MutualTls(Arc::new(
                        ReloadingHttpClient::load(t.controller.clone(), request_timeout).await?,
                    )),
                    None => ShimTransport::PlainHttpForTestWorlds,
                },
                request_timeout,
            },
            settings: opts.settings,
            controller_name: opts.controller_name,
            watch: WatchScope::new(&opts.watch_namespaces),
            logs,
            runtime: tokio::runtime::Handle::current(),
            kubevirt,
            responses,
        };
        for i in 0..opts.nodes {
            let name = format!("node-{}", i + 1);
            let ip = next_node_ip();
            let sockets = world.dir.path().join(&name);
            std::fs::create_dir_all(&sockets)?;
            world.kubevirt.add_node(&name, &sockets);
            let listener = tokio::net::TcpListener::bind((ip.as_str(), port)).await?;
            port = listener.local_addr()?.port();
            let template = format!("{}/{{namespace}}_{{name}}/qga.sock", sockets.display());
            let sim = opts.sim_agent.as_ref().map(|o| {
                Arc::new(SimAgent::new(SimAgentOptions {
                    timeout: opts.agent_timeout,
                    seed: o.seed.wrapping_add(i as u64),
                    ..o.clone()
                }))
            });
            let (agent, backend): (Arc<dyn GuestAgent>, _) = match &sim {
                Some(sim) => (sim.clone(), "simulated"),
                None => (
                    Arc::new(QgaSocketAgent::new(template, opts.agent_timeout)),
                    "qga-socket",
                ),
            };
            let auth = opts
                .mtls
                .as_ref()
                .map(|tls| Auth::client_cert(tls.allowed_clients.clone(), None));
            // The node check is on, as in production: the controller names the node.
            let app = ShimApp::new(agent, &name).backend(backend);
            match &shim_daemonset_uid {
                Some(uid) => {
                    real::create_node_with_shim(&world.client, &name, SHIM_NAMESPACE, &ip, uid)
                        .await?
                }
                None => create_node_with_shim(&world.client, &name, SHIM_NAMESPACE, &ip).await?,
            }
            let node = LabNode {
                name,
                ip,
                sockets,
                app,
                sim,
                auth,
                process: Mutex::new(None),
            };
            world.serve_shim(&node, listener)?;
            world.nodes.push(node);
        }
        world.port = port;
        world.access.port = port;
        if opts.start_controller {
            world.start_controller();
        }
        Ok(world)
    }

    /// [`World::start`] on a runtime of its own (threads `lab-main` and `lab-worker`) that
    /// runs until the process exits: for a world shared by the `#[test]`s of a binary.
    /// Use [`World::block_on`] to run async work on it.
    pub fn start_detached(opts: WorldOptions) -> anyhow::Result<World> {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("lab-main".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("lab-worker")
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(e.into()));
                        return;
                    }
                };
                let _ = tx.send(rt.block_on(World::start(opts)));
                rt.block_on(std::future::pending::<()>());
            })?;
        rx.recv()?
    }

    /// Runs `work` on the world's runtime, from a thread outside any runtime.
    pub fn block_on<F: std::future::Future>(&self, work: F) -> F::Output {
        self.runtime.block_on(work)
    }

    /// The API server behind this world.
    pub fn control_plane(&self) -> &ControlPlane {
        &self.control_plane
    }

    /// What the API server answered the world's client (the controller's requests
    /// included), on either control plane: e.g. the 409s to a status write.
    pub fn responses(&self) -> &responses::Responses {
        &self.responses
    }

    /// The emulator, for its request counters and injected faults.
    pub fn api(&self) -> &ApiServer {
        self.control_plane
            .emulator()
            .expect("this test needs the API-server emulator (GUESTCRED_CONTROL_PLANE=emulator)")
    }

    /// The kubeconfig of a world started with `serve`.
    pub fn kubeconfig(&self) -> &Path {
        self.kubeconfig
            .as_deref()
            .expect("start the world with WorldOptions { serve: true, .. } to get a kubeconfig")
    }

    /// kubectl against this world (needs `serve`).
    pub fn kubectl(&self) -> Kubectl {
        Kubectl::new(self.kubeconfig())
    }

    fn serve_shim(&self, node: &LabNode, listener: tokio::net::TcpListener) -> anyhow::Result<()> {
        let tls = match &self.tls {
            Some(tls) => Some(server::ServeOptions::new(Arc::new(
                ReloadingServerConfig::new(tls.shim.clone())?,
            ))),
            None => None,
        };
        let app = node.app.clone();
        let auth = node.auth.clone();
        let listener = listener.into_std()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("lab-shim-{}", node.name))
            .enable_all()
            .build()?;
        rt.spawn(async move {
            let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                return;
            };
            match (tls, auth) {
                (Some(opts), Some(auth)) => {
                    let router = app.router(auth);
                    let _ =
                        server::serve_with(listener, router, opts, std::future::pending()).await;
                }
                _ => {
                    let router = app.router_without_auth_for_test_worlds();
                    let _ = serve_plain_http(listener, router, std::future::pending()).await;
                }
            }
        });
        if let Some(old) = node
            .process
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .replace(rt)
        {
            old.shutdown_background();
        }
        Ok(())
    }

    fn node(&self, node: &str) -> &LabNode {
        self.nodes
            .iter()
            .find(|n| n.name == node)
            .unwrap_or_else(|| panic!("no lab node {node}"))
    }

    /// (Re)start the controller, as after a crash: nothing survives but the API objects.
    pub fn start_controller(&mut self) {
        self.start_controller_with(Default::default());
    }

    /// (Re)start the controller with `leadership` checked before each agent call (a test
    /// can play the elector by writing the Lease itself).
    pub fn start_controller_with(&mut self, leadership: guestcred::controller::leader::Leadership) {
        let mut rx = self.shutdown.subscribe();
        let _ = self.shutdown.send(false);
        let stop = async move {
            let _ = rx.wait_for(|v| *v).await;
        };
        let setup = self.controller_setup(self.controller_name.clone(), leadership);
        self.controller = Some(
            self.runtime
                .spawn(guestcred::controller::start(setup, stop)),
        );
    }

    /// What a controller of this world starts with: this world's client, access, settings,
    /// metrics and watch, the input-key Secret in "default", and `name` and `leadership`.
    fn controller_setup(
        &self,
        name: String,
        leadership: guestcred::controller::leader::Leadership,
    ) -> guestcred::controller::Setup {
        guestcred::controller::Setup {
            client: self.client.clone(),
            access: self.access.clone(),
            name,
            settings: self.settings.clone(),
            metrics: self.metrics.clone(),
            leadership,
            input_key_secret: (
                "default".into(),
                guestcred::controller::INPUT_KEY_SECRET.into(),
            ),
            watch: self.watch.clone(),
        }
    }

    /// KubeVirt's restart subresource of this world: restarts counted, answers held,
    /// requests refused.
    pub fn kubevirt(&self) -> &HostKubevirt {
        &self.kubevirt
    }

    /// Kill the controller at once (in-flight calls are dropped, like a crash).
    pub fn kill_controller(&mut self) {
        if let Some(c) = self.controller.take() {
            c.abort();
        }
    }

    /// The controller task runs (it did not crash or exit).
    pub fn controller_alive(&self) -> bool {
        self.controller.as_ref().is_some_and(|c| !c.is_finished())
    }

    /// One leader-elected replica of the controller: it takes the lease `lease` (its
    /// identity is its name), then runs until it loses the lease or is aborted.
    pub fn spawn_replica(&self, lease: LeaseSettings) -> tokio::task::JoinHandle<()> {
        let client = self.client.clone();
        // The leadership is known once the lease is taken: the rest of the setup now.
        let setup = self.controller_setup(lease.identity.clone(), Default::default());
        self.runtime.spawn(async move {
            let Ok((lost, _elector, leadership)) = acquire(client, &lease).await else {
                return;
            };
            let setup = guestcred::controller::Setup {
                leadership,
                ..setup
            };
            guestcred::controller::start(setup, lost).await;
        })
    }

    /// Kill a node's shim process: its listener closes and calls in flight are cut off
    /// (its pod stays: the controller sees a dead shim).
    pub fn kill_shim(&self, node: &str) {
        if let Some(rt) = self
            .node(node)
            .process
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            rt.shutdown_background();
        }
    }

    /// Start a killed shim again on the same address, as the DaemonSet's restarted pod
    /// would.
    pub async fn restart_shim(&self, node: &str) {
        let n = self.node(node);
        let start = Instant::now();
        let listener = loop {
            match tokio::net::TcpListener::bind((n.ip.as_str(), self.port)).await {
                Ok(l) => break l,
                Err(e) if start.elapsed() < Duration::from_secs(10) => {
                    tracing::debug!(error = %e, "shim address still busy");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("rebinding the shim address: {e}"),
            }
        };
        self.serve_shim(n, listener).expect("the shim serves again");
    }

    /// The address node `node`'s shim listens on (its pod's IP).
    pub fn shim_ip(&self, node: &str) -> &str {
        &self.node(node).ip
    }

    /// The port every shim of this world listens on (the controller's `--shim-port`).
    pub fn shim_port(&self) -> u16 {
        self.port
    }

    /// Point node `node`'s shim pod at `ip` (where nothing may listen), as after a network
    /// partition.
    pub async fn set_shim_pod_ip(&self, node: &str, ip: &str) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), SHIM_NAMESPACE);
        pods.patch_status(
            &format!("guestcred-shim-{node}"),
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {"podIP": ip}})),
        )
        .await
        .expect("pod status");
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
        self.start_agent(vm, &opts).map(Some)
    }

    /// A VM with a real agent whose guest has user alice; fails the test if it cannot start.
    pub async fn add_guest(&self, vm: &VmDescription) -> HostQga {
        self.add_vm(vm, Some(super::testing::alice()))
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
            .expect("an agent")
    }

    /// A (new) real qemu-ga for an existing VM, as after the VM restarted.
    pub fn start_agent(
        &self,
        vm: &VmDescription,
        opts: &HostQgaOptions,
    ) -> anyhow::Result<HostQga> {
        let node = self
            .nodes
            .iter()
            .find(|n| n.name == vm.node)
            .ok_or_else(|| anyhow::anyhow!("no lab node {}", vm.node))?;
        let name = format!("{}_{}", vm.namespace, vm.name);
        HostQga::start_with(&node.sockets, &name, opts).map_err(|e: HostQgaError| {
            anyhow::anyhow!("qemu-ga for {name} must start (needs root, unshare, overlayfs, qemu-ga: scripts/install-deps.sh): {e}")
        })
    }

    /// Merge `status` into VMI `ns/vm`'s status, as KubeVirt would report a change.
    pub async fn set_vmi_status(&self, ns: &str, vm: &str, status: serde_json::Value) {
        let vmis: Api<VirtualMachineInstance> = Api::namespaced(self.client.clone(), ns);
        vmis.patch_status(
            vm,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "status": status })),
        )
        .await
        .expect("vmi status");
    }

    /// Create or update any object with server-side apply, as `kubectl apply` would.
    pub async fn apply<K>(&self, obj: &K) -> kube::Result<K>
    where
        K: Namespaced + Serialize,
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

    /// The object `ns/name`; fails the test if it cannot be read.
    pub async fn get<K>(&self, ns: &str, name: &str) -> K
    where
        K: Namespaced,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), ns);
        api.get(name)
            .await
            .unwrap_or_else(|e| panic!("get {ns}/{name}: {e}"))
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
        K: Namespaced,
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

    /// Generated passwords in namespace `ns` by VM, from the output Secrets that match the
    /// label selector `selector` (e.g. `guestcred.io/reset=gen`): (resourceVersion, value).
    pub async fn output_passwords(
        &self,
        ns: &str,
        selector: &str,
    ) -> BTreeMap<String, (String, String)> {
        self.output_secrets(ns, selector)
            .await
            .into_iter()
            .map(|s| (s.vm, (s.resource_version, s.password)))
            .collect()
    }

    /// Every generated-password Secret in namespace `ns` that matches the label selector
    /// `selector`, with its VM, resourceVersion and password.
    pub async fn output_secrets(&self, ns: &str, selector: &str) -> Vec<OutputSecret> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let list = secrets
            .list(&ListParams::default().labels(selector))
            .await
            .expect("output secrets");
        list.items
            .into_iter()
            .map(|s| OutputSecret {
                name: s.name_any(),
                vm: s
                    .labels()
                    .get("guestcred.io/vm")
                    .cloned()
                    .unwrap_or_default(),
                resource_version: s.resource_version().unwrap_or_default(),
                password: s
                    .data
                    .as_ref()
                    .and_then(|d| d.get("password"))
                    .map(|b| String::from_utf8_lossy(&b.0).to_string())
                    .unwrap_or_default(),
                sealed: s
                    .data
                    .as_ref()
                    .and_then(|d| d.get("password.age"))
                    .map(|b| String::from_utf8_lossy(&b.0).to_string()),
                stored: serde_json::to_string(&s).expect("json"),
            })
            .collect()
    }

    /// The password stored for VM `vm` by reset `reset`: asserts there is exactly one
    /// output Secret for them (one run, never a second password).
    pub async fn output_password(&self, ns: &str, reset: &str, vm: &str) -> String {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let selector = format!("guestcred.io/reset={reset},guestcred.io/vm={vm}");
        let list = secrets
            .list(&ListParams::default().labels(&selector))
            .await
            .expect("output secrets");
        assert_eq!(list.items.len(), 1, "one output Secret for {reset}/{vm}");
        let s = list.items.into_iter().next().expect("one");
        String::from_utf8(s.data.expect("data")["password"].0.clone()).expect("utf-8")
    }

    /// Guest agent calls the shims of every node finished for `operation` (e.g.
    /// `set-password`, `ssh-keys-get`), whatever their result, read from their metrics.
    pub fn agent_calls(&self, operation: &str) -> u64 {
        self.nodes
            .iter()
            .map(|n| self.agent_calls_on(&n.name, operation))
            .sum()
    }

    /// Like [`World::agent_calls`], for the shim of one node.
    pub fn agent_calls_on(&self, node: &str, operation: &str) -> u64 {
        let label = format!("operation=\"{operation}\"");
        self.nodes
            .iter()
            .filter(|n| n.name == node)
            .flat_map(|n| {
                n.app
                    .metrics()
                    .encode()
                    .lines()
                    .filter(|l| {
                        l.starts_with("guestcred_shim_agent_calls_total{") && l.contains(&label)
                    })
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                    .collect::<Vec<_>>()
            })
            .sum()
    }

    /// Everything the operator wrote that a user or a log pipeline can read: the captured
    /// logs and panic messages, the status of both kinds, Events of both APIs, and the
    /// metrics of the controller and every shim.
    ///
    /// (See [`World::agent_calls`] for counting calls.)
    pub async fn everything_visible(&self) -> String {
        let logs = self
            .logs
            .as_ref()
            .expect("start the world with WorldOptions { capture_logs: true, .. } to scan logs");
        let mut all = logs.logs();
        all.push_str(&logs.panics().join("\n"));
        // Untyped: objects a typed list could not even read (bad input) are scanned too.
        let kinds = [
            ApiResource::erase::<GuestPasswordReset>(&()),
            ApiResource::erase::<KeypairRebuild>(&()),
            ApiResource::erase::<k8s_openapi::api::events::v1::Event>(&()),
            ApiResource::erase::<k8s_openapi::api::core::v1::Event>(&()),
        ];
        for kind in &kinds {
            let api: Api<DynamicObject> = Api::all_with(self.client.clone(), kind);
            for o in api.list(&ListParams::default()).await.expect("list") {
                all.push_str(&serde_json::to_string(&o).expect("json"));
            }
        }
        for n in &self.nodes {
            all.push_str(&n.app.metrics().encode());
        }
        all.push_str(&self.metrics.encode());
        all
    }

    /// None of `secrets` appears (plaintext or base64) in [`World::everything_visible`].
    pub async fn assert_not_leaked(&self, secrets: &[&str]) {
        let all = self.everything_visible().await;
        super::testing::assert_not_leaked(
            &all,
            "logs, Events, status, metrics or panic output",
            secrets,
        );
    }

    /// Where node `node`'s shim looks for agent sockets (`<dir>/<ns>_<name>/qga.sock`), for
    /// tests that put something of their own between the shim and an agent.
    pub fn agent_socket_dir(&self, node: &str) -> Option<&std::path::Path> {
        self.nodes
            .iter()
            .find(|n| n.name == node)
            .map(|n| n.sockets.as_path())
    }

    /// The simulated agent of node `node`'s shim, in a world with
    /// [`WorldOptions::sim_agent`].
    pub fn sim_agent(&self, node: &str) -> Option<&Arc<SimAgent>> {
        self.node(node).sim.as_ref()
    }

    /// Create a VM (VM + VMI objects) whose guest is simulated by its node's [`SimAgent`].
    pub async fn add_sim_vm(&self, vm: &VmDescription) -> anyhow::Result<()> {
        let sim = self.sim_agent(&vm.node).ok_or_else(|| {
            anyhow::anyhow!(
                "node {} has no simulated agent (WorldOptions::sim_agent)",
                vm.node
            )
        })?;
        vm.create(&self.client).await?;
        sim.add_domain(&vm.namespace, &vm.name);
        Ok(())
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
            if let Some(rt) = n.process.lock().unwrap_or_else(|p| p.into_inner()).take() {
                rt.shutdown_background();
            }
        }
    }
}

/// A generated password's Secret, as [`World::output_secrets`] reads it.
#[derive(Clone, Debug)]
pub struct OutputSecret {
    pub name: String,
    pub vm: String,
    pub resource_version: String,
    /// Key `password` ("" for a sealed Secret).
    pub password: String,
    /// Key `password.age` of a sealed Secret: the armored age ciphertext.
    pub sealed: Option<String>,
    /// The whole Secret as the API server returns it (JSON), for scans.
    pub stored: String,
}
