//! The customer portal's doors, over plain HTTP on both databases: a link
//! opens once and only in time, a forged cookie or a revoked key opens
//! nothing, a form from elsewhere (no CSRF token) changes nothing, a read-only
//! session changes nothing, and another tenant's ids are not found, whether
//! read or acted on. (The pages themselves, in a real browser:
//! `portal_browser`.)

use aegis_webhook_core::access::Scopes;
use aegis_webhook_storage::tenants;
use reqwest::StatusCode;
use sea_orm::ConnectionTrait as _;
use serde_json::json;

use crate::on_both_backends;
use crate::support::{Backend, PortalClient, TestApp, portal_link, seed_poam_overdue_data};

on_both_backends!(
    a_link_opens_once_and_only_in_time,
    forged_cookies_and_revoked_keys_open_nothing,
    a_form_without_the_sessions_token_changes_nothing,
    another_tenants_ids_are_not_found,
    a_read_only_session_changes_nothing,
    a_webhooks_pages_count_its_own_deliveries,
);

async fn a_link_opens_once_and_only_in_time(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let link = portal_link(&app, &app.setup.api_key, false).await;

    // The link's page names the tenant and uses nothing up (a mail scanner's
    // or a prefetch's GET), however often it is read.
    let mut browser = PortalClient::new(&app);
    for _ in 0..2 {
        let page = browser.get(&link).await;
        assert_eq!(page.status, StatusCode::OK, "{page:?}");
        assert!(page.body.contains("<strong>default</strong>"), "{}", page.body);
        assert!(page.headers.get("set-cookie").is_none());
    }
    // A form of another site cannot open it (to sign the visitor in to
    // somebody else's tenant), nor leave it used.
    let http = reqwest::Client::new();
    for (name, value) in [("origin", "https://attacker.example"), ("sec-fetch-site", "cross-site")] {
        let refused = http
            .post(app.url(&link))
            .header(name, value)
            .send()
            .await
            .expect("POST");
        assert_eq!(refused.status(), StatusCode::FORBIDDEN, "{name}: {value}");
        assert!(refused.headers().get("set-cookie").is_none());
    }
    let opened = browser.open(&link).await;
    assert_eq!(opened.status, StatusCode::SEE_OTHER, "{opened:?}");
    assert_eq!(opened.location.as_deref(), Some("/portal/webhooks"));
    let set_cookie = opened.headers["set-cookie"].to_str().expect("ascii");
    for attribute in ["HttpOnly", "SameSite=Lax", "Path=/portal"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    assert_eq!(
        opened.headers["referrer-policy"], "no-referrer",
        "the link must not leak"
    );
    let page = browser.get("/portal/webhooks").await;
    assert_eq!(page.status, StatusCode::OK, "{page:?}");
    let csp = page.headers["content-security-policy"].to_str().expect("ascii");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("frame-ancestors 'none'"),
        "{csp}"
    );

    // Used: refused, to anyone, and the first session stays.
    let mut second = PortalClient::new(&app);
    let again = second.open(&link).await;
    assert_eq!(again.status, StatusCode::FORBIDDEN, "{again:?}");
    assert!(again.body.contains("used already, has expired"), "{}", again.body);
    assert!(second.cookie.is_none());
    assert_eq!(browser.get("/portal/webhooks").await.status, StatusCode::OK);

    // Expired before it was opened: refused.
    let late = portal_link(&app, &app.setup.api_key, false).await;
    let backend = app.db().get_database_backend();
    app.db()
        .execute_raw(sea_orm::Statement::from_sql_and_values(
            backend,
            "UPDATE portal_sessions SET link_expires_at = $1 WHERE opened_at IS NULL",
            [(chrono::Utc::now() - chrono::Duration::seconds(1)).into()],
        ))
        .await
        .expect("age the link");
    let mut third = PortalClient::new(&app);
    assert_eq!(third.open(&late).await.status, StatusCode::FORBIDDEN);

    // A made-up token, and an absurd one: refused the same way.
    assert_eq!(
        third.open("/portal/open/not-a-token").await.status,
        StatusCode::FORBIDDEN
    );
    let absurd = format!("/portal/open/{}", "a".repeat(5000));
    assert_eq!(third.open(&absurd).await.status, StatusCode::FORBIDDEN);

    // A session past its end: signed out.
    app.db()
        .execute_raw(sea_orm::Statement::from_sql_and_values(
            backend,
            "UPDATE portal_sessions SET expires_at = $1 WHERE opened_at IS NOT NULL",
            [(chrono::Utc::now() - chrono::Duration::seconds(1)).into()],
        ))
        .await
        .expect("end the session");
    assert_eq!(browser.get("/portal/webhooks").await.status, StatusCode::UNAUTHORIZED);

    // Bad requests for a link are refused with the field named.
    for (variables, field) in [
        (json!({ "ttl": 5 }), "ttlSeconds"),
        (
            json!({ "ttl": 600, "accent": "red; background: url(x)" }),
            "accentColor",
        ),
        (json!({ "ttl": 600, "logo": "javascript:alert(1)" }), "logoUrl"),
        (json!({ "ttl": 600, "logo": "http://logo.example/x.png" }), "logoUrl"),
    ] {
        let (_, answer) = app
            .graphql_as(
                Some(&app.setup.api_key),
                "mutation($ttl: Int!, $accent: String, $logo: String) { \
                 createPortalSession(ttlSeconds: $ttl, theme: { accentColor: $accent, logoUrl: $logo }) { path } }",
                variables,
            )
            .await;
        assert_eq!(answer["errors"][0]["extensions"]["field"], field, "{answer}");
    }
}

async fn forged_cookies_and_revoked_keys_open_nothing(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let mut anonymous = PortalClient::new(&app);
    let page = anonymous.get("/portal/webhooks").await;
    assert_eq!(page.status, StatusCode::UNAUTHORIZED);
    assert!(page.body.contains("no portal session"), "{}", page.body);

    anonymous.cookie = Some("forged-cookie-value".to_owned());
    assert_eq!(anonymous.get("/portal/webhooks").await.status, StatusCode::UNAUTHORIZED);
    anonymous.cookie = Some("x".repeat(4000));
    assert_eq!(
        anonymous.get("/portal/deliveries").await.status,
        StatusCode::UNAUTHORIZED
    );
    let refused = anonymous
        .post_raw("/portal/webhooks", &[("url", "https://example.com")])
        .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);

    // A session made with a key that is then revoked ends with it.
    let (key_id, key) = tenants::create_api_key(app.db(), app.setup.tenant_id, Scopes::FULL)
        .await
        .expect("key");
    let mut browser = PortalClient::new(&app);
    browser.open(&portal_link(&app, &key, false).await).await;
    assert_eq!(browser.get("/portal/webhooks").await.status, StatusCode::OK);
    tenants::revoke_api_key(app.db(), key_id).await.expect("revoke");
    assert_eq!(browser.get("/portal/webhooks").await.status, StatusCode::UNAUTHORIZED);

    // Signing out ends the session for good.
    let mut browser = PortalClient::new(&app);
    browser.open(&portal_link(&app, &app.setup.api_key, false).await).await;
    let out = browser.post("/portal/signout", &[]).await;
    assert_eq!(out.status, StatusCode::OK, "{out:?}");
    assert!(out.headers["set-cookie"].to_str().expect("ascii").contains("Max-Age=0"));
    assert_eq!(browser.get("/portal/webhooks").await.status, StatusCode::UNAUTHORIZED);
}

async fn a_form_without_the_sessions_token_changes_nothing(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let mut browser = PortalClient::new(&app);
    browser.open(&portal_link(&app, &app.setup.api_key, false).await).await;
    let webhook = app
        .create_webhook("http://127.0.0.1:9/hook", &["POAM_OVERDUE"], None)
        .await;
    let id = webhook["id"].as_str().expect("id");

    // What a page of another site can make the browser send: the cookie,
    // but no token (or a wrong one).
    for fields in [
        vec![("url", "https://attacker.example/hook"), ("events", "POAM_OVERDUE")],
        vec![
            ("url", "https://attacker.example/hook"),
            ("events", "POAM_OVERDUE"),
            ("csrf", "0000"),
        ],
    ] {
        let refused = browser.post_raw("/portal/webhooks", &fields).await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{refused:?}");
        assert!(refused.body.contains("security token"), "{}", refused.body);
        for action in ["delete", "rotate", "test"] {
            let refused = browser
                .post_raw(&format!("/portal/webhooks/{id}/{action}"), &fields)
                .await;
            assert_eq!(refused.status, StatusCode::FORBIDDEN, "{action}: {refused:?}");
        }
    }
    assert_eq!(app.count("webhooks").await, 1, "nothing created, nothing deleted");
    assert_eq!(app.count("deliveries").await, 0, "no test event sent");
    let secret = app
        .graphql("query($id: ID!) { webhook(id: $id) { secret } }", json!({ "id": id }))
        .await;
    assert_eq!(secret["data"]["webhook"]["secret"], webhook["secret"], "not rotated");

    // Not a form at all: refused before anything reads it.
    let page = browser.get("/portal/webhooks").await;
    let token = crate::support::csrf_token_of(&page.body).expect("token");
    let json_body = reqwest::Client::new()
        .post(app.url("/portal/webhooks"))
        .header(
            "cookie",
            format!("aegis_portal={}", browser.cookie.clone().expect("cookie")),
        )
        .header("content-type", "application/json")
        .body(json!({ "csrf": token, "url": "https://x.example" }).to_string())
        .send()
        .await
        .expect("POST");
    assert_eq!(json_body.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    // With the token, the same form works.
    let created = browser
        .post(
            "/portal/webhooks",
            &[
                ("url", "http://127.0.0.1:9/other"),
                ("events", "POAM_OVERDUE"),
                ("active", "true"),
            ],
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    assert!(created.body.contains("whsec_"), "the new secret is shown once");
    assert_eq!(app.count("webhooks").await, 2);

    // Rotating from the confirmation page once; the same form sent again (a
    // reload) rotates nothing.
    let confirm = browser.get(&format!("/portal/webhooks/{id}/rotate")).await;
    let version = confirm
        .body
        .split(r#"name="version" value=""#)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the form names the webhook's version")
        .to_owned();
    let rotated = browser
        .post(&format!("/portal/webhooks/{id}/rotate"), &[("version", &version)])
        .await;
    assert_eq!(rotated.status, StatusCode::OK, "{rotated:?}");
    let again = browser
        .post(&format!("/portal/webhooks/{id}/rotate"), &[("version", &version)])
        .await;
    assert_eq!(again.status, StatusCode::SEE_OTHER, "{again:?}");
    assert_eq!(again.location, Some(format!("/portal/webhooks/{id}?changed=1")));
    let shown = browser.get(&format!("/portal/webhooks/{id}?reveal=secret")).await;
    assert!(
        rotated
            .body
            .contains(&crate::support::text_of_id(&shown.body, "secret")),
        "the secret shown after the first rotation is the one that holds"
    );

    // A browser sends a textarea's line breaks as CRLF: kept as line breaks.
    let edited = browser
        .post(
            &format!("/portal/webhooks/{id}/edit"),
            &[
                ("url", "http://127.0.0.1:9/hook"),
                ("events", "POAM_OVERDUE"),
                ("description", "first line\r\nsecond line"),
            ],
        )
        .await;
    assert_eq!(edited.status, StatusCode::SEE_OTHER, "{edited:?}");
    let described = app
        .graphql(
            "query($id: ID!) { webhook(id: $id) { description projectIds } }",
            json!({ "id": id }),
        )
        .await;
    assert_eq!(
        described["data"]["webhook"]["description"], "first line\nsecond line",
        "{described}"
    );
    // A field the form leaves out is left as it is.
    let edited = browser
        .post(&format!("/portal/webhooks/{id}/edit"), &[("events", "POAM_OVERDUE")])
        .await;
    assert_eq!(edited.status, StatusCode::SEE_OTHER, "{edited:?}");
    let described = app
        .graphql(
            "query($id: ID!) { webhook(id: $id) { url description } }",
            json!({ "id": id }),
        )
        .await;
    assert_eq!(described["data"]["webhook"]["description"], "first line\nsecond line");
    assert_eq!(described["data"]["webhook"]["url"], "http://127.0.0.1:9/hook");

    // A refused input re-shows the form with the reason and what was typed.
    let refused = browser
        .post(
            "/portal/webhooks",
            &[("url", "ftp://nowhere.example/x"), ("events", "POAM_OVERDUE")],
        )
        .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(refused.body.contains("role=\"alert\""), "{}", refused.body);
    assert!(
        refused
            .body
            .contains(r#"aria-describedby="url-help form-error" aria-invalid="true""#),
        "the refused field points at the reason: {}",
        refused.body
    );
    assert!(refused.body.contains("ftp://nowhere.example/x"), "{}", refused.body);
    assert_eq!(app.count("webhooks").await, 2);
}

async fn another_tenants_ids_are_not_found(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let receiver = crate::support::Receiver::start(&[], 200).await;

    // Tenant B's webhook and delivery.
    let other = tenants::create_tenant(app.db(), "other-tenant").await.expect("tenant");
    let (_, other_key) = tenants::create_api_key(app.db(), other.id, Scopes::FULL)
        .await
        .expect("key");
    let (_, created) = app
        .graphql_as(
            Some(&other_key),
            crate::support::SEED_MUTATION,
            json!({ "input": { "url": receiver.url(), "events": ["POAM_OVERDUE"] } }),
        )
        .await;
    let their_webhook = created["data"]["createWebhook"]["id"].as_str().expect("id").to_owned();
    let envelope = crate::support::envelope(other.id, "POAM_OVERDUE", seed_poam_overdue_data());
    app.post_event(&envelope).await;
    receiver.wait_for(1, std::time::Duration::from_secs(10)).await;
    let (_, deliveries) = app
        .graphql_as(Some(&other_key), "{ deliveries(first: 1) { nodes { id } } }", json!({}))
        .await;
    let their_delivery = deliveries["data"]["deliveries"]["nodes"][0]["id"]
        .as_str()
        .expect("B's delivery")
        .to_owned();

    // The use cases' guards underneath: B's ids are none of A's.
    let their_webhook_id: aegis_webhook_core::ids::WebhookId = their_webhook.parse().expect("id");
    let their_delivery_id: aegis_webhook_core::ids::DeliveryId = their_delivery.parse().expect("id");
    let owned = aegis_webhook_storage::webhooks::owned_by(app.db(), app.setup.tenant_id, &[their_webhook_id]).await;
    assert_eq!(owned.expect("query"), vec![]);
    let owned = aegis_webhook_storage::deliveries::owned_by(app.db(), app.setup.tenant_id, &[their_delivery_id]).await;
    assert_eq!(owned.expect("query"), vec![]);
    let owned = aegis_webhook_storage::deliveries::owned_by(app.db(), other.id, &[their_delivery_id]).await;
    assert_eq!(owned.expect("query"), vec![their_delivery_id]);

    // Tenant A's session: B's pages and actions are not found, B's data is untouched.
    let mut browser = PortalClient::new(&app);
    browser.open(&portal_link(&app, &app.setup.api_key, false).await).await;
    for path in [
        format!("/portal/webhooks/{their_webhook}"),
        format!("/portal/webhooks/{their_webhook}?reveal=secret"),
        format!("/portal/webhooks/{their_webhook}/edit"),
        format!("/portal/webhooks/{their_webhook}/delete"),
        format!("/portal/webhooks/{their_webhook}/rotate"),
        format!("/portal/deliveries/{their_delivery}"),
        "/portal/webhooks/not-an-id".to_owned(),
    ] {
        let page = browser.get(&path).await;
        assert_eq!(page.status, StatusCode::NOT_FOUND, "{path}: {page:?}");
        assert!(!page.body.contains(&receiver.url()), "{path} shows B's endpoint");
    }
    for path in [
        format!("/portal/webhooks/{their_webhook}/delete"),
        format!("/portal/webhooks/{their_webhook}/rotate"),
        format!("/portal/webhooks/{their_webhook}/test"),
        format!("/portal/deliveries/{their_delivery}/redeliver"),
    ] {
        let refused = browser.post(&path, &[]).await;
        assert_eq!(refused.status, StatusCode::NOT_FOUND, "{path}: {refused:?}");
    }
    let refused = browser
        .post(
            &format!("/portal/webhooks/{their_webhook}/edit"),
            &[("url", "https://attacker.example/x"), ("events", "POAM_OVERDUE")],
        )
        .await;
    assert_eq!(refused.status, StatusCode::NOT_FOUND);
    // The log filtered on B's webhook shows nothing of B's.
    let log = browser
        .get(&format!("/portal/deliveries?webhook={their_webhook}"))
        .await;
    assert_eq!(log.status, StatusCode::OK);
    assert!(!log.body.contains(&their_delivery), "{}", log.body);
    assert!(log.body.contains("No deliveries match."));

    let (_, still) = app
        .graphql_as(
            Some(&other_key),
            "query($id: ID!) { webhook(id: $id) { url secret } }",
            json!({ "id": their_webhook }),
        )
        .await;
    assert_eq!(still["data"]["webhook"]["url"], json!(receiver.url()), "{still}");
    assert_eq!(
        still["data"]["webhook"]["secret"],
        created["data"]["createWebhook"]["secret"]
    );
    assert_eq!(receiver.received().len(), 1, "nothing redelivered or tested");
}

async fn a_read_only_session_changes_nothing(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let webhook = app
        .create_webhook("http://127.0.0.1:9/hook", &["POAM_OVERDUE"], None)
        .await;
    let id = webhook["id"].as_str().expect("id");
    let mut browser = PortalClient::new(&app);
    browser.open(&portal_link(&app, &app.setup.api_key, true).await).await;

    let page = browser.get(&format!("/portal/webhooks/{id}")).await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("Read-only session"), "{}", page.body);
    assert!(!page.body.contains("Send test event"), "no write controls shown");
    let secret = webhook["secret"].as_str().expect("secret");
    let revealed = browser.get(&format!("/portal/webhooks/{id}?reveal=secret")).await;
    assert!(
        !revealed.body.contains(secret),
        "read-only sessions cannot read secrets"
    );
    assert!(revealed.body.contains("secrets"), "{}", revealed.body);

    for path in ["test", "rotate", "delete"] {
        let refused = browser.post(&format!("/portal/webhooks/{id}/{path}"), &[]).await;
        assert_eq!(refused.status, StatusCode::FORBIDDEN, "{path}: {refused:?}");
    }
    assert_eq!(browser.get("/portal/webhooks/new").await.status, StatusCode::FORBIDDEN);
    assert_eq!(app.count("webhooks").await, 1);
    assert_eq!(app.count("deliveries").await, 0);
}

/// Embedding in the Aegis app: the configured origins may frame the portal,
/// and its cookie is one a browser sends inside their frame. A theme's logo
/// origin is the one outside address the pages may load from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_portal_allows_its_framing_origin_and_its_theme() {
    let Some(app) = TestApp::spawn_with(Backend::Sqlite, |config| {
        config.portal_frame_ancestors = "https://app.aegis.example, https://staging.aegis.example".to_owned();
    })
    .await
    else {
        return;
    };
    let (_, answer) = app
        .graphql_as(
            Some(&app.setup.api_key),
            "mutation { createPortalSession(theme: { accentColor: \"#7B1FA2\", \
             logoUrl: \"https://cdn.aegis.example/logo.svg\" }) { path } }",
            json!({}),
        )
        .await;
    let link = answer["data"]["createPortalSession"]["path"].as_str().expect("path");
    let mut browser = PortalClient::new(&app);
    let opened = browser.open(link).await;
    let set_cookie = opened.headers["set-cookie"].to_str().expect("ascii");
    for attribute in ["SameSite=None", "Secure", "Partitioned", "HttpOnly"] {
        assert!(set_cookie.contains(attribute), "{set_cookie}");
    }
    let page = browser.get("/portal/webhooks").await;
    let csp = page.headers["content-security-policy"].to_str().expect("ascii");
    assert!(
        csp.contains("frame-ancestors https://app.aegis.example https://staging.aegis.example"),
        "{csp}"
    );
    assert!(csp.contains("img-src 'self' data: https://cdn.aegis.example;"), "{csp}");
    assert!(
        page.headers.get("x-frame-options").is_none(),
        "it would forbid the frame"
    );
    assert!(
        page.body.contains(r#"src="https://cdn.aegis.example/logo.svg""#),
        "{}",
        page.body
    );
    assert!(
        page.body.contains(r#"href="/portal/theme/7b1fa2.css""#),
        "{}",
        page.body
    );
    let theme = browser.get("/portal/theme/7b1fa2.css").await;
    assert_eq!(theme.body.trim(), ":root { --accent: #7b1fa2; }");
    assert_eq!(browser.get("/portal/theme/red.css").await.status, StatusCode::NOT_FOUND);
}

async fn a_webhooks_pages_count_its_own_deliveries(backend: Backend) {
    let Some(app) = TestApp::spawn(backend).await else {
        return;
    };
    let receiver = crate::support::Receiver::start(&[500], 200).await;
    let counted = app
        .create_webhook(&format!("{}/counted", receiver.url()), &["POAM_OVERDUE"], None)
        .await;
    app.create_webhook(&format!("{}/other", receiver.url()), &["POAM_DUE_SOON"], None)
        .await;
    for _ in 0..3 {
        let envelope = crate::support::envelope(app.setup.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data());
        app.post_event(&envelope).await;
    }
    // The first attempt fails (500) and is retried; all three succeed.
    receiver.wait_for(4, std::time::Duration::from_secs(10)).await;
    let id = counted["id"].as_str().expect("id");
    let mut browser = PortalClient::new(&app);
    browser.open(&portal_link(&app, &app.setup.api_key, false).await).await;

    let page = crate::support::eventually(std::time::Duration::from_secs(10), "the attempts recorded", || async {
        let page = browser.get(&format!("/portal/webhooks/{id}")).await;
        page.body
            .contains("3 succeeded, 0 failed, 0 pending; the busiest hour had 3.")
            .then_some(page)
    })
    .await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.body.contains("100.0 %"), "{}", page.body);

    let log = browser
        .get(&format!("/portal/deliveries?webhook={id}&status=SUCCEEDED"))
        .await;
    assert_eq!(
        log.body.matches("class=\"badge ok\">SUCCEEDED").count(),
        3,
        "{}",
        log.body
    );
    let failed = browser
        .get(&format!("/portal/deliveries?webhook={id}&status=FAILED"))
        .await;
    assert!(failed.body.contains("No deliveries match."));
    let refused = browser.get("/portal/deliveries?since=yesterday").await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert!(
        refused.body.contains("since: `yesterday` is not a time"),
        "{}",
        refused.body
    );
}
