//! Per-credential limits: how fast (a GCRA rate with a burst, `governor`) and
//! how many at once each API key may make requests, and how fast each ingest
//! token may post events. A request over a limit is answered 429 with
//! `Retry-After` before it costs anything but the key lookup.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use governor::clock::{Clock as _, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use uuid::Uuid;

/// The configured limits (`AEGIS_API_RATE_LIMIT` and friends).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitSettings {
    pub api_rate: u32,
    pub api_burst: u32,
    pub api_concurrent: u32,
    pub intake_rate: u32,
    pub intake_burst: u32,
}

/// Why a request was turned away, and when to come back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over the rate: the next request is allowed after this long.
    Rate(Duration),
    /// Too many requests of this key in progress.
    Concurrency,
}

impl Refusal {
    /// The whole seconds of `Retry-After` (at least 1).
    pub fn retry_after_secs(self) -> u64 {
        match self {
            Refusal::Rate(wait) => (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1),
            Refusal::Concurrency => 1,
        }
    }
}

pub struct Limits {
    api_rate: DefaultKeyedRateLimiter<Uuid>,
    intake_rate: DefaultKeyedRateLimiter<[u8; 32]>,
    api_concurrent: u32,
    in_progress: Mutex<HashMap<Uuid, Arc<Semaphore>>>,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits").finish_non_exhaustive()
    }
}

fn quota(rate: u32, burst: u32) -> Quota {
    let rate = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(rate).allow_burst(burst)
}

impl Limits {
    pub fn new(settings: LimitSettings) -> Self {
        Limits {
            api_rate: RateLimiter::keyed(quota(settings.api_rate, settings.api_burst)),
            intake_rate: RateLimiter::keyed(quota(settings.intake_rate, settings.intake_burst)),
            api_concurrent: settings.api_concurrent.max(1),
            in_progress: Mutex::new(HashMap::new()),
        }
    }

    /// Admits one request of API key `key_id`, or says why not. The permit is
    /// the key's slot until the request ends.
    pub fn admit_api(&self, key_id: Uuid) -> Result<OwnedSemaphorePermit, Refusal> {
        if let Err(not_until) = self.api_rate.check_key(&key_id) {
            return Err(Refusal::Rate(not_until.wait_time_from(DefaultClock::default().now())));
        }
        let slots = {
            let mut in_progress = self
                .in_progress
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            in_progress
                .entry(key_id)
                .or_insert_with(|| Arc::new(Semaphore::new(self.api_concurrent as usize)))
                .clone()
        };
        slots.try_acquire_owned().map_err(|_| Refusal::Concurrency)
    }

    /// Admits one event posted with an ingest token (keyed by the token's
    /// hash, so several tokens would each have their own budget).
    pub fn admit_intake(&self, token_hash: [u8; 32]) -> Result<(), Refusal> {
        self.intake_rate
            .check_key(&token_hash)
            .map_err(|not_until| Refusal::Rate(not_until.wait_time_from(DefaultClock::default().now())))
    }
}

/// Logs a recurring condition at most once per interval, with how many times
/// it happened since the last line: a flood of the same failure becomes one
/// line every few seconds, not one per request.
#[derive(Debug)]
pub struct LogThrottle {
    interval: Duration,
    started: Instant,
    /// Milliseconds since `started` of the last line; u64::MAX before the first.
    last: AtomicU64,
    since_last: AtomicU64,
}

impl LogThrottle {
    pub fn new(interval: Duration) -> Self {
        LogThrottle {
            interval,
            started: Instant::now(),
            last: AtomicU64::new(u64::MAX),
            since_last: AtomicU64::new(0),
        }
    }

    /// Counts one occurrence; returns how many to report when a line is due.
    pub fn hit(&self, now: Instant) -> Option<u64> {
        let count = self.since_last.fetch_add(1, Ordering::Relaxed) + 1;
        let now_ms = u64::try_from(now.saturating_duration_since(self.started).as_millis()).unwrap_or(u64::MAX - 1);
        let last = self.last.load(Ordering::Relaxed);
        let due = last == u64::MAX || now_ms.saturating_sub(last) >= self.interval.as_millis() as u64;
        if due
            && self
                .last
                .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.since_last.fetch_sub(count, Ordering::Relaxed);
            return Some(count);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> LimitSettings {
        LimitSettings {
            api_rate: 1,
            api_burst: 3,
            api_concurrent: 2,
            intake_rate: 1,
            intake_burst: 2,
        }
    }

    #[test]
    fn a_key_gets_its_burst_then_waits_and_keys_do_not_share_budgets() {
        let limits = Limits::new(LimitSettings {
            api_concurrent: 100,
            ..settings()
        });
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        let mut permits = Vec::new();
        for _ in 0..3 {
            permits.push(limits.admit_api(a).expect("within the burst"));
        }
        let refusal = limits.admit_api(a).expect_err("over the burst");
        assert!(matches!(refusal, Refusal::Rate(wait) if wait <= Duration::from_secs(1)));
        assert_eq!(refusal.retry_after_secs(), 1);
        assert!(limits.admit_api(b).is_ok(), "another key has its own budget");
    }

    #[test]
    fn a_key_has_a_bounded_number_of_requests_in_progress() {
        let limits = Limits::new(LimitSettings {
            api_rate: 1000,
            api_burst: 1000,
            ..settings()
        });
        let key = Uuid::now_v7();
        let first = limits.admit_api(key).expect("slot 1");
        let _second = limits.admit_api(key).expect("slot 2");
        assert_eq!(limits.admit_api(key).expect_err("no slot"), Refusal::Concurrency);
        drop(first);
        assert!(limits.admit_api(key).is_ok(), "a finished request frees its slot");
    }

    #[test]
    fn intake_tokens_are_rate_limited() {
        let limits = Limits::new(settings());
        let token = [7u8; 32];
        assert!(limits.admit_intake(token).is_ok());
        assert!(limits.admit_intake(token).is_ok());
        assert!(matches!(limits.admit_intake(token), Err(Refusal::Rate(_))));
    }

    #[test]
    fn a_throttled_log_reports_once_per_interval_with_the_count() {
        let throttle = LogThrottle::new(Duration::from_secs(10));
        let start = Instant::now();
        assert_eq!(throttle.hit(start), Some(1));
        for _ in 0..41 {
            assert_eq!(throttle.hit(start + Duration::from_secs(5)), None);
        }
        assert_eq!(throttle.hit(start + Duration::from_secs(11)), Some(42));
        assert_eq!(throttle.hit(start + Duration::from_secs(12)), None);
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(Refusal::Rate(Duration::from_millis(1)).retry_after_secs(), 1);
        assert_eq!(Refusal::Rate(Duration::from_millis(1500)).retry_after_secs(), 2);
        assert_eq!(Refusal::Rate(Duration::from_secs(2)).retry_after_secs(), 2);
        assert_eq!(Refusal::Rate(Duration::ZERO).retry_after_secs(), 1);
    }
}
