//! End to end on the lab, as a user works: the emulated API server, real libvirtds with
//! real QEMU guests running qemu-ga, the real shim and controller binaries as separate
//! processes, and objects applied with kubectl. Verification happens inside the guests.
#![allow(clippy::disallowed_methods)] // tests may block: clippy.toml's file-system rule is for src/
use guestcred::api::keypair::{KeyMode, KeyStrategy};
use guestcred::api::{GuestPasswordReset, KeypairRebuild};
use guestcred_lab::cluster::LabState;
use guestcred_lab::testing::{KeysTest, ResetTest, TargetedTest, TestObject, lab_binary, secret};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const GUESTCRED: &str = env!("CARGO_BIN_EXE_guestcred");
const WAIT: Duration = Duration::from_secs(180);
const PLAIN: &str = "E2e-Canary-Password-4711";
const SHA512: &str = "$6$e2eSalt$3CPr/vQb45sQFdvBm/TEkSym19vMe3VQweVAyOduj31BA4Mp6vxpjoDjssqBvU55c8jQk5a25w4TVseP2qvxD0";
const KEY1: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ+B4jIlELcMrHzsE1Ryt7XpT2gUKy/XZ+lbyfbQ9TZh key1@e2e";
const KEY2: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIMJKojGo/i5K/TGJ8PutquWzCrCg7RrbK5WgjGBkcoBs key2@e2e";

struct Lab {
    dir: PathBuf,
    kubeconfig: PathBuf,
}

/// One lab for this test binary: 2 nodes x 2 VMs, plus guests with no agent, a hung agent
/// and an old agent (no guest-ssh-*), and the controller. It goes down with this process.
fn lab() -> &'static Lab {
    static LAB_ONCE: OnceLock<Result<Lab, String>> = OnceLock::new();
    let lab = LAB_ONCE.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("gce2e")
            .tempdir()
            .map_err(|e| e.to_string())?
            .keep();
        let owner = std::process::id().to_string();
        let d = dir.display().to_string();
        let out = Command::new(lab_binary())
            .args([
                "up",
                "--state-dir",
                &d,
                "--shim-port",
                "0",
                "--owner-pid",
                &owner,
                "--guestcred-bin",
                GUESTCRED,
                "--with-controller",
            ])
            .args([
                "--extra-vm",
                "vm-noagent:node-1:agent=off",
                "--extra-vm",
                "vm-hung:node-1:agent=hung",
            ])
            .args([
                "--extra-vm",
                "vm-old:node-2:agent=old",
                "--extra-vm",
                "vm-paused:node-2",
            ])
            .output()
            .map_err(|e| format!("cannot run {}: {e}", lab_binary().display()))?;
        if !out.status.success() {
            return Err(format!(
                "the lab must come up (root, scripts/install-deps.sh):\n{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let state = LabState::load(&dir).map_err(|e| e.to_string())?;
        Ok(Lab {
            dir,
            kubeconfig: state.kubeconfig,
        })
    });
    match lab {
        Ok(l) => l,
        Err(e) => panic!("{e}"),
    }
}

fn kubectl(args: &[&str], stdin: Option<&str>) -> String {
    let mut child = Command::new("kubectl")
        .env("KUBECONFIG", &lab().kubeconfig)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl is installed (scripts/install-deps.sh)");
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).expect("stdin");
    }
    let out = child.wait_with_output().expect("kubectl runs");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn apply<T: Serialize>(obj: &T) {
    kubectl(
        &["apply", "-f", "-"],
        Some(&serde_yaml::to_string(obj).expect("yaml")),
    );
}

fn jsonpath(kind: &str, name: &str, path: &str) -> String {
    kubectl(
        &["get", kind, name, "-o", &format!("jsonpath={{{path}}}")],
        None,
    )
}

/// Poll a jsonpath until it equals `want`; the last value is in the panic message.
fn wait_until(kind: &str, name: &str, path: &str, want: &str) {
    let start = Instant::now();
    loop {
        let got = jsonpath(kind, name, path);
        if got == want {
            return;
        }
        assert!(
            start.elapsed() < WAIT,
            "{kind}/{name} {path}: want {want:?}, got {got:?}\n{}",
            kubectl(&["get", kind, name, "-o", "yaml"], None)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

fn guest(vm: &str, argv: &[&str]) -> String {
    let d = lab().dir.display().to_string();
    let out = Command::new(lab_binary())
        .args(["exec", "--state-dir", &d, vm, "--"])
        .args(argv)
        .output()
        .expect("exec");
    assert!(
        out.status.success(),
        "exec {vm} {argv:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn shadow_hash(vm: &str, user: &str) -> String {
    guest(vm, &["grep", &format!("^{user}:"), "/etc/shadow"])
        .split(':')
        .nth(1)
        .unwrap_or_default()
        .to_string()
}

/// Secret `name` holding `value` (a crypt(3) hash when `crypted`) under `password`,
/// applied; and reset `name` of `user` from it, to be given its target.
fn reset_from_new_secret(name: &str, user: &str, value: &str, crypted: bool) -> GuestPasswordReset {
    apply(&secret(name, "password", value));
    let r = GuestPasswordReset::test(name).user(user).from_secret(name);
    if crypted { r.crypted() } else { r }
}

/// Waits (up to 180 s) until `object` (`kind/name`) is Ready; fails the test if not.
fn wait_ready(object: &str) {
    kubectl(
        &["wait", "--for=condition=Ready", object, "--timeout=180s"],
        None,
    );
}

fn keys(name: &str, vm: &str, user: &str, mode: KeyMode, lines: &[&str]) -> KeypairRebuild {
    KeypairRebuild::test(name)
        .vm(vm)
        .user(user)
        .inline_keys(lines.iter().copied())
        .mode(mode)
        .strategy(KeyStrategy::Replace)
}

#[test]
fn plaintext_password_from_a_secret_changes_the_guests_shadow_hash() {
    lab();
    let before = shadow_hash("vm-1-1", "lab1");
    apply(&reset_from_new_secret("e2e-plain", "lab1", PLAIN, false).vm("vm-1-1"));
    wait_ready("gpr/e2e-plain");
    let after = shadow_hash("vm-1-1", "lab1");
    assert_ne!(after, before);
    assert!(
        after.starts_with("$y$") || after.starts_with("$6$"),
        "a crypt hash: {after}"
    );
    assert_eq!(
        jsonpath("gpr", "e2e-plain", ".status.targets[0].node"),
        "node-1"
    );
}

#[test]
fn crypted_hash_lands_verbatim_in_the_guest() {
    lab();
    apply(&reset_from_new_secret("e2e-hash", "lab2", SHA512, true).vm("vm-2-1"));
    wait_ready("gpr/e2e-hash");
    assert_eq!(shadow_hash("vm-2-1", "lab2"), SHA512);
}

#[test]
fn bulk_reset_by_selector_reaches_every_db_vm_on_both_nodes_one_at_a_time() {
    lab();
    apply(
        &reset_from_new_secret("e2e-bulk", "lab3", SHA512, true)
            .selector("tier", "db")
            .max_concurrency(1),
    );
    wait_ready("gpr/e2e-bulk");
    let vms = jsonpath("gpr", "e2e-bulk", ".status.targets[*].vm");
    assert_eq!(vms, "vm-1-1 vm-2-1");
    assert_eq!(
        jsonpath("gpr", "e2e-bulk", ".status.targets[*].node"),
        "node-1 node-2"
    );
    for vm in ["vm-1-1", "vm-2-1"] {
        assert_eq!(shadow_hash(vm, "lab3"), SHA512);
    }
}

#[test]
fn live_key_rotation_is_verified_in_the_guest() {
    lab();
    apply(&keys("e2e-live", "vm-1-2", "lab4", KeyMode::Live, &[KEY1]));
    wait_ready("kpr/e2e-live");
    assert_eq!(
        jsonpath("kpr", "e2e-live", ".status.targets[0].verified"),
        "true"
    );
    assert!(jsonpath("kpr", "e2e-live", ".status.targets[0].keys[0]").starts_with("SHA256:"));
    let file = guest("vm-1-2", &["cat", "/home/lab4/.ssh/authorized_keys"]);
    assert!(file.contains("key1@e2e"), "{file}");
}

#[test]
fn auto_mode_rebuilds_a_vm_whose_agent_lacks_ssh_commands() {
    lab();
    let old_uid = jsonpath("vmi", "vm-old", ".metadata.uid");
    apply(&keys(
        "e2e-rebuild",
        "vm-old",
        "root",
        KeyMode::Auto,
        &[KEY2],
    ));
    wait_ready("kpr/e2e-rebuild");
    assert_eq!(
        jsonpath("kpr", "e2e-rebuild", ".status.targets[0].mode"),
        "Rebuild"
    );
    assert_ne!(
        jsonpath("vmi", "vm-old", ".metadata.uid"),
        old_uid,
        "a new VMI after the restart"
    );
    let file = guest("vm-old", &["cat", "/root/.ssh/authorized_keys"]);
    assert!(file.contains("key2@e2e"), "{file}");
}

#[test]
fn a_vm_without_an_agent_reports_agent_not_connected_while_retrying() {
    lab();
    apply(&reset_from_new_secret("e2e-noagent", "root", PLAIN, false).vm("vm-noagent"));
    wait_until(
        "gpr",
        "e2e-noagent",
        ".status.targets[0].reason",
        "AgentNotConnected",
    );
}

#[test]
fn a_hung_agent_reports_agent_timeout() {
    lab();
    apply(&reset_from_new_secret("e2e-hung", "root", PLAIN, false).vm("vm-hung"));
    wait_until(
        "gpr",
        "e2e-hung",
        ".status.targets[0].reason",
        "AgentTimeout",
    );
}

#[test]
fn a_paused_vm_reports_vm_not_running_and_finishes_after_resume() {
    lab();
    let d = lab().dir.display().to_string();
    let paused = Command::new(lab_binary())
        .args(["pause", "--state-dir", &d, "vm-paused"])
        .status()
        .expect("pause");
    assert!(paused.success());
    // kubevirt-lite reflects the pause on the VMI.
    wait_until(
        "vmi",
        "vm-paused",
        r#".status.conditions[?(@.type=="Paused")].status"#,
        "True",
    );
    apply(&reset_from_new_secret("e2e-paused", "lab5", SHA512, true).vm("vm-paused"));
    wait_until(
        "gpr",
        "e2e-paused",
        ".status.targets[0].reason",
        "VMNotRunning",
    );
    let resumed = Command::new(lab_binary())
        .args(["resume", "--state-dir", &d, "vm-paused"])
        .status()
        .expect("resume");
    assert!(resumed.success());
    wait_ready("gpr/e2e-paused");
    assert_eq!(shadow_hash("vm-paused", "lab5"), SHA512);
}

#[test]
fn unknown_guest_user_fails_with_user_not_found() {
    lab();
    apply(&reset_from_new_secret("e2e-nouser", "mallory", PLAIN, false).vm("vm-2-2"));
    wait_until(
        "gpr",
        "e2e-nouser",
        ".status.targets[0].reason",
        "UserNotFound",
    );
    assert_eq!(jsonpath("gpr", "e2e-nouser", ".status.phase"), "Failed");
}

#[test]
fn controller_and_shim_logs_events_and_status_never_contain_the_password() {
    lab();
    const CANARY: &str = "Log-Scan-Canary-9c1e";
    apply(&reset_from_new_secret("e2e-canary", "lab6", CANARY, false).vm("vm-2-2"));
    wait_ready("gpr/e2e-canary");
    let mut haystack = String::new();
    for entry in std::fs::read_dir(&lab().dir).expect("state dir").flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "log") {
            haystack.push_str(&std::fs::read_to_string(&path).unwrap_or_default());
        }
    }
    assert!(
        haystack.contains("e2e-canary"),
        "the logs mention the object (the scan reads real logs)"
    );
    haystack.push_str(&kubectl(&["get", "gpr", "-o", "yaml"], None));
    haystack.push_str(&kubectl(
        &["get", "events.events.k8s.io", "-A", "-o", "yaml"],
        None,
    ));
    haystack.push_str(&kubectl(&["describe", "gpr", "e2e-canary"], None));
    assert!(
        !haystack.contains(CANARY),
        "the password leaked into logs, Events or status"
    );
}

#[test]
fn keys_for_a_user_without_a_home_directory_fail_with_user_home_missing() {
    lab();
    apply(&keys(
        "e2e-nohome",
        "vm-1-2",
        "nohome",
        KeyMode::Live,
        &[KEY1],
    ));
    wait_until(
        "kpr",
        "e2e-nohome",
        ".status.targets[0].reason",
        "UserHomeMissing",
    );
    assert_eq!(
        jsonpath("kpr", "e2e-nohome", ".status.targets[0].state"),
        "Failed"
    );
}
