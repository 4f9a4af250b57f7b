//! The outbound HTTP client: the only place Aegis Webhooks sends requests to
//! customers' endpoints. No redirects, no proxies from the environment, a
//! whole-request timeout, a capped response read, and a resolver that refuses
//! addresses the target policy forbids (so DNS rebinding gets nowhere).
//!
//! Each attempt is an `http.request` span (OpenTelemetry's HTTP client
//! attributes: the host and port, never the path or query, which may hold a
//! customer's credentials; the status or the kind of failure).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aegis_webhook_core::target::{RefusedAddress, TargetPolicy, WebhookUrl};
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::HeaderMap;
use tracing::Instrument as _;
use tracing::field::Empty;
use url::Host;

/// Resolves with the system resolver, then keeps only allowed addresses.
struct PolicyResolver {
    policy: Arc<TargetPolicy>,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.policy.clone();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = resolved
                .iter()
                .copied()
                .filter(|addr| policy.is_allowed(addr.ip()))
                .collect();
            match (allowed.is_empty(), resolved.first()) {
                (false, _) => Ok(Box::new(allowed.into_iter()) as Addrs),
                (true, Some(refused)) => Err(Box::new(RefusedAddress(refused.ip())) as _),
                (true, None) => Err(format!("`{}` resolved to no address", name.as_str()).into()),
            }
        })
    }
}

pub fn build_client(policy: Arc<TargetPolicy>, timeout: Duration) -> anyhow::Result<reqwest::Client> {
    reqwest::Client::builder()
        .user_agent(aegis_webhook_core::USER_AGENT)
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .dns_resolver(Arc::new(PolicyResolver { policy }))
        .build()
        .map_err(|error| anyhow::anyhow!("failed to build the HTTP client: {error}"))
}

/// What came back from one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResult {
    pub status: Option<u16>,
    pub error: Option<String>,
    pub body: Option<String>,
    pub duration: Duration,
    /// `Retry-After`, as the receiver sent it.
    pub retry_after: Option<String>,
    /// No complete answer in time (the status may still have arrived).
    pub timed_out: bool,
}

impl HttpResult {
    /// What the retry decision reads of it.
    pub fn observed(&self) -> aegis_webhook_core::retry::Observed<'_> {
        aegis_webhook_core::retry::Observed {
            status: self.status,
            timed_out: self.timed_out,
            retry_after: self.retry_after.as_deref(),
        }
    }
}

/// POSTs `body` and reads at most `max_body` bytes of the answer, all within
/// `timeout`. A body that does not arrive in time still leaves the status.
pub async fn post(
    client: &reqwest::Client,
    policy: &TargetPolicy,
    url: &WebhookUrl,
    headers: HeaderMap,
    body: String,
    timeout: Duration,
    max_body: usize,
) -> HttpResult {
    let url = url.as_url();
    let span = tracing::info_span!(
        "http.request",
        otel.kind = "client",
        otel.status_code = Empty,
        http.request.method = "POST",
        server.address = url.host_str(),
        server.port = url.port_or_known_default(),
        url.scheme = url.scheme(),
        http.response.status_code = Empty,
        error.type = Empty,
    );
    let result = send(client, policy, url, headers, body, timeout, max_body)
        .instrument(span.clone())
        .await;
    if let Some(status) = result.status {
        span.record("http.response.status_code", status);
    }
    // OpenTelemetry's `error.type`: the status of an error answer, else what
    // kept the answer from coming.
    let failure = match result.status {
        _ if result.timed_out => Some("timeout".to_owned()),
        Some(status) if status >= 400 => Some(status.to_string()),
        Some(_) => None,
        None => Some("request_failed".to_owned()),
    };
    if let Some(failure) = failure {
        span.record("error.type", failure).record("otel.status_code", "error");
    }
    result
}

async fn send(
    client: &reqwest::Client,
    policy: &TargetPolicy,
    url: &url::Url,
    headers: HeaderMap,
    body: String,
    timeout: Duration,
    max_body: usize,
) -> HttpResult {
    let started = Instant::now();
    let fail = |error: String, timed_out: bool| HttpResult {
        status: None,
        error: Some(error),
        body: None,
        duration: started.elapsed(),
        retry_after: None,
        timed_out,
    };
    // Names are checked by the resolver; literal addresses never reach it.
    let literal = match url.host() {
        Some(Host::Ipv4(v4)) => Some(std::net::IpAddr::V4(v4)),
        Some(Host::Ipv6(v6)) => Some(std::net::IpAddr::V6(v6)),
        _ => None,
    };
    if let Some(ip) = literal.filter(|ip| !policy.is_allowed(*ip)) {
        return fail(RefusedAddress(ip).to_string(), false);
    }
    let response = match client.post(url.clone()).headers(headers).body(body).send().await {
        Ok(response) => response,
        Err(error) => return fail(describe(&error), error.is_timeout()),
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let remaining = timeout.saturating_sub(started.elapsed());
    let (body, error, timed_out) = match tokio::time::timeout(remaining, read_capped(response, max_body)).await {
        Ok(Ok(body)) => (body, None, false),
        Ok(Err(error)) => (
            Vec::new(),
            Some(format!("reading the response body failed: {}", describe(&error))),
            error.is_timeout(),
        ),
        Err(_elapsed) => (Vec::new(), Some("reading the response body timed out".to_owned()), true),
    };
    HttpResult {
        status: Some(status),
        error,
        body: (!body.is_empty()).then(|| body_as_text(&body)),
        duration: started.elapsed(),
        retry_after,
        timed_out,
    }
}

/// A receiver's answer as text for the attempt log, whatever its bytes:
/// invalid UTF-8, and NUL, which PostgreSQL's `text` refuses (one such
/// answer would fail the whole batch of attempts recorded with it), become
/// U+FFFD.
fn body_as_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    match text.contains('\0') {
        true => text.replace('\0', "\u{FFFD}"),
        false => text.into_owned(),
    }
}

/// Reads up to `max` bytes and drops the rest (and with it the connection), so a
/// huge answer costs us nothing.
async fn read_capped(mut response: reqwest::Response, max: usize) -> Result<Vec<u8>, reqwest::Error> {
    let mut kept = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = max - kept.len();
        kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if kept.len() == max {
            break;
        }
    }
    Ok(kept)
}

/// The error with its causes, which is where reqwest says what really happened.
fn describe(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = if let Some(reqwest_error) = error.downcast_ref::<reqwest::Error>() {
        if reqwest_error.is_timeout() {
            "timed out".to_owned()
        } else {
            reqwest_error.to_string()
        }
    } else {
        error.to_string()
    };
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
