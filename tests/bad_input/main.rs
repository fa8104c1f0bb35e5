//! Bad input, applied with the real kubectl as a user would: every case ends in a
//! documented reason with a message that says what to fix, the controller keeps running
//! (no panic, no restart), and no secret value shows up in logs, Events or status.
//! docs/bad-input.md lists the cases; keep the two in step.
//!
//! One lab per test binary (a `World` on its own runtime, served over HTTP for kubectl,
//! one node with a real shim and a real qemu-ga for `vm-a`, the controller in-process);
//! each test applies its own objects, so the cases run side by side. The emulator has no
//! schema validation or CEL (as on a cluster with validation off): every rule the CRD
//! schema states must also be enforced by the controller, which is what these cases check.
//! The cases are grouped by what is wrong, one module each.
//!
//! `make test` runs this binary twice: on the emulator, and with
//! `GUESTCRED_CONTROL_PLANE=real` on a real kube-apiserver (lab/controlplane), where the
//! CRD's schema and CEL rules refuse some objects before the controller sees them: those
//! cases expect the server's message there ([`applied_unless_the_server_refuses`]), and
//! docs/bad-input.md lists it beside the controller's reason.
#![allow(clippy::disallowed_methods)] // tests may block: clippy.toml's file-system rule is for src/
mod key_overlap;
mod key_removal;
mod passwords;
mod public_keys;
mod rotation;
mod schema;
mod targets;
mod users;

use guestcred_lab::hostqga::HostQga;
use guestcred_lab::kubevirt::{VmDescription, vm};
use guestcred_lab::testing::{self, Kubectl, LogCapture, NS, alice};
use guestcred_lab::world::{ControlPlaneKind, World, WorldOptions};
use serde_json::{Value, json};
use std::path::Path;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);
const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJF3X2of517d5Kg00cGhwfj7PqWgUgbbxnZyL96Twgi5 bad-input@test";
const GOOD_PASSWORD: &str = "Bad-Input-Suite-Good-Pw-4d1c";
/// The fingerprint of a key vm-a's alice does not have.
const ABSENT: &str = "SHA256:47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU";

// ---------------------------------------------------------------------------------------
// The lab.

struct Lab {
    world: World,
    kubectl: Kubectl,
    _agents: Vec<HostQga>,
}

/// The VMs every case can name (and whether each has an agent).
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
        let world = World::start_detached(WorldOptions {
            serve: true,
            capture_logs: true,
            namespaces: vec!["other".into()],
            controller_name: "guestcred-bad-input".into(),
            ..WorldOptions::default()
        })
        .unwrap_or_else(|e| panic!("the bad-input lab must start: {e:#}"));
        let agents = world
            .block_on(async {
                let mut agents = Vec::new();
                for (desc, with_agent) in lab_vms() {
                    let agent = world.add_vm(&desc, with_agent.then(alice)).await?;
                    agents.extend(agent);
                }
                anyhow::Ok(agents)
            })
            .unwrap_or_else(|e| panic!("the bad-input lab must start: {e:#}"));
        let kubectl = world.kubectl();
        Lab {
            world,
            kubectl,
            _agents: agents,
        }
    })
}

// ---------------------------------------------------------------------------------------
// kubectl.

/// `kubectl apply -f -` of each object, as a user would.
fn apply(objects: &[Value]) {
    for o in objects {
        lab()
            .kubectl
            .apply(&serde_json::to_string(o).expect("json"));
    }
}

/// `kubectl apply --validate=false`: unknown fields are dropped instead of refused (what
/// clients that do not ask for strict field validation get).
fn apply_without_validation(objects: &[Value]) {
    for o in objects {
        let text = serde_json::to_string(o).expect("json");
        if let Err(e) = lab()
            .kubectl
            .try_run(&["apply", "--validate=false", "-f", "-"], Some(&text))
        {
            panic!("kubectl apply --validate=false of {text} failed: {e}");
        }
    }
}

/// Applies `objects`; on a real API server the last one must be refused by the server
/// itself (the CRD's schema or a CEL rule) with `server` in its message, and is not
/// stored. The emulator has neither: there every object is applied and the case goes on to
/// the controller's own check, which clusters without CEL rely on. Returns whether the last
/// object was stored.
fn applied_unless_the_server_refuses(objects: &[Value], server: &str) -> bool {
    let Some((last, before)) = objects.split_last() else {
        return true;
    };
    if lab().world.control_plane().kind() != ControlPlaneKind::Real {
        apply(objects);
        return true;
    }
    apply(before);
    expect_refused_by_the_server(last, server);
    false
}

/// `kubectl apply` of `object` fails with `server` in the API server's message, and
/// nothing of it is stored: a new object does not exist, a stored one keeps its spec.
fn expect_refused_by_the_server(object: &Value, server: &str) {
    let (kind, name) = kind_and_name(object);
    let spec = || {
        lab()
            .kubectl
            .try_run(
                &["get", &kind, &name, "-n", NS, "-o", "jsonpath={.spec}"],
                None,
            )
            .ok()
    };
    let before = spec();
    let text = serde_json::to_string(object).expect("json");
    let refused = match lab().kubectl.try_run(&["apply", "-f", "-"], Some(&text)) {
        Ok(out) => panic!("the API server stored {kind}/{name}: {out}"),
        Err(e) => e,
    };
    assert!(
        refused.contains(server),
        "{kind}/{name}: the server's refusal should say {server:?}: {refused}"
    );
    assert_eq!(spec(), before, "{kind}/{name}: nothing of it was stored");
    assert_controller_alive();
}

/// The kind (lower case, as kubectl takes it) and name of `object`.
fn kind_and_name(object: &Value) -> (String, String) {
    let kind = object["kind"].as_str().expect("kind").to_lowercase();
    let name = object["metadata"]["name"].as_str().expect("name");
    (kind, name.to_string())
}

fn get(kind: &str, name: &str) -> Value {
    let out = lab()
        .kubectl
        .try_run(&["get", kind, name, "-n", NS, "-o", "json"], None)
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

/// A guestcred object of `kind` named `name` in the lab's namespace for alice on vm-a;
/// `spec` adds to that.
fn alice_on_vm_a(kind: &str, name: &str, spec: Value) -> Obj {
    let mut o = Obj(json!({
        "apiVersion": "guestcred.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": NS},
        "spec": {"target": {"vmName": "vm-a"}, "user": "alice"}
    }));
    for (field, value) in spec.as_object().expect("spec fields") {
        o = o.set(&format!("spec.{field}"), value.clone());
    }
    o
}

/// A valid reset of alice's password on vm-a from Secret `<name>-pw`, as a user writes it.
fn reset(name: &str) -> Obj {
    let secret_ref = json!({"name": format!("{name}-pw"), "key": "password"});
    alice_on_vm_a(
        "GuestPasswordReset",
        name,
        json!({"password": {"secretRef": secret_ref}}),
    )
}

/// A valid live key rotation for alice on vm-a with one inline key, as a user writes it.
fn rebuild(name: &str) -> Obj {
    alice_on_vm_a(
        "KeypairRebuild",
        name,
        json!({"mode": "Live", "publicKeys": {"inline": [ED25519]}}),
    )
}

/// [`rebuild`] with its keys from Secret `<name>-keys`, key `authorized_keys`.
fn rebuild_from_secret(name: &str) -> Obj {
    let secret_ref = json!({"name": format!("{name}-keys"), "key": "authorized_keys"});
    rebuild(name).set("spec.publicKeys", json!({ "secretRef": secret_ref }))
}

/// A Secret with one key holding exactly `value` (any bytes).
fn secret(name: &str, key: &str, value: &[u8]) -> Value {
    let mut s = testing::secret(name, key, value);
    s.type_ = Some("Opaque".into());
    serde_json::to_value(s).expect("json")
}

/// The reset `name` and its Secret `<name>-pw` holding `password`.
fn reset_with_password(name: &str, password: &[u8]) -> Vec<Value> {
    with_password(reset(name), password)
}

/// The reset `reset` (a variation of [`reset`]) and its Secret `<name>-pw` holding
/// `password`.
fn with_password(reset: Obj, password: &[u8]) -> Vec<Value> {
    let (_, name) = kind_and_name(&reset.0);
    vec![
        secret(&format!("{name}-pw"), "password", password),
        reset.v(),
    ]
}

/// The reset `reset` and its Secret holding a good password: what is wrong is in `reset`.
fn with_good_password(reset: Obj) -> Vec<Value> {
    with_password(reset, GOOD_PASSWORD.as_bytes())
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

/// Applies `objects`; the last one ends Stalled with `reason` and `hint` in its message
/// ([`expect_stalled`]).
fn apply_and_expect_stalled(objects: &[Value], reason: &str, hint: &str) -> Value {
    apply(objects);
    let (kind, name) = kind_and_name(objects.last().expect("an object"));
    expect_stalled(&kind, &name, reason, hint)
}

/// Applies `objects`; the first target of the last one fails with `reason` and `hint` in
/// its message ([`expect_target_failed`]).
fn apply_and_expect_target_failed(objects: &[Value], reason: &str, hint: &str) -> Value {
    apply(objects);
    let (kind, name) = kind_and_name(objects.last().expect("an object"));
    expect_target_failed(&kind, &name, reason, hint)
}

/// On a real API server the last of `objects` is refused with `server` in the message
/// ([`applied_unless_the_server_refuses`]); where it is stored (the emulator) it ends
/// Stalled with `reason` and `hint` in its message.
fn expect_refused_or_stalled(objects: &[Value], server: &str, reason: &str, hint: &str) {
    let (kind, name) = kind_and_name(objects.last().expect("an object"));
    if applied_unless_the_server_refuses(objects, server) {
        expect_stalled(&kind, &name, reason, hint);
    }
}

/// `obj` is refused by a real API server with `server`, else stalls with `InvalidSpec`
/// and `controller` in its message; a reset whose password comes from a Secret comes with
/// that Secret.
fn invalid_spec(obj: Obj, server: &str, controller: &str) {
    let objects = if obj.0["spec"]["password"]["secretRef"].is_object() {
        with_good_password(obj)
    } else {
        vec![obj.v()]
    };
    expect_refused_or_stalled(&objects, server, "InvalidSpec", controller);
}

/// The controller task runs, and nothing on the lab's own threads (controller, shim,
/// emulator) panicked; the tests' own asserts do not count.
fn assert_controller_alive() {
    let lab = lab();
    assert!(
        lab.world.controller_alive(),
        "the controller task ended (crash or exit)"
    );
    let panics = LogCapture::get().panics_on("lab-");
    assert!(panics.is_empty(), "the lab panicked: {panics:?}");
}

/// `canary` appears (plaintext or base64) in no log line, no Event, no status of either
/// kind and no metric.
fn assert_not_leaked(canary: &str) {
    let world = &lab().world;
    world.block_on(world.assert_not_leaked(&[canary]));
}

// ---------------------------------------------------------------------------------------
// The control case and the documentation.

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
    // Every module of this binary.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/bad_input");
    let mut src = String::new();
    for file in std::fs::read_dir(&dir).expect("tests/bad_input") {
        src.push_str(&std::fs::read_to_string(file.expect("entry").path()).expect("source"));
    }
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
