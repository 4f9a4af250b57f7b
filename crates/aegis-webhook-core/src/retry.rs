//! Delivery policy as pure functions: the retry schedule, the delay before the
//! next attempt, how an attempt's result is classified, and [`decide`], which
//! puts them together into what follows one attempt. Time and randomness are
//! arguments, so every outcome is unit-tested without a network or a clock.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

/// The delays before each attempt: the first entry is the delay of attempt 1
/// (usually zero), the last that of the final attempt. Its length is the number
/// of attempts a delivery gets before it is marked `FAILED`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "ScheduleSpec")]
pub struct RetrySchedule(Vec<Duration>);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("retry schedule must have at least one attempt")]
    Empty,
    #[error("retry schedule entry `{0}` is not a duration such as `5s`, `1m` or `2h`")]
    BadDuration(String),
}

impl RetrySchedule {
    pub fn new(delays: Vec<Duration>) -> Result<Self, ScheduleError> {
        if delays.is_empty() {
            return Err(ScheduleError::Empty);
        }
        Ok(RetrySchedule(delays))
    }

    /// How many attempts a delivery gets in all.
    pub fn max_attempts(&self) -> u32 {
        u32::try_from(self.0.len()).unwrap_or(u32::MAX)
    }

    /// The scheduled delay before `attempt` (1-based), or `None` past the last one.
    pub fn delay_before(&self, attempt: u32) -> Option<Duration> {
        let index = usize::try_from(attempt.checked_sub(1)?).ok()?;
        self.0.get(index).copied()
    }

    pub fn delays(&self) -> &[Duration] {
        &self.0
    }
}

impl Default for RetrySchedule {
    /// Immediately, 5 s, 1 min, 5 min, 30 min, 2 h, 5 h, 10 h, 14 h, 20 h, 24 h:
    /// eleven attempts over about three days.
    fn default() -> Self {
        const MINUTE: u64 = 60;
        const HOUR: u64 = 60 * MINUTE;
        RetrySchedule(
            [
                0,
                5,
                MINUTE,
                5 * MINUTE,
                30 * MINUTE,
                2 * HOUR,
                5 * HOUR,
                10 * HOUR,
                14 * HOUR,
                20 * HOUR,
                24 * HOUR,
            ]
            .into_iter()
            .map(Duration::from_secs)
            .collect(),
        )
    }
}

impl fmt::Debug for RetrySchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_string())
    }
}

impl fmt::Display for RetrySchedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|delay| humantime::format_duration(*delay).to_string())
            .collect();
        f.write_str(&parts.join(","))
    }
}

impl FromStr for RetrySchedule {
    type Err = ScheduleError;

    /// A comma-separated list such as `0s,5s,1m` (what `AEGIS_RETRY_SCHEDULE` holds).
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let delays = text
            .split(',')
            .map(str::trim)
            .filter(|part| !part.is_empty())
            .map(|part| humantime::parse_duration(part).map_err(|_| ScheduleError::BadDuration(part.to_owned())))
            .collect::<Result<Vec<_>, _>>()?;
        RetrySchedule::new(delays)
    }
}

/// Configuration may give the schedule as a list or as one comma-separated string.
#[derive(Deserialize)]
#[serde(untagged)]
enum ScheduleSpec {
    Text(String),
    List(Vec<String>),
}

impl TryFrom<ScheduleSpec> for RetrySchedule {
    type Error = ScheduleError;

    fn try_from(spec: ScheduleSpec) -> Result<Self, Self::Error> {
        match spec {
            ScheduleSpec::Text(text) => text.parse(),
            ScheduleSpec::List(parts) => parts.join(",").parse(),
        }
    }
}

/// What one HTTP attempt came to, before any retry decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptClass {
    /// Any 2xx.
    Success,
    /// 410 Gone: the receiver asks us to stop; the webhook is disabled.
    Gone,
    /// Everything else: timeouts, connection errors, 3xx (redirects are never
    /// followed), 4xx and 5xx. Receivers deploy fixes, so 4xx retry too.
    Retryable,
}

/// Classifies an attempt by its status code, `None` when no response arrived.
pub fn classify(status: Option<u16>) -> AttemptClass {
    match status {
        Some(200..=299) => AttemptClass::Success,
        Some(410) => AttemptClass::Gone,
        _ => AttemptClass::Retryable,
    }
}

/// Reads a `Retry-After` value: delay-seconds or an HTTP-date (RFC 9110).
/// Anything else, or a date in the past, is `None`.
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    (at.with_timezone(&chrono::Utc) - now).to_std().ok()
}

/// How a receiver's own wishes bend the schedule: `Retry-After` is honoured up to
/// `retry_after_max`, and a rate-limited (429) or timed-out attempt waits at least
/// `throttled_floor`, so a struggling receiver is not hit again at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backpressure {
    pub retry_after_max: Duration,
    pub throttled_floor: Duration,
}

impl Default for Backpressure {
    fn default() -> Self {
        Backpressure {
            retry_after_max: Duration::from_secs(3600),
            throttled_floor: Duration::from_secs(5),
        }
    }
}

impl Backpressure {
    /// The delay before the next attempt given the schedule's `scheduled` delay,
    /// what the receiver asked for, and whether it throttled or timed out. Never
    /// shorter than the schedule.
    pub fn apply(&self, scheduled: Duration, retry_after: Option<Duration>, throttled: bool) -> Duration {
        let asked = retry_after.map_or(Duration::ZERO, |asked| asked.min(self.retry_after_max));
        let floor = if throttled {
            self.throttled_floor
        } else {
            Duration::ZERO
        };
        scheduled.max(asked).max(floor)
    }
}

/// Jitter only ever adds delay, at most this fraction of the scheduled delay, so
/// that receivers recovering from an outage are not hit by every retry at once.
pub const MAX_JITTER_FRACTION: f64 = 0.1;

/// The delay before attempt `next_attempt`, or `None` when the schedule is spent.
/// `jitter` is a number in `[0, 1)` (random in production, fixed in tests).
pub fn next_delay(schedule: &RetrySchedule, next_attempt: u32, jitter: f64) -> Option<Duration> {
    let base = schedule.delay_before(next_attempt)?;
    Some(base.mul_f64(1.0 + MAX_JITTER_FRACTION * jitter.clamp(0.0, 1.0)))
}

/// What the retry decision needs to know of one HTTP attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observed<'a> {
    /// The status code, `None` when no response arrived (connection refused or
    /// reset, TLS failure, no status line within the timeout).
    pub status: Option<u16>,
    /// No complete answer within the request timeout (a status may still have
    /// arrived before the body stalled).
    pub timed_out: bool,
    /// `Retry-After`, as the receiver sent it.
    pub retry_after: Option<&'a str>,
}

/// The schedule and how far receivers may bend it: everything [`decide`]
/// applies besides the attempt's own result.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RetryPolicy {
    pub schedule: RetrySchedule,
    pub backpressure: Backpressure,
}

/// What follows one attempt of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A 2xx: the delivery succeeded.
    Delivered,
    /// The attempt failed and attempt `next_attempt` is due at `at`, `delay` from now.
    Retry {
        next_attempt: u32,
        delay: Duration,
        at: chrono::DateTime<chrono::Utc>,
    },
    /// The last attempt failed: the delivery fails and is dead-lettered.
    Exhausted { reason: String },
    /// The receiver answered 410 Gone: the delivery fails and the webhook is disabled.
    Gone { reason: String },
}

/// Decides what follows attempt `attempt` (1-based) given what it came to.
/// `now` is when the answer arrived (a `Retry-After` date is read against it);
/// `jitter` is a number in `[0, 1)`, random in production.
pub fn decide(
    observed: Observed<'_>,
    attempt: u32,
    policy: &RetryPolicy,
    now: chrono::DateTime<chrono::Utc>,
    jitter: f64,
) -> Decision {
    match classify(observed.status) {
        AttemptClass::Success => Decision::Delivered,
        AttemptClass::Gone => Decision::Gone {
            reason: "the receiver answered 410 Gone; the webhook was disabled".to_owned(),
        },
        AttemptClass::Retryable => {
            let next_attempt = attempt.saturating_add(1);
            let Some(scheduled) = next_delay(&policy.schedule, next_attempt, jitter) else {
                return Decision::Exhausted {
                    reason: format!("all {attempt} attempts failed"),
                };
            };
            let retry_after = observed.retry_after.and_then(|value| parse_retry_after(value, now));
            let throttled = observed.status == Some(429) || observed.timed_out;
            let delay = policy.backpressure.apply(scheduled, retry_after, throttled);
            Decision::Retry {
                next_attempt,
                delay,
                at: now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::MAX),
            }
        }
    }
}

/// When a failing webhook is turned off: after `after_failures` failed
/// deliveries in a row (retries exhausted, not single attempts) that span at
/// least `after`, so that neither a short outage nor a burst of events sent
/// during one disables a webhook. Any success resets the streak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AutoDisable {
    /// Zero turns auto-disable off.
    pub after_failures: u32,
    pub after: Duration,
}

impl AutoDisable {
    pub const NEVER: AutoDisable = AutoDisable {
        after_failures: 0,
        after: Duration::ZERO,
    };

    /// The reason to disable a webhook whose streak is `failures` long and began
    /// at `failing_since`, or `None` to keep it.
    pub fn reason(
        &self,
        failures: u32,
        failing_since: chrono::DateTime<chrono::Utc>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Option<String> {
        let span = (now - failing_since).to_std().unwrap_or(Duration::ZERO);
        (self.after_failures > 0 && failures >= self.after_failures && span >= self.after).then(|| {
            format!(
                "disabled automatically: {failures} deliveries in a row failed since {}",
                failing_since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_schedule_is_eleven_attempts_over_about_three_days() {
        let schedule = RetrySchedule::default();
        assert_eq!(schedule.max_attempts(), 11);
        assert_eq!(schedule.delay_before(1), Some(Duration::ZERO));
        assert_eq!(schedule.delay_before(2), Some(Duration::from_secs(5)));
        assert_eq!(schedule.delay_before(11), Some(Duration::from_secs(24 * 3600)));
        assert_eq!(schedule.delay_before(12), None);
        assert_eq!(schedule.delay_before(0), None);
        let total: Duration = schedule.delays().iter().sum();
        assert!(total > Duration::from_secs(75 * 3600) && total < Duration::from_secs(77 * 3600));
    }

    #[test]
    fn schedules_parse_from_text_and_print_back() {
        let schedule: RetrySchedule = "0s, 100ms,1m".parse().expect("valid");
        assert_eq!(
            schedule.delays(),
            [Duration::ZERO, Duration::from_millis(100), Duration::from_secs(60)]
        );
        assert_eq!(schedule.to_string(), "0s,100ms,1m");
        assert_eq!("".parse::<RetrySchedule>(), Err(ScheduleError::Empty));
        assert_eq!(
            "5s,soon".parse::<RetrySchedule>(),
            Err(ScheduleError::BadDuration("soon".to_owned()))
        );
    }

    #[test]
    fn jitter_only_adds_delay_and_is_bounded() {
        let schedule = RetrySchedule::default();
        assert_eq!(next_delay(&schedule, 2, 0.0), Some(Duration::from_secs(5)));
        assert_eq!(next_delay(&schedule, 2, 0.5), Some(Duration::from_millis(5250)));
        assert_eq!(next_delay(&schedule, 2, 7.0), Some(Duration::from_millis(5500)));
        assert_eq!(next_delay(&schedule, 2, -1.0), Some(Duration::from_secs(5)));
        assert_eq!(next_delay(&schedule, 12, 0.5), None);
    }

    #[test]
    fn retry_after_reads_seconds_and_http_dates() {
        let now = chrono::DateTime::parse_from_rfc3339("2026-11-27T10:00:00Z")
            .expect("valid")
            .with_timezone(&chrono::Utc);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(" 120 ", now), Some(Duration::from_secs(120)));
        assert_eq!(
            parse_retry_after("Fri, 27 Nov 2026 10:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Fri, 27 Nov 2026 09:00:00 GMT", now),
            None,
            "in the past"
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
    }

    #[test]
    fn backpressure_only_lengthens_the_schedule_within_bounds() {
        let policy = Backpressure {
            retry_after_max: Duration::from_secs(60),
            throttled_floor: Duration::from_secs(5),
        };
        let second = Duration::from_secs(1);
        assert_eq!(policy.apply(second, None, false), second);
        assert_eq!(
            policy.apply(second, Some(Duration::from_secs(2)), false),
            Duration::from_secs(2)
        );
        assert_eq!(
            policy.apply(Duration::from_secs(30), Some(Duration::from_secs(2)), false),
            Duration::from_secs(30)
        );
        assert_eq!(
            policy.apply(second, Some(Duration::from_secs(3600)), false),
            Duration::from_secs(60),
            "clamped"
        );
        assert_eq!(
            policy.apply(Duration::ZERO, None, true),
            Duration::from_secs(5),
            "floor for 429/timeouts"
        );
    }

    #[test]
    fn outcomes_are_classified_by_status() {
        assert_eq!(classify(Some(200)), AttemptClass::Success);
        assert_eq!(classify(Some(204)), AttemptClass::Success);
        assert_eq!(classify(Some(299)), AttemptClass::Success);
        assert_eq!(classify(Some(301)), AttemptClass::Retryable);
        assert_eq!(classify(Some(400)), AttemptClass::Retryable);
        assert_eq!(classify(Some(410)), AttemptClass::Gone);
        assert_eq!(classify(Some(429)), AttemptClass::Retryable);
        assert_eq!(classify(Some(503)), AttemptClass::Retryable);
        assert_eq!(classify(None), AttemptClass::Retryable);
    }

    fn at(text: &str) -> chrono::DateTime<chrono::Utc> {
        chrono::DateTime::parse_from_rfc3339(text)
            .expect("valid")
            .with_timezone(&chrono::Utc)
    }

    /// Three attempts, 0 s, 10 s, 60 s; Retry-After honoured up to 5 min; 429
    /// and timeouts wait at least 30 s.
    fn policy() -> RetryPolicy {
        RetryPolicy {
            schedule: "0s,10s,60s".parse().expect("valid"),
            backpressure: Backpressure {
                retry_after_max: Duration::from_secs(300),
                throttled_floor: Duration::from_secs(30),
            },
        }
    }

    fn answered(status: u16) -> Observed<'static> {
        Observed {
            status: Some(status),
            timed_out: false,
            retry_after: None,
        }
    }

    fn retry_in(seconds: u64, next_attempt: u32, now: chrono::DateTime<chrono::Utc>) -> Decision {
        let delay = Duration::from_secs(seconds);
        Decision::Retry {
            next_attempt,
            delay,
            at: now + chrono::Duration::from_std(delay).expect("small"),
        }
    }

    #[test]
    fn every_2xx_is_delivered_on_any_attempt_even_with_a_stalled_body() {
        let now = at("2026-12-01T10:00:00Z");
        for status in [200, 201, 202, 204, 299] {
            for attempt in [1, 3] {
                assert_eq!(
                    decide(answered(status), attempt, &policy(), now, 0.5),
                    Decision::Delivered
                );
            }
        }
        let stalled_body = Observed {
            timed_out: true,
            ..answered(200)
        };
        assert_eq!(decide(stalled_body, 1, &policy(), now, 0.0), Decision::Delivered);
    }

    #[test]
    fn redirects_and_other_4xx_retry_on_the_schedule_with_jitter_that_only_adds() {
        let now = at("2026-12-01T10:00:00Z");
        for status in [301, 302, 307, 400, 401, 404, 422] {
            assert_eq!(
                decide(answered(status), 1, &policy(), now, 0.0),
                retry_in(10, 2, now),
                "{status}"
            );
        }
        // Jitter adds at most a tenth of the scheduled delay.
        assert_eq!(
            decide(answered(400), 2, &policy(), now, 0.5),
            Decision::Retry {
                next_attempt: 3,
                delay: Duration::from_secs(63),
                at: at("2026-12-01T10:01:03Z"),
            }
        );
    }

    #[test]
    fn gone_disables_whatever_the_attempt() {
        let now = at("2026-12-01T10:00:00Z");
        for attempt in [1, 2, 3] {
            assert!(
                matches!(decide(answered(410), attempt, &policy(), now, 0.5), Decision::Gone { reason } if reason.contains("410 Gone"))
            );
        }
    }

    #[test]
    fn server_errors_and_timeouts_of_requests_retry_and_honour_retry_after_within_bounds() {
        let now = at("2026-12-01T10:00:00Z");
        for status in [408, 500, 502, 503, 504] {
            assert_eq!(
                decide(answered(status), 1, &policy(), now, 0.0),
                retry_in(10, 2, now),
                "{status}"
            );
            let asked = Observed {
                retry_after: Some("120"),
                ..answered(status)
            };
            assert_eq!(decide(asked, 1, &policy(), now, 0.0), retry_in(120, 2, now), "{status}");
            let asked_too_much = Observed {
                retry_after: Some("86400"),
                ..answered(status)
            };
            assert_eq!(
                decide(asked_too_much, 1, &policy(), now, 0.0),
                retry_in(300, 2, now),
                "{status}: clamped"
            );
            let asked_less = Observed {
                retry_after: Some("1"),
                ..answered(status)
            };
            assert_eq!(
                decide(asked_less, 2, &policy(), now, 0.0),
                retry_in(60, 3, now),
                "{status}: never sooner than the schedule"
            );
        }
        let dated = Observed {
            retry_after: Some("Tue, 01 Dec 2026 10:02:00 GMT"),
            ..answered(503)
        };
        assert_eq!(
            decide(dated, 1, &policy(), now, 0.0),
            retry_in(120, 2, now),
            "an HTTP-date"
        );
        let nonsense = Observed {
            retry_after: Some("soon"),
            ..answered(503)
        };
        assert_eq!(
            decide(nonsense, 1, &policy(), now, 0.0),
            retry_in(10, 2, now),
            "ignored"
        );
    }

    #[test]
    fn rate_limits_wait_at_least_the_throttled_floor_and_honour_retry_after() {
        let now = at("2026-12-01T10:00:00Z");
        assert_eq!(decide(answered(429), 1, &policy(), now, 0.0), retry_in(30, 2, now));
        let asked = Observed {
            retry_after: Some("90"),
            ..answered(429)
        };
        assert_eq!(decide(asked, 1, &policy(), now, 0.0), retry_in(90, 2, now));
    }

    #[test]
    fn timeouts_wait_at_least_the_throttled_floor_and_connection_errors_follow_the_schedule() {
        let now = at("2026-12-01T10:00:00Z");
        let timed_out = Observed {
            status: None,
            timed_out: true,
            retry_after: None,
        };
        assert_eq!(decide(timed_out, 1, &policy(), now, 0.0), retry_in(30, 2, now));
        let refused = Observed {
            status: None,
            timed_out: false,
            retry_after: None,
        };
        assert_eq!(decide(refused, 1, &policy(), now, 0.0), retry_in(10, 2, now));
    }

    #[test]
    fn the_last_attempt_exhausts_the_delivery_whatever_the_receiver_asks() {
        let now = at("2026-12-01T10:00:00Z");
        let exhausted = Decision::Exhausted {
            reason: "all 3 attempts failed".to_owned(),
        };
        let asked = Observed {
            retry_after: Some("5"),
            ..answered(503)
        };
        let refused = Observed {
            status: None,
            timed_out: false,
            retry_after: None,
        };
        for observed in [answered(500), answered(429), answered(301), asked, refused] {
            assert_eq!(decide(observed, 3, &policy(), now, 0.9), exhausted, "{observed:?}");
        }
        // A one-attempt schedule never retries.
        let once = RetryPolicy {
            schedule: "0s".parse().expect("valid"),
            ..policy()
        };
        assert_eq!(
            decide(answered(500), 1, &once, now, 0.0),
            Decision::Exhausted {
                reason: "all 1 attempts failed".to_owned()
            }
        );
    }

    #[test]
    fn auto_disable_needs_both_the_count_and_the_span() {
        let policy = AutoDisable {
            after_failures: 100,
            after: Duration::from_secs(24 * 3600),
        };
        let since = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .expect("valid")
            .with_timezone(&chrono::Utc);
        let day_later = since + chrono::Duration::hours(24);
        assert_eq!(policy.reason(99, since, day_later), None, "one failure short");
        assert_eq!(
            policy.reason(100, since, day_later - chrono::Duration::seconds(1)),
            None,
            "a second short of the span"
        );
        let reason = policy.reason(100, since, day_later).expect("disabled");
        assert_eq!(
            reason,
            "disabled automatically: 100 deliveries in a row failed since 2026-01-01T00:00:00Z"
        );
        let off = AutoDisable {
            after_failures: 0,
            after: Duration::ZERO,
        };
        assert_eq!(off.reason(u32::MAX, since, day_later), None, "zero turns it off");
    }
}
