//! The GraphQL schema: queries and mutations over the caller's own tenant.

pub mod size;
mod types;

use aegis_webhook_core::event::EventType;
use aegis_webhook_storage::{audit, deliveries, tenants};
use async_graphql::connection::{Connection, Edge, EmptyFields};
use async_graphql::{Context, EmptySubscription, ID, Object, Schema};

pub use types::{
    AuditEntry, AuditLogFilter, DataRetention, Delivery, DeliveryAttempt, DeliveryFilter, DeliveryStatus,
    EventTypeInfo, PortalSession, PortalThemeInput, Tenant, Webhook, WebhookEvent, WebhookInput, WebhookUpdateInput,
};

use crate::AppState;
use crate::actions::{self, Caller};
use crate::error::{ApiError, ApiResult, StoreResultExt as _};

pub type AegisSchema = Schema<QueryRoot, MutationRoot, EmptySubscription>;

/// How deep a query may go.
const MAX_DEPTH: usize = 12;
/// The most a query may cost, counted before it runs: every field costs 1, a
/// root field that reads the database `cost::ROOT` (root fields run side by
/// side, so they are what a document could multiply into statements: twenty
/// at most), a per-item field that reads it `cost::DB`, and a list multiplies
/// what it holds by its page size (`first`, default 50). A full page of 100
/// webhooks with their stats costs about 1,800, a page of 100 deliveries with
/// every attempt about 11,700.
pub const MAX_COMPLEXITY: usize = 20_000;
const MAX_PAGE: usize = 100;
const DEFAULT_PAGE: usize = 50;

/// Weights of the cost model, used in the `complexity` attributes.
pub(crate) mod cost {
    /// A root field, which runs at least one statement of its own.
    pub const ROOT: usize = 1_000;
    /// A field of an item that reads the database: one statement for a whole
    /// page (the list reads it for all its items at once), or one more under
    /// a single item.
    pub const DB: usize = 5;
    /// An attempt's response body: up to 64 KiB at the default
    /// `AEGIS_MAX_RESPONSE_BODY_BYTES`, one for each KiB, so one query reads
    /// a few hundred at most (a page of 100 deliveries with bodies costs
    /// more than a query may: ask for smaller pages).
    pub const RESPONSE_BODY: usize = 64;

    /// A root page of `first` items (default 50), each costing `child`.
    pub fn page(first: Option<i32>, child: usize) -> usize {
        let first = first.map_or(super::DEFAULT_PAGE, |n| {
            usize::try_from(n).unwrap_or(0).min(super::MAX_PAGE)
        });
        ROOT + first.max(1) * child
    }
}

/// async-graphql's messages for its own limits, and what this API says
/// instead: the limit, by number.
pub(crate) fn explain_limit(message: &str) -> Option<String> {
    match message {
        "Query is too complex." => Some(format!(
            "the query costs more than {MAX_COMPLEXITY}: a root field counts {}, a list its page size (`first`, default {DEFAULT_PAGE}) times what each item selects; ask for fewer root fields or smaller pages",
            cost::ROOT
        )),
        "Query is nested too deep." => Some(format!("the query is nested more than {MAX_DEPTH} deep")),
        _ => None,
    }
}

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

pub(crate) fn caller(ctx: &Context<'_>) -> ApiResult<Caller> {
    ctx.data::<Caller>()
        .copied()
        .map_err(|_| ApiError::Internal(anyhow::anyhow!("request without an authenticated caller")))
}

pub(crate) fn state<'a>(ctx: &Context<'a>) -> &'a AppState {
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
    #[graphql(complexity = "cost::ROOT + child_complexity")]
    async fn tenant(&self, ctx: &Context<'_>) -> async_graphql::Result<Tenant> {
        let caller = caller(ctx)?;
        let tenant = tenants::tenant_by_id(&state(ctx).db, caller.tenant_id)
            .await
            .or_not_found("tenant")?
            .ok_or(ApiError::NotFound("tenant"))?;
        let retention = actions::retention_of(state(ctx), &caller).await?;
        Ok(Tenant {
            id: ID(tenant.id.to_string()),
            name: tenant.name,
            retention: retention.into(),
        })
    }

    #[graphql(complexity = "cost::ROOT + child_complexity")]
    async fn webhook(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Webhook> {
        let caller = caller(ctx)?;
        let view = actions::webhook(state(ctx), &caller, parse_id("id", &id)?).await?;
        Ok(Webhook::from(view))
    }

    /// The caller's webhooks in creation order, a page at a time.
    #[graphql(complexity = "cost::page(first, child_complexity)")]
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
        let page = actions::webhooks_page(state, &caller, after, first as u64).await?;
        let mut page: Vec<Webhook> = page.into_iter().map(Webhook::from).collect();
        // The page's stats in one statement, when the query asks for them.
        if selects(ctx, &["stats"]) {
            let ids: Vec<_> = page.iter().take(first).map(|webhook| webhook.webhook_id).collect();
            let mut stats = actions::stats_of(state, &caller, &ids).await?;
            for webhook in &mut page {
                webhook.prefetched_stats = stats.remove(&webhook.webhook_id);
            }
        }
        Ok(connection(
            page,
            first,
            after.is_some(),
            |webhook| webhook.webhook_id,
            |webhook| webhook,
        ))
    }

    /// One delivery of the caller's tenant, with its attempts.
    #[graphql(complexity = "cost::ROOT + child_complexity")]
    async fn delivery(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Delivery> {
        let caller = caller(ctx)?;
        let delivery = actions::delivery(state(ctx), &caller, parse_id("id", &id)?).await?;
        Ok(delivery.into())
    }

    /// The delivery log, newest first, a page at a time.
    #[graphql(complexity = "cost::page(first, child_complexity)")]
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
        let state = state(ctx);
        let page = actions::deliveries_page(state, &caller, &filter, after, first as u64).await?;
        let mut page: Vec<Delivery> = page.into_iter().map(Delivery::from).collect();
        // The page's attempts at once, when the query asks for them; their
        // response bodies only if it asks for those.
        if selects(ctx, &["attempts"]) {
            let ids: Vec<_> = page.iter().take(first).map(|delivery| delivery.delivery_id).collect();
            let bodies = selects(ctx, &["attempts", "responseBody"]);
            let mut attempts = actions::attempts_of(state, &caller, &ids, bodies).await?;
            for delivery in &mut page {
                delivery.prefetched_attempts = Some(attempts.remove(&delivery.delivery_id).unwrap_or_default());
            }
        }
        Ok(connection(
            page,
            first,
            after.is_some(),
            |delivery| delivery.delivery_id,
            |delivery| delivery,
        ))
    }

    /// The tenant's audit log: every change made through the API (and every
    /// API key made or revoked), newest first, a page at a time.
    #[graphql(complexity = "cost::page(first, child_complexity)")]
    async fn audit_log(
        &self,
        ctx: &Context<'_>,
        filter: Option<AuditLogFilter>,
        #[graphql(desc = "Page size, 1 to 100; default 50.")] first: Option<i32>,
        #[graphql(desc = "The `endCursor` of the previous page.")] after: Option<String>,
    ) -> async_graphql::Result<Connection<String, AuditEntry, EmptyFields, EmptyFields>> {
        let caller = caller(ctx)?;
        let first = page_size(first)?;
        let after = parse_cursor(after)?;
        let filter = filter.unwrap_or_default();
        let filter = audit::Filter {
            operation: filter.operation,
            target_id: filter.target_id.map(|id| id.0),
            api_key_id: filter
                .api_key_id
                .as_ref()
                .map(|id| parse_id("filter.apiKeyId", id))
                .transpose()?,
            since: filter.since,
            until: filter.until,
        };
        let page = actions::audit_page(state(ctx), &caller, &filter, after, first as u64).await?;
        Ok(connection(
            page,
            first,
            after.is_some(),
            |entry| entry.id,
            AuditEntry::from,
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

/// Whether the current list field's items select `field` (through `nodes`
/// or `edges { node }`), so the list can fetch it for the whole page at once.
fn selects(ctx: &Context<'_>, path: &[&str]) -> bool {
    let look_ahead = ctx.look_ahead();
    let (nodes, edges) = path.iter().fold(
        (look_ahead.field("nodes"), look_ahead.field("edges").field("node")),
        |(nodes, edges), field| (nodes.field(field), edges.field(field)),
    );
    nodes.exists() || edges.exists()
}

pub struct MutationRoot;

/// A count of seconds a client gave, which must be positive.
fn positive_seconds(field: &'static str, seconds: Option<i64>) -> Result<Option<std::time::Duration>, ApiError> {
    match seconds {
        None => Ok(None),
        Some(seconds) => u64::try_from(seconds)
            .ok()
            .filter(|seconds| *seconds > 0)
            .map(|seconds| Some(std::time::Duration::from_secs(seconds)))
            .ok_or_else(|| ApiError::bad_input(field, format!("{field} must be a positive number of seconds"))),
    }
}

#[Object]
impl MutationRoot {
    /// Creates a webhook. The secret is generated (`whsec_…`) when omitted and is
    /// returned so the receiver can verify `X-Aegis-Signature`.
    #[graphql(complexity = "cost::ROOT + child_complexity")]
    async fn create_webhook(&self, ctx: &Context<'_>, input: WebhookInput) -> async_graphql::Result<Webhook> {
        let caller = caller(ctx)?;
        let view = actions::create_webhook(state(ctx), &caller, input.into()).await?;
        Ok(view.into())
    }

    /// Changes a webhook; omitted fields stay as they are.
    #[graphql(complexity = "cost::ROOT + child_complexity")]
    async fn update_webhook(
        &self,
        ctx: &Context<'_>,
        id: ID,
        input: WebhookUpdateInput,
    ) -> async_graphql::Result<Webhook> {
        let caller = caller(ctx)?;
        let view = actions::update_webhook(state(ctx), &caller, parse_id("id", &id)?, input.into()).await?;
        Ok(view.into())
    }

    /// Deletes a webhook and its delivery log; returns its id.
    #[graphql(complexity = "cost::ROOT")]
    async fn delete_webhook(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<ID> {
        let caller = caller(ctx)?;
        actions::delete_webhook(state(ctx), &caller, parse_id("id", &id)?).await?;
        Ok(id)
    }

    /// Replaces the signing secret (generated when omitted) and returns the
    /// webhook with it. `X-Aegis-Signature` uses the new secret at once; the old
    /// one keeps signing `webhook-signature`, beside the new, for a grace period
    /// (`AEGIS_SECRET_ROTATION_GRACE`, default 24 h), so receivers can switch.
    #[graphql(complexity = "cost::ROOT + child_complexity")]
    async fn rotate_webhook_secret(
        &self,
        ctx: &Context<'_>,
        id: ID,
        secret: Option<String>,
    ) -> async_graphql::Result<Webhook> {
        let caller = caller(ctx)?;
        let view = actions::rotate_secret(state(ctx), &caller, parse_id("id", &id)?, secret).await?;
        Ok(view.into())
    }

    /// Pauses or resumes a webhook. Resuming clears `disabledReason` and the
    /// failure streak.
    #[graphql(complexity = "cost::ROOT + child_complexity")]
    async fn set_webhook_active(&self, ctx: &Context<'_>, id: ID, active: bool) -> async_graphql::Result<Webhook> {
        let caller = caller(ctx)?;
        let view = actions::set_active(state(ctx), &caller, parse_id("id", &id)?, active).await?;
        Ok(view.into())
    }

    /// Sends a `WEBHOOK_TEST` event to the webhook now; returns its delivery.
    #[graphql(complexity = "cost::ROOT + child_complexity")]
    async fn test_webhook(&self, ctx: &Context<'_>, id: ID) -> async_graphql::Result<Delivery> {
        let caller = caller(ctx)?;
        let delivery = actions::test_webhook(state(ctx), &caller, parse_id("id", &id)?).await?;
        Ok(delivery.into())
    }

    /// Sends a finished delivery once more (same `X-Aegis-Delivery`, next
    /// attempt number). A delivery still pending is returned as it is.
    #[graphql(complexity = "cost::ROOT + child_complexity")]
    async fn redeliver(&self, ctx: &Context<'_>, delivery_id: ID) -> async_graphql::Result<Delivery> {
        let caller = caller(ctx)?;
        let delivery = actions::redeliver(state(ctx), &caller, parse_id("deliveryId", &delivery_id)?).await?;
        Ok(delivery.into())
    }

    /// Redelivers the failed deliveries of a webhook created since `since`,
    /// at most 1,000 a call (call again for more); returns how many.
    #[graphql(complexity = "cost::ROOT * 5")]
    async fn replay_dead_letters(
        &self,
        ctx: &Context<'_>,
        webhook_id: ID,
        since: chrono::DateTime<chrono::Utc>,
    ) -> async_graphql::Result<i32> {
        let caller = caller(ctx)?;
        let webhook_id = parse_id("webhookId", &webhook_id)?;
        let replayed = actions::replay_dead_letters(state(ctx), &caller, webhook_id, since).await?;
        Ok(i32::try_from(replayed).unwrap_or(i32::MAX))
    }

    /// Sets how long this organisation's data is kept, each within
    /// `tenant.retention.minSeconds` to `maxSeconds`; an omitted or null value
    /// goes back to the operator's default. A body retention longer than the
    /// record retention is refused. The next expiry pass (about a minute)
    /// applies it: what a shorter retention has passed is expunged then.
    #[graphql(complexity = "cost::ROOT")]
    async fn set_retention(
        &self,
        ctx: &Context<'_>,
        records_seconds: Option<i64>,
        bodies_seconds: Option<i64>,
    ) -> async_graphql::Result<DataRetention> {
        let caller = caller(ctx)?;
        let chosen = aegis_webhook_core::retention::Override {
            records: positive_seconds("recordsSeconds", records_seconds)?,
            bodies: positive_seconds("bodiesSeconds", bodies_seconds)?,
        };
        Ok(actions::set_retention(state(ctx), &caller, chosen).await?.into())
    }

    /// Makes a single-use link into the customer portal (`/portal`) for this
    /// key's tenant. It must be opened within 10 minutes (or `ttlSeconds`, if
    /// shorter); opening it starts a browser session of `ttlSeconds` (60 to
    /// 86,400) with this key's scopes, or `read` only when `readOnly`. The
    /// session acts as this key (the audit log names it) and ends if the key
    /// is revoked. Needs the `write` scope, as every mutation does. `theme`
    /// styles the portal for this session.
    #[graphql(complexity = "cost::ROOT * 5")]
    async fn create_portal_session(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 3600)] ttl_seconds: i64,
        #[graphql(default = false)] read_only: bool,
        theme: Option<PortalThemeInput>,
    ) -> async_graphql::Result<PortalSession> {
        let caller = caller(ctx)?;
        let theme = theme.unwrap_or_default();
        let request = actions::PortalSessionRequest {
            ttl_seconds,
            read_only,
            accent_color: theme.accent_color,
            logo_url: theme.logo_url,
        };
        let link = actions::create_portal_session(state(ctx), &caller, request).await?;
        Ok(PortalSession::from(link))
    }
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
