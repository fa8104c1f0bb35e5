//! Node shim: a small authenticated HTTP API on each node that turns one request into
//! guest agent calls on one domain of that node.
//!
//! - [`server`]: routes (`/v1/password`, `/v1/ssh-keys`, `/v1/ssh-keys/get`, `/v1/probe`,
//!   `/healthz`, `/readyz`), [`auth`]: bearer-token check (mTLS comes later).
//! - [`agent::GuestAgent`]: the backend trait; [`libvirt`] and [`qga`] implement it.
//! - [`validate`]: the single input gate; [`errors`]: agent/libvirt error → wire reason.
//! - [`client::ShimClient`]: what the controller uses to call a shim.

pub mod agent;
pub mod auth;
pub mod client;
pub mod errors;
pub mod libvirt;
pub mod qga;
pub mod server;
pub mod validate;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};

pub use agent::GuestAgent;
pub use client::{ShimCallError, ShimClient};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// libvirt API (virt crate) on the node's libvirtd or per-launcher virtqemud.
    Libvirt,
    /// QGA JSON directly on a unix socket per VM.
    QgaSocket,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LocatorKind {
    /// One libvirt URI for the whole node; domain name from `--domain-template`.
    LibvirtUri,
    /// KubeVirt: one virtqemud socket per launcher pod under `--kubelet-pods-dir`.
    Kubevirt,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Command line (and `GUESTCRED_SHIM_*` environment) of the node shim.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "guestcred-shim",
    about = "guestcred node shim (guest agent bridge)"
)]
pub struct ShimArgs {
    /// Address to listen on.
    #[arg(long, env = "GUESTCRED_SHIM_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: String,
    /// Name of this node (for logs).
    #[arg(long, env = "GUESTCRED_SHIM_NODE_NAME", default_value = "")]
    pub node_name: String,
    #[arg(
        long,
        env = "GUESTCRED_SHIM_BACKEND",
        value_enum,
        default_value = "libvirt"
    )]
    pub backend: BackendKind,
    /// How the libvirt backend finds a domain.
    #[arg(
        long,
        env = "GUESTCRED_SHIM_LOCATOR",
        value_enum,
        default_value = "libvirt-uri"
    )]
    pub locator: LocatorKind,
    /// libvirt URI for the `libvirt-uri` locator.
    #[arg(
        long,
        env = "GUESTCRED_SHIM_LIBVIRT_URI",
        default_value = "qemu:///system"
    )]
    pub libvirt_uri: String,
    /// Domain name template; `{namespace}` and `{name}` are replaced.
    #[arg(long, env = "GUESTCRED_SHIM_DOMAIN_TEMPLATE", default_value = libvirt::DEFAULT_DOMAIN_TEMPLATE)]
    pub domain_template: String,
    /// kubelet's pods directory (for the `kubevirt` locator).
    #[arg(
        long,
        env = "GUESTCRED_SHIM_KUBELET_PODS_DIR",
        default_value = "/var/lib/kubelet/pods"
    )]
    pub kubelet_pods_dir: PathBuf,
    /// Directory for short links to over-long launcher socket paths (`kubevirt` locator).
    #[arg(
        long,
        env = "GUESTCRED_SHIM_SOCKET_LINK_DIR",
        default_value = "/run/guestcred-shim"
    )]
    pub socket_link_dir: PathBuf,
    /// QGA socket path template for the `qga-socket` backend.
    #[arg(long, env = "GUESTCRED_SHIM_QGA_SOCKET_TEMPLATE", default_value = qga::DEFAULT_SOCKET_TEMPLATE)]
    pub qga_socket_template: String,
    /// Bound on every guest agent call, in seconds.
    #[arg(
        long,
        env = "GUESTCRED_SHIM_AGENT_TIMEOUT_SECONDS",
        default_value_t = 5
    )]
    pub agent_timeout_seconds: u64,
    /// File holding the shared bearer token clients must present.
    #[arg(long, env = "GUESTCRED_SHIM_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// Serve without authentication (tests only).
    #[arg(long, env = "GUESTCRED_SHIM_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    #[arg(
        long,
        env = "GUESTCRED_SHIM_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

impl ShimArgs {
    pub fn agent_timeout(&self) -> Duration {
        Duration::from_secs(self.agent_timeout_seconds.max(1))
    }

    /// The authentication the flags ask for; refuses to run open unless told to.
    pub fn auth(&self) -> anyhow::Result<auth::Auth> {
        match (&self.auth_token_file, self.insecure_no_auth) {
            (Some(path), _) => Ok(auth::Auth::from_token_file(path)?),
            (None, true) => Ok(auth::Auth::Disabled),
            (None, false) => anyhow::bail!(
                "no --auth-token-file given; refusing to serve without authentication (use --insecure-no-auth for tests)"
            ),
        }
    }

    /// The backend the flags ask for.
    pub fn agent(&self) -> anyhow::Result<Arc<dyn GuestAgent>> {
        let timeout = self.agent_timeout();
        Ok(match self.backend {
            BackendKind::QgaSocket => {
                Arc::new(qga::QgaSocketAgent::new(&self.qga_socket_template, timeout))
            }
            BackendKind::Libvirt => {
                let locator = match self.locator {
                    LocatorKind::LibvirtUri => libvirt::Locator::LibvirtUri {
                        uri: self.libvirt_uri.clone(),
                        domain_template: self.domain_template.clone(),
                    },
                    LocatorKind::Kubevirt => libvirt::Locator::Kubevirt {
                        kubelet_pods_dir: self.kubelet_pods_dir.clone(),
                        domain_template: self.domain_template.clone(),
                        socket_link_dir: self.socket_link_dir.clone(),
                    },
                };
                Arc::new(libvirt::LibvirtAgent::new(locator, timeout))
            }
        })
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    // A subscriber may already be installed (embedding binary, tests): keep it.
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutdown requested; draining in-flight requests");
}

/// Run the shim until SIGTERM or ctrl-c.
pub async fn run(args: ShimArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let auth = args.auth()?;
    if matches!(auth, auth::Auth::Disabled) {
        tracing::warn!("serving WITHOUT authentication (--insecure-no-auth)");
    }
    let agent = args.agent()?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        node = %args.node_name,
        backend = ?args.backend,
        locator = ?args.locator,
        "guestcred shim serving"
    );
    server::serve(listener, server::router(agent, auth), shutdown_signal()).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> ShimArgs {
        let mut argv = vec!["shim"];
        argv.extend_from_slice(extra);
        ShimArgs::try_parse_from(argv).unwrap()
    }

    #[test]
    fn no_token_and_no_insecure_flag_refuses_to_start() {
        assert!(parse(&[]).auth().is_err());
    }

    #[test]
    fn insecure_flag_disables_auth() {
        assert!(matches!(
            parse(&["--insecure-no-auth"]).auth().unwrap(),
            auth::Auth::Disabled
        ));
    }

    #[test]
    fn backend_and_locator_flags_parse() {
        let a = parse(&[
            "--backend",
            "qga-socket",
            "--locator",
            "kubevirt",
            "--agent-timeout-seconds",
            "2",
        ]);
        assert_eq!(a.backend, BackendKind::QgaSocket);
        assert_eq!(a.locator, LocatorKind::Kubevirt);
        assert_eq!(a.agent_timeout(), Duration::from_secs(2));
    }
}
