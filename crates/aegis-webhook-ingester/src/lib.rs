//! The ingester: takes upstream envelopes off the events stream, validates them,
//! fans each out to the subscribed webhooks in one atomic write (shared by
//! the envelopes ingested at the same moment), then publishes the delivery tasks
//! and only then acknowledges the envelope.
//!
//! Fair sharing (see `aegis_webhook_core::fairness`): an event taken from the
//! express lane whose tenant is beyond its share of ingestion is not fanned
//! out there but deferred to the bulk lane, a cheap move that keeps the
//! express lane flowing for everyone else; events taken from the bulk lane
//! are fanned out with their deliveries in the bulk lane of the tasks. An
//! event ingested in the express lane puts its deliveries in the express
//! lane of the tasks if its tenant's delivery share has room for them.
//! While a flood is being moved and the move has fallen behind, messages of
//! the bulk lane wait before they start, for the first seconds of the flood
//! at most (`BulkPause`). Given a [`BulkStage`], the bulk lane's messages
//! are ingested on the bulk runtime, whose threads have a lower priority
//! (see `aegis_webhook_core::bulk_runtime`).
//!
//! An envelope that fails validation is parked on the invalid-events queue with
//! its reason and acknowledged; the consumer carries on.
//!
//! Each envelope is an `ingest` span, the child of the publisher's span when the
//! message carries a trace context; the tasks published in it carry the trace
//! on to the workers. Its steps on the event's path are child spans: `fan_out`
//! (the wait for the shared write, and its reads, run and commit),
//! `publish_tasks` (the tasks' publish with its confirm) and `ack`.

mod fanout;

use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use aegis_webhook_core::batch::Batcher;
use aegis_webhook_core::event::{EnvelopeError, EnvelopeHead, ValidatedEvent, too_large_reason};
use aegis_webhook_core::fairness::{BulkPause, Deferrals, FairShare};
use aegis_webhook_core::ids::TenantId;
use aegis_webhook_core::metrics;
use aegis_webhook_core::queue::consume::{Drain, Flow, MessageTasks, consume};
use aegis_webhook_core::queue::{
    self, DeferredEvents, DeliveryTask, FirstAttempts, Lane, NotDeferredEvents, Queue, QueueMessage, Stream, Writer,
};
use aegis_webhook_core::telemetry;
use aegis_webhook_storage::events::{self, EventWithDeliveries};
use aegis_webhook_storage::write_gate::{Precedence, WriteTurns};
use aegis_webhook_storage::{BulkStage, tenants, webhooks};
use anyhow::Context as _;
use chrono::Utc;
use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing::field::{Empty, display};
use uuid::Uuid;

pub use fanout::plan_deliveries;

/// How long the loop keeps draining after shutdown is requested, waiting for
/// messages that are already on their way.
const DRAIN_IDLE: Duration = Duration::from_millis(200);
/// The longest the drain lasts: under steady traffic the stream is never idle,
/// and what is not taken by then stays with the broker.
const DRAIN_AT_MOST: Duration = Duration::from_secs(5);
/// Pause after an infrastructure error before the message is handed back,
/// or after a bulk message sent back some of its envelopes.
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Set (to anything) to make the ingester abort right after a fan-out commits
/// and before its tasks are published: the window the reconciler covers, which
/// the fault tests force open with it.
pub const CRASH_AFTER_COMMIT_ENV: &str = "AEGIS_TEST_CRASH_AFTER_FANOUT_COMMIT";

/// The most envelopes one fan-out write stores.
const MAX_FAN_OUT_BATCH: usize = 64;
/// Fan-out writes in flight at once: one commits while the next fills.
const PARALLEL_FAN_OUTS: usize = 2;
/// The most envelopes one message of the bulk lane carries.
const MAX_DEFERRAL_BATCH: usize = DeferredEvents::MAX_ENVELOPES;
/// The most envelope bytes one message of the bulk lane carries (an
/// envelope larger than this goes alone; see [`deferral_messages`]). As a
/// JSON string an envelope kept as it came at most doubles (a quote becomes
/// `\"`; its head was read by a parse that refuses raw control characters
/// but whitespace), so a message stays well under 16 MiB, RabbitMQ 4's
/// default `max_message_size`, with envelopes up to the default
/// `AEGIS_MAX_EVENT_BYTES`; a flood of ordinary events (about 1 KiB each)
/// still moves 256 to a message.
const MAX_DEFERRAL_MESSAGE_BYTES: usize = 2 * 1024 * 1024;
/// Deferral publishes in flight at once: with the express lane's prefetch
/// (1,024 at the default `AEGIS_AMQP_PREFETCH`), enough that moving a flood
/// never waits for one confirm at a time.
const PARALLEL_DEFERRALS: usize = 4;
/// Messages of the bulk lane ingested at once by one ingester (each up to
/// [`MAX_DEFERRAL_BATCH`] envelopes: enough to fill the bulk fan-out batches).
/// They hold none of the consume loop's slots: measured, 32 bulk messages
/// holding every slot for the seconds their 8,000 fan-outs and publishes took
/// left an express event waiting up to 7 s for a slot. One, not four: the
/// workers, not the fan-out, set how fast a flood drains, and four at once
/// fanned a 200,000-delivery flood out in its first 11 s of 28, the seconds
/// in which another tenant's express events waited most for the database
/// and the broker. Measured (noisy benchmark, tenant B, alternating): in
/// `dev` p99/max 47/54 and 46/53 ms with one, 62/78 and 68/118 with four;
/// in production the seconds after the first with an event over 50 ms went
/// from 6–10 of a run's ~28 to 3–6, while the first second (the move) sets
/// B's p99 either way (56–132 ms with one, 67–83 with four; four runs
/// each). A lone flood's cost: none in production, 10–14 % on SQLite (two
/// alternations), where the fan-outs are the slower stage.
const BULK_MESSAGES_AT_ONCE: usize = 1;

#[derive(Clone)]
pub struct Ingester {
    queue: Arc<dyn Queue>,
    /// Fan-outs of the express lane's events, and of the bulk lane's: apart,
    /// so an express event never waits behind a bulk message's hundreds.
    fan_outs: Batcher<ValidatedEvent, FanOut>,
    bulk_fan_outs: Batcher<ValidatedEvent, FanOut>,
    /// Where messages of the bulk lane are ingested: the bulk runtime, or
    /// the current one.
    bulk_runtime: Option<tokio::runtime::Handle>,
    /// Envelopes moved to the bulk lane, many to a message.
    deferrals: Batcher<String, ()>,
    /// Turns of the bulk lane's messages (see [`BULK_MESSAGES_AT_ONCE`]).
    bulk_turns: Arc<tokio::sync::Semaphore>,
    /// The deferrals of the flood being moved, if any, and how bulk
    /// messages wait for the move (see [`BulkPause`]).
    deferrals_seen: Arc<std::sync::Mutex<Deferrals>>,
    bulk_pause: BulkPause,
    /// Messages of the express lane taken and not yet settled: how far
    /// behind the ingester is (see [`BulkPause::backlog`]).
    express_held: Arc<AtomicUsize>,
    fair: Arc<FairShare>,
    /// The largest envelope ingested (`AEGIS_MAX_EVENT_BYTES`): the limit of
    /// the HTTP intake, so AMQP publishers meet the same one.
    max_event_bytes: usize,
    crash_after_commit: bool,
}

impl std::fmt::Debug for Ingester {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ingester").finish_non_exhaustive()
    }
}

/// What became of one envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IngestOutcome {
    /// Stored with this many deliveries, their first attempts published (or,
    /// if the broker refused, left to the reconciler and counted).
    FannedOut { event_id: Uuid, deliveries: usize },
    /// The tenant already had an event with this id: nothing new to do.
    Duplicate { event_id: Uuid },
    /// A message of the bulk lane: each of its `events` was ingested, but
    /// for the `deferred_again` that met an infrastructure failure, which
    /// went back to the bulk lane in a message of their own.
    DeferredBatch {
        events: usize,
        deliveries: usize,
        deferred_again: usize,
    },
    /// Its tenant is beyond its share: moved to the bulk lane, where it is
    /// ingested when the express lane lets it.
    Deferred { event_id: Uuid },
    /// Refused and parked on the invalid-events queue with this reason.
    Invalid { reason: String },
}

/// What the database made of one valid event.
#[derive(Debug)]
enum FanOut {
    UnknownTenant {
        tenant_id: TenantId,
    },
    Duplicate,
    /// Stored with its deliveries; these are their first attempts' tasks.
    Stored {
        tasks: Vec<DeliveryTask>,
    },
}

/// Stores a batch of events and their deliveries, all or nothing: two reads
/// side by side (which tenants exist, and their active webhooks), then one
/// write (see [`events::insert_events_with_deliveries`]), whatever the
/// batch's size. The envelopes being ingested at once share it (see
/// [`Batcher`]). The reads need not share the write's transaction: under
/// PostgreSQL's read committed, statements of one transaction see what others
/// committed between them anyway, and a webhook deleted in between makes the
/// write fail on its foreign key, to be ingested again.
async fn fan_out(
    db: &DatabaseConnection,
    turns: &WriteTurns,
    events: Vec<ValidatedEvent>,
) -> anyhow::Result<Vec<FanOut>> {
    let mut tenant_ids: Vec<TenantId> = events.iter().map(|event| event.tenant_id()).collect();
    tenant_ids.sort_unstable();
    tenant_ids.dedup();
    let (known, subscriptions) = tokio::try_join!(
        tenants::existing_tenants(db, &tenant_ids),
        webhooks::active_subscriptions_of(db, &tenant_ids),
    )?;
    let mut outcomes: Vec<FanOut> = events
        .iter()
        .map(|event| match known.contains(&event.tenant_id()) {
            true => FanOut::Duplicate,
            false => FanOut::UnknownTenant {
                tenant_id: event.tenant_id(),
            },
        })
        .collect();
    let storable: Vec<usize> = (0..events.len())
        .filter(|index| known.contains(&events[*index].tenant_id()))
        .collect();
    let planned: Vec<EventWithDeliveries<'_>> = storable
        .iter()
        .map(|index| {
            let event = &events[*index];
            let subscribed = subscriptions
                .get(&event.tenant_id())
                .map(Vec::as_slice)
                .unwrap_or_default();
            EventWithDeliveries {
                event,
                deliveries: plan_deliveries(event, subscribed),
            }
        })
        .collect();
    // `None` for a repeat, also of an earlier envelope in this batch.
    let stored = {
        let _turn = turns.take().await;
        events::insert_events_with_deliveries(db, &planned, Utc::now()).await?
    };
    for ((index, planned), ids) in storable.iter().zip(&planned).zip(stored) {
        let Some(ids) = ids else { continue };
        let tasks = planned
            .deliveries
            .iter()
            .zip(ids)
            .map(|(new, id)| DeliveryTask::new(id, new.webhook_id, 1))
            .collect();
        outcomes[*index] = FanOut::Stored { tasks };
    }
    Ok(outcomes)
}

impl Ingester {
    /// Starts the fan-out batchers on the current runtime, which ingests
    /// both lanes; `fair` decides the lanes. An envelope over
    /// `max_event_bytes` is refused, as at the HTTP intake.
    pub fn new(db: DatabaseConnection, queue: Arc<dyn Queue>, fair: Arc<FairShare>, max_event_bytes: usize) -> Self {
        Self::build(db, queue, fair, max_event_bytes, None)
    }

    /// [`Ingester::new`], with the bulk lane's messages ingested on `bulk`
    /// (their fan-outs with its database pool).
    pub fn with_bulk_stage(
        db: DatabaseConnection,
        queue: Arc<dyn Queue>,
        fair: Arc<FairShare>,
        max_event_bytes: usize,
        bulk: BulkStage,
    ) -> Self {
        Self::build(db, queue, fair, max_event_bytes, Some(bulk))
    }

    fn build(
        db: DatabaseConnection,
        queue: Arc<dyn Queue>,
        fair: Arc<FairShare>,
        max_event_bytes: usize,
        bulk: Option<BulkStage>,
    ) -> Self {
        let fan_outs_on = |name, db: DatabaseConnection, precedence| {
            let turns = WriteTurns::of(&db, precedence);
            Batcher::spawn(name, MAX_FAN_OUT_BATCH, PARALLEL_FAN_OUTS, move |events| {
                let (db, turns) = (db.clone(), turns.clone());
                async move { fan_out(&db, &turns, events).await }
            })
        };
        let bulk_fan_outs = match &bulk {
            Some(bulk) => {
                let _on_bulk_runtime = bulk.runtime.enter();
                fan_outs_on("bulk fan-out", bulk.db.clone(), Precedence::Behind)
            }
            None => fan_outs_on("bulk fan-out", db.clone(), Precedence::Behind),
        };
        let fan_outs = fan_outs_on("fan-out", db, Precedence::First);
        let deferrals = {
            let queue = queue.clone();
            Batcher::spawn("deferral", MAX_DEFERRAL_BATCH, PARALLEL_DEFERRALS, move |envelopes| {
                let queue = queue.clone();
                async move {
                    let count = envelopes.len();
                    let messages = deferral_messages(envelopes, MAX_DEFERRAL_MESSAGE_BYTES);
                    futures::future::try_join_all(messages.into_iter().map(|message| queue.defer_events(message)))
                        .await?;
                    Ok(vec![(); count])
                }
            })
        };
        Ingester {
            fan_outs,
            bulk_fan_outs,
            bulk_runtime: bulk.map(|bulk| bulk.runtime),
            deferrals,
            bulk_turns: Arc::new(tokio::sync::Semaphore::new(BULK_MESSAGES_AT_ONCE)),
            deferrals_seen: Arc::default(),
            bulk_pause: BulkPause::default(),
            express_held: Arc::default(),
            fair,
            max_event_bytes,
            queue,
            crash_after_commit: std::env::var_os(CRASH_AFTER_COMMIT_ENV).is_some(),
        }
    }

    /// Handles one envelope taken from `lane` end to end. An `Err` is an
    /// infrastructure failure (the fan-out, or parking an invalid envelope):
    /// the message must be handed back, not dropped; what it had stored
    /// before is then a duplicate, ignored.
    /// A message of the bulk lane may carry many envelopes
    /// ([`DeferredEvents`]): each is ingested.
    pub async fn ingest(&self, body: &[u8], lane: Lane) -> anyhow::Result<IngestOutcome> {
        self.ingest_message(body, lane, &mut None).await
    }

    async fn ingest_message(
        &self,
        body: &[u8],
        lane: Lane,
        slot: &mut Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> anyhow::Result<IngestOutcome> {
        match lane {
            Lane::Bulk => self.ingest_deferred(body).await,
            lane => self.ingest_in_slot(body, lane, slot).await,
        }
    }

    /// [`Ingester::ingest`] in one of the consume loop's slots. An express
    /// event's lane is decided by its tenant first, from the envelope's head
    /// alone: a flooding tenant's envelope is moved to the bulk lane as it
    /// came, and validated there, once, when it is fanned out. A deferral
    /// gives its slot back at once, since moving an envelope costs no fan-out
    /// (with RabbitMQ the express lane's prefetch still bounds how many are
    /// in flight; the in-process queue's envelopes are in memory already),
    /// so a flood's deferrals are never held up behind the fan-outs in
    /// progress.
    async fn ingest_in_slot(
        &self,
        body: &[u8],
        lane: Lane,
        slot: &mut Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> anyhow::Result<IngestOutcome> {
        // Before anything reads it: a parse's cost grows with the body.
        if body.len() > self.max_event_bytes {
            return self
                .refuse(body, "too_large", too_large_reason(self.max_event_bytes))
                .await;
        }
        let mut lane = lane;
        // Replaced only by the envelope given an id for a deferral that
        // failed: fanned out here after all, it keeps that id.
        let mut body = Cow::Borrowed(body);
        // Without a head the envelope is not valid either: the parse below
        // refuses it.
        if let (Lane::Express, Some(head)) = (lane, EnvelopeHead::read(&body)) {
            match self.fair.lane_of_event(head.tenant_id()) {
                Lane::Bulk => {
                    // Not deferrable (`None`): refused by the parse below.
                    if let Some((event_id, envelope)) = deferred_envelope(&body, head, Uuid::now_v7) {
                        let given_an_id = head.id().is_none().then(|| envelope.clone());
                        match self.defer(envelope, event_id, head, slot).await {
                            Ok(outcome) => return Ok(outcome),
                            // Fanning it out now, in the bulk lane of the
                            // tasks, keeps it safe; only the ingester's own
                            // time is unfair.
                            Err(error) => {
                                tracing::warn!(error = %error, "failed to defer an event; ingesting it now");
                                lane = Lane::Bulk;
                                if let Some(envelope) = given_an_id {
                                    body = Cow::Owned(envelope.into_bytes());
                                }
                            }
                        }
                    }
                }
                _ => metrics::lane_enqueued(Stream::Events, Lane::Express, 1),
            }
        }
        let event = match ValidatedEvent::parse(&body, Utc::now()) {
            Ok(event) => event,
            Err(error) => {
                let class = match error {
                    EnvelopeError::Malformed(_) => "malformed",
                    EnvelopeError::Invalid(_) => "invalid",
                };
                return self.refuse(&body, class, error.to_string()).await;
            }
        };
        // The `ingest` span's fields, when there is one.
        let span = tracing::Span::current();
        span.record("aegis.event.id", display(event.id()));
        span.record("aegis.event.type", event.event_type().as_str());
        span.record("aegis.tenant.id", display(event.tenant_id()));
        let (event_id, event_type, tenant_id) = (event.id(), event.event_type(), event.tenant_id());
        let fan_outs = match lane {
            Lane::Express => &self.fan_outs,
            _ => &self.bulk_fan_outs,
        };
        // Its steps are child spans, so a trace shows where the time goes:
        // `fan_out` is the wait for and the run of the shared write.
        let fanned_out = fan_outs.call(event).instrument(tracing::info_span!("fan_out")).await?;
        let tasks = match fanned_out {
            FanOut::UnknownTenant { tenant_id } => {
                let reason = format!("tenantId: no tenant with id {tenant_id}");
                return self.refuse(&body, "unknown_tenant", reason).await;
            }
            FanOut::Duplicate => {
                tracing::debug!(%event_id, "duplicate event ignored");
                return Ok(IngestOutcome::Duplicate { event_id });
            }
            FanOut::Stored { tasks } => tasks,
        };
        if self.crash_after_commit && !tasks.is_empty() {
            tracing::error!("{CRASH_AFTER_COMMIT_ENV} is set: aborting between commit and publish");
            std::process::abort();
        }

        // The deliveries are safe in the database: one message for all of the
        // event's first attempts, and if it cannot be published the reconciler
        // publishes them (the envelope is acked either way: handing it back
        // would only bring it round again as a duplicate).
        let deliveries = tasks.len();
        if !tasks.is_empty() {
            let lane = match lane {
                Lane::Express => self.fair.lane_of_deliveries(tenant_id, deliveries),
                _ => Lane::Bulk,
            };
            metrics::lane_enqueued(Stream::Tasks, lane, deliveries);
            // `publish_tasks` times the publish and its confirm, from its
            // creation to its drop. Never entered: the `publish` span (whose
            // context the tasks carry) stays the child of `ingest`, so the
            // trace keeps its shape, publish → deliver.
            let publish_tasks = tracing::info_span!("publish_tasks");
            queue::publish_after_commit(
                Writer::Ingester,
                "an event's first attempts",
                self.queue.publish_first_attempts(FirstAttempts::new(&tasks), lane),
            )
            .await;
            drop(publish_tasks);
        }
        metrics::event_ingested(event_type);
        tracing::info!(%event_id, event = %event_type, deliveries, "event fanned out");
        Ok(IngestOutcome::FannedOut { event_id, deliveries })
    }

    /// Moves an envelope (see [`deferred_envelope`]) to the bulk lane.
    async fn defer(
        &self,
        envelope: String,
        event_id: Uuid,
        head: EnvelopeHead,
        slot: &mut Option<tokio::sync::OwnedSemaphorePermit>,
    ) -> anyhow::Result<IngestOutcome> {
        let span = tracing::Span::current();
        span.record("aegis.event.id", display(event_id));
        span.record("aegis.tenant.id", display(head.tenant_id()));
        slot.take();
        self.bulk_pause.deferred(
            &mut self.deferrals_seen.lock().unwrap_or_else(PoisonError::into_inner),
            now(),
            self.express_held.load(Ordering::Relaxed),
        );
        self.deferrals.call(envelope).await?;
        metrics::lane_enqueued(Stream::Events, Lane::Bulk, 1);
        Ok(IngestOutcome::Deferred { event_id })
    }

    /// Ingests a message of the bulk lane: every envelope it carries, in the
    /// bulk lane, at once. Those that meet an infrastructure failure (and
    /// only they: the others are stored or parked, and taken again an
    /// invalid one would be parked again) go back to the bulk lane, each
    /// as a message of its own: envelopes fanned out together fail
    /// together, and alone one that keeps failing no longer takes the
    /// others with it. If every one failed, or that publish fails, the
    /// whole message goes back (`Err`); those already stored are then
    /// duplicates (each carries its id), ignored.
    async fn ingest_deferred(&self, body: &[u8]) -> anyhow::Result<IngestOutcome> {
        let deferred = match DeferredEvents::decode(body) {
            Ok(deferred) => deferred,
            // Not ours: taken as one envelope, like any other.
            Err(NotDeferredEvents::OtherFormat(_)) => return self.ingest_in_slot(body, Lane::Bulk, &mut None).await,
            // Ours in form, and never made by an ingester: all of it parked.
            Err(error @ NotDeferredEvents::TooManyEnvelopes { .. }) => {
                return self.refuse(body, "too_large", error.to_string()).await;
            }
        };
        // At most a deferral batch: the bulk queue takes publishes from
        // anyone with broker credentials, and the decoding reads no more.
        let events = deferred.envelopes().len();
        let ingested = futures::future::join_all(
            deferred
                .envelopes()
                .iter()
                .map(|envelope| async move { self.ingest_in_slot(envelope.as_bytes(), Lane::Bulk, &mut None).await }),
        )
        .await;
        let mut deliveries = 0;
        let mut failed = Vec::new();
        let mut first_error = None;
        for (envelope, outcome) in deferred.into_envelopes().into_iter().zip(ingested) {
            match outcome {
                Ok(IngestOutcome::FannedOut { deliveries: count, .. }) => deliveries += count,
                Ok(_) => {}
                Err(error) => {
                    first_error.get_or_insert(error);
                    failed.push(envelope);
                }
            }
        }
        let Some(error) = first_error else {
            return Ok(IngestOutcome::DeferredBatch {
                events,
                deliveries,
                deferred_again: 0,
            });
        };
        if failed.len() == events {
            return Err(error);
        }
        let deferred_again = failed.len();
        tracing::error!(
            error = format!("{error:#}"),
            events,
            deferred_again,
            "envelopes of a bulk message not ingested; they go back to the bulk lane"
        );
        futures::future::try_join_all(
            failed
                .into_iter()
                .map(|envelope| self.queue.defer_events(DeferredEvents::new(vec![envelope]))),
        )
        .await
        .context("failed to defer again the envelopes of a bulk message that were not ingested")?;
        metrics::lane_enqueued(Stream::Events, Lane::Bulk, deferred_again);
        Ok(IngestOutcome::DeferredBatch {
            events,
            deliveries,
            deferred_again,
        })
    }

    /// Parks an invalid event; `class` labels the metric, `reason` says what
    /// exactly was wrong.
    async fn refuse(&self, body: &[u8], class: &'static str, reason: String) -> anyhow::Result<IngestOutcome> {
        tracing::warn!(%reason, "invalid event refused");
        metrics::event_invalid(class);
        self.queue
            .publish_invalid_event(bytes::Bytes::copy_from_slice(body), &reason)
            .await
            .context("failed to park an invalid event")?;
        Ok(IngestOutcome::Invalid { reason })
    }

    /// Consumes the events stream until `shutdown`, ingesting up to
    /// `concurrency` envelopes at once (each waits on its database commit and
    /// broker confirms, so one at a time would leave both idle); then drains
    /// what is already arriving in the express lane, waits for what is in
    /// progress to be settled, and returns.
    pub async fn run(mut self, shutdown: CancellationToken, concurrency: usize) -> anyhow::Result<()> {
        // A backlog must be reachable within what the express lane lets the
        // ingester hold: with RabbitMQ 32 × `concurrency` (the prefetch), so
        // at most a quarter of that; 256 at the default prefetch of 32.
        self.bulk_pause.backlog = self.bulk_pause.backlog.min(concurrency.max(1).saturating_mul(8));
        // Also cancelled by a message's task that panics (see `MessageTasks`).
        let shutdown = shutdown.child_token();
        let slots = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
        let in_progress = MessageTasks::new(shutdown.clone());
        let queue = self.queue.clone();
        let consumer = consume(
            queue.as_ref(),
            Stream::Events,
            "events",
            slots,
            // An express event waits for a slot only behind other express
            // events: a bulk message gives its slot back at once.
            None,
            &shutdown,
            Drain::UntilIdle {
                idle: DRAIN_IDLE,
                at_most: DRAIN_AT_MOST,
            },
            |message, permit| {
                let (ingester, shutdown) = (self.clone(), shutdown.clone());
                let runtime = match message.lane() {
                    Lane::Bulk => self.bulk_runtime.clone(),
                    _ => None,
                };
                let ingesting = async move { ingester.handle(message, permit, shutdown).await };
                match runtime {
                    Some(runtime) => in_progress.spawn_on(ingesting, &runtime),
                    None => in_progress.spawn(ingesting),
                };
                async { Flow::Continue }
            },
        )
        .await?;
        in_progress.close();
        in_progress.wait().await;
        // Only now: the acks of the work in progress go out through it.
        drop(consumer);
        if in_progress.panicked() {
            anyhow::bail!("an envelope's task panicked (logged); the ingester stopped");
        }
        tracing::info!("ingester stopped");
        Ok(())
    }

    async fn handle(
        &self,
        message: QueueMessage,
        slot: tokio::sync::OwnedSemaphorePermit,
        shutdown: CancellationToken,
    ) {
        let span = tracing::info_span!(
            "ingest",
            otel.kind = "consumer",
            otel.status_code = Empty,
            trace_id = Empty,
            aegis.event.id = Empty,
            aegis.event.type = Empty,
            aegis.tenant.id = Empty,
            aegis.ingest.outcome = Empty,
            aegis.deliveries = Empty,
        );
        telemetry::continue_trace(&span, message.trace_headers());
        self.ingest_and_settle(message, slot, shutdown).instrument(span).await;
    }

    /// A turn for a message of the bulk lane, once the ingester is not
    /// moving a flood out of the express lane (see [`BulkPause`]), or at
    /// once when the process is stopping: a bulk message taken before then
    /// is ingested if a turn is free, as before the pause.
    async fn bulk_turn(&self, shutdown: &CancellationToken) -> tokio::sync::OwnedSemaphorePermit {
        loop {
            let deferrals = *self.deferrals_seen.lock().unwrap_or_else(PoisonError::into_inner);
            let pause = self.bulk_pause.remaining(&deferrals, now());
            if pause.is_zero() || shutdown.is_cancelled() {
                break;
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = shutdown.cancelled() => {}
            }
        }
        self.bulk_turns
            .clone()
            .acquire_owned()
            .await
            .expect("the bulk turns are never closed")
    }

    /// Ingests a message, then acks it, or hands it back after a failure.
    async fn ingest_and_settle(
        &self,
        message: QueueMessage,
        slot: tokio::sync::OwnedSemaphorePermit,
        shutdown: CancellationToken,
    ) {
        // Held until the message is settled (through the pause after a
        // failure too), unless a deferral gives it back first.
        let mut slot = Some(slot);
        let _held = (message.lane() == Lane::Express).then(|| Held::count(&self.express_held));
        // A bulk message gives its slot back and waits for a turn of its own,
        // so the bulk lane never holds the slots express events need.
        // One still waiting for a turn when the process stops goes back to
        // the broker.
        let _bulk_turn = match message.lane() {
            Lane::Bulk => {
                slot.take();
                tokio::select! {
                    // A free turn wins over shutdown: a message taken before
                    // it is ingested rather than handed straight back (the
                    // drain takes no more of the bulk lane's).
                    biased;
                    turn = self.bulk_turn(&shutdown) => Some(turn),
                    () = shutdown.cancelled() => {
                        if let Err(error) = message.requeue().await {
                            tracing::error!(error = %error, "failed to hand back a bulk message");
                        }
                        return;
                    }
                }
            }
            _ => None,
        };
        let ingested = self.ingest_message(&message.body, message.lane(), &mut slot).await;
        let span = tracing::Span::current();
        match &ingested {
            Ok(IngestOutcome::FannedOut { deliveries, .. }) => {
                span.record("aegis.ingest.outcome", "fanned_out");
                span.record("aegis.deliveries", *deliveries);
            }
            Ok(IngestOutcome::Duplicate { .. }) => {
                span.record("aegis.ingest.outcome", "duplicate");
            }
            Ok(IngestOutcome::Deferred { .. }) => {
                span.record("aegis.ingest.outcome", "deferred");
            }
            Ok(IngestOutcome::DeferredBatch {
                deliveries,
                deferred_again,
                ..
            }) => {
                span.record("aegis.ingest.outcome", "deferred_batch");
                span.record("aegis.deliveries", *deliveries);
                if *deferred_again > 0 {
                    span.record("otel.status_code", "error");
                }
            }
            Ok(IngestOutcome::Invalid { .. }) => {
                span.record("aegis.ingest.outcome", "invalid");
            }
            Err(_) => {
                span.record("aegis.ingest.outcome", "error");
                span.record("otel.status_code", "error");
            }
        }
        match ingested {
            Ok(outcome) => {
                if let Err(error) = message.ack().instrument(tracing::info_span!("ack")).await {
                    tracing::error!(error = %error, "failed to ack an event");
                }
                if matches!(
                    outcome,
                    IngestOutcome::DeferredBatch {
                        deferred_again: 1..,
                        ..
                    }
                ) {
                    // As after a failure of the whole message: the bulk turn
                    // is held a while, so an outage does not make the lane
                    // spin through the envelopes it sent back.
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
            }
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "event not ingested; it will be retried");
                tokio::time::sleep(ERROR_PAUSE).await;
                if let Err(error) = message.requeue().await {
                    tracing::error!(error = %error, "failed to requeue an event");
                }
            }
        }
    }
}

/// One message counted in a tally of held messages until it is dropped.
struct Held<'a>(&'a AtomicUsize);

impl<'a> Held<'a> {
    fn count(tally: &'a AtomicUsize) -> Self {
        tally.fetch_add(1, Ordering::Relaxed);
        Held(tally)
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The clock of the bulk pause: tokio's, so tests on a paused clock control it.
fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

/// The envelope to move to the bulk lane and its id: as upstream sent it,
/// or given `fresh()` as its `id` if it had none (a `null` id is none, as
/// for validation). Ingested twice (its message handed back after a
/// failure), it is then a duplicate, not a second event. `None` for one
/// that validation refuses anyway (see [`EnvelopeHead::envelope_with_id`]).
fn deferred_envelope(body: &[u8], head: EnvelopeHead, fresh: impl FnOnce() -> Uuid) -> Option<(Uuid, String)> {
    match head.id() {
        // The head is read only from UTF-8.
        Some(id) => Some((id, String::from_utf8(body.to_vec()).ok()?)),
        None => {
            let id = fresh();
            Some((id, EnvelopeHead::envelope_with_id(body, id)?))
        }
    }
}

/// A deferral batch as messages of the bulk lane, in order: as many
/// envelopes to a message as fit in `max_bytes`, and at least one.
fn deferral_messages(envelopes: Vec<String>, max_bytes: usize) -> Vec<DeferredEvents> {
    let mut messages = Vec::new();
    let (mut filling, mut bytes) = (Vec::new(), 0);
    for envelope in envelopes {
        if !filling.is_empty() && bytes + envelope.len() > max_bytes {
            messages.push(DeferredEvents::new(std::mem::take(&mut filling)));
            bytes = 0;
        }
        bytes += envelope.len();
        filling.push(envelope);
    }
    if !filling.is_empty() {
        messages.push(DeferredEvents::new(filling));
    }
    messages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deferral_batch_of_large_envelopes_goes_as_several_messages_in_order() {
        let sized = |count: usize, bytes: usize| -> Vec<String> {
            (0..count)
                .map(|index| {
                    let index = index.to_string();
                    index.clone() + &"x".repeat(bytes - index.len())
                })
                .collect()
        };
        let envelopes_of = |messages: &[DeferredEvents]| -> Vec<String> {
            messages
                .iter()
                .flat_map(|message| message.envelopes().to_vec())
                .collect()
        };
        // Ordinary events: the whole batch in one message.
        let small = sized(MAX_DEFERRAL_BATCH, 1_000);
        let messages = deferral_messages(small.clone(), MAX_DEFERRAL_MESSAGE_BYTES);
        assert_eq!(messages.len(), 1);
        assert_eq!(envelopes_of(&messages), small);
        // 100 KiB each: 20 fit in 2 MiB (20 × 102,400 = 2,048,000 ≤ 2,097,152).
        let large = sized(MAX_DEFERRAL_BATCH, 100 * 1024);
        let messages = deferral_messages(large.clone(), MAX_DEFERRAL_MESSAGE_BYTES);
        let counts: Vec<usize> = messages.iter().map(|message| message.envelopes().len()).collect();
        assert_eq!(counts, [20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 20, 16]);
        assert_eq!(envelopes_of(&messages), large, "every envelope, in order");
        // One larger than the limit still goes, alone.
        let messages = deferral_messages(sized(3, 10), 15);
        let counts: Vec<usize> = messages.iter().map(|message| message.envelopes().len()).collect();
        assert_eq!(counts, [1, 1, 1]);
        assert!(deferral_messages(Vec::new(), 15).is_empty());
    }

    #[test]
    fn a_deferred_envelope_keeps_its_bytes_or_gains_the_id_it_was_given() {
        const TENANT: &str = "0b5a6a40-5d43-4a2b-9c1f-1c1b2a3d4e5f";
        let deferred = |body: &str| {
            let head = EnvelopeHead::read(body.as_bytes()).expect("a head");
            deferred_envelope(body.as_bytes(), head, || Uuid::from_u128(7)).expect("deferrable")
        };
        let id = Uuid::now_v7();
        let with = format!(r#"{{"id":"{id}","tenantId":"{TENANT}","event":"POAM_OVERDUE"}}"#);
        assert_eq!(deferred(&with), (id, with.clone()));
        // Kept as it came, an envelope without an id (or with a `null` one)
        // would be a fresh event at each ingestion.
        for without in [
            format!(r#"{{"tenantId":"{TENANT}","event":"POAM_OVERDUE"}}"#),
            format!(r#"{{"id":null,"tenantId":"{TENANT}","event":"POAM_OVERDUE"}}"#),
        ] {
            let (given, envelope) = deferred(&without);
            assert_eq!(given, Uuid::from_u128(7));
            let parsed: serde_json::Value = serde_json::from_str(&envelope).expect("json");
            assert_eq!(parsed["id"], given.to_string());
            assert_eq!(parsed["tenantId"], TENANT);
            assert_eq!(parsed["event"], "POAM_OVERDUE");
        }
    }
}
