//! Settling a message that carried several tasks (an event's first attempts,
//! see `FirstAttempts`): each task gets a [`Receipt`], and the message is settled
//! with the broker once every receipt is: acknowledged if every task was
//! handled, handed back if any was not. Handing back redoes the handled tasks
//! too, which costs little: their claims fail (the attempt was made), so
//! nothing is sent twice by this; a task whose attempt another claim still
//! holds goes back once more for the rest of that claim (`Unclaimed`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use aegis_webhook_core::queue::{Lane, QueueError, QueueMessage};
use aegis_webhook_core::telemetry::TraceHeaders;

struct Shared {
    /// Only the last receipt takes it out; the lock makes the share `Sync`.
    message: Mutex<QueueMessage>,
    trace_headers: TraceHeaders,
    /// The lane the message was taken from.
    lane: Lane,
    handed_back: AtomicBool,
}

/// One task's share of the message that carried it. Dropped unsettled (its
/// task panicked, or ended without a word), it counts as handed back: the
/// message goes back once the others are settled, rather than be acked
/// with this task never done.
pub struct Receipt {
    /// Taken out when settled.
    shared: Option<Arc<Shared>>,
}

impl Receipt {
    /// One receipt for each of the `tasks` tasks in `message` (at least one).
    pub fn split(message: QueueMessage, tasks: usize) -> Vec<Receipt> {
        let shared = Arc::new(Shared {
            trace_headers: message.trace_headers().clone(),
            lane: message.lane(),
            message: Mutex::new(message),
            handed_back: AtomicBool::new(false),
        });
        (0..tasks.max(1))
            .map(|_| Receipt {
                shared: Some(shared.clone()),
            })
            .collect()
    }

    fn shared(&self) -> &Shared {
        self.shared
            .as_ref()
            .expect("only settling takes it, and that consumes the receipt")
    }

    /// The trace context the message arrived with.
    pub fn trace_headers(&self) -> &TraceHeaders {
        &self.shared().trace_headers
    }

    /// The lane its message was taken from.
    pub fn lane(&self) -> Lane {
        self.shared().lane
    }

    /// This task was handled.
    pub async fn ack(self) -> Result<(), QueueError> {
        self.settle().await
    }

    /// This task was not handled: the message goes back to the queue once
    /// every other task in it is settled.
    pub async fn requeue(self) -> Result<(), QueueError> {
        self.shared().handed_back.store(true, Ordering::Release);
        self.settle().await
    }

    async fn settle(mut self) -> Result<(), QueueError> {
        let shared = self.shared.take().expect("a receipt is settled once");
        // Exactly one receipt, the last, gets the message.
        let Some(shared) = Arc::into_inner(shared) else {
            return Ok(());
        };
        let message = shared.message.into_inner().unwrap_or_else(PoisonError::into_inner);
        if shared.handed_back.load(Ordering::Acquire) {
            message.requeue().await
        } else {
            message.ack().await
        }
    }
}

impl Drop for Receipt {
    /// Unsettled: the others hand the message back. If this was the last,
    /// the message is dropped with it, unsettled, and goes back to the
    /// broker with the worker's stopped consumer.
    fn drop(&mut self) {
        if let Some(shared) = &self.shared {
            shared.handed_back.store(true, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use aegis_webhook_core::queue::Acknowledger;
    use async_trait::async_trait;

    use super::*;

    struct Recorded(Arc<Mutex<Vec<&'static str>>>);

    #[async_trait]
    impl Acknowledger for Recorded {
        async fn ack(self: Box<Self>) -> Result<(), QueueError> {
            self.0.lock().unwrap().push("ack");
            Ok(())
        }
        async fn requeue(self: Box<Self>) -> Result<(), QueueError> {
            self.0.lock().unwrap().push("requeue");
            Ok(())
        }
    }

    fn message() -> (QueueMessage, Arc<Mutex<Vec<&'static str>>>) {
        let settled = Arc::new(Mutex::new(Vec::new()));
        let message = QueueMessage::new(bytes::Bytes::new(), Box::new(Recorded(settled.clone())));
        (message, settled)
    }

    #[tokio::test]
    async fn the_message_is_acked_once_when_its_last_task_is_handled() {
        let (message, settled) = message();
        let mut receipts = Receipt::split(message, 3);
        receipts.pop().unwrap().ack().await.unwrap();
        receipts.pop().unwrap().ack().await.unwrap();
        assert!(settled.lock().unwrap().is_empty(), "one task is still in flight");
        receipts.pop().unwrap().ack().await.unwrap();
        assert_eq!(*settled.lock().unwrap(), ["ack"]);
    }

    #[tokio::test]
    async fn a_task_dropped_unsettled_counts_as_handed_back() {
        let (message, settled) = message();
        let mut receipts = Receipt::split(message, 3);
        drop(receipts.pop());
        receipts.pop().unwrap().ack().await.unwrap();
        assert!(settled.lock().unwrap().is_empty());
        receipts.pop().unwrap().ack().await.unwrap();
        assert_eq!(*settled.lock().unwrap(), ["requeue"]);
    }

    #[tokio::test]
    async fn one_task_handed_back_hands_back_the_message_once_all_are_settled() {
        let (message, settled) = message();
        let mut receipts = Receipt::split(message, 3);
        receipts.pop().unwrap().requeue().await.unwrap();
        receipts.pop().unwrap().ack().await.unwrap();
        assert!(settled.lock().unwrap().is_empty());
        receipts.pop().unwrap().ack().await.unwrap();
        assert_eq!(*settled.lock().unwrap(), ["requeue"]);
    }

    #[tokio::test]
    async fn concurrent_settling_settles_exactly_once() {
        for _ in 0..50 {
            let (message, settled) = message();
            let receipts = Receipt::split(message, 8);
            let handles: Vec<_> = receipts
                .into_iter()
                .map(|receipt| tokio::spawn(receipt.ack()))
                .collect();
            for handle in handles {
                handle.await.unwrap().unwrap();
            }
            assert_eq!(*settled.lock().unwrap(), ["ack"]);
        }
    }
}
