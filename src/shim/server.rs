//! The shim's HTTP API (axum) and its server loop.
//!
//! [`ShimApp`] builds the API router (auth layer, node check, metered agent) and the ops
//! router (`/metrics`, `/healthz`, `/readyz` for the plain-HTTP metrics port). [`serve_with`]
//! runs either router over plain TCP or TLS ([`crate::tls::server::ReloadingServerConfig`]), hands
//! the client certificate to the auth layer, and drains in-flight requests on shutdown
//! within a grace period.
//!
//! Request bodies are never logged: they carry passwords and keys.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, Request, State};

use axum::routing::{get, post};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use super::agent::GuestAgent;
use super::auth::{Auth, AuthState, PeerCertificate, require_auth};
pub use super::errors::ApiError;
use crate::api::validate::{self, Password, PublicKeys, UserName, ValidDomain};
use crate::api::wire::{
    DomainRef, GetSshKeysRequest, KeyOp, ProbeRequest, ProbeResponse, SetPasswordRequest,
    SetPasswordResponse, ShimError, ShimErrorReason, SshKeysRequest, SshKeysResponse, paths,
};
use crate::metrics::{Refusal, ShimMetrics};
use crate::tls::server::ReloadingServerConfig;

/// How long shutdown waits for in-flight requests (and their agent calls) by default.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// JSON body extractor whose rejections are typed `InvalidArgument` errors that never
/// quote the body (serde's "invalid type" messages can contain the offending value).
pub struct WireJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for WireJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ShimError::invalid(format!("reading request body: {e}")))?;
        serde_json::from_slice(&bytes).map(WireJson).map_err(|e| {
            let text = e.to_string();
            let detail = if text.starts_with("missing field") {
                text
            } else {
                format!(
                    "{:?} error at line {} column {}",
                    e.classify(),
                    e.line(),
                    e.column()
                )
            };
            ApiError(ShimError::invalid(format!(
                "request body does not match the v1 schema: {detail}"
            )))
        })
    }
}

#[derive(Clone)]
struct AppState {
    agent: Arc<dyn GuestAgent>,
    /// This shim's node; requests naming another node are refused.
    node: Option<Arc<str>>,
    metrics: Arc<ShimMetrics>,
}

/// The shim's routers, from its agent backend, auth scheme, node and metrics.
#[derive(Clone)]
pub struct ShimApp {
    agent: Arc<dyn GuestAgent>,
    auth: Auth,
    node: Option<Arc<str>>,
    backend: &'static str,
    metrics: Arc<ShimMetrics>,
}

impl ShimApp {
    pub fn new(agent: Arc<dyn GuestAgent>, auth: Auth) -> Self {
        Self {
            agent,
            auth,
            node: None,
            backend: "unknown",
            metrics: ShimMetrics::new(),
        }
    }

    /// The node this shim serves; empty means unknown (no node check).
    pub fn node(mut self, node: &str) -> Self {
        self.node = (!node.is_empty()).then(|| Arc::from(node));
        self
    }

    /// The `backend` label of the agent metrics (`libvirt`, `qga-socket`).
    pub fn backend(mut self, backend: &'static str) -> Self {
        self.backend = backend;
        self
    }

    pub fn metrics(&self) -> Arc<ShimMetrics> {
        self.metrics.clone()
    }

    fn state(&self) -> AppState {
        AppState {
            agent: Arc::new(MeteredAgent {
                inner: self.agent.clone(),
                metrics: self.metrics.clone(),
                backend: self.backend,
            }),
            node: self.node.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// The API: `/v1/*` behind the auth layer; `/healthz` and `/readyz` open.
    pub fn router(&self) -> Router {
        let auth = AuthState {
            auth: self.auth.clone(),
            metrics: self.metrics.clone(),
        };
        let api = Router::new()
            .route(paths::PASSWORD, post(set_password))
            .route(paths::SSH_KEYS, post(change_ssh_keys))
            .route(paths::SSH_KEYS_GET, post(get_ssh_keys))
            .route(paths::PROBE, post(probe))
            .route_layer(axum::middleware::from_fn_with_state(auth, require_auth));
        Router::new()
            .merge(api)
            .route(paths::HEALTHZ, get(|| async { "ok" }))
            .route(paths::READYZ, get(ready))
            .with_state(self.state())
    }

    /// `/metrics`, `/healthz`, `/readyz` for the plain-HTTP metrics port (kubelet probes
    /// and Prometheus scrapes present no client certificate).
    pub fn ops_router(&self) -> Router {
        let metrics = self.metrics.clone();
        let agent = self.agent.clone();
        crate::runtime::admin::ops_router(
            move || metrics.encode(),
            move || {
                let agent = agent.clone();
                async move { agent.ready().await.map_err(|e| e.to_string()) }
            },
        )
    }
}

/// The full shim API with `auth` and no node check (tests, the lab world).
pub fn router(agent: Arc<dyn GuestAgent>, auth: Auth) -> Router {
    ShimApp::new(agent, auth).router()
}

/// How [`serve_with`] serves.
#[derive(Clone, Default)]
pub struct ServeOptions {
    /// Serve HTTPS with this (reloading) config; plain HTTP when `None`.
    pub tls: Option<Arc<ReloadingServerConfig>>,
    /// Where failed TLS handshakes are counted.
    pub metrics: Option<Arc<ShimMetrics>>,
    /// Bound on draining in-flight requests after `shutdown` ([`DEFAULT_SHUTDOWN_GRACE`]).
    pub grace: Option<Duration>,
}

/// Serve `app` over plain HTTP until `shutdown` resolves, then drain in-flight requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, app, ServeOptions::default(), shutdown).await
}

/// Serve `app` on `listener` (TLS when `opts.tls` is set) until `shutdown` resolves; then
/// stop accepting and wait up to the grace period for in-flight requests to finish.
pub async fn serve_with(
    listener: TcpListener,
    app: Router,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let watcher = graceful.watcher();
        let (app, builder, opts) = (app.clone(), builder.clone(), opts.clone());
        tokio::spawn(async move {
            let Some(tls) = opts.tls else {
                serve_connection(&builder, watcher, stream, app, peer, None).await;
                return;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.current());
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let cert = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.clone().into_owned());
                    let cert = PeerCertificate(cert);
                    serve_connection(&builder, watcher, stream, app, peer, Some(cert)).await;
                }
                Ok(Err(e)) => {
                    if let Some(m) = &opts.metrics {
                        m.refused(Refusal::TlsHandshake);
                    }
                    tracing::warn!(%peer, error = %e, "refused connection: TLS handshake failed");
                }
                Err(_) => {
                    if let Some(m) = &opts.metrics {
                        m.refused(Refusal::TlsHandshake);
                    }
                    tracing::warn!(%peer, "refused connection: TLS handshake timed out");
                }
            }
        });
    }
    drop(listener);
    let grace = opts.grace.unwrap_or(DEFAULT_SHUTDOWN_GRACE);
    let open = graceful.count();
    if open > 0 {
        tracing::info!(connections = open, ?grace, "draining in-flight requests");
    }
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        let in_flight = opts.metrics.as_ref().map(|m| m.in_flight());
        tracing::warn!(
            ?grace,
            agent_calls_in_flight = ?in_flight,
            "grace period over; dropping unfinished requests (their outcome is unknown)"
        );
    }
    Ok(())
}

async fn serve_connection<I>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
    io: I,
    app: Router,
    peer: SocketAddr,
    cert: Option<PeerCertificate>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = tower::ServiceExt::map_request(app, move |mut req: Request<_>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        if let Some(c) = &cert {
            req.extensions_mut().insert(c.clone());
        }
        req
    });
    let conn =
        builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service));
    if let Err(e) = watcher.watch(conn).await {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}

/// Refuse a request that names another node than this shim's (Forbidden, logged without
/// the body). Requests without a node, or a shim without one, pass: the backend then
/// only finds domains of its own node anyway.
fn check_node(state: &AppState, domain: &DomainRef) -> Result<(), ApiError> {
    match (&state.node, &domain.node) {
        (Some(mine), Some(asked)) if **mine != **asked => {
            state.metrics.refused(Refusal::WrongNode);
            tracing::warn!(
                node = %mine,
                requested_node = ?asked,
                domain = %domain,
                "refused request for a VM on another node"
            );
            Err(ApiError(ShimError::new(
                ShimErrorReason::Forbidden,
                format!("this shim serves node {mine}, not {asked:?}"),
            )))
        }
        _ => Ok(()),
    }
}

/// The backend with every call counted and timed.
struct MeteredAgent {
    inner: Arc<dyn GuestAgent>,
    metrics: Arc<ShimMetrics>,
    backend: &'static str,
}

impl MeteredAgent {
    async fn metered<T>(
        &self,
        operation: &'static str,
        call: impl Future<Output = Result<T, ShimError>>,
    ) -> Result<T, ShimError> {
        let guard = self.metrics.start_call(operation, self.backend);
        let result = call.await;
        guard.finish(match &result {
            Ok(_) => "ok",
            Err(e) => e.reason.as_str(),
        });
        result
    }
}

#[async_trait]
impl GuestAgent for MeteredAgent {
    async fn probe(&self, domain: &ValidDomain) -> Result<ProbeResponse, ShimError> {
        self.metered("probe", self.inner.probe(domain)).await
    }

    async fn set_password(
        &self,
        domain: &ValidDomain,
        user: &UserName,
        password: &Password,
    ) -> Result<(), ShimError> {
        self.metered(
            "set-password",
            self.inner.set_password(domain, user, password),
        )
        .await
    }

    async fn get_ssh_keys(
        &self,
        domain: &ValidDomain,
        user: &UserName,
    ) -> Result<Vec<String>, ShimError> {
        self.metered("get-ssh-keys", self.inner.get_ssh_keys(domain, user))
            .await
    }

    async fn add_ssh_keys(
        &self,
        domain: &ValidDomain,
        user: &UserName,
        keys: &PublicKeys,
        reset: bool,
    ) -> Result<(), ShimError> {
        let op = if reset {
            "replace-ssh-keys"
        } else {
            "add-ssh-keys"
        };
        self.metered(op, self.inner.add_ssh_keys(domain, user, keys, reset))
            .await
    }

    async fn remove_ssh_keys(
        &self,
        domain: &ValidDomain,
        user: &UserName,
        keys: &PublicKeys,
    ) -> Result<(), ShimError> {
        self.metered(
            "remove-ssh-keys",
            self.inner.remove_ssh_keys(domain, user, keys),
        )
        .await
    }

    async fn ready(&self) -> Result<(), ShimError> {
        self.inner.ready().await
    }
}

fn log_outcome<T>(op: &'static str, domain: &dyn std::fmt::Display, result: &Result<T, ShimError>) {
    match result {
        Ok(_) => tracing::info!(op, %domain, "agent call succeeded"),
        Err(e) => {
            tracing::warn!(op, %domain, reason = %e.reason, message = %e.message, "agent call failed")
        }
    }
}

async fn ready(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    state.agent.ready().await?;
    Ok("ok")
}

async fn set_password(
    State(state): State<AppState>,
    WireJson(req): WireJson<SetPasswordRequest>,
) -> Result<axum::Json<SetPasswordResponse>, ApiError> {
    check_node(&state, &req.domain)?;
    let domain = validate::domain(&req.domain)?;
    let user = validate::user(&req.user)?;
    let password = validate::password(&req.password, req.crypted)?;
    let result = state.agent.set_password(&domain, &user, &password).await;
    log_outcome("set-password", &domain, &result);
    result?;
    Ok(axum::Json(SetPasswordResponse {}))
}

async fn change_ssh_keys(
    State(state): State<AppState>,
    WireJson(req): WireJson<SshKeysRequest>,
) -> Result<axum::Json<SshKeysResponse>, ApiError> {
    check_node(&state, &req.domain)?;
    let domain = validate::domain(&req.domain)?;
    let user = validate::user(&req.user)?;
    let keys = validate::public_keys(&req.keys)?;
    let result = match req.op {
        KeyOp::Add => state.agent.add_ssh_keys(&domain, &user, &keys, false).await,
        KeyOp::Replace => state.agent.add_ssh_keys(&domain, &user, &keys, true).await,
        KeyOp::Remove => state.agent.remove_ssh_keys(&domain, &user, &keys).await,
    };
    log_outcome("ssh-keys", &domain, &result);
    result?;
    let keys = state.agent.get_ssh_keys(&domain, &user).await?;
    Ok(axum::Json(SshKeysResponse { keys }))
}

async fn get_ssh_keys(
    State(state): State<AppState>,
    WireJson(req): WireJson<GetSshKeysRequest>,
) -> Result<axum::Json<SshKeysResponse>, ApiError> {
    check_node(&state, &req.domain)?;
    let domain = validate::domain(&req.domain)?;
    let user = validate::user(&req.user)?;
    let result = state.agent.get_ssh_keys(&domain, &user).await;
    log_outcome("get-ssh-keys", &domain, &result);
    Ok(axum::Json(SshKeysResponse { keys: result? }))
}

async fn probe(
    State(state): State<AppState>,
    WireJson(req): WireJson<ProbeRequest>,
) -> Result<axum::Json<ProbeResponse>, ApiError> {
    check_node(&state, &req.domain)?;
    let domain = validate::domain(&req.domain)?;
    let result = state.agent.probe(&domain).await;
    log_outcome("probe", &domain, &result);
    Ok(axum::Json(result?))
}
