//! Database migrations of Aegis Webhooks: append-only, the same on PostgreSQL and
//! SQLite, applied by `aegis-webhook migrate` (and by `dev` at start).

pub use sea_orm_migration::prelude::*;

mod m20261127_000001_initial;
mod m20261127_000002_secret_rotation;
mod m20261127_000003_auto_disable;
mod m20261127_000004_deliveries_fillfactor;
mod m20261203_000005_scopes_audit;
mod m20261203_000006_portal_sessions;
mod m20261203_000007_retention;
mod m20261203_000008_partitions;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(m20261127_000001_initial::Migration),
            Box::new(m20261127_000002_secret_rotation::Migration),
            Box::new(m20261127_000003_auto_disable::Migration),
            Box::new(m20261127_000004_deliveries_fillfactor::Migration),
            Box::new(m20261203_000005_scopes_audit::Migration),
            Box::new(m20261203_000006_portal_sessions::Migration),
            Box::new(m20261203_000007_retention::Migration),
            Box::new(m20261203_000008_partitions::Migration),
        ]
    }
}
