//! KubeVirt's `restart` subresource for the in-process [`World`](crate::world::World),
//! whose guests are host-run qemu-ga instances (`hostqga`): what KeypairRebuild's Rebuild
//! mode needs without real VMs (the libvirt lab has its own, `cluster::kubevirt_lite`).
//!
//! Like KubeVirt, a restart is asynchronous: `PUT .../virtualmachines/NAME/restart` records
//! the request in the VM's `status.stateChangeRequests` and answers 202; then, in the
//! background, the VMI is replaced (a new one with a new uid, `Scheduled` without agent,
//! then `Running` with it) and the guest "boots": its cloud-init stand-in adds the
//! `users[].ssh_authorized_keys` of the VM's cloud-init user data (inline, base64, or from
//! the Secret named by `userDataSecretRef` / `secretRef`, key `userdata` or `userData`) to
//! the users' authorized_keys, as cloud-init does (keys already there stay).
//!
//! For fault tests: restarts requested and done are counted per VM, the answer to a
//! request can be held back (the restart itself still happens, as when a client dies
//! after KubeVirt accepted its request), and the next requests can be refused with 500
//! (nothing happens, as when a request never arrives).
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use guestcred::api::kubevirt::{VirtualMachine, VirtualMachineInstance};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::cluster::kubevirt_lite::{inline_user_data, parse_cloud_config_keys, vm_volumes};

/// How long the old VMI keeps running after a restart was accepted, and how long the new
/// one is `Scheduled` before its agent connects.
const STOPPING: Duration = Duration::from_millis(300);
const BOOTING: Duration = Duration::from_millis(300);

type VmKey = (String, String);

/// The restart subresource of a world's VMs.
#[derive(Default)]
pub struct HostKubevirt {
    client: OnceLock<Client>,
    /// Node name → directory holding `<ns>_<name>/` of each host agent.
    nodes: Mutex<BTreeMap<String, PathBuf>>,
    requested: Mutex<BTreeMap<VmKey, u64>>,
    done: Mutex<BTreeMap<VmKey, u64>>,
    refuse: AtomicU32,
    hold: OnceLock<tokio::sync::watch::Sender<bool>>,
}

fn bump(map: &Mutex<BTreeMap<VmKey, u64>>, key: &VmKey) {
    *map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(key.clone())
        .or_default() += 1;
}

fn count(map: &Mutex<BTreeMap<VmKey, u64>>, ns: &str, name: &str) -> u64 {
    map.lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&(ns.to_string(), name.to_string()))
        .copied()
        .unwrap_or(0)
}

impl HostKubevirt {
    /// The client restarts act with (the world's, which also routes to this subresource).
    pub fn set_client(&self, client: Client) {
        let _ = self.client.set(client);
    }

    /// Where node `node`'s host agents live.
    pub fn add_node(&self, node: &str, sockets: &Path) {
        self.nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(node.to_string(), sockets.to_path_buf());
    }

    /// Restart requests that reached the subresource for VM `ns/name` (refused ones too).
    pub fn restarts_requested(&self, ns: &str, name: &str) -> u64 {
        count(&self.requested, ns, name)
    }

    /// Restarts of VM `ns/name` that happened (a new VMI runs).
    pub fn restarts_done(&self, ns: &str, name: &str) -> u64 {
        count(&self.done, ns, name)
    }

    /// The next `n` restart requests are answered 500 and change nothing.
    pub fn refuse_next_restarts(&self, n: u32) {
        self.refuse.store(n, Ordering::SeqCst);
    }

    fn hold_sender(&self) -> &tokio::sync::watch::Sender<bool> {
        self.hold
            .get_or_init(|| tokio::sync::watch::channel(false).0)
    }

    /// While `true`, an accepted restart request is not answered (the restart goes on).
    pub fn hold_answers(&self, hold: bool) {
        let _ = self.hold_sender().send(hold);
    }

    /// The route to merge into the API server's router.
    pub fn router(self: &Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route(
                crate::cluster::kubevirt_lite::RESTART_PATH,
                put(restart_route),
            )
            .with_state(self.clone())
    }

    async fn accept(self: &Arc<Self>, ns: &str, name: &str) -> Result<(), (StatusCode, String)> {
        let internal = |e: kube::Error| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
        let key = (ns.to_string(), name.to_string());
        bump(&self.requested, &key);
        let took = self
            .refuse
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if took {
            return Err((
                StatusCode::INTERNAL_SERVER_ERROR,
                "injected: restart refused".into(),
            ));
        }
        let client = self
            .client
            .get()
            .cloned()
            .ok_or((StatusCode::SERVICE_UNAVAILABLE, "no client yet".to_string()))?;
        let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), ns);
        let vmis: Api<VirtualMachineInstance> = Api::namespaced(client.clone(), ns);
        if vms.get_opt(name).await.map_err(internal)?.is_none() {
            return Err((
                StatusCode::NOT_FOUND,
                format!("virtualmachine {name} not found"),
            ));
        }
        let old = vmis.get_opt(name).await.map_err(internal)?;
        let old_uid = old.as_ref().and_then(|v| v.uid()).unwrap_or_default();
        let requests = json!({"status": {"stateChangeRequests": [
            {"action": "Stop", "uid": old_uid}, {"action": "Start"}
        ]}});
        vms.patch_status(name, &PatchParams::default(), &Patch::Merge(&requests))
            .await
            .map_err(internal)?;
        let me = self.clone();
        let (ns, name) = (ns.to_string(), name.to_string());
        tokio::spawn(async move {
            if let Err(e) = me.replace_vmi(&client, &ns, &name, old).await {
                tracing::error!(vm = %format!("{ns}/{name}"), error = %e, "host restart failed");
            }
        });
        Ok(())
    }

    /// What virt-controller and the guest do after a restart was accepted.
    async fn replace_vmi(
        &self,
        client: &Client,
        ns: &str,
        name: &str,
        old: Option<VirtualMachineInstance>,
    ) -> anyhow::Result<()> {
        tokio::time::sleep(STOPPING).await;
        let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), ns);
        let vmis: Api<VirtualMachineInstance> = Api::namespaced(client.clone(), ns);
        let vm = vms.get(name).await?;
        let keys = cloud_init_keys(client, &vm).await?;
        let old = old.ok_or_else(|| anyhow::anyhow!("no VMI to restart"))?;
        match vmis.delete(name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        let mut fresh = VirtualMachineInstance::new(name, old.spec.clone());
        fresh.metadata.namespace = Some(ns.to_string());
        fresh.metadata.labels = old.metadata.labels.clone();
        fresh.metadata.annotations = old.metadata.annotations.clone();
        vmis.create(&PostParams::default(), &fresh).await?;
        let mut status = serde_json::to_value(&old.status)?;
        status["phase"] = json!("Scheduled");
        status["conditions"] = json!([{"type": "AgentConnected", "status": "False"}]);
        vmis.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status.clone()})),
        )
        .await?;
        // The guest boots: cloud-init adds the keys, then the agent connects.
        let node = old
            .status
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        let dir = self
            .nodes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&node)
            .cloned();
        if let Some(dir) = dir {
            let base = dir.join(format!("{ns}_{name}"));
            for (user, lines) in &keys {
                add_authorized_keys(&base, user, lines)?;
            }
        }
        tokio::time::sleep(BOOTING).await;
        status["phase"] = json!("Running");
        status["conditions"] = json!([{"type": "AgentConnected", "status": "True"}]);
        vmis.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await?;
        let clear = json!({"status": {"stateChangeRequests": null}});
        vms.patch_status(name, &PatchParams::default(), &Patch::Merge(&clear))
            .await?;
        bump(&self.done, &(ns.to_string(), name.to_string()));
        tracing::info!(vm = %format!("{ns}/{name}"), users = keys.len(), "host VM restarted with its cloud-init keys");
        Ok(())
    }
}

async fn restart_route(
    State(kv): State<Arc<HostKubevirt>>,
    UrlPath((ns, name)): UrlPath<(String, String)>,
) -> Response {
    if let Err((code, msg)) = kv.accept(&ns, &name).await {
        let body = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                          "message": msg, "code": code.as_u16()});
        return (code, axum::Json(body)).into_response();
    }
    // Held: the client waits for an answer although the restart goes on.
    let mut hold = kv.hold_sender().subscribe();
    let _ = hold.wait_for(|held| !*held).await;
    (StatusCode::ACCEPTED, axum::Json(json!({}))).into_response()
}

/// The user data of the VM's first cloud-init volume (NoCloud or ConfigDrive), following
/// a Secret reference.
pub async fn user_data(client: &Client, vm: &VirtualMachine) -> anyhow::Result<Option<String>> {
    let ns = vm.namespace().unwrap_or_default();
    let Some(source) = vm_volumes(vm).iter().find_map(|v| {
        v.get("cloudInitNoCloud")
            .or_else(|| v.get("cloudInitConfigDrive"))
    }) else {
        return Ok(None);
    };
    if let Some(text) = inline_user_data(source).map_err(anyhow::Error::msg)? {
        return Ok(Some(text));
    }
    let secret = source
        .get("userDataSecretRef")
        .or_else(|| source.get("secretRef"))
        .and_then(|r| r.get("name"))
        .and_then(Value::as_str);
    let Some(secret) = secret else {
        return Ok(None);
    };
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    let s = secrets.get(secret).await?;
    let data = s.data.unwrap_or_default();
    let value = data
        .get("userdata")
        .or_else(|| data.get("userData"))
        .ok_or_else(|| anyhow::anyhow!("Secret {secret} has no userdata key"))?;
    Ok(Some(String::from_utf8(value.0.clone())?))
}

/// `users[].ssh_authorized_keys` of the VM's cloud-init user data, by user.
async fn cloud_init_keys(
    client: &Client,
    vm: &VirtualMachine,
) -> anyhow::Result<BTreeMap<String, Vec<String>>> {
    let Some(text) = user_data(client, vm).await? else {
        return Ok(BTreeMap::new());
    };
    // The same reading of cloud-config as kubevirt-lite's.
    parse_cloud_config_keys(&text).map_err(anyhow::Error::msg)
}

/// Append the lines `user`'s authorized_keys (under a host agent's `base`) lacks.
fn add_authorized_keys(base: &Path, user: &str, lines: &[String]) -> anyhow::Result<()> {
    let home = if user == "root" {
        base.join("root")
    } else {
        base.join("home").join(user)
    };
    if !home.is_dir() {
        return Ok(());
    }
    let path = home.join(".ssh").join("authorized_keys");
    std::fs::create_dir_all(home.join(".ssh"))?;
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    for l in lines {
        if !have.lines().any(|h| h.trim() == l.trim()) {
            writeln!(f, "{l}")?;
        }
    }
    Ok(())
}
