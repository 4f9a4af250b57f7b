//! The one consume loop, shared by every role that consumes a stream (the
//! ingester, the worker): wait for a free slot, then for the next message, and
//! hand both to the role's `dispatch`. The loop owns what is the same for
//! every consumer: the slot limit, shutdown, the consumer's failures (logged,
//! shown as `aegis_queue_consumer_up`, retried after a pause), the drain
//! on shutdown and stopping the consumer; the role owns what a message
//! means and its acks, and keeps the stopped consumer until they are sent.

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
    /// Keep taking the express lane's messages already on their way until
    /// none has come for `idle`, and for `at_most` in all (under steady
    /// traffic the stream is never idle): the ingester fans out an envelope
    /// on its way rather than handing it back. The other lanes' messages
    /// stay with the broker: a bulk message is hundreds of envelopes, too
    /// much to start on the way out.
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
/// stream in logs and in `aegis_queue_consumer_up`. Returns the consumer,
/// stopped (see [`Stopped`]).
///
/// Given [`ExpressFirst`], the other lanes' work (a flood in the bulk lane)
/// never stands in the express lane's way in: see there.
#[allow(clippy::too_many_arguments)]
pub async fn consume<F, Fut>(
    queue: &dyn Queue,
    stream: Stream,
    label: &'static str,
    slots: Arc<Semaphore>,
    express_first: Option<ExpressFirst>,
    shutdown: &CancellationToken,
    drain: Drain,
    mut dispatch: F,
) -> Result<Stopped, QueueError>
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
        let slot = match drain {
            // Biased: once shutdown is asked for, it wins over a free slot.
            Drain::Immediately => tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                slot = Slot::free(&slots, express_first.as_ref()) => slot,
            },
            // Draining goes on after shutdown, so it waits for a slot, but
            // not past `at_most` from shutdown: slots held by work that hangs
            // (a stalled statement) must not keep the consumer from being
            // stopped and its messages handed back.
            Drain::UntilIdle { at_most, .. } => {
                let drain_ends = async {
                    shutdown.cancelled().await;
                    let since = draining_since.unwrap_or_else(tokio::time::Instant::now);
                    tokio::time::sleep_until(since + at_most).await;
                };
                tokio::select! {
                    slot = Slot::free(&slots, express_first.as_ref()) => slot,
                    () = drain_ends => break,
                }
            }
        };
        let (permit, express_until) = match slot {
            Slot::Any(permit) => (permit, None),
            Slot::Express(permit, until) => (permit, Some(until)),
            Slot::Again => continue,
        };
        let next = match drain {
            // Draining: the express lane alone (see [`Drain::UntilIdle`]).
            Drain::UntilIdle { idle, .. } if shutdown.is_cancelled() => {
                match tokio::time::timeout(idle, consumer.next_express()).await {
                    Ok(next) => Some(next),
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
                next = take(consumer.as_mut(), express_until) => next,
            },
        };
        // What a reserved slot waited for, besides an express message, came
        // first: go round and take from every lane if now allowed.
        let Some(next) = next else {
            drop(permit);
            continue;
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
    consumer.stop().await;
    Ok(Stopped { _consumer: consumer })
}

/// The consumer [`consume`] ran, stopped: it takes no more messages, and
/// those it took are settled through it (with RabbitMQ, on its channels).
/// The role keeps it until its work in progress has settled them; with
/// RabbitMQ dropping it closes its channels, which hands back to the queue
/// every message still unsettled, as a crash would.
#[must_use = "dropping it hands back the messages taken and not yet settled"]
pub struct Stopped {
    _consumer: Box<dyn super::Consumer>,
}

/// The tasks a role spawns for the messages it takes, supervised: tracked,
/// so the role waits for them on its way out, and watched, so one that
/// panics (a bug: no input is meant to reach one; a batch's panic is raised
/// again in its callers, see `batch::Batcher::call`) is logged and stops the
/// role, which then fails its process as a panic of the role itself would
/// (see `aegis_webhook::supervise`). Its message is not settled (a worker's
/// message with several tasks is handed back once the others are): RabbitMQ
/// hands it out again once the stopped role's consumer is dropped. In `dev`
/// the in-process queue goes with the process; the start-up recovery
/// publishes again the deliveries the database holds as pending, and an
/// envelope not yet stored is lost with everything else in that queue.
/// Carrying on instead would leave the message held for good, and with it
/// its slot and, for a worker, its webhook's place in line.
#[derive(Clone)]
pub struct MessageTasks {
    tracker: tokio_util::task::TaskTracker,
    /// Cancelled when a task panics: the role's own shutdown.
    stop: CancellationToken,
    panicked: Arc<std::sync::atomic::AtomicBool>,
}

impl MessageTasks {
    /// Tasks whose first panic cancels `stop`.
    pub fn new(stop: CancellationToken) -> Self {
        MessageTasks {
            tracker: tokio_util::task::TaskTracker::new(),
            stop,
            panicked: Arc::default(),
        }
    }

    /// Runs `work` as one of the tasks, on the current runtime.
    pub fn spawn(&self, work: impl Future<Output = ()> + Send + 'static) {
        self.tracker.spawn(self.watched(work));
    }

    /// Runs `work` as one of the tasks, on `runtime`.
    pub fn spawn_on(&self, work: impl Future<Output = ()> + Send + 'static, runtime: &tokio::runtime::Handle) {
        self.tracker.spawn_on(self.watched(work), runtime);
    }

    fn watched(&self, work: impl Future<Output = ()> + Send + 'static) -> impl Future<Output = ()> + Send + 'static {
        use futures::FutureExt as _;
        let (stop, panicked) = (self.stop.clone(), self.panicked.clone());
        async move {
            // Unwind safety: the role stops after a panic, and the tasks
            // that finish meanwhile share state only under short locks, read
            // past poisoning (the worker's lines) or never held across a
            // message's work.
            if let Err(panic) = std::panic::AssertUnwindSafe(work).catch_unwind().await {
                let text = crate::telemetry::panic_text(&*panic);
                tracing::error!(panic = %text, "a message's task panicked; the role stops");
                panicked.store(true, std::sync::atomic::Ordering::Release);
                stop.cancel();
            }
        }
    }

    /// No more tasks will be spawned: [`MessageTasks::wait`] can end.
    pub fn close(&self) {
        self.tracker.close();
    }

    /// Until every task has ended, once closed.
    pub async fn wait(&self) {
        self.tracker.wait().await
    }

    /// How many tasks are running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// Whether no task is running.
    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Whether a task panicked: the role ends with an error then.
    pub fn panicked(&self) -> bool {
        self.panicked.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// How the express lane gets past the other lanes' work in [`consume`]: a
/// message of the express lane is also taken with a slot of `reserve`,
/// while every one of the loop's slots is taken, or while a message of
/// another lane holds `others` (one permit): the role takes it while that
/// message's later work waits for the loop's slots off the loop, and
/// meanwhile the loop takes express messages only, with the reserve, so
/// the waiting work gets every slot that comes free. A flood in the bulk
/// lane can fill the slots, never the express lane's way in, and the loop
/// never holds more than one such message waiting.
#[derive(Debug, Clone)]
pub struct ExpressFirst {
    pub reserve: Arc<Semaphore>,
    pub others: Arc<Semaphore>,
}

impl ExpressFirst {
    /// A reserve of `reserve` slots, and `others` free.
    pub fn new(reserve: usize) -> Self {
        ExpressFirst {
            reserve: Arc::new(Semaphore::new(reserve)),
            others: Arc::new(Semaphore::new(1)),
        }
    }
}

/// A free slot to take the next message with.
enum Slot<'a> {
    /// One of the loop's slots: for a message of any lane.
    Any(OwnedSemaphorePermit),
    /// One of the express lane's reserve: for an express message, unless a
    /// permit of the semaphore given comes free first.
    Express(OwnedSemaphorePermit, &'a Semaphore),
    /// Another lane's message stopped holding `others`: look again.
    Again,
}

impl<'a> Slot<'a> {
    /// The first free slot: one of `slots` before one of the reserve, and
    /// only one of the reserve while another lane's message holds `others`.
    async fn free(slots: &'a Arc<Semaphore>, express_first: Option<&'a ExpressFirst>) -> Slot<'a> {
        let permit = |permit: Result<OwnedSemaphorePermit, _>| permit.expect("the slots are never closed");
        let Some(ExpressFirst { reserve, others }) = express_first else {
            return Slot::Any(permit(slots.clone().acquire_owned().await));
        };
        if others.available_permits() == 0 {
            return tokio::select! {
                express = reserve.clone().acquire_owned() => Slot::Express(permit(express), others),
                _free = others.acquire() => Slot::Again,
            };
        }
        tokio::select! {
            biased;
            any = slots.clone().acquire_owned() => Slot::Any(permit(any)),
            express = reserve.clone().acquire_owned() => Slot::Express(permit(express), slots),
        }
    }
}

/// The consumer's next message: of any lane, or, given `express_until`, of
/// the express lane unless a permit of that semaphore comes free first
/// (`None`: only waited for, not taken; the loop goes round).
async fn take(
    consumer: &mut dyn super::Consumer,
    express_until: Option<&Semaphore>,
) -> Option<Option<Result<QueueMessage, QueueError>>> {
    match express_until {
        None => Some(consumer.next().await),
        Some(until) => tokio::select! {
            biased;
            next = consumer.next_express() => Some(next),
            _free = until.acquire() => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use bytes::Bytes;

    use super::*;
    use crate::ids::{DeliveryId, WebhookId};
    use crate::queue::memory::MemoryQueue;
    use crate::queue::{DeferredEvents, DeliveryTask, FirstAttempts, Lane};

    async fn publish(queue: &MemoryQueue, count: usize) {
        for index in 0..count {
            queue
                .publish_event("POAM_OVERDUE", Bytes::from(index.to_string()))
                .await
                .expect("publish");
        }
    }

    #[tokio::test]
    async fn a_message_task_that_panics_stops_the_role_and_says_so() {
        let ends = |work: fn()| async move {
            let stop = CancellationToken::new();
            let tasks = MessageTasks::new(stop.clone());
            tasks.spawn(async move { work() });
            tasks.close();
            tasks.wait().await;
            (stop.is_cancelled(), tasks.panicked())
        };
        assert_eq!(ends(|| ()).await, (false, false), "a task that ends is no failure");
        assert_eq!(ends(|| panic!("a bug")).await, (true, true));
    }

    /// What a loop [`spawn_holding`] took, each with its slot.
    type Holding = Arc<Mutex<Vec<(QueueMessage, OwnedSemaphorePermit)>>>;

    /// Runs the loop over `stream` of `queue` in a task, holding every
    /// message it takes with its slot, until the token is cancelled.
    fn spawn_holding(
        queue: &MemoryQueue,
        stream: Stream,
        slots: Arc<Semaphore>,
        express_first: Option<ExpressFirst>,
    ) -> (
        CancellationToken,
        Holding,
        tokio::task::JoinHandle<Result<Stopped, QueueError>>,
    ) {
        let shutdown = CancellationToken::new();
        let held: Holding = Arc::default();
        let consuming = {
            let (queue, shutdown, held) = (queue.clone(), shutdown.clone(), held.clone());
            tokio::spawn(async move {
                consume(
                    &queue,
                    stream,
                    "test",
                    slots,
                    express_first,
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
        (shutdown, held, consuming)
    }

    #[tokio::test(start_paused = true)]
    async fn it_takes_a_message_only_while_a_slot_is_free() {
        let queue = MemoryQueue::new();
        publish(&queue, 3).await;
        let (shutdown, held, consuming) = spawn_holding(&queue, Stream::Events, Arc::new(Semaphore::new(2)), None);
        // Two slots: two messages taken, the third waits for one.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(held.lock().expect("lock").len(), 2);
        let (first, permit) = held.lock().expect("lock").remove(0);
        first.ack().await.expect("ack");
        drop(permit);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(held.lock().expect("lock").len(), 2, "the freed slot took the third");
        shutdown.cancel();
        let _stopped = consuming.await.expect("joins").expect("stops cleanly");
    }

    /// What holds the way in while [`lanes_taken_while_held`] looks.
    enum Held {
        /// The loop's one slot.
        EverySlot,
        /// `others` of the loop's [`ExpressFirst`].
        Others,
    }

    /// The lanes of the tasks `consume` takes from `queue` within a second,
    /// with one slot and `express_first`, while `held` is held elsewhere;
    /// then within a second of it coming free.
    async fn lanes_taken_while_held(
        queue: &MemoryQueue,
        express_first: Option<ExpressFirst>,
        held: Held,
    ) -> [Vec<Lane>; 2] {
        let slots = Arc::new(Semaphore::new(1));
        let flood = match (&held, &express_first) {
            (Held::EverySlot, _) => slots.clone().acquire_owned().await,
            (Held::Others, Some(express_first)) => express_first.others.clone().acquire_owned().await,
            (Held::Others, None) => panic!("no others to hold"),
        }
        .expect("a permit");
        let (shutdown, held, consuming) = spawn_holding(queue, Stream::Tasks, slots, express_first);
        let lanes = || -> Vec<Lane> {
            held.lock()
                .expect("lock")
                .iter()
                .map(|(message, _)| message.lane())
                .collect()
        };
        tokio::time::sleep(Duration::from_secs(1)).await;
        let while_full = lanes();
        drop(flood);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = lanes();
        shutdown.cancel();
        let _stopped = consuming.await.expect("joins").expect("stops cleanly");
        [while_full, after]
    }

    #[tokio::test(start_paused = true)]
    async fn with_every_slot_taken_only_an_express_message_is_taken_and_only_with_a_reserve() {
        let task = || DeliveryTask::new(DeliveryId::generate(), WebhookId::generate(), 1);
        let queue_of_both = || async {
            let queue = MemoryQueue::new();
            // The flood's message first: first in, first out would take it first.
            for lane in [Lane::Bulk, Lane::Express] {
                queue
                    .publish_first_attempts(FirstAttempts::new(&[task()]), lane)
                    .await
                    .expect("publish");
            }
            queue
        };
        let both_in_turn = [vec![Lane::Express], vec![Lane::Express, Lane::Bulk]];
        assert_eq!(
            lanes_taken_while_held(&queue_of_both().await, Some(ExpressFirst::new(1)), Held::EverySlot).await,
            both_in_turn,
            "the express message with the reserve at once; the bulk one with the freed slot"
        );
        assert_eq!(
            lanes_taken_while_held(&queue_of_both().await, Some(ExpressFirst::new(1)), Held::Others).await,
            both_in_turn,
            "while another lane's message waits, its slot free: the express message alone, then the bulk one"
        );
        // Without one, nothing until the slot is free; then one message, of
        // the lane the weighted round-robin's turn prefers.
        let [while_full, after] = lanes_taken_while_held(&queue_of_both().await, None, Held::EverySlot).await;
        assert_eq!((while_full, after.len()), (vec![], 1));
    }

    /// Runs the loop over `queue`'s events with room for many, acking each
    /// message and answering `flow`; returns how many it took.
    async fn taken(queue: &MemoryQueue, shutdown: &CancellationToken, drain: Drain, flow: Flow) -> usize {
        let mut taken = 0;
        let slots = Arc::new(Semaphore::new(8));
        let _stopped = consume(
            queue,
            Stream::Events,
            "events",
            slots,
            None,
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
    async fn draining_takes_what_arrives_in_the_express_lane_until_the_stream_is_idle() {
        let queue = MemoryQueue::new();
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        publish(&queue, 2).await;
        queue
            .defer_events(DeferredEvents::new(vec!["{}".to_owned(); 3]))
            .await
            .expect("defer");
        let drain = Drain::UntilIdle {
            idle: Duration::from_millis(200),
            at_most: Duration::from_secs(5),
        };
        assert_eq!(
            taken(&queue, &shutdown, drain, Flow::Continue).await,
            2,
            "shutdown before the loop began still drains what is there, in the express lane"
        );
        let depths = queue.lane_depths().await.expect("depths");
        assert!(
            depths.contains(&(Stream::Events, Lane::Bulk, 1)),
            "the bulk message stays in its lane: {depths:?}"
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

    /// A shutdown already asked for, and a drain of at most a second (idle
    /// after 200 ms).
    fn shut_down_with_a_second_to_drain() -> (CancellationToken, Drain) {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let drain = Drain::UntilIdle {
            idle: Duration::from_millis(200),
            at_most: Duration::from_secs(1),
        };
        (shutdown, drain)
    }

    #[tokio::test(start_paused = true)]
    async fn draining_ends_after_at_most_even_when_every_slot_is_held_by_work_that_hangs() {
        let queue = MemoryQueue::new();
        publish(&queue, 3).await;
        let (shutdown, drain) = shut_down_with_a_second_to_drain();
        let started = tokio::time::Instant::now();
        // The one slot's work never ends (its permit is never given back).
        let mut hanging = Vec::new();
        let consuming = consume(
            &queue,
            Stream::Events,
            "events",
            Arc::new(Semaphore::new(1)),
            None,
            &shutdown,
            drain,
            |_message, permit| {
                hanging.push(permit);
                async { Flow::Continue }
            },
        );
        let _stopped = tokio::time::timeout(Duration::from_secs(60), consuming)
            .await
            .expect("the drain ends although no slot frees")
            .expect("ends cleanly");
        assert!(started.elapsed() <= Duration::from_secs(2), "{:?}", started.elapsed());
        assert_eq!(hanging.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn draining_ends_after_at_most_even_when_the_stream_is_never_idle() {
        let queue = MemoryQueue::new();
        publish(&queue, 1).await;
        let (shutdown, drain) = shut_down_with_a_second_to_drain();
        let started = tokio::time::Instant::now();
        let mut taken = 0;
        let _stopped = consume(
            &queue,
            Stream::Events,
            "events",
            Arc::new(Semaphore::new(8)),
            None,
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
