//! Data retention on both databases: what expiry removes and what it keeps,
//! bodies dropped before records, a tenant's own retention, and the answers
//! for what has been expunged. Expiry passes run on an injected clock (a
//! month ahead), or, where the API's answers depend on the real one, on a
//! tenant retention of seconds.

use std::time::Duration;

use aegis_webhook_core::config::{Config, Sensitive};
use aegis_webhook_core::event::{EventType, ValidatedEvent};
use aegis_webhook_core::ids::{DeliveryId, EventId, TenantId, WebhookId};
use aegis_webhook_core::secret::SecretCipher;
use aegis_webhook_storage::deliveries::{self, Attempt, EventDelivery, NewDelivery, NextStep};
use aegis_webhook_storage::{self as db, events, partitions};
use aegis_webhook_worker::expiry::Expiry;
use chrono::{DateTime, Utc};
use sea_orm::DatabaseConnection;
use serde_json::json;
use uuid::Uuid;

use crate::on_both_backends;
use crate::support::{
    self, Backend, Receiver, TestApp, envelope, eventually, migrated_database, scratch_dir, seed_poam_overdue_data,
    tenant_with_webhooks,
};

on_both_backends!(
    expiry_removes_final_rows_past_retention_and_keeps_pending_ones,
    body_retention_empties_bodies_and_keeps_the_records,
    a_tenants_own_retention_holds_and_expunged_deliveries_say_so,
    replaying_dead_letters_skips_those_whose_payload_was_expunged,
);

const DAY: Duration = Duration::from_secs(24 * 3600);

struct Data {
    db: DatabaseConnection,
    tenant_id: TenantId,
    webhook_id: WebhookId,
}

async fn data(backend: Backend) -> Option<Data> {
    let url = migrated_database(backend, &scratch_dir()).await?;
    let db = db::connect(&url).await.expect("connect");
    let cipher = SecretCipher::from_base64(&SecretCipher::generate_key()).expect("key");
    let tenant_id = tenant_with_webhooks(&db, &cipher, "acme", "http://127.0.0.1:9/hook", 1).await;
    let webhook_id = aegis_webhook_storage::webhooks::list_webhooks(&db, &cipher, tenant_id, None, 10)
        .await
        .expect("list")
        .first()
        .expect("one webhook")
        .id;
    Some(Data {
        db,
        tenant_id,
        webhook_id,
    })
}

/// Stores an event with one delivery to the webhook; returns both ids.
async fn event_with_delivery(data: &Data) -> (EventId, DeliveryId) {
    let event_id = store_event(data).await;
    let delivery_id = deliveries::insert_pending_of_events(
        &data.db,
        &[EventDelivery {
            tenant_id: data.tenant_id,
            event_id,
            delivery: NewDelivery {
                webhook_id: data.webhook_id,
                event_type: EventType::PoamOverdue,
            },
        }],
        Utc::now(),
    )
    .await
    .expect("delivery")[0];
    (event_id, delivery_id)
}

async fn store_event(data: &Data) -> EventId {
    let mut envelope = envelope(data.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data());
    envelope["id"] = json!(Uuid::now_v7());
    let event = ValidatedEvent::parse(envelope.to_string().as_bytes(), Utc::now()).expect("valid");
    events::insert_event(&data.db, &event)
        .await
        .expect("insert")
        .expect("new")
}

/// Records the next attempt of `delivery_id` with a response body, moving
/// it on with `next`.
async fn attempt(data: &Data, delivery_id: DeliveryId, status: u16, next: NextStep) {
    let made = deliveries::delivery_by_id(&data.db, delivery_id)
        .await
        .expect("read")
        .expect("stored")
        .attempts;
    let attempt = Attempt {
        delivery_id,
        attempt: made + 1,
        started_at: Utc::now(),
        duration: Duration::from_millis(3),
        status_code: Some(status),
        error: None,
        response_body: Some("the receiver's answer".to_owned()),
    };
    support::claim_and_record(&data.db, attempt, next).await;
}

fn expiry(data: &Data, adjust: impl FnOnce(&mut Config)) -> Expiry {
    let mut config = Config::default();
    adjust(&mut config);
    Expiry::new(&config, data.db.clone()).expect("a valid retention")
}

async fn event_exists(data: &Data, id: EventId) -> bool {
    !events::events_by_ids(&data.db, &[id]).await.expect("events").is_empty()
}

async fn delivery_exists(data: &Data, id: DeliveryId) -> bool {
    deliveries::delivery_by_id(&data.db, id)
        .await
        .expect("delivery")
        .is_some()
}

/// Two events with a delivery each: one delivered (succeeded), one whose
/// first attempt failed and that waits an hour for its next (pending).
async fn one_done_one_waiting(data: &Data) -> (EventId, DeliveryId, EventId, DeliveryId) {
    let (done_event, done) = event_with_delivery(data).await;
    attempt(data, done, 200, NextStep::Succeeded).await;
    let (waiting_event, waiting) = event_with_delivery(data).await;
    let in_an_hour = Utc::now() + chrono::Duration::hours(1);
    attempt(data, waiting, 503, NextStep::RetryAt(in_an_hour)).await;
    (done_event, done, waiting_event, waiting)
}

fn a_month_on() -> DateTime<Utc> {
    Utc::now() + chrono::Duration::days(31)
}

async fn expiry_removes_final_rows_past_retention_and_keeps_pending_ones(backend: Backend) {
    let Some(data) = data(backend).await else { return };
    let (done_event, done, waiting_event, waiting) = one_done_one_waiting(&data).await;
    let unsubscribed_event = store_event(&data).await;
    let expiry = expiry(&data, |_| {});

    // Nothing has passed its 30 days yet.
    let removed = expiry.pass(Utc::now()).await.expect("pass");
    assert_eq!(
        (removed.deliveries, removed.events, removed.partitions_dropped),
        (0, 0, 0)
    );
    assert!(delivery_exists(&data, done).await && event_exists(&data, unsubscribed_event).await);

    // A month on: the final delivery, its attempt and its event go, and so
    // does the event nobody subscribed to; the pending delivery and its event
    // stay. On PostgreSQL the pending delivery holds its partition back, so
    // the final row beside it is deleted on its own.
    let removed = expiry.pass(a_month_on()).await.expect("pass");
    assert!(!delivery_exists(&data, done).await, "the final delivery is expunged");
    assert!(
        deliveries::attempts_of(&data.db, done)
            .await
            .expect("attempts")
            .is_empty(),
        "its attempts with it"
    );
    assert!(!event_exists(&data, done_event).await && !event_exists(&data, unsubscribed_event).await);
    assert!(
        delivery_exists(&data, waiting).await,
        "a pending delivery is never expunged"
    );
    assert!(event_exists(&data, waiting_event).await, "nor the event it will send");
    assert_eq!(
        deliveries::attempts_of(&data.db, waiting)
            .await
            .expect("attempts")
            .len(),
        1
    );
    // (On PostgreSQL the final delivery goes by row, unless it was made just
    // before midnight UTC and its partition was dropped whole.)
    assert_eq!(removed.events, 2, "{removed:?}");
    if backend == Backend::Sqlite {
        assert_eq!(removed.deliveries, 1, "{removed:?}");
    }
    let created = db::v7_created_at(waiting.as_uuid()).expect("a UUIDv7");
    let holds = |partitions: &[partitions::Partition]| {
        partitions
            .iter()
            .any(|partition| partition.range.from.is_none_or(|from| from <= created) && created < partition.range.to)
    };
    if backend == Backend::Postgres {
        let left = partitions::list(&data.db).await.expect("partitions");
        assert!(holds(&left), "the pending delivery holds its partition: {left:?}");
    }

    // Once that delivery is final too, a pass removes it: on PostgreSQL by
    // dropping the whole partition.
    let before: Vec<_> = partitions::list(&data.db).await.expect("partitions");
    attempt(&data, waiting, 200, NextStep::Succeeded).await;
    let removed = expiry.pass(a_month_on()).await.expect("pass");
    assert!(!delivery_exists(&data, waiting).await && !event_exists(&data, waiting_event).await);
    let after: Vec<_> = partitions::list(&data.db).await.expect("partitions");
    match backend {
        Backend::Postgres => {
            assert!(removed.partitions_dropped >= 1, "{removed:?}");
            assert_eq!(removed.deliveries, 0, "no row deleted one by one: {removed:?}");
            assert!(holds(&before) && !holds(&after), "the partition it held is gone");
            assert!(
                after
                    .iter()
                    .all(|partition| partition.range.to > a_month_on() - chrono::Duration::days(30)),
                "every partition left ends after the horizon: {after:?}"
            );
        }
        Backend::Sqlite => {
            assert_eq!((removed.deliveries, removed.partitions_dropped), (1, 0));
            assert!(before.is_empty() && after.is_empty(), "SQLite has no partitions");
        }
    }
}

async fn body_retention_empties_bodies_and_keeps_the_records(backend: Backend) {
    let Some(data) = data(backend).await else { return };
    let (done_event, done, waiting_event, waiting) = one_done_one_waiting(&data).await;
    let expiry = expiry(&data, |config| config.body_retention = Some(DAY * 7));

    let eight_days_on = Utc::now() + chrono::Duration::days(8);
    let removed = expiry.pass(eight_days_on).await.expect("pass");
    assert_eq!(
        (removed.bodies, removed.deliveries, removed.events),
        (1, 0, 0),
        "{removed:?}"
    );

    let stored = events::events_by_ids(&data.db, &[done_event]).await.expect("events");
    let event = stored.first().expect("the event's record stays");
    assert_eq!(event.data, None, "its payload is gone");
    assert!(event.body_expunged_at.is_some());
    assert!(!event.timestamp.is_empty(), "its other fields stay");
    let delivery = deliveries::delivery_by_id(&data.db, done)
        .await
        .expect("delivery")
        .expect("the delivery's record stays");
    assert_eq!(delivery.last_status_code, Some(200));
    let attempts = deliveries::attempts_of(&data.db, done).await.expect("attempts");
    assert_eq!(attempts.len(), 1, "the attempt's record stays");
    assert_eq!(
        (attempts[0].status_code, attempts[0].response_body.as_deref()),
        (Some(200), None)
    );

    // The event a pending delivery will send keeps its payload.
    let stored = events::events_by_ids(&data.db, &[waiting_event]).await.expect("events");
    assert!(stored[0].data.is_some(), "a pending delivery's payload is kept");
    assert_eq!(
        deliveries::attempts_of(&data.db, waiting).await.expect("attempts")[0]
            .response_body
            .as_deref(),
        Some("the receiver's answer")
    );

    // The next pass finds nothing more to empty.
    let removed = expiry.pass(eight_days_on).await.expect("pass");
    assert_eq!(removed.bodies, 0);
}

const SET_RETENTION: &str = "mutation($records: Int, $bodies: Int) {
  setRetention(recordsSeconds: $records, bodiesSeconds: $bodies) {
    recordsSeconds bodiesSeconds recordsChosen bodiesChosen minSeconds maxSeconds
  }
}";

const DELIVERY: &str = "query($id: ID!) { delivery(id: $id) { id status } }";
const REDELIVER: &str = "mutation($id: ID!) { redeliver(deliveryId: $id) { id status } }";
const DELIVERY_IDS: &str = "query($filter: DeliveryFilter) {
  deliveries(filter: $filter, first: 10) { edges { node { id status } } }
}";

fn error_code(answer: &serde_json::Value) -> &str {
    answer["errors"][0]["extensions"]["code"].as_str().unwrap_or_default()
}

/// A system whose tenants may choose retentions from one second up, with no
/// expiry pass of its own (each test runs its passes), and a receiver that
/// answers 200.
async fn app_with_retentions_in_seconds(
    backend: Backend,
    adjust: impl FnOnce(&mut Config),
) -> Option<(TestApp, Receiver)> {
    let app = TestApp::spawn_with(backend, |config| {
        config.retention_min = Duration::from_secs(1);
        config.expiry_interval = Duration::from_secs(3600);
        adjust(config);
    })
    .await?;
    Some((app, Receiver::start(&[], 200).await))
}

async fn a_tenants_own_retention_holds_and_expunged_deliveries_say_so(backend: Backend) {
    // Tenants may choose from one second up: the test waits on real time.
    let key = SecretCipher::generate_key();
    let Some((app, receiver)) = app_with_retentions_in_seconds(backend, |config| {
        config.secret_key = Some(Sensitive::new(key.clone()));
    })
    .await
    else {
        return;
    };

    // Out of bounds, or bodies outliving records: refused, naming why.
    let answer = app.graphql(SET_RETENTION, json!({ "records": 400 * 86_400 })).await;
    assert_eq!(error_code(&answer), "BAD_USER_INPUT", "{answer}");
    assert!(
        answer["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("outside the allowed")
    );
    let answer = app.graphql(SET_RETENTION, json!({ "records": 2, "bodies": 5 })).await;
    assert!(
        answer["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("cannot be longer"),
        "{answer}"
    );
    let answer = app.graphql(SET_RETENTION, json!({ "records": -3 })).await;
    assert_eq!(error_code(&answer), "BAD_USER_INPUT", "{answer}");
    let default = app
        .graphql("{ tenant { retention { recordsSeconds recordsChosen } } }", json!({}))
        .await;
    assert_eq!(
        default["data"]["tenant"]["retention"],
        json!({ "recordsSeconds": 30 * 86_400, "recordsChosen": false })
    );

    // Tenant `default` keeps records 4 s and bodies 1 s; tenant `other` keeps the operator's 30 days.
    let answer = app.graphql(SET_RETENTION, json!({ "records": 4, "bodies": 1 })).await;
    assert_eq!(
        answer["data"]["setRetention"],
        json!({ "recordsSeconds": 4, "bodiesSeconds": 1, "recordsChosen": true, "bodiesChosen": true,
                "minSeconds": 1, "maxSeconds": 90 * 86_400 }),
        "{answer}"
    );
    // The change is in the tenant's audit log, once: the refused ones are not.
    let log = app
        .graphql(
            "{ auditLog(filter: { operation: \"setRetention\" }, first: 10) { nodes { operation targetKind } } }",
            json!({}),
        )
        .await;
    assert!(log["errors"].is_null(), "{log}");
    assert_eq!(
        log["data"]["auditLog"]["nodes"].as_array().map(Vec::len),
        Some(1),
        "{log}"
    );
    app.create_webhook(&receiver.url(), &["POAM_OVERDUE"], None).await;
    let cipher = SecretCipher::from_base64(&key).expect("key");
    let other = tenant_with_webhooks(app.db(), &cipher, "other", &receiver.url(), 1).await;
    for tenant in [app.setup.tenant_id, other] {
        let (status, answer) = app
            .post_event(&envelope(tenant, "POAM_OVERDUE", seed_poam_overdue_data()))
            .await;
        assert!(status.is_success(), "{answer}");
    }
    receiver.wait_for(2, Duration::from_secs(10)).await;
    let ours = eventually(Duration::from_secs(10), "our delivery succeeded", || async {
        let nodes = app.delivery_nodes(DELIVERY_IDS, json!({ "status": "SUCCEEDED" })).await;
        nodes
            .first()
            .map(|node| node["id"].as_str().unwrap_or_default().to_owned())
    })
    .await;

    let config = app.config.clone();
    let expiry = Expiry::new(&config, app.db().clone()).expect("expiry");
    // After a second its payload goes: the record reads, a redeliver is refused.
    eventually(Duration::from_secs(15), "our payload expunged", || async {
        expiry.pass(Utc::now()).await.expect("pass");
        let answer = app.graphql(REDELIVER, json!({ "id": ours })).await;
        (error_code(&answer) == "EXPUNGED").then_some(answer)
    })
    .await;
    let answer = app.graphql(REDELIVER, json!({ "id": ours })).await;
    let message = answer["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("payload was expunged") && message.ends_with("body retention of 1s"),
        "{answer}"
    );
    let answer = app.graphql(DELIVERY, json!({ "id": ours })).await;
    assert_eq!(
        answer["data"]["delivery"]["status"], "SUCCEEDED",
        "the record stays: {answer}"
    );

    // After four seconds the record goes too, and both calls say so.
    eventually(Duration::from_secs(15), "our delivery expunged", || async {
        expiry.pass(Utc::now()).await.expect("pass");
        let answer = app.graphql(DELIVERY, json!({ "id": ours })).await;
        (error_code(&answer) == "EXPUNGED").then_some(answer)
    })
    .await;
    let answer = app.graphql(REDELIVER, json!({ "id": ours })).await;
    assert_eq!(error_code(&answer), "EXPUNGED", "{answer}");
    let message = answer["errors"][0]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("data retention of 4s: its record has been expunged"),
        "{answer}"
    );
    assert_eq!(app.count("deliveries").await, 1, "the other tenant's delivery stays");
    assert_eq!(app.count("events").await, 1, "and its event");
    assert_eq!(
        app.count("delivery_attempts").await,
        1,
        "and its attempt, with its response body"
    );
    // An id that is not a UUIDv7 (or is new) is simply not found.
    let answer = app.graphql(DELIVERY, json!({ "id": Uuid::new_v4() })).await;
    assert_eq!(error_code(&answer), "NOT_FOUND", "{answer}");
}

async fn replaying_dead_letters_skips_those_whose_payload_was_expunged(backend: Backend) {
    let Some((app, receiver)) = app_with_retentions_in_seconds(backend, |_| {}).await else {
        return;
    };
    let answer = app
        .graphql(SET_RETENTION, json!({ "records": 3600, "bodies": 1 }))
        .await;
    assert!(answer["errors"].is_null(), "{answer}");
    let webhook = app.create_webhook(&receiver.url(), &["POAM_OVERDUE"], None).await;
    let webhook_id: WebhookId = webhook["id"].as_str().expect("an id").parse().expect("a webhook id");
    let data = Data {
        db: app.db().clone(),
        tenant_id: app.setup.tenant_id,
        webhook_id,
    };

    // A dead letter whose payload a pass (on a clock five seconds on) expunges…
    let (old_event, expunged) = event_with_delivery(&data).await;
    attempt(&data, expunged, 500, NextStep::Failed("gave up".to_owned())).await;
    let expiry = Expiry::new(&app.config, app.db().clone()).expect("expiry");
    let removed = expiry
        .pass(Utc::now() + chrono::Duration::seconds(5))
        .await
        .expect("pass");
    assert_eq!((removed.bodies, removed.deliveries), (1, 0), "{removed:?}");
    let stored = events::events_by_ids(app.db(), &[old_event]).await.expect("events");
    assert_eq!(stored[0].data, None, "its payload is gone");
    // … and one made since, whose payload stays.
    let (_, kept) = event_with_delivery(&data).await;
    attempt(&data, kept, 500, NextStep::Failed("gave up".to_owned())).await;

    let answer = app
        .graphql(
            "mutation($id: ID!) { replayDeadLetters(webhookId: $id, since: \"2020-01-01T00:00:00Z\") }",
            json!({ "id": webhook_id.to_string() }),
        )
        .await;
    assert_eq!(
        answer["data"]["replayDeadLetters"], 1,
        "only the one with a payload: {answer}"
    );
    let requests = receiver.wait_for(1, Duration::from_secs(10)).await;
    assert_eq!(
        requests[0].header("x-aegis-delivery"),
        kept.to_string(),
        "the replayed delivery is the one with a payload"
    );
    let left = deliveries::delivery_by_id(app.db(), expunged)
        .await
        .expect("delivery")
        .expect("its record stays");
    assert_eq!(left.status, deliveries::DeliveryStatus::Failed, "not reopened");
    assert_eq!(
        deliveries::attempts_of(app.db(), expunged)
            .await
            .expect("attempts")
            .len(),
        1,
        "and not attempted again"
    );
}

/// Deliveries the populated-database test makes (and as many events and
/// attempts); `AEGIS_TEST_POPULATED_DELIVERIES` sets another number, such as
/// the million of docs/performance.md's timing.
const POPULATED_DELIVERIES: u64 = 20_000;

/// Partition changes never queue the deliveries behind a long wait: making
/// partitions goes on beside open writers (it takes no lock they hold), and
/// a drop that a long reader holds back gives up this pass, then goes
/// through once the reader is done. PostgreSQL only: SQLite has no
/// partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_changes_wait_for_no_writer_and_give_way_to_readers() {
    use sea_orm::{ConnectionTrait, TransactionTrait};
    let Some(data) = data(Backend::Postgres).await else {
        return;
    };
    let plan = Config::default().partition_plan();
    let ten_days_on = Utc::now() + chrono::Duration::days(10);

    // A writer's transaction stays open on both tables (the locks an insert
    // takes); partitions ten days ahead are made meanwhile, and the writer
    // then writes and commits.
    let writer = data.db.begin().await.expect("begin");
    writer
        .execute_unprepared(
            "LOCK TABLE deliveries IN ROW EXCLUSIVE MODE; LOCK TABLE delivery_attempts IN ROW EXCLUSIVE MODE",
        )
        .await
        .expect("the writer's locks");
    let before: Vec<_> = partitions::list(&data.db)
        .await
        .expect("partitions")
        .into_iter()
        .map(|partition| partition.range)
        .collect();
    let wanted = plan.to_create(&before, ten_days_on);
    assert!(!wanted.is_empty(), "ten days on, partitions are missing: {before:?}");
    let made = partitions::ensure(&data.db, plan, ten_days_on)
        .await
        .expect("partitions made while a writer is open");
    assert_eq!(made, wanted.len());
    let reach = partitions::list(&data.db)
        .await
        .expect("partitions")
        .last()
        .map(|last| last.range.to);
    assert_eq!(
        reach,
        wanted.last().map(|last| last.to),
        "the partitions reach as far as planned"
    );
    writer.commit().await.expect("the writer commits");
    let (_, delivery_id) = event_with_delivery(&data).await;
    assert!(delivery_exists(&data, delivery_id).await);

    // The farthest of them (empty, so nothing holds it) stands for an
    // expired partition. A reader that stays the whole time holds its drop
    // back: the drop gives up, and the partition stays.
    let farthest = partitions::list(&data.db)
        .await
        .expect("partitions")
        .pop()
        .expect("a partition");
    let reader = data.db.begin().await.expect("begin");
    reader
        .execute_unprepared("LOCK TABLE deliveries IN ACCESS SHARE MODE")
        .await
        .expect("the reader's lock");
    let held = partitions::drop_expired(&data.db, farthest.clone())
        .await
        .expect("a busy drop is no error");
    assert_eq!(held, partitions::Expired::Busy(farthest.clone()));
    assert!(
        partitions::list(&data.db)
            .await
            .expect("partitions")
            .contains(&farthest)
    );
    reader.commit().await.expect("the reader commits");

    let dropped = partitions::drop_expired(&data.db, farthest.clone())
        .await
        .expect("drop");
    assert_eq!(dropped, partitions::Expired::Dropped(farthest.clone()));
    assert!(
        !partitions::list(&data.db)
            .await
            .expect("partitions")
            .contains(&farthest)
    );
}

/// Migration 8 on a database that already holds deliveries: nothing is lost,
/// the old rows become the first partition, new deliveries go to the new
/// partitions, and the old partition expires like any other. PostgreSQL only:
/// SQLite has no partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioning_takes_over_a_populated_database() {
    use aegis_webhook_migration::{Migrator, MigratorTrait};
    use sea_orm::ConnectionTrait;
    let Some(url) = support::fresh_database(Backend::Postgres, &scratch_dir()).await else {
        return;
    };
    let db = db::connect(&url).await.expect("connect");
    // Every migration before partitioning.
    Migrator::up(&db, Some(7)).await.expect("migrations 1 to 7");
    let cipher = SecretCipher::from_base64(&SecretCipher::generate_key()).expect("key");
    let tenant_id = tenant_with_webhooks(&db, &cipher, "acme", "http://127.0.0.1:9/hook", 1).await;
    let deliveries: u64 = std::env::var("AEGIS_TEST_POPULATED_DELIVERIES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(POPULATED_DELIVERIES);
    let filled = std::time::Instant::now();
    // Ids as UUIDv7 would be: creation times over the last day, one every few ms.
    db.execute_unprepared(&format!(
        "CREATE TEMP TABLE made AS
           SELECT i,
                  (lpad(to_hex((extract(epoch FROM now()) * 1000)::bigint - 86400000 + i * (86400000 / {deliveries})), 12, '0')
                   || '7' || substr(md5(i::text), 1, 19))::uuid AS id
             FROM generate_series(1, {deliveries}) AS i;
         INSERT INTO events (id, tenant_id, external_id, event_type, timestamp, data, received_at)
           SELECT id, '{tenant_id}', gen_random_uuid(), 'POAM_OVERDUE', '2026-12-01T00:00:00Z', '{{\"poamId\":\"p\"}}', now() FROM made;
         INSERT INTO deliveries (id, tenant_id, webhook_id, event_id, event_type, status, attempts, created_at, updated_at)
           SELECT id, '{tenant_id}', (SELECT id FROM webhooks LIMIT 1), id, 'POAM_OVERDUE',
                  CASE WHEN i % 1000 = 0 THEN 'PENDING' ELSE 'SUCCEEDED' END, 1, now(), now() FROM made;
         INSERT INTO delivery_attempts (id, delivery_id, attempt, started_at, duration_ms, status_code, response_body)
           SELECT gen_random_uuid(), id, 1, now(), 3, 200, 'ok' FROM made;"
    ))
    .await
    .expect("populate");
    eprintln!(
        "populated {deliveries} deliveries, events and attempts in {:?}",
        filled.elapsed()
    );

    let migrating = std::time::Instant::now();
    support::migrate(&db)
        .await
        .expect("migration 8 on a populated database");
    eprintln!(
        "migration 8 (partitioning) on {deliveries} deliveries took {:?}",
        migrating.elapsed()
    );

    let count = |table: &'static str| {
        let db = db.clone();
        async move {
            db.query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                format!("SELECT count(*) AS n FROM {table}"),
            ))
            .await
            .expect("count")
            .expect("a row")
            .try_get::<i64>("", "n")
            .expect("n")
        }
    };
    let expected = i64::try_from(deliveries).expect("fits");
    assert_eq!(
        (
            count("deliveries").await,
            count("delivery_attempts").await,
            count("events").await
        ),
        (expected, expected, expected),
        "nothing lost"
    );
    assert_eq!(
        count("ONLY deliveries_legacy").await,
        expected,
        "the old rows are the first partition"
    );
    let listed = partitions::list(&db).await.expect("partitions");
    assert!(
        listed
            .first()
            .is_some_and(|first| first.suffix == "legacy" && first.range.from.is_none())
    );
    assert!(listed.len() >= 4, "partitions made ahead: {listed:?}");

    // New deliveries land in the new partitions, and old ones still read.
    let data = Data {
        webhook_id: aegis_webhook_storage::webhooks::list_webhooks(&db, &cipher, tenant_id, None, 1)
            .await
            .expect("list")[0]
            .id,
        db: db.clone(),
        tenant_id,
    };
    let (_, fresh) = event_with_delivery(&data).await;
    attempt(&data, fresh, 200, NextStep::Succeeded).await;
    assert_eq!(count("ONLY deliveries_legacy").await, expected);
    assert_eq!(count("deliveries").await, expected + 1);

    // A month on, the old partition's final rows go (a pass removes at most
    // 50 batches of each kind, so a large one takes a few); its pending ones
    // hold it, with their events.
    let expiry = expiry(&data, |_| {});
    let passes = deliveries / 50_000 + 2;
    for _ in 0..passes {
        expiry.pass(a_month_on()).await.expect("pass");
    }
    let pending = expected / 1000;
    assert_eq!(count("ONLY deliveries_legacy").await, pending);
    assert_eq!(count("ONLY delivery_attempts_legacy").await, pending);
    assert_eq!(count("events").await, pending);
}
