//! Fair sharing between tenants across separate processes (an ingester and a
//! worker on PostgreSQL and RabbitMQ): tenant A floods, tenant B then sends a
//! few events. With fairness on, B's deliveries overtake A's backlog; with it
//! off, they wait behind it (first in, first out), so the test measures the
//! mechanism and not the machine. Either way every one of A's deliveries
//! arrives.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use aegis_webhook_tests::processes::ProcessCluster;
use aegis_webhook_tests::support::{Receiver, envelope, scanner_channel, seed_poam_overdue_data};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use uuid::Uuid;

/// A's flood: events, each to every one of A's webhooks.
const FLOOD_EVENTS: usize = 1_000;
const FLOOD_WEBHOOKS: usize = 5;
/// B's events, one webhook, sent once A's flood is in.
const TRICKLE_EVENTS: usize = 5;

/// What one run saw.
struct Race {
    /// For each of B's deliveries, the share of A's deliveries that had
    /// arrived before it.
    flood_done_at_trickle: Vec<f64>,
    /// For each of B's deliveries, from its publish to its arrival.
    trickle_latency: Vec<Duration>,
}

async fn flood_then_trickle(fairness: &str) -> Option<Race> {
    let mut cluster = ProcessCluster::prepare("fairness").await?;
    // 16 attempts at once, 10 ms each: A's 5,000 deliveries take 3 s or more
    // to drain, a backlog B's events land behind.
    let flood_receiver = Receiver::start_slow(&[], 200, Duration::from_millis(10)).await;
    let trickle_receiver = Receiver::start(&[], 200).await;
    let flood = cluster
        .tenant_with_webhooks("flood", &flood_receiver.url(), FLOOD_WEBHOOKS)
        .await;
    let trickle = cluster
        .tenant_with_webhooks("trickle", &trickle_receiver.url(), 1)
        .await;
    cluster.set("AEGIS_FAIRNESS", fairness);
    cluster.set("AEGIS_WORKER_CONCURRENCY", "16");
    // Shares in proportion to this small worker (at most 1,600 deliveries a
    // second here, against thousands in production): a flood's burst in the
    // express lane, before its share runs out, is what B may find ahead of
    // it, and the default 500 would be a third of a second of this worker.
    cluster.set("AEGIS_FAIR_SHARE_DELIVERIES_PER_SECOND", "50");
    cluster.set("AEGIS_FAIR_SHARE_DELIVERY_BURST", "100");
    cluster.set("AEGIS_DATABASE_MAX_CONNECTIONS", "8");
    let ingester = cluster.spawn("ingester").await;
    let worker = cluster.spawn("worker").await;

    let channel = scanner_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    let exchange = cluster
        .settings()
        .iter()
        .find(|(key, _)| key == "AEGIS_AMQP_PREFIX")
        .map(|(_, prefix)| format!("{prefix}aegis.events"))
        .expect("prefix");
    let publish = |tenant| publish_event(&channel, &exchange, tenant);
    // The flood, as fast as the broker takes it (confirms awaited at the end).
    let mut confirms = Vec::with_capacity(FLOOD_EVENTS);
    for _ in 0..FLOOD_EVENTS {
        confirms.push(publish(flood).await);
    }
    for confirm in confirms {
        confirm.await.expect("confirmed");
    }
    // Then the trickle, one every 50 ms (the load's shape, not a wait).
    let mut published = Vec::with_capacity(TRICKLE_EVENTS);
    let mut pace = tokio::time::interval(Duration::from_millis(50));
    for _ in 0..TRICKLE_EVENTS {
        pace.tick().await;
        published.push(Instant::now());
        publish(trickle).await.await.expect("confirmed");
    }

    let trickled = trickle_receiver.wait_for(TRICKLE_EVENTS, Duration::from_secs(60)).await;
    let expected = FLOOD_EVENTS * FLOOD_WEBHOOKS;
    let deadline = Instant::now() + Duration::from_secs(90);
    let flooded = loop {
        let received = flood_receiver.received();
        let distinct: HashSet<&str> = received
            .iter()
            .map(|request| request.header("x-aegis-delivery"))
            .collect();
        if distinct.len() >= expected {
            let report = format!(
                "[fairness {fairness}] {} distinct deliveries of A's {expected}, {} duplicates\n",
                distinct.len(),
                received.len() - distinct.len()
            );
            let _ = std::io::Write::write_all(&mut std::io::stderr(), report.as_bytes());
            assert_eq!(distinct.len(), expected, "only deliveries that were fanned out");
            break received;
        }
        assert!(
            Instant::now() < deadline,
            "[fairness {fairness}] only {} of A's {expected} deliveries arrived within 90 s",
            distinct.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop((ingester, worker));

    let mut arrivals: Vec<Instant> = trickled.iter().map(|request| request.at).collect();
    arrivals.sort_unstable();
    let flood_done_at_trickle = arrivals
        .iter()
        .map(|arrived| flooded.iter().filter(|request| request.at < *arrived).count() as f64 / expected as f64)
        .collect();
    let trickle_latency = arrivals
        .iter()
        .zip(&published)
        .map(|(arrived, sent)| arrived.saturating_duration_since(*sent))
        .collect();
    Some(Race {
        flood_done_at_trickle,
        trickle_latency,
    })
}

/// Publishes one `POAM_OVERDUE` event of `tenant`; the broker's confirm is
/// what comes back, to be awaited when the caller chooses.
async fn publish_event(
    channel: &lapin::Channel,
    exchange: &str,
    tenant: aegis_webhook_core::ids::TenantId,
) -> lapin::PublisherConfirm {
    let mut event = envelope(tenant, "POAM_OVERDUE", seed_poam_overdue_data());
    event["id"] = serde_json::json!(Uuid::new_v4());
    channel
        .basic_publish(
            exchange.into(),
            "POAM_OVERDUE".into(),
            BasicPublishOptions::default(),
            event.to_string().as_bytes(),
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_events_overtake_another_tenants_flood_only_with_fairness_on() {
    let _serial = crate::SERIAL.lock().await;
    let Some(fair) = flood_then_trickle("on").await else {
        return;
    };
    let Some(fifo) = flood_then_trickle("off").await else {
        return;
    };
    let report = format!(
        "[fairness] share of A's flood delivered when each of B's deliveries arrived: on {:?}, off {:?}; \
         B's latency: on {:?}, off {:?}\n",
        fair.flood_done_at_trickle, fifo.flood_done_at_trickle, fair.trickle_latency, fifo.trickle_latency
    );
    let _ = std::io::Write::write_all(&mut std::io::stderr(), report.as_bytes());
    // On: all of B's arrive while most of A's backlog still waits.
    assert!(
        fair.flood_done_at_trickle.iter().all(|done| *done < 0.5),
        "with fairness on, B waited behind A: {report}"
    );
    // And B's wait is a fraction of what it is behind the flood.
    let slowest_fair = fair.trickle_latency.iter().max().expect("some");
    let fastest_fifo = fifo.trickle_latency.iter().min().expect("some");
    assert!(
        *slowest_fair * 4 < *fastest_fifo,
        "with fairness on B still waited {slowest_fair:?}: {report}"
    );
    // Off: B's wait behind nearly all of the flood published before them.
    assert!(
        fifo.flood_done_at_trickle.iter().all(|done| *done > 0.8),
        "with fairness off, B still overtook A, so the first check did not measure fairness: {report}"
    );
}
