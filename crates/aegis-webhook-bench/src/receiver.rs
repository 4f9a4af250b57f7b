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

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::net::TcpListener;
use uuid::Uuid;

use crate::events::Events;

/// What the receiver has seen so far.
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
}

#[derive(Debug)]
struct Ledger {
    tally: Tally,
    delivery_ids: HashSet<Uuid>,
    /// `pairs[event * webhooks + webhook]`: whether that delivery arrived.
    pairs: Vec<bool>,
}

#[derive(Debug)]
struct Shared {
    events: Arc<Events>,
    /// HMAC keys, by webhook index: the secrets' UTF-8 bytes.
    secrets: Vec<Vec<u8>>,
    response_delay: Duration,
    ledger: Mutex<Ledger>,
}

impl Shared {
    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // A panic while holding the lock cannot leave the counts half-updated
        // in a way worth refusing to report.
        self.ledger.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
    /// Starts on `127.0.0.1:0`; `secrets[i]` is webhook `i`'s signing secret.
    pub async fn start(
        events: Arc<Events>,
        secrets: Vec<String>,
        response_delay: Duration,
    ) -> anyhow::Result<Receiver> {
        let pairs = events.len() as usize * secrets.len();
        let shared = Arc::new(Shared {
            events,
            secrets: secrets.into_iter().map(String::into_bytes).collect(),
            response_delay,
            ledger: Mutex::new(Ledger {
                tally: Tally::default(),
                delivery_ids: HashSet::with_capacity(pairs),
                pairs: vec![false; pairs],
            }),
        });
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

    /// The URL webhook `index` is created with.
    pub fn url(&self, index: usize) -> String {
        format!("http://{}/hooks/{index}", self.addr)
    }

    /// Everything seen so far.
    pub fn tally(&self) -> Tally {
        self.shared.ledger().tally.clone()
    }

    /// The counts only (no latencies), cheap enough for a progress display.
    pub fn counts(&self) -> Tally {
        let ledger = self.shared.ledger();
        let tally = &ledger.tally;
        Tally {
            requests: tally.requests,
            verified: tally.verified,
            duplicates: tally.duplicates,
            invalid_signatures: tally.invalid_signatures,
            unexpected: tally.unexpected,
            latencies_us: Vec::new(),
            last_verified_at: tally.last_verified_at,
        }
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
    ledger.tally.requests += 1;
    ledger.tally.unexpected += 1;
    StatusCode::NOT_FOUND
}

fn judge(shared: &Shared, webhook: &str, headers: &HeaderMap, body: &[u8], at: Instant) -> Verdict {
    let webhook = webhook
        .parse::<usize>()
        .ok()
        .filter(|index| *index < shared.secrets.len());
    let signed = webhook.is_some_and(|index| {
        headers
            .get("x-aegis-signature")
            .and_then(|value| value.to_str().ok())
            .is_some_and(|header| signature_is_valid(&shared.secrets[index], body, header))
    });
    let delivery_id = headers
        .get("x-aegis-delivery")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<Uuid>().ok());
    let event = shared.events.identify(body);

    let mut ledger = shared.ledger();
    ledger.tally.requests += 1;
    let verdict = match (webhook, signed, delivery_id, event) {
        (Some(_), false, _, _) => Verdict::InvalidSignature,
        (Some(webhook), true, Some(delivery_id), Some(event)) => {
            if !ledger.delivery_ids.insert(delivery_id) {
                Verdict::Duplicate
            } else {
                let pair = event as usize * shared.secrets.len() + webhook;
                if std::mem::replace(&mut ledger.pairs[pair], true) {
                    Verdict::Unexpected
                } else {
                    Verdict::Verified
                }
            }
        }
        _ => Verdict::Unexpected,
    };
    match verdict {
        Verdict::Verified => {
            let tally = &mut ledger.tally;
            tally.verified += 1;
            tally.last_verified_at = Some(at);
            if let Some(latency) = event.and_then(|event| shared.events.latency(event, at)) {
                tally
                    .latencies_us
                    .push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
            }
        }
        Verdict::Duplicate => ledger.tally.duplicates += 1,
        Verdict::InvalidSignature => ledger.tally.invalid_signatures += 1,
        Verdict::Unexpected => ledger.tally.unexpected += 1,
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

    fn sign(body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).expect("any key");
        mac.update(body);
        format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
    }

    fn shared(events: u32, webhooks: usize) -> (Shared, Arc<Events>) {
        let events = Arc::new(Events::generate(events));
        let shared = Shared {
            events: events.clone(),
            secrets: vec![SECRET.as_bytes().to_vec(); webhooks],
            response_delay: Duration::ZERO,
            ledger: Mutex::new(Ledger {
                tally: Tally::default(),
                delivery_ids: HashSet::new(),
                pairs: vec![false; events.len() as usize * webhooks],
            }),
        };
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

        let tally = shared.ledger().tally.clone();
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
