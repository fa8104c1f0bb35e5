//! What the real-control-plane test binaries share (tests/real_control_plane.rs,
//! tests/real_control_plane_namespaced.rs): the lab (one per binary), the admin client,
//! builders of objects, waits, reads of what a guest holds, and the API server's audit log.
#![allow(dead_code)] // each binary uses its own part of it
#![allow(clippy::disallowed_methods)] // tests may block: clippy.toml's file-system rule is for src/
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use guestcred_lab::cluster::{self, ControlPlane, LabState, UpOptions, real};
use guestcred_lab::guest::default_cache_dir;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{ApiResource, DynamicObject, PostParams};
use kube::core::GroupVersionKind;
use kube::{Api, Client};
use serde_json::{Value, json};

pub const NODES: usize = 1;
pub const REPLICAS: usize = 2;
/// A guest flow: shim + agent + a 128 MiB TCG guest, with a leader change in between.
pub const FLOW_TIMEOUT: Duration = Duration::from_secs(240);

pub struct Lab {
    pub state: LabState,
    pub admin: PathBuf,
}

static LAB: tokio::sync::OnceCell<Result<Lab, String>> = tokio::sync::OnceCell::const_new();

/// The test binary's lab (1 node, 2 guests in `default`, 2 controller replicas, the chart
/// installed by helm), started by the first test that asks; in namespaced mode when
/// `watch_namespaces` names namespaces (a binary always asks with the same ones). Every
/// test fails with the reason when it could not start.
pub async fn lab(watch_namespaces: &[&str]) -> &'static Lab {
    let lab = LAB
        .get_or_init(|| async {
            let t0 = Instant::now();
            let dir =
                std::env::temp_dir().join(format!("guestcred-real-cp-{}", std::process::id()));
            let opts = UpOptions {
                nodes: NODES,
                vms_per_node: 2,
                state_dir: dir.clone(),
                cache_dir: default_cache_dir(),
                with_controller: true,
                controller_replicas: REPLICAS,
                shim_port: 0,
                guestcred_bin: Some(env!("CARGO_BIN_EXE_guestcred").into()),
                lab_bin: Some(lab_bin()),
                owner_pid: Some(std::process::id()),
                control_plane: ControlPlane::Real,
                watch_namespaces: watch_namespaces.iter().map(|s| s.to_string()).collect(),
                ..UpOptions::default()
            };
            let state = cluster::up(&opts)
                .await
                .map_err(|e| format!("the real control plane lab did not come up: {e}"))?
                .into_state();
            eprintln!(
                "real control plane lab up in {:.1}s ({})",
                t0.elapsed().as_secs_f64(),
                dir.display()
            );
            Ok(Lab {
                admin: state.kubeconfig.clone(),
                state,
            })
        })
        .await;
    match lab {
        Ok(lab) => lab,
        Err(e) => panic!("{e}"),
    }
}

/// The lab a test of this binary already started.
pub fn started() -> &'static Lab {
    LAB.get()
        .and_then(|l| l.as_ref().ok())
        .expect("the lab was started by this test")
}

/// guestcred-lab is a binary of another package: next to the test's target dir.
pub fn lab_bin() -> PathBuf {
    let guestcred = PathBuf::from(env!("CARGO_BIN_EXE_guestcred"));
    let bin = guestcred.with_file_name("guestcred-lab");
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build -p guestcred-lab` (make test does)",
        bin.display()
    );
    bin
}

pub async fn admin() -> Client {
    real::client_from(&started().admin)
        .await
        .expect("admin client")
}

pub fn unique(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}-{}", N.fetch_add(1, Ordering::Relaxed))
}

pub async fn namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    api.create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
}

pub fn gvk(kind: &str) -> ApiResource {
    let plural = match kind {
        "GuestPasswordReset" => "guestpasswordresets",
        "KeypairRebuild" => "keypairrebuilds",
        other => panic!("{other}"),
    };
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("guestcred.io", "v1alpha1", kind),
        plural,
    )
}

pub fn objects(client: &Client, ns: &str, kind: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &gvk(kind))
}

pub fn object(kind: &str, ns: &str, name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "guestcred.io/v1alpha1", "kind": kind,
        "metadata": {"name": name, "namespace": ns}, "spec": spec,
    }))
    .expect("object")
}

pub async fn create(
    client: &Client,
    ns: &str,
    kind: &str,
    name: &str,
    spec: Value,
) -> DynamicObject {
    objects(client, ns, kind)
        .create(&PostParams::default(), &object(kind, ns, name, spec))
        .await
        .unwrap_or_else(|e| panic!("create {kind} {ns}/{name}: {e}"))
}

pub async fn secret(client: &Client, ns: &str, name: &str, data: &[(&str, &str)]) {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let string_data: BTreeMap<&str, &str> = data.iter().copied().collect();
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns}, "stringData": string_data,
    }))
    .unwrap();
    api.create(&PostParams::default(), &s)
        .await
        .expect("create secret");
}

/// A new namespace, named `prefix` and a unique suffix ([`unique`]); its name.
pub async fn new_namespace(client: &Client, prefix: &str) -> String {
    let ns = unique(prefix);
    namespace(client, &ns).await;
    ns
}

/// The spec of a reset of root's password on `vm` from Secret `secret` (key `password`).
pub fn root_reset_from(vm: &str, secret: &str) -> Value {
    json!({"target": {"vmName": vm}, "user": "root",
           "password": {"secretRef": {"name": secret, "key": "password"}}})
}

/// Secret `secret_name` holding `password`, and reset `name` of root's password on lab
/// VM `vm` from it, both in `ns`: waits until the reset is Ready and checks that the
/// guest's root has the password.
pub async fn reset_root_from_secret(
    client: &Client,
    ns: &str,
    name: &str,
    (vm, secret_name, password): (&str, &str, &str),
) {
    secret(client, ns, secret_name, &[("password", password)]).await;
    let spec = root_reset_from(vm, secret_name);
    create(client, ns, "GuestPasswordReset", name, spec).await;
    wait_ready(client, ns, "GuestPasswordReset", name).await;
    assert!(
        verifies(password, &root_hash(vm).await),
        "{vm} root password not set"
    );
}

/// Polls `f` until it returns Some, or panics naming `what` and the last value seen.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match f().await {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

pub fn ready(obj: &DynamicObject) -> Option<&Value> {
    obj.data
        .pointer("/status/conditions")
        .and_then(Value::as_array)?
        .iter()
        .find(|c| c["type"] == "Ready")
}

/// Waits until the object's Ready condition is True; returns it.
pub async fn wait_ready(client: &Client, ns: &str, kind: &str, name: &str) -> DynamicObject {
    let api = objects(client, ns, kind);
    eventually(&format!("{kind} {ns}/{name} Ready"), FLOW_TIMEOUT, || {
        let api = api.clone();
        async move {
            let obj = api.get(name).await.map_err(|e| e.to_string())?;
            match ready(&obj) {
                Some(c) if c["status"] == "True" => Ok(obj),
                _ => Err(obj.data["status"].to_string()),
            }
        }
    })
    .await
}

/// What a guest shows, read through its agent (guest-exec).
pub async fn guest_file(vm: &str, path: &str) -> String {
    let out = cluster::exec(
        &started().state.state_dir,
        vm,
        &["cat".to_string(), path.to_string()],
    )
    .await
    .unwrap_or_else(|e| panic!("read {path} in {vm}: {e}"));
    assert_eq!(out.exit_code, 0, "cat {path} in {vm}: {}", out.stderr);
    out.stdout
}

pub async fn root_hash(vm: &str) -> String {
    let shadow = guest_file(vm, "/etc/shadow").await;
    shadow
        .lines()
        .find_map(|l| l.strip_prefix("root:"))
        .and_then(|rest| rest.split(':').next())
        .unwrap_or_default()
        .to_string()
}

/// Does `hash` verify `password`? (The system's crypt(3), through python3.)
pub fn verifies(password: &str, hash: &str) -> bool {
    guestcred_lab::testing::verifies(password, hash)
}

// ---- the audit log --------------------------------------------------------------------

/// One request as the API server's audit log shows it (last stage per auditID).
#[derive(Clone, Debug)]
pub struct Audited {
    pub user: String,
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub name: String,
    pub namespace: String,
    pub code: u16,
    /// responseStatus.message: tells an RBAC denial ("cannot <verb> resource") from an
    /// admission refusal with the same 403 (e.g. a terminating namespace).
    pub message: String,
}

impl Audited {
    pub fn rbac_denied(&self) -> bool {
        self.code == 403 && self.message.contains(" cannot ")
    }
}

pub fn audit() -> Vec<Audited> {
    let path = real::audit_log(&started().state.state_dir);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut by_id: BTreeMap<String, Audited> = BTreeMap::new();
    for line in text.lines() {
        let Ok(e) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let s = |p: &str| {
            e.pointer(p)
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string()
        };
        let a = Audited {
            user: s("/user/username"),
            verb: s("/verb"),
            group: s("/objectRef/apiGroup"),
            resource: s("/objectRef/resource"),
            subresource: s("/objectRef/subresource"),
            name: s("/objectRef/name"),
            namespace: s("/objectRef/namespace"),
            code: e
                .pointer("/responseStatus/code")
                .and_then(Value::as_u64)
                .unwrap_or(0) as u16,
            message: s("/responseStatus/message"),
        };
        by_id.insert(s("/auditID"), a);
    }
    by_id.into_values().collect()
}

pub fn sa_user(ns: &str, sa: &str) -> String {
    format!("system:serviceaccount:{ns}:{sa}")
}

pub fn lab_admin_path() -> PathBuf {
    started().admin.clone()
}

// ---- a node of simulated guests -------------------------------------------------------

/// The node of simulated guests: a real [`ShimApp`](guestcred::shim::server::ShimApp)
/// with the lab's mutual TLS on the lab's shim port, its Pod owned by the chart's shim
/// DaemonSet (so the controller finds it as it finds every shim), answered by a
/// [`SimAgent`](guestcred_lab::simagent::SimAgent) instead of qemu-ga. For runs whose size
/// is what is tested (over 100 targets); the real guests stay the proof that a guest
/// really changes.
pub struct SimNode {
    pub name: String,
    pub agent: std::sync::Arc<guestcred_lab::simagent::SimAgent>,
}

pub const SIM_NODE: &str = "node-sim";
/// Its shim's address: loopback, apart from the lab nodes' 127.0.0.<10+i>.
const SIM_NODE_IP: &str = "127.0.0.200";

static SIM: tokio::sync::OnceCell<SimNode> = tokio::sync::OnceCell::const_new();

/// This binary's node of simulated guests, started by the first test that asks (its
/// shim runs on a runtime of its own, so it outlives that test).
pub async fn sim_node() -> &'static SimNode {
    SIM.get_or_init(|| async {
        use guestcred::shim::{auth::Auth, server};
        use guestcred::tls::server::ReloadingServerConfig;
        use guestcred_lab::simagent::{OpLatencies, SimAgent, SimAgentOptions};
        let state = &started().state;
        let agent = std::sync::Arc::new(SimAgent::new(SimAgentOptions {
            // A host qemu-ga's latencies: plaintext passwords in ~30 ms.
            latency: OpLatencies::host_qemu_ga(),
            ..SimAgentOptions::default()
        }));
        let app = server::ShimApp::new(agent.clone(), SIM_NODE).backend("simulated");
        let tls = ReloadingServerConfig::new(state.tls().shim_server_files())
            .expect("the lab's shim TLS files");
        let auth = Auth::client_cert(vec![guestcred::tls::DEFAULT_ALLOWED_CLIENT.into()], None);
        let addr = (SIM_NODE_IP, state.shim_port);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("sim-node-shim".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::bind(addr).await {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = tx.send(Err(format!("bind {addr:?}: {e}")));
                            return;
                        }
                    };
                    let _ = tx.send(Ok(()));
                    let opts = server::ServeOptions::new(std::sync::Arc::new(tls));
                    let _ = server::serve_with(
                        listener,
                        app.router(auth),
                        opts,
                        std::future::pending(),
                    )
                    .await;
                });
            })
            .expect("shim thread");
        rx.recv()
            .expect("the simulated node's shim thread")
            .unwrap_or_else(|e| panic!("the simulated node's shim: {e}"));
        real::create_node_with_shim(&admin().await, SIM_NODE, &state.shim_namespace, SIM_NODE_IP)
            .await
            .expect("the simulated node and its shim Pod");
        SimNode {
            name: SIM_NODE.into(),
            agent,
        }
    })
    .await
}

/// Creates VMs `<prefix>-<i>` (VM + VMI, Running, agent connected) on the simulated node
/// in `ns`, labelled `labels`; returns their names.
pub async fn sim_vms(
    client: &Client,
    ns: &str,
    prefix: &str,
    count: usize,
    labels: &[(&str, &str)],
) -> Vec<String> {
    let node = sim_node().await;
    let mut names = Vec::with_capacity(count);
    for i in 0..count {
        let name = format!("{prefix}-{i:03}");
        let mut vm = guestcred_lab::kubevirt::vm(ns, &name, &node.name);
        for (k, v) in labels {
            vm = vm.label(k, v);
        }
        vm.create(client)
            .await
            .unwrap_or_else(|e| panic!("create VM {ns}/{name}: {e}"));
        node.agent.add_domain(ns, &name);
        names.push(name);
    }
    names
}
