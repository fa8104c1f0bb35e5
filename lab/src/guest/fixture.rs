//! One lab per test process, started on first use: a libvirtd and five guests.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::agent::wait_for_agent;
use super::domain::{AgentMode, GuestSpec, start_guest, wait_for_console};
use super::error::LabError;
use super::image::{GuestImage, default_cache_dir};
use super::libvirtd::Libvirtd;

pub const VM_A: &str = "default_vm-a";
pub const VM_B: &str = "default_vm-b";
pub const VM_NOAGENT: &str = "default_vm-noagent";
pub const VM_HUNG: &str = "default_vm-hung";
pub const VM_OLDAGENT: &str = "default_vm-oldagent";

/// What the "old agent" guest lacks.
pub const OLD_AGENT_BLOCKED: &[&str] = &[
    "guest-ssh-get-authorized-keys",
    "guest-ssh-add-authorized-keys",
    "guest-ssh-remove-authorized-keys",
];

/// Seeded into root's authorized_keys on every shared-lab guest (public half only).
pub const LAB_SEED_KEY_ROOT: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILHIy3IC5YSCW5Eg8KH/xtWBL+18ZKfYvga/rNk08pWm lab-seed-1@guestcred";
/// Seeded into alice's authorized_keys on every shared-lab guest.
pub const LAB_SEED_KEY_ALICE: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIIRZmFCcsghdLlicZhhjGzDEa0AVYhAlxO8yPEGIlnQy lab-seed-2@guestcred";

/// Agents of five guests booting at once on two cores come up in ~10-40 s.
const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// The shared lab. Guests keep state between tests of one process: a test that changes
/// a guest should use its own user (the image has `lab1`..`lab8`, uids 2001..2008, with
/// homes) or file instead of assuming an order.
#[derive(Debug)]
pub struct TestLab {
    pub libvirtd: Libvirtd,
    pub image: GuestImage,
    /// Per-VM initrds and console logs (`<domain>.console.log`).
    pub work_dir: PathBuf,
    pub boot_time: Duration,
}

impl TestLab {
    pub fn uri(&self) -> String {
        self.libvirtd.uri()
    }

    fn start() -> Result<TestLab, LabError> {
        let cache = default_cache_dir();
        let image = GuestImage::ensure(&cache)?;
        let dir = std::env::temp_dir().join(format!("guestcred-lab-{}", std::process::id()));
        let keep = std::env::var_os("GUESTCRED_LAB_KEEP").is_some();
        let libvirtd = Libvirtd::start_with(&dir, &cache, !keep)?;
        let work_dir = dir.join("vms");
        let started = Instant::now();
        let specs = shared_specs();
        for spec in &specs {
            start_guest(&libvirtd, &image, spec, &work_dir)?;
        }
        let uri = libvirtd.uri();
        std::thread::scope(|s| {
            let waits: Vec<_> = specs
                .iter()
                .map(|spec| {
                    let (uri, work_dir) = (&uri, &work_dir);
                    s.spawn(move || match spec.agent {
                        AgentMode::On => wait_for_agent(uri, &spec.domain_name, BOOT_TIMEOUT),
                        // /init logs this once the agent port is open (or skipped).
                        AgentMode::Off | AgentMode::Hung => {
                            wait_for_console(work_dir, &spec.domain_name, "gc: ready", BOOT_TIMEOUT)
                        }
                    })
                })
                .collect();
            waits
                .into_iter()
                .map(|w| {
                    w.join()
                        .unwrap_or_else(|_| Err(LabError::Invalid("boot waiter panicked".into())))
                })
                .collect::<Result<Vec<()>, LabError>>()
        })?;
        let boot_time = started.elapsed();
        tracing::info!(?boot_time, dir = %dir.display(), "shared test lab ready");
        Ok(TestLab {
            libvirtd,
            image,
            work_dir,
            boot_time,
        })
    }
}

fn shared_specs() -> Vec<GuestSpec> {
    let keys = BTreeMap::from([
        ("root".to_string(), vec![LAB_SEED_KEY_ROOT.to_string()]),
        ("alice".to_string(), vec![LAB_SEED_KEY_ALICE.to_string()]),
    ]);
    let guest = |name: &str, agent: AgentMode, blocked: &[&str]| GuestSpec {
        agent,
        blocked_commands: blocked.iter().map(|c| c.to_string()).collect(),
        authorized_keys: keys.clone(),
        ..GuestSpec::new(name)
    };
    vec![
        guest(VM_A, AgentMode::On, &[]),
        guest(VM_B, AgentMode::On, &[]),
        guest(VM_NOAGENT, AgentMode::Off, &[]),
        guest(VM_HUNG, AgentMode::Hung, &[]),
        guest(VM_OLDAGENT, AgentMode::On, OLD_AGENT_BLOCKED),
    ]
}

/// The process-wide lab, started on first call (image build, libvirtd, five guests, all
/// agents up). Panics with the reason, and what to run, if the lab cannot start; every
/// later call panics with the same reason. libvirtd and QEMU do not outlive the process:
/// a watchdog kills them (and deletes the tree unless `GUESTCRED_LAB_KEEP` is set) once
/// the process is gone.
pub fn shared_test_lab() -> &'static TestLab {
    static LAB: OnceLock<Result<TestLab, String>> = OnceLock::new();
    let lab = LAB.get_or_init(|| {
        TestLab::start().map_err(|e| {
            format!(
                "the real-guest lab could not start: {e}\n(needs root and scripts/install-deps.sh)"
            )
        })
    });
    match lab {
        Ok(lab) => lab,
        Err(reason) => panic!("{reason}"),
    }
}
