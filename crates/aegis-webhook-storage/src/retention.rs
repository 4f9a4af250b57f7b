//! Expiry's statements and the tenants' own retention. Every statement is
//! bounded (`limit` rows) and walks an index from the oldest row it may
//! remove, so a pass costs what it removes, not what is kept. A pending
//! delivery is never removed, nor the event it will send, nor that event's
//! bodies. The deletes repeat the "not pending" (or "not referred to") test
//! on each row, so a delivery reopened while a statement runs is kept; the
//! body update does not (its test is a join), and a delivery reopened at
//! that moment is ended by the worker, which refuses to send an emptied
//! payload.

use std::time::Duration;

use aegis_webhook_core::ids::TenantId;
use aegis_webhook_core::retention::Override;
use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Alias, Expr, ExprTrait, Order, Query};
use sea_orm::{ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
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
/// none), walking from `after` (exclusive); returns how many it deleted and
/// the last id it looked at, where the next batch goes on.
///
/// Every delivery is made after its event, so an event older than the
/// tenant's oldest final delivery can be referred to only by a pending one
/// (few, and tested row by row): the walk stops there (`before` is lowered to
/// it), so it never reads the events whose final deliveries still wait for
/// their partition to go. It reads at most `limit` events of the
/// `(tenant_id, id)` index, whatever it deletes.
pub async fn delete_unreferenced_events(
    db: &impl ConnectionTrait,
    tenant_id: TenantId,
    before: DateTime<Utc>,
    after: Option<Uuid>,
    limit: u64,
) -> Result<(u64, Option<Uuid>), StoreError> {
    let oldest_delivery: Option<Uuid> = delivery::Entity::find()
        .select_only()
        .column(delivery::Column::Id)
        .filter(delivery::Column::TenantId.eq(tenant_id.as_uuid()))
        .filter(delivery::Column::Status.ne(DeliveryStatus::Pending.as_str()))
        .order_by_asc(delivery::Column::Id)
        .limit(1)
        .into_tuple()
        .one(db)
        .await?;
    let mut until = crate::first_v7_id_at(before);
    if let Some(oldest_delivery) = oldest_delivery {
        until = std::cmp::min(until, oldest_delivery);
    }
    let mut candidates = event::Entity::find()
        .select_only()
        .column(event::Column::Id)
        .filter(event::Column::TenantId.eq(tenant_id.as_uuid()))
        .filter(event::Column::Id.lt(until))
        .order_by_asc(event::Column::Id)
        .limit(limit);
    if let Some(after) = after {
        candidates = candidates.filter(event::Column::Id.gt(after));
    }
    let candidates: Vec<Uuid> = candidates.into_tuple().all(db).await?;
    let Some(&last) = candidates.last() else {
        return Ok((0, None));
    };
    // The test again, on each row: a delivery made across a clock step
    // between processes still keeps its event.
    let referenced = Query::select()
        .expr(Expr::val(1))
        .from(delivery::Entity)
        .and_where(Expr::col((delivery::Entity, delivery::Column::EventId)).equals((event::Entity, event::Column::Id)))
        .to_owned();
    let deleted = event::Entity::delete_many()
        .filter(event::Column::Id.is_in(crate::in_list(candidates.iter().copied())))
        .filter(Expr::exists(referenced).not())
        .exec(db)
        .await?;
    let more = candidates.len() as u64 == limit;
    Ok((deleted.rows_affected, more.then_some(last)))
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
    // Their deliveries first, then their attempts by delivery id: each an
    // index lookup (a subquery here was planned as a scan of every attempt).
    let their_deliveries: Vec<Uuid> = delivery::Entity::find()
        .select_only()
        .column(delivery::Column::Id)
        .filter(delivery::Column::EventId.is_in(crate::in_list(oldest.iter().copied())))
        .into_tuple()
        .all(&transaction)
        .await?;
    delivery_attempt::Entity::update_many()
        .col_expr(
            delivery_attempt::Column::ResponseBody,
            Expr::value(Option::<String>::None),
        )
        .filter(delivery_attempt::Column::DeliveryId.is_in(crate::in_list(their_deliveries)))
        .filter(delivery_attempt::Column::ResponseBody.is_not_null())
        .exec(&transaction)
        .await?;
    transaction.commit().await?;
    Ok(expunged)
}
