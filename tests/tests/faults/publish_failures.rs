//! A publish that fails right after its writer's commit: for every writer (the
//! ingester, the worker, the API, and the reconciler itself) the write stands,
//! the failure is counted in `aegis_publishes_left_to_reconciler_total`, and
//! the reconciler publishes what was missed, so nothing is lost.
//!
//! In process (the metric is read from this process's recorder), so it runs
//! here, one test at a time with the others, where no other test records.

use std::sync::Arc;
use std::time::Duration;

use aegis_webhook_core::metrics;
use aegis_webhook_core::target::TargetPolicy;
use aegis_webhook_tests::flaky::{FlakyQueue, Publishes};
use aegis_webhook_tests::support::{
    Backend, Receiver, TestApp, envelope, eventually, fresh_database, scratch_dir, seed_poam_overdue_data, test_config,
};
use serde_json::json;

/// What the counter of one writer reads now.
fn left_to_reconciler(writer: &str) -> u64 {
    let pattern = format!("{}{{writer=\"{writer}\"}} ", metrics::PUBLISHES_LEFT_TO_RECONCILER);
    metrics::render()
        .lines()
        .find_map(|line| line.strip_prefix(&pattern))
        .map_or(0, |value| value.trim().parse().expect("a counter value"))
}

fn counts() -> [u64; 4] {
    ["ingester", "reconciler", "worker", "api"].map(left_to_reconciler)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_failing_after_any_writers_commit_is_left_to_the_reconciler_and_nothing_is_lost() {
    let _serial = crate::SERIAL.lock().await;
    let scratch = scratch_dir();
    let url = fresh_database(Backend::Sqlite, &scratch)
        .await
        .expect("SQLite is always there");
    let mut config = test_config(url, scratch);
    config.retry_schedule = "0s,100ms".parse().expect("valid");
    config.reconcile_interval = Duration::from_millis(200);
    config.reconcile_grace = Duration::from_millis(300);
    config
        .allow_private_targets
        .extend(TargetPolicy::allowing_loopback_ranges());
    let mut flaky: Option<Arc<FlakyQueue>> = None;
    let app = TestApp::start_production_wrapping(config, |queue| {
        let wrapped = FlakyQueue::new(queue);
        flaky = Some(wrapped.clone());
        wrapped
    })
    .await;
    let flaky = flaky.expect("the queue was wrapped");
    // The first event's delivery succeeds, the second event's first attempt
    // fails, its retry and the test event succeed.
    let receiver = Receiver::start(&[200, 500], 200).await;
    let webhook = app.create_webhook(&receiver.url(), &["POAM_OVERDUE"], None).await;
    let post_event = || async {
        let (status, _) = app
            .post_event(&envelope(app.setup.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data()))
            .await;
        assert_eq!(status, 202);
    };
    let within = Duration::from_secs(20);

    // The ingester's first attempts are refused, then the reconciler's first
    // re-publish; its next pass gets the delivery through.
    let before = counts();
    flaky.fail_next(2, Publishes::Any);
    post_event().await;
    receiver.wait_for(1, within).await;
    assert_eq!(flaky.failed(), 2);
    let [ingester, reconciler, worker, api] = counts();
    assert_eq!(
        [
            ingester - before[0],
            reconciler - before[1],
            worker - before[2],
            api - before[3]
        ],
        [1, 1, 0, 0]
    );

    // The worker's retry (after a 500) is refused; the reconciler publishes it.
    // (Only a retry: were the worker slow to take the first attempt, the
    // reconciler's re-publish of it must not be what is refused.)
    let before = counts();
    flaky.fail_next(1, Publishes::Retries);
    post_event().await;
    let received = receiver.wait_for(3, within).await;
    assert_eq!(received[1].header("x-aegis-attempt"), "1");
    assert_eq!(received[2].header("x-aegis-attempt"), "2");
    assert_eq!(
        received[1].header("x-aegis-delivery"),
        received[2].header("x-aegis-delivery")
    );
    assert_eq!(flaky.failed(), 3);
    let after = counts();
    assert_eq!(after[2] - before[2], 1, "the worker's failed publish is counted");
    assert_eq!([after[0], after[1], after[3]], [before[0], before[1], before[3]]);

    // The API's test delivery is refused; the reconciler publishes it.
    let before = counts();
    flaky.fail_next(1, Publishes::Tasks);
    let answer = app
        .graphql(
            "mutation($id: ID!) { testWebhook(id: $id) { id status } }",
            json!({ "id": webhook["id"] }),
        )
        .await;
    assert!(answer["errors"].is_null(), "{answer}");
    let received = receiver.wait_for(4, within).await;
    assert_eq!(received[3].header("x-aegis-event"), "WEBHOOK_TEST");
    assert_eq!(flaky.failed(), 4);
    let after = counts();
    assert_eq!(after[3] - before[3], 1, "the API's failed publish is counted");
    assert_eq!([after[0], after[1], after[2]], [before[0], before[1], before[2]]);

    // Nothing lost: every delivery ended SUCCEEDED, each received once as that.
    let statuses = eventually(within, "every delivery recorded", || async {
        let nodes = app
            .delivery_nodes(
                "query($filter: DeliveryFilter) { deliveries(first: 10, filter: $filter) { edges { node { status } } } }",
                json!({}),
            )
            .await;
        let statuses: Vec<String> = nodes
            .iter()
            .map(|node| node["status"].as_str().unwrap_or_default().to_owned())
            .collect();
        statuses.iter().all(|status| status == "SUCCEEDED").then_some(statuses)
    })
    .await;
    assert_eq!(statuses.len(), 3, "{statuses:?}");
    assert_eq!(
        receiver.received().len(),
        4,
        "one more attempt than deliveries: the 500"
    );
}
