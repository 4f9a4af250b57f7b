//! The metrics every process exports on `GET /metrics`: their names, labels and
//! help texts in one place, and one function per thing that happens, so that
//! the code says `metrics::delivery_attempt(..)` and docs/operations.md can list
//! exactly what is here.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::event::EventType;

pub const EVENTS_INGESTED: &str = "aegis_events_ingested_total";
pub const EVENTS_INVALID: &str = "aegis_events_invalid_total";
pub const DELIVERY_ATTEMPTS: &str = "aegis_delivery_attempts_total";
pub const DELIVERIES_COMPLETED: &str = "aegis_deliveries_completed_total";
pub const ATTEMPT_DURATION: &str = "aegis_delivery_attempt_duration_seconds";
pub const EVENT_DELIVERY_LAG: &str = "aegis_event_delivery_lag_seconds";
pub const DELIVERIES_IN_FLIGHT: &str = "aegis_deliveries_in_flight";
pub const RETRIES_SCHEDULED: &str = "aegis_retries_scheduled_total";
pub const DEAD_LETTERED: &str = "aegis_deliveries_dead_lettered_total";
pub const WEBHOOKS_AUTO_DISABLED: &str = "aegis_webhooks_auto_disabled_total";
pub const WEBHOOKS_REENABLED: &str = "aegis_webhooks_reenabled_total";
pub const QUEUE_CONSUMER_UP: &str = "aegis_queue_consumer_up";
pub const PUBLISHES_LEFT_TO_RECONCILER: &str = "aegis_publishes_left_to_reconciler_total";
pub const LANE_ENQUEUED: &str = "aegis_lane_enqueued_total";
pub const LANE_TAKEN: &str = "aegis_lane_taken_total";
pub const LANE_WAIT: &str = "aegis_lane_wait_seconds";
pub const LANE_DEPTH: &str = "aegis_lane_depth";
pub const EXPIRED: &str = "aegis_expired_total";
pub const EXPIRY_PASS_DURATION: &str = "aegis_expiry_pass_seconds";

/// Every metric with its help text, for the exporter and for the docs test.
pub const CATALOGUE: [(&str, &str); 19] = [
    (EVENTS_INGESTED, "Valid events accepted by the ingester, by event_type."),
    (EVENTS_INVALID, "Events refused by the ingester, by reason."),
    (
        DELIVERY_ATTEMPTS,
        "HTTP delivery attempts, by outcome: success, retry, failed, gone.",
    ),
    (
        DELIVERIES_COMPLETED,
        "Deliveries that reached a final status, by status: succeeded, failed.",
    ),
    (ATTEMPT_DURATION, "Duration of one HTTP delivery attempt, in seconds."),
    (
        EVENT_DELIVERY_LAG,
        "From the event's acceptance to the receiver's 2xx, in seconds.",
    ),
    (
        DELIVERIES_IN_FLIGHT,
        "HTTP delivery attempts in progress in this process.",
    ),
    (
        RETRIES_SCHEDULED,
        "Retries scheduled, by tier (the retry's attempt number).",
    ),
    (DEAD_LETTERED, "Deliveries that failed for good and were dead-lettered."),
    (
        WEBHOOKS_AUTO_DISABLED,
        "Webhooks disabled by the system, by reason: gone, failing.",
    ),
    (WEBHOOKS_REENABLED, "Disabled webhooks turned back on through the API."),
    (
        QUEUE_CONSUMER_UP,
        "1 while this process consumes its queue (by queue: events, tasks), else 0.",
    ),
    (
        PUBLISHES_LEFT_TO_RECONCILER,
        "Publishes that failed after their database commit, left to the reconciler, by writer: api, ingester, worker, reconciler.",
    ),
    (
        LANE_ENQUEUED,
        "What the ingester's fairness decision put in each lane, by stream and lane: events (stream events) and deliveries (stream tasks).",
    ),
    (
        LANE_TAKEN,
        "Messages this process's consumers took, by stream (events, tasks) and lane (express, bulk, due).",
    ),
    (
        LANE_WAIT,
        "How long the message this process last took from a lane had waited since it was due, in seconds: the age of the lane's head, by stream and lane.",
    ),
    (
        LANE_DEPTH,
        "Messages waiting in a lane that no consumer holds yet, by stream and lane; read from the broker every 10 s.",
    ),
    (
        EXPIRED,
        "What expiry removed past its retention, by kind: deliveries (rows deleted), events, bodies (events whose payload and responses were dropped), partitions (dropped whole).",
    ),
    (
        EXPIRY_PASS_DURATION,
        "How long this process's last expiry pass took, in seconds.",
    ),
];

/// Latency buckets, in seconds: from a loopback receiver's sub-millisecond
/// answer to the request timeout.
const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 30.0, 60.0,
];

/// Installs the process-wide recorder once and returns the handle that renders
/// it. Later calls (tests start several systems in one process) share it.
pub fn install() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &LATENCY_BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics shows only what it records");
        }
        for (name, help) in CATALOGUE {
            if name.ends_with("_seconds") {
                describe_histogram!(name, help);
            } else if name.ends_with("_total") {
                describe_counter!(name, help);
            } else {
                describe_gauge!(name, help);
            }
        }
        handle
    })
}

/// The Prometheus text exposition of everything recorded in this process.
pub fn render() -> String {
    let handle = install();
    handle.run_upkeep();
    handle.render()
}

pub fn event_ingested(event_type: EventType) {
    counter!(EVENTS_INGESTED, "event_type" => event_type.as_str()).increment(1);
}

/// `reason` is a short class (`malformed`, `invalid`), not the detailed message,
/// so that the label's values stay few.
pub fn event_invalid(reason: &'static str) {
    counter!(EVENTS_INVALID, "reason" => reason).increment(1);
}

/// The outcome class of one attempt, as labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    Success,
    Retry,
    Failed,
    Gone,
}

impl AttemptOutcome {
    fn label(self) -> &'static str {
        match self {
            AttemptOutcome::Success => "success",
            AttemptOutcome::Retry => "retry",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::Gone => "gone",
        }
    }
}

pub fn delivery_attempt(outcome: AttemptOutcome, duration: Duration) {
    counter!(DELIVERY_ATTEMPTS, "outcome" => outcome.label()).increment(1);
    histogram!(ATTEMPT_DURATION).record(duration.as_secs_f64());
    match outcome {
        AttemptOutcome::Success => counter!(DELIVERIES_COMPLETED, "status" => "succeeded").increment(1),
        AttemptOutcome::Failed | AttemptOutcome::Gone => {
            counter!(DELIVERIES_COMPLETED, "status" => "failed").increment(1);
            counter!(DEAD_LETTERED).increment(1);
        }
        AttemptOutcome::Retry => {}
    }
}

pub fn event_delivered_after(lag: Duration) {
    histogram!(EVENT_DELIVERY_LAG).record(lag.as_secs_f64());
}

pub fn retry_scheduled(next_attempt: u32) {
    counter!(RETRIES_SCHEDULED, "tier" => next_attempt.to_string()).increment(1);
}

/// `reason`: `gone` (410) or `failing` (the failure streak).
pub fn webhook_auto_disabled(reason: &'static str) {
    counter!(WEBHOOKS_AUTO_DISABLED, "reason" => reason).increment(1);
}

pub fn webhook_reenabled() {
    counter!(WEBHOOKS_REENABLED).increment(1);
}

/// A publish failed after its commit; `writer` names the role that wrote.
pub fn publish_left_to_reconciler(writer: &'static str) {
    counter!(PUBLISHES_LEFT_TO_RECONCILER, "writer" => writer).increment(1);
}

/// Counts attempts in flight for as long as it lives.
pub struct InFlight(());

impl InFlight {
    pub fn start() -> Self {
        gauge!(DELIVERIES_IN_FLIGHT).increment(1.0);
        InFlight(())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        gauge!(DELIVERIES_IN_FLIGHT).decrement(1.0);
    }
}

/// The fairness decision put `count` items (events or deliveries) in `lane`.
pub fn lane_enqueued(stream: crate::queue::Stream, lane: crate::queue::Lane, count: usize) {
    counter!(LANE_ENQUEUED, "stream" => stream.as_str(), "lane" => lane.as_str()).increment(count as u64);
}

/// A consumer took a message from `lane`, which had waited `waited` (if known).
pub fn lane_taken(stream: crate::queue::Stream, lane: crate::queue::Lane, waited: Option<Duration>) {
    counter!(LANE_TAKEN, "stream" => stream.as_str(), "lane" => lane.as_str()).increment(1);
    if let Some(waited) = waited {
        gauge!(LANE_WAIT, "stream" => stream.as_str(), "lane" => lane.as_str()).set(waited.as_secs_f64());
    }
}

/// `depth` messages wait in `lane`.
pub fn lane_depth(stream: crate::queue::Stream, lane: crate::queue::Lane, depth: u64) {
    gauge!(LANE_DEPTH, "stream" => stream.as_str(), "lane" => lane.as_str()).set(depth as f64);
}

/// `queue`: `events` or `tasks`.
pub fn consumer_up(queue: &'static str, up: bool) {
    gauge!(QUEUE_CONSUMER_UP, "queue" => queue).set(if up { 1.0 } else { 0.0 });
}

/// Expiry removed `count` of `kind` (`deliveries`, `events`, `bodies`, `partitions`).
pub fn expired(kind: &'static str, count: u64) {
    if count > 0 {
        counter!(EXPIRED, "kind" => kind).increment(count);
    }
}

/// An expiry pass took `took`.
pub fn expiry_pass(took: Duration) {
    gauge!(EXPIRY_PASS_DURATION).set(took.as_secs_f64());
}
