//! Room in each `deliveries` page for the claim's update to be HOT (heap-only):
//! a claim changes only `locked_until`, which no index covers, so with free
//! space on the page PostgreSQL writes no index entries for it. Every delivery
//! is claimed at least once, so this saves a write to each of the table's four
//! indexes per attempt. PostgreSQL only; SQLite has no such setting.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        manager
            .get_connection()
            .execute_unprepared("ALTER TABLE deliveries SET (fillfactor = 70)")
            .await?;
        Ok(())
    }
}
