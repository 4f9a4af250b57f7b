//! Webhooks: a tenant's endpoints, their subscriptions and sealed secrets.

use chrono::{DateTime, Utc};
use sea_orm::{ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use uuid::Uuid;

use aegis_webhook_core::ids::{TenantId, WebhookId};

use crate::StoreError;
use crate::entities::webhook;
use aegis_webhook_core::event::EventType;
use aegis_webhook_core::retry::AutoDisable;
use aegis_webhook_core::secret::{SecretCipher, SigningSecret};
use aegis_webhook_core::target::WebhookUrl;

/// A webhook as the API and the worker see it, secret opened.
#[derive(Debug, Clone)]
pub struct Webhook {
    pub id: WebhookId,
    pub tenant_id: TenantId,
    /// Parsed once, when read.
    pub url: WebhookUrl,
    pub events: Vec<EventType>,
    pub description: Option<String>,
    pub project_ids: Vec<Uuid>,
    pub secret: SigningSecret,
    /// The secret before the last rotation, while its grace period lasts.
    pub previous_secret: Option<(SigningSecret, DateTime<Utc>)>,
    pub active: bool,
    pub disabled_reason: Option<String>,
    /// When the webhook was last disabled, by the API or automatically.
    pub disabled_at: Option<DateTime<Utc>>,
    /// Finished deliveries that failed since the last success.
    pub consecutive_failures: u32,
    /// When the first of those failures was recorded.
    pub failing_since: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Webhook {
    /// The previous secret if its grace period has not ended at `now`.
    pub fn previous_secret_at(&self, now: DateTime<Utc>) -> Option<&SigningSecret> {
        self.previous_secret
            .as_ref()
            .filter(|(_, expires_at)| *expires_at > now)
            .map(|(secret, _)| secret)
    }
}

/// What a new webhook is made of, every field already valid.
#[derive(Debug, Clone)]
pub struct NewWebhook {
    pub url: WebhookUrl,
    pub events: Vec<EventType>,
    pub description: Option<String>,
    pub project_ids: Vec<Uuid>,
    pub secret: SigningSecret,
    pub active: bool,
}

/// The part of a webhook the fan-out needs: no secret is opened for it.
#[derive(Debug, Clone)]
pub struct Subscription {
    pub webhook_id: WebhookId,
    pub events: Vec<EventType>,
    pub project_ids: Vec<Uuid>,
}

fn join<T: ToString>(items: &[T]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

fn parse_events(text: &str) -> Result<Vec<EventType>, StoreError> {
    text.split(',')
        .filter(|part| !part.is_empty())
        .map(|name| {
            name.parse()
                .map_err(|error| StoreError::Unexpected(anyhow::anyhow!("stored webhook: {error}")))
        })
        .collect()
}

fn parse_project_ids(text: Option<&str>) -> Result<Vec<Uuid>, StoreError> {
    text.unwrap_or_default()
        .split(',')
        .filter(|part| !part.is_empty())
        .map(|id| {
            id.parse()
                .map_err(|error| StoreError::Unexpected(anyhow::anyhow!("stored webhook project id: {error}")))
        })
        .collect()
}

fn to_domain(row: webhook::Model, cipher: &SecretCipher) -> Result<Webhook, StoreError> {
    let open = |sealed: &str| {
        cipher
            .open(sealed)
            .map_err(|error| StoreError::Unexpected(anyhow::anyhow!("webhook {}: {error}", row.id)))
    };
    let secret = open(&row.secret_sealed)?;
    let previous_secret = match (&row.previous_secret_sealed, row.previous_secret_expires_at) {
        (Some(sealed), Some(expires_at)) => Some((open(sealed)?, expires_at)),
        _ => None,
    };
    Ok(Webhook {
        id: WebhookId::from_uuid(row.id),
        tenant_id: TenantId::from_uuid(row.tenant_id),
        events: parse_events(&row.events)?,
        project_ids: parse_project_ids(row.project_ids.as_deref())?,
        url: WebhookUrl::from_stored(&row.url)
            .map_err(|error| StoreError::Unexpected(anyhow::anyhow!("webhook {}: stored URL: {error}", row.id)))?,
        description: row.description,
        secret,
        previous_secret,
        active: row.active,
        disabled_reason: row.disabled_reason,
        disabled_at: row.disabled_at,
        consecutive_failures: u32::try_from(row.consecutive_failures).unwrap_or_default(),
        failing_since: row.failing_since,
        created_at: row.created_at,
        updated_at: row.updated_at,
    })
}

pub async fn create_webhook(
    db: &impl ConnectionTrait,
    cipher: &SecretCipher,
    tenant_id: TenantId,
    new: NewWebhook,
) -> Result<Webhook, StoreError> {
    let now = Utc::now();
    let row = webhook::ActiveModel {
        id: Set(Uuid::now_v7()),
        tenant_id: Set(tenant_id.as_uuid()),
        url: Set(new.url.as_str().to_owned()),
        events: Set(join(&new.events)),
        description: Set(new.description),
        project_ids: Set((!new.project_ids.is_empty()).then(|| join(&new.project_ids))),
        secret_sealed: Set(cipher.seal(&new.secret)),
        active: Set(new.active),
        disabled_reason: Set(None),
        disabled_at: Set(None),
        consecutive_failures: Set(0),
        failing_since: Set(None),
        created_at: Set(now),
        updated_at: Set(now),
        previous_secret_sealed: Set(None),
        previous_secret_expires_at: Set(None),
    };
    let inserted = webhook::Entity::insert(row).exec_with_returning(db).await?;
    to_domain(inserted, cipher)
}

/// The row of the tenant's webhook `id`; another tenant's webhook is `NotFound`.
async fn row_of_tenant(
    db: &impl ConnectionTrait,
    tenant_id: TenantId,
    id: WebhookId,
) -> Result<webhook::Model, StoreError> {
    webhook::Entity::find_by_id(id)
        .filter(webhook::Column::TenantId.eq(tenant_id.as_uuid()))
        .one(db)
        .await?
        .ok_or(StoreError::NotFound)
}

/// The tenant's webhook `id`; another tenant's webhook is `NotFound`.
pub async fn webhook_of_tenant(
    db: &impl ConnectionTrait,
    cipher: &SecretCipher,
    tenant_id: TenantId,
    id: WebhookId,
) -> Result<Webhook, StoreError> {
    to_domain(row_of_tenant(db, tenant_id, id).await?, cipher)
}

/// Any tenant's webhook, for the worker, which acts on behalf of the delivery's tenant.
pub async fn webhook_by_id(
    db: &impl ConnectionTrait,
    cipher: &SecretCipher,
    id: WebhookId,
) -> Result<Option<Webhook>, StoreError> {
    match webhooks_by_ids(db, cipher, &[id]).await?.pop() {
        None => Ok(None),
        Some(Ok(webhook)) => Ok(Some(webhook)),
        Some(Err(unreadable)) => Err(StoreError::Unexpected(anyhow::anyhow!(unreadable.reason))),
    }
}

/// The sealed secret of one stored webhook, any, if there is one: what a
/// process checks its `AEGIS_SECRET_KEY` against at start.
pub async fn one_sealed_secret(db: &impl ConnectionTrait) -> Result<Option<String>, StoreError> {
    Ok(webhook::Entity::find()
        .select_only()
        .column(webhook::Column::SecretSealed)
        .limit(1)
        .into_tuple()
        .one(db)
        .await?)
}

/// A stored webhook that cannot be read back: a URL that does not parse, or a
/// secret that does not open (a corrupted row, or `AEGIS_SECRET_KEY` changed
/// without re-sealing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreadable {
    pub id: WebhookId,
    pub reason: String,
    /// Its secret was sealed with another `AEGIS_SECRET_KEY` than the
    /// reader's: the reader is misconfigured, the row may well be sound.
    pub sealed_with_another_key: bool,
}

/// [`webhook_by_id`] for many: the webhooks that exist, in no particular
/// order, each read on its own, so one unreadable row fails only itself.
pub async fn webhooks_by_ids(
    db: &impl ConnectionTrait,
    cipher: &SecretCipher,
    ids: &[WebhookId],
) -> Result<Vec<Result<Webhook, Unreadable>>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    Ok(webhook::Entity::find()
        .filter(webhook::Column::Id.is_in(crate::in_list(ids.iter().map(|id| id.as_uuid()))))
        .all(db)
        .await?
        .into_iter()
        .map(|row| read_back(row, cipher))
        .collect())
}

/// A stored row as a webhook, or why it cannot be read back.
pub(crate) fn read_back(row: webhook::Model, cipher: &SecretCipher) -> Result<Webhook, Unreadable> {
    let id = WebhookId::from_uuid(row.id);
    let sealed_with_another_key = cipher.sealed_with_another_key(&row.secret_sealed);
    to_domain(row, cipher).map_err(|error| Unreadable {
        id,
        reason: format!("{error:#}"),
        sealed_with_another_key,
    })
}

/// Which of `ids` are the tenant's webhooks.
pub async fn owned_by(
    db: &impl ConnectionTrait,
    tenant_id: TenantId,
    ids: &[WebhookId],
) -> Result<Vec<WebhookId>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let owned: Vec<Uuid> = webhook::Entity::find()
        .select_only()
        .column(webhook::Column::Id)
        .filter(webhook::Column::TenantId.eq(tenant_id.as_uuid()))
        .filter(webhook::Column::Id.is_in(crate::in_list(ids.iter().map(|id| id.as_uuid()))))
        .into_tuple()
        .all(db)
        .await?;
    Ok(owned.into_iter().map(WebhookId::from_uuid).collect())
}

/// How many webhooks the tenant has (for its quota).
pub async fn count_of_tenant(db: &impl ConnectionTrait, tenant_id: TenantId) -> Result<u64, StoreError> {
    use sea_orm::PaginatorTrait as _;
    Ok(webhook::Entity::find()
        .filter(webhook::Column::TenantId.eq(tenant_id.as_uuid()))
        .count(db)
        .await?)
}

/// One page of the tenant's webhooks in creation order, after the cursor `after`.
/// Fetches `limit + 1` rows so the caller can tell whether another page exists.
pub async fn list_webhooks(
    db: &impl ConnectionTrait,
    cipher: &SecretCipher,
    tenant_id: TenantId,
    after: Option<WebhookId>,
    limit: u64,
) -> Result<Vec<Webhook>, StoreError> {
    let mut query = webhook::Entity::find()
        .filter(webhook::Column::TenantId.eq(tenant_id.as_uuid()))
        .order_by_asc(webhook::Column::Id)
        .limit(limit + 1);
    if let Some(after) = after {
        // Ids are UUIDv7, so their order is creation order.
        query = query.filter(webhook::Column::Id.gt(after.as_uuid()));
    }
    query
        .all(db)
        .await?
        .into_iter()
        .map(|row| to_domain(row, cipher))
        .collect()
}

/// The active webhooks of these tenants, as the fan-out needs them, in one
/// query, by tenant; a tenant without any is absent.
pub async fn active_subscriptions_of(
    db: &impl ConnectionTrait,
    tenant_ids: &[TenantId],
) -> Result<std::collections::HashMap<TenantId, Vec<Subscription>>, StoreError> {
    let mut by_tenant: std::collections::HashMap<TenantId, Vec<Subscription>> = std::collections::HashMap::new();
    if tenant_ids.is_empty() {
        return Ok(by_tenant);
    }
    let rows = webhook::Entity::find()
        .filter(webhook::Column::TenantId.is_in(crate::in_list(tenant_ids.iter().map(|id| id.as_uuid()))))
        .filter(webhook::Column::Active.eq(true))
        .all(db)
        .await?;
    for row in rows {
        by_tenant
            .entry(TenantId::from_uuid(row.tenant_id))
            .or_default()
            .push(Subscription {
                webhook_id: WebhookId::from_uuid(row.id),
                events: parse_events(&row.events)?,
                project_ids: parse_project_ids(row.project_ids.as_deref())?,
            });
    }
    Ok(by_tenant)
}

/// What some finished deliveries did to one webhook's health, in order: a
/// success (which ends any streak of failures), then failures after it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HealthChange {
    /// A delivery succeeded: the streak ends before `failures` are counted.
    pub reset: bool,
    /// Failed deliveries after the last success.
    pub failures: u32,
}

impl HealthChange {
    /// Whether applying it would change anything.
    pub fn is_none(self) -> bool {
        !self.reset && self.failures == 0
    }
}

/// Locks the webhooks whose health a transaction may change, in id order,
/// before it touches their deliveries: a record that changes health then
/// takes webhook before deliveries, as a webhook's deletion does (its
/// cascade reaches the deliveries after the webhook row), and concurrent
/// records take webhooks in one order. (A record that changes no health
/// takes only delivery rows, in the order its statement meets them.) The
/// lock is the one an `UPDATE` of the health takes, which new deliveries
/// referencing the webhook do not wait for. PostgreSQL only: SQLite has one
/// writer at a time.
pub async fn lock_for_health_changes(db: &impl ConnectionTrait, ids: &[WebhookId]) -> Result<(), StoreError> {
    if ids.is_empty() || db.get_database_backend() != sea_orm::DbBackend::Postgres {
        return Ok(());
    }
    let mut ids: Vec<Uuid> = ids.iter().map(|id| id.as_uuid()).collect();
    ids.sort_unstable();
    ids.dedup();
    webhook::Entity::find()
        .select_only()
        .column(webhook::Column::Id)
        .filter(webhook::Column::Id.is_in(crate::in_list(ids)))
        .order_by_asc(webhook::Column::Id)
        .lock(sea_orm::sea_query::LockType::NoKeyUpdate)
        .into_tuple::<Uuid>()
        .all(db)
        .await?;
    Ok(())
}

/// Applies a [`HealthChange`] to a webhook; disables it when the streak of
/// failures reaches `auto_disable`'s limits, and returns why.
pub async fn record_health_change(
    db: &impl ConnectionTrait,
    webhook_id: WebhookId,
    change: HealthChange,
    auto_disable: &AutoDisable,
    now: DateTime<Utc>,
) -> Result<Option<String>, StoreError> {
    use sea_orm::sea_query::{Expr, ExprTrait as _, Func};
    if change.is_none() {
        return Ok(None);
    }
    if change.reset {
        webhook::Entity::update_many()
            .filter(webhook::Column::Id.eq(webhook_id.as_uuid()))
            .col_expr(webhook::Column::ConsecutiveFailures, Expr::value(0))
            .col_expr(
                webhook::Column::FailingSince,
                Expr::value(Option::<DateTime<Utc>>::None),
            )
            .exec(db)
            .await?;
    }
    if change.failures == 0 {
        return Ok(None);
    }
    // One statement, so concurrent workers count every failure and the first
    // one dates the streak.
    webhook::Entity::update_many()
        .filter(webhook::Column::Id.eq(webhook_id.as_uuid()))
        .col_expr(
            webhook::Column::ConsecutiveFailures,
            Expr::col(webhook::Column::ConsecutiveFailures).add(i32::try_from(change.failures).unwrap_or(i32::MAX)),
        )
        .col_expr(
            webhook::Column::FailingSince,
            Func::coalesce([Expr::col(webhook::Column::FailingSince), Expr::value(now)]).into(),
        )
        .exec(db)
        .await?;
    let Some(row) = webhook::Entity::find_by_id(webhook_id).one(db).await? else {
        return Ok(None);
    };
    let failures = u32::try_from(row.consecutive_failures).unwrap_or_default();
    let reason = row
        .failing_since
        .filter(|_| row.active)
        .and_then(|since| auto_disable.reason(failures, since, now));
    if let Some(reason) = &reason {
        disable_webhook(db, webhook_id, reason, now).await?;
    }
    Ok(reason)
}

/// Deactivates a webhook, saying why (for example, the receiver answered 410 Gone).
pub async fn disable_webhook(
    db: &impl ConnectionTrait,
    webhook_id: WebhookId,
    reason: &str,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    use sea_orm::sea_query::Expr;
    webhook::Entity::update_many()
        .col_expr(webhook::Column::Active, Expr::value(false))
        .col_expr(webhook::Column::DisabledReason, Expr::value(reason))
        .col_expr(webhook::Column::DisabledAt, Expr::value(Some(now)))
        .col_expr(webhook::Column::UpdatedAt, Expr::value(now))
        .filter(webhook::Column::Id.eq(webhook_id.as_uuid()))
        .exec(db)
        .await?;
    Ok(())
}

/// Changes to a webhook; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct WebhookChanges {
    pub url: Option<WebhookUrl>,
    pub events: Option<Vec<EventType>>,
    /// `Some(None)` clears the description.
    pub description: Option<Option<String>>,
    /// `Some(vec![])` removes the project filter.
    pub project_ids: Option<Vec<Uuid>>,
}

/// Applies `changes` to the tenant's webhook `id`.
pub async fn update_webhook(
    db: &impl ConnectionTrait,
    cipher: &SecretCipher,
    tenant_id: TenantId,
    id: WebhookId,
    changes: WebhookChanges,
) -> Result<Webhook, StoreError> {
    use sea_orm::ActiveModelTrait as _;
    let mut active: webhook::ActiveModel = row_of_tenant(db, tenant_id, id).await?.into();
    if let Some(url) = changes.url {
        active.url = Set(url.as_str().to_owned());
    }
    if let Some(events) = changes.events {
        active.events = Set(join(&events));
    }
    if let Some(description) = changes.description {
        active.description = Set(description);
    }
    if let Some(project_ids) = changes.project_ids {
        active.project_ids = Set((!project_ids.is_empty()).then(|| join(&project_ids)));
    }
    active.updated_at = Set(Utc::now());
    let updated = active.update(db).await?;
    to_domain(updated, cipher)
}

/// Turns the tenant's webhook on or off. Turning it on clears the reason it was
/// disabled for and its streak of failures.
pub async fn set_webhook_active(
    db: &impl ConnectionTrait,
    cipher: &SecretCipher,
    tenant_id: TenantId,
    id: WebhookId,
    active: bool,
) -> Result<Webhook, StoreError> {
    use sea_orm::sea_query::Expr;
    let mut update = webhook::Entity::update_many()
        .col_expr(webhook::Column::Active, Expr::value(active))
        .col_expr(webhook::Column::UpdatedAt, Expr::value(Utc::now()))
        .filter(webhook::Column::Id.eq(id.as_uuid()))
        .filter(webhook::Column::TenantId.eq(tenant_id.as_uuid()));
    update = if active {
        update
            .col_expr(webhook::Column::DisabledReason, Expr::value(Option::<String>::None))
            .col_expr(webhook::Column::DisabledAt, Expr::value(Option::<DateTime<Utc>>::None))
            .col_expr(webhook::Column::ConsecutiveFailures, Expr::value(0))
            .col_expr(
                webhook::Column::FailingSince,
                Expr::value(Option::<DateTime<Utc>>::None),
            )
    } else {
        update
            .col_expr(webhook::Column::DisabledReason, Expr::value("disabled through the API"))
            .col_expr(webhook::Column::DisabledAt, Expr::value(Some(Utc::now())))
    };
    if update.exec(db).await?.rows_affected == 0 {
        return Err(StoreError::NotFound);
    }
    webhook_of_tenant(db, cipher, tenant_id, id).await
}

/// Deletes the tenant's webhook and, with it, its deliveries.
pub async fn delete_webhook(db: &impl ConnectionTrait, tenant_id: TenantId, id: WebhookId) -> Result<(), StoreError> {
    let result = webhook::Entity::delete_many()
        .filter(webhook::Column::Id.eq(id.as_uuid()))
        .filter(webhook::Column::TenantId.eq(tenant_id.as_uuid()))
        .exec(db)
        .await?;
    if result.rows_affected == 0 {
        return Err(StoreError::NotFound);
    }
    Ok(())
}

/// Replaces the signing secret; the old one keeps signing `webhook-signature`
/// beside the new one until `grace_until`.
pub async fn rotate_secret(
    db: &impl ConnectionTrait,
    cipher: &SecretCipher,
    tenant_id: TenantId,
    id: WebhookId,
    new_secret: &SigningSecret,
    grace_until: DateTime<Utc>,
) -> Result<Webhook, StoreError> {
    use sea_orm::ActiveModelTrait as _;
    let row = row_of_tenant(db, tenant_id, id).await?;
    let old_sealed = row.secret_sealed.clone();
    let mut active: webhook::ActiveModel = row.into();
    active.secret_sealed = Set(cipher.seal(new_secret));
    active.previous_secret_sealed = Set(Some(old_sealed));
    active.previous_secret_expires_at = Set(Some(grace_until));
    active.updated_at = Set(Utc::now());
    let updated = active.update(db).await?;
    to_domain(updated, cipher)
}
