//! The shim's HTTP API (axum) and its server loop.
//!
//! [`ShimApp`] builds the API router (auth layer, node check, metered agent; `/v1/*` and
//! nothing else) and the ops router (`/metrics`, `/healthz`, `/readyz`, only for the
//! plain-HTTP metrics port). [`serve_with`] serves the API over mutual TLS only
//! ([`crate::tls::server::ReloadingServerConfig`]): it hands the client certificate to the
//! auth layer, bounds every connection ([`ConnectionLimits`]: handshake deadline,
//! header-read and idle timeouts, a cap on open connections), and drains in-flight
//! requests on shutdown within a grace period. Request bodies are capped at
//! [`MAX_REQUEST_BODY_BYTES`], the largest valid request.
//!
//! Request bodies are never logged: they carry passwords and keys.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, Request, State};
use axum::response::{IntoResponse, Response};

use axum::routing::post;
use futures::StreamExt;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;

use super::agent::{AgentCall, AgentReply, GuestAgent};
use super::auth::{Auth, AuthState, PeerCertificate, require_auth};
pub use super::errors::ApiError;
use crate::api::validate::{self, MAX_KEY_BYTES, MAX_KEYS, MAX_PASSWORD_BYTES, ValidDomain};
use crate::api::wire::{
    DomainRef, GetSshKeysRequest, KeyOp, ProbeRequest, ProbeResponse, SetPasswordRequest,
    SetPasswordResponse, ShimError, ShimErrorReason, SshKeysRequest, SshKeysResponse, paths,
};
use crate::metrics::{Refusal, ShimMetrics};
use crate::tls::server::ReloadingServerConfig;

/// How long shutdown waits for in-flight requests (and their agent calls) by default.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Room for everything of a request but the keys: the domain (namespace, name, node: 253
/// bytes each; the launcher pod UID), the user, field names and JSON syntax, with every
/// string escaped at worst. Generous on purpose: it only has to be small.
const ENVELOPE_BYTES: usize = 64 * 1024;

/// The largest valid request body: `MAX_KEYS` keys of `MAX_KEY_BYTES` each, every byte
/// escaped at worst (a `"` or `\` in a key comment doubles in JSON; serde_json does not
/// escape non-ASCII), plus quotes and a comma each, a password escaped at worst, plus the
/// envelope. Anything larger cannot pass `api::validate`, so it is refused (413).
pub const MAX_REQUEST_BODY_BYTES: usize =
    MAX_KEYS * (2 * MAX_KEY_BYTES + 3) + 2 * MAX_PASSWORD_BYTES + ENVELOPE_BYTES;

/// A body above the limit but below this is read and discarded, so the client can read
/// the 413 and keep its connection; a larger one (by Content-Length or as it arrives)
/// closes the connection.
const DRAIN_LIMIT_BYTES: usize = 2 * MAX_REQUEST_BODY_BYTES;

/// Bound on reading one request body (a client that trickles its body is cut off).
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);

/// Bounds on the connections of the API port.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    /// A client that has not finished its TLS handshake by then is dropped; the handshake
    /// runs inside its connection slot, so stalled handshakes free their slots by then.
    pub handshake_timeout: Duration,
    /// An HTTP/1 request whose headers have not all arrived by then is cut off.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (above the
    /// controller's pool idle timeout, `crate::tls::client::POOL_IDLE_TIMEOUT`).
    pub idle_timeout: Duration,
    /// Open connections at most, handshakes included; further connections wait in the
    /// listen backlog until a slot frees.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(5),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(15),
            max_connections: DEFAULT_MAX_CONNECTIONS,
        }
    }
}

/// Default of [`ConnectionLimits::max_connections`] (`--max-connections`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;

/// JSON body extractor whose rejections are typed `InvalidArgument` errors that never
/// quote the body (serde's "invalid type" messages can contain the offending value). A
/// body above [`MAX_REQUEST_BODY_BYTES`] gets 413, one that trickles in 408.
pub struct WireJson<T>(pub T);

/// Why [`WireJson`] refused a body.
pub enum WireRejection {
    Invalid(ApiError),
    /// 413, with a typed `InvalidArgument` body.
    TooLarge(ShimError),
    /// 408: the body did not arrive within [`BODY_READ_TIMEOUT`].
    TooSlow(ShimError),
}

impl IntoResponse for WireRejection {
    fn into_response(self) -> Response {
        match self {
            Self::Invalid(e) => e.into_response(),
            Self::TooLarge(e) => {
                (http::StatusCode::PAYLOAD_TOO_LARGE, axum::Json(e)).into_response()
            }
            Self::TooSlow(e) => (http::StatusCode::REQUEST_TIMEOUT, axum::Json(e)).into_response(),
        }
    }
}

fn too_large() -> WireRejection {
    WireRejection::TooLarge(ShimError::invalid(format!(
        "request body larger than {MAX_REQUEST_BODY_BYTES} bytes (the largest valid request)"
    )))
}

/// The body, at most [`MAX_REQUEST_BODY_BYTES`]; a larger one up to [`DRAIN_LIMIT_BYTES`] is
/// read to its end and dropped, so the 413 reaches the client on a connection that stays
/// usable.
async fn read_body(req: Request) -> Result<Vec<u8>, WireRejection> {
    let declared = req
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > DRAIN_LIMIT_BYTES) {
        return Err(too_large());
    }
    let mut body = Vec::with_capacity(declared.unwrap_or(0).min(MAX_REQUEST_BODY_BYTES));
    let mut seen = 0usize;
    let mut stream = req.into_body().into_data_stream();
    let read = async {
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| {
                WireRejection::Invalid(ApiError(ShimError::invalid(format!(
                    "reading request body: {e}"
                ))))
            })?;
            seen = seen.saturating_add(chunk.len());
            if seen > DRAIN_LIMIT_BYTES {
                return Err(too_large());
            }
            if seen <= MAX_REQUEST_BODY_BYTES {
                body.extend_from_slice(&chunk);
            }
        }
        Ok(())
    };
    match tokio::time::timeout(BODY_READ_TIMEOUT, read).await {
        Ok(Ok(())) if seen > MAX_REQUEST_BODY_BYTES => Err(too_large()),
        Ok(Ok(())) => Ok(body),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(WireRejection::TooSlow(ShimError::invalid(format!(
            "request body not received within {BODY_READ_TIMEOUT:?}"
        )))),
    }
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for WireJson<T> {
    type Rejection = WireRejection;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let bytes = zeroize::Zeroizing::new(read_body(req).await?);
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
            WireRejection::Invalid(ApiError(ShimError::invalid(format!(
                "request body does not match the v1 schema: {detail}"
            ))))
        })
    }
}

#[derive(Clone)]
struct AppState {
    agent: Arc<dyn GuestAgent>,
    /// This shim's node; requests naming no node or another node are refused.
    node: Arc<str>,
    metrics: Arc<ShimMetrics>,
}

/// The shim's routers, from its agent backend, node and metrics.
#[derive(Clone)]
pub struct ShimApp {
    agent: Arc<dyn GuestAgent>,
    node: Arc<str>,
    backend: &'static str,
    metrics: Arc<ShimMetrics>,
}

impl ShimApp {
    /// The API for the VMs of `node`: requests that name no node or another one are
    /// refused (`Forbidden`), so an empty `node` refuses every request.
    pub fn new(agent: Arc<dyn GuestAgent>, node: &str) -> Self {
        Self {
            agent,
            node: Arc::from(node),
            backend: "unknown",
            metrics: ShimMetrics::new(),
        }
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

    /// The API for [`serve_with`]: `/v1/*` behind `auth`, and nothing else (health and
    /// metrics are on the ops port only).
    pub fn router(&self, auth: Auth) -> Router {
        let auth = AuthState {
            auth,
            metrics: self.metrics.clone(),
        };
        self.routes()
            .route_layer(axum::middleware::from_fn_with_state(auth, require_auth))
    }

    /// `/v1/*` without the authentication layer, for in-process test worlds that serve
    /// plain HTTP from their own code (`guestcred-lab`). The shim binary never serves it:
    /// it has no flag for it, and [`serve_with`] speaks mutual TLS only.
    pub fn router_without_auth_for_test_worlds(&self) -> Router {
        self.routes()
    }

    fn routes(&self) -> Router {
        Router::new()
            .route(paths::PASSWORD, post(set_password))
            .route(paths::SSH_KEYS, post(change_ssh_keys))
            .route(paths::SSH_KEYS_GET, post(get_ssh_keys))
            .route(paths::PROBE, post(probe))
            // WireJson enforces the same limit itself (and drains); this covers any other
            // body extractor a route may get.
            .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY_BYTES))
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

/// How [`serve_with`] serves.
#[derive(Clone)]
pub struct ServeOptions {
    /// The (reloading) mutual-TLS config: the API is served over HTTPS only.
    pub tls: Arc<ReloadingServerConfig>,
    /// Where refused handshakes and open connections are counted.
    pub metrics: Option<Arc<ShimMetrics>>,
    /// Bound on draining in-flight requests after `shutdown` ([`DEFAULT_SHUTDOWN_GRACE`]).
    pub grace: Option<Duration>,
    pub limits: ConnectionLimits,
}

impl ServeOptions {
    pub fn new(tls: Arc<ReloadingServerConfig>) -> Self {
        Self {
            tls,
            metrics: None,
            grace: None,
            limits: ConnectionLimits::default(),
        }
    }
}

/// Serve `app` on `listener` over mutual TLS until `shutdown` resolves; then stop
/// accepting and wait up to the grace period for in-flight requests to finish.
///
/// Each connection takes one of `limits.max_connections` slots before it is accepted
/// (further ones wait in the listen backlog), does its handshake inside that slot within
/// `limits.handshake_timeout`, and then holds the slot until it closes: after
/// `limits.idle_timeout` without a request in flight at the latest.
pub async fn serve_with(
    listener: TcpListener,
    app: Router,
    opts: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(opts.limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(64);
    let slots = Arc::new(tokio::sync::Semaphore::new(
        opts.limits.max_connections.max(1),
    ));
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot,
            () = &mut shutdown => break,
        };
        let Ok(slot) = slot else { break };
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
            let _slot = slot;
            let _open = opts.metrics.as_ref().map(|m| m.connection_opened());
            let acceptor = tokio_rustls::TlsAcceptor::from(opts.tls.current());
            let handshake = acceptor.accept(stream);
            match tokio::time::timeout(opts.limits.handshake_timeout, handshake).await {
                Ok(Ok(stream)) => {
                    let cert = stream
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| c.clone().into_owned());
                    let conn = Connection {
                        peer,
                        cert: PeerCertificate(cert),
                        idle_timeout: opts.limits.idle_timeout,
                    };
                    serve_connection(&builder, watcher, stream, app, conn).await;
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

/// One accepted, authenticated connection.
struct Connection {
    peer: SocketAddr,
    cert: PeerCertificate,
    idle_timeout: Duration,
}

/// Requests in flight on one connection and when the last one ended.
struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds after `started` at which the connection last had a request in flight.
    last_busy_ms: AtomicU64,
}

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_busy_ms: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_busy_ms.store(ms, Ordering::Relaxed);
    }

    fn begin(self: &Arc<Self>) -> BusyGuard {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.touch();
        BusyGuard(self.clone())
    }

    /// How long the connection has had no request in flight (zero while one is).
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_busy_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

struct BusyGuard(Arc<Activity>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn serve_connection<I>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
    io: I,
    app: Router,
    conn: Connection,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Connection {
        peer,
        cert,
        idle_timeout,
    } = conn;
    let activity = Activity::new();
    let busy = activity.clone();
    let service = tower::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(ConnectInfo(peer));
        req.extensions_mut().insert(cert.clone());
        let guard = busy.begin();
        let app = app.clone();
        async move {
            let response = tower::ServiceExt::oneshot(app, req.map(axum::body::Body::new)).await;
            drop(guard);
            response
        }
    });
    let served =
        builder.serve_connection_with_upgrades(TokioIo::new(io), TowerToHyperService::new(service));
    let served = watcher.watch(served);
    tokio::pin!(served);
    let check = (idle_timeout / 4).max(Duration::from_millis(100));
    loop {
        tokio::select! {
            ended = &mut served => {
                if let Err(e) = ended {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                return;
            }
            () = tokio::time::sleep(check) => {
                if activity.idle_for() >= idle_timeout {
                    tracing::debug!(%peer, ?idle_timeout, "closing an idle connection");
                    return;
                }
            }
        }
    }
}

/// Refuse a request that names no node, or another node than this shim's (Forbidden,
/// counted, logged without the body): every request says where the controller believes
/// the VM runs, so a misrouted or replayed request never reaches a guest here.
fn check_node(state: &AppState, domain: &DomainRef) -> Result<(), ApiError> {
    let mine = &*state.node;
    let (why, message) = match domain.node.as_deref() {
        Some(asked) if !mine.is_empty() && asked == mine => return Ok(()),
        None | Some("") => (
            Refusal::MissingNode,
            "the request names no node; this shim serves only requests for its own node"
                .to_string(),
        ),
        Some(asked) => (
            Refusal::WrongNode,
            format!("this shim serves node {mine:?}, not {asked:?}"),
        ),
    };
    state.metrics.refused(why);
    tracing::warn!(
        node = %mine,
        requested_node = ?domain.node,
        domain = %domain,
        "refused request for a VM not on this node"
    );
    Err(ApiError(ShimError::new(
        ShimErrorReason::Forbidden,
        message,
    )))
}

/// The backend with every call counted and timed.
struct MeteredAgent {
    inner: Arc<dyn GuestAgent>,
    metrics: Arc<ShimMetrics>,
    backend: &'static str,
}

#[async_trait]
impl GuestAgent for MeteredAgent {
    async fn execute(
        &self,
        domain: &ValidDomain,
        call: AgentCall<'_>,
    ) -> Result<AgentReply, ShimError> {
        let guard = self.metrics.start_call(call.operation(), self.backend);
        let result = self.inner.execute(domain, call).await;
        guard.finish(match &result {
            Ok(_) => "ok",
            Err(e) => e.reason.as_str(),
        });
        result
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
