//! The HTTP face of Aegis Webhooks: the GraphQL API (`/graphql`) and the event
//! intake (`POST /v1/events`). The only crate that knows GraphQL. (The probes
//! and metrics every process serves are the binary's: `aegis_webhook::ops`.)

pub mod actions;
pub mod error;
mod graphiql;
pub mod graphql;
mod intake;
pub mod limits;
pub mod portal;

use std::sync::Arc;

use aegis_webhook_core::config::{Quotas, Sensitive};
use aegis_webhook_core::queue::Queue;
use aegis_webhook_core::secret::SecretCipher;
use aegis_webhook_core::target::TargetPolicy;
use aegis_webhook_storage::tenants;
use async_graphql_axum::{GraphQLRequest, GraphQLResponse};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use sea_orm::DatabaseConnection;

use crate::actions::Caller;
use crate::graphql::AegisSchema;
use crate::limits::{Limits, LogThrottle, Refusal};

/// The operator's retention (`AEGIS_RETENTION`, `AEGIS_BODY_RETENTION`) and
/// bounds (`AEGIS_RETENTION_MIN`, `AEGIS_RETENTION_MAX`).
#[derive(Debug, Clone, Copy)]
pub struct RetentionSettings {
    pub default: aegis_webhook_core::retention::Retention,
    pub bounds: aegis_webhook_core::retention::Bounds,
}

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub db: DatabaseConnection,
    pub cipher: SecretCipher,
    pub queue: Arc<dyn Queue>,
    pub policy: Arc<TargetPolicy>,
    /// `None` disables the intake.
    pub ingest_token: Option<Sensitive>,
    pub max_event_bytes: usize,
    /// How long a rotated-out secret keeps signing.
    pub secret_rotation_grace: std::time::Duration,
    /// Whether clients may introspect the schema (GraphiQL needs it).
    pub graphql_introspection: bool,
    /// Largest GraphQL request body, in bytes.
    pub graphql_max_body_bytes: usize,
    /// The longest a GraphQL request may run.
    pub graphql_timeout: std::time::Duration,
    /// Per-tenant quotas and input rules.
    pub quotas: Quotas,
    /// The operator's retention and the range tenants may choose theirs in.
    pub retention: RetentionSettings,
    /// Rates and concurrency per API key and ingest token.
    pub limits: Arc<Limits>,
    /// "The database is busy" is logged once per interval, not per request.
    pub busy_log: Arc<LogThrottle>,
    /// Where customers reach this API, for the links it makes.
    pub public_url: Option<String>,
    /// How the portal's pages may be framed and its cookie sent.
    pub portal: portal::Settings,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct RouterState {
    app: AppState,
    schema: AegisSchema,
}

pub fn router(state: AppState) -> Router {
    let schema = graphql::build_schema(state.clone());
    let max_graphql_bytes = state.graphql_max_body_bytes;
    Router::new()
        .route(
            "/graphql",
            // The GraphQL extractor reads the body itself, past axum's default
            // limit; this layer refuses a larger body with 413 before that.
            get(graphiql::page)
                .post(graphql_handler)
                .layer(tower_http::limit::RequestBodyLimitLayer::new(max_graphql_bytes)),
        )
        .route(
            "/v1/events",
            // The intake reads the body itself, after authentication, and up to
            // `max_event_bytes` only, to answer an oversized one with a clear
            // JSON error (413 unread when `Content-Length` says so).
            post(intake::accept_event),
        )
        .merge(graphiql::routes())
        .with_state(RouterState {
            app: state.clone(),
            schema,
        })
        .merge(portal::router(state))
}

/// The bearer token of an `Authorization` header, if it has one.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

/// A GraphQL-shaped error answer outside of schema execution.
fn graphql_error(status: StatusCode, code: &str, message: &str) -> Response {
    let body = serde_json::json!({
        "data": null,
        "errors": [{ "message": message, "extensions": { "code": code } }]
    });
    (status, Json(body)).into_response()
}

/// 429 with `Retry-After`, GraphQL-shaped.
fn too_many_requests(refusal: Refusal) -> Response {
    let message = match refusal {
        Refusal::Rate(_) => format!(
            "rate limit of this API key reached (AEGIS_API_RATE_LIMIT); retry after {} s",
            refusal.retry_after_secs()
        ),
        Refusal::Concurrency => {
            "too many requests of this API key in progress (AEGIS_API_MAX_CONCURRENT_REQUESTS); retry when one ends"
                .to_owned()
        }
    };
    let mut response = graphql_error(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED", &message);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, refusal.retry_after_secs().into());
    response
}

/// Logs that the database was too busy to answer, at most once per interval.
fn note_busy(state: &AppState) {
    if let Some(count) = state.busy_log.hit(std::time::Instant::now()) {
        tracing::warn!(
            requests = count,
            "the database had no free connection in time; requests answered 503 (counted since the last such line)"
        );
    }
}

/// `/graphql`: authenticate, admit under the key's limits, bound the
/// document's size, then run it under the deadline.
async fn graphql_handler(State(state): State<RouterState>, headers: HeaderMap, request: GraphQLRequest) -> Response {
    let Some(key) = bearer(&headers) else {
        return graphql_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "missing API key: send `Authorization: Bearer <api key>`",
        );
    };
    let holder = match tenants::authenticate(&state.app.db, key).await {
        Ok(Some(holder)) => holder,
        Ok(None) => {
            return graphql_error(
                StatusCode::UNAUTHORIZED,
                "UNAUTHENTICATED",
                "invalid or revoked API key",
            );
        }
        Err(aegis_webhook_storage::StoreError::Busy) => {
            note_busy(&state.app);
            return busy();
        }
        Err(error) => {
            tracing::error!(error = %error, "API key lookup failed");
            return graphql_error(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "internal error");
        }
    };
    let _slot = match state.app.limits.admit_api(holder.key_id) {
        Ok(slot) => slot,
        Err(refusal) => return too_many_requests(refusal),
    };
    let request = request.into_inner();
    if let Err(refused) = graphql::size::check(&request.query) {
        return graphql_error(StatusCode::BAD_REQUEST, "BAD_USER_INPUT", &refused.0);
    }
    let caller = Caller {
        tenant_id: holder.tenant_id,
        actor: aegis_webhook_storage::audit::Actor::ApiKey(holder.key_id),
        scopes: holder.scopes,
    };
    let request = request.data(caller);
    let deadline = state.app.graphql_timeout;
    let Ok(mut response) = tokio::time::timeout(deadline, state.schema.execute(request)).await else {
        return graphql_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "DEADLINE_EXCEEDED",
            &format!(
                "the request ran longer than {} ms (AEGIS_GRAPHQL_TIMEOUT) and was stopped; ask for less",
                deadline.as_millis()
            ),
        );
    };
    // Our resolvers always set a code; errors without one come from parsing,
    // validation (depth, complexity, unknown fields) or variable coercion: the
    // client's input.
    let mut busy_answer = false;
    for error in &mut response.errors {
        let code = error
            .extensions
            .as_ref()
            .and_then(|extensions| extensions.get("code"))
            .map(ToString::to_string);
        match code {
            None => {
                if let Some(explained) = graphql::explain_limit(&error.message) {
                    error.message = explained;
                }
                error
                    .extensions
                    .get_or_insert_with(Default::default)
                    .set("code", "BAD_USER_INPUT");
            }
            Some(code) if code.trim_matches('"') == error::BUSY_CODE => busy_answer = true,
            Some(_) => {}
        }
    }
    if busy_answer {
        note_busy(&state.app);
        let mut answer = GraphQLResponse::from(response).into_response();
        *answer.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        answer.headers_mut().insert(header::RETRY_AFTER, 1.into());
        return answer;
    }
    GraphQLResponse::from(response).into_response()
}

/// 503 with `Retry-After`: the database had no connection free in time.
fn busy() -> Response {
    let mut response = graphql_error(
        StatusCode::SERVICE_UNAVAILABLE,
        error::BUSY_CODE,
        "the service is busy; retry in a moment",
    );
    response.headers_mut().insert(header::RETRY_AFTER, 1.into());
    response
}
