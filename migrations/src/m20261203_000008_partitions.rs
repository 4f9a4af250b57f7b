//! PostgreSQL: `deliveries` and `delivery_attempts` become tables partitioned
//! by creation time (issue 17), so expiry drops a whole partition instead of
//! deleting its rows one by one. A delivery's id is a UUIDv7, whose first 48
//! bits are its creation time in milliseconds, so the deliveries are
//! partitioned by `id` and their attempts by `delivery_id`, over the same
//! ranges: a delivery and its attempts always share a range, and the key
//! (`id`) stays the primary key. The partitions themselves are made ahead of
//! time by the system (`storage::partitions::ensure`).
//!
//! On a populated database nothing is copied: each existing table becomes the
//! first partition, for every id older than the migration, after a scan that
//! checks the range (a few seconds for a million deliveries; the
//! tables are locked meanwhile). Its indexes and its foreign keys to
//! `webhooks` and `events` are taken over as they are; the attempts' key
//! gains `delivery_id` (a partitioned table's key must hold the partition key),
//! which builds one index. The attempts' foreign key to their delivery is
//! each pair of partitions' own (the legacy pair keeps the one it had), so a
//! pair is dropped without a check that would scan every attempt. Expiry drops that partition like any other once
//! all of it has passed its retention and nothing in it is pending.
//!
//! `events` stays one table: its dedupe key (tenant, external id) could not
//! stay unique across partitions, since a partitioned table's unique indexes
//! must include the partition key, and it holds one row per event, against a
//! row per delivery and per attempt in the two partitioned tables. Its rows
//! are deleted in batches. SQLite has no partitioning: there, expiry deletes
//! rows.

use sea_orm_migration::prelude::*;
use sea_orm_migration::sea_orm::DbBackend;

#[derive(DeriveMigrationName)]
pub struct Migration;

const PARTITION_DELIVERIES: &str = r#"
DO $migration$
DECLARE
    newest_ms bigint;
    bound uuid;
BEGIN
    -- The first partition takes every id older than now (or than the newest
    -- row, should a writer's clock run ahead of the database's).
    SELECT ('x' || substr(replace(id::text, '-', ''), 1, 12))::bit(48)::bigint + 1
      INTO newest_ms FROM deliveries ORDER BY id DESC LIMIT 1;
    bound := (lpad(to_hex(greatest((extract(epoch FROM clock_timestamp()) * 1000)::bigint, coalesce(newest_ms, 0))), 12, '0')
              || '00000000000000000000')::uuid;

    ALTER TABLE deliveries RENAME TO deliveries_legacy;
    ALTER INDEX deliveries_pkey RENAME TO deliveries_legacy_pkey;
    ALTER INDEX idx_deliveries_status_due RENAME TO idx_deliveries_legacy_status_due;
    ALTER INDEX idx_deliveries_webhook RENAME TO idx_deliveries_legacy_webhook;
    ALTER INDEX idx_deliveries_tenant RENAME TO idx_deliveries_legacy_tenant;
    ALTER INDEX idx_deliveries_webhook_status RENAME TO idx_deliveries_legacy_webhook_status;
    ALTER INDEX idx_deliveries_event RENAME TO idx_deliveries_legacy_event;

    ALTER TABLE delivery_attempts RENAME TO delivery_attempts_legacy;
    ALTER INDEX idx_delivery_attempts_delivery RENAME TO idx_delivery_attempts_legacy_delivery;
    ALTER TABLE delivery_attempts_legacy DROP CONSTRAINT delivery_attempts_pkey;

    CREATE TABLE deliveries (LIKE deliveries_legacy INCLUDING DEFAULTS) PARTITION BY RANGE (id);
    ALTER TABLE deliveries ADD PRIMARY KEY (id);
    ALTER TABLE deliveries ADD CONSTRAINT fk_deliveries_webhook
        FOREIGN KEY (webhook_id) REFERENCES webhooks (id) ON DELETE CASCADE;
    ALTER TABLE deliveries ADD CONSTRAINT fk_deliveries_event
        FOREIGN KEY (event_id) REFERENCES events (id) ON DELETE CASCADE;
    CREATE INDEX idx_deliveries_status_due ON deliveries (status, next_attempt_at);
    CREATE INDEX idx_deliveries_webhook ON deliveries (webhook_id, id);
    CREATE INDEX idx_deliveries_tenant ON deliveries (tenant_id, id);
    CREATE INDEX idx_deliveries_webhook_status ON deliveries (webhook_id, status, updated_at);
    CREATE INDEX idx_deliveries_event ON deliveries (event_id);
    EXECUTE format('ALTER TABLE deliveries ATTACH PARTITION deliveries_legacy FOR VALUES FROM (MINVALUE) TO (%L)', bound);

    CREATE TABLE delivery_attempts (LIKE delivery_attempts_legacy INCLUDING DEFAULTS) PARTITION BY RANGE (delivery_id);
    ALTER TABLE delivery_attempts ADD PRIMARY KEY (delivery_id, id);
    CREATE INDEX idx_delivery_attempts_delivery ON delivery_attempts (delivery_id, attempt);
    EXECUTE format('ALTER TABLE delivery_attempts ATTACH PARTITION delivery_attempts_legacy FOR VALUES FROM (MINVALUE) TO (%L)', bound);
    -- The attempts' foreign key stays the pair's own: the legacy attempts
    -- keep theirs, which points at what is now deliveries_legacy, and every
    -- new pair gets one between its two tables (storage::partitions). A key
    -- on the parents would make every partition drop scan all attempts.
END
$migration$;
"#;

#[async_trait::async_trait]
impl MigrationTrait for Migration {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        if manager.get_database_backend() != DbBackend::Postgres {
            return Ok(());
        }
        manager
            .get_connection()
            .execute_unprepared(PARTITION_DELIVERIES)
            .await?;
        Ok(())
    }
}
