//! Lab guests: transient libvirt domains booting the lab image directly (kernel + initrd).
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::error::LabError;
use super::image::{GuestImage, Seed, write_vm_initrd};
use super::libvirtd::Libvirtd;
use super::util::{file_tail, path_context};
use super::{connect, lookup};

/// What the guest's /init does about the agent (kernel command line `gc.agent=`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AgentMode {
    /// qemu-ga runs (and is restarted if it dies).
    #[default]
    On,
    /// No agent: libvirt reports "not connected" (code 86) at once.
    Off,
    /// The channel is open but nothing answers: calls fail with 86 after ~5 s.
    Hung,
}

impl AgentMode {
    fn cmdline_value(self) -> &'static str {
        match self {
            AgentMode::On => "on",
            AgentMode::Off => "off",
            AgentMode::Hung => "hung",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestSpec {
    /// `<namespace>_<name>`, as KubeVirt names domains.
    pub domain_name: String,
    pub agent: AgentMode,
    /// Agent commands disabled with `qemu-ga -b` (an "old agent").
    pub blocked_commands: Vec<String>,
    /// Keys /init installs before the agent starts: user -> authorized_keys lines.
    pub authorized_keys: BTreeMap<String, Vec<String>>,
    pub memory_mib: u32,
    /// `ID=` of the guest's /etc/os-release, as guest-get-osinfo reports it
    /// (default `guestcred-lab`).
    pub os_id: Option<String>,
}

impl GuestSpec {
    /// An agent-on guest with 128 MiB (64 MiB resets silently) and no seeded keys.
    pub fn new(domain_name: impl Into<String>) -> GuestSpec {
        GuestSpec {
            domain_name: domain_name.into(),
            agent: AgentMode::On,
            blocked_commands: Vec::new(),
            authorized_keys: BTreeMap::new(),
            memory_mib: 128,
            os_id: None,
        }
    }
}

/// Where the serial console of `domain` is logged inside `work_dir`.
pub fn console_log_path(work_dir: &Path, domain: &str) -> PathBuf {
    work_dir.join(format!("{domain}.console.log"))
}

/// Boots a transient domain. Writes `<work_dir>/<domain>.initrd` (the base initramfs plus
/// this VM's seed; rewritten only when the seed changed) and logs the serial console to
/// [`console_log_path`]. Returns once QEMU runs, not when the agent is up
/// (see [`super::wait_for_agent`]).
pub fn start_guest(
    libvirtd: &Libvirtd,
    image: &GuestImage,
    spec: &GuestSpec,
    work_dir: &Path,
) -> Result<(), LabError> {
    validate(spec)?;
    fs::create_dir_all(work_dir).map_err(|e| LabError::io(path_context("create", work_dir), e))?;
    let work_dir =
        std::path::absolute(work_dir).map_err(|e| LabError::io("absolute work dir", e))?;
    let initrd = work_dir.join(format!("{}.initrd", spec.domain_name));
    let seed = Seed {
        instance_id: instance_id(spec),
        hostname: hostname_for(&spec.domain_name),
        authorized_keys: spec.authorized_keys.clone(),
    };
    write_vm_initrd(&image.base_initrd, &seed, &initrd)?;
    let console = console_log_path(&work_dir, &spec.domain_name);
    // A fresh log per boot, so readiness checks don't see the previous boot's lines.
    let _ = fs::remove_file(&console);
    let xml = domain_xml(spec, &image.kernel, &initrd, &console);
    let conn = connect(&libvirtd.uri())?;
    conn.create_domain_xml(&xml, 0)
        .map_err(|e| LabError::libvirt(format!("create domain {}", spec.domain_name), &e))?;
    tracing::info!(domain = %spec.domain_name, agent = ?spec.agent, "lab guest started");
    Ok(())
}

pub fn destroy_guest(uri: &str, domain: &str) -> Result<(), LabError> {
    let (_conn, dom) = lookup(uri, domain)?;
    dom.destroy()
        .map_err(|e| LabError::libvirt(format!("destroy {domain}"), &e))
}

pub fn pause_guest(uri: &str, domain: &str) -> Result<(), LabError> {
    let (_conn, dom) = lookup(uri, domain)?;
    dom.suspend()
        .map_err(|e| LabError::libvirt(format!("suspend {domain}"), &e))
}

pub fn resume_guest(uri: &str, domain: &str) -> Result<(), LabError> {
    let (_conn, dom) = lookup(uri, domain)?;
    dom.resume()
        .map_err(|e| LabError::libvirt(format!("resume {domain}"), &e))
}

/// Waits until the guest's serial console shows `needle` (e.g. /init's "gc: ready").
pub fn wait_for_console(
    work_dir: &Path,
    domain: &str,
    needle: &str,
    timeout: Duration,
) -> Result<(), LabError> {
    let path = console_log_path(work_dir, domain);
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if fs::read(&path).is_ok_and(|b| String::from_utf8_lossy(&b).contains(needle)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(LabError::Timeout {
        what: format!(
            "{needle:?} on the console of {domain}; console tail:\n{}",
            file_tail(&path, 20)
        ),
        after: timeout,
    })
}

fn validate(spec: &GuestSpec) -> Result<(), LabError> {
    let name_ok = !spec.domain_name.is_empty()
        && spec
            .domain_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if !name_ok {
        return Err(LabError::Invalid(format!(
            "domain name {:?}",
            spec.domain_name
        )));
    }
    let cmd_ok =
        |c: &String| !c.is_empty() && c.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
    if !spec.blocked_commands.iter().all(cmd_ok) {
        return Err(LabError::Invalid("blocked command names".into()));
    }
    let os_ok = |id: &String| {
        !id.is_empty()
            && id.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
            })
    };
    if !spec.os_id.as_ref().is_none_or(os_ok) {
        return Err(LabError::Invalid(format!("os id {:?}", spec.os_id)));
    }
    if spec.memory_mib < 96 {
        return Err(LabError::Invalid(format!(
            "{} MiB of memory (the guest needs at least 96)",
            spec.memory_mib
        )));
    }
    Ok(())
}

/// Stable for a given seed, like cloud-init's: changes when the keys change.
fn instance_id(spec: &GuestSpec) -> String {
    use sha2::{Digest, Sha256};
    let keys = serde_json::to_vec(&spec.authorized_keys).unwrap_or_default();
    let digest = hex::encode(Sha256::digest(keys));
    format!("{}-{}", spec.domain_name, &digest[..12])
}

/// A valid hostname from a domain name (`default_vm-a` -> `default-vm-a`).
fn hostname_for(domain: &str) -> String {
    domain.replace(['_', '.'], "-")
}

fn kernel_cmdline(spec: &GuestSpec) -> String {
    let mut cmdline = format!(
        "console=ttyS0 quiet gc.agent={}",
        spec.agent.cmdline_value()
    );
    if !spec.blocked_commands.is_empty() {
        cmdline.push_str(" gc.block=");
        cmdline.push_str(&spec.blocked_commands.join(","));
    }
    if let Some(os) = &spec.os_id {
        cmdline.push_str(" gc.os=");
        cmdline.push_str(os);
    }
    cmdline
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

fn domain_xml(spec: &GuestSpec, kernel: &Path, initrd: &Path, console: &Path) -> String {
    let path = |p: &Path| xml_escape(&p.display().to_string());
    // TCG: /dev/kvm exists on these hosts but guests hang under nested virtualisation.
    format!(
        r#"<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <serial type='file'>
      <source path='{console}'/>
      <target port='0'/>
    </serial>
    <channel type='unix'>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <memballoon model='none'/>
  </devices>
</domain>
"#,
        name = xml_escape(&spec.domain_name),
        memory = spec.memory_mib,
        kernel = path(kernel),
        initrd = path(initrd),
        cmdline = xml_escape(&kernel_cmdline(spec)),
        console = path(console),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn old_agent_spec() -> GuestSpec {
        GuestSpec {
            blocked_commands: vec!["guest-ssh-get-authorized-keys".into(), "guest-exec".into()],
            ..GuestSpec::new("default_vm-old")
        }
    }

    #[test]
    fn blocked_commands_go_on_the_kernel_command_line_comma_separated() {
        let cmdline = kernel_cmdline(&old_agent_spec());
        assert!(cmdline.contains("gc.agent=on"));
        assert!(cmdline.contains("gc.block=guest-ssh-get-authorized-keys,guest-exec"));
    }

    #[test]
    fn domain_xml_boots_the_kernel_directly_under_tcg_with_an_agent_channel() {
        let xml = domain_xml(
            &GuestSpec::new("default_vm-a"),
            Path::new("/c/vmlinuz"),
            Path::new("/w/default_vm-a.initrd"),
            Path::new("/w/default_vm-a.console.log"),
        );
        assert!(xml.contains("<domain type='qemu'>"));
        assert!(xml.contains("<kernel>/c/vmlinuz</kernel>"));
        assert!(xml.contains("<initrd>/w/default_vm-a.initrd</initrd>"));
        assert!(xml.contains("name='org.qemu.guest_agent.0'"));
        assert!(!xml.contains("<interface"));
    }

    #[test]
    fn instance_id_changes_with_the_seeded_keys_only() {
        let mut spec = GuestSpec::new("default_vm-a");
        let before = instance_id(&spec);
        assert_eq!(before, instance_id(&GuestSpec::new("default_vm-a")));
        spec.authorized_keys
            .insert("root".into(), vec!["ssh-ed25519 AAAA k".into()]);
        assert_ne!(before, instance_id(&spec));
    }

    #[test]
    fn os_id_goes_on_the_kernel_command_line() {
        let spec = GuestSpec {
            os_id: Some("ubuntu".into()),
            ..GuestSpec::new("default_vm-a")
        };
        assert!(kernel_cmdline(&spec).ends_with(" gc.os=ubuntu"));
    }

    #[test]
    fn spec_with_a_shell_metacharacter_in_a_blocked_command_is_rejected() {
        let spec = GuestSpec {
            blocked_commands: vec!["guest-exec;reboot".into()],
            ..GuestSpec::new("default_vm-a")
        };
        assert!(matches!(validate(&spec), Err(LabError::Invalid(_))));
    }
}
