//! The audit log: one row per change a tenant's configuration undergoes (every
//! mutation, every API key made or revoked), written in the same transaction
//! as the change, so a change without its record cannot exist. Summaries name
//! what changed, never a secret.

use chrono::{DateTime, Utc};
use sea_orm::{ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use uuid::Uuid;

use aegis_webhook_core::ids::TenantId;

use crate::StoreError;
use crate::entities::audit_entry;

/// Who made a change.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Actor {
    /// A request authenticated by this API key.
    ApiKey(Uuid),
    /// An operator at the command line (`aegis-webhook apikey …`).
    Operator,
}

impl Actor {
    fn as_str(self) -> &'static str {
        match self {
            Actor::ApiKey(_) => "api_key",
            Actor::Operator => "operator",
        }
    }

    fn key_id(self) -> Option<Uuid> {
        match self {
            Actor::ApiKey(id) => Some(id),
            Actor::Operator => None,
        }
    }
}

/// A change to record.
#[derive(Debug, Clone)]
pub struct NewEntry {
    pub tenant_id: TenantId,
    pub actor: Actor,
    /// The mutation or command, e.g. `createWebhook`, `apikey.create`.
    pub operation: &'static str,
    /// What kind of thing changed: `webhook`, `delivery`, `api_key`.
    pub target_kind: &'static str,
    pub target_id: Option<String>,
    /// What changed; must never hold a secret.
    pub summary: serde_json::Value,
}

/// A recorded change.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub id: Uuid,
    pub occurred_at: DateTime<Utc>,
    pub api_key_id: Option<Uuid>,
    pub actor: String,
    pub operation: String,
    pub target_kind: String,
    pub target_id: Option<String>,
    pub summary: serde_json::Value,
}

pub async fn record(db: &impl ConnectionTrait, entry: NewEntry, at: DateTime<Utc>) -> Result<Uuid, StoreError> {
    let id = Uuid::now_v7();
    let row = audit_entry::ActiveModel {
        id: Set(id),
        tenant_id: Set(entry.tenant_id.as_uuid()),
        occurred_at: Set(at),
        api_key_id: Set(entry.actor.key_id()),
        actor: Set(entry.actor.as_str().to_owned()),
        operation: Set(entry.operation.to_owned()),
        target_kind: Set(entry.target_kind.to_owned()),
        target_id: Set(entry.target_id),
        summary: Set(entry.summary.to_string()),
    };
    audit_entry::Entity::insert(row).exec_without_returning(db).await?;
    Ok(id)
}

/// Filters of the audit log; all optional, combined with AND.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub operation: Option<String>,
    pub target_id: Option<String>,
    pub api_key_id: Option<Uuid>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

/// One page of the tenant's audit log, newest first, before the cursor (an
/// entry id); `limit + 1` rows so the caller can tell whether more follow.
pub async fn list(
    db: &impl ConnectionTrait,
    tenant_id: TenantId,
    filter: &Filter,
    before: Option<Uuid>,
    limit: u64,
) -> Result<Vec<Entry>, StoreError> {
    let mut query = audit_entry::Entity::find().filter(audit_entry::Column::TenantId.eq(tenant_id.as_uuid()));
    if let Some(operation) = &filter.operation {
        query = query.filter(audit_entry::Column::Operation.eq(operation.as_str()));
    }
    if let Some(target_id) = &filter.target_id {
        query = query.filter(audit_entry::Column::TargetId.eq(target_id.as_str()));
    }
    if let Some(key_id) = filter.api_key_id {
        query = query.filter(audit_entry::Column::ApiKeyId.eq(key_id));
    }
    if let Some(since) = filter.since {
        query = query.filter(audit_entry::Column::OccurredAt.gte(since));
    }
    if let Some(until) = filter.until {
        query = query.filter(audit_entry::Column::OccurredAt.lt(until));
    }
    if let Some(cursor) = before {
        // UUIDv7: id order is time order.
        query = query.filter(audit_entry::Column::Id.lt(cursor));
    }
    let rows = query
        .order_by_desc(audit_entry::Column::Id)
        .limit(limit + 1)
        .all(db)
        .await?;
    rows.into_iter()
        .map(|row| {
            let summary = serde_json::from_str(&row.summary).map_err(|error| {
                StoreError::Unexpected(anyhow::anyhow!("an audit row's summary is not JSON: {error}"))
            })?;
            Ok(Entry {
                id: row.id,
                occurred_at: row.occurred_at,
                api_key_id: row.api_key_id,
                actor: row.actor,
                operation: row.operation,
                target_kind: row.target_kind,
                target_id: row.target_id,
                summary,
            })
        })
        .collect()
}
