//! Fair sharing between tenants, in one process (the in-process queue): what
//! the per-tenant lanes promise beside the other guarantees. The race between
//! a flood and a trickle across separate processes is in the faults binary
//! (`faults::fairness`).

use std::time::Duration;

use aegis_webhook_core::config::Sensitive;
use aegis_webhook_core::secret::SecretCipher;
use futures::StreamExt as _;
use uuid::Uuid;

use crate::support::{Backend, Receiver, TestApp, envelope, seed_poam_overdue_data, tenant_with_webhooks};

/// Two tenants both far beyond their share, so both flood the bulk lanes;
/// one's endpoint takes a second per request. The other's deliveries are not
/// held up behind them: in the bulk lane as everywhere, a webhook gets at
/// most `webhook_concurrency` of a worker's slots and as many places in the
/// worker's lines, and what it has beyond that goes back to the queue for
/// later (for one request timeout, 10 s here: the bound below is shorter, so
/// none of the fast tenant's tasks may have been handed back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_tenant_with_a_slow_endpoint_does_not_hold_up_other_bulk_tenants() {
    let key = SecretCipher::generate_key();
    let Some(app) = TestApp::spawn_with(Backend::Sqlite, |config| {
        config.secret_key = Some(Sensitive::new(key.clone()));
        // A share of one: all but each tenant's first event go bulk.
        config.fair_share_events_per_second = 1;
        config.fair_share_event_burst = 1;
        config.fair_share_deliveries_per_second = 1;
        config.fair_share_delivery_burst = 1;
        // Room for the fast tenant's five webhooks beside the slow one's
        // eight slots, so none of its tasks meets its own webhook's cap even
        // on a loaded machine: what is measured is the slow tenant's effect.
        config.worker_concurrency = 32;
        config.webhook_concurrency = 8;
        config.request_timeout = Duration::from_secs(10);
    })
    .await
    else {
        return;
    };
    let slow = Receiver::start_slow(&[], 200, Duration::from_secs(1)).await;
    let fast = Receiver::start(&[], 200).await;
    let cipher = SecretCipher::from_base64(&key).expect("key");
    let slow_tenant = tenant_with_webhooks(app.db(), &cipher, "slow", &slow.url(), 1).await;
    let fast_tenant = tenant_with_webhooks(app.db(), &cipher, "fast", &fast.url(), 5).await;

    // The slow tenant's flood first, so the fast one's is behind it.
    const EVENTS: usize = 100;
    for tenant in [slow_tenant, fast_tenant] {
        futures::stream::iter(0..EVENTS)
            .for_each_concurrent(8, |_| async {
                let mut event = envelope(tenant, "POAM_OVERDUE", seed_poam_overdue_data());
                event["id"] = serde_json::json!(Uuid::new_v4());
                let (status, body) = app.post_event(&event).await;
                assert_eq!(status, 202, "{body}");
            })
            .await;
    }

    // The slow endpoint needs 12.5 s for its hundred (eight at a time); the
    // fast tenant's 500 arrive long before, none handed back on the way.
    let started = std::time::Instant::now();
    fast.wait_for(5 * EVENTS, Duration::from_secs(15)).await;
    let took = started.elapsed();
    let slow_done = slow.received().len();
    eprintln!(
        "the fast bulk tenant's {} deliveries arrived {took:?} after the last event was posted, \
         while the slow one's endpoint had taken {slow_done}",
        5 * EVENTS
    );
    assert!(
        took < Duration::from_secs(6),
        "{took:?}: some were handed back behind the slow endpoint"
    );
    assert!(
        slow_done < EVENTS / 2,
        "the slow endpoint cannot have taken {slow_done} yet"
    );
    // Both floods went bulk but for each tenant's first event (the counter
    // is the process's: other tests may only have added to it).
    let metrics = aegis_webhook_core::metrics::render();
    let bulk = metrics
        .lines()
        .find(|line| line.starts_with("aegis_lane_enqueued_total{") && line.contains(r#"stream="tasks",lane="bulk""#))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse::<f64>().ok())
        .unwrap_or_default();
    assert!(
        bulk >= (6 * (EVENTS - 1)) as f64,
        "{bulk} deliveries went bulk:\n{metrics}"
    );
}
