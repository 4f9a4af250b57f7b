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
//! starting at once never race to create the same one. While a change waits
//! for a table's lock, every statement on that table queues behind it; so a
//! change waits at most [`LOCK_TIMEOUT`] for each lock, then gives up and
//! tries again a little later ([`lock_retries`]), and the deliveries behind
//! it wait tens of milliseconds (a change takes its locks one after the
//! other, two or three), not the length of whatever long query holds the
//! table. What each change locks (PostgreSQL 15 and 16, read off
//! `pg_locks`):
//!
//! - making a partition: it is created alone, then attached
//!   (`SHARE UPDATE EXCLUSIVE` on the parent, which reads and writes pass;
//!   `CREATE TABLE … PARTITION OF` would take `ACCESS EXCLUSIVE`), and the
//!   key to `events` and `webhooks` it inherits takes `SHARE ROW EXCLUSIVE`
//!   on those for a moment (inserts wait, reads pass);
//! - dropping a pair: `ACCESS EXCLUSIVE` on both parents, for the moment of
//!   the drop (detaching first would take the same on `events` and
//!   `webhooks`, whose keys the detached table would then own).

use std::time::Duration;

use aegis_webhook_core::retention::{PartitionPlan, PartitionRange};
use backon::{ConstantBuilder, Retryable as _};
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, DbBackend, Statement, TransactionTrait};
use uuid::Uuid;

use crate::StoreError;

/// The longest a partition change waits for any one table lock before it
/// gives up this try: what a statement queued behind that lock waits at most.
pub const LOCK_TIMEOUT: &str = "20ms";

/// The longest a partition change waits for another process's migration or
/// partition change to end.
const MIGRATION_LOCK_TIMEOUT: &str = "10s";

/// The tries of making partitions whose locks were busy: up to 25, 100–200 ms
/// apart, so the change finds a gap between transactions within a few
/// seconds unless a long one holds the table, and then leaves it to the next
/// pass (or, at a start with no partition for the coming writes, fails).
fn lock_retries() -> ConstantBuilder {
    ConstantBuilder::default()
        .with_delay(Duration::from_millis(100))
        .with_max_times(24)
        .with_jitter()
}

/// The tries of a drop whose locks were busy: a few only, as a drop is never
/// urgent (the next pass tries again) and each try may hold the table's
/// statements for a moment.
fn drop_retries() -> ConstantBuilder {
    lock_retries().with_max_times(4)
}

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
/// Its locks are tried for at most [`LOCK_TIMEOUT`] each, again and again
/// ([`lock_retries`]). If they stay busy while the existing partitions still
/// reach a width past `now`, that is fine: the next pass makes them.
/// Otherwise it is an error (a process then fails to start, and is
/// restarted).
pub async fn ensure(db: &DatabaseConnection, plan: PartitionPlan, now: DateTime<Utc>) -> Result<usize, StoreError> {
    if db.get_database_backend() != DbBackend::Postgres {
        return Ok(0);
    }
    let made = (|| try_ensure(db, plan, now))
        .retry(lock_retries())
        .when(is_lock_timeout_store)
        .await;
    match made {
        Err(error) if is_lock_timeout_store(&error) => {
            let reach = list(db).await?.last().map(|last| last.range.to);
            let width = chrono::Duration::from_std(plan.width()).unwrap_or(chrono::Duration::days(1));
            if reach.is_some_and(|reach| reach > now + width) {
                tracing::warn!("making the next partitions waited too long for a lock; the next pass makes them");
                Ok(0)
            } else {
                Err(StoreError::Unexpected(anyhow::anyhow!(
                    "could not make the deliveries' partitions: their locks stayed busy through every try, and none is made for the coming writes"
                )))
            }
        }
        other => other,
    }
}

/// One try of [`ensure`], in its own transaction. Its commit does not wait
/// for the WAL flush: the attaches hold `events` and `webhooks` against
/// inserts until the commit ends, and a stalled flush would hold the
/// ingester that long. Nothing is risked: WAL is flushed in order, so any
/// write into a new partition that committed durably made its creation
/// durable too; a creation lost in a crash before any such write is made
/// again by the next pass.
async fn try_ensure(db: &DatabaseConnection, plan: PartitionPlan, now: DateTime<Utc>) -> Result<usize, StoreError> {
    let transaction = db.begin().await?;
    let made = async {
        transaction
            .execute_unprepared("SET LOCAL synchronous_commit = off")
            .await?;
        take_ddl_locks(&transaction).await?;
        ensure_in(&transaction, plan, now).await
    }
    .await;
    crate::end(transaction, made).await
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
    // Each table is made alone and then attached, which leaves the parents
    // open to reads and writes (see the module's head). The deliveries'
    // attaches come last, all of them, as the first one locks `events` and
    // `webhooks` against inserts until the commit. `LIKE … INCLUDING ALL`
    // carries whatever a parent may gain (checks, generated columns,
    // storage settings), which an attach would otherwise refuse or lose;
    // the indexes come with the attach. The attempts' foreign key is the
    // pair's own, not the parents': so dropping the pair checks nothing and
    // scans nothing (a key on the parents would make every drop scan all
    // attempts, under the parents' exclusive locks).
    let (mut made, mut attached) = (String::new(), String::new());
    for range in &missing {
        let from = range.from.unwrap_or(DateTime::<Utc>::MIN_UTC);
        let partition = Partition {
            suffix: format!("p{}", from.format("%Y%m%dt%H%M%S")),
            range: *range,
        };
        let (deliveries, attempts) = (partition.of("deliveries"), partition.of("delivery_attempts"));
        let bounds = format!("FOR VALUES FROM ('{}') TO ('{}')", bound_at(from), bound_at(range.to));
        made.push_str(&format!(
            "CREATE TABLE {deliveries} (LIKE deliveries INCLUDING ALL EXCLUDING INDEXES) {DELIVERIES_STORAGE};
             ALTER TABLE {deliveries} ADD PRIMARY KEY (id);
             CREATE TABLE {attempts} (LIKE delivery_attempts INCLUDING ALL EXCLUDING INDEXES);
             ALTER TABLE {attempts} ADD CONSTRAINT {attempts}_delivery
                 FOREIGN KEY (delivery_id) REFERENCES {deliveries} (id) ON DELETE CASCADE;
             ALTER TABLE delivery_attempts ATTACH PARTITION {attempts} {bounds};\n"
        ));
        attached.push_str(&format!(
            "ALTER TABLE deliveries ATTACH PARTITION {deliveries} {bounds};\n"
        ));
    }
    if !missing.is_empty() {
        transaction.execute_unprepared(&made).await?;
        transaction.execute_unprepared(&attached).await?;
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
    let dropped = (|| drop_once(db, &partition))
        .retry(drop_retries())
        .when(is_lock_timeout)
        .await;
    match dropped {
        Ok(true) => Ok(Expired::Dropped(partition)),
        Ok(false) => Ok(Expired::HeldByPending(partition)),
        Err(error) if is_lock_timeout(&error) => Ok(Expired::Busy(partition)),
        Err(error) => Err(error.into()),
    }
}

/// One try of [`drop_expired`], in its own transaction (ended at once
/// either way: its lock on the partition keeps every write out of it). A
/// drop held back by a pending delivery commits nothing but that lock's end.
async fn drop_once(db: &DatabaseConnection, partition: &Partition) -> Result<bool, sea_orm::DbErr> {
    let transaction = db.begin().await?;
    let dropped = try_drop(&transaction, partition).await;
    crate::end(transaction, dropped).await
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

/// What every change to the partitions starts with: the migration lock, so
/// partitions are never made or dropped by two processes at once (waited for
/// up to [`MIGRATION_LOCK_TIMEOUT`]: waiting for it holds up no traffic),
/// then table locks waited for at most [`LOCK_TIMEOUT`] from here on. No
/// statement timeout (an api process's connections carry one): these
/// waits are bounded by the lock timeouts, and a statement timeout would
/// end them with an error the retries do not know.
async fn take_ddl_locks(transaction: &sea_orm::DatabaseTransaction) -> Result<(), sea_orm::DbErr> {
    transaction
        .execute_unprepared(&format!(
            "SET LOCAL statement_timeout = 0;
             SET LOCAL lock_timeout = '{MIGRATION_LOCK_TIMEOUT}';
             SELECT pg_advisory_xact_lock({});
             SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'",
            crate::MIGRATION_LOCK
        ))
        .await?;
    Ok(())
}

/// Whether PostgreSQL gave up waiting for a lock (SQLSTATE 55P03).
fn is_lock_timeout(error: &sea_orm::DbErr) -> bool {
    is_lock_timeout_text(&error.to_string())
}

fn is_lock_timeout_store(error: &StoreError) -> bool {
    matches!(error, StoreError::Unexpected(error) if is_lock_timeout_text(&format!("{error:#}")))
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
