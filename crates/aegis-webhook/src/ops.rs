//! What every process serves besides its role: `/healthz`, `/readyz` and
//! `/metrics`, so that every process is probed and scraped the same way, and
//! the one HTTP server loop that serves them (alone for the ingester and the
//! worker, beside the API's routes for the API), within [`HttpLimits`].

use std::sync::Arc;
use std::time::Duration;

use aegis_webhook_core::queue::Queue;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use sea_orm::DatabaseConnection;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// What the probes look at.
#[derive(Clone)]
struct Probes {
    db: DatabaseConnection,
    queue: Arc<dyn Queue>,
}

/// `/healthz` (alive), `/readyz` (database and broker reachable), `/metrics`.
pub fn router(db: DatabaseConnection, queue: Arc<dyn Queue>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(Probes { db, queue })
}

/// What bounds one process's HTTP server, from the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// How long a request's headers may take to arrive, counted from when the
    /// server starts waiting for them, on a new connection or an idle
    /// keep-alive one: slow-header (slowloris) and idle connections end.
    pub header_read_timeout: Duration,
    /// The longest one request may take, its body read included (408).
    pub request_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
    pub max_connections: usize,
}

impl HttpLimits {
    pub fn from_config(config: &aegis_webhook_core::config::Config) -> Self {
        HttpLimits {
            header_read_timeout: config.http_header_read_timeout,
            request_timeout: config.http_request_timeout,
            max_connections: config.http_max_connections,
        }
    }
}

/// Pause after a failed `accept` (out of file descriptors, say) before the next.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Serves `router` on `listener` within `limits` until `shutdown`, then stops
/// accepting and lets the connections finish the requests they are serving.
///
/// The loop is hyper's, not `axum::serve`: that sets no header-read timeout
/// (hyper's needs a timer) and no connection limit. Each connection is a
/// task of its own, watched by the graceful shutdown that this function
/// awaits, so none outlives it.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
    limits: HttpLimits,
) -> anyhow::Result<()> {
    let router = router.layer(tower_http::timeout::TimeoutLayer::with_status_code(
        StatusCode::REQUEST_TIMEOUT,
        limits.request_timeout,
    ));
    // HTTP/1 only, as every client of these endpoints speaks (scanners,
    // customers' GraphQL clients, probes, Prometheus): with protocol detection
    // a connection that sends nothing would wait for its first bytes before
    // any timer starts.
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let graceful = GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let permit = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => permit.expect("the slots are never closed"),
        };
        let stream = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    tracing::warn!(error = %error, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                    continue;
                }
            },
        };
        // Answers are small and latency matters more than packet count.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            // A client that went away or timed out is not the server's error.
            if let Err(error) = connection.await {
                tracing::debug!(error = %error, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        aegis_webhook_core::metrics::render(),
    )
        .into_response()
}

/// Ready when the database and the broker are both reachable.
async fn readyz(State(state): State<Probes>) -> Response {
    if let Err(error) = state.db.ping().await {
        tracing::warn!(error = %error, "readiness: database unreachable");
        return (StatusCode::SERVICE_UNAVAILABLE, "database unreachable").into_response();
    }
    if !state.queue.is_ready().await {
        tracing::warn!("readiness: broker unreachable");
        return (StatusCode::SERVICE_UNAVAILABLE, "broker unreachable").into_response();
    }
    (StatusCode::OK, "ready").into_response()
}
