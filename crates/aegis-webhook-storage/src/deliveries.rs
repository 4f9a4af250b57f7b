//! Deliveries (one event to one webhook) and their attempts. The database is the
//! source of truth for a delivery's state; queue tasks only say "look at it now".

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Condition, Expr};
use sea_orm::{ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use uuid::Uuid;

use aegis_webhook_core::ids::{DeliveryId, EventId, TenantId, WebhookId};

use crate::StoreError;
use crate::entities::{delivery, delivery_attempt, event, webhook};
use crate::events::StoredEvent;
use crate::webhooks::{Unreadable, Webhook};
use aegis_webhook_core::event::EventType;
use aegis_webhook_core::secret::SecretCipher;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryStatus {
    /// Waiting for its next attempt.
    Pending,
    /// A 2xx answer arrived.
    Succeeded,
    /// Every attempt failed, or the receiver asked to stop (410); dead-lettered.
    Failed,
}

impl DeliveryStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryStatus::Pending => "PENDING",
            DeliveryStatus::Succeeded => "SUCCEEDED",
            DeliveryStatus::Failed => "FAILED",
        }
    }
}

impl fmt::Display for DeliveryStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeliveryStatus {
    type Err = StoreError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "PENDING" => Ok(DeliveryStatus::Pending),
            "SUCCEEDED" => Ok(DeliveryStatus::Succeeded),
            "FAILED" => Ok(DeliveryStatus::Failed),
            other => Err(StoreError::Unexpected(anyhow::anyhow!(
                "unknown delivery status `{other}`"
            ))),
        }
    }
}

/// A delivery as read back.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub id: DeliveryId,
    pub tenant_id: TenantId,
    pub webhook_id: WebhookId,
    pub event_id: EventId,
    pub event_type: EventType,
    pub status: DeliveryStatus,
    pub attempts: u32,
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// Until when a worker's claim on the next attempt holds, if one does.
    pub locked_until: Option<DateTime<Utc>>,
    pub last_status_code: Option<u16>,
    pub failure_reason: Option<String>,
    pub created_at: DateTime<Utc>,
}

impl TryFrom<delivery::Model> for Delivery {
    type Error = StoreError;

    fn try_from(row: delivery::Model) -> Result<Self, Self::Error> {
        Ok(Delivery {
            id: DeliveryId::from_uuid(row.id),
            tenant_id: TenantId::from_uuid(row.tenant_id),
            webhook_id: WebhookId::from_uuid(row.webhook_id),
            event_id: EventId::from_uuid(row.event_id),
            event_type: row
                .event_type
                .parse()
                .map_err(|error| StoreError::Unexpected(anyhow::anyhow!("stored delivery: {error}")))?,
            status: row.status.parse()?,
            attempts: u32::try_from(row.attempts).unwrap_or_default(),
            next_attempt_at: row.next_attempt_at,
            locked_until: row.locked_until,
            last_status_code: row.last_status_code.and_then(|code| u16::try_from(code).ok()),
            failure_reason: row.failure_reason,
            created_at: row.created_at,
        })
    }
}

impl Delivery {
    /// The claim a worker holds on the delivery's next attempt, as the
    /// claiming statement wrote it; `None` while none was taken since the
    /// last record.
    pub fn lease(&self) -> Option<Lease> {
        self.locked_until.map(Lease)
    }
}

/// A claim on a delivery's next attempt, known by the lease expiry the
/// claim wrote. No two claims of one delivery write the same one (a claim
/// is taken only once the one before has run out, so its expiry is later),
/// so a record made under the claim the delivery still has can be told from
/// a late one, made under a claim that ran out and was taken over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Lease(DateTime<Utc>);

/// One HTTP attempt, as logged for the customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub delivery_id: DeliveryId,
    pub attempt: u32,
    pub started_at: DateTime<Utc>,
    pub duration: Duration,
    pub status_code: Option<u16>,
    pub error: Option<String>,
    pub response_body: Option<String>,
}

/// What happens to a delivery after an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NextStep {
    Succeeded,
    RetryAt(DateTime<Utc>),
    Failed(String),
}

/// An attempt to record: what was sent and answered, the claim it was made
/// under, and what follows for its delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub attempt: Attempt,
    pub lease: Lease,
    pub next: NextStep,
}

/// A delivery that needs a task on the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingDelivery {
    pub id: DeliveryId,
    pub webhook_id: WebhookId,
    pub next_attempt: u32,
    pub due_at: DateTime<Utc>,
}

/// A delivery the fan-out decided on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewDelivery {
    pub webhook_id: WebhookId,
    pub event_type: EventType,
}

/// Inserts pending deliveries of one event, all due now, in one statement.
pub async fn insert_pending(
    db: &impl ConnectionTrait,
    tenant_id: TenantId,
    event_id: EventId,
    deliveries: &[NewDelivery],
    now: DateTime<Utc>,
) -> Result<Vec<DeliveryId>, StoreError> {
    let of_event: Vec<EventDelivery> = deliveries
        .iter()
        .map(|delivery| EventDelivery {
            tenant_id,
            event_id,
            delivery: *delivery,
        })
        .collect();
    insert_pending_of_events(db, &of_event, now).await
}

/// A delivery the fan-out decided on, with the event it delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventDelivery {
    pub tenant_id: TenantId,
    pub event_id: EventId,
    pub delivery: NewDelivery,
}

/// Rows per insert statement: well under PostgreSQL's 65,535 bind parameters.
const INSERT_CHUNK: usize = 1_000;

/// [`insert_pending`] for the deliveries of many events, in as few statements
/// as the database's limits allow. Returns their ids, in order.
pub async fn insert_pending_of_events(
    db: &impl ConnectionTrait,
    deliveries: &[EventDelivery],
    now: DateTime<Utc>,
) -> Result<Vec<DeliveryId>, StoreError> {
    let ids: Vec<DeliveryId> = deliveries.iter().map(|_| DeliveryId::generate()).collect();
    insert_pending_with_ids(db, deliveries, &ids, now).await?;
    Ok(ids)
}

/// [`insert_pending_of_events`] with the ids the new rows take.
pub(crate) async fn insert_pending_with_ids(
    db: &impl ConnectionTrait,
    deliveries: &[EventDelivery],
    ids: &[DeliveryId],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    for (chunk, chunk_ids) in deliveries.chunks(INSERT_CHUNK).zip(ids.chunks(INSERT_CHUNK)) {
        let rows = chunk.iter().zip(chunk_ids).map(|(new, id)| delivery::ActiveModel {
            id: Set(id.as_uuid()),
            tenant_id: Set(new.tenant_id.as_uuid()),
            webhook_id: Set(new.delivery.webhook_id.as_uuid()),
            event_id: Set(new.event_id.as_uuid()),
            event_type: Set(new.delivery.event_type.as_str().to_owned()),
            status: Set(DeliveryStatus::Pending.as_str().to_owned()),
            attempts: Set(0),
            next_attempt_at: Set(Some(now)),
            locked_until: Set(None),
            last_status_code: Set(None),
            failure_reason: Set(None),
            created_at: Set(now),
            updated_at: Set(now),
        });
        delivery::Entity::insert_many(rows).exec_without_returning(db).await?;
    }
    Ok(())
}

pub async fn delivery_by_id(db: &impl ConnectionTrait, id: DeliveryId) -> Result<Option<Delivery>, StoreError> {
    delivery::Entity::find_by_id(id)
        .one(db)
        .await?
        .map(Delivery::try_from)
        .transpose()
}

/// How early a task may arrive and still be attempted: delayed tasks travel
/// through fixed-length broker tiers and clocks differ a little between hosts.
pub const DUE_TOLERANCE: Duration = Duration::from_millis(50);

/// No worker holds a live claim on the delivery at `now`.
fn unclaimed_at(now: DateTime<Utc>) -> Condition {
    Condition::any()
        .add(delivery::Column::LockedUntil.is_null())
        .add(delivery::Column::LockedUntil.lt(now))
}

/// Takes the right to make attempt `attempt` of a pending delivery for `lease`.
/// Fails when the attempt was already made, the delivery is finished, is not due
/// yet, or another worker holds an unexpired claim: duplicate tasks then do nothing.
/// Returns the claim taken, if one was.
pub async fn claim(
    db: &impl ConnectionTrait,
    id: DeliveryId,
    attempt: u32,
    lease: Duration,
    now: DateTime<Utc>,
) -> Result<Option<Lease>, StoreError> {
    let wanted = [ClaimRequest {
        delivery_id: id,
        attempt,
    }];
    Ok(claim_many(db, &wanted, lease, now)
        .await?
        .pop()
        .and_then(|delivery| delivery.lease()))
}

/// Attempt `attempt` of delivery `delivery_id`, as a task asks for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClaimRequest {
    pub delivery_id: DeliveryId,
    pub attempt: u32,
}

/// [`claim`] for many deliveries in one statement, which also reads them back:
/// returns the deliveries claimed, in no particular order. A worker claims the
/// tasks it has taken together, so the database sees one round trip for many.
pub async fn claim_many(
    db: &impl ConnectionTrait,
    wanted: &[ClaimRequest],
    lease: Duration,
    now: DateTime<Utc>,
) -> Result<Vec<Delivery>, StoreError> {
    claim_with(db, wanted, lease, now, Flush::Wait).await
}

/// Whether a claim's commit waits for its WAL to reach the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flush {
    Wait,
    Skip,
}

async fn claim_with(
    db: &impl ConnectionTrait,
    wanted: &[ClaimRequest],
    lease: Duration,
    now: DateTime<Utc>,
    flush: Flush,
) -> Result<Vec<Delivery>, StoreError> {
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    claim_update(wanted, lease, now, flush, db.get_database_backend())
        .exec_with_returning(db)
        .await?
        .into_iter()
        .map(Delivery::try_from)
        .collect()
}

/// The claiming `UPDATE` of [`claim_many`], not yet run; `wanted` is not empty.
fn claim_update(
    wanted: &[ClaimRequest],
    lease: Duration,
    now: DateTime<Utc>,
    flush: Flush,
    backend: sea_orm::DbBackend,
) -> sea_orm::UpdateMany<delivery::Entity> {
    let until = now + chrono::Duration::from_std(lease).unwrap_or(chrono::Duration::MAX);
    let due_by = now + chrono::Duration::from_std(DUE_TOLERANCE).unwrap_or_default();
    // Attempt N is claimable only while N - 1 attempts are recorded.
    let mut by_attempt: std::collections::BTreeMap<u32, Vec<Uuid>> = std::collections::BTreeMap::new();
    for request in wanted {
        by_attempt
            .entry(request.attempt)
            .or_default()
            .push(request.delivery_id.as_uuid());
    }
    let mut any_wanted = Condition::any();
    for (attempt, ids) in by_attempt {
        let previous_attempts = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        any_wanted = any_wanted.add(
            Condition::all()
                .add(delivery::Column::Id.is_in(crate::in_list(ids)))
                .add(delivery::Column::Attempts.eq(previous_attempts)),
        );
    }
    let mut claim = delivery::Entity::update_many()
        .col_expr(delivery::Column::LockedUntil, Expr::value(until))
        .filter(any_wanted);
    if flush == Flush::Skip && backend == sea_orm::DbBackend::Postgres {
        // `SET LOCAL` in the statement itself: the setting holds for the
        // statement's own (implicit) transaction, its commit included, and
        // costs no round trip of its own. A condition that is always true.
        claim = claim.filter(Expr::cust("set_config('synchronous_commit', 'off', true) IS NOT NULL"));
    }
    claim
        .filter(pending_by_key())
        .filter(delivery::Column::NextAttemptAt.lte(due_by))
        .filter(unclaimed_at(now))
}

/// "Pending", for a statement that finds its deliveries by primary key: the
/// status is compared as an expression no index serves, so the key is the
/// only way in. As a plain column it lets the planner combine the key with
/// `idx_deliveries_status_due`, which reads every pending delivery: with
/// stale statistics (a table that grew fast, as under a flood) PostgreSQL
/// did, and a claim of a few hundred ids cost as much as the whole backlog
/// (8 ms at 100,000 pending, measured with EXPLAIN ANALYZE), so throughput
/// fell as the backlog grew. (The guard of `record_attempts` as a plain
/// column did the same: a 20,000 × 10 burst fell from about 7,000 to 715
/// deliveries a second, PostgreSQL taking 218 CPU s.)
fn pending_by_key() -> sea_orm::sea_query::SimpleExpr {
    Expr::cust(format!(
        r#"("deliveries"."status" || '') = '{}'"#,
        DeliveryStatus::Pending.as_str()
    ))
}

/// What a worker's claim returns: the deliveries it claimed and what their
/// attempts are built from.
#[derive(Debug, Default)]
pub struct Leases {
    /// The deliveries claimed, in no particular order.
    pub deliveries: Vec<Delivery>,
    /// Their events, each once.
    pub events: Vec<StoredEvent>,
    /// Those of their webhooks that still exist, each once; a row that
    /// cannot be read back, as its reason.
    pub webhooks: Vec<Result<Webhook, Unreadable>>,
}

/// What [`claim_leases`] selects after its claiming `UPDATE` (the `WITH`'s
/// `claimed`): each claimed delivery, and its event and webhook on the first
/// row that names them, every column under a prefix (`d_`, `e_`, `w_`).
/// The same text for every claim, so it is written once.
static CLAIMED_WITH_READS: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    use sea_orm::Iterable as _;
    fn aliased<C: sea_orm::IdenStatic>(columns: impl Iterator<Item = C>, table: &str, prefix: &str) -> String {
        columns
            .map(|column| format!(r#"{table}."{0}" AS "{prefix}{0}""#, column.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    }
    format!(
        r#"ranked AS (
            SELECT claimed.*,
                row_number() OVER (PARTITION BY event_id) AS event_rank,
                row_number() OVER (PARTITION BY webhook_id) AS webhook_rank
            FROM claimed
        )
        SELECT {deliveries}, {events}, {webhooks}
        FROM ranked d
        LEFT JOIN events e ON d.event_rank = 1 AND e.id = d.event_id
        LEFT JOIN webhooks w ON d.webhook_rank = 1 AND w.id = d.webhook_id"#,
        deliveries = aliased(delivery::Column::iter(), "d", "d_"),
        events = aliased(event::Column::iter(), "e", "e_"),
        webhooks = aliased(webhook::Column::iter(), "w", "w_"),
    )
});

/// [`claim_many`] as the worker runs it, with the claimed deliveries' events
/// and webhooks read in the same round trip.
///
/// On PostgreSQL it is one statement whose commit does not wait for its WAL
/// to reach the disk (`synchronous_commit = off`, for that statement's
/// transaction only), which takes a flush off every delivery's path. A claim
/// is a lease, not a fact: should the database crash in the moment before the
/// flush (at most three of the WAL writer's rounds, 3 × 200 ms by default),
/// the lease is lost and the attempt may be made twice, which at-least-once
/// allows. What is a fact, the attempt's record, commits synchronously, and
/// that flush carries every earlier commit's WAL with it. It takes a
/// connection, not any `ConnectionTrait`: inside a caller's transaction the
/// setting would relax that whole transaction's commit. The reads join each
/// claimed row to its event and webhook, on the first row that names them
/// only, so an event shared by many deliveries crosses the wire once.
///
/// SQLite: [`claim_many`], then the two reads side by side (calls inside the
/// process: no round trips to save).
pub async fn claim_leases(
    db: &sea_orm::DatabaseConnection,
    cipher: &SecretCipher,
    wanted: &[ClaimRequest],
    lease: Duration,
    now: DateTime<Utc>,
) -> Result<Leases, StoreError> {
    use sea_orm::{FromQueryResult as _, QueryTrait as _};
    if wanted.is_empty() {
        return Ok(Leases::default());
    }
    if db.get_database_backend() != sea_orm::DbBackend::Postgres {
        let deliveries = claim_with(db, wanted, lease, now, Flush::Wait).await?;
        let mut webhook_ids: Vec<WebhookId> = deliveries.iter().map(|delivery| delivery.webhook_id).collect();
        webhook_ids.sort_unstable();
        webhook_ids.dedup();
        let mut event_ids: Vec<EventId> = deliveries.iter().map(|delivery| delivery.event_id).collect();
        event_ids.sort_unstable();
        event_ids.dedup();
        let (webhooks, events) = futures::try_join!(
            crate::webhooks::webhooks_by_ids(db, cipher, &webhook_ids),
            crate::events::events_by_ids(db, &event_ids),
        )?;
        return Ok(Leases {
            deliveries,
            events,
            webhooks,
        });
    }
    let claim =
        claim_update(wanted, lease, now, Flush::Skip, sea_orm::DbBackend::Postgres).build(sea_orm::DbBackend::Postgres);
    let sql = format!("WITH claimed AS ({} RETURNING *), {}", claim.sql, *CLAIMED_WITH_READS);
    let rows = db.query_all_raw(sea_orm::Statement { sql, ..claim }).await?;
    let mut leases = Leases::default();
    for row in &rows {
        let delivery = delivery::Model::from_query_result(row, "d_")?;
        leases.deliveries.push(Delivery::try_from(delivery)?);
        // A row that names an event or webhook first carries it; the others,
        // and a webhook since deleted, carry NULLs. Only the key tells the
        // two apart: a row that is there but does not decode is an error,
        // not an absence (`from_query_result_optional` would take it for one).
        let carries =
            |prefix: &str| -> Result<bool, StoreError> { Ok(row.try_get::<Option<Uuid>>(prefix, "id")?.is_some()) };
        if carries("e_")? {
            leases
                .events
                .push(StoredEvent::from(event::Model::from_query_result(row, "e_")?));
        }
        if carries("w_")? {
            let webhook = webhook::Model::from_query_result(row, "w_")?;
            leases.webhooks.push(crate::webhooks::read_back(webhook, cipher));
        }
    }
    Ok(leases)
}

/// Moves a pending, unclaimed delivery's next attempt, if it is `attempt`,
/// to `until`, if that is later: for a worker that holds a task back (its
/// webhook had every slot busy), so the reconciler does not take the
/// held-back task for a lost one. Never earlier: a task that came before
/// its attempt was due (a broker tier shorter than its delay), or a stale
/// one, must not bring a retry forward past its schedule or `Retry-After`.
pub async fn postpone(
    db: &impl ConnectionTrait,
    id: DeliveryId,
    attempt: u32,
    until: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    delivery::Entity::update_many()
        .col_expr(delivery::Column::NextAttemptAt, Expr::value(Some(until)))
        .filter(delivery::Column::Id.eq(id.as_uuid()))
        .filter(pending_by_key())
        .filter(delivery::Column::Attempts.eq(i64::from(attempt) - 1))
        .filter(
            Condition::any()
                .add(delivery::Column::NextAttemptAt.is_null())
                .add(delivery::Column::NextAttemptAt.lt(until)),
        )
        .filter(unclaimed_at(now))
        .exec(db)
        .await?;
    Ok(())
}

/// Logs an attempt and, if it was made under the claim the delivery still
/// has, moves the delivery on and releases the claim; says whether it did.
/// A worker whose claim ran out before it recorded (a stalled database: the
/// request itself ends within the lease) may find the attempt taken over by
/// another worker since:
/// its attempt is logged, and the delivery is left to the claim that holds
/// it, whichever of the two records first. The late worker then does
/// nothing more (no health, no retry, no dead letter).
pub async fn record_attempt(db: &impl ConnectionTrait, recorded: &Recorded) -> Result<bool, StoreError> {
    Ok(record_attempts(db, std::slice::from_ref(recorded)).await?[0])
}

/// [`record_attempt`] for many attempts, each one's answer in its place:
/// one multi-row insert of the log, and one update per distinct new state
/// (a burst of successes is one statement). Run it in a transaction to make
/// the batch all or nothing.
pub async fn record_attempts(db: &impl ConnectionTrait, recorded: &[Recorded]) -> Result<Vec<bool>, StoreError> {
    if recorded.is_empty() {
        return Ok(Vec::new());
    }
    let rows = recorded
        .iter()
        .map(|Recorded { attempt, .. }| delivery_attempt::ActiveModel {
            id: Set(Uuid::now_v7()),
            delivery_id: Set(attempt.delivery_id.as_uuid()),
            attempt: Set(i32::try_from(attempt.attempt).unwrap_or(i32::MAX)),
            started_at: Set(attempt.started_at),
            duration_ms: Set(i64::try_from(attempt.duration.as_millis()).unwrap_or(i64::MAX)),
            status_code: Set(attempt.status_code.map(i32::from)),
            error: Set(attempt.error.clone()),
            response_body: Set(attempt.response_body.clone()),
        });
    delivery_attempt::Entity::insert_many(rows)
        .exec_without_returning(db)
        .await?;

    /// The columns an attempt sets on its delivery; equal states share a statement.
    #[derive(PartialEq, Eq, Hash)]
    struct NewState<'a> {
        status: DeliveryStatus,
        attempts: i32,
        next_attempt_at: Option<DateTime<Utc>>,
        last_status_code: Option<i32>,
        failure_reason: Option<&'a str>,
    }
    let contenders = latest_claims(recorded);
    // By new state, then by claim: a claim statement writes one lease for
    // every delivery it claims, so a batch holds few.
    let mut groups: std::collections::HashMap<NewState<'_>, std::collections::BTreeMap<Lease, Vec<Uuid>>> =
        std::collections::HashMap::new();
    for (index, Recorded { attempt, lease, next }) in recorded.iter().enumerate() {
        if !contenders[index] {
            continue;
        }
        let (status, next_attempt_at, failure_reason) = match next {
            NextStep::Succeeded => (DeliveryStatus::Succeeded, None, None),
            NextStep::RetryAt(at) => (DeliveryStatus::Pending, Some(*at), None),
            NextStep::Failed(reason) => (DeliveryStatus::Failed, None, Some(reason.as_str())),
        };
        let state = NewState {
            status,
            attempts: i32::try_from(attempt.attempt).unwrap_or(i32::MAX),
            next_attempt_at,
            last_status_code: attempt.status_code.map(i32::from),
            failure_reason,
        };
        groups
            .entry(state)
            .or_default()
            .entry(*lease)
            .or_default()
            .push(attempt.delivery_id.as_uuid());
    }
    let backend = db.get_database_backend();
    let now = Utc::now();
    let mut moved = std::collections::HashSet::new();
    for (state, claims) in groups {
        use sea_orm::QueryTrait as _;
        // The key finds the rows (see `pending_by_key`), each list with the
        // claim its rows must still have. (As pairs, `(id, locked_until)
        // IN (…)`, PostgreSQL compared each row with every pair: 12 % more
        // of its CPU in a 20,000 × 10 burst.)
        let mut under_their_claims = Condition::any();
        for (Lease(until), ids) in claims {
            under_their_claims = under_their_claims.add(
                Condition::all()
                    .add(delivery::Column::Id.is_in(crate::in_list(ids)))
                    .add(delivery::Column::LockedUntil.eq(until)),
            );
        }
        let update = delivery::Entity::update_many()
            .col_expr(delivery::Column::Status, Expr::value(state.status.as_str()))
            .col_expr(delivery::Column::Attempts, Expr::value(state.attempts))
            .col_expr(delivery::Column::NextAttemptAt, Expr::value(state.next_attempt_at))
            .col_expr(
                delivery::Column::LockedUntil,
                Expr::value(Option::<DateTime<Utc>>::None),
            )
            .col_expr(delivery::Column::LastStatusCode, Expr::value(state.last_status_code))
            .col_expr(
                delivery::Column::FailureReason,
                Expr::value(state.failure_reason.map(str::to_owned)),
            )
            .col_expr(delivery::Column::UpdatedAt, Expr::value(now))
            .filter(under_their_claims)
            .filter(pending_by_key())
            .filter(delivery::Column::Attempts.eq(state.attempts.saturating_sub(1)))
            .build(backend);
        let sql = format!(r#"{} RETURNING "id""#, update.sql);
        for row in db.query_all_raw(sea_orm::Statement { sql, ..update }).await? {
            moved.insert(row.try_get::<Uuid>("", "id")?);
        }
    }
    Ok(recorded
        .iter()
        .zip(contenders)
        .map(|(Recorded { attempt, .. }, contender)| contender && moved.contains(&attempt.delivery_id.as_uuid()))
        .collect())
}

/// Which of `recorded` may still hold their delivery's claim: of two
/// attempts of one delivery recorded together (a worker late beside the one
/// that took its claim over), only the one under the later claim.
fn latest_claims(recorded: &[Recorded]) -> Vec<bool> {
    let mut latest: std::collections::HashMap<DeliveryId, (Lease, usize)> = std::collections::HashMap::new();
    for (index, Recorded { attempt, lease, .. }) in recorded.iter().enumerate() {
        let entry = latest.entry(attempt.delivery_id).or_insert((*lease, index));
        if *lease > entry.0 {
            *entry = (*lease, index);
        }
    }
    let mut contenders = vec![false; recorded.len()];
    for (_, index) in latest.into_values() {
        contenders[index] = true;
    }
    contenders
}

/// Ends a pending delivery without an attempt (its webhook was deleted or disabled).
pub async fn cancel(db: &impl ConnectionTrait, id: DeliveryId, reason: &str) -> Result<(), StoreError> {
    delivery::Entity::update_many()
        .col_expr(delivery::Column::Status, Expr::value(DeliveryStatus::Failed.as_str()))
        .col_expr(
            delivery::Column::NextAttemptAt,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .col_expr(
            delivery::Column::LockedUntil,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .col_expr(delivery::Column::FailureReason, Expr::value(reason))
        .col_expr(delivery::Column::UpdatedAt, Expr::value(Utc::now()))
        .filter(delivery::Column::Id.eq(id.as_uuid()))
        .filter(pending_by_key())
        .exec(db)
        .await?;
    Ok(())
}

/// Pending deliveries due before `due_before` (or all, for `None`) that no worker
/// holds a live claim on, in due order after `after` (a keyset cursor of due time
/// and id): what the reconciler re-publishes, and what a restart re-enqueues.
pub async fn pending_unclaimed(
    db: &impl ConnectionTrait,
    due_before: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    limit: u64,
    after: Option<(DateTime<Utc>, DeliveryId)>,
) -> Result<Vec<PendingDelivery>, StoreError> {
    let mut query = delivery::Entity::find()
        .filter(delivery::Column::Status.eq(DeliveryStatus::Pending.as_str()))
        .filter(unclaimed_at(now));
    if let Some(due_before) = due_before {
        // Timestamps are compared as RFC 3339 text on SQLite, which orders
        // correctly for four-digit years; `None` avoids an extreme sentinel.
        query = query.filter(delivery::Column::NextAttemptAt.lte(due_before));
    }
    if let Some((due_at, id)) = after {
        query = query.filter(
            Condition::any().add(delivery::Column::NextAttemptAt.gt(due_at)).add(
                Condition::all()
                    .add(delivery::Column::NextAttemptAt.eq(due_at))
                    .add(delivery::Column::Id.gt(id.as_uuid())),
            ),
        );
    }
    let rows = query
        .order_by_asc(delivery::Column::NextAttemptAt)
        .order_by_asc(delivery::Column::Id)
        .limit(limit)
        .all(db)
        .await?;
    Ok(rows
        .into_iter()
        .map(|row| PendingDelivery {
            id: DeliveryId::from_uuid(row.id),
            webhook_id: WebhookId::from_uuid(row.webhook_id),
            next_attempt: u32::try_from(row.attempts).unwrap_or_default() + 1,
            due_at: row.next_attempt_at.unwrap_or(now),
        })
        .collect())
}

/// A webhook's deliveries, oldest first.
pub async fn deliveries_of_webhook(
    db: &impl ConnectionTrait,
    webhook_id: WebhookId,
) -> Result<Vec<Delivery>, StoreError> {
    delivery::Entity::find()
        .filter(delivery::Column::WebhookId.eq(webhook_id.as_uuid()))
        .order_by_asc(delivery::Column::Id)
        .all(db)
        .await?
        .into_iter()
        .map(Delivery::try_from)
        .collect()
}

/// A delivery's attempts in order.
pub async fn attempts_of(db: &impl ConnectionTrait, delivery_id: DeliveryId) -> Result<Vec<Attempt>, StoreError> {
    Ok(attempts_of_many(db, &[delivery_id])
        .await?
        .remove(&delivery_id)
        .unwrap_or_default())
}

/// The attempts of many deliveries in one statement (a page of the delivery
/// log asks once), each delivery's in order; a delivery without attempts is
/// absent.
pub async fn attempts_of_many(
    db: &impl ConnectionTrait,
    delivery_ids: &[DeliveryId],
) -> Result<std::collections::HashMap<DeliveryId, Vec<Attempt>>, StoreError> {
    if delivery_ids.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    attempts_by_delivery(
        db,
        delivery_attempt::Entity::find().filter(
            delivery_attempt::Column::DeliveryId.is_in(crate::in_list(delivery_ids.iter().map(|id| id.as_uuid()))),
        ),
    )
    .await
}

/// The attempts `query` selects, by delivery, each delivery's in order.
async fn attempts_by_delivery(
    db: &impl ConnectionTrait,
    query: sea_orm::Select<delivery_attempt::Entity>,
) -> Result<std::collections::HashMap<DeliveryId, Vec<Attempt>>, StoreError> {
    let rows = query
        .order_by_asc(delivery_attempt::Column::DeliveryId)
        .order_by_asc(delivery_attempt::Column::Attempt)
        .order_by_asc(delivery_attempt::Column::Id)
        .all(db)
        .await?;
    let mut by_delivery: std::collections::HashMap<DeliveryId, Vec<Attempt>> = std::collections::HashMap::new();
    for row in rows {
        let attempt = Attempt::from(row);
        by_delivery.entry(attempt.delivery_id).or_default().push(attempt);
    }
    Ok(by_delivery)
}

/// The most attempts of one delivery shown to its tenant: its newest. The
/// retry schedule makes 11 by default; each redelivery adds one, without
/// end, so a list of them is bounded here (the delivery's `attempts`
/// counts them all).
pub const NEWEST_ATTEMPTS_SHOWN: u32 = 16;

/// The newest [`NEWEST_ATTEMPTS_SHOWN`] attempts of each of the tenant's
/// deliveries among `delivery_ids` (another tenant's are left out), each
/// delivery's oldest first; their response bodies only if `bodies` (each up
/// to `AEGIS_MAX_RESPONSE_BODY_BYTES`, 64 KiB by default: a page of the log
/// that shows none would otherwise read megabytes of them). Two statements
/// whatever the number of deliveries.
pub async fn newest_attempts_of_tenant(
    db: &impl ConnectionTrait,
    tenant_id: TenantId,
    delivery_ids: &[DeliveryId],
    bodies: bool,
) -> Result<std::collections::HashMap<DeliveryId, Vec<Attempt>>, StoreError> {
    if delivery_ids.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    // Attempts are numbered 1, 2, … in the order they are made, across
    // redeliveries too: the newest are those above the count less the most.
    let made: Vec<(Uuid, i32)> = of_tenant_among(tenant_id, delivery_ids)
        .column(delivery::Column::Id)
        .column(delivery::Column::Attempts)
        .into_tuple()
        .all(db)
        .await?;
    if made.is_empty() {
        return Ok(std::collections::HashMap::new());
    }
    let shown = i32::try_from(NEWEST_ATTEMPTS_SHOWN).expect("a small number");
    let newest = made.iter().fold(Condition::any(), |newest, (id, attempts)| {
        newest.add(
            Condition::all()
                .add(delivery_attempt::Column::DeliveryId.eq(*id))
                .add(delivery_attempt::Column::Attempt.gt(attempts.saturating_sub(shown))),
        )
    });
    let mut query = delivery_attempt::Entity::find().filter(newest);
    if !bodies {
        use delivery_attempt::Column;
        query = query
            .select_only()
            .columns([
                Column::Id,
                Column::DeliveryId,
                Column::Attempt,
                Column::StartedAt,
                Column::DurationMs,
                Column::StatusCode,
                Column::Error,
            ])
            .column_as(Expr::value(Option::<String>::None), "response_body");
    }
    attempts_by_delivery(db, query).await
}

impl From<delivery_attempt::Model> for Attempt {
    fn from(row: delivery_attempt::Model) -> Self {
        Attempt {
            delivery_id: DeliveryId::from_uuid(row.delivery_id),
            attempt: u32::try_from(row.attempt).unwrap_or_default(),
            started_at: row.started_at,
            duration: Duration::from_millis(u64::try_from(row.duration_ms).unwrap_or_default()),
            status_code: row.status_code.and_then(|code| u16::try_from(code).ok()),
            error: row.error,
            response_body: row.response_body,
        }
    }
}

/// Filters of the delivery log.
#[derive(Debug, Clone, Default)]
pub struct DeliveryFilter {
    pub webhook_id: Option<WebhookId>,
    pub status: Option<DeliveryStatus>,
    pub event_type: Option<EventType>,
    pub created_after: Option<DateTime<Utc>>,
    pub created_before: Option<DateTime<Utc>>,
}

/// One page of the tenant's delivery log, newest first, before the cursor
/// `before` (a delivery id). Fetches `limit + 1` rows so the caller can tell
/// whether another page exists.
pub async fn list_deliveries(
    db: &impl ConnectionTrait,
    tenant_id: TenantId,
    filter: &DeliveryFilter,
    before: Option<Uuid>,
    limit: u64,
) -> Result<Vec<Delivery>, StoreError> {
    let mut query = delivery::Entity::find();
    query = match filter.webhook_id {
        // A webhook's deliveries are its tenant's: once the webhook is known
        // to be the tenant's, the webhook alone selects them, and the page is
        // a backward range of the `(webhook_id, id)` index. (With the tenant
        // in the statement too, a planner whose statistics lag the table's
        // growth intersects the tenant's index with the webhook's and reads
        // every one of the webhook's deliveries: 43 ms at 100,000 of them.)
        Some(webhook_id) => {
            let owned = crate::entities::webhook::Entity::find_by_id(webhook_id.as_uuid())
                .filter(crate::entities::webhook::Column::TenantId.eq(tenant_id.as_uuid()))
                .one(db)
                .await?
                .is_some();
            if !owned {
                return Ok(Vec::new());
            }
            query.filter(delivery::Column::WebhookId.eq(webhook_id.as_uuid()))
        }
        None => query.filter(delivery::Column::TenantId.eq(tenant_id.as_uuid())),
    };
    if let Some(status) = filter.status {
        query = query.filter(delivery::Column::Status.eq(status.as_str()));
    }
    if let Some(event_type) = filter.event_type {
        query = query.filter(delivery::Column::EventType.eq(event_type.as_str()));
    }
    // Ids are UUIDv7, made when the delivery is: a time window is a range of
    // the same index the page walks, not a filter on every row it passes.
    if let Some(after) = filter.created_after {
        query = query.filter(delivery::Column::Id.gte(crate::first_v7_id_at(after)));
    }
    if let Some(before) = filter.created_before {
        query = query.filter(delivery::Column::Id.lt(crate::first_v7_id_at(before)));
    }
    if let Some(cursor) = before {
        // Ids are UUIDv7: their order is creation order.
        query = query.filter(delivery::Column::Id.lt(cursor));
    }
    query
        .order_by_desc(delivery::Column::Id)
        .limit(limit + 1)
        .all(db)
        .await?
        .into_iter()
        .map(Delivery::try_from)
        .collect()
}

/// Which of `ids` are the tenant's deliveries.
pub async fn owned_by(
    db: &impl ConnectionTrait,
    tenant_id: TenantId,
    ids: &[DeliveryId],
) -> Result<Vec<DeliveryId>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let owned: Vec<Uuid> = of_tenant_among(tenant_id, ids)
        .column(delivery::Column::Id)
        .into_tuple()
        .all(db)
        .await?;
    Ok(owned.into_iter().map(DeliveryId::from_uuid).collect())
}

/// The tenant's deliveries among `ids`, no column selected yet: the one
/// ownership guard of reads by id.
fn of_tenant_among(tenant_id: TenantId, ids: &[DeliveryId]) -> sea_orm::Select<delivery::Entity> {
    delivery::Entity::find()
        .select_only()
        .filter(delivery::Column::TenantId.eq(tenant_id.as_uuid()))
        .filter(delivery::Column::Id.is_in(crate::in_list(ids.iter().map(|id| id.as_uuid()))))
}

/// The tenant's delivery `id`; another tenant's is `NotFound`.
pub async fn delivery_of_tenant(
    db: &impl ConnectionTrait,
    tenant_id: TenantId,
    id: DeliveryId,
) -> Result<Delivery, StoreError> {
    delivery::Entity::find_by_id(id)
        .filter(delivery::Column::TenantId.eq(tenant_id.as_uuid()))
        .one(db)
        .await?
        .ok_or(StoreError::NotFound)
        .and_then(Delivery::try_from)
}

/// Makes a finished delivery pending again, due now, for one more attempt (a
/// customer's redelivery). Returns the number of that attempt, or `None` when the
/// delivery is still pending (its own task will make the next attempt).
pub async fn reopen(
    db: &impl ConnectionTrait,
    id: DeliveryId,
    now: DateTime<Utc>,
) -> Result<Option<Delivery>, StoreError> {
    Ok(reopen_many(db, &[id], now).await?.pop())
}

/// [`reopen`] for many deliveries in one statement: those that were finished,
/// as they are now (in no particular order); pending ones are left as they are.
pub async fn reopen_many(
    db: &impl ConnectionTrait,
    ids: &[DeliveryId],
    now: DateTime<Utc>,
) -> Result<Vec<Delivery>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    delivery::Entity::update_many()
        .col_expr(delivery::Column::Status, Expr::value(DeliveryStatus::Pending.as_str()))
        .col_expr(delivery::Column::NextAttemptAt, Expr::value(Some(now)))
        .col_expr(
            delivery::Column::LockedUntil,
            Expr::value(Option::<DateTime<Utc>>::None),
        )
        .col_expr(delivery::Column::FailureReason, Expr::value(Option::<String>::None))
        .col_expr(delivery::Column::UpdatedAt, Expr::value(now))
        .filter(delivery::Column::Id.is_in(crate::in_list(ids.iter().map(|id| id.as_uuid()))))
        .filter(delivery::Column::Status.ne(DeliveryStatus::Pending.as_str()))
        .exec_with_returning(db)
        .await?
        .into_iter()
        .map(Delivery::try_from)
        .collect()
}

/// The ids of a webhook's failed deliveries created at or after `since`, with
/// their events'.
pub async fn failed_since(
    db: &impl ConnectionTrait,
    webhook_id: WebhookId,
    since: DateTime<Utc>,
    limit: u64,
) -> Result<Vec<(DeliveryId, EventId)>, StoreError> {
    let ids: Vec<(Uuid, Uuid)> = delivery::Entity::find()
        .select_only()
        .column(delivery::Column::Id)
        .column(delivery::Column::EventId)
        .filter(delivery::Column::WebhookId.eq(webhook_id.as_uuid()))
        .filter(delivery::Column::Status.eq(DeliveryStatus::Failed.as_str()))
        // By id (a UUIDv7: its creation time), so only the partitions since
        // `since` are read.
        .filter(delivery::Column::Id.gte(crate::first_v7_id_at(since)))
        .order_by_asc(delivery::Column::Id)
        .limit(limit)
        .into_tuple()
        .all(db)
        .await?;
    Ok(ids
        .into_iter()
        .map(|(delivery, event)| (DeliveryId::from_uuid(delivery), EventId::from_uuid(event)))
        .collect())
}

/// Counts of a webhook's deliveries by status, and its last success.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WebhookDeliveryStats {
    pub succeeded: u64,
    pub failed: u64,
    pub pending: u64,
    pub last_success_at: Option<DateTime<Utc>>,
}

/// [`WebhookDeliveryStats`] of many webhooks in one statement (a page of
/// webhooks asks once, not once per webhook), answered from the
/// `(webhook_id, status, updated_at)` index: its cost is the size of these
/// webhooks' own delivery logs, whatever other tenants hold. A webhook without
/// deliveries gets zeros.
pub async fn stats_of_webhooks(
    db: &impl ConnectionTrait,
    webhook_ids: &[WebhookId],
) -> Result<std::collections::HashMap<WebhookId, WebhookDeliveryStats>, StoreError> {
    use sea_orm::FromQueryResult;
    use sea_orm::sea_query::ExprTrait as _;

    #[derive(FromQueryResult)]
    struct Group {
        webhook_id: Uuid,
        status: String,
        deliveries: i64,
        last_updated_at: Option<DateTime<Utc>>,
    }

    let mut stats: std::collections::HashMap<WebhookId, WebhookDeliveryStats> = webhook_ids
        .iter()
        .map(|id| {
            let zero = WebhookDeliveryStats {
                succeeded: 0,
                failed: 0,
                pending: 0,
                last_success_at: None,
            };
            (*id, zero)
        })
        .collect();
    if webhook_ids.is_empty() {
        return Ok(stats);
    }
    let groups = delivery::Entity::find()
        .select_only()
        .column(delivery::Column::WebhookId)
        .column(delivery::Column::Status)
        .column_as(Expr::col(delivery::Column::WebhookId).count(), "deliveries")
        .column_as(Expr::col(delivery::Column::UpdatedAt).max(), "last_updated_at")
        .filter(delivery::Column::WebhookId.is_in(crate::in_list(webhook_ids.iter().map(|id| id.as_uuid()))))
        .group_by(delivery::Column::WebhookId)
        .group_by(delivery::Column::Status)
        .into_model::<Group>()
        .all(db)
        .await?;
    for group in groups {
        let Some(entry) = stats.get_mut(&WebhookId::from_uuid(group.webhook_id)) else {
            continue;
        };
        let count = u64::try_from(group.deliveries).unwrap_or_default();
        match group.status.parse::<DeliveryStatus>()? {
            DeliveryStatus::Succeeded => {
                entry.succeeded = count;
                entry.last_success_at = group.last_updated_at;
            }
            DeliveryStatus::Failed => entry.failed = count,
            DeliveryStatus::Pending => entry.pending = count,
        }
    }
    Ok(stats)
}

/// A webhook's deliveries created in one hour, by status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HourOfDeliveries {
    pub hour_start: DateTime<Utc>,
    pub succeeded: u64,
    pub failed: u64,
    pub pending: u64,
}

/// The deliveries of `webhook_id` created in each of the `hours` whole hours
/// up to the one holding `now`, oldest first. One grouped count per hour,
/// each a range of the `(webhook_id, id)` index: the cost is the webhook's
/// own deliveries of those hours, whatever else the table holds.
pub async fn deliveries_by_hour(
    db: &impl ConnectionTrait,
    webhook_id: WebhookId,
    now: DateTime<Utc>,
    hours: u32,
) -> Result<Vec<HourOfDeliveries>, StoreError> {
    use sea_orm::FromQueryResult;
    use sea_orm::sea_query::ExprTrait as _;

    #[derive(FromQueryResult)]
    struct Group {
        status: String,
        deliveries: i64,
    }

    let this_hour = now.timestamp() - now.timestamp().rem_euclid(3600);
    let mut result = Vec::with_capacity(hours as usize);
    for back in (0..i64::from(hours)).rev() {
        let start = DateTime::from_timestamp(this_hour - back * 3600, 0).unwrap_or(now);
        let end = start + chrono::Duration::hours(1);
        let groups = delivery::Entity::find()
            .select_only()
            .column(delivery::Column::Status)
            .column_as(Expr::col(delivery::Column::Id).count(), "deliveries")
            .filter(delivery::Column::WebhookId.eq(webhook_id.as_uuid()))
            .filter(delivery::Column::Id.gte(crate::first_v7_id_at(start)))
            .filter(delivery::Column::Id.lt(crate::first_v7_id_at(end)))
            .group_by(delivery::Column::Status)
            .into_model::<Group>()
            .all(db)
            .await?;
        let mut hour = HourOfDeliveries {
            hour_start: start,
            succeeded: 0,
            failed: 0,
            pending: 0,
        };
        for group in groups {
            let count = u64::try_from(group.deliveries).unwrap_or_default();
            match group.status.parse::<DeliveryStatus>()? {
                DeliveryStatus::Succeeded => hour.succeeded = count,
                DeliveryStatus::Failed => hour.failed = count,
                DeliveryStatus::Pending => hour.pending = count,
            }
        }
        result.push(hour);
    }
    Ok(result)
}
