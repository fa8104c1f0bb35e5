//! Detached processes: start with a log file, stop by pid, find leftovers.
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::ClusterError;
use crate::guest::process_alive;

/// A detached process the lab started.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    /// Its stdout + stderr.
    pub log: std::path::PathBuf,
}

/// How much of a dead process's log its error shows.
const EXITED_LOG_LINES: usize = 40;

impl ProcessInfo {
    /// The error for this process having exited when it should run: `what` happened, with
    /// the tail of its log.
    pub(crate) fn exited(&self, what: &str) -> ClusterError {
        ClusterError::Failed(format!(
            "{what}; {}:\n{}",
            self.log.display(),
            log_tail(&self.log, EXITED_LOG_LINES)
        ))
    }
}

/// A bounded wait for a detached process to become ready (polled by the caller).
pub(crate) struct Startup<'a> {
    process: &'a ProcessInfo,
    timeout: Duration,
    deadline: Instant,
}

impl<'a> Startup<'a> {
    pub(crate) fn new(process: &'a ProcessInfo, timeout: Duration) -> Startup<'a> {
        Startup {
            process,
            timeout,
            deadline: Instant::now() + timeout,
        }
    }

    /// Between two polls: fails once the process has exited ([`ProcessInfo::exited`] with
    /// `exited`) or the time is up (a timeout waiting for `waiting_for()`).
    pub(crate) fn check(
        &self,
        exited: &str,
        waiting_for: impl FnOnce() -> String,
    ) -> Result<(), ClusterError> {
        if !process_alive(self.process.pid) {
            return Err(self.process.exited(exited));
        }
        if Instant::now() >= self.deadline {
            return Err(ClusterError::Timeout {
                what: waiting_for(),
                after: self.timeout,
            });
        }
        Ok(())
    }
}

/// Starts `cmd` in its own process group (a Ctrl-C aimed at `up` must not reach it), with
/// stdin closed and stdout + stderr appended to `log`. It outlives the caller.
pub fn spawn_detached(mut cmd: Command, log: &Path) -> Result<ProcessInfo, ClusterError> {
    let file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| ClusterError::io(format!("open {}", log.display()), e))?;
    let err = file
        .try_clone()
        .map_err(|e| ClusterError::io(format!("dup {}", log.display()), e))?;
    let program = cmd.get_program().to_string_lossy().into_owned();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| ClusterError::io(format!("start {program}"), e))?;
    // The child is not waited for here: it is reparented when this process exits, and
    // `stop` polls /proc instead of waitpid.
    Ok(ProcessInfo {
        pid: child.id(),
        log: log.to_path_buf(),
    })
}

/// Sends a signal through kill(1): the crate forbids unsafe code outside its FFI module.
pub fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Waits (bounded) until `pid` is gone; true when it is.
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while process_alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// SIGTERM, wait up to `grace`, then SIGKILL. True when the process is gone.
pub fn stop(pid: u32, grace: Duration) -> bool {
    if !process_alive(pid) {
        return true;
    }
    signal(pid, "TERM");
    if wait_gone(pid, grace) {
        return true;
    }
    tracing::warn!(pid, "process ignored SIGTERM; killing it");
    signal(pid, "KILL");
    wait_gone(pid, Duration::from_secs(5))
}

/// Pids of QEMU processes a node's libvirtd started (a node's directory is its libvirtd's).
pub fn qemu_pids(node_dir: &Path) -> Vec<u32> {
    crate::guest::Libvirtd::qemu_pids_in(node_dir)
}

/// Mounts whose source lies under `dir`, in any process's mount namespace (a private
/// libvirtd namespace stays alive as long as one process is in it).
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.display().to_string();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|s| s.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(info) = fs::read_to_string(entry.path().join("mountinfo")) else {
            continue;
        };
        for line in info.lines() {
            // Field 4 is the mount's root within its filesystem: the bind source.
            let root = line.split_whitespace().nth(3).unwrap_or_default();
            if root.starts_with(&dir) {
                found.push(format!("pid {pid}: {root}"));
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Where cargo may have put the workspace binary `name`: next to `exe` (this executable),
/// one directory up (test binaries live in target/debug/deps), the repo's target/debug.
pub(crate) fn built_binary_candidates(name: &str, exe: Option<&Path>) -> Vec<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = exe.and_then(Path::parent) {
        candidates.push(dir.join(name));
        if let Some(parent) = dir.parent() {
            candidates.push(parent.join(name));
        }
    }
    candidates.push(crate::repo_dir().join("target/debug").join(name));
    candidates
}

/// The `guestcred` binary: `$GUESTCRED_BIN`, else next to this executable, else the repo's
/// target/debug.
pub fn guestcred_binary(explicit: Option<&Path>) -> Result<PathBuf, ClusterError> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(p) = explicit {
        candidates.push(p.to_path_buf());
    }
    let exe = std::env::current_exe().ok();
    candidates.extend(built_binary_candidates("guestcred", exe.as_deref()));
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| ClusterError::Missing {
            what: "the guestcred binary".into(),
            hint: format!(
                "run `cargo build --bins` or pass --guestcred-bin (looked at {})",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_process_is_gone_afterwards() {
        let child = Command::new("sleep").arg("30").spawn().expect("sleep runs");
        let pid = child.id();
        // Reap it in the background so it does not linger as a zombie.
        let reaper = std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
        assert!(stop(pid, Duration::from_secs(10)));
        assert!(!process_alive(pid));
        let _ = reaper.join();
    }

    #[test]
    fn no_mount_lies_under_a_fresh_directory() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(mounts_under(dir.path()).is_empty());
    }

    #[test]
    fn a_log_tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("x.log");
        fs::write(&log, "a\nb\nc\n").expect("write");
        assert_eq!(log_tail(&log, 2), "b\nc");
    }
}
