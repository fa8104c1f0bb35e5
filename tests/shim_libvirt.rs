//! The shim over HTTP with the `libvirt` backend against the real-guest lab: a private
//! libvirtd, QEMU (TCG) guests and their real qemu-ga (`guestcred_lab::guest`).
//!
//! Needs root and scripts/install-deps.sh; the lab fails these tests with the reason when it
//! cannot run, never skips. The shared lab's guests are shared by the tests of this file,
//! so each test changes a (VM, user) pair no other test here touches.
#![allow(clippy::disallowed_methods)] // tests may block: clippy.toml's file-system rule is for src/

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guestcred::api::wire::{DomainRef, KeyOp, SetPasswordRequest, ShimErrorReason};
use guestcred::controller::shim_client::{ShimApi, ShimClient};
use guestcred::shim::libvirt::{
    DEFAULT_DOMAIN_TEMPLATE, KUBEVIRT_SOCKET_SUBPATH, LibvirtAgent, Locator,
};
use guestcred::shim::server::ShimApp;
use guestcred_lab::guest::{
    self, GuestSpec, Libvirtd, TestLab, VM_A, VM_B, VM_HUNG, VM_NOAGENT, VM_OLDAGENT, shadow_entry,
    shared_test_lab,
};
use guestcred_lab::testing::{
    KEY1, KEY2, KEY3, assert_agent_timeout, assert_same_keys, password_request, serve_on_loopback,
    shim_reason,
};

const SHA512_HASH: &str = "$6$gcLabSalt$3CPr/vQb45sQFdvBm/TEkSym19vMe3VQweVAyOduj31BA4Mp6vxpjoDjssqBvU55c8jQk5a25w4TVseP2qvxD0";
/// The hung-agent test's configured timeout.
const AGENT_TIMEOUT: Duration = Duration::from_secs(2);
/// Everything else: plaintext sets hash with yescrypt under TCG on a busy 2-core machine.
const WORK_TIMEOUT: Duration = Duration::from_secs(30);
const CLIENT_TIMEOUT: Duration = Duration::from_secs(60);
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

async fn lab() -> &'static TestLab {
    tokio::task::spawn_blocking(shared_test_lab)
        .await
        .expect("the real-guest lab must start")
}

/// An in-process shim on 127.0.0.1 using `locator`; returns its client.
async fn shim(locator: Locator) -> ShimClient {
    shim_with_timeout(locator, WORK_TIMEOUT).await
}

async fn shim_with_timeout(locator: Locator, agent_timeout: Duration) -> ShimClient {
    let agent = Arc::new(LibvirtAgent::new(locator, agent_timeout));
    // Plain HTTP from lab code (mutual TLS is tests/shim_tls.rs); the node check is on.
    let router = ShimApp::new(agent, LAB_NODE)
        .backend("libvirt")
        .router_without_auth_for_test_worlds();
    let url = serve_on_loopback(router).await;
    ShimClient::new(url, None, CLIENT_TIMEOUT).expect("client")
}

async fn lab_shim() -> (&'static TestLab, ShimClient) {
    let lab = lab().await;
    let client = shim(uri_locator(&lab.uri())).await;
    (lab, client)
}

fn uri_locator(uri: &str) -> Locator {
    Locator::LibvirtUri {
        uri: uri.to_owned(),
        domain_template: DEFAULT_DOMAIN_TEMPLATE.into(),
    }
}

/// `default_vm-a` → namespace `default`, name `vm-a` (KubeVirt's naming).
fn domain(libvirt_name: &str) -> DomainRef {
    let (ns, name) = libvirt_name
        .split_once('_')
        .expect("lab domain names are ns_name");
    DomainRef::new(ns, name).with_node(LAB_NODE)
}

/// The node the in-process shims serve (every request names it).
const LAB_NODE: &str = "lab-node";

fn password(vm: &str, user: &str, secret: &str, crypted: bool) -> SetPasswordRequest {
    password_request(domain(vm), user, secret, crypted)
}

async fn shadow(uri: &str, vm: &'static str, user: &'static str) -> String {
    let uri = uri.to_owned();
    tokio::task::spawn_blocking(move || shadow_entry(&uri, vm, user))
        .await
        .expect("join")
        .expect("read the guest's /etc/shadow")
}

/// Boot an extra guest on `libvirtd` and wait for its agent (blocking pool).
async fn boot_guest(
    libvirtd_uri: String,
    start: impl FnOnce() -> Result<(), guest::LabError> + Send + 'static,
    name: &'static str,
) {
    tokio::task::spawn_blocking(move || {
        start().expect("start extra guest");
        guest::wait_for_agent(&libvirtd_uri, name, BOOT_TIMEOUT).expect("extra guest's agent");
    })
    .await
    .expect("join");
}

#[tokio::test]
async fn crypted_password_is_stored_verbatim_in_the_guest() {
    let (lab, c) = lab_shim().await;
    c.set_password(&password(VM_A, "root", SHA512_HASH, true))
        .await
        .expect("set crypted");
    assert_eq!(shadow(&lab.uri(), VM_A, "root").await, SHA512_HASH);
}

#[tokio::test]
async fn plaintext_password_gives_a_new_guest_hash() {
    let (lab, c) = lab_shim().await;
    let before = shadow(&lab.uri(), VM_B, "alice").await;
    c.set_password(&password(VM_B, "alice", "Correct horse 2", false))
        .await
        .expect("set plaintext");
    let after = shadow(&lab.uri(), VM_B, "alice").await;
    assert_ne!(after, before);
    assert!(
        after.starts_with("$y$") || after.starts_with("$6$"),
        "{after}"
    );
}

/// alice's authorized keys on `d` after `op` with `keys`; fails the test on an error.
async fn alice_keys_after(c: &ShimClient, d: &DomainRef, op: KeyOp, keys: &[&str]) -> Vec<String> {
    let keys = keys.iter().map(|k| k.to_string()).collect();
    c.ssh_keys(d, "alice", op, keys)
        .await
        .expect("ssh-keys call")
}

#[tokio::test]
async fn ssh_keys_add_remove_replace_and_get_round_trip() {
    let (_lab, c) = lab_shim().await;
    let d = domain(VM_A);
    let added = alice_keys_after(&c, &d, KeyOp::Add, &[KEY1, KEY2]).await;
    assert!(
        added.iter().any(|k| k == KEY1) && added.iter().any(|k| k == KEY2),
        "{added:?}"
    );
    let removed = alice_keys_after(&c, &d, KeyOp::Remove, &[KEY1]).await;
    assert!(!removed.iter().any(|k| k == KEY1) && removed.iter().any(|k| k == KEY2));
    let replaced = alice_keys_after(&c, &d, KeyOp::Replace, &[KEY3]).await;
    assert_same_keys(&replaced, &[KEY3]);
    assert_same_keys(&c.get_ssh_keys(&d, "alice").await.unwrap(), &[KEY3]);
}

#[tokio::test]
async fn guest_without_agent_is_agent_not_connected() {
    let (_lab, c) = lab_shim().await;
    let probe = c.probe(&domain(VM_NOAGENT)).await.expect("probe answers");
    assert!(!probe.agent_connected);
    let r = c
        .set_password(&password(VM_NOAGENT, "root", SHA512_HASH, true))
        .await;
    assert_eq!(shim_reason(r), ShimErrorReason::AgentNotConnected);
}

#[tokio::test]
async fn hung_agent_times_out_after_the_configured_timeout_while_another_domain_answers() {
    let lab = lab().await;
    let c = shim_with_timeout(uri_locator(&lab.uri()), AGENT_TIMEOUT).await;
    // Warm the connection so the healthy call below measures only the agent call.
    c.probe(&domain(VM_B))
        .await
        .expect("the healthy domain answers");
    let started = Instant::now();
    // libvirt runs one agent call per domain at a time, so eight calls to the hung domain
    // keep it busy for about eight timeouts: a window wide enough for the healthy call even
    // on a loaded machine (no timing is asserted, only the order).
    let hung: Vec<_> = (0..8)
        .map(|_| {
            let c = c.clone();
            tokio::spawn(async move { c.get_ssh_keys(&domain(VM_HUNG), "root").await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let probe = c
        .probe(&domain(VM_B))
        .await
        .expect("the healthy domain answers");
    assert!(probe.agent_connected);
    assert!(
        hung.iter().any(|h| !h.is_finished()),
        "calls to the hung domain must still be pending while another domain answers"
    );
    for h in hung {
        assert_agent_timeout(h, Duration::from_secs(60)).await;
    }
    assert!(
        started.elapsed() >= AGENT_TIMEOUT,
        "timed out before the configured agent timeout"
    );
}

/// `action` (a blocking libvirt call, e.g. `guest::pause_guest`) on domain `vm` at `uri`.
async fn on_domain<T: Send + 'static>(
    uri: &str,
    vm: &'static str,
    action: fn(&str, &str) -> T,
) -> T {
    let uri = uri.to_owned();
    tokio::task::spawn_blocking(move || action(&uri, vm))
        .await
        .expect("the libvirt call ran")
}

#[tokio::test]
async fn paused_domain_is_not_running() {
    let lab = lab().await;
    let c = shim(uri_locator(&lab.uri())).await;
    const VM: &str = "default_vm-paused";
    let (uri, work) = (lab.uri(), lab.work_dir.clone());
    boot_guest(
        uri.clone(),
        move || guest::start_guest(&lab.libvirtd, &lab.image, &GuestSpec::new(VM), &work),
        VM,
    )
    .await;
    on_domain(&uri, VM, guest::pause_guest)
        .await
        .expect("pause");
    let r = c
        .set_password(&password(VM, "root", SHA512_HASH, true))
        .await;
    on_domain(&uri, VM, guest::destroy_guest)
        .await
        .expect("destroy");
    assert_eq!(shim_reason(r), ShimErrorReason::DomainNotRunning);
}

#[tokio::test]
async fn unknown_domain_is_domain_not_found() {
    let (_lab, c) = lab_shim().await;
    assert_eq!(
        shim_reason(
            c.probe(&DomainRef::new("default", "no-such-vm").with_node(LAB_NODE))
                .await
        ),
        ShimErrorReason::DomainNotFound
    );
}

#[tokio::test]
async fn unknown_user_is_user_not_found() {
    let (_lab, c) = lab_shim().await;
    let r = c
        .set_password(&password(VM_B, "bob", "pw-123456", false))
        .await;
    assert_eq!(shim_reason(r), ShimErrorReason::UserNotFound);
    assert_eq!(
        shim_reason(c.get_ssh_keys(&domain(VM_B), "bob").await),
        ShimErrorReason::UserNotFound
    );
}

#[tokio::test]
async fn agent_with_ssh_commands_blocked_is_unsupported() {
    let (_lab, c) = lab_shim().await;
    let d = domain(VM_OLDAGENT);
    let probe = c.probe(&d).await.unwrap();
    assert!(probe.agent_connected && !probe.supports_ssh_keys());
    assert_eq!(
        shim_reason(c.ssh_keys(&d, "alice", KeyOp::Add, vec![KEY1.into()]).await),
        ShimErrorReason::Unsupported
    );
}

#[tokio::test]
async fn probe_reports_version_commands_and_os() {
    let (_lab, c) = lab_shim().await;
    let p = c.probe(&domain(VM_A)).await.unwrap();
    assert!(p.agent_connected && p.supports_ssh_keys() && p.supports_set_password());
    assert!(p.agent_version.is_some());
    assert!(p.os.is_some(), "guest-get-osinfo answered");
}

#[tokio::test]
async fn kubevirt_locator_reaches_the_domain_through_the_launcher_socket() {
    let lab = lab().await;
    let pods = tempfile::tempdir().unwrap();
    let uid = "0b9c5a4e-8d7f-4f3a-9e2b-1c2d3e4f5a6b";
    let sock = pods.path().join(uid).join(KUBEVIRT_SOCKET_SUBPATH);
    std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
    // A plain libvirtd socket stands in for the launcher's virtqemud.
    std::os::unix::fs::symlink(lab.libvirtd.socket_path(), &sock).unwrap();
    let c = shim(Locator::Kubevirt {
        kubelet_pods_dir: pods.path().to_path_buf(),
        domain_template: DEFAULT_DOMAIN_TEMPLATE.into(),
        socket_link_dir: pods.path().join("links"),
    })
    .await;
    let p = c
        .probe(&domain(VM_A).with_launcher_pod_uid(uid))
        .await
        .expect("probe via kubevirt locator");
    assert!(p.agent_connected);
    let other_pod = domain(VM_A).with_launcher_pod_uid("11111111-2222-3333-4444-555555555555");
    assert_eq!(
        shim_reason(c.probe(&other_pod).await),
        ShimErrorReason::DomainNotFound
    );
}

fn restart_dir() -> PathBuf {
    std::env::temp_dir().join(format!("guestcred-shim-restart-{}", std::process::id()))
}

fn start_libvirtd(dir: &Path) -> Libvirtd {
    Libvirtd::start(dir, &guest::default_cache_dir()).unwrap_or_else(|e| {
        panic!("cannot start libvirtd (run scripts/install-deps.sh as root): {e}")
    })
}

#[tokio::test]
async fn shim_reconnects_after_libvirtd_restarts() {
    let lab = lab().await;
    const VM: &str = "default_vm-restart";
    let dir = restart_dir();
    let first = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || start_libvirtd(&dir)
    })
    .await
    .unwrap();
    let uri = first.uri();
    let c = shim(uri_locator(&uri)).await;
    let boot = |d: Libvirtd| {
        let work = dir.join("vms");
        let uri = uri.clone();
        async move {
            let d = Arc::new(d);
            let d2 = d.clone();
            boot_guest(
                uri,
                move || guest::start_guest(&d2, &lab.image, &GuestSpec::new(VM), &work),
                VM,
            )
            .await;
            Arc::try_unwrap(d).expect("sole owner")
        }
    };
    let first = boot(first).await;
    assert!(
        c.probe(&domain(VM))
            .await
            .expect("probe before restart")
            .agent_connected
    );

    tokio::task::spawn_blocking(move || first.stop())
        .await
        .unwrap()
        .expect("stop libvirtd");
    let second = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || start_libvirtd(&dir)
    })
    .await
    .unwrap();
    assert_eq!(second.uri(), uri, "same socket after the restart");
    let second = boot(second).await;

    let p = c
        .probe(&domain(VM))
        .await
        .expect("probe after restart reconnects");
    assert!(p.agent_connected);
    tokio::task::spawn_blocking(move || second.stop())
        .await
        .unwrap()
        .expect("stop libvirtd");
    let _ = std::fs::remove_dir_all(&dir);
}
