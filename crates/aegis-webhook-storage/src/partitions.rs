//! The time partitions of `deliveries` and `delivery_attempts` (PostgreSQL;
//! on SQLite every function here does nothing).
//!
//! Both tables are partitioned by a delivery's id, a UUIDv7 whose first 48
//! bits are its creation time in milliseconds: `deliveries` by `id`,
//! `delivery_attempts` by `delivery_id`, over the same ranges, so a delivery
//! and its attempts share a range and go together. A range's bounds are the
//! UUIDs whose first 48 bits are its start and end in milliseconds and whose
//! other bits are zero. The ranges themselves are decided by
//! `core::retention` (pure); this module reads what exists, creates what is
//! missing and drops what has expired.
//!
//! Partitions are made and dropped under the migration lock, so processes
//! starting at once never race to create the same one. A drop waits at most
//! [`LOCK_TIMEOUT`] for its locks (dropping takes the parents'), so it
//! never holds up the deliveries behind a long query: it gives up and the
//! next pass tries again.

use aegis_webhook_core::retention::{PartitionPlan, PartitionRange};
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, TransactionTrait};
use uuid::Uuid;

use crate::StoreError;

/// The longest a partition drop waits for a lock before it gives up for this pass.
pub const LOCK_TIMEOUT: &str = "200ms";

/// Storage parameters of every deliveries partition: room on each page for the
/// claim's update to stay heap-only (see migration 4).
const DELIVERIES_STORAGE: &str = "WITH (fillfactor = 70)";

/// A partition of `deliveries` (its twin in `delivery_attempts` has the same
/// range and the name with `delivery_attempts` in front).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// The name without the table's: `p20261203t000000` or `legacy`.
    pub suffix: String,
    pub range: PartitionRange,
}

impl Partition {
    fn of(&self, table: &str) -> String {
        format!("{table}_{}", self.suffix)
    }
}

/// The bound of a range at `at`: the first 48 bits its Unix time in
/// milliseconds, the rest zero; below every UUIDv7 made in that millisecond.
pub fn bound_at(at: DateTime<Utc>) -> Uuid {
    let millis = u128::try_from(at.timestamp_millis()).unwrap_or_default();
    Uuid::from_u128(millis << 80)
}

/// The time of a bound (the first 48 bits of any UUID, as milliseconds).
fn time_of_bound(bound: Uuid) -> Option<DateTime<Utc>> {
    let millis = i64::try_from(bound.as_u128() >> 80).ok()?;
    DateTime::from_timestamp_millis(millis)
}

/// A partition's range from PostgreSQL's text of its bound
/// (`FOR VALUES FROM ('…') TO ('…')`, `MINVALUE` for the open start).
fn parse_bound(text: &str) -> Option<PartitionRange> {
    let rest = text.trim().strip_prefix("FOR VALUES FROM (")?;
    let (from, rest) = rest.split_once(") TO (")?;
    let to = rest.strip_suffix(')')?;
    let uuid = |literal: &str| -> Option<Uuid> { literal.trim().trim_matches('\'').parse().ok() };
    let from = match from.trim() {
        "MINVALUE" => None,
        literal => Some(time_of_bound(uuid(literal)?)?),
    };
    Some(PartitionRange {
        from,
        to: time_of_bound(uuid(to)?)?,
    })
}

/// The partitions of `deliveries`, by the end of their range. Empty on SQLite.
pub async fn list(db: &impl ConnectionTrait) -> Result<Vec<Partition>, StoreError> {
    if db.get_database_backend() != DbBackend::Postgres {
        return Ok(Vec::new());
    }
    let rows = db
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT c.relname::text AS name, pg_get_expr(c.relpartbound, c.oid) AS bound \
             FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid \
             WHERE i.inhparent = 'deliveries'::regclass",
        ))
        .await?;
    let mut partitions = Vec::with_capacity(rows.len());
    for row in rows {
        let name: String = row.try_get("", "name")?;
        let bound: String = row.try_get("", "bound")?;
        let range = parse_bound(&bound).ok_or_else(|| {
            StoreError::Unexpected(anyhow::anyhow!(
                "partition {name} has a bound this code cannot read: {bound}"
            ))
        })?;
        let suffix = name.strip_prefix("deliveries_").unwrap_or(&name).to_owned();
        partitions.push(Partition { suffix, range });
    }
    partitions.sort_by_key(|partition| partition.range.to);
    Ok(partitions)
}

/// Creates the partitions `plan` wants by `now` that do not exist yet, under
/// the migration lock; returns how many. Nothing on SQLite.
///
/// Making a partition locks both parents exclusively for a moment, so it
/// waits at most [`LOCK_TIMEOUT`] behind a long reader (a backup, a slow
/// query) rather than queueing all traffic behind it. If it gives up while
/// the existing partitions still reach a width past `now`, that is fine: the
/// next pass makes them. Otherwise it is an error (a process then fails to
/// start, and is restarted).
pub async fn ensure(db: &DatabaseConnection, plan: PartitionPlan, now: DateTime<Utc>) -> Result<usize, StoreError> {
    if db.get_database_backend() != DbBackend::Postgres {
        return Ok(0);
    }
    let transaction = db.begin().await?;
    let made = async {
        take_ddl_locks(&transaction).await?;
        ensure_in(&transaction, plan, now).await
    }
    .await;
    match made {
        Ok(made) => {
            transaction.commit().await?;
            Ok(made)
        }
        Err(StoreError::Unexpected(error)) if is_lock_timeout_text(&format!("{error:#}")) => {
            transaction.rollback().await?;
            let reach = list(db).await?.last().map(|last| last.range.to);
            let width = chrono::Duration::from_std(plan.width()).unwrap_or(chrono::Duration::days(1));
            if reach.is_some_and(|reach| reach > now + width) {
                tracing::warn!("making the next partitions waited too long for a lock; the next pass makes them");
                Ok(0)
            } else {
                Err(StoreError::Unexpected(anyhow::anyhow!(
                    "could not make the deliveries' partitions: a lock stayed busy for {LOCK_TIMEOUT}, and none is made for the coming writes"
                )))
            }
        }
        Err(error) => {
            transaction.rollback().await?;
            Err(error)
        }
    }
}

/// [`ensure`] inside a transaction that already holds the migration lock
/// (the migration's own, so that the database takes writes the moment it
/// commits).
pub async fn ensure_in(
    transaction: &sea_orm::DatabaseTransaction,
    plan: PartitionPlan,
    now: DateTime<Utc>,
) -> Result<usize, StoreError> {
    let existing: Vec<PartitionRange> = list(transaction).await?.into_iter().map(|p| p.range).collect();
    let missing = plan.to_create(&existing, now);
    for range in &missing {
        let from = range.from.unwrap_or(DateTime::<Utc>::MIN_UTC);
        let partition = Partition {
            suffix: format!("p{}", from.format("%Y%m%dt%H%M%S")),
            range: *range,
        };
        let (deliveries, attempts) = (partition.of("deliveries"), partition.of("delivery_attempts"));
        let (lower, upper) = (bound_at(from), bound_at(range.to));
        // The attempts' foreign key is the pair's own, not the parents': so
        // dropping the pair checks nothing and scans nothing (a key on the
        // parents would make every drop scan all attempts, under the
        // parents' exclusive locks).
        transaction
            .execute_unprepared(&format!(
                "CREATE TABLE {deliveries} PARTITION OF deliveries FOR VALUES FROM ('{lower}') TO ('{upper}') {DELIVERIES_STORAGE};
                 CREATE TABLE {attempts} PARTITION OF delivery_attempts FOR VALUES FROM ('{lower}') TO ('{upper}');
                 ALTER TABLE {attempts} ADD CONSTRAINT {attempts}_delivery
                     FOREIGN KEY (delivery_id) REFERENCES {deliveries} (id) ON DELETE CASCADE;"
            ))
            .await?;
    }
    Ok(missing.len())
}

/// What became of an expired partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expired {
    /// Dropped, with its attempts.
    Dropped(Partition),
    /// Kept: a delivery in it is still pending. Its final rows are deleted
    /// one by one meanwhile (`retention::delete_final_deliveries_between`).
    HeldByPending(Partition),
    /// Its locks were busy; the next pass tries again.
    Busy(Partition),
}

/// Drops `partition` (which must have expired) with its attempts, unless a
/// delivery in it is pending. The pending check and the drop hold the
/// partition's lock, so no redelivery can reopen one of its deliveries
/// between them.
pub async fn drop_expired(db: &DatabaseConnection, partition: Partition) -> Result<Expired, StoreError> {
    if db.get_database_backend() != DbBackend::Postgres {
        return Ok(Expired::HeldByPending(partition));
    }
    let transaction = db.begin().await?;
    let outcome = match try_drop(&transaction, &partition).await {
        Ok(true) => Ok(Expired::Dropped(partition)),
        Ok(false) => Ok(Expired::HeldByPending(partition)),
        Err(error) if is_lock_timeout(&error) => Ok(Expired::Busy(partition)),
        Err(error) => Err(error),
    };
    // Ended here, not on drop: a dropped transaction's rollback waits for the
    // connection's next use, and until then its lock would keep every write
    // out of the partition.
    match outcome {
        Ok(Expired::Dropped(partition)) => {
            transaction.commit().await?;
            Ok(Expired::Dropped(partition))
        }
        other => {
            transaction.rollback().await?;
            Ok(other?)
        }
    }
}

/// Drops the partition's pair if nothing in it is pending; `false` if
/// something is. The partition is locked against writes (`SHARE`) before
/// the check, so the check holds until the drop.
async fn try_drop(transaction: &sea_orm::DatabaseTransaction, partition: &Partition) -> Result<bool, sea_orm::DbErr> {
    let (deliveries, attempts) = (partition.of("deliveries"), partition.of("delivery_attempts"));
    take_ddl_locks(transaction).await?;
    transaction
        .execute_unprepared(&format!("LOCK TABLE {deliveries} IN SHARE MODE"))
        .await?;
    let pending = transaction
        .query_one_raw(Statement::from_string(
            DbBackend::Postgres,
            format!("SELECT 1 AS pending FROM {deliveries} WHERE status = 'PENDING' LIMIT 1"),
        ))
        .await?;
    if pending.is_some() {
        return Ok(false);
    }
    // The pair's only key is between the two, so this checks and scans nothing.
    transaction
        .execute_unprepared(&format!("DROP TABLE {attempts}, {deliveries}"))
        .await?;
    Ok(true)
}

/// What every change to the partitions starts with: table locks waited for
/// at most [`LOCK_TIMEOUT`] from here on, then the migration lock, so
/// partitions are never made or dropped by two processes at once.
async fn take_ddl_locks(transaction: &sea_orm::DatabaseTransaction) -> Result<(), sea_orm::DbErr> {
    transaction
        .execute_unprepared(&format!(
            "SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'; SELECT pg_advisory_xact_lock({})",
            crate::MIGRATION_LOCK
        ))
        .await?;
    Ok(())
}

/// Whether PostgreSQL gave up waiting for a lock (SQLSTATE 55P03).
fn is_lock_timeout(error: &sea_orm::DbErr) -> bool {
    is_lock_timeout_text(&error.to_string())
}

fn is_lock_timeout_text(text: &str) -> bool {
    text.contains("lock timeout") || text.contains("55P03")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().expect("an RFC 3339 time")
    }

    #[test]
    fn bounds_carry_their_time_in_the_first_48_bits_and_sort_below_its_ids() {
        let start = at("2026-12-03T00:00:00Z");
        let bound = bound_at(start);
        assert_eq!(time_of_bound(bound), Some(start));
        let made_then = crate::first_v7_id_at(start);
        assert!(
            bound <= made_then,
            "a UUIDv7 of the bound's millisecond is inside its range"
        );
        let made_before = crate::first_v7_id_at(start - chrono::Duration::milliseconds(1));
        assert!(made_before < bound);
    }

    #[test]
    fn postgres_bound_texts_are_read_back_as_ranges() {
        let from = bound_at(at("2026-12-03T00:00:00Z"));
        let to = bound_at(at("2026-12-04T00:00:00Z"));
        assert_eq!(
            parse_bound(&format!("FOR VALUES FROM ('{from}') TO ('{to}')")),
            Some(PartitionRange {
                from: Some(at("2026-12-03T00:00:00Z")),
                to: at("2026-12-04T00:00:00Z"),
            })
        );
        assert_eq!(
            parse_bound(&format!("FOR VALUES FROM (MINVALUE) TO ('{to}')")),
            Some(PartitionRange {
                from: None,
                to: at("2026-12-04T00:00:00Z"),
            })
        );
        assert_eq!(parse_bound("DEFAULT"), None);
        assert_eq!(parse_bound("FOR VALUES FROM ('nonsense') TO ('x')"), None);
    }
}
