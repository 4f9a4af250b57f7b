//! The in-process queue of the embedded mode: channels inside one process, with
//! delayed publishing. Nothing here survives a restart, which is fine because a
//! delivery's state lives in the database and is re-enqueued at start.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Acknowledger, Consumer, DeliveryTask, LanePicker, Queue, QueueError, QueueMessage, Stream};

/// How many invalid events and dead letters are kept for inspection.
const PARKED_CAPACITY: usize = 1000;

#[derive(Clone)]
struct Channel {
    sender: mpsc::UnboundedSender<Bytes>,
    // Several consumers may share one stream; each message goes to one of them.
    receiver: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Bytes>>>,
}

impl Channel {
    fn new() -> Self {
        let (sender, receiver) = mpsc::unbounded_channel();
        Channel {
            sender,
            receiver: Arc::new(tokio::sync::Mutex::new(receiver)),
        }
    }

    fn send(&self, body: Bytes) -> Result<(), QueueError> {
        self.sender.send(body).map_err(|_| QueueError::Closed)
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
        self.events.send(envelope)
    }

    async fn publish_invalid_event(&self, body: Bytes, reason: &str) -> Result<(), QueueError> {
        tracing::warn!(reason, "invalid event parked");
        park(&self.invalid_events, body, reason);
        Ok(())
    }

    async fn publish_task(&self, task: DeliveryTask, delay: Duration) -> Result<(), QueueError> {
        let channel = self.task_channel(&task).clone();
        if delay.is_zero() {
            return channel.send(task.encode());
        }
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            // A closed channel means the process is stopping; the delivery is
            // still pending in the database and is re-enqueued at the next start.
            let _ = channel.send(task.encode());
        });
        Ok(())
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

fn message_of(channel: &Channel, body: Bytes) -> QueueMessage {
    let acknowledger = MemoryAcknowledger {
        channel: channel.clone(),
        body: body.clone(),
    };
    QueueMessage::new(body, Box::new(acknowledger))
}

struct MemoryConsumer {
    channel: Channel,
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn next(&mut self) -> Option<Result<QueueMessage, QueueError>> {
        let body = self.channel.receiver.lock().await.recv().await?;
        Some(Ok(message_of(&self.channel, body)))
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
        let (channel, body) = if self.picker.prefer_retries() {
            tokio::select! {
                biased;
                body = due.recv() => (&self.due, body?),
                body = first.recv() => (&self.first, body?),
            }
        } else {
            tokio::select! {
                biased;
                body = first.recv() => (&self.first, body?),
                body = due.recv() => (&self.due, body?),
            }
        };
        Some(Ok(message_of(channel, body)))
    }
}

struct MemoryAcknowledger {
    channel: Channel,
    body: Bytes,
}

#[async_trait]
impl Acknowledger for MemoryAcknowledger {
    async fn ack(self: Box<Self>) -> Result<(), QueueError> {
        Ok(())
    }

    async fn requeue(self: Box<Self>) -> Result<(), QueueError> {
        self.channel.send(self.body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[tokio::test(start_paused = true)]
    async fn delayed_tasks_arrive_after_their_delay_and_in_order() {
        let queue = MemoryQueue::new();
        let mut consumer = queue.consume(Stream::Tasks).await.expect("consumer");
        let late = DeliveryTask::new(Uuid::now_v7(), Uuid::now_v7(), 2);
        let now = DeliveryTask::new(Uuid::now_v7(), Uuid::now_v7(), 1);
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
        let webhook = Uuid::now_v7();
        for _ in 0..20 {
            queue
                .publish_task(DeliveryTask::new(Uuid::now_v7(), webhook, 2), Duration::ZERO)
                .await
                .expect("publish");
        }
        for _ in 0..6 {
            queue
                .publish_task(DeliveryTask::new(Uuid::now_v7(), webhook, 1), Duration::ZERO)
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
