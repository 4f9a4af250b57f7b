//! Trace export over OTLP/HTTP (protobuf), the transport that core leaves out:
//! built only when `AEGIS_OTLP_ENDPOINT` is set, and handed to core's telemetry.
//!
//! The SDK's batch processor exports from a thread of its own with a blocking
//! executor, so the exporter uses reqwest's blocking client (it runs its own
//! small runtime and works from any thread, with or without tokio).

use aegis_webhook_core::config::Config;
use aegis_webhook_core::telemetry::{Settings, Traces};
use anyhow::Context as _;
use opentelemetry_otlp::{Protocol, SpanExporter, WithExportConfig as _};

/// What `telemetry::init` should install for a process named `service_name`
/// (`aegis-webhook-worker`, …): the configured log format, and traces when an
/// OTLP endpoint is configured.
pub fn telemetry_settings(config: &Config, service_name: &str) -> anyhow::Result<Settings> {
    let traces = match &config.otlp_endpoint {
        None => None,
        Some(endpoint) => {
            let exporter = SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_endpoint(traces_url(endpoint))
                .build()
                .with_context(|| format!("failed to set up trace export to {endpoint}"))?;
            Some(Traces::new(service_name, exporter))
        }
    };
    Ok(Settings {
        log_format: config.log_format,
        traces,
    })
}

/// `<endpoint>/v1/traces`: the endpoint is the collector's base URL, as in
/// `OTEL_EXPORTER_OTLP_ENDPOINT`, unless it already names the traces path.
fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_endpoint_is_a_base_url() {
        assert_eq!(traces_url("http://jaeger:4318"), "http://jaeger:4318/v1/traces");
        assert_eq!(traces_url("http://jaeger:4318/"), "http://jaeger:4318/v1/traces");
        assert_eq!(
            traces_url("https://otel.example.com/v1/traces"),
            "https://otel.example.com/v1/traces"
        );
    }

    #[test]
    fn without_an_endpoint_nothing_is_built() {
        let settings = telemetry_settings(&Config::default(), "aegis-webhook-test").expect("settings");
        assert!(settings.traces.is_none());
    }
}
