//! HTTP endpoints: `/metrics` (OpenMetrics text), `/healthz`, `/readyz`, `/debug/probes`.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::net::TcpListener;

use crate::collect::Snapshot;

pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// What the endpoints read from; implemented by the daemon.
pub trait MetricsSource: Send + Sync + 'static {
    fn snapshot(&self) -> Snapshot;
    fn probes_json(&self) -> serde_json::Value;
    /// Ready once the kernel programs are loaded and the node's processes
    /// have been scanned once (the DaemonSet's readiness probe).
    fn ready(&self) -> bool;
}

pub fn router(source: Arc<dyn MetricsSource>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/debug/probes", get(probes))
        .with_state(source)
}

async fn metrics(State(src): State<Arc<dyn MetricsSource>>) -> Response {
    match super::render(src.snapshot()) {
        Ok(body) => ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], body).into_response(),
        Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed\n").into_response(),
    }
}

async fn readyz(State(src): State<Arc<dyn MetricsSource>>) -> Response {
    if src.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "starting\n").into_response()
    }
}

async fn probes(State(src): State<Arc<dyn MetricsSource>>) -> Response {
    let body = src.probes_json().to_string();
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Binds `addr` (failing early with the address in the error) and returns the
/// listener, so the caller can report the bound port before serving.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
