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
//! Used for fast tests of the `qga-socket` backend and for scale benchmarks (hundreds).

use std::fs;
use std::io::Write;
use std::os::unix::fs::{PermissionsExt, chown};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
        let mut blocked: Vec<String> = ALWAYS_BLOCKED.iter().map(|s| (*s).to_owned()).collect();
        blocked.extend(opts.block.iter().cloned());

        // Paths are passed as positional parameters ($1..), never spliced into the script.
        let script = r#"set -e
mount -t overlay guestcred-hostqga -o "lowerdir=/etc,upperdir=$1,workdir=$2" /etc
mount --bind "$3" /root
mount --bind "$4" /home
exec qemu-ga -m unix-listen -p "$5" -f "$6" -t "$7" -b "$8"
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
            .arg(&socket_path)
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
        };
        // On error `me` drops, which stops the instance.
        register_for_watchdog(pid, &me.socket_path)?;
        me.wait_for_socket()?;
        Ok(me)
    }

    fn wait_for_socket(&mut self) -> Result<(), HostQgaError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if std::os::unix::net::UnixStream::connect(&self.socket_path).is_ok() {
                return Ok(());
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
                        exited.unwrap_or_else(|| "no socket within 10 s".into()),
                        log.trim()
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
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
