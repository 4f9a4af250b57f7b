//! Storage: connecting, migrating, and the repository functions over the
//! [`entities`]. The same code runs on PostgreSQL and SQLite.
//!
//! Repository functions take any `ConnectionTrait`, so callers can compose them
//! inside one transaction (the ingester's fan-out does).

pub mod audit;
pub mod deliveries;
pub mod entities;
pub mod events;
pub mod partitions;
pub mod portal;
pub mod retention;
pub mod tenants;
pub mod webhooks;
pub mod write_gate;

use std::path::Path;

use aegis_webhook_core::retention::PartitionPlan;
use aegis_webhook_migration::{Migrator, MigratorTrait};
use anyhow::Context as _;
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DbBackend, DbErr, TransactionTrait};

/// Failures callers branch on, and everything else.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// What was looked up by id does not exist (for this tenant).
    #[error("not found")]
    NotFound,
    /// The write would clash with what is stored (a name or key taken).
    #[error("{0}")]
    Conflict(String),
    /// The input itself is unacceptable, whatever is stored.
    #[error("{0}")]
    Invalid(String),
    /// No database connection came free in time: the database is busy, not
    /// broken, and the same call may succeed a moment later.
    #[error("the database is busy")]
    Busy,
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

impl From<DbErr> for StoreError {
    fn from(error: DbErr) -> Self {
        if matches!(error, DbErr::ConnectionAcquire(sea_orm::error::ConnAcquireErr::Timeout)) {
            return StoreError::Busy;
        }
        StoreError::Unexpected(anyhow::Error::new(error).context("database error"))
    }
}

/// Begins a transaction that will write. On SQLite it takes the write lock at
/// once (`BEGIN IMMEDIATE`): a deferred transaction that reads first and then
/// writes cannot wait for the lock (its snapshot could be stale) and fails
/// with "database is locked" whenever another connection writes meanwhile.
/// PostgreSQL ignores the mode.
pub async fn begin_write(db: &DatabaseConnection) -> Result<sea_orm::DatabaseTransaction, StoreError> {
    let options = sea_orm::TransactionOptions {
        sqlite_transaction_mode: Some(sea_orm::SqliteTransactionMode::Immediate),
        ..Default::default()
    };
    Ok(db.begin_with_options(options).await?)
}

/// Ends `transaction` as `outcome` says, now rather than when it is dropped
/// (a dropped transaction's rollback waits for the connection's next use,
/// and its locks with it): commits what succeeded, rolls back what failed.
/// A rollback that fails is logged; the outcome's error is the one returned.
pub(crate) async fn end<T, E: From<DbErr>>(
    transaction: sea_orm::DatabaseTransaction,
    outcome: Result<T, E>,
) -> Result<T, E> {
    match outcome {
        Ok(value) => {
            transaction.commit().await?;
            Ok(value)
        }
        Err(error) => {
            if let Err(rollback) = transaction.rollback().await {
                tracing::warn!(error = %rollback, "a transaction that failed could not be rolled back");
            }
            Err(error)
        }
    }
}

/// How long a SQLite statement waits for another connection's write lock.
pub const SQLITE_BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Opens the database at `url`, creating the SQLite file (and its folder) when
/// needed.
pub async fn connect(url: &str) -> anyhow::Result<DatabaseConnection> {
    connect_with(url, 16).await
}

/// [`connect`] with at most `max_connections` PostgreSQL connections.
pub async fn connect_with(url: &str, max_connections: u32) -> anyhow::Result<DatabaseConnection> {
    connect_pool(url, max_connections, max_connections.clamp(1, 4), None).await
}

/// [`connect_with`], where PostgreSQL cancels any statement that runs
/// longer than `statement_timeout` (each connection's `statement_timeout`,
/// set when it opens). For a process whose callers stop waiting after a
/// deadline: a statement they abandoned does not run on in the server.
/// SQLite: the same as [`connect_with`].
pub async fn connect_bounded(
    url: &str,
    max_connections: u32,
    statement_timeout: std::time::Duration,
) -> anyhow::Result<DatabaseConnection> {
    connect_pool(
        url,
        max_connections,
        max_connections.clamp(1, 4),
        Some(statement_timeout),
    )
    .await
}

/// [`connect_with`], keeping `standing` PostgreSQL connections open from the
/// start, each with `statement_timeout` if given.
async fn connect_pool(
    url: &str,
    max_connections: u32,
    standing: u32,
    statement_timeout: Option<std::time::Duration>,
) -> anyhow::Result<DatabaseConnection> {
    if let Some(parent) = sqlite_path(url)
        .and_then(|path| Path::new(path).parent())
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("failed to create the database folder {}", parent.display()))?;
    }
    let mut options = ConnectOptions::new(url.to_owned());
    options.sqlx_logging(false);
    // The pool's default pings every connection it hands out: a round trip
    // before each statement or transaction. Ping only connections idle long
    // enough to have been dropped by the server or a proxy; a hot one that
    // broke anyway fails its statement, and the caller retries.
    options.test_before_acquire_if_idle_for(std::time::Duration::from_secs(30));
    if sqlite_path(url).is_some() {
        // One writer at a time is SQLite's rule; a small pool avoids lock
        // convoys while WAL lets readers proceed beside the writer.
        options.max_connections(4);
        // Settings of each connection, not of the file: a `PRAGMA` run
        // through the pool reaches only the connection that happened to run
        // it. In WAL mode `NORMAL` syncs at checkpoints, not at every commit:
        // a commit can be lost to a power cut or an OS crash (not to the
        // process crashing), which the embedded mode accepts for its speed.
        options.map_sqlx_sqlite_opts(|sqlite| {
            sqlite
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .foreign_keys(true)
                .busy_timeout(SQLITE_BUSY_TIMEOUT)
        });
    } else {
        options.max_connections(max_connections.max(1));
        // Opening a PostgreSQL connection takes up to ~100 ms on a busy
        // machine: opened on demand, each one stalls the request that needed
        // it (the steady benchmark's p99). Keep a few open from the start.
        options.min_connections(standing.clamp(1, max_connections.max(1)));
        if let Some(timeout) = statement_timeout {
            // A `SET` as each connection opens, rather than a startup
            // parameter, which connection poolers such as PgBouncer refuse.
            // In milliseconds, within PostgreSQL's range (an `int`).
            let millis = timeout.as_millis().clamp(1, i32::MAX as u128);
            let set = format!("SET statement_timeout = {millis}");
            options.map_sqlx_postgres_pool_opts(move |pool| {
                let set = set.clone();
                pool.after_connect(move |connection, _| {
                    let set = set.clone();
                    Box::pin(async move {
                        sea_orm::sqlx::Executor::execute(connection, sea_orm::sqlx::AssertSqlSafe(set))
                            .await
                            .map(|_| ())
                    })
                })
            });
        }
    }
    let db = Database::connect(options)
        .await
        .with_context(|| format!("failed to connect to the database at {}", redact_url(url)))?;
    if db.get_database_backend() == DbBackend::Postgres {
        // Open the pool's standing connections now, together, rather than
        // while the first requests wait for them.
        let warm = (0..standing.clamp(1, max_connections.max(1))).map(|_| db.execute_unprepared("SELECT 1"));
        futures::future::try_join_all(warm)
            .await
            .context("failed to open the database connections")?;
    }
    Ok(db)
}

/// Where a role runs its bulk lanes' work: the bulk runtime (see
/// `aegis_webhook_core::bulk_runtime`) and a PostgreSQL pool opened on it.
#[derive(Clone, Debug)]
pub struct BulkStage {
    pub runtime: tokio::runtime::Handle,
    pub db: DatabaseConnection,
}

impl BulkStage {
    /// Opens the bulk lanes' pool, of at most `max_connections`, on
    /// `runtime`, so its sockets are driven there. One connection stands
    /// open; the others are opened when a flood needs them (a bulk batch
    /// can wait for a connect), so idle processes hold few connections.
    pub async fn open(runtime: tokio::runtime::Handle, url: &str, max_connections: u32) -> anyhow::Result<Self> {
        let url = url.to_owned();
        let db = runtime
            .spawn(async move { connect_pool(&url, max_connections, 1, None).await })
            .await
            .context("the bulk lanes' database pool was not opened")??;
        Ok(BulkStage { runtime, db })
    }

    pub async fn close(self) -> anyhow::Result<()> {
        self.db
            .close()
            .await
            .context("failed to close the bulk lanes' database pool")
    }
}

/// Key of the PostgreSQL advisory lock that `migrate` holds: "aegis_mi" in ASCII.
pub const MIGRATION_LOCK: i64 = 0x6165_6769_735f_6d69;

/// Applies every pending migration. On PostgreSQL, runs that start together
/// (two `migrate` Jobs, a Job beside an operator's manual run) take turns:
/// the whole run is one transaction holding an advisory lock, so the next one
/// waits for it, then finds nothing pending. What follows from one
/// transaction: each migration is a savepoint in it, so a failing migration
/// rolls back the others of the same run too (the database is never left
/// half-way); a run waits for the lock as long as the one before takes; and a
/// migration that cannot run in a transaction (`CREATE INDEX CONCURRENTLY`)
/// must not be added without changing this. A SQLite file belongs to one
/// process, `dev`, which migrates it once at start.
///
/// Then, on PostgreSQL, the partitions `plan` wants now are made
/// ([`partitions::ensure`]), so the database takes deliveries at once.
pub async fn migrate(db: &DatabaseConnection, plan: PartitionPlan) -> anyhow::Result<()> {
    if db.get_database_backend() != DbBackend::Postgres {
        return Migrator::up(db, None)
            .await
            .context("failed to apply database migrations");
    }
    let transaction = db.begin().await.context("failed to begin the migration transaction")?;
    transaction
        .execute_unprepared(&format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
        .await
        .context("failed to take the migration lock")?;
    Migrator::up(&transaction, None)
        .await
        .context("failed to apply database migrations")?;
    // In the same transaction: writes that waited for the migration's locks
    // find their partition the moment it commits.
    partitions::ensure_in(&transaction, plan, chrono::Utc::now())
        .await
        .context("failed to make the deliveries' partitions")?;
    transaction
        .commit()
        .await
        .context("failed to commit the database migrations")
}

/// The smallest UUIDv7 of the millisecond `at`: every row id is a UUIDv7, so
/// "created at or after `at`" is a range of an index on the id.
pub(crate) fn first_v7_id_at(at: chrono::DateTime<chrono::Utc>) -> uuid::Uuid {
    let millis = u64::try_from(at.timestamp_millis()).unwrap_or_default();
    uuid::Builder::from_unix_timestamp_millis(millis, &[0; 10]).into_uuid()
}

/// When a UUIDv7 was made; `None` for any other kind of UUID.
pub fn v7_created_at(id: uuid::Uuid) -> Option<chrono::DateTime<chrono::Utc>> {
    if id.get_version_num() != 7 {
        return None;
    }
    let (seconds, nanos) = id.get_timestamp()?.to_unix();
    chrono::DateTime::from_timestamp(i64::try_from(seconds).ok()?, nanos)
}

/// `ids` for an `IN (…)` list, padded to the next power of two by repeating the
/// last one (which changes no result). Each list length is its own statement
/// text, prepared and planned anew; padded, a batch of any size is one of a
/// few texts, which the connection's statement cache keeps.
pub(crate) fn in_list<T: Clone>(ids: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut ids: Vec<T> = ids.into_iter().collect();
    if let Some(last) = ids.last().cloned() {
        ids.resize(ids.len().next_power_of_two(), last);
    }
    ids
}

fn sqlite_path(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split('?').next().unwrap_or(rest);
    (path != ":memory:" && !path.is_empty()).then_some(path)
}

/// The URL without its password, for error messages and logs.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) if parsed.password().is_some() => {
            let _ = parsed.set_password(Some("redacted"));
            parsed.to_string()
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use crate::*;

    #[test]
    fn sqlite_paths_are_found_in_urls() {
        assert_eq!(
            sqlite_path("sqlite://aegis-data/aegis.db?mode=rwc"),
            Some("aegis-data/aegis.db")
        );
        assert_eq!(sqlite_path("sqlite::memory:"), None);
        assert_eq!(sqlite_path("postgres://localhost/db"), None);
    }

    #[test]
    fn in_lists_come_in_powers_of_two_of_the_same_ids() {
        let ids: Vec<uuid::Uuid> = (0..5).map(|_| uuid::Uuid::now_v7()).collect();
        let padded = in_list(ids.clone());
        assert_eq!(padded.len(), 8);
        assert_eq!(&padded[..5], &ids[..]);
        assert!(padded[5..].iter().all(|id| *id == ids[4]));
        assert_eq!(in_list(ids[..4].to_vec()).len(), 4);
        assert!(in_list(Vec::<uuid::Uuid>::new()).is_empty());
    }

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact_url("postgres://aegis:hunter2@db:5432/aegis"),
            "postgres://aegis:redacted@db:5432/aegis"
        );
    }
}
