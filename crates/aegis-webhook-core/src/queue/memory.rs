//! The in-process queue of the embedded mode: channels inside one process, with
//! delayed publishing. Nothing here survives a restart, which is fine because a
//! delivery's state lives in the database and is re-enqueued at start.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::{
    Acknowledger, Consumer, DeferredEvents, DeliveryTask, FirstAttempts, Lane, LanePicker, LaneWeights, Queue,
    QueueError, QueueMessage, Stream, poll_lanes, publish_span,
};
use crate::telemetry::TraceHeaders;

/// How many invalid events and dead letters are kept for inspection.
const PARKED_CAPACITY: usize = 1000;

/// A message in a channel: the body and the trace context it was published in,
/// as a broker keeps headers beside the body, and when it became due.
#[derive(Clone)]
struct Message {
    body: Bytes,
    trace_headers: TraceHeaders,
    due_at: SystemTime,
}

impl Message {
    /// A body published now, in the current span, due after `delay`.
    fn published(body: Bytes, delay: Duration) -> Self {
        Message {
            body,
            trace_headers: TraceHeaders::current(),
            due_at: SystemTime::now() + delay,
        }
    }
}

#[derive(Clone)]
struct Channel {
    sender: mpsc::UnboundedSender<Message>,
    // Several consumers may share one stream; each message goes to one of them.
    receiver: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Message>>>,
    /// Messages sent and not yet taken.
    depth: Arc<AtomicU64>,
}

impl Channel {
    fn new() -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        Channel {
            sender,
            receiver: Arc::new(tokio::sync::Mutex::new(receiver)),
            depth: Arc::default(),
        }
    }

    fn send(&self, message: Message) -> Result<(), QueueError> {
        self.depth.fetch_add(1, Ordering::Relaxed);
        self.sender.send(message).map_err(|_| {
            self.depth.fetch_sub(1, Ordering::Relaxed);
            QueueError::Closed
        })
    }

    fn depth(&self) -> u64 {
        self.depth.load(Ordering::Relaxed)
    }
}

/// A message parked with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parked {
    pub body: Bytes,
    pub reason: String,
}

/// The lanes of one stream.
#[derive(Clone)]
struct Lanes {
    express: Channel,
    bulk: Channel,
    /// Retries whose delay has passed; the events stream has none.
    due: Option<Channel>,
}

impl Lanes {
    fn new(with_due: bool) -> Self {
        Lanes {
            express: Channel::new(),
            bulk: Channel::new(),
            due: with_due.then(Channel::new),
        }
    }

    fn get(&self, lane: Lane) -> Option<&Channel> {
        match lane {
            Lane::Express => Some(&self.express),
            Lane::Bulk => Some(&self.bulk),
            Lane::Due => self.due.as_ref(),
        }
    }

    /// The lane a message for `lane` goes to: the events stream has no due
    /// lane, so its retries (it has none) would go express.
    fn channel(&self, lane: Lane) -> &Channel {
        self.get(lane).unwrap_or(&self.express)
    }
}

#[derive(Clone)]
pub struct MemoryQueue {
    events: Lanes,
    tasks: Lanes,
    weights: LaneWeights,
    invalid_events: Arc<Mutex<VecDeque<Parked>>>,
    dead_letters: Arc<Mutex<VecDeque<Parked>>>,
}

impl std::fmt::Debug for MemoryQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryQueue").finish_non_exhaustive()
    }
}

impl Default for MemoryQueue {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryQueue {
    pub fn new() -> Self {
        Self::with_weights(LaneWeights::default())
    }

    /// A queue whose consumers share their takes between lanes by `weights`.
    pub fn with_weights(weights: LaneWeights) -> Self {
        MemoryQueue {
            events: Lanes::new(false),
            tasks: Lanes::new(true),
            weights,
            invalid_events: Arc::default(),
            dead_letters: Arc::default(),
        }
    }

    /// The most recent invalid events, oldest first.
    pub fn invalid_events(&self) -> Vec<Parked> {
        self.invalid_events
            .lock()
            .expect("not poisoned")
            .iter()
            .cloned()
            .collect()
    }

    /// The most recent dead letters, oldest first.
    pub fn dead_letters(&self) -> Vec<Parked> {
        self.dead_letters
            .lock()
            .expect("not poisoned")
            .iter()
            .cloned()
            .collect()
    }

    fn task_lane(task: &DeliveryTask) -> Lane {
        if task.is_first_attempt() {
            Lane::Express
        } else {
            Lane::Due
        }
    }
}

fn park(parked: &Mutex<VecDeque<Parked>>, body: Bytes, reason: &str) {
    let mut parked = parked.lock().expect("not poisoned");
    if parked.len() == PARKED_CAPACITY {
        parked.pop_front();
    }
    parked.push_back(Parked {
        body,
        reason: reason.to_owned(),
    });
}

#[async_trait]
impl Queue for MemoryQueue {
    async fn publish_event(&self, _event_name: &str, envelope: Bytes) -> Result<(), QueueError> {
        publish_span("in-process", "events")
            .in_scope(|| self.events.express.send(Message::published(envelope, Duration::ZERO)))
    }

    async fn publish_invalid_event(&self, body: Bytes, reason: &str) -> Result<(), QueueError> {
        tracing::warn!(reason, "invalid event parked");
        park(&self.invalid_events, body, reason);
        Ok(())
    }

    async fn defer_events(&self, deferred: DeferredEvents) -> Result<(), QueueError> {
        publish_span("in-process", "events.bulk").in_scope(|| {
            self.events
                .bulk
                .send(Message::published(deferred.encode(), Duration::ZERO))
        })
    }

    async fn publish_task(&self, task: DeliveryTask, delay: Duration) -> Result<(), QueueError> {
        let lane = Self::task_lane(&task);
        let channel = self.tasks.channel(lane).clone();
        let span = publish_span("in-process", lane.as_str());
        // The context is taken now, in the publishing span: the delay is the
        // queue's, as in a broker's tier queue.
        let message = span.in_scope(|| Message::published(task.encode(), delay));
        if delay.is_zero() {
            return channel.send(message);
        }
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            // A closed channel means the process is stopping; the delivery is
            // still pending in the database and is re-enqueued at the next start.
            let _ = channel.send(message);
        });
        Ok(())
    }

    async fn publish_first_attempts(&self, first: FirstAttempts, lane: Lane) -> Result<(), QueueError> {
        publish_span("in-process", lane.as_str()).in_scope(|| {
            self.tasks
                .channel(lane)
                .send(Message::published(first.encode(), Duration::ZERO))
        })
    }

    async fn publish_dead_letter(&self, task: DeliveryTask, reason: &str) -> Result<(), QueueError> {
        park(&self.dead_letters, task.encode(), reason);
        Ok(())
    }

    async fn consume(&self, stream: Stream) -> Result<Box<dyn Consumer>, QueueError> {
        let lanes = match stream {
            Stream::Events => self.events.clone(),
            Stream::Tasks => self.tasks.clone(),
        };
        Ok(Box::new(LanesConsumer {
            lanes,
            picker: LanePicker::new(self.weights),
        }))
    }

    async fn lane_depths(&self) -> Result<Vec<(Stream, Lane, u64)>, QueueError> {
        let mut depths = Vec::with_capacity(5);
        for (stream, lanes) in [(Stream::Events, &self.events), (Stream::Tasks, &self.tasks)] {
            for lane in [Lane::Express, Lane::Bulk, Lane::Due] {
                if let Some(channel) = lanes.get(lane) {
                    depths.push((stream, lane, channel.depth()));
                }
            }
        }
        Ok(depths)
    }
}

fn message_of(channel: &Channel, lane: Lane, message: Message) -> QueueMessage {
    channel.depth.fetch_sub(1, Ordering::Relaxed);
    let acknowledger = MemoryAcknowledger {
        channel: channel.clone(),
        message: message.clone(),
    };
    QueueMessage::new(message.body, Box::new(acknowledger))
        .with_lane(lane)
        .with_due_at(Some(message.due_at))
        .with_trace_headers(message.trace_headers)
}

/// Takes from the lanes of one stream in the order the [`LanePicker`] says.
struct LanesConsumer {
    lanes: Lanes,
    picker: LanePicker,
}

#[async_trait]
impl Consumer for LanesConsumer {
    async fn next(&mut self) -> Option<Result<QueueMessage, QueueError>> {
        self.take(false).await
    }

    async fn next_express(&mut self) -> Option<Result<QueueMessage, QueueError>> {
        self.take(true).await
    }
}

impl LanesConsumer {
    /// The next message of any lane, or of the express lane alone.
    async fn take(&mut self, express_only: bool) -> Option<Result<QueueMessage, QueueError>> {
        let mut express = self.lanes.express.receiver.lock().await;
        let mut bulk = self.lanes.bulk.receiver.lock().await;
        let mut due = match &self.lanes.due {
            Some(due) => Some(due.receiver.lock().await),
            None => None,
        };
        let order = self.picker.order();
        let (lane, message) = std::future::poll_fn(|cx| {
            poll_lanes(cx, order, |lane, cx| match lane {
                Lane::Express => Some(express.poll_recv(cx)),
                _ if express_only => None,
                Lane::Bulk => Some(bulk.poll_recv(cx)),
                Lane::Due => due.as_mut().map(|due| due.poll_recv(cx)),
            })
        })
        .await?;
        Some(Ok(message_of(self.lanes.channel(lane), lane, message)))
    }
}

struct MemoryAcknowledger {
    channel: Channel,
    message: Message,
}

#[async_trait]
impl Acknowledger for MemoryAcknowledger {
    async fn ack(self: Box<Self>) -> Result<(), QueueError> {
        Ok(())
    }

    async fn requeue(self: Box<Self>) -> Result<(), QueueError> {
        self.channel.send(self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn delayed_tasks_arrive_after_their_delay_and_in_order() {
        let queue = MemoryQueue::new();
        let mut consumer = queue.consume(Stream::Tasks).await.expect("consumer");
        let late = DeliveryTask::new(crate::ids::DeliveryId::generate(), crate::ids::WebhookId::generate(), 2);
        let now = DeliveryTask::new(crate::ids::DeliveryId::generate(), crate::ids::WebhookId::generate(), 1);
        queue.publish_task(late, Duration::from_secs(5)).await.expect("publish");
        queue.publish_task(now, Duration::ZERO).await.expect("publish");

        let started = tokio::time::Instant::now();
        let first = consumer.next().await.expect("open").expect("message");
        assert_eq!(DeliveryTask::decode(&first.body).expect("task"), now);
        first.ack().await.expect("ack");
        let second = consumer.next().await.expect("open").expect("message");
        assert_eq!(DeliveryTask::decode(&second.body).expect("task"), late);
        assert!(started.elapsed() >= Duration::from_secs(5));
    }

    #[tokio::test]
    async fn first_attempts_go_before_a_backlog_of_retries_without_starving_it() {
        let queue = MemoryQueue::new();
        let webhook = crate::ids::WebhookId::generate();
        for _ in 0..20 {
            queue
                .publish_task(
                    DeliveryTask::new(crate::ids::DeliveryId::generate(), webhook, 2),
                    Duration::ZERO,
                )
                .await
                .expect("publish");
        }
        for _ in 0..6 {
            queue
                .publish_task(
                    DeliveryTask::new(crate::ids::DeliveryId::generate(), webhook, 1),
                    Duration::ZERO,
                )
                .await
                .expect("publish");
        }
        let mut consumer = queue.consume(Stream::Tasks).await.expect("consumer");
        let mut taken = Vec::new();
        for _ in 0..8 {
            let message = consumer.next().await.expect("open").expect("message");
            taken.push(DeliveryTask::decode(&message.body).expect("task").attempt());
        }
        // Of the first eight takes, six are the first attempts although they were
        // published after twenty retries; two are retries (one in four).
        assert_eq!(taken, [1, 1, 1, 2, 1, 1, 1, 2]);
    }

    #[tokio::test]
    async fn the_express_lane_overtakes_a_bulk_backlog_which_gets_every_take_left() {
        let queue = MemoryQueue::new();
        let first_attempts = || {
            let task = DeliveryTask::new(crate::ids::DeliveryId::generate(), crate::ids::WebhookId::generate(), 1);
            FirstAttempts::new(&[task])
        };
        for _ in 0..100 {
            queue
                .publish_first_attempts(first_attempts(), Lane::Bulk)
                .await
                .expect("publish");
        }
        for _ in 0..3 {
            queue
                .publish_first_attempts(first_attempts(), Lane::Express)
                .await
                .expect("publish");
        }
        queue
            .defer_events(DeferredEvents::new(vec!["{}".to_owned()]))
            .await
            .expect("defer");
        let depths = queue.lane_depths().await.expect("depths");
        assert!(depths.contains(&(Stream::Tasks, Lane::Bulk, 100)), "{depths:?}");
        assert!(depths.contains(&(Stream::Tasks, Lane::Express, 3)), "{depths:?}");
        assert!(depths.contains(&(Stream::Events, Lane::Bulk, 1)), "{depths:?}");

        let mut consumer = queue.consume(Stream::Tasks).await.expect("consumer");
        let mut lanes = Vec::new();
        for _ in 0..10 {
            let message = consumer.next().await.expect("open").expect("message");
            assert!(
                message.waited().is_some(),
                "the in-process queue knows when a message became due"
            );
            lanes.push(message.lane());
        }
        // One take in eight looks at the bulk lane first (the first take
        // here); the three express tasks go next although published after a
        // hundred bulk ones, and then the bulk lane, alone, gets every take.
        use Lane::{Bulk, Express};
        assert_eq!(
            lanes,
            [Bulk, Express, Express, Express, Bulk, Bulk, Bulk, Bulk, Bulk, Bulk]
        );
        let depths = queue.lane_depths().await.expect("depths");
        assert!(depths.contains(&(Stream::Tasks, Lane::Bulk, 93)), "{depths:?}");

        let mut events = queue.consume(Stream::Events).await.expect("consumer");
        let deferred = events.next().await.expect("open").expect("message");
        assert_eq!(deferred.lane(), Lane::Bulk);
    }

    #[tokio::test]
    async fn a_requeued_message_comes_back() {
        let queue = MemoryQueue::new();
        let mut consumer = queue.consume(Stream::Events).await.expect("consumer");
        queue
            .publish_event("POAM_OVERDUE", Bytes::from_static(b"{}"))
            .await
            .expect("publish");
        let message = consumer.next().await.expect("open").expect("message");
        message.requeue().await.expect("requeue");
        let again = consumer.next().await.expect("open").expect("message");
        assert_eq!(again.body, Bytes::from_static(b"{}"));
    }

    #[tokio::test]
    async fn messages_carry_the_trace_context_they_were_published_in() {
        use opentelemetry::trace::TraceContextExt as _;
        use tracing::Instrument as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;

        // A current-thread test: the thread's subscriber sees every span.
        let _traced = tracing::subscriber::set_default(crate::telemetry::traced());
        let queue = MemoryQueue::new();
        let mut events = queue.consume(Stream::Events).await.expect("consumer");
        let mut tasks = queue.consume(Stream::Tasks).await.expect("consumer");
        let intake = tracing::info_span!("intake");
        let trace_id = intake.context().span().span_context().trace_id().to_string();
        async {
            queue.publish_event("POAM_OVERDUE", Bytes::from_static(b"{}")).await?;
            let retry = DeliveryTask::new(crate::ids::DeliveryId::generate(), crate::ids::WebhookId::generate(), 2);
            queue.publish_task(retry, Duration::from_millis(10)).await
        }
        .instrument(intake)
        .await
        .expect("publish");
        let carries_the_trace = |message: &QueueMessage| {
            message
                .trace_headers()
                .get("traceparent")
                .is_some_and(|traceparent| traceparent.contains(&trace_id))
        };

        let event = events.next().await.expect("open").expect("message");
        assert!(carries_the_trace(&event), "{:?}", event.trace_headers());
        event.requeue().await.expect("requeue");
        let again = events.next().await.expect("open").expect("message");
        assert!(carries_the_trace(&again), "a requeued message keeps its context");
        let delayed = tasks.next().await.expect("open").expect("message");
        assert!(carries_the_trace(&delayed), "a delayed task keeps its context");

        // The `publish` span's callsite is shared with the tests running
        // beside this one without a subscriber: registered by one of them
        // while this thread's subscriber was being set, it can keep the
        // interest "never" (tracing's global cache), and no span is made.
        // Asked again now that it is registered, every subscriber answers.
        tracing::callsite::rebuild_interest_cache();
        queue
            .publish_event("POAM_OVERDUE", Bytes::from_static(b"{}"))
            .await
            .expect("publish");
        let unrelated = events.next().await.expect("open").expect("message");
        assert!(
            unrelated.trace_headers().get("traceparent").is_some() && !carries_the_trace(&unrelated),
            "outside any span, the publish span starts a trace of its own: {:?}",
            unrelated.trace_headers()
        );
    }

    #[tokio::test]
    async fn parked_messages_keep_their_reason() {
        let queue = MemoryQueue::new();
        queue
            .publish_invalid_event(Bytes::from_static(b"garbage"), "malformed JSON")
            .await
            .expect("park");
        assert_eq!(
            queue.invalid_events(),
            vec![Parked {
                body: Bytes::from_static(b"garbage"),
                reason: "malformed JSON".to_owned()
            }]
        );
    }
}
