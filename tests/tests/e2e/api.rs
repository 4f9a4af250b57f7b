//! The GraphQL operations around a webhook's life: the delivery log, updates,
//! pausing, test events, redelivery, replaying dead letters and deletion, each
//! kept within the caller's tenant.

use std::time::Duration;

use aegis_webhook_storage::tenants;
use serde_json::{Value, json};

use crate::on_both_backends;
use crate::support::{Backend, Receiver, TestApp, envelope, eventually, seed_poam_overdue_data};

on_both_backends!(the_delivery_log_shows_attempts_and_redelivery_and_replay_send_again);

const DELIVERIES: &str = r#"query($filter: DeliveryFilter) {
  deliveries(filter: $filter, first: 10) {
    edges { node { id event status attemptCount failureReason attempts { attempt statusCode responseBody durationMs } } }
    pageInfo { hasNextPage }
  }
}"#;

async fn deliveries(app: &TestApp, filter: Value) -> Vec<Value> {
    app.delivery_nodes(DELIVERIES, filter).await
}

/// Waits until the webhook's newest delivery has `status` with `attempts` attempts.
async fn settled(app: &TestApp, webhook_id: &Value, status: &str, attempts: u64) -> Value {
    eventually(Duration::from_secs(10), "the delivery to settle", || async {
        let log = deliveries(app, json!({ "webhookId": webhook_id })).await;
        log.into_iter()
            .next()
            .filter(|delivery| delivery["status"] == status && delivery["attemptCount"] == attempts)
    })
    .await
}

async fn the_delivery_log_shows_attempts_and_redelivery_and_replay_send_again(backend: Backend) {
    let Some(app) = TestApp::spawn_with(backend, |config| {
        config.retry_schedule = "0s,100ms".parse().expect("schedule");
    })
    .await
    else {
        return;
    };
    let receiver = Receiver::start(&[500, 500], 200).await;
    let created = app.create_webhook(&receiver.url(), &["POAM_OVERDUE"], None).await;
    let webhook_id = &created["id"];
    let (status, _) = app
        .post_event(&envelope(app.setup.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data()))
        .await;
    assert_eq!(status, 202);

    // Two attempts, both 500: the (test) schedule is spent.
    let failed = settled(&app, webhook_id, "FAILED", 2).await;
    assert_eq!(failed["event"], "POAM_OVERDUE");
    assert_eq!(failed["failureReason"], "all 2 attempts failed");
    let codes: Vec<&Value> = failed["attempts"]
        .as_array()
        .expect("attempts")
        .iter()
        .map(|a| &a["statusCode"])
        .collect();
    assert_eq!(codes, [&json!(500), &json!(500)]);
    assert_eq!(failed["attempts"][0]["responseBody"], "received");
    let failed_only = deliveries(&app, json!({ "status": "FAILED", "event": "POAM_OVERDUE" })).await;
    assert_eq!(failed_only.len(), 1);
    assert!(deliveries(&app, json!({ "status": "SUCCEEDED" })).await.is_empty());

    // Replaying the dead letters sends it once more, with the same delivery id.
    let answer = app
        .graphql(
            "mutation($id: ID!, $since: DateTime!) { replayDeadLetters(webhookId: $id, since: $since) }",
            json!({ "id": webhook_id, "since": "2020-01-01T00:00:00Z" }),
        )
        .await;
    assert_eq!(answer["data"]["replayDeadLetters"], 1, "{answer}");
    let succeeded = settled(&app, webhook_id, "SUCCEEDED", 3).await;
    let received = receiver.wait_for(3, Duration::from_secs(5)).await;
    assert_eq!(
        received[2].header("x-aegis-delivery"),
        failed["id"].as_str().expect("id")
    );
    assert_eq!(received[2].header("x-aegis-attempt"), "3");

    // Redelivering a succeeded delivery sends it again too.
    let answer = app
        .graphql(
            "mutation($id: ID!) { redeliver(deliveryId: $id) { id status } }",
            json!({ "id": succeeded["id"] }),
        )
        .await;
    assert_eq!(answer["data"]["redeliver"]["id"], succeeded["id"], "{answer}");
    settled(&app, webhook_id, "SUCCEEDED", 4).await;
    assert_eq!(
        receiver.wait_for(4, Duration::from_secs(5)).await[3].header("x-aegis-attempt"),
        "4"
    );

    // A test event arrives in its documented shape.
    let answer = app
        .graphql(
            "mutation($id: ID!) { testWebhook(id: $id) { id event } }",
            json!({ "id": webhook_id }),
        )
        .await;
    assert_eq!(answer["data"]["testWebhook"]["event"], "WEBHOOK_TEST", "{answer}");
    let received = receiver.wait_for(5, Duration::from_secs(5)).await;
    let body: Value = serde_json::from_slice(&received[4].body).expect("JSON");
    assert_eq!(body["event"], "WEBHOOK_TEST");
    assert_eq!(body["data"]["webhookId"], *webhook_id);
    assert_eq!(received[4].header("x-aegis-event"), "WEBHOOK_TEST");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_can_be_updated_paused_resumed_and_deleted() {
    let app = TestApp::spawn(Backend::Sqlite).await.expect("SQLite is always there");
    let first = Receiver::start(&[], 200).await;
    let second = Receiver::start(&[], 200).await;
    let created = app.create_webhook(&first.url(), &["EVIDENCE_COMPLETED"], None).await;
    let id = &created["id"];

    let update = "mutation($id: ID!, $input: WebhookUpdateInput!) { updateWebhook(id: $id, input: $input) { url events description active } }";
    let answer = app
        .graphql(update, json!({ "id": id, "input": { "url": second.url(), "events": ["POAM_OVERDUE"], "description": "SOC pager" } }))
        .await;
    assert_eq!(
        answer["data"]["updateWebhook"],
        json!({ "url": second.url(), "events": ["POAM_OVERDUE"], "description": "SOC pager", "active": true })
    );
    let answer = app
        .graphql(update, json!({ "id": id, "input": { "url": "ftp://nope" } }))
        .await;
    assert_eq!(answer["errors"][0]["extensions"]["code"], "BAD_USER_INPUT", "{answer}");
    let answer = app
        .graphql(update, json!({ "id": id, "input": { "events": [] } }))
        .await;
    assert_eq!(answer["errors"][0]["extensions"]["field"], "events", "{answer}");

    // Paused: events are not delivered to it. Resumed: they are again.
    let pause = "mutation($id: ID!, $active: Boolean!) { setWebhookActive(id: $id, active: $active) { active disabledReason } }";
    let answer = app.graphql(pause, json!({ "id": id, "active": false })).await;
    assert_eq!(answer["data"]["setWebhookActive"]["active"], false, "{answer}");
    let event = envelope(app.setup.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data());
    assert_eq!(app.post_event(&event).await.0, 202);
    // The intake is asynchronous: resume only once that event was fanned out
    // (stored, with its deliveries in the same transaction: none).
    eventually(
        Duration::from_secs(5),
        "the paused-time event to be ingested",
        || async { (app.count("events").await == 1).then_some(()) },
    )
    .await;
    let answer = app.graphql(pause, json!({ "id": id, "active": true })).await;
    assert_eq!(
        answer["data"]["setWebhookActive"],
        json!({ "active": true, "disabledReason": null })
    );
    assert_eq!(app.post_event(&event).await.0, 202);
    second.wait_for(1, Duration::from_secs(5)).await;
    // Nothing is sent but under a stored delivery's claim, and the paused-time
    // event was stored with none: one delivery in all is the resumed one.
    assert_eq!(app.count("deliveries").await, 1, "nothing was delivered while paused");
    assert_eq!(second.received().len(), 1);
    assert!(first.received().is_empty(), "the old URL gets nothing");

    let answer = app
        .graphql("mutation($id: ID!) { deleteWebhook(id: $id) }", json!({ "id": id }))
        .await;
    assert_eq!(answer["data"]["deleteWebhook"], *id, "{answer}");
    let answer = app
        .graphql("query($id: ID!) { webhook(id: $id) { id } }", json!({ "id": id }))
        .await;
    assert_eq!(answer["errors"][0]["extensions"]["code"], "NOT_FOUND");
    assert_eq!(app.count("deliveries").await, 0, "its delivery log went with it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_ids_are_not_found_and_nothing_changes() {
    let app = TestApp::spawn(Backend::Sqlite).await.expect("SQLite is always there");
    let receiver = Receiver::start(&[], 200).await;
    let created = app.create_webhook(&receiver.url(), &["POAM_OVERDUE"], None).await;
    let id = created["id"].clone();
    assert_eq!(
        app.post_event(&envelope(app.setup.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data()))
            .await
            .0,
        202
    );
    receiver.wait_for(1, Duration::from_secs(5)).await;
    let delivery_id = eventually(Duration::from_secs(5), "the delivery to succeed", || async {
        let log = deliveries(&app, json!({})).await;
        log.first()
            .filter(|d| d["status"] == "SUCCEEDED")
            .map(|d| d["id"].clone())
    })
    .await;

    let other = tenants::ensure_tenant(app.db(), "intruder").await.expect("tenant");
    let key = tenants::generate_api_key();
    tenants::add_api_key(app.db(), other.id, &key).await.expect("key");
    let operations = [
        ("query($id: ID!) { webhook(id: $id) { id } }", json!({ "id": id })),
        (
            "query($id: ID!) { delivery(id: $id) { id } }",
            json!({ "id": delivery_id }),
        ),
        (
            "mutation($id: ID!) { updateWebhook(id: $id, input: { url: \"https://example.com/x\" }) { id } }",
            json!({ "id": id }),
        ),
        (
            "mutation($id: ID!) { setWebhookActive(id: $id, active: false) { id } }",
            json!({ "id": id }),
        ),
        (
            "mutation($id: ID!) { testWebhook(id: $id) { id } }",
            json!({ "id": id }),
        ),
        (
            "mutation($id: ID!) { redeliver(deliveryId: $id) { id } }",
            json!({ "id": delivery_id }),
        ),
        (
            "mutation($id: ID!) { replayDeadLetters(webhookId: $id, since: \"2020-01-01T00:00:00Z\") }",
            json!({ "id": id }),
        ),
        ("mutation($id: ID!) { deleteWebhook(id: $id) }", json!({ "id": id })),
    ];
    for (operation, variables) in operations {
        let (_, answer) = app.graphql_as(Some(&key), operation, variables).await;
        assert_eq!(
            answer["errors"][0]["extensions"]["code"], "NOT_FOUND",
            "{operation}: {answer}"
        );
    }
    let (_, answer) = app.graphql_as(Some(&key), DELIVERIES, json!({ "filter": null })).await;
    assert_eq!(answer["data"]["deliveries"]["edges"], json!([]));

    // The owner's webhook is untouched and received nothing more.
    let answer = app
        .graphql(
            "query($id: ID!) { webhook(id: $id) { url active } }",
            json!({ "id": id }),
        )
        .await;
    assert_eq!(
        answer["data"]["webhook"],
        json!({ "url": receiver.url(), "active": true })
    );
    // Every refused call left no delivery behind (testWebhook), and the one
    // delivery was not reopened (redeliver, replayDeadLetters): it is still
    // done after its one attempt, so nothing more can be sent.
    assert_eq!(app.count("deliveries").await, 1);
    let answer = app
        .graphql(
            "query($id: ID!) { delivery(id: $id) { status attemptCount } }",
            json!({ "id": delivery_id }),
        )
        .await;
    assert_eq!(
        answer["data"]["delivery"],
        json!({ "status": "SUCCEEDED", "attemptCount": 1 }),
        "{answer}"
    );
    assert_eq!(receiver.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_secret_signs_beside_the_new_one_during_its_grace_period() {
    let app = TestApp::spawn(Backend::Sqlite).await.expect("SQLite is always there");
    let receiver = Receiver::start(&[], 200).await;
    let created = app
        .create_webhook(&receiver.url(), &["POAM_OVERDUE"], Some("the-old-secret-value"))
        .await;
    let answer = app
        .graphql(
            "mutation($id: ID!) { rotateWebhookSecret(id: $id, secret: \"the-new-secret-value\") { secret } }",
            json!({ "id": created["id"] }),
        )
        .await;
    assert_eq!(
        answer["data"]["rotateWebhookSecret"]["secret"], "the-new-secret-value",
        "{answer}"
    );
    let answer = app
        .graphql(
            "mutation($id: ID!) { rotateWebhookSecret(id: $id, secret: \"short\") { secret } }",
            json!({ "id": created["id"] }),
        )
        .await;
    assert_eq!(answer["errors"][0]["extensions"]["field"], "secret", "{answer}");

    assert_eq!(
        app.post_event(&envelope(app.setup.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data()))
            .await
            .0,
        202
    );
    let request = &receiver.wait_for(1, Duration::from_secs(5)).await[0];
    // X-Aegis-Signature (and the first Standard Webhooks signature) use the new secret.
    crate::signature::assert_signed(request, "the-new-secret-value");
    let old = aegis_webhook_core::secret::SigningSecret::parse("the-old-secret-value").expect("secret");
    let timestamp: i64 = request.header("webhook-timestamp").parse().expect("seconds");
    let old_signature = aegis_webhook_core::signing::standard_webhooks_signature(
        &old,
        request.header("webhook-id"),
        timestamp,
        &request.body,
    );
    let signatures: Vec<&str> = request.header("webhook-signature").split(' ').collect();
    assert_eq!(signatures.len(), 2, "{signatures:?}");
    assert_eq!(
        signatures[1], old_signature,
        "the old secret still signs during the grace period"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_and_event_types_describe_what_happens() {
    let app = TestApp::spawn(Backend::Sqlite).await.expect("SQLite is always there");
    let receiver = Receiver::start(&[], 200).await;
    let created = app.create_webhook(&receiver.url(), &["POAM_OVERDUE"], None).await;
    let event = envelope(app.setup.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data());
    assert_eq!(app.post_event(&event).await.0, 202);
    assert_eq!(app.post_event(&event).await.0, 202);
    let stats = eventually(Duration::from_secs(5), "two successes", || async {
        let answer = app
            .graphql(
                "query($id: ID!) { webhook(id: $id) { stats { succeeded failed pending lastSuccessAt consecutiveFailures } } }",
                json!({ "id": created["id"] }),
            )
            .await;
        let stats = answer["data"]["webhook"]["stats"].clone();
        (stats["succeeded"] == 2).then_some(stats)
    })
    .await;
    assert_eq!(stats["failed"], 0);
    assert_eq!(stats["pending"], 0);
    assert_eq!(stats["consecutiveFailures"], 0);
    assert!(stats["lastSuccessAt"].is_string(), "{stats}");

    let answer = app
        .graphql("{ eventTypes { name description example } }", json!({}))
        .await;
    let types = answer["data"]["eventTypes"].as_array().expect("list");
    assert_eq!(types.len(), 6);
    let overdue = types
        .iter()
        .find(|t| t["name"] == "POAM_OVERDUE")
        .expect("POAM_OVERDUE");
    assert_eq!(
        overdue["example"]["data"],
        seed_poam_overdue_data(),
        "the seed's own example"
    );
    assert_eq!(overdue["example"]["event"], "POAM_OVERDUE");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_deep_and_complex_requests_are_refused_with_a_code() {
    let scratch = crate::support::scratch_dir();
    let url = crate::support::fresh_database(Backend::Sqlite, &scratch)
        .await
        .expect("SQLite");
    let mut config = crate::support::test_config(url, scratch);
    config.graphql_introspection = false;
    let app = TestApp::start_production(config).await;

    // Nested too deep (through introspection's recursive types).
    let mut deep = "name".to_owned();
    for _ in 0..14 {
        deep = format!("ofType {{ {deep} }}");
    }
    let answer = app
        .graphql(
            &format!("{{ __type(name: \"Webhook\") {{ fields {{ type {{ {deep} }} }} }} }}"),
            json!({}),
        )
        .await;
    assert_eq!(answer["errors"][0]["extensions"]["code"], "BAD_USER_INPUT", "{answer}");
    assert!(
        answer["errors"][0]["message"]
            .as_str()
            .expect("message")
            .contains("deep"),
        "{answer}"
    );

    // Too wide: many aliases of a cheap field, refused before validation.
    let wide: String = (0..2100).map(|i| format!(" a{i}: tenant {{ id }}")).collect();
    let answer = app.graphql(&format!("{{{wide} }}"), json!({})).await;
    assert_eq!(answer["errors"][0]["extensions"]["code"], "BAD_USER_INPUT", "{answer}");
    assert!(
        answer["errors"][0]["message"]
            .as_str()
            .expect("message")
            .contains("more than 2000 fields"),
        "{answer}"
    );

    // Too costly: a few fields, but each a page of 100 with a database field
    // per item. The page size counts.
    let costs_too_much = |answer: &Value| {
        answer["errors"][0]["extensions"]["code"] == "BAD_USER_INPUT"
            && answer["errors"][0]["message"]
                .as_str()
                .is_some_and(|message| message.contains("costs more than 20000"))
    };
    let pages: String = (0..30)
        .map(|i| format!(" a{i}: webhooks(first: 100) {{ nodes {{ stats {{ succeeded }} }} }}"))
        .collect();
    let answer = app.graphql(&format!("{{{pages} }}"), json!({})).await;
    assert!(costs_too_much(&answer), "{answer}");
    // Fewer, smaller pages are fine.
    let pages: String = (0..10)
        .map(|i| format!(" a{i}: webhooks(first: 2) {{ nodes {{ stats {{ succeeded }} }} }}"))
        .collect();
    let answer = app.graphql(&format!("{{{pages} }}"), json!({})).await;
    assert!(answer["errors"].is_null(), "{answer}");
    // Response bodies (up to 64 KiB each) count by their size: a page of 100
    // deliveries with every attempt's body is too much, a page of 10 is not.
    let bodies = |first: usize| {
        format!("{{ deliveries(first: {first}) {{ nodes {{ attempts {{ attempt responseBody }} }} }} }}")
    };
    let answer = app.graphql(&bodies(100), json!({})).await;
    assert!(costs_too_much(&answer), "{answer}");
    let answer = app.graphql(&bodies(10), json!({})).await;
    assert!(answer["errors"].is_null(), "{answer}");
    // Root fields run side by side, each with a statement of its own: twenty
    // at most, however cheap each one looks.
    let roots = |n: usize| (0..n).map(|i| format!(" a{i}: tenant {{ id }}")).collect::<String>();
    let answer = app.graphql(&format!("{{{} }}", roots(21)), json!({})).await;
    assert!(costs_too_much(&answer), "{answer}");
    let answer = app.graphql(&format!("{{{} }}", roots(19)), json!({})).await;
    assert!(answer["errors"].is_null(), "{answer}");

    // Introspection is off in this configuration: the schema is not revealed.
    let answer = app.graphql("{ __schema { types { name } } }", json!({})).await;
    assert_eq!(answer["data"]["__schema"], Value::Null, "{answer}");
    let answer = app.graphql("{ tenant { name } }", json!({})).await;
    assert_eq!(
        answer["data"]["tenant"]["name"], "default",
        "ordinary queries still work"
    );

    // A body over the limit is refused before it is parsed.
    let huge = format!("{{ tenant {{ id }} }}{}", " ".repeat(300 * 1024));
    let response = app
        .http
        .post(app.url("/graphql"))
        .bearer_auth(&app.setup.api_key)
        .json(&json!({ "query": huge }))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status().as_u16(), 413);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_page_with_cursors_and_deliveries_filter_by_time() {
    let app = TestApp::spawn(Backend::Sqlite).await.expect("SQLite is always there");
    let receiver = Receiver::start(&[], 200).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(app.create_webhook(&receiver.url(), &["POAM_OVERDUE"], None).await["id"].clone());
    }
    let page = "query($after: String) { webhooks(first: 2, after: $after) { edges { cursor node { id } } pageInfo { hasNextPage endCursor } } }";
    let first = app.graphql(page, json!({ "after": null })).await["data"]["webhooks"].clone();
    let first_ids: Vec<&Value> = first["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .map(|e| &e["node"]["id"])
        .collect();
    assert_eq!(first_ids, [&ids[0], &ids[1]], "creation order");
    assert_eq!(first["pageInfo"]["hasNextPage"], true);
    let second = app
        .graphql(page, json!({ "after": first["pageInfo"]["endCursor"] }))
        .await["data"]["webhooks"]
        .clone();
    let second_ids: Vec<&Value> = second["edges"]
        .as_array()
        .expect("edges")
        .iter()
        .map(|e| &e["node"]["id"])
        .collect();
    assert_eq!(second_ids, [&ids[2]]);
    assert_eq!(second["pageInfo"]["hasNextPage"], false);
    let answer = app.graphql(page, json!({ "after": "not-a-cursor" })).await;
    assert_eq!(answer["errors"][0]["extensions"]["field"], "after", "{answer}");

    // One event fans out to the three webhooks: three deliveries.
    let before = chrono::Utc::now();
    assert_eq!(
        app.post_event(&envelope(app.setup.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data()))
            .await
            .0,
        202
    );
    receiver.wait_for(3, Duration::from_secs(5)).await;
    let after = chrono::Utc::now();
    let window = |since: chrono::DateTime<chrono::Utc>, until: chrono::DateTime<chrono::Utc>| json!({ "since": since.to_rfc3339(), "until": until.to_rfc3339() });
    assert_eq!(deliveries(&app, window(before, after)).await.len(), 3);
    let hour = chrono::Duration::hours(1);
    assert!(deliveries(&app, window(before - hour, before)).await.is_empty());
    assert!(deliveries(&app, window(after, after + hour)).await.is_empty());

    let log = "query($after: String) { deliveries(first: 2, after: $after) { edges { node { id } } pageInfo { hasNextPage endCursor } } }";
    let first = app.graphql(log, json!({ "after": null })).await["data"]["deliveries"].clone();
    assert_eq!(first["edges"].as_array().expect("edges").len(), 2);
    assert_eq!(first["pageInfo"]["hasNextPage"], true);
    let second = app
        .graphql(log, json!({ "after": first["pageInfo"]["endCursor"] }))
        .await["data"]["deliveries"]
        .clone();
    assert_eq!(second["edges"].as_array().expect("edges").len(), 1);
    assert_eq!(second["pageInfo"]["hasNextPage"], false);
}

/// GraphiQL comes from the server itself: the page names only same-origin
/// assets, each is served (pinned by its path), and the page's
/// Content-Security-Policy lets it load scripts and connect nowhere else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphiql_loads_nothing_from_outside_the_deployment() {
    let app = TestApp::spawn(Backend::Sqlite).await.expect("SQLite");
    let page = app.http.get(app.url("/graphql")).send().await.expect("page");
    assert_eq!(page.status(), 200);
    let policy = page.headers()["content-security-policy"]
        .to_str()
        .expect("ASCII")
        .to_owned();
    for directive in [
        "default-src 'self'",
        "script-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(policy.contains(directive), "{policy}");
    }
    let html = page.text().await.expect("HTML");
    assert!(
        !html.contains("http://") && !html.contains("https://") && !html.contains("//cdn"),
        "{html}"
    );
    let assets: Vec<&str> = html
        .split(['"', '\''])
        .filter(|part| part.starts_with("/assets/"))
        .collect();
    assert_eq!(assets.len(), 5, "{html}");
    for asset in assets {
        let response = app.http.get(app.url(asset)).send().await.expect("asset");
        assert_eq!(response.status(), 200, "{asset}");
        let content_type = response.headers()["content-type"].to_str().expect("ASCII").to_owned();
        assert!(
            content_type == "text/javascript" || content_type == "text/css",
            "{asset}: {content_type}"
        );
        assert!(!response.bytes().await.expect("body").is_empty(), "{asset}");
    }
}

/// The same in a real browser: GraphiQL renders, and every request the page
/// makes goes to the server itself, with no Content-Security-Policy refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphiql_renders_in_chromium_and_every_request_stays_on_the_server() {
    if !aegis_webhook_tests::browser::available() {
        return;
    }
    let app = TestApp::spawn(Backend::Sqlite).await.expect("SQLite");
    let origin = app.url("");
    let url = app.url("/graphql");
    let screenshot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("screenshots/graphiql.png");
    let visit = tokio::task::spawn_blocking(move || {
        aegis_webhook_tests::browser::visit(&url, ".graphiql-container", &screenshot)
    })
    .await
    .expect("the browser run");
    assert!(visit.requests.len() >= 6, "the page and its five assets: {visit:?}");
    for request in &visit.requests {
        assert!(request.url.starts_with(&origin), "a request left the server: {visit:?}");
        assert!(!request.failed, "{visit:?}");
    }
    assert!(
        !visit
            .console_errors
            .iter()
            .any(|error| error.contains("Content Security Policy") || error.contains("Refused to")),
        "{visit:?}"
    );
}
