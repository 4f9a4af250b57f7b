//! The customer portal, `/portal`: server-rendered pages over the same use
//! cases as GraphQL ([`crate::actions`]), so one place decides what a tenant
//! may see and do. No script at all: forms, links and one inline SVG, which
//! keeps the pages usable with a keyboard and lets the Content-Security-Policy
//! forbid every script.
//!
//! Entered through a single-use link (`createPortalSession`): its page names
//! the tenant, and the page's POST (same origin only) opens the session, an
//! HttpOnly cookie whose hash is stored (`storage::portal`). Every other
//! state-changing request is a POST carrying a token derived from the
//! session's cookie (CSRF); every signed-in page counts against the rate and
//! concurrency limits of the API key that made the session, and every request
//! runs under the GraphQL deadline.

mod chart;
mod pages;

use std::collections::HashMap;

use aegis_webhook_core::access::Scope;
use aegis_webhook_core::event::EventType;
use aegis_webhook_core::ids::{DeliveryId, WebhookId};
use aegis_webhook_storage::audit::Actor;
use aegis_webhook_storage::deliveries::{DeliveryFilter, DeliveryStatus};
use aegis_webhook_storage::portal::{self as sessions, Session};
use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use chrono::{DateTime, NaiveDateTime, Utc};
use maud::Markup;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;
use tokio::sync::OwnedSemaphorePermit;
use uuid::Uuid;

use crate::AppState;
use crate::actions::{self, Caller, WebhookDraft, WebhookEdit};
use crate::error::ApiError;

pub use pages::VERIFICATION_SNIPPET;

/// The session cookie's name.
const COOKIE: &str = "aegis_portal";

/// Rows on one page of the delivery log.
const DELIVERIES_PER_PAGE: u64 = 50;

/// Hours the webhook page's chart covers.
const CHART_HOURS: u32 = 24;

/// The largest form the portal accepts, in bytes (a webhook's fields at
/// their quotas fit many times over).
const MAX_FORM_BYTES: usize = 64 * 1024;

/// The style sheet, compiled in.
const STYLE: &str = include_str!("../../assets/portal/portal.css");

/// Where the style sheet is served: named by its content's hash, so it can
/// be cached for good and a changed one is never mixed with an old copy.
static STYLESHEET: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let hash = hex::encode(Sha256::digest(STYLE));
    format!("/portal/assets/portal-{}.css", &hash[..12])
});

/// How the portal may be framed, and its cookie sent.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// Origins allowed to frame the portal (`frame-ancestors`); empty: none.
    pub frame_ancestors: Vec<String>,
    /// The cookie is `Secure`.
    pub cookie_secure: bool,
}

/// The portal's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/portal", get(|| async { Redirect::to("/portal/webhooks") }))
        .route("/portal/open/{token}", get(link_page).post(open_link))
        .route("/portal/signout", post(sign_out))
        .route("/portal/webhooks", get(webhook_list).post(webhook_create))
        .route("/portal/webhooks/new", get(webhook_new))
        .route("/portal/webhooks/{id}", get(webhook_page))
        .route("/portal/webhooks/{id}/edit", get(webhook_edit_form).post(webhook_edit))
        .route("/portal/webhooks/{id}/active", post(webhook_set_active))
        .route("/portal/webhooks/{id}/test", post(webhook_test))
        .route("/portal/webhooks/{id}/replay", post(webhook_replay))
        .route(
            "/portal/webhooks/{id}/rotate",
            get(webhook_rotate_confirm).post(webhook_rotate),
        )
        .route(
            "/portal/webhooks/{id}/delete",
            get(webhook_delete_confirm).post(webhook_delete),
        )
        .route("/portal/events", get(event_catalog))
        .route("/portal/deliveries", get(delivery_log))
        .route("/portal/deliveries/{id}", get(delivery_page))
        .route("/portal/deliveries/{id}/redeliver", post(delivery_redeliver))
        .route("/portal/theme/{file}", get(theme_css))
        .route(&STYLESHEET, get(stylesheet))
        .route(
            "/portal/{*unknown}",
            get(|| async { message_page(StatusCode::NOT_FOUND, "Not found", "No such page here.") }),
        )
        // A larger body is refused (413) before a handler reads it.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_FORM_BYTES))
        .layer(axum::middleware::from_fn_with_state(state.clone(), under_deadline))
        .layer(axum::middleware::map_response_with_state(state.clone(), secure_headers))
        .with_state(state)
}

/// One request of a signed-in visitor.
pub(crate) struct Visit {
    caller: Caller,
    session: Session,
    /// The token every form of this session carries.
    csrf: String,
    /// Held for the request: the key's concurrency limit.
    _slot: OwnedSemaphorePermit,
}

impl Visit {
    fn can_write(&self) -> bool {
        self.caller.scopes.contains(Scope::Write)
    }
}

/// A page of a signed-in visitor: the session, admitted under its key's limits.
impl axum::extract::FromRequestParts<AppState> for Visit {
    type Rejection = Refused;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &AppState) -> Result<Self, Refused> {
        visit(state, &parts.headers).await
    }
}

/// A state-changing request of a signed-in visitor: its session and its
/// form, whose CSRF token has been checked. The only way a handler gets a
/// form, so none can forget the token.
pub(crate) struct Post {
    visit: Visit,
    form: Form,
}

impl axum::extract::FromRequest<AppState> for Post {
    type Rejection = Refused;

    async fn from_request(request: axum::extract::Request, state: &AppState) -> Result<Self, Refused> {
        let (parts, body) = request.into_parts();
        let visit = visit(state, &parts.headers).await?;
        let body = axum::body::to_bytes(body, MAX_FORM_BYTES).await.map_err(|_| {
            Refused::new(message_page(
                StatusCode::PAYLOAD_TOO_LARGE,
                "Too large",
                "This form is larger than the portal accepts (64 KiB).",
            ))
        })?;
        let form = Form::parse(&parts.headers, &body, &visit)?;
        Ok(Post { visit, form })
    }
}

/// What a portal handler answers when it cannot go on: a page (boxed: it
/// travels in every `Err`).
pub(crate) struct Refused(Box<Response>);

impl Refused {
    fn new(response: Response) -> Self {
        Refused(Box::new(response))
    }
}

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        *self.0
    }
}

impl From<ApiError> for Refused {
    fn from(error: ApiError) -> Self {
        Refused::new(error_page(&error))
    }
}

type PortalResult = Result<Response, Refused>;

/// The session the request's cookie names, admitted under its key's limits.
async fn visit(state: &AppState, headers: &HeaderMap) -> Result<Visit, Refused> {
    let Some(cookie) = session_cookie(headers) else {
        return Err(Refused::new(signed_out_page(StatusCode::UNAUTHORIZED)));
    };
    let session = match sessions::authenticate(&state.db, &cookie, Utc::now()).await {
        Ok(Some(session)) => session,
        Ok(None) => return Err(Refused::new(signed_out_page(StatusCode::UNAUTHORIZED))),
        Err(error) => return Err(ApiError::from(error).into()),
    };
    let slot = state.limits.admit_api(session.api_key_id).map_err(|refusal| {
        let message = format!(
            "Too many requests for this session's API key; wait {} s and try again.",
            refusal.retry_after_secs()
        );
        let mut response = message_page(StatusCode::TOO_MANY_REQUESTS, "Slow down", &message);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, refusal.retry_after_secs().into());
        Refused::new(response)
    })?;
    Ok(Visit {
        caller: Caller {
            tenant_id: session.tenant_id,
            actor: Actor::ApiKey(session.api_key_id),
            scopes: session.scopes,
        },
        csrf: csrf_token(&cookie),
        session,
        _slot: slot,
    })
}

fn session_cookie(headers: &HeaderMap) -> Option<String> {
    let mut ours = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .filter(|cookie| cookie.name() == COOKIE);
    let first = ours.next()?;
    // Two of them: one was set from elsewhere (a sibling domain can set a
    // cookie for its parent, with a longer path, which browsers send
    // first): answer as signed out rather than guess which is the user's.
    if ours.next().is_some() {
        return None;
    }
    Some(first.value().to_owned()).filter(|value| !value.is_empty() && value.len() <= 128)
}

/// The CSRF token of a session: derived from its cookie, which a page of
/// another site cannot read, so it needs no storage of its own.
fn csrf_token(cookie: &str) -> String {
    hex::encode(Sha256::digest(format!("aegis-portal-csrf\0{cookie}")))
}

/// A POST's fields, `application/x-www-form-urlencoded`; repeated names
/// (checkboxes) kept. Checked for the session's CSRF token before anything
/// else reads it.
struct Form(Vec<(String, String)>);

impl Form {
    fn parse(headers: &HeaderMap, body: &Bytes, visit: &Visit) -> Result<Form, Refused> {
        let urlencoded = headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_some_and(|value| value.starts_with("application/x-www-form-urlencoded"));
        if !urlencoded {
            return Err(Refused::new(message_page(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "Not a form",
                "The portal accepts forms (application/x-www-form-urlencoded) only.",
            )));
        }
        let form = Form(
            url::form_urlencoded::parse(body)
                .map(|(name, value)| (name.into_owned(), value.into_owned()))
                .collect(),
        );
        let sent = form.get("csrf").unwrap_or_default();
        if !bool::from(sent.as_bytes().ct_eq(visit.csrf.as_bytes())) {
            return Err(Refused::new(message_page(
                StatusCode::FORBIDDEN,
                "Refused",
                "This form did not come from your portal session (its security token is missing or wrong). \
                 Reload the page and try again.",
            )));
        }
        Ok(form)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    fn all(&self, name: &str) -> impl Iterator<Item = &str> {
        self.0
            .iter()
            .filter(move |(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// A page fetched with one row more than `size` (`limit + 1`): cut to
/// `size`, and its last row if another page follows (the next cursor).
fn split_page<T>(rows: &mut Vec<T>, size: u64) -> Option<&T> {
    let more = rows.len() as u64 > size;
    rows.truncate(size as usize);
    if more { rows.last() } else { None }
}

/// An id from the path; one that does not parse is as unknown as one that
/// names nothing of this tenant's.
fn parse_id<T: std::str::FromStr>(text: &str, what: &'static str) -> Result<T, Refused> {
    text.parse().map_err(|_| ApiError::NotFound(what).into())
}

// Security headers of every portal answer.

fn content_security_policy(state: &AppState, logo_origin: Option<&str>) -> String {
    let frame_ancestors = if state.portal.frame_ancestors.is_empty() {
        "'none'".to_owned()
    } else {
        state.portal.frame_ancestors.join(" ")
    };
    let logo = logo_origin.map(|origin| format!(" {origin}")).unwrap_or_default();
    format!(
        "default-src 'none'; style-src 'self'; img-src 'self' data:{logo}; form-action 'self'; \
         frame-ancestors {frame_ancestors}; base-uri 'none'"
    )
}

/// Every answer of the portal leaves through here: the policy (unless the
/// page set its own, with the session's logo), framing, and no caching or
/// `Referer` (pages hold secrets and a tenant's data, and the sign-in link
/// must not travel on). Assets set their own caching.
async fn secure_headers(State(state): State<AppState>, mut response: Response) -> Response {
    let csp = content_security_policy(&state, None);
    let headers = response.headers_mut();
    if !headers.contains_key(header::CONTENT_SECURITY_POLICY)
        && let Ok(value) = HeaderValue::from_str(&csp)
    {
        headers.insert(header::CONTENT_SECURITY_POLICY, value);
    }
    if state.portal.frame_ancestors.is_empty() {
        headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
    if !headers.contains_key(header::CACHE_CONTROL) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    response
}

/// Every portal request runs under the deadline GraphQL requests have
/// (`AEGIS_GRAPHQL_TIMEOUT`); its work is dropped past it.
async fn under_deadline(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let deadline = state.graphql_timeout;
    match tokio::time::timeout(deadline, next.run(request)).await {
        Ok(response) => response,
        Err(_) => message_page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Too slow",
            &format!(
                "This page took longer than {} ms (AEGIS_GRAPHQL_TIMEOUT) and was stopped; narrow the filters or \
                 try again.",
                deadline.as_millis()
            ),
        ),
    }
}

fn logo_origin(session: &Session) -> Option<String> {
    let logo = url::Url::parse(session.theme.logo_url.as_deref()?).ok()?;
    Some(logo.origin().ascii_serialization())
}

fn html(status: StatusCode, markup: Markup) -> Response {
    let mut response = (status, markup.into_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    response
}

/// A page of a signed-in visitor; its policy allows the session's logo.
fn respond(state: &AppState, visit: &Visit, status: StatusCode, markup: Markup) -> Response {
    let mut response = html(status, markup);
    let csp = content_security_policy(state, logo_origin(&visit.session).as_deref());
    if let Ok(value) = HeaderValue::from_str(&csp) {
        response.headers_mut().insert(header::CONTENT_SECURITY_POLICY, value);
    }
    response
}

/// 303 to `location` (after a POST: a reload does not send the form again).
fn see_other(location: &str) -> Response {
    Redirect::to(location).into_response()
}

fn message_page(status: StatusCode, title: &str, message: &str) -> Response {
    html(status, pages::message(title, message))
}

fn signed_out_page(status: StatusCode) -> Response {
    message_page(
        status,
        "Signed out",
        "This browser has no portal session, or it has ended. Open a new portal link from the application that \
         sent you here.",
    )
}

/// An error of a use case as a page: what the GraphQL error would say.
fn error_page(error: &ApiError) -> Response {
    match error {
        ApiError::NotFound(what) => message_page(
            StatusCode::NOT_FOUND,
            "Not found",
            &format!("No such {what} here. It may have been deleted, or the link is wrong."),
        ),
        ApiError::BadUserInput { message, .. } => message_page(StatusCode::BAD_REQUEST, "Check your input", message),
        ApiError::Forbidden(message) => message_page(StatusCode::FORBIDDEN, "Not allowed", message),
        ApiError::Expunged(message) => message_page(StatusCode::GONE, "Expunged", message),
        ApiError::Conflict(message) | ApiError::QuotaExceeded(message) => {
            message_page(StatusCode::CONFLICT, "Not done", message)
        }
        ApiError::Busy => {
            let mut response = message_page(
                StatusCode::SERVICE_UNAVAILABLE,
                "Busy",
                "The service is busy; try again in a moment.",
            );
            response.headers_mut().insert(header::RETRY_AFTER, 1.into());
            response
        }
        ApiError::Internal(error) => {
            tracing::error!(error = %error, "a portal request failed");
            message_page(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Something went wrong",
                "Something went wrong on our side; it has been logged. Try again later.",
            )
        }
    }
}

// Signing in and out.

const LINK_REFUSED: &str = "This portal link has been used already, has expired, or was never valid. A link works \
     once, and only for a short time after it is made; ask the application that sent you for a new one.";

/// `GET /portal/open/{token}`: the single-use link's page, naming the tenant
/// it opens, with a button that opens it. A GET changes nothing, so a mail
/// scanner or a browser's prefetch does not use the link up.
async fn link_page(State(state): State<AppState>, Path(token): Path<String>) -> PortalResult {
    let tenant = if token.len() > 128 {
        None
    } else {
        sessions::peek_link(&state.db, &token, Utc::now())
            .await
            .map_err(ApiError::from)?
    };
    let Some(tenant) = tenant else {
        return Ok(message_page(StatusCode::FORBIDDEN, "Link not valid", LINK_REFUSED));
    };
    Ok(html(
        StatusCode::OK,
        pages::open_link(&tenant, &format!("/portal/open/{token}")),
    ))
}

/// `POST /portal/open/{token}`: uses the link up, sets the session cookie
/// and goes to the webhooks. Only from the link's own page: a form of
/// another site must not sign a visitor in to somebody else's tenant.
async fn open_link(State(state): State<AppState>, headers: HeaderMap, Path(token): Path<String>) -> PortalResult {
    if !same_origin(&headers) {
        return Ok(message_page(
            StatusCode::FORBIDDEN,
            "Refused",
            "A portal link is opened from its own page. Open the link itself.",
        ));
    }
    let opened = if token.len() > 128 {
        None
    } else {
        sessions::open_link(&state.db, &token, Utc::now())
            .await
            .map_err(ApiError::from)?
    };
    let Some((session, cookie)) = opened else {
        return Ok(message_page(StatusCode::FORBIDDEN, "Link not valid", LINK_REFUSED));
    };
    let mut response = see_other("/portal/webhooks");
    let max_age = (session.expires_at - Utc::now()).num_seconds().max(0);
    let cookie = session_set_cookie(&state, cookie, max_age);
    if let Ok(value) = HeaderValue::from_str(&cookie.to_string()) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    tracing::info!(tenant_id = %session.tenant_id, session_id = %session.id, "portal session opened");
    Ok(response)
}

/// Whether a POST came from a page of this server, as far as the browser
/// says: `Sec-Fetch-Site`, else `Origin` against `Host`. A client that sends
/// neither (not a browser) is not a cross-site form.
fn same_origin(headers: &HeaderMap) -> bool {
    let header = |name| headers.get(name).and_then(|value: &HeaderValue| value.to_str().ok());
    if let Some(site) = header("sec-fetch-site") {
        return matches!(site, "same-origin" | "none");
    }
    match (header("origin"), header("host")) {
        (Some(origin), Some(host)) => origin.split_once("://").is_some_and(|(_, authority)| authority == host),
        (Some(_), None) => false,
        (None, _) => true,
    }
}

fn session_set_cookie(state: &AppState, value: String, max_age_secs: i64) -> cookie::Cookie<'static> {
    let framed = !state.portal.frame_ancestors.is_empty();
    let mut cookie = cookie::Cookie::build((COOKIE, value))
        .path("/portal")
        .http_only(true)
        .secure(state.portal.cookie_secure)
        .max_age(cookie::time::Duration::seconds(max_age_secs));
    cookie = if framed {
        // Sent inside another site's frame only as SameSite=None (which needs
        // Secure); Partitioned keeps it to that embedding site, where
        // browsers block other third-party cookies.
        cookie.same_site(cookie::SameSite::None).partitioned(true)
    } else {
        cookie.same_site(cookie::SameSite::Lax)
    };
    cookie.build()
}

/// `POST /portal/signout`.
async fn sign_out(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> PortalResult {
    let cleared = session_set_cookie(&state, String::new(), 0);
    let clear = |mut response: Response| {
        if let Ok(value) = HeaderValue::from_str(&cleared.to_string()) {
            response.headers_mut().insert(header::SET_COOKIE, value);
        }
        response
    };
    // An ended or unknown session still loses its cookie.
    let visit = match visit(&state, &headers).await {
        Ok(visit) => visit,
        Err(refused) => return Ok(clear(refused.into_response())),
    };
    Form::parse(&headers, &body, &visit)?;
    if let Some(cookie) = session_cookie(&headers) {
        sessions::end(&state.db, &cookie, Utc::now())
            .await
            .map_err(ApiError::from)?;
    }
    Ok(clear(signed_out_page(StatusCode::OK)))
}

// Webhooks.

#[derive(serde::Deserialize)]
struct ListQuery {
    after: Option<String>,
}

/// Webhooks on one page of the list.
const WEBHOOKS_PER_PAGE: u64 = 50;

async fn webhook_list(State(state): State<AppState>, visit: Visit, Query(query): Query<ListQuery>) -> PortalResult {
    let after = query
        .after
        .as_deref()
        .map(|id| parse_id::<WebhookId>(id, "page"))
        .transpose()?;
    let mut page = actions::webhooks_page(&state, &visit.caller, after, WEBHOOKS_PER_PAGE).await?;
    let next = split_page(&mut page, WEBHOOKS_PER_PAGE).map(|view| view.webhook.id);
    let ids: Vec<WebhookId> = page.iter().map(|view| view.webhook.id).collect();
    let stats = actions::stats_of(&state, &visit.caller, &ids).await?;
    let markup = pages::webhook_list(&visit, &page, &stats, next);
    Ok(respond(&state, &visit, StatusCode::OK, markup))
}

async fn webhook_new(State(state): State<AppState>, visit: Visit) -> PortalResult {
    visit.caller.require(Scope::Write)?;
    let markup = pages::webhook_form(&visit, None, &pages::WebhookFields::default(), None);
    Ok(respond(&state, &visit, StatusCode::OK, markup))
}

/// The fields of the webhook form, as sent.
fn webhook_fields(form: &Form) -> pages::WebhookFields {
    pages::WebhookFields {
        url: form.get("url").unwrap_or_default().trim().to_owned(),
        events: form.all("events").map(str::to_owned).collect(),
        // Browsers send a textarea's line breaks as CRLF; a description keeps
        // plain line breaks (a carriage return is a refused control character).
        description: form.get("description").unwrap_or_default().replace("\r\n", "\n"),
        project_ids: form.get("project_ids").unwrap_or_default().to_owned(),
        secret: form.get("secret").unwrap_or_default().to_owned(),
        active: form.get("active").is_some(),
    }
}

fn parse_events(fields: &pages::WebhookFields) -> Result<Vec<EventType>, ApiError> {
    fields
        .events
        .iter()
        .map(|name| {
            name.parse::<EventType>()
                .map_err(|_| ApiError::bad_input("events", format!("events: `{name}` is not an event type")))
        })
        .collect()
}

fn parse_project_ids(text: &str) -> Vec<String> {
    text.split([',', '\n', ' ', '\r', '\t'])
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .collect()
}

async fn webhook_create(State(state): State<AppState>, Post { visit, form }: Post) -> PortalResult {
    let fields = webhook_fields(&form);
    let created = async {
        let draft = WebhookDraft {
            url: fields.url.clone(),
            events: parse_events(&fields)?,
            secret: Some(fields.secret.trim().to_owned()).filter(|secret| !secret.is_empty()),
            description: Some(fields.description.clone()),
            project_ids: Some(parse_project_ids(&fields.project_ids)),
            active: Some(fields.active),
        };
        actions::create_webhook(&state, &visit.caller, draft).await
    }
    .await;
    match created {
        // Shown now, with its secret, which the visitor set or has just had
        // generated (as `createWebhook` answers it).
        Ok(view) => {
            let markup = pages::webhook_created(&visit, &view);
            Ok(respond(&state, &visit, StatusCode::CREATED, markup))
        }
        Err(ApiError::BadUserInput { field, message }) => {
            let markup = pages::webhook_form(
                &visit,
                None,
                &fields,
                Some(pages::FieldError {
                    field,
                    message: &message,
                }),
            );
            Ok(respond(&state, &visit, StatusCode::BAD_REQUEST, markup))
        }
        Err(error) => Err(error.into()),
    }
}

#[derive(serde::Deserialize)]
struct WebhookQuery {
    reveal: Option<String>,
    replayed: Option<u64>,
    changed: Option<String>,
}

async fn webhook_page(
    State(state): State<AppState>,
    visit: Visit,
    Path(id): Path<String>,
    Query(query): Query<WebhookQuery>,
) -> PortalResult {
    let id: WebhookId = parse_id(&id, "webhook")?;
    let view = actions::webhook(&state, &visit.caller, id).await?;
    let stats = actions::stats_of(&state, &visit.caller, &[id]).await?;
    let hours = actions::deliveries_by_hour(&state, &visit.caller, id, CHART_HOURS).await?;
    let reveal = query.reveal.as_deref() == Some("secret");
    let notice = query.replayed.map(|count| {
        let more = if count >= actions::MAX_REPLAY {
            format!(" (at most {} at a time: replay again for more)", actions::MAX_REPLAY)
        } else {
            String::new()
        };
        format!("Failed deliveries sent again: {count}{more}.")
    });
    let notice = notice.or_else(|| {
        query.changed.map(|_| {
            "Nothing done: the webhook had changed since that page was shown (its secret was rotated already?). \
             Here it is as it is now."
                .to_owned()
        })
    });
    let markup = pages::webhook_page(
        &visit,
        &view,
        stats.get(&id).copied().unwrap_or_default(),
        &chart::deliveries_by_hour(&hours),
        reveal,
        notice.as_deref(),
    );
    Ok(respond(&state, &visit, StatusCode::OK, markup))
}

async fn webhook_edit_form(State(state): State<AppState>, visit: Visit, Path(id): Path<String>) -> PortalResult {
    visit.caller.require(Scope::Write)?;
    let id: WebhookId = parse_id(&id, "webhook")?;
    let view = actions::webhook(&state, &visit.caller, id).await?;
    let fields = pages::WebhookFields::of(&view.webhook);
    let markup = pages::webhook_form(&visit, Some(id), &fields, None);
    Ok(respond(&state, &visit, StatusCode::OK, markup))
}

async fn webhook_edit(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Post { visit, form }: Post,
) -> PortalResult {
    let id: WebhookId = parse_id(&id, "webhook")?;
    let fields = webhook_fields(&form);
    let edited = async {
        // A field the form did not send is left as it is (`WebhookEdit`).
        let sent = |name| form.get(name).is_some();
        let edit = WebhookEdit {
            url: sent("url").then(|| fields.url.clone()),
            events: sent("events").then(|| parse_events(&fields)).transpose()?,
            description: sent("description").then(|| fields.description.clone()),
            project_ids: sent("project_ids").then(|| parse_project_ids(&fields.project_ids)),
        };
        actions::update_webhook(&state, &visit.caller, id, edit).await
    }
    .await;
    match edited {
        Ok(_) => Ok(see_other(&format!("/portal/webhooks/{id}"))),
        Err(ApiError::BadUserInput { field, message }) => {
            let markup = pages::webhook_form(
                &visit,
                Some(id),
                &fields,
                Some(pages::FieldError {
                    field,
                    message: &message,
                }),
            );
            Ok(respond(&state, &visit, StatusCode::BAD_REQUEST, markup))
        }
        Err(error) => Err(error.into()),
    }
}

async fn webhook_set_active(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Post { visit, form }: Post,
) -> PortalResult {
    let id: WebhookId = parse_id(&id, "webhook")?;
    let active = match form.get("active") {
        Some("true") => true,
        Some("false") => false,
        _ => return Err(ApiError::bad_input("active", "active: must be true or false").into()),
    };
    actions::set_active(&state, &visit.caller, id, active).await?;
    Ok(see_other(&format!("/portal/webhooks/{id}")))
}

async fn webhook_test(State(state): State<AppState>, Path(id): Path<String>, Post { visit, .. }: Post) -> PortalResult {
    let id: WebhookId = parse_id(&id, "webhook")?;
    let delivery = actions::test_webhook(&state, &visit.caller, id).await?;
    Ok(see_other(&format!("/portal/deliveries/{}", delivery.id)))
}

async fn webhook_replay(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Post { visit, form }: Post,
) -> PortalResult {
    let id: WebhookId = parse_id(&id, "webhook")?;
    let since = parse_time(form.get("since").unwrap_or_default(), "since")?
        .ok_or_else(|| ApiError::bad_input("since", "since: choose the time from which to replay"))?;
    let replayed = actions::replay_dead_letters(&state, &visit.caller, id, since).await?;
    Ok(see_other(&format!("/portal/webhooks/{id}?replayed={replayed}")))
}

async fn webhook_rotate_confirm(State(state): State<AppState>, visit: Visit, Path(id): Path<String>) -> PortalResult {
    visit.caller.require(Scope::Write)?;
    let id: WebhookId = parse_id(&id, "webhook")?;
    let view = actions::webhook(&state, &visit.caller, id).await?;
    let grace = humantime::format_duration(state.secret_rotation_grace).to_string();
    let markup = pages::rotate_confirm(&visit, &view, &grace);
    Ok(respond(&state, &visit, StatusCode::OK, markup))
}

async fn webhook_rotate(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Post { visit, form }: Post,
) -> PortalResult {
    visit.caller.require(Scope::Write)?;
    let id: WebhookId = parse_id(&id, "webhook")?;
    // The form names the webhook as it was shown: sent again (a reload, the
    // back button) after the rotation changed it, it rotates nothing, or
    // the secret just copied would be wrong at once.
    let current = actions::webhook(&state, &visit.caller, id).await?;
    if form.get("version") != Some(pages::version_of(&current.webhook).as_str()) {
        return Ok(see_other(&format!("/portal/webhooks/{id}?changed=1")));
    }
    let view = actions::rotate_secret(&state, &visit.caller, id, None).await?;
    let markup = pages::secret_rotated(&visit, &view);
    Ok(respond(&state, &visit, StatusCode::OK, markup))
}

async fn webhook_delete_confirm(State(state): State<AppState>, visit: Visit, Path(id): Path<String>) -> PortalResult {
    visit.caller.require(Scope::Write)?;
    let id: WebhookId = parse_id(&id, "webhook")?;
    let view = actions::webhook(&state, &visit.caller, id).await?;
    let markup = pages::delete_confirm(&visit, &view);
    Ok(respond(&state, &visit, StatusCode::OK, markup))
}

async fn webhook_delete(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Post { visit, .. }: Post,
) -> PortalResult {
    let id: WebhookId = parse_id(&id, "webhook")?;
    actions::delete_webhook(&state, &visit.caller, id).await?;
    Ok(see_other("/portal/webhooks"))
}

// The event catalog.

async fn event_catalog(State(state): State<AppState>, visit: Visit) -> PortalResult {
    let markup = pages::event_catalog(&visit);
    Ok(respond(&state, &visit, StatusCode::OK, markup))
}

// Deliveries.

/// A `datetime-local` field (UTC, as the form says) or an RFC 3339 time;
/// empty is none.
fn parse_time(text: &str, field: &'static str) -> Result<Option<DateTime<Utc>>, ApiError> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    if let Ok(time) = DateTime::parse_from_rfc3339(text) {
        return Ok(Some(time.with_timezone(&Utc)));
    }
    ["%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S%.f"]
        .iter()
        .find_map(|format| NaiveDateTime::parse_from_str(text, format).ok())
        .map(|time| Some(time.and_utc()))
        .ok_or_else(|| {
            let shown: String = text.chars().take(40).collect();
            ApiError::bad_input(
                field,
                format!("{field}: `{shown}` is not a time (YYYY-MM-DDTHH:MM, UTC)"),
            )
        })
}

/// The delivery log's filters as the query string holds them.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct LogQuery {
    #[serde(default)]
    webhook: String,
    #[serde(default)]
    status: String,
    #[serde(default)]
    event: String,
    #[serde(default)]
    since: String,
    #[serde(default)]
    until: String,
    before: Option<String>,
}

impl LogQuery {
    fn filter(&self) -> Result<DeliveryFilter, Refused> {
        let webhook_id = match self.webhook.as_str() {
            "" => None,
            id => Some(parse_id::<WebhookId>(id, "webhook")?),
        };
        let status = match self.status.as_str() {
            "" => None,
            status => Some(
                status
                    .parse::<DeliveryStatus>()
                    .map_err(|_| ApiError::bad_input("status", "status: must be PENDING, SUCCEEDED or FAILED"))?,
            ),
        };
        let event_type = match self.event.as_str() {
            "" => None,
            event => Some(
                event
                    .parse::<EventType>()
                    .map_err(|_| ApiError::bad_input("event", "event: not an event type"))?,
            ),
        };
        Ok(DeliveryFilter {
            webhook_id,
            status,
            event_type,
            created_after: parse_time(&self.since, "since")?,
            created_before: parse_time(&self.until, "until")?,
        })
    }

    /// The query string of these filters, for the next page's link.
    fn filters_query(&self) -> String {
        url::form_urlencoded::Serializer::new(String::new())
            .append_pair("webhook", &self.webhook)
            .append_pair("status", &self.status)
            .append_pair("event", &self.event)
            .append_pair("since", &self.since)
            .append_pair("until", &self.until)
            .finish()
    }
}

async fn delivery_log(State(state): State<AppState>, visit: Visit, Query(query): Query<LogQuery>) -> PortalResult {
    let filter = query.filter()?;
    let before: Option<Uuid> = query.before.as_deref().map(|id| parse_id(id, "page")).transpose()?;
    let mut page = actions::deliveries_page(&state, &visit.caller, &filter, before, DELIVERIES_PER_PAGE).await?;
    let older = split_page(&mut page, DELIVERIES_PER_PAGE).map(|delivery| delivery.id);
    // The webhook filter's choices, and each row's URL.
    let webhooks =
        actions::webhooks_page(&state, &visit.caller, None, u64::from(state.quotas.webhooks_per_tenant)).await?;
    let urls: HashMap<WebhookId, String> = webhooks
        .iter()
        .map(|view| (view.webhook.id, view.webhook.url.as_str().to_owned()))
        .collect();
    let older_link = older.map(|id| format!("/portal/deliveries?{}&before={id}", query.filters_query()));
    let markup = pages::delivery_log(&visit, &query, &page, &urls, older_link.as_deref());
    Ok(respond(&state, &visit, StatusCode::OK, markup))
}

#[derive(serde::Deserialize)]
struct DeliveryQuery {
    redelivered: Option<String>,
}

async fn delivery_page(
    State(state): State<AppState>,
    visit: Visit,
    Path(id): Path<String>,
    Query(query): Query<DeliveryQuery>,
) -> PortalResult {
    let id: DeliveryId = parse_id(&id, "delivery")?;
    let delivery = actions::delivery(&state, &visit.caller, id).await?;
    let event = actions::event_of(&state, &visit.caller, &delivery).await?;
    let view = actions::webhook(&state, &visit.caller, delivery.webhook_id).await?;
    let attempts = actions::attempts_of(&state, &visit.caller, &[id], true)
        .await?
        .remove(&id)
        .unwrap_or_default();
    let notice = query
        .redelivered
        .map(|_| "Sent again: the new attempt appears below once it is made (reload the page).");
    let markup = pages::delivery_page(&visit, &delivery, &event, &view, &attempts, notice);
    Ok(respond(&state, &visit, StatusCode::OK, markup))
}

async fn delivery_redeliver(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Post { visit, .. }: Post,
) -> PortalResult {
    let id: DeliveryId = parse_id(&id, "delivery")?;
    actions::redeliver(&state, &visit.caller, id).await?;
    Ok(see_other(&format!("/portal/deliveries/{id}?redelivered=1")))
}

// Style.

async fn stylesheet() -> Response {
    css(STYLE.to_owned())
}

/// A style sheet named by its content (its path changes when it does):
/// cached for good. (`nosniff` and the rest: `secure_headers`.)
fn css(body: String) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/css; charset=utf-8"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    response
}

/// `GET /portal/theme/<rrggbb>.css`: an accent colour as a style sheet (so
/// no inline style is needed and the policy keeps `style-src 'self'`). Named
/// by the colour itself: no session to look up, cached for good.
async fn theme_css(Path(file): Path<String>) -> Response {
    let colour = file
        .strip_suffix(".css")
        .filter(|hex| hex.len() == 6 && hex.chars().all(|c| c.is_ascii_hexdigit()));
    let Some(colour) = colour else {
        return message_page(StatusCode::NOT_FOUND, "Not found", "No such page here.");
    };
    css(format!(":root {{ --accent: #{}; }}\n", colour.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_datetime_local_field_is_utc_and_garbage_is_a_clear_error() {
        let parsed = parse_time("2026-12-03T10:30", "since").expect("valid");
        assert_eq!(
            parsed.map(|time| time.to_rfc3339()),
            Some("2026-12-03T10:30:00+00:00".to_owned())
        );
        assert_eq!(parse_time("  ", "since").expect("empty is none"), None);
        let Err(ApiError::BadUserInput { message, .. }) = parse_time("yesterday", "until") else {
            panic!("garbage must be refused");
        };
        assert!(message.contains("until: `yesterday` is not a time"), "{message}");
    }

    #[test]
    fn a_request_carrying_two_session_cookies_is_signed_out() {
        let with = |cookies: &[&str]| {
            let mut headers = HeaderMap::new();
            for cookie in cookies {
                headers.append(header::COOKIE, cookie.parse().expect("header"));
            }
            session_cookie(&headers)
        };
        assert_eq!(with(&["theme=dark; aegis_portal=abc"]), Some("abc".to_owned()));
        assert_eq!(with(&["aegis_portal=planted; aegis_portal=abc"]), None);
        assert_eq!(with(&["aegis_portal=planted", "aegis_portal=abc"]), None);
        assert_eq!(with(&["aegis_portal="]), None);
        assert_eq!(with(&["other=1"]), None);
    }

    #[test]
    fn the_csrf_token_is_bound_to_the_session_cookie() {
        assert_eq!(csrf_token("a"), csrf_token("a"));
        assert_ne!(csrf_token("a"), csrf_token("b"));
        assert_eq!(csrf_token("a").len(), 64);
    }

    #[test]
    fn project_ids_may_be_separated_by_commas_spaces_or_lines() {
        assert_eq!(parse_project_ids(" a, b\nc  d,,\r\n"), vec!["a", "b", "c", "d"]);
    }
}
