//! Delivery workers: take delivery tasks, sign and POST each request, record the
//! attempt, and schedule the retry or dead-letter the delivery. The only crate
//! that sends requests to customers' endpoints.
//!
//! [`Worker::process_one`] is the whole of one attempt; [`Worker::run`] is the loop
//! around it that owns concurrency, acknowledgements and shutdown.
//!
//! Each task taken is a `deliver` span, the child of the span that published the
//! task (the ingester's fan-out, or the attempt that scheduled this retry), with
//! one `http.request` span per HTTP attempt inside; a retry published from it
//! carries the trace on. The attempt's other steps are child spans too:
//! `claim` (the shared claim round trip), `prepare` (the signed request),
//! `record` (the shared recording transaction) and `ack` (settling the task).

pub mod admission;
pub mod expiry;
pub mod http;
pub mod receipt;
pub mod reconciler;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use aegis_webhook_core::config::Config;
use aegis_webhook_core::event::delivered_body;
use aegis_webhook_core::ids::DeliveryId;
use aegis_webhook_core::metrics::{self, AttemptOutcome};
use aegis_webhook_core::queue::consume::{Drain, ExpressFirst, Flow, MessageTasks, consume};
use aegis_webhook_core::queue::{self, DeliveryTask, Lane, Queue, Stream, Writer};
use aegis_webhook_core::retry::{self, Decision, RetryPolicy};
use aegis_webhook_core::secret::SecretCipher;
use aegis_webhook_core::signing;
use aegis_webhook_core::target::TargetPolicy;
use aegis_webhook_core::telemetry;
use aegis_webhook_storage::BulkStage;
use aegis_webhook_storage::deliveries::{self, Attempt, NextStep, Recorded};
use aegis_webhook_storage::events::StoredEvent;
use aegis_webhook_storage::webhooks::Webhook;
use chrono::Utc;
use rand::RngExt as _;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use sea_orm::DatabaseConnection;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing::field::{Empty, display};

/// Pause after an infrastructure error before the task is handed back.
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Why a delivery whose event lost its payload to the retention ends unsent.
const PAYLOAD_EXPUNGED: &str = "the event's payload was expunged under the data retention policy";
/// Why an attempt whose claim was taken over changed nothing.
const TAKEN_OVER: &str = "the claim ran out before the attempt was recorded, and another worker took the attempt over";

use admission::{Admission, Lanes, Taken};
use receipt::Receipt;
use store::{Applied, Claimed, Recording, Store, Target};

/// Slots kept for express tasks, beyond the `concurrency` every lane shares:
/// one for every eight of those (see [`ExpressFirst`]). Measured (embedded
/// noisy benchmark): with every slot taken by a flood, an express task
/// waited up to 56 ms for one, and its message up to 69 ms in its lane
/// while the loop waited for slots for a flood's message's later tasks.
fn express_reserve(concurrency: usize) -> usize {
    (concurrency / 8).max(1)
}

/// Everything a worker needs, shared by all its in-flight deliveries.
#[derive(Clone)]
pub struct Worker {
    db: DatabaseConnection,
    store: Store,
    queue: Arc<dyn Queue>,
    client: reqwest::Client,
    /// The bulk lane's client: given a bulk stage, one of its own, whose
    /// connections are opened, and driven, on the bulk runtime.
    bulk_client: reqwest::Client,
    /// Where the bulk lane's attempts run: the bulk runtime, or `runtime`.
    bulk_runtime: Option<tokio::runtime::Handle>,
    /// The runtime the worker was made on, where the other lanes' run.
    runtime: tokio::runtime::Handle,
    /// The pool of the bulk lane's attempts: the bulk stage's, or `db`.
    bulk_db: DatabaseConnection,
    policy: Arc<TargetPolicy>,
    retry: RetryPolicy,
    request_timeout: Duration,
    max_response_body_bytes: usize,
    concurrency: usize,
    webhook_concurrency: usize,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").finish_non_exhaustive()
    }
}

/// What one task came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver answered 2xx.
    Delivered,
    /// The attempt failed; attempt `next_attempt` is due after `delay`.
    RetryScheduled { next_attempt: u32, delay: Duration },
    /// The delivery ended `FAILED` (and its dead letter was published, or left
    /// unpublished and counted: the row is the record).
    Failed { reason: String },
    /// The task arrived before the attempt is due, or while another claim
    /// holds it; it was published again for the time left.
    Deferred { remaining: Duration },
    /// Nothing was sent (a duplicate or stale task, a finished delivery), or
    /// what was sent changed nothing (the claim was taken over).
    Skipped { reason: String },
}

impl Outcome {
    /// The outcome's name in traces.
    fn label(&self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::RetryScheduled { .. } => "retry_scheduled",
            Outcome::Failed { .. } => "failed",
            Outcome::Deferred { .. } => "deferred",
            Outcome::Skipped { .. } => "skipped",
        }
    }
}

/// Why a task's attempt could not be claimed, and what becomes of the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unclaimed {
    /// The attempt is still the delivery's next: the task goes back for this
    /// long. It came before the attempt was due (through a broker tier
    /// shorter than its delay, or an instant before the claim's clock said
    /// it was due), or while a claim holds the attempt: the worker holding
    /// it may be sending it, or may have failed to record it (a database
    /// error), and then only a task after the claim runs out makes the
    /// attempt again without waiting for the reconciler, which waits while
    /// tasks wait (a flood's backlog can last minutes).
    Wait(Duration),
    /// The delivery is finished, gone, or past this attempt: the task is
    /// dropped.
    Stale,
}

impl Unclaimed {
    /// How much after a claim's end a task held for it comes back: the
    /// claim needs the lease to have ended, not to be ending.
    const AFTER_CLAIM: Duration = Duration::from_millis(100);

    fn of(delivery: Option<&deliveries::Delivery>, attempt: u32, now: chrono::DateTime<Utc>) -> Self {
        let Some((delivery, due_at)) = delivery
            .filter(|delivery| {
                delivery.status == deliveries::DeliveryStatus::Pending && delivery.attempts + 1 == attempt
            })
            .and_then(|delivery| Some((delivery, delivery.next_attempt_at?)))
        else {
            return Unclaimed::Stale;
        };
        let until = |at: chrono::DateTime<Utc>| (at - now).to_std().unwrap_or_default();
        let due = until(due_at);
        let held = delivery
            .locked_until
            .filter(|claimed_until| *claimed_until >= now)
            .map(|claimed_until| until(claimed_until) + Self::AFTER_CLAIM)
            .unwrap_or_default();
        Unclaimed::Wait(due.max(held))
    }
}

/// What the claim step came to.
enum Claim {
    Granted(Attemptable),
    /// No attempt is made; this is why.
    Refused(Outcome),
}

/// A claimed delivery whose webhook is active: an attempt can be made.
struct Attemptable {
    delivery: deliveries::Delivery,
    webhook: Arc<Webhook>,
    event: Arc<StoredEvent>,
}

/// The request of one attempt.
struct Request {
    headers: HeaderMap,
    body: String,
}

/// What sending came to.
struct Sent {
    started_at: chrono::DateTime<Utc>,
    result: http::HttpResult,
}

/// What a decision means for the delivery's row, its webhook's health, the
/// caller and the metrics: one place, so the four always agree.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Consequences {
    next: NextStep,
    health: store::Health,
    outcome: Outcome,
    metric: AttemptOutcome,
}

impl Consequences {
    /// `had_streak`: the webhook had failures recorded when the attempt was
    /// claimed (so a success must end the streak).
    fn of(decision: &Decision, had_streak: bool) -> Self {
        match decision {
            Decision::Delivered => Consequences {
                next: NextStep::Succeeded,
                health: store::Health::Succeeded { had_streak },
                outcome: Outcome::Delivered,
                metric: AttemptOutcome::Success,
            },
            Decision::Retry {
                next_attempt,
                delay,
                at,
            } => Consequences {
                next: NextStep::RetryAt(*at),
                health: store::Health::Unchanged,
                outcome: Outcome::RetryScheduled {
                    next_attempt: *next_attempt,
                    delay: *delay,
                },
                metric: AttemptOutcome::Retry,
            },
            Decision::Exhausted { reason } => Consequences {
                next: NextStep::Failed(reason.clone()),
                health: store::Health::Failed,
                outcome: Outcome::Failed { reason: reason.clone() },
                metric: AttemptOutcome::Failed,
            },
            Decision::Gone { reason } => Consequences {
                next: NextStep::Failed(reason.clone()),
                health: store::Health::Gone { reason: reason.clone() },
                outcome: Outcome::Failed { reason: reason.clone() },
                metric: AttemptOutcome::Gone,
            },
        }
    }
}

/// The `deliver` span of a task taken from the queue: the child of the span
/// that published it, when the message says which.
fn task_span(task: &DeliveryTask, receipt: &Receipt) -> tracing::Span {
    let span = tracing::info_span!(
        "deliver",
        otel.kind = "consumer",
        otel.status_code = Empty,
        trace_id = Empty,
        aegis.delivery.id = %task.delivery_id(),
        aegis.delivery.attempt = task.attempt(),
        aegis.webhook.id = Empty,
        aegis.delivery.outcome = Empty,
    );
    if let Some(webhook) = task.webhook_id() {
        span.record("aegis.webhook.id", display(webhook));
    }
    telemetry::continue_trace(&span, receipt.trace_headers());
    span
}

impl Worker {
    /// A worker that makes every lane's attempts on the current runtime.
    pub fn new(
        config: &Config,
        db: DatabaseConnection,
        queue: Arc<dyn Queue>,
        cipher: SecretCipher,
    ) -> anyhow::Result<Self> {
        Self::build(config, db, queue, cipher, None)
    }

    /// [`Worker::new`], with the bulk lane's attempts made on `bulk` (their
    /// claims and records with its database pool).
    pub fn with_bulk_stage(
        config: &Config,
        db: DatabaseConnection,
        queue: Arc<dyn Queue>,
        cipher: SecretCipher,
        bulk: BulkStage,
    ) -> anyhow::Result<Self> {
        Self::build(config, db, queue, cipher, Some(bulk))
    }

    fn build(
        config: &Config,
        db: DatabaseConnection,
        queue: Arc<dyn Queue>,
        cipher: SecretCipher,
        bulk: Option<BulkStage>,
    ) -> anyhow::Result<Self> {
        let policy = Arc::new(config.target_policy());
        let lease = config.request_timeout + config.claim_margin;
        let client = http::build_client(policy.clone(), config.request_timeout)?;
        Ok(Worker {
            // A client of its own only where the bulk lane has a runtime of
            // its own; otherwise one pool of connections serves every lane.
            bulk_client: match bulk {
                Some(_) => http::build_client(policy.clone(), config.request_timeout)?,
                None => client.clone(),
            },
            client,
            store: Store::spawn(db.clone(), bulk.as_ref(), cipher, lease, config.auto_disable()),
            bulk_db: bulk.as_ref().map_or_else(|| db.clone(), |bulk| bulk.db.clone()),
            bulk_runtime: bulk.map(|bulk| bulk.runtime),
            runtime: tokio::runtime::Handle::current(),
            db,
            queue,
            policy,
            retry: RetryPolicy {
                schedule: config.retry_schedule.clone(),
                backpressure: config.backpressure(),
            },
            request_timeout: config.request_timeout,
            max_response_body_bytes: config.max_response_body_bytes,
            concurrency: config.worker_concurrency,
            webhook_concurrency: config.webhook_concurrency,
        })
    }

    /// Makes the attempt a task asks for, as named steps: claim → prepare →
    /// send → decide → record → schedule. The decision is
    /// [`retry::decide`], a pure function; what it means for the delivery, the
    /// webhook's health and the metrics is [`Consequences::of`], another.
    ///
    /// An `Err` means the attempt was not recorded: the claim failed (nothing was
    /// sent), or the request went out and recording its result failed. Either
    /// way the delivery is still pending in the database. The caller hands the
    /// task back; while the claim's lease holds, that task goes back again
    /// for the rest of the lease, and then the attempt is made again (so it
    /// may be sent twice: at least once); should that fail too, the
    /// reconciler publishes the attempt once the lease has ended and
    /// `AEGIS_RECONCILE_GRACE` passed. Publishing what the recorded decision schedules cannot fail
    /// the step: it follows the one after-commit policy
    /// ([`queue::publish_after_commit`]).
    pub async fn process_one(&self, task: DeliveryTask) -> anyhow::Result<Outcome> {
        self.process_from(task, Lane::Express).await
    }

    /// [`Worker::process_one`] for a task taken from `lane`, whose attempts
    /// have their own database batches (see [`store`]).
    async fn process_from(&self, task: DeliveryTask, lane: Lane) -> anyhow::Result<Outcome> {
        // Each step is a child span of `deliver` (`send`'s is `http.request`),
        // so a trace shows where an attempt's time goes.
        let claimed = match self.claim(task, lane).instrument(tracing::info_span!("claim")).await? {
            Claim::Granted(claimed) => claimed,
            Claim::Refused(outcome) => return Ok(outcome),
        };
        let request = tracing::info_span!("prepare").in_scope(|| self.prepare(&claimed, task.attempt(), Utc::now()));
        let sent = self.send(&claimed.webhook, request, lane).await;
        let decision = retry::decide(
            sent.result.observed(),
            task.attempt(),
            &self.retry,
            Utc::now(),
            rand::rng().random::<f64>(),
        );
        let had_streak = claimed.webhook.consecutive_failures > 0 || claimed.webhook.failing_since.is_some();
        let consequences = Consequences::of(&decision, had_streak);
        let applied = self
            .record(&task, lane, &claimed, &sent, &consequences)
            .instrument(tracing::info_span!("record"))
            .await?;
        if applied == Applied::TakenOver {
            tracing::warn!(
                delivery_id = %task.delivery_id(),
                attempt = task.attempt(),
                "this worker's claim ran out before it recorded the attempt, and another worker took the attempt over: logged only"
            );
            return Ok(Outcome::Skipped {
                reason: TAKEN_OVER.to_owned(),
            });
        }
        self.schedule(task, &claimed, &decision).await;
        tracing::info!(
            delivery_id = %task.delivery_id(),
            attempt = task.attempt(),
            status = sent.result.status,
            error = sent.result.error.as_deref(),
            duration_ms = sent.result.duration.as_millis() as u64,
            outcome = ?consequences.outcome,
            "delivery attempt"
        );
        Ok(consequences.outcome)
    }

    /// Claim: takes the attempt for a lease, with what it is built from. A task
    /// that is early, stale, or for a webhook that is disabled or gone is
    /// refused, with what became of it.
    async fn claim(&self, task: DeliveryTask, lane: Lane) -> anyhow::Result<Claim> {
        let Some(Claimed {
            delivery,
            webhook,
            event,
        }) = self.store.claim(task.delivery_id(), task.attempt(), lane).await?
        else {
            return Ok(Claim::Refused(self.unclaimed(task, lane).await?));
        };
        // Expiry drops bodies only once every delivery of the event is final;
        // one reopened at that moment (a redeliver racing the expiry pass)
        // must end with the reason, not send an empty body.
        if event.data.is_none() {
            return Ok(Claim::Refused(
                self.cancel(task.delivery_id(), PAYLOAD_EXPUNGED, lane).await?,
            ));
        }
        let refused = match webhook {
            Target::Found(webhook) if webhook.active => {
                return Ok(Claim::Granted(Attemptable {
                    delivery,
                    webhook,
                    event,
                }));
            }
            Target::Found(_) => "webhook is disabled".to_owned(),
            Target::Deleted => "webhook was deleted".to_owned(),
            // Ended with the reason, where the customer's log shows it, rather
            // than retried forever; replayDeadLetters sends it once mended.
            Target::Unreadable(why) => {
                tracing::error!(webhook_id = %delivery.webhook_id, reason = %why, "a webhook's stored row cannot be read");
                format!("the webhook's stored configuration cannot be read: {why}")
            }
            // This worker's configuration is wrong, not the webhook: the
            // delivery waits (the task handed back returns once the claim
            // runs out, see `Unclaimed`) for a worker with the key, rather
            // than fail.
            Target::KeyMissing(why) => anyhow::bail!(
                "this worker's AEGIS_SECRET_KEY is not the key the webhook's secret was sealed with (every replica of the API and the worker needs the same key): {why}"
            ),
        };
        Ok(Claim::Refused(self.cancel(task.delivery_id(), &refused, lane).await?))
    }

    /// Prepare: the exact bytes to send (the same on every attempt) and the
    /// signed headers for attempt `attempt` at `now`.
    fn prepare(&self, claimed: &Attemptable, attempt: u32, now: chrono::DateTime<Utc>) -> Request {
        let body = delivered_body(
            claimed.delivery.event_type,
            &claimed.event.timestamp,
            // Present: `claim` refuses an event whose payload was expunged.
            claimed.event.data.as_deref().unwrap_or_default(),
        );
        let previous_secret = claimed.webhook.previous_secret_at(now);
        let headers = self.headers(
            &claimed.delivery,
            &claimed.webhook.secret,
            previous_secret,
            attempt,
            now.timestamp(),
            &body,
        );
        Request { headers, body }
    }

    /// Send: the POST, under the request timeout and the response-size cap,
    /// with the client of the lane the task was taken from.
    async fn send(&self, webhook: &Webhook, request: Request, lane: Lane) -> Sent {
        let client = match lane {
            Lane::Bulk => &self.bulk_client,
            Lane::Express | Lane::Due => &self.client,
        };
        let started_at = Utc::now();
        let _in_flight = metrics::InFlight::start();
        let result = http::post(
            client,
            &self.policy,
            &webhook.url,
            request.headers,
            request.body,
            self.request_timeout,
            self.max_response_body_bytes,
        )
        .await;
        Sent { started_at, result }
    }

    /// Record: the attempt, the delivery's next state and the webhook's health
    /// in one (shared) transaction; then the metrics of what was recorded.
    /// Only the attempt is logged if the claim was taken over.
    async fn record(
        &self,
        task: &DeliveryTask,
        lane: Lane,
        claimed: &Attemptable,
        sent: &Sent,
        consequences: &Consequences,
    ) -> anyhow::Result<Applied> {
        let result = &sent.result;
        let lease = claimed
            .delivery
            .lease()
            .ok_or_else(|| anyhow::anyhow!("a claimed delivery carries its claim's lease"))?;
        let recording = Recording {
            recorded: Recorded {
                attempt: Attempt {
                    delivery_id: task.delivery_id(),
                    attempt: task.attempt(),
                    started_at: sent.started_at,
                    duration: result.duration,
                    status_code: result.status,
                    error: result.error.clone(),
                    response_body: result.body.clone(),
                },
                lease,
                next: consequences.next.clone(),
            },
            webhook_id: claimed.webhook.id,
            health: consequences.health.clone(),
        };
        let applied = self.store.record(recording, lane).await?;
        // A taken-over attempt counts nowhere: the worker that took it over
        // counts what it made of it.
        let Applied::Moved(disabled) = applied else {
            return Ok(applied);
        };
        metrics::delivery_attempt(consequences.metric, result.duration);
        if let Some(reason) = disabled {
            tracing::warn!(webhook_id = %claimed.webhook.id, reason, "webhook disabled automatically");
            metrics::webhook_auto_disabled(reason);
        }
        match consequences.outcome {
            Outcome::Delivered => {
                let lag = (Utc::now() - claimed.delivery.created_at).to_std().unwrap_or_default();
                metrics::event_delivered_after(lag);
            }
            Outcome::RetryScheduled { next_attempt, .. } => metrics::retry_scheduled(next_attempt),
            _ => {}
        }
        Ok(applied)
    }

    /// Schedule: publishes what the recorded decision says comes next. The
    /// database already says it, so a failed publish is left to the reconciler.
    async fn schedule(&self, task: DeliveryTask, claimed: &Attemptable, decision: &Decision) {
        match decision {
            Decision::Retry {
                next_attempt, delay, ..
            } => {
                let retry = DeliveryTask::new(task.delivery_id(), claimed.webhook.id, *next_attempt);
                let publish = self.queue.publish_task(retry, *delay);
                queue::publish_after_commit(Writer::Worker, "a retry", publish).await;
            }
            Decision::Exhausted { reason } | Decision::Gone { reason } => {
                let publish = self.queue.publish_dead_letter(task, reason);
                queue::publish_after_commit(Writer::Worker, "a dead letter", publish).await;
            }
            Decision::Delivered => {}
        }
    }

    /// Explains a failed claim ([`Unclaimed::of`]): a task that came early,
    /// or while another claim holds its attempt, goes back for the time
    /// left, if any, rather than be dropped and wait for the reconciler;
    /// anything else is stale.
    async fn unclaimed(&self, task: DeliveryTask, lane: Lane) -> anyhow::Result<Outcome> {
        let now = Utc::now();
        let delivery = deliveries::delivery_by_id(self.db_of(lane), task.delivery_id()).await?;
        match Unclaimed::of(delivery.as_ref(), task.attempt(), now) {
            Unclaimed::Wait(remaining) => {
                self.queue.publish_task(task, remaining).await?;
                Ok(Outcome::Deferred { remaining })
            }
            Unclaimed::Stale => Ok(Outcome::Skipped {
                reason: "duplicate or stale task".to_owned(),
            }),
        }
    }

    async fn cancel(&self, delivery_id: DeliveryId, reason: &str, lane: Lane) -> anyhow::Result<Outcome> {
        deliveries::cancel(self.db_of(lane), delivery_id, reason).await?;
        Ok(Outcome::Skipped {
            reason: reason.to_owned(),
        })
    }

    /// The pool for the steps of a task of `lane`: the bulk stage's for the
    /// bulk lane (its connections are driven by the runtime the task runs
    /// on), the worker's own for the others.
    fn db_of(&self, lane: Lane) -> &DatabaseConnection {
        match lane {
            Lane::Bulk => &self.bulk_db,
            Lane::Express | Lane::Due => &self.db,
        }
    }

    fn headers(
        &self,
        delivery: &deliveries::Delivery,
        secret: &aegis_webhook_core::secret::SigningSecret,
        previous_secret: Option<&aegis_webhook_core::secret::SigningSecret>,
        attempt: u32,
        timestamp: i64,
        body: &str,
    ) -> HeaderMap {
        let pairs = signing::delivery_headers(
            &delivery.id.to_string(),
            delivery.event_type,
            attempt,
            timestamp,
            body.as_bytes(),
            secret,
            previous_secret,
        );
        let mut headers = HeaderMap::with_capacity(pairs.len());
        for (name, value) in pairs {
            let value = HeaderValue::from_str(&value).expect("header values are ASCII we produced");
            headers.insert(HeaderName::from_static(name), value);
        }
        headers
    }

    /// Consumes delivery tasks until `shutdown`, at most `concurrency` attempts
    /// at once and at most `webhook_concurrency` to any one webhook (see
    /// [`admission`]); then waits up to `grace` for in-flight attempts. Tasks
    /// not finished by then are left unacknowledged, so the broker (or, in
    /// embedded mode, the start-up recovery) hands them out again.
    pub async fn run(self, shutdown: CancellationToken, grace: Duration) -> anyhow::Result<()> {
        // Also cancelled by an attempt's task that panics (see `MessageTasks`).
        let shutdown = shutdown.child_token();
        let slots = Arc::new(Semaphore::new(self.concurrency));
        let express_first = ExpressFirst::new(express_reserve(self.concurrency));
        // As many may wait in webhooks' lines as run: the prefetch (twice the
        // concurrency) leaves room for both, so waiting tasks never stop the
        // broker from handing this worker tasks for other webhooks.
        let lanes = Arc::new(Lanes::new(self.webhook_concurrency, self.concurrency));
        let in_flight = MessageTasks::new(shutdown.clone());
        let queue = self.queue.clone();
        let consumer = consume(
            queue.as_ref(),
            Stream::Tasks,
            "tasks",
            slots.clone(),
            Some(express_first.clone()),
            &shutdown,
            Drain::Immediately,
            |message, permit| {
                self.dispatch_message(message, permit, (&slots, &express_first), &shutdown, &lanes, &in_flight)
            },
        )
        .await?;
        // Waiting tasks go back to the queue at once, for other workers.
        for taken in lanes.drain_waiting() {
            if let Err(error) = taken.receipt.requeue().await {
                tracing::warn!(error = %error, "failed to hand back a waiting task; the broker will redeliver it");
            }
        }
        in_flight.close();
        if tokio::time::timeout(grace, in_flight.wait()).await.is_err() {
            tracing::warn!(
                left = in_flight.len(),
                "grace period over; unfinished tasks will be redelivered"
            );
        }
        // Only now: the tasks' acks go out through it, and dropping it hands
        // back any still unfinished.
        drop(consumer);
        if in_flight.panicked() {
            anyhow::bail!("an attempt's task panicked (logged); the worker stopped");
        }
        tracing::info!("worker stopped");
        Ok(())
    }

    /// Hands each task of a message to [`Worker::dispatch`] with a slot of its
    /// own (the message's `permit` is the first). The later tasks of an
    /// express message wait here for theirs, from the loop's slots or the
    /// express reserve; those of a bulk or due message wait for the loop's
    /// slots off the loop, holding `others` (see [`ExpressFirst`]): a flood
    /// holding every slot must not keep the loop from the express lane's
    /// next message. Shutdown while they wait hands back those not started
    /// (and, in the loop, stops it).
    async fn dispatch_message(
        &self,
        message: queue::QueueMessage,
        permit: tokio::sync::OwnedSemaphorePermit,
        (slots, express_first): (&Arc<Semaphore>, &ExpressFirst),
        shutdown: &CancellationToken,
        lanes: &Arc<Lanes>,
        in_flight: &MessageTasks,
    ) -> Flow {
        let tasks = match queue::decode_tasks(&message.body) {
            Ok(tasks) if !tasks.is_empty() => tasks,
            Ok(_) => {
                let _ = message.ack().await;
                return Flow::Continue;
            }
            Err(error) => {
                // Nothing can be done with it; the deliveries it was for, if
                // any, are still pending in the database and the reconciler
                // finds them.
                tracing::error!(error = %error, "undecodable delivery task dropped");
                let _ = message.ack().await;
                return Flow::Continue;
            }
        };
        let express = message.lane() == Lane::Express;
        // A message may carry an event's first attempts: each task takes a
        // slot of its own.
        let receipts = Receipt::split(message, tasks.len());
        let mut later = tasks
            .into_iter()
            .zip(receipts)
            .map(|(task, receipt)| Taken { task, receipt })
            .peekable();
        let first = later.next().expect("a message with tasks has a first");
        self.dispatch(first, permit, lanes, in_flight);
        if later.peek().is_none() {
            return Flow::Continue;
        }
        // The loop took this message while `others` was free, and only the
        // loop takes it: it is free now.
        if !express && let Ok(others) = express_first.others.clone().try_acquire_owned() {
            let (worker, slots, shutdown) = (self.clone(), slots.clone(), shutdown.clone());
            let (lanes, tracker, later): (_, _, Vec<Taken>) = (lanes.clone(), in_flight.clone(), later.collect());
            in_flight.spawn(async move {
                worker
                    .dispatch_later(later, (&slots, None), &shutdown, &lanes, &tracker)
                    .await;
                drop(others);
            });
            return Flow::Continue;
        }
        let reserve = express.then_some(&express_first.reserve);
        self.dispatch_later(later, (slots, reserve), shutdown, lanes, in_flight)
            .await
    }

    /// Hands each of `later` to [`Worker::dispatch`] as a slot comes free,
    /// one of `slots` or of the `reserve`; once shutdown comes, hands back
    /// those not started and answers [`Flow::Stop`].
    async fn dispatch_later(
        &self,
        later: impl IntoIterator<Item = Taken>,
        (slots, reserve): (&Arc<Semaphore>, Option<&Arc<Semaphore>>),
        shutdown: &CancellationToken,
        lanes: &Arc<Lanes>,
        in_flight: &MessageTasks,
    ) -> Flow {
        let mut flow = Flow::Continue;
        for taken in later {
            if flow == Flow::Stop {
                let _ = taken.receipt.requeue().await;
                continue;
            }
            let permit = tokio::select! {
                biased;
                () = shutdown.cancelled() => {
                    flow = Flow::Stop;
                    let _ = taken.receipt.requeue().await;
                    continue;
                }
                permit = slots.clone().acquire_owned() => permit,
                permit = async {
                    match reserve {
                        Some(reserve) => reserve.clone().acquire_owned().await,
                        None => std::future::pending().await,
                    }
                } => permit,
            };
            self.dispatch(taken, permit.expect("the semaphore is never closed"), lanes, in_flight);
        }
        flow
    }

    /// Runs a task now, lines it up behind its webhook's running attempts, or
    /// holds it back (see [`admission`]).
    fn dispatch(
        &self,
        taken: Taken,
        permit: tokio::sync::OwnedSemaphorePermit,
        lanes: &Arc<Lanes>,
        in_flight: &MessageTasks,
    ) {
        match lanes.admit(taken, std::time::Instant::now()) {
            Admission::Run(taken) => self.run_in_line(taken, permit, lanes, in_flight),
            Admission::Waiting => drop(permit),
            Admission::Full(taken, attempt) => {
                drop(permit);
                let worker = self.clone();
                let delay = admission::hold_back_for(attempt, self.request_timeout);
                in_flight.spawn(async move { worker.hold_back(taken, delay).await });
            }
        }
    }

    /// Runs an admitted task, on the runtime of its lane, then the tasks
    /// waiting for the same webhook that its slot passes to: while they are
    /// of a lane of the same runtime, in the same task; the first that is
    /// not starts over on its own runtime (with the slot), so an express
    /// attempt never runs on the bulk runtime's threads nor a bulk one on
    /// the others'.
    fn run_in_line(
        &self,
        taken: Taken,
        permit: tokio::sync::OwnedSemaphorePermit,
        lanes: &Arc<Lanes>,
        in_flight: &MessageTasks,
    ) {
        let on_bulk = self.runs_on_bulk_runtime(taken.receipt.lane());
        let (worker, lanes, tracker) = (self.clone(), lanes.clone(), in_flight.clone());
        let running = async move {
            let mut next = Some(taken);
            while let Some(taken) = next.take() {
                let webhook = taken.task.webhook_id();
                let started = std::time::Instant::now();
                worker.handle(taken).await;
                match lanes.finish(webhook, started.elapsed()) {
                    Some(following) if worker.runs_on_bulk_runtime(following.receipt.lane()) != on_bulk => {
                        return worker.run_in_line(following, permit, &lanes, &tracker);
                    }
                    following => next = following,
                }
            }
            drop(permit);
        };
        // Named, not the current one: a task handed over from the bulk
        // runtime is started from there.
        let runtime = match (&self.bulk_runtime, on_bulk) {
            (Some(bulk), true) => bulk,
            _ => &self.runtime,
        };
        in_flight.spawn_on(running, runtime);
    }

    /// Whether a task of `lane` runs on the bulk runtime: a bulk task, if
    /// the worker has one.
    fn runs_on_bulk_runtime(&self, lane: Lane) -> bool {
        lane == Lane::Bulk && self.bulk_runtime.is_some()
    }

    /// A task whose webhook has every slot busy while the lines are full: it
    /// goes back to the queue for `delay` (see [`admission::hold_back_for`]),
    /// and the delivery is postponed to match, so the reconciler does not
    /// count it as lost.
    async fn hold_back(&self, taken: Taken, delay: Duration) {
        let span = task_span(&taken.task, &taken.receipt);
        span.record("aegis.delivery.outcome", "held_back");
        self.hold_back_in_span(taken, delay).instrument(span).await
    }

    async fn hold_back_in_span(&self, taken: Taken, delay: Duration) {
        let Taken { task, receipt } = taken;
        let until = Utc::now() + delay;
        if let Err(error) = deliveries::postpone(&self.db, task.delivery_id(), task.attempt(), until, Utc::now()).await
        {
            // Nothing written: the task goes back as it is.
            tracing::error!(
                error = format!("{error:#}"),
                "failed to hold back a task; requeueing it"
            );
            tokio::time::sleep(ERROR_PAUSE).await;
            let _ = receipt.requeue().await;
            return;
        }
        let _ =
            queue::publish_after_commit(Writer::Worker, "a held-back task", self.queue.publish_task(task, delay)).await;
        if let Err(error) = receipt.ack().await {
            tracing::error!(error = %error, "failed to ack a held-back task");
        }
    }

    async fn handle(&self, taken: Taken) {
        let span = task_span(&taken.task, &taken.receipt);
        self.process_and_settle(taken).instrument(span).await
    }

    /// Makes the attempt, then acks the task, or hands it back after an
    /// infrastructure failure.
    async fn process_and_settle(&self, taken: Taken) {
        let Taken { task, receipt } = taken;
        let processed = self.process_from(task, receipt.lane()).await;
        let span = tracing::Span::current();
        match &processed {
            Ok(outcome @ Outcome::Failed { .. }) => span
                .record("aegis.delivery.outcome", outcome.label())
                .record("otel.status_code", "error"),
            Ok(outcome) => span.record("aegis.delivery.outcome", outcome.label()),
            Err(_) => span
                .record("aegis.delivery.outcome", "error")
                .record("otel.status_code", "error"),
        };
        match processed {
            Ok(_) => {
                if let Err(error) = receipt.ack().instrument(tracing::info_span!("ack")).await {
                    tracing::error!(error = %error, "failed to ack a task");
                }
            }
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), delivery_id = %task.delivery_id(), "attempt not made; the task will be retried");
                tokio::time::sleep(ERROR_PAUSE).await;
                if let Err(error) = receipt.requeue().await {
                    tracing::error!(error = %error, "failed to requeue a task");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> chrono::DateTime<Utc> {
        chrono::DateTime::parse_from_rfc3339(text)
            .expect("valid")
            .with_timezone(&Utc)
    }

    #[test]
    fn a_task_whose_attempt_is_held_or_not_due_waits_and_any_other_is_stale() {
        let now = at("2026-12-05T12:00:00Z");
        let pending = |attempts, due: &str, claimed_until: Option<&str>| deliveries::Delivery {
            id: DeliveryId::generate(),
            tenant_id: aegis_webhook_core::ids::TenantId::generate(),
            webhook_id: aegis_webhook_core::ids::WebhookId::generate(),
            event_id: aegis_webhook_core::ids::EventId::generate(),
            event_type: aegis_webhook_core::event::EventType::PoamOverdue,
            status: deliveries::DeliveryStatus::Pending,
            attempts,
            next_attempt_at: Some(at(due)),
            locked_until: claimed_until.map(at),
            last_status_code: None,
            failure_reason: None,
            created_at: now,
        };
        let of = |delivery: &deliveries::Delivery, attempt| Unclaimed::of(Some(delivery), attempt, now);
        let secs = Duration::from_secs;
        // Early: back when due.
        let early = pending(1, "2026-12-05T12:00:30Z", None);
        assert_eq!(of(&early, 2), Unclaimed::Wait(secs(30)));
        // Held by a claim (its worker may have failed to record): back just
        // after the claim ends, or when due if that is later.
        let held = pending(0, "2026-12-05T11:59:00Z", Some("2026-12-05T12:00:40Z"));
        assert_eq!(of(&held, 1), Unclaimed::Wait(secs(40) + Unclaimed::AFTER_CLAIM));
        let held_early = pending(1, "2026-12-05T12:01:00Z", Some("2026-12-05T12:00:40Z"));
        assert_eq!(of(&held_early, 2), Unclaimed::Wait(secs(60)));
        // A claim that has ended holds nothing.
        let lapsed = pending(0, "2026-12-05T11:59:00Z", Some("2026-12-05T11:59:59Z"));
        assert_eq!(of(&lapsed, 1), Unclaimed::Wait(Duration::ZERO));
        // Another attempt, a finished delivery, none, or no due time: stale.
        assert_eq!(of(&held, 2), Unclaimed::Stale);
        assert_eq!(of(&early, 1), Unclaimed::Stale);
        let finished = deliveries::Delivery {
            status: deliveries::DeliveryStatus::Succeeded,
            ..held.clone()
        };
        assert_eq!(of(&finished, 1), Unclaimed::Stale);
        assert_eq!(Unclaimed::of(None, 1, now), Unclaimed::Stale);
        let undated = deliveries::Delivery {
            next_attempt_at: None,
            ..held
        };
        assert_eq!(of(&undated, 1), Unclaimed::Stale);
    }

    #[test]
    fn each_decision_has_one_set_of_consequences() {
        let delivered = Consequences::of(&Decision::Delivered, true);
        assert_eq!(delivered.next, NextStep::Succeeded);
        assert_eq!(delivered.health, store::Health::Succeeded { had_streak: true });
        assert_eq!(delivered.outcome, Outcome::Delivered);
        assert_eq!(delivered.metric, AttemptOutcome::Success);
        assert_eq!(
            Consequences::of(&Decision::Delivered, false).health,
            store::Health::Succeeded { had_streak: false },
            "a healthy webhook has nothing to write"
        );

        let due = at("2026-12-01T10:00:05Z");
        let retry = Decision::Retry {
            next_attempt: 2,
            delay: Duration::from_secs(5),
            at: due,
        };
        assert_eq!(
            Consequences::of(&retry, true),
            Consequences {
                next: NextStep::RetryAt(due),
                health: store::Health::Unchanged,
                outcome: Outcome::RetryScheduled {
                    next_attempt: 2,
                    delay: Duration::from_secs(5)
                },
                metric: AttemptOutcome::Retry,
            },
            "a retry leaves the streak alone: the delivery has not failed yet"
        );

        let exhausted = Decision::Exhausted {
            reason: "all 3 attempts failed".to_owned(),
        };
        assert_eq!(
            Consequences::of(&exhausted, false),
            Consequences {
                next: NextStep::Failed("all 3 attempts failed".to_owned()),
                health: store::Health::Failed,
                outcome: Outcome::Failed {
                    reason: "all 3 attempts failed".to_owned()
                },
                metric: AttemptOutcome::Failed,
            }
        );

        let gone = Decision::Gone {
            reason: "410".to_owned(),
        };
        assert_eq!(
            Consequences::of(&gone, false),
            Consequences {
                next: NextStep::Failed("410".to_owned()),
                health: store::Health::Gone {
                    reason: "410".to_owned()
                },
                outcome: Outcome::Failed {
                    reason: "410".to_owned()
                },
                metric: AttemptOutcome::Gone,
            }
        );
    }
}
