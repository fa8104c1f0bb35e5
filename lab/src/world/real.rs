//! A real control plane under a [`World`](super::World) (`GUESTCRED_CONTROL_PLANE=real`):
//! kube-apiserver + etcd + kube-controller-manager of `lab/controlplane` (built, cached, by
//! scripts/build-controlplane.sh), started for the world and gone with it.
//!
//! One per world: a test binary that shares its world between its tests (bad_input,
//! examples, conflicts) starts one control plane (3-5 s) for all of them. The control
//! plane is started with `--owner-pid <this process> --remove-dir`, so it stops and its
//! directory (etcd data, PKI, audit log) goes when the test process ends, also for the
//! `static` worlds that are never dropped.
//!
//! What the world does differently on it:
//! - it talks to the API server as the admin (system:masters): the chart's RBAC is proven
//!   by tests/real_control_plane.rs, which runs the controller as the chart's
//!   ServiceAccount; the world's controller is in-process;
//! - the shim pods are owned by a real (inert: no DaemonSet controller runs) DaemonSet,
//!   since the real garbage collector deletes pods whose owner does not exist;
//! - KubeVirt's `restart` subresource (HostKubevirt) is an aggregated API served on a veth
//!   of a network namespace of its own (`gcw-<pid>-<n>`; the API server refuses loopback
//!   endpoints), as `guestcred-lab up --control-plane real` does. Namespaces left by test
//!   processes that are gone are removed when the next world starts.
use super::responses::Responses;
use crate::cluster::procs::{self, ProcessInfo};
use crate::cluster::real::{self as cp, LabNet, RestartApi};
use crate::guest::process_alive;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Network namespaces of world control planes: `gcw-<pid>-<n>`.
const NETNS_PREFIX: &str = "gcw-";
/// Control plane directories under the temp dir: `gcw-cp-<pid>-<n>`.
const DIR_PREFIX: &str = "gcw-cp-";

pub struct RealControlPlane {
    process: ProcessInfo,
    kubeconfig: PathBuf,
    dir: PathBuf,
    net: LabNet,
    restart: Option<RestartApi>,
}

impl RealControlPlane {
    /// Builds (cached) and starts a control plane of this process's own, and the lab net
    /// for its aggregated API; returns it with an admin client.
    pub async fn start(responses: &Responses) -> anyhow::Result<(Self, Client)> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        let t0 = Instant::now();
        let (process, dir, net) = tokio::task::spawn_blocking(move || {
            remove_leftovers();
            let (bin, _) = cp::build()?;
            let dir = std::env::temp_dir().join(format!("{DIR_PREFIX}{pid}-{n}"));
            let flags = [
                "--owner-pid".to_string(),
                pid.to_string(),
                "--remove-dir".into(),
            ];
            let process = start_up(&bin, &dir, &flags)?;
            let net = world_net(pid, n);
            if let Err(e) = net.create() {
                procs::signal(process.pid, "TERM");
                return Err(anyhow::anyhow!(
                    "the world's lab net (needs root and ip(8)): {e}"
                ));
            }
            anyhow::Ok((process, dir, net))
        })
        .await??;
        let kubeconfig = dir.join("admin.kubeconfig");
        let me = RealControlPlane {
            process,
            kubeconfig,
            dir,
            net,
            restart: None,
        };
        let kc = kube::config::Kubeconfig::read_from(&me.kubeconfig)?;
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        let client = kube::client::ClientBuilder::try_from(config)?
            .with_layer(&responses.layer())
            .build();
        eprintln!(
            "world: real control plane ready in {:.1}s ({})",
            t0.elapsed().as_secs_f64(),
            me.dir.display()
        );
        Ok((me, client))
    }

    /// The admin kubeconfig (kubectl, helm, other processes).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// The pid of `controlplane up`: etcd, kube-apiserver and kube-controller-manager are
    /// its child processes.
    pub fn pid(&self) -> u32 {
        self.process.pid
    }

    /// The API server's audit log (JSON lines).
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("audit.log")
    }

    /// Serves `router` (the world's HostKubevirt) as the aggregated
    /// `subresources.kubevirt.io` API and waits until the API server calls it Available.
    pub async fn serve_restart_api(
        &mut self,
        client: &Client,
        router: axum::Router,
    ) -> anyhow::Result<()> {
        let api = cp::serve_restart_api(client, self.net.clone(), router).await?;
        self.restart = Some(api);
        Ok(())
    }
}

impl Drop for RealControlPlane {
    fn drop(&mut self) {
        if let Some(api) = self.restart.take() {
            api.task.abort();
        }
        // `up` stops its children and removes its directory (--remove-dir).
        procs::signal(self.process.pid, "TERM");
        self.net.remove();
    }
}

/// How long `controlplane up` may take to write `ready` (3-5 s typical, more when the
/// machine is busy).
const READY_TIMEOUT: Duration = Duration::from_secs(240);

/// Starts `controlplane up --dir <dir> <flags>` detached and waits for `<dir>/ready`
/// (blocking). Its log is `<dir>/up.log` (kept when it fails: `--remove-dir` removes the
/// directory only after a clean stop).
fn start_up(bin: &Path, dir: &Path, flags: &[String]) -> anyhow::Result<ProcessInfo> {
    std::fs::create_dir_all(dir)?;
    let ready = dir.join("ready");
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("up").arg("--dir").arg(dir).args(flags);
    let log = dir.join("up.log");
    let info = procs::spawn_detached(cmd, &log)?;
    let deadline = Instant::now() + READY_TIMEOUT;
    while !ready.is_file() {
        if !process_alive(info.pid) {
            anyhow::bail!(
                "controlplane up exited before it was ready; {}:\n{}",
                log.display(),
                procs::log_tail(&log, 40)
            );
        }
        if Instant::now() >= deadline {
            procs::signal(info.pid, "TERM");
            anyhow::bail!(
                "the real control plane was not ready after {READY_TIMEOUT:?} ({})",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(info)
}

/// The lab net of world `n` of process `pid`: a /30 in 10.251/16 (the lab CLI's are in
/// 10.250/16) that no interface of this machine has yet.
fn world_net(pid: u32, n: u32) -> LabNet {
    let taken = std::process::Command::new("ip")
        .args(["-4", "-o", "addr", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let start = (pid.wrapping_mul(31).wrapping_add(n)) % 16384;
    let slot = (0..16384)
        .map(|i| (start + i) % 16384)
        .find(|s| !taken.contains(&format!("inet {}/", slot_ip(*s, 1))))
        .unwrap_or(start);
    LabNet {
        netns: format!("{NETNS_PREFIX}{pid}-{n}"),
        // IFNAMSIZ: at most 15 bytes with the temporary peer's extra "p".
        host_if: format!("gw{pid:x}n{n}"),
        host_ip: slot_ip(slot, 1),
        peer_ip: slot_ip(slot, 2),
    }
}

fn slot_ip(slot: u32, host: u32) -> String {
    format!("10.251.{}.{}", slot / 64, (slot % 64) * 4 + host)
}

/// The pid in `gcw-<pid>-<n>` / `gcw-cp-<pid>-<n>` after `prefix`.
fn owner_of(name: &str, prefix: &str) -> Option<u32> {
    name.strip_prefix(prefix)?.split('-').next()?.parse().ok()
}

/// Network namespaces (with their veth pairs) and control plane directories of world
/// control planes whose test process is gone (killed before it could clean up).
fn remove_leftovers() {
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if owner_of(&name, NETNS_PREFIX).is_some_and(|p| !process_alive(p)) {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", &name])
                    .status();
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if owner_of(&name, DIR_PREFIX).is_some_and(|p| !process_alive(p)) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// The shim DaemonSet the world's shim pods belong to (the controller calls only pods a
/// DaemonSet of that name controls; the real garbage collector deletes pods whose owner
/// does not exist), and the namespace's `default` ServiceAccount the pods run as (the
/// ServiceAccount admission plugin refuses pods until it exists; the serviceaccount
/// controller makes it, a moment after the namespace). Returns the DaemonSet's uid.
pub async fn create_shim_daemonset(
    client: &Client,
    namespace: &str,
    name: &str,
) -> anyhow::Result<String> {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    let sa = serde_json::from_value(json!({"metadata": {"name": "default"}}))?;
    match sas.create(&PostParams::default(), &sa).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    let labels: serde_json::Map<String, serde_json::Value> =
        guestcred::controller::shims::SHIM_POD_SELECTOR
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), json!(v)))
            .collect();
    let ds: DaemonSet = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "shim", "image": "guestcred:lab"}]},
            },
        },
    }))?;
    let api: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    let made = api.create(&PostParams::default(), &ds).await?;
    Ok(made.uid().unwrap_or_default())
}

/// Node `node` and its shim pod (from [`crate::kubevirt::shim_pod`], owned by the DaemonSet
/// with `daemonset_uid`), Running at
/// `pod_ip` through the status subresource, as a kubelet would report it.
pub async fn create_node_with_shim(
    client: &Client,
    node: &str,
    namespace: &str,
    pod_ip: &str,
    daemonset_uid: &str,
) -> anyhow::Result<()> {
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(client.clone());
    nodes
        .create(&PostParams::default(), &crate::kubevirt::node(node))
        .await?;
    let mut pod = crate::kubevirt::shim_pod(namespace, node, pod_ip);
    for o in pod.metadata.owner_references.iter_mut().flatten() {
        o.uid = daemonset_uid.to_string();
    }
    let status = pod.status.take();
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let made = pods.create(&PostParams::default(), &pod).await?;
    pods.patch_status(
        &made.name_any(),
        &PatchParams::default(),
        &Patch::Merge(json!({"status": status})),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn world_nets_are_named_for_their_process_and_fit_ifnamsiz() {
        let net = world_net(4_194_303, 99);
        assert_eq!(net.netns, "gcw-4194303-99");
        // The temporary peer name adds a "p": still under IFNAMSIZ (16 with the NUL).
        assert!(net.host_if.len() < 15, "{}", net.host_if);
        assert_eq!(owner_of(&net.netns, NETNS_PREFIX), Some(4_194_303));
        assert_eq!(owner_of("gcw-cp-17-0", DIR_PREFIX), Some(17));
        assert_eq!(owner_of("gcwXYZ", DIR_PREFIX), None);
        let host: std::net::Ipv4Addr = net.host_ip.parse().expect("IPv4");
        let peer: std::net::Ipv4Addr = net.peer_ip.parse().expect("IPv4");
        assert_eq!(host.octets()[..2], [10, 251]);
        assert_eq!(u32::from(host) & !3, u32::from(peer) & !3, "one /30");
    }
}
