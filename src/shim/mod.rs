//! Node shim: a small authenticated HTTPS API on each node that turns one request into
//! guest agent calls on one domain of that node.
//!
//! - [`server`]: routes (`/v1/password`, `/v1/ssh-keys`, `/v1/ssh-keys/get`, `/v1/probe`;
//!   health and metrics only on the ops port), node check, connection limits, metrics,
//!   graceful shutdown; [`auth`]: client certificate identity (and optional bearer token)
//!   check; [`crate::tls::server`]: the reloading rustls config.
//! - [`agent::GuestAgent`]: the backend trait; [`libvirt`] and [`qga`] implement it.
//! - [`crate::api::validate`]: the single input gate (shared with the controller);
//!   [`errors`]: agent/libvirt error → wire reason, and its HTTP answer.
//!
//! The controller's side of this API is `crate::controller::shim_client`.

pub mod agent;
pub mod auth;
pub mod errors;
pub mod libvirt;
pub mod qga;
pub mod server;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, ValueEnum};

pub use agent::GuestAgent;

/// What the shim says when it is asked to serve without mutual TLS.
const HTTPS_ONLY: &str = "the shim serves HTTPS with mutual TLS only: give --tls-cert-file, --tls-key-file and --client-ca-file";

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

/// Command line (and `GUESTCRED_SHIM_*` environment) of the node shim.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "guestcred-shim",
    version,
    about = "guestcred node shim: serves the guest-agent API of this node's VMs to the controller"
)]
pub struct ShimArgs {
    /// Address to listen on.
    #[arg(long, env = "GUESTCRED_SHIM_LISTEN", default_value = "0.0.0.0:8443")]
    pub listen: String,
    /// Name of this node (the chart passes spec.nodeName); requests naming no node or
    /// another node are refused (Forbidden).
    #[arg(long, env = "GUESTCRED_SHIM_NODE_NAME", value_parser = clap::builder::NonEmptyStringValueParser::new())]
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
    /// QGA socket path template for the `qga-socket` backend; must contain `{namespace}`
    /// and `{name}` apart (e.g. `/var/run/qemu-server/{namespace}/{name}.qga`).
    #[arg(long, env = "GUESTCRED_SHIM_QGA_SOCKET_TEMPLATE", default_value = qga::DEFAULT_SOCKET_TEMPLATE)]
    pub qga_socket_template: String,
    /// Bound on every guest agent call, in seconds.
    #[arg(
        long,
        env = "GUESTCRED_SHIM_AGENT_TIMEOUT_SECONDS",
        default_value_t = 5
    )]
    pub agent_timeout_seconds: u64,
    /// The shim's TLS certificate (PEM, SAN `guestcred-shim`); with `--tls-key-file` and
    /// `--client-ca-file` the shim serves HTTPS with mutual TLS. Reloaded on change.
    #[arg(long, env = "GUESTCRED_SHIM_TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// The shim's TLS private key (PEM).
    #[arg(long, env = "GUESTCRED_SHIM_TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
    /// CA (PEM) whose client certificates may connect.
    #[arg(long, env = "GUESTCRED_SHIM_CLIENT_CA_FILE")]
    pub client_ca_file: Option<PathBuf>,
    /// DNS SAN a client certificate must carry (repeat or comma-separate for several).
    #[arg(
        long,
        env = "GUESTCRED_SHIM_ALLOWED_CLIENT",
        value_delimiter = ',',
        default_value = crate::tls::DEFAULT_ALLOWED_CLIENT
    )]
    pub allowed_client: Vec<String>,
    /// File holding a bearer token clients must present in addition to their client
    /// certificate (defence in depth). Only together with the TLS flags: the shim serves
    /// HTTPS only, and a token alone would cross the network in clear text.
    #[arg(long, env = "GUESTCRED_SHIM_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// Open connections to the API port at most (TLS handshakes included); further
    /// connections wait until one closes.
    #[arg(long, env = "GUESTCRED_SHIM_MAX_CONNECTIONS", default_value_t = server::DEFAULT_MAX_CONNECTIONS, value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u16).range(1..), usize::from))]
    pub max_connections: usize,
    /// Plain-HTTP address for `/metrics`, `/healthz` and `/readyz` (kubelet probes and
    /// Prometheus present no client certificate); empty to disable.
    #[arg(
        long,
        env = "GUESTCRED_SHIM_METRICS_LISTEN",
        default_value = "0.0.0.0:9090"
    )]
    pub metrics_listen: String,
    /// On SIGTERM, how long to wait for in-flight agent calls before exiting.
    #[arg(
        long,
        env = "GUESTCRED_SHIM_SHUTDOWN_GRACE_SECONDS",
        default_value_t = 10
    )]
    pub shutdown_grace_seconds: u64,
    #[arg(
        long,
        env = "GUESTCRED_SHIM_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: crate::runtime::LogFormat,
    /// Async worker threads. The shim mostly waits on guests, so a small fixed number keeps
    /// its footprint the same on a 2-core and a 128-core node (tokio's default is one per core).
    #[arg(long, env = "GUESTCRED_SHIM_WORKER_THREADS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub worker_threads: u16,
    /// Threads for blocking libvirt calls: one per call in flight, further calls queue.
    #[arg(long, env = "GUESTCRED_SHIM_MAX_BLOCKING_THREADS", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub max_blocking_threads: u16,
}

impl ShimArgs {
    pub fn agent_timeout(&self) -> Duration {
        Duration::from_secs(self.agent_timeout_seconds.max(1))
    }

    /// The TLS files; all three are required (the shim serves mutual TLS only).
    pub fn tls_files(&self) -> anyhow::Result<crate::tls::server::ServerTlsFiles> {
        match (
            &self.tls_cert_file,
            &self.tls_key_file,
            &self.client_ca_file,
        ) {
            (Some(cert), Some(key), Some(ca)) => Ok(crate::tls::server::ServerTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: ca.clone(),
            }),
            (None, None, None) if self.auth_token_file.is_some() => anyhow::bail!(
                "--auth-token-file is only accepted on top of mutual TLS; {HTTPS_ONLY}"
            ),
            (None, None, None) => anyhow::bail!("no TLS files; refusing to serve. {HTTPS_ONLY}"),
            _ => anyhow::bail!(
                "mutual TLS needs all of --tls-cert-file, --tls-key-file and --client-ca-file"
            ),
        }
    }

    /// The authentication the flags ask for: mutual TLS, plus a bearer token when
    /// `--auth-token-file` is given. Blocking (reads the token file): call it from a
    /// blocking context.
    pub fn auth(&self) -> anyhow::Result<auth::Auth> {
        self.tls_files()?;
        let token = match &self.auth_token_file {
            Some(path) => Some(auth::read_token_file(path)?),
            None => None,
        };
        let allowed: Vec<String> = self
            .allowed_client
            .iter()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        if allowed.is_empty() {
            anyhow::bail!("--allowed-client must name at least one client");
        }
        Ok(auth::Auth::client_cert(allowed, token))
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_seconds)
    }

    fn backend_label(&self) -> &'static str {
        match self.backend {
            BackendKind::Libvirt => "libvirt",
            BackendKind::QgaSocket => "qga-socket",
        }
    }

    /// The backend the flags ask for.
    pub fn agent(&self) -> anyhow::Result<Arc<dyn GuestAgent>> {
        let timeout = self.agent_timeout();
        let refuse = |e: String| anyhow::anyhow!(e);
        Ok(match self.backend {
            BackendKind::QgaSocket => {
                agent::check_template("--qga-socket-template", &self.qga_socket_template)
                    .map_err(refuse)?;
                Arc::new(qga::QgaSocketAgent::new(&self.qga_socket_template, timeout))
            }
            BackendKind::Libvirt => {
                let locator = match self.locator {
                    LocatorKind::LibvirtUri => {
                        // One libvirtd for the node: names must not collide across namespaces.
                        agent::check_template("--domain-template", &self.domain_template)
                            .map_err(refuse)?;
                        libvirt::Locator::LibvirtUri {
                            uri: self.libvirt_uri.clone(),
                            domain_template: self.domain_template.clone(),
                        }
                    }
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

/// Build the shim's runtime (sized by `--worker-threads`, `--max-blocking-threads`) and
/// run the shim on it until SIGTERM or ctrl-c.
pub fn main(args: ShimArgs) -> anyhow::Result<()> {
    crate::runtime::start(
        args.worker_threads,
        Some(args.max_blocking_threads),
        "guestcred-shim",
    )
    .context("starting the async runtime")?
    .block_on(run(args))
}

/// Run the shim until SIGTERM or ctrl-c.
pub async fn run(args: ShimArgs) -> anyhow::Result<()> {
    crate::runtime::logging::init(args.log_format);
    let files = args.tls_files()?;
    // Token and certificate files are read off the async workers.
    let auth = {
        let args = args.clone();
        tokio::task::spawn_blocking(move || args.auth())
            .await
            .context("reading the token file")??
    };
    let tls = Arc::new(
        crate::tls::server::ReloadingServerConfig::load(files)
            .await
            .context("loading the TLS files")?,
    );
    let agent = args.agent()?;
    let app = server::ShimApp::new(agent, &args.node_name).backend(args.backend_label());
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let ops_stopped = async move {
        let _ = stopped.wait_for(|s| *s).await;
    };
    let ops = crate::runtime::admin::spawn_ops_server(
        &args.metrics_listen,
        app.ops_router(),
        ops_stopped,
    )
    .await;
    tracing::info!(
        listen = %listener.local_addr()?,
        metrics = %args.metrics_listen,
        node = %args.node_name,
        backend = ?args.backend,
        locator = ?args.locator,
        max_connections = args.max_connections,
        "guestcred shim serving (mutual TLS)"
    );
    let opts = server::ServeOptions {
        tls,
        metrics: Some(app.metrics()),
        grace: Some(args.shutdown_grace()),
        limits: server::ConnectionLimits {
            max_connections: args.max_connections,
            ..Default::default()
        },
    };
    server::serve_with(
        listener,
        app.router(auth),
        opts,
        crate::runtime::signals::shutdown_signal(),
    )
    .await?;
    let _ = stop.send(true);
    if let Some(ops) = ops {
        let _ = ops.await;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::disallowed_methods)] // test files
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> ShimArgs {
        let mut argv = vec!["shim", "--node-name", "node-a"];
        argv.extend_from_slice(extra);
        ShimArgs::try_parse_from(argv).unwrap()
    }

    /// The shim refuses to start with `argv`, and its message says each of `says`.
    fn assert_refused(argv: &[&str], says: &[&str]) {
        let message = match parse(argv).auth() {
            Ok(_) => panic!("{argv:?} must be refused"),
            Err(e) => e.to_string(),
        };
        for fragment in says {
            assert!(message.contains(fragment), "{fragment:?} in {message}");
        }
    }

    #[test]
    fn runtime_is_two_workers_whatever_the_core_count_and_refuses_zero() {
        let args = parse(&[]);
        assert_eq!((args.worker_threads, args.max_blocking_threads), (2, 64));
        let zero = |flag| ShimArgs::try_parse_from(["shim", "--node-name", "n", flag, "0"]);
        assert!(zero("--worker-threads").is_err());
        assert!(zero("--max-blocking-threads").is_err());
        assert!(zero("--max-connections").is_err());
        assert_eq!(args.max_connections, server::DEFAULT_MAX_CONNECTIONS);
    }

    #[test]
    fn no_authentication_flags_refuse_to_start_and_say_https_only() {
        assert_refused(&[], &[HTTPS_ONLY]);
    }

    #[test]
    fn a_token_file_without_tls_is_refused_as_plain_http() {
        let says = [
            "the shim serves HTTPS",
            "--auth-token-file is only accepted",
        ];
        assert_refused(&["--auth-token-file", "/t"], &says);
    }

    #[test]
    fn a_token_file_on_top_of_tls_is_required_in_addition_to_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t0ken\n").unwrap();
        let mut argv: Vec<&str> = tls_flags();
        let token_arg = token.to_str().unwrap();
        argv.extend(["--auth-token-file", token_arg]);
        let auth::Auth::ClientCert { token, .. } = parse(&argv).auth().unwrap();
        assert!(token.is_some());
    }

    fn tls_flags() -> Vec<&'static str> {
        vec![
            "--tls-cert-file",
            "/c.pem",
            "--tls-key-file",
            "/k.pem",
            "--client-ca-file",
            "/ca.pem",
        ]
    }

    #[test]
    fn tls_flags_select_client_certificate_auth_for_the_controller() {
        let auth::Auth::ClientCert { allowed, token } = parse(&tls_flags()).auth().unwrap();
        assert_eq!(&*allowed, ["guestcred-controller".to_string()]);
        assert!(token.is_none());
    }

    #[test]
    fn allowed_clients_can_be_comma_separated() {
        let mut argv = tls_flags();
        argv.extend(["--allowed-client", "a.example,b.example"]);
        let auth::Auth::ClientCert { allowed, .. } = parse(&argv).auth().unwrap();
        assert_eq!(
            &*allowed,
            ["a.example".to_string(), "b.example".to_string()]
        );
    }

    #[test]
    fn some_tls_flags_without_the_others_are_refused() {
        assert_refused(&["--tls-cert-file", "/c.pem"], &[]);
    }

    #[test]
    fn metrics_port_and_grace_have_defaults() {
        let a = parse(&[]);
        assert_eq!(a.metrics_listen, "0.0.0.0:9090");
        assert_eq!(a.shutdown_grace(), Duration::from_secs(10));
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

    #[test]
    fn insecure_no_auth_is_not_a_flag_of_the_product() {
        let e = ShimArgs::try_parse_from(["shim", "--node-name", "n", "--insecure-no-auth"]);
        assert!(
            e.is_err(),
            "plain HTTP lives in the lab, not in the shim binary"
        );
    }

    #[test]
    fn node_name_is_required() {
        let Err(e) = ShimArgs::try_parse_from(["shim"]) else {
            panic!("a shim without --node-name must not start");
        };
        assert!(e.to_string().contains("--node-name"), "{e}");
    }

    #[test]
    fn qga_socket_template_must_separate_namespace_and_name() {
        for template in [
            "/var/run/qemu-server/{name}.qga",
            "/run/{namespace}-{name}.qga",
            "/run/{namespace}.{name}.qga",
            "/run/{name}{namespace}",
            "/run/vm.qga",
        ] {
            let args = parse(&["--backend", "qga-socket", "--qga-socket-template", template]);
            let Err(e) = args.agent() else {
                panic!("{template} must be refused");
            };
            assert!(e.to_string().contains("{namespace}"), "{template}: {e}");
        }
        for template in [
            "/run/{namespace}/{name}.qga",
            "/run/{namespace}_{name}.qga",
            "/run/{name}/{namespace}.sock",
        ] {
            let args = parse(&["--backend", "qga-socket", "--qga-socket-template", template]);
            assert!(args.agent().is_ok(), "{template}");
        }
    }
}
