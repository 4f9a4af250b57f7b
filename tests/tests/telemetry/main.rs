//! Traces across processes: the API, the ingester and a worker as separate OS
//! processes (each installs its own global subscriber, as in production) around
//! PostgreSQL and RabbitMQ, exporting over OTLP/HTTP to a collector in the test.
//! One event must give one trace that runs from the intake through the broker to
//! the ingester, through the broker again to the worker, and into its HTTP
//! attempt, each span the child of the one before.

mod collector;

use std::time::{Duration, Instant};

use aegis_webhook_tests::processes::{ProcessCluster, RoleProcess, role_process_main};
use aegis_webhook_tests::support::{Receiver, envelope, seed_poam_overdue_data};
use collector::{CollectedSpan, Collector};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "not a test: the child process that the telemetry tests spawn"]
async fn role_process() {
    role_process_main().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_an_event_from_the_intake_to_the_http_attempt() {
    // Arrange: a database with a tenant and one webhook, a receiver, a
    // collector, and the three roles as processes exporting to it.
    let started = Instant::now();
    let Some(mut cluster) = ProcessCluster::prepare("telemetry").await else {
        return; // PostgreSQL or RabbitMQ is unreachable outside CI (reported; in CI it fails).
    };
    let receiver = Receiver::start(&[], 200).await;
    let tenant_id = cluster.tenant_with_webhooks("acme", &receiver.url(), 1).await;
    let collector = Collector::start().await;
    let ingest_token = cluster.ingest_token.clone();
    cluster.set("AEGIS_OTLP_ENDPOINT", collector.endpoint());
    // The API and the ingester export every 100 ms, as a busy system would.
    cluster.set("OTEL_BSP_SCHEDULE_DELAY", "100");
    let settings = cluster.settings().to_vec();
    // The worker's batches wait ten minutes: its spans can only arrive through
    // the flush on SIGTERM, which is what this shows.
    let mut worker_settings = settings.clone();
    worker_settings.push(("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "600000".to_owned()));
    let api = RoleProcess::spawn("api", &settings).await;
    let ingester = RoleProcess::spawn("ingester", &settings).await;
    let worker = RoleProcess::spawn("worker", &worker_settings).await;
    let ready = started.elapsed();

    // Act: one event as an untraced scanner posts it, one from a scanner that
    // sends its own `traceparent`.
    let intake = format!("http://{}/v1/events", api.addr.expect("the API listens"));
    let client = reqwest::Client::new();
    let untraced_event = Uuid::new_v4();
    let traced_event = Uuid::new_v4();
    let scanner_trace = Uuid::new_v4().simple().to_string();
    let scanner_span = &Uuid::new_v4().simple().to_string()[..16];
    for (event_id, traceparent) in [
        (untraced_event, None),
        (traced_event, Some(format!("00-{scanner_trace}-{scanner_span}-01"))),
    ] {
        let mut event = envelope(tenant_id, "POAM_OVERDUE", seed_poam_overdue_data());
        event["id"] = serde_json::json!(event_id);
        let mut request = client.post(&intake).bearer_auth(&ingest_token).json(&event);
        if let Some(traceparent) = traceparent {
            request = request.header("traceparent", traceparent);
        }
        let response = request.send().await.expect("the intake answers");
        assert_eq!(response.status(), 202, "{}", response.text().await.unwrap_or_default());
    }
    receiver.wait_for(2, Duration::from_secs(60)).await;
    let delivered = started.elapsed();

    // Assert: the API's and the ingester's spans arrive while they run; none of
    // the worker's before it stops.
    let exported_live = wait_for_spans(&collector, "the API's and the ingester's spans", |spans| {
        [untraced_event, traced_event].iter().all(|event| {
            let event = event.to_string();
            spans
                .iter()
                .any(|span| span.name == "ingest" && span.attribute("aegis.event.id") == Some(event.as_str()))
        })
    })
    .await;
    assert!(
        !exported_live.iter().any(|span| span.service == "aegis-webhook-worker"),
        "the worker exported before its batch delay; this test cannot show the flush on shutdown"
    );
    for process in [api, ingester, worker] {
        let role = process.role;
        let status = process.terminate(Duration::from_secs(30)).await;
        assert!(status.success(), "the {role} process stopped with {status}");
    }
    let spans = wait_for_spans(&collector, "the worker's spans, flushed on SIGTERM", |spans| {
        spans.iter().filter(|span| span.name == "http.request").count() >= 2
    })
    .await;

    let untraced = trace_of(&spans, untraced_event, receiver.addr.port());
    assert!(
        untraced.parent_span_id.is_empty(),
        "without a traceparent the intake starts the trace: {untraced:?}"
    );
    let traced = trace_of(&spans, traced_event, receiver.addr.port());
    assert_eq!(traced.trace_id, scanner_trace, "the scanner's trace goes on");
    assert_eq!(
        traced.parent_span_id, scanner_span,
        "the intake is the scanner's span's child"
    );
    assert_ne!(untraced.trace_id, traced.trace_id, "one trace per event");

    let report = format!(
        "[telemetry] processes ready after {ready:?}, both events delivered after {delivered:?}, \
         {} spans collected, all asserted after {:?}\n",
        spans.len(),
        started.elapsed()
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), report.as_bytes());
}

/// Polls the collector until `done` holds for what it received.
async fn wait_for_spans(
    collector: &Collector,
    what: &str,
    done: impl Fn(&[CollectedSpan]) -> bool,
) -> Vec<CollectedSpan> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let spans = collector.spans();
        if done(&spans) {
            return spans;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not arrive within 30 s; the collector has: {:#?}",
            spans
                .iter()
                .map(|span| (&span.service, &span.name, &span.trace_id))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Finds the event's trace and checks its chain: intake → publish (API) →
/// ingest → publish (ingester) → deliver → http.request (worker), all in one
/// trace, each the child of the one before, in the right process, with the
/// right kind and attributes. Returns the intake span.
fn trace_of(spans: &[CollectedSpan], event_id: Uuid, receiver_port: u16) -> CollectedSpan {
    let event_id = event_id.to_string();
    let intake = one(
        spans
            .iter()
            .filter(|span| span.name == "intake" && span.attribute("aegis.event.id") == Some(event_id.as_str())),
        &format!("the intake span of event {event_id}"),
    );
    assert_eq!(intake.service, "aegis-webhook-api");
    assert_eq!(intake.kind, SpanKind::Server);
    assert_eq!(intake.attribute("http.response.status_code"), Some("202"));
    assert_eq!(intake.attribute("aegis.event.type"), Some("POAM_OVERDUE"));
    let in_trace: Vec<&CollectedSpan> = spans.iter().filter(|span| span.trace_id == intake.trace_id).collect();
    let child = |parent: &CollectedSpan, name: &str, service: &str, kind: SpanKind| -> CollectedSpan {
        let found = one(
            in_trace
                .iter()
                .copied()
                .filter(|span| span.name == name && span.parent_span_id == parent.span_id),
            &format!(
                "a `{name}` span, child of `{}` {}, in trace {} ({:#?})",
                parent.name,
                parent.span_id,
                intake.trace_id,
                in_trace
                    .iter()
                    .map(|span| (&span.service, &span.name, &span.span_id, &span.parent_span_id))
                    .collect::<Vec<_>>()
            ),
        );
        assert_eq!((found.service.as_str(), found.kind), (service, kind), "{found:?}");
        found
    };
    let event_publish = child(&intake, "publish", "aegis-webhook-api", SpanKind::Producer);
    assert_eq!(event_publish.attribute("messaging.system"), Some("rabbitmq"));
    let ingest = child(&event_publish, "ingest", "aegis-webhook-ingester", SpanKind::Consumer);
    assert_eq!(ingest.attribute("aegis.ingest.outcome"), Some("fanned_out"));
    assert_eq!(ingest.attribute("aegis.deliveries"), Some("1"));
    let task_publish = child(&ingest, "publish", "aegis-webhook-ingester", SpanKind::Producer);
    let deliver = child(&task_publish, "deliver", "aegis-webhook-worker", SpanKind::Consumer);
    assert_eq!(deliver.attribute("aegis.delivery.attempt"), Some("1"));
    assert_eq!(deliver.attribute("aegis.delivery.outcome"), Some("delivered"));
    let http = child(&deliver, "http.request", "aegis-webhook-worker", SpanKind::Client);
    assert_eq!(http.attribute("server.address"), Some("127.0.0.1"));
    assert_eq!(http.attribute("server.port"), Some(receiver_port.to_string().as_str()));
    assert_eq!(http.attribute("http.response.status_code"), Some("200"));
    assert_eq!(http.attribute("error.type"), None);
    intake
}

fn one<'a>(mut found: impl Iterator<Item = &'a CollectedSpan>, what: &str) -> CollectedSpan {
    let first = found.next().unwrap_or_else(|| panic!("no {what}"));
    assert!(found.next().is_none(), "more than one {what}");
    first.clone()
}
