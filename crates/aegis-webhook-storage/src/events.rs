//! Upstream events as received, deduplicated per tenant on the envelope's id.

use std::collections::HashSet;

use chrono::Utc;
use sea_orm::{ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect, TryInsertResult};
use uuid::Uuid;

use aegis_webhook_core::ids::{EventId, TenantId};

use crate::StoreError;
use crate::entities::event;
use aegis_webhook_core::event::ValidatedEvent;

/// An event as stored: what every delivery of it is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub id: EventId,
    pub tenant_id: TenantId,
    pub external_id: Uuid,
    /// The delivered `timestamp` string.
    pub timestamp: String,
    /// The delivered `data` object, serialized once; `None` once the tenant's
    /// body retention has passed and expiry dropped it.
    pub data: Option<String>,
    /// When expiry dropped the payload and its attempts' response bodies.
    pub body_expunged_at: Option<chrono::DateTime<Utc>>,
}

impl From<event::Model> for StoredEvent {
    fn from(row: event::Model) -> Self {
        StoredEvent {
            id: EventId::from_uuid(row.id),
            tenant_id: TenantId::from_uuid(row.tenant_id),
            external_id: row.external_id,
            timestamp: row.timestamp,
            data: row.body_expunged_at.is_none().then_some(row.data),
            body_expunged_at: row.body_expunged_at,
        }
    }
}

/// Stores the event and returns its row id, or `None` when the tenant already has
/// an event with this id: a repeat that must not be fanned out again.
pub async fn insert_event(db: &impl ConnectionTrait, event: &ValidatedEvent) -> Result<Option<EventId>, StoreError> {
    Ok(insert_events(db, &[event]).await?.pop().flatten())
}

/// Stores one event and its deliveries, all due at `now`, in one transaction
/// of its own (a savepoint when `db` is a transaction already): for an
/// event the system makes itself (`testWebhook`); upstream events go through
/// the ingester's batched fan-out. The delivery ids in `deliveries`' order, or
/// `None` when the tenant already had an event with this id.
pub async fn insert_event_with_deliveries(
    db: &impl sea_orm::TransactionTrait,
    event: &ValidatedEvent,
    deliveries: &[crate::deliveries::NewDelivery],
    now: chrono::DateTime<Utc>,
) -> Result<Option<Vec<aegis_webhook_core::ids::DeliveryId>>, StoreError> {
    use sea_orm::TransactionSession as _;
    let transaction = sea_orm::TransactionTrait::begin(db).await?;
    let Some(event_id) = insert_event(&transaction, event).await? else {
        return Ok(None);
    };
    let ids = crate::deliveries::insert_pending(&transaction, event.tenant_id(), event_id, deliveries, now).await?;
    transaction.commit().await?;
    Ok(Some(ids))
}

/// [`insert_event`] for many events in one statement: for each, its row id, or
/// `None` for a repeat (of a stored event or of an earlier one in `events`).
pub async fn insert_events(
    db: &impl ConnectionTrait,
    events: &[&ValidatedEvent],
) -> Result<Vec<Option<EventId>>, StoreError> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<Uuid> = events.iter().map(|_| Uuid::now_v7()).collect();
    let received_at = Utc::now();
    let rows = events.iter().zip(&ids).map(|(event, id)| event::ActiveModel {
        id: Set(*id),
        tenant_id: Set(event.tenant_id().as_uuid()),
        external_id: Set(event.id()),
        event_type: Set(event.event_type().as_str().to_owned()),
        timestamp: Set(event.timestamp_text()),
        data: Set(event.data().to_json()),
        received_at: Set(received_at),
        body_expunged_at: Set(None),
    });
    let outcome = event::Entity::insert_many(rows)
        .on_conflict_do_nothing_on([event::Column::TenantId, event::Column::ExternalId])
        .exec_with_returning_keys(db)
        .await?;
    let inserted: HashSet<Uuid> = match outcome {
        TryInsertResult::Inserted(keys) => keys.into_iter().collect(),
        TryInsertResult::Empty | TryInsertResult::Conflicted => HashSet::new(),
    };
    Ok(ids
        .into_iter()
        .map(|id| inserted.contains(&id).then_some(EventId::from_uuid(id)))
        .collect())
}

/// The events with these ids that exist, in no particular order.
pub async fn events_by_ids(db: &impl ConnectionTrait, ids: &[EventId]) -> Result<Vec<StoredEvent>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = event::Entity::find()
        .filter(event::Column::Id.is_in(crate::in_list(ids.iter().map(|id| id.as_uuid()))))
        .all(db)
        .await?;
    Ok(rows.into_iter().map(StoredEvent::from).collect())
}

/// Those of `ids` whose bodies expiry has dropped.
pub async fn expunged_among(db: &impl ConnectionTrait, ids: &[EventId]) -> Result<HashSet<EventId>, StoreError> {
    if ids.is_empty() {
        return Ok(HashSet::new());
    }
    let expunged: Vec<Uuid> = event::Entity::find()
        .select_only()
        .column(event::Column::Id)
        .filter(event::Column::Id.is_in(crate::in_list(ids.iter().map(|id| id.as_uuid()))))
        .filter(event::Column::BodyExpungedAt.is_not_null())
        .into_tuple()
        .all(db)
        .await?;
    Ok(expunged.into_iter().map(EventId::from_uuid).collect())
}
