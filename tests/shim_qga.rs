//! The shim's API over plain HTTP without authentication, served from lab code
//! (`guestcred_lab::world::serve_plain_http`; the shim binary serves mutual TLS only, see
//! tests/shim_tls.rs) with the `qga-socket` backend against real qemu-ga instances
//! (`guestcred_lab::hostqga`): the host's qemu-ga in private namespaces, no VM.
//!
//! Needs root, `unshare`, overlayfs and qemu-ga (scripts/install-deps.sh). Without them
//! these tests fail with the reason; they never skip.
#![allow(clippy::disallowed_methods)] // tests may block: clippy.toml's file-system rule is for src/

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use guestcred::api::wire::{DomainRef, KeyOp, SetPasswordRequest, ShimErrorReason, paths};
use guestcred::controller::shim_client::{ShimApi, ShimCallError, ShimClient};
use guestcred::shim::qga::QgaSocketAgent;
use guestcred::shim::server::ShimApp;
use guestcred_lab::hostqga::{HostQga, HostQgaOptions, SSH_COMMANDS};
use guestcred_lab::testing::{
    KEY1, KEY2, KEY3, alice, assert_agent_timeout, assert_same_keys, hash_of, password_request,
    serve_on_loopback, shim_reason, silent_socket,
};
use tempfile::TempDir;

const SHA512_HASH: &str = "$6$gcLabSalt$3CPr/vQb45sQFdvBm/TEkSym19vMe3VQweVAyOduj31BA4Mp6vxpjoDjssqBvU55c8jQk5a25w4TVseP2qvxD0";
const CLIENT_TIMEOUT: Duration = Duration::from_secs(30);

/// A shim serving on 127.0.0.1 with the qga-socket backend, sockets under `dir`.
struct Shim {
    dir: TempDir,
    url: String,
}

impl Shim {
    async fn start(agent_timeout: Duration) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("gcq")
            .tempdir()
            .expect("tempdir");
        let template = format!("{}/{{name}}/qga.sock", dir.path().display());
        let agent = Arc::new(QgaSocketAgent::new(template, agent_timeout));
        let app = ShimApp::new(agent, NODE)
            .backend("qga-socket")
            .router_without_auth_for_test_worlds();
        let url = serve_on_loopback(app).await;
        Self { dir, url }
    }

    async fn open() -> Self {
        Self::start(Duration::from_secs(5)).await
    }

    /// A shim ([`Self::open`]) and VM `name` behind it, its agent as `opts` say.
    async fn with_vm(name: &str, opts: HostQgaOptions) -> (Self, HostQga) {
        let shim = Self::open().await;
        let vm = shim.vm(name, opts);
        (shim, vm)
    }

    /// A client of this shim and VM `name`'s domain, as each call names it.
    fn on(&self, name: &str) -> (ShimClient, DomainRef) {
        (self.client(), domain(name))
    }

    fn client(&self) -> ShimClient {
        ShimClient::new(&self.url, None, CLIENT_TIMEOUT).expect("client")
    }

    fn vm(&self, name: &str, opts: HostQgaOptions) -> HostQga {
        HostQga::start_with(self.dir.path(), name, &opts).unwrap_or_else(|e| {
            panic!("lab qemu-ga {name} must start (needs root, unshare, overlayfs, qemu-ga): {e}")
        })
    }

    /// Sets `user`'s password on VM `vm` to `secret` (a crypt(3) hash when `crypted`);
    /// fails the test if the shim refuses.
    async fn set_password(&self, vm: &str, user: &str, secret: &str, crypted: bool) {
        self.client()
            .set_password(&password(vm, user, secret, crypted))
            .await
            .unwrap_or_else(|e| panic!("set {user}'s password on {vm}: {e:?}"));
    }

    fn socket_dir(&self, name: &str) -> PathBuf {
        let d = self.dir.path().join(name);
        std::fs::create_dir_all(&d).expect("socket dir");
        d
    }
}

/// The node the in-process shim serves (every request names it).
const NODE: &str = "node-a";

fn domain(name: &str) -> DomainRef {
    DomainRef::new("lab", name).with_node(NODE)
}

fn password(vm: &str, user: &str, secret: &str, crypted: bool) -> SetPasswordRequest {
    password_request(domain(vm), user, secret, crypted)
}

/// A crypted password for `user` on a fresh VM `vm` (its agent as `opts` say) lands in
/// the guest's shadow as the very hash sent.
async fn assert_crypted_hash_lands(vm: &str, user: &str, opts: HostQgaOptions) {
    let (shim, guest) = Shim::with_vm(vm, opts).await;
    shim.set_password(vm, user, SHA512_HASH, true).await;
    assert_eq!(hash_of(&guest, user).as_deref(), Some(SHA512_HASH));
}

#[tokio::test]
async fn crypted_password_lands_verbatim_in_the_guest_shadow() {
    assert_crypted_hash_lands("vm-crypt", "alice", alice()).await;
}

#[tokio::test]
async fn plaintext_password_becomes_a_new_guest_hash() {
    let (shim, vm) = Shim::with_vm("vm-plain", alice()).await;
    let before = hash_of(&vm, "alice");
    shim.set_password("vm-plain", "alice", "Correct horse 1", false)
        .await;
    let after = hash_of(&vm, "alice").expect("alice in shadow");
    assert_ne!(Some(&after), before.as_ref());
    assert!(
        after.starts_with("$y$") || after.starts_with("$6$"),
        "{after}"
    );
    assert!(!after.contains("Correct horse"));
}

#[tokio::test]
async fn root_password_can_be_set() {
    assert_crypted_hash_lands("vm-root", "root", HostQgaOptions::default()).await;
}

#[tokio::test]
async fn ssh_keys_add_remove_replace_and_get_round_trip() {
    let (shim, vm) = Shim::with_vm("vm-keys", alice()).await;
    let (c, d) = shim.on("vm-keys");

    assert!(
        c.get_ssh_keys(&d, "alice").await.unwrap().is_empty(),
        "no file yet = no keys"
    );

    // Each call's keys, and the keys the call answers with and the guest's file holds after it.
    let steps: [(KeyOp, &[&str], &[&str]); 4] = [
        (KeyOp::Add, &[KEY1, KEY2], &[KEY1, KEY2]),
        // Adding a key that is there already changes nothing.
        (KeyOp::Add, &[KEY1], &[KEY1, KEY2]),
        (KeyOp::Remove, &[KEY1], &[KEY2]),
        (KeyOp::Replace, &[KEY3], &[KEY3]),
    ];
    for (op, keys, want) in steps {
        let answer = c
            .ssh_keys(
                &d,
                "alice",
                op,
                keys.iter().map(|k| k.to_string()).collect(),
            )
            .await
            .unwrap();
        assert_same_keys(&answer, want);
        assert_same_keys(&vm.authorized_keys("alice").unwrap(), want);
    }
    assert_same_keys(&c.get_ssh_keys(&d, "alice").await.unwrap(), &[KEY3]);
}

#[tokio::test]
async fn adding_keys_keeps_keys_the_operator_never_added() {
    let (shim, vm) = Shim::with_vm("vm-seeded", alice()).await;
    vm.seed_authorized_keys("alice", &[KEY1]).unwrap();
    let keys = shim
        .client()
        .ssh_keys(&domain("vm-seeded"), "alice", KeyOp::Add, vec![KEY2.into()])
        .await
        .unwrap();
    assert_same_keys(&keys, &[KEY1, KEY2]);
}

#[tokio::test]
async fn unknown_user_is_user_not_found_for_passwords_and_keys() {
    let (shim, _vm) = Shim::with_vm("vm-nouser", alice()).await;
    let (c, d) = shim.on("vm-nouser");
    assert_eq!(
        shim_reason(
            c.set_password(&password("vm-nouser", "bob", "pw-123456", false))
                .await
        ),
        ShimErrorReason::UserNotFound
    );
    assert_eq!(
        shim_reason(c.get_ssh_keys(&d, "bob").await),
        ShimErrorReason::UserNotFound
    );
    assert_eq!(
        shim_reason(c.ssh_keys(&d, "bob", KeyOp::Add, vec![KEY1.into()]).await),
        ShimErrorReason::UserNotFound
    );
}

#[tokio::test]
async fn invalid_input_is_rejected_before_any_agent_connection() {
    let shim = Shim::open().await;
    let connections = silent_socket(&shim.socket_dir("vm-guarded").join("qga.sock"));
    let (c, d) = shim.on("vm-guarded");
    let private = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----";

    let cases: Vec<(&str, Result<Vec<String>, ShimCallError>)> = vec![
        (
            "user with ':'",
            c.set_password(&password("vm-guarded", "ali:ce", "pw-123456", false))
                .await
                .map(|_| vec![]),
        ),
        ("user with space", c.get_ssh_keys(&d, "ali ce").await),
        (
            "newline in password",
            c.set_password(&password("vm-guarded", "alice", "pw\nroot:x", false))
                .await
                .map(|_| vec![]),
        ),
        (
            "plaintext as crypted",
            c.set_password(&password("vm-guarded", "alice", "not-a-hash", true))
                .await
                .map(|_| vec![]),
        ),
        (
            "garbage key",
            c.ssh_keys(&d, "alice", KeyOp::Add, vec!["ssh-rsa not-a-key".into()])
                .await,
        ),
        (
            "private key",
            c.ssh_keys(&d, "alice", KeyOp::Replace, vec![private.into()])
                .await,
        ),
        (
            "path in vm name",
            c.get_ssh_keys(&domain("../vm-guarded"), "alice").await,
        ),
    ];
    for (what, result) in cases {
        match result {
            Err(ShimCallError::Shim(e)) => {
                assert_eq!(e.reason, ShimErrorReason::InvalidArgument, "{what}");
                assert!(
                    !e.message.contains("pw\n") && !e.message.contains("not-a-hash"),
                    "{what}: {}",
                    e.message
                );
            }
            other => panic!("{what}: expected InvalidArgument, got {other:?}"),
        }
    }
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "no request may reach the agent"
    );
}

#[tokio::test]
async fn private_key_rejection_says_so() {
    let shim = Shim::open().await;
    let pem = "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----";
    match shim
        .client()
        .ssh_keys(&domain("vm-x"), "alice", KeyOp::Add, vec![pem.into()])
        .await
    {
        Err(ShimCallError::Shim(e)) => assert!(e.message.contains("private key"), "{}", e.message),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

#[tokio::test]
async fn missing_agent_socket_is_domain_not_found() {
    let shim = Shim::open().await;
    let r = shim.client().probe(&domain("vm-absent")).await;
    assert_eq!(shim_reason(r), ShimErrorReason::DomainNotFound);
}

#[tokio::test]
async fn hung_agent_times_out_while_another_vm_answers() {
    let timeout = Duration::from_secs(3);
    let shim = Shim::start(timeout).await;
    let vm = shim.vm("vm-ok", alice());
    silent_socket(&shim.socket_dir("vm-hung").join("qga.sock"));
    let c = shim.client();

    let started = Instant::now();
    let hung = {
        let c = c.clone();
        tokio::spawn(async move {
            c.set_password(&password("vm-hung", "alice", SHA512_HASH, true))
                .await
        })
    };
    // Two calls to the healthy VM complete while the hung call is still waiting.
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.set_password(&password("vm-ok", "alice", SHA512_HASH, true))
        .await
        .expect("healthy VM answers");
    let probe = c.probe(&domain("vm-ok")).await.expect("healthy VM probes");
    assert!(probe.agent_connected);
    assert!(
        !hung.is_finished(),
        "the hung call must still be pending while the other VM answers"
    );
    assert_eq!(hash_of(&vm, "alice").as_deref(), Some(SHA512_HASH));

    assert_agent_timeout(hung, Duration::from_secs(30)).await;
    assert!(
        started.elapsed() >= timeout,
        "timed out before the configured agent timeout"
    );
}

/// A shim killed, or timing out, just as the agent answers hangs up with the answer unread.
/// A VM's agent sits behind the hypervisor's chardev and never sees that; the lab's agent
/// must not either (qemu-ga serving a unix socket itself exits on the ECONNRESET).
#[tokio::test]
async fn a_client_hanging_up_with_the_agents_answer_unread_leaves_the_agent_serving() {
    let (shim, vm) = Shim::with_vm("vm-hangup", alice()).await;
    let mut raw = tokio::net::UnixStream::connect(vm.socket_path())
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(
        &mut raw,
        b"{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":7}}\n",
    )
    .await
    .expect("send sync");
    tokio::time::timeout(CLIENT_TIMEOUT, raw.readable())
        .await
        .expect("the agent answers")
        .expect("readable");
    drop(raw);

    let probe = shim.client().probe(&domain("vm-hangup")).await;
    assert!(probe.as_ref().is_ok_and(|p| p.agent_connected), "{probe:?}");
    shim.set_password("vm-hangup", "alice", SHA512_HASH, true)
        .await;
}

#[tokio::test]
async fn probe_reports_agent_version_commands_and_os() {
    let (shim, _vm) = Shim::with_vm("vm-probe", HostQgaOptions::default()).await;
    let p = shim
        .client()
        .probe(&domain("vm-probe"))
        .await
        .expect("probe");
    assert!(p.agent_connected);
    assert!(p.agent_version.as_deref().is_some_and(|v| !v.is_empty()));
    assert!(p.supports_ssh_keys() && p.supports_set_password());
    assert!(
        !p.supported_commands.iter().any(|c| c == "guest-exec"),
        "blocked commands are not listed"
    );
    assert!(
        p.os.and_then(|o| o.id).is_some(),
        "OS id from guest-get-osinfo"
    );
}

#[tokio::test]
async fn agent_without_ssh_commands_is_unsupported() {
    let (shim, _vm) = Shim::with_vm("vm-old", alice().block(SSH_COMMANDS)).await;
    let (c, d) = shim.on("vm-old");
    assert!(!c.probe(&d).await.unwrap().supports_ssh_keys());
    assert_eq!(
        shim_reason(c.ssh_keys(&d, "alice", KeyOp::Add, vec![KEY1.into()]).await),
        ShimErrorReason::Unsupported
    );
    assert_eq!(
        shim_reason(c.get_ssh_keys(&d, "alice").await),
        ShimErrorReason::Unsupported
    );
}

/// Health and metrics are served on the ops port only (`ShimApp::ops_router`), never on
/// the API port.
#[tokio::test]
async fn health_endpoints_are_not_on_the_api_port() {
    let shim = Shim::open().await;
    for path in [paths::HEALTHZ, paths::READYZ, "/metrics"] {
        let health = reqwest::get(format!("{}{path}", shim.url)).await.unwrap();
        assert_eq!(health.status(), reqwest::StatusCode::NOT_FOUND, "{path}");
    }
}

#[tokio::test]
async fn malformed_body_is_invalid_argument_without_echoing_it() {
    let shim = Shim::open().await;
    let resp = reqwest::Client::new()
        .post(format!("{}{}", shim.url, paths::PASSWORD))
        .header("content-type", "application/json")
        .body(r#"{"domain":{"namespace":"lab","name":"vm"},"user":"root","password":"s3cr3t-zz","crypted":"s3cr3t-zz"}"#)
        .send()
        .await
        .unwrap();
    let body: guestcred::api::wire::ShimError = resp.json().await.unwrap();
    assert_eq!(body.reason, ShimErrorReason::InvalidArgument);
    assert!(!body.message.contains("s3cr3t"), "{}", body.message);
}

#[tokio::test]
async fn unreachable_shim_is_reported_as_unreachable() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let c = ShimClient::new(url, None, Duration::from_secs(5)).unwrap();
    assert!(matches!(
        c.probe(&domain("vm")).await,
        Err(ShimCallError::Unreachable(_))
    ));
}

#[tokio::test]
async fn many_vms_are_served_concurrently_each_with_its_own_result() {
    const VMS: usize = 24;
    let shim = Shim::open().await;
    let vms: Vec<HostQga> = (0..VMS)
        .map(|i| shim.vm(&format!("vm-many-{i}"), alice()))
        .collect();
    let c = shim.client();
    let calls = (0..VMS).map(|i| {
        let c = c.clone();
        async move {
            let d = domain(&format!("vm-many-{i}"));
            c.set_password(&password(
                &format!("vm-many-{i}"),
                "alice",
                SHA512_HASH,
                true,
            ))
            .await?;
            c.ssh_keys(
                &d,
                "alice",
                KeyOp::Replace,
                vec![[KEY1, KEY2, KEY3][i % 3].into()],
            )
            .await
        }
    });
    let results = futures::future::join_all(calls).await;
    for (i, (vm, result)) in vms.iter().zip(results).enumerate() {
        assert_same_keys(
            &result.expect("every VM answers"),
            &[[KEY1, KEY2, KEY3][i % 3]],
        );
        assert_eq!(hash_of(vm, "alice").as_deref(), Some(SHA512_HASH));
    }
}

/// `guestcred shim ...` as a process, with the environment cleared of shim settings.
fn shim_process(args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_guestcred"));
    cmd.arg("shim").args(args);
    for (k, _) in std::env::vars() {
        if k.starts_with("GUESTCRED_SHIM_") {
            cmd.env_remove(k);
        }
    }
    cmd
}

/// What `cmd` (a [`shim_process`]) says on stderr when it refuses to start; fails the test
/// if it started.
fn refusal(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().expect("run guestcred shim");
    assert!(!out.status.success(), "the shim must refuse to start");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A loopback address nothing listens on (it was free a moment ago).
fn free_loopback_address() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().to_string()
}

#[test]
fn shim_binary_refuses_to_start_without_authentication() {
    let stderr = refusal(
        shim_process(&["--listen", "127.0.0.1:0", "--backend", "qga-socket"])
            .args(["--node-name", NODE]),
    );
    assert!(
        stderr.contains("the shim serves HTTPS with mutual TLS only"),
        "{stderr}"
    );
}

/// The old token-over-plain-HTTP mode is gone: a token file without the TLS flags is a
/// start-up error that says what to give instead, and nothing listens.
#[test]
fn shim_binary_refuses_a_token_file_without_tls() {
    let listen = free_loopback_address();
    let token_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token_file.path(), "lab-shim-token\n").unwrap();
    // A token alone must not start a shim.
    let stderr = refusal(
        shim_process(&["--listen", &listen, "--backend", "qga-socket"])
            .args(["--metrics-listen", "", "--node-name", NODE])
            .env("GUESTCRED_SHIM_AUTH_TOKEN_FILE", token_file.path()),
    );
    assert!(
        stderr.contains(
            "--auth-token-file is only accepted on top of mutual TLS; the shim serves HTTPS with mutual TLS only: give --tls-cert-file, --tls-key-file and --client-ca-file"
        ),
        "{stderr}"
    );
    assert!(
        std::net::TcpStream::connect(&listen).is_err(),
        "nothing serves on {listen}"
    );
}
