//! `POST /v1/events`: upstream services that cannot speak AMQP post envelopes
//! here. The envelope is validated, published to the events stream (the same path
//! AMQP publishers take) and only then acknowledged with 202.
//!
//! Checks come in a fixed order, each with its own answer: the ingest token
//! (401), `Content-Type: application/json` (415), the size (413), then the
//! envelope itself (400 not JSON, 422 not a valid event).
//!
//! Each request is an `intake` span; the event's `publish` span is its child,
//! and the message carries their trace on to the ingester. A scanner that
//! sends `traceparent` has the whole trace begin at its own span.

use aegis_webhook_core::event::{EnvelopeError, ValidatedEvent, too_large_reason};
use aegis_webhook_core::telemetry::{self, TraceHeaders};
use aegis_webhook_storage::tenants;
use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
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

/// Whether the request says its body is JSON: `application/json` in any case,
/// with or without parameters (`; charset=utf-8`).
fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case("application/json"))
}

pub(crate) async fn accept_event(State(state): State<RouterState>, headers: HeaderMap, body: Body) -> Response {
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

/// The checks made before the body is read: the intake is on, the token is
/// right and within its rate, the body says it is JSON.
// Boxed: a `Response` is large, and the refusal is the rare path.
fn admit(state: &AppState, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let Some(expected) = state.ingest_token.as_ref() else {
        return Err(Box::new(reply(
            StatusCode::SERVICE_UNAVAILABLE,
            "INTAKE_DISABLED",
            "the HTTP intake is disabled: set AEGIS_INGEST_TOKEN to enable it",
        )));
    };
    let authorized =
        bearer(headers).is_some_and(|token| bool::from(token.as_bytes().ct_eq(expected.expose().as_bytes())));
    if !authorized {
        return Err(Box::new(reply(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "missing or wrong ingest token: send `Authorization: Bearer <ingest token>`",
        )));
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
            .insert(header::RETRY_AFTER, refusal.retry_after_secs().into());
        return Err(Box::new(response));
    }
    if !is_json(headers) {
        return Err(Box::new(reply(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UNSUPPORTED_MEDIA_TYPE",
            "send the event as JSON, with `Content-Type: application/json`",
        )));
    }
    Ok(())
}

fn too_large(limit: usize) -> Response {
    reply(
        StatusCode::PAYLOAD_TOO_LARGE,
        "PAYLOAD_TOO_LARGE",
        too_large_reason(limit),
    )
}

/// An answer that ends the connection: sent while the client may still be
/// sending a body nobody will read, so the connection cannot carry another
/// request, and the client must not try to.
fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, axum::http::HeaderValue::from_static("close"));
    response
}

/// A refusal given before the body was read. A body within the limit is read
/// and dropped first, so the connection stays usable for the client's next
/// request; a larger one is not waited for, and the connection is closed.
async fn answer_unread(response: Response, body: Body, declared: Option<u64>, limit: usize) -> Response {
    if declared.is_some_and(|length| length > limit as u64) {
        return closing(response);
    }
    match axum::body::to_bytes(body, limit).await {
        Ok(_) => response,
        Err(_) => closing(response),
    }
}

async fn accept(state: AppState, headers: HeaderMap, body: Body) -> Response {
    let limit = state.max_event_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if let Err(refused) = admit(&state, &headers) {
        return answer_unread(*refused, body, declared, limit).await;
    }
    // The body is read only now, after the cheap checks: a declared length
    // over the limit is refused unread, and a body that turns out longer is
    // cut off at the limit.
    if declared.is_some_and(|length| length > limit as u64) {
        return closing(too_large(limit));
    }
    // A read fails when the body passes the limit (the declared length lied,
    // or there was none) or the client went away, when no one reads the answer.
    let Ok(body) = axum::body::to_bytes(body, limit).await else {
        return closing(too_large(limit));
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

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn with_content_type(value: Option<&'static str>) -> HeaderMap {
        let mut headers = HeaderMap::new();
        if let Some(value) = value {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(value));
        }
        headers
    }

    #[test]
    fn only_application_json_is_json_whatever_its_case_and_parameters() {
        for json in [
            "application/json",
            "Application/JSON",
            "application/json; charset=utf-8",
            "application/json;charset=UTF-8",
            " application/json ",
        ] {
            assert!(is_json(&with_content_type(Some(json))), "{json}");
        }
        for other in [
            "text/plain",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "application/jsonp",
            "application/cloudevents+json",
            "text/json",
            "",
        ] {
            assert!(!is_json(&with_content_type(Some(other))), "{other}");
        }
        assert!(!is_json(&with_content_type(None)), "no Content-Type");
    }
}
