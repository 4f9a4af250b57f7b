//! The ingester: takes upstream envelopes off the events stream, validates them,
//! fans each out to the subscribed webhooks in one database transaction, then
//! publishes the delivery tasks and only then acknowledges the envelope.
//!
//! An envelope that fails validation is parked on the invalid-events queue with
//! its reason and acknowledged; the consumer carries on.
//!
//! Each envelope is an `ingest` span, the child of the publisher's span when the
//! message carries a trace context; the tasks published in it carry the trace
//! on to the workers.

mod fanout;

use std::sync::Arc;
use std::time::Duration;

use aegis_webhook_core::db::{deliveries, events, tenants, webhooks};
use aegis_webhook_core::event::{EnvelopeError, ValidatedEvent};
use aegis_webhook_core::metrics;
use aegis_webhook_core::queue::{DeliveryTask, Queue, QueueMessage, Stream};
use aegis_webhook_core::telemetry;
use anyhow::Context as _;
use chrono::Utc;
use sea_orm::{DatabaseConnection, TransactionTrait};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing::field::{Empty, display};
use uuid::Uuid;

pub use fanout::plan_deliveries;

/// How long the loop keeps draining after shutdown is requested, waiting for
/// messages that are already on their way.
const DRAIN_IDLE: Duration = Duration::from_millis(200);
/// Pause after an infrastructure error before the message is handed back.
const ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Set (to anything) to make the ingester abort right after a fan-out commits
/// and before its tasks are published: the window the reconciler covers, which
/// the fault tests force open with it.
pub const CRASH_AFTER_COMMIT_ENV: &str = "AEGIS_TEST_CRASH_AFTER_FANOUT_COMMIT";

#[derive(Clone)]
pub struct Ingester {
    db: DatabaseConnection,
    queue: Arc<dyn Queue>,
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
    /// Stored, with this many deliveries published.
    FannedOut { event_id: Uuid, deliveries: usize },
    /// The tenant already had an event with this id: nothing new to do.
    Duplicate { event_id: Uuid },
    /// Refused and parked on the invalid-events queue with this reason.
    Invalid { reason: String },
}

impl Ingester {
    pub fn new(db: DatabaseConnection, queue: Arc<dyn Queue>) -> Self {
        Ingester {
            db,
            queue,
            crash_after_commit: std::env::var_os(CRASH_AFTER_COMMIT_ENV).is_some(),
        }
    }

    /// Handles one envelope end to end. An `Err` is an infrastructure failure
    /// (database or broker): the envelope must be retried, not dropped.
    pub async fn ingest(&self, body: &[u8]) -> anyhow::Result<IngestOutcome> {
        let event = match ValidatedEvent::parse(body, Utc::now()) {
            Ok(event) => event,
            Err(error) => {
                let class = match error {
                    EnvelopeError::Malformed(_) => "malformed",
                    EnvelopeError::Invalid(_) => "invalid",
                };
                return self.refuse(body, class, error.to_string()).await;
            }
        };
        // The `ingest` span's fields, when there is one.
        let span = tracing::Span::current();
        span.record("aegis.event.id", display(event.id));
        span.record("aegis.event.type", event.event_type.as_str());
        span.record("aegis.tenant.id", display(event.tenant_id));
        if tenants::tenant_by_id(&self.db, event.tenant_id).await?.is_none() {
            let reason = format!("tenantId: no tenant with id {}", event.tenant_id);
            return self.refuse(body, "unknown_tenant", reason).await;
        }

        let transaction = self.db.begin().await.context("failed to begin the fan-out")?;
        let Some(event_row) = events::insert_event(&transaction, &event).await? else {
            transaction.rollback().await.context("failed to end the fan-out")?;
            tracing::debug!(event_id = %event.id, "duplicate event ignored");
            return Ok(IngestOutcome::Duplicate { event_id: event.id });
        };
        let subscriptions = webhooks::active_subscriptions(&transaction, event.tenant_id).await?;
        let planned = plan_deliveries(&event, &subscriptions);
        let ids = deliveries::insert_pending(&transaction, event.tenant_id, event_row, &planned, Utc::now()).await?;
        transaction.commit().await.context("failed to commit the fan-out")?;
        if self.crash_after_commit && !ids.is_empty() {
            tracing::error!("{CRASH_AFTER_COMMIT_ENV} is set: aborting between commit and publish");
            std::process::abort();
        }

        // The deliveries are safe in the database; if publishing fails from here,
        // the reconciler publishes them later. All at once: the broker confirms
        // a pipeline of publishes about as fast as one (one fsync for many).
        let publishes = ids.iter().zip(&planned).map(|(id, planned)| {
            self.queue
                .publish_task(DeliveryTask::new(*id, planned.webhook_id, 1), Duration::ZERO)
        });
        futures::future::try_join_all(publishes)
            .await
            .context("failed to publish a delivery task")?;
        metrics::event_ingested(event.event_type);
        tracing::info!(event_id = %event.id, event = %event.event_type, deliveries = ids.len(), "event fanned out");
        Ok(IngestOutcome::FannedOut {
            event_id: event.id,
            deliveries: ids.len(),
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
    /// what is already arriving and returns.
    pub async fn run(self, shutdown: CancellationToken, concurrency: usize) -> anyhow::Result<()> {
        let mut consumer = self.queue.consume(Stream::Events).await?;
        metrics::consumer_up("events", true);
        let slots = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
        let in_progress = tokio_util::task::TaskTracker::new();
        loop {
            let permit = slots
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let next = if shutdown.is_cancelled() {
                match tokio::time::timeout(DRAIN_IDLE, consumer.next()).await {
                    Ok(next) => next,
                    Err(_idle) => break,
                }
            } else {
                tokio::select! {
                    next = consumer.next() => next,
                    () = shutdown.cancelled() => continue,
                }
            };
            match next {
                None => break,
                Some(Err(error)) => {
                    tracing::error!(error = %error, "events consumer failed");
                    metrics::consumer_up("events", false);
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
                Some(Ok(message)) => {
                    metrics::consumer_up("events", true);
                    let ingester = self.clone();
                    in_progress.spawn(async move {
                        ingester.handle(message).await;
                        drop(permit);
                    });
                }
            }
        }
        in_progress.close();
        in_progress.wait().await;
        metrics::consumer_up("events", false);
        tracing::info!("ingester stopped");
        Ok(())
    }

    async fn handle(&self, message: QueueMessage) {
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
        self.ingest_and_settle(message).instrument(span).await;
    }

    /// Ingests a message, then acks it, or hands it back after a failure.
    async fn ingest_and_settle(&self, message: QueueMessage) {
        let ingested = self.ingest(&message.body).await;
        let span = tracing::Span::current();
        match &ingested {
            Ok(IngestOutcome::FannedOut { deliveries, .. }) => {
                span.record("aegis.ingest.outcome", "fanned_out");
                span.record("aegis.deliveries", *deliveries);
            }
            Ok(IngestOutcome::Duplicate { .. }) => {
                span.record("aegis.ingest.outcome", "duplicate");
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
            Ok(_) => {
                if let Err(error) = message.ack().await {
                    tracing::error!(error = %error, "failed to ack an event");
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
