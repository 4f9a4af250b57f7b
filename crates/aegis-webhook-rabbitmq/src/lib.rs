//! The RabbitMQ adapter of the queue port (lapin): durable quorum queues (every
//! queue, the delay tiers included, so a three-node cluster keeps all of them
//! while one node is down), persistent messages, publisher confirms, manual
//! acks, a prefetch limit, delays through TTL tier queues (no broker plugin),
//! and reconnection with backoff to one broker address or, for a cluster,
//! several in turn (`endpoints`).
//!
//! The whole topology is declared here, idempotently, by every process at start:
//!
//! ```text
//! exchange {p}aegis.events (topic) ──"#"──► queue {p}aegis.ingest ──► ingester (express lane)
//! queue {p}aegis.ingest.bulk               ◄── events beyond their tenant's share ──► ingester (bulk lane)
//! queue {p}aegis.events.invalid            ◄── refused events, reason in a header
//! exchange {p}aegis.deliveries (direct) ──"work"──► queue {p}aegis.deliveries.work ──► workers (first attempts, express)
//!                                        ──"bulk"──► queue {p}aegis.deliveries.bulk ──► workers (first attempts, bulk)
//!                                        ──"due"───► queue {p}aegis.deliveries.due  ──► workers (retries)
//! queue {p}aegis.deliveries.delay.<ms>     ── TTL expires ──► {p}aegis.deliveries ("due")
//! queue {p}aegis.deliveries.dead           ◄── deliveries that failed for good
//! ```
//!
//! Each lane is a queue of its own, consumed side by side and taken from in
//! the order [`LanePicker`] gives; the express lanes are consumed, and the
//! express first attempts published, on a connection of their own (see `aegis_webhook_core::fairness`):
//! a fixed handful of queues, whatever the number of tenants.
//!
//! Every message the system publishes says when it became due (header
//! `x-aegis-due-at`, milliseconds since the epoch), so a consumer can tell how
//! long the head of each lane waited; upstream events may say it with the AMQP
//! `timestamp` property instead.
//!
//! Every message carries the trace context of its `publish` span in the headers
//! `traceparent` (and `tracestate`); dead-lettering out of a tier queue keeps
//! them, so a retry continues the trace of the attempt that scheduled it. AMQP
//! publishers upstream may set `traceparent` too: the ingester continues their
//! trace.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable as _};
use bytes::Bytes;
use futures::StreamExt as _;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Mutex;
use tracing::Instrument as _;

use aegis_webhook_core::batch::Batcher;
use aegis_webhook_core::config::AmqpUrls;
use aegis_webhook_core::queue::{
    Acknowledger, Consumer, DeferredEvents, DeliveryTask, FirstAttempts, Lane, LanePicker, LaneWeights, Queue,
    QueueError, QueueMessage, Stream, poll_lanes, publish_span,
};
use aegis_webhook_core::telemetry::TraceHeaders;

mod acks;
mod endpoints;
use acks::SettledTags;
use endpoints::Endpoints;

/// The longest one publish may take, connecting and the broker's confirm
/// included. Past it the publish fails like any other, under the caller's
/// policy (the intake answers 503, the other writers leave it to the
/// reconciler), instead of holding a request or a step until some outer
/// timeout.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest one attempt to connect to one address may take, the
/// topology's declaration included. Past it the next address is tried: a
/// node that is unreachable without refusing (a partition, a machine gone
/// without a reset) must not hold a failover for the minutes a TCP connect
/// can wait.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Routing key of the work queue on the deliveries exchange.
const WORK_ROUTING_KEY: &str = "work";
/// Routing key of the bulk lane of first attempts.
const BULK_ROUTING_KEY: &str = "bulk";
/// How many times `AEGIS_AMQP_PREFETCH` the ingester holds of the express lane
/// of events (see `RabbitConsumer::subscribe`).
const EXPRESS_EVENTS_PREFETCH_FACTOR: u16 = 32;
/// Header saying when a message became due, in milliseconds since the epoch.
const DUE_AT_HEADER: &str = "x-aegis-due-at";
/// Routing key of the due-retries queue, which every tier dead-letters into.
const DUE_ROUTING_KEY: &str = "due";
/// Header carrying why an event was refused or a delivery dead-lettered.
pub const REASON_HEADER: &str = "x-aegis-reason";
/// Delays shorter than this are published straight to the work queue.
const IMMEDIATE: Duration = Duration::from_millis(20);
/// Tiers always present beside the retry schedule's own delays, so that any
/// delay (jitter included) is reached by a short chain of tiers.
const LADDER: [Duration; 7] = [
    Duration::from_millis(250),
    Duration::from_secs(1),
    Duration::from_secs(10),
    Duration::from_secs(60),
    Duration::from_secs(600),
    Duration::from_secs(3600),
    Duration::from_secs(6 * 3600),
];

/// Queue and exchange names, with the optional prefix that lets several systems
/// (or tests) share one broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    prefix: String,
    tiers: Vec<Duration>,
    /// Queues unused this long are deleted by the broker (`x-expires`); for tests.
    expires: Option<Duration>,
}

impl Topology {
    /// Tier queues for every distinct delay of `schedule`, plus [`LADDER`].
    pub fn new(prefix: &str, schedule: &[Duration], expires: Option<Duration>) -> Self {
        let tiers: BTreeSet<Duration> = schedule
            .iter()
            .copied()
            .filter(|delay| *delay >= IMMEDIATE)
            .chain(LADDER)
            .map(|delay| Duration::from_millis(delay.as_millis() as u64))
            .collect();
        Topology {
            prefix: prefix.to_owned(),
            tiers: tiers.into_iter().collect(),
            expires,
        }
    }

    pub fn events_exchange(&self) -> String {
        format!("{}aegis.events", self.prefix)
    }
    pub fn ingest_queue(&self) -> String {
        format!("{}aegis.ingest", self.prefix)
    }
    /// The bulk lane of the events stream: events beyond their tenant's share.
    pub fn ingest_bulk_queue(&self) -> String {
        format!("{}aegis.ingest.bulk", self.prefix)
    }
    pub fn invalid_queue(&self) -> String {
        format!("{}aegis.events.invalid", self.prefix)
    }
    pub fn deliveries_exchange(&self) -> String {
        format!("{}aegis.deliveries", self.prefix)
    }
    pub fn work_queue(&self) -> String {
        format!("{}aegis.deliveries.work", self.prefix)
    }
    /// The bulk lane of first attempts: deliveries beyond their tenant's share.
    pub fn bulk_queue(&self) -> String {
        format!("{}aegis.deliveries.bulk", self.prefix)
    }
    /// Every lane's queue, by stream.
    pub fn lane_queues(&self) -> [(Stream, Lane, String); 5] {
        [
            (Stream::Events, Lane::Express, self.ingest_queue()),
            (Stream::Events, Lane::Bulk, self.ingest_bulk_queue()),
            (Stream::Tasks, Lane::Express, self.work_queue()),
            (Stream::Tasks, Lane::Bulk, self.bulk_queue()),
            (Stream::Tasks, Lane::Due, self.due_queue()),
        ]
    }
    /// Retries whose delay has passed: apart from first attempts, so that a
    /// backlog of retries cannot delay new deliveries.
    pub fn due_queue(&self) -> String {
        format!("{}aegis.deliveries.due", self.prefix)
    }
    pub fn dead_queue(&self) -> String {
        format!("{}aegis.deliveries.dead", self.prefix)
    }
    /// The tier of delay `tier`. Named `delay`, not `retry` as the classic
    /// tiers of earlier versions were: a queue's type cannot change, so the
    /// quorum tiers are new queues, and the old ones drain into the due queue
    /// by themselves.
    pub fn tier_queue(&self, tier: Duration) -> String {
        format!("{}aegis.deliveries.delay.{}", self.prefix, tier.as_millis())
    }
    pub fn tier_queues(&self) -> Vec<String> {
        self.tiers.iter().map(|tier| self.tier_queue(*tier)).collect()
    }

    /// Where a task delayed by `delay` goes: the longest tier not longer than the
    /// delay (the worker re-publishes the rest if it arrives early), or for
    /// (nearly) no delay the work queue (first attempts) or the due queue.
    pub fn route_for(&self, task: &DeliveryTask, delay: Duration) -> Route {
        if delay < IMMEDIATE {
            return if task.is_first_attempt() {
                Route::Work
            } else {
                Route::Due
            };
        }
        let tier = self
            .tiers
            .iter()
            .rev()
            .find(|tier| **tier <= delay)
            .or(self.tiers.first())
            .copied()
            .expect("the ladder is never empty");
        Route::Tier(tier)
    }

    /// The arguments every queue is declared with.
    fn queue_arguments(&self) -> FieldTable {
        let mut arguments = FieldTable::default();
        // Replicated (Raft) and fsynced: what an at-least-once promise needs,
        // and what keeps every queue available while one node of a cluster
        // is down. No `x-quorum-initial-group-size`: the broker's default
        // (`quorum_cluster_size`, 3) already puts a replica on each node of a
        // three-node cluster, an operator can change it for larger ones, and
        // an argument added now would make every existing queue's
        // redeclaration fail as inequivalent.
        arguments.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        if let Some(expires) = self.expires {
            arguments.insert("x-expires".into(), AMQPValue::LongLongInt(expires.as_millis() as i64));
        }
        arguments
    }

    /// Every queue the topology declares.
    pub fn queues(&self) -> Vec<String> {
        self.untiered_queues().into_iter().chain(self.tier_queues()).collect()
    }

    /// The queues declared with the common arguments only: every one but the
    /// retry tiers (which add their TTL and dead-lettering).
    fn untiered_queues(&self) -> Vec<String> {
        self.lane_queues()
            .into_iter()
            .map(|(_, _, queue)| queue)
            .chain([self.invalid_queue(), self.dead_queue()])
            .collect()
    }

    /// Deletes every queue and exchange of the topology, messages and all: for
    /// a deployment's (or a test's, or a benchmark's) teardown, once its
    /// processes have stopped. Each deletion is answered only once the broker
    /// has done it, so a caller deleting topology after topology goes at the
    /// broker's pace instead of leaving it a backlog of expiries.
    pub async fn delete(&self, channel: &Channel) -> lapin::Result<()> {
        for queue in self.queues() {
            channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await?;
        }
        for exchange in [self.events_exchange(), self.deliveries_exchange()] {
            channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await?;
        }
        Ok(())
    }

    /// Declares everything; safe to repeat, and every process does at start.
    async fn declare(&self, channel: &Channel) -> lapin::Result<()> {
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        channel
            .exchange_declare(
                self.events_exchange().into(),
                ExchangeKind::Topic,
                durable,
                FieldTable::default(),
            )
            .await?;
        channel
            .exchange_declare(
                self.deliveries_exchange().into(),
                ExchangeKind::Direct,
                durable,
                FieldTable::default(),
            )
            .await?;
        let durable_queue = QueueDeclareOptions::durable();
        for queue in self.untiered_queues() {
            channel
                .queue_declare(queue.as_str().into(), durable_queue, self.queue_arguments())
                .await?;
        }
        // Every routing key, not only today's event names: an unknown name must
        // reach the ingester and be refused with a reason, not vanish unrouted.
        channel
            .queue_bind(
                self.ingest_queue().into(),
                self.events_exchange().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                self.work_queue().into(),
                self.deliveries_exchange().into(),
                WORK_ROUTING_KEY.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                self.bulk_queue().into(),
                self.deliveries_exchange().into(),
                BULK_ROUTING_KEY.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                self.due_queue().into(),
                self.deliveries_exchange().into(),
                DUE_ROUTING_KEY.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        for tier in &self.tiers {
            // Quorum queues too (message TTL needs RabbitMQ 3.10), so a retry
            // waiting in a tier survives the loss of a node like every other
            // task, and a process that fails over can redeclare its topology
            // (a classic queue whose node is down cannot be declared). Every
            // message in a tier has the same TTL, so they expire in order
            // from the head, then move to the due queue.
            let mut arguments = self.queue_arguments();
            arguments.insert("x-message-ttl".into(), AMQPValue::LongLongInt(tier.as_millis() as i64));
            // At-least-once dead-lettering: an expired task stays in its tier
            // until the due queue has confirmed it (the default, at-most-once,
            // drops it when the due queue cannot take it at that moment, as
            // while its leader is being re-elected). RabbitMQ requires
            // `reject-publish` for it; with no length limit set, nothing is
            // ever rejected.
            arguments.insert(
                "x-dead-letter-strategy".into(),
                AMQPValue::LongString("at-least-once".into()),
            );
            arguments.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
            arguments.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(self.deliveries_exchange().into()),
            );
            arguments.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(DUE_ROUTING_KEY.into()),
            );
            channel
                .queue_declare(self.tier_queue(*tier).into(), durable_queue, arguments)
                .await?;
        }
        Ok(())
    }
}

/// Prefetch limits of the two streams: what one process holds unacknowledged,
/// the rest staying on the broker for other replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prefetch {
    pub events: u16,
    pub tasks: u16,
}

/// Where a delivery task is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Work,
    Due,
    Tier(Duration),
}

/// The connections and the publishing channels (publisher confirms on).
struct Live {
    connection: Connection,
    /// The express lanes' own connection, for their publishes and their
    /// consumers: on a shared connection an express message waits behind
    /// the bulk lanes' frames in the one socket, in the client's one I/O
    /// thread and in the broker's connection processes, and is held back
    /// with them when the broker's flow control throttles the connection.
    express_connection: Connection,
    /// The consumers' own connections (the express lanes', and the
    /// others'), which never publish: under a memory or disk alarm the
    /// broker stops reading every connection that publishes, acks and all,
    /// and consumers that cannot ack cannot drain what would end the alarm.
    express_consumer_connection: Connection,
    consumer_connection: Connection,
    publisher: Channel,
    /// The express lane's confirmed publishing channel: a confirm comes back
    /// in order, after every publish before it on its channel, so on one
    /// channel an express task would wait for the bulk lane's hundreds.
    express: Channel,
    /// Which connection this is (counted from 1), so that a publish that
    /// failed on it drops this one and not a fresh one opened meanwhile.
    generation: u64,
    /// The address it is connected to (an index into `Inner::endpoints`).
    endpoint: usize,
}

struct Inner {
    /// The broker's addresses and which one the next connect tries first.
    endpoints: std::sync::Mutex<Endpoints>,
    topology: Topology,
    /// Unacknowledged messages one consumer may hold, per stream.
    prefetch: Prefetch,
    /// How consumers share their takes between lanes.
    weights: LaneWeights,
    live: Mutex<Option<Live>>,
    /// The runtime the queue was made on, where every connection is opened
    /// (see [`RabbitQueue::open_at_home`]).
    home: tokio::runtime::Handle,
    /// Connections opened so far.
    opened: std::sync::atomic::AtomicU64,
    /// Connects that failed in a row, and when the next may be tried.
    reconnect: std::sync::Mutex<Reconnect>,
}

/// The publishers' reconnect pace while the broker is away: without it every
/// publish (every intake request, every retry) tried a full connect in turn,
/// under the lock the others wait on.
#[derive(Debug, Default)]
struct Reconnect {
    failures: u32,
    not_before: Option<tokio::time::Instant>,
}

/// How long publishers wait before the next connect after `failures`
/// failed in a row: 100 ms doubling to 2 s, shorter than the consumers'
/// and the start-up's own backoff ([`backoff`]) at every step, so their
/// tries are never spent on the wait.
fn reconnect_wait(failures: u32) -> Duration {
    let doubled = Duration::from_millis(100).saturating_mul(1u32 << failures.saturating_sub(1).min(8));
    doubled.min(Duration::from_secs(2))
}

#[derive(Clone)]
pub struct RabbitQueue {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RabbitQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitQueue")
            .field("topology", &self.inner.topology)
            .finish_non_exhaustive()
    }
}

/// The `x-aegis-due-at` value of a message due after `delay`.
fn due_at(delay: Duration) -> AMQPValue {
    let due = std::time::SystemTime::now() + delay;
    let millis = due
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    AMQPValue::LongLongInt(i64::try_from(millis).unwrap_or(i64::MAX))
}

/// When a taken message became due: our header, or else the AMQP timestamp
/// (seconds) an upstream publisher may have set.
fn due_at_of(properties: &BasicProperties) -> Option<std::time::SystemTime> {
    let header = properties
        .headers()
        .as_ref()
        .and_then(|headers| headers.inner().get(DUE_AT_HEADER).cloned());
    let millis = match header {
        Some(AMQPValue::LongLongInt(millis)) => u64::try_from(millis).ok()?,
        Some(AMQPValue::LongUInt(millis)) => u64::from(millis),
        _ => properties.timestamp().map(|seconds| seconds.saturating_mul(1000))?,
    };
    Some(std::time::UNIX_EPOCH + Duration::from_millis(millis))
}

fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
}

fn unexpected(error: impl Into<anyhow::Error>, what: &str) -> QueueError {
    QueueError::Unexpected(error.into().context(what.to_owned()))
}

/// A new channel on `connection` with publisher confirms on.
async fn confirmed_channel(connection: &Connection) -> Result<Channel, QueueError> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|error| unexpected(error, "failed to open a RabbitMQ channel"))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|error| unexpected(error, "failed to enable publisher confirms"))?;
    Ok(channel)
}

impl RabbitQueue {
    /// Connects (retrying for a while, so a process may start before the broker)
    /// and declares the topology. Given several URLs (a cluster's nodes), every
    /// connect and reconnect tries them in turn (see [`Endpoints`]).
    pub async fn connect(
        urls: &AmqpUrls,
        topology: Topology,
        prefetch: Prefetch,
        weights: LaneWeights,
    ) -> Result<Self, QueueError> {
        let queue = RabbitQueue {
            inner: Arc::new(Inner {
                endpoints: std::sync::Mutex::new(Endpoints::new(urls)),
                topology,
                prefetch: Prefetch {
                    events: prefetch.events.max(1),
                    tasks: prefetch.tasks.max(1),
                },
                weights,
                live: Mutex::new(None),
                home: tokio::runtime::Handle::current(),
                opened: std::sync::atomic::AtomicU64::new(0),
                reconnect: std::sync::Mutex::default(),
            }),
        };
        (|| queue.publisher())
            .retry(backoff().with_max_times(10))
            .notify(|error, delay| tracing::warn!(error = %error, ?delay, "RabbitMQ not reachable yet; retrying"))
            .await?;
        Ok(queue)
    }

    pub fn topology(&self) -> &Topology {
        &self.inner.topology
    }

    fn endpoints(&self) -> std::sync::MutexGuard<'_, Endpoints> {
        // Held only for a few assignments, never across an await.
        self.inner
            .endpoints
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A fresh connection: each address in turn (see [`Endpoints`]) until one
    /// connects and takes the topology; the last error when none does.
    async fn open(&self) -> Result<Live, QueueError> {
        let order = self.endpoints().attempt_order();
        let mut last_error = None;
        for index in order {
            let url = self.endpoints().url(index).clone();
            let attempt = tokio::time::timeout(CONNECT_TIMEOUT, self.open_at(&url, index)).await;
            let error = match attempt {
                Ok(Ok(live)) => return Ok(live),
                Ok(Err(error)) => error,
                Err(_) => QueueError::Unexpected(anyhow::anyhow!(
                    "no connection to RabbitMQ at {} within {CONNECT_TIMEOUT:?}",
                    url.address()
                )),
            };
            tracing::warn!(address = url.address(), error = %error, "RabbitMQ address failed; trying the next");
            self.endpoints().failed(index);
            last_error = Some(error);
        }
        Err(last_error.expect("there is always at least one address"))
    }

    /// [`RabbitQueue::open`] on the runtime the queue was made on. lapin
    /// drives a connection from the runtime current when it connects, and
    /// its I/O thread starts with the connecting thread's priority: a
    /// reconnect first needed by the bulk lanes' work (on the bulk runtime,
    /// see `aegis_webhook_core::bulk_runtime`) must not leave every
    /// connection, the express one included, on low-priority threads.
    async fn open_at_home(&self) -> Result<Live, QueueError> {
        let queue = self.clone();
        self.inner
            .home
            .spawn(async move { queue.open().await })
            .await
            .map_err(|error| unexpected(error, "the task opening a RabbitMQ connection failed"))?
    }

    /// Connects to address `index` (`url`) and declares the topology there.
    async fn open_at(&self, url: &aegis_webhook_core::config::AmqpUrl, index: usize) -> Result<Live, QueueError> {
        // The error never carries the URL, which holds the password.
        let connect = |name: &'static str| async move {
            // Without lapin's auto-recovery (off by default), on purpose: a
            // reconnect here makes new channels and new consumers, and with
            // them new settled-tag state (`acks`). A channel recovered under
            // the same consumer would number its deliveries from 1 again
            // while the old state let a multiple ack cover them.
            let properties = ConnectionProperties::default().with_connection_name(name.into());
            Connection::connect(url.expose(), properties)
                .await
                .map_err(|error| unexpected(error, &format!("failed to connect to RabbitMQ at {}", url.address())))
        };
        let connection = connect("aegis-webhook").await?;
        let declaring = connection
            .create_channel()
            .await
            .map_err(|error| unexpected(error, "failed to open a RabbitMQ channel"))?;
        self.inner
            .topology
            .declare(&declaring)
            .await
            .map_err(|error| unexpected(error, "failed to declare the RabbitMQ topology"))?;
        let _ = declaring.close(200, "topology declared".into()).await;
        let express_connection = connect("aegis-webhook-express").await?;
        let express_consumer_connection = connect("aegis-webhook-express-consumer").await?;
        let consumer_connection = connect("aegis-webhook-consumer").await?;
        let publisher = confirmed_channel(&connection).await?;
        let express = confirmed_channel(&express_connection).await?;
        tracing::info!(address = url.address(), "connected to RabbitMQ");
        let generation = self.inner.opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        Ok(Live {
            connection,
            express_connection,
            express_consumer_connection,
            consumer_connection,
            publisher,
            express,
            generation,
            endpoint: index,
        })
    }

    /// Replaces the publishing channel `nacked` (of `lane`) with a fresh one on
    /// the same connection, unless that happened already. A nack can mean the
    /// channel holds a stale view of a queue: on RabbitMQ 3.10 a channel whose
    /// first publish to a quorum queue finds the queue's recorded leader on a
    /// node that is down refuses every later publish to that queue, for as
    /// long as the channel lives (it keeps asking that node); that is the
    /// window right after a leader's node is lost, which is when a client
    /// that failed over publishes. A fresh channel reads the current leader.
    async fn renew_channel(&self, lane: Lane, nacked: &Channel) {
        let mut live = self.inner.live.lock().await;
        let Some(current) = live.as_mut() else {
            return;
        };
        let (slot, connection) = match lane {
            Lane::Express => (&mut current.express, &current.express_connection),
            Lane::Bulk | Lane::Due => (&mut current.publisher, &current.connection),
        };
        if slot.id() != nacked.id() || !connection.status().connected() {
            return;
        }
        match confirmed_channel(connection).await {
            Ok(fresh) => {
                let stale = std::mem::replace(slot, fresh);
                drop(live);
                tracing::warn!("RabbitMQ refused a publish; publishing on a fresh channel");
                let _ = stale.close(200, "renewed after a nack".into()).await;
            }
            Err(error) => {
                // The connection is what failed: the next publish reconnects.
                tracing::warn!(error = %error, "RabbitMQ refused a publish and a fresh channel failed");
                if let Some(broken) = live.take() {
                    self.endpoints().failed(broken.endpoint);
                }
            }
        }
    }

    /// Drops connection `generation` if it is still the live one, so the next
    /// publish opens a fresh one; `wait` says whether to wait for the lock
    /// (false when whoever holds it may be what hangs).
    async fn forget(&self, generation: u64, wait: bool) {
        let live = if wait {
            Some(self.inner.live.lock().await)
        } else {
            self.inner.live.try_lock().ok()
        };
        if let Some(mut live) = live
            && live.as_ref().is_some_and(|current| current.generation == generation)
            && let Some(broken) = live.take()
        {
            self.endpoints().failed(broken.endpoint);
        }
    }

    /// The live publishing channel, reconnecting when the old one is gone.
    async fn publisher(&self) -> Result<Channel, QueueError> {
        Ok(self.publisher_and_generation(Lane::Bulk).await?.0)
    }

    /// The publishing channel for `lane` (the express lane's own, or the one
    /// every other publish shares), with the generation of its connection.
    async fn publisher_and_generation(&self, lane: Lane) -> Result<(Channel, u64), QueueError> {
        let chosen = |live: &Live| match lane {
            Lane::Express => live.express.clone(),
            Lane::Bulk | Lane::Due => live.publisher.clone(),
        };
        let mut live = self.inner.live.lock().await;
        if let Some(current) = live.as_ref() {
            if current.connection.status().connected()
                && current.express_connection.status().connected()
                && current.express_consumer_connection.status().connected()
                && current.consumer_connection.status().connected()
                && current.publisher.status().connected()
                && current.express.status().connected()
            {
                return Ok((chosen(current), current.generation));
            }
            // Lost: the next connect begins with the next address.
            self.endpoints().failed(current.endpoint);
            live.take();
        }
        let not_before = self
            .inner
            .reconnect
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .not_before;
        if let Some(not_before) = not_before.filter(|at| *at > tokio::time::Instant::now()) {
            return Err(QueueError::Unexpected(anyhow::anyhow!(
                "RabbitMQ is not reachable; the next connect is in {:?}",
                not_before - tokio::time::Instant::now()
            )));
        }
        let opening = self.open_at_home().await;
        {
            let mut reconnect = self
                .inner
                .reconnect
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            *reconnect = match &opening {
                Ok(_) => Reconnect::default(),
                Err(_) => {
                    let failures = reconnect.failures.saturating_add(1);
                    Reconnect {
                        failures,
                        not_before: Some(tokio::time::Instant::now() + reconnect_wait(failures)),
                    }
                }
            };
        }
        let fresh = opening?;
        let opened = (chosen(&fresh), fresh.generation);
        *live = Some(fresh);
        Ok(opened)
    }

    /// A new channel for a consumer of `lane`, on the live consumers'
    /// connection of its lane.
    async fn consumer_channel(&self, lane: Lane) -> Result<Channel, QueueError> {
        self.publisher().await?;
        let live = self.inner.live.lock().await;
        // A publish between the two locks may have dropped the connection
        // (a failed confirm, a renewal that failed): an error to retry,
        // not a panic of the consume loop.
        let Some(live) = live.as_ref() else {
            return Err(QueueError::Unexpected(anyhow::anyhow!(
                "the RabbitMQ connection was lost while opening a consumer's channel"
            )));
        };
        let connection = match lane {
            Lane::Express => &live.express_consumer_connection,
            Lane::Bulk | Lane::Due => &live.consumer_connection,
        };
        connection
            .create_channel()
            .await
            .map_err(|error| unexpected(error, "failed to open a RabbitMQ channel"))
    }

    /// Publishes persistently, in a `publish` span whose trace context the
    /// message carries, and waits for the broker's confirm.
    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        headers: Option<FieldTable>,
    ) -> Result<(), QueueError> {
        self.publish_in(Lane::Bulk, exchange, routing_key, body, headers).await
    }

    /// [`RabbitQueue::publish`] on the channel of `lane`.
    async fn publish_in(
        &self,
        lane: Lane,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        headers: Option<FieldTable>,
    ) -> Result<(), QueueError> {
        let destination = if exchange.is_empty() { routing_key } else { exchange };
        // The connection the publish went out on, once it has one.
        let used = std::sync::atomic::AtomicU64::new(0);
        let confirmed = self
            .publish_confirmed(lane, exchange, routing_key, body, headers.unwrap_or_default(), &used)
            .instrument(publish_span("rabbitmq", destination));
        match tokio::time::timeout(PUBLISH_TIMEOUT, confirmed).await {
            Ok(result) => result,
            Err(_) => {
                // A connection that takes this long is broken (a broker
                // restarting mid-handshake, a confirm that never comes): the
                // next publish opens a fresh one. Without waiting for the
                // lock, since whoever holds it may be what hangs.
                let generation = used.load(std::sync::atomic::Ordering::Relaxed);
                if generation != 0 {
                    self.forget(generation, false).await;
                }
                Err(QueueError::Unexpected(anyhow::anyhow!(
                    "no confirm from RabbitMQ within {PUBLISH_TIMEOUT:?} for a publish to `{destination}`"
                )))
            }
        }
    }

    async fn publish_confirmed(
        &self,
        lane: Lane,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        mut headers: FieldTable,
        used: &std::sync::atomic::AtomicU64,
    ) -> Result<(), QueueError> {
        for (name, value) in TraceHeaders::current().iter() {
            headers.insert(name.into(), AMQPValue::LongString(LongString::from(value)));
        }
        if !headers.contains_key(DUE_AT_HEADER) {
            headers.insert(DUE_AT_HEADER.into(), due_at(Duration::ZERO));
        }
        let (channel, generation) = self.publisher_and_generation(lane).await?;
        used.store(generation, std::sync::atomic::Ordering::Relaxed);
        let mut properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        if !headers.inner().is_empty() {
            properties = properties.with_headers(headers);
        }
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let result = async {
            let confirm = channel
                .basic_publish(exchange.into(), routing_key.into(), options, body, properties)
                .await?;
            confirm.await
        }
        .await;
        match result {
            Ok(Confirmation::Ack(None)) => Ok(()),
            Ok(Confirmation::Ack(Some(_returned))) => Err(QueueError::Unexpected(anyhow::anyhow!(
                "RabbitMQ could not route a message to `{exchange}` with key `{routing_key}`"
            ))),
            Ok(Confirmation::Nack(_)) => {
                self.renew_channel(lane, &channel).await;
                Err(QueueError::Unexpected(anyhow::anyhow!(
                    "RabbitMQ refused a message for `{exchange}` (nack)"
                )))
            }
            Ok(Confirmation::NotRequested) => Err(QueueError::Unexpected(anyhow::anyhow!(
                "publisher confirms are off on the publishing channel"
            ))),
            Err(error) => {
                // A fresh connection next time (unless one was opened meanwhile).
                self.forget(generation, true).await;
                Err(unexpected(error, "failed to publish to RabbitMQ"))
            }
        }
    }

    /// The headers of a message due after `delay`.
    fn due_headers(delay: Duration) -> FieldTable {
        let mut headers = FieldTable::default();
        headers.insert(DUE_AT_HEADER.into(), due_at(delay));
        headers
    }

    fn reason_headers(reason: &str) -> FieldTable {
        let mut headers = FieldTable::default();
        headers.insert(REASON_HEADER.into(), AMQPValue::LongString(LongString::from(reason)));
        headers
    }
}

#[async_trait]
impl Queue for RabbitQueue {
    async fn is_ready(&self) -> bool {
        self.publisher().await.is_ok()
    }

    async fn publish_event(&self, event_name: &str, envelope: Bytes) -> Result<(), QueueError> {
        let exchange = self.inner.topology.events_exchange();
        self.publish(&exchange, event_name, &envelope, None).await
    }

    async fn publish_invalid_event(&self, body: Bytes, reason: &str) -> Result<(), QueueError> {
        let queue = self.inner.topology.invalid_queue();
        self.publish("", &queue, &body, Some(Self::reason_headers(reason)))
            .await
    }

    async fn defer_events(&self, deferred: DeferredEvents) -> Result<(), QueueError> {
        let queue = self.inner.topology.ingest_bulk_queue();
        self.publish("", &queue, &deferred.encode(), None).await
    }

    async fn publish_task(&self, task: DeliveryTask, delay: Duration) -> Result<(), QueueError> {
        let topology = &self.inner.topology;
        let (exchange, routing_key) = match topology.route_for(&task, delay) {
            Route::Work => (topology.deliveries_exchange(), WORK_ROUTING_KEY.to_owned()),
            Route::Due => (topology.deliveries_exchange(), DUE_ROUTING_KEY.to_owned()),
            Route::Tier(tier) => (String::new(), topology.tier_queue(tier)),
        };
        let headers = Self::due_headers(delay);
        self.publish(&exchange, &routing_key, &task.encode(), Some(headers))
            .await
    }

    async fn publish_first_attempts(&self, first: FirstAttempts, lane: Lane) -> Result<(), QueueError> {
        let exchange = self.inner.topology.deliveries_exchange();
        let routing_key = match lane {
            Lane::Express => WORK_ROUTING_KEY,
            Lane::Bulk => BULK_ROUTING_KEY,
            Lane::Due => DUE_ROUTING_KEY,
        };
        self.publish_in(lane, &exchange, routing_key, &first.encode(), None)
            .await
    }

    async fn publish_dead_letter(&self, task: DeliveryTask, reason: &str) -> Result<(), QueueError> {
        let queue = self.inner.topology.dead_queue();
        self.publish("", &queue, &task.encode(), Some(Self::reason_headers(reason)))
            .await
    }

    async fn consume(&self, stream: Stream) -> Result<Box<dyn Consumer>, QueueError> {
        let mut consumer = RabbitConsumer {
            queue: self.clone(),
            stream,
            inner: None,
            picker: LanePicker::new(self.inner.weights),
        };
        consumer.subscribe().await?;
        Ok(Box::new(consumer))
    }

    async fn lane_depths(&self) -> Result<Vec<(Stream, Lane, u64)>, QueueError> {
        // A channel of its own: a passive declare of a missing queue closes
        // the channel it is made on.
        let channel = self.consumer_channel(Lane::Bulk).await?;
        let mut depths = Vec::with_capacity(5);
        for (stream, lane, queue) in self.inner.topology.lane_queues() {
            let declared = channel
                .queue_declare(
                    queue.into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|error| unexpected(error, "failed to read a lane's depth"))?;
            depths.push((stream, lane, u64::from(declared.message_count())));
        }
        let _ = channel.close(200, "depths read".into()).await;
        Ok(depths)
    }
}

struct RabbitConsumer {
    queue: RabbitQueue,
    stream: Stream,
    inner: Option<Subscription>,
    picker: LanePicker,
}

/// The broker consumers behind one [`Consumer`]: one per lane of its stream,
/// the express lane's on the express connection; and the settling of each
/// channel's messages.
struct Subscription {
    express: lapin::Consumer,
    bulk: lapin::Consumer,
    due: Option<lapin::Consumer>,
    express_settles: Settles,
    settles: Settles,
    /// The express consumer's channel, and the other consumers': each is
    /// closed when the last of its consumers and handles is dropped, which
    /// hands back every message of it not yet acknowledged.
    express_channel: Channel,
    channel: Channel,
}

/// Settling one message: its tag on its channel, and whether it is requeued.
struct Settle {
    tag: u64,
    requeue: bool,
    acker: lapin::Acker,
}

/// Settles the messages of one channel a batch at a time, one batch after
/// another (so each batch's frames reach the broker after the last's), with
/// as few acks as is safe (see [`acks`]).
type Settles = Batcher<Settle, ()>;

/// The most settles one batch sends.
const MAX_SETTLE_BATCH: usize = 4_096;

fn settles_of_a_channel() -> Settles {
    let settled = Arc::new(std::sync::Mutex::new(SettledTags::default()));
    Batcher::spawn("settle", MAX_SETTLE_BATCH, 1, move |batch: Vec<Settle>| {
        let settled = settled.clone();
        async move {
            let (requeues, acks): (Vec<&Settle>, Vec<&Settle>) = batch.iter().partition(|settle| settle.requeue);
            let tags = |settles: &[&Settle]| settles.iter().map(|settle| settle.tag).collect::<Vec<u64>>();
            let frames = settled
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .settle(&tags(&acks), &tags(&requeues));
            let ackers: std::collections::HashMap<u64, &lapin::Acker> =
                batch.iter().map(|settle| (settle.tag, &settle.acker)).collect();
            let acker = |tag: u64| *ackers.get(&tag).expect("every frame is for a message of the batch");
            let sent = send(frames, acker).await;
            if sent.is_err() {
                // Recorded as settled, but perhaps not said: no later ack
                // may cover these tags. (After a reconnect the old channel is
                // gone and the broker redelivers its messages, which is the
                // at-least-once side of the contract.)
                settled
                    .lock()
                    .unwrap_or_else(|poisoned| poisoned.into_inner())
                    .give_up();
            }
            sent.map(|()| vec![(); batch.len()])
        }
    })
}

/// Sends a batch's frames: the requeues, then the multiple ack, then the
/// single acks, each group sent once the one before it is. Within a group
/// the order does not matter, so its frames go out together rather than
/// each waiting for the last.
async fn send<'a>(frames: acks::Frames, acker: impl Fn(u64) -> &'a lapin::Acker) -> anyhow::Result<()> {
    let requeue = BasicNackOptions {
        requeue: true,
        ..BasicNackOptions::default()
    };
    let requeues = futures::future::try_join_all(frames.requeues.into_iter().map(|tag| acker(tag).nack(requeue)))
        .await
        .map_err(|error| anyhow::Error::new(error).context("failed to requeue"))?;
    said(requeues, "requeue")?;
    if let Some(tag) = frames.ack_through {
        let sent = acker(tag)
            .ack(BasicAckOptions { multiple: true })
            .await
            .map_err(|error| anyhow::Error::new(error).context("failed to ack"))?;
        said([sent], "ack")?;
    }
    let acks = futures::future::try_join_all(
        frames
            .acks
            .into_iter()
            .map(|tag| acker(tag).ack(BasicAckOptions::default())),
    )
    .await
    .map_err(|error| anyhow::Error::new(error).context("failed to ack"))?;
    said(acks, "ack")
}

/// lapin answers `false` for a frame it did not send: the acker's channel
/// had closed (and with it the broker hands the message out again), or the
/// acker was used already. Either way the message is not settled as asked.
fn said(sent: impl IntoIterator<Item = bool>, what: &str) -> anyhow::Result<()> {
    match sent.into_iter().all(|sent| sent) {
        true => Ok(()),
        false => anyhow::bail!("failed to {what}: the channel is closed, so the broker hands the message out again"),
    }
}

impl RabbitConsumer {
    async fn subscribe(&mut self) -> Result<(), QueueError> {
        let topology = &self.queue.inner.topology;
        let prefetch = match self.stream {
            Stream::Events => self.queue.inner.prefetch.events,
            Stream::Tasks => self.queue.inner.prefetch.tasks,
        };
        // The express lane on a channel of the express connection, the
        // others on one of the shared connection.
        let (express_channel, channel) = (
            self.queue.consumer_channel(Lane::Express).await?,
            self.queue.consumer_channel(Lane::Bulk).await?,
        );
        // Per consumer (not per channel, so set before each consumer
        // starts): each lane may hold its own prefetch, so a full bulk lane
        // (or a full lane of retries) never keeps the express lane's next
        // message at the broker.
        let start = |channel: &Channel, queue_name: String, prefetch: u16| {
            let channel = channel.clone();
            async move {
                channel
                    .basic_qos(prefetch, BasicQosOptions::default())
                    .await
                    .map_err(|error| unexpected(error, "failed to set the prefetch"))?;
                channel
                    .basic_consume(
                        ShortString::from(queue_name),
                        ShortString::from(""),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                    .map_err(|error| unexpected(error, "failed to start consuming"))
            }
        };
        // The ingester moves a flooding tenant's events out of the express
        // lane of events, up to 256 to a publish, without a fan-out slot: the
        // more it holds, the more of those publishes are in flight at once,
        // and the faster a flood is moved out of everyone else's way.
        // Measured (5,000 events flooding, 2 cores): holding 256, one publish
        // was in flight at a time and the move took about 1.1 s; holding
        // 1,024 (the default), about 0.7 s. The cost is memory: as many
        // envelopes held, about 1 MiB at 1 KiB each.
        let express_prefetch = match self.stream {
            Stream::Events => prefetch.saturating_mul(EXPRESS_EVENTS_PREFETCH_FACTOR),
            Stream::Tasks => prefetch,
        };
        let lane_queue = |wanted: Lane| {
            topology
                .lane_queues()
                .into_iter()
                .find(|(stream, lane, _)| *stream == self.stream && *lane == wanted)
                .map(|(_, _, queue)| queue)
        };
        let express = start(
            &express_channel,
            lane_queue(Lane::Express).expect("every stream has an express lane"),
            express_prefetch,
        )
        .await?;
        let bulk = start(
            &channel,
            lane_queue(Lane::Bulk).expect("every stream has a bulk lane"),
            prefetch,
        )
        .await?;
        let due = match lane_queue(Lane::Due) {
            Some(queue) => Some(start(&channel, queue, prefetch).await?),
            None => None,
        };
        self.inner = Some(Subscription {
            express,
            bulk,
            due,
            express_settles: settles_of_a_channel(),
            settles: settles_of_a_channel(),
            express_channel,
            channel,
        });
        Ok(())
    }
}

/// The longest [`Consumer::stop`] takes for a consumer (its lanes' in
/// parallel): the cancel, the broker's reply and the hand-back. What it has
/// not handed back by then goes back with the channel when the consumer is
/// dropped. Short, since a worker's `AEGIS_SHUTDOWN_GRACE` starts after it:
/// with the defaults, 2 + 25 s stay within the pod's 30.
const STOP_AT_MOST: Duration = Duration::from_secs(2);

impl Subscription {
    /// Each consumer with its channel and the settling of its messages.
    fn consumers(&mut self) -> Vec<(&mut lapin::Consumer, &Channel, &Settles)> {
        let mut consumers = vec![
            (&mut self.express, &self.express_channel, &self.express_settles),
            (&mut self.bulk, &self.channel, &self.settles),
        ];
        if let Some(due) = self.due.as_mut() {
            consumers.push((due, &self.channel, &self.settles));
        }
        consumers
    }
}

#[async_trait]
impl Consumer for RabbitConsumer {
    async fn next(&mut self) -> Option<Result<QueueMessage, QueueError>> {
        self.take(false).await
    }

    async fn next_express(&mut self) -> Option<Result<QueueMessage, QueueError>> {
        self.take(true).await
    }

    /// Cancels each consumer, then hands back the messages the broker sent
    /// before its cancel took effect that were never taken (a prefetch's
    /// worth), through the settling of their channel, so the tags it
    /// tracks stay whole. The channels stay open: the messages taken are
    /// still acknowledged on them.
    async fn stop(&mut self) {
        let Some(subscription) = self.inner.as_mut() else {
            return;
        };
        let stopping = subscription.consumers().into_iter().map(|(consumer, channel, settles)| async move {
            let queue = consumer.queue();
            let stopped = tokio::time::timeout(STOP_AT_MOST, async move {
                channel
                    .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                    .await
                    .map_err(|error| anyhow::Error::new(error).context("failed to cancel the consumer"))?;
                // The consumer's stream ends after the deliveries sent
                // before the cancel's reply: no more come after it.
                let mut handing_back = Vec::new();
                while let Some(Ok(delivery)) = consumer.next().await {
                    let message = RabbitAcknowledger {
                        tag: delivery.delivery_tag,
                        acker: delivery.acker,
                        settles: settles.clone(),
                    };
                    handing_back.push(message.settle(true));
                }
                let count = handing_back.len();
                futures::future::try_join_all(handing_back).await?;
                Ok::<_, anyhow::Error>(count)
            })
            .await;
            match stopped {
                Ok(Ok(count)) => tracing::debug!(count, %queue, "consumer stopped; handed back the messages not taken"),
                Ok(Err(error)) => tracing::warn!(
                    error = format!("{error:#}"),
                    %queue,
                    "failed to stop a consumer; what it was sent goes back when its channel closes"
                ),
                Err(_) => tracing::warn!(
                    %queue,
                    "a consumer took over {STOP_AT_MOST:?} to stop; what it was sent goes back when its channel closes"
                ),
            }
        });
        futures::future::join_all(stopping).await;
    }
}

impl RabbitConsumer {
    /// The next message of any lane, or of the express lane alone.
    async fn take(&mut self, express_only: bool) -> Option<Result<QueueMessage, QueueError>> {
        loop {
            if self.inner.is_none() {
                let resubscribed = (|| async { self.queue.publisher().await.map(|_| ()) })
                    .retry(backoff())
                    .notify(|error, delay| tracing::warn!(error = %error, ?delay, "reconnecting to RabbitMQ"))
                    .await;
                if let Err(error) = resubscribed {
                    return Some(Err(error));
                }
                if let Err(error) = self.subscribe().await {
                    tracing::warn!(error = %error, "failed to resubscribe; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
            let Subscription {
                express,
                bulk,
                due,
                express_settles,
                settles,
                ..
            } = self.inner.as_mut().expect("subscribed above");
            let order = self.picker.order();
            let next = std::future::poll_fn(|cx| {
                poll_lanes(cx, order, |lane, cx| match lane {
                    Lane::Express => Some(express.poll_next_unpin(cx)),
                    _ if express_only => None,
                    Lane::Bulk => Some(bulk.poll_next_unpin(cx)),
                    Lane::Due => due.as_mut().map(|due| due.poll_next_unpin(cx)),
                })
            })
            .await;
            match next {
                Some((lane, Ok(delivery))) => {
                    let trace_headers = trace_headers_of(&delivery.properties);
                    let due_at = due_at_of(&delivery.properties);
                    let acknowledger = RabbitAcknowledger {
                        tag: delivery.delivery_tag,
                        acker: delivery.acker,
                        settles: match lane {
                            Lane::Express => express_settles.clone(),
                            Lane::Bulk | Lane::Due => settles.clone(),
                        },
                    };
                    return Some(Ok(QueueMessage::new(
                        Bytes::from(delivery.data),
                        Box::new(acknowledger),
                    )
                    .with_lane(lane)
                    .with_due_at(due_at)
                    .with_trace_headers(trace_headers)));
                }
                Some((_, Err(error))) => {
                    tracing::warn!(error = %error, "RabbitMQ consumer failed; reconnecting");
                    self.inner = None;
                }
                None => {
                    tracing::warn!("RabbitMQ consumer was cancelled; resubscribing");
                    self.inner = None;
                }
            }
        }
    }
}

/// The trace context among a message's headers, whichever AMQP string type the
/// publisher used for it.
fn trace_headers_of(properties: &BasicProperties) -> TraceHeaders {
    let Some(headers) = properties.headers() else {
        return TraceHeaders::default();
    };
    TraceHeaders::from_pairs(headers.inner().iter().filter_map(|(name, value)| {
        let text = match value {
            AMQPValue::LongString(text) => std::str::from_utf8(text.as_bytes()).ok()?,
            AMQPValue::ShortString(text) => text.as_str(),
            AMQPValue::ByteArray(bytes) => std::str::from_utf8(bytes.as_slice()).ok()?,
            _ => return None,
        };
        Some((name.as_str(), text))
    }))
}

struct RabbitAcknowledger {
    tag: u64,
    acker: lapin::Acker,
    /// The settling of its channel's messages.
    settles: Settles,
}

impl RabbitAcknowledger {
    async fn settle(self, requeue: bool) -> Result<(), QueueError> {
        self.settles
            .call(Settle {
                tag: self.tag,
                requeue,
                acker: self.acker,
            })
            .await
            .map_err(QueueError::Unexpected)
    }
}

#[async_trait]
impl Acknowledger for RabbitAcknowledger {
    async fn ack(self: Box<Self>) -> Result<(), QueueError> {
        self.settle(false).await
    }

    async fn requeue(self: Box<Self>) -> Result<(), QueueError> {
        self.settle(true).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publishers_wait_longer_after_each_failed_connect_up_to_two_seconds() {
        let waits: Vec<u128> = (1..=7).map(|failures| reconnect_wait(failures).as_millis()).collect();
        assert_eq!(waits, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(reconnect_wait(u32::MAX), Duration::from_secs(2));
        // Within the consumers' and the start-up's backoff at every step.
        assert!(
            (1..=20).all(|failures| reconnect_wait(failures) <= Duration::from_millis(200) * 2u32.pow(failures.min(5)))
        );
    }

    #[test]
    fn the_trace_context_is_read_from_any_string_header() {
        let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut headers = FieldTable::default();
        headers.insert("traceparent".into(), AMQPValue::LongString(traceparent.into()));
        headers.insert("tracestate".into(), AMQPValue::ShortString("vendor=1".into()));
        headers.insert(REASON_HEADER.into(), AMQPValue::LongString("not trace context".into()));
        let carried = trace_headers_of(&BasicProperties::default().with_headers(headers));
        assert_eq!(
            carried.iter().collect::<Vec<_>>(),
            [("traceparent", traceparent), ("tracestate", "vendor=1")]
        );
        assert!(trace_headers_of(&BasicProperties::default()).is_empty());
    }

    #[test]
    fn delays_route_to_the_longest_tier_that_fits() {
        let schedule = [Duration::ZERO, Duration::from_secs(5), Duration::from_secs(300)];
        let topology = Topology::new("t.", &schedule, None);
        let first = DeliveryTask::new(
            aegis_webhook_core::ids::DeliveryId::generate(),
            aegis_webhook_core::ids::WebhookId::generate(),
            1,
        );
        let retry = DeliveryTask::new(
            aegis_webhook_core::ids::DeliveryId::generate(),
            aegis_webhook_core::ids::WebhookId::generate(),
            2,
        );
        assert_eq!(topology.route_for(&first, Duration::ZERO), Route::Work);
        assert_eq!(topology.route_for(&first, Duration::from_millis(5)), Route::Work);
        assert_eq!(topology.route_for(&retry, Duration::ZERO), Route::Due);
        assert_eq!(
            topology.route_for(&first, Duration::from_secs(5)),
            Route::Tier(Duration::from_secs(5))
        );
        let route_for_delay = |delay| topology.route_for(&retry, delay);
        assert_eq!(
            route_for_delay(Duration::from_millis(500)),
            Route::Tier(Duration::from_millis(250))
        );
        assert_eq!(
            route_for_delay(Duration::from_millis(100)),
            Route::Tier(Duration::from_millis(250))
        );
        assert_eq!(
            route_for_delay(Duration::from_millis(1500)),
            Route::Tier(Duration::from_secs(1))
        );
        assert_eq!(
            route_for_delay(Duration::from_secs(5)),
            Route::Tier(Duration::from_secs(5))
        );
        assert_eq!(
            route_for_delay(Duration::from_millis(5400)),
            Route::Tier(Duration::from_secs(5))
        );
        assert_eq!(
            route_for_delay(Duration::from_secs(330)),
            Route::Tier(Duration::from_secs(300))
        );
        assert_eq!(
            route_for_delay(Duration::from_secs(24 * 3600)),
            Route::Tier(Duration::from_secs(6 * 3600))
        );
        assert_eq!(
            topology.tier_queue(Duration::from_secs(5)),
            "t.aegis.deliveries.delay.5000"
        );
        assert_eq!(topology.work_queue(), "t.aegis.deliveries.work");
        assert_eq!(topology.due_queue(), "t.aegis.deliveries.due");
        let lanes: Vec<(Stream, Lane, String)> = topology.lane_queues().into_iter().collect();
        assert_eq!(
            lanes,
            [
                (Stream::Events, Lane::Express, "t.aegis.ingest".to_owned()),
                (Stream::Events, Lane::Bulk, "t.aegis.ingest.bulk".to_owned()),
                (Stream::Tasks, Lane::Express, "t.aegis.deliveries.work".to_owned()),
                (Stream::Tasks, Lane::Bulk, "t.aegis.deliveries.bulk".to_owned()),
                (Stream::Tasks, Lane::Due, "t.aegis.deliveries.due".to_owned()),
            ]
        );
    }

    #[test]
    fn a_message_says_when_it_became_due_in_a_header_or_the_amqp_timestamp() {
        let mut headers = FieldTable::default();
        headers.insert(DUE_AT_HEADER.into(), AMQPValue::LongLongInt(1_700_000_000_123));
        let ours = BasicProperties::default().with_headers(headers);
        assert_eq!(
            due_at_of(&ours),
            Some(std::time::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123))
        );
        let upstream = BasicProperties::default().with_timestamp(1_700_000_000);
        assert_eq!(
            due_at_of(&upstream),
            Some(std::time::UNIX_EPOCH + Duration::from_secs(1_700_000_000))
        );
        assert_eq!(due_at_of(&BasicProperties::default()), None);
        let AMQPValue::LongLongInt(later) = due_at(Duration::from_secs(60)) else {
            panic!("milliseconds as a long long");
        };
        let AMQPValue::LongLongInt(now) = due_at(Duration::ZERO) else {
            panic!("milliseconds as a long long");
        };
        assert!((59_900..=60_100).contains(&(later - now)), "{later} - {now}");
    }
}
