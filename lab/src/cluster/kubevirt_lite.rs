//! kubevirt-lite, part 2: keeps the lab's VirtualMachine / VirtualMachineInstance objects
//! in step with the real libvirt domains (phase, AgentConnected from a real guest-ping,
//! Paused, guestOSInfo), and serves KubeVirt's `restart` subresource: destroy the domain,
//! reseed it from the VM's current cloud-init keys, boot it again, new VMI.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use base64::Engine as _;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use super::state::{AgentKind, VmState};
use super::{ClusterError, WorkerPanicked, blocking};
use crate::guest::{
    AgentMode, GuestImage, GuestSpec, LAB_SEED_KEY_ALICE, LAB_SEED_KEY_ROOT, LabError, Libvirtd,
    OLD_AGENT_BLOCKED, codes, console_log_path, destroy_guest, start_guest,
};
use crate::kubevirt::{VmDescription, uid_string, vm as vm_description};
use guestcred::api::kubevirt::{
    GuestOsInfo, VirtualMachine, VirtualMachineInstance, VmiCondition, VmiStatus,
};

/// How often each VM is observed.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);
/// Bound on one observation, so a hung agent never stalls a VM's loop.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// libvirt's own bound on one agent reply (seconds), for pings.
const PING_TIMEOUT_SECS: i32 = 2;
/// What the guest's /init prints once it has (or, by design, has not) started qemu-ga.
pub const CONSOLE_READY: &str = "gc: ready";

/// A node as kubevirt-lite sees it: its libvirtd (owned here) and its guests' files.
pub struct LiteNode {
    pub name: String,
    pub uri: String,
    pub vm_dir: PathBuf,
    /// Taken out at shutdown to stop it.
    pub libvirtd: Mutex<Option<Libvirtd>>,
}

impl LiteNode {
    /// Boots a guest on this node's libvirtd; fails once the libvirtd has been taken out
    /// to be stopped.
    pub fn start_guest(&self, image: &GuestImage, spec: &GuestSpec) -> Result<(), LabError> {
        let guard = self.libvirtd.lock().unwrap_or_else(|e| e.into_inner());
        let libvirtd = guard.as_ref().ok_or_else(|| {
            LabError::Invalid("libvirtd already stopped: the lab is shutting down".into())
        })?;
        start_guest(libvirtd, image, spec, &self.vm_dir)
    }
}

/// The libvirt domain as last seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DomainObs {
    Running,
    Paused,
    /// Shut off, crashed, ...: the VMI has failed.
    Stopped(String),
    Missing,
}

type ProbeHandle = JoinHandle<Result<Option<GuestOsInfo>, LabError>>;

/// Per-VM state; the lock is held by a poll tick and by a restart, never both.
struct VmRuntime {
    generation: u64,
    launcher_uid: String,
    /// The agent answered (or, for agent-less guests, /init finished) since the last boot.
    booted: bool,
    agent_connected: bool,
    os_info: Option<GuestOsInfo>,
    /// A probe that outlived PROBE_TIMEOUT keeps running; its result is awaited next tick
    /// instead of starting another blocking call on the same domain.
    pending_probe: Option<(u64, ProbeHandle)>,
    last_status: Option<Value>,
}

struct VmEntry {
    vm: VmState,
    node: Arc<LiteNode>,
    rt: tokio::sync::Mutex<VmRuntime>,
}

/// kubevirt-lite's shared state.
pub struct Lite {
    client: Client,
    image: GuestImage,
    vms: BTreeMap<(String, String), Arc<VmEntry>>,
}

/// Keys a fresh lab guest gets (root and alice), as cloud-init would install them.
pub fn initial_keys() -> BTreeMap<String, Vec<String>> {
    BTreeMap::from([
        ("root".to_string(), vec![LAB_SEED_KEY_ROOT.to_string()]),
        ("alice".to_string(), vec![LAB_SEED_KEY_ALICE.to_string()]),
    ])
}

/// A `#cloud-config` document with `users: [{name, ssh_authorized_keys}]`.
pub fn cloud_config(keys: &BTreeMap<String, Vec<String>>) -> String {
    let users: Vec<Value> = keys
        .iter()
        .map(|(user, keys)| json!({"name": user, "ssh_authorized_keys": keys}))
        .collect();
    let yaml = serde_yaml::to_string(&json!({ "users": users })).unwrap_or_default();
    format!("#cloud-config\n{yaml}")
}

/// The authorized_keys a VM's cloud-init would install: from the first
/// `spec.template.spec.volumes[*].cloudInitNoCloud` (`userData` or `userDataBase64`).
/// No cloud-init volume, or no `users`, means no keys.
pub fn cloud_init_keys(vm: &VirtualMachine) -> Result<BTreeMap<String, Vec<String>>, String> {
    let source = vm_volumes(vm)
        .iter()
        .find_map(|v| v.get("cloudInitNoCloud"));
    match source.map(inline_user_data).transpose()?.flatten() {
        Some(user_data) => parse_cloud_config_keys(&user_data),
        None => Ok(BTreeMap::new()),
    }
}

/// The VM's `spec.template.spec.volumes` (none when it has no template).
pub fn vm_volumes(vm: &VirtualMachine) -> &[Value] {
    let template = vm.spec.rest.get("template");
    let volumes = template.and_then(|t| t.pointer("/spec/volumes"));
    volumes.and_then(Value::as_array).map_or(&[], Vec::as_slice)
}

/// The user data written into a cloud-init volume source (`cloudInitNoCloud` or
/// `cloudInitConfigDrive`): `userData`, else `userDataBase64` decoded; `None` when it has
/// neither (e.g. it names a Secret).
pub fn inline_user_data(source: &Value) -> Result<Option<String>, String> {
    if let Some(text) = source.get("userData").and_then(Value::as_str) {
        return Ok(Some(text.to_string()));
    }
    let Some(b64) = source.get("userDataBase64").and_then(Value::as_str) else {
        return Ok(None);
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| format!("cloud-init userDataBase64 is not base64: {e}"))?;
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| "cloud-init userDataBase64 is not UTF-8".to_string())
}

/// KubeVirt's `restart` subresource of a VM, as an axum route path.
pub const RESTART_PATH: &str =
    "/apis/subresources.kubevirt.io/v1/namespaces/{ns}/virtualmachines/{name}/restart";

/// `users[].ssh_authorized_keys` of cloud-config `user_data`, by user (blank keys left out).
pub fn parse_cloud_config_keys(user_data: &str) -> Result<BTreeMap<String, Vec<String>>, String> {
    let doc: serde_yaml::Value = serde_yaml::from_str(user_data)
        .map_err(|e| format!("cloud-init userData is not YAML: {e}"))?;
    let mut keys: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let users = doc.get("users").and_then(serde_yaml::Value::as_sequence);
    for user in users.into_iter().flatten() {
        // cloud-init also allows the bare string "default" here: no keys to seed.
        let Some(name) = user.get("name").and_then(serde_yaml::Value::as_str) else {
            continue;
        };
        let lines = user
            .get("ssh_authorized_keys")
            .and_then(serde_yaml::Value::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(serde_yaml::Value::as_str)
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty());
        keys.entry(name.to_string()).or_default().extend(lines);
    }
    Ok(keys)
}

/// The guest to boot for `vm` with `keys` seeded.
pub fn guest_spec(vm: &VmState, keys: BTreeMap<String, Vec<String>>) -> GuestSpec {
    let (agent, blocked) = match vm.agent {
        AgentKind::On => (AgentMode::On, Vec::new()),
        AgentKind::Off => (AgentMode::Off, Vec::new()),
        AgentKind::Hung => (AgentMode::Hung, Vec::new()),
        AgentKind::Old => (
            AgentMode::On,
            OLD_AGENT_BLOCKED.iter().map(|c| c.to_string()).collect(),
        ),
    };
    GuestSpec {
        agent,
        blocked_commands: blocked,
        authorized_keys: keys,
        ..GuestSpec::new(vm.domain.clone())
    }
}

fn description(vm: &VmState) -> VmDescription {
    let mut desc = vm_description(&vm.namespace, &vm.name, &vm.node);
    for (k, v) in &vm.labels {
        desc = desc.label(k, v);
    }
    desc
}

/// The VirtualMachine object: the builder's, plus a cloud-init volume with `keys`.
pub fn vm_object(vm: &VmState, keys: &BTreeMap<String, Vec<String>>) -> VirtualMachine {
    let mut obj = description(vm).vm_object();
    if let Some(spec) = obj
        .spec
        .rest
        .get_mut("template")
        .and_then(|t| t.get_mut("spec"))
        .and_then(Value::as_object_mut)
    {
        spec.insert(
            "volumes".into(),
            json!([{"name": "cloudinitdisk",
                    "cloudInitNoCloud": {"userData": cloud_config(keys)}}]),
        );
    }
    obj
}

/// A fresh launcher pod UID (a restart gets a new launcher pod).
fn new_launcher_uid() -> String {
    uid_string(rand::random())
}

fn condition(type_: &str, ok: bool, reason: Option<&str>) -> VmiCondition {
    VmiCondition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.map(str::to_string),
        message: None,
    }
}

/// The VMI status KubeVirt would show for what was observed.
fn vmi_status(node: &str, rt: &VmRuntime, dom: &DomainObs) -> VmiStatus {
    let (phase, running) = match dom {
        DomainObs::Running | DomainObs::Paused if rt.booted => ("Running", true),
        DomainObs::Running | DomainObs::Paused => ("Scheduled", false),
        DomainObs::Stopped(_) | DomainObs::Missing => ("Failed", false),
    };
    let agent = rt.agent_connected && matches!(dom, DomainObs::Running | DomainObs::Paused);
    let mut conditions = vec![
        condition("Ready", running && *dom == DomainObs::Running, None),
        condition(
            "AgentConnected",
            agent,
            (!agent).then_some("GuestAgentNotConnected"),
        ),
    ];
    if *dom == DomainObs::Paused {
        conditions.push(condition("Paused", true, Some("PausedByUser")));
    }
    let active = matches!(dom, DomainObs::Running | DomainObs::Paused);
    VmiStatus {
        node_name: Some(node.to_string()),
        phase: Some(phase.into()),
        active_pods: if active {
            BTreeMap::from([(rt.launcher_uid.clone(), node.to_string())])
        } else {
            BTreeMap::new()
        },
        conditions,
        guest_os_info: rt.os_info.clone(),
        rest: BTreeMap::new(),
    }
}

/// The domain's state (blocking).
pub fn observe_domain(uri: &str, domain: &str) -> Result<DomainObs, LabError> {
    use virt::domain::DomainState;
    let (_conn, dom) = match crate::guest::lookup(uri, domain) {
        Ok(found) => found,
        Err(e) if e.libvirt_code() == Some(codes::NO_DOMAIN) => return Ok(DomainObs::Missing),
        Err(e) => return Err(e),
    };
    let (state, _reason) = dom
        .state()
        .map_err(|e| LabError::libvirt(format!("state of {domain}"), &e))?;
    Ok(match Result::<DomainState, _>::from(state) {
        Ok(DomainState::Running | DomainState::Blocked) => DomainObs::Running,
        Ok(DomainState::Paused | DomainState::PMSuspended) => DomainObs::Paused,
        Ok(other) => DomainObs::Stopped(format!("{other:?}")),
        Err(e) => DomainObs::Stopped(format!("{e:?}")),
    })
}

/// guest-ping (bounded by libvirt), then guest-get-osinfo when `want_os`. Ok means the
/// agent answered (blocking).
pub fn probe_agent(
    uri: &str,
    domain: &str,
    want_os: bool,
) -> Result<Option<GuestOsInfo>, LabError> {
    let (_conn, dom) = crate::guest::lookup(uri, domain)?;
    dom.qemu_agent_command(r#"{"execute":"guest-ping"}"#, PING_TIMEOUT_SECS, 0)
        .map_err(|e| LabError::libvirt(format!("guest-ping on {domain}"), &e))?;
    if !want_os {
        return Ok(None);
    }
    let reply = dom
        .qemu_agent_command(r#"{"execute":"guest-get-osinfo"}"#, PING_TIMEOUT_SECS, 0)
        .map_err(|e| LabError::libvirt(format!("guest-get-osinfo on {domain}"), &e))?;
    let value: Value = serde_json::from_str(&reply).map_err(|e| LabError::AgentReply {
        command: "guest-get-osinfo".into(),
        detail: e.to_string(),
    })?;
    let ret = value.get("return").cloned().unwrap_or(Value::Null);
    let field = |k: &str| ret.get(k).and_then(Value::as_str).map(str::to_string);
    Ok(Some(GuestOsInfo {
        id: field("id"),
        name: field("name"),
        pretty_name: field("pretty-name"),
        version_id: field("version-id"),
        kernel_release: field("kernel-release"),
    }))
}

fn console_ready(node: &LiteNode, domain: &str) -> bool {
    std::fs::read(console_log_path(&node.vm_dir, domain))
        .is_ok_and(|b| String::from_utf8_lossy(&b).contains(CONSOLE_READY))
}

/// A Kubernetes `Status` error body.
fn status_error(code: StatusCode, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code.as_u16(),
    });
    (code, axum::Json(body)).into_response()
}

impl Lite {
    /// `vms` must be booted already (their agents answered, or /init finished).
    pub fn new(
        client: Client,
        image: GuestImage,
        nodes: &[Arc<LiteNode>],
        vms: &[VmState],
    ) -> Result<Lite, ClusterError> {
        let mut entries = BTreeMap::new();
        for vm in vms {
            let node = nodes
                .iter()
                .find(|n| n.name == vm.node)
                .cloned()
                .ok_or_else(|| ClusterError::Invalid(format!("VM {} on unknown node", vm.key())))?;
            let rt = VmRuntime {
                generation: 0,
                launcher_uid: description(vm).launcher_uid(),
                booted: true,
                agent_connected: false,
                os_info: None,
                pending_probe: None,
                last_status: None,
            };
            entries.insert(
                (vm.namespace.clone(), vm.name.clone()),
                Arc::new(VmEntry {
                    vm: vm.clone(),
                    node,
                    rt: tokio::sync::Mutex::new(rt),
                }),
            );
        }
        Ok(Lite {
            client,
            image,
            vms: entries,
        })
    }

    /// Creates each VM (with its cloud-init keys) and VMI, then observes each once so the
    /// VMIs show real agent state before anyone reads them.
    pub async fn create_objects(&self) -> Result<(), ClusterError> {
        for entry in self.vms.values() {
            let vm = &entry.vm;
            let vms: Api<VirtualMachine> = Api::namespaced(self.client.clone(), &vm.namespace);
            vms.create(&PostParams::default(), &vm_object(vm, &initial_keys()))
                .await?;
            let vmis: Api<VirtualMachineInstance> =
                Api::namespaced(self.client.clone(), &vm.namespace);
            vmis.create(&PostParams::default(), &description(vm).vmi_object())
                .await?;
        }
        let ticks = self.vms.values().map(|e| self.tick(e));
        for result in futures::future::join_all(ticks).await {
            result?;
        }
        Ok(())
    }

    /// One observation loop per VM, until the tasks are aborted.
    pub fn spawn_pollers(self: &Arc<Self>) -> Vec<JoinHandle<()>> {
        self.vms
            .values()
            .map(|entry| {
                let (lite, entry) = (self.clone(), entry.clone());
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(POLL_INTERVAL).await;
                        if let Err(e) = lite.tick(&entry).await {
                            tracing::warn!(vm = %entry.vm.key(), error = %e, "kubevirt-lite poll failed");
                        }
                    }
                })
            })
            .collect()
    }

    /// Observe one VM and write its VMI status when it changed.
    async fn tick(&self, entry: &VmEntry) -> Result<(), ClusterError> {
        let mut rt = entry.rt.lock().await;
        let (uri, domain) = (entry.node.uri.clone(), entry.vm.domain.clone());
        let observed = tokio::time::timeout(
            PROBE_TIMEOUT,
            tokio::task::spawn_blocking(move || observe_domain(&uri, &domain)),
        )
        .await;
        let dom = match observed {
            Ok(Ok(Ok(dom))) => dom,
            Ok(Ok(Err(e))) => return Err(e.into()),
            Ok(Err(join)) => {
                return Err(ClusterError::Failed(format!("observer panicked: {join}")));
            }
            // libvirt itself is stuck: keep the last status rather than guess.
            Err(_) => return Ok(()),
        };
        if dom == DomainObs::Running {
            self.probe(entry, &mut rt).await;
        }
        if !rt.booted
            && matches!(entry.vm.agent, AgentKind::Off | AgentKind::Hung)
            && console_ready(&entry.node, &entry.vm.domain)
        {
            rt.booted = true;
        }
        let status = serde_json::to_value(vmi_status(&entry.node.name, &rt, &dom))
            .map_err(|e| ClusterError::Failed(format!("VMI status: {e}")))?;
        if rt.last_status.as_ref() != Some(&status) {
            let vmis: Api<VirtualMachineInstance> =
                Api::namespaced(self.client.clone(), &entry.vm.namespace);
            let patch: json_patch::Patch =
                serde_json::from_value(json!([{"op": "add", "path": "/status", "value": status}]))
                    .map_err(|e| ClusterError::Failed(format!("VMI status patch: {e}")))?;
            vmis.patch_status(
                &entry.vm.name,
                &PatchParams::default(),
                &Patch::<()>::Json(patch),
            )
            .await?;
            tracing::info!(vm = %entry.vm.key(), phase = ?status.get("phase"), agent = rt.agent_connected, "VMI status updated");
            rt.last_status = Some(status);
        }
        Ok(())
    }

    async fn probe(&self, entry: &VmEntry, rt: &mut VmRuntime) {
        let generation = rt.generation;
        let mut handle = match rt.pending_probe.take() {
            Some((g, h)) if g == generation => h,
            _ => {
                let (uri, domain) = (entry.node.uri.clone(), entry.vm.domain.clone());
                let want_os = rt.os_info.is_none();
                tokio::task::spawn_blocking(move || probe_agent(&uri, &domain, want_os))
            }
        };
        match tokio::time::timeout(PROBE_TIMEOUT, &mut handle).await {
            Ok(Ok(Ok(os))) => {
                rt.agent_connected = true;
                rt.booted = true;
                if os.is_some() {
                    rt.os_info = os;
                }
            }
            Ok(Ok(Err(e))) => {
                tracing::debug!(vm = %entry.vm.key(), error = %e, "agent did not answer");
                rt.agent_connected = false;
            }
            Ok(Err(_)) => rt.agent_connected = false,
            Err(_) => {
                rt.agent_connected = false;
                rt.pending_probe = Some((generation, handle));
            }
        }
    }

    /// KubeVirt's restart: new cloud-init keys take effect, the VMI is replaced.
    pub async fn restart(&self, ns: &str, name: &str) -> Result<(), RestartError> {
        let entry = self
            .vms
            .get(&(ns.to_string(), name.to_string()))
            .ok_or(RestartError::NotFound)?;
        let mut rt = entry.rt.lock().await;
        let vms: Api<VirtualMachine> = Api::namespaced(self.client.clone(), ns);
        let vm_obj = vms
            .get_opt(name)
            .await
            .map_err(|e| RestartError::Internal(e.to_string()))?
            .ok_or(RestartError::NotFound)?;
        let keys = cloud_init_keys(&vm_obj).map_err(RestartError::Invalid)?;

        let (uri, domain) = (entry.node.uri.clone(), entry.vm.domain.clone());
        blocking(move || match destroy_guest(&uri, &domain) {
            Err(e) if e.libvirt_code() == Some(codes::NO_DOMAIN) => Ok(()),
            other => other.map_err(RestartError::from),
        })
        .await?;
        let vmis: Api<VirtualMachineInstance> = Api::namespaced(self.client.clone(), ns);
        match vmis.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(RestartError::Internal(e.to_string())),
        }
        rt.generation += 1;
        rt.launcher_uid = new_launcher_uid();
        rt.booted = false;
        rt.agent_connected = false;
        rt.os_info = None;
        rt.pending_probe = None;
        rt.last_status = None;
        vmis.create(&PostParams::default(), &description(&entry.vm).vmi_object())
            .await
            .map_err(|e| RestartError::Internal(e.to_string()))?;

        let users = keys.keys().cloned().collect::<Vec<_>>().join(",");
        let spec = guest_spec(&entry.vm, keys);
        let (node, image) = (entry.node.clone(), self.image.clone());
        blocking(move || node.start_guest(&image, &spec).map_err(RestartError::from)).await?;
        // Scheduled until the agent answers: the pollers take it from here.
        let status = serde_json::to_value(vmi_status(&entry.node.name, &rt, &DomainObs::Running))
            .map_err(|e| RestartError::Internal(e.to_string()))?;
        vmis.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .map_err(|e| RestartError::Internal(e.to_string()))?;
        rt.last_status = Some(status);
        tracing::info!(vm = %entry.vm.key(), %users, "VM restarted with its cloud-init keys");
        Ok(())
    }

    /// The extra routes merged into the API server.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route(RESTART_PATH, put(restart_route))
            .with_state(self.clone())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Internal(String),
}

impl From<LabError> for RestartError {
    fn from(e: LabError) -> RestartError {
        RestartError::Internal(e.to_string())
    }
}

impl From<WorkerPanicked> for RestartError {
    fn from(e: WorkerPanicked) -> RestartError {
        RestartError::Internal(format!("worker panicked: {}", e.0))
    }
}

async fn restart_route(
    State(lite): State<Arc<Lite>>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Response {
    // The restart runs in a task of its own: a caller that gives up (a client timeout, the
    // aggregator's proxy) must not cancel it half-way, with the domain destroyed and the
    // VMI deleted but no new one (KubeVirt's own restart is carried out by its controllers,
    // whatever becomes of the request).
    let (task_ns, task_name) = (ns.clone(), name.clone());
    let outcome = tokio::spawn(async move { lite.restart(&task_ns, &task_name).await })
        .await
        .unwrap_or_else(|e| Err(RestartError::Internal(format!("restart task failed: {e}"))));
    match outcome {
        Ok(()) => (StatusCode::ACCEPTED, axum::Json(json!({}))).into_response(),
        Err(RestartError::NotFound) => status_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("virtualmachines.kubevirt.io \"{name}\" not found in namespace {ns}"),
        ),
        Err(RestartError::Invalid(msg)) => {
            status_error(StatusCode::UNPROCESSABLE_ENTITY, "Invalid", msg)
        }
        Err(e) => {
            tracing::error!(vm = %format!("{ns}/{name}"), error = %e, "restart failed");
            status_error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "InternalError",
                e.to_string(),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lab_vm(agent: AgentKind) -> VmState {
        VmState {
            namespace: "default".into(),
            name: "vm-1-1".into(),
            node: "node-1".into(),
            domain: "default_vm-1-1".into(),
            labels: BTreeMap::from([("tier".to_string(), "db".to_string())]),
            agent,
        }
    }

    fn runtime(booted: bool, agent: bool) -> VmRuntime {
        VmRuntime {
            generation: 0,
            launcher_uid: "uid-1".into(),
            booted,
            agent_connected: agent,
            os_info: None,
            pending_probe: None,
            last_status: None,
        }
    }

    fn condition_status(status: &VmiStatus, type_: &str) -> Option<String> {
        status
            .conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| c.status.clone())
    }

    #[test]
    fn cloud_config_round_trips_through_the_vm_object() {
        let keys = BTreeMap::from([("root".to_string(), vec!["ssh-ed25519 AAAA k1".to_string()])]);
        let vm = vm_object(&lab_vm(AgentKind::On), &keys);
        assert_eq!(cloud_init_keys(&vm), Ok(keys));
    }

    #[test]
    fn cloud_config_users_without_keys_or_named_default_seed_nothing() {
        let keys = parse_cloud_config_keys("#cloud-config\nusers:\n- default\n- name: bob\n")
            .expect("valid");
        assert_eq!(keys, BTreeMap::from([("bob".to_string(), vec![])]));
    }

    #[test]
    fn user_data_that_is_not_yaml_is_rejected() {
        assert!(parse_cloud_config_keys("users: [unclosed").is_err());
    }

    #[test]
    fn base64_user_data_is_decoded() {
        let text = cloud_config(&initial_keys());
        let mut vm = vm_object(&lab_vm(AgentKind::On), &BTreeMap::new());
        let b64 = base64::engine::general_purpose::STANDARD.encode(text);
        vm.spec.rest.insert(
            "template".into(),
            json!({"spec": {"volumes": [{"name": "c", "cloudInitNoCloud": {"userDataBase64": b64}}]}}),
        );
        assert_eq!(cloud_init_keys(&vm), Ok(initial_keys()));
    }

    #[test]
    fn a_vm_without_cloud_init_seeds_no_keys() {
        let vm = description(&lab_vm(AgentKind::On)).vm_object();
        assert_eq!(cloud_init_keys(&vm), Ok(BTreeMap::new()));
    }

    #[test]
    fn an_old_agent_guest_blocks_the_ssh_key_commands() {
        let spec = guest_spec(&lab_vm(AgentKind::Old), BTreeMap::new());
        assert_eq!(spec.agent, AgentMode::On);
        assert!(
            spec.blocked_commands
                .contains(&"guest-ssh-add-authorized-keys".to_string())
        );
    }

    #[test]
    fn a_paused_domain_shows_the_paused_condition_and_stays_running() {
        let status = vmi_status("node-1", &runtime(true, true), &DomainObs::Paused);
        assert_eq!(status.phase.as_deref(), Some("Running"));
        assert_eq!(condition_status(&status, "Paused").as_deref(), Some("True"));
        assert_eq!(condition_status(&status, "Ready").as_deref(), Some("False"));
    }

    #[test]
    fn a_guest_that_has_not_answered_since_boot_is_scheduled_without_agent() {
        let status = vmi_status("node-1", &runtime(false, false), &DomainObs::Running);
        assert_eq!(status.phase.as_deref(), Some("Scheduled"));
        assert_eq!(
            condition_status(&status, "AgentConnected").as_deref(),
            Some("False")
        );
        assert_eq!(
            status.active_pods.get("uid-1").map(String::as_str),
            Some("node-1")
        );
    }

    #[test]
    fn a_vanished_domain_fails_the_vmi_and_drops_its_launcher_pod() {
        let status = vmi_status("node-1", &runtime(true, true), &DomainObs::Missing);
        assert_eq!(status.phase.as_deref(), Some("Failed"));
        assert!(status.active_pods.is_empty());
        assert_eq!(
            condition_status(&status, "AgentConnected").as_deref(),
            Some("False")
        );
    }

    #[test]
    fn launcher_uids_are_fresh_per_restart() {
        assert_ne!(new_launcher_uid(), new_launcher_uid());
    }
}
