//! What every process serves besides its role: `/healthz`, `/readyz` and
//! `/metrics`, so that every process is probed and scraped the same way, and
//! the one HTTP server loop that serves them (alone for the ingester and the
//! worker, beside the API's routes for the API).

use std::sync::Arc;

use aegis_webhook_core::queue::Queue;
use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sea_orm::DatabaseConnection;
use tokio::net::TcpListener;
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

/// Serves `router` on `listener` until `shutdown`, then finishes the requests in
/// progress.
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) -> anyhow::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(|error| anyhow::anyhow!("the HTTP server failed: {error}"))
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
