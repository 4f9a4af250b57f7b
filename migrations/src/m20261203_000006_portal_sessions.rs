//! The customer portal's sessions (issue 16): a row per single-use link made
//! by `createPortalSession`, which becomes the session once the link is
//! opened. Only hashes of the link and the session cookie are stored.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

#[derive(DeriveMigrationName)]
pub struct Migration;

#[derive(DeriveIden)]
enum PortalSessions {
    Table,
    Id,
    TenantId,
    ApiKeyId,
    Scopes,
    LinkHash,
    LinkExpiresAt,
    SessionHash,
    OpenedAt,
    TtlSeconds,
    ExpiresAt,
    AccentColor,
    LogoUrl,
    CreatedAt,
}

#[derive(DeriveIden)]
enum Tenants {
    Table,
    Id,
}

#[derive(DeriveIden)]
enum ApiKeys {
    Table,
    Id,
}

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(PortalSessions::Table)
                    .col(pk_uuid(PortalSessions::Id))
                    .col(uuid(PortalSessions::TenantId))
                    // The key that made the link: the session acts as it (the
                    // audit log names it) and ends when it is revoked.
                    .col(uuid(PortalSessions::ApiKeyId))
                    .col(string(PortalSessions::Scopes))
                    .col(string_uniq(PortalSessions::LinkHash))
                    .col(timestamp_with_time_zone(PortalSessions::LinkExpiresAt))
                    // Set when the link is opened (once).
                    .col(string_null(PortalSessions::SessionHash).unique_key())
                    .col(timestamp_with_time_zone_null(PortalSessions::OpenedAt))
                    .col(big_integer(PortalSessions::TtlSeconds))
                    .col(timestamp_with_time_zone_null(PortalSessions::ExpiresAt))
                    .col(string_null(PortalSessions::AccentColor))
                    .col(string_null(PortalSessions::LogoUrl))
                    .col(timestamp_with_time_zone(PortalSessions::CreatedAt))
                    .foreign_key(
                        ForeignKey::create()
                            .from(PortalSessions::Table, PortalSessions::TenantId)
                            .to(Tenants::Table, Tenants::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .foreign_key(
                        ForeignKey::create()
                            .from(PortalSessions::Table, PortalSessions::ApiKeyId)
                            .to(ApiKeys::Table, ApiKeys::Id)
                            .on_delete(ForeignKeyAction::Cascade),
                    )
                    .to_owned(),
            )
            .await?;
        // Expired sessions of a tenant are swept when it makes a new one.
        manager
            .create_index(
                Index::create()
                    .name("idx_portal_sessions_tenant")
                    .table(PortalSessions::Table)
                    .col(PortalSessions::TenantId)
                    .col(PortalSessions::LinkExpiresAt)
                    .to_owned(),
            )
            .await
    }
}
