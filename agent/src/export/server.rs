//! HTTP endpoints: `/metrics` (Prometheus protobuf with native histograms,
//! OpenMetrics or Prometheus text, by `Accept`),
//! `/healthz`, `/readyz`, `/debug/probes`; optionally over TLS and behind
//! basic auth (`--web-config-file`, see [`super::web_config`]).

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::get,
};
use tokio::net::{TcpListener, TcpStream};
use tracing::debug;

use super::{
    negotiate::{self, Format},
    web_config::{BasicAuth, WebConfig},
};
use crate::collect::Snapshot;

pub use super::negotiate::OPENMETRICS_CONTENT_TYPE;

/// What the endpoints read from; implemented by the daemon.
pub trait MetricsSource: Send + Sync + 'static {
    fn snapshot(&self) -> Snapshot;
    fn probes_json(&self) -> serde_json::Value;
    /// Ready once the kernel programs are loaded and the node's processes
    /// have been scanned once (the DaemonSet's readiness probe).
    fn ready(&self) -> bool;
    /// The classic `le` layout histograms are exposed in.
    fn classic_buckets(&self) -> super::ClassicBuckets {
        super::ClassicBuckets::Fine
    }
}

pub fn router(source: Arc<dyn MetricsSource>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/debug/probes", get(probes))
        .with_state(source)
}

async fn metrics(State(src): State<Arc<dyn MetricsSource>>, req: Request) -> Response {
    let accept = req.headers().get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = negotiate::choose(accept);
    let (snapshot, classic) = (src.snapshot(), src.classic_buckets());
    let body = match format {
        Format::Protobuf => super::render_protobuf(snapshot, classic).map_err(|e| e.to_string()),
        Format::OpenMetrics => {
            super::render_openmetrics(snapshot, classic).map(String::into_bytes).map_err(|e| e.to_string())
        }
        Format::Text004 => super::render(snapshot, classic)
            .map(|om| negotiate::to_text_004(&om).into_bytes())
            .map_err(|e| e.to_string()),
    };
    match body {
        Ok(body) => ([(header::CONTENT_TYPE, format.content_type())], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encoding metrics failed: {e}\n")).into_response(),
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

/// Every endpoint behind basic auth (the health probes too, as in
/// exporter-toolkit: a kubelet probe then needs the header, or a TCP probe).
async fn require_auth(State(auth): State<Arc<BasicAuth>>, req: Request, next: Next) -> Response {
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).map(str::to_owned);
    // bcrypt takes tens of milliseconds: off the async workers.
    let check = auth.clone();
    let ok = tokio::task::spawn_blocking(move || check.check(header.as_deref())).await.unwrap_or(false);
    if ok {
        next.run(req).await
    } else {
        (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, "Basic realm=\"watchscope\"")], "unauthorized\n")
            .into_response()
    }
}

/// Binds `addr` (failing early with the address in the error) and returns the
/// listener, so the caller can report the bound port before serving.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `app` on `listener` until `shutdown` resolves, with TLS and basic
/// auth when `web` asks for them.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    web: &WebConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = match &web.auth {
        Some(auth) => app.layer(middleware::from_fn_with_state(auth.clone(), require_auth)),
        None => app,
    };
    match &web.tls {
        None => axum::serve(listener, app).with_graceful_shutdown(shutdown).await,
        Some(tls) => axum::serve(TlsListener::new(listener, tls.clone()), app).with_graceful_shutdown(shutdown).await,
    }
}

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP listener whose connections come out TLS-terminated. Handshakes run
/// in tasks of their own, so a slow or silent client holds up nobody.
struct TlsListener {
    rx: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    fn new(listener: TcpListener, config: Arc<rustls::ServerConfig>) -> Self {
        let local = listener.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of fds and the like: wait, as axum does.
                        debug!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Self { rx, local }
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept task only ends when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}
