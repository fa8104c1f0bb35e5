//! One way to run the real `kubectl` against a lab: a kubeconfig, optionally a private
//! HOME and discovery cache, a time bound, and failure messages that show the command,
//! its stdout and its stderr.
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// What one kubectl run printed.
#[derive(Debug)]
pub struct KubectlOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl KubectlOutput {
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// stdout; fails the test with the command `args`, stderr and stdout if kubectl failed.
    fn stdout_of_success(self, args: &[&str]) -> String {
        assert!(
            self.success(),
            "kubectl {args:?} failed: {}\n{}",
            self.stderr,
            self.stdout
        );
        self.stdout
    }
}

#[derive(Clone, Debug)]
pub struct Kubectl {
    program: PathBuf,
    kubeconfig: PathBuf,
    /// HOME and `--cache-dir` below it, to keep kubectl's discovery cache private.
    home: Option<PathBuf>,
    timeout: Option<Duration>,
}

impl Kubectl {
    /// `kubectl` from PATH with `KUBECONFIG=kubeconfig`, no time bound.
    pub fn new(kubeconfig: impl Into<PathBuf>) -> Self {
        Self {
            program: PathBuf::from("kubectl"),
            kubeconfig: kubeconfig.into(),
            home: None,
            timeout: None,
        }
    }

    /// Another kubectl binary (e.g. the lab's pinned one).
    pub fn program(mut self, path: impl Into<PathBuf>) -> Self {
        self.program = path.into();
        self
    }

    /// HOME is `dir`, and the discovery cache is `dir/cache`: nothing shared between tests.
    pub fn private_home(mut self, dir: &Path) -> Self {
        self.home = Some(dir.to_path_buf());
        self
    }

    /// A run that takes longer than `limit` is killed and fails the test.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Runs kubectl to completion with `stdin` (if any) and returns what it printed.
    /// Panics when kubectl cannot run at all or outlives the time bound.
    pub fn output(&self, args: &[&str], stdin: Option<&str>) -> KubectlOutput {
        let mut cmd = Command::new(&self.program);
        cmd.env("KUBECONFIG", &self.kubeconfig).args(args);
        if let Some(home) = &self.home {
            cmd.env("HOME", home)
                .arg("--cache-dir")
                .arg(home.join("cache"));
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => panic!(
                    "{} is not on PATH: these tests run the real kubectl binary \
                     (scripts/install-deps.sh installs it)",
                    self.program.display()
                ),
                _ => panic!("cannot run kubectl: {e}"),
            });
        if let Some(mut pipe) = child.stdin.take() {
            pipe.write_all(stdin.unwrap_or_default().as_bytes())
                .expect("kubectl stdin");
        }
        let read = |mut r: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = r.read_to_end(&mut buf);
                String::from_utf8_lossy(&buf).into_owned()
            })
        };
        let stdout = read(Box::new(child.stdout.take().expect("stdout")));
        let stderr = read(Box::new(child.stderr.take().expect("stderr")));
        let start = Instant::now();
        let status = loop {
            if let Some(status) = child.try_wait().expect("kubectl runs") {
                break status;
            }
            if let Some(limit) = self.timeout
                && start.elapsed() > limit
            {
                let _ = child.kill();
                let _ = child.wait();
                panic!("kubectl {args:?} did not finish within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        KubectlOutput {
            status,
            stdout: stdout.join().expect("stdout reader"),
            stderr: stderr.join().expect("stderr reader"),
        }
    }

    /// stdout on success; on failure, stdout and stderr together.
    pub fn try_run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        let out = self.output(args, stdin);
        if out.success() {
            Ok(out.stdout)
        } else {
            Err(format!("{}{}", out.stdout, out.stderr))
        }
    }

    /// stdout; fails the test with the command, stderr and stdout if kubectl fails.
    pub fn run(&self, args: &[&str]) -> String {
        self.run_with_stdin(args, None)
    }

    pub fn run_with_stdin(&self, args: &[&str], stdin: Option<&str>) -> String {
        self.output(args, stdin).stdout_of_success(args)
    }

    /// `kubectl apply -f -` of `text` (YAML or JSON).
    pub fn apply(&self, text: &str) -> String {
        match self.try_run(&["apply", "-f", "-"], Some(text)) {
            Ok(out) => out,
            Err(e) => panic!("kubectl apply of {text} failed: {e}"),
        }
    }

    /// [`Kubectl::output`] on a blocking thread, for async tests that do other work while
    /// kubectl runs.
    pub async fn output_async(&self, args: &[&str]) -> KubectlOutput {
        let this = self.clone();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            this.output(&args, None)
        })
        .await
        .expect("kubectl thread")
    }

    /// [`Kubectl::run`] on a blocking thread.
    pub async fn run_async(&self, args: &[&str]) -> String {
        self.output_async(args).await.stdout_of_success(args)
    }
}
