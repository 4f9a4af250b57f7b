//! Data retention: how long a tenant's final events, deliveries and attempts
//! are kept, and when their bodies (the event's payload, the receivers'
//! responses) are dropped ahead of the records.
//!
//! Every decision here is a pure function of the policy and an injected
//! `now`; the storage adapter applies them (`storage::retention`) and the
//! worker process runs the passes (`worker::expiry`).
//!
//! Expiry never touches a pending delivery, nor the event a pending delivery
//! will send: retention counts from creation, and a delivery may still be
//! retrying (or wait behind a paused webhook) after its retention has passed.
//!
//! On PostgreSQL the deliveries and their attempts live in partitions of
//! [`PartitionPlan::width`] by creation time (the time in their UUIDv7 id), so
//! most expiry is dropping a whole partition once every tenant's retention has
//! passed it and nothing in it is pending; rows are deleted one by one only
//! for tenants whose retention is shorter than the longest by at least one
//! partition, from old partitions that a pending delivery holds back, and
//! from the partition that took in the rows older than partitioning
//! ([`row_cutoff`]). On SQLite every expiry deletes rows, in bounded batches.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// How long records and bodies are kept, counted from creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    records: Duration,
    bodies: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RetentionError {
    #[error("{what} must be positive")]
    NotPositive { what: &'static str },
    #[error("{what} of {asked} is outside the allowed {min} to {max}")]
    OutOfBounds {
        what: &'static str,
        asked: HumanDuration,
        min: HumanDuration,
        max: HumanDuration,
    },
    #[error(
        "the body retention ({bodies}) cannot be longer than the record retention ({records}): a record outlives its bodies, never the other way round"
    )]
    BodiesOutliveRecords {
        bodies: HumanDuration,
        records: HumanDuration,
    },
    #[error("the retention bounds are inverted: the minimum {min} is longer than the maximum {max}")]
    InvertedBounds { min: HumanDuration, max: HumanDuration },
}

/// A duration as people write it (`30days`, `2m`), for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl std::fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl Retention {
    pub fn new(records: Duration, bodies: Duration) -> Result<Retention, RetentionError> {
        if records.is_zero() {
            return Err(RetentionError::NotPositive {
                what: "the record retention",
            });
        }
        if bodies.is_zero() {
            return Err(RetentionError::NotPositive {
                what: "the body retention",
            });
        }
        if bodies > records {
            return Err(RetentionError::BodiesOutliveRecords {
                bodies: HumanDuration(bodies),
                records: HumanDuration(records),
            });
        }
        Ok(Retention { records, bodies })
    }

    /// How long final events, deliveries and attempts are kept.
    pub fn records(&self) -> Duration {
        self.records
    }

    /// How long payloads and response bodies are kept (at most `records`).
    pub fn bodies(&self) -> Duration {
        self.bodies
    }

    /// Whether bodies go before their records (then a pass of its own drops them).
    pub fn drops_bodies_early(&self) -> bool {
        self.bodies < self.records
    }

    /// What was created before these instants has passed its retention at `now`.
    pub fn cutoffs(&self, now: DateTime<Utc>) -> Cutoffs {
        Cutoffs {
            records_before: before(now, self.records),
            bodies_before: before(now, self.bodies),
        }
    }
}

/// The instants before which records, and bodies, have passed their retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cutoffs {
    pub records_before: DateTime<Utc>,
    pub bodies_before: DateTime<Utc>,
}

fn before(now: DateTime<Utc>, age: Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(age)
        .ok()
        .and_then(|age| now.checked_sub_signed(age))
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

/// The range an operator lets tenants choose their retention in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    min: Duration,
    max: Duration,
}

impl Bounds {
    pub fn new(min: Duration, max: Duration) -> Result<Bounds, RetentionError> {
        if min > max {
            return Err(RetentionError::InvertedBounds {
                min: HumanDuration(min),
                max: HumanDuration(max),
            });
        }
        Ok(Bounds { min, max })
    }

    pub fn min(&self) -> Duration {
        self.min
    }

    pub fn max(&self) -> Duration {
        self.max
    }

    /// A choice made under earlier bounds, brought within these: bounds an
    /// operator tightens hold for every tenant at once.
    pub fn clamp(&self, chosen: Override) -> Override {
        let within = |duration: Duration| duration.clamp(self.min, self.max);
        Override {
            records: chosen.records.map(within),
            bodies: chosen.bodies.map(within),
        }
    }

    fn check(&self, what: &'static str, asked: Duration) -> Result<(), RetentionError> {
        if asked < self.min || asked > self.max {
            return Err(RetentionError::OutOfBounds {
                what,
                asked: HumanDuration(asked),
                min: HumanDuration(self.min),
                max: HumanDuration(self.max),
            });
        }
        Ok(())
    }
}

/// A tenant's own choice; `None` keeps the operator's default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Override {
    pub records: Option<Duration>,
    pub bodies: Option<Duration>,
}

impl Override {
    pub fn is_default(&self) -> bool {
        self.records.is_none() && self.bodies.is_none()
    }
}

/// The retention a tenant with `chosen` gets. A body retention is never longer
/// than its record retention: a tenant that shortens its records shortens its
/// bodies with them.
pub fn effective(default: Retention, chosen: Override) -> Retention {
    let records = chosen.records.unwrap_or(default.records);
    let bodies = chosen.bodies.unwrap_or(default.bodies).min(records);
    Retention { records, bodies }
}

/// Checks a tenant's choice against the operator's bounds, and returns the
/// retention it would give.
pub fn check_override(default: Retention, bounds: Bounds, chosen: Override) -> Result<Retention, RetentionError> {
    if let Some(records) = chosen.records {
        bounds.check("the record retention", records)?;
    }
    if let Some(bodies) = chosen.bodies {
        bounds.check("the body retention", bodies)?;
        let records = chosen.records.unwrap_or(default.records);
        if bodies > records {
            return Err(RetentionError::BodiesOutliveRecords {
                bodies: HumanDuration(bodies),
                records: HumanDuration(records),
            });
        }
    }
    Ok(effective(default, chosen))
}

/// Before which instant a tenant's final deliveries are deleted row by row.
///
/// `partitions` is `Some((horizon, width))` where whole partitions are dropped
/// (PostgreSQL): the horizon is where the longest retention of any tenant
/// ends, so partitions wholly before it go at once. A tenant whose cutoff is
/// within one partition of the horizon waits for those drops (its records then
/// stay at most two partitions' width past their retention: one for the
/// partition's span, one for the gap to the horizon) instead of deleting rows
/// a drop would take soon after; a tenant with a shorter retention has its
/// rows deleted. Without partitions, every cutoff deletes rows.
pub fn row_cutoff(
    tenant_cutoff: DateTime<Utc>,
    partitions: Option<(DateTime<Utc>, Duration)>,
) -> Option<DateTime<Utc>> {
    match partitions {
        None => Some(tenant_cutoff),
        Some((horizon, width)) => {
            let width = chrono::Duration::from_std(width).unwrap_or(chrono::Duration::MAX);
            (tenant_cutoff - horizon >= width).then_some(tenant_cutoff)
        }
    }
}

/// One partition's range of creation times: `[from, to)`; `from` is `None` for
/// the partition that took in every row older than partitioning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionRange {
    pub from: Option<DateTime<Utc>>,
    pub to: DateTime<Utc>,
}

/// How partitions are laid out: each covers `width` of creation time, and
/// they exist `ahead` of `now` so an insert always finds one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionPlan {
    pub width: Duration,
    pub ahead: Duration,
}

impl PartitionPlan {
    /// Partitions to have ahead: at least three widths, and at least ten
    /// expiry passes, so a pass or two that fail leave inserts a place to go.
    pub fn new(width: Duration, pass_interval: Duration) -> PartitionPlan {
        PartitionPlan {
            width,
            ahead: (width * 3).max(pass_interval * 10),
        }
    }

    pub fn width(&self) -> Duration {
        self.width
    }

    /// The partitions to create, in order, so that the ranges stay contiguous
    /// after the last of `existing` and reach `now + ahead`, each ending on a
    /// multiple of the width since the Unix epoch (whole days end at midnight
    /// UTC). With none existing, the first starts at `now` rounded down.
    pub fn to_create(&self, existing: &[PartitionRange], now: DateTime<Utc>) -> Vec<PartitionRange> {
        let width = chrono::Duration::from_std(self.width).unwrap_or(chrono::Duration::days(1));
        if width <= chrono::Duration::zero() {
            return Vec::new();
        }
        let until = now + chrono::Duration::from_std(self.ahead).unwrap_or(chrono::Duration::days(3));
        let mut from = match existing.iter().map(|range| range.to).max() {
            Some(to) => to,
            None => floor_to(now, width),
        };
        let mut ranges = Vec::new();
        // After a long stop, one partition spans the gap up to now (it stays
        // empty: nothing was written then) instead of one per width.
        let today = floor_to(now, width);
        if from < today - width {
            ranges.push(PartitionRange {
                from: Some(from),
                to: today,
            });
            from = today;
        }
        while from < until {
            // Up to the next multiple of the width: after a partition of odd
            // length (the first one after the migration) they line up again.
            let to = floor_to(from, width) + width;
            ranges.push(PartitionRange { from: Some(from), to });
            from = to;
        }
        ranges
    }
}

/// Whether a partition ends before the horizon (every tenant's retention has
/// passed all of it). It is dropped only if nothing in it is pending, which
/// the storage adapter checks.
pub fn partition_expired(range: PartitionRange, horizon: DateTime<Utc>) -> bool {
    range.to <= horizon
}

/// `at` rounded down to a multiple of `width` since the Unix epoch (whole
/// days start at midnight UTC).
fn floor_to(at: DateTime<Utc>, width: chrono::Duration) -> DateTime<Utc> {
    let width_ms = width.num_milliseconds().max(1);
    let floored = at.timestamp_millis().div_euclid(width_ms) * width_ms;
    DateTime::from_timestamp_millis(floored).unwrap_or(at)
}

/// The longest record retention among the default and every tenant's choice:
/// partitions are dropped after it.
pub fn longest(default: Retention, chosen: impl IntoIterator<Item = Override>) -> Duration {
    chosen
        .into_iter()
        .map(|chosen| effective(default, chosen).records)
        .fold(default.records, Duration::max)
}

/// The point before which every tenant's records have passed their retention.
pub fn horizon(now: DateTime<Utc>, longest: Duration) -> DateTime<Utc> {
    before(now, longest)
}

/// The share of the time expiry spends in its statements while it has a
/// backlog. After each full batch it rests as long again, so a pass's
/// deletes reach the disk spread out, beside the deliveries' own commits,
/// rather than back to back (their WAL flushes are what a delivery's commit
/// would queue behind).
pub const EXPIRY_SHARE: f64 = 0.5;

/// How long expiry rests after a batch that took `took` and left more to do,
/// so that its batches take at most `share` of the time.
pub fn rest_after_batch(took: Duration, share: f64) -> Duration {
    let share = share.clamp(0.01, 1.0);
    took.mul_f64((1.0 - share) / share)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(24 * 3600);

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().expect("an RFC 3339 time")
    }

    fn thirty_days_bodies_seven() -> Retention {
        Retention::new(DAY * 30, DAY * 7).expect("a valid retention")
    }

    #[test]
    fn bodies_cannot_outlive_records_nor_either_be_zero() {
        assert_eq!(
            Retention::new(DAY, DAY * 2),
            Err(RetentionError::BodiesOutliveRecords {
                bodies: HumanDuration(DAY * 2),
                records: HumanDuration(DAY)
            })
        );
        assert!(matches!(
            Retention::new(Duration::ZERO, Duration::ZERO),
            Err(RetentionError::NotPositive { .. })
        ));
        assert!(matches!(
            Retention::new(DAY, Duration::ZERO),
            Err(RetentionError::NotPositive { .. })
        ));
        assert!(Retention::new(DAY, DAY).is_ok());
    }

    #[test]
    fn cutoffs_count_back_from_now() {
        let cutoffs = thirty_days_bodies_seven().cutoffs(at("2026-12-31T12:00:00Z"));
        assert_eq!(cutoffs.records_before, at("2026-12-01T12:00:00Z"));
        assert_eq!(cutoffs.bodies_before, at("2026-12-24T12:00:00Z"));
    }

    #[test]
    fn a_tenant_override_replaces_the_default_and_keeps_bodies_within_records() {
        let default = thirty_days_bodies_seven();
        assert_eq!(effective(default, Override::default()), default);
        let shorter = effective(
            default,
            Override {
                records: Some(DAY * 3),
                bodies: None,
            },
        );
        assert_eq!((shorter.records(), shorter.bodies()), (DAY * 3, DAY * 3));
        let longer_bodies = effective(
            default,
            Override {
                records: None,
                bodies: Some(DAY * 30),
            },
        );
        assert_eq!((longer_bodies.records(), longer_bodies.bodies()), (DAY * 30, DAY * 30));
    }

    #[test]
    fn overrides_outside_the_operators_bounds_are_refused_with_the_bounds_named() {
        let bounds = Bounds::new(DAY, DAY * 90).expect("valid bounds");
        let error = check_override(
            thirty_days_bodies_seven(),
            bounds,
            Override {
                records: Some(DAY * 365),
                bodies: None,
            },
        )
        .expect_err("a year is over the maximum");
        assert_eq!(
            error.to_string(),
            format!(
                "the record retention of {} is outside the allowed 1day to {}",
                humantime::format_duration(DAY * 365),
                humantime::format_duration(DAY * 90)
            )
        );
        assert!(matches!(
            check_override(
                thirty_days_bodies_seven(),
                bounds,
                Override {
                    records: None,
                    bodies: Some(Duration::from_secs(60))
                }
            ),
            Err(RetentionError::OutOfBounds {
                what: "the body retention",
                ..
            })
        ));
        assert!(matches!(
            check_override(
                thirty_days_bodies_seven(),
                bounds,
                Override {
                    records: Some(DAY * 2),
                    bodies: Some(DAY * 3)
                }
            ),
            Err(RetentionError::BodiesOutliveRecords { .. })
        ));
        assert_eq!(
            check_override(
                thirty_days_bodies_seven(),
                bounds,
                Override {
                    records: Some(DAY * 90),
                    bodies: Some(DAY)
                }
            ),
            Retention::new(DAY * 90, DAY)
        );
        assert!(matches!(
            Bounds::new(DAY * 2, DAY),
            Err(RetentionError::InvertedBounds { .. })
        ));
        // A choice made under wider bounds is brought within today's.
        let chosen = Override {
            records: Some(DAY * 365),
            bodies: Some(Duration::from_secs(1)),
        };
        assert_eq!(
            bounds.clamp(chosen),
            Override {
                records: Some(DAY * 90),
                bodies: Some(DAY)
            }
        );
    }

    #[test]
    fn rows_are_deleted_only_a_partition_or_more_before_the_horizon() {
        let now = at("2026-12-31T00:00:00Z");
        let horizon = horizon(now, DAY * 30);
        assert_eq!(row_cutoff(now, None), Some(now));
        // The longest-retention tenants wait for partition drops.
        assert_eq!(row_cutoff(horizon, Some((horizon, DAY))), None);
        assert_eq!(
            row_cutoff(horizon + chrono::Duration::hours(23), Some((horizon, DAY))),
            None
        );
        // A tenant keeping a day or more less has its rows deleted.
        let short = horizon + chrono::Duration::days(1);
        assert_eq!(row_cutoff(short, Some((horizon, DAY))), Some(short));
    }

    #[test]
    fn the_longest_retention_sets_the_horizon() {
        let default = thirty_days_bodies_seven();
        assert_eq!(longest(default, []), DAY * 30);
        let chosen = [
            Override {
                records: Some(DAY * 7),
                bodies: None,
            },
            Override {
                records: Some(DAY * 60),
                bodies: None,
            },
        ];
        assert_eq!(longest(default, chosen), DAY * 60);
        assert_eq!(
            horizon(at("2026-12-31T00:00:00Z"), DAY * 30),
            at("2026-12-01T00:00:00Z")
        );
    }

    #[test]
    fn partitions_are_planned_contiguous_and_ahead_of_now() {
        let plan = PartitionPlan::new(DAY, Duration::from_secs(60));
        assert_eq!(plan.ahead, DAY * 3);
        let now = at("2026-12-03T20:15:00Z");
        let first = plan.to_create(&[], now);
        assert_eq!(
            first
                .iter()
                .map(|range| range.from.expect("a bounded range"))
                .collect::<Vec<_>>(),
            [
                at("2026-12-03T00:00:00Z"),
                at("2026-12-04T00:00:00Z"),
                at("2026-12-05T00:00:00Z"),
                at("2026-12-06T00:00:00Z")
            ]
        );
        assert_eq!(first.last().expect("four").to, at("2026-12-07T00:00:00Z"));
        // Existing ones are continued from their end, and line up at the next midnight.
        let existing = [
            PartitionRange {
                from: None,
                to: at("2026-12-03T07:00:00Z"),
            },
            PartitionRange {
                from: Some(at("2026-12-03T07:00:00Z")),
                to: at("2026-12-04T07:00:00Z"),
            },
        ];
        let next = plan.to_create(&existing, now);
        assert_eq!(
            next.iter()
                .map(|range| (range.from.expect("bounded"), range.to))
                .collect::<Vec<_>>(),
            [
                (at("2026-12-04T07:00:00Z"), at("2026-12-05T00:00:00Z")),
                (at("2026-12-05T00:00:00Z"), at("2026-12-06T00:00:00Z")),
                (at("2026-12-06T00:00:00Z"), at("2026-12-07T00:00:00Z")),
            ]
        );
        assert!(
            plan.to_create(&next, now).is_empty(),
            "nothing more once far enough ahead"
        );
        // After weeks down, one partition spans the gap.
        let weeks_ago = [PartitionRange {
            from: None,
            to: at("2026-11-01T00:00:00Z"),
        }];
        let after_a_gap = plan.to_create(&weeks_ago, now);
        assert_eq!(
            after_a_gap.first().map(|range| (range.from, range.to)),
            Some((Some(at("2026-11-01T00:00:00Z")), at("2026-12-03T00:00:00Z")))
        );
        assert_eq!(after_a_gap.len(), 5, "the gap, then today and three days ahead");
        // Short partitions, as a benchmark uses, stay ten passes ahead.
        let minute = PartitionPlan::new(Duration::from_secs(60), Duration::from_secs(10));
        assert_eq!(minute.ahead, Duration::from_secs(180));
        assert_eq!(minute.to_create(&[], now).len(), 3);
    }

    #[test]
    fn expiry_rests_so_its_batches_take_at_most_their_share() {
        let took = Duration::from_millis(40);
        assert_eq!(rest_after_batch(took, 0.5), took);
        assert_eq!(rest_after_batch(took, 0.25), Duration::from_millis(120));
        assert_eq!(rest_after_batch(took, 1.0), Duration::ZERO);
        // A share out of range is held to (0, 1]: never a negative rest, never
        // an endless one.
        assert_eq!(rest_after_batch(took, 2.0), Duration::ZERO);
        assert_eq!(rest_after_batch(took, 0.0), took * 99);
    }

    #[test]
    fn a_partition_expires_when_it_ends_by_the_horizon() {
        let range = PartitionRange {
            from: Some(at("2026-12-01T00:00:00Z")),
            to: at("2026-12-02T00:00:00Z"),
        };
        assert!(partition_expired(range, at("2026-12-02T00:00:00Z")));
        assert!(!partition_expired(range, at("2026-12-01T23:59:59Z")));
    }
}
