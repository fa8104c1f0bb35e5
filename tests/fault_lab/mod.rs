//! The fault lab shared by tests/faults.rs and tests/soak.rs: the emulator, one node whose
//! shim can be killed and restarted on the same address, real qemu-ga agents, and a
//! controller that can be killed and restarted; plus fixtures and the secret scan.
// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]
use guestcred::api::kubevirt::VirtualMachineInstance;
use guestcred::api::password::{GeneratePolicy, PasswordSource};
use guestcred::api::{
    GuestPasswordReset, GuestPasswordResetSpec, Phase, RolloutSpec, SecretKeyRef, TargetSpec,
};
use guestcred::controller::context::EngineSettings;
use guestcred::controller::shims::ShimAccess;
use guestcred::shim::auth::Auth;
use guestcred::shim::qga::QgaSocketAgent;
use guestcred::shim::server::{self, ShimApp};
use guestcred_lab::apiserver::ApiServer;
use guestcred_lab::hostqga::{HostQga, HostQgaOptions};
use guestcred_lab::kubevirt::{VmDescription, create_node_with_shim, install_crds};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{ListParams, ObjectMeta, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const NS: &str = "default";
pub const SHIM_NS: &str = "guestcred-system";
pub const NODE: &str = "node-1";
pub const WAIT: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------------
// The fault lab.

pub struct FaultLab {
    pub api: ApiServer,
    pub client: Client,
    pub dir: tempfile::TempDir,
    pub shim_ip: String,
    pub port: u16,
    /// The shim "process": its own runtime, so killing it drops every connection too.
    shim: Option<tokio::runtime::Runtime>,
    pub shim_app: ShimApp,
    controller: Option<tokio::task::JoinHandle<()>>,
    metrics: std::sync::Arc<guestcred::metrics::ControllerMetrics>,
    pub access: ShimAccess,
}

/// Each lab gets its own loopback address, so the tests of this binary run side by side.
pub fn next_ip() -> String {
    static N: AtomicU8 = AtomicU8::new(0);
    format!("127.0.2.{}", 10 + N.fetch_add(1, Ordering::SeqCst))
}

impl FaultLab {
    pub async fn start() -> FaultLab {
        log_buffer();
        let api = ApiServer::new();
        let client = api.client();
        install_crds(&client).await.expect("crds");
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
        let ns = serde_json::from_value(json!({"metadata": {"name": SHIM_NS}})).expect("ns");
        namespaces
            .create(&Default::default(), &ns)
            .await
            .expect("ns");
        let dir = tempfile::Builder::new()
            .prefix("gcflt")
            .tempdir()
            .expect("dir");
        std::fs::create_dir_all(dir.path().join(NODE)).expect("sockets");
        let shim_ip = next_ip();
        let template = format!(
            "{}/{{namespace}}_{{name}}/qga.sock",
            dir.path().join(NODE).display()
        );
        let agent = Arc::new(QgaSocketAgent::new(template, Duration::from_secs(2)));
        let shim_app = ShimApp::new(agent, Auth::Disabled);
        let listener = tokio::net::TcpListener::bind((shim_ip.as_str(), 0))
            .await
            .expect("shim address");
        let port = listener.local_addr().expect("addr").port();
        create_node_with_shim(&client, NODE, SHIM_NS, &shim_ip)
            .await
            .expect("node");
        let access = ShimAccess {
            namespace: Some(SHIM_NS.into()),
            port,
            scheme: "http".into(),
            token: None,
            tls: None,
            request_timeout: Duration::from_secs(6),
        };
        let mut lab = FaultLab {
            api,
            client,
            dir,
            shim_ip,
            port,
            shim: None,
            shim_app,
            controller: None,
            metrics: Default::default(),
            access,
        };
        lab.serve_shim(listener);
        lab.start_controller();
        lab
    }

    pub fn serve_shim(&mut self, listener: tokio::net::TcpListener) {
        let app = self.shim_app.router();
        let listener = listener.into_std().expect("std listener");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("shim")
            .enable_all()
            .build()
            .expect("shim runtime");
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            let _ = server::serve(listener, app, std::future::pending()).await;
        });
        self.shim = Some(rt);
    }

    /// Kill the shim process: its listener closes and calls in flight are cut off.
    pub fn kill_shim(&mut self) {
        if let Some(rt) = self.shim.take() {
            rt.shutdown_background();
        }
    }

    /// Start the shim again on the same address, as the DaemonSet's restarted pod would.
    pub async fn restart_shim(&mut self) {
        let start = Instant::now();
        let listener = loop {
            match tokio::net::TcpListener::bind((self.shim_ip.as_str(), self.port)).await {
                Ok(l) => break l,
                Err(e) if start.elapsed() < Duration::from_secs(10) => {
                    tracing::debug!(error = %e, "shim address still busy");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("rebinding the shim address: {e}"),
            }
        };
        self.serve_shim(listener);
    }

    pub fn start_controller(&mut self) {
        let settings = EngineSettings {
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(1),
            status_flush_interval: Duration::from_millis(50),
        };
        self.controller = Some(tokio::spawn(guestcred::controller::start(
            self.client.clone(),
            self.access.clone(),
            "guestcred-faults",
            settings,
            self.metrics.clone(),
            std::future::pending(),
        )));
    }

    /// Kill the controller at once, like a crash: calls in flight are dropped.
    pub fn kill_controller(&mut self) {
        if let Some(c) = self.controller.take() {
            c.abort();
        }
    }

    pub fn controller_alive(&self) -> bool {
        self.controller.as_ref().is_some_and(|c| !c.is_finished())
    }

    pub async fn add_vm(&self, desc: &VmDescription) -> HostQga {
        desc.create(&self.client).await.expect("vm objects");
        self.start_agent(desc)
    }

    pub fn start_agent(&self, desc: &VmDescription) -> HostQga {
        let name = format!("{}_{}", desc.namespace, desc.name);
        let opts = HostQgaOptions::default().user("alice");
        HostQga::start_with(&self.dir.path().join(NODE), &name, &opts).unwrap_or_else(|e| {
            panic!("qemu-ga for {name} must start (root, unshare, overlayfs, qemu-ga: scripts/install-deps.sh): {e}")
        })
    }

    pub async fn apply<K>(&self, obj: &K)
    where
        K: kube::Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
            + Clone
            + std::fmt::Debug
            + serde::Serialize
            + serde::de::DeserializeOwned,
    {
        let api: Api<K> = Api::namespaced(self.client.clone(), NS);
        api.patch(
            &obj.name_any(),
            &PatchParams::apply("test").force(),
            &Patch::Apply(obj),
        )
        .await
        .expect("apply");
    }

    pub async fn reset(&self, name: &str) -> GuestPasswordReset {
        Api::<GuestPasswordReset>::namespaced(self.client.clone(), NS)
            .get(name)
            .await
            .expect("reset")
    }

    /// Poll until `pred` holds; fails with the last status after `WAIT`.
    pub async fn wait_for(
        &self,
        name: &str,
        what: &str,
        pred: impl Fn(&GuestPasswordReset) -> bool,
    ) -> GuestPasswordReset {
        let start = Instant::now();
        loop {
            let r = self.reset(name).await;
            if pred(&r) {
                return r;
            }
            assert!(
                start.elapsed() < WAIT,
                "{name}: no {what} within {WAIT:?}; status: {:#?}",
                r.status
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn wait_finished(&self, name: &str) -> GuestPasswordReset {
        self.wait_for(name, "terminal phase", |r| {
            r.status.as_ref().is_some_and(|s| {
                matches!(
                    s.run.phase,
                    Some(Phase::Succeeded | Phase::Failed | Phase::PartiallySucceeded)
                )
            })
        })
        .await
    }

    pub async fn set_vmi_status(&self, vm: &str, status: serde_json::Value) {
        let vmis: Api<VirtualMachineInstance> = Api::namespaced(self.client.clone(), NS);
        vmis.patch_status(
            vm,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .expect("vmi status");
    }

    /// Point the shim pod at `ip` (where nothing may listen), as after a network partition.
    pub async fn set_shim_pod_ip(&self, ip: &str) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), SHIM_NS);
        let name = format!("guestcred-shim-{NODE}");
        pods.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"podIP": ip}})),
        )
        .await
        .expect("pod status");
    }

    /// Generated passwords by VM: (resourceVersion, value) of each output Secret.
    pub async fn output_passwords(&self) -> BTreeMap<String, (String, String)> {
        self.output_secrets("guestcred.io/reset").await
    }

    /// The same, for the reset `name` only.
    pub async fn output_passwords_of(&self, name: &str) -> BTreeMap<String, (String, String)> {
        self.output_secrets(&format!("guestcred.io/reset={name}"))
            .await
    }

    async fn output_secrets(&self, selector: &str) -> BTreeMap<String, (String, String)> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), NS);
        let list = secrets
            .list(&ListParams::default().labels(selector))
            .await
            .expect("output secrets");
        list.items
            .into_iter()
            .map(|s| {
                let vm = s
                    .labels()
                    .get("guestcred.io/vm")
                    .cloned()
                    .unwrap_or_default();
                let rv = s.resource_version().unwrap_or_default();
                let pw = s
                    .data
                    .as_ref()
                    .and_then(|d| d.get("password"))
                    .map(|b| String::from_utf8_lossy(&b.0).to_string())
                    .unwrap_or_default();
                (vm, (rv, pw))
            })
            .collect()
    }

    /// Everything the operator wrote that a user or a log pipeline can read.
    pub async fn everything_visible(&self) -> String {
        let mut all = String::from_utf8_lossy(&log_buffer().lock().expect("logs")).to_string();
        all.push_str(&panic_output().lock().expect("panics").join("\n"));
        let resets: Api<GuestPasswordReset> = Api::all(self.client.clone());
        for r in resets.list(&ListParams::default()).await.expect("resets") {
            all.push_str(&serde_json::to_string(&r).expect("json"));
        }
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::all(self.client.clone());
        for e in events.list(&ListParams::default()).await.expect("events") {
            all.push_str(&serde_json::to_string(&e).expect("json"));
        }
        let core: Api<k8s_openapi::api::core::v1::Event> = Api::all(self.client.clone());
        for e in core.list(&ListParams::default()).await.expect("events") {
            all.push_str(&serde_json::to_string(&e).expect("json"));
        }
        all.push_str(&self.shim_app.metrics().encode());
        all.push_str(&self.metrics.encode());
        all
    }

    pub async fn assert_not_leaked(&self, secrets: &[&str]) {
        let all = self.everything_visible().await;
        for s in secrets {
            assert!(
                !all.contains(s),
                "a secret leaked into logs, Events, status, metrics or panic output"
            );
        }
    }
}

impl Drop for FaultLab {
    fn drop(&mut self) {
        self.kill_controller();
        self.kill_shim();
    }
}

// ---------------------------------------------------------------------------------------
// Fixtures and checks.

pub fn reset(name: &str, target: TargetSpec, password: PasswordSource) -> GuestPasswordReset {
    let mut r = GuestPasswordReset::new(
        name,
        GuestPasswordResetSpec {
            target,
            user: Some("alice".into()),
            password,
            rollout: RolloutSpec::default(),
        },
    );
    r.metadata.namespace = Some(NS.into());
    r
}

pub fn one(vm: &str) -> TargetSpec {
    TargetSpec {
        vm_name: Some(vm.into()),
        selector: None,
    }
}

pub fn labelled(value: &str) -> TargetSpec {
    TargetSpec {
        vm_name: None,
        selector: Some(
            serde_json::from_value(json!({"matchLabels": {"bulk": value}})).expect("selector"),
        ),
    }
}

pub fn generated() -> PasswordSource {
    PasswordSource {
        generate: Some(GeneratePolicy {
            length: 24,
            charset: Default::default(),
        }),
        ..Default::default()
    }
}

pub fn from_secret(name: &str) -> PasswordSource {
    PasswordSource {
        secret_ref: Some(SecretKeyRef {
            name: name.into(),
            key: "password".into(),
            namespace: None,
        }),
        ..Default::default()
    }
}

pub fn secret(name: &str, value: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([("password".into(), value.into())])),
        ..Default::default()
    }
}

pub fn phase(r: &GuestPasswordReset) -> Option<Phase> {
    r.status.as_ref().and_then(|s| s.run.phase)
}

pub fn first_target_reason(r: &GuestPasswordReset) -> Option<String> {
    r.status
        .as_ref()
        .and_then(|s| s.run.targets.first())
        .and_then(|t| t.reason.clone())
}

pub fn first_target_message(r: &GuestPasswordReset) -> String {
    r.status
        .as_ref()
        .and_then(|s| s.run.targets.first())
        .and_then(|t| t.message.clone())
        .unwrap_or_default()
}

pub fn signal(qga: &HostQga, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &qga.pid().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {}", qga.pid());
}

/// Does `hash` (from /etc/shadow) verify `password`? Uses the system's crypt(3).
pub fn verifies(password: &str, hash: &str) -> bool {
    let out = Command::new("python3")
        .args([
            "-W",
            "ignore",
            "-c",
            "import crypt,sys; print(crypt.crypt(sys.argv[1], sys.argv[2]) == sys.argv[2])",
            password,
            hash,
        ])
        .output()
        .expect("python3 with the crypt module verifies hashes");
    String::from_utf8_lossy(&out.stdout).trim() == "True"
}

pub fn hash_of(qga: &HostQga) -> String {
    qga.shadow_hash("alice")
        .expect("shadow")
        .unwrap_or_default()
}

/// Captured log output of this test binary (all levels, all crates).
pub fn log_buffer() -> Arc<Mutex<Vec<u8>>> {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_writer(move || Sink(sink.clone()))
            .with_ansi(false)
            .try_init();
        // Panic messages too: they are output a user sees.
        let panics = panic_output();
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            panics
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(info.to_string());
            previous(info);
        }));
        buf
    })
    .clone()
}

pub fn panic_output() -> Arc<Mutex<Vec<String>>> {
    static PANICS: OnceLock<Arc<Mutex<Vec<String>>>> = OnceLock::new();
    PANICS.get_or_init(Default::default).clone()
}

pub struct Sink(Arc<Mutex<Vec<u8>>>);
impl Write for Sink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
