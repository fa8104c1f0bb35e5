//! The host's `qemu-ga` as a QGA server on a unix socket, without a VM.
//!
//! Each instance runs in its own mount (and UTS) namespace with a private overlay over
//! /etc and private /root and /home, so `chpasswd` and authorized_keys writes never touch
//! the host. The overlay's upper directory and the private homes stay on the host side,
//! which is how tests read the instance's /etc/shadow and authorized_keys. Dangerous
//! commands (exec, file access, shutdown, ...) are blocked with `-b`.
//!
//! Its /etc/passwd, /etc/group and /etc/shadow are small files written here (root plus the
//! requested users), not copies of the host's: no host hash ever lands in a test dir.
//!
//! qemu-ga does not serve the unix socket itself. In a VM the agent reads a virtio-serial
//! port and the socket belongs to the hypervisor's chardev, which takes one client at a
//! time and survives any client's hang-up. The lab does the same ([`Chardev`]): qemu-ga
//! runs in `isa-serial` mode on a pty, and a relay thread serves the socket and copies
//! bytes between its client and the pty. (qemu-ga in `unix-listen` mode exits when a client
//! closes with an answer unread — the ECONNRESET makes its read fail — which a shim killed or
//! timing out just as the agent answers does; a VM's agent never sees that.) As behind a
//! chardev, the agent's output while no client is connected is dropped, a late answer may
//! reach the next client, and a frozen agent still has its connections accepted.
//!
//! Used for fast tests of the `qga-socket` backend and for scale benchmarks (hundreds).

use std::fs;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt, chown};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Commands no test needs and no lab instance should offer.
pub const ALWAYS_BLOCKED: &[&str] = &[
    "guest-exec",
    "guest-exec-status",
    "guest-shutdown",
    "guest-file-open",
    "guest-file-close",
    "guest-file-read",
    "guest-file-write",
    "guest-file-seek",
    "guest-file-flush",
    "guest-suspend-disk",
    "guest-suspend-ram",
    "guest-suspend-hybrid",
    "guest-set-time",
    "guest-set-vcpus",
    "guest-set-memory-blocks",
    "guest-fsfreeze-freeze",
    "guest-fsfreeze-freeze-list",
    "guest-fsfreeze-thaw",
    "guest-fstrim",
];

/// The `guest-ssh-*` commands, for emulating an old agent.
pub const SSH_COMMANDS: &[&str] = &[
    "guest-ssh-get-authorized-keys",
    "guest-ssh-add-authorized-keys",
    "guest-ssh-remove-authorized-keys",
];

const FIRST_UID: u32 = 2001;
const START_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HostQgaError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("'{0}' is not installed: run scripts/install-deps.sh")]
    MissingTool(&'static str),
    #[error("qemu-ga instance {name} did not start: {log}")]
    NotStarted { name: String, log: String },
    #[error("invalid instance or user name {0:?}")]
    InvalidName(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HostQgaError {
    let what = what.into();
    move |source| HostQgaError::Io { what, source }
}

/// Kills this process's qemu-ga instances once the process is gone (even by SIGKILL, when
/// no Drop runs). One watchdog per process; it kills only pids whose command line still
/// names the instance's socket, so a reused pid is left alone.
const WATCHDOG_SCRIPT: &str = r#"
owner=$1 registry=$2
while kill -0 "$owner" 2>/dev/null; do sleep 1; done
[ -f "$registry" ] || exit 0
while read -r pid sock; do
    if tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$sock"; then
        kill -KILL "$pid" 2>/dev/null
    fi
done <"$registry"
rm -f "$registry"
"#;

fn register_for_watchdog(pid: u32, socket: &Path) -> Result<(), HostQgaError> {
    use std::sync::OnceLock;
    static REGISTRY: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let registry = REGISTRY.get_or_init(|| {
        let path =
            std::env::temp_dir().join(format!("guestcred-hostqga-{}.pids", std::process::id()));
        Command::new("sh")
            .args(["-c", WATCHDOG_SCRIPT, "sh"])
            .arg(std::process::id().to_string())
            .arg(&path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .map(|_| path)
            .map_err(|e| format!("spawning the hostqga watchdog: {e}"))
    });
    let path = registry.as_ref().map_err(|e| HostQgaError::Io {
        what: e.clone(),
        source: std::io::Error::other("watchdog"),
    })?;
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io("opening the watchdog registry"))?;
    writeln!(f, "{pid} {}", socket.display()).map_err(io("writing the watchdog registry"))
}

/// Options for [`HostQga::start_with`].
#[derive(Clone, Debug, Default)]
pub struct HostQgaOptions {
    /// Extra users (besides root), each with a home directory under /home.
    pub users: Vec<String>,
    /// Commands to block on top of [`ALWAYS_BLOCKED`] (e.g. [`SSH_COMMANDS`]).
    pub block: Vec<String>,
}

impl HostQgaOptions {
    pub fn user(mut self, name: &str) -> Self {
        self.users.push(name.to_owned());
        self
    }

    pub fn block(mut self, commands: &[&str]) -> Self {
        self.block.extend(commands.iter().map(|c| (*c).to_owned()));
        self
    }
}

/// A running qemu-ga instance; stopped on drop.
#[derive(Debug)]
pub struct HostQga {
    name: String,
    dir: PathBuf,
    socket_path: PathBuf,
    pid: u32,
    users: Vec<String>,
    child: Option<Child>,
    chardev: Option<Chardev>,
}

fn plain_name(name: &str) -> Result<(), HostQgaError> {
    let ok = !name.is_empty()
        && name.len() <= 32
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(HostQgaError::InvalidName(name.to_owned()))
    }
}

fn require_tool(tool: &'static str) -> Result<(), HostQgaError> {
    let found = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|p| p.join(tool).is_file()))
        || ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|p| Path::new(p).join(tool).is_file());
    if found {
        Ok(())
    } else {
        Err(HostQgaError::MissingTool(tool))
    }
}

fn write_file(path: &Path, content: &str, mode: u32) -> Result<(), HostQgaError> {
    fs::write(path, content).map_err(io(format!("writing {}", path.display())))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(io(format!("chmod {}", path.display())))
}

impl HostQga {
    /// Start an instance with only root, socket at `<dir>/<name>/qga.sock`.
    pub fn start(dir: &Path, name: &str) -> Result<Self, HostQgaError> {
        Self::start_with(dir, name, &HostQgaOptions::default())
    }

    /// Socket path of the instance `name` under `dir` (before or after it starts), so a
    /// shim socket template can be `<dir>/{name}/qga.sock`.
    pub fn socket_path_for(dir: &Path, name: &str) -> PathBuf {
        dir.join(name).join("qga.sock")
    }

    pub fn start_with(dir: &Path, name: &str, opts: &HostQgaOptions) -> Result<Self, HostQgaError> {
        plain_name(name)?;
        for u in &opts.users {
            plain_name(u)?;
        }
        require_tool("qemu-ga")?;
        require_tool("unshare")?;
        require_tool("chpasswd")?;

        let base = dir.join(name);
        let upper = base.join("etc-upper");
        let work = base.join("etc-work");
        let root_home = base.join("root");
        let homes = base.join("home");
        let state = base.join("state");
        for d in [&upper, &work, &root_home, &homes, &state] {
            fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
        }
        fs::set_permissions(&base, fs::Permissions::from_mode(0o700))
            .map_err(io("chmod instance dir"))?;
        fs::set_permissions(&root_home, fs::Permissions::from_mode(0o700))
            .map_err(io("chmod root home"))?;

        let mut passwd = String::from(
            "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n",
        );
        let mut group = String::from("root:x:0:\nnogroup:x:65534:\n");
        let mut shadow = String::from("root:*:19000:0:99999:7:::\nnobody:*:19000:0:99999:7:::\n");
        for (i, user) in opts.users.iter().enumerate() {
            let uid = FIRST_UID + i as u32;
            passwd.push_str(&format!("{user}:x:{uid}:{uid}::/home/{user}:/bin/sh\n"));
            group.push_str(&format!("{user}:x:{uid}:\n"));
            shadow.push_str(&format!("{user}:!:19000:0:99999:7:::\n"));
            let home = homes.join(user);
            fs::create_dir_all(&home).map_err(io(format!("creating {}", home.display())))?;
            chown(&home, Some(uid), Some(uid)).map_err(io(format!("chown {}", home.display())))?;
            fs::set_permissions(&home, fs::Permissions::from_mode(0o700))
                .map_err(io("chmod home"))?;
        }
        write_file(&upper.join("passwd"), &passwd, 0o644)?;
        write_file(&upper.join("group"), &group, 0o644)?;
        write_file(&upper.join("shadow"), &shadow, 0o640)?;

        let socket_path = Self::socket_path_for(dir, name);
        let _ = fs::remove_file(&socket_path);
        let pty = Pty::open()?;
        let mut blocked: Vec<String> = ALWAYS_BLOCKED.iter().map(|s| (*s).to_owned()).collect();
        blocked.extend(opts.block.iter().cloned());

        // Paths are passed as positional parameters ($1..), never spliced into the script.
        let script = r#"set -e
mount -t overlay guestcred-hostqga -o "lowerdir=/etc,upperdir=$1,workdir=$2" /etc
mount --bind "$3" /root
mount --bind "$4" /home
exec qemu-ga -m isa-serial -p "$5" -f "$6" -t "$7" -b "$8"
"#;
        let log_path = base.join("qga.log");
        let log = fs::File::create(&log_path).map_err(io("creating qga.log"))?;
        let log_err = log.try_clone().map_err(io("cloning log handle"))?;
        let child = Command::new("unshare")
            .args([
                "--mount",
                "--uts",
                "--propagation",
                "private",
                "sh",
                "-c",
                script,
                "sh",
            ])
            .arg(&upper)
            .arg(&work)
            .arg(&root_home)
            .arg(&homes)
            .arg(&pty.slave_path)
            .arg(base.join("qga.pid"))
            .arg(&state)
            .arg(blocked.join(","))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(io("spawning unshare"))?;
        let pid = child.id();
        let mut me = Self {
            name: name.to_owned(),
            dir: base,
            socket_path,
            pid,
            users: opts.users.clone(),
            child: Some(child),
            chardev: None,
        };
        // On error `me` drops, which stops the instance. The state directory is on
        // qemu-ga's command line and unique to the instance (a pty path may be reused).
        register_for_watchdog(pid, &state)?;
        me.wait_for_agent(&pty)?;
        me.chardev = Some(Chardev::serve(pty.master, &me.socket_path)?);
        Ok(me)
    }

    /// Until qemu-ga answers a `guest-sync-delimited` on its serial line (it flushes what
    /// was written before it opened the line, so the sync is sent again until answered).
    fn wait_for_agent(&mut self, pty: &Pty) -> Result<(), HostQgaError> {
        let deadline = Instant::now() + START_TIMEOUT;
        let mut master = fs::File::from(pty.master.try_clone().map_err(io("dup pty"))?);
        let mut seen = Vec::new();
        loop {
            let _ = master.write_all(
                b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":4242}}\n",
            );
            if wait_readable(&master, Duration::from_millis(200)) {
                let mut buf = [0u8; 512];
                if let Ok(n) = master.read(&mut buf) {
                    seen.extend_from_slice(&buf[..n]);
                }
                if seen.windows(4).any(|w| w == b"4242") {
                    return Ok(());
                }
            }
            let exited = match self.child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => Some(status.to_string()),
                _ => None,
            };
            if exited.is_some() || Instant::now() > deadline {
                let log = fs::read_to_string(self.dir.join("qga.log")).unwrap_or_default();
                let _ = self.stop();
                return Err(HostQgaError::NotStarted {
                    name: self.name.clone(),
                    log: format!(
                        "{}; log: {}",
                        exited.unwrap_or_else(|| "no answer within 10 s".into()),
                        log.trim()
                    ),
                });
            }
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// PID of qemu-ga (unshare and sh exec into it).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn users(&self) -> &[String] {
        &self.users
    }

    /// Stop qemu-ga; its namespace and mounts go with it. Idempotent.
    pub fn stop(&mut self) -> Result<(), HostQgaError> {
        if let Some(mut child) = self.child.take() {
            // qemu-ga keeps no state worth a graceful stop.
            let _ = child.kill();
            child.wait().map_err(io("waiting for qemu-ga"))?;
        }
        // The VM is gone: its socket no longer accepts (the file stays, as qemu-ga's did).
        if let Some(chardev) = self.chardev.take() {
            chardev.close();
        }
        Ok(())
    }

    /// The full `/etc/shadow` line of `user` inside the instance.
    pub fn shadow_line(&self, user: &str) -> Result<Option<String>, HostQgaError> {
        let path = self.dir.join("etc-upper").join("shadow");
        let text = fs::read_to_string(&path).map_err(io(format!("reading {}", path.display())))?;
        Ok(text
            .lines()
            .find(|l| l.split(':').next() == Some(user))
            .map(str::to_owned))
    }

    /// The password hash field of `user` in the instance's `/etc/shadow`.
    pub fn shadow_hash(&self, user: &str) -> Result<Option<String>, HostQgaError> {
        Ok(self
            .shadow_line(user)?
            .and_then(|l| l.split(':').nth(1).map(str::to_owned)))
    }

    /// Whether `password` is what `user`'s shadow hash was made from (the system's own
    /// crypt(3), through perl, with the password on stdin, never in argv).
    pub fn password_matches(&self, user: &str, password: &str) -> Result<bool, HostQgaError> {
        let Some(hash) = self.shadow_hash(user)? else {
            return Ok(false);
        };
        crypt_matches(password, &hash)
    }

    /// Host-side path of `user`'s authorized_keys inside the instance.
    pub fn authorized_keys_path(&self, user: &str) -> PathBuf {
        let home = if user == "root" {
            self.dir.join("root")
        } else {
            self.dir.join("home").join(user)
        };
        home.join(".ssh").join("authorized_keys")
    }

    /// Non-empty lines of `user`'s authorized_keys (empty when the file does not exist).
    pub fn authorized_keys(&self, user: &str) -> Result<Vec<String>, HostQgaError> {
        let path = self.authorized_keys_path(user);
        match fs::read_to_string(&path) {
            Ok(text) => Ok(text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_owned)
                .collect()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io(format!("reading {}", path.display()))(e)),
        }
    }

    /// Pre-seed `user`'s authorized_keys (as if it was there before the operator).
    pub fn seed_authorized_keys(&self, user: &str, keys: &[&str]) -> Result<(), HostQgaError> {
        let path = self.authorized_keys_path(user);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).map_err(io("creating .ssh"))?;
        }
        let mut f = fs::File::create(&path).map_err(io("creating authorized_keys"))?;
        for k in keys {
            writeln!(f, "{k}").map_err(io("writing authorized_keys"))?;
        }
        Ok(())
    }
}

impl Drop for HostQga {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Read what is there (retrying interrupted reads); `None` at the end or on an error.
fn read_some(mut from: impl Read, buf: &mut [u8]) -> Option<usize> {
    loop {
        match from.read(buf) {
            Ok(0) => return None,
            Ok(n) => return Some(n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return None,
        }
    }
}

/// Is `file` readable within `timeout`?
fn wait_readable(file: &impl AsRawFd, timeout: Duration) -> bool {
    let mut fds = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    let n = unsafe { libc::poll(&mut fds, 1, ms) };
    n > 0 && fds.revents & libc::POLLIN != 0
}

/// A pty pair: qemu-ga's serial line (the slave) and the hypervisor's end (the master).
struct Pty {
    master: OwnedFd,
    /// Held open until qemu-ga has the line open, so the master does not read EIO before.
    _slave: OwnedFd,
    slave_path: PathBuf,
}

impl Pty {
    fn open() -> Result<Self, HostQgaError> {
        // posix_openpt and friends rather than a crate: four libc calls.
        // SAFETY: plain libc calls; every returned fd is checked and owned at once.
        let master = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
        if master < 0 {
            return Err(io("posix_openpt")(std::io::Error::last_os_error()));
        }
        // SAFETY: `master` is a fresh fd that nothing else owns.
        let master = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(master) };
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: valid fd; `name` is a writable buffer of the given length.
        let ok = unsafe {
            libc::grantpt(master.as_raw_fd()) == 0
                && libc::unlockpt(master.as_raw_fd()) == 0
                && libc::ptsname_r(master.as_raw_fd(), name.as_mut_ptr(), name.len()) == 0
        };
        if !ok {
            return Err(io("setting up the pty")(std::io::Error::last_os_error()));
        }
        // SAFETY: ptsname_r wrote a NUL-terminated string into `name`.
        let slave_path = PathBuf::from(
            unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }
                .to_string_lossy()
                .into_owned(),
        );
        let slave: OwnedFd = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open(&slave_path)
            .map_err(io(format!("opening {}", slave_path.display())))?
            .into();
        // Raw until qemu-ga sets the line up itself (it does the same): no echo of what
        // the relay writes.
        // SAFETY: valid fd and a termios the calls fill in.
        unsafe {
            let mut tio: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(slave.as_raw_fd(), &mut tio) == 0 {
                libc::cfmakeraw(&mut tio);
                libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &tio);
            }
        }
        Ok(Self {
            master,
            _slave: slave,
            slave_path,
        })
    }
}

/// The hypervisor's chardev in front of an agent's serial line: it serves the socket, one
/// client at a time (others wait in the listen backlog), copies the client's bytes to the
/// line and the line's bytes to the client, drops the line's output while no client is
/// connected, and closes the socket when the agent is gone (the line reads EIO) or
/// [`Chardev::close`] is called.
#[derive(Debug)]
struct Chardev {
    closed: Arc<AtomicBool>,
    socket_path: PathBuf,
}

impl Chardev {
    fn serve(master: OwnedFd, socket_path: &Path) -> Result<Self, HostQgaError> {
        let listener = UnixListener::bind(socket_path)
            .map_err(io(format!("binding {}", socket_path.display())))?;
        let line = Arc::new(fs::File::from(master));
        let client: Arc<Mutex<Option<UnixStream>>> = Arc::default();
        let closed = Arc::new(AtomicBool::new(false));
        let me = Self {
            closed: closed.clone(),
            socket_path: socket_path.to_path_buf(),
        };

        // The line to the client (or nowhere).
        let (from_line, to_client, done) = (line.clone(), client.clone(), closed.clone());
        let wake = socket_path.to_path_buf();
        std::thread::Builder::new()
            .name("hostqga-line".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                // Ends when the agent closes the line (EIO) or it is closed for good.
                while let Some(n) = read_some(&*from_line, &mut buf) {
                    let guard = to_client.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(mut c) = guard.as_ref() {
                        let _ = c.write_all(&buf[..n]);
                    }
                }
                if !done.swap(true, Ordering::SeqCst) {
                    let _ = UnixStream::connect(&wake);
                }
                if let Some(c) = to_client.lock().unwrap_or_else(|p| p.into_inner()).take() {
                    let _ = c.shutdown(std::net::Shutdown::Both);
                }
            })
            .map_err(io("spawning the chardev line thread"))?;

        // Clients, one at a time, to the line.
        std::thread::Builder::new()
            .name("hostqga-socket".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if closed.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let Ok(reader) = stream.try_clone() else {
                        continue;
                    };
                    *client.lock().unwrap_or_else(|p| p.into_inner()) = Some(reader);
                    let mut buf = [0u8; 4096];
                    while let Some(n) = read_some(&stream, &mut buf) {
                        if (&*line).write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    client.lock().unwrap_or_else(|p| p.into_inner()).take();
                }
                // The listener drops here: connects are refused from now on.
            })
            .map_err(io("spawning the chardev socket thread"))?;
        Ok(me)
    }

    fn close(self) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            // Wake the accept so the listener closes.
            let _ = UnixStream::connect(&self.socket_path);
        }
    }
}

/// Whether crypt(3) of `password` with the setting `hash` gives `hash` (libxcrypt knows
/// every scheme the guests use: yescrypt, sha512crypt, ...). The password goes on stdin.
pub fn crypt_matches(password: &str, hash: &str) -> Result<bool, HostQgaError> {
    let mut child = Command::new("perl")
        .args([
            "-e",
            "my $p = <STDIN>; chomp $p; print crypt($p, $ARGV[0]) // ''",
        ])
        .arg(hash)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(io("running perl for crypt(3)"))?;
    if let Some(mut stdin) = child.stdin.take() {
        writeln!(stdin, "{password}").map_err(io("writing to perl"))?;
    }
    let out = child.wait_with_output().map_err(io("waiting for perl"))?;
    Ok(out.status.success() && out.stdout == hash.as_bytes())
}
