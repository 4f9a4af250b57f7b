//! Tenants and their API keys. Keys are shown once and stored as SHA-256 hashes.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as BASE64_URL;
use chrono::Utc;
use sea_orm::{ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use aegis_webhook_core::access::Scopes;
use aegis_webhook_core::ids::TenantId;

use crate::StoreError;
use crate::entities::{api_key, tenant};

/// Every API key starts with this, so leaked keys are easy to recognise and scan for.
pub const API_KEY_PREFIX: &str = "aegis_";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub id: TenantId,
    pub name: String,
}

impl From<tenant::Model> for Tenant {
    fn from(row: tenant::Model) -> Self {
        Tenant {
            id: TenantId::from_uuid(row.id),
            name: row.name,
        }
    }
}

/// A new random API key: `aegis_` + 32 random bytes, URL-safe base64.
pub fn generate_api_key() -> String {
    format!("{API_KEY_PREFIX}{}", random_token())
}

/// 32 random bytes, URL-safe base64: a bearer credential (API key, portal
/// link, portal session).
pub(crate) fn random_token() -> String {
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    BASE64_URL.encode(bytes)
}

/// How bearer credentials are stored: only their SHA-256, so a read of the
/// database gives none of them away. (They are 256 random bits: a plain
/// hash is enough, and lets the lookup use a unique index.)
pub(crate) fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

pub async fn tenant_by_id(db: &impl ConnectionTrait, id: TenantId) -> Result<Option<Tenant>, StoreError> {
    Ok(tenant::Entity::find_by_id(id).one(db).await?.map(Tenant::from))
}

/// Locks the tenant's row until the end of the transaction `db` is (PostgreSQL
/// `SELECT … FOR UPDATE`), so that checks against the tenant's quotas and the
/// writes they allow take turns. SQLite takes its write lock at `BEGIN
/// IMMEDIATE` ([`crate::begin_write`]) and needs nothing more.
pub async fn lock_tenant(db: &impl ConnectionTrait, id: TenantId) -> Result<(), StoreError> {
    if db.get_database_backend() != sea_orm::DbBackend::Postgres {
        return Ok(());
    }
    use sea_orm::QuerySelect as _;
    tenant::Entity::find_by_id(id.as_uuid())
        .lock_exclusive()
        .one(db)
        .await?
        .ok_or(StoreError::NotFound)?;
    Ok(())
}

/// Which of `ids` are tenants.
pub async fn existing_tenants(
    db: &impl ConnectionTrait,
    ids: &[TenantId],
) -> Result<std::collections::HashSet<TenantId>, StoreError> {
    if ids.is_empty() {
        return Ok(std::collections::HashSet::new());
    }
    let rows = tenant::Entity::find()
        .filter(tenant::Column::Id.is_in(crate::in_list(ids.iter().map(|id| id.as_uuid()))))
        .all(db)
        .await?;
    Ok(rows.into_iter().map(|row| TenantId::from_uuid(row.id)).collect())
}

pub async fn tenant_by_name(db: &impl ConnectionTrait, name: &str) -> Result<Option<Tenant>, StoreError> {
    Ok(tenant::Entity::find()
        .filter(tenant::Column::Name.eq(name))
        .one(db)
        .await?
        .map(Tenant::from))
}

/// Returns the tenant called `name`, creating it if it does not exist yet. Safe
/// when several processes start at once: the insert yields to a row another
/// process wrote first, and the read that follows sees whichever won.
pub async fn ensure_tenant(db: &impl ConnectionTrait, name: &str) -> Result<Tenant, StoreError> {
    if let Some(existing) = tenant_by_name(db, name).await? {
        return Ok(existing);
    }
    let row = tenant::ActiveModel {
        id: Set(Uuid::now_v7()),
        name: Set(name.to_owned()),
        created_at: Set(Utc::now()),
        retention_seconds: Set(None),
        body_retention_seconds: Set(None),
    };
    tenant::Entity::insert(row)
        .on_conflict_do_nothing_on([tenant::Column::Name])
        .exec_without_returning(db)
        .await?;
    tenant_by_name(db, name)
        .await?
        .ok_or_else(|| StoreError::Unexpected(anyhow::anyhow!("tenant `{name}` vanished after insert")))
}

/// Stores `key` (already generated or supplied by an operator) for `tenant_id`
/// with every scope (the bootstrap and `dev` keys). See [`add_api_key_with`].
pub async fn add_api_key(db: &impl ConnectionTrait, tenant_id: TenantId, key: &str) -> Result<(), StoreError> {
    add_api_key_with(db, tenant_id, key, Scopes::FULL).await
}

/// Stores `key` for `tenant_id` with `scopes`. Storing a key that the same
/// tenant already holds is a no-op (its scopes stay as they are), also when
/// several processes store it at once (replicas sharing
/// `AEGIS_BOOTSTRAP_API_KEY`); a key that another tenant holds is a `Conflict`.
pub async fn add_api_key_with(
    db: &impl ConnectionTrait,
    tenant_id: TenantId,
    key: &str,
    scopes: Scopes,
) -> Result<(), StoreError> {
    let hash = hash_key(key);
    let row = api_key::ActiveModel {
        id: Set(Uuid::now_v7()),
        tenant_id: Set(tenant_id.as_uuid()),
        key_hash: Set(hash.clone()),
        prefix: Set(key.chars().take(API_KEY_PREFIX.len() + 4).collect()),
        created_at: Set(Utc::now()),
        revoked_at: Set(None),
        scopes: Set(scopes.to_string()),
    };
    // Insert if absent, then read who holds it: no window between a read and
    // an insert for another process to fall into, and no unique violation to
    // abort a surrounding PostgreSQL transaction.
    api_key::Entity::insert(row)
        .on_conflict_do_nothing_on([api_key::Column::KeyHash])
        .exec_without_returning(db)
        .await?;
    let holder = api_key::Entity::find()
        .filter(api_key::Column::KeyHash.eq(&hash))
        .one(db)
        .await?
        .ok_or_else(|| StoreError::Unexpected(anyhow::anyhow!("an API key vanished after insert")))?;
    if holder.tenant_id == tenant_id.as_uuid() {
        Ok(())
    } else {
        Err(StoreError::Conflict(
            "this API key belongs to another tenant".to_owned(),
        ))
    }
}

/// Who a valid API key speaks for, and what it may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyHolder {
    pub tenant_id: TenantId,
    pub key_id: Uuid,
    pub scopes: Scopes,
}

fn stored_scopes(text: &str) -> Result<Scopes, StoreError> {
    text.parse()
        .map_err(|error| StoreError::Unexpected(anyhow::anyhow!("an API key row holds unreadable scopes: {error}")))
}

/// The tenant holding this key, if the key exists and is not revoked.
pub async fn authenticate(db: &impl ConnectionTrait, key: &str) -> Result<Option<KeyHolder>, StoreError> {
    let found = api_key::Entity::find()
        .filter(api_key::Column::KeyHash.eq(hash_key(key)))
        .filter(api_key::Column::RevokedAt.is_null())
        .one(db)
        .await?;
    found
        .map(|row| {
            Ok(KeyHolder {
                tenant_id: TenantId::from_uuid(row.tenant_id),
                key_id: row.id,
                scopes: stored_scopes(&row.scopes)?,
            })
        })
        .transpose()
}

/// An API key as listed: never the key itself, which is not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyInfo {
    pub id: Uuid,
    /// The first characters of the key, to recognise it.
    pub prefix: String,
    pub created_at: chrono::DateTime<Utc>,
    pub revoked_at: Option<chrono::DateTime<Utc>>,
    pub scopes: Scopes,
}

/// Creates a tenant; a name already taken is a `Conflict`, also when two
/// create it at once.
pub async fn create_tenant(db: &impl ConnectionTrait, name: &str) -> Result<Tenant, StoreError> {
    let name = name.trim();
    if name.is_empty() {
        return Err(StoreError::Invalid("a tenant needs a name".to_owned()));
    }
    let row = tenant::ActiveModel {
        id: Set(TenantId::generate().as_uuid()),
        name: Set(name.to_owned()),
        created_at: Set(Utc::now()),
        retention_seconds: Set(None),
        body_retention_seconds: Set(None),
    };
    // Insert if absent: of two runs at once, exactly one creates it.
    let inserted = tenant::Entity::insert(row)
        .on_conflict_do_nothing_on([tenant::Column::Name])
        .exec_without_returning(db)
        .await?;
    if !matches!(inserted, sea_orm::TryInsertResult::Inserted(rows) if rows > 0) {
        return Err(StoreError::Conflict(format!("tenant `{name}` already exists")));
    }
    tenant_by_name(db, name)
        .await?
        .ok_or_else(|| StoreError::Unexpected(anyhow::anyhow!("tenant `{name}` vanished after insert")))
}

/// Creates a new key with `scopes` for the tenant and returns it: the only
/// time it is shown.
pub async fn create_api_key(
    db: &impl ConnectionTrait,
    tenant_id: TenantId,
    scopes: Scopes,
) -> Result<(Uuid, String), StoreError> {
    let key = generate_api_key();
    add_api_key_with(db, tenant_id, &key, scopes).await?;
    let row = api_key::Entity::find()
        .filter(api_key::Column::KeyHash.eq(hash_key(&key)))
        .one(db)
        .await?
        .ok_or_else(|| StoreError::Unexpected(anyhow::anyhow!("a new API key vanished")))?;
    Ok((row.id, key))
}

pub async fn list_api_keys(db: &impl ConnectionTrait, tenant_id: TenantId) -> Result<Vec<ApiKeyInfo>, StoreError> {
    use sea_orm::QueryOrder as _;
    let rows = api_key::Entity::find()
        .filter(api_key::Column::TenantId.eq(tenant_id.as_uuid()))
        .order_by_asc(api_key::Column::Id)
        .all(db)
        .await?;
    rows.into_iter()
        .map(|row| {
            Ok(ApiKeyInfo {
                id: row.id,
                scopes: stored_scopes(&row.scopes)?,
                prefix: row.prefix,
                created_at: row.created_at,
                revoked_at: row.revoked_at,
            })
        })
        .collect()
}

/// Revokes a key at once: the next request with it is refused. Returns the
/// tenant that held it.
pub async fn revoke_api_key(db: &impl ConnectionTrait, key_id: Uuid) -> Result<TenantId, StoreError> {
    use sea_orm::sea_query::Expr;
    let result = api_key::Entity::update_many()
        .col_expr(api_key::Column::RevokedAt, Expr::value(Some(Utc::now())))
        .filter(api_key::Column::Id.eq(key_id))
        .filter(api_key::Column::RevokedAt.is_null())
        .exec(db)
        .await?;
    if result.rows_affected == 0 {
        return Err(StoreError::NotFound);
    }
    let row = api_key::Entity::find_by_id(key_id)
        .one(db)
        .await?
        .ok_or(StoreError::NotFound)?;
    Ok(TenantId::from_uuid(row.tenant_id))
}
