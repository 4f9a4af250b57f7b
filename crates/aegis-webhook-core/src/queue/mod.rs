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

/// Envelopes the ingester moved to the bulk lane of the events stream
/// together, each as upstream JSON carrying an `id` (the ingester adds the one
/// it gave an envelope without), so that ingesting one again is a no-op. One
/// message for many keeps the broker's cost of moving a flood aside small.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type")]
pub enum DeferredEvents {
    #[serde(rename = "events.deferred.v1", rename_all = "camelCase")]
    V1 { envelopes: Vec<String> },
}

/// [`DeferredEvents`] as read: the envelopes up to the most one message
/// carries, and how many it had. A plain struct, not a tagged enum: serde
/// reads an internally tagged enum by first buffering the whole object,
/// every element of the list included, which is what the bound is for.
#[derive(Deserialize)]
struct DeferredEventsRead {
    #[serde(rename = "type")]
    _version: DeferredEventsVersion,
    envelopes: AtMostMaxEnvelopes,
}

/// The `type` of [`DeferredEvents`] read.
#[derive(Deserialize)]
enum DeferredEventsVersion {
    #[serde(rename = "events.deferred.v1")]
    V1,
}

/// Why a message of the bulk lane is not read as [`DeferredEvents`].
#[derive(Debug, thiserror::Error)]
pub enum NotDeferredEvents {
    /// Not in their format: something else, to be taken as one envelope.
    #[error(transparent)]
    OtherFormat(#[from] serde_json::Error),
    #[error(
        "a message of the bulk lane carries at most {max} envelopes; this one carries {envelopes}",
        max = DeferredEvents::MAX_ENVELOPES
    )]
    TooManyEnvelopes { envelopes: usize },
}

impl DeferredEvents {
    /// The most envelopes one message carries. The ingester never puts more
    /// in one; anyone with the broker's credentials can publish to the bulk
    /// lane, and a message with more is not read as one (see
    /// [`DeferredEvents::decode`]), so reading it never keeps more than this
    /// many (the rest are scanned, to be counted).
    pub const MAX_ENVELOPES: usize = 256;

    pub fn new(envelopes: Vec<String>) -> Self {
        DeferredEvents::V1 { envelopes }
    }

    pub fn envelopes(&self) -> &[String] {
        match self {
            DeferredEvents::V1 { envelopes } => envelopes,
        }
    }

    pub fn into_envelopes(self) -> Vec<String> {
        match self {
            DeferredEvents::V1 { envelopes } => envelopes,
        }
    }

    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("deferred events always serialize"))
    }

    /// The envelopes of a message of the bulk lane of events. One with more
    /// than [`DeferredEvents::MAX_ENVELOPES`] is refused having kept no more
    /// than that many: the rest are only counted.
    pub fn decode(body: &[u8]) -> Result<Self, NotDeferredEvents> {
        let DeferredEventsRead { envelopes, .. } = serde_json::from_slice(body)?;
        match envelopes.count {
            count if count > Self::MAX_ENVELOPES => Err(NotDeferredEvents::TooManyEnvelopes { envelopes: count }),
            _ => Ok(Self::new(envelopes.kept)),
        }
    }
}

/// A list of envelopes read up to [`DeferredEvents::MAX_ENVELOPES`]; the
/// rest only counted.
struct AtMostMaxEnvelopes {
    kept: Vec<String>,
    count: usize,
}

impl<'de> Deserialize<'de> for AtMostMaxEnvelopes {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Envelopes;
        impl<'de> serde::de::Visitor<'de> for Envelopes {
            type Value = AtMostMaxEnvelopes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of envelopes, each a string")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut kept = Vec::new();
                while kept.len() < DeferredEvents::MAX_ENVELOPES {
                    let Some(envelope) = seq.next_element::<String>()? else {
                        break;
                    };
                    kept.push(envelope);
                }
                let mut count = kept.len();
                if count == DeferredEvents::MAX_ENVELOPES {
                    while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                        count += 1;
                    }
                }
                Ok(AtMostMaxEnvelopes { kept, count })
            }
        }
        deserializer.deserialize_seq(Envelopes)
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

/// A lane of a stream. Each stream has an express lane and a bulk lane (see
/// [`crate::fairness`]: work within its tenant's share, and work beyond it);
/// the tasks stream has a third, the due lane, for retries whose delay has
/// passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    Express,
    Bulk,
    Due,
}

impl Lane {
    /// The lane's name in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Express => "express",
            Lane::Bulk => "bulk",
            Lane::Due => "due",
        }
    }
}

/// How consumers share their takes between lanes while several have work:
/// about one take in `retry_share` looks at due retries first and one in
/// `bulk_share` at the bulk lane first; every other take looks at the express
/// lane first. A lane with nothing waiting is passed over, so a lane alone
/// gets every take (work-conserving).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneWeights {
    pub retry_share: u32,
    pub bulk_share: u32,
}

impl Default for LaneWeights {
    fn default() -> Self {
        LaneWeights {
            retry_share: 4,
            bulk_share: 8,
        }
    }
}

/// Picks the order in which a consumer looks at the lanes on its next take,
/// for the consumers of both adapters: a weighted round-robin over the lanes
/// that have work (see [`LaneWeights`]).
#[derive(Debug, Default)]
pub struct LanePicker {
    turn: u32,
    weights: LaneWeights,
}

impl LanePicker {
    pub fn new(weights: LaneWeights) -> Self {
        LanePicker { turn: 0, weights }
    }

    /// The order of this take: every lane, most preferred first.
    pub fn order(&mut self) -> [Lane; 3] {
        self.turn = self.turn.wrapping_add(1);
        if self.turn.is_multiple_of(self.weights.retry_share.max(1)) {
            [Lane::Due, Lane::Express, Lane::Bulk]
        } else if self.turn % self.weights.bulk_share.max(2) == 1 {
            [Lane::Bulk, Lane::Express, Lane::Due]
        } else {
            [Lane::Express, Lane::Due, Lane::Bulk]
        }
    }
}

/// Takes from the first lane in `order` with a message ready; if none has,
/// every lane has registered the waker and the take waits for whichever is
/// first. `poll` answers `None` for a lane the stream does not have. A lane
/// that ended ends the take (`Ready(None)`): the consumer is closed.
pub fn poll_lanes<T>(
    cx: &mut std::task::Context<'_>,
    order: [Lane; 3],
    mut poll: impl FnMut(Lane, &mut std::task::Context<'_>) -> Option<std::task::Poll<Option<T>>>,
) -> std::task::Poll<Option<(Lane, T)>> {
    use std::task::Poll;
    for lane in order {
        match poll(lane, cx) {
            None | Some(Poll::Pending) => continue,
            Some(Poll::Ready(Some(item))) => return Poll::Ready(Some((lane, item))),
            Some(Poll::Ready(None)) => return Poll::Ready(None),
        }
    }
    Poll::Pending
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// Upstream envelopes, consumed by the ingester: the express lane, where
    /// they arrive, and the bulk lane, where the ingester defers those beyond
    /// their tenant's share.
    Events,
    /// Delivery tasks, consumed by workers: first attempts in the express and
    /// bulk lanes, due retries in the due lane, interleaved by [`LanePicker`].
    Tasks,
}

impl Stream {
    /// The stream's name in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::Events => "events",
            Stream::Tasks => "tasks",
        }
    }
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
    /// The lane it was taken from.
    lane: Lane,
    /// When it became due (published, or its delay over), if the publisher
    /// said: how long it waited in its lane is the lane's health.
    due_at: Option<std::time::SystemTime>,
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
            lane: Lane::Express,
            due_at: None,
            trace_headers: TraceHeaders::default(),
            acknowledger,
        }
    }

    /// The message as taken from `lane`.
    pub fn with_lane(mut self, lane: Lane) -> Self {
        self.lane = lane;
        self
    }

    /// The message with the time it became due.
    pub fn with_due_at(mut self, due_at: Option<std::time::SystemTime>) -> Self {
        self.due_at = due_at;
        self
    }

    pub fn lane(&self) -> Lane {
        self.lane
    }

    /// How long it waited in its lane before it was taken, if known.
    pub fn waited(&self) -> Option<Duration> {
        self.due_at
            .map(|due_at| std::time::SystemTime::now().duration_since(due_at).unwrap_or_default())
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
    /// The next message of the express lane, leaving the other lanes'
    /// where they are: what a slot kept for the express lane may take (see
    /// [`consume::consume`]).
    async fn next_express(&mut self) -> Option<Result<QueueMessage, QueueError>>;
    /// Stops taking messages: none comes any more, and those already on
    /// their way to this consumer and never taken go back to the queue, for
    /// other consumers. The messages taken are still settled after it (with
    /// RabbitMQ, on this consumer's channels): drop the consumer only once
    /// they are, since dropping it hands back every one still unsettled.
    async fn stop(&mut self) {}
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

    /// Puts upstream envelopes in the bulk lane of the events stream (their
    /// tenants are beyond their share), as one message, returning once the
    /// broker has it.
    async fn defer_events(&self, deferred: DeferredEvents) -> Result<(), QueueError>;

    /// Publishes one event's first attempts as one message in `lane` (express
    /// or bulk), visible at once.
    async fn publish_first_attempts(&self, first: FirstAttempts, lane: Lane) -> Result<(), QueueError>;

    /// Parks the task of a delivery that failed for good.
    async fn publish_dead_letter(&self, task: DeliveryTask, reason: &str) -> Result<(), QueueError>;

    async fn consume(&self, stream: Stream) -> Result<Box<dyn Consumer>, QueueError>;

    /// Messages waiting in each lane (not yet taken by any consumer), for
    /// the lane metrics.
    async fn lane_depths(&self) -> Result<Vec<(Stream, Lane, u64)>, QueueError>;
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

/// How often [`watch_lane_depths`] reads the lanes' depths.
pub const LANE_DEPTH_INTERVAL: Duration = Duration::from_secs(10);

/// Reads every lane's depth each `interval` into `aegis_lane_depth` until
/// `stop`. A failed read is logged and tried again next time: the gauges are
/// for people, and the broker being away is reported elsewhere.
pub async fn watch_lane_depths(queue: &dyn Queue, interval: Duration, stop: tokio_util::sync::CancellationToken) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match queue.lane_depths().await {
            Ok(depths) => {
                for (stream, lane, depth) in depths {
                    crate::metrics::lane_depth(stream, lane, depth);
                }
            }
            Err(error) => tracing::debug!(error = %error, "failed to read the lanes' depths"),
        }
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    #[test]
    fn a_message_of_the_bulk_lane_is_read_only_up_to_the_most_envelopes_one_carries() {
        let carrying = |count: usize| DeferredEvents::new(vec!["{}".to_owned(); count]).encode();
        let full = DeferredEvents::decode(&carrying(DeferredEvents::MAX_ENVELOPES)).expect("the most one carries");
        assert_eq!(full.envelopes().len(), DeferredEvents::MAX_ENVELOPES);
        let error = DeferredEvents::decode(&carrying(DeferredEvents::MAX_ENVELOPES + 1)).expect_err("one too many");
        assert!(
            matches!(error, NotDeferredEvents::TooManyEnvelopes { envelopes: 257 }),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            "a message of the bulk lane carries at most 256 envelopes; this one carries 257"
        );
        // Past the most one carries, elements are only counted, whatever
        // they are; the members may come in any order.
        let strings = vec![r#""{}""#; DeferredEvents::MAX_ENVELOPES].join(",");
        let beyond = format!(r#"{{"envelopes":[{strings},0,{{}},[]],"type":"events.deferred.v1"}}"#);
        assert!(matches!(
            DeferredEvents::decode(beyond.as_bytes()),
            Err(NotDeferredEvents::TooManyEnvelopes { envelopes: 259 })
        ));
        assert!(DeferredEvents::decode(br#"{"type":"events.deferred.v1","envelopes":[]}"#).is_ok());
        assert!(matches!(
            DeferredEvents::decode(br#"{"type":"events.deferred.v9","envelopes":[]}"#),
            Err(NotDeferredEvents::OtherFormat(_))
        ));
        assert!(matches!(
            DeferredEvents::decode(br#"{"type":"events.deferred.v1","envelopes":[1]}"#),
            Err(NotDeferredEvents::OtherFormat(_))
        ));
    }

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
    fn the_lane_picker_prefers_the_express_lane_but_never_starves_the_others() {
        let mut picker = LanePicker::default();
        let orders: Vec<[Lane; 3]> = (0..64).map(|_| picker.order()).collect();
        let first = |lane| orders.iter().filter(|order| order[0] == lane).count();
        // Of 64 takes: 16 look at due retries first (one in four), 8 at the
        // bulk lane (one in eight), the rest at the express lane.
        assert_eq!((first(Lane::Due), first(Lane::Bulk), first(Lane::Express)), (16, 8, 40));
        assert_eq!(orders[0], [Lane::Bulk, Lane::Express, Lane::Due]);
        assert_eq!(orders[1], [Lane::Express, Lane::Due, Lane::Bulk]);
        // Every order names every lane, so a lane alone is always served.
        for order in &orders {
            let mut lanes = order.to_vec();
            lanes.sort_by_key(|lane| lane.as_str());
            assert_eq!(lanes, [Lane::Bulk, Lane::Due, Lane::Express]);
        }
    }

    #[test]
    fn a_take_goes_to_the_first_ready_lane_in_order_and_skips_absent_ones() {
        use std::task::{Context, Poll};
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        let ready = |lanes: &'static [Lane]| {
            move |lane: Lane, _: &mut Context<'_>| match lane {
                Lane::Due => None,
                lane if lanes.contains(&lane) => Some(Poll::Ready(Some(lane.as_str()))),
                _ => Some(Poll::Pending),
            }
        };
        let order = [Lane::Bulk, Lane::Express, Lane::Due];
        assert_eq!(
            poll_lanes(&mut cx, order, ready(&[Lane::Express, Lane::Bulk])),
            Poll::Ready(Some((Lane::Bulk, "bulk")))
        );
        assert_eq!(
            poll_lanes(&mut cx, order, ready(&[Lane::Express])),
            Poll::Ready(Some((Lane::Express, "express")))
        );
        assert_eq!(poll_lanes(&mut cx, order, ready(&[])), Poll::Pending);
        let ended = |_: Lane, _: &mut Context<'_>| Some(Poll::<Option<()>>::Ready(None));
        assert_eq!(poll_lanes(&mut cx, order, ended), Poll::Ready(None));
    }
}
