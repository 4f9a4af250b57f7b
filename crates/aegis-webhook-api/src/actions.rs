//! The use cases of the API: what a caller may see and do with its tenant's
//! webhooks and deliveries. The one place that checks a caller's scopes,
//! validates input against the quotas, and records every change in the audit
//! log in the same transaction as the change; the GraphQL resolvers (and the
//! portal's pages) are thin shells around these functions.

use std::collections::BTreeSet;

use aegis_webhook_core::access::{Scope, Scopes};
use aegis_webhook_core::event::{EventType, ValidatedEvent};
use aegis_webhook_core::ids::{DeliveryId, TenantId, WebhookId};
use aegis_webhook_core::queue::{self, DeliveryTask, Writer};
use aegis_webhook_core::retention::{self, HumanDuration, Retention};
use aegis_webhook_core::secret::SigningSecret;
use aegis_webhook_core::target::WebhookUrl;
use aegis_webhook_storage::audit::{self, Actor};
use aegis_webhook_storage::deliveries::{self, Delivery};
use aegis_webhook_storage::retention as storage_retention;
use aegis_webhook_storage::webhooks::{self, Webhook};
use aegis_webhook_storage::{StoreError, events};
use chrono::{DateTime, Utc};
use sea_orm::DatabaseTransaction;
use serde_json::json;
use uuid::Uuid;

use crate::AppState;
use crate::error::{ApiError, ApiResult, StoreResultExt as _};

/// Failed deliveries one `replayDeadLetters` call reopens at most; the caller
/// calls again for the rest (those already replayed are pending, so they are
/// not counted twice).
pub const MAX_REPLAY: u64 = 1000;

/// Who is asking, and with which rights: made by the HTTP layer from a valid
/// API key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller {
    pub tenant_id: TenantId,
    pub actor: Actor,
    pub scopes: Scopes,
}

impl Caller {
    pub fn require(&self, scope: Scope) -> ApiResult<()> {
        if self.scopes.contains(scope) {
            return Ok(());
        }
        let what = match scope {
            Scope::Read => "reading",
            Scope::Write => "changing anything",
            Scope::Secrets => "reading a webhook's secret back",
        };
        Err(ApiError::Forbidden(format!(
            "{what} needs an API key with the `{scope}` scope; this key has `{}`",
            self.scopes
        )))
    }
}

/// A webhook as a use case returns it: whether its secret may be shown is
/// decided here, with the webhook, not by whoever renders it.
#[derive(Debug, Clone)]
pub struct WebhookView {
    pub webhook: Webhook,
    /// The caller may read `secret`: it holds the `secrets` scope, or it has
    /// just set the secret itself (created the webhook, rotated the secret).
    pub secret_visible: bool,
}

impl WebhookView {
    fn read(caller: &Caller, webhook: Webhook) -> Self {
        WebhookView {
            secret_visible: caller.scopes.contains(Scope::Secrets),
            webhook,
        }
    }

    fn set_by_caller(webhook: Webhook) -> Self {
        WebhookView {
            webhook,
            secret_visible: true,
        }
    }

    /// The secret, or why this caller may not read it.
    pub fn secret(&self) -> ApiResult<&str> {
        if self.secret_visible {
            Ok(self.webhook.secret.expose())
        } else {
            Err(ApiError::Forbidden(
                "reading a webhook's secret back needs an API key with the `secrets` scope".to_owned(),
            ))
        }
    }
}

/// A new webhook as the client sent it.
#[derive(Debug, Clone, Default)]
pub struct WebhookDraft {
    pub url: String,
    pub events: Vec<EventType>,
    pub secret: Option<String>,
    pub description: Option<String>,
    pub project_ids: Option<Vec<String>>,
    pub active: Option<bool>,
}

/// Changes to a webhook as the client sent them; `None` leaves a field be.
#[derive(Debug, Clone, Default)]
pub struct WebhookEdit {
    pub url: Option<String>,
    pub events: Option<Vec<EventType>>,
    /// An empty string clears it.
    pub description: Option<String>,
    /// An empty list removes the filter.
    pub project_ids: Option<Vec<String>>,
}

async fn begin(state: &AppState) -> ApiResult<DatabaseTransaction> {
    aegis_webhook_storage::begin_write(&state.db)
        .await
        .map_err(ApiError::from)
}

async fn commit(txn: DatabaseTransaction) -> ApiResult<()> {
    txn.commit()
        .await
        .map_err(|error| ApiError::from(StoreError::from(error)))
}

/// Records `operation` on `target` in the caller's audit log, inside `txn`.
async fn record(
    txn: &DatabaseTransaction,
    caller: &Caller,
    operation: &'static str,
    target_kind: &'static str,
    target_id: impl ToString,
    summary: serde_json::Value,
) -> ApiResult<()> {
    let entry = audit::NewEntry {
        tenant_id: caller.tenant_id,
        actor: caller.actor,
        operation,
        target_kind,
        target_id: Some(target_id.to_string()),
        summary,
    };
    audit::record(txn, entry, Utc::now()).await.map_err(ApiError::from)?;
    Ok(())
}

pub async fn create_webhook(state: &AppState, caller: &Caller, draft: WebhookDraft) -> ApiResult<WebhookView> {
    caller.require(Scope::Write)?;
    let quotas = state.quotas;
    let new = webhooks::NewWebhook {
        secret: parse_secret(state, draft.secret)?,
        url: validate_url(state, &draft.url)?,
        events: validate_events(draft.events)?,
        description: draft
            .description
            .map(|text| validate_description(state, text))
            .transpose()?
            .flatten(),
        project_ids: validate_project_ids(state, &draft.project_ids.unwrap_or_default())?,
        active: draft.active.unwrap_or(true),
    };
    let summary = json!({
        "url": new.url.as_str(),
        "events": new.events.iter().map(|event| event.as_str()).collect::<Vec<_>>(),
        "description": new.description,
        "projectIds": new.project_ids,
        "active": new.active,
        "secret": secret_origin(&new.secret),
    });
    let txn = begin(state).await?;
    // Creations of one tenant take turns from here to the commit, so the
    // count below is not raced past the quota (SQLite's write lock already
    // does this; on PostgreSQL it is the tenant row's lock).
    aegis_webhook_storage::tenants::lock_tenant(&txn, caller.tenant_id)
        .await
        .map_err(ApiError::from)?;
    let held = webhooks::count_of_tenant(&txn, caller.tenant_id)
        .await
        .map_err(ApiError::from)?;
    if held >= u64::from(quotas.webhooks_per_tenant) {
        return Err(ApiError::QuotaExceeded(format!(
            "a tenant may have at most {} webhooks (AEGIS_MAX_WEBHOOKS_PER_TENANT); delete one first",
            quotas.webhooks_per_tenant
        )));
    }
    let webhook = webhooks::create_webhook(&txn, &state.cipher, caller.tenant_id, new)
        .await
        .map_err(ApiError::from)?;
    record(&txn, caller, "createWebhook", "webhook", webhook.id, summary).await?;
    commit(txn).await?;
    tracing::info!(webhook_id = %webhook.id, tenant_id = %caller.tenant_id, "webhook created");
    Ok(WebhookView::set_by_caller(webhook))
}

/// How a secret came to be, for the audit log (never the secret itself).
fn secret_origin(secret: &SigningSecret) -> &'static str {
    if secret.is_generated() { "generated" } else { "set" }
}

pub async fn update_webhook(
    state: &AppState,
    caller: &Caller,
    id: WebhookId,
    edit: WebhookEdit,
) -> ApiResult<WebhookView> {
    caller.require(Scope::Write)?;
    let changes = webhooks::WebhookChanges {
        url: edit.url.as_deref().map(|url| validate_url(state, url)).transpose()?,
        events: edit.events.map(validate_events).transpose()?,
        description: edit
            .description
            .map(|text| validate_description(state, text))
            .transpose()?,
        project_ids: edit
            .project_ids
            .as_deref()
            .map(|ids| validate_project_ids(state, ids))
            .transpose()?,
    };
    let mut summary = serde_json::Map::new();
    if let Some(url) = &changes.url {
        summary.insert("url".into(), json!(url.as_str()));
    }
    if let Some(events) = &changes.events {
        summary.insert(
            "events".into(),
            json!(events.iter().map(|e| e.as_str()).collect::<Vec<_>>()),
        );
    }
    if let Some(description) = &changes.description {
        summary.insert("description".into(), json!(description));
    }
    if let Some(project_ids) = &changes.project_ids {
        summary.insert("projectIds".into(), json!(project_ids));
    }
    let txn = begin(state).await?;
    let webhook = webhooks::update_webhook(&txn, &state.cipher, caller.tenant_id, id, changes)
        .await
        .or_not_found("webhook")?;
    record(&txn, caller, "updateWebhook", "webhook", id, summary.into()).await?;
    commit(txn).await?;
    Ok(WebhookView::read(caller, webhook))
}

pub async fn delete_webhook(state: &AppState, caller: &Caller, id: WebhookId) -> ApiResult<()> {
    caller.require(Scope::Write)?;
    let txn = begin(state).await?;
    let webhook = webhooks::webhook_of_tenant(&txn, &state.cipher, caller.tenant_id, id)
        .await
        .or_not_found("webhook")?;
    webhooks::delete_webhook(&txn, caller.tenant_id, id)
        .await
        .or_not_found("webhook")?;
    record(
        &txn,
        caller,
        "deleteWebhook",
        "webhook",
        id,
        json!({ "url": webhook.url.as_str() }),
    )
    .await?;
    commit(txn).await
}

pub async fn rotate_secret(
    state: &AppState,
    caller: &Caller,
    id: WebhookId,
    secret: Option<String>,
) -> ApiResult<WebhookView> {
    caller.require(Scope::Write)?;
    let secret = parse_secret(state, secret)?;
    let grace = chrono::Duration::from_std(state.secret_rotation_grace).unwrap_or(chrono::Duration::zero());
    let grace_until = Utc::now() + grace;
    let txn = begin(state).await?;
    let webhook = webhooks::rotate_secret(&txn, &state.cipher, caller.tenant_id, id, &secret, grace_until)
        .await
        .or_not_found("webhook")?;
    let summary = json!({
        "secret": secret_origin(&secret),
        "previousSecretSignsUntil": grace_until,
    });
    record(&txn, caller, "rotateWebhookSecret", "webhook", id, summary).await?;
    commit(txn).await?;
    tracing::info!(webhook_id = %webhook.id, "webhook secret rotated");
    Ok(WebhookView::set_by_caller(webhook))
}

pub async fn set_active(state: &AppState, caller: &Caller, id: WebhookId, active: bool) -> ApiResult<WebhookView> {
    caller.require(Scope::Write)?;
    let txn = begin(state).await?;
    let was_active = webhooks::webhook_of_tenant(&txn, &state.cipher, caller.tenant_id, id)
        .await
        .or_not_found("webhook")?
        .active;
    let webhook = webhooks::set_webhook_active(&txn, &state.cipher, caller.tenant_id, id, active)
        .await
        .or_not_found("webhook")?;
    record(
        &txn,
        caller,
        "setWebhookActive",
        "webhook",
        id,
        json!({ "active": active }),
    )
    .await?;
    commit(txn).await?;
    if active && !was_active {
        tracing::info!(webhook_id = %webhook.id, "webhook re-enabled");
        aegis_webhook_core::metrics::webhook_reenabled();
    }
    Ok(WebhookView::read(caller, webhook))
}

/// Sends a `WEBHOOK_TEST` event to the webhook now; returns its delivery.
pub async fn test_webhook(state: &AppState, caller: &Caller, id: WebhookId) -> ApiResult<Delivery> {
    caller.require(Scope::Write)?;
    let now = Utc::now();
    let txn = begin(state).await?;
    let webhook = webhooks::webhook_of_tenant(&txn, &state.cipher, caller.tenant_id, id)
        .await
        .or_not_found("webhook")?;
    let event = ValidatedEvent::webhook_test(caller.tenant_id, webhook.id, now);
    let new = deliveries::NewDelivery {
        webhook_id: webhook.id,
        event_type: EventType::WebhookTest,
    };
    let stored = events::insert_event_with_deliveries(&txn, &event, &[new], now)
        .await
        .map_err(ApiError::from)?;
    let delivery_id = match stored.as_deref() {
        Some([delivery_id]) => *delivery_id,
        _ => {
            return Err(ApiError::Internal(anyhow::anyhow!(
                "a fresh test event was stored as a repeat"
            )));
        }
    };
    record(
        &txn,
        caller,
        "testWebhook",
        "webhook",
        id,
        json!({ "deliveryId": delivery_id }),
    )
    .await?;
    commit(txn).await?;
    let publish = state
        .queue
        .publish_task(DeliveryTask::new(delivery_id, webhook.id, 1), std::time::Duration::ZERO);
    queue::publish_after_commit(Writer::Api, "a test delivery", publish).await;
    delivery(state, caller, delivery_id).await
}

/// Sends a finished delivery once more (same `X-Aegis-Delivery`, next attempt
/// number); one still pending is returned as it is.
pub async fn redeliver(state: &AppState, caller: &Caller, id: DeliveryId) -> ApiResult<Delivery> {
    caller.require(Scope::Write)?;
    let txn = begin(state).await?;
    let found = match deliveries::delivery_of_tenant(&txn, caller.tenant_id, id).await {
        Err(StoreError::NotFound) => return Err(not_found_or_expunged(state, caller, id).await),
        found => found.map_err(ApiError::from)?,
    };
    if let Some(event) = events::events_by_ids(&txn, &[found.event_id])
        .await
        .map_err(ApiError::from)?
        .into_iter()
        .find(|event| event.data.is_none())
    {
        let own = retention_of(state, caller).await?.effective;
        let when = event
            .body_expunged_at
            .map(|at| format!(" on {}", at.format("%Y-%m-%d")))
            .unwrap_or_default();
        return Err(ApiError::Expunged(format!(
            "delivery {id} cannot be sent again: its payload was expunged{when}, past your organisation's body retention of {}",
            HumanDuration(own.bodies())
        )));
    }
    let reopened = deliveries::reopen(&txn, id, Utc::now())
        .await
        .or_not_found("delivery")?;
    record(
        &txn,
        caller,
        "redeliver",
        "delivery",
        id,
        json!({ "reopened": reopened.is_some() }),
    )
    .await?;
    commit(txn).await?;
    if let Some(reopened) = reopened {
        publish_reopened(state, &reopened, "a redelivery").await;
    }
    delivery(state, caller, id).await
}

/// Redelivers up to [`MAX_REPLAY`] failed deliveries of a webhook created
/// since `since`; returns how many.
pub async fn replay_dead_letters(
    state: &AppState,
    caller: &Caller,
    webhook_id: WebhookId,
    since: DateTime<Utc>,
) -> ApiResult<u64> {
    caller.require(Scope::Write)?;
    let now = Utc::now();
    let txn = begin(state).await?;
    webhooks::webhook_of_tenant(&txn, &state.cipher, caller.tenant_id, webhook_id)
        .await
        .or_not_found("webhook")?;
    let failed = deliveries::failed_since(&txn, webhook_id, since, MAX_REPLAY)
        .await
        .map_err(ApiError::from)?;
    // A delivery whose payload has been expunged cannot be sent again.
    let event_ids: Vec<_> = failed.iter().map(|(_, event)| *event).collect();
    let expunged = events::expunged_among(&txn, &event_ids).await.map_err(ApiError::from)?;
    let failed: Vec<DeliveryId> = failed
        .into_iter()
        .filter(|(_, event)| !expunged.contains(event))
        .map(|(delivery, _)| delivery)
        .collect();
    let reopened = deliveries::reopen_many(&txn, &failed, now)
        .await
        .map_err(ApiError::from)?;
    let summary = json!({ "since": since, "replayed": reopened.len() });
    record(&txn, caller, "replayDeadLetters", "webhook", webhook_id, summary).await?;
    commit(txn).await?;
    for delivery in &reopened {
        publish_reopened(state, delivery, "a replayed dead letter").await;
    }
    Ok(reopened.len() as u64)
}

async fn publish_reopened(state: &AppState, reopened: &Delivery, what: &'static str) {
    let task = DeliveryTask::new(reopened.id, reopened.webhook_id, reopened.attempts + 1);
    let publish = state.queue.publish_task(task, std::time::Duration::ZERO);
    queue::publish_after_commit(Writer::Api, what, publish).await;
}

pub async fn webhook(state: &AppState, caller: &Caller, id: WebhookId) -> ApiResult<WebhookView> {
    caller.require(Scope::Read)?;
    let webhook = webhooks::webhook_of_tenant(&state.db, &state.cipher, caller.tenant_id, id)
        .await
        .or_not_found("webhook")?;
    Ok(WebhookView::read(caller, webhook))
}

/// A page of the caller's webhooks in creation order (`limit + 1` rows).
pub async fn webhooks_page(
    state: &AppState,
    caller: &Caller,
    after: Option<WebhookId>,
    limit: u64,
) -> ApiResult<Vec<WebhookView>> {
    caller.require(Scope::Read)?;
    let page = webhooks::list_webhooks(&state.db, &state.cipher, caller.tenant_id, after, limit)
        .await
        .map_err(ApiError::from)?;
    Ok(page
        .into_iter()
        .map(|webhook| WebhookView::read(caller, webhook))
        .collect())
}

/// Delivery counts of the caller's webhooks among `webhook_ids` (another
/// tenant's are left out, as if they did not exist).
pub async fn stats_of(
    state: &AppState,
    caller: &Caller,
    webhook_ids: &[WebhookId],
) -> ApiResult<std::collections::HashMap<WebhookId, deliveries::WebhookDeliveryStats>> {
    caller.require(Scope::Read)?;
    let owned = webhooks::owned_by(&state.db, caller.tenant_id, webhook_ids)
        .await
        .map_err(ApiError::from)?;
    deliveries::stats_of_webhooks(&state.db, &owned)
        .await
        .map_err(ApiError::from)
}

pub async fn delivery(state: &AppState, caller: &Caller, id: DeliveryId) -> ApiResult<Delivery> {
    caller.require(Scope::Read)?;
    match deliveries::delivery_of_tenant(&state.db, caller.tenant_id, id).await {
        Err(StoreError::NotFound) => Err(not_found_or_expunged(state, caller, id).await),
        found => found.map_err(ApiError::from),
    }
}

/// What to answer for a delivery id the tenant does not have: ids are
/// UUIDv7, so one made before the tenant's retention began names a record
/// that expiry has removed (or that never existed: either way it cannot be
/// had), and the answer says so; any other is not found.
async fn not_found_or_expunged(state: &AppState, caller: &Caller, id: DeliveryId) -> ApiError {
    let Some(created_at) = aegis_webhook_storage::v7_created_at(id.as_uuid()) else {
        return ApiError::NotFound("delivery");
    };
    let own = match retention_of(state, caller).await {
        Ok(view) => view.effective,
        Err(error) => return error,
    };
    if created_at >= own.cutoffs(Utc::now()).records_before {
        return ApiError::NotFound("delivery");
    }
    ApiError::Expunged(format!(
        "delivery {id} dates from {}, longer ago than your organisation's data retention of {}: its record has been expunged",
        created_at.format("%Y-%m-%d"),
        HumanDuration(own.records())
    ))
}

/// A tenant's data retention as the API shows it: what applies, what the
/// tenant chose (`None`s keep the operator's default), and the range it may
/// choose in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionView {
    pub effective: Retention,
    pub chosen: retention::Override,
    pub bounds: retention::Bounds,
}

/// Any key of the tenant may see it, as it may see `tenant` itself: it tells
/// how long the tenant's data is kept, nothing of the data.
pub async fn retention_of(state: &AppState, caller: &Caller) -> ApiResult<RetentionView> {
    let chosen = storage_retention::override_of(&state.db, caller.tenant_id)
        .await
        .or_not_found("tenant")?;
    // A choice made under wider bounds holds only within today's, as in expiry.
    let chosen = state.retention.bounds.clamp(chosen);
    Ok(RetentionView {
        effective: retention::effective(state.retention.default, chosen),
        chosen,
        bounds: state.retention.bounds,
    })
}

/// Sets the tenant's own retention, within the operator's bounds; `None`s go
/// back to the operator's default. Expiry applies it at its next pass.
pub async fn set_retention(state: &AppState, caller: &Caller, chosen: retention::Override) -> ApiResult<RetentionView> {
    caller.require(Scope::Write)?;
    let effective = retention::check_override(state.retention.default, state.retention.bounds, chosen)
        .map_err(|error| ApiError::bad_input("retention", error))?;
    let txn = begin(state).await?;
    storage_retention::set_override(&txn, caller.tenant_id, chosen)
        .await
        .or_not_found("tenant")?;
    let seconds = |duration: Option<std::time::Duration>| duration.map(|d| d.as_secs());
    let summary = json!({
        "recordsSeconds": seconds(chosen.records),
        "bodiesSeconds": seconds(chosen.bodies),
    });
    record(&txn, caller, "setRetention", "tenant", caller.tenant_id, summary).await?;
    commit(txn).await?;
    Ok(RetentionView {
        effective,
        chosen,
        bounds: state.retention.bounds,
    })
}

/// A page of the caller's delivery log, newest first (`limit + 1` rows).
pub async fn deliveries_page(
    state: &AppState,
    caller: &Caller,
    filter: &deliveries::DeliveryFilter,
    before: Option<Uuid>,
    limit: u64,
) -> ApiResult<Vec<Delivery>> {
    caller.require(Scope::Read)?;
    deliveries::list_deliveries(&state.db, caller.tenant_id, filter, before, limit)
        .await
        .map_err(ApiError::from)
}

/// The newest attempts of the caller's deliveries among `delivery_ids`, by
/// delivery (another tenant's are left out), with their response bodies
/// only if `bodies` (see [`deliveries::newest_attempts_of_tenant`]).
pub async fn attempts_of(
    state: &AppState,
    caller: &Caller,
    delivery_ids: &[DeliveryId],
    bodies: bool,
) -> ApiResult<std::collections::HashMap<DeliveryId, Vec<deliveries::Attempt>>> {
    caller.require(Scope::Read)?;
    deliveries::newest_attempts_of_tenant(&state.db, caller.tenant_id, delivery_ids, bodies)
        .await
        .map_err(ApiError::from)
}

/// A page of the caller's audit log, newest first (`limit + 1` rows).
pub async fn audit_page(
    state: &AppState,
    caller: &Caller,
    filter: &audit::Filter,
    before: Option<Uuid>,
    limit: u64,
) -> ApiResult<Vec<audit::Entry>> {
    caller.require(Scope::Read)?;
    audit::list(&state.db, caller.tenant_id, filter, before, limit)
        .await
        .map_err(ApiError::from)
}

/// The event a delivery of the caller's carries (its body is built from it).
pub async fn event_of(state: &AppState, caller: &Caller, delivery: &Delivery) -> ApiResult<events::StoredEvent> {
    caller.require(Scope::Read)?;
    events::events_by_ids(&state.db, &[delivery.event_id])
        .await
        .map_err(ApiError::from)?
        .into_iter()
        .find(|event| event.tenant_id == caller.tenant_id)
        .ok_or(ApiError::NotFound("event"))
}

/// The caller's webhook's deliveries by hour and status over the last
/// `hours` hours, oldest first.
pub async fn deliveries_by_hour(
    state: &AppState,
    caller: &Caller,
    webhook_id: WebhookId,
    hours: u32,
) -> ApiResult<Vec<deliveries::HourOfDeliveries>> {
    caller.require(Scope::Read)?;
    webhooks::webhook_of_tenant(&state.db, &state.cipher, caller.tenant_id, webhook_id)
        .await
        .or_not_found("webhook")?;
    deliveries::deliveries_by_hour(&state.db, webhook_id, Utc::now(), hours)
        .await
        .map_err(ApiError::from)
}

/// How long a portal link waits to be opened (at most; a shorter session
/// makes it shorter).
pub const PORTAL_LINK_LIFETIME: std::time::Duration = std::time::Duration::from_secs(10 * 60);

/// The shortest and longest portal session, in seconds.
pub const PORTAL_SESSION_TTL_SECONDS: std::ops::RangeInclusive<i64> = 60..=86_400;

/// A portal session as the client asked for it.
#[derive(Debug, Clone, Default)]
pub struct PortalSessionRequest {
    pub ttl_seconds: i64,
    /// The session may look but change nothing.
    pub read_only: bool,
    pub accent_color: Option<String>,
    pub logo_url: Option<String>,
}

/// A single-use link into the portal.
#[derive(Debug, Clone)]
pub struct PortalLink {
    /// `/portal/open/<token>`.
    pub path: String,
    /// `AEGIS_PUBLIC_URL` + `path`, when the public address is known.
    pub url: Option<String>,
    pub link_expires_at: DateTime<Utc>,
    pub scopes: Scopes,
}

/// Makes a single-use link that opens a portal session for the caller's
/// tenant, with the caller's scopes (only `read` when `read_only`). The
/// session acts as the caller's API key: the audit log names it, and it ends
/// when the key is revoked. A mutation like any other: it needs `write` (a
/// read-only key would otherwise hand out bearer links, and add a row each).
pub async fn create_portal_session(
    state: &AppState,
    caller: &Caller,
    request: PortalSessionRequest,
) -> ApiResult<PortalLink> {
    caller.require(Scope::Write)?;
    let Actor::ApiKey(api_key_id) = caller.actor else {
        return Err(ApiError::Forbidden(
            "portal sessions are made with an API key".to_owned(),
        ));
    };
    if !PORTAL_SESSION_TTL_SECONDS.contains(&request.ttl_seconds) {
        return Err(ApiError::bad_input(
            "ttlSeconds",
            format!(
                "ttlSeconds: must be from {} to {} (a day), got {}",
                PORTAL_SESSION_TTL_SECONDS.start(),
                PORTAL_SESSION_TTL_SECONDS.end(),
                request.ttl_seconds
            ),
        ));
    }
    let theme = aegis_webhook_storage::portal::Theme {
        accent_color: request.accent_color.map(validate_accent_color).transpose()?,
        logo_url: request.logo_url.map(validate_logo_url).transpose()?,
    };
    let scopes = if request.read_only {
        Scopes::READ_ONLY
    } else {
        caller.scopes
    };
    let now = Utc::now();
    let session_ttl = chrono::Duration::seconds(request.ttl_seconds);
    let link_lifetime = chrono::Duration::from_std(PORTAL_LINK_LIFETIME)
        .unwrap_or(session_ttl)
        .min(session_ttl);
    let link_expires_at = now + link_lifetime;
    let new = aegis_webhook_storage::portal::NewLink {
        tenant_id: caller.tenant_id,
        api_key_id,
        scopes,
        link_expires_at,
        session_ttl,
        theme,
    };
    let txn = begin(state).await?;
    let (id, token) = aegis_webhook_storage::portal::create_link(&txn, new, now)
        .await
        .map_err(ApiError::from)?;
    let summary = json!({
        "ttlSeconds": request.ttl_seconds,
        "scopes": scopes.to_string(),
        "linkExpiresAt": link_expires_at,
    });
    record(&txn, caller, "createPortalSession", "portal_session", id, summary).await?;
    commit(txn).await?;
    let path = format!("/portal/open/{token}");
    Ok(PortalLink {
        url: state
            .public_url
            .as_deref()
            .map(|base| format!("{}{path}", base.trim_end_matches('/'))),
        path,
        link_expires_at,
        scopes,
    })
}

/// `#rrggbb`, written into the portal's style sheet, dark enough for the
/// white text of its buttons to stay readable (WCAG AA: a contrast of 4.5).
fn validate_accent_color(color: String) -> ApiResult<String> {
    let color = color.trim().to_ascii_lowercase();
    let Some(contrast) = contrast_with_white(&color) else {
        return Err(ApiError::bad_input(
            "accentColor",
            "accentColor: must be a colour as #rrggbb, e.g. #0b57d0",
        ));
    };
    if contrast < 4.5 {
        return Err(ApiError::bad_input(
            "accentColor",
            format!(
                "accentColor: {color} is too light for the white text of buttons (contrast {contrast:.1}; at least 4.5, \
                 WCAG AA); choose a darker one"
            ),
        ));
    }
    Ok(color)
}

/// The WCAG contrast ratio of `#rrggbb` against white, or `None` when it
/// is not such a colour.
fn contrast_with_white(color: &str) -> Option<f64> {
    let hex = color.strip_prefix('#').filter(|hex| hex.len() == 6)?;
    let channel = |at: usize| {
        let value = f64::from(u8::from_str_radix(hex.get(at..at + 2)?, 16).ok()?) / 255.0;
        // sRGB to linear light, as WCAG defines relative luminance.
        Some(if value <= 0.039_28 {
            value / 12.92
        } else {
            ((value + 0.055) / 1.055).powf(2.4)
        })
    };
    let luminance = 0.2126 * channel(0)? + 0.7152 * channel(2)? + 0.0722 * channel(4)?;
    Some(1.05 / (luminance + 0.05))
}

/// An `https` URL of at most 2,048 characters: the browser loads it, and its
/// origin is allowed in the portal's Content-Security-Policy.
fn validate_logo_url(text: String) -> ApiResult<String> {
    let parsed = url::Url::parse(text.trim())
        .ok()
        .filter(|url| url.scheme() == "https" && url.host_str().is_some() && url.username().is_empty())
        .filter(|url| url.as_str().len() <= 2048);
    match parsed {
        Some(url) => Ok(url.to_string()),
        None => Err(ApiError::bad_input(
            "logoUrl",
            "logoUrl: must be an https:// URL of at most 2048 characters",
        )),
    }
}

fn validate_url(state: &AppState, url: &str) -> ApiResult<WebhookUrl> {
    WebhookUrl::parse(url, &state.policy).map_err(|error| ApiError::bad_input("url", error))
}

fn validate_events(events: Vec<EventType>) -> ApiResult<Vec<EventType>> {
    let events: BTreeSet<EventType> = events.into_iter().collect();
    if events.is_empty() {
        return Err(ApiError::bad_input(
            "events",
            "events: must name at least one event type",
        ));
    }
    if let Some(unsubscribable) = events.iter().find(|event| !event.is_subscribable()) {
        return Err(ApiError::bad_input(
            "events",
            format!("events: {unsubscribable} is sent by testWebhook to any webhook and cannot be subscribed to"),
        ));
    }
    Ok(events.into_iter().collect())
}

/// Trimmed; empty means none. Line breaks and tabs are kept; other control
/// characters are refused (they hide text in logs and terminals), and so
/// are those that reorder or hide text where it is shown (see
/// [`reorders_or_hides_text`]).
fn validate_description(state: &AppState, description: String) -> ApiResult<Option<String>> {
    let limit = state.quotas.description_chars as usize;
    let description = description.trim().to_owned();
    let chars = description.chars().count();
    if chars > limit {
        return Err(ApiError::bad_input(
            "description",
            format!("description: must be at most {limit} characters (AEGIS_MAX_DESCRIPTION_CHARS), got {chars}"),
        ));
    }
    if let Some(bad) = description.chars().find(|c| c.is_control() && *c != '\n' && *c != '\t') {
        return Err(ApiError::bad_input(
            "description",
            format!(
                "description: must not contain control characters (found U+{:04X})",
                u32::from(bad)
            ),
        ));
    }
    if let Some(bad) = description.chars().find(|c| reorders_or_hides_text(*c)) {
        return Err(ApiError::bad_input(
            "description",
            format!(
                "description: must not contain characters that reorder or hide text (found U+{:04X})",
                u32::from(bad)
            ),
        ));
    }
    Ok((!description.is_empty()).then_some(description))
}

/// The bidirectional controls, which can make text shown in the portal or
/// the audit log read other than it is ("Trojan Source"), and the
/// characters that show nothing: zero-widths that join nothing, invisible
/// operators and fillers, interlinear annotations, and the tag characters
/// (which can carry hidden text; so a flag of a region, spelt with them,
/// is refused too). Not the zero-width joiner and non-joiner: emoji
/// sequences and some scripts' words need them.
fn reorders_or_hides_text(c: char) -> bool {
    matches!(
        c,
        '\u{00AD}'
            | '\u{061C}'
            | '\u{115F}'
            | '\u{1160}'
            | '\u{180E}'
            | '\u{200B}'
            | '\u{200E}'
            | '\u{200F}'
            | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}'
            | '\u{2066}'..='\u{206F}'
            | '\u{3164}'
            | '\u{FEFF}'
            | '\u{FFA0}'
            | '\u{FFF9}'..='\u{FFFB}'
            | '\u{E0000}'..='\u{E007F}'
    )
}

fn validate_project_ids(state: &AppState, ids: &[String]) -> ApiResult<Vec<Uuid>> {
    let limit = state.quotas.project_ids_per_webhook as usize;
    if ids.len() > limit {
        return Err(ApiError::bad_input(
            "projectIds",
            format!(
                "projectIds: a webhook may filter on at most {limit} projects (AEGIS_MAX_PROJECT_IDS_PER_WEBHOOK), got {}",
                ids.len()
            ),
        ));
    }
    let ids: BTreeSet<Uuid> = ids
        .iter()
        .map(|id| {
            id.parse().map_err(|_| {
                let shown: String = id.chars().take(64).collect();
                ApiError::bad_input("projectIds", format!("projectIds: `{shown}` is not a valid id"))
            })
        })
        .collect::<ApiResult<_>>()?;
    Ok(ids.into_iter().collect())
}

/// A chosen secret, checked against the strength rules, or a generated one.
fn parse_secret(state: &AppState, secret: Option<String>) -> ApiResult<SigningSecret> {
    match secret {
        None => Ok(SigningSecret::generate()),
        Some(text) => SigningSecret::parse_chosen(&text, state.quotas.secret)
            .map_err(|error| ApiError::bad_input("secret", format!("secret: {error}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bidirectional_controls_and_empty_zero_widths_are_refused_the_joiners_kept() {
        for refused in [
            '\u{202E}',
            '\u{2066}',
            '\u{2069}',
            '\u{200F}',
            '\u{200B}',
            '\u{FEFF}',
            '\u{E0041}',
            '\u{3164}',
        ] {
            assert!(reorders_or_hides_text(refused), "U+{:04X}", u32::from(refused));
        }
        // A family emoji is joined by ZWJ; Persian words use ZWNJ.
        for kept in "👨\u{200D}👩\u{200D}👧 می\u{200C}خواهم é".chars() {
            assert!(!reorders_or_hides_text(kept), "U+{:04X}", u32::from(kept));
        }
    }

    #[test]
    fn an_accent_colour_must_leave_white_text_readable() {
        // WCAG's own extremes, and the portal's default accent.
        assert_eq!(contrast_with_white("#000000").map(|c| (c * 10.0).round()), Some(210.0));
        assert_eq!(contrast_with_white("#ffffff"), Some(1.0));
        assert!(contrast_with_white("#0b57d0").is_some_and(|c| c > 4.5));
        assert!(validate_accent_color(" #0B57D0 ".to_owned()).is_ok_and(|color| color == "#0b57d0"));
        let Err(ApiError::BadUserInput { message, .. }) = validate_accent_color("#ffeb3b".to_owned()) else {
            panic!("a yellow accent leaves white text unreadable");
        };
        assert!(
            message.contains("too light") && message.contains("contrast 1.2"),
            "{message}"
        );
        for garbage in ["red", "#12345", "#1234567", "#gg0000", "#ff000\u{e9}"] {
            assert!(contrast_with_white(garbage).is_none(), "{garbage}");
            assert!(validate_accent_color(garbage.to_owned()).is_err(), "{garbage}");
        }
    }
}
