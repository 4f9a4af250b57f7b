//! The customer portal's sessions. `createPortalSession` stores a single-use
//! link; opening it turns the row into a session, named by a cookie. Only
//! SHA-256 hashes of the link and the cookie are stored. A session speaks for
//! the API key that made it, with at most that key's scopes, and ends when
//! it expires or the key is revoked.

use chrono::{DateTime, Utc};
use sea_orm::{ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, EntityTrait, QueryFilter};
use uuid::Uuid;

use aegis_webhook_core::access::Scopes;
use aegis_webhook_core::ids::TenantId;

use crate::StoreError;
use crate::entities::{api_key, portal_session};
use crate::tenants::{hash_key, random_token};

/// The look of a tenant's portal, as the link's maker chose it (already
/// checked by the API).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Theme {
    /// `#rrggbb`.
    pub accent_color: Option<String>,
    /// An `https` URL.
    pub logo_url: Option<String>,
}

/// A link to make.
#[derive(Debug, Clone)]
pub struct NewLink {
    pub tenant_id: TenantId,
    pub api_key_id: Uuid,
    pub scopes: Scopes,
    /// The link must be opened before this.
    pub link_expires_at: DateTime<Utc>,
    /// How long the session lasts once the link is opened.
    pub session_ttl: chrono::Duration,
    pub theme: Theme,
}

/// An open session: who it speaks for and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub id: Uuid,
    pub tenant_id: TenantId,
    pub api_key_id: Uuid,
    pub scopes: Scopes,
    pub expires_at: DateTime<Utc>,
    pub theme: Theme,
}

/// Stores a new link and returns its id and token (the only time the token
/// exists outside the caller's answer). The tenant's sessions that can no
/// longer be used are deleted on the way: their number stays that of the
/// live ones.
pub async fn create_link(
    db: &impl ConnectionTrait,
    new: NewLink,
    now: DateTime<Utc>,
) -> Result<(Uuid, String), StoreError> {
    portal_session::Entity::delete_many()
        .filter(portal_session::Column::TenantId.eq(new.tenant_id.as_uuid()))
        .filter(
            Condition::any()
                .add(
                    Condition::all()
                        .add(portal_session::Column::OpenedAt.is_null())
                        .add(portal_session::Column::LinkExpiresAt.lte(now)),
                )
                .add(portal_session::Column::ExpiresAt.lte(now)),
        )
        .exec(db)
        .await?;
    let token = random_token();
    let id = Uuid::now_v7();
    let row = portal_session::ActiveModel {
        id: Set(id),
        tenant_id: Set(new.tenant_id.as_uuid()),
        api_key_id: Set(new.api_key_id),
        scopes: Set(new.scopes.to_string()),
        link_hash: Set(hash_key(&token)),
        link_expires_at: Set(new.link_expires_at),
        session_hash: Set(None),
        opened_at: Set(None),
        ttl_seconds: Set(new.session_ttl.num_seconds()),
        expires_at: Set(None),
        accent_color: Set(new.theme.accent_color),
        logo_url: Set(new.theme.logo_url),
        created_at: Set(now),
    };
    portal_session::Entity::insert(row).exec_without_returning(db).await?;
    Ok((id, token))
}

/// The name of the tenant a link `token` would open, if it can still be
/// opened; changes nothing (a link checker's or prefetcher's GET must not
/// use the link up).
pub async fn peek_link(
    db: &impl ConnectionTrait,
    token: &str,
    now: DateTime<Utc>,
) -> Result<Option<String>, StoreError> {
    let Some(row) = openable_link(db, token, now).await? else {
        return Ok(None);
    };
    let tenant = crate::tenants::tenant_by_id(db, TenantId::from_uuid(row.tenant_id)).await?;
    Ok(tenant.map(|tenant| tenant.name))
}

/// Opens the link `token`: once, before it expires, while its key is valid.
/// Returns the session and its cookie value; `None` for a link that is
/// unknown, used, expired or whose key was revoked (the caller need not
/// tell them apart, and should not tell a guesser which).
pub async fn open_link(
    db: &impl ConnectionTrait,
    token: &str,
    now: DateTime<Utc>,
) -> Result<Option<(Session, String)>, StoreError> {
    let Some(row) = openable_link(db, token, now).await? else {
        return Ok(None);
    };
    let cookie = random_token();
    let expires_at = now + chrono::Duration::seconds(row.ttl_seconds);
    // Only the first of two openings at once changes the row.
    let opened = portal_session::Entity::update_many()
        .col_expr(
            portal_session::Column::SessionHash,
            sea_orm::sea_query::Expr::value(Some(hash_key(&cookie))),
        )
        .col_expr(
            portal_session::Column::OpenedAt,
            sea_orm::sea_query::Expr::value(Some(now)),
        )
        .col_expr(
            portal_session::Column::ExpiresAt,
            sea_orm::sea_query::Expr::value(Some(expires_at)),
        )
        .filter(portal_session::Column::Id.eq(row.id))
        .filter(portal_session::Column::OpenedAt.is_null())
        .exec(db)
        .await?;
    if opened.rows_affected != 1 {
        return Ok(None);
    }
    let session = session_of(portal_session::Model {
        expires_at: Some(expires_at),
        ..row
    })?;
    Ok(Some((session, cookie)))
}

/// The session a cookie names, if it is open, unexpired and its key valid.
pub async fn authenticate(
    db: &impl ConnectionTrait,
    cookie: &str,
    now: DateTime<Utc>,
) -> Result<Option<Session>, StoreError> {
    let Some(row) = portal_session::Entity::find()
        .filter(portal_session::Column::SessionHash.eq(hash_key(cookie)))
        .filter(portal_session::Column::ExpiresAt.gt(now))
        .one(db)
        .await?
    else {
        return Ok(None);
    };
    if !key_is_valid(db, row.api_key_id).await? {
        return Ok(None);
    }
    session_of(row).map(Some)
}

/// Ends the session a cookie names (signing out).
pub async fn end(db: &impl ConnectionTrait, cookie: &str, now: DateTime<Utc>) -> Result<(), StoreError> {
    portal_session::Entity::update_many()
        .col_expr(
            portal_session::Column::ExpiresAt,
            sea_orm::sea_query::Expr::value(Some(now)),
        )
        .filter(portal_session::Column::SessionHash.eq(hash_key(cookie)))
        .exec(db)
        .await?;
    Ok(())
}

/// The row of a link that can still be opened: unused, unexpired, its key
/// valid.
async fn openable_link(
    db: &impl ConnectionTrait,
    token: &str,
    now: DateTime<Utc>,
) -> Result<Option<portal_session::Model>, StoreError> {
    let Some(row) = portal_session::Entity::find()
        .filter(portal_session::Column::LinkHash.eq(hash_key(token)))
        .filter(portal_session::Column::OpenedAt.is_null())
        .filter(portal_session::Column::LinkExpiresAt.gt(now))
        .one(db)
        .await?
    else {
        return Ok(None);
    };
    Ok(key_is_valid(db, row.api_key_id).await?.then_some(row))
}

async fn key_is_valid(db: &impl ConnectionTrait, key_id: Uuid) -> Result<bool, StoreError> {
    Ok(api_key::Entity::find_by_id(key_id)
        .filter(api_key::Column::RevokedAt.is_null())
        .one(db)
        .await?
        .is_some())
}

fn session_of(row: portal_session::Model) -> Result<Session, StoreError> {
    let scopes = row.scopes.parse().map_err(|error| {
        StoreError::Unexpected(anyhow::anyhow!("a portal session holds unreadable scopes: {error}"))
    })?;
    let expires_at = row
        .expires_at
        .ok_or_else(|| StoreError::Unexpected(anyhow::anyhow!("an open portal session has no end")))?;
    Ok(Session {
        id: row.id,
        tenant_id: TenantId::from_uuid(row.tenant_id),
        api_key_id: row.api_key_id,
        scopes,
        expires_at,
        theme: Theme {
            accent_color: row.accent_color,
            logo_url: row.logo_url,
        },
    })
}
