//! `--breakdown`: where one event's time goes, step by step.
//!
//! The run starts an OTLP/HTTP collector of its own on loopback (`POST
//! /v1/traces`, protobuf, decoded with the exporter's own types) and points
//! every process at it (`AEGIS_OTLP_ENDPOINT`). Each event is one trace: the
//! ingester's `ingest` span (with its `fan_out`, `publish_tasks` and `ack`
//! children) and the worker's `deliver` span (with `claim`, `prepare`,
//! `http.request`, `record` and `ack`). After the run the spans are grouped by
//! trace and each first attempt's path is cut into consecutive segments, from
//! the benchmark's own publish to the receiver's receipt, so the segments of
//! one event add up to its end-to-end latency; the steps off that path (the
//! tasks' confirm, recording, acks) are reported beside it.
//!
//! Times are wall-clock (every process is on this machine, on one clock):
//! the spans' own, and the benchmark's publish and receipt times converted
//! from its monotonic clock once ([`Events::unix_nanos`]).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use prost::Message as _;
use serde::Serialize;
use tokio::net::TcpListener;
use uuid::Uuid;

use crate::events::Events;

/// The settings every process gets with `--breakdown`, besides the endpoint:
/// export often and keep every span (the SDK's queue holds 2,048 by default,
/// and drops what does not fit; a steady 100 events/s makes about 1,100 a
/// second).
pub const EXPORT_SETTINGS: [(&str, &str); 3] = [
    ("OTEL_BSP_SCHEDULE_DELAY", "250"),
    ("OTEL_BSP_MAX_QUEUE_SIZE", "65536"),
    ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2048"),
];

/// One exported span: what the breakdown needs of it.
#[derive(Debug, Clone)]
pub struct CollectedSpan {
    pub service: String,
    pub name: String,
    pub trace_id: Vec<u8>,
    pub span_id: Vec<u8>,
    pub parent_span_id: Vec<u8>,
    pub start: u64,
    pub end: u64,
    /// `aegis.event.id` (of `ingest`).
    pub event_id: Option<Uuid>,
    /// `aegis.delivery.id` (of `deliver`).
    pub delivery_id: Option<Uuid>,
    /// `aegis.delivery.attempt` (of `deliver`).
    pub attempt: Option<i64>,
    /// `aegis.ingest.outcome` (of `ingest`): `fanned_out`, `deferred` (moved
    /// to the bulk lane), `deferred_batch` (a bulk lane message), ….
    pub outcome: Option<String>,
}

#[derive(Default)]
struct Received {
    spans: Vec<CollectedSpan>,
    /// Requests that could not be decoded.
    refused: u64,
}

/// The collector: runs until the benchmark ends.
pub struct Collector {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
}

impl Collector {
    pub async fn start() -> anyhow::Result<Collector> {
        let received = Arc::new(Mutex::new(Received::default()));
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(export))
            .with_state(received.clone());
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(Collector { addr, received })
    }

    /// The base URL, as `AEGIS_OTLP_ENDPOINT` takes it.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far, and how many requests were refused.
    pub fn take(&self) -> (Vec<CollectedSpan>, u64) {
        let mut received = self.received.lock().unwrap_or_else(PoisonError::into_inner);
        (std::mem::take(&mut received.spans), received.refused)
    }
}

async fn export(State(received): State<Arc<Mutex<Received>>>, body: Bytes) -> Response {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        received.lock().unwrap_or_else(PoisonError::into_inner).refused += 1;
        return StatusCode::BAD_REQUEST.into_response();
    };
    let mut spans = Vec::new();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|resource| &resource.attributes)
            .find(|pair| pair.key == "service.name")
            .and_then(|pair| pair.value.as_ref())
            .map(text)
            .unwrap_or_default();
        for span in resource_spans.scope_spans.into_iter().flat_map(|scope| scope.spans) {
            let attribute = |key: &str| {
                span.attributes
                    .iter()
                    .find(|pair| pair.key == key)
                    .and_then(|pair| pair.value.as_ref())
            };
            let uuid = |key: &str| attribute(key).and_then(|value| text(value).parse::<Uuid>().ok());
            let attempt = attribute("aegis.delivery.attempt").and_then(|value| match value.value {
                Some(any_value::Value::IntValue(number)) => Some(number),
                _ => text(value).parse().ok(),
            });
            spans.push(CollectedSpan {
                service: service.clone(),
                outcome: attribute("aegis.ingest.outcome").map(text),
                event_id: uuid("aegis.event.id"),
                delivery_id: uuid("aegis.delivery.id"),
                attempt,
                trace_id: span.trace_id,
                span_id: span.span_id,
                parent_span_id: span.parent_span_id,
                start: span.start_time_unix_nano,
                end: span.end_time_unix_nano,
                name: span.name,
            });
        }
    }
    received
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .spans
        .extend(spans);
    (
        [(header::CONTENT_TYPE, "application/x-protobuf")],
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
        .into_response()
}

fn text(value: &AnyValue) -> String {
    match &value.value {
        Some(any_value::Value::StringValue(text)) => text.clone(),
        Some(any_value::Value::IntValue(number)) => number.to_string(),
        other => format!("{other:?}"),
    }
}

/// The figures: one row per step, in the order of the path.
#[derive(Debug, Clone, Serialize)]
pub struct Breakdown {
    /// Spans received, and export requests that could not be decoded.
    pub spans: usize,
    /// Spans received by service and name.
    pub spans_by_name: std::collections::BTreeMap<String, usize>,
    pub refused_exports: u64,
    /// Events whose fan-out was traced, and of those, how many had every
    /// point of the path.
    pub traced_events: usize,
    pub complete_paths: usize,
    /// Of the complete paths, those fanned out straight from the express
    /// lane (the rows below are theirs); the others were first moved to the
    /// bulk lane by the fair share (their tenant beyond its event rate).
    pub express_paths: usize,
    /// Consecutive segments from publish to receipt, express events: they
    /// add up to `end_to_end` for each event.
    pub path: Vec<Step>,
    /// Publish → receipt over the same events.
    pub end_to_end: Option<Figures>,
    /// Steps beside or after the path (their own durations), express events.
    pub beside: Vec<Step>,
    /// Events moved to the bulk lane first: publish → the bulk lane's
    /// `ingest` (express ingest, deferral, second broker hop), and publish → receipt.
    pub deferred_to_ingest: Option<Figures>,
    pub deferred_end_to_end: Option<Figures>,
    /// Every complete path, publish → receipt, whatever its lane.
    pub all_end_to_end: Option<Figures>,
    /// The slowest express paths, slowest first: where a tail's time went,
    /// which the percentiles of each step (over different events) cannot say.
    pub slowest: Vec<SlowPath>,
}

/// How many of the slowest express paths a breakdown lists.
const SLOWEST_PATHS: usize = 10;

/// One event's path, step by step.
#[derive(Debug, Clone, Serialize)]
pub struct SlowPath {
    /// When it was published, in seconds after the first traced event was.
    pub published_s: f64,
    /// Publish → receipt, in milliseconds.
    pub end_to_end_ms: f64,
    /// Each step of [`Breakdown::path`], in milliseconds, in its order.
    pub steps_ms: Vec<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub name: &'static str,
    /// What the step is made of.
    pub what: &'static str,
    pub figures: Option<Figures>,
}

/// Nearest-rank percentiles, in milliseconds.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Figures {
    pub samples: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Figures {
    /// From durations in nanoseconds (negative ones, from clocks read in
    /// different processes, kept as they are).
    fn of(mut nanos: Vec<i64>) -> Option<Figures> {
        if nanos.is_empty() {
            return None;
        }
        nanos.sort_unstable();
        let at = |percent: f64| {
            let rank = ((percent / 100.0) * nanos.len() as f64).ceil() as usize;
            nanos[rank.clamp(1, nanos.len()) - 1] as f64 / 1e6
        };
        Some(Figures {
            samples: nanos.len(),
            p50: at(50.0),
            p90: at(90.0),
            p99: at(99.0),
            max: nanos[nanos.len() - 1] as f64 / 1e6,
        })
    }
}

/// The points of one event's first attempt, in nanoseconds since the Unix
/// epoch.
#[derive(Debug, Default, Clone, Copy)]
struct Points {
    published: Option<u64>,
    ingest_start: Option<u64>,
    fan_out: Option<(u64, u64)>,
    publish_tasks: Option<(u64, u64)>,
    ingest_ack: Option<(u64, u64)>,
    deliver: Option<(u64, u64)>,
    claim: Option<(u64, u64)>,
    prepare: Option<(u64, u64)>,
    http: Option<(u64, u64)>,
    received: Option<u64>,
    record: Option<(u64, u64)>,
    ack: Option<(u64, u64)>,
}

/// A step: its name, what it is made of, and its (start, end) in one event's points.
type Segment = (&'static str, &'static str, fn(&Points) -> Option<(u64, u64)>);

fn start(span: Option<(u64, u64)>) -> Option<u64> {
    span.map(|(start, _)| start)
}

fn end(span: Option<(u64, u64)>) -> Option<u64> {
    span.map(|(_, end)| end)
}

fn between(from: Option<u64>, to: Option<u64>) -> Option<(u64, u64)> {
    Some((from?, to?))
}

const PATH: [Segment; 10] = [
    (
        "publish → ingest",
        "the events queue: broker hop, delivery to the ingester, its wake-up",
        |p| between(p.published, p.ingest_start),
    ),
    (
        "ingest → fan_out",
        "parse and validate the envelope, fair-share lane",
        |p| between(p.ingest_start, start(p.fan_out)),
    ),
    (
        "fan_out",
        "wait for the fan-out batcher, the transaction and its commit",
        |p| p.fan_out,
    ),
    (
        "fan_out → publish_tasks",
        "back from the batcher to the event's task",
        |p| between(end(p.fan_out), start(p.publish_tasks)),
    ),
    (
        "publish_tasks → deliver",
        "the tasks queue: publish, broker hop, delivery to the worker, dispatch",
        |p| between(start(p.publish_tasks), start(p.deliver)),
    ),
    ("deliver → claim", "the `deliver` span opens; the claim starts", |p| {
        between(start(p.deliver), start(p.claim))
    }),
    (
        "claim",
        "wait for the claim batcher, the claiming UPDATE and the webhook and event reads",
        |p| p.claim,
    ),
    (
        "claim → prepare end",
        "sign the request (and the gap before it)",
        |p| between(end(p.claim), end(p.prepare)),
    ),
    (
        "prepare → http.request",
        "into `send`: target checks, the HTTP span opens",
        |p| between(end(p.prepare), start(p.http)),
    ),
    (
        "http.request → receipt",
        "the request on loopback until the receiver's handler runs",
        |p| between(start(p.http), p.received),
    ),
];

const BESIDE: [Segment; 7] = [
    (
        "publish_tasks",
        "the tasks' publish with its confirm (the worker may start before the confirm)",
        |p| p.publish_tasks,
    ),
    ("ack (ingester)", "the envelope's ack, after publish_tasks", |p| {
        p.ingest_ack
    }),
    ("receipt → http.request end", "the answer back to the worker", |p| {
        between(p.received, end(p.http))
    }),
    (
        "record",
        "wait for the record batcher, the transaction and its commit",
        |p| p.record,
    ),
    ("ack (worker)", "settling the task's message", |p| p.ack),
    ("deliver", "the whole `deliver` span", |p| p.deliver),
    (
        "publish → ack (worker)",
        "the event's whole first attempt, settled",
        |p| between(p.published, end(p.ack)),
    ),
];

/// Groups `spans` by trace and cuts each event's first attempt into steps.
/// `receipts`: each verified delivery's id and when it arrived.
pub fn analyse(
    spans: Vec<CollectedSpan>,
    refused_exports: u64,
    events: &Events,
    receipts: &[(Uuid, Instant)],
) -> Breakdown {
    let received: HashMap<Uuid, u64> = receipts
        .iter()
        .map(|(delivery, at)| (*delivery, events.unix_nanos(*at)))
        .collect();
    let count = spans.len();
    let mut spans_by_name = std::collections::BTreeMap::new();
    for span in &spans {
        *spans_by_name
            .entry(format!("{} {}", span.service, span.name))
            .or_insert(0) += 1;
    }
    let mut traces: HashMap<Vec<u8>, Vec<CollectedSpan>> = HashMap::new();
    for span in spans {
        traces.entry(span.trace_id.clone()).or_default().push(span);
    }
    // Whether each path went through the bulk lane first.
    let mut paths: Vec<(Points, bool)> = Vec::new();
    for spans in traces.values() {
        // The `ingest` that fanned the event out: a bulk lane message's
        // carries the id of (one of) its events.
        let Some(ingest) = spans
            .iter()
            .filter(|span| span.name == "ingest" && span.event_id.is_some())
            .filter(|span| matches!(span.outcome.as_deref(), Some("fanned_out" | "deferred_batch")))
            .min_by_key(|span| span.start)
        else {
            continue;
        };
        let bulk = ingest.outcome.as_deref() == Some("deferred_batch");
        // A bulk lane message of several events is one trace of several
        // paths, not told apart here: left out.
        let fan_outs = spans
            .iter()
            .filter(|span| span.name == "fan_out" && span.parent_span_id == ingest.span_id)
            .count();
        if bulk && fan_outs > 1 {
            continue;
        }
        let child = |parent: &CollectedSpan, name: &str| {
            spans
                .iter()
                .filter(|span| span.name == name && span.parent_span_id == parent.span_id)
                .min_by_key(|span| span.start)
                .map(|span| (span.start, span.end))
        };
        let mut points = Points {
            published: ingest
                .event_id
                .and_then(|id| events.index_of(id))
                .and_then(|index| events.published_unix_nanos(index)),
            ingest_start: Some(ingest.start),
            fan_out: child(ingest, "fan_out"),
            publish_tasks: child(ingest, "publish_tasks"),
            ingest_ack: child(ingest, "ack"),
            ..Points::default()
        };
        // The first attempt's earliest `deliver` (a redelivered task makes another).
        if let Some(deliver) = spans
            .iter()
            .filter(|span| span.name == "deliver" && span.attempt == Some(1))
            .min_by_key(|span| span.start)
        {
            points.deliver = Some((deliver.start, deliver.end));
            points.claim = child(deliver, "claim");
            points.prepare = child(deliver, "prepare");
            points.http = child(deliver, "http.request");
            points.record = child(deliver, "record");
            points.ack = child(deliver, "ack");
            points.received = deliver.delivery_id.and_then(|id| received.get(&id).copied());
        }
        paths.push((points, bulk));
    }
    let traced_events = paths.len();
    let complete: Vec<(Points, bool)> = paths
        .into_iter()
        .filter(|(points, _)| PATH.iter().all(|(_, _, segment)| segment(points).is_some()))
        .collect();
    let of = |bulk: Option<bool>, segment: fn(&Points) -> Option<(u64, u64)>| {
        Figures::of(
            complete
                .iter()
                .filter(|(_, lane)| bulk.is_none_or(|bulk| bulk == *lane))
                .filter_map(|(points, _)| segment(points))
                .map(|(from, to)| to as i64 - from as i64)
                .collect(),
        )
    };
    let figures = |segment| of(Some(false), segment);
    let steps = |segments: &[Segment]| {
        segments
            .iter()
            .map(|(name, what, segment)| Step {
                name,
                what,
                figures: figures(*segment),
            })
            .collect()
    };
    let first_published = complete.iter().filter_map(|(points, _)| points.published).min();
    let millis = |(from, to): (u64, u64)| (to as i64 - from as i64) as f64 / 1e6;
    let mut slowest: Vec<SlowPath> = complete
        .iter()
        .filter(|(_, bulk)| !bulk)
        .filter_map(|(points, _)| {
            Some(SlowPath {
                published_s: (points.published? - first_published?) as f64 / 1e9,
                end_to_end_ms: millis(between(points.published, points.received)?),
                steps_ms: PATH
                    .iter()
                    .map(|(_, _, segment)| segment(points).map_or(f64::NAN, millis))
                    .collect(),
            })
        })
        .collect();
    slowest.sort_unstable_by(|a, b| b.end_to_end_ms.total_cmp(&a.end_to_end_ms));
    slowest.truncate(SLOWEST_PATHS);
    Breakdown {
        spans: count,
        spans_by_name,
        refused_exports,
        traced_events,
        complete_paths: complete.len(),
        express_paths: complete.iter().filter(|(_, bulk)| !bulk).count(),
        path: steps(&PATH),
        end_to_end: figures(|p| between(p.published, p.received)),
        beside: steps(&BESIDE),
        deferred_to_ingest: of(Some(true), |p| between(p.published, p.ingest_start)),
        deferred_end_to_end: of(Some(true), |p| between(p.published, p.received)),
        all_end_to_end: of(None, |p| between(p.published, p.received)),
        slowest,
    }
}

impl fmt::Display for Breakdown {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "  breakdown     {} spans; {} events traced, {} with every step of the path, {} of them straight from \
             the express lane (the rows){}",
            self.spans,
            self.traced_events,
            self.complete_paths,
            self.express_paths,
            if self.refused_exports > 0 {
                format!("; {} exports refused", self.refused_exports)
            } else {
                String::new()
            }
        )?;
        let line = |f: &mut fmt::Formatter<'_>, name: &str, figures: &Option<Figures>| match figures {
            Some(x) => writeln!(
                f,
                "    {name:<28} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
                x.p50, x.p90, x.p99, x.max
            ),
            None => writeln!(f, "    {name:<28} {:>8}", "—"),
        };
        writeln!(
            f,
            "    {:<28} {:>8} {:>8} {:>8} {:>8}   (ms; the path, publish → receipt)",
            "step", "p50", "p90", "p99", "max"
        )?;
        for step in &self.path {
            line(f, step.name, &step.figures)?;
        }
        line(f, "= publish → receipt", &self.end_to_end)?;
        writeln!(f, "    beside or after the path:")?;
        for step in &self.beside {
            line(f, step.name, &step.figures)?;
        }
        writeln!(
            f,
            "    events deferred to the bulk lane first ({}):",
            self.complete_paths - self.express_paths
        )?;
        line(f, "publish → bulk ingest", &self.deferred_to_ingest)?;
        line(f, "publish → receipt", &self.deferred_end_to_end)?;
        line(f, "all events: publish → receipt", &self.all_end_to_end)?;
        if !self.slowest.is_empty() {
            writeln!(
                f,
                "    the slowest express paths (published: s after the first traced event; then ms: publish → \
                 receipt, and each step of the path above, in its order):"
            )?;
            for path in &self.slowest {
                let steps: Vec<String> = path.steps_ms.iter().map(|ms| format!("{ms:.1}")).collect();
                writeln!(
                    f,
                    "    {:>7.2} s {:>8.1}  = {}",
                    path.published_s,
                    path.end_to_end_ms,
                    steps.join(" + ")
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(name: &str, id: u8, parent: u8, start: u64, end: u64) -> CollectedSpan {
        CollectedSpan {
            service: String::new(),
            name: name.to_owned(),
            trace_id: vec![1; 16],
            span_id: vec![id; 8],
            parent_span_id: if parent == 0 { Vec::new() } else { vec![parent; 8] },
            start,
            end,
            event_id: None,
            delivery_id: None,
            attempt: None,
            outcome: None,
        }
    }

    #[test]
    fn the_path_is_cut_into_segments_that_add_up_to_the_latency() {
        let events = Events::generate(1);
        events.mark_published(0);
        let published = events.published_unix_nanos(0).expect("published");
        let delivery = Uuid::new_v4();
        let at = |ms: u64| published + ms * 1_000_000;
        let mut ingest = span("ingest", 1, 0, at(1), at(6));
        ingest.event_id = Some(events.id(0));
        ingest.outcome = Some("fanned_out".to_owned());
        let mut deliver = span("deliver", 5, 4, at(5), at(12));
        deliver.delivery_id = Some(delivery);
        deliver.attempt = Some(1);
        let spans = vec![
            ingest,
            span("fan_out", 2, 1, at(2), at(3)),
            span("publish_tasks", 3, 1, at(3), at(5)),
            span("publish", 4, 3, at(3), at(5)),
            span("ack", 10, 1, at(5), at(6)),
            deliver,
            span("claim", 6, 5, at(5), at(7)),
            span("prepare", 7, 5, at(7), at(8)),
            span("http.request", 8, 5, at(8), at(10)),
            span("record", 9, 5, at(10), at(11)),
            span("ack", 11, 5, at(11), at(12)),
            // Another trace's span, without an ingest: ignored.
            CollectedSpan {
                trace_id: vec![2; 16],
                ..span("deliver", 12, 0, 0, 1)
            },
        ];
        let receipt = Instant::now();
        let receipts = [(delivery, receipt)];
        let breakdown = analyse(spans, 0, &events, &receipts);
        assert_eq!(
            (
                breakdown.traced_events,
                breakdown.complete_paths,
                breakdown.express_paths
            ),
            (1, 1, 1)
        );
        let received_ms = (events.unix_nanos(receipt) - published) as f64 / 1e6;
        let total: f64 = breakdown
            .path
            .iter()
            .map(|step| step.figures.expect("every step").p50)
            .sum();
        assert!((total - received_ms).abs() < 1e-6, "{total} vs {received_ms}");
        assert_eq!(breakdown.end_to_end.expect("end to end").p50, received_ms);
        let fan_out = breakdown
            .path
            .iter()
            .find(|step| step.name == "fan_out")
            .expect("fan_out");
        assert_eq!(fan_out.figures.expect("figures").p50, 1.0);
        let record = breakdown
            .beside
            .iter()
            .find(|step| step.name == "record")
            .expect("record");
        assert_eq!(record.figures.expect("figures").p50, 1.0);
        let [slowest] = breakdown.slowest.as_slice() else {
            panic!("one path, so one slowest: {:?}", breakdown.slowest);
        };
        assert_eq!((slowest.published_s, slowest.end_to_end_ms), (0.0, received_ms));
        let steps: Vec<f64> = breakdown
            .path
            .iter()
            .map(|step| step.figures.expect("every step").p50)
            .collect();
        assert_eq!(slowest.steps_ms, steps);
    }
}
