//! The queue port: what the processes need from a message broker, and the one
//! definition of the messages they exchange.
//!
//! Two adapters implement it: [`memory::MemoryQueue`] for the embedded mode (one
//! process) and, for production, RabbitMQ. Message bodies are versioned here and
//! nowhere else: add a `V2` variant rather than edit `V1`.
//!
//! Every publish happens in a `publish` span and carries that span's W3C trace
//! context beside the body (AMQP headers `traceparent`/`tracestate`; the
//! in-process queue keeps them with the message); a consumer finds it on
//! [`QueueMessage::trace_headers`] and continues the trace with
//! [`crate::telemetry::continue_trace`]. Callers pass nothing: the context is
//! the calling span's, so a publish made while handling a message carries the
//! trace on.

pub mod consume;
pub mod memory;

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::ids::{DeliveryId, WebhookId};
use crate::telemetry::TraceHeaders;

/// "Make attempt `attempt` of delivery `delivery_id`." Everything else about the
/// delivery is read from the database, which stays the source of truth; the
/// webhook's id rides along so a worker can hold back a task whose webhook has
/// all its slots busy without a database read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum DeliveryTask {
    /// Still read, for tasks published before `V2`; never written.
    #[serde(rename = "delivery.v1", rename_all = "camelCase")]
    V1 { delivery_id: DeliveryId, attempt: u32 },
    #[serde(rename = "delivery.v2", rename_all = "camelCase")]
    V2 {
        delivery_id: DeliveryId,
        webhook_id: WebhookId,
        attempt: u32,
    },
}

impl DeliveryTask {
    pub fn new(delivery_id: DeliveryId, webhook_id: WebhookId, attempt: u32) -> Self {
        DeliveryTask::V2 {
            delivery_id,
            webhook_id,
            attempt,
        }
    }

    pub fn delivery_id(&self) -> DeliveryId {
        match self {
            DeliveryTask::V1 { delivery_id, .. } | DeliveryTask::V2 { delivery_id, .. } => *delivery_id,
        }
    }

    /// The webhook the delivery goes to; unknown for `V1` tasks.
    pub fn webhook_id(&self) -> Option<WebhookId> {
        match self {
            DeliveryTask::V1 { .. } => None,
            DeliveryTask::V2 { webhook_id, .. } => Some(*webhook_id),
        }
    }

    pub fn attempt(&self) -> u32 {
        match self {
            DeliveryTask::V1 { attempt, .. } | DeliveryTask::V2 { attempt, .. } => *attempt,
        }
    }

    /// Whether the task is a first attempt, which the queues keep apart from
    /// retries so that a backlog of retries never starves new deliveries.
    pub fn is_first_attempt(&self) -> bool {
        self.attempt() <= 1
    }

    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("a task always serializes"))
    }

    pub fn decode(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }
}

/// One event's first attempts in one message: the ingester publishes one per
/// event rather than one per delivery, so the broker's work grows with events,
/// not with events × webhooks. Retries, re-publishes and dead letters stay single
/// [`DeliveryTask`]s; a worker reads both with [`decode_tasks`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum FirstAttempts {
    #[serde(rename = "deliveries.v1", rename_all = "camelCase")]
    V1 { deliveries: Vec<DeliveryRef> },
}

/// A delivery and the webhook it goes to, inside [`FirstAttempts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeliveryRef {
    pub delivery_id: DeliveryId,
    pub webhook_id: WebhookId,
}

impl FirstAttempts {
    /// The message for these first-attempt tasks (their attempt numbers are 1).
    pub fn new(tasks: &[DeliveryTask]) -> Self {
        FirstAttempts::V1 {
            deliveries: tasks
                .iter()
                .filter_map(|task| {
                    Some(DeliveryRef {
                        delivery_id: task.delivery_id(),
                        webhook_id: task.webhook_id()?,
                    })
                })
                .collect(),
        }
    }

    /// The tasks it carries, each attempt 1.
    pub fn tasks(&self) -> Vec<DeliveryTask> {
        match self {
            FirstAttempts::V1 { deliveries } => deliveries
                .iter()
                .map(|delivery| DeliveryTask::new(delivery.delivery_id, delivery.webhook_id, 1))
                .collect(),
        }
    }

    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("first attempts always serialize"))
    }
}

/// Reads a message of the tasks stream: a single task, or one event's first
/// attempts.
pub fn decode_tasks(body: &[u8]) -> Result<Vec<DeliveryTask>, serde_json::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum TasksBody {
        One(DeliveryTask),
        Many(FirstAttempts),
    }
    Ok(match serde_json::from_slice(body)? {
        TasksBody::One(task) => vec![task],
        TasksBody::Many(first) => first.tasks(),
    })
}

/// The two streams processes consume.
/// Of every `RETRY_SHARE` tasks a busy worker takes while both kinds wait, one
/// is a retry: first attempts go first, but a flood of them cannot park retries
/// forever either.
pub const RETRY_SHARE: usize = 4;

/// Picks which lane of the tasks stream (first attempts, or retries that are
/// due) a consumer serves first on its next take, for the consumers of both
/// adapters.
#[derive(Debug, Default)]
pub struct LanePicker {
    turn: usize,
}

impl LanePicker {
    /// Whether this take should look at due retries before first attempts.
    pub fn prefer_retries(&mut self) -> bool {
        self.turn = self.turn.wrapping_add(1);
        self.turn.is_multiple_of(RETRY_SHARE)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Upstream envelopes, consumed by the ingester.
    Events,
    /// Delivery tasks, consumed by workers: first attempts and due retries,
    /// kept in two lanes and interleaved by [`LanePicker`].
    Tasks,
}

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the queue is closed")]
    Closed,
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// Settles a message with the broker.
#[async_trait]
pub trait Acknowledger: Send {
    /// The message was handled; the broker may forget it.
    async fn ack(self: Box<Self>) -> Result<(), QueueError>;
    /// The message was not handled; the broker gives it to a consumer again.
    async fn requeue(self: Box<Self>) -> Result<(), QueueError>;
}

/// A message taken from a stream, to be acked or requeued exactly once.
pub struct QueueMessage {
    pub body: Bytes,
    /// The trace context the publisher sent along; empty if it sent none.
    trace_headers: TraceHeaders,
    acknowledger: Box<dyn Acknowledger>,
}

impl std::fmt::Debug for QueueMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueMessage")
            .field("bytes", &self.body.len())
            .finish_non_exhaustive()
    }
}

impl QueueMessage {
    pub fn new(body: Bytes, acknowledger: Box<dyn Acknowledger>) -> Self {
        QueueMessage {
            body,
            trace_headers: TraceHeaders::default(),
            acknowledger,
        }
    }

    /// The message with the trace context it arrived with.
    pub fn with_trace_headers(mut self, trace_headers: TraceHeaders) -> Self {
        self.trace_headers = trace_headers;
        self
    }

    /// The publisher's trace context (see [`crate::telemetry::continue_trace`]).
    pub fn trace_headers(&self) -> &TraceHeaders {
        &self.trace_headers
    }

    pub async fn ack(self) -> Result<(), QueueError> {
        self.acknowledger.ack().await
    }

    pub async fn requeue(self) -> Result<(), QueueError> {
        self.acknowledger.requeue().await
    }
}

#[async_trait]
pub trait Consumer: Send {
    /// The next message; `None` once the queue is closed for good.
    async fn next(&mut self) -> Option<Result<QueueMessage, QueueError>>;
}

/// The span of one publish, as OpenTelemetry's messaging conventions name
/// things; the message carries its context, so the consumer's span is its child.
pub fn publish_span(system: &'static str, destination: &str) -> tracing::Span {
    tracing::info_span!(
        "publish",
        otel.kind = "producer",
        messaging.system = system,
        messaging.destination.name = destination,
    )
}

/// Every publish carries the trace context of the span it is called in (see
/// the module's documentation).
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Whether the broker is reachable now, for readiness probes.
    async fn is_ready(&self) -> bool {
        true
    }

    /// Publishes an upstream envelope under its event name, returning once the
    /// broker has taken responsibility for it.
    async fn publish_event(&self, event_name: &str, envelope: Bytes) -> Result<(), QueueError>;

    /// Parks an event that failed validation, with the reason, for inspection.
    async fn publish_invalid_event(&self, body: Bytes, reason: &str) -> Result<(), QueueError>;

    /// Publishes a delivery task that becomes visible after `delay`.
    async fn publish_task(&self, task: DeliveryTask, delay: Duration) -> Result<(), QueueError>;

    /// Publishes one event's first attempts as one message, visible at once.
    async fn publish_first_attempts(&self, first: FirstAttempts) -> Result<(), QueueError>;

    /// Parks the task of a delivery that failed for good.
    async fn publish_dead_letter(&self, task: DeliveryTask, reason: &str) -> Result<(), QueueError>;

    async fn consume(&self, stream: Stream) -> Result<Box<dyn Consumer>, QueueError>;
}

/// The processes that write to the database and then publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writer {
    Api,
    Ingester,
    Worker,
    Reconciler,
}

impl Writer {
    pub fn as_str(self) -> &'static str {
        match self {
            Writer::Api => "api",
            Writer::Ingester => "ingester",
            Writer::Worker => "worker",
            Writer::Reconciler => "reconciler",
        }
    }
}

/// Whether a publish after a commit reached the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterCommit {
    Published,
    /// The broker refused or was unreachable: the reconciler publishes it.
    LeftToReconciler,
}

/// The one "commit, then publish" policy of every writer: call it only once the
/// database holds what the message announces. The write is the truth and the
/// message a hint, so a publish that fails here is not an error of the caller's
/// step (a requeue would redo committed work, or discard a claim): it is logged,
/// counted (`aegis_publishes_left_to_reconciler_total{writer}`) and left to the
/// reconciler, which publishes every pending delivery that has gone unclaimed
/// past its due time. (A dead letter's copy is not re-sent: the delivery's
/// `FAILED` row is its record, and replays read the database.)
pub async fn publish_after_commit(
    writer: Writer,
    what: &'static str,
    publish: impl std::future::Future<Output = Result<(), QueueError>>,
) -> AfterCommit {
    match publish.await {
        Ok(()) => AfterCommit::Published,
        Err(error) => {
            tracing::warn!(
                writer = writer.as_str(),
                what,
                error = format!("{error:#}"),
                "publish after commit failed; left to the reconciler"
            );
            crate::metrics::publish_left_to_reconciler(writer.as_str());
            AfterCommit::LeftToReconciler
        }
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    #[test]
    fn tasks_have_a_stable_versioned_wire_format() {
        let id = Uuid::parse_str("0190f5a6-5d43-7a2b-9c1f-1c1b2a3d4e5f").expect("uuid");
        let webhook = Uuid::parse_str("0190f5a6-0000-7a2b-9c1f-1c1b2a3d4e5f").expect("uuid");
        let task = DeliveryTask::new(DeliveryId::from_uuid(id), WebhookId::from_uuid(webhook), 3);
        assert_eq!(
            task.encode(),
            Bytes::from_static(
                br#"{"type":"delivery.v2","deliveryId":"0190f5a6-5d43-7a2b-9c1f-1c1b2a3d4e5f","webhookId":"0190f5a6-0000-7a2b-9c1f-1c1b2a3d4e5f","attempt":3}"#
            )
        );
        assert_eq!(DeliveryTask::decode(&task.encode()).expect("decodes"), task);
        assert_eq!(task.webhook_id(), Some(WebhookId::from_uuid(webhook)));
        assert!(!task.is_first_attempt());
        let v1 = DeliveryTask::decode(
            br#"{"type":"delivery.v1","deliveryId":"0190f5a6-5d43-7a2b-9c1f-1c1b2a3d4e5f","attempt":1}"#,
        )
        .expect("v1 still decodes");
        assert_eq!(
            (v1.delivery_id(), v1.webhook_id(), v1.attempt()),
            (DeliveryId::from_uuid(id), None, 1)
        );
        assert!(DeliveryTask::decode(br#"{"type":"delivery.v9"}"#).is_err());
    }

    #[test]
    fn an_events_first_attempts_travel_as_one_versioned_message() {
        let id = Uuid::parse_str("0190f5a6-5d43-7a2b-9c1f-1c1b2a3d4e5f").expect("uuid");
        let webhook = Uuid::parse_str("0190f5a6-0000-7a2b-9c1f-1c1b2a3d4e5f").expect("uuid");
        let task =
            |delivery, webhook| DeliveryTask::new(DeliveryId::from_uuid(delivery), WebhookId::from_uuid(webhook), 1);
        let tasks = vec![task(id, webhook), task(webhook, id)];
        let first = FirstAttempts::new(&tasks);
        assert_eq!(
            first.encode(),
            Bytes::from_static(
                br#"{"type":"deliveries.v1","deliveries":[{"deliveryId":"0190f5a6-5d43-7a2b-9c1f-1c1b2a3d4e5f","webhookId":"0190f5a6-0000-7a2b-9c1f-1c1b2a3d4e5f"},{"deliveryId":"0190f5a6-0000-7a2b-9c1f-1c1b2a3d4e5f","webhookId":"0190f5a6-5d43-7a2b-9c1f-1c1b2a3d4e5f"}]}"#
            )
        );
        assert_eq!(decode_tasks(&first.encode()).expect("many"), tasks);
        let single = DeliveryTask::new(DeliveryId::from_uuid(id), WebhookId::from_uuid(webhook), 4);
        assert_eq!(decode_tasks(&single.encode()).expect("one"), vec![single]);
        assert!(decode_tasks(br#"{"type":"deliveries.v9","deliveries":[]}"#).is_err());
        assert!(decode_tasks(b"not json").is_err());
    }

    #[test]
    fn the_lane_picker_prefers_first_attempts_but_never_starves_retries() {
        let mut picker = LanePicker::default();
        let turns: Vec<bool> = (0..8).map(|_| picker.prefer_retries()).collect();
        assert_eq!(turns.iter().filter(|retries| **retries).count(), 8 / RETRY_SHARE);
        assert!(!turns[0], "the first pick prefers first attempts");
    }
}
