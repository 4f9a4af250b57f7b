//! The one consume loop, shared by every role that consumes a stream (the
//! ingester, the worker): wait for a free slot, then for the next message, and
//! hand both to the role's `dispatch`. The loop owns what is the same for
//! every consumer: the slot limit, shutdown, the consumer's failures (logged,
//! shown as `aegis_queue_consumer_up`, retried after a pause) and the drain
//! on shutdown; the role owns what a message means and its acks.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::{Queue, QueueError, QueueMessage, Stream};
use crate::metrics;

/// Pause after the consumer failed before it is asked again (it reconnects
/// meanwhile).
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// What the loop does once shutdown is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Stop taking messages at once; those not taken stay with the broker.
    Immediately,
    /// Keep taking the messages already on their way until none has come for
    /// `idle`, and for `at_most` in all (under steady traffic the stream is
    /// never idle): the ingester fans out an envelope on its way rather than
    /// handing it back.
    UntilIdle { idle: Duration, at_most: Duration },
}

/// Whether the loop goes on after a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// Consumes `stream` until it ends or `shutdown` (then as `drain` says). Each
/// message is taken only while one of `slots` is free, and handed to
/// `dispatch` with that slot's permit, which the role holds for as long as
/// the message's work runs (typically in a task it spawns). `label` names the
/// stream in logs and in `aegis_queue_consumer_up`.
pub async fn consume<F, Fut>(
    queue: &dyn Queue,
    stream: Stream,
    label: &'static str,
    slots: Arc<Semaphore>,
    shutdown: &CancellationToken,
    drain: Drain,
    mut dispatch: F,
) -> Result<(), QueueError>
where
    F: FnMut(QueueMessage, OwnedSemaphorePermit) -> Fut,
    Fut: Future<Output = Flow>,
{
    let mut consumer = queue.consume(stream).await?;
    metrics::consumer_up(label, true);
    // When draining began, once shutdown was seen.
    let mut draining_since: Option<tokio::time::Instant> = None;
    loop {
        if let (Drain::UntilIdle { at_most, .. }, true) = (drain, shutdown.is_cancelled()) {
            let since = *draining_since.get_or_insert_with(tokio::time::Instant::now);
            if since.elapsed() >= at_most {
                break;
            }
        }
        let permit = match drain {
            // Biased: once shutdown is asked for, it wins over a free slot.
            Drain::Immediately => tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                permit = slots.clone().acquire_owned() => permit,
            },
            // Draining goes on after shutdown, so it waits for a slot whatever.
            Drain::UntilIdle { .. } => slots.clone().acquire_owned().await,
        }
        .expect("the slots are never closed");
        let next = match drain {
            Drain::UntilIdle { idle, .. } if shutdown.is_cancelled() => {
                match tokio::time::timeout(idle, consumer.next()).await {
                    Ok(next) => next,
                    Err(_idle) => break,
                }
            }
            _ => tokio::select! {
                biased;
                () = shutdown.cancelled() => match drain {
                    Drain::Immediately => break,
                    // Shutdown began while waiting: go round to drain.
                    Drain::UntilIdle { .. } => continue,
                },
                next = consumer.next() => next,
            },
        };
        match next {
            None => break,
            Some(Err(error)) => {
                tracing::error!(error = %error, stream = label, "consumer failed");
                metrics::consumer_up(label, false);
                tokio::select! {
                    () = tokio::time::sleep(ERROR_PAUSE) => {}
                    () = shutdown.cancelled(), if drain == Drain::Immediately => break,
                }
            }
            Some(Ok(message)) => {
                metrics::consumer_up(label, true);
                metrics::lane_taken(stream, message.lane(), message.waited());
                if dispatch(message, permit).await == Flow::Stop {
                    break;
                }
            }
        }
    }
    metrics::consumer_up(label, false);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use bytes::Bytes;

    use super::*;
    use crate::queue::memory::MemoryQueue;

    async fn publish(queue: &MemoryQueue, count: usize) {
        for index in 0..count {
            queue
                .publish_event("POAM_OVERDUE", Bytes::from(index.to_string()))
                .await
                .expect("publish");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn it_takes_a_message_only_while_a_slot_is_free() {
        let queue = MemoryQueue::new();
        publish(&queue, 3).await;
        let slots = Arc::new(Semaphore::new(2));
        let shutdown = CancellationToken::new();
        let held = Arc::new(Mutex::new(Vec::new()));
        let consuming = {
            let (queue, slots, shutdown, held) = (queue.clone(), slots.clone(), shutdown.clone(), held.clone());
            tokio::spawn(async move {
                consume(
                    &queue,
                    Stream::Events,
                    "events",
                    slots,
                    &shutdown,
                    Drain::Immediately,
                    |message, permit| {
                        held.lock().expect("lock").push((message, permit));
                        async { Flow::Continue }
                    },
                )
                .await
            })
        };
        // Two slots: two messages taken, the third waits for one.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(held.lock().expect("lock").len(), 2);
        let (first, permit) = held.lock().expect("lock").remove(0);
        first.ack().await.expect("ack");
        drop(permit);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(held.lock().expect("lock").len(), 2, "the freed slot took the third");
        shutdown.cancel();
        consuming.await.expect("joins").expect("stops cleanly");
    }

    /// Runs the loop over `queue`'s events with room for many, acking each
    /// message and answering `flow`; returns how many it took.
    async fn taken(queue: &MemoryQueue, shutdown: &CancellationToken, drain: Drain, flow: Flow) -> usize {
        let mut taken = 0;
        let slots = Arc::new(Semaphore::new(8));
        consume(
            queue,
            Stream::Events,
            "events",
            slots,
            shutdown,
            drain,
            |message, _permit| {
                taken += 1;
                async move {
                    message.ack().await.expect("ack");
                    flow
                }
            },
        )
        .await
        .expect("the loop ends cleanly");
        taken
    }

    #[tokio::test(start_paused = true)]
    async fn draining_takes_what_arrives_until_the_stream_is_idle() {
        let queue = MemoryQueue::new();
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        publish(&queue, 2).await;
        let drain = Drain::UntilIdle {
            idle: Duration::from_millis(200),
            at_most: Duration::from_secs(5),
        };
        assert_eq!(
            taken(&queue, &shutdown, drain, Flow::Continue).await,
            2,
            "shutdown before the loop began still drains what is there"
        );
        // Stopping at once takes nothing once shutdown is asked for.
        publish(&queue, 1).await;
        assert_eq!(taken(&queue, &shutdown, Drain::Immediately, Flow::Continue).await, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dispatch_that_says_stop_ends_the_loop() {
        let queue = MemoryQueue::new();
        publish(&queue, 3).await;
        let running = CancellationToken::new();
        assert_eq!(taken(&queue, &running, Drain::Immediately, Flow::Stop).await, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn draining_ends_after_at_most_even_when_the_stream_is_never_idle() {
        let queue = MemoryQueue::new();
        publish(&queue, 1).await;
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let drain = Drain::UntilIdle {
            idle: Duration::from_millis(200),
            at_most: Duration::from_secs(1),
        };
        let started = tokio::time::Instant::now();
        let mut taken = 0;
        consume(
            &queue,
            Stream::Events,
            "events",
            Arc::new(Semaphore::new(8)),
            &shutdown,
            drain,
            |message, _permit| {
                taken += 1;
                let queue = queue.clone();
                async move {
                    message.ack().await.expect("ack");
                    // Every 100 ms another arrives: the stream is never idle for 200 ms.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    publish(&queue, 1).await;
                    Flow::Continue
                }
            },
        )
        .await
        .expect("ends");
        assert!(started.elapsed() >= Duration::from_secs(1), "{:?}", started.elapsed());
        assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
        assert!((9..=12).contains(&taken), "{taken}");
    }
}
