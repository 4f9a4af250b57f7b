//! The portal's pages as markup (maud: checked at compile time, every value
//! escaped). The handlers in `portal` fetch what a page shows through the
//! use cases; a page function only arranges it (and signs the headers the
//! delivery page shows, as the worker does).

use std::collections::HashMap;

use aegis_webhook_core::event::{EventType, delivered_body};
use aegis_webhook_core::ids::WebhookId;
use aegis_webhook_core::signing;
use aegis_webhook_storage::deliveries::{Attempt, Delivery, DeliveryStatus, WebhookDeliveryStats};
use aegis_webhook_storage::events::StoredEvent;
use aegis_webhook_storage::webhooks::Webhook;
use chrono::{DateTime, Utc};
use maud::{DOCTYPE, Markup, html};

use super::{LogQuery, STYLESHEET, Visit};
use crate::actions::WebhookView;

/// The seed's verification snippet, word for word, shown beside a secret.
pub const VERIFICATION_SNIPPET: &str = r"import crypto from 'crypto';

function verifyWebhookSignature(
  payload: string,
  signature: string,
  secret: string
): boolean {
  const hmac = crypto.createHmac('sha256', secret);
  const expectedSignature = 'sha256=' + hmac.update(payload).digest('hex');
  return crypto.timingSafeEqual(
    Buffer.from(signature),
    Buffer.from(expectedSignature)
  );
}";

/// Which part of the portal a page belongs to, for the navigation.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Section {
    Webhooks,
    Deliveries,
    Events,
}

fn time(at: DateTime<Utc>) -> Markup {
    html! { time datetime=(at.to_rfc3339()) { (at.format("%Y-%m-%d %H:%M:%S UTC")) } }
}

fn csrf(visit: &Visit) -> Markup {
    html! { input type="hidden" name="csrf" value=(visit.csrf); }
}

/// Every page of a signed-in visitor: header, navigation, main content.
fn layout(visit: &Visit, section: Section, title: &str, content: Markup) -> Markup {
    let nav = [
        (Section::Webhooks, "/portal/webhooks", "Webhooks"),
        (Section::Deliveries, "/portal/deliveries", "Deliveries"),
        (Section::Events, "/portal/events", "Event catalog"),
    ];
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title, visit.session.theme.accent_color.as_deref()))
            body {
                a class="skip" href="#main" { "Skip to content" }
                header class="top" {
                    div class="brand" {
                        @if let Some(logo) = &visit.session.theme.logo_url {
                            img src=(logo) alt="" class="logo";
                        }
                        span { "Aegis Webhooks" }
                    }
                    nav aria-label="Portal" {
                        ul {
                            @for (target, href, label) in nav {
                                li {
                                    @if target == section {
                                        a href=(href) aria-current="page" { (label) }
                                    } @else {
                                        a href=(href) { (label) }
                                    }
                                }
                            }
                        }
                    }
                    form method="post" action="/portal/signout" class="signout" {
                        (csrf(visit))
                        button type="submit" class="link" { "Sign out" }
                    }
                }
                main id="main" {
                    @if !visit.can_write() {
                        p class="notice" role="status" { "Read-only session: you can look, not change." }
                    }
                    (content)
                }
            }
        }
    }
}

/// Every page's `<head>`: its title, the style sheet, and the session's
/// accent colour if it has one.
fn head(title: &str, accent: Option<&str>) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " — Aegis Webhooks" }
            link rel="stylesheet" href=(*STYLESHEET);
            @if let Some(accent) = accent {
                link rel="stylesheet" href=(format!("/portal/theme/{}.css", accent.trim_start_matches('#')));
            }
        }
    }
}

/// A page with a title and a sentence: errors, signing out.
pub fn message(title: &str, message: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(title, None))
            body {
                main id="main" class="message" {
                    h1 { (title) }
                    p { (message) }
                    p { a href="/portal/webhooks" { "Back to your webhooks" } }
                }
            }
        }
    }
}

/// A link's own page: whose webhooks it opens, and the button that opens them.
pub fn open_link(tenant: &str, action: &str) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head("Open the portal", None))
            body {
                main id="main" class="message" {
                    h1 { "Aegis Webhooks" }
                    p { "This link opens the webhooks of " strong { (tenant) } " in this browser." }
                    form method="post" action=(action) {
                        button type="submit" { "Open the webhooks of " (tenant) }
                    }
                }
            }
        }
    }
}

fn status_of(webhook: &Webhook) -> Markup {
    html! {
        @if webhook.active {
            span class="badge ok" { "Active" }
        } @else {
            // Paused by someone, or disabled after failing for too long: the
            // reason says which.
            span class="badge bad" { "Paused" }
            @if let Some(reason) = &webhook.disabled_reason {
                " " span class="reason" { (reason) }
            }
        }
    }
}

fn success_rate(stats: &WebhookDeliveryStats) -> String {
    let finished = stats.succeeded + stats.failed;
    if finished == 0 {
        return "—".to_owned();
    }
    let rate = stats.succeeded as f64 * 100.0 / finished as f64;
    format!("{rate:.1} %")
}

pub fn webhook_list(
    visit: &Visit,
    page: &[WebhookView],
    stats: &HashMap<WebhookId, WebhookDeliveryStats>,
    next: Option<WebhookId>,
) -> Markup {
    let content = html! {
        div class="heading" {
            h1 { "Webhooks" }
            @if visit.can_write() {
                a class="button" href="/portal/webhooks/new" { "New webhook" }
            }
        }
        @if page.is_empty() {
            p { "No webhooks yet." }
        } @else {
            div class="table-wrap" role="region" aria-label="Webhooks" tabindex="0" {
                table class="cards" {
                    thead {
                        tr {
                            th scope="col" { "Endpoint" }
                            th scope="col" { "Status" }
                            th scope="col" { "Success rate" }
                            th scope="col" { "Last success" }
                            th scope="col" { "Failure streak" }
                        }
                    }
                    tbody {
                        @for view in page {
                            @let webhook = &view.webhook;
                            @let stat = stats.get(&webhook.id).copied().unwrap_or_default();
                            tr {
                                td data-label="Endpoint" class="endpoint" {
                                    a href=(format!("/portal/webhooks/{}", webhook.id)) { (webhook.url.as_str()) }
                                    @if let Some(description) = &webhook.description {
                                        div class="muted" { (description) }
                                    }
                                }
                                td data-label="Status" { (status_of(webhook)) }
                                td data-label="Success rate" { (success_rate(&stat)) }
                                td data-label="Last success" {
                                    @match stat.last_success_at {
                                        Some(at) => (time(at)),
                                        None => "never",
                                    }
                                }
                                td data-label="Failure streak" { (webhook.consecutive_failures) }
                            }
                        }
                    }
                }
            }
        }
        @if let Some(after) = next {
            p { a href=(format!("/portal/webhooks?after={after}")) { "More webhooks" } }
        }
    };
    layout(visit, Section::Webhooks, "Webhooks", content)
}

/// The webhook form's fields as shown (and as sent back when refused).
#[derive(Debug, Default, Clone)]
pub struct WebhookFields {
    pub url: String,
    pub events: Vec<String>,
    pub description: String,
    pub project_ids: String,
    pub secret: String,
    pub active: bool,
}

impl WebhookFields {
    pub fn of(webhook: &Webhook) -> Self {
        WebhookFields {
            url: webhook.url.as_str().to_owned(),
            events: webhook.events.iter().map(|event| event.as_str().to_owned()).collect(),
            description: webhook.description.clone().unwrap_or_default(),
            project_ids: webhook
                .project_ids
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
            secret: String::new(),
            active: webhook.active,
        }
    }
}

/// New (`editing` none) or edit.
/// A refused input: the API's name of the field, and why.
pub struct FieldError<'a> {
    pub field: &'static str,
    pub message: &'a str,
}

/// New (`editing` none) or edit; after a refusal, the reason is announced,
/// tied to its field, and the page opens at it.
pub fn webhook_form(
    visit: &Visit,
    editing: Option<WebhookId>,
    fields: &WebhookFields,
    error: Option<FieldError<'_>>,
) -> Markup {
    let (title, action) = match editing {
        // `#form-error`: after a refusal the page opens at the reason.
        Some(id) => ("Edit webhook", format!("/portal/webhooks/{id}/edit#form-error")),
        None => ("New webhook", "/portal/webhooks#form-error".to_owned()),
    };
    let refused = |field: &str| error.as_ref().is_some_and(|error| error.field == field);
    let invalid = |field: &str| refused(field).then_some("true");
    let described = |field: &str, help: Option<&str>| match (refused(field), help) {
        (true, Some(help)) => Some(format!("{help} form-error")),
        (true, None) => Some("form-error".to_owned()),
        (false, help) => help.map(str::to_owned),
    };
    let fields = if editing.is_none() && error.is_none() && fields.url.is_empty() {
        // A new webhook starts active.
        WebhookFields {
            active: true,
            ..fields.clone()
        }
    } else {
        fields.clone()
    };
    let content = html! {
        h1 { (title) }
        @if let Some(error) = &error {
            p class="error" role="alert" id="form-error" tabindex="-1" { (error.message) }
        }
        form method="post" action=(action) class="stack" {
            (csrf(visit))
            label for="url" { "Endpoint URL" }
            input id="url" name="url" type="url" required value=(fields.url) placeholder="https://example.com/webhooks/aegis"
                aria-describedby=[described("url", Some("url-help"))] aria-invalid=[invalid("url")];
            p id="url-help" class="help" { "Where the POSTs go: HTTPS, reachable from the internet." }
            fieldset aria-describedby=[described("events", None)] {
                legend { "Events" }
                @for event in EventType::ALL.into_iter().filter(|event| event.is_subscribable()) {
                    @let id = format!("event-{}", event.as_str());
                    div class="check" {
                        input type="checkbox" id=(id) name="events" value=(event.as_str())
                            checked[fields.events.iter().any(|chosen| chosen == event.as_str())];
                        label for=(id) { code { (event.as_str()) } " — " (event.description()) }
                    }
                }
            }
            label for="description" { "Description (optional)" }
            textarea id="description" name="description" rows="2"
                aria-describedby=[described("description", None)] aria-invalid=[invalid("description")] { (fields.description) }
            label for="project_ids" { "Only these projects (optional: ids, one per line)" }
            textarea id="project_ids" name="project_ids" rows="2"
                aria-describedby=[described("projectIds", None)] aria-invalid=[invalid("projectIds")] { (fields.project_ids) }
            @if editing.is_none() {
                label for="secret" { "Signing secret (optional: leave empty to generate one)" }
                input id="secret" name="secret" type="password" autocomplete="new-password" value=(fields.secret)
                    aria-describedby=[described("secret", None)] aria-invalid=[invalid("secret")];
                div class="check" {
                    input type="checkbox" id="active" name="active" value="true" checked[fields.active];
                    label for="active" { "Active: send events as soon as it is created" }
                }
            }
            div class="actions" {
                button type="submit" { @if editing.is_some() { "Save" } @else { "Create webhook" } }
                a href=(editing.map_or("/portal/webhooks".to_owned(), |id| format!("/portal/webhooks/{id}"))) { "Cancel" }
            }
        }
    };
    layout(visit, Section::Webhooks, title, content)
}

fn secret_block(secret: &str) -> Markup {
    html! {
        section aria-labelledby="secret-heading" class="secret" {
            h2 id="secret-heading" { "Signing secret" }
            p { code id="secret" class="secret-value" { (secret) } }
            p {
                "Every request carries " code { "X-Aegis-Signature: sha256=<hex>" }
                ", the HMAC-SHA256 of the exact body with this secret. Verify it like this:"
            }
            pre class="code" tabindex="0" aria-label="Verification snippet" { code { (VERIFICATION_SNIPPET) } }
        }
    }
}

pub fn webhook_created(visit: &Visit, view: &WebhookView) -> Markup {
    let webhook = &view.webhook;
    let content = html! {
        h1 { "Webhook created" }
        p {
            @if webhook.active {
                "Events for " code { (webhook.url.as_str()) } " are sent from now on."
            } @else {
                code { (webhook.url.as_str()) } " is paused: resume it on its page to send events."
            }
            " Keep the secret: your receiver needs it."
        }
        @if let Ok(secret) = view.secret() {
            (secret_block(secret))
        }
        p { a class="button" href=(format!("/portal/webhooks/{}", webhook.id)) { "Go to the webhook" } }
    };
    layout(visit, Section::Webhooks, "Webhook created", content)
}

pub fn webhook_page(
    visit: &Visit,
    view: &WebhookView,
    stats: WebhookDeliveryStats,
    chart: &Markup,
    reveal: bool,
    notice: Option<&str>,
) -> Markup {
    let webhook = &view.webhook;
    let base = format!("/portal/webhooks/{}", webhook.id);
    let since_default = (Utc::now() - chrono::Duration::hours(24))
        .format("%Y-%m-%dT%H:%M")
        .to_string();
    let content = html! {
        @if let Some(notice) = notice {
            p class="notice" role="status" { (notice) }
        }
        h1 { "Webhook" }
        p class="url" { code { (webhook.url.as_str()) } }
        dl class="facts" {
            dt { "Status" } dd { (status_of(webhook)) }
            dt { "Events" } dd { @for event in &webhook.events { code { (event.as_str()) } " " } }
            @if let Some(description) = &webhook.description { dt { "Description" } dd { (description) } }
            @if !webhook.project_ids.is_empty() {
                dt { "Projects" } dd { @for id in &webhook.project_ids { code { (id) } " " } }
            }
            dt { "Success rate" } dd { (success_rate(&stats)) " (" (stats.succeeded) " succeeded, " (stats.failed) " failed, " (stats.pending) " pending)" }
            dt { "Last success" } dd { @match stats.last_success_at { Some(at) => (time(at)), None => "never" } }
            dt { "Failure streak" } dd {
                (webhook.consecutive_failures)
                @if let Some(since) = webhook.failing_since { " since " (time(since)) }
            }
            dt { "Created" } dd { (time(webhook.created_at)) }
            dt { "Id" } dd { code { (webhook.id) } }
        }
        section aria-labelledby="chart-heading" {
            h2 id="chart-heading" { "Deliveries, last 24 hours" }
            (chart)
            p class="legend" {
                span class="key succeeded" {} "Succeeded " span class="key failed" {} "Failed " span class="key pending" {} "Pending"
            }
            p { a href=(format!("/portal/deliveries?webhook={}", webhook.id)) { "See this webhook's deliveries" } }
        }
        @if visit.can_write() {
            section aria-labelledby="actions-heading" class="panel" {
                h2 id="actions-heading" { "Actions" }
                div class="actions" {
                    a class="button" href=(format!("{base}/edit")) { "Edit" }
                    form method="post" action=(format!("{base}/active")) {
                        (csrf(visit))
                        @if webhook.active {
                            input type="hidden" name="active" value="false";
                            button type="submit" { "Pause" }
                        } @else {
                            input type="hidden" name="active" value="true";
                            button type="submit" { "Resume" }
                        }
                    }
                    form method="post" action=(format!("{base}/test")) {
                        (csrf(visit))
                        button type="submit" { "Send test event" }
                    }
                    a class="button" href=(format!("{base}/rotate")) { "Rotate secret" }
                    a class="button danger" href=(format!("{base}/delete")) { "Delete" }
                }
                form method="post" action=(format!("{base}/replay")) class="inline" {
                    (csrf(visit))
                    label for="since" { "Replay failed deliveries created since (UTC)" }
                    input id="since" name="since" type="datetime-local" value=(since_default) required;
                    button type="submit" { "Replay failed" }
                }
            }
        }
        section aria-labelledby="secret-heading-2" {
            h2 id="secret-heading-2" { "Signing secret" }
            @if reveal {
                @match view.secret() {
                    Ok(secret) => {
                        p { code id="secret" class="secret-value" { (secret) } }
                        pre class="code" tabindex="0" aria-label="Verification snippet" { code { (VERIFICATION_SNIPPET) } }
                        p { a href=(base) { "Hide" } }
                    }
                    Err(_) => p { "Reading the secret back needs a session made with an API key that has the " code { "secrets" } " scope." },
                }
            } @else {
                p { a href=(format!("{base}?reveal=secret#secret-heading-2")) { "Reveal secret" } }
            }
        }
    };
    layout(visit, Section::Webhooks, "Webhook", content)
}

/// Which state of a webhook a form was made from: its last change.
pub fn version_of(webhook: &Webhook) -> String {
    webhook.updated_at.timestamp_micros().to_string()
}

pub fn rotate_confirm(visit: &Visit, view: &WebhookView, grace: &str) -> Markup {
    let webhook = &view.webhook;
    let content = html! {
        h1 { "Rotate the signing secret?" }
        p {
            "A new secret is generated for " code { (webhook.url.as_str()) } ". "
            code { "X-Aegis-Signature" } " uses it at once; " code { "webhook-signature" }
            " carries a signature with the old secret too for " (grace) ", so receivers can switch."
        }
        form method="post" action=(format!("/portal/webhooks/{}/rotate", webhook.id)) class="actions" {
            (csrf(visit))
            input type="hidden" name="version" value=(version_of(webhook));
            button type="submit" { "Rotate secret" }
            a href=(format!("/portal/webhooks/{}", webhook.id)) { "Cancel" }
        }
    };
    layout(visit, Section::Webhooks, "Rotate secret", content)
}

pub fn secret_rotated(visit: &Visit, view: &WebhookView) -> Markup {
    let content = html! {
        h1 { "Secret rotated" }
        @if let Ok(secret) = view.secret() {
            (secret_block(secret))
        }
        p { a class="button" href=(format!("/portal/webhooks/{}", view.webhook.id)) { "Back to the webhook" } }
    };
    layout(visit, Section::Webhooks, "Secret rotated", content)
}

pub fn delete_confirm(visit: &Visit, view: &WebhookView) -> Markup {
    let webhook = &view.webhook;
    let content = html! {
        h1 { "Delete this webhook?" }
        p { code { (webhook.url.as_str()) } " and its whole delivery log are deleted. This cannot be undone." }
        form method="post" action=(format!("/portal/webhooks/{}/delete", webhook.id)) class="actions" {
            (csrf(visit))
            button type="submit" class="danger" { "Delete webhook" }
            a href=(format!("/portal/webhooks/{}", webhook.id)) { "Cancel" }
        }
    };
    layout(visit, Section::Webhooks, "Delete webhook", content)
}

pub fn event_catalog(visit: &Visit) -> Markup {
    let content = html! {
        h1 { "Event catalog" }
        p { "What Aegis sends. Every body is " code { "{\"event\", \"timestamp\", \"data\"}" } "." }
        @for event in EventType::ALL {
            @let example = serde_json::json!({
                "event": event.as_str(),
                "timestamp": "2025-12-16T15:30:00Z",
                "data": event.example_data(),
            });
            section class="event" aria-labelledby=(format!("event-{}", event.as_str())) {
                h2 id=(format!("event-{}", event.as_str())) { code { (event.as_str()) } }
                p { (event.description()) }
                pre class="code" tabindex="0" aria-label=(format!("Example body of {}", event.as_str())) {
                    code { (serde_json::to_string_pretty(&example).unwrap_or_default()) }
                }
            }
        }
    };
    layout(visit, Section::Events, "Event catalog", content)
}

fn status_badge(status: DeliveryStatus) -> Markup {
    let class = match status {
        DeliveryStatus::Succeeded => "badge ok",
        DeliveryStatus::Failed => "badge bad",
        DeliveryStatus::Pending => "badge",
    };
    html! { span class=(class) { (status.as_str()) } }
}

fn select(id: &str, label: &str, chosen: &str, options: &[(String, String)]) -> Markup {
    html! {
        div class="field" {
            label for=(id) { (label) }
            select id=(id) name=(id) {
                option value="" selected[chosen.is_empty()] { "Any" }
                @for (value, text) in options {
                    option value=(value) selected[chosen == value] { (text) }
                }
            }
        }
    }
}

pub fn delivery_log(
    visit: &Visit,
    query: &LogQuery,
    page: &[Delivery],
    urls: &HashMap<WebhookId, String>,
    older: Option<&str>,
) -> Markup {
    let mut webhooks: Vec<(String, String)> = urls.iter().map(|(id, url)| (id.to_string(), url.clone())).collect();
    webhooks.sort_by(|a, b| a.1.cmp(&b.1));
    let statuses: Vec<(String, String)> = [
        DeliveryStatus::Pending,
        DeliveryStatus::Succeeded,
        DeliveryStatus::Failed,
    ]
    .into_iter()
    .map(|status| (status.as_str().to_owned(), status.as_str().to_owned()))
    .collect();
    let events: Vec<(String, String)> = EventType::ALL
        .into_iter()
        .map(|event| (event.as_str().to_owned(), event.as_str().to_owned()))
        .collect();
    let content = html! {
        h1 { "Deliveries" }
        form method="get" action="/portal/deliveries" class="filters" aria-label="Filter deliveries" {
            (select("webhook", "Webhook", &query.webhook, &webhooks))
            (select("status", "Status", &query.status, &statuses))
            (select("event", "Event", &query.event, &events))
            div class="field" {
                label for="since" { "Created since (UTC)" }
                input id="since" name="since" type="datetime-local" value=(query.since);
            }
            div class="field" {
                label for="until" { "Created before (UTC)" }
                input id="until" name="until" type="datetime-local" value=(query.until);
            }
            div class="field" { button type="submit" { "Filter" } }
        }
        @if page.is_empty() {
            p { "No deliveries match." }
        } @else {
            div class="table-wrap" role="region" aria-label="Deliveries" tabindex="0" {
                table class="deliveries cards" {
                    thead {
                        tr {
                            th scope="col" { "Created" }
                            th scope="col" { "Event" }
                            th scope="col" { "Endpoint" }
                            th scope="col" { "Status" }
                            th scope="col" { "Attempts" }
                            th scope="col" { "Last response" }
                        }
                    }
                    tbody {
                        @for delivery in page {
                            tr {
                                td data-label="Created" { a href=(format!("/portal/deliveries/{}", delivery.id)) { (time(delivery.created_at)) } }
                                td data-label="Event" { code { (delivery.event_type.as_str()) } }
                                td data-label="Endpoint" class="endpoint" { (urls.get(&delivery.webhook_id).map_or("", String::as_str)) }
                                td data-label="Status" { (status_badge(delivery.status)) }
                                td data-label="Attempts" { (delivery.attempts) }
                                td data-label="Last response" { @if let Some(code) = delivery.last_status_code { (code) } @else { "—" } }
                            }
                        }
                    }
                }
            }
        }
        @if let Some(older) = older {
            p { a href=(older) { "Older deliveries" } }
        }
    };
    layout(visit, Section::Deliveries, "Deliveries", content)
}

pub fn delivery_page(
    visit: &Visit,
    delivery: &Delivery,
    event: &StoredEvent,
    view: &WebhookView,
    attempts: &[Attempt],
    notice: Option<&str>,
) -> Markup {
    // `None` once the body retention has passed: the record stays, its bytes do not.
    let body = event
        .data
        .as_deref()
        .map(|data| delivered_body(delivery.event_type, &event.timestamp, data));
    // The headers of the last attempt, as the worker built them: its number,
    // its start (to the second) and the webhook's current secret. A signature
    // is shown only to a session that may read the secret: with it, anyone
    // could send the endpoint a request it would take for ours.
    let sent = body.as_ref().zip(attempts.last()).map(|(body, last)| {
        let headers = signing::delivery_headers(
            &delivery.id.to_string(),
            delivery.event_type,
            last.attempt,
            last.started_at.timestamp(),
            body.as_bytes(),
            &view.webhook.secret,
            None,
        );
        (last.attempt, headers)
    });
    let show_signatures = view.secret().is_ok();
    let content = html! {
        @if let Some(notice) = notice {
            p class="notice" role="status" { (notice) }
        }
        h1 { "Delivery" }
        dl class="facts" {
            dt { "Id (" code { "X-Aegis-Delivery" } ")" } dd { code { (delivery.id) } }
            dt { "Event" } dd { code { (delivery.event_type.as_str()) } }
            dt { "Endpoint" } dd { a href=(format!("/portal/webhooks/{}", view.webhook.id)) { (view.webhook.url.as_str()) } }
            dt { "Status" } dd { (status_badge(delivery.status)) }
            dt { "Attempts" } dd { (delivery.attempts) }
            @if let (DeliveryStatus::Pending, Some(next)) = (delivery.status, delivery.next_attempt_at) {
                dt { "Next attempt" } dd { (time(next)) }
            }
            @if let Some(reason) = &delivery.failure_reason { dt { "Failure" } dd { (reason) } }
            dt { "Created" } dd { (time(delivery.created_at)) }
        }
        @if visit.can_write() {
            @if delivery.status == DeliveryStatus::Pending {
                // No disabled button: a keyboard could not reach it, nor its reason.
                p class="help" { "Pending: its next attempt is already scheduled, so there is nothing to redeliver yet." }
            } @else if body.is_none() {
                p class="help" { "Its payload was expunged, so it cannot be redelivered." }
            } @else {
                form method="post" action=(format!("/portal/deliveries/{}/redeliver", delivery.id)) class="actions" {
                    (csrf(visit))
                    button type="submit" { "Redeliver" }
                }
            }
        }
        section aria-labelledby="request-heading" {
            h2 id="request-heading" { "Request" }
            @if let Some((attempt, headers)) = &sent {
                p class="help" { "Headers of attempt " (attempt) ", signed with the webhook's current secret." }
                div class="table-wrap" role="region" aria-label="Headers" tabindex="0" {
                    table class="headers" {
                        thead { tr { th scope="col" { "Header" } th scope="col" { "Value" } } }
                        tbody {
                            @for (name, value) in headers {
                                tr {
                                    td { code { (name) } }
                                    td {
                                        @if name.ends_with("signature") && !show_signatures {
                                            span class="muted" { "shown to sessions that may read the secret" }
                                        } @else {
                                            code class="wrap" { (value) }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            } @else if body.is_some() {
                p { "No attempt yet: its headers show here once it is made." }
            }
            @if let Some(body) = &body {
                h3 { "Body (exact bytes)" }
                pre class="code" id="body" tabindex="0" aria-label="Body" { code { (body) } }
            } @else {
                p id="body" {
                    "The payload and the responses were expunged under your organisation's data retention"
                    @if let Some(at) = event.body_expunged_at { " on " (time(at)) }
                    ". This record of the delivery and its attempts stays until the record retention passes."
                }
            }
        }
        section aria-labelledby="attempts-heading" {
            h2 id="attempts-heading" { "Attempts" }
            @if attempts.is_empty() {
                p { "None yet." }
            } @else {
                ol class="attempts" {
                    @for attempt in attempts {
                        li class="attempt" {
                            h3 {
                                "Attempt " (attempt.attempt) ": "
                                @match attempt.status_code {
                                    Some(code) => span class=(if (200..300).contains(&code) { "badge ok" } else { "badge bad" }) { "HTTP " (code) },
                                    None => span class="badge bad" { "no response" },
                                }
                            }
                            p { (time(attempt.started_at)) ", " (attempt.duration.as_millis()) " ms" }
                            @if let Some(error) = &attempt.error { p class="error-text" { (error) } }
                            @if let Some(response) = &attempt.response_body {
                                @let start: String = response.chars().take(2000).collect();
                                p class="help" { "Start of the response:" }
                                pre class="code" tabindex="0" aria-label=(format!("Response to attempt {}", attempt.attempt)) { code { (start) } }
                            }
                        }
                    }
                }
            }
        }
    };
    layout(visit, Section::Deliveries, "Delivery", content)
}
