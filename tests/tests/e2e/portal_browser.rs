//! The customer portal in a real headless Chromium against the real system
//! (`dev` on port 0, SQLite, a receiver on loopback): open a magic link,
//! create a webhook, publish an event, see the delivery and its attempt,
//! redeliver it and see the new attempt arrive, reveal and rotate the secret,
//! send a test event signed with the new one, and find another tenant's
//! delivery not found. On every page: axe-core reports no serious or critical
//! violation, every request the browser makes stays on the server, and the
//! page works at a phone's width. Screenshots go to the build's target
//! folder (`screenshots/portal-*.png`), never committed.

use std::path::PathBuf;
use std::time::Duration;

use aegis_webhook_core::access::Scopes;
use aegis_webhook_storage::tenants;
use serde_json::json;

use crate::support::{Backend, Receiver, TestApp, envelope, portal_link, seed_poam_overdue_data};
use aegis_webhook_tests::browser::{self, Browser};

fn screenshot(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("screenshots/portal-{name}.png"))
}

/// What every page must pass: no serious or critical accessibility
/// violation, a screenshot, and (at the end) only requests to the server.
fn check_page(browser: &mut Browser, name: &str) {
    let violations = browser.axe();
    assert!(
        violations.is_empty(),
        "axe-core found serious or critical violations on {name} ({}): {violations:#?}",
        browser.url()
    );
    browser.screenshot(&screenshot(name));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_customer_manages_a_webhook_and_debugs_its_deliveries_in_chromium() {
    if !browser::available() {
        return;
    }
    let app = TestApp::spawn(Backend::Sqlite).await.expect("SQLite");
    let receiver = Receiver::start(&[], 200).await;
    let link = app.url(&portal_link(&app, &app.setup.api_key, false).await);

    // Another tenant's delivery, which the customer must not reach.
    let other = tenants::create_tenant(app.db(), "neighbour").await.expect("tenant");
    let (_, other_key) = tenants::create_api_key(app.db(), other.id, Scopes::FULL)
        .await
        .expect("key");
    let (_, theirs) = app
        .graphql_as(
            Some(&other_key),
            crate::support::SEED_MUTATION,
            json!({ "input": { "url": receiver.url(), "events": ["POAM_OVERDUE"] } }),
        )
        .await;
    assert!(theirs["errors"].is_null(), "{theirs}");
    app.post_event(&envelope(other.id, "POAM_OVERDUE", seed_poam_overdue_data()))
        .await;
    receiver.wait_for(1, Duration::from_secs(10)).await;
    let (_, their_log) = app
        .graphql_as(Some(&other_key), "{ deliveries(first: 1) { nodes { id } } }", json!({}))
        .await;
    let their_delivery = their_log["data"]["deliveries"]["nodes"][0]["id"]
        .as_str()
        .expect("the neighbour's delivery")
        .to_owned();

    let origin = app.url("");
    let runtime = tokio::runtime::Handle::current();
    let app = std::sync::Arc::new(app);
    let receiver = std::sync::Arc::new(receiver);
    let (app_in, receiver_in) = (app.clone(), receiver.clone());
    tokio::task::spawn_blocking(move || {
        let (app, receiver) = (app_in, receiver_in);
        let mut browser = Browser::launch();

        // The magic link's page names the tenant; its button lands on the
        // webhooks page, signed in.
        let page = browser.goto(&link);
        assert_eq!(page.status, Some(200), "{page:?}");
        assert!(browser.text("main").contains("opens the webhooks of default"));
        check_page(&mut browser, "link");
        browser.click("form button");
        assert!(browser.url().ends_with("/portal/webhooks"), "{}", browser.url());
        assert_eq!(browser.text("h1"), "Webhooks");
        let cookie = browser
            .cookies()
            .into_iter()
            .find(|cookie| cookie.name == "aegis_portal")
            .expect("the session cookie");
        assert!(cookie.http_only, "{cookie:?}");
        assert_eq!(cookie.same_site, "Lax", "{cookie:?}");
        check_page(&mut browser, "webhooks-empty");

        // Keyboard: the first Tab reaches the skip link.
        browser.press("Tab");
        assert!(
            browser.focused().text.contains("Skip to content"),
            "{:?}",
            browser.focused()
        );

        // Create a webhook.
        browser.click("a[href='/portal/webhooks/new']");
        assert_eq!(browser.text("h1"), "New webhook");
        check_page(&mut browser, "webhook-new");
        // A refused input: the reason, tied to its field, the form kept.
        browser.fill("#url", "ftp://nowhere.example/hook");
        browser.check("#event-POAM_OVERDUE");
        browser.click("form.stack button[type='submit']");
        assert!(
            browser.text("#form-error").contains("url"),
            "{}",
            browser.text("#form-error")
        );
        assert_eq!(browser.attribute("#url", "aria-invalid").as_deref(), Some("true"));
        check_page(&mut browser, "webhook-refused");
        browser.fill("#url", &receiver.url());
        browser.fill("#description", "Compliance alerts");
        browser.click("form.stack button[type='submit']");
        assert_eq!(browser.text("h1"), "Webhook created");
        let secret = browser.text("#secret");
        assert!(secret.starts_with("whsec_"), "{secret}");
        assert!(browser.text("pre.code").contains("crypto.createHmac('sha256', secret)"));
        check_page(&mut browser, "webhook-created");

        // Publish an event for it; the delivery and its attempt show.
        let before = receiver.received().len();
        let envelope = envelope(app.setup.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data());
        let (status, _) = runtime.block_on(app.post_event(&envelope));
        assert_eq!(status, reqwest::StatusCode::ACCEPTED);
        let arrived = runtime.block_on(receiver.wait_for(before + 1, Duration::from_secs(10)));
        let first = arrived.last().expect("the delivery").clone();
        crate::signature::assert_signed(&first, &secret);

        browser.click("nav a[href='/portal/deliveries']");
        browser.wait_for("table.deliveries tbody tr");
        check_page(&mut browser, "deliveries");
        browser.click("table.deliveries tbody tr a");
        assert_eq!(browser.text("h1"), "Delivery");
        let delivery_url = browser.url();
        assert!(
            delivery_url.contains(first.header("x-aegis-delivery")),
            "{delivery_url}"
        );
        assert_eq!(
            browser.text("#body"),
            String::from_utf8_lossy(&first.body),
            "the page shows the exact body sent"
        );
        browser.wait_for_text("ol.attempts", "Attempt 1: HTTP 200");
        check_page(&mut browser, "delivery");

        // Redeliver: a second attempt of the same delivery reaches the receiver.
        browser.click("form[action$='/redeliver'] button");
        assert!(browser.text("p.notice").contains("Sent again"));
        let arrived = runtime.block_on(receiver.wait_for(before + 2, Duration::from_secs(10)));
        let again = arrived.last().expect("the redelivery");
        assert_eq!(again.header("x-aegis-delivery"), first.header("x-aegis-delivery"));
        assert_eq!(again.header("x-aegis-attempt"), "2");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !browser.text("ol.attempts").contains("Attempt 2: HTTP 200") {
            assert!(std::time::Instant::now() < deadline, "attempt 2 never showed");
            std::thread::sleep(Duration::from_millis(100));
            browser.goto(&delivery_url);
        }

        // The webhook's page: health, chart, secret on click, rotation.
        browser.click("dl.facts a[href^='/portal/webhooks/']");
        assert_eq!(browser.text("h1"), "Webhook");
        assert_eq!(browser.count("svg.chart"), 1);
        assert!(
            browser.text("dl.facts").contains("100.0 %"),
            "{}",
            browser.text("dl.facts")
        );
        assert_eq!(
            browser.count("#secret"),
            0,
            "the secret is not on the page until asked for"
        );
        check_page(&mut browser, "webhook");
        browser.click("text=Reveal secret");
        assert_eq!(browser.text("#secret"), secret);
        browser.click("a[href$='/rotate']");
        check_page(&mut browser, "rotate");
        browser.click("form[action$='/rotate'] button");
        assert_eq!(browser.text("h1"), "Secret rotated");
        let rotated = browser.text("#secret");
        assert!(rotated.starts_with("whsec_") && rotated != secret, "{rotated}");
        check_page(&mut browser, "secret-rotated");

        // A test event, signed with the new secret.
        browser.click("text=Back to the webhook");
        browser.click("form[action$='/test'] button");
        assert_eq!(browser.text("h1"), "Delivery");
        let arrived = runtime.block_on(receiver.wait_for(before + 3, Duration::from_secs(10)));
        let test = arrived.last().expect("the test event");
        assert_eq!(test.header("x-aegis-event"), "WEBHOOK_TEST");
        crate::signature::assert_signed(test, &rotated);

        // Edit, pause, then the delete confirmation (kept: cancelled).
        browser.click("dl.facts a[href^='/portal/webhooks/']");
        browser.click("a[href$='/edit']");
        check_page(&mut browser, "webhook-edit");
        browser.fill("#description", "Compliance alerts (edited)");
        browser.click("form.stack button[type='submit']");
        assert!(browser.text("dl.facts").contains("Compliance alerts (edited)"));
        browser.click("form[action$='/active'] button");
        assert!(browser.text("dl.facts").contains("Paused"));
        browser.click("a[href$='/delete']");
        check_page(&mut browser, "delete");
        browser.click("text=Cancel");
        assert_eq!(browser.text("h1"), "Webhook");

        // The list, with the webhook's health.
        browser.click("nav a[href='/portal/webhooks']");
        let row = browser.text("tbody tr");
        assert!(row.contains("Paused") && row.contains("100.0 %"), "{row}");
        check_page(&mut browser, "webhooks");

        // The event catalog.
        browser.click("nav a[href='/portal/events']");
        assert!(browser.text("main").contains("CRITICAL_VULNERABILITY_DETECTED"));
        check_page(&mut browser, "events");

        // Another tenant's delivery is not found.
        let theirs = browser.goto(&format!("{origin}/portal/deliveries/{their_delivery}"));
        assert_eq!(theirs.status, Some(404), "{theirs:?}");
        assert!(!browser.content().contains(&receiver.url()));
        check_page(&mut browser, "not-found");

        // A phone's width: still usable, still accessible.
        browser.viewport(390, 844);
        browser.goto(&format!("{origin}/portal/webhooks"));
        check_page(&mut browser, "webhooks-phone");
        browser.goto(&delivery_url);
        check_page(&mut browser, "delivery-phone");

        // Nothing was fetched from outside the server, nothing failed, and no
        // policy refused anything.
        let requests = browser.requests();
        assert!(requests.len() > 20, "{requests:?}");
        for request in &requests {
            assert!(
                request.url.starts_with(&origin),
                "a request left the server: {request:?}"
            );
            assert!(!request.failed, "{request:?}");
        }
        let errors: Vec<String> = browser
            .console_errors()
            .into_iter()
            // The neighbour's page answers 404 and the refused form 400, on purpose.
            .filter(|error| !error.contains("status of 404") && !error.contains("status of 400"))
            .collect();
        assert!(errors.is_empty(), "{errors:?}");
        browser.close();
    })
    .await
    .expect("the browser run");
    drop(receiver);
    let mut app = std::sync::Arc::into_inner(app).expect("the browser is done with the app");
    app.stop().await;
}

/// The README's first command, as a new user runs it: `aegis-webhook dev`
/// prints a portal link, and opening it in Chromium shows the webhooks page.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_prints_a_portal_link_that_opens_the_webhooks_page() {
    use tokio::io::{AsyncBufReadExt as _, BufReader};

    if !browser::available() {
        return;
    }
    let data = crate::support::scratch_dir();
    let mut dev = tokio::process::Command::new(crate::support::built_binary("aegis-webhook"))
        .arg("dev")
        .env("AEGIS_LISTEN", "127.0.0.1:0")
        .env("AEGIS_DATA_DIR", &data)
        .env("AEGIS_LOG", "warn")
        .env_remove("AEGIS_DATABASE_URL")
        .env_remove("AEGIS_AMQP_URL")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start `aegis-webhook dev`");
    let mut lines = BufReader::new(dev.stdout.take().expect("stdout")).lines();
    let link = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(line) = lines.next_line().await.expect("dev's output") {
            if let Some(link) = line.trim().strip_prefix("Customer portal") {
                return link.trim().to_owned();
            }
        }
        panic!("dev ended without printing a portal link");
    })
    .await
    .expect("dev prints its banner within 60 s");
    assert!(
        link.starts_with("http://127.0.0.1:") && link.contains("/portal/open/"),
        "{link}"
    );
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

    let landed = tokio::task::spawn_blocking(move || {
        let mut browser = Browser::launch();
        let page = browser.goto(&link);
        assert_eq!(page.status, Some(200), "{page:?}");
        browser.click("form button");
        let landed = browser.url();
        let heading = browser.text("h1");
        browser.screenshot(&screenshot("dev-link"));
        browser.close();
        (landed, heading)
    })
    .await
    .expect("the browser run");
    assert!(landed.0.ends_with("/portal/webhooks"), "{landed:?}");
    assert_eq!(landed.1, "Webhooks");
    dev.kill().await.expect("stop dev");
}
