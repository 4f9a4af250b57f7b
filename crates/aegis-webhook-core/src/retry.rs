//! Delivery policy as pure functions: the retry schedule, the delay before the
//! next attempt, and how an attempt's result is classified.

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
