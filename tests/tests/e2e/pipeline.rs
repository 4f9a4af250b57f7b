//! The whole pipeline: the seed's mutation, an event in, a signed POST out,
//! retries, failure, restarts and fan-out rules.

use std::time::{Duration, Instant};

use aegis_webhook_storage::deliveries::{self, DeliveryStatus};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::on_both_backends;
use crate::support::{
    Backend, Receiver, SEED_MUTATION, TestApp, envelope, eventually, seed_poam_overdue_data, seed_vulnerability_data,
};

on_both_backends!(
    the_seed_mutation_creates_a_webhook_that_receives_signed_events,
    a_receiver_that_fails_twice_gets_three_attempts_and_the_delivery_succeeds,
    a_receiver_that_always_fails_ends_failed_after_the_whole_schedule,
    stopping_dev_loses_no_pending_delivery,
    a_repeated_event_id_is_fanned_out_once,
    critical_vulnerabilities_reach_each_subscriber_once_under_the_right_name,
);

/// The delivery rows of the only webhook of `app`, once they reach `status`.
async fn deliveries_once(
    app: &TestApp,
    webhook_id: aegis_webhook_core::ids::WebhookId,
    count: usize,
    status: DeliveryStatus,
) -> Vec<deliveries::Delivery> {
    eventually(Duration::from_secs(10), "deliveries to settle", || async {
        let rows = deliveries::deliveries_of_webhook(app.db(), webhook_id)
            .await
            .expect("query");
        (rows.len() == count && rows.iter().all(|row| row.status == status)).then_some(rows)
    })
    .await
}

fn webhook_id(created: &Value) -> aegis_webhook_core::ids::WebhookId {
    created["id"].as_str().expect("id").parse().expect("uuid id")
}

async fn the_seed_mutation_creates_a_webhook_that_receives_signed_events(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let receiver = Receiver::start(&[], 200).await;

    // The seed's mutation and variables, verbatim but for the URL.
    let variables = json!({
        "input": {
            "url": receiver.url(),
            "events": ["VULNERABILITY_DETECTED", "POAM_OVERDUE"],
            "secret": "your-webhook-secret"
        }
    });
    let answer = app.graphql(SEED_MUTATION, variables).await;
    assert!(answer.get("errors").is_none(), "{answer}");
    let created = &answer["data"]["createWebhook"];
    let mut keys: Vec<&str> = created
        .as_object()
        .expect("object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(keys, ["active", "events", "id", "secret", "url"]);
    assert_eq!(created["url"], receiver.url());
    assert_eq!(created["events"], json!(["VULNERABILITY_DETECTED", "POAM_OVERDUE"]));
    assert_eq!(created["secret"], "your-webhook-secret");
    assert_eq!(created["active"], true);

    let sent_at = Instant::now();
    let (status, reply) = app
        .post_event(&envelope(
            app.setup.tenant_id,
            "VULNERABILITY_DETECTED",
            seed_vulnerability_data(),
        ))
        .await;
    assert_eq!(status, 202, "{reply}");
    assert!(
        reply["id"].as_str().is_some_and(|id| Uuid::parse_str(id).is_ok()),
        "{reply}"
    );
    let received = receiver.wait_for(1, Duration::from_secs(5)).await;
    let latency = received[0].at - sent_at;
    assert!(latency < Duration::from_secs(1), "event to receipt took {latency:?}");

    let request = &received[0];
    assert_eq!(
        std::str::from_utf8(&request.body).expect("UTF-8"),
        r#"{"event":"VULNERABILITY_DETECTED","timestamp":"2025-12-16T15:30:00Z","data":{"vulnerabilityId":"456e7890-e89b-12d3-a456-426614174003","cveId":"CVE-2024-47076","severity":"CRITICAL","cvssScore":9.8,"component":{"name":"curl","version":"7.68.0"},"projectId":"123e4567-e89b-12d3-a456-426614174000"}}"#
    );
    assert_eq!(request.header("content-type"), "application/json");
    assert!(request.header("user-agent").starts_with("Aegis-Webhooks/"));
    assert_eq!(request.header("x-aegis-event"), "VULNERABILITY_DETECTED");
    assert_eq!(request.header("x-aegis-attempt"), "1");
    let delivery_id: Uuid = request
        .header("x-aegis-delivery")
        .parse()
        .expect("delivery id is a uuid");
    crate::signature::assert_signed(request, "your-webhook-secret");

    // A second seed event type arrives in its seed shape too.
    let (status, _) = app
        .post_event(&envelope(app.setup.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data()))
        .await;
    assert_eq!(status, 202);
    let received = receiver.wait_for(2, Duration::from_secs(5)).await;
    let body: Value = serde_json::from_slice(&received[1].body).expect("JSON");
    assert_eq!(
        body,
        json!({ "event": "POAM_OVERDUE", "timestamp": "2025-12-16T15:30:00Z", "data": seed_poam_overdue_data() })
    );
    assert_ne!(received[1].header("x-aegis-delivery"), delivery_id.to_string());

    let rows = deliveries_once(&app, webhook_id(created), 2, DeliveryStatus::Succeeded).await;
    assert!(
        rows.iter()
            .all(|row| row.attempts == 1 && row.last_status_code == Some(200))
    );
}

async fn a_receiver_that_fails_twice_gets_three_attempts_and_the_delivery_succeeds(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let receiver = Receiver::start(&[500, 500], 200).await;
    let created = app.create_webhook(&receiver.url(), &["EVIDENCE_COMPLETED"], None).await;
    let secret = created["secret"].as_str().expect("generated secret");
    assert!(secret.starts_with("whsec_"), "{secret}");

    let data = json!({
        "evidenceId": "345e6789-e89b-12d3-a456-426614174002", "fileName": "sbom.spdx.json",
        "vulnerabilitiesFound": 27, "criticalCount": 2, "highCount": 5
    });
    let (status, _) = app
        .post_event(&envelope(app.setup.tenant_id, "EVIDENCE_COMPLETED", data))
        .await;
    assert_eq!(status, 202);

    let received = receiver.wait_for(3, Duration::from_secs(10)).await;
    let delivery_id = received[0].header("x-aegis-delivery");
    for (index, request) in received.iter().enumerate() {
        assert_eq!(
            request.header("x-aegis-delivery"),
            delivery_id,
            "the same delivery id on every attempt"
        );
        assert_eq!(request.header("x-aegis-attempt"), (index + 1).to_string());
        assert_eq!(request.body, received[0].body, "the same bytes on every attempt");
        crate::signature::assert_signed(request, secret);
    }

    let rows = deliveries_once(&app, webhook_id(&created), 1, DeliveryStatus::Succeeded).await;
    assert_eq!(rows[0].attempts, 3);
    let attempts = deliveries::attempts_of(app.db(), rows[0].id).await.expect("attempts");
    let codes: Vec<Option<u16>> = attempts.iter().map(|attempt| attempt.status_code).collect();
    assert_eq!(codes, [Some(500), Some(500), Some(200)]);
    assert_eq!(attempts[0].response_body.as_deref(), Some("received"));
    assert!(received.len() == 3, "no attempt after success");
}

async fn a_receiver_that_always_fails_ends_failed_after_the_whole_schedule(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let receiver = Receiver::start(&[], 503).await;
    let created = app.create_webhook(&receiver.url(), &["POAM_OVERDUE"], None).await;
    let (status, _) = app
        .post_event(&envelope(app.setup.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data()))
        .await;
    assert_eq!(status, 202);

    let rows = deliveries_once(&app, webhook_id(&created), 1, DeliveryStatus::Failed).await;
    let max_attempts = app.config.retry_schedule.max_attempts();
    assert_eq!(rows[0].attempts, max_attempts);
    assert_eq!(rows[0].failure_reason.as_deref(), Some("all 3 attempts failed"));
    let attempts = deliveries::attempts_of(app.db(), rows[0].id).await.expect("attempts");
    assert_eq!(attempts.len(), max_attempts as usize);
    assert!(attempts.iter().all(|attempt| attempt.status_code == Some(503)));
    assert_eq!(receiver.received().len(), max_attempts as usize);

    // Dead-lettered with its reason: published right after the row's commit,
    // so it may follow the FAILED row by a moment.
    let queue = app
        .system
        .as_ref()
        .expect("running")
        .memory_queue
        .as_ref()
        .expect("in-process");
    let dead = eventually(Duration::from_secs(5), "the dead letter", || async {
        let dead = queue.dead_letters();
        (!dead.is_empty()).then_some(dead)
    })
    .await;
    assert_eq!(dead.len(), 1);
    assert!(
        std::str::from_utf8(&dead[0].body)
            .expect("UTF-8")
            .contains(&rows[0].id.to_string())
    );
    assert_eq!(dead[0].reason, "all 3 attempts failed");
}

async fn stopping_dev_loses_no_pending_delivery(backend: Backend) {
    let Some(mut app) = TestApp::spawn_with(backend, |config| {
        config.retry_schedule = "0s,1s".parse().expect("schedule");
    })
    .await
    else {
        return;
    };
    let receiver = Receiver::start(&[503], 200).await;
    let created = app.create_webhook(&receiver.url(), &["POAM_OVERDUE"], None).await;
    let (status, _) = app
        .post_event(&envelope(app.setup.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data()))
        .await;
    assert_eq!(status, 202);
    let first = receiver.wait_for(1, Duration::from_secs(5)).await;
    // Let the failed attempt be recorded, then stop while the retry is pending.
    deliveries_once(&app, webhook_id(&created), 1, DeliveryStatus::Pending).await;
    eventually(Duration::from_secs(5), "the first attempt to be recorded", || async {
        let rows = deliveries::deliveries_of_webhook(app.db(), webhook_id(&created))
            .await
            .expect("query");
        (rows[0].attempts == 1).then_some(())
    })
    .await;
    let due = deliveries::deliveries_of_webhook(app.db(), webhook_id(&created))
        .await
        .expect("query")[0]
        .next_attempt_at
        .expect("a retry is scheduled");
    app.stop().await;
    let config = app.config.clone();
    // Nothing may send the retry while stopped: wait until it was due (and a
    // little past it, for a leaked task to have sent it), then check.
    let past_due = (due - chrono::Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(300);
    tokio::time::sleep(past_due).await;
    assert_eq!(receiver.received().len(), 1, "nothing is sent while stopped");

    let app = TestApp::start(config).await;
    let received = receiver.wait_for(2, Duration::from_secs(10)).await;
    assert_eq!(
        received[1].header("x-aegis-delivery"),
        first[0].header("x-aegis-delivery")
    );
    assert_eq!(received[1].header("x-aegis-attempt"), "2");
    deliveries_once(&app, webhook_id(&created), 1, DeliveryStatus::Succeeded).await;
}

async fn a_repeated_event_id_is_fanned_out_once(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let receiver = Receiver::start(&[], 200).await;
    let created = app.create_webhook(&receiver.url(), &["POAM_OVERDUE"], None).await;
    let mut repeated = envelope(app.setup.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data());
    repeated["id"] = json!(Uuid::new_v4());
    for _ in 0..3 {
        let (status, reply) = app.post_event(&repeated).await;
        assert_eq!(status, 202);
        assert_eq!(reply["id"], repeated["id"], "the event keeps its id");
    }
    // A distinct event afterwards: once it is delivered, the repeats were handled.
    let (status, _) = app
        .post_event(&envelope(app.setup.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data()))
        .await;
    assert_eq!(status, 202);
    deliveries_once(&app, webhook_id(&created), 2, DeliveryStatus::Succeeded).await;
    assert_eq!(app.count("events").await, 2);
    assert_eq!(receiver.received().len(), 2);
}

async fn critical_vulnerabilities_reach_each_subscriber_once_under_the_right_name(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let general = Receiver::start(&[], 200).await;
    let critical = Receiver::start(&[], 200).await;
    let both = Receiver::start(&[], 200).await;
    app.create_webhook(&general.url(), &["VULNERABILITY_DETECTED"], None)
        .await;
    app.create_webhook(&critical.url(), &["CRITICAL_VULNERABILITY_DETECTED"], None)
        .await;
    app.create_webhook(
        &both.url(),
        &["VULNERABILITY_DETECTED", "CRITICAL_VULNERABILITY_DETECTED"],
        None,
    )
    .await;

    let (status, _) = app
        .post_event(&envelope(
            app.setup.tenant_id,
            "VULNERABILITY_DETECTED",
            seed_vulnerability_data(),
        ))
        .await;
    assert_eq!(status, 202);
    let mut high = seed_vulnerability_data();
    high["severity"] = json!("HIGH");
    let (status, _) = app
        .post_event(&envelope(app.setup.tenant_id, "VULNERABILITY_DETECTED", high))
        .await;
    assert_eq!(status, 202);

    let names = |received: Vec<crate::support::Received>| -> Vec<String> {
        let mut names: Vec<String> = received.iter().map(|r| r.header("x-aegis-event").to_owned()).collect();
        names.sort();
        names
    };
    assert_eq!(
        names(general.wait_for(2, Duration::from_secs(5)).await),
        ["VULNERABILITY_DETECTED", "VULNERABILITY_DETECTED"]
    );
    let critical_received = critical.wait_for(1, Duration::from_secs(5)).await;
    let body: Value = serde_json::from_slice(&critical_received[0].body).expect("JSON");
    assert_eq!(body["event"], "CRITICAL_VULNERABILITY_DETECTED");
    assert_eq!(
        names(both.wait_for(2, Duration::from_secs(5)).await),
        ["CRITICAL_VULNERABILITY_DETECTED", "VULNERABILITY_DETECTED"]
    );
    // Every delivery is settled, so nothing more is on its way.
    eventually(Duration::from_secs(5), "all deliveries to succeed", || async {
        (app.count("deliveries WHERE status = 'SUCCEEDED'").await == 5).then_some(())
    })
    .await;
    assert_eq!(critical.received().len(), 1, "the HIGH one is not critical");
    assert_eq!(
        both.received().len(),
        2,
        "one delivery per event even when subscribed to both"
    );
}

/// A receiver's `Retry-After` (seconds or an HTTP-date) stretches the schedule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured_in_seconds_and_as_a_date() {
    let Some(app) = TestApp::spawn(Backend::Sqlite).await else {
        return;
    };
    let in_seconds = Receiver::start(&[503], 200).await;
    in_seconds.set_header("retry-after", "2");
    let as_date = Receiver::start(&[429], 200).await;
    let date = (chrono::Utc::now() + chrono::Duration::seconds(3))
        .to_rfc2822()
        .replace("+0000", "GMT");
    as_date.set_header("retry-after", &date);
    app.create_webhook(&in_seconds.url(), &["POAM_OVERDUE"], None).await;
    app.create_webhook(&as_date.url(), &["POAM_OVERDUE"], None).await;
    let (status, _) = app
        .post_event(&envelope(app.setup.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data()))
        .await;
    assert_eq!(status, 202);

    // The test schedule retries after 100 ms; the receivers asked for 2 s and ~3 s.
    let seconds = in_seconds.wait_for(2, Duration::from_secs(10)).await;
    let waited = seconds[1].at - seconds[0].at;
    assert!(
        waited >= Duration::from_secs(2),
        "Retry-After: 2 waited only {waited:?}"
    );
    let dated = as_date.wait_for(2, Duration::from_secs(10)).await;
    let waited = dated[1].at - dated[0].at;
    assert!(
        waited >= Duration::from_secs(2),
        "an HTTP-date Retry-After waited only {waited:?}"
    );
}
