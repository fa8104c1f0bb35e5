//! `guestcred controller` replicas as real processes against a served [`World`] (its
//! emulator's kubeconfig, its shims over mutual TLS), leader-elected on one Lease, so a
//! test can freeze (SIGSTOP), thaw (SIGCONT) and kill a replica as a node would.
//!
//! The world needs `serve: true` and the `mtls` of [`mtls_files`]; the binary is the test's
//! `env!("CARGO_BIN_EXE_guestcred")`.
use crate::cluster::tls::LabTls;
use crate::world::{World, WorldTls};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

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
