//! The production path through the machine's RabbitMQ (and PostgreSQL): events
//! published by a plain AMQP client, invalid events parked with a reason, and
//! retries through the TTL tier queues to the dead-letter queue.

use std::sync::Arc;
use std::time::Duration;

use aegis_webhook_core::config::AmqpUrls;
use aegis_webhook_core::queue::consume::{Drain, Flow, consume};
use aegis_webhook_core::queue::{Consumer, LaneWeights, Queue as _, QueueMessage, Stream};
use aegis_webhook_rabbitmq::{Prefetch, REASON_HEADER, RabbitQueue, Topology};
use aegis_webhook_storage::deliveries::{self, DeliveryStatus};
use bytes::Bytes;
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::support::{
    Backend, Receiver, TestApp, amqp_url, envelope, eventually, scanner_channel, seed_poam_overdue_data,
    seed_vulnerability_data,
};

/// The whole system on RabbitMQ and PostgreSQL, with its own queue prefix.
async fn spawn(schedule: &str) -> Option<(TestApp, Channel, String)> {
    let channel = scanner_channel().await?;
    let prefix = format!("test-{}.", Uuid::new_v4().simple());
    let app = TestApp::spawn_with(Backend::Postgres, |config| {
        config.amqp_url = Some(aegis_webhook_core::config::AmqpUrls::parse(&amqp_url()).expect("AEGIS_TEST_AMQP_URL"));
        config.amqp_prefix = prefix.clone();
        // Throwaway topology: the broker deletes it once the test is gone.
        config.amqp_queue_expiry = Some(Duration::from_secs(120));
        config.retry_schedule = schedule.parse().expect("schedule");
    })
    .await?;
    Some((app, channel, prefix))
}

async fn publish_raw(channel: &Channel, exchange: &str, routing_key: &str, body: &[u8]) {
    channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions::default(),
            body,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
}

/// Takes every message now in `queue`, with its reason header.
async fn drain(channel: &Channel, queue: &str) -> Vec<(Vec<u8>, String)> {
    let mut messages = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic_get")
    {
        let reason = message
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|headers: &FieldTable| headers.inner().get(REASON_HEADER).cloned())
            .map(|value| match value {
                AMQPValue::LongString(text) => text.to_string(),
                other => format!("{other:?}"),
            })
            .unwrap_or_default();
        messages.push((message.delivery.data.clone(), reason));
    }
    messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_envelope_published_by_a_plain_amqp_client_is_delivered_signed() {
    let Some((app, channel, prefix)) = spawn("0s,250ms,500ms").await else {
        return;
    };
    let receiver = Receiver::start(&[], 200).await;
    let created = app
        .create_webhook(
            &receiver.url(),
            &["VULNERABILITY_DETECTED"],
            Some("your-webhook-secret"),
        )
        .await;

    let event = envelope(app.setup.tenant_id, "VULNERABILITY_DETECTED", seed_vulnerability_data());
    publish_raw(
        &channel,
        &format!("{prefix}aegis.events"),
        "VULNERABILITY_DETECTED",
        event.to_string().as_bytes(),
    )
    .await;

    let received = receiver.wait_for(1, Duration::from_secs(10)).await;
    crate::signature::assert_signed(&received[0], "your-webhook-secret");
    let body: serde_json::Value = serde_json::from_slice(&received[0].body).expect("JSON");
    assert_eq!(body["data"], seed_vulnerability_data());
    let webhook_id: aegis_webhook_core::ids::WebhookId = created["id"].as_str().expect("id").parse().expect("uuid");
    eventually(Duration::from_secs(5), "the delivery to succeed", || async {
        let rows = deliveries::deliveries_of_webhook(app.db(), webhook_id)
            .await
            .expect("query");
        (rows.len() == 1 && rows[0].status == DeliveryStatus::Succeeded).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_invalid_events_are_parked_with_a_reason_and_valid_ones_go_through() {
    let Some((app, channel, prefix)) = spawn("0s,250ms,500ms").await else {
        return;
    };
    let receiver = Receiver::start(&[], 200).await;
    app.create_webhook(&receiver.url(), &["POAM_OVERDUE"], None).await;
    let exchange = format!("{prefix}aegis.events");
    let valid = envelope(app.setup.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data());
    let mut bad_data = valid.clone();
    bad_data["data"]["daysOverdue"] = json!("five");

    publish_raw(&channel, &exchange, "POAM_OVERDUE", valid.to_string().as_bytes()).await;
    publish_raw(&channel, &exchange, "POAM_OVERDUE", b"\x00\xff garbage \xfe").await;
    publish_raw(&channel, &exchange, "whatever", br#"{"hello": "world"}"#).await;
    publish_raw(&channel, &exchange, "POAM_OVERDUE", bad_data.to_string().as_bytes()).await;
    // The strict intake's rules hold on this path too: they live in the parse.
    let duplicate_key = valid
        .to_string()
        .replacen(r#""data":{"#, r#""data":{"daysOverdue":1,"#, 1);
    assert_ne!(duplicate_key, valid.to_string());
    publish_raw(&channel, &exchange, "POAM_OVERDUE", duplicate_key.as_bytes()).await;
    let mut huge_cve = valid.clone();
    huge_cve["data"]["cveId"] = json!(format!("CVE-2024-{}", "1".repeat(200_000)));
    publish_raw(&channel, &exchange, "POAM_OVERDUE", huge_cve.to_string().as_bytes()).await;
    publish_raw(&channel, &exchange, "POAM_OVERDUE", valid.to_string().as_bytes()).await;

    receiver.wait_for(2, Duration::from_secs(10)).await;
    let invalid_queue = format!("{prefix}aegis.events.invalid");
    let mut parked = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while parked.len() < 5 && tokio::time::Instant::now() < deadline {
        parked.extend(drain(&channel, &invalid_queue).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The ingester takes envelopes concurrently, so they are parked in any order.
    let reasons: Vec<&str> = parked.iter().map(|(_, reason)| reason.as_str()).collect();
    assert_eq!(reasons.len(), 5, "{reasons:?}");
    let parked_for = |reason: &dyn Fn(&str) -> bool| {
        parked
            .iter()
            .find(|(_, parked_reason)| reason(parked_reason))
            .unwrap_or_else(|| panic!("a reason is missing: {reasons:?}"))
    };
    let garbage = parked_for(&|reason| reason.starts_with("malformed JSON"));
    assert_eq!(garbage.0, b"\x00\xff garbage \xfe", "the original bytes are kept");
    parked_for(&|reason| reason.contains("unknown field `hello`"));
    parked_for(&|reason| reason.starts_with("data.daysOverdue: invalid type"));
    parked_for(&|reason| reason == "data.daysOverdue: duplicate key");
    parked_for(&|reason| reason == "data.cveId: the sequence number of a CVE id must have 4 to 19 digits (got 200000)");
    assert_eq!(receiver.received().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_receiver_goes_through_the_tier_queues_to_the_dead_letter_queue() {
    let Some((app, channel, prefix)) = spawn("0s,300ms,600ms").await else {
        return;
    };
    let receiver = Receiver::start(&[], 500).await;
    let created = app.create_webhook(&receiver.url(), &["POAM_OVERDUE"], None).await;
    let (status, _) = app
        .post_event(&envelope(app.setup.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data()))
        .await;
    assert_eq!(status, 202);

    let webhook_id: aegis_webhook_core::ids::WebhookId = created["id"].as_str().expect("id").parse().expect("uuid");
    let delivery = eventually(Duration::from_secs(15), "the delivery to fail", || async {
        let rows = deliveries::deliveries_of_webhook(app.db(), webhook_id)
            .await
            .expect("query");
        rows.into_iter().find(|row| row.status == DeliveryStatus::Failed)
    })
    .await;
    assert_eq!(delivery.attempts, 3);
    let attempts = deliveries::attempts_of(app.db(), delivery.id).await.expect("attempts");
    assert_eq!(attempts.len(), 3);
    assert!(attempts.iter().all(|attempt| attempt.status_code == Some(500)));

    // The attempts were spaced by the schedule, through the broker's tiers.
    let received = receiver.received();
    assert_eq!(received.len(), 3);
    assert!(
        received[1].at - received[0].at >= Duration::from_millis(300),
        "{:?}",
        received[1].at - received[0].at
    );
    assert!(
        received[2].at - received[1].at >= Duration::from_millis(600),
        "{:?}",
        received[2].at - received[1].at
    );

    let dead = eventually(Duration::from_secs(5), "a dead letter", || async {
        let messages = drain(&channel, &format!("{prefix}aegis.deliveries.dead")).await;
        (!messages.is_empty()).then_some(messages)
    })
    .await;
    assert_eq!(dead.len(), 1);
    assert!(String::from_utf8_lossy(&dead[0].0).contains(&delivery.id.to_string()));
    assert_eq!(dead[0].1, "all 3 attempts failed");
}

/// The next message of `consumer`, within a few seconds.
async fn next_message(consumer: &mut Box<dyn Consumer>) -> QueueMessage {
    tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a message within 10 s")
        .expect("the consumer is open")
        .expect("a message, not an error")
}

/// The RabbitMQ adapter alone, on a throwaway topology of its own (the
/// broker deletes it if the test dies first), with a prefetch of 16 (the
/// events' express lane takes 32 times that); and a plain channel to look
/// at its queues with.
async fn adapter_alone() -> Option<(Channel, Topology, RabbitQueue)> {
    let channel = scanner_channel().await?;
    let prefix = format!("test-{}.", Uuid::new_v4().simple());
    let topology = Topology::new(&prefix, &[Duration::ZERO], Some(Duration::from_secs(120)));
    let queue = RabbitQueue::connect(
        &AmqpUrls::parse(&amqp_url()).expect("AEGIS_TEST_AMQP_URL"),
        topology.clone(),
        Prefetch { events: 16, tasks: 16 },
        LaneWeights::default(),
    )
    .await
    .expect("connect");
    Some((channel, topology, queue))
}

/// The adapter settles a channel's messages with as few frames as is safe
/// (one `multiple` ack up to where everything below is settled): against
/// the real broker, acking later messages never settles one still held,
/// a requeued one comes back, and those acked are gone. If an ack covered
/// the held message, the broker would drop it and the last check fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_after_a_held_message_never_settle_it_and_a_requeued_one_comes_back() {
    let Some((channel, topology, queue)) = adapter_alone().await else {
        return;
    };
    let publish = |bodies: std::ops::Range<u32>| {
        let queue = queue.clone();
        async move {
            for index in bodies {
                queue
                    .publish_event("POAM_OVERDUE", Bytes::from(format!("m{index}")))
                    .await
                    .expect("publish");
            }
        }
    };
    publish(0..4).await;
    let mut consumer = queue.consume(Stream::Events).await.expect("consume");
    let mut taken = Vec::new();
    for _ in 0..4 {
        taken.push(next_message(&mut consumer).await);
    }
    let bodies: Vec<&[u8]> = taken.iter().map(|message| &message.body[..]).collect();
    assert_eq!(bodies, [b"m0", b"m1", b"m2", b"m3"], "in publish order");
    let mut taken = taken.into_iter();
    let (held, first, requeued, last) = (
        taken.next().expect("m0"),
        taken.next().expect("m1"),
        taken.next().expect("m2"),
        taken.next().expect("m3"),
    );
    // m0 held throughout; m2 handed back; m1 and m3 acked around it.
    requeued.requeue().await.expect("requeue");
    first.ack().await.expect("ack");
    last.ack().await.expect("ack");
    let again = next_message(&mut consumer).await;
    assert_eq!(&again.body[..], b"m2", "the requeued message comes back");
    again.ack().await.expect("ack");
    // More after the held one, acked in reverse: the frames the coalescing
    // would merge if m0 did not stand in the way.
    publish(4..8).await;
    let mut later = Vec::new();
    for _ in 4..8 {
        later.push(next_message(&mut consumer).await);
    }
    for message in later.into_iter().rev() {
        message.ack().await.expect("ack");
    }
    // Closing the connection hands back what it holds unacknowledged: m0
    // alone, if every ack above covered exactly what it should.
    drop((held, consumer, queue));
    only_it_comes_back(&channel, &topology, b"m0").await;
}

/// Once the adapter's connections are closed: the one message `unsettled`
/// comes back to the events' express lane (and nothing acknowledged does);
/// then the topology is deleted.
async fn only_it_comes_back(channel: &Channel, topology: &Topology, unsettled: &[u8]) {
    let ingest = topology.ingest_queue();
    let back = eventually(
        Duration::from_secs(10),
        "the unsettled message back in the queue",
        || {
            let (channel, ingest) = (channel.clone(), ingest.clone());
            async move {
                channel
                    .basic_get(ingest.as_str().into(), BasicGetOptions { no_ack: true })
                    .await
                    .expect("basic_get")
            }
        },
    )
    .await;
    assert_eq!(&back.delivery.data[..], unsettled);
    assert!(back.delivery.redelivered, "it was delivered before");
    let rest = drain(channel, &ingest).await;
    assert!(rest.is_empty(), "acknowledged messages came back: {rest:?}");
    topology.delete(channel).await.expect("delete the topology");
}

/// Shutting down, the consume loop stops its consumer without closing its
/// channels: what the broker had sent it and it never took goes back at
/// once, for other consumers, while what it took is still acknowledged
/// through it until the role drops it. If stopping closed the channels, the
/// messages in progress would go back too and be ingested or delivered a
/// second time (an envelope without an id as a new event), and their acks
/// would fail; the ack of m0 below would then be refused, and m0 would come
/// back beside m1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_consumer_hands_back_what_it_never_took_and_still_acks_what_it_took() {
    let Some((channel, topology, queue)) = adapter_alone().await else {
        return;
    };
    for index in 0..8 {
        queue
            .publish_event("POAM_OVERDUE", Bytes::from(format!("m{index}")))
            .await
            .expect("publish");
    }
    // Two slots: the loop takes m0 and m1 and waits for a slot, holding the
    // other six as the broker sent them (the prefetch is larger).
    let shutdown = CancellationToken::new();
    let (taken_tx, mut taken) = tokio::sync::mpsc::unbounded_channel();
    let consuming = {
        let (queue, shutdown) = (queue.clone(), shutdown.clone());
        tokio::spawn(async move {
            consume(
                &queue,
                Stream::Events,
                "test",
                Arc::new(Semaphore::new(2)),
                None,
                &shutdown,
                Drain::Immediately,
                |message, permit| {
                    taken_tx.send((message, permit)).expect("the test holds the receiver");
                    async { Flow::Continue }
                },
            )
            .await
        })
    };
    let (first, _first_slot) = taken.recv().await.expect("m0 taken");
    let (held, _held_slot) = taken.recv().await.expect("m1 taken");
    assert_eq!((&first.body[..], &held.body[..]), (&b"m0"[..], &b"m1"[..]));
    shutdown.cancel();
    let stopped = consuming
        .await
        .expect("the loop's task")
        .expect("the loop ends cleanly");

    let ingest = topology.ingest_queue();
    let mut handed_back = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        handed_back.extend(drain(&channel, &ingest).await.into_iter().map(|(body, _)| body));
        if handed_back.len() >= 6 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of the six not taken went back while the consumer was kept",
            handed_back.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    handed_back.sort();
    let expected: Vec<Vec<u8>> = (2..8).map(|index| format!("m{index}").into_bytes()).collect();
    assert_eq!(handed_back, expected, "exactly the messages never taken went back");

    // The stopped consumer's channel still settles what was taken.
    first
        .ack()
        .await
        .expect("a message taken before the stop is acked after it");
    // Dropping it closes the channels: m1, never settled, goes back; m0,
    // acked, does not.
    drop((held, stopped, queue));
    only_it_comes_back(&channel, &topology, b"m1").await;
}

/// A TCP forwarder to the machine's RabbitMQ that a test can cut: while cut,
/// it accepts connections and closes them at once (the broker away, as
/// publishers see it), counting them.
struct CuttableBroker {
    address: std::net::SocketAddr,
    away: Arc<std::sync::atomic::AtomicBool>,
    refused: Arc<std::sync::atomic::AtomicUsize>,
    forwarding: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accepting: tokio::task::AbortHandle,
}

impl CuttableBroker {
    /// Forwards a free port to the broker at `upstream`.
    async fn start(upstream: String) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind the forwarder");
        let address = listener.local_addr().expect("its address");
        let away = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let forwarding: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let accepting = {
            let (away, refused, forwarding) = (away.clone(), refused.clone(), forwarding.clone());
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if away.load(Ordering::SeqCst) {
                        refused.fetch_add(1, Ordering::SeqCst);
                        drop(client);
                        continue;
                    }
                    let upstream = upstream.clone();
                    let task = tokio::spawn(async move {
                        if let Ok(mut broker) = tokio::net::TcpStream::connect(&upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
                        }
                    });
                    forwarding.lock().expect("lock").push(task.abort_handle());
                }
            })
            .abort_handle()
        };
        CuttableBroker {
            address,
            away,
            refused,
            forwarding,
            accepting,
        }
    }

    /// Closes every connection through it, and refuses new ones.
    fn cut(&self) {
        self.away.store(true, std::sync::atomic::Ordering::SeqCst);
        for task in self.forwarding.lock().expect("lock").drain(..) {
            task.abort();
        }
    }

    /// Forwards new connections again.
    fn restore(&self) {
        self.away.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Connections refused while cut.
    fn refused(&self) -> usize {
        self.refused.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Drop for CuttableBroker {
    fn drop(&mut self) {
        self.cut();
        self.accepting.abort();
    }
}

/// While the broker is away, publishers do not each try a connect in turn
/// (every intake request, every retry, one after another under one lock):
/// after a failed connect, publishes fail at once until a short, growing
/// wait has passed; and once the broker is back, publishing resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_wait_between_connects_while_the_broker_is_away_and_resume_after() {
    if scanner_channel().await.is_none() {
        return;
    }
    let urls = AmqpUrls::parse(&amqp_url()).expect("AEGIS_TEST_AMQP_URL");
    let real = &urls.urls()[0];
    let broker = CuttableBroker::start(real.address().to_owned()).await;
    let proxied = real.expose().replacen(real.address(), &broker.address.to_string(), 1);
    let prefix = format!("test-{}.", Uuid::new_v4().simple());
    let topology = Topology::new(&prefix, &[Duration::ZERO], Some(Duration::from_secs(120)));
    let queue = RabbitQueue::connect(
        &AmqpUrls::parse(&proxied).expect("the forwarder's URL"),
        topology,
        Prefetch { events: 16, tasks: 16 },
        LaneWeights::default(),
    )
    .await
    .expect("connect");
    let publish = || queue.publish_event("POAM_OVERDUE", Bytes::from_static(b"{}"));
    publish().await.expect("published through the forwarder");

    broker.cut();
    // A publish notices the loss and tries to connect: refused.
    eventually(Duration::from_secs(30), "a connect to be refused", || async {
        let _ = publish().await;
        (broker.refused() > 0).then_some(())
    })
    .await;
    // Fifty more publishes at once: each fails, and no more than a few
    // connects are tried (one per wait, 100 ms doubling).
    let started = tokio::time::Instant::now();
    let before = broker.refused();
    for _ in 0..50 {
        let error = publish().await.expect_err("the broker is away");
        let error = format!("{error:#}");
        assert!(
            error.contains("the next connect is in") || error.contains("RabbitMQ"),
            "{error}"
        );
    }
    let tried = broker.refused() - before;
    let waits_passed = started.elapsed().as_millis() / 100 + 1;
    assert!(
        tried as u128 <= waits_passed,
        "{tried} connects tried by 50 publishes in {:?}",
        started.elapsed()
    );

    broker.restore();
    eventually(Duration::from_secs(30), "publishing to resume", || async {
        publish().await.ok()
    })
    .await;
}
