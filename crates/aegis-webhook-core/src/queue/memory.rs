//! The in-process queue of the embedded mode: channels inside one process, with
//! delayed publishing. Nothing here survives a restart, which is fine because a
//! delivery's state lives in the database and is re-enqueued at start.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::{
    Acknowledger, Consumer, DeliveryTask, FirstAttempts, LanePicker, Queue, QueueError, QueueMessage, Stream,
    publish_span,
};
use crate::telemetry::TraceHeaders;

/// How many invalid events and dead letters are kept for inspection.
const PARKED_CAPACITY: usize = 1000;

/// A message in a channel: the body and the trace context it was published in,
/// as a broker keeps headers beside the body.
#[derive(Clone)]
struct Message {
    body: Bytes,
    trace_headers: TraceHeaders,
}

impl Message {
    /// A body published now, in the current span.
    fn published(body: Bytes) -> Self {
        Message {
            body,
            trace_headers: TraceHeaders::current(),
        }
    }
}

#[derive(Clone)]
struct Channel {
    sender: mpsc::UnboundedSender<Message>,
    // Several consumers may share one stream; each message goes to one of them.
    receiver: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Message>>>,
}

impl Channel {
    fn new() -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        Channel {
            sender,
            receiver: Arc::new(tokio::sync::Mutex::new(receiver)),
        }
    }

    fn send(&self, message: Message) -> Result<(), QueueError> {
        self.sender.send(message).map_err(|_| QueueError::Closed)
    }
}

/// A message parked with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parked {
    pub body: Bytes,
    pub reason: String,
}

#[derive(Clone)]
pub struct MemoryQueue {
    events: Channel,
    /// First attempts.
    tasks: Channel,
    /// Retries whose delay has passed.
    due: Channel,
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
        MemoryQueue {
            events: Channel::new(),
            tasks: Channel::new(),
            due: Channel::new(),
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

    fn task_channel(&self, task: &DeliveryTask) -> &Channel {
        if task.is_first_attempt() {
            &self.tasks
        } else {
            &self.due
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
        publish_span("in-process", "events").in_scope(|| self.events.send(Message::published(envelope)))
    }

    async fn publish_invalid_event(&self, body: Bytes, reason: &str) -> Result<(), QueueError> {
        tracing::warn!(reason, "invalid event parked");
        park(&self.invalid_events, body, reason);
        Ok(())
    }

    async fn publish_task(&self, task: DeliveryTask, delay: Duration) -> Result<(), QueueError> {
        let channel = self.task_channel(&task).clone();
        let span = publish_span("in-process", if task.is_first_attempt() { "tasks" } else { "due" });
        // The context is taken now, in the publishing span: the delay is the
        // queue's, as in a broker's tier queue.
        let message = span.in_scope(|| Message::published(task.encode()));
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

    async fn publish_first_attempts(&self, first: FirstAttempts) -> Result<(), QueueError> {
        publish_span("in-process", "tasks").in_scope(|| self.tasks.send(Message::published(first.encode())))
    }

    async fn publish_dead_letter(&self, task: DeliveryTask, reason: &str) -> Result<(), QueueError> {
        park(&self.dead_letters, task.encode(), reason);
        Ok(())
    }

    async fn consume(&self, stream: Stream) -> Result<Box<dyn Consumer>, QueueError> {
        Ok(match stream {
            Stream::Events => Box::new(MemoryConsumer {
                channel: self.events.clone(),
            }),
            Stream::Tasks => Box::new(TasksConsumer {
                first: self.tasks.clone(),
                due: self.due.clone(),
                picker: LanePicker::default(),
            }),
        })
    }
}

fn message_of(channel: &Channel, message: Message) -> QueueMessage {
    let acknowledger = MemoryAcknowledger {
        channel: channel.clone(),
        message: message.clone(),
    };
    QueueMessage::new(message.body, Box::new(acknowledger)).with_trace_headers(message.trace_headers)
}

struct MemoryConsumer {
    channel: Channel,
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn next(&mut self) -> Option<Result<QueueMessage, QueueError>> {
        let message = self.channel.receiver.lock().await.recv().await?;
        Some(Ok(message_of(&self.channel, message)))
    }
}

/// Takes from both lanes of the tasks stream, first attempts first.
struct TasksConsumer {
    first: Channel,
    due: Channel,
    picker: LanePicker,
}

#[async_trait]
impl Consumer for TasksConsumer {
    async fn next(&mut self) -> Option<Result<QueueMessage, QueueError>> {
        let mut first = self.first.receiver.lock().await;
        let mut due = self.due.receiver.lock().await;
        let (channel, message) = if self.picker.prefer_retries() {
            tokio::select! {
                biased;
                message = due.recv() => (&self.due, message?),
                message = first.recv() => (&self.first, message?),
            }
        } else {
            tokio::select! {
                biased;
                message = first.recv() => (&self.first, message?),
                message = due.recv() => (&self.due, message?),
            }
        };
        Some(Ok(message_of(channel, message)))
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
        // published after twenty retries; two are retries (one in RETRY_SHARE).
        assert_eq!(taken, [1, 1, 1, 2, 1, 1, 1, 2]);
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
