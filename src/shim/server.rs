//! The shim's HTTP API (axum). TLS and a stronger auth layer wrap [`router`] and
//! [`serve`] later; handlers do not care how the request was authenticated.
//!
//! Request bodies are never logged: they carry passwords and keys.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;

use super::agent::GuestAgent;
use super::auth::{Auth, require_auth};
use super::validate;
use crate::api::wire::{
    GetSshKeysRequest, KeyOp, ProbeRequest, ProbeResponse, SetPasswordRequest, SetPasswordResponse,
    ShimError, SshKeysRequest, SshKeysResponse, paths,
};

/// A [`ShimError`] as an HTTP response: advisory status, typed JSON body.
#[derive(Debug)]
pub struct ApiError(pub ShimError);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.reason.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, axum::Json(self.0)).into_response()
    }
}

impl From<ShimError> for ApiError {
    fn from(e: ShimError) -> Self {
        Self(e)
    }
}

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
}

/// The full shim API: `/v1/*` behind `auth`, health endpoints open.
pub fn router(agent: Arc<dyn GuestAgent>, auth: Auth) -> Router {
    let state = AppState { agent };
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
        .with_state(state)
}

/// Serve `app` on `listener` until `shutdown` resolves, then drain in-flight requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
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
    let domain = validate::domain(&req.domain)?;
    let result = state.agent.probe(&domain).await;
    log_outcome("probe", &domain, &result);
    Ok(axum::Json(result?))
}
