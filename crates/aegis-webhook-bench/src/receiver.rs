//! The benchmark's webhook receiver: an HTTP/1.1 server on loopback (axum on
//! hyper, keep-alive) with one path per webhook, `/hooks/<index>`.
//!
//! Each request is checked as a careful customer would — `X-Aegis-Signature`
//! is the HMAC-SHA256 of the raw body with that webhook's secret, computed here
//! independently of the system's signing code — and counted:
//! a verified delivery is a new (event, webhook) pair under a new
//! `X-Aegis-Delivery`; a repeated `X-Aegis-Delivery` is a duplicate (allowed by
//! at-least-once delivery); anything else is invalid or unexpected. So a fast
//! wrong answer cannot score.
//!
//! Webhooks belong to tenants (one in most scenarios, two in the noisy one),
//! numbered one after the other; each tenant has its own events and its own
//! [`Tally`], so a delivery is told apart by the webhook it arrived at, and an
//! event of one tenant arriving at another tenant's webhook is unexpected.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::net::TcpListener;
use uuid::Uuid;

use crate::events::Events;

/// What the receiver has seen so far, for one tenant or for all.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// Every request, whatever it carried.
    pub requests: u64,
    /// Distinct (event, webhook) pairs received with a valid signature.
    pub verified: u64,
    /// Requests repeating an `X-Aegis-Delivery` already verified.
    pub duplicates: u64,
    /// Requests whose `X-Aegis-Signature` is missing or wrong (answered 400).
    pub invalid_signatures: u64,
    /// Validly signed requests the run did not ask for: an unknown webhook
    /// path or event, no `X-Aegis-Delivery`, or an (event, webhook) pair
    /// already delivered under another `X-Aegis-Delivery` (which a receiver
    /// deduplicating on that header would process twice).
    pub unexpected: u64,
    /// Event→receipt latency of each verified delivery, in microseconds.
    pub latencies_us: Vec<u64>,
    /// When the latest verified delivery arrived.
    pub last_verified_at: Option<Instant>,
    /// The slowest verified deliveries, at most [`SLOWEST_KEPT`], each with
    /// the wall-clock time it arrived, to be matched with the processes' and
    /// the database's logs (the fastest of them on top).
    pub slowest: BinaryHeap<Reverse<Slow>>,
}

/// The wall-clock time of `instant`, a moment that has passed: what the
/// report's arrival times are stamped in.
pub fn wall_clock_of(instant: Instant) -> SystemTime {
    SystemTime::now() - instant.elapsed()
}

/// How many of the slowest deliveries a [`Tally`] keeps: enough to hold the
/// whole tail beyond the p99 of a 10-minute steady run (60,000 deliveries),
/// so that when that tail arrived can be read off the report.
pub const SLOWEST_KEPT: usize = 1000;

/// A slow delivery: its event→receipt latency and when it arrived (ordered
/// by latency first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Slow {
    pub latency_us: u64,
    pub arrived: SystemTime,
}

/// Keeps `slow` in `slowest` if it is among the [`SLOWEST_KEPT`] slowest.
fn keep_if_slowest(slowest: &mut BinaryHeap<Reverse<Slow>>, slow: Slow) {
    if slowest.len() < SLOWEST_KEPT {
        slowest.push(Reverse(slow));
    } else if let Some(mut fastest) = slowest.peek_mut()
        && fastest.0.latency_us < slow.latency_us
    {
        *fastest = Reverse(slow);
    }
}

impl Tally {
    /// The counts only (no latencies), cheap enough for a progress display.
    fn counts(&self) -> Tally {
        Tally {
            latencies_us: Vec::new(),
            slowest: BinaryHeap::new(),
            ..*self
        }
    }

    /// Adds `other`'s requests to these.
    fn add(&mut self, other: &Tally) {
        self.requests += other.requests;
        self.verified += other.verified;
        self.duplicates += other.duplicates;
        self.invalid_signatures += other.invalid_signatures;
        self.unexpected += other.unexpected;
        self.latencies_us.extend_from_slice(&other.latencies_us);
        self.last_verified_at = self.last_verified_at.max(other.last_verified_at);
        for Reverse(slow) in &other.slowest {
            keep_if_slowest(&mut self.slowest, *slow);
        }
    }
}

/// One tenant's events and webhooks.
#[derive(Debug)]
struct Tenant {
    events: Arc<Events>,
    /// HMAC keys, by the tenant's own webhook index: the secrets' UTF-8 bytes.
    secrets: Vec<Vec<u8>>,
    /// The receiver-wide index of its first webhook.
    first_webhook: usize,
}

#[derive(Debug, Default)]
struct TenantLedger {
    tally: Tally,
    /// `pairs[event * webhooks + webhook]`: whether that delivery arrived.
    pairs: Vec<bool>,
}

#[derive(Debug)]
struct Ledger {
    /// By tenant, as [`Shared::tenants`].
    tenants: Vec<TenantLedger>,
    /// Requests to a path that is no tenant's webhook.
    elsewhere: Tally,
    /// Across tenants: the system's delivery ids are unique.
    delivery_ids: HashSet<Uuid>,
    /// Each verified delivery's `X-Aegis-Delivery` and when it arrived, for
    /// the step-by-step breakdown (`--breakdown`).
    receipts: Vec<(Uuid, Instant)>,
}

#[derive(Debug)]
struct Shared {
    tenants: Vec<Tenant>,
    response_delay: Duration,
    ledger: Mutex<Ledger>,
}

impl Shared {
    fn new(tenants: Vec<(Arc<Events>, Vec<String>)>, response_delay: Duration) -> Shared {
        let mut first_webhook = 0;
        let tenants: Vec<Tenant> = tenants
            .into_iter()
            .map(|(events, secrets)| {
                let tenant = Tenant {
                    events,
                    secrets: secrets.into_iter().map(String::into_bytes).collect(),
                    first_webhook,
                };
                first_webhook += tenant.secrets.len();
                tenant
            })
            .collect();
        let ledgers: Vec<TenantLedger> = tenants
            .iter()
            .map(|tenant| TenantLedger {
                tally: Tally::default(),
                pairs: vec![false; tenant.events.len() as usize * tenant.secrets.len()],
            })
            .collect();
        let pairs = ledgers.iter().map(|ledger| ledger.pairs.len()).sum();
        Shared {
            tenants,
            response_delay,
            ledger: Mutex::new(Ledger {
                tenants: ledgers,
                elsewhere: Tally::default(),
                delivery_ids: HashSet::with_capacity(pairs),
                receipts: Vec::with_capacity(pairs),
            }),
        }
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // A panic while holding the lock cannot leave the counts half-updated
        // in a way worth refusing to report.
        self.ledger.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The tenant and its own webhook index of a `/hooks/<index>` path.
    fn webhook(&self, path: &str) -> Option<(usize, usize)> {
        let index = path.parse::<usize>().ok()?;
        self.tenants.iter().enumerate().find_map(|(number, tenant)| {
            let own = index.checked_sub(tenant.first_webhook)?;
            (own < tenant.secrets.len()).then_some((number, own))
        })
    }
}

/// How one request was judged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Verified,
    Duplicate,
    InvalidSignature,
    Unexpected,
}

/// A running receiver; it stops when dropped.
#[derive(Debug)]
pub struct Receiver {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Receiver {
    /// Starts on `127.0.0.1:0`. `tenants[t]` is tenant `t`'s events and its
    /// webhooks' signing secrets.
    pub async fn start(tenants: Vec<(Arc<Events>, Vec<String>)>, response_delay: Duration) -> anyhow::Result<Receiver> {
        let shared = Arc::new(Shared::new(tenants, response_delay));
        let app = axum::Router::new()
            .route("/hooks/{webhook}", axum::routing::post(receive))
            .fallback(unexpected)
            .with_state(shared.clone());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("failed to bind the receiver on 127.0.0.1")?;
        let addr = listener.local_addr().context("failed to read the receiver's address")?;
        let server = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, app).await {
                eprintln!("aegis-bench: the receiver stopped: {error}");
            }
        });
        Ok(Receiver { addr, shared, server })
    }

    /// The URL tenant `tenant`'s webhook `index` is created with.
    pub fn url(&self, tenant: usize, index: usize) -> String {
        let webhook = self.shared.tenants[tenant].first_webhook + index;
        format!("http://{}/hooks/{webhook}", self.addr)
    }

    /// Everything seen so far, all tenants together.
    pub fn tally(&self) -> Tally {
        let ledger = self.shared.ledger();
        let mut all = ledger.elsewhere.clone();
        for tenant in &ledger.tenants {
            all.add(&tenant.tally);
        }
        all
    }

    /// Each verified delivery's id (`X-Aegis-Delivery`) and when it arrived.
    pub fn receipts(&self) -> Vec<(Uuid, Instant)> {
        self.shared.ledger().receipts.clone()
    }

    /// Everything seen so far at tenant `tenant`'s webhooks.
    pub fn tally_of(&self, tenant: usize) -> Tally {
        self.shared.ledger().tenants[tenant].tally.clone()
    }

    /// [`Receiver::tally`] without latencies, cheap enough for a progress display.
    pub fn counts(&self) -> Tally {
        let ledger = self.shared.ledger();
        let mut all = ledger.elsewhere.counts();
        for tenant in &ledger.tenants {
            all.add(&tenant.tally.counts());
        }
        all
    }

    /// [`Receiver::tally_of`] without latencies.
    pub fn counts_of(&self, tenant: usize) -> Tally {
        self.shared.ledger().tenants[tenant].tally.counts()
    }
}

async fn receive(
    State(shared): State<Arc<Shared>>,
    Path(webhook): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let at = Instant::now();
    let verdict = judge(&shared, &webhook, &headers, &body, at);
    if !shared.response_delay.is_zero() {
        tokio::time::sleep(shared.response_delay).await;
    }
    match verdict {
        Verdict::InvalidSignature => StatusCode::BAD_REQUEST,
        Verdict::Verified | Verdict::Duplicate | Verdict::Unexpected => StatusCode::OK,
    }
}

/// Any other path or method: counted, and answered 404 so it shows in the
/// system's delivery log too.
async fn unexpected(State(shared): State<Arc<Shared>>) -> StatusCode {
    let mut ledger = shared.ledger();
    ledger.elsewhere.requests += 1;
    ledger.elsewhere.unexpected += 1;
    StatusCode::NOT_FOUND
}

fn judge(shared: &Shared, webhook: &str, headers: &HeaderMap, body: &[u8], at: Instant) -> Verdict {
    let Some((number, webhook)) = shared.webhook(webhook) else {
        let mut ledger = shared.ledger();
        ledger.elsewhere.requests += 1;
        ledger.elsewhere.unexpected += 1;
        return Verdict::Unexpected;
    };
    let tenant = &shared.tenants[number];
    let signed = headers
        .get("x-aegis-signature")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|header| signature_is_valid(&tenant.secrets[webhook], body, header));
    let delivery_id = headers
        .get("x-aegis-delivery")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<Uuid>().ok());
    // Only this tenant's events: another tenant's is unexpected here.
    let event = tenant.events.identify(body);

    let mut guard = shared.ledger();
    let ledger = &mut *guard;
    let own = &mut ledger.tenants[number];
    own.tally.requests += 1;
    let verdict = match (signed, delivery_id, event) {
        (false, _, _) => Verdict::InvalidSignature,
        (true, Some(delivery_id), Some(event)) => {
            if !ledger.delivery_ids.insert(delivery_id) {
                Verdict::Duplicate
            } else {
                let pair = event as usize * tenant.secrets.len() + webhook;
                if std::mem::replace(&mut own.pairs[pair], true) {
                    Verdict::Unexpected
                } else {
                    ledger.receipts.push((delivery_id, at));
                    Verdict::Verified
                }
            }
        }
        _ => Verdict::Unexpected,
    };
    let tally = &mut own.tally;
    match verdict {
        Verdict::Verified => {
            tally.verified += 1;
            tally.last_verified_at = Some(at);
            if let Some(latency) = event.and_then(|event| tenant.events.latency(event, at)) {
                let latency_us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                tally.latencies_us.push(latency_us);
                let arrived = wall_clock_of(at);
                keep_if_slowest(&mut tally.slowest, Slow { latency_us, arrived });
            }
        }
        Verdict::Duplicate => tally.duplicates += 1,
        Verdict::InvalidSignature => tally.invalid_signatures += 1,
        Verdict::Unexpected => tally.unexpected += 1,
    }
    verdict
}

/// `sha256=<lowercase hex HMAC-SHA256(secret, body)>`, compared in constant time.
fn signature_is_valid(secret: &[u8], body: &[u8], header: &str) -> bool {
    let Some(digest) = header.strip_prefix("sha256=").and_then(|hex| hex::decode(hex).ok()) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    mac.verify_slice(&digest).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "bench-secret-for-tests";

    #[test]
    fn a_tally_keeps_the_slowest_deliveries_only() {
        let arrived = SystemTime::UNIX_EPOCH;
        let mut slowest = BinaryHeap::new();
        // Every latency twice, slowest first and then fastest first: the kept
        // ones are the top half of the distinct latencies, each twice.
        let distinct = SLOWEST_KEPT as u64;
        for latency_us in (1..=distinct).rev().chain(1..=distinct) {
            keep_if_slowest(&mut slowest, Slow { latency_us, arrived });
        }
        let mut kept: Vec<u64> = slowest.iter().map(|Reverse(slow)| slow.latency_us).collect();
        kept.sort_unstable();
        let expected: Vec<u64> = (distinct / 2 + 1..=distinct)
            .flat_map(|latency| [latency, latency])
            .collect();
        assert_eq!(kept.len(), SLOWEST_KEPT);
        assert_eq!(kept, expected);
    }

    fn sign(body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("any key");
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    fn shared(events: u32, webhooks: usize) -> (Shared, Arc<Events>) {
        let events = Arc::new(Events::generate(events));
        let shared = Shared::new(
            vec![(events.clone(), vec![SECRET.to_owned(); webhooks])],
            Duration::ZERO,
        );
        (shared, events)
    }

    fn delivered_body(events: &Events, index: u32) -> Vec<u8> {
        let envelope: serde_json::Value =
            serde_json::from_slice(&events.envelope(index, Uuid::new_v4())).expect("JSON");
        serde_json::to_vec(&serde_json::json!({
            "event": envelope["event"], "timestamp": envelope["timestamp"], "data": envelope["data"]
        }))
        .expect("JSON")
    }

    fn headers(signature: &str, delivery: Uuid) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-aegis-signature", signature.parse().expect("header"));
        headers.insert("x-aegis-delivery", delivery.to_string().parse().expect("header"));
        headers
    }

    #[test]
    fn every_request_is_judged_and_counted() {
        let (shared, events) = shared(2, 2);
        events.mark_published(0);
        let body = delivered_body(&events, 0);
        let first = Uuid::new_v4();
        let now = Instant::now();

        assert_eq!(
            judge(&shared, "0", &headers(&sign(&body), first), &body, now),
            Verdict::Verified
        );
        assert_eq!(
            judge(&shared, "0", &headers(&sign(&body), first), &body, now),
            Verdict::Duplicate
        );
        // The same event to the other webhook is another delivery.
        assert_eq!(
            judge(&shared, "1", &headers(&sign(&body), Uuid::new_v4()), &body, now),
            Verdict::Verified
        );
        // The same (event, webhook) under a new delivery id cannot be deduplicated.
        assert_eq!(
            judge(&shared, "0", &headers(&sign(&body), Uuid::new_v4()), &body, now),
            Verdict::Unexpected
        );
        let mut tampered = body.clone();
        tampered.push(b' ');
        assert_eq!(
            judge(&shared, "0", &headers(&sign(&body), Uuid::new_v4()), &tampered, now),
            Verdict::InvalidSignature
        );
        assert_eq!(
            judge(&shared, "0", &headers("sha256=zz", Uuid::new_v4()), &body, now),
            Verdict::InvalidSignature
        );
        assert_eq!(
            judge(&shared, "7", &headers(&sign(&body), Uuid::new_v4()), &body, now),
            Verdict::Unexpected
        );

        // The unknown webhook's request is no tenant's.
        let ledger = shared.ledger();
        assert_eq!((ledger.elsewhere.requests, ledger.elsewhere.unexpected), (1, 1));
        let mut tally = ledger.elsewhere.clone();
        tally.add(&ledger.tenants[0].tally);
        assert_eq!(
            (
                tally.requests,
                tally.verified,
                tally.duplicates,
                tally.invalid_signatures,
                tally.unexpected
            ),
            (7, 2, 1, 2, 2)
        );
        assert_eq!(tally.latencies_us.len(), 2);
    }

    #[test]
    fn each_tenant_counts_what_arrives_at_its_own_webhooks() {
        // Tenant 0 has webhooks /hooks/0 and /hooks/1, tenant 1 has /hooks/2.
        let (noisy, quiet) = (Arc::new(Events::generate(2)), Arc::new(Events::generate(2)));
        let shared = Shared::new(
            vec![
                (noisy.clone(), vec![SECRET.to_owned(); 2]),
                (quiet.clone(), vec![SECRET.to_owned()]),
            ],
            Duration::ZERO,
        );
        assert_eq!(
            (
                shared.webhook("0"),
                shared.webhook("1"),
                shared.webhook("2"),
                shared.webhook("3")
            ),
            (Some((0, 0)), Some((0, 1)), Some((1, 0)), None)
        );
        noisy.mark_published(0);
        quiet.mark_published(0);
        let (noisy_body, quiet_body) = (delivered_body(&noisy, 0), delivered_body(&quiet, 0));
        let now = Instant::now();
        let deliver = |path: &str, body: &[u8]| judge(&shared, path, &headers(&sign(body), Uuid::new_v4()), body, now);

        assert_eq!(deliver("1", &noisy_body), Verdict::Verified);
        assert_eq!(deliver("2", &quiet_body), Verdict::Verified);
        // One tenant's event at the other's webhook, either way round.
        assert_eq!(deliver("0", &quiet_body), Verdict::Unexpected);
        assert_eq!(deliver("2", &noisy_body), Verdict::Unexpected);
        assert_eq!(deliver("3", &quiet_body), Verdict::Unexpected);

        let ledger = shared.ledger();
        let counts = |tally: &Tally| {
            (
                tally.requests,
                tally.verified,
                tally.unexpected,
                tally.latencies_us.len(),
            )
        };
        assert_eq!(counts(&ledger.tenants[0].tally), (2, 1, 1, 1));
        assert_eq!(counts(&ledger.tenants[1].tally), (2, 1, 1, 1));
        assert_eq!(counts(&ledger.elsewhere), (1, 0, 1, 0));
    }

    #[test]
    fn the_signature_is_the_seed_documents_hmac() {
        // RFC 4231 test case 2, in the header's format.
        let header = "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        assert!(signature_is_valid(b"Jefe", b"what do ya want for nothing?", header));
        assert!(!signature_is_valid(b"Jefe", b"what do ya want for nothing!", header));
        assert!(!signature_is_valid(
            b"Jefe",
            b"what do ya want for nothing?",
            &header[7..]
        ));
    }
}
