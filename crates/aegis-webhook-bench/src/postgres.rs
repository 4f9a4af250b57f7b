//! A throwaway PostgreSQL database per production run, created on the server
//! and dropped at the end.
//!
//! Names are `aegis_bench_<unix seconds>_<random>`; a database of this form
//! older than [`STALE_AFTER`] was left by a benchmark that could not clean up
//! (killed with SIGKILL), and the next run drops it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};

const PREFIX: &str = "aegis_bench_";

/// Far longer than any run; younger databases may belong to a run in progress.
const STALE_AFTER: Duration = Duration::from_secs(6 * 3600);

#[derive(Debug)]
pub struct FreshDatabase {
    /// The server without a database name: `postgres://user@host:port`.
    server: String,
    pub name: String,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or_default()
}

async fn admin(server: &str) -> anyhow::Result<DatabaseConnection> {
    Database::connect(format!("{server}/postgres")).await.with_context(|| {
        format!(
            "PostgreSQL is unreachable at {server}; start it (scripts/services.sh) or pass --postgres-url \
             (trust auth, a user allowed to create databases)"
        )
    })
}

impl FreshDatabase {
    pub async fn create(server: &str) -> anyhow::Result<FreshDatabase> {
        let admin = admin(server).await?;
        drop_stale(&admin).await;
        let name = format!("{PREFIX}{}_{}", unix_now(), uuid::Uuid::new_v4().simple());
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("failed to create database {name} on {server}"))?;
        admin
            .close()
            .await
            .context("failed to close the PostgreSQL admin connection")?;
        Ok(FreshDatabase {
            server: server.to_owned(),
            name,
        })
    }

    /// What `AEGIS_DATABASE_URL` is set to.
    pub fn url(&self) -> String {
        format!("{}/{}", self.server, self.name)
    }

    /// Drops the database, ending any connection still open to it.
    pub async fn drop_database(self) -> anyhow::Result<()> {
        let admin = admin(&self.server).await?;
        admin
            .execute_unprepared(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name))
            .await
            .with_context(|| format!("failed to drop database {}", self.name))?;
        admin
            .close()
            .await
            .context("failed to close the PostgreSQL admin connection")?;
        Ok(())
    }
}

/// Drops benchmark databases older than [`STALE_AFTER`]; best effort.
async fn drop_stale(admin: &DatabaseConnection) {
    let backend = admin.get_database_backend();
    let query = format!("SELECT datname FROM pg_database WHERE datname LIKE '{PREFIX}%'");
    let Ok(rows) = admin.query_all_raw(Statement::from_string(backend, query)).await else {
        return;
    };
    let now = unix_now();
    for row in rows {
        let Ok(name) = row.try_get::<String>("", "datname") else {
            continue;
        };
        let created = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('_').next())
            .and_then(|secs| secs.parse::<u64>().ok());
        if created.is_some_and(|created| now.saturating_sub(created) > STALE_AFTER.as_secs()) {
            let _ = admin
                .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .await;
        }
    }
}

/// How much the growing tables hold at one moment: bytes on disk (with their
/// indexes and TOAST, every partition summed) and rows; and the database's
/// connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TableSizes {
    pub events_bytes: u64,
    pub deliveries_bytes: u64,
    pub attempts_bytes: u64,
    pub events: u64,
    pub deliveries: u64,
    pub attempts: u64,
    /// WAL written by the whole server so far (`pg_stat_wal`): its growth
    /// over a run, divided by the deliveries, is what one delivery writes.
    pub wal_bytes: u64,
    /// Whether the server's autovacuum is on: the space of deleted rows
    /// (expiry deletes `events` rows) is reused only once they are vacuumed.
    pub autovacuum: bool,
    /// Connections to the run's database at that moment, and how many of
    /// them are TLS: the clients' default (`sslmode=prefer`) encrypts
    /// whenever the server offers it, so figures from a server that does
    /// and one that does not are told apart by the report.
    pub connections: u64,
    pub tls_connections: u64,
}

/// Reads [`TableSizes`] of the database at `url`.
pub async fn table_sizes(db: &DatabaseConnection) -> anyhow::Result<TableSizes> {
    let backend = db.get_database_backend();
    // pg_partition_tree lists nothing for a plain table (`events`), so its
    // own size stands in for the sum.
    let query = "SELECT \
        (SELECT coalesce(sum(pg_total_relation_size(relid)), pg_total_relation_size('events')) FROM pg_partition_tree('events'))::bigint AS events_bytes, \
        (SELECT coalesce(sum(pg_total_relation_size(relid)), pg_total_relation_size('deliveries')) FROM pg_partition_tree('deliveries'))::bigint AS deliveries_bytes, \
        (SELECT coalesce(sum(pg_total_relation_size(relid)), pg_total_relation_size('delivery_attempts')) FROM pg_partition_tree('delivery_attempts'))::bigint AS attempts_bytes, \
        (SELECT count(*) FROM events) AS events, \
        (SELECT count(*) FROM deliveries) AS deliveries, \
        (SELECT count(*) FROM delivery_attempts) AS attempts, \
        (SELECT wal_bytes FROM pg_stat_wal)::bigint AS wal_bytes, \
        current_setting('autovacuum')::bool AS autovacuum, \
        (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()) AS connections, \
        (SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s ON s.pid = a.pid \
            WHERE a.datname = current_database() AND s.ssl) AS tls_connections";
    let row = db
        .query_one_raw(Statement::from_string(backend, query))
        .await
        .context("failed to read the table sizes")?
        .context("the table sizes query answered no row")?;
    let get = |column: &str| -> anyhow::Result<u64> {
        let value: i64 = row
            .try_get("", column)
            .with_context(|| format!("table sizes: {column}"))?;
        Ok(u64::try_from(value).unwrap_or_default())
    };
    Ok(TableSizes {
        events_bytes: get("events_bytes")?,
        deliveries_bytes: get("deliveries_bytes")?,
        attempts_bytes: get("attempts_bytes")?,
        events: get("events")?,
        deliveries: get("deliveries")?,
        attempts: get("attempts")?,
        wal_bytes: get("wal_bytes")?,
        autovacuum: row.try_get("", "autovacuum").context("table sizes: autovacuum")?,
        connections: get("connections")?,
        tls_connections: get("tls_connections")?,
    })
}
