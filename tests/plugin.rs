//! `kubectl guestcred` (the kubectl-guestcred package) end to end: the plugin binary as a
//! user runs it, with a kubeconfig, against the served emulator, the real controller, real
//! shims and real qemu-ga agents. Each command (list-keys and remove-key checked against the
//! guest's own authorized_keys), the bulk forms (`-l`, `--dry-run`) of set-password, add-key
//! and remove-key, a failing target (exit 1 with the reason),
//! `--stdin` (the value in no process argument, log, Event or output), progress on a
//! pseudo-terminal (script(1)) and in a pipe, Ctrl-C pausing a run, a 403 naming the missing
//! permission, completions (static scripts, and kubectl itself calling
//! kubectl_complete-guestcred), and the krew manifest through krew's validator.
//!
//! The plugin is another package's binary: `make test` builds the whole workspace first;
//! alone, run `cargo build -p kubectl-guestcred` before `cargo test --test plugin`.
#![allow(clippy::disallowed_methods)] // tests may block: clippy.toml's file-system rule is for src/
use guestcred::api::{GuestPasswordReset, KeypairRebuild, Phase, TargetState};
use guestcred_lab::hostqga::HostQga;
use guestcred_lab::kubevirt::vm;
use guestcred_lab::repo_dir;
use guestcred_lab::testing::*;
use guestcred_lab::world::{World, WorldOptions};
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

/// target/debug (or wherever this test binary was built): the plugin's binaries are there.
fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| repo_dir().join("target/debug"));
    for b in ["kubectl-guestcred", "kubectl_complete-guestcred"] {
        assert!(
            dir.join(b).is_file(),
            "{} missing: build the plugin first (cargo build -p kubectl-guestcred; make test builds the workspace)",
            dir.join(b).display()
        );
    }
    dir
}

fn plugin_path() -> PathBuf {
    bin_dir().join("kubectl-guestcred")
}

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn all(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
    /// Fails the test unless the plugin exited with `code`.
    fn exits(&self, code: i32) -> &Self {
        assert_eq!(self.code, code, "{self:?}");
        self
    }
    /// Fails the test unless standard output has `text`.
    fn prints(&self, text: &str) -> &Self {
        assert!(self.stdout.contains(text), "stdout has {text:?}: {self:?}");
        self
    }
    /// Fails the test unless standard error has `text`.
    fn warns(&self, text: &str) -> &Self {
        assert!(self.stderr.contains(text), "stderr has {text:?}: {self:?}");
        self
    }
    /// Fails the test unless the plugin exited with `code` and wrote no escape codes (its
    /// output goes to a pipe), and created an object whose name starts with `prefix`;
    /// returns that name.
    fn created(&self, code: i32, prefix: &str) -> String {
        self.exits(code);
        assert_plain(self);
        let name = created_name(self);
        assert!(name.starts_with(prefix), "{name}");
        name
    }
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// The plugin with `KUBECONFIG` set (as most users have it), output through pipes.
fn command(kubeconfig: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(plugin_path());
    c.args(args)
        .env("KUBECONFIG", kubeconfig)
        .env_remove("NO_COLOR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn finish(child: std::process::Child) -> Out {
    let o = child.wait_with_output().expect("plugin runs");
    Out {
        code: o.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

async fn plugin(w: &World, args: &[&str]) -> Out {
    let mut c = command(w.kubeconfig(), args);
    tokio::task::spawn_blocking(move || finish(c.spawn().expect("spawn plugin")))
        .await
        .expect("plugin thread")
}

/// The object name from "guestpasswordreset.guestcred.io/<name> created".
fn created_name(out: &Out) -> String {
    out.stdout
        .lines()
        .find_map(|l| l.strip_suffix(" created")?.split_once(".guestcred.io/"))
        .map(|(_, n)| n.to_string())
        .unwrap_or_else(|| panic!("no created line: {out:?}"))
}

fn assert_plain(out: &Out) {
    assert!(
        !out.all().contains('\u{1b}'),
        "escape codes in piped output: {out:?}"
    );
}

async fn served(capture_logs: bool) -> World {
    served_with(WorldOptions {
        capture_logs,
        ..WorldOptions::default()
    })
    .await
}

/// A world of `options`, served over HTTP for the plugin.
async fn served_with(options: WorldOptions) -> World {
    World::start(WorldOptions {
        serve: true,
        ..options
    })
    .await
    .expect("served world starts")
}

/// A served world (logs captured if `capture_logs`) with VM `name` on node-1 whose real
/// agent's guest has user alice.
async fn served_with_guest(capture_logs: bool, name: &str) -> (World, HostQga) {
    let w = served(capture_logs).await;
    let qga = w.guest(name).await;
    (w, qga)
}

/// `set-password TARGET… --user USER --generate`, then `more`.
fn generate<'a>(target: &[&'a str], user: &'a str, more: &[&'a str]) -> Vec<&'a str> {
    [
        &["set-password"],
        target,
        &["--user", user, "--generate"],
        more,
    ]
    .concat()
}

/// `add-key TARGET… --user alice -f KEYFILE`, then `more`.
fn add_key<'a>(target: &[&'a str], keyfile: &'a str, more: &[&'a str]) -> Vec<&'a str> {
    [
        &["add-key"],
        target,
        &["--user", "alice", "-f", keyfile],
        more,
    ]
    .concat()
}

/// `remove-key TARGET… --user alice --fingerprint FP` for each of `fingerprints`, then
/// `more`.
fn remove_key<'a>(target: &[&'a str], fingerprints: &[&'a str], more: &[&'a str]) -> Vec<&'a str> {
    let mut args = [&["remove-key"], target, &["--user", "alice"]].concat();
    for fp in fingerprints {
        args.extend(["--fingerprint", fp]);
    }
    args.extend(more);
    args
}

/// The rows of a `--dry-run` table (VM, NODE, PHASE, AGENT, TARGETED, …), header checked
/// and left out.
fn dry_run_rows(dry: &Out) -> Vec<Vec<&str>> {
    let rows: Vec<Vec<&str>> = dry
        .stdout
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0][..5],
        ["VM", "NODE", "PHASE", "AGENT", "TARGETED"],
        "{dry:?}"
    );
    rows[1..].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_password_then_status_and_show_password() {
    let (w, qga) = served_with_guest(false, "vm-a").await;
    let out = plugin(&w, &generate(&["vm-a"], "alice", &[])).await;
    let name = out.created(0, "vm-a-pw-");
    assert_eq!(name.len(), 13, "{name}");
    out.prints("vm-a: Succeeded (Applied) on node-1 after 1 attempt")
        .prints(&format!("gpr/{name}: Succeeded (1/1 VMs)"));
    // Progress in a pipe: plain lines on stderr, one per change.
    out.warns(&format!("gpr/{name}: Succeeded, 1/1 done, 0 failed"))
        .warns("kubectl guestcred show-password");

    let status = plugin(&w, &["status", &name]).await;
    status.exits(0);
    let header = status.stdout.lines().next().unwrap_or_default().to_string();
    for col in ["RESET", "VM", "NODE", "STATE", "REASON", "ATTEMPTS"] {
        assert!(header.contains(col), "{status:?}");
    }
    let row: Vec<&str> = status
        .stdout
        .lines()
        .nth(1)
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        row[..6],
        [name.as_str(), "vm-a", "node-1", "Succeeded", "Applied", "1"],
        "{status:?}"
    );
    let json = plugin(&w, &["status", &name, "-o", "json"]).await;
    let obj: GuestPasswordReset =
        serde_json::from_str(&json.stdout).expect("status -o json is the object");
    assert_eq!(
        obj.status.expect("status").run.phase,
        Some(Phase::Succeeded)
    );
    let yaml = plugin(&w, &["status", "-o", "yaml"]).await;
    let list: serde_json::Value = serde_yaml::from_str(&yaml.stdout).expect("yaml");
    assert_eq!(list["kind"], "List");
    assert_eq!(list["items"][0]["metadata"]["name"], name.as_str());

    // Into a pipe: refused without --force, printed with it.
    let refused = plugin(&w, &["show-password", &name]).await;
    refused
        .exits(1)
        .warns("refusing to print a password to a non-terminal");
    assert!(refused.stdout.is_empty(), "{refused:?}");
    let shown = plugin(&w, &["show-password", &name, "--force"]).await;
    shown.exits(0);
    let password = shown.stdout.trim_end().to_string();
    assert_eq!(password.len(), 24);
    assert_eq!(password, w.output_password(NS, &name, "vm-a").await);
    assert!(
        qga.password_matches("alice", &password).expect("shadow"),
        "the guest has the shown password"
    );

    // On a terminal (script(1) gives it a pty): printed without --force.
    let kubeconfig = w.kubeconfig().to_path_buf();
    let cmdline = format!(
        "{} --kubeconfig {} show-password {name}",
        plugin_path().display(),
        kubeconfig.display()
    );
    let tty = tokio::task::spawn_blocking(move || {
        Command::new("script")
            .args(["-qfec", &cmdline, "/dev/null"])
            .stdin(Stdio::null())
            .output()
            .expect("script(1)")
    })
    .await
    .expect("thread");
    let text = String::from_utf8_lossy(&tty.stdout);
    assert!(tty.status.success(), "{text}");
    assert!(text.contains(&password), "printed to a terminal: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_sets_a_new_generated_password_and_waits_for_it() {
    let (w, qga) = served_with_guest(false, "vm-r").await;
    let out = plugin(&w, &generate(&["vm-r"], "alice", &[])).await;
    out.exits(0);
    let name = created_name(&out);
    let first = w.output_password(NS, &name, "vm-r").await;

    let rotated = plugin(&w, &["rotate", &name]).await;
    rotated.exits(0);
    assert_plain(&rotated);
    rotated.warns("rotation requested (guestcred.io/rotate-now=");
    // The new run is followed to its end.
    rotated.prints(&format!("gpr/{name}: Succeeded (1/1 VMs)"));
    // The target's outputSecret names the new run's Secret; the first one is kept too.
    let r: GuestPasswordReset = w.get(NS, &name).await;
    let current = r.status.expect("status").run.targets[0]
        .output_secret
        .clone()
        .expect("outputSecret");
    let secrets = w
        .output_secrets(NS, &format!("guestcred.io/reset={name}"))
        .await;
    assert_eq!(secrets.len(), 2, "the first Secret and the rotation's");
    let second = secrets
        .iter()
        .find(|s| s.name == current)
        .map(|s| s.password.clone())
        .expect("the current Secret");
    assert_ne!(second, first, "a new password");
    assert!(
        qga.password_matches("alice", &second).expect("shadow"),
        "the guest holds the new password"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotate_refuses_a_reset_whose_password_comes_from_a_secret() {
    let w = served(false).await;
    w.apply(&secret("fixed-pw", "password", b"Fixed-Password-123"))
        .await
        .expect("secret");
    w.apply(
        &GuestPasswordReset::test("fixed")
            .vm("vm-x")
            .from_secret("fixed-pw"),
    )
    .await
    .expect("reset");
    let out = plugin(&w, &["rotate", "fixed", "--no-wait"]).await;
    out.exits(1)
        .warns("fixed does not generate passwords (its password comes from a Secret");
    let r: GuestPasswordReset = w.get(NS, "fixed").await;
    assert!(
        !r.annotations().contains_key("guestcred.io/rotate-now"),
        "nothing was changed"
    );
}

/// An age identity file as `age-keygen -o FILE` writes it, in the world's directory.
fn identity_file(w: &World, name: &str, id: &age::x25519::Identity) -> PathBuf {
    use age::secrecy::ExposeSecret;
    let path = w.temp_dir().join(name);
    let text = format!(
        "# created: 2026-12-01T00:00:00Z\n# public key: {}\n{}\n",
        id.to_public(),
        id.to_string().expose_secret()
    );
    std::fs::write(&path, text).expect("identity file");
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sealed_password_is_shown_only_with_the_matching_identity() {
    let (w, qga) = served_with_guest(false, "vm-a").await;
    let id = age::x25519::Identity::generate();
    let recipient = id.to_public().to_string();
    let out = plugin(
        &w,
        &generate(&["vm-a"], "alice", &["--seal-to", &recipient]),
    )
    .await;
    out.exits(0);
    let name = created_name(&out);
    out.warns(&format!(
        "kubectl guestcred show-password {name} --identity KEYFILE"
    ));
    // Without an identity: told why and how, nothing printed.
    let refused = plugin(&w, &["show-password", &name, "--force"]).await;
    refused.exits(1).warns("is sealed").warns("--identity FILE");
    assert!(refused.stdout.is_empty(), "{refused:?}");
    // Another identity: it does not match.
    let other = identity_file(&w, "other.txt", &age::x25519::Identity::generate());
    let other = other.to_string_lossy();
    let wrong = plugin(
        &w,
        &["show-password", &name, "--force", "--identity", &other],
    )
    .await;
    wrong.exits(1).warns("does not match");
    assert!(wrong.stdout.is_empty(), "{wrong:?}");
    // The matching identity: decrypted here, exactly what the guest holds.
    let mine = identity_file(&w, "key.txt", &id);
    let shown = plugin(
        &w,
        &[
            "show-password",
            &name,
            "--force",
            "-i",
            &mine.to_string_lossy(),
        ],
    )
    .await;
    shown.exits(0);
    let password = shown.stdout.trim_end().to_string();
    assert_eq!(password.len(), 24, "{shown:?}");
    assert!(
        qga.password_matches("alice", &password).expect("shadow"),
        "the guest has the decrypted password"
    );
    let stored = w
        .output_secrets(NS, &format!("guestcred.io/reset={name}"))
        .await;
    assert_eq!(stored.len(), 1);
    assert_not_leaked(&stored[0].stored, "the sealed Secret", &[&password]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_targets_exit_nonzero_with_their_reason() {
    let (w, _qga) = served_with_guest(false, "vm-a").await;
    // A user the guest does not have: the real agent refuses, the plugin exits 1.
    let out = plugin(&w, &generate(&["vm-a"], "mallory", &[])).await;
    out.exits(1)
        .warns("vm-a: UserNotFound")
        .prints("vm-a: Failed (UserNotFound)");
    // A VM that does not exist.
    let out = plugin(&w, &["set-password", "ghost", "--generate"]).await;
    out.exits(1).warns("ghost: VMNotFound");
    // A Secret that does not exist: the run stalls, the plugin says why and exits 1.
    let from_nope = ["set-password", "vm-a", "--from-secret", "nope/pw"];
    let out = plugin(&w, &[&from_nope[..], &["--timeout", "30s"]].concat()).await;
    out.exits(1).warns("is stalled: SecretNotFound");
    // --timeout passes first: exit 3, the run goes on.
    w.vm_without_agent(&vm(NS, "vm-b", "node-1")).await;
    let out = plugin(
        &w,
        &["set-password", "vm-b", "--generate", "--timeout", "2s"],
    )
    .await;
    out.exits(3).warns("timed out following");
    // Usage errors exit 2 before anything is created.
    let out = plugin(&w, &["set-password", "vm-a", "--generate", "--length", "8"]).await;
    out.exits(2);
    let out = plugin(&w, &["set-password", "vm-a"]).await;
    out.exits(2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stdin_password_is_in_no_argument_log_event_or_output() {
    const PW: &str = "Plugin-Stdin-Secret-4711";
    let (w, qga) = served_with_guest(true, "vm-a").await;
    let mut c = command(
        w.kubeconfig(),
        &["set-password", "vm-a", "--user", "alice", "--stdin"],
    );
    c.stdin(Stdio::piped());
    let (out, seen) = tokio::task::spawn_blocking(move || {
        let mut child = c.spawn().expect("spawn");
        let pid = child.id();
        let mut stdin = child.stdin.take().expect("stdin");
        // Every process's argv, scanned while the plugin runs (before, during and after
        // the value was written).
        let scan = || -> Vec<String> {
            let mut hits = Vec::new();
            for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
                if let Ok(raw) = std::fs::read(e.path().join("cmdline"))
                    && String::from_utf8_lossy(&raw).contains(PW)
                {
                    hits.push(e.file_name().to_string_lossy().into_owned());
                }
            }
            hits
        };
        let mut seen = scan();
        stdin
            .write_all(format!("{PW}\n").as_bytes())
            .expect("write");
        drop(stdin);
        let mut scans = 1;
        while std::fs::metadata(format!("/proc/{pid}")).is_ok_and(|_| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
        }) {
            seen.extend(scan());
            scans += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            scans > 3,
            "the scan ran while the plugin did ({scans} scans)"
        );
        (finish(child), seen)
    })
    .await
    .expect("thread");
    out.exits(0);
    assert!(
        seen.is_empty(),
        "the password was in the argv of processes {seen:?}"
    );
    assert!(!out.all().contains(PW), "the password was printed: {out:?}");
    assert!(
        qga.password_matches("alice", PW).expect("shadow"),
        "the guest has it"
    );
    let name = created_name(&out);
    // The reset was unpaused after its Secret was stored; the Secret is owned by the reset.
    let reset: GuestPasswordReset = w.get(NS, &name).await;
    assert!(!reset.spec.common.rollout.paused);
    let secret: k8s_openapi::api::core::v1::Secret = w.get(NS, &format!("{name}-input")).await;
    let owner = &secret.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("GuestPasswordReset", name.as_str())
    );
    assert_eq!(Some(owner.uid.clone()), reset.uid());
    w.assert_not_leaked(&[PW]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_dry_run_lists_targets_and_a_run_reports_each_vm() {
    let w = served_with(WorldOptions {
        nodes: 2,
        ..WorldOptions::default()
    })
    .await;
    let _db = labelled_guests(&w, ("tier", "db"), [("db-a", "node-1"), ("db-b", "node-2")]).await;
    // Labelled, but no agent answers: retried until its 10 s deadline.
    w.vm_without_agent(&vm(NS, "db-c", "node-2").label("tier", "db"))
        .await;
    let _web = labelled_guests(&w, ("tier", "web"), [("web-a", "node-1")]).await;
    let off = vm(NS, "db-off", "node-1").label("tier", "db");
    w.vm_without_agent(&off.phase("Succeeded")).await;

    let dry = plugin(
        &w,
        &["set-password", "-l", "tier=db", "--generate", "--dry-run"],
    )
    .await;
    dry.exits(0);
    let rows = dry_run_rows(&dry);
    let targeted: Vec<(&str, &str)> = rows
        .iter()
        .filter(|r| r.get(4) == Some(&"yes"))
        .map(|r| (r[0], r[1]))
        .collect();
    assert_eq!(
        targeted,
        [("db-a", "node-1"), ("db-b", "node-2"), ("db-c", "node-2")],
        "{dry:?}"
    );
    dry.prints("db-off")
        .prints("no (not running)")
        .prints("3 VM(s) would be targeted");
    assert!(!dry.stdout.contains("web-a"), "{dry:?}");
    let resets: Api<GuestPasswordReset> = Api::namespaced(w.client.clone(), NS);
    assert!(
        resets
            .list(&ListParams::default())
            .await
            .expect("list")
            .items
            .is_empty(),
        "dry run created nothing"
    );

    let rollout = [
        "--max-concurrency",
        "2",
        "--max-failures",
        "1",
        "--deadline",
        "10s",
    ];
    let out = plugin(&w, &generate(&["-l", "tier=db"], "alice", &rollout)).await;
    let name = out.created(1, "bulk-pw-");
    for v in ["db-a", "db-b"] {
        out.prints(&format!("{v}: Succeeded (Applied)"));
    }
    out.warns("PartiallySucceeded, 1 of 3 VMs failed")
        .warns("db-c: DeadlineExceeded");
    let r: GuestPasswordReset = w.get(NS, &name).await;
    let spec = r.spec.common.rollout;
    assert_eq!(
        (
            spec.max_concurrency,
            spec.max_failures,
            spec.deadline_seconds
        ),
        (2, 1, 10)
    );
    // show-password of a bulk reset needs --vm.
    let many = plugin(&w, &["show-password", &name, "--force"]).await;
    many.exits(2)
        .warns("choose one with --vm (db-a, db-b, db-c)");
    let one = plugin(&w, &["show-password", &name, "--vm", "db-b", "--force"]).await;
    assert_eq!(
        one.stdout.trim_end(),
        w.output_password(NS, &name, "db-b").await
    );
}

/// Text without ANSI escape sequences (CSI and two-byte escapes).
fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.next_if_eq(&'[').is_some() {
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            chars.next();
        }
    }
    out
}

/// The plugin on a pseudo-terminal: script(1) gives it one, forwards what is written to
/// its stdin as typed keys (Ctrl-C included) and copies the terminal's output.
struct Pty {
    child: std::process::Child,
    keys: std::process::ChildStdin,
    screen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Pty {
    fn start(cmdline: &str) -> Pty {
        let mut child = Command::new("script")
            .args(["-qfec", cmdline, "/dev/null"])
            .env("TERM", "xterm-256color")
            .env("COLUMNS", "150")
            .env_remove("NO_COLOR")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("script(1)");
        let keys = child.stdin.take().expect("stdin");
        let mut out = child.stdout.take().expect("stdout");
        let screen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut out, &mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().expect("screen").extend_from_slice(&buf[..n]);
            }
        });
        Pty {
            child,
            keys,
            screen,
        }
    }
    fn raw(&self) -> String {
        String::from_utf8_lossy(&self.screen.lock().expect("screen")).into_owned()
    }
    fn wait_for(&self, what: &str) {
        let start = Instant::now();
        while !strip_ansi(&self.raw()).contains(what) {
            assert!(
                start.elapsed() < WAIT,
                "waiting for {what:?}; terminal:\n{}",
                strip_ansi(&self.raw())
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    fn type_keys(&mut self, keys: &[u8]) {
        self.keys.write_all(keys).expect("keys");
        self.keys.flush().expect("flush");
    }
}

/// The plugin with `args` (and the world's kubeconfig) on a pseudo-terminal, driven by
/// `drive` and then left to exit: what the terminal showed (with its escape codes) and the
/// exit code.
async fn on_a_terminal(
    w: &World,
    args: &str,
    drive: impl FnOnce(&mut Pty) + Send + 'static,
) -> (String, Option<i32>) {
    let cmdline = format!(
        "{} --kubeconfig {} {args}",
        plugin_path().display(),
        w.kubeconfig().display()
    );
    tokio::task::spawn_blocking(move || {
        let mut pty = Pty::start(&cmdline);
        drive(&mut pty);
        let status = pty.child.wait().expect("script exits");
        std::thread::sleep(Duration::from_millis(200));
        (pty.raw(), status.code())
    })
    .await
    .expect("pty steps")
}

/// A terminal's text (escape codes stripped) shows the live bar at `done` ("1/2 VMs"):
/// done/total, failures and the ETA.
fn assert_live_bar(text: &str, done: &str) {
    assert!(
        text.contains(done) && text.contains("0 failed") && text.contains("ETA"),
        "{text}"
    );
}

/// A terminal's raw output has text in ANSI colour `colour` (1 red, 2 green), as a basic
/// or a 256-colour escape.
fn assert_coloured(raw: &str, colour: u8) {
    assert!(
        raw.contains(&format!("\u{1b}[3{colour}m"))
            || raw.contains(&format!("\u{1b}[38;5;{colour}m")),
        "colour {colour} on a terminal: {raw:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_shows_live_progress_and_ctrl_c_pauses_the_run() {
    let w = served(false).await;
    let _a = labelled_guests(&w, ("tier", "t"), [("fast", "node-1")]).await;
    // No agent: retried until the 5 min deadline, so the run stays at 1/2.
    w.vm_without_agent(&vm(NS, "stuck", "node-1").label("tier", "t"))
        .await;
    let args = "set-password -l tier=t --user alice --generate";
    let (raw, code) = on_a_terminal(&w, args, |pty| {
        pty.wait_for("1/2 VMs");
        // The rate.
        pty.wait_for("/s");
        pty.type_keys(b"\x03");
        pty.wait_for("Pause gpr/");
        pty.type_keys(b"y\n");
    })
    .await;
    let text = strip_ansi(&raw);
    // The live bar: done/total, failures, rate, ETA; the finished VM's line above it.
    assert_live_bar(&text, "1/2 VMs");
    assert!(
        text.contains("✔ fast Succeeded Applied on node-1"),
        "{text}"
    );
    assert_coloured(&raw, 2);
    assert!(
        text.contains("paused; resume with: kubectl patch gpr"),
        "{text}"
    );
    assert_eq!(code, Some(130), "{text}");
    let list: Api<GuestPasswordReset> = Api::namespaced(w.client.clone(), NS);
    let r = list.list(&ListParams::default()).await.expect("list").items;
    assert_eq!(r.len(), 1);
    assert!(r[0].spec.common.rollout.paused, "y paused the run");
    assert_eq!(vms_in_state(&r[0], TargetState::Succeeded), ["fast"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_key_is_verified_in_the_guest_and_shown_by_status() {
    let (w, qga) = served_with_guest(false, "vm-a").await;
    let dir = tempfile::tempdir().expect("dir");
    let keyfile = dir.path().join("key.pub");
    std::fs::write(&keyfile, format!("# my laptop\n{KEY1}\n")).expect("key file");
    let kf = keyfile.display().to_string();
    let out = plugin(&w, &add_key(&["vm-a"], &kf, &["--ttl", "1h"])).await;
    let name = out.created(0, "vm-a-key-");
    out.prints("vm-a: 1 key(s) verified in the guest (Live), removed again at");
    assert_eq!(keys_of(&qga, "alice"), ["key1@test"]);
    let k: KeypairRebuild = w.get(NS, &name).await;
    assert_eq!(k.spec.ttl_seconds, Some(3600));
    let fp = &k.status.expect("status").run.targets[0].keys[0];
    out.prints(&format!("key {fp}"));
    let status = plugin(&w, &["status"]).await;
    let header = status
        .stdout
        .lines()
        .find(|l| l.starts_with("REBUILD"))
        .expect("rebuild table")
        .to_string();
    for col in ["MODE", "KEYS", "EXPIRES"] {
        assert!(header.contains(col), "{status:?}");
    }
    let row = status
        .stdout
        .lines()
        .find(|l| l.starts_with(&name))
        .expect("row");
    assert!(
        row.contains("Succeeded")
            && row.contains("Verified")
            && row.contains("Live")
            && row.contains(fp.as_str()),
        "{row}"
    );
    // A bad key file is refused before anything is created, naming the line.
    std::fs::write(&keyfile, "ssh-ed25519 AAAA broken\n").expect("bad key");
    let bad = plugin(&w, &add_key(&["vm-a"], &kf, &[])).await;
    bad.exits(2).warns("line 1 is not an OpenSSH public key");
    // A user the guest does not have: exit 1 with the reason.
    std::fs::write(&keyfile, KEY1).expect("key");
    let fail = plugin(&w, &["add-key", "vm-a", "--user", "mallory", "-f", &kf]).await;
    fail.exits(1).warns("vm-a: UserNotFound");
}

fn fingerprint(key: &str) -> String {
    guestcred::api::authorized_keys::fingerprint(key).expect("a valid test key")
}

/// `list-keys` as a table: (fingerprint, type, comment, managed, expires) per row.
fn key_rows(out: &Out) -> Vec<[String; 5]> {
    let mut lines = out.stdout.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        ["FINGERPRINT", "TYPE", "COMMENT", "MANAGED", "EXPIRES"],
        "{out:?}"
    );
    lines
        .map(|l| {
            let c: Vec<String> = l.split_whitespace().map(str::to_string).collect();
            assert_eq!(c.len(), 5, "one word per column: {l:?}");
            [
                c[0].clone(),
                c[1].clone(),
                c[2].clone(),
                c[3].clone(),
                c[4].clone(),
            ]
        })
        .collect()
}

/// Every KeypairRebuild in the namespace, by name.
async fn rebuild_names(w: &World) -> Vec<String> {
    let api: Api<KeypairRebuild> = Api::namespaced(w.client.clone(), NS);
    sorted_names(&api, &ListParams::default()).await
}

/// A served world with VM vm-a whose user alice already has a key she added by hand, and a
/// key file with KEY1.
async fn world_with_a_hand_added_key() -> (World, HostQga, KeyFile) {
    let (w, qga) = served_with_guest(false, "vm-a").await;
    qga.seed_authorized_keys("alice", &[HAND])
        .expect("hand key");
    (w, qga, KeyFile::key1())
}

/// A key file with KEY1 (in a directory of its own, gone with it).
struct KeyFile {
    _dir: tempfile::TempDir,
    path: String,
}

impl KeyFile {
    fn key1() -> KeyFile {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("key1.pub");
        std::fs::write(&path, format!("{KEY1}\n")).expect("key file");
        KeyFile {
            path: path.display().to_string(),
            _dir: dir,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_keys_shows_hand_added_keys_unmanaged_and_guestcred_keys_managed_with_their_expiry() {
    let (w, qga, kf) = world_with_a_hand_added_key().await;
    let added = plugin(&w, &add_key(&["vm-a"], &kf.path, &["--ttl", "1h"])).await;
    added.exits(0);
    let grant = created_name(&added);
    let k: KeypairRebuild = w.get(NS, &grant).await;
    let expires = k.status.expect("status").run.targets[0]
        .expires_at
        .clone()
        .expect("a TTL grant has expiresAt");
    let before = qga.authorized_keys("alice").expect("keys");

    let out = plugin(&w, &["list-keys", "vm-a", "--user", "alice"]).await;
    out.exits(0);
    assert_plain(&out);
    let mut rows = key_rows(&out);
    rows.sort_by(|a, b| a[2].cmp(&b[2]));
    assert_eq!(
        rows,
        [
            [
                fingerprint(HAND),
                "ssh-ed25519".into(),
                "hand@added".into(),
                "no".into(),
                "-".into()
            ],
            [
                fingerprint(KEY1),
                "ssh-ed25519".into(),
                "key1@test".into(),
                "yes".into(),
                expires.0.to_string()
            ],
        ],
        "{out:?}"
    );
    // Read-only: the guest is as it was, and the Inspect object is gone again.
    assert_eq!(qga.authorized_keys("alice").expect("keys"), before);
    let start = Instant::now();
    while rebuild_names(&w).await != [grant.clone()] {
        assert!(start.elapsed() < WAIT, "{:?}", rebuild_names(&w).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The same as JSON: the report in status, with the VM and user.
    let json = plugin(&w, &["list-keys", "vm-a", "--user", "alice", "-o", "json"]).await;
    json.exits(0);
    let v: serde_json::Value = serde_json::from_str(&json.stdout).expect("json");
    assert_eq!(
        (v["vm"].as_str(), v["user"].as_str()),
        (Some("vm-a"), Some("alice"))
    );
    assert_eq!(
        (v["total"].as_u64(), v["notShown"].as_u64()),
        (Some(2), Some(0))
    );
    let key = |fp: String| {
        v["keys"]
            .as_array()
            .and_then(|keys| keys.iter().find(|k| k["fingerprint"] == fp.as_str()))
            .cloned()
            .unwrap_or_else(|| panic!("{fp} listed: {v}"))
    };
    let (hand, granted) = (key(fingerprint(HAND)), key(fingerprint(KEY1)));
    assert_eq!(
        (&hand["managed"], &hand["comment"]),
        (&false.into(), &"hand@added".into())
    );
    assert!(hand.get("expiresAt").is_none(), "{v}");
    assert_eq!(granted["managed"], true);
    assert_eq!(granted["expiresAt"], expires.0.to_string().as_str());

    // A user the guest does not have: exit 1 with the reason.
    let out = plugin(&w, &["list-keys", "vm-a", "--user", "mallory"]).await;
    out.exits(1).warns("UserNotFound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_key_removes_exactly_the_named_fingerprint_and_the_read_back_confirms() {
    let (w, qga, kf) = world_with_a_hand_added_key().await;
    qga.seed_authorized_keys("alice", &[HAND, KEY2])
        .expect("two hand keys");
    let added = plugin(&w, &add_key(&["vm-a"], &kf.path, &[])).await;
    added.exits(0);
    assert_eq!(
        keys_of(&qga, "alice"),
        ["hand@added", "key1@test", "key2@test"]
    );

    // A key added by hand: named explicitly, so it goes; the others stay.
    let hand = fingerprint(HAND);
    let out = plugin(&w, &remove_key(&["vm-a"], &[&hand], &[])).await;
    out.created(0, "vm-a-rmkey-");
    out.prints(&format!(
        "vm-a: removed 1 key(s) from user alice and verified they are gone: {hand} (not added by guestcred)"
    ))
    .prints("vm-a: Succeeded (Removed) on node-1");
    assert_eq!(keys_of(&qga, "alice"), ["key1@test", "key2@test"]);

    // A key guestcred added: removed too, and guestcred no longer counts it as its own.
    let key1 = fingerprint(KEY1);
    let out = plugin(&w, &remove_key(&["vm-a"], &[&key1], &[])).await;
    out.exits(0).prints("(added by guestcred)");
    // The add-key object still grants it: the message says its next run puts it back.
    let grant = created_name(&added);
    out.prints(&format!("warning: KeypairRebuild {grant} still grants it"));
    assert_eq!(keys_of(&qga, "alice"), ["key2@test"]);
    let vm: guestcred::api::kubevirt::VirtualMachine = w.get(NS, "vm-a").await;
    let record = vm
        .annotations()
        .get("keys.guestcred.io/alice")
        .cloned()
        .unwrap_or_default();
    assert!(!record.contains(&key1), "released: {record:?}");

    // The read-back through the plugin agrees.
    let out = plugin(&w, &["list-keys", "vm-a", "--user", "alice"]).await;
    out.exits(0);
    let rows = key_rows(&out);
    assert_eq!(rows.len(), 1, "{out:?}");
    assert_eq!(rows[0][0], fingerprint(KEY2));
    assert_eq!(rows[0][3], "no");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_key_of_an_unknown_fingerprint_fails_with_key_not_found_and_changes_nothing() {
    let (w, qga, _kf) = world_with_a_hand_added_key().await;
    let before = qga.authorized_keys("alice").expect("keys");
    let unknown = fingerprint(KEY3);
    let out = plugin(&w, &remove_key(&["vm-a"], &[&unknown], &[])).await;
    out.exits(1)
        .warns(&format!(
            "vm-a: KeyNotFound user alice in vm-a has no key {unknown}"
        ))
        .warns("nothing was removed")
        .prints("vm-a: Failed (KeyNotFound)");
    assert_eq!(qga.authorized_keys("alice").expect("keys"), before);
    // One known and one unknown: still nothing removed.
    let hand = fingerprint(HAND);
    let out = plugin(&w, &remove_key(&["vm-a"], &[&hand, &unknown], &[])).await;
    out.exits(1).warns("KeyNotFound");
    assert_eq!(qga.authorized_keys("alice").expect("keys"), before);
    // Not a fingerprint at all: a usage error before anything is created.
    let rebuilds = rebuild_names(&w).await;
    let out = plugin(&w, &remove_key(&["vm-a"], &["SHA256:abc"], &[])).await;
    out.exits(2).warns("is not a SHA256 fingerprint");
    assert_eq!(rebuild_names(&w).await, rebuilds);
}

/// A served world on two nodes with VMs web-a (node-1) and web-b (node-2) labelled
/// tier=web and db-a (node-1) labelled tier=db, each with a real guest whose user alice has
/// the key HAND she added herself; and a key file with KEY1.
async fn web_and_db_guests() -> (World, [HostQga; 3], KeyFile) {
    let w = served_with(WorldOptions {
        nodes: 2,
        ..WorldOptions::default()
    })
    .await;
    let [web_a, web_b] = labelled_guests(
        &w,
        ("tier", "web"),
        [("web-a", "node-1"), ("web-b", "node-2")],
    )
    .await;
    let [db_a] = labelled_guests(&w, ("tier", "db"), [("db-a", "node-1")]).await;
    for qga in [&web_a, &web_b, &db_a] {
        qga.seed_authorized_keys("alice", &[HAND])
            .expect("hand key");
    }
    (w, [web_a, web_b, db_a], KeyFile::key1())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_key_with_a_selector_adds_the_key_to_every_matching_guest() {
    let (w, [web_a, web_b, db_a], kf) = web_and_db_guests().await;
    let rollout = ["--max-concurrency", "1", "--max-failures", "1"];
    let out = plugin(&w, &add_key(&["-l", "tier=web"], &kf.path, &rollout)).await;
    let name = out.created(0, "bulk-key-");
    for (v, node) in [("web-a", "node-1"), ("web-b", "node-2")] {
        out.prints(&format!("{v}: 1 key(s) verified in the guest (Live)"))
            .prints(&format!("{v}: Succeeded (Verified) on {node}"));
    }
    out.prints(&format!("kpr/{name}: Succeeded (2/2 VMs)"));
    // The guests' own files: the key beside the hand-added one; db-a untouched.
    for qga in [&web_a, &web_b] {
        assert_eq!(keys_of(qga, "alice"), ["hand@added", "key1@test"]);
    }
    assert_eq!(keys_of(&db_a, "alice"), ["hand@added"]);
    // The object is the selector form, with the rollout settings given.
    let k: KeypairRebuild = w.get(NS, &name).await;
    let common = &k.spec.common;
    assert_eq!(common.target.vm_name, None);
    assert_eq!(
        common
            .target
            .selector
            .as_ref()
            .and_then(|s| s.match_labels.as_ref())
            .map(|l| l["tier"].as_str()),
        Some("web")
    );
    assert_eq!(
        (common.rollout.max_concurrency, common.rollout.max_failures),
        (1, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remove_key_with_a_selector_removes_the_key_from_every_matching_guest() {
    let (w, [web_a, web_b, db_a], _dir) = web_and_db_guests().await;
    for qga in [&web_a, &web_b, &db_a] {
        qga.seed_authorized_keys("alice", &[HAND, KEY2])
            .expect("two hand keys");
    }
    let hand = fingerprint(HAND);
    let by_tier = ["-l", "tier=web"];
    let out = plugin(
        &w,
        &remove_key(&by_tier, &[&hand], &["--max-concurrency", "1"]),
    )
    .await;
    let name = out.created(0, "bulk-rmkey-");
    for v in ["web-a", "web-b"] {
        out.prints(&format!(
            "{v}: removed 1 key(s) from user alice and verified they are gone: {hand}"
        ))
        .prints(&format!("{v}: Succeeded (Removed)"));
    }
    // Read back from the guests: only the named key went, and only where selected.
    for qga in [&web_a, &web_b] {
        assert_eq!(keys_of(qga, "alice"), ["key2@test"]);
    }
    assert_eq!(keys_of(&db_a, "alice"), ["hand@added", "key2@test"]);
    let k: KeypairRebuild = w.get(NS, &name).await;
    assert!(k.spec.common.target.selector.is_some(), "{:?}", k.spec);
    assert_eq!(k.spec.remove_fingerprints, [hand]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_key_dry_run_lists_the_selected_vms_and_their_nodes_and_creates_nothing() {
    let (w, [web_a, web_b, _db_a], kf) = web_and_db_guests().await;
    let off = vm(NS, "web-off", "node-2").label("tier", "web");
    w.vm_without_agent(&off.phase("Succeeded")).await;
    let dry = plugin(&w, &add_key(&["-l", "tier=web"], &kf.path, &["--dry-run"])).await;
    dry.exits(0);
    assert_plain(&dry);
    let rows = dry_run_rows(&dry);
    let listed: Vec<(&str, &str, &str)> = rows
        .iter()
        .take_while(|r| r.len() >= 5 && r[1].starts_with("node-"))
        .map(|r| (r[0], r[1], r[4]))
        .collect();
    assert_eq!(
        listed,
        [
            ("web-a", "node-1", "yes"),
            ("web-b", "node-2", "yes"),
            ("web-off", "node-2", "no")
        ],
        "{dry:?}"
    );
    assert!(!dry.stdout.contains("db-a"), "{dry:?}");
    dry.prints("2 VM(s) would be targeted");
    assert!(
        rebuild_names(&w).await.is_empty(),
        "a dry run creates no KeypairRebuild"
    );
    for qga in [&web_a, &web_b] {
        assert_eq!(
            keys_of(qga, "alice"),
            ["hand@added"],
            "a dry run changes no guest"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminal_shows_live_progress_of_remove_key_and_a_pipe_gets_plain_lines() {
    let (w, [web_a, web_b, _db_a], _kf) = web_and_db_guests().await;
    // No agent: retried until its 10 s deadline, so the run stays at 2/3 until then.
    w.vm_without_agent(&vm(NS, "web-stuck", "node-2").label("tier", "web"))
        .await;
    let hand = fingerprint(HAND);
    let args = format!("remove-key -l tier=web --user alice --fingerprint {hand} --deadline 10s");
    let (raw, code) = on_a_terminal(&w, &args, |pty| pty.wait_for("2/3 VMs")).await;
    let text = strip_ansi(&raw);
    // The live bar (done/total, failures, ETA), each VM's line above it, in colour.
    assert_live_bar(&text, "2/3 VMs");
    for (v, node) in [("web-a", "node-1"), ("web-b", "node-2")] {
        assert!(
            text.contains(&format!("✔ {v} Succeeded Removed on {node}")),
            "{text}"
        );
    }
    assert!(
        text.contains("✘ web-stuck Failed DeadlineExceeded on node-2"),
        "{text}"
    );
    assert_coloured(&raw, 2);
    assert_coloured(&raw, 1);
    assert!(
        text.contains("PartiallySucceeded, 1 of 3 VMs failed"),
        "{text}"
    );
    assert_eq!(code, Some(1), "{text}");
    for qga in [&web_a, &web_b] {
        assert!(keys_of(qga, "alice").is_empty(), "removed in the guest");
    }

    // The same command into a pipe: plain progress lines, no escape codes.
    web_a
        .seed_authorized_keys("alice", &[HAND])
        .expect("hand key again");
    let out = plugin(&w, &remove_key(&["web-a"], &[&hand], &[])).await;
    let name = out.created(0, "");
    out.warns(&format!("kpr/{name}: Succeeded, 1/1 done, 0 failed"))
        .prints("web-a: Succeeded (Removed) on node-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_completes_vm_names_for_remove_key_and_list_keys() {
    let w = vms_in_two_namespaces().await;
    let got = completions(
        &w,
        &[
            &["remove-key", ""],
            &["list-keys", ""],
            &["remove-key", "w"],
            &["list-keys", "-n", "team-a", ""],
            &["remove-key", "db-0", "--fi"],
            &["remove-key", "--max-"],
            &["list-keys", "db-0", ""],
            &["remove-key", "-l", "tier=web", ""],
        ],
    )
    .await;
    assert_eq!(got[0], ["db-0", "web-0"]);
    assert_eq!(got[1], ["db-0", "web-0"]);
    assert_eq!(got[2], ["web-0"]);
    assert_eq!(got[3], ["other-0"]);
    assert_eq!(got[4], ["--fingerprint"]);
    assert_eq!(got[5], ["--max-concurrency", "--max-failures"]);
    assert!(got[6].is_empty(), "one VM only: {:?}", got[6]);
    assert!(got[7].is_empty(), "a selector, not a VM: {:?}", got[7]);
}

#[test]
fn help_reads_like_kubectl() {
    let nowhere = Path::new("/nonexistent/kubeconfig");
    for sub in [
        "set-password",
        "status",
        "show-password",
        "add-key",
        "remove-key",
        "list-keys",
        "completion",
    ] {
        let out = finish(command(nowhere, &[sub, "--help"]).spawn().expect("spawn"));
        out.exits(0);
        let ex = out
            .stdout
            .find("\nExamples:\n  ")
            .unwrap_or_else(|| panic!("{sub}: {out:?}"));
        let opts = out.stdout.find("\nOptions:\n").expect("options");
        let usage = out
            .stdout
            .find(&format!("\nUsage:\n  kubectl guestcred {sub}"))
            .expect("usage");
        assert!(ex < opts && opts < usage, "{sub}: kubectl's order: {out:?}");
        assert!(out.stdout.contains("Global Options:\n"), "{out:?}");
        assert!(!out.stdout.contains("not supported"), "{sub}: {out:?}");
        // The bulk forms, where a run may target many VMs; list-keys says why it cannot.
        let bulk = [
            "-l, --selector <SELECTOR>",
            "--dry-run",
            "--max-concurrency <N>",
            "--max-failures <N>",
        ];
        if ["set-password", "add-key", "remove-key"].contains(&sub) {
            for flag in bulk {
                assert!(out.stdout.contains(flag), "{sub} has {flag}: {out:?}");
            }
            assert!(
                out.stdout.contains(&format!("kubectl guestcred {sub} -l ")),
                "{sub} has a selector example: {out:?}"
            );
        }
        if sub == "list-keys" {
            assert!(!out.stdout.contains("--selector"), "{out:?}");
            assert!(
                out.stdout
                    .contains("mode Inspect takes a VM name only (no -l SELECTOR)"),
                "{out:?}"
            );
        }
    }
}

/// An API server that refuses every request with 403, as a real one does for a user
/// without RBAC, and a kubeconfig for it (in the returned directory).
async fn forbidding_api_server() -> (tempfile::TempDir, PathBuf) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let app = axum::Router::new().fallback(|req: axum::extract::Request| async move {
        let body = serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("forbidden: User \"bob\" cannot {} {}", req.method(), req.uri().path()),
            "reason": "Forbidden", "code": 403,
        });
        (axum::http::StatusCode::FORBIDDEN, axum::Json(body))
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    let dir = tempfile::tempdir().expect("dir");
    let kubeconfig = dir.path().join("kubeconfig");
    guestcred_lab::apiserver::write_kubeconfig(&kubeconfig, &url).expect("kubeconfig");
    (dir, kubeconfig)
}

/// The plugin with `--kubeconfig kubeconfig` (and KUBECONFIG pointing nowhere).
async fn plugin_with_kubeconfig_flag(kubeconfig: &Path, args: &[&str]) -> Out {
    let mut c = command(Path::new("/nonexistent"), args);
    c.arg("--kubeconfig").arg(kubeconfig);
    tokio::task::spawn_blocking(move || finish(c.spawn().expect("spawn")))
        .await
        .expect("plugin thread")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_requests_name_the_missing_permission() {
    let (_dir, kubeconfig) = forbidding_api_server().await;
    let out = plugin_with_kubeconfig_flag(
        &kubeconfig,
        &["set-password", "vm-a", "--generate", "-n", "team-a"],
    )
    .await;
    out.exits(1).warns("permission denied: you need RBAC permission to create guestpasswordresets.guestcred.io in namespace \"team-a\" (the guestcred-editor role grants it");
    let out = plugin_with_kubeconfig_flag(&kubeconfig, &["status"]).await;
    out.warns("to list guestpasswordresets.guestcred.io in namespace \"default\"");
    let out = plugin_with_kubeconfig_flag(
        &kubeconfig,
        &["set-password", "-l", "tier=db", "--generate", "--dry-run"],
    )
    .await;
    out.warns("to list virtualmachineinstances.kubevirt.io");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_key_commands_name_the_missing_permission() {
    let (_dir, kubeconfig) = forbidding_api_server().await;
    let hand = fingerprint(HAND);
    let editor = "(the guestcred-editor role grants it";
    let team_a = ["-n", "team-a"];
    for args in [
        remove_key(&["vm-a"], &[&hand], &team_a),
        remove_key(&["-l", "tier=web"], &[&hand], &team_a),
        vec!["list-keys", "vm-a", "--user", "alice", "-n", "team-a"],
    ] {
        let out = plugin_with_kubeconfig_flag(&kubeconfig, &args).await;
        out.exits(1)
            .warns(&format!("permission denied: you need RBAC permission to create keypairrebuilds.guestcred.io in namespace \"team-a\" {editor}"))
            .warns("forbidden: User \"bob\"");
    }
    // The dry run only reads: it names the list of VMs it was refused.
    let dry = remove_key(&["-l", "tier=web"], &[&hand], &["--dry-run"]);
    let out = plugin_with_kubeconfig_flag(&kubeconfig, &dry).await;
    out.exits(1).warns("permission denied: you need RBAC permission to list virtualmachineinstances.kubevirt.io in namespace \"default\"");
}

#[test]
fn completion_scripts_for_each_shell() {
    let nowhere = Path::new("/nonexistent/kubeconfig");
    for (shell, marker) in [
        ("bash", "-o default kubectl-guestcred"),
        ("zsh", "#compdef kubectl-guestcred"),
        ("fish", "complete -c kubectl-guestcred"),
    ] {
        let out = finish(
            command(nowhere, &["completion", shell])
                .spawn()
                .expect("spawn"),
        );
        out.exits(0);
        assert!(out.stdout.contains(marker), "{shell}: {}", out.stdout);
        for sub in ["set-password", "show-password", "add-key"] {
            assert!(out.stdout.contains(sub), "{shell} completes {sub}");
        }
        assert!(
            out.stdout.contains("max-concurrency"),
            "{shell} completes flags"
        );
        // The script parses in its shell, where that shell is installed (bash always is).
        let installed = Command::new("sh")
            .args(["-c", &format!("command -v {shell}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if installed || shell == "bash" {
            let mut check = Command::new(shell)
                .arg("-n")
                .stdin(Stdio::piped())
                .spawn()
                .expect("shell");
            check
                .stdin
                .take()
                .expect("stdin")
                .write_all(out.stdout.as_bytes())
                .expect("write");
            assert!(
                check.wait().expect("shell").success(),
                "{shell} -n accepts the script"
            );
        }
    }
}

/// A served world with namespace team-a besides the default one, and VMs without agents:
/// db-0 and web-0 in the default namespace, other-0 in team-a.
async fn vms_in_two_namespaces() -> World {
    let w = served_with(WorldOptions {
        namespaces: vec!["team-a".into()],
        ..WorldOptions::default()
    })
    .await;
    for (ns, name) in [(NS, "db-0"), (NS, "web-0"), ("team-a", "other-0")] {
        w.vm_without_agent(&vm(ns, name, "node-1")).await;
    }
    w
}

/// What kubectl offers for each of `cases` ([`kubectl_complete`] with the world's
/// kubeconfig), in order.
async fn completions(w: &World, cases: &[&[&str]]) -> Vec<Vec<String>> {
    let kubeconfig = w.kubeconfig().to_path_buf();
    let cases: Vec<Vec<String>> = cases
        .iter()
        .map(|words| words.iter().map(|s| s.to_string()).collect())
        .collect();
    tokio::task::spawn_blocking(move || {
        cases
            .iter()
            .map(|words| {
                let words: Vec<&str> = words.iter().map(String::as_str).collect();
                kubectl_complete(&kubeconfig, &words)
            })
            .collect()
    })
    .await
    .expect("kubectl")
}

/// What kubectl's hidden __complete command (which every shell's kubectl completion calls)
/// offers for `kubectl guestcred <words…>`: kubectl runs kubectl_complete-guestcred from PATH.
fn kubectl_complete(kubeconfig: &Path, words: &[&str]) -> Vec<String> {
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("kubectl")
        .arg("__complete")
        .arg("guestcred")
        .args(words)
        .env("PATH", &path)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("kubectl");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with(':'))
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubectl_completes_namespaces_vms_and_resets_through_the_helper() {
    let w = vms_in_two_namespaces().await;
    w.apply(
        &GuestPasswordReset::test("db-0-pw-abcde")
            .vm("db-0")
            .generate(24),
    )
    .await
    .expect("reset");
    w.apply(
        &KeypairRebuild::test("db-0-key-fghij")
            .vm("db-0")
            .inline_keys([KEY1]),
    )
    .await
    .expect("rebuild");
    let got = completions(
        &w,
        &[
            &["set-"],
            &["set-password", ""],
            &["add-key", "w"],
            &["-n", "team-a", "set-password", ""],
            &["set-password", "-n", ""],
            &["status", ""],
            &["show-password", ""],
            &["add-key", "db-0", "--t"],
        ],
    )
    .await;
    assert_eq!(got[0], ["set-password"]);
    assert_eq!(got[1], ["db-0", "web-0"]);
    assert_eq!(got[2], ["web-0"]);
    assert_eq!(got[3], ["other-0"]);
    for ns in ["default", "team-a"] {
        assert!(got[4].contains(&ns.to_string()), "{:?}", got[4]);
    }
    assert_eq!(got[5], ["db-0-key-fghij", "db-0-pw-abcde"]);
    assert_eq!(got[6], ["db-0-pw-abcde"]);
    assert_eq!(got[7], ["--ttl", "--timeout"]);
}

#[test]
fn krew_manifest_passes_krews_validator_and_installs() {
    let script = repo_dir().join("kubectl-guestcred/krew/validate.sh");
    let out = Command::new("bash")
        .arg(&script)
        .arg(bin_dir())
        .output()
        .expect("validate.sh");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(text.contains("structural validation OK"), "{text}");
    assert!(
        text.contains("all 1 spec.platforms installed fine"),
        "{text}"
    );
}
