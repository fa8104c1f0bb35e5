//! A private libvirtd: its own mount namespace with bind mounts over the directories
//! libvirt writes (so it neither touches the host's nor collides with another instance),
//! its own socket, QEMU under TCG. Cleaned up by `stop`, by `Drop`, and by a watchdog
//! process if the owning process dies without either.
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::error::LabError;
use super::util::{file_tail, path_context, process_alive, signal};
use super::{connect, ensure_tool};

/// How long libvirtd may take to answer its first call (the capability probe alone takes
/// ~8 s on a cold cache; CI machines are noisy).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long libvirtd may take to exit after SIGTERM (measured ~2 s).
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

const QEMU_CONF: &str = r#"# guestcred lab: root QEMU, no host integration.
stdio_handler = "file"
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
"#;

const LIBVIRTD_CONF: &str = r#"# guestcred lab: only root may use the socket.
unix_sock_rw_perms = "0700"
unix_sock_ro_perms = "0700"
unix_sock_admin_perms = "0700"
log_outputs = "3:stderr"
"#;

/// Runs inside `unshare --mount`: bind the private tree, then become libvirtd (same pid).
const NAMESPACE_SCRIPT: &str = r#"set -e
d=$1
export PATH=/usr/sbin:/usr/bin:/sbin:/bin:$PATH
mkdir -p /etc/libvirt /var/lib/libvirt /var/log/libvirt /var/cache/libvirt
mount --bind "$d/etc/libvirt" /etc/libvirt
mount --bind "$d/etc/passwd" /etc/passwd
mount --bind "$d/etc/group" /etc/group
mount --bind "$d/run" /run
mount --bind "$d/var/lib/libvirt" /var/lib/libvirt
mount --bind "$d/var/log/libvirt" /var/log/libvirt
mount --bind "$d/var/cache/libvirt" /var/cache/libvirt
exec libvirtd
"#;

/// Waits for its owner (or libvirtd) to go away, then kills QEMU (by libvirt's pid files)
/// and libvirtd, so a crashed or killed test process leaves nothing behind.
const WATCHDOG_SCRIPT: &str = r#"owner=$1 lv=$2 d=$3 remove=$4
# A zombie is dead: kill -0 alone would wait for it to be reaped.
alive() { [ -e "/proc/$1" ] && ! grep -q '^State:[[:space:]]*Z' "/proc/$1/status" 2>/dev/null; }
while alive "$owner" && alive "$lv"; do sleep 1; done
for f in "$d"/run/libvirt/qemu/*.pid; do
    # driver.pid is libvirtd's own lock file, not a QEMU.
    [ -f "$f" ] && [ "${f##*/}" != driver.pid ] && kill -KILL "$(cat "$f")" 2>/dev/null
done
kill -TERM "$lv" 2>/dev/null
i=0
while alive "$lv" && [ $i -lt 40 ]; do sleep 0.5; i=$((i + 1)); done
kill -KILL "$lv" 2>/dev/null
[ "$remove" = yes ] && rm -rf "$d"
exit 0
"#;

/// A running private libvirtd.
#[derive(Debug)]
pub struct Libvirtd {
    child: Option<Child>,
    watchdog: Option<Child>,
    pid: u32,
    dir: PathBuf,
    remove_dir: bool,
}

impl Libvirtd {
    /// Starts libvirtd with its private tree under `dir` and waits (bounded) until it
    /// answers. Seeds and refreshes the QEMU capabilities cache in `cache_dir`, which cuts
    /// a start from ~8 s to well under a second.
    pub fn start(dir: &Path, cache_dir: &Path) -> Result<Libvirtd, LabError> {
        Self::start_with(dir, cache_dir, false)
    }

    /// Like [`Libvirtd::start`], but the watchdog also deletes `dir` once the owner exits
    /// (for throw-away trees such as the shared test lab's).
    pub(crate) fn start_with(
        dir: &Path,
        cache_dir: &Path,
        remove_dir: bool,
    ) -> Result<Libvirtd, LabError> {
        for tool in [
            "libvirtd",
            "unshare",
            "mount",
            "qemu-system-x86_64",
            "kill",
            "sh",
        ] {
            ensure_tool(tool)?;
        }
        let dir = std::path::absolute(dir).map_err(|e| LabError::io("absolute dir", e))?;
        prepare_tree(&dir, cache_dir)?;
        let log_path = dir.join("libvirtd.log");
        let log = fs::File::create(&log_path)
            .map_err(|e| LabError::io(path_context("create", &log_path), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| LabError::io(path_context("dup", &log_path), e))?;

        // unshare execs sh, which execs libvirtd: the child's pid is libvirtd's pid.
        // Own process group, so a Ctrl-C aimed at the test run does not race the cleanup.
        let child = Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                NAMESPACE_SCRIPT,
            ])
            .arg("sh")
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .map_err(|e| LabError::io("spawn unshare libvirtd", e))?;
        let pid = child.id();
        let watchdog = Command::new("sh")
            .args(["-c", WATCHDOG_SCRIPT, "sh"])
            .arg(std::process::id().to_string())
            .arg(pid.to_string())
            .arg(&dir)
            .arg(if remove_dir { "yes" } else { "no" })
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(|e| LabError::io("spawn libvirtd watchdog", e))?;
        let mut daemon = Libvirtd {
            child: Some(child),
            watchdog: Some(watchdog),
            pid,
            dir,
            remove_dir,
        };
        let started = Instant::now();
        daemon.wait_ready()?;
        tracing::info!(pid, elapsed = ?started.elapsed(), uri = %daemon.uri(), "libvirtd ready");
        daemon.save_capabilities(cache_dir);
        Ok(daemon)
    }

    pub fn uri(&self) -> String {
        format!("qemu:///system?socket={}", self.socket_path().display())
    }

    pub fn socket_path(&self) -> PathBuf {
        self.dir.join("run/libvirt/libvirt-sock")
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The private tree (logs: `libvirtd.log`, `var/log/libvirt/qemu/<domain>.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Pids of the QEMU processes this libvirtd runs (from its pid files).
    pub fn qemu_pids(&self) -> Vec<u32> {
        Self::qemu_pids_in(&self.dir)
    }

    /// Pids of the QEMU processes the libvirtd whose directory is `dir` started (from its
    /// pid files).
    pub fn qemu_pids_in(dir: &Path) -> Vec<u32> {
        let Ok(entries) = fs::read_dir(dir.join("run/libvirt/qemu")) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "pid"))
            // driver.pid is libvirtd's own lock file.
            .filter(|e| e.file_name() != "driver.pid")
            .filter_map(|e| fs::read_to_string(e.path()).ok())
            .filter_map(|s| s.trim().parse().ok())
            .collect()
    }

    /// The inode of libvirtd's mount namespace (`mnt:[…]`), to check it is gone later.
    pub fn mount_namespace(&self) -> Option<String> {
        fs::read_link(format!("/proc/{}/ns/mnt", self.pid))
            .ok()
            .map(|p| p.display().to_string())
    }

    /// Destroys every domain, then SIGTERMs libvirtd and waits for it; QEMU processes that
    /// survive are killed by pid. Leaves no process and so no private mount behind.
    pub fn stop(mut self) -> Result<(), LabError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<(), LabError> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        let qemu_before = self.qemu_pids();
        if let Ok(conn) = connect(&self.uri())
            && let Ok(domains) = conn.list_all_domains(0)
        {
            for domain in domains {
                if let Err(e) = domain.destroy() {
                    tracing::warn!(error = %e, "destroying a lab domain failed");
                }
            }
        }
        signal(self.pid, "TERM");
        let deadline = Instant::now() + EXIT_TIMEOUT;
        let mut exited = false;
        while Instant::now() < deadline {
            match child.try_wait() {
                Ok(Some(_)) => {
                    exited = true;
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return Err(LabError::io("wait for libvirtd", e)),
            }
        }
        if !exited {
            tracing::warn!(pid = self.pid, "libvirtd ignored SIGTERM; killing it");
            let _ = child.kill();
            let _ = child.wait();
        }
        for pid in qemu_before.into_iter().chain(self.qemu_pids()) {
            if process_alive(pid) {
                signal(pid, "KILL");
            }
        }
        if self.remove_dir {
            let _ = fs::remove_dir_all(&self.dir);
        }
        if exited {
            Ok(())
        } else {
            Err(LabError::Timeout {
                what: format!("libvirtd {} to exit after SIGTERM", self.pid),
                after: EXIT_TIMEOUT,
            })
        }
    }

    fn wait_ready(&mut self) -> Result<(), LabError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let uri = self.uri();
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                let log_path = self.dir.join("libvirtd.log");
                return Err(LabError::LibvirtdDied {
                    status: status.to_string(),
                    log: file_tail(&log_path, 30),
                    log_path,
                });
            }
            if self.socket_path().exists() {
                match connect(&uri).and_then(|c| {
                    c.hyp_version()
                        .map_err(|e| LabError::libvirt("query hypervisor version", &e))
                }) {
                    Ok(_) => return Ok(()),
                    Err(e) => last = e.to_string(),
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.shutdown();
        Err(LabError::Timeout {
            what: format!("libvirtd at {uri} to answer (last error: {last})"),
            after: READY_TIMEOUT,
        })
    }

    fn save_capabilities(&self, cache_dir: &Path) {
        let src = self.dir.join("var/cache/libvirt/qemu/capabilities");
        let dst = cache_dir.join("libvirt-capabilities");
        if fs::create_dir_all(&dst).is_err() {
            return;
        }
        for entry in fs::read_dir(&src).into_iter().flatten().flatten() {
            let target = dst.join(entry.file_name());
            let tmp = target.with_extension("tmp");
            // Rename keeps a concurrent reader from seeing half a file.
            if fs::copy(entry.path(), &tmp).is_ok() {
                let _ = fs::rename(&tmp, &target);
            }
        }
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(error = %e, "stopping libvirtd on drop");
        }
    }
}

fn prepare_tree(dir: &Path, cache_dir: &Path) -> Result<(), LabError> {
    let mkdir = |p: PathBuf| {
        fs::create_dir_all(&p).map_err(|e| LabError::io(path_context("create", &p), e))
    };
    for sub in [
        "etc/libvirt",
        "run",
        "var/lib/libvirt",
        "var/log/libvirt",
        "var/cache/libvirt/qemu/capabilities",
    ] {
        mkdir(dir.join(sub))?;
    }
    let write = |p: PathBuf, text: &str| {
        fs::write(&p, text).map_err(|e| LabError::io(path_context("write", &p), e))
    };
    write(dir.join("etc/libvirt/qemu.conf"), QEMU_CONF)?;
    write(dir.join("etc/libvirt/libvirtd.conf"), LIBVIRTD_CONF)?;

    // libvirt insists on knowing libvirt-qemu even when QEMU runs as root.
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    let group = fs::read_to_string("/etc/group").unwrap_or_default();
    let mut passwd: String = passwd
        .lines()
        .filter(|l| !l.starts_with("libvirt-qemu:"))
        .map(|l| format!("{l}\n"))
        .collect();
    passwd.push_str(
        "libvirt-qemu:x:64055:64055:Libvirt Qemu,,,:/var/lib/libvirt:/usr/sbin/nologin\n",
    );
    let mut group: String = group
        .lines()
        .filter(|l| !l.starts_with("libvirt-qemu:"))
        .map(|l| format!("{l}\n"))
        .collect();
    group.push_str("libvirt-qemu:x:64055:\n");
    write(dir.join("etc/passwd"), &passwd)?;
    write(dir.join("etc/group"), &group)?;

    let cached = cache_dir.join("libvirt-capabilities");
    let target = dir.join("var/cache/libvirt/qemu/capabilities");
    for entry in fs::read_dir(&cached).into_iter().flatten().flatten() {
        if entry.path().extension().is_some_and(|x| x == "xml") {
            let _ = fs::copy(entry.path(), target.join(entry.file_name()));
        }
    }
    Ok(())
}
