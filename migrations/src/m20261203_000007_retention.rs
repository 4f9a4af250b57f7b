//! Data retention (issue 17): a tenant's own retention, when an event's bodies
//! were dropped, and the indexes expiry walks, so each of its statements reads
//! only what it removes: a tenant's events in creation order, those that still
//! have their bodies, and an event's deliveries (which also serves the
//! foreign key's cascade when an event goes).

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum Tenants {
    Table,
    RetentionSeconds,
    BodyRetentionSeconds,
}

#[derive(DeriveIden)]
enum Events {
    Table,
    Id,
    TenantId,
    BodyExpungedAt,
}

#[derive(DeriveIden)]
enum Deliveries {
    Table,
    EventId,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // One column per statement: SQLite alters a table one column at a time.
        manager
            .alter_table(
                Table::alter()
                    .table(Tenants::Table)
                    .add_column(big_integer_null(Tenants::RetentionSeconds))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Tenants::Table)
                    .add_column(big_integer_null(Tenants::BodyRetentionSeconds))
                    .to_owned(),
            )
            .await?;
        manager
            .alter_table(
                Table::alter()
                    .table(Events::Table)
                    .add_column(timestamp_with_time_zone_null(Events::BodyExpungedAt))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_events_tenant")
                    .table(Events::Table)
                    .col(Events::TenantId)
                    .col(Events::Id)
                    .to_owned(),
            )
            .await?;
        // Partial: once an event's bodies are dropped it leaves this index, so
        // the body pass never walks what it has already emptied. The same
        // syntax on PostgreSQL and SQLite.
        manager
            .get_connection()
            .execute_unprepared(
                "CREATE INDEX idx_events_bodies_kept ON events (tenant_id, id) WHERE body_expunged_at IS NULL",
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_deliveries_event")
                    .table(Deliveries::Table)
                    .col(Deliveries::EventId)
                    .to_owned(),
            )
            .await
    }
}
