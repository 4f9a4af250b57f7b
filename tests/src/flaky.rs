//! A real queue whose task publishes can be made to fail on demand: what a
//! broker that refuses or drops a publish right after a writer's commit looks
//! like to that writer.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use aegis_webhook_core::queue::{
    Consumer, DeferredEvents, DeliveryTask, FirstAttempts, Lane, Queue, QueueError, Stream,
};
use async_trait::async_trait;
use bytes::Bytes;

/// Which publishes [`FlakyQueue::fail_next`] makes fail. Events are never
/// failed: their publish precedes every commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Publishes {
    /// Single tasks (retries, re-publishes, redeliveries, test deliveries).
    Tasks,
    /// Single tasks of a second or later attempt: a worker's retry, never a
    /// first attempt re-published by the reconciler.
    Retries,
    /// An event's first attempts (the ingester's).
    FirstAttempts,
    /// Any task publish: single tasks, first attempts, dead letters.
    Any,
}

/// Wraps a queue; [`FlakyQueue::fail_next`] makes the next publishes of a kind fail.
pub struct FlakyQueue {
    inner: Arc<dyn Queue>,
    kind: std::sync::Mutex<Publishes>,
    failures_left: AtomicUsize,
    failed: AtomicUsize,
}

impl FlakyQueue {
    pub fn new(inner: Arc<dyn Queue>) -> Arc<FlakyQueue> {
        Arc::new(FlakyQueue {
            inner,
            kind: std::sync::Mutex::new(Publishes::Any),
            failures_left: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
        })
    }

    /// The next `count` publishes of `kind` fail.
    pub fn fail_next(&self, count: usize, kind: Publishes) {
        *self.kind.lock().expect("not poisoned") = kind;
        self.failures_left.store(count, Ordering::SeqCst);
    }

    /// How many publishes have failed so far.
    pub fn failed(&self) -> usize {
        self.failed.load(Ordering::SeqCst)
    }

    fn refuse(&self, this: Publishes) -> Result<(), QueueError> {
        let kind = *self.kind.lock().expect("not poisoned");
        if kind != Publishes::Any && kind != this {
            return Ok(());
        }
        self.take_failure()
    }

    fn take_failure(&self) -> Result<(), QueueError> {
        let take = self
            .failures_left
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |left| left.checked_sub(1));
        match take {
            Ok(_) => {
                self.failed.fetch_add(1, Ordering::SeqCst);
                Err(QueueError::Unexpected(anyhow::anyhow!(
                    "injected: the broker refused the publish"
                )))
            }
            Err(_) => Ok(()),
        }
    }
}

#[async_trait]
impl Queue for FlakyQueue {
    async fn is_ready(&self) -> bool {
        self.inner.is_ready().await
    }

    async fn publish_event(&self, event_name: &str, envelope: Bytes) -> Result<(), QueueError> {
        self.inner.publish_event(event_name, envelope).await
    }

    async fn publish_invalid_event(&self, body: Bytes, reason: &str) -> Result<(), QueueError> {
        self.inner.publish_invalid_event(body, reason).await
    }

    async fn publish_task(&self, task: DeliveryTask, delay: Duration) -> Result<(), QueueError> {
        let retry_refused = *self.kind.lock().expect("not poisoned") == Publishes::Retries;
        if retry_refused && !task.is_first_attempt() {
            self.take_failure()?;
        } else {
            self.refuse(Publishes::Tasks)?;
        }
        self.inner.publish_task(task, delay).await
    }

    async fn defer_events(&self, deferred: DeferredEvents) -> Result<(), QueueError> {
        self.inner.defer_events(deferred).await
    }

    async fn publish_first_attempts(&self, first: FirstAttempts, lane: Lane) -> Result<(), QueueError> {
        self.refuse(Publishes::FirstAttempts)?;
        self.inner.publish_first_attempts(first, lane).await
    }

    async fn publish_dead_letter(&self, task: DeliveryTask, reason: &str) -> Result<(), QueueError> {
        self.refuse(Publishes::Any)?;
        self.inner.publish_dead_letter(task, reason).await
    }

    async fn consume(&self, stream: Stream) -> Result<Box<dyn Consumer>, QueueError> {
        self.inner.consume(stream).await
    }

    async fn lane_depths(&self) -> Result<Vec<(Stream, Lane, u64)>, QueueError> {
        self.inner.lane_depths().await
    }
}
