//! Processes under measurement (controller, shims) and what /proc says about them.
use anyhow::{Context as _, bail};
use std::fs;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// A child process, killed (by its own pid) when dropped.
pub struct Proc {
    pub name: String,
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    /// Start `cmd` with stdout and stderr into `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> anyhow::Result<Proc> {
        let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .env("NO_COLOR", "1")
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Proc {
            name: name.into(),
            log: log.to_path_buf(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the log tail when the process already exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); log tail:\n{}",
                self.name,
                self.log_tail()
            );
        }
        Ok(())
    }

    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Wait until the log contains `needle` (the process's own readiness line).
    pub async fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<()> {
        let failure = format!("did not log {needle:?}");
        self.poll(timeout, &failure, |p| {
            fs::read_to_string(&p.log).is_ok_and(|t| t.contains(needle))
        })
        .await
    }

    /// Wait until `addr` accepts TCP connections.
    pub async fn wait_for_port(
        &mut self,
        addr: SocketAddr,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        self.poll(timeout, &format!("did not listen on {addr}"), |_| {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
        })
        .await
    }

    /// Checks `ready` every 20 ms until it holds; an error saying the process `failure`
    /// (with its log tail) if it exits first or `timeout` passes.
    async fn poll(
        &mut self,
        timeout: Duration,
        failure: &str,
        ready: impl Fn(&Self) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while !ready(self) {
            self.check_alive()?;
            if Instant::now() > deadline {
                bail!(
                    "{} {failure} within {timeout:?}; log tail:\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// User + system CPU time so far.
    pub fn cpu(&self) -> anyhow::Result<Duration> {
        cpu_time(self.pid())
    }

    pub fn rss_mib(&self) -> anyhow::Result<f64> {
        status_kib(self.pid(), "VmRSS:").map(kib_to_mib)
    }

    /// The anonymous part of RSS (heap, stacks): the process's own memory, without the
    /// file-backed pages of its binary and shared libraries.
    pub fn anon_mib(&self) -> anyhow::Result<f64> {
        status_kib(self.pid(), "RssAnon:").map(kib_to_mib)
    }

    /// RSS, RssAnon, USS and PSS at once (see [`Mem`]).
    pub fn mem(&self) -> anyhow::Result<Mem> {
        Mem::of(self.pid())
    }

    /// Peak RSS since start (VmHWM).
    pub fn hwm_mib(&self) -> anyhow::Result<f64> {
        status_kib(self.pid(), "VmHWM:").map(kib_to_mib)
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// What a process costs in memory, in MiB, four ways:
/// - `rss` (VmRSS): every page it has resident, its own and the ones it shares (the
///   binary's and shared libraries' file pages, which other processes map too);
/// - `anon` (RssAnon): its anonymous pages (heap, stacks);
/// - `uss` (Private_Clean + Private_Dirty over /proc/PID/smaps): pages only it maps, what
///   the node gets back when it exits, **plus the pages of its own executable it shares
///   with other processes running the same binary** (the bench runs several shims on one
///   machine; a node runs one), so that it is the one-shim-per-node figure;
/// - `pss` (Pss): its pages with each shared page divided by the number of processes
///   mapping it, the fair share (the PSS of all processes sums to the memory in use).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Mem {
    pub rss: f64,
    pub anon: f64,
    pub uss: f64,
    pub pss: f64,
}

impl Mem {
    pub fn of(pid: u32) -> anyhow::Result<Mem> {
        let status = fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let smaps = fs::read_to_string(format!("/proc/{pid}/smaps"))
            .with_context(|| format!("reading /proc/{pid}/smaps"))?;
        let exe = fs::read_link(format!("/proc/{pid}/exe"))
            .with_context(|| format!("reading /proc/{pid}/exe"))?;
        Mem::parse(&status, &smaps, &exe.to_string_lossy())
            .with_context(|| format!("memory figures of pid {pid}"))
    }

    /// From /proc/PID/status, /proc/PID/smaps and the executable's path.
    pub fn parse(status: &str, smaps: &str, exe: &str) -> Option<Mem> {
        let (mut private, mut exe_shared, mut pss) = (0u64, 0u64, 0u64);
        let mut in_exe = false;
        for line in smaps.lines() {
            let mut fields = line.split_whitespace();
            let Some(key) = fields.next() else { continue };
            if !key.ends_with(':') {
                // A mapping's header: "start-end perms offset dev inode [path]".
                in_exe = line.split_whitespace().nth(5) == Some(exe);
                continue;
            }
            let kib: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            match key {
                "Private_Clean:" | "Private_Dirty:" => private += kib,
                "Shared_Clean:" | "Shared_Dirty:" if in_exe => exe_shared += kib,
                "Pss:" => pss += kib,
                _ => {}
            }
        }
        Some(Mem {
            rss: kib_to_mib(parse_status_kib(status, "VmRSS:")?),
            anon: kib_to_mib(parse_status_kib(status, "RssAnon:")?),
            uss: kib_to_mib(private + exe_shared),
            pss: kib_to_mib(pss),
        })
    }

    /// Each field the larger of the two.
    pub fn max(self, o: Mem) -> Mem {
        Mem {
            rss: self.rss.max(o.rss),
            anon: self.anon.max(o.anon),
            uss: self.uss.max(o.uss),
            pss: self.pss.max(o.pss),
        }
    }
}

fn kib_to_mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Clock ticks per second of /proc/<pid>/stat times.
fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .filter(|&t| t > 0)
            .unwrap_or(100)
    })
}

/// utime + stime of `pid` (all its threads) from /proc/<pid>/stat.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    Ok(ticks_to_duration(
        parse_stat_cpu_ticks(&stat)?,
        clock_ticks(),
    ))
}

/// utime + stime of `pid` and of every process below it (children of children too), as
/// they are now: a process tree like `controlplane up` and its etcd, kube-apiserver and
/// kube-controller-manager. Processes that already exited are not counted.
pub fn tree_cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let mut parents = Vec::new();
    for entry in fs::read_dir("/proc")? {
        let Some(p) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process may exit between the listing and the read.
        let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        if let (Some(ppid), Ok(ticks)) = (parse_stat_ppid(&stat), parse_stat_cpu_ticks(&stat)) {
            parents.push((p, ppid, ticks));
        }
    }
    Ok(ticks_to_duration(tree_ticks(pid, &parents), clock_ticks()))
}

/// The ticks of `root` and its descendants in a table of (pid, ppid, ticks).
fn tree_ticks(root: u32, procs: &[(u32, u32, u64)]) -> u64 {
    let mut tree = vec![root];
    let mut total = 0;
    while let Some(p) = tree.pop() {
        for &(pid, ppid, ticks) in procs {
            if pid == p {
                total += ticks;
            }
            if ppid == p && pid != p {
                tree.push(pid);
            }
        }
    }
    total
}

/// Field 4 (ppid) of a stat line.
fn parse_stat_ppid(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(1)?.parse().ok()
}

fn ticks_to_duration(ticks: u64, per_second: u64) -> Duration {
    Duration::from_secs_f64(ticks as f64 / per_second as f64)
}

/// Fields 14 and 15 (utime, stime) of a stat line; the command name (field 2) may contain
/// spaces and parentheses, so count from the last ')'.
pub fn parse_stat_cpu_ticks(stat: &str) -> anyhow::Result<u64> {
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("no ')' in a stat line")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14 → index 11.
    let utime: u64 = fields.get(11).context("short stat line")?.parse()?;
    let stime: u64 = fields.get(12).context("short stat line")?.parse()?;
    Ok(utime + stime)
}

/// A `Vm*:` line of /proc/<pid>/status in KiB.
pub fn status_kib(pid: u32, key: &str) -> anyhow::Result<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    parse_status_kib(&status, key).with_context(|| format!("no {key} for pid {pid}"))
}

pub fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The `guestcred` binary next to this one (both come from the same `cargo build`).
pub fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let path = me.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{} not found next to {}: build both with `cargo build --release --bins`",
            path.display(),
            me.display()
        );
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_utime_plus_stime_even_with_a_spaced_command_name() {
        let line = "42 (guest cred) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 4 0 100 1000 50";
        assert_eq!(parse_stat_cpu_ticks(line).expect("parses"), 12);
    }

    #[test]
    fn a_stat_line_gives_its_parent_pid() {
        let line = "42 (guest cred) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 4 0 100 1000 50";
        assert_eq!(parse_stat_ppid(line), Some(1));
    }

    #[test]
    fn a_tree_counts_its_root_and_every_descendant_and_nothing_else() {
        // 10 → 11 → 12, 10 → 13; 20 is a sibling of 10 under 1.
        let procs = [
            (1, 0, 1000),
            (10, 1, 1),
            (11, 10, 20),
            (12, 11, 300),
            (13, 10, 4000),
            (20, 1, 50000),
        ];
        assert_eq!(tree_ticks(10, &procs), 4321);
        assert_eq!(tree_ticks(12, &procs), 300);
    }

    #[test]
    fn vm_rss_is_read_in_kib() {
        let status = "Name:\tguestcred\nVmHWM:\t  20480 kB\nVmRSS:\t   10240 kB\n";
        assert_eq!(parse_status_kib(status, "VmRSS:"), Some(10240));
        assert_eq!(parse_status_kib(status, "VmHWM:"), Some(20480));
    }

    #[test]
    fn uss_is_private_pages_plus_the_executables_shared_pages_and_pss_is_summed() {
        let status = "VmRSS:\t   20480 kB\nRssAnon:\t    2048 kB\n";
        let smaps = "\
5555-5556 r-xp 00000000 08:01 42 /usr/bin/guestcred-shim
Rss:  4096 kB
Pss:  1024 kB
Shared_Clean:  3072 kB
Shared_Dirty:  0 kB
Private_Clean:  1024 kB
Private_Dirty:  0 kB
7f00-7f01 r-xp 00000000 08:01 43 /usr/lib/libvirt.so.0
Rss:  10240 kB
Pss:  5120 kB
Shared_Clean:  10240 kB
Shared_Dirty:  0 kB
Private_Clean:  0 kB
Private_Dirty:  0 kB
7f02-7f03 rw-p 00000000 00:00 0
Rss:  2048 kB
Pss:  2048 kB
Shared_Clean:  0 kB
Shared_Dirty:  0 kB
Private_Clean:  0 kB
Private_Dirty:  2048 kB
";
        let m = Mem::parse(status, smaps, "/usr/bin/guestcred-shim").expect("parses");
        // USS: 1 + 2 private, + 3 of the binary shared with other shims; libvirt's not.
        assert_eq!(
            m,
            Mem {
                rss: 20.0,
                anon: 2.0,
                uss: 6.0,
                pss: 8.0
            }
        );
    }

    #[test]
    fn own_process_has_uss_below_pss_below_rss() {
        let m = Mem::of(std::process::id()).expect("mem");
        assert!(m.uss > 0.0 && m.uss <= m.pss && m.pss <= m.rss, "{m:?}");
    }

    #[test]
    fn own_process_has_cpu_time_and_rss() {
        let me = std::process::id();
        assert!(status_kib(me, "VmRSS:").expect("rss") > 0);
        cpu_time(me).expect("cpu time");
    }

    #[test]
    fn ticks_convert_with_the_clock_rate() {
        assert_eq!(ticks_to_duration(250, 100), Duration::from_millis(2500));
    }
}
