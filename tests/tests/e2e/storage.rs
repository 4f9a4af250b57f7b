//! Storage on both databases: migrations, sealed secrets, deduplication, claims
//! and the reconciler's scan.

use std::time::Duration;

use aegis_webhook_core::event::{EventType, ValidatedEvent};
use aegis_webhook_core::ids::{DeliveryId, TenantId, WebhookId};
use aegis_webhook_core::secret::{SecretCipher, SigningSecret};
use aegis_webhook_core::target::{TargetPolicy, WebhookUrl};
use aegis_webhook_storage::deliveries::{self, Attempt, DeliveryStatus, NewDelivery, NextStep, Recorded};
use aegis_webhook_storage::{self as db, events, tenants, webhooks};
use chrono::{SubsecRound as _, Utc};
use sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use uuid::Uuid;

use crate::on_both_backends;
use crate::support::{
    Backend, count_rows, envelope, fresh_database, scratch_dir, seed_poam_overdue_data, seed_vulnerability_data,
};

on_both_backends!(
    migrations_apply_and_reapply_cleanly,
    start_up_writes_are_safe_when_replicas_make_them_at_once,
    webhook_secrets_are_sealed_at_rest,
    an_event_id_is_stored_once_per_tenant,
    a_delivery_attempt_is_claimed_by_one_worker_only,
    batched_writes_mean_what_one_at_a_time_writes_mean,
    a_fan_out_stores_each_new_event_with_its_deliveries_all_or_nothing,
    the_reconciler_scan_pages_through_unclaimed_pending_deliveries,
    a_tenant_is_shown_a_deliverys_newest_attempts_and_bodies_only_when_asked,
    a_late_record_of_an_attempt_taken_over_is_logged_and_changes_nothing,
);

async fn open(backend: Backend) -> Option<DatabaseConnection> {
    let url = fresh_database(backend, &scratch_dir()).await?;
    let db = db::connect(&url).await.expect("connect");
    crate::support::migrate(&db).await.expect("migrate");
    Some(db)
}

struct Fixture {
    db: DatabaseConnection,
    cipher: SecretCipher,
    tenant_id: TenantId,
    webhook_id: WebhookId,
}

async fn fixture(backend: Backend) -> Option<Fixture> {
    let db = open(backend).await?;
    let cipher = SecretCipher::from_base64(&SecretCipher::generate_key()).expect("key");
    let tenant = tenants::ensure_tenant(&db, "acme").await.expect("tenant");
    let webhook = webhooks::create_webhook(
        &db,
        &cipher,
        tenant.id,
        webhooks::NewWebhook {
            url: WebhookUrl::parse("https://example.com/hook", &TargetPolicy::default()).expect("url"),
            events: vec![EventType::PoamOverdue],
            description: None,
            project_ids: vec![],
            secret: SigningSecret::parse("your-webhook-secret").expect("secret"),
            active: true,
        },
    )
    .await
    .expect("webhook");
    Some(Fixture {
        db,
        cipher,
        tenant_id: tenant.id,
        webhook_id: webhook.id,
    })
}

fn poam_event(tenant_id: TenantId) -> ValidatedEvent {
    poam_event_with_id(tenant_id, Uuid::now_v7())
}

/// An event with the envelope id `id`, which is unique only within a tenant.
fn poam_event_with_id(tenant_id: TenantId, id: Uuid) -> ValidatedEvent {
    let mut envelope = envelope(tenant_id, "POAM_OVERDUE", seed_poam_overdue_data());
    envelope["id"] = serde_json::json!(id);
    ValidatedEvent::parse(envelope.to_string().as_bytes(), Utc::now()).expect("valid")
}

async fn migrations_apply_and_reapply_cleanly(backend: Backend) {
    let Some(db) = open(backend).await else { return };
    crate::support::migrate(&db).await.expect("a second run is a no-op");
    let tenant = tenants::ensure_tenant(&db, "acme").await.expect("tenant");
    assert_eq!(tenants::ensure_tenant(&db, "acme").await.expect("again"), tenant);
}

/// SQLite's settings are per connection: each of the pool's connections,
/// held at once, has them, not only the first.
#[tokio::test]
async fn every_pooled_sqlite_connection_has_the_embedded_settings() {
    use sea_orm::TransactionTrait as _;
    let Some(db) = open(Backend::Sqlite).await else { return };
    let held = futures::future::try_join_all((0..4).map(|_| db.begin()))
        .await
        .expect("the pool's four connections");
    for transaction in &held {
        let setting = |pragma: &'static str| async move {
            let row = transaction
                .query_one_raw(Statement::from_string(
                    sea_orm::DbBackend::Sqlite,
                    format!("PRAGMA {pragma}"),
                ))
                .await
                .expect("pragma")
                .expect("a row");
            row.try_get_by_index::<i64>(0).expect("a number")
        };
        // NORMAL is 1; busy_timeout is in milliseconds.
        assert_eq!(
            (
                setting("synchronous").await,
                setting("foreign_keys").await,
                setting("busy_timeout").await
            ),
            (1, 1, db::SQLITE_BUSY_TIMEOUT.as_millis() as i64)
        );
    }
}

/// An API process's PostgreSQL statements end at its requests' deadline
/// (`AEGIS_GRAPHQL_TIMEOUT`), on every connection of its pool, so a query
/// a client abandoned does not run on in the server; a worker's are not cut.
#[tokio::test]
async fn an_api_process_statements_are_cancelled_at_its_request_deadline() {
    use aegis_webhook::{Roles, open_database_for};
    use sea_orm::TransactionTrait as _;
    let scratch = scratch_dir();
    let Some(url) = crate::support::migrated_database(Backend::Postgres, &scratch).await else {
        return;
    };
    let mut config = crate::support::test_config(url, scratch);
    config.graphql_timeout = Duration::from_millis(300);
    let sleep =
        |seconds: f64| Statement::from_string(sea_orm::DbBackend::Postgres, format!("SELECT pg_sleep({seconds})"));

    let api = open_database_for(&config, Roles::API).await.expect("api pool");
    let held = futures::future::try_join_all((0..4).map(|_| api.begin()))
        .await
        .expect("four of the pool's connections");
    for transaction in held {
        let error = transaction
            .execute_raw(sleep(1.5))
            .await
            .expect_err("cancelled at the deadline");
        assert!(error.to_string().contains("statement timeout"), "{error}");
    }
    let worker = open_database_for(&config, Roles::WORKER).await.expect("worker pool");
    worker.execute_raw(sleep(0.5)).await.expect("not cut");
    let unbounded = aegis_webhook_core::config::Config {
        api_statement_timeout: aegis_webhook_core::config::ApiStatementTimeout::Off,
        ..config.clone()
    };
    let api = open_database_for(&unbounded, Roles::API).await.expect("api pool");
    api.execute_raw(sleep(0.5)).await.expect("not cut when switched off");

    // Start-up's partition upkeep waits for the migration lock (a `migrate`
    // running) as long as it always did, not the statements' deadline.
    let migrating = worker.begin().await.expect("a connection");
    migrating
        .execute_unprepared(&format!("SELECT pg_advisory_xact_lock({})", db::MIGRATION_LOCK))
        .await
        .expect("the migration lock");
    let starting = open_database_for(&config, Roles::API);
    let waited_past_the_deadline = async {
        let waiting = Statement::from_string(
            sea_orm::DbBackend::Postgres,
            "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%pg_advisory_xact_lock%' AND now() - query_start > interval '900 milliseconds'",
        );
        crate::support::eventually(Duration::from_secs(10), "an api start waiting for the lock", || async {
            worker.query_one_raw(waiting.clone()).await.expect("pg_stat_activity")
        })
        .await;
    };
    tokio::pin!(starting);
    tokio::select! {
        started = &mut starting => panic!("the start ended while the lock was held: {:?}", started.err()),
        () = waited_past_the_deadline => {}
    }
    migrating.commit().await.expect("release the lock");
    starting.await.expect("the api starts once the lock is free");
}

/// What every replica writes when it starts (migrations, the bootstrap tenant
/// and its key), done by several at the same instant, each on its own pool as
/// separate processes would: all succeed, and one tenant and one key result.
async fn start_up_writes_are_safe_when_replicas_make_them_at_once(backend: Backend) {
    const REPLICAS: usize = 4;
    let Some(url) = fresh_database(backend, &scratch_dir()).await else {
        return;
    };
    let mut pools = Vec::new();
    for _ in 0..REPLICAS {
        pools.push(db::connect(&url).await.expect("connect"));
    }
    if backend == Backend::Sqlite {
        // A SQLite file belongs to one process (`dev`), which migrates it once.
        crate::support::migrate(&pools[0]).await.expect("migrate");
    }
    let key = tenants::generate_api_key();
    for _ in 0..3 {
        let started = pools.iter().map(|db| async {
            if backend == Backend::Postgres {
                crate::support::migrate(db).await.expect("concurrent migrations");
            }
            let tenant = tenants::ensure_tenant(db, "default").await.expect("concurrent tenant");
            tenants::add_api_key(db, tenant.id, &key).await.expect("concurrent key");
            tenant
        });
        let tenants = futures::future::join_all(started).await;
        assert!(tenants.iter().all(|tenant| *tenant == tenants[0]), "{tenants:?}");
        let holder = tenants::authenticate(&pools[0], &key)
            .await
            .expect("authenticate")
            .expect("the key is held");
        assert_eq!(holder.tenant_id, tenants[0].id);
        assert_eq!(holder.scopes, aegis_webhook_core::access::Scopes::FULL);
    }
    let db = &pools[0];
    let count = |table: &'static str| count_rows(db, table);
    assert_eq!(count("tenants").await, 1);
    assert_eq!(count("api_keys").await, 1);

    // A key that another tenant holds is still refused, at once or in turn.
    let other = tenants::ensure_tenant(db, "other").await.expect("tenant");
    let attempts = pools.iter().map(|db| tenants::add_api_key(db, other.id, &key));
    for result in futures::future::join_all(attempts).await {
        assert!(matches!(result, Err(db::StoreError::Conflict(_))), "{result:?}");
    }
    assert_eq!(count("api_keys").await, 1);

    // `tenant create` run twice at once: one creates it, the other is told.
    let creating = pools.iter().map(|db| tenants::create_tenant(db, "acme"));
    let created = futures::future::join_all(creating).await;
    assert_eq!(created.iter().filter(|result| result.is_ok()).count(), 1, "{created:?}");
    assert!(
        created
            .iter()
            .filter_map(|result| result.as_ref().err())
            .all(|error| matches!(error, db::StoreError::Conflict(_))),
        "{created:?}"
    );
}

async fn webhook_secrets_are_sealed_at_rest(which: Backend) {
    let Some(fixture) = fixture(which).await else { return };
    let backend = fixture.db.get_database_backend();
    let row = fixture
        .db
        .query_one_raw(Statement::from_string(
            backend,
            "SELECT secret_sealed FROM webhooks".to_owned(),
        ))
        .await
        .expect("query")
        .expect("row");
    let stored: String = row.try_get("", "secret_sealed").expect("column");
    assert!(!stored.contains("your-webhook-secret"), "{stored}");
    assert!(stored.starts_with("v1."), "{stored}");
    let webhook = webhooks::webhook_of_tenant(&fixture.db, &fixture.cipher, fixture.tenant_id, fixture.webhook_id)
        .await
        .expect("webhook");
    assert_eq!(webhook.secret.expose(), "your-webhook-secret");
    // Another tenant does not see it.
    let other = tenants::ensure_tenant(&fixture.db, "other").await.expect("tenant");
    assert!(matches!(
        webhooks::webhook_of_tenant(&fixture.db, &fixture.cipher, other.id, fixture.webhook_id).await,
        Err(db::StoreError::NotFound)
    ));

    // A process started with another key refuses to start, saying why; with
    // the key, or on a database without webhooks, it starts.
    let another_key = SecretCipher::from_base64(&SecretCipher::generate_key()).expect("key");
    let refused = aegis_webhook::check_secret_key(&fixture.db, &another_key)
        .await
        .expect_err("another key");
    assert!(
        format!("{refused:#}").contains("AEGIS_SECRET_KEY is not the key the stored webhook secrets were sealed with"),
        "{refused:#}"
    );
    aegis_webhook::check_secret_key(&fixture.db, &fixture.cipher)
        .await
        .expect("the key");
    let empty = open(which).await.expect("a database");
    aegis_webhook::check_secret_key(&empty, &another_key)
        .await
        .expect("nothing sealed yet");
}

async fn an_event_id_is_stored_once_per_tenant(backend: Backend) {
    let Some(fixture) = fixture(backend).await else { return };
    let event = poam_event(fixture.tenant_id);
    assert!(
        events::insert_event(&fixture.db, &event)
            .await
            .expect("insert")
            .is_some()
    );
    assert_eq!(events::insert_event(&fixture.db, &event).await.expect("repeat"), None);

    // The same id from another tenant is a different event.
    let other = tenants::ensure_tenant(&fixture.db, "other").await.expect("tenant");
    let theirs = poam_event_with_id(other.id, event.id());
    assert!(
        events::insert_event(&fixture.db, &theirs)
            .await
            .expect("insert")
            .is_some()
    );
}

async fn pending_delivery(fixture: &Fixture) -> DeliveryId {
    let event_row = events::insert_event(&fixture.db, &poam_event(fixture.tenant_id))
        .await
        .expect("insert")
        .expect("new");
    let ids = deliveries::insert_pending(
        &fixture.db,
        fixture.tenant_id,
        event_row,
        &[NewDelivery {
            webhook_id: fixture.webhook_id,
            event_type: EventType::PoamOverdue,
        }],
        Utc::now(),
    )
    .await
    .expect("deliveries");
    ids[0]
}

async fn a_delivery_attempt_is_claimed_by_one_worker_only(backend: Backend) {
    let Some(fixture) = fixture(backend).await else { return };
    let id = pending_delivery(&fixture).await;
    let lease = Duration::from_secs(60);
    // PostgreSQL keeps microseconds.
    let now = Utc::now().trunc_subsecs(6);
    let claim = deliveries::claim(&fixture.db, id, 1, lease, now)
        .await
        .expect("claim")
        .expect("claimed");
    assert_eq!(
        deliveries::claim(&fixture.db, id, 1, lease, now)
            .await
            .expect("second claim"),
        None
    );
    assert_eq!(
        deliveries::claim(&fixture.db, id, 2, lease, now)
            .await
            .expect("future attempt"),
        None
    );

    let attempt = Attempt {
        delivery_id: id,
        attempt: 1,
        started_at: now,
        duration: Duration::from_millis(12),
        status_code: Some(500),
        error: None,
        response_body: Some("boom".to_owned()),
    };
    let recorded = Recorded {
        attempt: attempt.clone(),
        lease: claim,
        next: NextStep::RetryAt(now),
    };
    assert!(
        deliveries::record_attempt(&fixture.db, &recorded)
            .await
            .expect("record")
    );
    assert_eq!(
        deliveries::claim(&fixture.db, id, 1, lease, Utc::now())
            .await
            .expect("stale task"),
        None
    );
    let second = deliveries::claim(&fixture.db, id, 2, lease, Utc::now())
        .await
        .expect("next attempt")
        .expect("claimed");

    // An expired claim can be taken over (a worker died mid-attempt), by
    // another claim.
    let later = Utc::now() + chrono::Duration::seconds(120);
    let takeover = deliveries::claim(&fixture.db, id, 2, lease, later)
        .await
        .expect("takeover")
        .expect("claimed");
    assert_ne!(takeover, second);

    let stored = deliveries::attempts_of(&fixture.db, id).await.expect("attempts");
    assert_eq!(stored, vec![attempt]);
}

/// A worker whose claim ran out before it recorded: another worker took the
/// attempt over. Whichever records first, the delivery moves as the
/// attempt under the live claim says; the late one is logged, moves
/// nothing, and says so (it used to turn a success into a retry or a dead
/// letter, or, recorded first, win).
async fn a_late_record_of_an_attempt_taken_over_is_logged_and_changes_nothing(backend: Backend) {
    let Some(fixture) = fixture(backend).await else { return };
    let lease = Duration::from_secs(60);
    let now = Utc::now().trunc_subsecs(6);
    let recorded = |id, status_code, lease, next| Recorded {
        attempt: Attempt {
            delivery_id: id,
            attempt: 1,
            started_at: now,
            duration: Duration::from_millis(1),
            status_code: Some(status_code),
            error: None,
            response_body: None,
        },
        lease,
        next,
    };
    let exhausted = || NextStep::Failed("exhausted".to_owned());
    let db = &fixture.db;
    let read = |id| async move {
        let delivery = deliveries::delivery_by_id(db, id).await.expect("read").expect("stored");
        (delivery.status, delivery.attempts, delivery.last_status_code)
    };
    // A pending delivery claimed, and claimed again once that claim ran out:
    // its id, the late claim and the live one.
    let taken_over = || async {
        let id = pending_delivery(&fixture).await;
        let claimed_at = Utc::now();
        let mut claims = Vec::new();
        for at in [claimed_at, claimed_at + chrono::Duration::seconds(61)] {
            let claim = deliveries::claim(db, id, 1, lease, at).await.expect("claim");
            claims.push(claim.expect("claimed"));
        }
        (id, claims[0], claims[1])
    };
    for late_first in [false, true] {
        let (id, late, live) = taken_over().await;
        let success = recorded(id, 200, live, NextStep::Succeeded);
        let failure = recorded(id, 500, late, exhausted());
        let (first, second) = if late_first {
            (&failure, &success)
        } else {
            (&success, &failure)
        };
        let moved_first = deliveries::record_attempt(&fixture.db, first).await.expect("record");
        let moved_second = deliveries::record_attempt(&fixture.db, second).await.expect("record");
        assert_eq!(
            (moved_first, moved_second),
            (!late_first, late_first),
            "only the live claim's record moves the delivery (late first: {late_first})"
        );
        assert_eq!(read(id).await, (DeliveryStatus::Succeeded, 1, Some(200)));
        let logged = deliveries::attempts_of(&fixture.db, id).await.expect("attempts");
        assert_eq!(logged.len(), 2, "both attempts are in the log");
    }

    // Recorded together, in one batch: the later claim's attempt moves it.
    let (id, late, live) = taken_over().await;
    let moved = deliveries::record_attempts(
        &fixture.db,
        &[
            recorded(id, 200, live, NextStep::Succeeded),
            recorded(id, 500, late, exhausted()),
        ],
    )
    .await
    .expect("record batch");
    assert_eq!(moved, [true, false]);
    assert_eq!(read(id).await, (DeliveryStatus::Succeeded, 1, Some(200)));
}

/// However many attempts redeliveries add, a tenant is shown the newest
/// [`deliveries::NEWEST_ATTEMPTS_SHOWN`], oldest first, their response
/// bodies only when asked for, and never another tenant's.
async fn a_tenant_is_shown_a_deliverys_newest_attempts_and_bodies_only_when_asked(backend: Backend) {
    let Some(fixture) = fixture(backend).await else { return };
    let id = pending_delivery(&fixture).await;
    let made = deliveries::NEWEST_ATTEMPTS_SHOWN + 4;
    let now = Utc::now().trunc_subsecs(6);
    for attempt in 1..=made {
        let recorded = Attempt {
            delivery_id: id,
            attempt,
            started_at: now,
            duration: Duration::from_millis(1),
            status_code: Some(500),
            error: None,
            response_body: Some(format!("answer {attempt}")),
        };
        crate::support::claim_and_record(&fixture.db, recorded, NextStep::RetryAt(now)).await;
    }
    let ids = [id];
    let shown = |bodies| deliveries::newest_attempts_of_tenant(&fixture.db, fixture.tenant_id, &ids, bodies);
    let with_bodies = shown(true).await.expect("attempts").remove(&id).expect("some");
    let numbers: Vec<u32> = with_bodies.iter().map(|attempt| attempt.attempt).collect();
    assert_eq!(numbers, (5..=made).collect::<Vec<_>>(), "the newest, oldest first");
    assert_eq!(with_bodies[0].response_body.as_deref(), Some("answer 5"));
    let without = shown(false).await.expect("attempts").remove(&id).expect("some");
    assert_eq!(without.len(), with_bodies.len());
    assert!(without.iter().all(|attempt| attempt.response_body.is_none()));
    assert_eq!((without[0].status_code, without[0].attempt), (Some(500), 5));

    let other = tenants::ensure_tenant(&fixture.db, "other").await.expect("tenant");
    let theirs = deliveries::newest_attempts_of_tenant(&fixture.db, other.id, &[id], true)
        .await
        .expect("attempts");
    assert!(theirs.is_empty(), "another tenant's delivery shows nothing");
}

/// Events for a batch: two new ones, one stored before it, and another
/// tenant's event with the first one's id.
struct BatchEvents {
    stored_before: ValidatedEvent,
    first: ValidatedEvent,
    second: ValidatedEvent,
    same_id_other_tenant: ValidatedEvent,
}

impl BatchEvents {
    /// Which events of [`BatchEvents::batch`] are new.
    const NEW: [bool; 5] = [true, true, false, false, true];

    /// The batch: the two new events, a repeat of the first, the one stored
    /// before, and the other tenant's.
    fn batch(&self) -> [&ValidatedEvent; 5] {
        [
            &self.first,
            &self.second,
            &self.first,
            &self.stored_before,
            &self.same_id_other_tenant,
        ]
    }
}

async fn batch_events(fixture: &Fixture) -> BatchEvents {
    let stored_before = poam_event(fixture.tenant_id);
    events::insert_event(&fixture.db, &stored_before).await.expect("insert");
    let other = tenants::ensure_tenant(&fixture.db, "other").await.expect("tenant");
    let first = poam_event(fixture.tenant_id);
    BatchEvents {
        stored_before,
        same_id_other_tenant: poam_event_with_id(other.id, first.id()),
        first,
        second: poam_event(fixture.tenant_id),
    }
}

/// The batched forms the ingester and the worker use: each row in a batch ends as
/// it would alone, repeats and wrong attempts included.
async fn batched_writes_mean_what_one_at_a_time_writes_mean(backend: Backend) {
    let Some(fixture) = fixture(backend).await else { return };
    let events_of = batch_events(&fixture).await;
    let rows = events::insert_events(&fixture.db, &events_of.batch())
        .await
        .expect("insert batch");
    let stored: Vec<bool> = rows.iter().map(Option::is_some).collect();
    assert_eq!(stored, BatchEvents::NEW, "{rows:?}");
    assert_eq!(
        tenants::existing_tenants(
            &fixture.db,
            &[
                events_of.same_id_other_tenant.tenant_id(),
                TenantId::generate(),
                fixture.tenant_id
            ]
        )
        .await
        .expect("tenants"),
        [events_of.same_id_other_tenant.tenant_id(), fixture.tenant_id]
            .into_iter()
            .collect()
    );

    // Claims: right attempts are taken once, a wrong attempt is not.
    let (a, b, c) = (
        pending_delivery(&fixture).await,
        pending_delivery(&fixture).await,
        pending_delivery(&fixture).await,
    );
    // Two deliveries of one event: claimed together, they share its row.
    let to_hook = NewDelivery {
        webhook_id: fixture.webhook_id,
        event_type: EventType::PoamOverdue,
    };
    let [d, e] =
        events::insert_event_with_deliveries(&fixture.db, &poam_event(fixture.tenant_id), &[to_hook; 2], Utc::now())
            .await
            .expect("insert")
            .expect("new")[..]
    else {
        panic!("two deliveries were asked for")
    };
    let wanted = |delivery_id, attempt| deliveries::ClaimRequest { delivery_id, attempt };
    let lease = Duration::from_secs(60);
    let leases = deliveries::claim_leases(
        &fixture.db,
        &fixture.cipher,
        &[
            wanted(a, 1),
            wanted(b, 2),
            wanted(c, 1),
            wanted(a, 1),
            wanted(d, 1),
            wanted(e, 1),
        ],
        lease,
        Utc::now(),
    )
    .await
    .expect("claim batch");
    let mut claimed: Vec<DeliveryId> = leases.deliveries.iter().map(|delivery| delivery.id).collect();
    claimed.sort();
    let mut expected = vec![a, c, d, e];
    expected.sort();
    assert_eq!(claimed, expected);
    // What the attempts are built from comes with them, each row once: the
    // three events, and the webhook all four deliveries share.
    let mut events_read: Vec<_> = leases.events.iter().map(|event| event.id).collect();
    events_read.sort();
    let mut events_claimed: Vec<_> = leases.deliveries.iter().map(|delivery| delivery.event_id).collect();
    events_claimed.sort();
    events_claimed.dedup();
    assert_eq!((events_read.len(), &events_read), (3, &events_claimed));
    let payload = poam_event(fixture.tenant_id).data().to_json();
    assert!(
        leases
            .events
            .iter()
            .all(|event| event.data.as_deref() == Some(payload.as_str())),
        "{:?}",
        leases.events
    );
    let webhooks_read: Vec<_> = leases
        .webhooks
        .iter()
        .map(|webhook| {
            webhook
                .as_ref()
                .map(|webhook| (webhook.id, webhook.url.as_str().to_owned()))
        })
        .collect();
    assert_eq!(
        webhooks_read,
        [Ok((fixture.webhook_id, "https://example.com/hook".to_owned()))]
    );
    assert!(
        deliveries::claim_many(&fixture.db, &[wanted(a, 1), wanted(c, 1)], lease, Utc::now())
            .await
            .expect("again")
            .is_empty(),
        "claimed deliveries cannot be claimed again while the lease lasts"
    );
    if backend == Backend::Postgres {
        // The leases' commit skipped its flush; nothing else does: the
        // setting ended with their transaction, on every pooled connection
        // (each reads its own against the server's).
        use sea_orm::ConnectionTrait as _;
        let settings = futures::future::join_all((0..8).map(|_| {
            fixture.db.query_one_raw(sea_orm::Statement::from_string(
                sea_orm::DbBackend::Postgres,
                "SELECT current_setting('synchronous_commit') AS now, reset_val AS server \
                 FROM pg_settings WHERE name = 'synchronous_commit'",
            ))
        }))
        .await;
        for setting in settings {
            let row = setting.expect("query").expect("a row");
            let now: String = row.try_get("", "now").expect("now");
            let server: String = row.try_get("", "server").expect("server");
            assert_eq!(now, server, "a connection kept the leases' setting");
        }
    }

    // Records: each delivery moves on as its own attempt says.
    let now = Utc::now().trunc_subsecs(6);
    let attempt = |delivery_id, status_code| Attempt {
        delivery_id,
        attempt: 1,
        started_at: now,
        duration: Duration::from_millis(3),
        status_code: Some(status_code),
        error: None,
        response_body: None,
    };
    let retry_at = now + chrono::Duration::seconds(30);
    // Under the claims taken above, as the claim returned them.
    let lease_of = |id| {
        leases
            .deliveries
            .iter()
            .find(|delivery| delivery.id == id)
            .and_then(deliveries::Delivery::lease)
            .expect("claimed")
    };
    let recorded = |id, status_code, next| Recorded {
        attempt: attempt(id, status_code),
        lease: lease_of(id),
        next,
    };
    let moved = deliveries::record_attempts(
        &fixture.db,
        &[
            recorded(a, 200, NextStep::Succeeded),
            recorded(c, 503, NextStep::RetryAt(retry_at)),
        ],
    )
    .await
    .expect("record batch");
    assert_eq!(moved, [true, true]);
    let a_now = deliveries::delivery_by_id(&fixture.db, a).await.expect("a").expect("a");
    let c_now = deliveries::delivery_by_id(&fixture.db, c).await.expect("c").expect("c");
    assert_eq!(
        (
            a_now.status,
            a_now.attempts,
            a_now.last_status_code,
            a_now.next_attempt_at
        ),
        (deliveries::DeliveryStatus::Succeeded, 1, Some(200), None)
    );
    assert_eq!(
        (
            c_now.status,
            c_now.attempts,
            c_now.last_status_code,
            c_now.next_attempt_at
        ),
        (deliveries::DeliveryStatus::Pending, 1, Some(503), Some(retry_at))
    );
    assert_eq!(
        deliveries::attempts_of(&fixture.db, c).await.expect("attempts"),
        vec![attempt(c, 503)]
    );

    // Health: failures add up; a success inside a batch drops the failures before it.
    let health = |change| {
        webhooks::record_health_change(
            &fixture.db,
            fixture.webhook_id,
            change,
            &aegis_webhook_core::retry::AutoDisable::NEVER,
            Utc::now(),
        )
    };
    let streak = || async {
        webhooks::webhook_by_id(&fixture.db, &fixture.cipher, fixture.webhook_id)
            .await
            .expect("webhook")
            .expect("exists")
            .consecutive_failures
    };
    health(webhooks::HealthChange {
        reset: false,
        failures: 3,
    })
    .await
    .expect("failures");
    assert_eq!(streak().await, 3);
    health(webhooks::HealthChange {
        reset: true,
        failures: 2,
    })
    .await
    .expect("reset, then failures");
    assert_eq!(streak().await, 2);
}

/// The fan-out's write: each new event with its deliveries, a repeat with
/// none, and a batch that cannot be stored entirely leaves nothing behind.
async fn a_fan_out_stores_each_new_event_with_its_deliveries_all_or_nothing(backend: Backend) {
    let Some(fixture) = fixture(backend).await else { return };
    let events_of = batch_events(&fixture).await;
    let to_hook = |count: usize| {
        vec![
            NewDelivery {
                webhook_id: fixture.webhook_id,
                event_type: EventType::PoamOverdue,
            };
            count
        ]
    };
    let planned = |event, count| events::EventWithDeliveries {
        event,
        deliveries: to_hook(count),
    };
    // Deliveries asked for each event of the batch, in its order.
    let asked = [2, 0, 1, 1, 1];
    let batch: Vec<_> = events_of
        .batch()
        .into_iter()
        .zip(asked)
        .map(|(event, count)| planned(event, count))
        .collect();
    let stored = events::insert_events_with_deliveries(&fixture.db, &batch, Utc::now())
        .await
        .expect("fan-out");
    let counts: Vec<Option<usize>> = stored.iter().map(|ids| ids.as_ref().map(Vec::len)).collect();
    let expected: Vec<Option<usize>> = BatchEvents::NEW
        .iter()
        .zip(asked)
        .map(|(new, count)| new.then_some(count))
        .collect();
    assert_eq!(counts, expected);

    // A payload comes back as sent, quotes, backslashes and all (the rows
    // travel inside JSON on PostgreSQL; control characters are refused
    // before, by validation).
    let mut data = seed_vulnerability_data();
    data["component"]["name"] = serde_json::json!("quote \" backslash \\ emoji 🛡️ \u{2028} {\"not\": \"json\"}");
    let mut odd = envelope(fixture.tenant_id, "VULNERABILITY_DETECTED", data);
    odd["id"] = serde_json::json!(Uuid::now_v7());
    let odd = ValidatedEvent::parse(odd.to_string().as_bytes(), Utc::now()).expect("valid");
    let odd_stored = events::insert_events_with_deliveries(&fixture.db, &[planned(&odd, 1)], Utc::now())
        .await
        .expect("fan-out")
        .pop()
        .flatten()
        .expect("new");
    let odd_delivery = deliveries::delivery_by_id(&fixture.db, odd_stored[0])
        .await
        .expect("read")
        .expect("stored");
    let odd_event = events::events_by_ids(&fixture.db, &[odd_delivery.event_id])
        .await
        .expect("read")
        .pop()
        .expect("stored");
    assert_eq!(odd_event.data, Some(odd.data().to_json()));
    for ids in stored.iter().flatten() {
        for id in ids {
            let delivery = deliveries::delivery_by_id(&fixture.db, *id)
                .await
                .expect("read")
                .expect("the returned id is stored");
            assert_eq!(
                (delivery.status, delivery.attempts, delivery.webhook_id),
                (deliveries::DeliveryStatus::Pending, 0, fixture.webhook_id)
            );
        }
    }
    let count = |table: &'static str| count_rows(&fixture.db, table);
    assert_eq!((count("events").await, count("deliveries").await), (5, 4));

    // A delivery to a webhook that does not exist fails the batch: neither
    // its event nor the other, valid, one is kept.
    let (third, fourth) = (poam_event(fixture.tenant_id), poam_event(fixture.tenant_id));
    let nowhere = events::EventWithDeliveries {
        event: &fourth,
        deliveries: vec![NewDelivery {
            webhook_id: WebhookId::generate(),
            event_type: EventType::PoamOverdue,
        }],
    };
    events::insert_events_with_deliveries(&fixture.db, &[planned(&third, 1), nowhere], Utc::now())
        .await
        .expect_err("a delivery to a missing webhook");
    assert_eq!((count("events").await, count("deliveries").await), (5, 4));
}

async fn the_reconciler_scan_pages_through_unclaimed_pending_deliveries(backend: Backend) {
    let Some(fixture) = fixture(backend).await else { return };
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(pending_delivery(&fixture).await);
    }
    let now = Utc::now();
    // One is held by a live claim and must not be re-published.
    assert!(
        deliveries::claim(&fixture.db, ids[2], 1, Duration::from_secs(60), now)
            .await
            .expect("claim")
            .is_some()
    );

    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = deliveries::pending_unclaimed(&fixture.db, None, now, 2, cursor)
            .await
            .expect("scan");
        seen.extend(page.iter().map(|pending| pending.id));
        match page.last() {
            Some(last) if page.len() == 2 => cursor = Some((last.due_at, last.id)),
            _ => break,
        }
    }
    let expected: Vec<DeliveryId> = ids.iter().copied().filter(|id| *id != ids[2]).collect();
    seen.sort();
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    assert_eq!(seen, expected_sorted);

    // Nothing is due before the deliveries were created.
    let before = now - chrono::Duration::seconds(3600);
    assert!(
        deliveries::pending_unclaimed(&fixture.db, Some(before), now, 10, None)
            .await
            .expect("scan")
            .is_empty()
    );
}
