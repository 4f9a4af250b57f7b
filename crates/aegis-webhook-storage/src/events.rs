//! Upstream events as received, deduplicated per tenant on the envelope's id.

use std::collections::HashSet;

use chrono::Utc;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, DbBackend, EntityTrait, QueryFilter, QuerySelect, Statement,
    TryInsertResult,
};
use uuid::Uuid;

use aegis_webhook_core::ids::{DeliveryId, EventId, TenantId};

use crate::StoreError;
use crate::deliveries::{DeliveryStatus, EventDelivery, NewDelivery};
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

/// Stores one event and its deliveries, all due at `now`, all or nothing
/// (and part of the caller's transaction when `db` is one): for an event the system
/// makes itself (`testWebhook`); upstream events go through the ingester's
/// batched fan-out, [`insert_events_with_deliveries`]. The delivery ids in
/// `deliveries`' order, or `None` when the tenant already had an event with
/// this id.
pub async fn insert_event_with_deliveries<
    C: ConnectionTrait + sea_orm::TransactionTrait<Transaction = sea_orm::DatabaseTransaction>,
>(
    db: &C,
    event: &ValidatedEvent,
    deliveries: &[NewDelivery],
    now: chrono::DateTime<Utc>,
) -> Result<Option<Vec<DeliveryId>>, StoreError> {
    let one = [EventWithDeliveries {
        event,
        deliveries: deliveries.to_vec(),
    }];
    Ok(insert_events_with_deliveries(db, &one, now).await?.pop().flatten())
}

/// An event to store and the deliveries it fans out to.
#[derive(Debug, Clone)]
pub struct EventWithDeliveries<'a> {
    pub event: &'a ValidatedEvent,
    pub deliveries: Vec<NewDelivery>,
}

/// Stores events and their deliveries, all due at `now`, all or nothing: for
/// each event its deliveries' ids in order, or `None` for a repeat (of a
/// stored event or of an earlier one in `batch`), whose deliveries are not
/// stored. This is the fan-out's write, on every event's path.
///
/// On PostgreSQL it is one statement, of one text whatever the batch's size
/// (the rows travel as two JSON arrays), so each connection prepares it
/// once, committed by itself: one round trip, where a transaction of two
/// inserts took four (BEGIN, the inserts, COMMIT). SQLite cannot insert from
/// within a `WITH`: there the two inserts share a transaction (a savepoint
/// inside a caller's).
pub async fn insert_events_with_deliveries<
    C: ConnectionTrait + sea_orm::TransactionTrait<Transaction = sea_orm::DatabaseTransaction>,
>(
    db: &C,
    batch: &[EventWithDeliveries<'_>],
    now: chrono::DateTime<Utc>,
) -> Result<Vec<Option<Vec<DeliveryId>>>, StoreError> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let rows = NewRows {
        batch,
        event_ids: batch.iter().map(|_| EventId::generate()).collect(),
        delivery_ids: batch
            .iter()
            .map(|planned| planned.deliveries.iter().map(|_| DeliveryId::generate()).collect())
            .collect(),
        now,
    };
    let inserted = match db.get_database_backend() {
        DbBackend::Postgres => in_one_statement(db, &rows).await?,
        _ => {
            let transaction = db.begin().await?;
            let outcome = in_two_inserts(&transaction, &rows).await;
            crate::end(transaction, outcome).await?
        }
    };
    Ok(rows
        .event_ids
        .iter()
        .zip(rows.delivery_ids)
        .map(|(event_id, ids)| inserted.contains(event_id).then_some(ids))
        .collect())
}

/// A batch of [`insert_events_with_deliveries`] with the ids its rows take,
/// all due at `now`: what both of its forms write.
struct NewRows<'a, 'b> {
    batch: &'a [EventWithDeliveries<'b>],
    event_ids: Vec<EventId>,
    /// By event, in the order of its deliveries.
    delivery_ids: Vec<Vec<DeliveryId>>,
    now: chrono::DateTime<Utc>,
}

impl NewRows<'_, '_> {
    /// Each event with its id and its deliveries' ids.
    fn each(&self) -> impl Iterator<Item = (&EventWithDeliveries<'_>, &EventId, &Vec<DeliveryId>)> {
        self.batch
            .iter()
            .zip(&self.event_ids)
            .zip(&self.delivery_ids)
            .map(|((planned, event_id), ids)| (planned, event_id, ids))
    }
}

/// The PostgreSQL form of [`insert_events_with_deliveries`]; the events it
/// inserted. A delivery goes in only with its event: the second insert reads
/// what the first returned. The foreign key from a delivery to its event is
/// checked at the statement's end, when both are in.
async fn in_one_statement(db: &impl ConnectionTrait, rows: &NewRows<'_, '_>) -> Result<HashSet<EventId>, StoreError> {
    const SQL: &str = r#"
        WITH new_events AS (
            INSERT INTO events (id, tenant_id, external_id, event_type, "timestamp", data, received_at)
            SELECT e.id, e.tenant_id, e.external_id, e.event_type, e."timestamp", e.data, $3
            FROM jsonb_to_recordset($1::jsonb)
                AS e(id uuid, tenant_id uuid, external_id uuid, event_type text, "timestamp" text, data text)
            ON CONFLICT (tenant_id, external_id) DO NOTHING
            RETURNING id
        ), new_deliveries AS (
            INSERT INTO deliveries
                (id, tenant_id, webhook_id, event_id, event_type, status, attempts, next_attempt_at, created_at, updated_at)
            SELECT d.id, d.tenant_id, d.webhook_id, d.event_id, d.event_type, $4, 0, $3, $3, $3
            FROM jsonb_to_recordset($2::jsonb)
                AS d(id uuid, tenant_id uuid, webhook_id uuid, event_id uuid, event_type text)
            WHERE d.event_id IN (SELECT id FROM new_events)
        )
        SELECT id FROM new_events"#;
    let events: Vec<serde_json::Value> = rows
        .each()
        .map(|(planned, id, _)| {
            let event = planned.event;
            serde_json::json!({
                "id": id.as_uuid(),
                "tenant_id": event.tenant_id().as_uuid(),
                "external_id": event.id(),
                "event_type": event.event_type().as_str(),
                "timestamp": event.timestamp_text(),
                "data": event.data().to_json(),
            })
        })
        .collect();
    let deliveries: Vec<serde_json::Value> = rows
        .each()
        .flat_map(|(planned, event_id, ids)| {
            planned.deliveries.iter().zip(ids).map(|(delivery, id)| {
                serde_json::json!({
                    "id": id.as_uuid(),
                    "tenant_id": planned.event.tenant_id().as_uuid(),
                    "webhook_id": delivery.webhook_id.as_uuid(),
                    "event_id": event_id.as_uuid(),
                    "event_type": delivery.event_type.as_str(),
                })
            })
        })
        .collect();
    let values: [sea_orm::Value; 4] = [
        serde_json::Value::Array(events).into(),
        serde_json::Value::Array(deliveries).into(),
        rows.now.into(),
        DeliveryStatus::Pending.as_str().into(),
    ];
    let rows = db
        .query_all_raw(Statement::from_sql_and_values(DbBackend::Postgres, SQL, values))
        .await?;
    rows.iter()
        .map(|row| Ok(EventId::from_uuid(row.try_get::<Uuid>("", "id")?)))
        .collect()
}

/// The SQLite form of [`insert_events_with_deliveries`], inside the caller's
/// transaction; the events it inserted.
async fn in_two_inserts(db: &impl ConnectionTrait, rows: &NewRows<'_, '_>) -> Result<HashSet<EventId>, StoreError> {
    let events: Vec<&ValidatedEvent> = rows.batch.iter().map(|planned| planned.event).collect();
    let inserted: HashSet<EventId> = insert_events_with_ids(db, &events, &rows.event_ids, rows.now)
        .await?
        .into_iter()
        .flatten()
        .collect();
    let mut deliveries = Vec::new();
    let mut ids = Vec::new();
    for (planned, event_id, of_event) in rows.each() {
        if !inserted.contains(event_id) {
            continue;
        }
        deliveries.extend(planned.deliveries.iter().map(|delivery| EventDelivery {
            tenant_id: planned.event.tenant_id(),
            event_id: *event_id,
            delivery: *delivery,
        }));
        ids.extend_from_slice(of_event);
    }
    crate::deliveries::insert_pending_with_ids(db, &deliveries, &ids, rows.now).await?;
    Ok(inserted)
}

/// [`insert_event`] for many events in one statement: for each, its row id, or
/// `None` for a repeat (of a stored event or of an earlier one in `events`).
pub async fn insert_events(
    db: &impl ConnectionTrait,
    events: &[&ValidatedEvent],
) -> Result<Vec<Option<EventId>>, StoreError> {
    let ids: Vec<EventId> = events.iter().map(|_| EventId::generate()).collect();
    insert_events_with_ids(db, events, &ids, Utc::now()).await
}

/// [`insert_events`] with the ids the new rows take, received at `received_at`.
async fn insert_events_with_ids(
    db: &impl ConnectionTrait,
    events: &[&ValidatedEvent],
    ids: &[EventId],
    received_at: chrono::DateTime<Utc>,
) -> Result<Vec<Option<EventId>>, StoreError> {
    if events.is_empty() {
        return Ok(Vec::new());
    }
    let rows = events.iter().zip(ids).map(|(event, id)| event::ActiveModel {
        id: Set(id.as_uuid()),
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
        .iter()
        .map(|id| inserted.contains(&id.as_uuid()).then_some(*id))
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
