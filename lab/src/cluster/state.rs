//! `<state>/lab.json`: what `up` planned and started, the single record `status`, `down`,
//! `exec` and kubevirt-lite work from. Written atomically (tmp + rename) by one process at
//! a time: `up` writes the plan, `serve` fills in the API server and libvirtds, `up` adds
//! the shims and the controller.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::ClusterError;

/// File name of the lab record inside the state directory.
pub const STATE_FILE: &str = "lab.json";
/// Environment variable naming the state directory (default `<repo>/.lab/run`).
pub const STATE_ENV: &str = "GUESTCRED_LAB_STATE";
/// Namespace of the shim pods: apart from the controller's, as the chart puts them (its
/// default `shim.namespace`, `<release namespace>-shim`), so that only it needs the
/// `privileged` Pod Security level.
pub const SHIM_NAMESPACE: &str = "guestcred-system-shim";
/// The controller's namespace (the chart's release namespace on a real control plane:
/// its Lease, its input-hash key, its ServiceAccount), labelled Pod Security `restricted`
/// there.
pub const CONTROLLER_NAMESPACE: &str = "guestcred-system";
/// Label on every lab VM naming its node.
pub const NODE_LABEL: &str = "guestcred.io/lab-node";
/// Label on every lab VM saying what its agent does (`on`, `off`, `hung`, `old`).
pub const AGENT_LABEL: &str = "guestcred.io/lab-agent";

/// The default state directory: `$GUESTCRED_LAB_STATE`, else `<repo>/.lab/run`.
pub fn default_state_dir() -> PathBuf {
    match std::env::var_os(STATE_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => crate::repo_dir().join(".lab").join("run"),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// `up` wrote the plan; `serve` is booting.
    Starting,
    /// `serve` runs the API server, the libvirtds and the guests (agents up).
    GuestsReady,
    /// Shims (and the controller, if asked for) answer too.
    Ready,
    /// `serve` gave up; `error` says why.
    Failed,
}

/// What a lab guest's agent does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AgentKind {
    #[default]
    On,
    /// No qemu-ga: libvirt says "not connected" at once.
    Off,
    /// The channel is open but never answers.
    Hung,
    /// qemu-ga without the guest-ssh-* commands.
    Old,
}

impl AgentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AgentKind::On => "on",
            AgentKind::Off => "off",
            AgentKind::Hung => "hung",
            AgentKind::Old => "old",
        }
    }
}

impl FromStr for AgentKind {
    type Err = ClusterError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on" => Ok(AgentKind::On),
            "off" => Ok(AgentKind::Off),
            "hung" => Ok(AgentKind::Hung),
            "old" => Ok(AgentKind::Old),
            other => Err(ClusterError::Invalid(format!(
                "agent mode {other:?} (expected on, off, hung or old)"
            ))),
        }
    }
}

pub use super::procs::ProcessInfo;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeState {
    /// `node-1`, `node-2`, ...
    pub name: String,
    /// The private libvirtd tree and the guests' initrds and console logs (`vms/`).
    pub dir: PathBuf,
    /// `127.0.0.<10+i>`: the shim's listen address and its pod's podIP.
    pub ip: String,
    /// Filled in by `serve`.
    pub libvirt_uri: Option<String>,
    pub libvirtd_pid: Option<u32>,
    /// Filled in by `up` once the shim answers /healthz on its metrics port.
    pub shim: Option<ProcessInfo>,
}

impl NodeState {
    /// Where the guests' initrds and serial console logs live.
    pub fn vm_dir(&self) -> PathBuf {
        self.dir.join("vms")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmState {
    pub namespace: String,
    pub name: String,
    pub node: String,
    /// libvirt domain name: `<namespace>_<name>`.
    pub domain: String,
    pub labels: BTreeMap<String, String>,
    pub agent: AgentKind,
}

impl VmState {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// The whole lab record (`<state>/lab.json`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabState {
    pub version: u32,
    pub phase: Phase,
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub kubeconfig: PathBuf,
    /// The lab's CA and the shim/controller certificates (`<state>/tls`, see
    /// [`super::tls::LabTls`]): shims serve mutual TLS only.
    #[serde(default)]
    pub tls_dir: PathBuf,
    pub shim_port: u16,
    /// Plain-HTTP port of every shim's /metrics, /healthz and /readyz (on the node IP).
    #[serde(default = "default_shim_metrics_port")]
    pub shim_metrics_port: u16,
    pub shim_namespace: String,
    /// The controller's namespace (see [`CONTROLLER_NAMESPACE`]).
    #[serde(default = "default_controller_namespace")]
    pub controller_namespace: String,
    /// `http://127.0.0.1:<port>`, filled in by `serve`.
    pub apiserver_url: Option<String>,
    /// The API server + kubevirt-lite process (it also owns the libvirtds).
    pub serve: Option<ProcessInfo>,
    pub controller: Option<ProcessInfo>,
    /// Further controller replicas (leader election decides which one reconciles).
    #[serde(default)]
    pub controller_replicas: Vec<ProcessInfo>,
    /// The API server the lab runs: the emulator (inside `serve`) or a real control plane.
    #[serde(default)]
    pub control_plane: super::real::ControlPlane,
    /// `controlplane up` (real control plane only).
    #[serde(default)]
    pub controlplane: Option<ProcessInfo>,
    /// The lab network namespace of the aggregated `restart` API (real control plane).
    #[serde(default)]
    pub lab_net: Option<super::real::LabNet>,
    pub nodes: Vec<NodeState>,
    pub vms: Vec<VmState>,
    /// Why `serve` failed (phase `Failed`).
    pub error: Option<String>,
    /// When this process exits, `serve` takes the whole lab down and deletes the state
    /// directory (tests tie a lab to their own process this way).
    #[serde(default)]
    pub owner_pid: Option<u32>,
    /// The controller's `--watch-namespaces` (and on a real control plane the release's
    /// `watchNamespaces`: Roles there instead of the ClusterRole); empty: every namespace.
    #[serde(default)]
    pub watch_namespaces: Vec<String>,
}

fn default_shim_metrics_port() -> u16 {
    9090
}

fn default_controller_namespace() -> String {
    CONTROLLER_NAMESPACE.into()
}

impl LabState {
    /// The lab's certificate files.
    pub fn tls(&self) -> super::tls::LabTls {
        super::tls::LabTls::new(&self.tls_dir)
    }

    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join(STATE_FILE)
    }

    /// Reads `<state_dir>/lab.json`; `NotUp` when there is none.
    pub fn load(state_dir: &Path) -> Result<LabState, ClusterError> {
        let path = Self::path(state_dir);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ClusterError::NotUp(path));
            }
            Err(e) => return Err(ClusterError::io(format!("read {}", path.display()), e)),
        };
        serde_json::from_str(&text).map_err(|e| ClusterError::State {
            path,
            detail: e.to_string(),
        })
    }

    /// Writes `lab.json` atomically, so a concurrent reader never sees half a file.
    pub fn save(&self) -> Result<(), ClusterError> {
        let path = Self::path(&self.state_dir);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).map_err(|e| ClusterError::State {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        fs::write(&tmp, text)
            .map_err(|e| ClusterError::io(format!("write {}", tmp.display()), e))?;
        fs::rename(&tmp, &path)
            .map_err(|e| ClusterError::io(format!("rename to {}", path.display()), e))
    }

    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name)
    }

    /// Finds a VM by `name` (namespace `default`) or `namespace/name`.
    pub fn find_vm(&self, reference: &str) -> Result<&VmState, ClusterError> {
        let (ns, name) = reference.split_once('/').unwrap_or(("default", reference));
        self.vms
            .iter()
            .find(|v| v.namespace == ns && v.name == name)
            .ok_or_else(|| {
                let known: Vec<String> = self.vms.iter().map(VmState::key).collect();
                ClusterError::Invalid(format!(
                    "no lab VM {ns}/{name} (the lab has: {})",
                    known.join(", ")
                ))
            })
    }

    /// The libvirt URI of the node running `vm`.
    pub fn uri_of(&self, vm: &VmState) -> Result<String, ClusterError> {
        self.node(&vm.node)
            .and_then(|n| n.libvirt_uri.clone())
            .ok_or_else(|| ClusterError::Invalid(format!("node {} has no libvirtd yet", vm.node)))
    }

    /// Every pid the lab recorded (serve, libvirtds, shims, controller).
    pub fn recorded_pids(&self) -> Vec<(String, u32)> {
        let mut pids = Vec::new();
        if let Some(p) = &self.serve {
            pids.push(("serve".to_string(), p.pid));
        }
        if let Some(p) = &self.controller {
            pids.push(("controller".to_string(), p.pid));
        }
        for (i, p) in self.controller_replicas.iter().enumerate() {
            pids.push((format!("controller replica {}", i + 2), p.pid));
        }
        if let Some(p) = &self.controlplane {
            pids.push(("controlplane".to_string(), p.pid));
        }
        for n in &self.nodes {
            if let Some(pid) = n.libvirtd_pid {
                pids.push((format!("libvirtd {}", n.name), pid));
            }
            if let Some(s) = &n.shim {
                pids.push((format!("shim {}", n.name), s.pid));
            }
        }
        pids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_with_vms(names: &[&str]) -> LabState {
        LabState {
            version: 1,
            phase: Phase::Ready,
            state_dir: "/tmp/x".into(),
            cache_dir: "/tmp/c".into(),
            kubeconfig: "/tmp/x/kubeconfig".into(),
            tls_dir: "/tmp/x/tls".into(),
            shim_port: 8443,
            shim_metrics_port: 9090,
            shim_namespace: SHIM_NAMESPACE.into(),
            controller_namespace: CONTROLLER_NAMESPACE.into(),
            apiserver_url: None,
            serve: None,
            controller: None,
            controller_replicas: vec![],
            control_plane: Default::default(),
            controlplane: None,
            lab_net: None,
            nodes: vec![],
            vms: names
                .iter()
                .map(|n| VmState {
                    namespace: "default".into(),
                    name: n.to_string(),
                    node: "node-1".into(),
                    domain: format!("default_{n}"),
                    labels: BTreeMap::new(),
                    agent: AgentKind::On,
                })
                .collect(),
            error: None,
            owner_pid: None,
            watch_namespaces: Vec::new(),
        }
    }

    #[test]
    fn a_vm_is_found_by_bare_name_in_the_default_namespace() {
        let state = state_with_vms(&["vm-1-1"]);
        assert_eq!(
            state.find_vm("vm-1-1").map(|v| v.domain.as_str()).ok(),
            Some("default_vm-1-1")
        );
        assert!(state.find_vm("default/vm-1-1").is_ok());
    }

    #[test]
    fn an_unknown_vm_error_lists_the_lab_vms() {
        let err = state_with_vms(&["vm-1-1"])
            .find_vm("vm-9")
            .expect_err("unknown");
        assert!(err.to_string().contains("default/vm-1-1"), "{err}");
    }

    #[test]
    fn agent_kinds_parse_from_their_names_only() {
        assert_eq!("hung".parse::<AgentKind>().ok(), Some(AgentKind::Hung));
        assert!("sleepy".parse::<AgentKind>().is_err());
    }
}
