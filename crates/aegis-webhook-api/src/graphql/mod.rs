//! The GraphQL schema: queries and mutations over the caller's own tenant.

mod error;
mod types;

use std::collections::BTreeSet;

use aegis_webhook_core::event::{EventType, ValidatedEvent};
use aegis_webhook_core::ids::{DeliveryId, TenantId};
use aegis_webhook_core::queue::{self, DeliveryTask, Writer};
use aegis_webhook_core::secret::SigningSecret;
use aegis_webhook_core::target::WebhookUrl;
use aegis_webhook_storage::{deliveries, events, tenants, webhooks};
use async_graphql::connection::{Connection, Edge, EmptyFields};
use async_graphql::{Context, EmptySubscription, ID, Object, Schema};
use uuid::Uuid;

pub use error::{ApiError, ApiResult, StoreResultExt};
pub use types::{
    Delivery, DeliveryAttempt, DeliveryFilter, DeliveryStatus, EventTypeInfo, Tenant, Webhook, WebhookEvent,
    WebhookInput, WebhookUpdateInput,
};

use crate::AppState;

pub type AegisSchema = Schema<QueryRoot, MutationRoot, EmptySubscription>;

/// The authenticated caller, put into every request's data by the HTTP handler.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub tenant_id: TenantId,
}

/// Limits that keep one request from costing much: how deep and how wide a
/// query may go.
const MAX_DEPTH: usize = 12;
const MAX_COMPLEXITY: usize = 1000;
const MAX_PAGE: usize = 100;
const DEFAULT_PAGE: usize = 50;
const MAX_DESCRIPTION_CHARS: usize = 1000;

pub fn build_schema(state: AppState) -> AegisSchema {
    let introspection = state.graphql_introspection;
    let builder = Schema::build(QueryRoot, MutationRoot, EmptySubscription)
        .data(state)
        .limit_depth(MAX_DEPTH)
        .limit_complexity(MAX_COMPLEXITY);
    if introspection {
        builder.finish()
    } else {
        builder.disable_introspection().finish()
    }
}

fn caller(ctx: &Context<'_>) -> ApiResult<Caller> {
    ctx.data::<Caller>()
        .copied()
        .map_err(|_| ApiError::Internal(anyhow::anyhow!("request without an authenticated caller")))
}

fn state<'a>(ctx: &Context<'a>) -> &'a AppState {
    ctx.data_unchecked::<AppState>()
}

/// A page of a list fetched with one row more than `first`, which tells whether
/// another page follows; cursors are the rows' ids.
fn connection<R, T: async_graphql::OutputType, Id: std::fmt::Display>(
    mut rows: Vec<R>,
    first: usize,
    has_previous: bool,
    id: impl Fn(&R) -> Id,
    convert: impl Fn(R) -> T,
) -> Connection<String, T, EmptyFields, EmptyFields> {
    let has_next = rows.len() > first;
    rows.truncate(first);
    let mut connection = Connection::new(has_previous, has_next);
    connection.edges.extend(
        rows.into_iter()
            .map(|row| Edge::new(id(&row).to_string(), convert(row))),
    );
    connection
}

fn page_size(first: Option<i32>) -> ApiResult<usize> {
    match first {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE as i32).contains(&n) => Ok(n as usize),
        Some(_) => Err(ApiError::bad_input(
            "first",
            format!("first: must be between 1 and {MAX_PAGE}"),
        )),
    }
}

/// A page's cursor: the id of the last item of the page before.
fn parse_cursor<Id: std::str::FromStr>(after: Option<String>) -> ApiResult<Option<Id>> {
    after
        .map(|cursor| {
            cursor
                .parse()
                .map_err(|_| ApiError::bad_input("after", "after: not a cursor of this list"))
        })
        .transpose()
}

/// A GraphQL `ID` as the typed id it must be: the one conversion at this edge.
fn parse_id<Id: std::str::FromStr>(field: &'static str, id: &ID) -> ApiResult<Id> {
    id.as_str()
        .parse()
        .map_err(|_| ApiError::bad_input(field, format!("{field}: `{}` is not a valid id", id.as_str())))
}

pub struct QueryRoot;

#[Object]
impl QueryRoot {
    /// The caller's tenant: its `id` is the `tenantId` events for it carry.
    async fn tenant(&self, ctx: &Context<'_>) -> async_graphql::Result<Tenant> {
        let caller = caller(ctx)?;
        let tenant = tenants::tenant_by_id(&state(ctx).db, caller.tenant_id)
            .await
            .or_not_found("tenant")?
            .ok_or(ApiError::NotFound("tenant"))?;
        Ok(Tenant {
            id: ID(tenant.id.to_string()),
            name: tenant.name,
        })
    }

    async fn webhook(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Webhook> {
        let caller = caller(ctx)?;
        let id = parse_id("id", &id)?;
        let state = state(ctx);
        let webhook = webhooks::webhook_of_tenant(&state.db, &state.cipher, caller.tenant_id, id)
            .await
            .or_not_found("webhook")?;
        Ok(webhook.into())
    }

    /// The caller's webhooks in creation order, a page at a time.
    async fn webhooks(
        &self,
        ctx: &Context<'_>,
        #[graphql(desc = "Page size, 1 to 100; default 50.")] first: Option<i32>,
        #[graphql(desc = "The `endCursor` of the previous page.")] after: Option<String>,
    ) -> async_graphql::Result<Connection<String, Webhook, EmptyFields, EmptyFields>> {
        let caller = caller(ctx)?;
        let first = page_size(first)?;
        let after = parse_cursor(after)?;
        let state = state(ctx);
        let page = webhooks::list_webhooks(&state.db, &state.cipher, caller.tenant_id, after, first as u64)
            .await
            .map_err(ApiError::from)?;
        Ok(connection(
            page,
            first,
            after.is_some(),
            |webhook| webhook.id,
            Webhook::from,
        ))
    }

    /// One delivery of the caller's tenant, with its attempts.
    async fn delivery(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Delivery> {
        let caller = caller(ctx)?;
        let id = parse_id("id", &id)?;
        let delivery = deliveries::delivery_of_tenant(&state(ctx).db, caller.tenant_id, id)
            .await
            .or_not_found("delivery")?;
        Ok(delivery.into())
    }

    /// The delivery log, newest first, a page at a time.
    async fn deliveries(
        &self,
        ctx: &Context<'_>,
        filter: Option<DeliveryFilter>,
        #[graphql(desc = "Page size, 1 to 100; default 50.")] first: Option<i32>,
        #[graphql(desc = "The `endCursor` of the previous page.")] after: Option<String>,
    ) -> async_graphql::Result<Connection<String, Delivery, EmptyFields, EmptyFields>> {
        let caller = caller(ctx)?;
        let first = page_size(first)?;
        let after = parse_cursor(after)?;
        let filter = filter.unwrap_or_default();
        let filter = deliveries::DeliveryFilter {
            webhook_id: filter
                .webhook_id
                .as_ref()
                .map(|id| parse_id("filter.webhookId", id))
                .transpose()?,
            status: filter.status.map(Into::into),
            event_type: filter.event.map(Into::into),
            created_after: filter.since,
            created_before: filter.until,
        };
        let page = deliveries::list_deliveries(&state(ctx).db, caller.tenant_id, &filter, after, first as u64)
            .await
            .map_err(ApiError::from)?;
        Ok(connection(
            page,
            first,
            after.is_some(),
            |delivery| delivery.id,
            Delivery::from,
        ))
    }

    /// Every event type, with what it means.
    async fn event_types(&self) -> Vec<EventTypeInfo> {
        EventType::ALL
            .into_iter()
            .map(|event_type| EventTypeInfo {
                name: event_type.into(),
                description: event_type.description().to_owned(),
                example: async_graphql::Json(serde_json::json!({
                    "event": event_type.as_str(),
                    "timestamp": "2025-12-16T15:30:00Z",
                    "data": event_type.example_data(),
                })),
            })
            .collect()
    }
}

pub struct MutationRoot;

#[Object]
impl MutationRoot {
    /// Creates a webhook. The secret is generated (`whsec_…`) when omitted and is
    /// returned so the receiver can verify `X-Aegis-Signature`.
    async fn create_webhook(&self, ctx: &Context<'_>, input: WebhookInput) -> async_graphql::Result<Webhook> {
        let caller = caller(ctx)?;
        let state = state(ctx);
        let new = validate_input(state, input)?;
        let webhook = webhooks::create_webhook(&state.db, &state.cipher, caller.tenant_id, new)
            .await
            .map_err(ApiError::from)?;
        tracing::info!(webhook_id = %webhook.id, tenant_id = %caller.tenant_id, "webhook created");
        Ok(webhook.into())
    }

    /// Changes a webhook; omitted fields stay as they are.
    async fn update_webhook(
        &self,
        ctx: &Context<'_>,
        id: ID,
        input: WebhookUpdateInput,
    ) -> async_graphql::Result<Webhook> {
        let caller = caller(ctx)?;
        let id = parse_id("id", &id)?;
        let state = state(ctx);
        let changes = validate_changes(state, input)?;
        let webhook = webhooks::update_webhook(&state.db, &state.cipher, caller.tenant_id, id, changes)
            .await
            .or_not_found("webhook")?;
        Ok(webhook.into())
    }

    /// Deletes a webhook and its delivery log; returns its id.
    async fn delete_webhook(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<ID> {
        let caller = caller(ctx)?;
        let uuid = parse_id("id", &id)?;
        webhooks::delete_webhook(&state(ctx).db, caller.tenant_id, uuid)
            .await
            .or_not_found("webhook")?;
        Ok(id)
    }

    /// Replaces the signing secret (generated when omitted) and returns the
    /// webhook with it. `X-Aegis-Signature` uses the new secret at once; the old
    /// one keeps signing `webhook-signature`, beside the new, for a grace period
    /// (`AEGIS_SECRET_ROTATION_GRACE`, default 24 h), so receivers can switch.
    async fn rotate_webhook_secret(
        &self,
        ctx: &Context<'_>,
        id: ID,
        secret: Option<String>,
    ) -> async_graphql::Result<Webhook> {
        let caller = caller(ctx)?;
        let id = parse_id("id", &id)?;
        let state = state(ctx);
        let secret = parse_secret(secret)?;
        let grace = chrono::Duration::from_std(state.secret_rotation_grace).unwrap_or(chrono::Duration::zero());
        let webhook = webhooks::rotate_secret(
            &state.db,
            &state.cipher,
            caller.tenant_id,
            id,
            &secret,
            chrono::Utc::now() + grace,
        )
        .await
        .or_not_found("webhook")?;
        tracing::info!(webhook_id = %webhook.id, "webhook secret rotated");
        Ok(webhook.into())
    }

    /// Pauses or resumes a webhook. Resuming clears `disabledReason` and the
    /// failure streak.
    async fn set_webhook_active(&self, ctx: &Context<'_>, id: ID, active: bool) -> async_graphql::Result<Webhook> {
        let caller = caller(ctx)?;
        let id = parse_id("id", &id)?;
        let state = state(ctx);
        let was_active = webhooks::webhook_of_tenant(&state.db, &state.cipher, caller.tenant_id, id)
            .await
            .or_not_found("webhook")?
            .active;
        let webhook = webhooks::set_webhook_active(&state.db, &state.cipher, caller.tenant_id, id, active)
            .await
            .or_not_found("webhook")?;
        if active && !was_active {
            tracing::info!(webhook_id = %webhook.id, "webhook re-enabled");
            aegis_webhook_core::metrics::webhook_reenabled();
        }
        Ok(webhook.into())
    }

    /// Sends a `WEBHOOK_TEST` event to the webhook now; returns its delivery.
    async fn test_webhook(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Delivery> {
        let caller = caller(ctx)?;
        let id = parse_id("id", &id)?;
        let state = state(ctx);
        let webhook = webhooks::webhook_of_tenant(&state.db, &state.cipher, caller.tenant_id, id)
            .await
            .or_not_found("webhook")?;
        let event = ValidatedEvent::webhook_test(caller.tenant_id, webhook.id, chrono::Utc::now());
        let new = deliveries::NewDelivery {
            webhook_id: webhook.id,
            event_type: EventType::WebhookTest,
        };
        let stored = events::insert_event_with_deliveries(&state.db, &event, &[new], chrono::Utc::now())
            .await
            .map_err(ApiError::from)?;
        let delivery_id = match stored.as_deref() {
            Some([delivery_id]) => *delivery_id,
            _ => return Err(ApiError::Internal(anyhow::anyhow!("a fresh test event was stored as a repeat")).into()),
        };
        let publish = state
            .queue
            .publish_task(DeliveryTask::new(delivery_id, webhook.id, 1), std::time::Duration::ZERO);
        queue::publish_after_commit(Writer::Api, "a test delivery", publish).await;
        delivery_of(state, caller, delivery_id).await
    }

    /// Sends a finished delivery once more (same `X-Aegis-Delivery`, next
    /// attempt number). A delivery still pending is returned as it is.
    async fn redeliver(&self, ctx: &Context<'_>, delivery_id: ID) -> async_graphql::Result<Delivery> {
        let caller = caller(ctx)?;
        let id = parse_id("deliveryId", &delivery_id)?;
        let state = state(ctx);
        deliveries::delivery_of_tenant(&state.db, caller.tenant_id, id)
            .await
            .or_not_found("delivery")?;
        reopen_and_publish(state, id).await?;
        delivery_of(state, caller, id).await
    }

    /// Redelivers every failed delivery of a webhook created since `since`;
    /// returns how many.
    async fn replay_dead_letters(
        &self,
        ctx: &Context<'_>,
        webhook_id: ID,
        since: chrono::DateTime<chrono::Utc>,
    ) -> async_graphql::Result<i32> {
        let caller = caller(ctx)?;
        let webhook_id = parse_id("webhookId", &webhook_id)?;
        let state = state(ctx);
        webhooks::webhook_of_tenant(&state.db, &state.cipher, caller.tenant_id, webhook_id)
            .await
            .or_not_found("webhook")?;
        let failed = deliveries::failed_since(&state.db, webhook_id, since)
            .await
            .map_err(ApiError::from)?;
        let mut replayed = 0;
        for id in failed {
            if reopen_and_publish(state, id).await? {
                replayed += 1;
            }
        }
        Ok(replayed)
    }
}

async fn delivery_of(state: &AppState, caller: Caller, id: DeliveryId) -> async_graphql::Result<Delivery> {
    let delivery = deliveries::delivery_of_tenant(&state.db, caller.tenant_id, id)
        .await
        .or_not_found("delivery")?;
    Ok(delivery.into())
}

/// Reopens a finished delivery and publishes its next attempt; false when it
/// was still pending.
async fn reopen_and_publish(state: &AppState, id: DeliveryId) -> ApiResult<bool> {
    let next = deliveries::reopen(&state.db, id, chrono::Utc::now())
        .await
        .or_not_found("delivery")?;
    let Some(reopened) = next else { return Ok(false) };
    let task = DeliveryTask::new(id, reopened.webhook_id, reopened.attempts + 1);
    let publish = state.queue.publish_task(task, std::time::Duration::ZERO);
    queue::publish_after_commit(Writer::Api, "a redelivery", publish).await;
    Ok(true)
}

fn validate_url(state: &AppState, url: &str) -> ApiResult<WebhookUrl> {
    WebhookUrl::parse(url, &state.policy).map_err(|error| ApiError::bad_input("url", error))
}

fn validate_events(events: Vec<WebhookEvent>) -> ApiResult<Vec<EventType>> {
    let events: BTreeSet<EventType> = events.into_iter().map(EventType::from).collect();
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

/// Trimmed; empty means none.
fn validate_description(description: String) -> ApiResult<Option<String>> {
    let description = description.trim().to_owned();
    if description.chars().count() > MAX_DESCRIPTION_CHARS {
        return Err(ApiError::bad_input(
            "description",
            format!("description: must be at most {MAX_DESCRIPTION_CHARS} characters"),
        ));
    }
    Ok((!description.is_empty()).then_some(description))
}

fn validate_project_ids(ids: &[ID]) -> ApiResult<Vec<Uuid>> {
    let ids: BTreeSet<Uuid> = ids
        .iter()
        .map(|id| parse_id("projectIds", id))
        .collect::<ApiResult<_>>()?;
    Ok(ids.into_iter().collect())
}

/// A given secret, checked, or a generated one.
fn parse_secret(secret: Option<String>) -> ApiResult<SigningSecret> {
    match secret {
        None => Ok(SigningSecret::generate()),
        Some(text) => {
            SigningSecret::parse(&text).map_err(|error| ApiError::bad_input("secret", format!("secret: {error}")))
        }
    }
}

fn validate_input(state: &AppState, input: WebhookInput) -> ApiResult<webhooks::NewWebhook> {
    let secret = parse_secret(input.secret)?;
    Ok(webhooks::NewWebhook {
        url: validate_url(state, &input.url)?,
        events: validate_events(input.events)?,
        description: input.description.map(validate_description).transpose()?.flatten(),
        project_ids: validate_project_ids(&input.project_ids.unwrap_or_default())?,
        secret,
        active: input.active.unwrap_or(true),
    })
}

fn validate_changes(state: &AppState, input: WebhookUpdateInput) -> ApiResult<webhooks::WebhookChanges> {
    Ok(webhooks::WebhookChanges {
        url: input.url.as_deref().map(|url| validate_url(state, url)).transpose()?,
        events: input.events.map(validate_events).transpose()?,
        description: input.description.map(validate_description).transpose()?,
        project_ids: input.project_ids.as_deref().map(validate_project_ids).transpose()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The schema file is the API's contract for clients and reviewers: it must
    /// change with the code, in the same commit. `UPDATE_SCHEMA=1` rewrites it.
    #[test]
    fn the_committed_schema_matches_the_code() {
        let sdl = Schema::build(QueryRoot, MutationRoot, EmptySubscription).finish().sdl();
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/schema.graphql");
        if std::env::var_os("UPDATE_SCHEMA").is_some() {
            std::fs::write(path, &sdl).expect("write schema.graphql");
        }
        let committed = std::fs::read_to_string(path).expect("schema.graphql is committed");
        assert!(
            committed == sdl,
            "schema.graphql differs from the code; run `UPDATE_SCHEMA=1 cargo test -p aegis-webhook-api` and commit it"
        );
    }
}
