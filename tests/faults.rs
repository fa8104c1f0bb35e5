//! Faults during work: the shim killed mid-call and restarted, the controller killed
//! mid-bulk and restarted, hung and paused agents, VMs paused, deleted and restarted
//! mid-operation, 409s on status writes, 410s on watches, and the shim unreachable for a
//! while. Every object reaches the right terminal state within its deadline, generated
//! passwords are applied once each, and no secret leaks into logs, Events, status,
//! metrics or panic output. (libvirtd restarts: `shim_reconnects_after_libvirtd_restarts`
//! in tests/shim_libvirt.rs, on the real-guest lab.)
//!
//! Each test has its own fault lab (`FaultLab`): the emulator, one node whose shim can be
//! killed and restarted on the same address, real qemu-ga agents, and a controller that
//! can be killed and restarted.
use guestcred::api::kubevirt::VirtualMachineInstance;
use guestcred::api::password::{GeneratePolicy, PasswordSource};
use guestcred::api::{
    GuestPasswordReset, GuestPasswordResetSpec, Phase, RolloutSpec, SecretKeyRef, TargetSpec,
    TargetState,
};
use guestcred::controller::context::EngineSettings;
use guestcred::controller::shims::ShimAccess;
use guestcred::lab::apiserver::ApiServer;
use guestcred::lab::hostqga::{HostQga, HostQgaOptions};
use guestcred::lab::kubevirt::{VmDescription, create_node_with_shim, install_crds, vm};
use guestcred::shim::auth::Auth;
use guestcred::shim::qga::QgaSocketAgent;
use guestcred::shim::server::{self, ShimApp};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;
use std::collections::BTreeMap;
use std::io::Write;
use std::process::Command;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const NS: &str = "default";
const SHIM_NS: &str = "guestcred-system";
const NODE: &str = "node-1";
const WAIT: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------------
// The fault lab.

struct FaultLab {
    api: ApiServer,
    client: Client,
    dir: tempfile::TempDir,
    shim_ip: String,
    port: u16,
    /// The shim "process": its own runtime, so killing it drops every connection too.
    shim: Option<tokio::runtime::Runtime>,
    shim_app: ShimApp,
    controller: Option<tokio::task::JoinHandle<()>>,
    access: ShimAccess,
}

/// Each lab gets its own loopback address, so the tests of this binary run side by side.
fn next_ip() -> String {
    static N: AtomicU8 = AtomicU8::new(0);
    format!("127.0.2.{}", 10 + N.fetch_add(1, Ordering::SeqCst))
}

impl FaultLab {
    async fn start() -> FaultLab {
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
            access,
        };
        lab.serve_shim(listener);
        lab.start_controller();
        lab
    }

    fn serve_shim(&mut self, listener: tokio::net::TcpListener) {
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
    fn kill_shim(&mut self) {
        if let Some(rt) = self.shim.take() {
            rt.shutdown_background();
        }
    }

    /// Start the shim again on the same address, as the DaemonSet's restarted pod would.
    async fn restart_shim(&mut self) {
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

    fn start_controller(&mut self) {
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
            std::future::pending(),
        )));
    }

    /// Kill the controller at once, like a crash: calls in flight are dropped.
    fn kill_controller(&mut self) {
        if let Some(c) = self.controller.take() {
            c.abort();
        }
    }

    fn controller_alive(&self) -> bool {
        self.controller.as_ref().is_some_and(|c| !c.is_finished())
    }

    async fn add_vm(&self, desc: &VmDescription) -> HostQga {
        desc.create(&self.client).await.expect("vm objects");
        self.start_agent(desc)
    }

    fn start_agent(&self, desc: &VmDescription) -> HostQga {
        let name = format!("{}_{}", desc.namespace, desc.name);
        let opts = HostQgaOptions::default().user("alice");
        HostQga::start_with(&self.dir.path().join(NODE), &name, &opts).unwrap_or_else(|e| {
            panic!("qemu-ga for {name} must start (root, unshare, overlayfs, qemu-ga: scripts/install-deps.sh): {e}")
        })
    }

    async fn apply<K>(&self, obj: &K)
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

    async fn reset(&self, name: &str) -> GuestPasswordReset {
        Api::<GuestPasswordReset>::namespaced(self.client.clone(), NS)
            .get(name)
            .await
            .expect("reset")
    }

    /// Poll until `pred` holds; fails with the last status after `WAIT`.
    async fn wait_for(
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

    async fn wait_finished(&self, name: &str) -> GuestPasswordReset {
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

    async fn set_vmi_status(&self, vm: &str, status: serde_json::Value) {
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
    async fn set_shim_pod_ip(&self, ip: &str) {
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

    async fn output_passwords(&self) -> BTreeMap<String, (String, String)> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), NS);
        let list = secrets
            .list(&ListParams::default().labels("guestcred.io/reset"))
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
    async fn everything_visible(&self) -> String {
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
        all.push_str(&guestcred::metrics::controller().encode());
        all
    }

    async fn assert_not_leaked(&self, secrets: &[&str]) {
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

fn reset(name: &str, target: TargetSpec, password: PasswordSource) -> GuestPasswordReset {
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

fn one(vm: &str) -> TargetSpec {
    TargetSpec {
        vm_name: Some(vm.into()),
        selector: None,
    }
}

fn labelled(value: &str) -> TargetSpec {
    TargetSpec {
        vm_name: None,
        selector: Some(
            serde_json::from_value(json!({"matchLabels": {"bulk": value}})).expect("selector"),
        ),
    }
}

fn generated() -> PasswordSource {
    PasswordSource {
        generate: Some(GeneratePolicy {
            length: 24,
            charset: Default::default(),
        }),
        ..Default::default()
    }
}

fn from_secret(name: &str) -> PasswordSource {
    PasswordSource {
        secret_ref: Some(SecretKeyRef {
            name: name.into(),
            key: "password".into(),
            namespace: None,
        }),
        ..Default::default()
    }
}

fn secret(name: &str, value: &str) -> Secret {
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

fn phase(r: &GuestPasswordReset) -> Option<Phase> {
    r.status.as_ref().and_then(|s| s.run.phase)
}

fn first_target_reason(r: &GuestPasswordReset) -> Option<String> {
    r.status
        .as_ref()
        .and_then(|s| s.run.targets.first())
        .and_then(|t| t.reason.clone())
}

fn first_target_message(r: &GuestPasswordReset) -> String {
    r.status
        .as_ref()
        .and_then(|s| s.run.targets.first())
        .and_then(|t| t.message.clone())
        .unwrap_or_default()
}

fn signal(qga: &HostQga, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &qga.pid().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig} {}", qga.pid());
}

/// Does `hash` (from /etc/shadow) verify `password`? Uses the system's crypt(3).
fn verifies(password: &str, hash: &str) -> bool {
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

fn hash_of(qga: &HostQga) -> String {
    qga.shadow_hash("alice")
        .expect("shadow")
        .unwrap_or_default()
}

/// Captured log output of this test binary (all levels, all crates).
fn log_buffer() -> Arc<Mutex<Vec<u8>>> {
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

fn panic_output() -> Arc<Mutex<Vec<String>>> {
    static PANICS: OnceLock<Arc<Mutex<Vec<String>>>> = OnceLock::new();
    PANICS.get_or_init(Default::default).clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);
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

// ---------------------------------------------------------------------------------------
// The shim.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shim_killed_mid_call_and_restarted_finishes_every_target() {
    let mut lab = FaultLab::start().await;
    let mut agents = Vec::new();
    for i in 0..3 {
        let d = vm(NS, &format!("vm-{i}"), NODE).label("bulk", "shim");
        agents.push(lab.add_vm(&d).await);
    }
    const PW: &str = "Shim-Restart-Canary-31f0";
    lab.apply(&secret("pw", PW)).await;
    // The first agent hangs, so the kill lands while its call is in the shim.
    signal(&agents[0], "-STOP");
    let mut r = reset("bulk", labelled("shim"), from_secret("pw"));
    r.spec.rollout.max_concurrency = 1;
    r.spec.rollout.deadline_seconds = 60;
    lab.apply(&r).await;
    lab.wait_for("bulk", "a call in flight", |r| {
        r.status
            .as_ref()
            .is_some_and(|s| s.run.targets.first().is_some_and(|t| t.attempts >= 1))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    lab.kill_shim();
    signal(&agents[0], "-CONT");
    lab.wait_for("bulk", "ShimUnavailable while the shim is down", |r| {
        first_target_reason(r).as_deref() == Some("ShimUnavailable")
            || first_target_reason(r).as_deref() == Some("AgentTimeout")
    })
    .await;
    lab.restart_shim().await;
    let done = lab.wait_finished("bulk").await;
    assert_eq!(phase(&done), Some(Phase::Succeeded), "{:#?}", done.status);
    for a in &agents {
        assert!(verifies(PW, &hash_of(a)), "{} has the password", a.name());
    }
    assert!(lab.controller_alive());
    lab.assert_not_leaked(&[PW]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_shim_is_retried_until_it_is_back() {
    let lab = FaultLab::start().await;
    let a = lab.add_vm(&vm(NS, "vm-a", NODE)).await;
    const PW: &str = "Unreachable-Shim-Canary-9c4e";
    lab.apply(&secret("pw", PW)).await;
    lab.set_shim_pod_ip("127.0.3.250").await;
    lab.apply(&reset("r", one("vm-a"), from_secret("pw"))).await;
    let r = lab
        .wait_for("r", "ShimUnavailable; retrying", |r| {
            first_target_reason(r).as_deref() == Some("ShimUnavailable")
        })
        .await;
    assert!(
        first_target_message(&r).ends_with("; retrying"),
        "{}",
        first_target_message(&r)
    );
    lab.set_shim_pod_ip(&lab.shim_ip.clone()).await;
    let done = lab.wait_finished("r").await;
    assert_eq!(phase(&done), Some(Phase::Succeeded), "{:#?}", done.status);
    assert!(verifies(PW, &hash_of(&a)));
    lab.assert_not_leaked(&[PW]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shim_gone_for_longer_than_the_deadline_fails_with_deadline_exceeded() {
    let mut lab = FaultLab::start().await;
    let _a = lab.add_vm(&vm(NS, "vm-a", NODE)).await;
    lab.apply(&secret("pw", "Gone-Shim-Canary-0b8d")).await;
    lab.kill_shim();
    let mut r = reset("r", one("vm-a"), from_secret("pw"));
    r.spec.rollout.deadline_seconds = 10;
    lab.apply(&r).await;
    let done = lab.wait_finished("r").await;
    assert_eq!(phase(&done), Some(Phase::Failed));
    assert_eq!(
        first_target_reason(&done).as_deref(),
        Some("DeadlineExceeded")
    );
    assert!(
        first_target_message(&done).contains("shim unreachable"),
        "{}",
        first_target_message(&done)
    );
    assert!(lab.controller_alive());
}

// ---------------------------------------------------------------------------------------
// The controller.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_mid_bulk_applies_each_generated_password_once() {
    let mut lab = FaultLab::start().await;
    let mut agents = BTreeMap::new();
    for i in 0..6 {
        let name = format!("vm-{i}");
        let d = vm(NS, &name, NODE).label("bulk", "gen");
        agents.insert(name, lab.add_vm(&d).await);
    }
    let mut r = reset("gen", labelled("gen"), generated());
    r.spec.rollout.max_concurrency = 1;
    lab.apply(&r).await;
    lab.wait_for("gen", "two targets done", |r| {
        r.status
            .as_ref()
            .is_some_and(|s| s.run.summary.succeeded >= 2)
    })
    .await;
    lab.kill_controller();
    let before = lab.output_passwords().await;
    let done_before: Vec<String> = lab
        .reset("gen")
        .await
        .status
        .expect("status")
        .run
        .targets
        .iter()
        .filter(|t| t.state == TargetState::Succeeded)
        .map(|t| t.vm.clone())
        .collect();
    let hashes_before: BTreeMap<String, String> = done_before
        .iter()
        .map(|vm| (vm.clone(), hash_of(&agents[vm])))
        .collect();
    lab.start_controller();
    let done = lab.wait_finished("gen").await;
    assert_eq!(phase(&done), Some(Phase::Succeeded), "{:#?}", done.status);

    let after = lab.output_passwords().await;
    assert_eq!(
        after.len(),
        agents.len(),
        "one output Secret per VM, none skipped"
    );
    for (vm, (rv, pw)) in &before {
        assert_eq!(
            after.get(vm).map(|(rv, _)| rv),
            Some(rv),
            "{vm}: the stored password was never rewritten"
        );
        assert_eq!(after.get(vm).map(|(_, p)| p), Some(pw));
    }
    for (vm, hash) in &hashes_before {
        assert_eq!(
            &hash_of(&agents[vm]),
            hash,
            "{vm}: finished before the crash, not applied again"
        );
    }
    for (vm, qga) in &agents {
        let (_, pw) = &after[vm];
        assert!(
            verifies(pw, &hash_of(qga)),
            "{vm}: guest has its stored password"
        );
    }
    let pws: Vec<&str> = after.values().map(|(_, p)| p.as_str()).collect();
    lab.assert_not_leaked(&pws).await;
}

// ---------------------------------------------------------------------------------------
// The agent and the VM.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_agent_times_out_and_the_target_finishes_after_resume() {
    let lab = FaultLab::start().await;
    let a = lab.add_vm(&vm(NS, "vm-a", NODE)).await;
    const PW: &str = "Paused-Agent-Canary-e51a";
    lab.apply(&secret("pw", PW)).await;
    signal(&a, "-STOP");
    let mut r = reset("r", one("vm-a"), from_secret("pw"));
    r.spec.rollout.deadline_seconds = 60;
    lab.apply(&r).await;
    lab.wait_for("r", "AgentTimeout; retrying", |r| {
        first_target_reason(r).as_deref() == Some("AgentTimeout")
    })
    .await;
    signal(&a, "-CONT");
    let done = lab.wait_finished("r").await;
    assert_eq!(phase(&done), Some(Phase::Succeeded), "{:#?}", done.status);
    assert!(verifies(PW, &hash_of(&a)));
    lab.assert_not_leaked(&[PW]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_paused_mid_operation_is_retried_until_it_resumes() {
    let lab = FaultLab::start().await;
    let d = vm(NS, "vm-a", NODE);
    let a = lab.add_vm(&d).await;
    const PW: &str = "Paused-Vm-Canary-44d2";
    lab.apply(&secret("pw", PW)).await;
    let paused = json!({"conditions": [
        {"type": "AgentConnected", "status": "True"},
        {"type": "Paused", "status": "True", "reason": "PausedByUser"}
    ]});
    lab.set_vmi_status("vm-a", paused).await;
    signal(&a, "-STOP");
    let mut r = reset("r", one("vm-a"), from_secret("pw"));
    r.spec.rollout.deadline_seconds = 60;
    lab.apply(&r).await;
    let r = lab
        .wait_for("r", "VMNotRunning (paused)", |r| {
            first_target_reason(r).as_deref() == Some("VMNotRunning")
        })
        .await;
    assert!(
        first_target_message(&r).contains("is paused"),
        "{}",
        first_target_message(&r)
    );
    signal(&a, "-CONT");
    lab.set_vmi_status("vm-a", json!({"conditions": d.vmi_status().conditions}))
        .await;
    let done = lab.wait_finished("r").await;
    assert_eq!(phase(&done), Some(Phase::Succeeded), "{:#?}", done.status);
    assert!(verifies(PW, &hash_of(&a)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_deleted_mid_operation_fails_with_vm_not_found() {
    let lab = FaultLab::start().await;
    let d = vm(NS, "vm-a", NODE).phase("Scheduling");
    d.create(&lab.client).await.expect("vm");
    lab.apply(&secret("pw", "Deleted-Vm-Canary-7a10")).await;
    let mut r = reset("r", one("vm-a"), from_secret("pw"));
    r.spec.rollout.deadline_seconds = 60;
    lab.apply(&r).await;
    lab.wait_for("r", "VMNotRunning while it starts", |r| {
        first_target_reason(r).as_deref() == Some("VMNotRunning")
    })
    .await;
    let vmis: Api<VirtualMachineInstance> = Api::namespaced(lab.client.clone(), NS);
    vmis.delete("vm-a", &DeleteParams::default())
        .await
        .expect("delete vmi");
    let done = lab.wait_finished("r").await;
    assert_eq!(phase(&done), Some(Phase::Failed));
    assert_eq!(first_target_reason(&done).as_deref(), Some("VMNotFound"));
    assert!(lab.controller_alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_restarted_mid_operation_gets_the_password_after_it_is_back() {
    let lab = FaultLab::start().await;
    let d = vm(NS, "vm-a", NODE);
    let mut old = lab.add_vm(&d).await;
    const PW: &str = "Restarted-Vm-Canary-c3b9";
    lab.apply(&secret("pw", PW)).await;
    // The VM goes down: agent gone, VMI Scheduling again.
    old.stop().expect("stop the old agent");
    lab.set_vmi_status(
        "vm-a",
        json!({"phase": "Scheduling", "activePods": null, "conditions": [
            {"type": "AgentConnected", "status": "False"}]}),
    )
    .await;
    let mut r = reset("r", one("vm-a"), from_secret("pw"));
    r.spec.rollout.deadline_seconds = 60;
    lab.apply(&r).await;
    lab.wait_for("r", "VMNotRunning while it restarts", |r| {
        first_target_reason(r).as_deref() == Some("VMNotRunning")
    })
    .await;
    // Back: a fresh agent and a Running VMI.
    let fresh = lab.start_agent(&d);
    lab.set_vmi_status(
        "vm-a",
        serde_json::to_value(d.vmi_status()).expect("status"),
    )
    .await;
    let done = lab.wait_finished("r").await;
    assert_eq!(phase(&done), Some(Phase::Succeeded), "{:#?}", done.status);
    assert!(verifies(PW, &hash_of(&fresh)));
}

// ---------------------------------------------------------------------------------------
// The API server.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_write_conflicts_are_retried() {
    let lab = FaultLab::start().await;
    let a = lab.add_vm(&vm(NS, "vm-a", NODE)).await;
    const PW: &str = "Conflict-Canary-2dd7";
    lab.apply(&secret("pw", PW)).await;
    lab.api.faults().conflict_next_status_writes(3);
    lab.apply(&reset("r", one("vm-a"), from_secret("pw"))).await;
    let done = lab.wait_finished("r").await;
    assert_eq!(phase(&done), Some(Phase::Succeeded), "{:#?}", done.status);
    assert!(verifies(PW, &hash_of(&a)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_status_conflicts_never_apply_a_second_generated_password() {
    let lab = FaultLab::start().await;
    let a = lab.add_vm(&vm(NS, "vm-a", NODE)).await;
    // More 409s than one status write retries: the reconcile fails and runs again.
    lab.api.faults().conflict_next_status_writes(15);
    lab.apply(&reset("gen", one("vm-a"), generated())).await;
    let done = lab.wait_finished("gen").await;
    assert_eq!(phase(&done), Some(Phase::Succeeded), "{:#?}", done.status);
    let stored = lab.output_passwords().await;
    assert_eq!(stored.len(), 1);
    let (_, pw) = &stored["vm-a"];
    assert!(
        verifies(pw, &hash_of(&a)),
        "the guest has the stored password"
    );
    lab.assert_not_leaked(&[pw.as_str()]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_watches_are_relisted_and_work_continues() {
    let lab = FaultLab::start().await;
    let a = lab.add_vm(&vm(NS, "vm-a", NODE)).await;
    let b = lab.add_vm(&vm(NS, "vm-b", NODE)).await;
    const PW: &str = "Expired-Watch-Canary-5e6f";
    lab.apply(&secret("pw", PW)).await;
    lab.apply(&reset("first", one("vm-a"), from_secret("pw")))
        .await;
    lab.api.faults().expire_watches();
    lab.apply(&reset("second", one("vm-b"), from_secret("pw")))
        .await;
    lab.api.faults().expire_watches();
    for name in ["first", "second"] {
        let done = lab.wait_finished(name).await;
        assert_eq!(
            phase(&done),
            Some(Phase::Succeeded),
            "{name}: {:#?}",
            done.status
        );
    }
    assert!(verifies(PW, &hash_of(&a)));
    assert!(verifies(PW, &hash_of(&b)));
    assert!(lab.controller_alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_panic_was_seen_in_this_binary_so_far() {
    // Runs alongside the others; every panic message is also scanned for secrets.
    let lab = FaultLab::start().await;
    let _a = lab.add_vm(&vm(NS, "vm-a", NODE)).await;
    lab.apply(&secret("pw", "Panic-Scan-Canary-18ab")).await;
    lab.apply(&reset("r", one("vm-a"), from_secret("pw"))).await;
    lab.wait_finished("r").await;
    let panics = panic_output().lock().expect("panics").clone();
    let ours: Vec<&String> = panics
        .iter()
        .filter(|p| !p.contains("tests/faults.rs"))
        .collect();
    assert!(ours.is_empty(), "product code panicked: {ours:?}");
    lab.assert_not_leaked(&["Panic-Scan-Canary-18ab"]).await;
}
