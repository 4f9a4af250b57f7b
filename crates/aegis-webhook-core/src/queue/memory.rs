//! The in-process queue of the embedded mode: channels inside one process, with
//! delayed publishing. Nothing here survives a restart, which is fine because a
//! delivery's state lives in the database and is re-enqueued at start.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Acknowledger, Consumer, DeliveryTask, Queue, QueueError, QueueMessage, Stream};

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
    tasks: Channel,
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

    fn channel(&self, stream: Stream) -> &Channel {
        match stream {
            Stream::Events => &self.events,
            Stream::Tasks => &self.tasks,
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
        if delay.is_zero() {
            return self.tasks.send(task.encode());
        }
        let channel = self.tasks.clone();
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
        Ok(Box::new(MemoryConsumer {
            channel: self.channel(stream).clone(),
        }))
    }
}

struct MemoryConsumer {
    channel: Channel,
}

#[async_trait]
impl Consumer for MemoryConsumer {
    async fn next(&mut self) -> Option<Result<QueueMessage, QueueError>> {
        let body = self.channel.receiver.lock().await.recv().await?;
        let acknowledger = MemoryAcknowledger {
            channel: self.channel.clone(),
            body: body.clone(),
        };
        Some(Ok(QueueMessage::new(body, Box::new(acknowledger))))
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
        let late = DeliveryTask::new(Uuid::now_v7(), 2);
        let now = DeliveryTask::new(Uuid::now_v7(), 1);
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
