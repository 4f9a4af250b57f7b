//! The HTTP face of Aegis Webhooks: the GraphQL API (`/graphql`) and the event
//! intake (`POST /v1/events`). The only crate that knows GraphQL. (The probes
//! and metrics every process serves are the binary's: `aegis_webhook::ops`.)

pub mod graphql;
mod intake;

use std::sync::Arc;

use aegis_webhook_core::config::Sensitive;
use aegis_webhook_core::queue::Queue;
use aegis_webhook_core::secret::SecretCipher;
use aegis_webhook_core::target::TargetPolicy;
use aegis_webhook_storage::tenants;
use async_graphql::http::GraphiQLSource;
use async_graphql_axum::{GraphQLRequest, GraphQLResponse};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use sea_orm::DatabaseConnection;

use crate::graphql::{AegisSchema, Caller};

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
    let max_event_bytes = state.max_event_bytes;
    let max_graphql_bytes = state.graphql_max_body_bytes;
    Router::new()
        .route(
            "/graphql",
            // The GraphQL extractor reads the body itself, past axum's default
            // limit; this layer refuses a larger body with 413 before that.
            get(graphiql)
                .post(graphql_handler)
                .layer(tower_http::limit::RequestBodyLimitLayer::new(max_graphql_bytes)),
        )
        .route(
            "/v1/events",
            // The intake reads the body itself, to answer an oversized one with a
            // clear JSON error; the layer only guards memory.
            post(intake::accept_event).layer(axum::extract::DefaultBodyLimit::max(max_event_bytes)),
        )
        .with_state(RouterState { app: state, schema })
}

async fn graphiql() -> Html<String> {
    Html(GraphiQLSource::build().endpoint("/graphql").finish())
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

async fn graphql_handler(State(state): State<RouterState>, headers: HeaderMap, request: GraphQLRequest) -> Response {
    let Some(key) = bearer(&headers) else {
        return graphql_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "missing API key: send `Authorization: Bearer <api key>`",
        );
    };
    let tenant_id = match tenants::authenticate(&state.app.db, key).await {
        Ok(Some(tenant_id)) => tenant_id,
        Ok(None) => {
            return graphql_error(
                StatusCode::UNAUTHORIZED,
                "UNAUTHENTICATED",
                "invalid or revoked API key",
            );
        }
        Err(error) => {
            tracing::error!(error = %error, "API key lookup failed");
            return graphql_error(StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL", "internal error");
        }
    };
    let request = request.into_inner().data(Caller { tenant_id });
    let mut response = state.schema.execute(request).await;
    // Our resolvers always set a code; errors without one come from parsing,
    // validation (depth, complexity, unknown fields) or variable coercion: the
    // client's input.
    for error in &mut response.errors {
        let has_code = error
            .extensions
            .as_ref()
            .is_some_and(|extensions| extensions.get("code").is_some());
        if !has_code {
            error
                .extensions
                .get_or_insert_with(Default::default)
                .set("code", "BAD_USER_INPUT");
        }
    }
    GraphQLResponse::from(response).into_response()
}
