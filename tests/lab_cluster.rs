//! `guestcred-lab up/status/exec/pause/resume/down` and kubevirt-lite, end to end with the
//! built binaries: real libvirtds, real QEMU guests with qemu-ga, real shims (mutual TLS
//! with the certificates `up` mints).
//!
//! One lab (2 nodes x 2 VMs plus an agent-less guest and two guests that tests change) is shared by the tests of this binary
//! and tied to this process (`--owner-pid`): it goes down by itself when the tests end.
//! `down` is tested on a lab of its own. Needs root and scripts/install-deps.sh; a lab that
//! cannot come up fails every test with the reason.
#![allow(clippy::disallowed_methods)] // tests may block: clippy.toml's file-system rule is for src/
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use guestcred::api::kubevirt::{VirtualMachine, VirtualMachineInstance};
use guestcred::api::wire::DomainRef;
use guestcred::controller::shim_client::{ShimApi as _, ShimCallError, ShimClient};
use guestcred::tls::client::{ClientTlsFiles, ReloadingHttpClient};
use guestcred_lab::cluster::{LabState, LabStatus, procs};
use guestcred_lab::guest::process_alive;
use guestcred_lab::testing::sorted_names;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

/// The lab binary is another workspace package's: `make test` builds every binary first.
static LAB: std::sync::LazyLock<std::path::PathBuf> = std::sync::LazyLock::new(|| {
    guestcred_lab::cluster::lab_binary(None)
        .expect("the guestcred-lab binary (cargo build --workspace --bins)")
});
const GUESTCRED: &str = env!("CARGO_BIN_EXE_guestcred");
/// kubevirt-lite polls every 2 s; a restarted guest boots in seconds under TCG, slower on a
/// busy machine.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(120);
const NEW_KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJF3X2of517d5Kg00cGhwfj7PqWgUgbbxnZyL96Twgi5 rebuilt@lab-cluster-test";

struct SharedLab {
    dir: PathBuf,
    state: LabState,
}

fn lab_command(args: &[&str]) -> Output {
    Command::new(&*LAB)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", LAB.display()))
}

fn text(out: &Output) -> String {
    format!(
        "exit {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn up_args<'a>(dir: &'a str, owner: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "up",
        "--state-dir",
        dir,
        "--shim-port",
        "0",
        "--owner-pid",
        owner,
        "--guestcred-bin",
        GUESTCRED,
    ];
    args.extend_from_slice(extra);
    args
}

/// Brings a lab up in a fresh directory; panics with the lab's own words when it cannot.
fn start_lab(prefix: &str, extra: &[&str]) -> SharedLab {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("temp dir")
        .keep();
    let dir_arg = dir.display().to_string();
    let owner = std::process::id().to_string();
    let out = lab_command(&up_args(&dir_arg, &owner, extra));
    assert!(
        out.status.success(),
        "the lab must come up (needs root and scripts/install-deps.sh):\n{}",
        text(&out)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!(
            "export KUBECONFIG={}",
            dir.join("kubeconfig").display()
        )),
        "up prints the export line:\n{}",
        text(&out)
    );
    let state = LabState::load(&dir).expect("up leaves a readable lab.json");
    SharedLab { dir, state }
}

fn shared_lab() -> &'static SharedLab {
    static LAB_ONCE: OnceLock<SharedLab> = OnceLock::new();
    static FAILED: OnceLock<String> = OnceLock::new();
    if let Some(reason) = FAILED.get() {
        panic!("{reason}");
    }
    LAB_ONCE.get_or_init(|| {
        match std::panic::catch_unwind(|| {
            start_lab(
                "gclab",
                &[
                    "--nodes",
                    "2",
                    "--vms-per-node",
                    "2",
                    "--extra-vm",
                    "vm-noagent:node-2:agent=off",
                    // Guests the restart and pause tests change, so the others stay put.
                    "--extra-vm",
                    "vm-restart:node-2",
                    "--extra-vm",
                    "vm-pause:node-1",
                ],
            )
        }) {
            Ok(lab) => lab,
            Err(panic) => {
                let reason = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| "the shared lab could not start".into());
                let _ = FAILED.set(reason.clone());
                panic!("{reason}");
            }
        }
    })
}

fn dir_arg(lab: &SharedLab) -> String {
    lab.dir.display().to_string()
}

async fn client(lab: &SharedLab) -> Client {
    let kubeconfig =
        kube::config::Kubeconfig::read_from(&lab.state.kubeconfig).expect("kubeconfig parses");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("kubeconfig is usable");
    Client::try_from(config).expect("client")
}

fn condition(vmi: &VirtualMachineInstance, type_: &str) -> Option<String> {
    vmi.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == type_)
            .map(|c| c.status.clone())
    })
}

/// Polls the VMI until `pred` holds; fails with the last one seen.
async fn wait_vmi(
    client: &Client,
    name: &str,
    pred: impl Fn(&VirtualMachineInstance) -> bool,
) -> VirtualMachineInstance {
    let api: Api<VirtualMachineInstance> = Api::namespaced(client.clone(), "default");
    let started = Instant::now();
    loop {
        let last = api.get_opt(name).await.expect("get VMI");
        if let Some(vmi) = &last
            && pred(vmi)
        {
            return vmi.clone();
        }
        assert!(
            started.elapsed() < CHANGE_TIMEOUT,
            "VMI {name} did not reach the expected state in {CHANGE_TIMEOUT:?}; last seen: {last:#?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn exec(lab: &SharedLab, vm: &str, argv: &[&str]) -> Output {
    let dir = dir_arg(lab);
    let mut args = vec!["exec", "--state-dir", dir.as_str(), vm, "--"];
    args.extend_from_slice(argv);
    lab_command(&args)
}

#[test]
fn status_shows_every_guest_on_its_node_with_its_agent_and_healthy_shims() {
    let lab = shared_lab();
    let out = lab_command(&["status", "--state-dir", &dir_arg(lab), "--json"]);
    assert!(out.status.success(), "{}", text(&out));
    let status: LabStatus = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    assert!(status.serve_running);
    assert_eq!(status.nodes.len(), 2);
    assert!(
        status
            .nodes
            .iter()
            .all(|n| n.shim_healthy && n.libvirtd_running),
        "{:#?}",
        status.nodes
    );
    let regular: Vec<_> = status
        .vms
        .iter()
        .filter(|v| ["vm-1-1", "vm-1-2", "vm-2-1", "vm-2-2"].contains(&v.name.as_str()))
        .collect();
    assert_eq!(regular.len(), 4);
    for node in ["node-1", "node-2"] {
        assert_eq!(
            regular.iter().filter(|v| v.node == node).count(),
            2,
            "{node}"
        );
    }
    assert!(
        regular
            .iter()
            .all(|v| v.domain_state == "running" && v.agent_connected),
        "{:#?}",
        status.vms
    );
}

#[tokio::test]
async fn the_api_shows_two_nodes_a_shim_pod_on_each_and_running_vmis_with_agents() {
    let lab = shared_lab();
    let client = client(lab).await;
    let nodes: Api<Node> = Api::all(client.clone());
    assert_eq!(
        sorted_names(&nodes, &ListParams::default()).await,
        ["node-1", "node-2"]
    );

    let pods: Api<Pod> = Api::namespaced(client.clone(), guestcred_lab::cluster::SHIM_NAMESPACE);
    let shim_pods = pods.list(&ListParams::default()).await.expect("list pods");
    let mut placement: Vec<(String, String)> = shim_pods
        .items
        .iter()
        .filter_map(|p| {
            let node = p.spec.as_ref()?.node_name.clone()?;
            let ip = p.status.as_ref()?.pod_ip.clone()?;
            Some((node, ip))
        })
        .collect();
    placement.sort();
    assert_eq!(
        placement,
        [
            ("node-1".to_string(), "127.0.0.11".to_string()),
            ("node-2".to_string(), "127.0.0.12".to_string())
        ]
    );

    for name in ["vm-1-1", "vm-1-2", "vm-2-1", "vm-2-2"] {
        let vmi = wait_vmi(&client, name, |v| v.is_running() && v.agent_connected()).await;
        assert!(
            vmi.launcher_pod_uid().is_some(),
            "{name} has a launcher pod"
        );
        let os = vmi.status.as_ref().and_then(|s| s.guest_os_info.clone());
        assert_eq!(
            os.and_then(|o| o.id).as_deref(),
            Some("guestcred-lab"),
            "{name}: guestOSInfo comes from guest-get-osinfo"
        );
    }
}

#[tokio::test]
async fn vms_carry_tier_and_node_labels_for_selectors() {
    let lab = shared_lab();
    let client = client(lab).await;
    let vms: Api<VirtualMachine> = Api::namespaced(client, "default");
    let db = ListParams::default().labels("tier=db");
    assert_eq!(sorted_names(&vms, &db).await, ["vm-1-1", "vm-2-1"]);
}

#[tokio::test]
async fn an_extra_vm_without_an_agent_runs_with_its_agent_disconnected() {
    let lab = shared_lab();
    let client = client(lab).await;
    let vmi = wait_vmi(&client, "vm-noagent", |v| v.is_running()).await;
    assert_eq!(vmi.node_name(), Some("node-2"));
    assert_eq!(condition(&vmi, "AgentConnected").as_deref(), Some("False"));
}

/// The lab's shims run as the chart's do: HTTPS with mutual TLS only, using the
/// certificates `up` minted; health on the plain metrics port.
#[tokio::test]
async fn shims_admit_the_labs_controller_certificate_and_nothing_else() {
    let lab = shared_lab();
    let node = &lab.state.nodes[0];
    let api = format!("{}:{}", node.ip, lab.state.shim_port);
    let domain = DomainRef::new("default", "vm-1-1").with_node(&node.name);
    let files = lab.state.tls().controller_client_files();
    let client_with = |files: ClientTlsFiles| {
        let http = ReloadingHttpClient::new(files, Duration::from_secs(30))
            .expect("the lab's controller files load")
            .http()
            .expect("HTTPS client");
        ShimClient::with_http_client(format!("https://{api}"), None, http)
    };

    let probe = client_with(files.clone())
        .probe(&domain)
        .await
        .expect("the controller's certificate gets in");
    assert!(probe.agent_connected);

    let anonymous = client_with(ClientTlsFiles {
        cert: None,
        key: None,
        ..files
    });
    // A client certificate is required in the TLS handshake itself.
    let refused = anonymous.probe(&domain).await;
    assert!(
        matches!(refused, Err(ShimCallError::Unreachable(_))),
        "{refused:?}"
    );
    let plain =
        ShimClient::new(format!("http://{api}"), None, Duration::from_secs(10)).expect("client");
    assert!(
        plain.probe(&domain).await.is_err(),
        "no plain-HTTP API on the shim port"
    );
    let health = reqwest::get(format!(
        "http://{}:{}/healthz",
        node.ip, lab.state.shim_metrics_port
    ))
    .await
    .expect("the metrics port answers");
    assert!(health.status().is_success());
}

#[test]
fn exec_prints_what_the_guest_command_printed() {
    let lab = shared_lab();
    let out = exec(lab, "vm-1-1", &["id"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("uid=0(root)"),
        "{}",
        text(&out)
    );
}

#[test]
fn exec_exits_with_the_guest_commands_exit_code() {
    let lab = shared_lab();
    let out = exec(lab, "vm-2-1", &["sh", "-c", "exit 3"]);
    assert_eq!(out.status.code(), Some(3), "{}", text(&out));
}

#[test]
fn up_on_a_running_lab_says_so_and_changes_nothing() {
    let lab = shared_lab();
    let dir = dir_arg(lab);
    let owner = std::process::id().to_string();
    let out = lab_command(&up_args(&dir, &owner, &[]));
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already up"),
        "{}",
        text(&out)
    );
    let state = LabState::load(&lab.dir).expect("lab.json");
    assert_eq!(state.serve, lab.state.serve);
}

#[tokio::test]
async fn restart_replaces_the_vmi_and_boots_with_the_vms_current_cloud_init_keys() {
    let lab = shared_lab();
    let client = client(lab).await;
    let before = wait_vmi(&client, "vm-restart", |v| {
        v.is_running() && v.agent_connected()
    })
    .await;
    let user_data =
        format!("#cloud-config\nusers:\n- name: root\n  ssh_authorized_keys:\n  - {NEW_KEY}\n");
    let vms: Api<VirtualMachine> = Api::namespaced(client.clone(), "default");
    let patch: json_patch::Patch = serde_json::from_value(json!([{
        "op": "replace",
        "path": "/spec/template/spec/volumes/0/cloudInitNoCloud/userData",
        "value": user_data,
    }]))
    .expect("patch");
    vms.patch(
        "vm-restart",
        &PatchParams::default(),
        &Patch::<()>::Json(patch),
    )
    .await
    .expect("VM patched");

    let request = http::Request::put(
        "/apis/subresources.kubevirt.io/v1/namespaces/default/virtualmachines/vm-restart/restart",
    )
    .header("content-type", "application/json")
    .body(b"{}".to_vec())
    .expect("request");
    client
        .request_text(request)
        .await
        .expect("restart accepted");

    let after = wait_vmi(&client, "vm-restart", |v| {
        v.metadata.uid != before.metadata.uid && v.is_running() && v.agent_connected()
    })
    .await;
    assert_ne!(after.launcher_pod_uid(), before.launcher_pod_uid());
    let out = exec(lab, "vm-restart", &["cat", "/root/.ssh/authorized_keys"]);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), NEW_KEY);
}

#[tokio::test]
async fn restart_of_an_unknown_vm_is_not_found() {
    let lab = shared_lab();
    let client = client(lab).await;
    let request = http::Request::put(
        "/apis/subresources.kubevirt.io/v1/namespaces/default/virtualmachines/no-such-vm/restart",
    )
    .body(b"{}".to_vec())
    .expect("request");
    match client.request_text(request).await {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 404, "{status:?}"),
        other => panic!("expected 404, got {other:?}"),
    }
}

#[tokio::test]
async fn pause_shows_paused_on_the_vmi_and_resume_clears_it() {
    let lab = shared_lab();
    let client = client(lab).await;
    wait_vmi(&client, "vm-pause", |v| v.is_running()).await;
    let dir = dir_arg(lab);
    let out = lab_command(&["pause", "--state-dir", &dir, "vm-pause"]);
    assert!(out.status.success(), "{}", text(&out));
    let paused = wait_vmi(&client, "vm-pause", |v| {
        condition(v, "Paused").as_deref() == Some("True")
    })
    .await;
    assert!(paused.is_running(), "a paused VMI stays in phase Running");

    let out = lab_command(&["resume", "--state-dir", &dir, "vm-pause"]);
    assert!(out.status.success(), "{}", text(&out));
    wait_vmi(&client, "vm-pause", |v| {
        condition(v, "Paused").is_none() && v.agent_connected()
    })
    .await;
}

#[test]
fn down_stops_every_recorded_process_and_leaves_no_mount_or_state() {
    let lab = start_lab("gcdown", &["--nodes", "1", "--vms-per-node", "1"]);
    let recorded = lab.state.recorded_pids();
    assert!(
        recorded.len() >= 3,
        "serve, libvirtd and shim are recorded: {recorded:?}"
    );
    let qemu = procs::qemu_pids(&lab.state.nodes[0].dir);
    assert_eq!(qemu.len(), 1, "one QEMU for the one guest");

    let out = lab_command(&["down", "--state-dir", &dir_arg(&lab)]);
    assert!(out.status.success(), "{}", text(&out));
    let alive: Vec<String> = recorded
        .iter()
        .filter(|(_, pid)| process_alive(*pid))
        .map(|(what, pid)| format!("{what} {pid}"))
        .chain(
            qemu.iter()
                .filter(|pid| process_alive(**pid))
                .map(|pid| format!("qemu {pid}")),
        )
        .collect();
    assert!(alive.is_empty(), "still running after down: {alive:?}");
    assert!(procs::mounts_under(&lab.dir).is_empty());
    assert!(!Path::new(&lab.dir).join("lab.json").exists());
    assert!(
        lab.state.tls_dir.starts_with(&lab.dir) && !lab.state.tls_dir.exists(),
        "the lab's certificates and keys are removed: {}",
        lab.state.tls_dir.display()
    );
}
