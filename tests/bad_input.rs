//! Bad input, applied with the real kubectl as a user would: every case ends in a
//! documented reason with a message that says what to fix, the controller keeps running
//! (no panic, no restart), and no secret value shows up in logs, Events or status.
//! docs/bad-input.md lists the cases; keep the two in step.
//!
//! One lab per test binary (emulator served over HTTP for kubectl, one node with a real
//! shim and a real qemu-ga for `vm-a`, the controller in-process); each test applies its
//! own objects, so the cases run side by side. The emulator has no schema validation or
//! CEL (as on a cluster with validation off): every rule the CRD schema states must also
//! be enforced by the controller, which is what these cases check.
use base64::Engine;
use guestcred::controller::context::EngineSettings;
use guestcred::controller::shims::ShimAccess;
use guestcred::shim::auth::Auth;
use guestcred::shim::qga::QgaSocketAgent;
use guestcred::shim::server;
use guestcred_lab::apiserver::{ApiServer, write_kubeconfig};
use guestcred_lab::hostqga::{HostQga, HostQgaOptions};
use guestcred_lab::kubevirt::{VmDescription, create_node_with_shim, install_crds, vm};
use serde_json::{Value, json};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const NS: &str = "default";
const SHIM_NS: &str = "guestcred-system";
const WAIT: Duration = Duration::from_secs(60);
const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJF3X2of517d5Kg00cGhwfj7PqWgUgbbxnZyL96Twgi5 bad-input@test";
const GOOD_PASSWORD: &str = "Bad-Input-Suite-Good-Pw-4d1c";

// ---------------------------------------------------------------------------------------
// The lab.

struct Lab {
    kubeconfig: PathBuf,
    controller: tokio::task::JoinHandle<()>,
    logs: Arc<Mutex<Vec<u8>>>,
    panics: Arc<Mutex<Vec<String>>>,
    _dir: tempfile::TempDir,
    _agents: Vec<HostQga>,
}

/// The VMs every case can name.
fn lab_vms() -> Vec<(VmDescription, bool)> {
    vec![
        (vm(NS, "vm-a", "node-1").label("suite", "bad-input"), true),
        (vm(NS, "vm-b", "node-1"), false),
        (vm(NS, "vm-stopped", "node-1").phase("Stopped"), false),
        (vm(NS, "vm-win", "node-1").os("mswindows"), false),
        (
            vm(NS, "vm-annotated", "node-1").annotation("guestcred.io/admin-user", "root:0:0"),
            false,
        ),
    ]
}

fn lab() -> &'static Lab {
    static LAB: OnceLock<Lab> = OnceLock::new();
    LAB.get_or_init(|| {
        let panics = record_lab_panics();
        let logs = capture_logs();
        let (tx, rx) = std::sync::mpsc::channel();
        // The lab's runtime outlives every test: it runs on its own threads until exit.
        std::thread::Builder::new()
            .name("lab-main".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("lab-worker")
                    .enable_all()
                    .build()
                    .expect("lab runtime");
                let parts = rt.block_on(start_lab());
                let _ = tx.send(parts);
                rt.block_on(std::future::pending::<()>());
            })
            .expect("lab thread");
        let (kubeconfig, controller, dir, agents) = rx
            .recv()
            .expect("lab thread")
            .unwrap_or_else(|e| panic!("the bad-input lab must start: {e:#}"));
        Lab {
            kubeconfig,
            controller,
            logs,
            panics,
            _dir: dir,
            _agents: agents,
        }
    })
}

type LabParts = (
    PathBuf,
    tokio::task::JoinHandle<()>,
    tempfile::TempDir,
    Vec<HostQga>,
);

async fn start_lab() -> anyhow::Result<LabParts> {
    let api = ApiServer::new();
    let client = api.client();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let serving = api.clone();
    tokio::spawn(async move { serving.serve(listener, axum::Router::new()).await });
    let dir = tempfile::Builder::new().prefix("gcbad").tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    write_kubeconfig(&kubeconfig, &url)?;
    install_crds(&client).await?;
    let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> =
        kube::Api::all(client.clone());
    let ns = serde_json::from_value(json!({"metadata": {"name": SHIM_NS}}))?;
    namespaces.create(&Default::default(), &ns).await?;
    let ns = serde_json::from_value(json!({"metadata": {"name": "other"}}))?;
    namespaces.create(&Default::default(), &ns).await?;

    // One node: a real shim (qga-socket backend) on its own loopback address.
    let sockets = dir.path().join("node-1");
    std::fs::create_dir_all(&sockets)?;
    let shim_ip = "127.0.0.30";
    let shim_listener = tokio::net::TcpListener::bind((shim_ip, 0)).await?;
    let port = shim_listener.local_addr()?.port();
    let template = format!("{}/{{namespace}}_{{name}}/qga.sock", sockets.display());
    let agent = Arc::new(QgaSocketAgent::new(template, Duration::from_secs(3)));
    let app = server::router(agent, Auth::Disabled);
    tokio::spawn(async move { server::serve(shim_listener, app, std::future::pending()).await });
    create_node_with_shim(&client, "node-1", SHIM_NS, shim_ip).await?;

    let mut agents = Vec::new();
    for (desc, with_agent) in lab_vms() {
        desc.create(&client).await?;
        if with_agent {
            let name = format!("{}_{}", desc.namespace, desc.name);
            let opts = HostQgaOptions::default().user("alice");
            agents.push(HostQga::start_with(&sockets, &name, &opts).map_err(|e| {
                anyhow::anyhow!(
                    "qemu-ga for {name} must start (root, unshare, overlayfs, qemu-ga: scripts/install-deps.sh): {e}"
                )
            })?);
        }
    }
    let access = ShimAccess {
        namespace: Some(SHIM_NS.into()),
        port,
        scheme: "http".into(),
        token: None,
        tls: None,
        request_timeout: Duration::from_secs(8),
    };
    let settings = EngineSettings {
        initial_backoff: Duration::from_millis(200),
        max_backoff: Duration::from_secs(1),
        status_flush_interval: Duration::from_millis(50),
    };
    let controller = tokio::spawn(guestcred::controller::start(
        client,
        access,
        "guestcred-bad-input",
        settings,
        Default::default(),
        std::future::pending(),
    ));
    Ok((kubeconfig, controller, dir, agents))
}

/// Panics on the lab's own threads (controller, shim, emulator), not the tests' asserts.
fn record_lab_panics() -> Arc<Mutex<Vec<String>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current()
            .name()
            .unwrap_or_default()
            .to_string();
        if thread.starts_with("lab-") {
            let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
            s.push(format!("{thread}: {info}"));
        }
        previous(info);
    }));
    seen
}

/// Everything the process logs (all crates, debug and up), for the secret scan.
fn capture_logs() -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let sink = buf.clone();
    let _ = tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_writer(move || Sink(sink.clone()))
        .with_ansi(false)
        .try_init();
    buf
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
// kubectl.

fn kubectl(args: &[&str], stdin: Option<&str>) -> Result<String, String> {
    let mut child = Command::new("kubectl")
        .env("KUBECONFIG", &lab().kubeconfig)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("kubectl must be installed to run this test: {e}"));
    if let Some(mut pipe) = child.stdin.take() {
        pipe.write_all(stdin.unwrap_or_default().as_bytes())
            .expect("kubectl stdin");
    }
    let out = child.wait_with_output().expect("kubectl runs");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    if out.status.success() {
        Ok(stdout)
    } else {
        Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
    }
}

/// `kubectl apply -f -` of each object, as a user would.
fn apply(objects: &[Value]) {
    for o in objects {
        let text = serde_json::to_string(o).expect("json");
        if let Err(e) = kubectl(&["apply", "-f", "-"], Some(&text)) {
            panic!("kubectl apply of {text} failed: {e}");
        }
    }
}

fn get(kind: &str, name: &str) -> Value {
    let out = kubectl(&["get", kind, name, "-n", NS, "-o", "json"], None)
        .unwrap_or_else(|e| panic!("kubectl get {kind} {name}: {e}"));
    serde_json::from_str(&out).expect("kubectl prints JSON")
}

// ---------------------------------------------------------------------------------------
// Fixtures.

/// A JSON object with `set("a.b.c", v)` for readable variations of a valid fixture.
struct Obj(Value);

impl Obj {
    fn set(mut self, path: &str, v: Value) -> Self {
        let mut cur = &mut self.0;
        let parts: Vec<&str> = path.split('.').collect();
        for p in &parts[..parts.len() - 1] {
            cur = cur
                .as_object_mut()
                .expect("object on the path")
                .entry(p.to_string())
                .or_insert_with(|| json!({}));
        }
        cur[parts[parts.len() - 1]] = v;
        self
    }
    fn remove(mut self, path: &str) -> Self {
        let (parent, last) = path.rsplit_once('.').expect("dotted path");
        let mut cur = &mut self.0;
        for p in parent.split('.') {
            cur = &mut cur[p];
        }
        if let Some(m) = cur.as_object_mut() {
            m.remove(last);
        }
        self
    }
    fn v(self) -> Value {
        self.0
    }
}

/// A valid reset of alice's password on vm-a from Secret `<name>-pw`.
fn reset(name: &str) -> Obj {
    Obj(json!({
        "apiVersion": "guestcred.io/v1alpha1",
        "kind": "GuestPasswordReset",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "target": {"vmName": "vm-a"},
            "user": "alice",
            "password": {"secretRef": {"name": format!("{name}-pw"), "key": "password"}},
        }
    }))
}

/// A valid live key rotation for alice on vm-a with one inline key.
fn rebuild(name: &str) -> Obj {
    Obj(json!({
        "apiVersion": "guestcred.io/v1alpha1",
        "kind": "KeypairRebuild",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "target": {"vmName": "vm-a"},
            "user": "alice",
            "mode": "Live",
            "publicKeys": {"inline": [ED25519]},
        }
    }))
}

/// A Secret with one key holding exactly `value` (any bytes).
fn secret(name: &str, key: &str, value: &[u8]) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": NS},
        "type": "Opaque",
        "data": {key: base64::engine::general_purpose::STANDARD.encode(value)},
    })
}

/// The reset `name` and its Secret `<name>-pw` holding `password`.
fn reset_with_password(name: &str, password: &[u8]) -> Vec<Value> {
    vec![
        secret(&format!("{name}-pw"), "password", password),
        reset(name).v(),
    ]
}

// ---------------------------------------------------------------------------------------
// Expectations.

fn condition<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

fn target0(obj: &Value) -> &Value {
    &obj["status"]["targets"][0]
}

fn poll(kind: &str, name: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let o = get(kind, name);
        if done(&o) {
            return o;
        }
        assert_controller_alive();
        assert!(
            start.elapsed() < WAIT,
            "{kind}/{name}: no {what} within {WAIT:?}; status: {:#}",
            o["status"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The object is Stalled (and not Ready) with `reason`, and the message contains `hint`.
fn expect_stalled(kind: &str, name: &str, reason: &str, hint: &str) -> Value {
    let o = poll(kind, name, &format!("Stalled/{reason}"), |o| {
        condition(o, "Stalled").is_some_and(|c| c["status"] == "True" && c["reason"] == reason)
    });
    let msg = condition(&o, "Stalled").expect("stalled")["message"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        msg.contains(hint),
        "{kind}/{name}: message {msg:?} should say {hint:?}"
    );
    let ready = condition(&o, "Ready").expect("a Ready condition");
    assert_eq!(ready["status"], "False", "{kind}/{name}: {ready}");
    assert_controller_alive();
    o
}

/// The first target ended (Failed) with `reason`, and its message contains `hint`.
fn expect_target_failed(kind: &str, name: &str, reason: &str, hint: &str) -> Value {
    let o = poll(kind, name, &format!("target {reason}"), |o| {
        let t = target0(o);
        t["state"] == "Failed" && t["reason"] == reason
    });
    let msg = target0(&o)["message"].as_str().unwrap_or_default();
    assert!(
        msg.contains(hint),
        "{kind}/{name}: target message {msg:?} should say {hint:?}"
    );
    assert_eq!(o["status"]["phase"], "Failed", "{kind}/{name}");
    assert_controller_alive();
    o
}

fn assert_controller_alive() {
    let lab = lab();
    assert!(
        !lab.controller.is_finished(),
        "the controller task ended (crash or exit)"
    );
    let panics = lab.panics.lock().unwrap_or_else(|p| p.into_inner());
    assert!(panics.is_empty(), "the lab panicked: {panics:?}");
}

/// `canary` appears in no log line, no Event and no status of either kind.
fn assert_not_leaked(canary: &str) {
    let mut haystack = String::from_utf8_lossy(&lab().logs.lock().expect("logs")).to_string();
    for kind in [
        "guestpasswordresets",
        "keypairrebuilds",
        "events",
        "events.v1.events.k8s.io",
    ] {
        haystack.push_str(&kubectl(&["get", kind, "-A", "-o", "json"], None).expect("list"));
    }
    assert!(
        !haystack.contains(canary),
        "secret {canary:?} leaked into logs, Events or status"
    );
}

// ---------------------------------------------------------------------------------------
// Targets.

#[test]
fn reset_of_a_missing_vm_fails_with_vm_not_found() {
    let mut objs = reset_with_password("missing-vm", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["target"]["vmName"] = json!("no-such-vm");
    apply(&objs);
    expect_target_failed(
        "gpr",
        "missing-vm",
        "VMNotFound",
        "no-such-vm not found; check spec.target",
    );
}

#[test]
fn keys_for_a_missing_vm_fail_with_vm_not_found() {
    apply(&[rebuild("k-missing-vm")
        .set("spec.target.vmName", json!("no-such-vm"))
        .v()]);
    expect_target_failed("kpr", "k-missing-vm", "VMNotFound", "check spec.target");
}

#[test]
fn reset_of_a_stopped_vm_retries_as_vm_not_running_until_its_deadline() {
    let mut objs = reset_with_password("stopped-vm", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["target"]["vmName"] = json!("vm-stopped");
    objs[1]["spec"]["deadlineSeconds"] = json!(10);
    apply(&objs);
    poll("gpr", "stopped-vm", "VMNotRunning while retrying", |o| {
        let t = target0(o);
        t["reason"] == "VMNotRunning"
            && t["message"]
                .as_str()
                .is_some_and(|m| m.contains("not Running"))
    });
    expect_target_failed(
        "gpr",
        "stopped-vm",
        "DeadlineExceeded",
        "is Stopped, not Running",
    );
}

#[test]
fn both_vm_name_and_selector_is_invalid_spec() {
    let mut objs = reset_with_password("both-targets", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["target"]["selector"] = json!({"matchLabels": {"suite": "bad-input"}});
    apply(&objs);
    expect_stalled(
        "gpr",
        "both-targets",
        "InvalidSpec",
        "set exactly one of target.vmName and target.selector",
    );
}

#[test]
fn keys_with_neither_vm_name_nor_selector_is_invalid_spec() {
    apply(&[rebuild("k-no-target").set("spec.target", json!({})).v()]);
    expect_stalled(
        "kpr",
        "k-no-target",
        "InvalidSpec",
        "set exactly one of target.vmName and target.selector",
    );
}

#[test]
fn reset_with_neither_vm_name_nor_selector_is_invalid_spec() {
    let mut objs = reset_with_password("no-target", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["target"] = json!({});
    apply(&objs);
    expect_stalled(
        "gpr",
        "no-target",
        "InvalidSpec",
        "set exactly one of target.vmName and target.selector",
    );
}

#[test]
fn selector_matching_nothing_waits_with_no_targets() {
    let mut objs = reset_with_password("no-match", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["target"] = json!({"selector": {"matchLabels": {"suite": "nothing"}}});
    apply(&objs);
    let o = expect_stalled("gpr", "no-match", "NoTargets", "matches selector");
    assert_eq!(
        o["status"]["phase"], "Pending",
        "a matching VM may still come"
    );
}

#[test]
fn keys_selector_matching_nothing_waits_with_no_targets() {
    apply(&[rebuild("k-no-match")
        .set(
            "spec.target",
            json!({"selector": {"matchLabels": {"suite": "nothing"}}}),
        )
        .v()]);
    expect_stalled("kpr", "k-no-match", "NoTargets", "matches selector");
}

#[test]
fn changing_the_target_of_a_started_reset_is_invalid_spec() {
    apply(&reset_with_password("retarget", GOOD_PASSWORD.as_bytes()));
    poll("gpr", "retarget", "a started run", |o| {
        o["status"]["targetSpec"]["vmName"] == "vm-a"
    });
    apply(&[reset("retarget")
        .set("spec.target.vmName", json!("vm-b"))
        .v()]);
    expect_stalled("gpr", "retarget", "InvalidSpec", "spec.target is immutable");
}

#[test]
fn changing_the_target_of_started_keys_is_invalid_spec() {
    apply(&[rebuild("k-retarget").v()]);
    poll("kpr", "k-retarget", "a started run", |o| {
        o["status"]["targetSpec"]["vmName"] == "vm-a"
    });
    apply(&[rebuild("k-retarget")
        .set("spec.target.vmName", json!("vm-b"))
        .v()]);
    expect_stalled(
        "kpr",
        "k-retarget",
        "InvalidSpec",
        "spec.target is immutable",
    );
}

// ---------------------------------------------------------------------------------------
// Secrets and passwords.

#[test]
fn missing_secret_waits_with_secret_not_found() {
    apply(&[reset("no-secret").v()]);
    let o = expect_stalled("gpr", "no-secret", "SecretNotFound", "no-secret-pw");
    assert_eq!(o["status"]["phase"], "Pending", "the Secret may still come");
}

#[test]
fn keys_from_a_missing_secret_wait_with_secret_not_found() {
    apply(&[rebuild("k-no-secret")
        .set(
            "spec.publicKeys",
            json!({"secretRef": {"name": "k-no-secret-keys", "key": "authorized_keys"}}),
        )
        .v()]);
    expect_stalled("kpr", "k-no-secret", "SecretNotFound", "k-no-secret-keys");
}

#[test]
fn missing_key_in_secret_waits_with_secret_key_missing() {
    apply(&[
        secret("no-key-pw", "passwd", GOOD_PASSWORD.as_bytes()),
        reset("no-key").v(),
    ]);
    expect_stalled(
        "gpr",
        "no-key",
        "SecretKeyMissing",
        "has no key \"password\"",
    );
}

#[test]
fn keys_secret_without_the_key_waits_with_secret_key_missing() {
    apply(&[
        secret("k-no-key-keys", "keys", ED25519.as_bytes()),
        rebuild("k-no-key")
            .set(
                "spec.publicKeys",
                json!({"secretRef": {"name": "k-no-key-keys", "key": "authorized_keys"}}),
            )
            .v(),
    ]);
    expect_stalled("kpr", "k-no-key", "SecretKeyMissing", "authorized_keys");
}

#[test]
fn empty_password_is_invalid_password() {
    apply(&reset_with_password("empty-pw", b""));
    expect_stalled("gpr", "empty-pw", "InvalidPassword", "must not be empty");
}

#[test]
fn password_with_a_newline_is_invalid_password_and_not_leaked() {
    let canary = "Canary-Newline-Pw-8e21";
    apply(&reset_with_password(
        "newline-pw",
        format!("{canary}\nroot:x").as_bytes(),
    ));
    expect_stalled(
        "gpr",
        "newline-pw",
        "InvalidPassword",
        "must not contain newlines",
    );
    assert_not_leaked(canary);
}

#[test]
fn password_with_a_nul_is_invalid_password_and_not_leaked() {
    let canary = "Canary-Nul-Pw-5b07";
    apply(&reset_with_password(
        "nul-pw",
        format!("{canary}\0tail").as_bytes(),
    ));
    expect_stalled("gpr", "nul-pw", "InvalidPassword", "NUL");
    assert_not_leaked(canary);
}

#[test]
fn over_long_password_is_invalid_password() {
    let long = "Canary-Long-Pw-".repeat(20);
    apply(&reset_with_password("long-pw", long.as_bytes()));
    expect_stalled("gpr", "long-pw", "InvalidPassword", "at most 256 bytes");
    assert_not_leaked(&long);
}

#[test]
fn password_that_is_not_utf8_is_invalid_password() {
    apply(&reset_with_password("latin1-pw", b"caf\xe9-Latin1-Pw"));
    expect_stalled("gpr", "latin1-pw", "InvalidPassword", "not valid UTF-8");
}

#[test]
fn crypted_value_that_is_not_a_crypt_string_is_invalid_password() {
    let canary = "Canary-Plain-Not-Crypt-77aa";
    let mut objs = reset_with_password("not-crypt", canary.as_bytes());
    objs[1]["spec"]["password"]["crypted"] = json!(true);
    apply(&objs);
    expect_stalled(
        "gpr",
        "not-crypt",
        "InvalidPassword",
        "crypt(3) hash like $6$",
    );
    assert_not_leaked(canary);
}

#[test]
fn crypted_password_for_a_windows_guest_is_unsupported_for_os() {
    let hash = "$6$saltsalt$Yf1mS1uGxQmFvTq0m1cZ2H5mCqGk6x8Yb0cI4bZ2bAqk5v0hJ9e8P0dQd1X2n7Lr3oQ4wT9uV6sY1aB2cD3eF.";
    let mut objs = reset_with_password("win-crypt", hash.as_bytes());
    objs[1]["spec"]["target"]["vmName"] = json!("vm-win");
    objs[1]["spec"]["password"]["crypted"] = json!(true);
    objs[1]["spec"]["user"] = json!("Administrator");
    apply(&objs);
    expect_target_failed(
        "gpr",
        "win-crypt",
        "UnsupportedForOS",
        "use a plaintext or generated password",
    );
    assert_not_leaked(hash);
}

#[test]
fn generated_password_shorter_than_16_is_invalid_spec() {
    apply(&[reset("short-gen")
        .set("spec.password", json!({"generate": {"length": 8}}))
        .v()]);
    expect_stalled("gpr", "short-gen", "InvalidSpec", "length must be 16-128");
}

#[test]
fn generated_password_longer_than_128_is_invalid_spec() {
    apply(&[reset("long-gen")
        .set("spec.password", json!({"generate": {"length": 100000}}))
        .v()]);
    expect_stalled("gpr", "long-gen", "InvalidSpec", "length must be 16-128");
}

#[test]
fn both_secret_ref_and_generate_is_invalid_spec() {
    let mut objs = reset_with_password("two-sources", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["password"]["generate"] = json!({"length": 20});
    apply(&objs);
    expect_stalled(
        "gpr",
        "two-sources",
        "InvalidSpec",
        "set exactly one of password.secretRef and password.generate",
    );
}

#[test]
fn cross_namespace_password_secret_is_invalid_spec() {
    let mut objs = reset_with_password("cross-ns", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["password"]["secretRef"]["namespace"] = json!("other");
    apply(&objs);
    expect_stalled(
        "gpr",
        "cross-ns",
        "InvalidSpec",
        "cross-namespace Secret references are refused",
    );
}

#[test]
fn cross_namespace_keys_secret_is_invalid_spec() {
    apply(&[rebuild("k-cross-ns")
        .set(
            "spec.publicKeys",
            json!({"secretRef": {"name": "keys", "key": "authorized_keys", "namespace": "other"}}),
        )
        .v()]);
    expect_stalled(
        "kpr",
        "k-cross-ns",
        "InvalidSpec",
        "cross-namespace Secret references are refused",
    );
}

// ---------------------------------------------------------------------------------------
// Users.

#[test]
fn user_with_a_colon_is_invalid_user() {
    let mut objs = reset_with_password("colon-user", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["user"] = json!("root:x");
    apply(&objs);
    expect_stalled("gpr", "colon-user", "InvalidUser", "must not contain ':'");
}

#[test]
fn user_with_a_control_character_is_invalid_user() {
    let mut objs = reset_with_password("ctrl-user", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["user"] = json!("ali\u{7}ce");
    apply(&objs);
    expect_stalled("gpr", "ctrl-user", "InvalidUser", "control characters");
}

#[test]
fn over_long_user_is_invalid_user() {
    let mut objs = reset_with_password("long-user", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["user"] = json!("u".repeat(40));
    apply(&objs);
    expect_stalled("gpr", "long-user", "InvalidUser", "at most 32 characters");
}

#[test]
fn keys_for_a_user_with_a_newline_is_invalid_user() {
    apply(&[rebuild("k-newline-user")
        .set("spec.user", json!("alice\nroot"))
        .v()]);
    expect_stalled("kpr", "k-newline-user", "InvalidUser", "control characters");
}

#[test]
fn admin_user_annotation_with_a_colon_is_invalid_user() {
    // Without spec.user the user comes from the VM's guestcred.io/admin-user annotation.
    let mut objs = reset_with_password("annotated-user", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["target"]["vmName"] = json!("vm-annotated");
    objs[1]["spec"]
        .as_object_mut()
        .expect("spec")
        .remove("user");
    apply(&objs);
    expect_target_failed(
        "gpr",
        "annotated-user",
        "InvalidUser",
        "must not contain ':'",
    );
}

#[test]
fn user_unknown_in_the_guest_fails_with_user_not_found() {
    let mut objs = reset_with_password("ghost-user", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["user"] = json!("ghost");
    apply(&objs);
    expect_target_failed("gpr", "ghost-user", "UserNotFound", "ghost");
    assert_not_leaked(GOOD_PASSWORD);
}

#[test]
fn keys_for_a_user_unknown_in_the_guest_fail_with_user_not_found() {
    apply(&[rebuild("k-ghost-user").set("spec.user", json!("ghost")).v()]);
    expect_target_failed("kpr", "k-ghost-user", "UserNotFound", "ghost");
}

// ---------------------------------------------------------------------------------------
// Public keys.

#[test]
fn invalid_public_key_line_is_invalid_public_key() {
    apply(&[rebuild("k-garbage")
        .set(
            "spec.publicKeys.inline",
            json!([ED25519, "ssh-rsa AAAAnot-base64!! someone@host"]),
        )
        .v()]);
    expect_stalled(
        "kpr",
        "k-garbage",
        "InvalidPublicKey",
        "line 2 is not an OpenSSH public key",
    );
}

#[test]
fn private_key_pasted_instead_of_a_public_key_is_refused_and_not_leaked() {
    let body = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW";
    let private =
        format!("-----BEGIN OPENSSH PRIVATE KEY-----\n{body}\n-----END OPENSSH PRIVATE KEY-----\n");
    apply(&[
        secret("k-private-keys", "authorized_keys", private.as_bytes()),
        rebuild("k-private")
            .set(
                "spec.publicKeys",
                json!({"secretRef": {"name": "k-private-keys", "key": "authorized_keys"}}),
            )
            .v(),
    ]);
    expect_stalled(
        "kpr",
        "k-private",
        "InvalidPublicKey",
        "put only public keys",
    );
    assert_not_leaked(body);
}

#[test]
fn duplicate_keys_are_invalid_public_key() {
    apply(&[rebuild("k-dup")
        .set("spec.publicKeys.inline", json!([ED25519, ED25519]))
        .v()]);
    expect_stalled(
        "kpr",
        "k-dup",
        "InvalidPublicKey",
        "line 2 repeats the key of entry 1",
    );
}

#[test]
fn empty_key_list_is_invalid_public_key() {
    apply(&[rebuild("k-empty")
        .set("spec.publicKeys.inline", json!([]))
        .v()]);
    expect_stalled("kpr", "k-empty", "InvalidPublicKey", "no public keys given");
}

#[test]
fn key_secret_with_only_comments_is_invalid_public_key() {
    apply(&[
        secret("k-comments-keys", "authorized_keys", b"# keys go here\n\n"),
        rebuild("k-comments")
            .set(
                "spec.publicKeys",
                json!({"secretRef": {"name": "k-comments-keys", "key": "authorized_keys"}}),
            )
            .v(),
    ]);
    expect_stalled(
        "kpr",
        "k-comments",
        "InvalidPublicKey",
        "no public keys given",
    );
}

// ---------------------------------------------------------------------------------------
// Fields the schema would refuse.

#[test]
fn misspelled_required_field_is_invalid_spec_naming_it() {
    // `passwrd` is pruned as an unknown field; what is left lacks `password`.
    let o = reset("typo-field").remove("spec.password").set(
        "spec.passwrd",
        json!({"secretRef": {"name": "typo-field-pw", "key": "password"}}),
    );
    apply(&[o.v()]);
    expect_stalled(
        "gpr",
        "typo-field",
        "InvalidSpec",
        "missing field `password`",
    );
}

#[test]
fn misspelled_target_field_is_invalid_spec() {
    apply(&[rebuild("k-typo-target")
        .set("spec.target", json!({"vmname": "vm-a"}))
        .v()]);
    expect_stalled(
        "kpr",
        "k-typo-target",
        "InvalidSpec",
        "set exactly one of target.vmName and target.selector",
    );
}

#[test]
fn unknown_extra_field_is_dropped_and_the_reset_still_works() {
    let mut objs = reset_with_password("extra-field", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["color"] = json!("blue");
    apply(&objs);
    let o = poll("gpr", "extra-field", "Succeeded", |o| {
        o["status"]["phase"] == "Succeeded"
    });
    assert!(
        o["spec"].get("color").is_none(),
        "pruned like a real API server"
    );
    assert_controller_alive();
}

#[test]
fn enum_value_in_the_wrong_case_is_invalid_spec_naming_the_field() {
    apply(&[rebuild("k-mode-case").set("spec.mode", json!("live")).v()]);
    expect_stalled(
        "kpr",
        "k-mode-case",
        "InvalidSpec",
        "spec.mode: unknown variant `live`",
    );
}

#[test]
fn negative_max_concurrency_is_invalid_spec_naming_the_field() {
    let mut objs = reset_with_password("neg-concurrency", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["maxConcurrency"] = json!(-1);
    apply(&objs);
    expect_stalled(
        "gpr",
        "neg-concurrency",
        "InvalidSpec",
        "spec.maxConcurrency",
    );
}

#[test]
fn huge_max_concurrency_is_invalid_spec() {
    apply(&[rebuild("k-huge-concurrency")
        .set("spec.maxConcurrency", json!(5000))
        .v()]);
    expect_stalled(
        "kpr",
        "k-huge-concurrency",
        "InvalidSpec",
        "maxConcurrency must be 1-1000, got 5000",
    );
}

#[test]
fn zero_max_concurrency_is_invalid_spec() {
    let mut objs = reset_with_password("zero-concurrency", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["maxConcurrency"] = json!(0);
    apply(&objs);
    expect_stalled(
        "gpr",
        "zero-concurrency",
        "InvalidSpec",
        "maxConcurrency must be 1-1000, got 0",
    );
}

#[test]
fn negative_deadline_is_invalid_spec_naming_the_field() {
    apply(&[rebuild("k-neg-deadline")
        .set("spec.deadlineSeconds", json!(-30))
        .v()]);
    expect_stalled(
        "kpr",
        "k-neg-deadline",
        "InvalidSpec",
        "spec.deadlineSeconds",
    );
}

#[test]
fn huge_deadline_is_invalid_spec() {
    let mut objs = reset_with_password("huge-deadline", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["deadlineSeconds"] = json!(10_000_000);
    apply(&objs);
    expect_stalled(
        "gpr",
        "huge-deadline",
        "InvalidSpec",
        "deadlineSeconds must be 10-86400, got 10000000",
    );
}

#[test]
fn deadline_beyond_32_bits_is_invalid_spec_naming_the_field() {
    let mut objs = reset_with_password("overflow-deadline", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["deadlineSeconds"] = json!(99_999_999_999_i64);
    apply(&objs);
    expect_stalled(
        "gpr",
        "overflow-deadline",
        "InvalidSpec",
        "spec.deadlineSeconds",
    );
}

#[test]
fn negative_ttl_is_invalid_spec_naming_the_field() {
    apply(&[rebuild("k-neg-ttl").set("spec.ttlSeconds", json!(-5)).v()]);
    expect_stalled("kpr", "k-neg-ttl", "InvalidSpec", "spec.ttlSeconds");
}

#[test]
fn huge_ttl_is_invalid_spec() {
    apply(&[rebuild("k-huge-ttl")
        .set("spec.ttlSeconds", json!(1_000_000_000))
        .v()]);
    expect_stalled(
        "kpr",
        "k-huge-ttl",
        "InvalidSpec",
        "ttlSeconds must be 10-31536000, got 1000000000",
    );
}

#[test]
fn number_given_as_a_string_is_invalid_spec_naming_the_field() {
    let mut objs = reset_with_password("string-number", GOOD_PASSWORD.as_bytes());
    objs[1]["spec"]["maxFailures"] = json!("two");
    apply(&objs);
    expect_stalled("gpr", "string-number", "InvalidSpec", "spec.maxFailures");
}

#[test]
fn a_valid_reset_next_to_the_bad_ones_succeeds() {
    apply(&reset_with_password("control", GOOD_PASSWORD.as_bytes()));
    let o = poll("gpr", "control", "Succeeded", |o| {
        o["status"]["phase"] == "Succeeded"
    });
    assert_eq!(target0(&o)["reason"], "Applied");
    assert_controller_alive();
    assert_not_leaked(GOOD_PASSWORD);
}

#[test]
fn the_cases_are_documented() {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/bad-input.md"))
            .expect("docs/bad-input.md");
    let src = include_str!("bad_input.rs");
    let tests: Vec<&str> = src
        .split("#[test]\nfn ")
        .skip(1)
        .filter_map(|s| s.split('(').next())
        .filter(|n| *n != "the_cases_are_documented")
        .collect();
    assert!(tests.len() >= 30, "at least 30 cases ({})", tests.len());
    let missing: Vec<&&str> = tests.iter().filter(|t| !doc.contains(**t)).collect();
    assert!(
        missing.is_empty(),
        "cases missing in docs/bad-input.md: {missing:?}"
    );
}
