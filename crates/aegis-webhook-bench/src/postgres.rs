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
