//! `POST /v1/events`: upstream services that cannot speak AMQP post envelopes
//! here. The envelope is validated, published to the events stream (the same path
//! AMQP publishers take) and only then acknowledged with 202.
//!
//! Each request is an `intake` span; the event's `publish` span is its child,
//! and the message carries their trace on to the ingester. A scanner that
//! sends `traceparent` has the whole trace begin at its own span.

use aegis_webhook_core::event::{EnvelopeError, ValidatedEvent};
use aegis_webhook_core::telemetry::{self, TraceHeaders};
use aegis_webhook_storage::tenants;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::rejection::BytesRejection;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use sha2::Digest as _;
use subtle::ConstantTimeEq as _;
use tracing::Instrument as _;
use tracing::field::{Empty, display};

use crate::{AppState, RouterState, bearer};

fn reply(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = serde_json::json!({ "error": { "code": code, "message": message.into() } });
    (status, Json(body)).into_response()
}

pub(crate) async fn accept_event(
    State(state): State<RouterState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let span = tracing::info_span!(
        "intake",
        otel.kind = "server",
        otel.status_code = Empty,
        http.request.method = "POST",
        http.route = "/v1/events",
        http.response.status_code = Empty,
        trace_id = Empty,
        aegis.event.id = Empty,
        aegis.event.type = Empty,
        aegis.tenant.id = Empty,
    );
    let sent = headers
        .iter()
        .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?)));
    telemetry::continue_trace(&span, &TraceHeaders::from_pairs(sent));
    let response = accept(state.app, headers, body).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    if response.status().is_server_error() {
        span.record("otel.status_code", "error");
    }
    response
}

async fn accept(state: AppState, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let Some(expected) = state.ingest_token.as_ref() else {
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "INTAKE_DISABLED",
            "the HTTP intake is disabled: set AEGIS_INGEST_TOKEN to enable it",
        );
    };
    let authorized =
        bearer(&headers).is_some_and(|token| bool::from(token.as_bytes().ct_eq(expected.expose().as_bytes())));
    if !authorized {
        return reply(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "missing or wrong ingest token: send `Authorization: Bearer <ingest token>`",
        );
    }
    let token_hash: [u8; 32] = sha2::Sha256::digest(expected.expose().as_bytes()).into();
    if let Err(refusal) = state.limits.admit_intake(token_hash) {
        let mut response = reply(
            StatusCode::TOO_MANY_REQUESTS,
            "RATE_LIMITED",
            format!(
                "rate limit of this ingest token reached (AEGIS_INTAKE_RATE_LIMIT); retry after {} s",
                refusal.retry_after_secs()
            ),
        );
        response
            .headers_mut()
            .insert(axum::http::header::RETRY_AFTER, refusal.retry_after_secs().into());
        return response;
    }
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return reply(
                StatusCode::PAYLOAD_TOO_LARGE,
                "PAYLOAD_TOO_LARGE",
                format!("the event is larger than {} bytes", state.max_event_bytes),
            );
        }
        Err(rejection) => return reply(rejection.status(), "BAD_REQUEST", rejection.body_text()),
    };
    let event = match ValidatedEvent::parse(&body, Utc::now()) {
        Ok(event) => event,
        Err(error @ EnvelopeError::Malformed(_)) => {
            return reply(StatusCode::BAD_REQUEST, "MALFORMED_EVENT", error.to_string());
        }
        Err(error @ EnvelopeError::Invalid(_)) => {
            return reply(StatusCode::UNPROCESSABLE_ENTITY, "INVALID_EVENT", error.to_string());
        }
    };
    let span = tracing::Span::current();
    span.record("aegis.event.id", display(event.id()));
    span.record("aegis.event.type", event.event_type().as_str());
    span.record("aegis.tenant.id", display(event.tenant_id()));
    match tenants::tenant_by_id(&state.db, event.tenant_id()).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                "INVALID_EVENT",
                format!("tenantId: no tenant with id {}", event.tenant_id()),
            );
        }
        Err(error) => {
            tracing::error!(error = %error, "tenant lookup failed at intake");
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "the database is unavailable; retry later",
            );
        }
    }
    if let Err(error) = state
        .queue
        .publish_event(event.event_type().as_str(), event.to_envelope_json().into())
        .await
    {
        tracing::error!(error = %error, "publishing an event failed at intake");
        return reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            "the queue is unavailable; retry later",
        );
    }
    tracing::info!(event_id = %event.id(), event = %event.event_type(), "event accepted");
    (StatusCode::ACCEPTED, Json(serde_json::json!({ "id": event.id() }))).into_response()
}
