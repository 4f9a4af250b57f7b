//! Logs and traces, shared by every process: `tracing` to standard error, as text
//! or JSON, filtered by `AEGIS_LOG` (or `RUST_LOG`); with [`Traces`], the same
//! spans exported as OpenTelemetry traces; and [`TraceHeaders`], the W3C trace
//! context that queue messages carry from one process to the next, so that one
//! trace follows an event from the intake to each HTTP attempt.
//!
//! No exporter lives here: exporting is a transport, which core does not have.
//! The binary crate builds one (OTLP over HTTP) and hands it to [`Traces::new`].

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer, Registry};

use crate::config::LogFormat;

/// What [`init`] installs: logs always, traces when there is an exporter.
#[derive(Debug, Default)]
pub struct Settings {
    pub log_format: LogFormat,
    /// Where spans are exported; `None` (the default) builds no tracer at all.
    pub traces: Option<Traces>,
}

/// A tracer provider for this process: finished spans are batched and handed to
/// the exporter on a thread of the SDK's own (not on tokio), every few seconds
/// and at [`shutdown`]. The `OTEL_BSP_*` variables tune the batching.
pub struct Traces {
    provider: SdkTracerProvider,
}

impl std::fmt::Debug for Traces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Traces").finish_non_exhaustive()
    }
}

impl Traces {
    /// `service_name` names the process in trace views (`aegis-webhook-worker`);
    /// `OTEL_SERVICE_NAME` overrides it and `OTEL_RESOURCE_ATTRIBUTES` adds to
    /// it (a pod name, an environment).
    pub fn new(service_name: &str, exporter: impl SpanExporter + 'static) -> Self {
        let mut resource =
            Resource::builder().with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
        if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
            resource = resource.with_service_name(service_name.to_owned());
        }
        let provider = SdkTracerProvider::builder()
            .with_resource(resource.build())
            .with_batch_exporter(exporter)
            .build();
        Traces { provider }
    }
}

/// The provider [`init`] installed, kept for [`shutdown`].
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// The spans and events exported as traces: those of Aegis Webhooks' own crates
/// at `info` and above, whatever `AEGIS_LOG` keeps in the logs. Never the
/// exporter's own machinery (opentelemetry, reqwest, hyper), which would feed
/// itself.
fn exported() -> Targets {
    Targets::new().with_target("aegis_webhook", LevelFilter::INFO)
}

/// The log filter when neither `AEGIS_LOG` nor `RUST_LOG` is set. sqlx's pool
/// warns once per slow connection checkout: under a flood that is a line per
/// statement, so its pool logs only errors; the API reports a busy database
/// itself, once per interval (`aegis_webhook_api::limits::LogThrottle`).
const DEFAULT_LOG_FILTER: &str = "info,sqlx=warn,sqlx::pool=error,sea_orm=warn";

/// Installs the global subscriber. Safe to call more than once (tests do); only
/// the first call takes effect, and a later call's exporter is shut down unused.
pub fn init(settings: Settings) {
    let filter = EnvFilter::try_from_env("AEGIS_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new(DEFAULT_LOG_FILTER));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // The log filter applies to the logs only, so quieter logs keep every span.
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![match settings.log_format {
        LogFormat::Text => logs.with_filter(filter).boxed(),
        LogFormat::Json => logs.json().with_filter(filter).boxed(),
    }];
    if let Some(traces) = &settings.traces {
        let tracer = traces.provider.tracer("aegis-webhook");
        layers.push(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_filter(exported())
                .boxed(),
        );
    }
    let installed = tracing_subscriber::registry().with(layers).try_init().is_ok();
    if let (true, Some(traces)) = (installed, settings.traces) {
        let _ = PROVIDER.set(traces.provider);
    }
}

/// From now on a panic is logged like everything else, in the spans it
/// happened in (an envelope's `ingest`, a task's `deliver`), so the log
/// says which message met it; the default hook's line on stderr would say
/// neither. For the binary: tests keep the default hook.
pub fn log_panics() {
    std::panic::set_hook(Box::new(|panic| {
        tracing::error!(panic = %panic, backtrace = %std::backtrace::Backtrace::capture(), "panicked");
    }));
}

/// The text a panic was raised with, if it was raised with text.
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|text| text.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(a panic without text)".to_owned())
}

/// How long [`shutdown`] waits for the last export: a reachable collector takes
/// milliseconds, and a stopping worker's drain (`AEGIS_SHUTDOWN_GRACE`) plus
/// this must fit in the orchestrator's grace period.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// Exports the spans still buffered and stops the exporter, blocking for
/// [`FLUSH_TIMEOUT`] at most; spans that end later are dropped. Call once, as
/// the process ends (from a blocking context: not on a current-thread
/// runtime's thread). Does nothing when no traces were installed.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get()
        && let Err(error) = provider.shutdown_with_timeout(FLUSH_TIMEOUT)
    {
        tracing::warn!(error = %error, "failed to export the last spans");
    }
}

/// The W3C Trace Context headers, the only ones [`TraceHeaders`] carries.
pub const TRACE_CONTEXT_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// The W3C trace context (`traceparent`, and `tracestate` if there is one) that
/// a message or a request carries, so the work it starts continues the sender's
/// trace. Empty when the sender was not traced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceHeaders(BTreeMap<String, String>);

impl TraceHeaders {
    /// The context of the current span; empty outside any span or when traces
    /// are not exported.
    pub fn current() -> Self {
        let mut headers = TraceHeaders::default();
        TraceContextPropagator::new().inject_context(&tracing::Span::current().context(), &mut headers);
        headers
    }

    /// Keeps the trace-context headers among `pairs` (names in any case).
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        TraceHeaders(
            pairs
                .into_iter()
                .map(|(name, value)| (name.to_ascii_lowercase(), value))
                .filter(|(name, _)| TRACE_CONTEXT_HEADERS.contains(&name.as_str()))
                .map(|(name, value)| (name, value.to_owned()))
                .collect(),
        )
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(name, value)| (name.as_str(), value.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Injector for TraceHeaders {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

impl Extractor for TraceHeaders {
    fn get(&self, key: &str) -> Option<&str> {
        TraceHeaders::get(self, key)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Makes `span` continue the trace that `headers` carry, as a child of the
/// sender's span, and records the trace id in the span's `trace_id` field (so
/// logs show it). Call before the span is first entered. Without a valid
/// context the span starts a trace of its own; without traces, nothing happens.
pub fn continue_trace(span: &tracing::Span, headers: &TraceHeaders) {
    let parent = TraceContextPropagator::new().extract(headers);
    if parent.span().span_context().is_valid() {
        // Fails only for a span nobody records, or without traces: then there
        // is no trace to continue.
        let _ = span.set_parent(parent);
    }
    let context = span.context();
    let trace = context.span().span_context().clone();
    if trace.is_valid() {
        span.record("trace_id", tracing::field::display(trace.trace_id()));
    }
}

/// A subscriber that traces without exporting, for tests to install on their
/// thread (`tracing::subscriber::with_default` or `set_default`).
#[cfg(test)]
pub(crate) fn traced() -> impl tracing::Subscriber + Send + Sync {
    let provider = SdkTracerProvider::builder().build();
    tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TraceId;
    use tracing::subscriber::with_default;

    use super::*;

    #[test]
    fn the_context_goes_out_as_traceparent_and_comes_back_as_the_parent() {
        with_default(traced(), || {
            let sender = tracing::info_span!("sender");
            let headers = sender.in_scope(TraceHeaders::current);
            let sent = sender.context().span().span_context().clone();
            let traceparent = headers.get("traceparent").expect("a traceparent");
            assert_eq!(
                traceparent,
                format!("00-{}-{}-01", sent.trace_id(), sent.span_id()),
                "W3C: version, trace id, parent span id, sampled"
            );

            let receiver = tracing::info_span!("receiver", trace_id = tracing::field::Empty);
            continue_trace(&receiver, &TraceHeaders::from_pairs([("TraceParent", traceparent)]));
            let received = receiver.context();
            assert_eq!(received.span().span_context().trace_id(), sent.trace_id());
            assert_ne!(received.span().span_context().span_id(), sent.span_id());
        });
    }

    #[test]
    fn without_a_span_or_traces_nothing_is_carried() {
        with_default(traced(), || assert!(TraceHeaders::current().is_empty()));
        let untraced = tracing::info_span!("untraced");
        assert!(untraced.in_scope(TraceHeaders::current).is_empty());
    }

    #[test]
    fn a_broken_traceparent_starts_a_new_trace() {
        with_default(traced(), || {
            let span = tracing::info_span!("receiver");
            continue_trace(&span, &TraceHeaders::from_pairs([("traceparent", "00-garbage-01")]));
            let trace = span.context().span().span_context().trace_id();
            assert_ne!(trace, TraceId::INVALID);
        });
    }

    #[test]
    fn only_trace_context_headers_are_kept() {
        let headers = TraceHeaders::from_pairs([("traceparent", "a"), ("x-aegis-reason", "b"), ("tracestate", "c")]);
        assert_eq!(
            headers.iter().collect::<Vec<_>>(),
            [("traceparent", "a"), ("tracestate", "c")]
        );
    }
}
