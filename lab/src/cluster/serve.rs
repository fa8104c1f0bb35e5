//! `guestcred-lab serve`: the API-server emulator plus kubevirt-lite in one process, which
//! also owns the nodes' libvirtds (their watchdogs clean up if this process dies).
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::Namespace;
use kube::Api;
use kube::api::PostParams;

use super::kubevirt_lite::{CONSOLE_READY, Lite, LiteNode, guest_spec, initial_keys};
use super::real::{self, ControlPlane, LabNet};
use super::state::{AgentKind, LabState, Phase, ProcessInfo};
use super::{ClusterError, blocking, procs};
use crate::apiserver::{ApiServer, write_kubeconfig};
use crate::guest::{GuestImage, Libvirtd, process_alive, wait_for_agent, wait_for_console};
use crate::kubevirt::{create_node_with_shim, install_crds};

/// Agents of a handful of guests booting at once under TCG on two cores: ~10-40 s.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// Log file of the serve process inside the state directory.
pub const SERVE_LOG: &str = "serve.log";

/// Runs until SIGTERM/SIGINT, then stops the guests and libvirtds. On a failed start it
/// records the reason in lab.json (phase `Failed`) for `up` to report.
pub async fn run(state_dir: &Path) -> Result<(), ClusterError> {
    let mut state = LabState::load(state_dir)?;
    state.serve = Some(ProcessInfo {
        pid: std::process::id(),
        log: state.state_dir.join(SERVE_LOG),
    });
    let mut nodes: Vec<Arc<LiteNode>> = Vec::new();
    let (lite, api_task) = match start(&mut state, &mut nodes).await {
        Ok(started) => started,
        Err(e) => {
            tracing::error!(error = %e, "lab start failed");
            state.phase = Phase::Failed;
            state.error = Some(e.to_string());
            let _ = state.save();
            stop_nodes(&nodes).await;
            return Err(e);
        }
    };
    let pollers = lite.spawn_pollers();
    tracing::info!(owner = ?state.owner_pid, "lab up; waiting for SIGTERM");
    let owner_gone = tokio::select! {
        () = wait_for_stop_signal() => false,
        () = wait_for_exit(state.owner_pid) => true,
    };
    tracing::info!(owner_gone, "stopping the lab");
    for poller in pollers {
        poller.abort();
    }
    api_task.abort();
    if let Some(net) = &state.lab_net {
        net.remove();
    }
    if owner_gone {
        // Nobody will run `down`: stop what `up` started too.
        let recorded = LabState::load(state_dir).unwrap_or(state);
        let _ = tokio::task::spawn_blocking(move || {
            let pids = recorded
                .controller
                .iter()
                .chain(&recorded.controller_replicas)
                .chain(recorded.nodes.iter().filter_map(|n| n.shim.as_ref()))
                .map(|p| p.pid);
            for pid in pids {
                procs::stop(pid, Duration::from_secs(10));
            }
            if let Some(cp) = &recorded.controlplane {
                procs::stop(cp.pid, Duration::from_secs(70));
            }
        })
        .await;
    }
    stop_nodes(&nodes).await;
    if owner_gone && let Err(e) = std::fs::remove_dir_all(state_dir) {
        tracing::warn!(error = %e, "removing the state directory");
    }
    Ok(())
}

/// Resolves once `pid` has exited; never without a pid.
async fn wait_for_exit(pid: Option<u32>) {
    let Some(pid) = pid else {
        return std::future::pending().await;
    };
    while process_alive(pid) {
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The API server `serve` talks to: the emulator it runs itself (served once the guests
/// are up), or the real control plane `up` started (CRDs and the chart's release are
/// installed already).
enum Server {
    Emulator(ApiServer, tokio::net::TcpListener),
    Real,
}

async fn start(
    state: &mut LabState,
    nodes: &mut Vec<Arc<LiteNode>>,
) -> Result<(Arc<Lite>, tokio::task::JoinHandle<()>), ClusterError> {
    let (server, client) = match state.control_plane {
        ControlPlane::Emulator => {
            let api = ApiServer::new();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .map_err(|e| ClusterError::io("bind the API server on 127.0.0.1", e))?;
            let addr = listener
                .local_addr()
                .map_err(|e| ClusterError::io("API server address", e))?;
            let url = format!("http://{addr}");
            write_kubeconfig(&state.kubeconfig, &url).map_err(|e| {
                ClusterError::io(format!("write {}", state.kubeconfig.display()), e)
            })?;
            state.apiserver_url = Some(url);
            let client = api.client();
            install_crds(&client).await?;
            (Server::Emulator(api, listener), client)
        }
        ControlPlane::Real => (Server::Real, real::client_from(&state.kubeconfig).await?),
    };
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for name in [&state.controller_namespace, &state.shim_namespace] {
        let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))
            .map_err(|e| ClusterError::Failed(format!("namespace object: {e}")))?;
        match namespaces.create(&PostParams::default(), &ns).await {
            Ok(_) => {}
            // The lab (controller's, labelled restricted) and helm (the shim's) made them
            // (real control plane).
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }

    let cache = state.cache_dir.clone();
    let image = blocking(move || GuestImage::ensure(&cache).map_err(ClusterError::from)).await?;

    // The libvirtds start side by side (each probes QEMU's capabilities once).
    let starts: Vec<_> = state
        .nodes
        .iter()
        .map(|n| {
            let (dir, cache) = (n.dir.clone(), state.cache_dir.clone());
            blocking(move || Libvirtd::start(&dir, &cache).map_err(ClusterError::from))
        })
        .collect();
    let mut first_error = None;
    for (node, started) in state
        .nodes
        .iter_mut()
        .zip(futures::future::join_all(starts).await)
    {
        match started {
            Ok(libvirtd) => {
                node.libvirt_uri = Some(libvirtd.uri());
                node.libvirtd_pid = Some(libvirtd.pid());
                nodes.push(Arc::new(LiteNode {
                    name: node.name.clone(),
                    uri: libvirtd.uri(),
                    vm_dir: node.vm_dir(),
                    libvirtd: Mutex::new(Some(libvirtd)),
                }));
            }
            Err(e) => {
                first_error.get_or_insert(ClusterError::Failed(format!(
                    "libvirtd for {}: {e}",
                    node.name
                )));
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    // Recorded now, so `down` finds the libvirtds even if booting fails below.
    state.save()?;

    boot_guests(state, nodes, &image).await?;

    for node in &state.nodes {
        match state.control_plane {
            ControlPlane::Emulator => {
                create_node_with_shim(&client, &node.name, &state.shim_namespace, &node.ip).await?
            }
            ControlPlane::Real => {
                real::create_node_with_shim(&client, &node.name, &state.shim_namespace, &node.ip)
                    .await?
            }
        }
    }
    let lite = Arc::new(Lite::new(client.clone(), image, nodes, &state.vms)?);
    lite.create_objects().await?;
    let extra = lite.router();
    let api_task = match server {
        Server::Emulator(api, listener) => tokio::spawn(async move {
            if let Err(e) = api.serve(listener, extra).await {
                tracing::error!(error = %e, "the API-server emulator stopped");
            }
        }),
        Server::Real => {
            let net = LabNet::for_state_dir(&state.state_dir);
            // Recorded before it exists, so `down` removes it even if creating fails.
            state.lab_net = Some(net.clone());
            state.save()?;
            let created = net.clone();
            tokio::task::spawn_blocking(move || created.create())
                .await
                .map_err(|e| ClusterError::Failed(format!("lab net worker: {e}")))??;
            let restart = real::serve_restart_api(&client, net, extra).await?;
            tracing::info!(port = restart.port, ip = %restart.net.host_ip, "aggregated restart API available");
            restart.task
        }
    };
    state.phase = Phase::GuestsReady;
    state.save()?;
    Ok((lite, api_task))
}

/// Starts every guest, then waits for all of them together: agents for guests that have
/// one, /init's ready line on the console for the others.
async fn boot_guests(
    state: &LabState,
    nodes: &[Arc<LiteNode>],
    image: &GuestImage,
) -> Result<(), ClusterError> {
    let node_of = |name: &str| {
        nodes
            .iter()
            .find(|n| n.name == name)
            .cloned()
            .ok_or_else(|| ClusterError::Invalid(format!("no node {name}")))
    };
    for vm in &state.vms {
        let node = node_of(&vm.node)?;
        let spec = guest_spec(vm, initial_keys());
        let image = image.clone();
        blocking(move || node.start_guest(&image, &spec).map_err(ClusterError::from)).await?;
    }
    let mut waits = Vec::new();
    for vm in &state.vms {
        let node = node_of(&vm.node)?;
        let (domain, agent) = (vm.domain.clone(), vm.agent);
        waits.push(blocking(move || {
            match agent {
                AgentKind::On | AgentKind::Old => wait_for_agent(&node.uri, &domain, BOOT_TIMEOUT),
                AgentKind::Off | AgentKind::Hung => {
                    wait_for_console(&node.vm_dir, &domain, CONSOLE_READY, BOOT_TIMEOUT)
                }
            }
            .map_err(ClusterError::from)
        }));
    }
    for result in futures::future::join_all(waits).await {
        result?;
    }
    Ok(())
}

async fn stop_nodes(nodes: &[Arc<LiteNode>]) {
    let stops = nodes.iter().map(|node| {
        let node = node.clone();
        tokio::task::spawn_blocking(move || {
            let taken = node
                .libvirtd
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .take();
            if let Some(libvirtd) = taken
                && let Err(e) = libvirtd.stop()
            {
                tracing::warn!(node = %node.name, error = %e, "stopping libvirtd");
            }
        })
    });
    futures::future::join_all(stops).await;
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {},
                _ = int.recv() => {},
            }
        }
        _ => {
            tracing::warn!("cannot install signal handlers; stopping on Ctrl-C only");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
