//! The GraphQL schema: queries and mutations over the caller's own tenant.

mod error;
mod types;

use std::collections::BTreeSet;

use aegis_webhook_core::db::{tenants, webhooks};
use aegis_webhook_core::event::EventType;
use aegis_webhook_core::secret::SigningSecret;
use aegis_webhook_core::target::WebhookUrl;
use async_graphql::connection::{Connection, Edge, EmptyFields};
use async_graphql::{Context, EmptySubscription, ID, Object, Schema};
use uuid::Uuid;

pub use error::{ApiError, ApiResult};
pub use types::{EventTypeInfo, Tenant, Webhook, WebhookEvent, WebhookInput};

use crate::AppState;

pub type AegisSchema = Schema<QueryRoot, MutationRoot, EmptySubscription>;

/// The authenticated caller, put into every request's data by the HTTP handler.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub tenant_id: Uuid,
}

/// Limits that keep one request from costing much: how deep and how wide a
/// query may go.
const MAX_DEPTH: usize = 12;
const MAX_COMPLEXITY: usize = 1000;
const MAX_PAGE: usize = 100;
const DEFAULT_PAGE: usize = 50;
const MAX_DESCRIPTION_CHARS: usize = 1000;

pub fn build_schema(state: AppState) -> AegisSchema {
    Schema::build(QueryRoot, MutationRoot, EmptySubscription)
        .data(state)
        .limit_depth(MAX_DEPTH)
        .limit_complexity(MAX_COMPLEXITY)
        .finish()
}

fn caller(ctx: &Context<'_>) -> ApiResult<Caller> {
    ctx.data::<Caller>()
        .copied()
        .map_err(|_| ApiError::Internal(anyhow::anyhow!("request without an authenticated caller")))
}

fn state<'a>(ctx: &Context<'a>) -> &'a AppState {
    ctx.data_unchecked::<AppState>()
}

fn parse_id(field: &'static str, id: &ID) -> ApiResult<Uuid> {
    Uuid::parse_str(id.as_str())
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
            .map_err(|error| ApiError::from_store(error, "tenant"))?
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
            .map_err(|error| ApiError::from_store(error, "webhook"))?;
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
        let first = match first {
            None => DEFAULT_PAGE,
            Some(n) if (1..=MAX_PAGE as i32).contains(&n) => n as usize,
            Some(_) => {
                return Err(ApiError::bad_input("first", format!("first: must be between 1 and {MAX_PAGE}")).into());
            }
        };
        let after = after
            .map(|cursor| {
                Uuid::parse_str(&cursor).map_err(|_| ApiError::bad_input("after", "after: not a cursor of this list"))
            })
            .transpose()?;
        let state = state(ctx);
        let mut page = webhooks::list_webhooks(&state.db, &state.cipher, caller.tenant_id, after, first as u64)
            .await
            .map_err(|error| ApiError::from_store(error, "webhook"))?;
        let has_next = page.len() > first;
        page.truncate(first);
        let mut connection = Connection::new(after.is_some(), has_next);
        connection.edges.extend(
            page.into_iter()
                .map(|webhook| Edge::new(webhook.id.to_string(), Webhook::from(webhook))),
        );
        Ok(connection)
    }

    /// Every event type, with what it means.
    async fn event_types(&self) -> Vec<EventTypeInfo> {
        EventType::ALL
            .into_iter()
            .map(|event_type| EventTypeInfo {
                name: event_type.into(),
                description: event_type.description().to_owned(),
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
            .map_err(|error| ApiError::from_store(error, "webhook"))?;
        tracing::info!(webhook_id = %webhook.id, tenant_id = %caller.tenant_id, "webhook created");
        Ok(webhook.into())
    }
}

fn validate_input(state: &AppState, input: WebhookInput) -> ApiResult<webhooks::NewWebhook> {
    let url = WebhookUrl::parse(&input.url, &state.policy).map_err(|error| ApiError::bad_input("url", error))?;
    let events: BTreeSet<EventType> = input.events.into_iter().map(EventType::from).collect();
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
    let secret = match input.secret {
        None => SigningSecret::generate(),
        Some(text) => {
            SigningSecret::parse(&text).map_err(|error| ApiError::bad_input("secret", format!("secret: {error}")))?
        }
    };
    let description = input
        .description
        .map(|text| text.trim().to_owned())
        .filter(|text| !text.is_empty());
    if description
        .as_ref()
        .is_some_and(|text| text.chars().count() > MAX_DESCRIPTION_CHARS)
    {
        return Err(ApiError::bad_input(
            "description",
            format!("description: must be at most {MAX_DESCRIPTION_CHARS} characters"),
        ));
    }
    let project_ids: BTreeSet<Uuid> = input
        .project_ids
        .unwrap_or_default()
        .iter()
        .map(|id| parse_id("projectIds", id))
        .collect::<ApiResult<_>>()?;
    Ok(webhooks::NewWebhook {
        url,
        events: events.into_iter().collect(),
        description,
        project_ids: project_ids.into_iter().collect(),
        secret,
        active: input.active.unwrap_or(true),
    })
}
