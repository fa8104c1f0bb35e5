//! The real-guest lab, end to end: real libvirtd, QEMU (TCG) and qemu-ga guests.
//! Run with `cargo test --test lab_guest` as root after `scripts/install-deps.sh`.
//! Tests fail (never skip) when the lab cannot run, saying what to install.
#![allow(clippy::disallowed_methods)] // tests may block: clippy.toml's file-system rule is for src/

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine as _;
use guestcred_lab::guest::*;
use serde_json::json;

const AGENT_TIMEOUT: Duration = Duration::from_secs(180);

fn ping() -> serde_json::Value {
    json!({"execute": "guest-ping"})
}

fn exec_ok(domain: &str, argv: &[&str]) -> String {
    let lab = shared_test_lab();
    let out = guest_exec(&lab.uri(), domain, argv).expect("guest-exec");
    assert_eq!(out.exit_code, 0, "{argv:?} failed: {}", out.stderr);
    out.stdout
}

/// Mount namespaces of all live processes (`mnt:[…]`).
fn live_mount_namespaces() -> Vec<String> {
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter_map(|e| std::fs::read_link(e.path().join("ns/mnt")).ok())
        .map(|p| p.display().to_string())
        .collect()
}

fn own_libvirtd(dir: &Path) -> Libvirtd {
    Libvirtd::start(dir, &default_cache_dir()).unwrap_or_else(|e| {
        panic!("cannot start libvirtd (run scripts/install-deps.sh as root): {e}")
    })
}

fn image() -> GuestImage {
    GuestImage::ensure(&default_cache_dir())
        .unwrap_or_else(|e| panic!("cannot build the guest image: {e}"))
}

#[test]
fn guest_image_is_built_once_and_then_reused() {
    let first = image();
    let built_at = std::fs::metadata(&first.base_initrd)
        .and_then(|m| m.modified())
        .expect("initrd mtime");

    let second = image();

    assert_eq!(first, second);
    let still = std::fs::metadata(&second.base_initrd)
        .and_then(|m| m.modified())
        .expect("initrd mtime");
    assert_eq!(built_at, still, "an up-to-date image must not be rebuilt");
    assert!(std::fs::metadata(&second.kernel).expect("kernel").len() > 1_000_000);
}

#[test]
fn libvirtd_answers_with_its_qemu_version() {
    let lab = shared_test_lab();
    let conn = virt::connect::Connect::open(Some(&lab.uri())).expect("connect");
    let version = conn.hyp_version().expect("hypervisor version");
    assert!(version >= 7_000_000, "QEMU version {version}");
    assert!(lab.uri().starts_with("qemu:///system?socket="));
    assert!(lab.libvirtd.socket_path().exists());
}

#[test]
fn booted_guest_answers_guest_ping() {
    let lab = shared_test_lab();
    let reply = agent_command(&lab.uri(), VM_A, &ping()).expect("guest-ping");
    assert_eq!(reply, json!({}));
}

#[test]
fn guest_exec_runs_id_as_root_in_the_guest() {
    let stdout = exec_ok(VM_A, &["id"]);
    assert!(stdout.starts_with("uid=0(root) gid=0(root)"), "{stdout}");
}

#[test]
fn seeded_root_key_lands_in_root_authorized_keys() {
    let keys = exec_ok(VM_A, &["cat", "/root/.ssh/authorized_keys"]);
    assert_eq!(keys, format!("{LAB_SEED_KEY_ROOT}\n"));
}

#[test]
fn seeded_alice_key_files_are_private_and_owned_by_alice() {
    let stat = exec_ok(
        VM_B,
        &[
            "stat",
            "-c",
            "%a %u:%g",
            "/home/alice/.ssh",
            "/home/alice/.ssh/authorized_keys",
        ],
    );
    assert_eq!(stat, "700 1000:1000\n600 1000:1000\n");
}

#[test]
fn guest_has_a_user_whose_home_directory_does_not_exist() {
    let lab = shared_test_lab();
    let passwd = exec_ok(VM_A, &["cat", "/etc/passwd"]);
    assert!(passwd.contains("nohome:x:1001:1001:"), "{passwd}");
    let home = guest_exec(&lab.uri(), VM_A, &["test", "-e", "/home/nohome"]).expect("test -e");
    assert_ne!(home.exit_code, 0, "/home/nohome must not exist");
}

#[test]
fn guest_has_spare_users_lab1_to_lab8_with_homes() {
    let stat = exec_ok(VM_A, &["stat", "-c", "%u", "/home/lab1", "/home/lab8"]);
    assert_eq!(stat, "2001\n2008\n");
}

#[test]
fn guest_without_agent_fails_agent_calls_with_code_86() {
    let lab = shared_test_lab();
    let err = agent_command(&lab.uri(), VM_NOAGENT, &ping()).expect_err("no agent");
    assert_eq!(err.libvirt_code(), Some(codes::AGENT_UNRESPONSIVE), "{err}");
}

#[test]
fn hung_agent_fails_agent_calls_with_code_86_after_libvirts_sync_timeout() {
    let lab = shared_test_lab();
    let started = Instant::now();
    let err = agent_command(&lab.uri(), VM_HUNG, &ping()).expect_err("hung agent");
    let waited = started.elapsed();
    assert_eq!(err.libvirt_code(), Some(codes::AGENT_UNRESPONSIVE), "{err}");
    // "not connected" fails at once; a channel that never answers only after guest-sync
    // gives up (~5 s). A lower bound is safe on a noisy machine.
    assert!(
        waited >= Duration::from_secs(3),
        "failed after {waited:?}: {err}"
    );
}

#[test]
fn old_agent_answers_blocked_ssh_commands_with_has_been_disabled() {
    let lab = shared_test_lab();
    let err = agent_command(
        &lab.uri(),
        VM_OLDAGENT,
        &json!({"execute": "guest-ssh-get-authorized-keys", "arguments": {"username": "root"}}),
    )
    .expect_err("blocked command");
    assert_eq!(err.libvirt_code(), Some(codes::INTERNAL_ERROR), "{err}");
    assert!(err.to_string().contains("has been disabled"), "{err}");
}

#[test]
fn old_agent_still_answers_commands_that_are_not_blocked() {
    let lab = shared_test_lab();
    agent_command(&lab.uri(), VM_OLDAGENT, &ping()).expect("guest-ping on the old agent");
}

#[test]
fn shadow_entry_shows_a_crypted_password_set_through_the_agent() {
    let lab = shared_test_lab();
    let hash = "$6$labsalt1$SQWyOPOsYLCbc18QzIOtOLdbN.imW.CFH.VQuKWbQihv6em6neRvPbIR2aAFG1Wm7SbgoE39HfKCNOrAvkRSq0";
    let encoded = base64::engine::general_purpose::STANDARD.encode(hash);
    agent_command(
        &lab.uri(),
        VM_B,
        &json!({"execute": "guest-set-user-password",
                "arguments": {"username": "alice", "password": encoded, "crypted": true}}),
    )
    .expect("set alice's password");

    assert_eq!(
        shadow_entry(&lab.uri(), VM_B, "alice").expect("shadow"),
        hash
    );
}

#[test]
fn shadow_entry_of_an_unknown_user_is_an_error() {
    let lab = shared_test_lab();
    let err = shadow_entry(&lab.uri(), VM_A, "mallory").expect_err("no such user");
    assert!(matches!(err, LabError::Invalid(_)), "{err}");
}

#[test]
fn paused_guest_refuses_agent_calls_with_code_55_until_resumed() {
    let lab = shared_test_lab();
    let domain = "default_vm-pausetest";
    start_guest(
        &lab.libvirtd,
        &lab.image,
        &GuestSpec::new(domain),
        &lab.work_dir,
    )
    .expect("start guest");
    wait_for_agent(&lab.uri(), domain, AGENT_TIMEOUT).expect("agent up");

    pause_guest(&lab.uri(), domain).expect("pause");
    let paused = agent_command(&lab.uri(), domain, &ping()).expect_err("paused");
    resume_guest(&lab.uri(), domain).expect("resume");
    let resumed = agent_command(&lab.uri(), domain, &ping());
    destroy_guest(&lab.uri(), domain).expect("destroy");

    assert_eq!(
        paused.libvirt_code(),
        Some(codes::OPERATION_INVALID),
        "{paused}"
    );
    resumed.expect("guest-ping after resume");
}

#[test]
fn guest_reports_the_os_id_it_was_booted_with() {
    let lab = shared_test_lab();
    let domain = "default_vm-ostest";
    let spec = GuestSpec {
        os_id: Some("ubuntu".into()),
        ..GuestSpec::new(domain)
    };
    start_guest(&lab.libvirtd, &lab.image, &spec, &lab.work_dir).expect("start guest");
    wait_for_agent(&lab.uri(), domain, AGENT_TIMEOUT).expect("agent up");
    let info = agent_command(&lab.uri(), domain, &json!({"execute": "guest-get-osinfo"}));
    destroy_guest(&lab.uri(), domain).expect("destroy");

    assert_eq!(info.expect("guest-get-osinfo")["id"], "ubuntu");
}

#[test]
fn shared_guests_report_the_lab_os_id_by_default() {
    let lab = shared_test_lab();
    let info = agent_command(&lab.uri(), VM_A, &json!({"execute": "guest-get-osinfo"}))
        .expect("guest-get-osinfo");
    assert_eq!(info["id"], "guestcred-lab");
}

#[test]
fn rebooting_with_new_seed_keys_replaces_the_authorized_keys() {
    let lab = shared_test_lab();
    let domain = "default_vm-rebuildtest";
    let spec_with = |key: &str| GuestSpec {
        authorized_keys: BTreeMap::from([("root".to_string(), vec![key.to_string()])]),
        ..GuestSpec::new(domain)
    };
    start_guest(
        &lab.libvirtd,
        &lab.image,
        &spec_with(LAB_SEED_KEY_ROOT),
        &lab.work_dir,
    )
    .expect("first boot");
    wait_for_agent(&lab.uri(), domain, AGENT_TIMEOUT).expect("agent up");
    destroy_guest(&lab.uri(), domain).expect("destroy");

    start_guest(
        &lab.libvirtd,
        &lab.image,
        &spec_with(LAB_SEED_KEY_ALICE),
        &lab.work_dir,
    )
    .expect("second boot");
    wait_for_agent(&lab.uri(), domain, AGENT_TIMEOUT).expect("agent up again");
    let keys = guest_exec(&lab.uri(), domain, &["cat", "/root/.ssh/authorized_keys"]);
    destroy_guest(&lab.uri(), domain).expect("destroy");

    assert_eq!(
        keys.expect("read keys").stdout,
        format!("{LAB_SEED_KEY_ALICE}\n")
    );
}

#[test]
fn stop_leaves_no_libvirtd_no_qemu_and_no_private_mount() {
    let dir = tempfile::tempdir().expect("tempdir");
    let libvirtd = own_libvirtd(&dir.path().join("lv"));
    let spec = GuestSpec {
        agent: AgentMode::Off,
        ..GuestSpec::new("default_vm-stoptest")
    };
    start_guest(&libvirtd, &image(), &spec, &dir.path().join("vms")).expect("start guest");
    let libvirtd_pid = libvirtd.pid();
    let qemu_pids = libvirtd.qemu_pids();
    let namespace = libvirtd
        .mount_namespace()
        .expect("libvirtd's mount namespace");
    assert_eq!(qemu_pids.len(), 1, "one QEMU for one guest");
    assert!(qemu_pids.iter().all(|pid| process_alive(*pid)));

    libvirtd.stop().expect("stop");

    assert!(
        !process_alive(libvirtd_pid),
        "libvirtd {libvirtd_pid} still runs"
    );
    for pid in qemu_pids {
        assert!(!process_alive(pid), "QEMU {pid} still runs");
    }
    assert!(
        !live_mount_namespaces().contains(&namespace),
        "a process still holds libvirtd's mount namespace {namespace}"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.contains(&dir.path().display().to_string()),
        "{mounts}"
    );
}
