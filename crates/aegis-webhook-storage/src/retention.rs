//! Expiry's statements and the tenants' own retention. Every statement is
//! bounded (`limit` rows) and walks an index from the oldest row it may
//! remove, so a pass costs what it removes, not what is kept. A pending
//! delivery is never removed, nor the event it will send, nor that event's
//! bodies; the outer statements repeat the "not pending" test, so a delivery
//! reopened while a statement runs is kept.

use std::time::Duration;

use aegis_webhook_core::ids::TenantId;
use aegis_webhook_core::retention::Override;
use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Alias, Expr, ExprTrait, Order, Query};
use sea_orm::{ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect};
use uuid::Uuid;

use crate::StoreError;
use crate::deliveries::DeliveryStatus;
use crate::entities::{delivery, delivery_attempt, event, tenant};

/// Every tenant, with its own retention where it chose one.
pub async fn tenants_and_overrides(db: &impl ConnectionTrait) -> Result<Vec<(TenantId, Override)>, StoreError> {
    let rows: Vec<(Uuid, Option<i64>, Option<i64>)> = tenant::Entity::find()
        .select_only()
        .column(tenant::Column::Id)
        .column(tenant::Column::RetentionSeconds)
        .column(tenant::Column::BodyRetentionSeconds)
        .into_tuple()
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(id, records, bodies)| (TenantId::from_uuid(id), override_of_row(records, bodies)))
        .collect())
}

/// The tenant's own retention (`Override::default()` when it has none).
pub async fn override_of(db: &impl ConnectionTrait, tenant_id: TenantId) -> Result<Override, StoreError> {
    let row: Option<(Option<i64>, Option<i64>)> = tenant::Entity::find_by_id(tenant_id.as_uuid())
        .select_only()
        .column(tenant::Column::RetentionSeconds)
        .column(tenant::Column::BodyRetentionSeconds)
        .into_tuple()
        .one(db)
        .await?;
    let (records, bodies) = row.ok_or(StoreError::NotFound)?;
    Ok(override_of_row(records, bodies))
}

/// Stores the tenant's choice (already checked against the operator's bounds).
pub async fn set_override(db: &impl ConnectionTrait, tenant_id: TenantId, chosen: Override) -> Result<(), StoreError> {
    let seconds = |duration: Option<Duration>| duration.map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let row = tenant::ActiveModel {
        id: sea_orm::ActiveValue::Unchanged(tenant_id.as_uuid()),
        retention_seconds: Set(seconds(chosen.records)),
        body_retention_seconds: Set(seconds(chosen.bodies)),
        ..Default::default()
    };
    tenant::Entity::update(row)
        .exec(db)
        .await
        .map_err(|error| match error {
            sea_orm::DbErr::RecordNotUpdated => StoreError::NotFound,
            other => other.into(),
        })?;
    Ok(())
}

fn override_of_row(records: Option<i64>, bodies: Option<i64>) -> Override {
    let duration = |seconds: Option<i64>| seconds.and_then(|s| u64::try_from(s).ok()).map(Duration::from_secs);
    Override {
        records: duration(records),
        bodies: duration(bodies),
    }
}

/// Deletes up to `limit` of the tenant's final deliveries created before
/// `before` (their attempts go with them: the foreign key cascades). Returns
/// how many.
pub async fn delete_final_deliveries(
    db: &impl ConnectionTrait,
    tenant_id: TenantId,
    before: DateTime<Utc>,
    limit: u64,
) -> Result<u64, StoreError> {
    let oldest = Query::select()
        .column(delivery::Column::Id)
        .from(delivery::Entity)
        .and_where(delivery::Column::TenantId.eq(tenant_id.as_uuid()))
        .and_where(delivery::Column::Id.lt(crate::first_v7_id_at(before)))
        .and_where(delivery::Column::Status.ne(DeliveryStatus::Pending.as_str()))
        .order_by(delivery::Column::Id, Order::Asc)
        .limit(limit)
        .to_owned();
    delete_final_deliveries_among(db, oldest).await
}

/// Deletes up to `limit` final deliveries, of any tenant, created in
/// `[from, to)`: the rows of a partition that a pending delivery keeps from
/// being dropped. Returns how many.
pub async fn delete_final_deliveries_between(
    db: &impl ConnectionTrait,
    from: Option<DateTime<Utc>>,
    to: DateTime<Utc>,
    limit: u64,
) -> Result<u64, StoreError> {
    let mut oldest = Query::select()
        .column(delivery::Column::Id)
        .from(delivery::Entity)
        .and_where(delivery::Column::Id.lt(crate::partitions::bound_at(to)))
        .and_where(delivery::Column::Status.ne(DeliveryStatus::Pending.as_str()))
        .order_by(delivery::Column::Id, Order::Asc)
        .limit(limit)
        .to_owned();
    if let Some(from) = from {
        oldest.and_where(delivery::Column::Id.gte(crate::partitions::bound_at(from)));
    }
    delete_final_deliveries_among(db, oldest).await
}

async fn delete_final_deliveries_among(
    db: &impl ConnectionTrait,
    ids: sea_orm::sea_query::SelectStatement,
) -> Result<u64, StoreError> {
    let deleted = delivery::Entity::delete_many()
        .filter(delivery::Column::Id.in_subquery(ids))
        // Again on the row itself: one reopened meanwhile is pending now.
        .filter(delivery::Column::Status.ne(DeliveryStatus::Pending.as_str()))
        .exec(db)
        .await?;
    Ok(deleted.rows_affected)
}

/// Deletes up to `limit` of the tenant's events created before `before` that
/// no delivery refers to any more (their deliveries went first, or they had
/// none). Returns how many.
pub async fn delete_unreferenced_events(
    db: &impl ConnectionTrait,
    tenant_id: TenantId,
    before: DateTime<Utc>,
    limit: u64,
) -> Result<u64, StoreError> {
    let referenced = Query::select()
        .expr(Expr::val(1))
        .from_as(delivery::Entity, Alias::new("d"))
        .and_where(Expr::col((Alias::new("d"), delivery::Column::EventId)).equals((Alias::new("e"), event::Column::Id)))
        .to_owned();
    let oldest = Query::select()
        .column((Alias::new("e"), event::Column::Id))
        .from_as(event::Entity, Alias::new("e"))
        .and_where(Expr::col((Alias::new("e"), event::Column::TenantId)).eq(tenant_id.as_uuid()))
        .and_where(Expr::col((Alias::new("e"), event::Column::Id)).lt(crate::first_v7_id_at(before)))
        .and_where(Expr::exists(referenced).not())
        .order_by((Alias::new("e"), event::Column::Id), Order::Asc)
        .limit(limit)
        .to_owned();
    let deleted = event::Entity::delete_many()
        .filter(event::Column::Id.in_subquery(oldest))
        .exec(db)
        .await?;
    Ok(deleted.rows_affected)
}

/// Drops the bodies of up to `limit` of the tenant's events created before
/// `before` none of whose deliveries is pending: the payload, and the
/// response bodies of their deliveries' attempts. The records stay. Returns
/// how many events.
pub async fn expunge_bodies(
    db: &impl sea_orm::TransactionTrait,
    tenant_id: TenantId,
    before: DateTime<Utc>,
    now: DateTime<Utc>,
    limit: u64,
) -> Result<u64, StoreError> {
    use sea_orm::TransactionSession as _;
    let transaction = db.begin().await?;
    let pending = Query::select()
        .expr(Expr::val(1))
        .from_as(delivery::Entity, Alias::new("d"))
        .and_where(Expr::col((Alias::new("d"), delivery::Column::EventId)).equals((Alias::new("e"), event::Column::Id)))
        .and_where(Expr::col((Alias::new("d"), delivery::Column::Status)).eq(DeliveryStatus::Pending.as_str()))
        .to_owned();
    let oldest: Vec<Uuid> = transaction
        .query_all(
            &Query::select()
                .column((Alias::new("e"), event::Column::Id))
                .from_as(event::Entity, Alias::new("e"))
                .and_where(Expr::col((Alias::new("e"), event::Column::TenantId)).eq(tenant_id.as_uuid()))
                .and_where(Expr::col((Alias::new("e"), event::Column::Id)).lt(crate::first_v7_id_at(before)))
                .and_where(Expr::col((Alias::new("e"), event::Column::BodyExpungedAt)).is_null())
                .and_where(Expr::exists(pending).not())
                .order_by((Alias::new("e"), event::Column::Id), Order::Asc)
                .limit(limit)
                .to_owned(),
        )
        .await?
        .into_iter()
        .map(|row| row.try_get_by_index::<Uuid>(0))
        .collect::<Result<_, _>>()?;
    if oldest.is_empty() {
        // Ended now: a dropped transaction's rollback waits for the
        // connection's next use, holding its locks (which a partition drop
        // would then wait for) until then.
        transaction.rollback().await?;
        return Ok(0);
    }
    let expunged = event::Entity::update_many()
        .col_expr(event::Column::Data, Expr::value(""))
        .col_expr(event::Column::BodyExpungedAt, Expr::value(Some(now)))
        .filter(event::Column::Id.is_in(crate::in_list(oldest.iter().copied())))
        .filter(event::Column::BodyExpungedAt.is_null())
        .exec(&transaction)
        .await?
        .rows_affected;
    let their_deliveries = Query::select()
        .column(delivery::Column::Id)
        .from(delivery::Entity)
        .and_where(delivery::Column::EventId.is_in(crate::in_list(oldest.iter().copied())))
        .to_owned();
    delivery_attempt::Entity::update_many()
        .col_expr(
            delivery_attempt::Column::ResponseBody,
            Expr::value(Option::<String>::None),
        )
        .filter(delivery_attempt::Column::DeliveryId.in_subquery(their_deliveries))
        .filter(delivery_attempt::Column::ResponseBody.is_not_null())
        .exec(&transaction)
        .await?;
    transaction.commit().await?;
    Ok(expunged)
}
