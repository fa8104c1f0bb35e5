//! Controller replicas leader-elected on one Lease: `guestcred controller` processes
//! against a served [`World`] (its emulator's kubeconfig, its shims over mutual TLS), which
//! a test can freeze (SIGSTOP), thaw (SIGCONT) and kill as a node would, and in-process
//! replicas ([`InProcessReplicas`]) a test can crash.
//!
//! The world needs `serve: true` and the `mtls` of [`mtls_files`]; the binary is the test's
//! `env!("CARGO_BIN_EXE_guestcred")`.
use crate::cluster::tls::LabTls;
use crate::world::{World, WorldTls};
use guestcred::controller::leader::LeaseSettings;
use k8s_openapi::api::coordination::v1::Lease;
use kube::{Api, Client};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The Lease the replicas compete for.
pub const LEASE_NAME: &str = "guestcred-controller";
pub const LEASE_NAMESPACE: &str = "default";

/// Mints the lab's CA, shim and controller certificates under `dir` and returns them as
/// the world's mutual TLS (the shims allow the controller's certificate).
pub fn mtls_files(dir: &Path) -> anyhow::Result<WorldTls> {
    let tls = LabTls::new(dir);
    tls.mint()?;
    Ok(WorldTls {
        shim: tls.shim_server_files(),
        allowed_clients: vec![guestcred::tls::DEFAULT_ALLOWED_CLIENT.into()],
        controller: tls.controller_client_files(),
    })
}

/// One controller process; killed when dropped.
pub struct Replica {
    pub identity: String,
    child: Child,
    log: PathBuf,
}

impl Replica {
    /// Starts `guestcred controller` as replica `identity` on [`LEASE_NAME`], with a lease
    /// of `lease_seconds`, against `world` (served, with the mTLS of `tls`). Its log goes to
    /// `<world temp dir>/<identity>.log`.
    pub fn start(
        guestcred: &Path,
        world: &World,
        tls: &WorldTls,
        identity: &str,
        lease_seconds: u64,
    ) -> anyhow::Result<Replica> {
        let log = world.temp_dir().join(format!("{identity}.log"));
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let c = &tls.controller;
        let mut cmd = Command::new(guestcred);
        cmd.arg("controller")
            .args(["--shim-namespace", crate::world::SHIM_NAMESPACE])
            .arg("--shim-port")
            .arg(world.shim_port().to_string())
            .arg("--shim-ca-file")
            .arg(&c.ca)
            .args(["--shim-server-name", &c.server_name])
            .args(["--metrics-listen=", "--health-listen="])
            .args(["--leader-election=true", "--lease-name", LEASE_NAME])
            .args(["--lease-namespace", LEASE_NAMESPACE])
            .arg("--lease-duration-seconds")
            .arg(lease_seconds.to_string())
            .env("KUBECONFIG", world.kubeconfig())
            .env("POD_NAME", identity)
            .env("POD_NAMESPACE", LEASE_NAMESPACE)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if let (Some(cert), Some(key)) = (&c.cert, &c.key) {
            cmd.arg("--shim-client-cert-file")
                .arg(cert)
                .arg("--shim-client-key-file")
                .arg(key);
        }
        let child = cmd.spawn()?;
        Ok(Replica {
            identity: identity.into(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `sig` (`STOP`, `CONT`, `KILL`, ...).
    pub fn signal(&self, sig: &str) {
        crate::cluster::procs::signal(self.pid(), sig);
    }

    /// The exit status once the process has exited (`None` while it runs).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The replica's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        // A stopped process must be continued to die of anything but SIGKILL; SIGKILL
        // works either way.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The settings of replica `identity` on [`LEASE_NAME`]: a 3 s lease renewed every 2 s,
/// so a dead leader is replaced within seconds.
pub fn lease_settings(identity: &str) -> LeaseSettings {
    LeaseSettings {
        name: LEASE_NAME.into(),
        namespace: LEASE_NAMESPACE.into(),
        identity: identity.into(),
        duration_seconds: 3,
        grace_seconds: 1,
    }
}

/// The holder of [`LEASE_NAME`] (`None` when nobody holds it or it cannot be read).
pub async fn lease_holder(client: &Client) -> Option<String> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), LEASE_NAMESPACE);
    leases
        .get_opt(LEASE_NAME)
        .await
        .ok()
        .flatten()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

/// In-process replicas of a world's controller ([`World::spawn_replica`]) on
/// [`LEASE_NAME`], named `replica-1`, `replica-2`, ... in start order. Killing one aborts
/// it at once, as a crash would (it does not release the Lease). All are aborted on drop.
pub struct InProcessReplicas<'w> {
    world: &'w World,
    started: usize,
    running: Vec<(String, tokio::task::JoinHandle<()>)>,
}

impl<'w> InProcessReplicas<'w> {
    pub fn new(world: &'w World) -> Self {
        Self {
            world,
            started: 0,
            running: Vec::new(),
        }
    }

    /// Starts one more replica; returns its identity.
    pub fn start(&mut self) -> String {
        self.started += 1;
        let identity = format!("replica-{}", self.started);
        let task = self.world.spawn_replica(lease_settings(&identity));
        self.running.push((identity.clone(), task));
        identity
    }

    /// Starts replica `identity` again (killed before), as a pod restarted under its
    /// name: holding the Lease still, it leads again at once.
    pub fn restart(&mut self, identity: &str) {
        let task = self.world.spawn_replica(lease_settings(identity));
        self.running.push((identity.to_string(), task));
    }

    /// The replica holding the Lease, once one of the running ones does (`None` after
    /// `limit`).
    pub async fn leader(&self, limit: Duration) -> Option<String> {
        let start = Instant::now();
        loop {
            if let Some(h) = lease_holder(&self.world.client).await
                && self.running.iter().any(|(id, _)| *id == h)
            {
                return Some(h);
            }
            if start.elapsed() > limit {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Aborts replica `identity` (a crash: the Lease stays its until it expires).
    pub fn kill(&mut self, identity: &str) {
        self.running.retain(|(id, task)| {
            if id == identity {
                task.abort();
            }
            id != identity
        });
    }
}

impl Drop for InProcessReplicas<'_> {
    fn drop(&mut self) {
        for (_, task) in &self.running {
            task.abort();
        }
    }
}
