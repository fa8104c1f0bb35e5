//! The admin endpoints both binaries serve on a plain-HTTP port of their own, apart from
//! any API port: `/metrics` (OpenMetrics), `/healthz` and `/readyz`.
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::metrics::{CONTENT_TYPE, ControllerMetrics};
use std::sync::Arc;

/// `/metrics`, `/healthz` and `/readyz` on a plain-HTTP port (kubelet probes and
/// Prometheus scrapes do not present client certificates). `ready` answers `Err(why)`
/// while not ready.
pub fn ops_router<M, R, F>(metrics: M, ready: R) -> Router
where
    M: Fn() -> String + Clone + Send + Sync + 'static,
    R: Fn() -> F + Clone + Send + Sync + 'static,
    F: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let text = metrics();
                async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], text) }
            }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let check = ready();
                async move {
                    match check.await {
                        Ok(()) => (StatusCode::OK, "ok".to_string()).into_response(),
                        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
                    }
                }
            }),
        )
}

/// The controller's ops router: its metrics, and ready once caches synced.
pub fn controller_router(metrics: Arc<ControllerMetrics>) -> Router {
    let ready = metrics.clone();
    ops_router(
        move || metrics.encode(),
        move || {
            let ready = ready.clone();
            async move {
                if ready.is_ready() {
                    Ok(())
                } else {
                    Err("caches not synced yet".to_string())
                }
            }
        },
    )
}

/// Serve `router` on `listener` until `shutdown` resolves.
pub async fn serve_ops(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
}

/// Serve `router` on `listen` in the background until `shutdown` resolves; `None` when
/// `listen` is empty or cannot be bound. Not fatal: the main API still serves, and the
/// kubelet's probes on that port make the problem visible (logged as an error here).
pub async fn spawn_ops_server(
    listen: &str,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Option<tokio::task::JoinHandle<()>> {
    if listen.is_empty() {
        return None;
    }
    let listener = match tokio::net::TcpListener::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%listen, error = %e, "cannot bind the metrics/health port; serving without it");
            return None;
        }
    };
    tracing::info!(%listen, "serving /metrics, /healthz and /readyz");
    Some(tokio::spawn(async move {
        if let Err(e) = serve_ops(listener, router, shutdown).await {
            tracing::error!(error = %e, "metrics/health server failed");
        }
    }))
}

/// The controller's `--metrics-listen` and (when different and set) `--health-listen`
/// ports, each with `/metrics`, `/healthz` and `/readyz`, for the life of the process.
pub async fn serve_controller_ops(
    metrics: &Arc<ControllerMetrics>,
    metrics_listen: &str,
    health_listen: &str,
) {
    let pending = std::future::pending::<()>;
    spawn_ops_server(
        metrics_listen,
        controller_router(metrics.clone()),
        pending(),
    )
    .await;
    if health_listen != metrics_listen {
        spawn_ops_server(health_listen, controller_router(metrics.clone()), pending()).await;
    }
}
