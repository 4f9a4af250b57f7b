//! Publishing the run's events the two ways upstream scanners do: to the
//! events exchange over AMQP (persistent, publisher confirms, many publishes
//! in flight), or to `POST /v1/events` with the ingest token from several
//! concurrent clients. Each event's publish time is recorded just before it is
//! handed over. Publishing ends after the last event, or earlier when `stop`
//! is cancelled (the noisy scenario's tenant B publishes until tenant A is
//! done); the events handed over by then are still confirmed or answered.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use futures::StreamExt as _;
use futures::stream::FuturesUnordered;
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::events::{EVENT_NAME, Events};
use crate::options::Pace;

/// What became of the published events.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Published {
    /// Events given to the broker or the intake (set by the caller).
    pub handed_over: u64,
    /// Whether publishing ran to its end, or to `stop` (it stops early when a
    /// run does).
    pub finished: bool,
    /// Confirmed by the broker, or answered 202 by the intake.
    pub accepted: u64,
    pub failed: u64,
    /// The first failure, to say what went wrong.
    pub first_error: Option<String>,
    /// For each accepted event, from handing it over to the broker's confirm
    /// or the intake's 202, in microseconds (reported as percentiles).
    #[serde(skip)]
    pub acceptance_us: Vec<u64>,
}

impl Published {
    fn fail(&mut self, error: impl FnOnce() -> String) {
        self.failed += 1;
        if self.first_error.is_none() {
            self.first_error = Some(error());
        }
    }

    fn accept(&mut self, since: Instant) {
        self.accepted += 1;
        self.acceptance_us
            .push(u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX));
    }

    /// Adds another part's acceptances and failures to this one's (not
    /// `handed_over` or `finished`, which the caller knows).
    pub fn merge(&mut self, other: Published) {
        self.acceptance_us.extend(other.acceptance_us);
        self.accepted += other.accepted;
        self.failed += other.failed;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn confirmation(&mut self, (result, since): (lapin::Result<Confirmation>, Instant)) {
        match result {
            Ok(Confirmation::Ack(None)) => self.accept(since),
            Ok(Confirmation::Ack(Some(_))) => self.fail(|| "RabbitMQ could not route an event (no queue bound)".into()),
            Ok(Confirmation::Nack(_)) => self.fail(|| "RabbitMQ refused an event (nack)".into()),
            Ok(Confirmation::NotRequested) => self.fail(|| "publisher confirms are off".into()),
            Err(error) => self.fail(|| format!("publish failed: {error}")),
        }
    }
}

/// Publishes every event (until `stop`) to `exchange` with the event name as
/// routing key, keeping up to `in_flight` publishes unconfirmed.
pub async fn via_amqp(
    channel: Channel,
    exchange: String,
    events: Arc<Events>,
    tenant_id: Uuid,
    pace: Pace,
    in_flight: usize,
    stop: CancellationToken,
) -> Published {
    let mut outcome = Published {
        finished: true,
        ..Published::default()
    };
    let mut unconfirmed = FuturesUnordered::new();
    let options = BasicPublishOptions {
        // Unroutable events come back as failures instead of vanishing.
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into());
    let start = Instant::now();
    'publishing: for index in 0..events.len() {
        let due = start + pace.offset(index);
        // Take in confirms while waiting for the event's time (steady) or for
        // room in the window (burst).
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break 'publishing,
                Some(result) = unconfirmed.next(), if !unconfirmed.is_empty() => outcome.confirmation(result),
                () = tokio::time::sleep_until(due), if unconfirmed.len() < in_flight => break,
            }
        }
        let body = events.envelope(index, tenant_id);
        events.mark_published(index);
        match channel
            .basic_publish(
                exchange.as_str().into(),
                EVENT_NAME.into(),
                options,
                &body,
                properties.clone(),
            )
            .await
        {
            Ok(confirm) => {
                let handed_over = Instant::now();
                unconfirmed.push(async move { (confirm.await, handed_over) });
            }
            Err(error) => {
                // The channel is gone: the rest cannot be published either.
                let left = u64::from(events.len() - index);
                outcome.fail(|| format!("publish failed: {error}"));
                outcome.failed += left - 1;
                break;
            }
        }
    }
    while let Some(result) = unconfirmed.next().await {
        outcome.confirmation(result);
    }
    outcome
}

/// Where and how events are posted with `--via http`.
#[derive(Debug, Clone)]
pub struct Intake {
    /// One per publisher, so tenants do not share connections.
    pub client: reqwest::Client,
    /// `…/v1/events`.
    pub url: String,
    pub ingest_token: String,
}

/// POSTs every event (until `stop`) to the intake from `clients` concurrent
/// clients.
pub async fn via_http(
    intake: Intake,
    events: Arc<Events>,
    tenant_id: Uuid,
    pace: Pace,
    clients: usize,
    stop: CancellationToken,
) -> Published {
    let next = Arc::new(AtomicU32::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let (client, url, token, events, next, stop) = (
            intake.client.clone(),
            intake.url.clone(),
            intake.ingest_token.clone(),
            events.clone(),
            next.clone(),
            stop.clone(),
        );
        tasks.spawn(async move {
            let mut outcome = Published::default();
            loop {
                if stop.is_cancelled() {
                    return outcome;
                }
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= events.len() {
                    return outcome;
                }
                tokio::select! {
                    biased;
                    // Event `index` is never handed over.
                    () = stop.cancelled() => return outcome,
                    () = tokio::time::sleep_until(start + pace.offset(index)) => {}
                }
                let body = events.envelope(index, tenant_id);
                events.mark_published(index);
                let handed_over = Instant::now();
                let response = client
                    .post(&url)
                    .bearer_auth(&token)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body)
                    .send()
                    .await;
                match response {
                    Ok(response) if response.status() == reqwest::StatusCode::ACCEPTED => outcome.accept(handed_over),
                    Ok(response) => {
                        let status = response.status();
                        let text = response.text().await.unwrap_or_default();
                        outcome.fail(|| format!("the intake answered {status}: {text}"));
                    }
                    Err(error) => outcome.fail(|| format!("the intake is unreachable: {error}")),
                }
            }
        });
    }
    let mut outcome = Published {
        finished: true,
        ..Published::default()
    };
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(part) => outcome.merge(part),
            Err(error) => outcome.fail(|| format!("a publishing task failed: {error}")),
        }
    }
    outcome
}
