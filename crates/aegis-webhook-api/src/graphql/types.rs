//! GraphQL types: the API's own shapes, converted from domain values (never the
//! database entities themselves).

use aegis_webhook_core::event::EventType;
use aegis_webhook_storage::{audit, deliveries};
use async_graphql::{Enum, ID, InputObject, SimpleObject};
use chrono::{DateTime, Utc};

use super::{caller, cost, state};
use crate::actions::{self, WebhookView};

/// The event types a webhook can subscribe to, as named in the webhook payloads.
#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
#[graphql(name = "WebhookEvent")]
pub enum WebhookEvent {
    VulnerabilityDetected,
    CriticalVulnerabilityDetected,
    PoamDueSoon,
    PoamOverdue,
    EvidenceCompleted,
    WebhookTest,
}

impl From<WebhookEvent> for EventType {
    fn from(event: WebhookEvent) -> Self {
        match event {
            WebhookEvent::VulnerabilityDetected => EventType::VulnerabilityDetected,
            WebhookEvent::CriticalVulnerabilityDetected => EventType::CriticalVulnerabilityDetected,
            WebhookEvent::PoamDueSoon => EventType::PoamDueSoon,
            WebhookEvent::PoamOverdue => EventType::PoamOverdue,
            WebhookEvent::EvidenceCompleted => EventType::EvidenceCompleted,
            WebhookEvent::WebhookTest => EventType::WebhookTest,
        }
    }
}

impl From<EventType> for WebhookEvent {
    fn from(event: EventType) -> Self {
        match event {
            EventType::VulnerabilityDetected => WebhookEvent::VulnerabilityDetected,
            EventType::CriticalVulnerabilityDetected => WebhookEvent::CriticalVulnerabilityDetected,
            EventType::PoamDueSoon => WebhookEvent::PoamDueSoon,
            EventType::PoamOverdue => WebhookEvent::PoamOverdue,
            EventType::EvidenceCompleted => WebhookEvent::EvidenceCompleted,
            EventType::WebhookTest => WebhookEvent::WebhookTest,
        }
    }
}

/// A new webhook. `url`, `events` and `secret` are the fields of the webhook
/// documentation; `secret` is generated when omitted.
#[derive(InputObject, Debug)]
pub struct WebhookInput {
    pub url: String,
    pub events: Vec<WebhookEvent>,
    pub secret: Option<String>,
    pub description: Option<String>,
    /// Only deliver events of these projects; empty or absent means all.
    pub project_ids: Option<Vec<ID>>,
    /// Defaults to true.
    pub active: Option<bool>,
}

#[derive(SimpleObject, Debug)]
pub struct Tenant {
    pub id: ID,
    pub name: String,
    /// How long this organisation's data is kept.
    pub retention: DataRetention,
}

/// How long an organisation's data is kept, counted from its creation. Expiry
/// runs about every minute; on PostgreSQL, where records are dropped a
/// partition at a time (a day, by default), they can stay up to two
/// partitions past their retention. A pending delivery, and the event it will
/// send, are kept until the delivery is final.
#[derive(SimpleObject, Debug)]
pub struct DataRetention {
    /// Final events, deliveries and attempts are expunged this long after
    /// they were created; `delivery` and `redeliver` then answer `EXPUNGED`.
    pub records_seconds: i64,
    /// Event payloads and receivers' response bodies are dropped this long
    /// after creation; the delivery log stays readable, without them, and a
    /// delivery without its payload cannot be redelivered.
    pub bodies_seconds: i64,
    /// Whether `recordsSeconds` is this organisation's own choice
    /// (`setRetention`) rather than the operator's default.
    pub records_chosen: bool,
    /// Whether `bodiesSeconds` is this organisation's own choice.
    pub bodies_chosen: bool,
    /// The shortest retention `setRetention` accepts.
    pub min_seconds: i64,
    /// The longest retention `setRetention` accepts.
    pub max_seconds: i64,
}

impl From<crate::actions::RetentionView> for DataRetention {
    fn from(view: crate::actions::RetentionView) -> Self {
        let seconds = |duration: std::time::Duration| i64::try_from(duration.as_secs()).unwrap_or(i64::MAX);
        DataRetention {
            records_seconds: seconds(view.effective.records()),
            bodies_seconds: seconds(view.effective.bodies()),
            records_chosen: view.chosen.records.is_some(),
            bodies_chosen: view.chosen.bodies.is_some(),
            min_seconds: seconds(view.bounds.min()),
            max_seconds: seconds(view.bounds.max()),
        }
    }
}

#[derive(SimpleObject, Debug)]
#[graphql(complex)]
pub struct Webhook {
    pub id: ID,
    /// `id`, typed, for the fields resolved from it.
    #[graphql(skip)]
    pub webhook_id: aegis_webhook_core::ids::WebhookId,
    pub url: String,
    pub events: Vec<WebhookEvent>,
    /// The webhook with the right to show its secret, for `secret`.
    #[graphql(skip)]
    pub view: WebhookView,
    pub active: bool,
    pub description: Option<String>,
    pub project_ids: Vec<ID>,
    /// Why the webhook is off: set through the API, after a 410 Gone, or after
    /// a streak of failed deliveries (`AEGIS_AUTO_DISABLE_AFTER_FAILURES`).
    pub disabled_reason: Option<String>,
    /// When it was last turned off; null while active.
    pub disabled_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[graphql(skip)]
    pub consecutive_failures: u32,
    #[graphql(skip)]
    pub failing_since: Option<DateTime<Utc>>,
    /// Filled in by a list that read its page's stats at once.
    #[graphql(skip)]
    pub prefetched_stats: Option<deliveries::WebhookDeliveryStats>,
}

/// How a webhook's deliveries are going.
#[derive(SimpleObject, Debug)]
pub struct WebhookStats {
    pub succeeded: u64,
    pub failed: u64,
    pub pending: u64,
    pub last_success_at: Option<DateTime<Utc>>,
    /// Finished deliveries that failed since the last success.
    pub consecutive_failures: u32,
    /// When the first of those failures was recorded; null after a success.
    pub failing_since: Option<DateTime<Utc>>,
}

#[async_graphql::ComplexObject]
impl Webhook {
    /// The signing secret of `X-Aegis-Signature`. Readable with an API key
    /// holding the `secrets` scope, and in the answer to the mutation that set
    /// it (`createWebhook`, `rotateWebhookSecret`) whatever the key's scopes.
    async fn secret(&self) -> async_graphql::Result<&str> {
        Ok(self.view.secret()?)
    }

    #[graphql(complexity = "cost::DB + child_complexity")]
    async fn stats(&self, ctx: &async_graphql::Context<'_>) -> async_graphql::Result<WebhookStats> {
        let stats = match self.prefetched_stats {
            Some(stats) => stats,
            None => {
                let caller = caller(ctx)?;
                actions::stats_of(state(ctx), &caller, &[self.webhook_id])
                    .await?
                    .remove(&self.webhook_id)
                    .unwrap_or_default()
            }
        };
        Ok(WebhookStats {
            succeeded: stats.succeeded,
            failed: stats.failed,
            pending: stats.pending,
            last_success_at: stats.last_success_at,
            consecutive_failures: self.consecutive_failures,
            failing_since: self.failing_since,
        })
    }
}

impl From<WebhookView> for Webhook {
    fn from(view: WebhookView) -> Self {
        let record = &view.webhook;
        Webhook {
            id: ID(record.id.to_string()),
            webhook_id: record.id,
            url: record.url.to_string(),
            events: record.events.iter().copied().map(WebhookEvent::from).collect(),
            active: record.active,
            description: record.description.clone(),
            project_ids: record.project_ids.iter().map(|id| ID(id.to_string())).collect(),
            disabled_reason: record.disabled_reason.clone(),
            disabled_at: record.disabled_at,
            created_at: record.created_at,
            updated_at: record.updated_at,
            consecutive_failures: record.consecutive_failures,
            failing_since: record.failing_since,
            prefetched_stats: None,
            view,
        }
    }
}

impl From<WebhookInput> for actions::WebhookDraft {
    fn from(input: WebhookInput) -> Self {
        actions::WebhookDraft {
            url: input.url,
            events: input.events.into_iter().map(EventType::from).collect(),
            secret: input.secret,
            description: input.description,
            project_ids: input.project_ids.map(|ids| ids.into_iter().map(|id| id.0).collect()),
            active: input.active,
        }
    }
}

impl From<WebhookUpdateInput> for actions::WebhookEdit {
    fn from(input: WebhookUpdateInput) -> Self {
        actions::WebhookEdit {
            url: input.url,
            events: input
                .events
                .map(|events| events.into_iter().map(EventType::from).collect()),
            description: input.description,
            project_ids: input.project_ids.map(|ids| ids.into_iter().map(|id| id.0).collect()),
        }
    }
}

#[derive(SimpleObject, Debug)]
pub struct EventTypeInfo {
    pub name: WebhookEvent,
    pub description: String,
    /// An example of the body delivered for this type.
    pub example: async_graphql::Json<serde_json::Value>,
}

/// Changes to a webhook: omitted fields stay as they are.
#[derive(InputObject, Debug)]
pub struct WebhookUpdateInput {
    pub url: Option<String>,
    pub events: Option<Vec<WebhookEvent>>,
    /// An empty string clears the description.
    pub description: Option<String>,
    /// An empty list removes the project filter.
    pub project_ids: Option<Vec<ID>>,
}

#[derive(Enum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryStatus {
    /// Waiting for its next attempt.
    Pending,
    /// A 2xx answer arrived.
    Succeeded,
    /// Every attempt failed (or the receiver answered 410); dead-lettered.
    Failed,
}

impl From<deliveries::DeliveryStatus> for DeliveryStatus {
    fn from(status: deliveries::DeliveryStatus) -> Self {
        match status {
            deliveries::DeliveryStatus::Pending => DeliveryStatus::Pending,
            deliveries::DeliveryStatus::Succeeded => DeliveryStatus::Succeeded,
            deliveries::DeliveryStatus::Failed => DeliveryStatus::Failed,
        }
    }
}

impl From<DeliveryStatus> for deliveries::DeliveryStatus {
    fn from(status: DeliveryStatus) -> Self {
        match status {
            DeliveryStatus::Pending => deliveries::DeliveryStatus::Pending,
            DeliveryStatus::Succeeded => deliveries::DeliveryStatus::Succeeded,
            DeliveryStatus::Failed => deliveries::DeliveryStatus::Failed,
        }
    }
}

/// Filters of the delivery log; all optional, combined with AND.
#[derive(InputObject, Debug, Default)]
pub struct DeliveryFilter {
    pub webhook_id: Option<ID>,
    pub status: Option<DeliveryStatus>,
    pub event: Option<WebhookEvent>,
    /// Created at or after.
    pub since: Option<DateTime<Utc>>,
    /// Created before.
    pub until: Option<DateTime<Utc>>,
}

/// One event sent (or to be sent) to one webhook.
#[derive(SimpleObject, Debug)]
#[graphql(complex)]
pub struct Delivery {
    /// The `X-Aegis-Delivery` header: the same on every attempt.
    pub id: ID,
    /// `id`, typed, for the fields resolved from it.
    #[graphql(skip)]
    pub delivery_id: aegis_webhook_core::ids::DeliveryId,
    pub webhook_id: ID,
    pub event: WebhookEvent,
    pub status: DeliveryStatus,
    /// Attempts made so far.
    pub attempt_count: u32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    pub last_status_code: Option<u16>,
    pub failure_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    /// Filled in by a list that read its page's attempts at once.
    #[graphql(skip)]
    pub prefetched_attempts: Option<Vec<deliveries::Attempt>>,
}

impl From<deliveries::Delivery> for Delivery {
    fn from(delivery: deliveries::Delivery) -> Self {
        Delivery {
            id: ID(delivery.id.to_string()),
            delivery_id: delivery.id,
            webhook_id: ID(delivery.webhook_id.to_string()),
            event: delivery.event_type.into(),
            status: delivery.status.into(),
            attempt_count: delivery.attempts,
            next_attempt_at: delivery.next_attempt_at,
            last_status_code: delivery.last_status_code,
            failure_reason: delivery.failure_reason,
            created_at: delivery.created_at,
            prefetched_attempts: None,
        }
    }
}

#[async_graphql::ComplexObject]
impl Delivery {
    /// The newest 16 attempts, oldest first: every one on the default retry
    /// schedule (11); each redelivery adds one more (`attemptCount` counts
    /// them all).
    #[graphql(complexity = "cost::DB + deliveries::NEWEST_ATTEMPTS_SHOWN as usize * child_complexity")]
    async fn attempts(&self, ctx: &async_graphql::Context<'_>) -> async_graphql::Result<Vec<DeliveryAttempt>> {
        let attempts = match &self.prefetched_attempts {
            Some(attempts) => attempts.clone(),
            None => {
                let caller = caller(ctx)?;
                let bodies = ctx.look_ahead().field("responseBody").exists();
                actions::attempts_of(state(ctx), &caller, &[self.delivery_id], bodies)
                    .await?
                    .remove(&self.delivery_id)
                    .unwrap_or_default()
            }
        };
        Ok(attempts.into_iter().map(DeliveryAttempt::from).collect())
    }
}

/// One HTTP request of a delivery and what came back.
#[derive(SimpleObject, Debug)]
#[graphql(complex)]
pub struct DeliveryAttempt {
    pub attempt: u32,
    pub started_at: DateTime<Utc>,
    pub duration_ms: u64,
    /// None when no response arrived (timeout, connection error).
    pub status_code: Option<u16>,
    pub error: Option<String>,
    #[graphql(skip)]
    pub response_body: Option<String>,
}

#[async_graphql::ComplexObject]
impl DeliveryAttempt {
    /// The start of the response body (at most
    /// `AEGIS_MAX_RESPONSE_BODY_BYTES`, 64 KiB by default). It counts 64 in
    /// a query's cost: list deliveries with their bodies a few at a time.
    #[graphql(complexity = "cost::RESPONSE_BODY")]
    async fn response_body(&self) -> Option<&str> {
        self.response_body.as_deref()
    }
}

impl From<deliveries::Attempt> for DeliveryAttempt {
    fn from(attempt: deliveries::Attempt) -> Self {
        DeliveryAttempt {
            attempt: attempt.attempt,
            started_at: attempt.started_at,
            duration_ms: u64::try_from(attempt.duration.as_millis()).unwrap_or(u64::MAX),
            status_code: attempt.status_code,
            error: attempt.error,
            response_body: attempt.response_body,
        }
    }
}

/// Filters of the audit log; all optional, combined with AND.
#[derive(InputObject, Debug, Default)]
pub struct AuditLogFilter {
    /// The mutation, e.g. `createWebhook`, or `apikey.create` / `apikey.revoke`.
    pub operation: Option<String>,
    /// The webhook, delivery or API key changed.
    pub target_id: Option<ID>,
    /// Changes made with this API key.
    pub api_key_id: Option<ID>,
    /// At or after.
    pub since: Option<DateTime<Utc>>,
    /// Before.
    pub until: Option<DateTime<Utc>>,
}

/// One change to the tenant's configuration: who, when, what.
#[derive(SimpleObject, Debug)]
pub struct AuditEntry {
    pub id: ID,
    pub occurred_at: DateTime<Utc>,
    /// The key the change was made with; null when an operator made it at the
    /// command line.
    pub api_key_id: Option<ID>,
    /// `api_key` or `operator`.
    pub actor: String,
    pub operation: String,
    /// `webhook`, `delivery` or `api_key`.
    pub target_kind: String,
    pub target_id: Option<ID>,
    /// What changed (never a secret).
    pub summary: async_graphql::Json<serde_json::Value>,
}

impl From<audit::Entry> for AuditEntry {
    fn from(entry: audit::Entry) -> Self {
        AuditEntry {
            id: ID(entry.id.to_string()),
            occurred_at: entry.occurred_at,
            api_key_id: entry.api_key_id.map(|id| ID(id.to_string())),
            actor: entry.actor,
            operation: entry.operation,
            target_kind: entry.target_kind,
            target_id: entry.target_id.map(ID),
            summary: async_graphql::Json(entry.summary),
        }
    }
}

/// How the portal looks for a session.
#[derive(InputObject, Debug, Default)]
pub struct PortalThemeInput {
    /// `#rrggbb`: buttons and links; dark enough for white text on it (a
    /// WCAG contrast of at least 4.5).
    pub accent_color: Option<String>,
    /// An `https` URL of the logo shown in the header (the portal allows its
    /// origin in its Content-Security-Policy).
    pub logo_url: Option<String>,
}

/// A single-use link into the customer portal.
#[derive(SimpleObject, Debug)]
pub struct PortalSession {
    /// The link: `AEGIS_PUBLIC_URL` followed by `path`; null when the
    /// server's public address is not configured (prefix `path` with it).
    pub url: Option<String>,
    /// `/portal/open/<token>`; the token is shown only here.
    pub path: String,
    /// Opened later than this, the link is refused.
    pub link_expires_at: DateTime<Utc>,
    /// What the session may do: `read`, `write`, `secrets`.
    pub scopes: Vec<String>,
}

impl From<actions::PortalLink> for PortalSession {
    fn from(link: actions::PortalLink) -> Self {
        PortalSession {
            url: link.url,
            path: link.path,
            link_expires_at: link.link_expires_at,
            scopes: link.scopes.iter().map(|scope| scope.as_str().to_owned()).collect(),
        }
    }
}
