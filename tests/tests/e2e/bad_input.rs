//! Bad input is refused with a clear error and leaves nothing behind.

use std::time::Duration;

use aegis_webhook_storage::tenants;
use serde_json::{Value, json};

use crate::support::{
    Backend, Receiver, SEED_MUTATION, TestApp, envelope, seed_poam_overdue_data, seed_vulnerability_data,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_events_at_the_intake_are_refused_clearly_and_store_nothing() {
    let app = TestApp::spawn(Backend::Sqlite).await.expect("SQLite is always there");
    let receiver = Receiver::start(&[], 200).await;
    app.create_webhook(&receiver.url(), &["VULNERABILITY_DETECTED"], None)
        .await;
    let tenant = app.setup.tenant_id;
    let valid = envelope(tenant, "VULNERABILITY_DETECTED", seed_vulnerability_data());
    let token = app.setup.ingest_token.clone();

    let with = |change: &dyn Fn(&mut Value)| {
        let mut event = valid.clone();
        change(&mut event);
        event.to_string()
    };
    let poam_with = |change: &dyn Fn(&mut Value)| {
        let mut event = envelope(tenant, "POAM_OVERDUE", seed_poam_overdue_data());
        change(&mut event);
        event.to_string()
    };
    let evidence_with = |change: &dyn Fn(&mut Value)| {
        let mut event = envelope(
            tenant,
            "EVIDENCE_COMPLETED",
            json!({
                "evidenceId": "345e6789-e89b-12d3-a456-426614174002",
                "fileName": "sbom.spdx.json",
                "vulnerabilitiesFound": 27, "criticalCount": 2, "highCount": 5
            }),
        );
        change(&mut event);
        event.to_string()
    };
    // serde_json writes keys in order, so `"data":{` opens the data object once.
    let valid_text = valid.to_string();
    assert!(valid_text.contains(r#""data":{"component":"#), "{valid_text}");
    let oversized = format!("{{\"pad\":\"{}\"}}", "x".repeat(300 * 1024));
    let cases: Vec<(&str, Option<&str>, String, u16, &str)> = vec![
        (
            "malformed JSON",
            Some(&token),
            "{\"event\": ".to_owned(),
            400,
            "malformed JSON",
        ),
        (
            "not an object",
            Some(&token),
            "[]".to_owned(),
            422,
            "must be a JSON object",
        ),
        (
            "unknown event",
            Some(&token),
            with(&|e| e["event"] = json!("VULN_FOUND")),
            422,
            "event: unknown event type `VULN_FOUND`",
        ),
        (
            "missing field",
            Some(&token),
            with(&|e| {
                e["data"].as_object_mut().expect("data").remove("cveId");
            }),
            422,
            "data: missing field `cveId`",
        ),
        (
            "mistyped field",
            Some(&token),
            with(&|e| e["data"]["cvssScore"] = json!("high")),
            422,
            "data.cvssScore: invalid type",
        ),
        (
            "out of range",
            Some(&token),
            with(&|e| e["data"]["cvssScore"] = json!(10.5)),
            422,
            "data.cvssScore: 10.5 is out of range",
        ),
        // The strict intake: every limit is named in the refusal.
        (
            "duplicate key",
            Some(&token),
            valid_text.replacen(r#""data":{"#, r#""data":{"cveId":"CVE-2024-0001","#, 1),
            422,
            "data.cveId: duplicate key",
        ),
        (
            "duplicate envelope key",
            Some(&token),
            valid_text.replacen('{', r#"{"tenantId":"00000000-0000-0000-0000-000000000000","#, 1),
            422,
            "tenantId: duplicate key",
        ),
        (
            "long component name",
            Some(&token),
            with(&|e| e["data"]["component"]["name"] = json!("n".repeat(257))),
            422,
            "data.component.name: must be at most 256 characters (got 257)",
        ),
        (
            "long component version",
            Some(&token),
            with(&|e| e["data"]["component"]["version"] = json!("1".repeat(10_000))),
            422,
            "data.component.version: must be at most 256 characters (got 10000)",
        ),
        (
            "control character in a name",
            Some(&token),
            with(&|e| e["data"]["component"]["name"] = json!("curl\u{1b}[31m")),
            422,
            "data.component.name: must not contain control characters (U+001B at character 5)",
        ),
        (
            "250,000-character file name",
            Some(&token),
            evidence_with(&|e| e["data"]["fileName"] = json!("f".repeat(250_000))),
            422,
            "data.fileName: must be at most 1024 characters (got 250000)",
        ),
        (
            "200,000-digit CVE id",
            Some(&token),
            with(&|e| e["data"]["cveId"] = json!(format!("CVE-2024-{}", "1".repeat(200_000)))),
            422,
            "data.cveId: the sequence number of a CVE id must have 4 to 19 digits (got 200000)",
        ),
        (
            "CVE id from the future",
            Some(&token),
            poam_with(&|e| e["data"]["cveId"] = json!("CVE-2999-1234")),
            422,
            "data.cveId: the year of a CVE id must be 1999 to",
        ),
        (
            "CVE id not a CVE id",
            Some(&token),
            with(&|e| e["data"]["cveId"] = json!("GHSA-xxxx-yyyy-zzzz")),
            422,
            "data.cveId: `GHSA-xxxx-yyyy-zzzz` is not a CVE id (expected CVE-YYYY-NNNN)",
        ),
        (
            "year 1 timestamp",
            Some(&token),
            with(&|e| e["timestamp"] = json!("0001-01-01T00:00:00Z")),
            422,
            "timestamp: must be in the years 2000 to 2100 (got year 1)",
        ),
        (
            "year +12026 completion date",
            Some(&token),
            poam_with(&|e| e["data"]["scheduledCompletionDate"] = json!("+12026-01-15")),
            422,
            "data.scheduledCompletionDate: must be in the years 2000 to 2100 (got year 12026)",
        ),
        (
            "more critical than found",
            Some(&token),
            evidence_with(&|e| e["data"]["criticalCount"] = json!(30)),
            422,
            "data: criticalCount + highCount (30 + 5) exceeds vulnerabilitiesFound (27)",
        ),
        (
            "unknown tenant",
            Some(&token),
            with(&|e| e["tenantId"] = json!(uuid::Uuid::new_v4())),
            422,
            "tenantId: no tenant",
        ),
        (
            "wrong token",
            Some("not-the-token"),
            valid.to_string(),
            401,
            "ingest token",
        ),
        ("missing token", None, valid.to_string(), 401, "ingest token"),
        ("oversized", Some(&token), oversized.clone(), 413, "larger than"),
    ];
    for (name, token, body, expected_status, expected_message) in cases {
        let (status, reply) = app.post_event_as(token, body).await;
        assert_eq!(status.as_u16(), expected_status, "{name}: {reply}");
        let message = reply["error"]["message"]
            .as_str()
            .unwrap_or_else(|| panic!("{name}: no message in {reply}"));
        assert!(
            message.contains(expected_message),
            "{name}: `{message}` should contain `{expected_message}`"
        );
        assert!(
            message.len() < 1024,
            "{name}: the refusal does not echo the value: {message}"
        );
    }

    // Only JSON is taken, and the checks come in order: token, media type, size.
    /// Name, token, `Content-Type`, body, status, error code.
    type MediaCase<'a> = (&'a str, Option<&'a str>, Option<&'a str>, String, u16, &'a str);
    let media_cases: Vec<MediaCase> = vec![
        (
            "no Content-Type",
            Some(&token),
            None,
            valid_text.clone(),
            415,
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        (
            "text/plain",
            Some(&token),
            Some("text/plain"),
            valid_text.clone(),
            415,
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        (
            "a form",
            Some(&token),
            Some("application/x-www-form-urlencoded"),
            valid_text.clone(),
            415,
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        (
            "JSON-like",
            Some(&token),
            Some("application/jsonp"),
            valid_text.clone(),
            415,
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        (
            "the token before the media type",
            None,
            Some("text/plain"),
            valid_text.clone(),
            401,
            "UNAUTHENTICATED",
        ),
        (
            "the media type before the size",
            Some(&token),
            Some("text/plain"),
            oversized.clone(),
            415,
            "UNSUPPORTED_MEDIA_TYPE",
        ),
        (
            "the size before the parse",
            Some(&token),
            Some("application/json"),
            oversized,
            413,
            "PAYLOAD_TOO_LARGE",
        ),
    ];
    for (name, token, content_type, body, expected_status, expected_code) in media_cases {
        let (status, reply) = app.post_event_typed(token, content_type, body).await;
        assert_eq!(status.as_u16(), expected_status, "{name}: {reply}");
        assert_eq!(reply["error"]["code"], expected_code, "{name}: {reply}");
        if expected_status == 415 {
            let message = reply["error"]["message"].as_str().expect("a message");
            assert!(message.contains("application/json"), "{name}: {message}");
        }
    }

    // Nothing was stored or sent; a valid event afterwards still goes through.
    assert_eq!(app.count("events").await, 0);
    assert_eq!(app.count("deliveries").await, 0);
    // Parameters and case do not matter to the media type.
    let (status, reply) = app
        .post_event_typed(Some(&token), Some("Application/JSON; charset=UTF-8"), valid_text)
        .await;
    assert_eq!(status, 202, "{reply}");
    receiver.wait_for(1, Duration::from_secs(5)).await;
    // One delivery stored in all: nothing else can be sent.
    assert_eq!(app.count("deliveries").await, 1);
    assert_eq!(receiver.received().len(), 1);
    assert_eq!(app.count("events").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_webhook_input_and_bad_keys_are_refused_clearly_and_store_nothing() {
    let app = TestApp::spawn(Backend::Sqlite).await.expect("SQLite is always there");
    let input = |url: &str, events: Value, secret: Value| json!({ "input": { "url": url, "events": events, "secret": secret } });
    let good_events = json!(["VULNERABILITY_DETECTED"]);
    let cases = vec![
        (
            "non-URL",
            input("not a url", good_events.clone(), Value::Null),
            "url",
            "not an absolute URL",
        ),
        (
            "relative URL",
            input("/hooks", good_events.clone(), Value::Null),
            "url",
            "not an absolute URL",
        ),
        (
            "file URL",
            input("file:///etc/passwd", good_events.clone(), Value::Null),
            "url",
            "scheme `file`",
        ),
        (
            "plain http",
            input("http://example.com/hook", good_events.clone(), Value::Null),
            "url",
            "must use https",
        ),
        (
            "metadata address",
            input("https://169.254.169.254/", good_events.clone(), Value::Null),
            "url",
            "private",
        ),
        (
            "empty event list",
            input("https://example.com/hook", json!([]), Value::Null),
            "events",
            "at least one",
        ),
        (
            "test event",
            input("https://example.com/hook", json!(["WEBHOOK_TEST"]), Value::Null),
            "events",
            "cannot be subscribed",
        ),
        (
            "short secret",
            input("https://example.com/hook", good_events.clone(), json!("short")),
            "secret",
            "at least 16",
        ),
    ];
    for (name, variables, field, expected) in cases {
        let answer = app.graphql(SEED_MUTATION, variables).await;
        let error = &answer["errors"][0];
        assert_eq!(error["extensions"]["code"], "BAD_USER_INPUT", "{name}: {answer}");
        assert_eq!(error["extensions"]["field"], field, "{name}: {answer}");
        let message = error["message"].as_str().expect("message");
        assert!(
            message.contains(expected),
            "{name}: `{message}` should contain `{expected}`"
        );
        assert!(answer["data"].is_null(), "{name}: {answer}");
    }

    // An unknown event name is refused by the schema itself, naming the value.
    let answer = app
        .graphql(
            SEED_MUTATION,
            input("https://example.com/hook", json!(["VULN_FOUND"]), Value::Null),
        )
        .await;
    let message = answer["errors"][0]["message"].as_str().expect("an error");
    assert!(message.contains("VULN_FOUND"), "{message}");

    // Missing and wrong keys.
    let valid = input("https://example.com/hook", good_events.clone(), Value::Null);
    for key in [None, Some("aegis_wrong"), Some("")] {
        let (status, answer) = app.graphql_as(key, SEED_MUTATION, valid.clone()).await;
        assert_eq!(status, 401, "{key:?}: {answer}");
        assert_eq!(answer["errors"][0]["extensions"]["code"], "UNAUTHENTICATED", "{key:?}");
    }
    assert_eq!(app.count("webhooks").await, 0);

    // The same input with the right key works.
    let answer = app.graphql(SEED_MUTATION, valid).await;
    assert!(answer["errors"].is_null(), "{answer}");
    assert_eq!(app.count("webhooks").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_api_key_sees_only_its_own_tenant() {
    let app = TestApp::spawn(Backend::Sqlite).await.expect("SQLite is always there");
    let created = app
        .create_webhook("https://example.com/hook", &["POAM_OVERDUE"], None)
        .await;

    let other = tenants::ensure_tenant(app.db(), "other").await.expect("tenant");
    let other_key = tenants::generate_api_key();
    tenants::add_api_key(app.db(), other.id, &other_key).await.expect("key");

    let (_, answer) = app
        .graphql_as(
            Some(&other_key),
            "query($id: ID!) { webhook(id: $id) { id url } }",
            json!({ "id": created["id"] }),
        )
        .await;
    assert_eq!(answer["errors"][0]["extensions"]["code"], "NOT_FOUND", "{answer}");
    let (_, answer) = app
        .graphql_as(
            Some(&other_key),
            "{ tenant { name } webhooks { edges { node { id } } } }",
            json!({}),
        )
        .await;
    assert_eq!(answer["data"]["tenant"]["name"], "other");
    assert_eq!(answer["data"]["webhooks"]["edges"], json!([]));

    let answer = app
        .graphql(
            "query($id: ID!) { webhook(id: $id) { id url } }",
            json!({ "id": created["id"] }),
        )
        .await;
    assert_eq!(answer["data"]["webhook"]["url"], "https://example.com/hook");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_is_refused_on_its_next_request() {
    let app = TestApp::spawn(Backend::Sqlite).await.expect("SQLite is always there");
    let tenant = tenants::create_tenant(app.db(), "acme").await.expect("tenant");
    assert!(
        tenants::create_tenant(app.db(), "acme").await.is_err(),
        "names are unique"
    );
    let (key_id, key) = tenants::create_api_key(app.db(), tenant.id, aegis_webhook_core::access::Scopes::FULL)
        .await
        .expect("key");
    let query = "{ tenant { name } }";

    let (status, answer) = app.graphql_as(Some(&key), query, json!({})).await;
    assert_eq!(
        (status.as_u16(), &answer["data"]["tenant"]["name"]),
        (200, &json!("acme"))
    );
    let listed = tenants::list_api_keys(app.db(), tenant.id).await.expect("list");
    assert_eq!(listed.len(), 1);
    assert!(key.starts_with(&listed[0].prefix) && listed[0].revoked_at.is_none());

    tenants::revoke_api_key(app.db(), key_id).await.expect("revoke");
    let (status, answer) = app.graphql_as(Some(&key), query, json!({})).await;
    assert_eq!(status, 401, "{answer}");
    assert_eq!(answer["errors"][0]["extensions"]["code"], "UNAUTHENTICATED");
    assert!(
        tenants::revoke_api_key(app.db(), key_id).await.is_err(),
        "revoking twice is refused"
    );
}

/// At least forty hostile or malformed URLs, refused over HTTP with a message
/// naming the problem; legitimate public https URLs accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_and_malformed_webhook_urls_are_refused() {
    // The production policy: nothing private allowed (dev allows loopback).
    let scratch = crate::support::scratch_dir();
    let url = crate::support::fresh_database(Backend::Sqlite, &scratch)
        .await
        .expect("SQLite");
    let app = TestApp::start_production(crate::support::test_config(url, scratch)).await;
    let refused = [
        ("", "not an absolute URL"),
        ("not a url", "not an absolute URL"),
        ("/relative/path", "not an absolute URL"),
        ("example.com/hook", "not an absolute URL"),
        ("file:///etc/passwd", "scheme `file`"),
        ("gopher://example.com:70/_x", "scheme `gopher`"),
        ("ftp://example.com/", "scheme `ftp`"),
        ("javascript:alert(1)", "scheme `javascript`"),
        ("data:text/plain,hi", "scheme `data`"),
        ("ws://example.com/", "scheme `ws`"),
        ("http://example.com/hook", "must use https"),
        ("https://user:pass@example.com/", "user name or password"),
        ("https://user@example.com/", "user name or password"),
        ("https://example.com:0/", "port 0"),
        ("https://example.com:65536/", "not an absolute URL"),
        ("https://example.com:99999999/", "not an absolute URL"),
        ("https://intranet/", "fully qualified"),
        ("https://localhost/", "private"),
        ("https://LOCALHOST./", "private"),
        ("https://api.localhost/", "private"),
        ("https://127.0.0.1/", "private"),
        ("https://127.1/", "private"),
        ("https://127.0.0.1./", "private"),
        ("https://2130706433/", "private"),
        ("https://0x7f000001/", "private"),
        ("https://0x7f.0.0.1/", "private"),
        ("https://0177.0.0.1/", "private"),
        ("https://017700000001/", "private"),
        ("https://0.0.0.0/", "private"),
        ("https://0/", "private"),
        ("https://10.0.0.1/", "private"),
        ("https://10.255.255.255/", "private"),
        ("https://172.16.5.4/", "private"),
        ("https://172.31.255.1/", "private"),
        ("https://192.168.1.1/", "private"),
        ("https://100.64.0.1/", "private"),
        ("https://100.100.100.200/", "private"),
        ("https://169.254.169.254/latest/meta-data/", "private"),
        ("https://169.254.170.2/v2/credentials", "private"),
        ("https://224.0.0.1/", "private"),
        ("https://255.255.255.255/", "private"),
        ("https://198.18.0.1/", "private"),
        ("https://[::1]/", "private"),
        ("https://[::]/", "private"),
        ("https://[0:0:0:0:0:0:0:1]/", "private"),
        ("https://[::ffff:127.0.0.1]/", "private"),
        ("https://[::ffff:7f00:1]/", "private"),
        ("https://[::ffff:169.254.169.254]/", "private"),
        ("https://[::ffff:10.0.0.1]/", "private"),
        ("https://[fe80::1]/", "private"),
        ("https://[fc00::1]/", "private"),
        ("https://[fd00:ec2::254]/", "private"),
        ("https://[64:ff9b::a9fe:a9fe]/", "private"),
        ("https://[2002:7f00:1::]/", "private"),
        ("https://[ff02::1]/", "private"),
    ];
    assert!(refused.len() >= 40);
    for (url, expected) in refused {
        let answer = app
            .graphql(
                SEED_MUTATION,
                json!({ "input": { "url": url, "events": ["POAM_OVERDUE"] } }),
            )
            .await;
        let error = &answer["errors"][0];
        assert_eq!(error["extensions"]["code"], "BAD_USER_INPUT", "{url}: {answer}");
        assert_eq!(error["extensions"]["field"], "url", "{url}: {answer}");
        let message = error["message"].as_str().expect("message");
        assert!(
            message.contains(expected),
            "{url}: `{message}` should contain `{expected}`"
        );
    }
    assert_eq!(app.count("webhooks").await, 0);

    for url in [
        "https://your-app.com/webhooks/aegis",
        "https://hooks.example.org:8443/a?b=c",
        "https://93.184.216.34/hook",
        "https://[2606:2800:220:1:248:1893:25c8:1946]/hook",
    ] {
        let answer = app
            .graphql(
                SEED_MUTATION,
                json!({ "input": { "url": url, "events": ["POAM_OVERDUE"] } }),
            )
            .await;
        assert!(answer["errors"].is_null(), "{url}: {answer}");
    }
}
