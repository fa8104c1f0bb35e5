//! Faults during work: a hung agent, a controller killed mid-call, and secret hygiene
//! across everything the operator writes and logs.
use guestcred::api::password::{GeneratePolicy, PasswordSource};
use guestcred::api::{
    GuestPasswordReset, GuestPasswordResetSpec, Phase, RolloutSpec, SecretKeyRef, TargetSpec,
};
use guestcred_lab::hostqga::{HostQga, HostQgaOptions};
use guestcred_lab::kubevirt::vm;
use guestcred_lab::world::{World, WorldOptions};
use k8s_openapi::api::core::v1::{Event, Secret};
use kube::Api;
use kube::api::{ListParams, ObjectMeta};
use std::collections::BTreeMap;
use std::io::Write;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

const NS: &str = "default";
const WAIT: Duration = Duration::from_secs(60);

fn reset(name: &str, vm_name: &str, password: PasswordSource) -> GuestPasswordReset {
    let mut r = GuestPasswordReset::new(
        name,
        GuestPasswordResetSpec {
            target: TargetSpec {
                vm_name: Some(vm_name.into()),
                selector: None,
            },
            user: Some("alice".into()),
            password,
            rollout: RolloutSpec::default(),
        },
    );
    r.metadata.namespace = Some(NS.into());
    r
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

fn secret(name: &str, value: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([(
            "password".to_string(),
            value.to_string(),
        )])),
        ..Default::default()
    }
}

fn finished(r: &GuestPasswordReset) -> bool {
    r.status.as_ref().is_some_and(|s| {
        matches!(
            s.run.phase,
            Some(Phase::Succeeded | Phase::Failed | Phase::PartiallySucceeded)
        )
    })
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

async fn output_password(w: &World, name: &str) -> String {
    let secrets: Api<Secret> = Api::namespaced(w.client.clone(), NS);
    let s = secrets.get(name).await.expect("output secret");
    String::from_utf8(s.data.expect("data")["password"].0.clone()).expect("utf-8")
}

#[tokio::test]
async fn a_restart_between_storing_and_applying_applies_the_stored_password() {
    let opts = WorldOptions {
        agent_timeout: Duration::from_secs(2),
        ..WorldOptions::default()
    };
    let mut w = World::start(opts).await.expect("world");
    let qga = w
        .add_vm(
            &vm(NS, "vm-a", "node-1"),
            Some(HostQgaOptions::default().user("alice")),
        )
        .await
        .expect("vm")
        .expect("agent");
    signal(&qga, "-STOP");
    w.apply(&reset("gen", "vm-a", generated()))
        .await
        .expect("reset");
    // Stored, then the call hangs in the frozen agent and times out: unknown outcome.
    w.wait_for(NS, "gen", WAIT, |r: &GuestPasswordReset| {
        r.status.as_ref().is_some_and(|s| {
            s.run
                .targets
                .first()
                .is_some_and(|t| t.reason.as_deref() == Some("AgentTimeout"))
        })
    })
    .await
    .expect("AgentTimeout while the agent is frozen");
    let stored = output_password(&w, "gen-vm-a-password").await;
    w.kill_controller();
    signal(&qga, "-CONT");
    w.start_controller();
    let r: GuestPasswordReset = w
        .wait_for(NS, "gen", WAIT, finished)
        .await
        .expect("finishes after restart");
    assert_eq!(r.status.expect("status").run.phase, Some(Phase::Succeeded));
    assert_eq!(
        output_password(&w, "gen-vm-a-password").await,
        stored,
        "never a second password"
    );
    let hash = qga.shadow_hash("alice").expect("shadow").expect("hash");
    assert!(
        verifies(&stored, &hash),
        "the guest's hash verifies the stored password"
    );
}

#[tokio::test]
async fn a_hung_agent_times_out_while_other_vms_proceed() {
    let opts = WorldOptions {
        agent_timeout: Duration::from_secs(2),
        ..WorldOptions::default()
    };
    let w = World::start(opts).await.expect("world");
    let hung = w
        .add_vm(
            &vm(NS, "vm-hung", "node-1"),
            Some(HostQgaOptions::default().user("alice")),
        )
        .await
        .expect("vm")
        .expect("agent");
    let ok = w
        .add_vm(
            &vm(NS, "vm-ok", "node-1"),
            Some(HostQgaOptions::default().user("alice")),
        )
        .await
        .expect("vm")
        .expect("agent");
    signal(&hung, "-STOP");
    w.apply(&secret("pw", "Hung-Agent-Test-Pw-1"))
        .await
        .expect("secret");
    let src = || PasswordSource {
        secret_ref: Some(SecretKeyRef {
            name: "pw".into(),
            key: "password".into(),
            namespace: None,
        }),
        ..Default::default()
    };
    let mut h = reset("hung", "vm-hung", src());
    h.spec.rollout.deadline_seconds = 10;
    w.apply(&h).await.expect("reset");
    w.apply(&reset("ok", "vm-ok", src())).await.expect("reset");
    let okr: GuestPasswordReset = w
        .wait_for(NS, "ok", WAIT, finished)
        .await
        .expect("the healthy VM finishes");
    assert_eq!(
        okr.status.expect("status").run.phase,
        Some(Phase::Succeeded)
    );
    let hr: GuestPasswordReset = w
        .wait_for(NS, "hung", WAIT, finished)
        .await
        .expect("the hung VM ends");
    let t = &hr.status.expect("status").run.targets[0];
    assert_eq!(t.reason.as_deref(), Some("DeadlineExceeded"));
    assert!(
        t.message
            .as_deref()
            .unwrap_or_default()
            .contains("AgentTimeout"),
        "{t:?}"
    );
    signal(&hung, "-CONT");
    assert!(ok.shadow_hash("alice").expect("shadow").is_some());
}

/// Captured log output of this test binary (all levels, all crates).
fn log_buffer() -> Arc<Mutex<Vec<u8>>> {
    static BUF: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    BUF.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let sink = buf.clone();
        let make = move || Sink(sink.clone());
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .with_writer(make)
            .with_ansi(false)
            .try_init();
        buf
    })
    .clone()
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

#[tokio::test]
async fn no_secret_appears_in_logs_events_or_status() {
    let logs = log_buffer();
    let w = World::start(WorldOptions::default()).await.expect("world");
    let _a = w
        .add_vm(
            &vm(NS, "vm-a", "node-1"),
            Some(HostQgaOptions::default().user("alice")),
        )
        .await
        .expect("vm");
    const PLAIN: &str = "Leak-Canary-Plain-7f3a9";
    const BAD: &str = "Leak-Canary-Bad\nsecond-line";
    w.apply(&secret("good", PLAIN)).await.expect("secret");
    w.apply(&secret("bad", BAD)).await.expect("secret");
    let src = |n: &str| PasswordSource {
        secret_ref: Some(SecretKeyRef {
            name: n.into(),
            key: "password".into(),
            namespace: None,
        }),
        ..Default::default()
    };
    w.apply(&reset("good", "vm-a", src("good")))
        .await
        .expect("reset");
    w.apply(&reset("bad", "vm-a", src("bad")))
        .await
        .expect("reset");
    w.apply(&reset("gen", "vm-a", generated()))
        .await
        .expect("reset");
    let mut unknown_user = reset("nouser", "vm-a", src("good"));
    unknown_user.spec.user = Some("mallory".into());
    w.apply(&unknown_user).await.expect("reset");
    for name in ["good", "gen", "nouser"] {
        w.wait_for(NS, name, WAIT, finished)
            .await
            .expect("finishes");
    }
    w.wait_for(NS, "bad", WAIT, |r: &GuestPasswordReset| {
        r.status.as_ref().is_some_and(|s| {
            s.run
                .conditions
                .iter()
                .any(|c| c.reason == "InvalidPassword")
        })
    })
    .await
    .expect("bad password refused");
    let generated_pw = output_password(&w, "gen-vm-a-password").await;

    let mut haystack = String::from_utf8_lossy(&logs.lock().expect("logs")).to_string();
    let resets: Api<GuestPasswordReset> = Api::namespaced(w.client.clone(), NS);
    for r in resets.list(&ListParams::default()).await.expect("list") {
        haystack.push_str(&serde_json::to_string(&r).expect("json"));
    }
    let events: Api<Event> = Api::all(w.client.clone());
    for e in events.list(&ListParams::default()).await.expect("events") {
        haystack.push_str(&serde_json::to_string(&e).expect("json"));
    }
    let ev2: Api<k8s_openapi::api::events::v1::Event> = Api::all(w.client.clone());
    let n_events = ev2
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
        .len();
    for e in ev2.list(&ListParams::default()).await.expect("events") {
        haystack.push_str(&serde_json::to_string(&e).expect("json"));
    }
    assert!(n_events >= 3, "events were published ({n_events})");
    assert!(
        haystack.contains("UserNotFound"),
        "the scan sees what the operator wrote"
    );
    for canary in [
        PLAIN,
        "Leak-Canary-Bad",
        "second-line",
        generated_pw.as_str(),
    ] {
        assert!(
            !haystack.contains(canary),
            "secret {canary:?} leaked into logs, Events or status"
        );
    }
}
