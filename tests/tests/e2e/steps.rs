//! The ingester's and the worker's one step, driven directly (no consume loop,
//! no broker): `Ingester::ingest` on envelope bytes and `Worker::process_one`
//! on a task, against a real database and a real receiver, each outcome as the
//! step reports it.

use std::sync::Arc;
use std::time::Duration;

use aegis_webhook_core::event::EventType;
use aegis_webhook_core::fairness::FairShare;
use aegis_webhook_core::ids::TenantId;
use aegis_webhook_core::queue::memory::MemoryQueue;
use aegis_webhook_core::queue::{DeliveryTask, Lane, Queue};
use aegis_webhook_core::secret::{SecretCipher, SigningSecret};
use aegis_webhook_core::target::{TargetPolicy, WebhookUrl};
use aegis_webhook_ingester::{IngestOutcome, Ingester};
use aegis_webhook_storage::deliveries::{self, DeliveryStatus};
use aegis_webhook_storage::{self as db, tenants, webhooks};
use aegis_webhook_worker::{Outcome, Worker};
use sea_orm::DatabaseConnection;

use crate::support::{Backend, Receiver, envelope, fresh_database, scratch_dir, seed_poam_overdue_data, test_config};

struct Steps {
    db: DatabaseConnection,
    /// The roles' configuration.
    config: aegis_webhook_core::config::Config,
    /// `AEGIS_MAX_EVENT_BYTES` of the steps' ingesters.
    max_event_bytes: usize,
    queue: MemoryQueue,
    ingester: Ingester,
    worker: Worker,
    tenant_id: TenantId,
}

/// A migrated SQLite database with a tenant and one webhook per receiver, and
/// the two roles' steps on an in-process queue.
async fn steps(receivers: &[&Receiver]) -> Steps {
    let scratch = scratch_dir();
    let url = fresh_database(Backend::Sqlite, &scratch).await.expect("SQLite");
    let mut config = test_config(url.clone(), scratch);
    config.retry_schedule = "0s,30s".parse().expect("valid");
    config
        .allow_private_targets
        .extend(TargetPolicy::allowing_loopback_ranges());
    let db = db::connect(&url).await.expect("connect");
    crate::support::migrate(&db).await.expect("migrate");
    let cipher = SecretCipher::from_base64(&SecretCipher::generate_key()).expect("key");
    let tenant = tenants::ensure_tenant(&db, "acme").await.expect("tenant");
    for receiver in receivers {
        let new = webhooks::NewWebhook {
            url: WebhookUrl::parse(&receiver.url(), &config.target_policy()).expect("url"),
            events: vec![EventType::PoamOverdue],
            description: None,
            project_ids: vec![],
            secret: SigningSecret::generate(),
            active: true,
        };
        webhooks::create_webhook(&db, &cipher, tenant.id, new)
            .await
            .expect("webhook");
    }
    let queue = MemoryQueue::new();
    let shared: Arc<dyn Queue> = Arc::new(queue.clone());
    Steps {
        ingester: Ingester::new(
            db.clone(),
            shared.clone(),
            Arc::new(FairShare::new(config.fair_shares())),
            config.max_event_bytes,
        ),
        max_event_bytes: config.max_event_bytes,
        worker: Worker::new(&config, db.clone(), shared, cipher).expect("worker"),
        config,
        db,
        queue,
        tenant_id: tenant.id,
    }
}

impl Steps {
    /// The reasons of the envelopes parked on the invalid-events queue.
    fn parked_reasons(&self) -> Vec<String> {
        self.queue
            .invalid_events()
            .into_iter()
            .map(|parked| parked.reason)
            .collect()
    }

    /// An ingester that gives each tenant a share of one event (and one
    /// delivery): beyond the first, a tenant's events are a flood.
    fn ingester_with_a_share_of_one(&self) -> Ingester {
        use aegis_webhook_core::fairness::{Share, Shares};
        let one = std::num::NonZeroU32::new(1).expect("positive");
        let share = Share {
            per_second: one,
            burst: one,
        };
        Ingester::new(
            self.db.clone(),
            Arc::new(self.queue.clone()),
            Arc::new(FairShare::new(Some(Shares {
                events: share,
                deliveries: share,
            }))),
            self.max_event_bytes,
        )
    }

    /// Ingests one new `POAM_OVERDUE` event of the tenant, from the express lane.
    async fn ingest_one_event(&self) {
        let event = envelope(self.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data()).to_string();
        self.ingester
            .ingest(event.as_bytes(), Lane::Express)
            .await
            .expect("ingested");
    }

    /// Ingests one new event for the steps' one webhook: its one delivery's
    /// first task.
    async fn one_delivery(&self) -> DeliveryTask {
        self.ingest_one_event().await;
        let [task] = self.first_attempts().await[..] else {
            panic!("one delivery")
        };
        task
    }

    /// Sets `column` of the task's delivery to `value`, as time passing
    /// would (a retry falling due, a claim running out).
    async fn set_delivery(
        &self,
        task: DeliveryTask,
        column: aegis_webhook_storage::entities::delivery::Column,
        value: chrono::DateTime<chrono::Utc>,
    ) {
        use aegis_webhook_storage::entities::delivery;
        use sea_orm::sea_query::Expr;
        use sea_orm::{ColumnTrait as _, EntityTrait as _, QueryFilter as _};
        delivery::Entity::update_many()
            .col_expr(column, Expr::value(Some(value)))
            .filter(delivery::Column::Id.eq(task.delivery_id().as_uuid()))
            .exec(&self.db)
            .await
            .expect("set the delivery's column");
    }

    /// The first-attempt tasks of the event's deliveries, as the ingester
    /// published them (read back from the database, which says the same).
    async fn first_attempts(&self) -> Vec<DeliveryTask> {
        let pending = deliveries::pending_unclaimed(&self.db, None, chrono::Utc::now(), 100, None)
            .await
            .expect("scan");
        pending
            .iter()
            .map(|delivery| DeliveryTask::new(delivery.id, delivery.webhook_id, delivery.next_attempt))
            .collect()
    }
}

/// Beyond its tenant's share, an event taken from the express lane is moved
/// to the bulk lane, several to a message, each with the id it was given;
/// ingested from there, its deliveries are stored, and a message ingested
/// twice (handed back after a failure) adds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_share_events_are_deferred_with_their_ids_and_ingested_once_from_the_bulk_lane() {
    use aegis_webhook_core::queue::{DeferredEvents, Stream};

    let receiver = Receiver::start(&[], 200).await;
    let steps = steps(&[&receiver]).await;
    let ingester = steps.ingester_with_a_share_of_one();
    // Without ids: the ingester gives each one.
    let event = envelope(steps.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data()).to_string();
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        outcomes.push(
            ingester
                .ingest(event.as_bytes(), Lane::Express)
                .await
                .expect("ingested"),
        );
    }
    assert!(
        matches!(outcomes[0], IngestOutcome::FannedOut { deliveries: 1, .. }),
        "{outcomes:?}"
    );
    let deferred_ids: Vec<uuid::Uuid> = outcomes[1..]
        .iter()
        .map(|outcome| match outcome {
            IngestOutcome::Deferred { event_id } => *event_id,
            other => panic!("deferred, not {other:?}"),
        })
        .collect();
    assert_eq!(
        steps.first_attempts().await.len(),
        1,
        "deferred events are not stored yet"
    );

    // The bulk lane holds them, with their ids, in one message or two.
    let mut events = steps.queue.consume(Stream::Events).await.expect("consumer");
    let mut messages = Vec::new();
    let mut carried = Vec::new();
    while carried.len() < 2 {
        let message = events.next().await.expect("open").expect("message");
        assert_eq!(message.lane(), Lane::Bulk);
        let deferred = DeferredEvents::decode(&message.body).expect("deferred events");
        for envelope in deferred.envelopes() {
            let value: serde_json::Value = serde_json::from_str(envelope).expect("json");
            carried.push(
                value["id"]
                    .as_str()
                    .expect("an id")
                    .parse::<uuid::Uuid>()
                    .expect("uuid"),
            );
        }
        messages.push(message.body.clone());
    }
    assert_eq!(carried, deferred_ids);

    for body in &messages {
        let outcome = ingester.ingest(body, Lane::Bulk).await.expect("ingested");
        assert!(matches!(outcome, IngestOutcome::DeferredBatch { .. }), "{outcome:?}");
    }
    assert_eq!(steps.first_attempts().await.len(), 3);
    // Handed back and taken again: nothing new.
    for body in &messages {
        let outcome = ingester.ingest(body, Lane::Bulk).await.expect("ingested");
        assert!(
            matches!(outcome, IngestOutcome::DeferredBatch { deliveries: 0, .. }),
            "{outcome:?}"
        );
    }
    assert_eq!(steps.first_attempts().await.len(), 3, "a repeat adds nothing");
}

/// A message of the bulk lane carrying more envelopes than an ingester ever
/// puts in one (anyone with the broker's credentials can publish there) is
/// refused whole, with its reason, and parked: none of it is ingested.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_message_with_too_many_envelopes_is_refused_whole_and_parked() {
    use aegis_webhook_core::queue::DeferredEvents;

    let receiver = Receiver::start(&[], 200).await;
    let steps = steps(&[&receiver]).await;
    let ingester = steps.ingester_with_a_share_of_one();
    let valid = envelope(steps.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data()).to_string();
    let body = DeferredEvents::new(vec![valid; DeferredEvents::MAX_ENVELOPES + 1]).encode();
    let outcome = ingester.ingest(&body, Lane::Bulk).await.expect("handled");
    let expected = "a message of the bulk lane carries at most 256 envelopes; this one carries 257";
    assert!(
        matches!(&outcome, IngestOutcome::Invalid { reason } if reason == expected),
        "{outcome:?}"
    );
    assert_eq!(steps.parked_reasons(), [expected]);
    assert!(steps.first_attempts().await.is_empty(), "none of it ingested");
}

/// A message of the bulk lane whose envelopes meet an infrastructure
/// failure sends back only those, each as a message of its own: the others
/// are not taken again, so an invalid one is parked once, not once per
/// try. If every one fails, the message itself goes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_message_sends_back_only_the_envelopes_that_failed() {
    use aegis_webhook_core::queue::{DeferredEvents, Stream};
    use sea_orm::ConnectionTrait as _;

    let receiver = Receiver::start(&[], 200).await;
    let steps = steps(&[&receiver]).await;
    let days_overdue = |days: serde_json::Value| {
        let mut data = seed_poam_overdue_data();
        data["daysOverdue"] = days;
        let mut envelope = envelope(steps.tenant_id, "POAM_OVERDUE", data);
        envelope["id"] = uuid::Uuid::now_v7().to_string().into();
        envelope.to_string()
    };
    let (failing, valid, invalid) = (
        days_overdue(424_242.into()),
        days_overdue(5.into()),
        days_overdue("many".into()),
    );
    // The database refuses to store the one event, for now.
    steps
        .db
        .execute_unprepared(
            "CREATE TRIGGER refuse_one BEFORE INSERT ON events WHEN NEW.data LIKE '%424242%' \
             BEGIN SELECT RAISE(ABORT, 'refused for the test'); END",
        )
        .await
        .expect("trigger");
    let bulk_depth = || async {
        let depths = steps.queue.lane_depths().await.expect("depths");
        depths
            .into_iter()
            .find(|(stream, lane, _)| (*stream, *lane) == (Stream::Events, Lane::Bulk))
            .map_or(0, |(_, _, depth)| depth)
    };

    let alone = DeferredEvents::new(vec![failing.clone()]).encode();
    assert!(
        steps.ingester.ingest(&alone, Lane::Bulk).await.is_err(),
        "every envelope failed: the message goes back as it is"
    );
    assert_eq!(bulk_depth().await, 0, "and nothing is sent back on its own");

    let mixed = DeferredEvents::new(vec![failing.clone(), valid.clone(), invalid]).encode();
    let outcome = steps.ingester.ingest(&mixed, Lane::Bulk).await.expect("handled");
    // The valid one fails too if it was fanned out in the same write.
    let IngestOutcome::DeferredBatch {
        events: 3,
        deliveries,
        deferred_again,
    } = outcome
    else {
        panic!("{outcome:?}");
    };
    assert_eq!(deliveries + deferred_again, 2, "{outcome:?}");
    assert_eq!(steps.parked_reasons().len(), 1, "the invalid one is parked");
    assert_eq!(bulk_depth().await, deferred_again as u64, "one message each");

    let mut events = steps.queue.consume(Stream::Events).await.expect("consumer");
    let mut sent_back = Vec::new();
    for _ in 0..deferred_again {
        let message = events.next().await.expect("open").expect("message");
        assert_eq!(message.lane(), Lane::Bulk);
        let carried = DeferredEvents::decode(&message.body).expect("deferred events");
        assert_eq!(carried.envelopes().len(), 1);
        assert!([&failing, &valid].contains(&&carried.envelopes()[0]), "as it came");
        sent_back.push(message.body.clone());
    }
    let carried_failing = sent_back.iter().any(|body| {
        DeferredEvents::decode(body)
            .expect("deferred events")
            .envelopes()
            .contains(&failing)
    });
    assert!(carried_failing, "the failed envelope is sent back");

    steps
        .db
        .execute_unprepared("DROP TRIGGER refuse_one")
        .await
        .expect("drop trigger");
    for body in &sent_back {
        let outcome = steps.ingester.ingest(body, Lane::Bulk).await.expect("ingested");
        assert!(
            matches!(
                outcome,
                IngestOutcome::DeferredBatch {
                    events: 1,
                    deliveries: 1,
                    deferred_again: 0
                }
            ),
            "{outcome:?}"
        );
    }
    assert_eq!(steps.parked_reasons().len(), 1, "parked once, not once per try");
    assert_eq!(steps.first_attempts().await.len(), 2, "both valid events stored, once");
}

/// A flooding tenant's envelope is moved on its head alone (its tenant and
/// id), unvalidated: one that is not valid is refused where it is fanned
/// out, from the bulk lane, and parked with its reason, as it would have
/// been in the express lane; one that would have to be re-serialized to be
/// given an id is refused before that if it has a duplicate member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_envelope_moved_with_a_flood_is_refused_from_the_bulk_lane() {
    use aegis_webhook_core::queue::Stream;

    let receiver = Receiver::start(&[], 200).await;
    let steps = steps(&[&receiver]).await;
    let ingester = steps.ingester_with_a_share_of_one();
    let valid = envelope(steps.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data()).to_string();
    let first = ingester
        .ingest(valid.as_bytes(), Lane::Express)
        .await
        .expect("ingested");
    assert!(
        matches!(first, IngestOutcome::FannedOut { deliveries: 1, .. }),
        "{first:?}"
    );
    let mut data = seed_poam_overdue_data();
    data["daysOverdue"] = "many".into();
    let invalid = envelope(steps.tenant_id, "POAM_OVERDUE", data).to_string();
    let moved = ingester
        .ingest(invalid.as_bytes(), Lane::Express)
        .await
        .expect("handled");
    assert!(matches!(moved, IngestOutcome::Deferred { .. }), "{moved:?}");
    assert!(steps.parked_reasons().is_empty(), "not refused yet");
    // Without an id it would be given one, re-serialized: one with a
    // duplicate member is refused at once instead, never resolved to one.
    let twice = format!(
        r#"{{"event":"POAM_OVERDUE","event":"EVIDENCE_COMPLETED","tenantId":"{}","data":{}}}"#,
        steps.tenant_id,
        seed_poam_overdue_data()
    );
    let refused = ingester.ingest(twice.as_bytes(), Lane::Express).await.expect("handled");
    assert!(
        matches!(&refused, IngestOutcome::Invalid { reason } if reason.contains("duplicate key")),
        "{refused:?}"
    );

    let mut events = steps.queue.consume(Stream::Events).await.expect("consumer");
    let message = events.next().await.expect("open").expect("message");
    assert_eq!(message.lane(), Lane::Bulk);
    let outcome = ingester.ingest(&message.body, Lane::Bulk).await.expect("handled");
    assert!(
        matches!(
            outcome,
            IngestOutcome::DeferredBatch {
                events: 1,
                deliveries: 0,
                deferred_again: 0
            }
        ),
        "{outcome:?}"
    );
    let parked = steps.parked_reasons();
    assert_eq!(parked.len(), 2, "{parked:?}");
    assert!(parked[1].starts_with("data.daysOverdue:"), "{parked:?}");
    assert_eq!(steps.first_attempts().await.len(), 1, "only the valid event is stored");
}

/// An envelope over `AEGIS_MAX_EVENT_BYTES` is refused and parked with the
/// HTTP intake's reason, whichever door it came through; one of exactly
/// that size is ingested.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_over_the_size_limit_is_refused_as_at_the_intake() {
    let receiver = Receiver::start(&[], 200).await;
    let steps = steps(&[&receiver]).await;
    let padded_to = |size: usize| {
        let envelope = envelope(steps.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data()).to_string();
        // Whitespace is valid JSON: the envelope stays valid at any size.
        format!("{envelope}{}", " ".repeat(size - envelope.len()))
    };
    let limit = steps.max_event_bytes;
    let refused = steps
        .ingester
        .ingest(padded_to(limit + 1).as_bytes(), Lane::Express)
        .await
        .expect("handled");
    let expected = format!("the event is larger than {limit} bytes");
    assert!(
        matches!(&refused, IngestOutcome::Invalid { reason } if *reason == expected),
        "{refused:?}"
    );
    assert_eq!(steps.parked_reasons(), vec![expected]);
    let at_limit = steps
        .ingester
        .ingest(padded_to(limit).as_bytes(), Lane::Express)
        .await
        .expect("ingested");
    assert!(
        matches!(at_limit, IngestOutcome::FannedOut { deliveries: 1, .. }),
        "{at_limit:?}"
    );
}

/// A delivery whose task waits behind a backlog is not lost: the
/// reconciler's pass does nothing while tasks wait in the queue (it would
/// publish the whole backlog again), and once the queue is empty it
/// re-publishes what is still pending past its grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reconciler_waits_while_tasks_wait_and_then_finds_the_lost() {
    use aegis_webhook_core::queue::Stream;
    use aegis_webhook_worker::reconciler::Reconciler;

    let receiver = Receiver::start(&[], 200).await;
    let steps = steps(&[&receiver]).await;
    steps.ingest_one_event().await;
    let reconciler = Reconciler::new(steps.db.clone(), Arc::new(steps.queue.clone()));
    let stop = tokio_util::sync::CancellationToken::new();

    // Its task waits in the express lane: the pass waits too.
    assert_eq!(reconciler.pass(Duration::ZERO, &stop).await.expect("pass"), None);
    // The task is lost (taken and never handled): the next pass finds it.
    let mut tasks = steps.queue.consume(Stream::Tasks).await.expect("consumer");
    let lost = tasks.next().await.expect("open").expect("message");
    lost.ack().await.expect("ack");
    assert_eq!(reconciler.pass(Duration::ZERO, &stop).await.expect("pass"), Some(1));
    let found = tasks.next().await.expect("open").expect("message");
    let task = DeliveryTask::decode(&found.body).expect("a task");
    assert_eq!(vec![task], steps.first_attempts().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_ingest_step_fans_out_refuses_and_deduplicates() {
    let (first, second) = (Receiver::start(&[], 200).await, Receiver::start(&[], 200).await);
    let steps = steps(&[&first, &second]).await;
    let mut event = envelope(steps.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data());
    event["id"] = serde_json::json!(uuid::Uuid::now_v7());
    let bytes = event.to_string();

    let outcome = steps
        .ingester
        .ingest(bytes.as_bytes(), Lane::Express)
        .await
        .expect("ingested");
    let IngestOutcome::FannedOut { deliveries, .. } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(deliveries, 2, "one delivery per subscribed webhook");
    assert_eq!(steps.first_attempts().await.len(), 2);

    let again = steps
        .ingester
        .ingest(bytes.as_bytes(), Lane::Express)
        .await
        .expect("ingested");
    assert!(matches!(again, IngestOutcome::Duplicate { .. }), "{again:?}");
    assert_eq!(steps.first_attempts().await.len(), 2, "a repeat adds nothing");

    let unknown = envelope(TenantId::generate(), "POAM_OVERDUE", seed_poam_overdue_data()).to_string();
    let refused = steps
        .ingester
        .ingest(unknown.as_bytes(), Lane::Express)
        .await
        .expect("handled");
    assert!(
        matches!(&refused, IngestOutcome::Invalid { reason } if reason.starts_with("tenantId: no tenant")),
        "{refused:?}"
    );
    let garbage = steps
        .ingester
        .ingest(b"{not json", Lane::Express)
        .await
        .expect("handled");
    assert!(
        matches!(&garbage, IngestOutcome::Invalid { reason } if reason.starts_with("malformed JSON")),
        "{garbage:?}"
    );
    let parked = steps.parked_reasons();
    assert_eq!(parked.len(), 2, "both refusals parked with their reasons: {parked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_worker_step_per_task_delivers_retries_defers_and_skips() {
    // The first attempt fails with a 503, the second succeeds.
    let receiver = Receiver::start(&[503], 200).await;
    let steps = steps(&[&receiver]).await;
    let task = steps.one_delivery().await;

    // Attempt 1: the 503 schedules attempt 2 for 30 s (+ jitter) later.
    let outcome = steps.worker.process_one(task).await.expect("processed");
    let Outcome::RetryScheduled { next_attempt, delay } = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(next_attempt, 2);
    assert!(
        delay >= Duration::from_secs(30) && delay <= Duration::from_secs(33),
        "{delay:?}"
    );
    assert_eq!(receiver.received().len(), 1);

    // The same task again is stale: nothing is sent.
    let stale = steps.worker.process_one(task).await.expect("processed");
    assert!(matches!(stale, Outcome::Skipped { .. }), "{stale:?}");

    // Attempt 2 before it is due goes back for the rest of its delay.
    let retry = DeliveryTask::new(task.delivery_id(), task.webhook_id().expect("v2"), 2);
    let early = steps.worker.process_one(retry).await.expect("processed");
    let Outcome::Deferred { remaining } = early else {
        panic!("{early:?}")
    };
    assert!(remaining > Duration::from_secs(25), "{remaining:?}");
    assert_eq!(receiver.received().len(), 1, "nothing sent early");

    // Holding a task back never brings its attempt forward: not for the
    // attempt due (in about 30 s), nor for a stale attempt; only later.
    let due_at = || async {
        deliveries::delivery_by_id(&steps.db, task.delivery_id())
            .await
            .expect("read")
            .expect("stored")
            .next_attempt_at
            .expect("due")
    };
    let scheduled = due_at().await;
    let now = chrono::Utc::now();
    for (attempt, until) in [
        (2, now + chrono::Duration::seconds(5)),
        (3, now + chrono::Duration::hours(1)),
    ] {
        deliveries::postpone(&steps.db, task.delivery_id(), attempt, until, now)
            .await
            .expect("postpone");
        assert_eq!(due_at().await, scheduled, "attempt {attempt} until {until}");
    }
    let later = scheduled + chrono::Duration::seconds(60);
    deliveries::postpone(&steps.db, task.delivery_id(), 2, later, now)
        .await
        .expect("postpone");
    assert_eq!(due_at().await, later);

    // Once due (moved forward in the database), attempt 2 is delivered.
    steps
        .set_delivery(
            task,
            aegis_webhook_storage::entities::delivery::Column::NextAttemptAt,
            chrono::Utc::now(),
        )
        .await;
    let delivered = steps.worker.process_one(retry).await.expect("processed");
    assert_eq!(delivered, Outcome::Delivered);
    let received = receiver.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[1].header("x-aegis-attempt"), "2");
    let delivery = deliveries::delivery_by_id(&steps.db, task.delivery_id())
        .await
        .expect("read")
        .expect("stored");
    assert_eq!((delivery.status, delivery.attempts), (DeliveryStatus::Succeeded, 2));

    // A task for a webhook disabled meanwhile sends nothing.
    let paused = steps.one_delivery().await;
    let webhook = paused.webhook_id().expect("v2");
    webhooks::disable_webhook(&steps.db, webhook, "paused for the test", chrono::Utc::now())
        .await
        .expect("disable");
    let skipped = steps.worker.process_one(paused).await.expect("processed");
    assert_eq!(
        skipped,
        Outcome::Skipped {
            reason: "webhook is disabled".to_owned()
        }
    );
    assert_eq!(receiver.received().len(), 2);
}

/// A worker whose claim ran out while its request was in flight, the attempt
/// taken over by another worker meanwhile: its answer, a 410 (which would
/// disable the webhook and dead-letter the delivery), recorded first, is
/// logged and changes nothing else; the other worker's success, recorded
/// after it, ends the delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_claim_was_taken_over_only_logs_its_attempt() {
    use aegis_webhook_storage::deliveries::{Attempt, NextStep, Recorded};
    use aegis_webhook_storage::entities::webhook;
    use sea_orm::EntityTrait as _;
    let receiver = Receiver::start(&[], 410).await;
    let steps = steps(&[&receiver]).await;
    let task = steps.one_delivery().await;
    receiver.hold_answers();
    // Another worker claims the attempt once this one's claim has run out,
    // while this one's request is in flight; it records after this one.
    let an_hour_on = chrono::Utc::now() + chrono::Duration::hours(1);
    let take_over = async {
        receiver.wait_for(1, Duration::from_secs(10)).await;
        let lease = deliveries::claim(&steps.db, task.delivery_id(), 1, Duration::from_secs(60), an_hour_on)
            .await
            .expect("claim")
            .expect("the first claim ran out");
        receiver.release_answers();
        lease
    };
    let (late, lease) = tokio::join!(steps.worker.process_one(task), take_over);
    let Outcome::Skipped { reason } = late.expect("processed") else {
        panic!("the late attempt is not applied")
    };
    assert!(reason.contains("took the attempt over"), "{reason}");
    let delivered = Recorded {
        attempt: Attempt {
            delivery_id: task.delivery_id(),
            attempt: 1,
            started_at: an_hour_on,
            duration: Duration::from_millis(5),
            status_code: Some(200),
            error: None,
            response_body: None,
        },
        lease,
        next: NextStep::Succeeded,
    };
    assert!(
        deliveries::record_attempt(&steps.db, &delivered).await.expect("record"),
        "the live claim's record moves the delivery"
    );

    let delivery = deliveries::delivery_by_id(&steps.db, task.delivery_id())
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(
        (delivery.status, delivery.attempts, delivery.last_status_code),
        (DeliveryStatus::Succeeded, 1, Some(200))
    );
    let logged = deliveries::attempts_of(&steps.db, task.delivery_id())
        .await
        .expect("attempts");
    assert_eq!(logged.len(), 2, "the late attempt is logged: {logged:?}");
    let hook = webhook::Entity::find_by_id(task.webhook_id().expect("v2").as_uuid())
        .one(&steps.db)
        .await
        .expect("read")
        .expect("stored");
    assert!(
        hook.active && hook.consecutive_failures == 0,
        "the late 410 neither disabled the webhook nor counted: {hook:?}"
    );
    assert!(steps.queue.dead_letters().is_empty(), "no dead letter");
}

/// A worker that sent an attempt and then failed to record it (a database
/// error) keeps its claim until the lease ends: the task it hands back, or
/// any other for that attempt, goes back for the rest of the lease rather
/// than be dropped (the reconciler, the only other way back, waits while
/// tasks wait, as during a flood), and the attempt is made again after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_whose_record_failed_is_made_again_once_its_claim_ends() {
    use sea_orm::ConnectionTrait as _;
    let receiver = Receiver::start(&[], 200).await;
    let steps = steps(&[&receiver]).await;
    let task = steps.one_delivery().await;
    steps
        .db
        .execute_unprepared(
            "CREATE TRIGGER refuse_attempts BEFORE INSERT ON delivery_attempts BEGIN SELECT RAISE(ABORT, 'refused for the test'); END",
        )
        .await
        .expect("trigger");
    steps.worker.process_one(task).await.expect_err("the record failed");
    assert_eq!(receiver.received().len(), 1, "the request went out");
    steps
        .db
        .execute_unprepared("DROP TRIGGER refuse_attempts")
        .await
        .expect("drop trigger");

    // Handed back while the failed worker's claim holds: back after it.
    let lease = steps.config.request_timeout + steps.config.claim_margin;
    let held = steps.worker.process_one(task).await.expect("processed");
    let Outcome::Deferred { remaining } = held else {
        panic!("{held:?}")
    };
    assert!(
        remaining > lease - Duration::from_secs(5) && remaining <= lease + Duration::from_secs(1),
        "{remaining:?} for a lease of {lease:?}"
    );

    // Once the claim has ended (moved back in the database), the attempt is
    // made again.
    let ended = chrono::Utc::now() - chrono::Duration::seconds(1);
    steps
        .set_delivery(
            task,
            aegis_webhook_storage::entities::delivery::Column::LockedUntil,
            ended,
        )
        .await;
    let again = steps.worker.process_one(task).await.expect("processed");
    assert_eq!(again, Outcome::Delivered);
    assert_eq!(receiver.received().len(), 2, "sent twice: at least once");
}

/// A delivery whose event lost its payload to the body retention (a
/// redeliver racing the expiry pass) ends with the reason: nothing is sent,
/// least of all an empty body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_whose_payload_was_expunged_ends_without_a_request() {
    use sea_orm::ConnectionTrait as _;
    let receiver = Receiver::start(&[], 200).await;
    let steps = steps(&[&receiver]).await;
    let task = steps.one_delivery().await;
    // What the expiry pass does to a final delivery's event, done here to a
    // pending one's: the race it guards against.
    steps
        .db
        .execute_unprepared("UPDATE events SET data = '', body_expunged_at = CURRENT_TIMESTAMP")
        .await
        .expect("empty the payload");
    let outcome = steps.worker.process_one(task).await.expect("processed");
    let Outcome::Skipped { reason } = outcome else {
        panic!("{outcome:?}")
    };
    assert!(reason.contains("expunged"), "{reason}");
    assert!(receiver.received().is_empty(), "nothing is sent");
    let delivery = deliveries::delivery_by_id(&steps.db, task.delivery_id())
        .await
        .expect("read")
        .expect("stored");
    assert_ne!(
        delivery.status,
        DeliveryStatus::Pending,
        "the delivery is ended: {delivery:?}"
    );
}

/// A worker started with another `AEGIS_SECRET_KEY` than the one that
/// sealed a webhook's secret is misconfigured, the webhook is not: the
/// attempt is not made and the delivery is not ended (an infrastructure
/// failure: the task goes back), so a worker with the key delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_without_the_key_that_sealed_a_secret_leaves_the_delivery_pending() {
    let receiver = Receiver::start(&[], 200).await;
    let steps = steps(&[&receiver]).await;
    let task = steps.one_delivery().await;
    let another_key = SecretCipher::from_base64(&SecretCipher::generate_key()).expect("key");
    let misconfigured = Worker::new(
        &steps.config,
        steps.db.clone(),
        Arc::new(steps.queue.clone()),
        another_key,
    )
    .expect("worker");
    let error = misconfigured
        .process_one(task)
        .await
        .expect_err("an infrastructure failure, not an outcome");
    assert!(format!("{error:#}").contains("AEGIS_SECRET_KEY"), "{error:#}");
    assert!(receiver.received().is_empty(), "nothing sent");
    let delivery = deliveries::delivery_by_id(&steps.db, task.delivery_id())
        .await
        .expect("read")
        .expect("stored");
    assert_eq!(
        (delivery.status, delivery.attempts),
        (DeliveryStatus::Pending, 0),
        "not ended: {delivery:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_row_that_cannot_be_read_fails_only_its_own_delivery() {
    let (healthy, broken) = (Receiver::start(&[], 200).await, Receiver::start(&[], 200).await);
    let steps = steps(&[&healthy, &broken]).await;
    steps.ingest_one_event().await;
    // Corrupt the second webhook's stored URL, as a bad manual edit would.
    let backend = sea_orm::ConnectionTrait::get_database_backend(&steps.db);
    sea_orm::ConnectionTrait::execute_raw(
        &steps.db,
        sea_orm::Statement::from_sql_and_values(
            backend,
            match backend {
                sea_orm::DbBackend::Postgres => "UPDATE webhooks SET url = 'not a url' WHERE url = $1",
                _ => "UPDATE webhooks SET url = 'not a url' WHERE url = ?",
            },
            [broken.url().into()],
        ),
    )
    .await
    .expect("corrupt the row");

    // Both claimed in one batch: the readable one is still delivered.
    let tasks = steps.first_attempts().await;
    assert_eq!(tasks.len(), 2);
    let outcomes = futures::future::join_all(tasks.iter().map(|task| steps.worker.process_one(*task))).await;
    let outcomes: Vec<Outcome> = outcomes
        .into_iter()
        .map(|outcome| outcome.expect("processed"))
        .collect();
    assert!(outcomes.contains(&Outcome::Delivered), "{outcomes:?}");
    let refused = outcomes
        .iter()
        .find_map(|outcome| match outcome {
            Outcome::Skipped { reason } => Some(reason.clone()),
            _ => None,
        })
        .expect("the unreadable one is refused");
    assert!(
        refused.starts_with("the webhook's stored configuration cannot be read"),
        "{refused}"
    );
    assert_eq!((healthy.received().len(), broken.received().len()), (1, 0));
    // It ends FAILED with the reason, where the customer's log shows it.
    let failed = deliveries::pending_unclaimed(&steps.db, None, chrono::Utc::now(), 10, None)
        .await
        .expect("scan");
    assert!(failed.is_empty(), "nothing left to retry forever: {failed:?}");
}
