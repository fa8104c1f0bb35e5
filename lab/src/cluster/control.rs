//! The client side of the lab: `up`, `down`, `status`, `exec`, `pause`, `resume`.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::str::FromStr;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::kubevirt_lite::{DomainObs, observe_domain, probe_agent};
use super::procs::{
    Startup, built_binary_candidates, guestcred_binary, log_tail, mounts_under, qemu_pids, signal,
    spawn_detached, stop, wait_gone,
};
use super::real::{self, ControlPlane};
use super::serve::SERVE_LOG;
use super::state::{
    AGENT_LABEL, AgentKind, CONTROLLER_NAMESPACE, LabState, NODE_LABEL, NodeState, Phase,
    ProcessInfo, SHIM_NAMESPACE, VmState, default_state_dir,
};
use super::tls::LabTls;
use super::{ClusterError, blocking};
use crate::guest::{
    ExecOutput, GuestImage, LabError, default_cache_dir, destroy_guest, guest_exec, pause_guest,
    process_alive, resume_guest,
};
use guestcred::tls::{DEFAULT_ALLOWED_CLIENT, DEFAULT_SHIM_SERVER_NAME};

/// How long `serve` may take to boot every guest (image check, libvirtds, agents).
const SERVE_READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Where shims serve /metrics, /healthz and /readyz (the chart's port), per node IP.
const SHIM_METRICS_PORT: u16 = 9090;
/// How long a shim may take to answer /healthz.
const SHIM_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Grace after SIGTERM for `serve` (it destroys guests and stops libvirtds).
const SERVE_STOP_GRACE: Duration = Duration::from_secs(60);
const PROCESS_STOP_GRACE: Duration = Duration::from_secs(10);
/// Grace for `controlplane up` (it gives each of its three children 20 s).
const CONTROLPLANE_STOP_GRACE: Duration = Duration::from_secs(70);
/// Lab guests have 128 MiB each; more than this many is surely a typo on 24 GiB.
const MAX_VMS: usize = 40;
const MAX_NODES: usize = 20;

/// A special guest for tests: `NAME:NODE[:agent=on|off|hung|old]` on the command line
/// (`NAME` may be `namespace/name`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtraVm {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub agent: AgentKind,
}

impl FromStr for ExtraVm {
    type Err = ClusterError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(':');
        let (Some(vm), Some(node)) = (parts.next(), parts.next()) else {
            return Err(ClusterError::Invalid(format!(
                "extra VM {s:?}: expected NAME:NODE[:agent=on|off|hung|old]"
            )));
        };
        let agent = match parts.next() {
            None => AgentKind::On,
            Some(opt) => match opt.strip_prefix("agent=") {
                Some(mode) => mode.parse()?,
                None => {
                    return Err(ClusterError::Invalid(format!(
                        "extra VM {s:?}: unknown option {opt:?} (expected agent=...)"
                    )));
                }
            },
        };
        if parts.next().is_some() {
            return Err(ClusterError::Invalid(format!(
                "extra VM {s:?}: too many fields"
            )));
        }
        let (namespace, name) = vm.split_once('/').unwrap_or(("default", vm));
        let node = if node.bytes().all(|b| b.is_ascii_digit()) {
            format!("node-{node}")
        } else {
            node.to_string()
        };
        Ok(ExtraVm {
            namespace: namespace.into(),
            name: name.into(),
            node,
            agent,
        })
    }
}

/// What `up` starts.
#[derive(Clone, Debug)]
pub struct UpOptions {
    pub nodes: usize,
    pub vms_per_node: usize,
    pub extra_vms: Vec<ExtraVm>,
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub with_controller: bool,
    /// Port of every shim (0: pick a free one).
    pub shim_port: u16,
    /// The `guestcred` binary (default: next to this executable, else target/debug).
    pub guestcred_bin: Option<PathBuf>,
    /// The `guestcred-lab` binary that runs `serve` (default: this executable when it is
    /// guestcred-lab, else next to it, else target/debug). Tests pass
    /// `env!("CARGO_BIN_EXE_guestcred-lab")`.
    pub lab_bin: Option<PathBuf>,
    /// Run scripts/install-deps.sh when a host tool is missing.
    pub install_deps: bool,
    /// Tie the lab to this process: once it exits, the lab goes down by itself and its
    /// state directory is deleted (tests pass `std::process::id()`).
    pub owner_pid: Option<u32>,
    /// The API server: the emulator, or a real kube-apiserver + etcd +
    /// kube-controller-manager with the chart installed by helm (see [`real`]).
    pub control_plane: ControlPlane,
    /// Controller replicas (with `with_controller`); more than one, or a real control
    /// plane, runs them with leader election on the chart's Lease.
    pub controller_replicas: usize,
    /// Namespaced mode: the controller watches only these (`--watch-namespaces`), and on a
    /// real control plane the chart is installed with them as `watchNamespaces`. Empty:
    /// every namespace.
    pub watch_namespaces: Vec<String>,
}

impl Default for UpOptions {
    fn default() -> Self {
        UpOptions {
            nodes: 2,
            vms_per_node: 2,
            extra_vms: Vec::new(),
            state_dir: default_state_dir(),
            cache_dir: default_cache_dir(),
            with_controller: false,
            shim_port: 8443,
            guestcred_bin: None,
            lab_bin: None,
            install_deps: true,
            owner_pid: None,
            control_plane: ControlPlane::Emulator,
            controller_replicas: 1,
            watch_namespaces: Vec::new(),
        }
    }
}

#[derive(Clone, Debug)]
pub enum UpOutcome {
    Started(LabState),
    /// A lab was already running in that state directory; nothing was changed.
    AlreadyUp(LabState),
}

impl UpOutcome {
    pub fn into_state(self) -> LabState {
        match self {
            UpOutcome::Started(s) | UpOutcome::AlreadyUp(s) => s,
        }
    }
}

/// `vm-<node>-<k>`: odd k are `tier=db`, even k `tier=web`.
fn plan(
    opts: &UpOptions,
    state_dir: &Path,
) -> Result<(Vec<NodeState>, Vec<VmState>), ClusterError> {
    if opts.nodes == 0 || opts.nodes > MAX_NODES {
        return Err(ClusterError::Invalid(format!(
            "{} nodes (1 to {MAX_NODES})",
            opts.nodes
        )));
    }
    let nodes: Vec<NodeState> = (1..=opts.nodes)
        .map(|i| NodeState {
            name: format!("node-{i}"),
            dir: state_dir.join(format!("node-{i}")),
            ip: format!("127.0.0.{}", 10 + i),
            libvirt_uri: None,
            libvirtd_pid: None,
            shim: None,
        })
        .collect();
    let lab_vm = |ns: &str, name: &str, node: &str, agent: AgentKind, tier: Option<&str>| {
        let mut labels = BTreeMap::from([
            (NODE_LABEL.to_string(), node.to_string()),
            (AGENT_LABEL.to_string(), agent.as_str().to_string()),
        ]);
        if let Some(tier) = tier {
            labels.insert("tier".into(), tier.into());
        }
        VmState {
            namespace: ns.into(),
            name: name.into(),
            node: node.into(),
            domain: format!("{ns}_{name}"),
            labels,
            agent,
        }
    };
    let mut vms = Vec::new();
    for i in 1..=opts.nodes {
        for k in 1..=opts.vms_per_node {
            let tier = if k % 2 == 1 { "db" } else { "web" };
            let node = format!("node-{i}");
            vms.push(lab_vm(
                "default",
                &format!("vm-{i}-{k}"),
                &node,
                AgentKind::On,
                Some(tier),
            ));
        }
    }
    for extra in &opts.extra_vms {
        if !nodes.iter().any(|n| n.name == extra.node) {
            return Err(ClusterError::Invalid(format!(
                "extra VM {}: no node {} (the lab has node-1 to node-{})",
                extra.name, extra.node, opts.nodes
            )));
        }
        vms.push(lab_vm(
            &extra.namespace,
            &extra.name,
            &extra.node,
            extra.agent,
            None,
        ));
    }
    let dns_ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    let mut seen = std::collections::BTreeSet::new();
    for vm in &vms {
        if !dns_ok(&vm.name) || !dns_ok(&vm.namespace) {
            return Err(ClusterError::Invalid(format!("VM name {}", vm.key())));
        }
        if vm.namespace != "default" {
            return Err(ClusterError::Invalid(format!(
                "VM {}: lab VMs live in namespace default",
                vm.key()
            )));
        }
        if !seen.insert(vm.key()) {
            return Err(ClusterError::Invalid(format!("VM {} twice", vm.key())));
        }
    }
    if vms.len() > MAX_VMS {
        return Err(ClusterError::Invalid(format!(
            "{} VMs (at most {MAX_VMS})",
            vms.len()
        )));
    }
    Ok((nodes, vms))
}

/// Brings the lab up (see the module docs). Returns once every guest's agent answers (or
/// its /init finished, for agent-less guests), every shim answers /healthz and, if asked
/// for, the controller runs. On failure everything started is stopped again (logs stay).
pub async fn up(opts: &UpOptions) -> Result<UpOutcome, ClusterError> {
    fs::create_dir_all(&opts.state_dir)
        .map_err(|e| ClusterError::io(format!("create {}", opts.state_dir.display()), e))?;
    let state_dir = std::path::absolute(&opts.state_dir)
        .map_err(|e| ClusterError::io("absolute state dir", e))?;
    let cache_dir = std::path::absolute(&opts.cache_dir)
        .map_err(|e| ClusterError::io("absolute cache dir", e))?;
    match LabState::load(&state_dir) {
        Ok(existing)
            if existing.phase == Phase::Ready
                && existing
                    .serve
                    .as_ref()
                    .is_some_and(|s| process_alive(s.pid)) =>
        {
            return Ok(UpOutcome::AlreadyUp(existing));
        }
        Ok(_) => {
            tracing::warn!(dir = %state_dir.display(), "cleaning up a lab that did not finish starting or died");
            down(&state_dir, false).await?;
        }
        Err(ClusterError::NotUp(_)) => {}
        Err(e) => return Err(e),
    }
    let (nodes, vms) = plan(opts, &state_dir)?;
    let guestcred = guestcred_binary(opts.guestcred_bin.as_deref())?;
    let lab_bin = lab_binary(opts.lab_bin.as_deref())?;
    if opts.install_deps {
        blocking(ensure_deps).await?;
    }
    let cache = cache_dir.clone();
    blocking(move || GuestImage::ensure(&cache).map_err(ClusterError::from)).await?;
    // A fixed shim port (the default) gets the chart's fixed metrics port; a picked one
    // (labs side by side) gets a picked metrics port too.
    let (shim_port, shim_metrics_port) = match opts.shim_port {
        0 => {
            let shim = free_port(&nodes, &[])?;
            (shim, free_port(&nodes, &[shim])?)
        }
        p => (p, SHIM_METRICS_PORT),
    };
    let tls = LabTls::new(state_dir.join("tls"));
    tls.mint()?;

    let mut state = LabState {
        version: 1,
        phase: Phase::Starting,
        state_dir: state_dir.clone(),
        cache_dir,
        kubeconfig: state_dir.join("kubeconfig"),
        tls_dir: tls.dir.clone(),
        shim_port,
        shim_metrics_port,
        shim_namespace: SHIM_NAMESPACE.into(),
        controller_namespace: CONTROLLER_NAMESPACE.into(),
        apiserver_url: None,
        serve: None,
        controller: None,
        controller_replicas: Vec::new(),
        control_plane: opts.control_plane,
        controlplane: None,
        lab_net: None,
        nodes,
        vms,
        error: None,
        owner_pid: opts.owner_pid,
        watch_namespaces: opts.watch_namespaces.clone(),
    };
    state.save()?;
    let replicas = if opts.with_controller {
        opts.controller_replicas.max(1)
    } else {
        0
    };
    let started = async {
        if opts.control_plane == ControlPlane::Real {
            start_real_control_plane(&mut state).await?;
        }
        finish_up(state, &lab_bin, &guestcred, replicas).await
    };
    match started.await {
        Ok(state) => Ok(UpOutcome::Started(state)),
        Err(e) => {
            if let Err(cleanup) = down(&state_dir, false).await {
                tracing::error!(error = %cleanup, "cleaning up after a failed up");
            }
            Err(e)
        }
    }
}

/// Builds (cached) and starts the real control plane, installs the chart's release with
/// helm and writes the ServiceAccount kubeconfigs; `<state>/kubeconfig` is the admin's.
async fn start_real_control_plane(state: &mut LabState) -> Result<(), ClusterError> {
    let (bin, took) = blocking(real::build).await?;
    eprintln!(
        "guestcred-lab: control plane build (scripts/build-controlplane.sh) took {:.1}s",
        took.as_secs_f64()
    );
    let dir = real::controlplane_dir(&state.state_dir);
    let t0 = Instant::now();
    let started = {
        let (bin, dir) = (bin.clone(), dir.clone());
        blocking(move || real::start(&bin, &dir)).await
    };
    // Recorded at once so `down` stops it even if what follows fails.
    state.controlplane = Some(started?);
    state.save()?;
    eprintln!(
        "guestcred-lab: real control plane ready in {:.1}s",
        t0.elapsed().as_secs_f64()
    );
    let admin = dir.join("admin.kubeconfig");
    fs::copy(&admin, &state.kubeconfig)
        .map_err(|e| ClusterError::io(format!("copy {}", admin.display()), e))?;
    state.apiserver_url = fs::read_to_string(dir.join("ready"))
        .ok()
        .map(|s| s.trim().to_string());
    let client = real::client_from(&admin).await?;
    real::install_crds(&client).await?;
    // The controller's namespace enforces Pod Security `restricted` (issue 18); the chart
    // creates the shim's, labelled `privileged`.
    real::ensure_namespace_enforcing(&client, &state.controller_namespace, "restricted").await?;
    let watched = state.watch_namespaces.clone();
    for ns in &watched {
        real::ensure_namespace(&client, ns).await?;
    }
    let (kc, ns, shim_ns) = (
        admin.clone(),
        state.controller_namespace.clone(),
        state.shim_namespace.clone(),
    );
    blocking(move || real::install_release(&kc, &ns, &shim_ns, &watched)).await?;
    real::write_component_kubeconfigs(
        &state.state_dir,
        &admin,
        &state.controller_namespace,
        &state.shim_namespace,
    )
    .await?;
    state.save()
}

/// Starts one more controller replica for the lab in `state_dir` (recorded in lab.json,
/// stopped by `down`). Leader election decides which replica reconciles.
pub async fn start_controller_replica(
    state_dir: &Path,
    guestcred_bin: Option<&Path>,
) -> Result<ProcessInfo, ClusterError> {
    let mut state = LabState::load(state_dir)?;
    let guestcred = guestcred_binary(guestcred_bin)?;
    let index = 1 + usize::from(state.controller.is_some()) + state.controller_replicas.len();
    let replica = spawn_controller(&state, &guestcred, index, true)?;
    state.controller_replicas.push(replica.clone());
    state.save()?;
    Ok(replica)
}

/// The controller as the chart runs it: on a real control plane with the controller
/// ServiceAccount's kubeconfig, with leader election on the chart's Lease when asked.
fn spawn_controller(
    state: &LabState,
    guestcred: &Path,
    index: usize,
    leader_election: bool,
) -> Result<ProcessInfo, ClusterError> {
    let controller_tls = state.tls().controller();
    let kubeconfig = match state.control_plane {
        ControlPlane::Real => real::sa_kubeconfig(&state.state_dir, "controller"),
        ControlPlane::Emulator => state.kubeconfig.clone(),
    };
    let identity = format!("guestcred-controller-lab-{index}");
    let mut cmd = Command::new(guestcred);
    cmd.arg("controller")
        .arg("--shim-namespace")
        .arg(&state.shim_namespace)
        .arg("--shim-port")
        .arg(state.shim_port.to_string())
        .args(controller_tls.controller_flags())
        .arg("--shim-server-name")
        .arg(DEFAULT_SHIM_SERVER_NAME)
        .env("KUBECONFIG", &kubeconfig);
    if !state.watch_namespaces.is_empty() {
        cmd.arg(format!(
            "--watch-namespaces={}",
            state.watch_namespaces.join(",")
        ));
    }
    if leader_election || state.control_plane == ControlPlane::Real {
        // As the chart's Deployment sets them: Event instance and Lease identity.
        cmd.env("POD_NAME", &identity)
            .env("POD_NAMESPACE", &state.controller_namespace);
    }
    cmd.envs(crate::DEPLOYED_CONTROLLER_ENV.iter().copied());
    if index > 1 {
        // The first replica keeps the default metrics address; others would collide.
        cmd.arg("--metrics-listen=");
    }
    if leader_election {
        cmd.arg("--leader-election=true")
            .arg("--lease-name")
            .arg(real::LEASE_NAME)
            .arg("--lease-namespace")
            .arg(&state.controller_namespace);
    }
    let log = if index == 1 {
        state.state_dir.join("controller.log")
    } else {
        state.state_dir.join(format!("controller-{index}.log"))
    };
    spawn_detached(cmd, &log)
}

async fn finish_up(
    state: LabState,
    lab_bin: &Path,
    guestcred: &Path,
    controller_replicas: usize,
) -> Result<LabState, ClusterError> {
    let dir = state.state_dir.clone();
    let mut cmd = Command::new(lab_bin);
    cmd.arg("serve").arg("--state-dir").arg(&dir);
    let serve_log = dir.join(SERVE_LOG);
    let serve = spawn_detached(cmd, &serve_log)?;
    let mut state = wait_for_serve(&dir, &serve).await?;
    // serve records itself; keep our view in case it could not.
    state.serve.get_or_insert(serve);

    let shim_tls = state.tls().shim();
    for i in 0..state.nodes.len() {
        let node = &state.nodes[i];
        let uri = node.libvirt_uri.clone().ok_or_else(|| {
            ClusterError::Failed(format!("serve recorded no libvirtd for {}", node.name))
        })?;
        let mut cmd = Command::new(guestcred);
        cmd.arg("shim")
            .arg("--listen")
            .arg(format!("{}:{}", node.ip, state.shim_port))
            .args(["--backend", "libvirt", "--locator", "libvirt-uri"])
            .arg("--libvirt-uri")
            .arg(&uri)
            .arg("--node-name")
            .arg(&node.name)
            .arg("--metrics-listen")
            .arg(format!("{}:{}", node.ip, state.shim_metrics_port))
            .args(shim_tls.shim_flags())
            .arg("--allowed-client")
            .arg(DEFAULT_ALLOWED_CLIENT);
        if state.control_plane == ControlPlane::Real {
            // The chart's shim ServiceAccount (no RBAC; the shim never calls the API).
            cmd.env("KUBECONFIG", real::sa_kubeconfig(&state.state_dir, "shim"));
        }
        let log = dir.join(format!("shim-{}.log", node.name));
        let shim = spawn_detached(cmd, &log)?;
        state.nodes[i].shim = Some(shim);
        // Recorded at once so `down` stops it even if it never gets healthy.
        state.save()?;
    }
    for node in &state.nodes {
        if let Some(shim) = &node.shim {
            wait_healthy(&format!("{}:{}", node.ip, state.shim_metrics_port), shim).await?;
        }
    }
    let leader_election = controller_replicas > 1 || state.control_plane == ControlPlane::Real;
    for index in 1..=controller_replicas {
        let controller = spawn_controller(&state, guestcred, index, leader_election)?;
        if index == 1 {
            state.controller = Some(controller.clone());
        } else {
            state.controller_replicas.push(controller.clone());
        }
        state.save()?;
        // It has nothing to report readiness on; make sure it did not die on start.
        tokio::time::sleep(Duration::from_millis(500)).await;
        if !process_alive(controller.pid) {
            return Err(controller.exited("the controller exited at once"));
        }
    }
    state.phase = Phase::Ready;
    state.save()?;
    Ok(state)
}

async fn wait_for_serve(dir: &Path, serve: &ProcessInfo) -> Result<LabState, ClusterError> {
    let startup = Startup::new(serve, SERVE_READY_TIMEOUT);
    loop {
        let state = LabState::load(dir)?;
        match state.phase {
            Phase::GuestsReady => return Ok(state),
            Phase::Failed => {
                return Err(ClusterError::Failed(format!(
                    "the lab could not start: {}\n{} (tail):\n{}",
                    state.error.unwrap_or_default(),
                    serve.log.display(),
                    log_tail(&serve.log, 30)
                )));
            }
            _ => {}
        }
        startup.check("guestcred-lab serve exited during start", || {
            format!("the lab's guests (see {})", serve.log.display())
        })?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn healthz(address: &str) -> bool {
    let Ok(client) = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
    else {
        return false;
    };
    client
        .get(format!("http://{address}/healthz"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
}

async fn wait_healthy(address: &str, shim: &ProcessInfo) -> Result<(), ClusterError> {
    let startup = Startup::new(shim, SHIM_READY_TIMEOUT);
    while !healthz(address).await {
        startup.check(&format!("the shim on {address} exited"), || {
            format!("the shim on {address} to answer /healthz")
        })?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// A port free on every node address (so all shims can share it, as the controller's
/// `--shim-port` expects), other than `taken`.
fn free_port(nodes: &[NodeState], taken: &[u16]) -> Result<u16, ClusterError> {
    for _ in 0..20 {
        let first = nodes.first().map(|n| n.ip.as_str()).unwrap_or("127.0.0.1");
        let probe = std::net::TcpListener::bind((first, 0))
            .map_err(|e| ClusterError::io(format!("bind {first}"), e))?;
        let port = probe
            .local_addr()
            .map_err(|e| ClusterError::io("probe address", e))?
            .port();
        let all_free = !taken.contains(&port)
            && nodes
                .iter()
                .skip(1)
                .all(|n| std::net::TcpListener::bind((n.ip.as_str(), port)).is_ok());
        if all_free {
            return Ok(port);
        }
    }
    Err(ClusterError::Failed(
        "no port is free on every node address".into(),
    ))
}

/// The `guestcred-lab` binary: `explicit`, else this executable if it is the lab, else
/// next to it (tests run from target/debug/deps), else the workspace's target/debug.
pub fn lab_binary(explicit: Option<&Path>) -> Result<PathBuf, ClusterError> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().map_err(|e| ClusterError::io("current executable", e))?;
    if exe.file_name().is_some_and(|n| n == "guestcred-lab") {
        return Ok(exe);
    }
    built_binary_candidates("guestcred-lab", Some(&exe))
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| ClusterError::Missing {
            what: "the guestcred-lab binary".into(),
            hint: "run `cargo build --workspace --bins` or set UpOptions::lab_bin".into(),
        })
}

/// Runs scripts/install-deps.sh when a host tool the lab needs is missing.
fn ensure_deps() -> Result<(), ClusterError> {
    let tools = [
        "libvirtd",
        "qemu-system-x86_64",
        "qemu-ga",
        "busybox",
        "unshare",
        "chpasswd",
    ];
    let path = std::env::var_os("PATH").unwrap_or_default();
    let has = |tool: &str| {
        std::env::split_paths(&path)
            .chain(["/usr/sbin".into(), "/sbin".into(), "/bin".into()])
            .any(|dir| dir.join(tool).is_file())
    };
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !has(t)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let script = crate::repo_dir().join("scripts/install-deps.sh");
    tracing::info!(missing = ?missing, script = %script.display(), "installing lab dependencies");
    let status = Command::new("bash")
        .arg(&script)
        .stdout(std::process::Stdio::inherit())
        .status()
        .map_err(|e| ClusterError::io(format!("run {}", script.display()), e))?;
    if !status.success() {
        return Err(ClusterError::Missing {
            what: missing.join(", "),
            hint: format!("{} failed ({status}); run it as root", script.display()),
        });
    }
    Ok(())
}

/// What `down` did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DownReport {
    /// Whether there was a lab to stop.
    pub was_up: bool,
    pub stopped: Vec<String>,
}

/// Stops everything the lab recorded (controller, shims, guests, serve with its
/// libvirtds), checks that no recorded process, QEMU or private mount is left, and removes
/// the run state: the whole state directory with `remove_all`, else only lab.json, the
/// kubeconfig and the certificates (logs stay for debugging). Leftovers are an error and keep
/// lab.json, so `down` can be retried.
pub async fn down(state_dir: &Path, remove_all: bool) -> Result<DownReport, ClusterError> {
    let state = match LabState::load(state_dir) {
        Ok(s) => s,
        Err(ClusterError::NotUp(_)) => return Ok(DownReport::default()),
        Err(e) => return Err(e),
    };
    let state_for_stop = state.clone();
    let (stopped, leftovers) =
        blocking(move || Ok::<_, ClusterError>(stop_everything(&state_for_stop))).await?;
    if !leftovers.is_empty() {
        return Err(ClusterError::Leftovers(leftovers));
    }
    if remove_all {
        fs::remove_dir_all(&state.state_dir)
            .map_err(|e| ClusterError::io(format!("remove {}", state.state_dir.display()), e))?;
    } else {
        for path in [LabState::path(&state.state_dir), state.kubeconfig.clone()] {
            let _ = fs::remove_file(path);
        }
        // An old lab.json has no tls_dir: never remove the state dir itself by accident.
        if !state.tls_dir.as_os_str().is_empty() && state.tls_dir != state.state_dir {
            let _ = fs::remove_dir_all(&state.tls_dir);
        }
    }
    Ok(DownReport {
        was_up: true,
        stopped,
    })
}

/// What `down` stopped and what survived.
#[derive(Default)]
struct Tally {
    stopped: Vec<String>,
    leftovers: Vec<String>,
}

impl Tally {
    fn stop(&mut self, what: String, pid: u32, grace: Duration) {
        if !process_alive(pid) {
            return;
        }
        if stop(pid, grace) {
            self.stopped.push(format!("{what} (pid {pid})"));
        } else {
            self.leftovers
                .push(format!("{what} (pid {pid}) still running"));
        }
    }
}

/// Blocking: stops in dependency order and returns (what was stopped, what is left).
fn stop_everything(state: &LabState) -> (Vec<String>, Vec<String>) {
    let mut t = Tally::default();
    if let Some(c) = &state.controller {
        t.stop("controller".into(), c.pid, PROCESS_STOP_GRACE);
    }
    for (i, c) in state.controller_replicas.iter().enumerate() {
        t.stop(
            format!("controller replica {}", i + 2),
            c.pid,
            PROCESS_STOP_GRACE,
        );
    }
    for node in &state.nodes {
        if let Some(s) = &node.shim {
            t.stop(format!("shim {}", node.name), s.pid, PROCESS_STOP_GRACE);
        }
    }
    // Guests first: QEMU lives in libvirtd's namespace with ppid 1.
    let serve_alive = state.serve.as_ref().is_some_and(|s| process_alive(s.pid));
    for vm in &state.vms {
        let Some(uri) = state.node(&vm.node).and_then(|n| n.libvirt_uri.clone()) else {
            continue;
        };
        let libvirtd_alive = state
            .node(&vm.node)
            .and_then(|n| n.libvirtd_pid)
            .is_some_and(process_alive);
        if libvirtd_alive && serve_alive && destroy_guest(&uri, &vm.domain).is_ok() {
            t.stopped.push(format!("guest {}", vm.key()));
        }
    }
    if let Some(s) = &state.serve {
        t.stop("serve".into(), s.pid, SERVE_STOP_GRACE);
    }
    if let Some(cp) = &state.controlplane {
        // `controlplane up` stops its children in reverse order (20 s grace each).
        t.stop("real control plane".into(), cp.pid, CONTROLPLANE_STOP_GRACE);
    }
    if let Some(net) = &state.lab_net {
        net.remove();
        if net.exists() {
            t.leftovers.push(format!(
                "network namespace {} / link {}",
                net.netns, net.host_if
            ));
        }
    }
    // With serve gone, each libvirtd's watchdog stops it; give them time, then insist.
    for node in &state.nodes {
        if let Some(pid) = node.libvirtd_pid
            && process_alive(pid)
            && !wait_gone(pid, Duration::from_secs(30))
        {
            t.stop(format!("libvirtd {}", node.name), pid, PROCESS_STOP_GRACE);
        }
        for pid in qemu_pids(&node.dir) {
            if process_alive(pid) {
                signal(pid, "KILL");
                if wait_gone(pid, Duration::from_secs(5)) {
                    t.stopped.push(format!("qemu {pid} on {}", node.name));
                } else {
                    t.leftovers
                        .push(format!("qemu {pid} on {} still running", node.name));
                }
            }
        }
    }
    for (what, pid) in state.recorded_pids() {
        if process_alive(pid)
            && !t
                .leftovers
                .iter()
                .any(|l| l.contains(&format!("pid {pid}")))
        {
            t.leftovers
                .push(format!("{what} (pid {pid}) still running"));
        }
    }
    // A namespace lingers while any process is in it; wait briefly for exits to settle.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut mounts = mounts_under(&state.state_dir);
    while !mounts.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        mounts = mounts_under(&state.state_dir);
    }
    t.leftovers
        .extend(mounts.into_iter().map(|m| format!("mount {m}")));
    (t.stopped, t.leftovers)
}

/// One node as `status` sees it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub libvirt_uri: Option<String>,
    pub libvirtd_running: bool,
    /// The shim's API (HTTPS, mutual TLS).
    pub shim_address: String,
    /// The shim's plain-HTTP /metrics, /healthz and /readyz.
    #[serde(default)]
    pub shim_metrics_address: String,
    pub shim_running: bool,
    /// The shim answered GET /healthz on its metrics port.
    pub shim_healthy: bool,
}

/// One guest as `status` sees it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GuestStatus {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub domain: String,
    pub agent_mode: AgentKind,
    /// `running`, `paused`, `missing`, `shutoff`, ... or `unknown` (libvirtd unreachable).
    pub domain_state: String,
    /// guest-ping answered.
    pub agent_connected: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LabStatus {
    pub phase: Phase,
    pub kubeconfig: PathBuf,
    pub apiserver_url: Option<String>,
    pub serve_running: bool,
    /// None when the lab runs without a controller.
    pub controller_running: Option<bool>,
    pub nodes: Vec<NodeStatus>,
    pub vms: Vec<GuestStatus>,
}

impl LabStatus {
    /// `export KUBECONFIG=...`, for a shell to eval.
    pub fn export_line(&self) -> String {
        format!("export KUBECONFIG={}", self.kubeconfig.display())
    }
}

/// Observes the lab: processes, shim health, domain states and a guest-ping per guest
/// (each bounded, all at once).
pub async fn status(state_dir: &Path) -> Result<LabStatus, ClusterError> {
    let state = LabState::load(state_dir)?;
    let mut nodes = Vec::new();
    for node in &state.nodes {
        let address = format!("{}:{}", node.ip, state.shim_port);
        let metrics_address = format!("{}:{}", node.ip, state.shim_metrics_port);
        let shim_running = node.shim.as_ref().is_some_and(|s| process_alive(s.pid));
        nodes.push(NodeStatus {
            name: node.name.clone(),
            libvirt_uri: node.libvirt_uri.clone(),
            libvirtd_running: node.libvirtd_pid.is_some_and(process_alive),
            shim_healthy: shim_running && healthz(&metrics_address).await,
            shim_address: address,
            shim_metrics_address: metrics_address,
            shim_running,
        });
    }
    let probes = state.vms.iter().map(|vm| {
        let uri = state.uri_of(vm).ok();
        let vm = vm.clone();
        async move {
            let (domain_state, agent_connected) = match uri {
                Some(uri) => observe(uri, vm.domain.clone()).await,
                None => ("unknown".to_string(), false),
            };
            GuestStatus {
                namespace: vm.namespace,
                name: vm.name,
                node: vm.node,
                domain: vm.domain,
                agent_mode: vm.agent,
                domain_state,
                agent_connected,
            }
        }
    });
    let vms = futures::future::join_all(probes).await;
    Ok(LabStatus {
        phase: state.phase,
        kubeconfig: state.kubeconfig.clone(),
        apiserver_url: state.apiserver_url.clone(),
        serve_running: state.serve.as_ref().is_some_and(|s| process_alive(s.pid)),
        controller_running: state.controller.as_ref().map(|c| process_alive(c.pid)),
        nodes,
        vms,
    })
}

/// (domain state, agent answered), each bounded so a hung agent cannot stall `status`.
async fn observe(uri: String, domain: String) -> (String, bool) {
    let bound = Duration::from_secs(4);
    let (u, d) = (uri.clone(), domain.clone());
    let state = tokio::time::timeout(
        bound,
        tokio::task::spawn_blocking(move || observe_domain(&u, &d)),
    )
    .await;
    let state = match state {
        Ok(Ok(Ok(DomainObs::Running))) => "running".to_string(),
        Ok(Ok(Ok(DomainObs::Paused))) => "paused".to_string(),
        Ok(Ok(Ok(DomainObs::Missing))) => "missing".to_string(),
        Ok(Ok(Ok(DomainObs::Stopped(s)))) => s.to_lowercase(),
        _ => "unknown".to_string(),
    };
    if state != "running" {
        return (state, false);
    }
    let agent = tokio::time::timeout(
        bound,
        tokio::task::spawn_blocking(move || probe_agent(&uri, &domain, false)),
    )
    .await;
    (state, matches!(agent, Ok(Ok(Ok(_)))))
}

/// Runs `argv` in a lab guest through the agent (guest-exec).
pub async fn exec(state_dir: &Path, vm: &str, argv: &[String]) -> Result<ExecOutput, ClusterError> {
    let state = LabState::load(state_dir)?;
    let vm = state.find_vm(vm)?;
    let uri = state.uri_of(vm)?;
    let domain = vm.domain.clone();
    let argv = argv.to_vec();
    blocking(move || {
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        guest_exec(&uri, &domain, &args).map_err(ClusterError::from)
    })
    .await
}

/// Pauses a lab guest's domain (kubevirt-lite then shows the VMI as Paused).
pub async fn pause(state_dir: &Path, vm: &str) -> Result<(), ClusterError> {
    domain_op(state_dir, vm, pause_guest).await
}

/// Resumes a paused lab guest.
pub async fn resume(state_dir: &Path, vm: &str) -> Result<(), ClusterError> {
    domain_op(state_dir, vm, resume_guest).await
}

async fn domain_op(
    state_dir: &Path,
    vm: &str,
    op: fn(&str, &str) -> Result<(), LabError>,
) -> Result<(), ClusterError> {
    let state = LabState::load(state_dir)?;
    let vm = state.find_vm(vm)?;
    let uri = state.uri_of(vm)?;
    let domain = vm.domain.clone();
    blocking(move || op(&uri, &domain).map_err(ClusterError::from)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(nodes: usize, per_node: usize, extra: &[&str]) -> UpOptions {
        UpOptions {
            nodes,
            vms_per_node: per_node,
            extra_vms: extra
                .iter()
                .map(|e| e.parse().expect("valid extra VM"))
                .collect(),
            ..UpOptions::default()
        }
    }

    #[test]
    fn the_default_plan_is_two_nodes_with_two_vms_each_on_their_own_addresses() {
        let (nodes, vms) = plan(&options(2, 2, &[]), Path::new("/s")).expect("valid plan");
        let names: Vec<String> = vms.iter().map(VmState::key).collect();
        assert_eq!(
            names,
            [
                "default/vm-1-1",
                "default/vm-1-2",
                "default/vm-2-1",
                "default/vm-2-2"
            ]
        );
        assert_eq!(nodes[0].ip, "127.0.0.11");
        assert_eq!(nodes[1].ip, "127.0.0.12");
        assert_eq!(vms[2].domain, "default_vm-2-1");
        assert_eq!(
            vms[2].labels.get(NODE_LABEL).map(String::as_str),
            Some("node-2")
        );
    }

    #[test]
    fn odd_vms_are_db_and_even_vms_are_web() {
        let (_, vms) = plan(&options(1, 2, &[]), Path::new("/s")).expect("valid plan");
        assert_eq!(vms[0].labels.get("tier").map(String::as_str), Some("db"));
        assert_eq!(vms[1].labels.get("tier").map(String::as_str), Some("web"));
    }

    #[test]
    fn an_extra_vm_parses_name_node_and_agent_mode() {
        let extra: ExtraVm = "vm-hung:2:agent=hung".parse().expect("valid");
        assert_eq!(extra.name, "vm-hung");
        assert_eq!(extra.node, "node-2");
        assert_eq!(extra.agent, AgentKind::Hung);
        assert_eq!(
            "vm-x:node-1".parse::<ExtraVm>().map(|e| e.agent).ok(),
            Some(AgentKind::On)
        );
    }

    #[test]
    fn an_extra_vm_with_an_unknown_option_is_rejected() {
        assert!("vm-x:node-1:agents=off".parse::<ExtraVm>().is_err());
        assert!("vm-x".parse::<ExtraVm>().is_err());
    }

    #[test]
    fn an_extra_vm_on_a_node_the_lab_lacks_is_rejected() {
        let err = plan(&options(1, 1, &["vm-x:node-3:agent=off"]), Path::new("/s"))
            .expect_err("node-3 does not exist");
        assert!(err.to_string().contains("node-3"), "{err}");
    }

    #[test]
    fn an_extra_vm_named_like_a_regular_one_is_rejected() {
        assert!(plan(&options(1, 1, &["vm-1-1:node-1"]), Path::new("/s")).is_err());
    }

    #[test]
    fn extra_vms_carry_their_agent_mode_as_a_label() {
        let (_, vms) = plan(
            &options(1, 0, &["vm-old:node-1:agent=old"]),
            Path::new("/s"),
        )
        .expect("valid plan");
        assert_eq!(
            vms[0].labels.get(AGENT_LABEL).map(String::as_str),
            Some("old")
        );
        assert!(!vms[0].labels.contains_key("tier"));
    }

    fn lab_nodes(count: usize) -> Vec<NodeState> {
        plan(&options(count, 0, &[]), Path::new("/s"))
            .expect("valid plan")
            .0
    }

    #[test]
    fn a_picked_metrics_port_differs_from_the_picked_shim_port() {
        let nodes = lab_nodes(2);
        let shim = free_port(&nodes, &[]).expect("a free port");
        let metrics = free_port(&nodes, &[shim]).expect("another free port");
        assert_ne!(shim, metrics);
    }
}
