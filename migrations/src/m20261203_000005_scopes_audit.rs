//! Least privilege and accountability (issue 14): API keys carry scopes, every
//! change a tenant makes is recorded in an audit log it can query, and a
//! webhook's delivery counts are read from an index of its own deliveries, so
//! their cost does not depend on other tenants' data.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Scopes,
}

#[derive(DeriveIden)]
enum AuditLog {
    Table,
    Id,
    TenantId,
    OccurredAt,
    ApiKeyId,
    Actor,
    Operation,
    TargetKind,
    TargetId,
    Summary,
}

#[derive(DeriveIden)]
enum Tenants {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum Deliveries {
    Table,
    WebhookId,
    Status,
    UpdatedAt,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // Keys made before scopes existed keep every right they had.
        manager
            .alter_table(
                Table::alter()
                    .table(ApiKeys::Table)
                    .add_column(string(ApiKeys::Scopes).default("read,write,secrets"))
                    .to_owned(),
            )
            .await?;
        manager
            .create_table(
                Table::create()
                    .table(AuditLog::Table)
                    // UUIDv7: ids sort by time, so a page is a range of the key.
                    .col(pk_uuid(AuditLog::Id))
                    .col(uuid(AuditLog::TenantId))
                    .col(timestamp_with_time_zone(AuditLog::OccurredAt))
                    // Null when the change was made outside the API (the CLI).
                    .col(uuid_null(AuditLog::ApiKeyId))
                    .col(string(AuditLog::Actor))
                    .col(string(AuditLog::Operation))
                    .col(string(AuditLog::TargetKind))
                    .col(string_null(AuditLog::TargetId))
                    // JSON text: what changed, never a secret.
                    .col(text(AuditLog::Summary))
                    .foreign_key(
                        ForeignKey::create()
                            .from(AuditLog::Table, AuditLog::TenantId)
                            .to(Tenants::Table, Tenants::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("idx_audit_log_tenant")
                    .table(AuditLog::Table)
                    .col(AuditLog::TenantId)
                    .col(AuditLog::Id)
                    .to_owned(),
            )
            .await?;
        // `Webhook.stats`: counts by status and the last success, per webhook,
        // answered from the index alone.
        manager
            .create_index(
                Index::create()
                    .name("idx_deliveries_webhook_status")
                    .table(Deliveries::Table)
                    .col(Deliveries::WebhookId)
                    .col(Deliveries::Status)
                    .col(Deliveries::UpdatedAt)
                    .to_owned(),
            )
            .await
    }
}
