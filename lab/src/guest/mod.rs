//! Real-guest lab: a private libvirtd, QEMU (TCG) and tiny Linux guests running a real
//! qemu-ga. Blocking APIs (async callers: `spawn_blocking`). Needs root and the packages
//! from `scripts/install-deps.sh`; the guest image is built by `scripts/build-guest.sh`.
//!
//! ```no_run
//! use guestcred_lab::guest::*;
//! # fn main() -> Result<(), LabError> {
//! let cache = default_cache_dir();
//! let image = GuestImage::ensure(&cache)?;
//! let libvirtd = Libvirtd::start(std::path::Path::new("/tmp/lab"), &cache)?;
//! start_guest(&libvirtd, &image, &GuestSpec::new("default_vm-x"), std::path::Path::new("/tmp/lab/vms"))?;
//! wait_for_agent(&libvirtd.uri(), "default_vm-x", std::time::Duration::from_secs(60))?;
//! libvirtd.stop()
//! # }
//! ```
mod agent;
mod domain;
mod error;
mod fixture;
mod image;
mod libvirtd;
mod util;

use std::sync::Once;

pub use agent::{ExecOutput, agent_command, guest_exec, shadow_entry, wait_for_agent};
pub use domain::{
    AgentMode, GuestSpec, console_log_path, destroy_guest, pause_guest, resume_guest, start_guest,
    wait_for_console,
};
pub use error::{LabError, codes};
pub use fixture::{
    LAB_SEED_KEY_ALICE, LAB_SEED_KEY_ROOT, OLD_AGENT_BLOCKED, TestLab, VM_A, VM_B, VM_HUNG,
    VM_NOAGENT, VM_OLDAGENT, shared_test_lab,
};
pub use image::{CACHE_ENV, GuestImage, Seed, default_cache_dir, write_vm_initrd};
pub use libvirtd::Libvirtd;
pub use util::process_alive;

/// Opens a connection, with libvirt's print-every-error-to-stderr callback turned off.
pub(crate) fn connect(uri: &str) -> Result<virt::connect::Connect, LabError> {
    static QUIET: Once = Once::new();
    QUIET.call_once(virt::error::clear_error_callback);
    virt::connect::Connect::open(Some(uri))
        .map_err(|e| LabError::libvirt(format!("connect {uri}"), &e))
}

/// The connection is returned too: the domain handle must not outlive it.
pub(crate) fn lookup(
    uri: &str,
    domain: &str,
) -> Result<(virt::connect::Connect, virt::domain::Domain), LabError> {
    let conn = connect(uri)?;
    let dom = conn
        .lookup_domain_by_name(domain)
        .map_err(|e| LabError::libvirt(format!("look up domain {domain}"), &e))?;
    Ok((conn, dom))
}

/// Fails with what to install when a host tool is missing.
pub(crate) fn ensure_tool(tool: &str) -> Result<(), LabError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|dir| dir.join(tool).is_file());
    if found {
        Ok(())
    } else {
        Err(LabError::Missing {
            what: format!("host tool `{tool}`"),
            hint: "run scripts/install-deps.sh as root".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_host_tool_says_to_run_install_deps() {
        let err = ensure_tool("guestcred-no-such-tool").expect_err("not installed");
        assert!(matches!(err, LabError::Missing { .. }));
        assert!(err.to_string().contains("scripts/install-deps.sh"), "{err}");
    }

    #[test]
    fn an_installed_host_tool_is_found() {
        ensure_tool("sh").expect("sh is everywhere");
    }
}
