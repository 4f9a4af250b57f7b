//! GraphQL types: the API's own shapes, converted from domain values (never the
//! database entities themselves).

use aegis_webhook_core::db::webhooks::Webhook as WebhookRecord;
use aegis_webhook_core::event::EventType;
use async_graphql::{Enum, ID, InputObject, SimpleObject};
use chrono::{DateTime, Utc};

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
}

#[derive(SimpleObject, Debug)]
pub struct Webhook {
    pub id: ID,
    pub url: String,
    pub events: Vec<WebhookEvent>,
    /// The signing secret of `X-Aegis-Signature`.
    pub secret: String,
    pub active: bool,
    pub description: Option<String>,
    pub project_ids: Vec<ID>,
    pub disabled_reason: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl From<WebhookRecord> for Webhook {
    fn from(record: WebhookRecord) -> Self {
        Webhook {
            id: ID(record.id.to_string()),
            url: record.url,
            events: record.events.into_iter().map(WebhookEvent::from).collect(),
            secret: record.secret.expose().to_owned(),
            active: record.active,
            description: record.description,
            project_ids: record.project_ids.into_iter().map(|id| ID(id.to_string())).collect(),
            disabled_reason: record.disabled_reason,
            created_at: record.created_at,
            updated_at: record.updated_at,
        }
    }
}

#[derive(SimpleObject, Debug)]
pub struct EventTypeInfo {
    pub name: WebhookEvent,
    pub description: String,
}
