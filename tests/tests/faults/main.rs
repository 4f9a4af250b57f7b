//! Fault tests of the production path: the API, the ingester and workers as
//! separate OS processes around PostgreSQL and RabbitMQ, with processes killed,
//! stopped and the broker restarted mid-run. Every delivery must still arrive
//! (counted by distinct `X-Aegis-Delivery`); duplicates are reported.
//!
//! These tests restart the shared broker, so they run one at a time, in their
//! own test binary (cargo runs test binaries one after another). Alone in
//! their binary, they can also read the process's own metrics
//! (`publish_failures`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use aegis_webhook_tests::processes::{ProcessCluster, RoleProcess, role_process_main};
use aegis_webhook_tests::support::{Receiver, envelope, scanner_channel, seed_poam_overdue_data};
use futures::StreamExt as _;
use uuid::Uuid;

mod attacks;
mod cluster;
mod fairness;
mod publish_failures;
mod startup;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "not a test: the child process that the fault tests spawn"]
async fn role_process() {
    role_process_main().await;
}

/// One fault test at a time: they share the broker, and one restarts it.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const WEBHOOKS: usize = 3;

/// A process cluster (see [`ProcessCluster`]) with a tenant and three webhooks
/// on one receiver, quick retries and a quick reconciler.
struct Cluster {
    processes: ProcessCluster,
    tenant_id: aegis_webhook_core::ids::TenantId,
    ingest_token: String,
    receiver: Receiver,
}

impl Cluster {
    async fn prepare(receiver_delay: Duration) -> Option<Cluster> {
        Some(Self::prepare_on(ProcessCluster::prepare("faults").await?, receiver_delay).await)
    }

    /// The tenant, receiver and settings of every fault test, on `processes`
    /// (the machine's broker, or another).
    async fn prepare_on(mut processes: ProcessCluster, receiver_delay: Duration) -> Cluster {
        let receiver = Receiver::start_slow(&[], 200, receiver_delay).await;
        let tenant_id = processes.tenant_with_webhooks("acme", &receiver.url(), WEBHOOKS).await;
        for (key, value) in [
            ("AEGIS_DATABASE_MAX_CONNECTIONS", "8"),
            ("AEGIS_RETRY_SCHEDULE", "0s,500ms,1s,2s,5s,10s"),
            ("AEGIS_REQUEST_TIMEOUT", "2s"),
            // A killed worker's claims end 6 s after they were taken (not
            // 12 s): time enough for the live workers' records under load.
            ("AEGIS_CLAIM_MARGIN", "4s"),
            ("AEGIS_RECONCILE_INTERVAL", "1s"),
            ("AEGIS_RECONCILE_GRACE", "2s"),
            ("AEGIS_SHUTDOWN_GRACE", "10s"),
            ("AEGIS_WORKER_CONCURRENCY", "32"),
        ] {
            processes.set(key, value);
        }
        Cluster {
            ingest_token: processes.ingest_token.clone(),
            processes,
            tenant_id,
            receiver,
        }
    }

    fn with(&self, key: &str, value: &str) -> Vec<(String, String)> {
        self.processes.with(key, value)
    }

    async fn spawn(&self, role: &'static str) -> RoleProcess {
        self.processes.spawn(role).await
    }

    /// Posts `count` distinct events to the intake, 8 at a time, retrying each
    /// until it is accepted (as a scanner does while the broker is down).
    async fn publish(&self, api: &RoleProcess, count: usize) {
        self.publish_counting(api, count, &Published::default()).await;
    }

    /// [`Cluster::publish`], counting in `published` the events accepted and
    /// the answers 503 (broker unavailable) on the way.
    async fn publish_counting(&self, api: &RoleProcess, count: usize, published: &Published) {
        let url = format!("http://{}/v1/events", api.addr.expect("the API listens"));
        let client = reqwest::Client::new();
        futures::stream::iter(0..count)
            .for_each_concurrent(8, |_| {
                let client = client.clone();
                let url = url.clone();
                let mut event = envelope(self.tenant_id, "POAM_OVERDUE", seed_poam_overdue_data());
                event["id"] = serde_json::json!(Uuid::new_v4());
                async move {
                    let deadline = Instant::now() + Duration::from_secs(120);
                    loop {
                        let response = client
                            .post(&url)
                            .bearer_auth(&self.ingest_token)
                            .json(&event)
                            .send()
                            .await;
                        match response {
                            Ok(response) if response.status() == 202 => {
                                published.accepted.fetch_add(1, Ordering::Relaxed);
                                return;
                            }
                            Ok(response) if response.status() == 503 => {
                                published.unavailable.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(response) => panic!("intake answered {}", response.status()),
                            Err(error) => panic!("intake unreachable: {error}"),
                        }
                        assert!(Instant::now() < deadline, "an event was not accepted within 120 s");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            })
            .await;
    }

    /// Distinct delivery ids received so far, and all requests.
    fn tally(&self) -> (usize, usize) {
        let received = self.receiver.received();
        let distinct: HashSet<String> = received
            .iter()
            .map(|request| request.header("x-aegis-delivery").to_owned())
            .collect();
        (distinct.len(), received.len())
    }

    /// Waits until `expected` distinct deliveries arrived; reports duplicates.
    async fn expect_all(&self, expected: usize, within: Duration, scenario: &str) {
        let deadline = Instant::now() + within;
        loop {
            let (distinct, total) = self.tally();
            if distinct >= expected {
                // Straight to stderr, past the test harness's capture: the
                // duplicate count belongs in every run's log.
                let report = format!(
                    "[{scenario}] {distinct} distinct deliveries of {expected} expected, {} duplicates\n",
                    total - distinct
                );
                let _ = std::io::Write::write_all(&mut std::io::stderr(), report.as_bytes());
                assert_eq!(distinct, expected, "no delivery that was never fanned out");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "[{scenario}] only {distinct} of {expected} distinct deliveries arrived within {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The fault must hit while deliveries are still on their way.
    fn assert_mid_run(&self, expected: usize) {
        let (distinct, _) = self.tally();
        assert!(
            distinct < expected,
            "the fault came too late: {distinct} of {expected} already delivered"
        );
    }

    async fn wait_for_received(&self, at_least: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.tally().1 < at_least {
            assert!(Instant::now() < deadline, "deliveries stalled before the fault");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// What [`Cluster::publish_counting`] has seen so far.
#[derive(Default)]
struct Published {
    accepted: AtomicUsize,
    unavailable: AtomicUsize,
}

/// A prepared cluster with its API, ingester and two workers running.
struct Running {
    cluster: Cluster,
    api: RoleProcess,
    /// Bind it (not `..`) so the process lives as long as the test: an
    /// unbound field is dropped, and a dropped `RoleProcess` is killed.
    _ingester: RoleProcess,
    workers: Vec<RoleProcess>,
}

impl Running {
    async fn start(receiver_delay: Duration) -> Option<Running> {
        Some(Self::start_on(Cluster::prepare(receiver_delay).await?).await)
    }

    async fn start_on(cluster: Cluster) -> Running {
        let api = cluster.spawn("api").await;
        let _ingester = cluster.spawn("ingester").await;
        let workers = vec![cluster.spawn("worker").await, cluster.spawn("worker").await];
        Running {
            cluster,
            api,
            _ingester,
            workers,
        }
    }
}

const EVENTS: usize = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separate_processes_deliver_every_fanned_out_event() {
    let _serial = SERIAL.lock().await;
    let Some(Running {
        cluster,
        api,
        workers: _workers,
        _ingester,
    }) = Running::start(Duration::ZERO).await
    else {
        return;
    };

    cluster.publish(&api, EVENTS).await;
    cluster
        .expect_all(EVENTS * WEBHOOKS, Duration::from_secs(180), "two workers")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_run_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let Some(Running {
        cluster,
        api,
        mut workers,
        _ingester,
    }) = Running::start(Duration::ZERO).await
    else {
        return;
    };
    let mut doomed = workers.remove(0);

    let publishing = cluster.publish(&api, EVENTS);
    let killing = async {
        cluster.wait_for_received(EVENTS * WEBHOOKS / 3).await;
        doomed.kill().await;
        cluster.assert_mid_run(EVENTS * WEBHOOKS);
    };
    tokio::join!(publishing, killing);
    cluster
        .expect_all(EVENTS * WEBHOOKS, Duration::from_secs(180), "worker SIGKILLed")
        .await;
}

fn rabbitmqctl(command: &str) {
    let status = std::process::Command::new("rabbitmqctl")
        .arg(command)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|error| panic!("rabbitmqctl {command}: {error}"));
    assert!(status.success(), "rabbitmqctl {command} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_run_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let Some(Running {
        cluster,
        api,
        workers: _workers,
        _ingester,
    }) = Running::start(Duration::ZERO).await
    else {
        return;
    };

    let publishing = cluster.publish(&api, EVENTS);
    let restarting = async {
        cluster.wait_for_received(EVENTS * WEBHOOKS / 3).await;
        cluster.assert_mid_run(EVENTS * WEBHOOKS);
        // Blocking commands, run off the async threads.
        tokio::task::spawn_blocking(|| {
            rabbitmqctl("stop_app");
            std::thread::sleep(Duration::from_secs(2));
            rabbitmqctl("start_app");
        })
        .await
        .expect("restart the broker");
        cluster.processes.await_queues_answer(Duration::from_secs(60)).await;
    };
    tokio::join!(publishing, restarting);
    cluster
        .expect_all(EVENTS * WEBHOOKS, Duration::from_secs(240), "broker restarted")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ingester_killed_between_commit_and_publish_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = Cluster::prepare(Duration::ZERO).await else {
        return;
    };
    let api = cluster.spawn("api").await;
    let _worker = cluster.spawn("worker").await;
    let crashing = cluster.with(aegis_webhook_ingester::CRASH_AFTER_COMMIT_ENV, "1");
    let mut ingester = RoleProcess::spawn("ingester", &crashing).await;

    cluster.publish(&api, 1).await;
    let status = ingester.wait(Duration::from_secs(30)).await;
    assert!(!status.success(), "the ingester aborted after committing the fan-out");

    // The envelope was never acknowledged: a new ingester gets it again, sees
    // the event is already stored, and the reconciler publishes its deliveries.
    let _ingester = cluster.spawn("ingester").await;
    cluster
        .expect_all(WEBHOOKS, Duration::from_secs(60), "ingester killed after commit")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_on_a_busy_worker_finishes_or_hands_back_its_work_and_exits_zero() {
    let _serial = SERIAL.lock().await;
    let Some(Running {
        cluster,
        api,
        mut workers,
        _ingester,
    }) = Running::start(Duration::from_millis(200)).await
    else {
        return;
    };
    // This worker drains as the manifests configure it, and must be gone before
    // Kubernetes would SIGKILL it.
    let manifests = ManifestGrace::read();
    drop(workers.remove(0));
    let stopping = RoleProcess::spawn(
        "worker",
        &cluster.with(
            "AEGIS_SHUTDOWN_GRACE",
            &format!("{}s", manifests.shutdown_grace.as_secs()),
        ),
    )
    .await;

    let events = 200;
    cluster.publish(&api, events).await;
    cluster.wait_for_received(events * WEBHOOKS / 4).await;
    cluster.assert_mid_run(events * WEBHOOKS);
    let sent_at = Instant::now();
    let status = stopping.terminate(manifests.termination_grace).await;
    let drained_in = sent_at.elapsed();
    assert_eq!(status.code(), Some(0), "a worker stopped by SIGTERM exits 0");
    assert!(
        drained_in < manifests.termination_grace,
        "drained in {drained_in:?}, past the pod's grace period {:?}",
        manifests.termination_grace
    );
    cluster
        .expect_all(events * WEBHOOKS, Duration::from_secs(120), "worker SIGTERMed")
        .await;
}

/// The worker's drain settings as deploy/ ships them.
struct ManifestGrace {
    /// `terminationGracePeriodSeconds` of the worker Deployment.
    termination_grace: Duration,
    /// `AEGIS_SHUTDOWN_GRACE` of the ConfigMap.
    shutdown_grace: Duration,
}

impl ManifestGrace {
    fn read() -> ManifestGrace {
        let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/base");
        let worker = std::fs::read_to_string(deploy.join("worker.yaml")).expect("deploy/base/worker.yaml");
        let config = std::fs::read_to_string(deploy.join("config.env")).expect("deploy/base/config.env");
        let termination_grace = worker
            .lines()
            .find_map(|line| line.trim().strip_prefix("terminationGracePeriodSeconds:"))
            .and_then(|value| value.trim().parse().ok())
            .map(Duration::from_secs)
            .expect("the worker sets terminationGracePeriodSeconds");
        let shutdown_grace = config
            .lines()
            .find_map(|line| line.strip_prefix("AEGIS_SHUTDOWN_GRACE="))
            .and_then(|value| humantime::parse_duration(value.trim()).ok())
            .expect("the ConfigMap sets AEGIS_SHUTDOWN_GRACE");
        assert!(shutdown_grace < termination_grace, "the manifests' drain cannot fit");
        ManifestGrace {
            termination_grace,
            shutdown_grace,
        }
    }
}

/// The value of one sample (`name{labels}` exactly as exposed) in a scrape.
fn sample(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn scrape(process: &RoleProcess) -> String {
    let url = format!("http://{}/metrics", process.addr.expect("every process listens"));
    let response = reqwest::get(&url).await.expect("scrape");
    assert_eq!(response.status(), 200, "{url}");
    response.text().await.expect("metrics text")
}

/// After a small run with one endpoint that answers 410 Gone and one invalid
/// event, each process's /metrics holds the documented series with the values
/// the run must have produced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_exports_the_documented_metrics_with_the_right_values() {
    let _serial = SERIAL.lock().await;
    let Some(cluster) = Cluster::prepare(Duration::ZERO).await else {
        return;
    };
    let api_key = format!("key-{}", Uuid::new_v4().simple());
    let settings = cluster.with("AEGIS_BOOTSTRAP_API_KEY", &api_key);
    let api = RoleProcess::spawn("api", &settings).await;
    let ingester = RoleProcess::spawn("ingester", &settings).await;
    let worker = RoleProcess::spawn("worker", &settings).await;

    // A fourth webhook, of tenant `default`, whose endpoint is gone.
    let gone = Receiver::start(&[], 410).await;
    let graphql = format!("http://{}/graphql", api.addr.expect("the API listens"));
    let client = reqwest::Client::new();
    let call = |query: &'static str, variables: serde_json::Value| {
        let (client, graphql, api_key) = (client.clone(), graphql.clone(), api_key.clone());
        async move {
            let answer: serde_json::Value = client
                .post(&graphql)
                .bearer_auth(&api_key)
                .json(&serde_json::json!({ "query": query, "variables": variables }))
                .send()
                .await
                .expect("GraphQL")
                .json()
                .await
                .expect("JSON");
            assert!(answer["errors"].is_null(), "{answer}");
            answer
        }
    };
    let created = call(
        "mutation($input: WebhookInput!) { createWebhook(input: $input) { id } }",
        serde_json::json!({ "input": { "url": gone.url(), "events": ["POAM_OVERDUE"] } }),
    )
    .await;
    let gone_id = created["data"]["createWebhook"]["id"].clone();
    let default_tenant = {
        let answer = call("{ tenant { id } }", serde_json::json!({})).await;
        answer["data"]["tenant"]["id"].as_str().map(str::to_owned)
    };
    let default_tenant: aegis_webhook_core::ids::TenantId =
        default_tenant.expect("the viewer's tenant").parse().expect("uuid");
    let mut to_default = envelope(default_tenant, "POAM_OVERDUE", seed_poam_overdue_data());
    to_default["id"] = serde_json::json!(Uuid::new_v4());
    let answer = client
        .post(format!("http://{}/v1/events", api.addr.expect("listens")))
        .bearer_auth(&cluster.ingest_token)
        .json(&to_default)
        .send()
        .await
        .expect("intake");
    assert_eq!(answer.status(), 202);
    gone.wait_for(1, Duration::from_secs(30)).await;

    // Four events to the three healthy webhooks, and one envelope that is not JSON.
    let events = 4;
    cluster.publish(&api, events).await;
    let channel = scanner_channel().await.expect("RabbitMQ");
    let prefix = cluster
        .processes
        .settings()
        .iter()
        .find(|(key, _)| key == "AEGIS_AMQP_PREFIX")
        .map(|(_, value)| value.clone())
        .expect("prefix");
    channel
        .basic_publish(
            format!("{prefix}aegis.events").into(),
            "POAM_OVERDUE".into(),
            lapin::options::BasicPublishOptions::default(),
            b"{not json",
            lapin::BasicProperties::default(),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    cluster
        .expect_all(events * WEBHOOKS, Duration::from_secs(60), "metrics")
        .await;

    // Back on: the API counts the re-enable.
    call(
        "mutation($id: ID!) { setWebhookActive(id: $id, active: true) { active } }",
        serde_json::json!({ "id": gone_id }),
    )
    .await;

    let ingested = (events + 1) as f64;
    let delivered = (events * WEBHOOKS) as f64;
    let expectations: [(&RoleProcess, &str, f64); 16] = [
        (
            &ingester,
            r#"aegis_events_ingested_total{event_type="POAM_OVERDUE"}"#,
            ingested,
        ),
        (&ingester, r#"aegis_events_invalid_total{reason="malformed"}"#, 1.0),
        (&ingester, r#"aegis_queue_consumer_up{queue="events"}"#, 1.0),
        (
            &worker,
            r#"aegis_delivery_attempts_total{outcome="success"}"#,
            delivered,
        ),
        (&worker, r#"aegis_delivery_attempts_total{outcome="gone"}"#, 1.0),
        (
            &worker,
            r#"aegis_deliveries_completed_total{status="succeeded"}"#,
            delivered,
        ),
        (&worker, r#"aegis_deliveries_completed_total{status="failed"}"#, 1.0),
        (&worker, "aegis_deliveries_dead_lettered_total", 1.0),
        (&worker, r#"aegis_webhooks_auto_disabled_total{reason="gone"}"#, 1.0),
        (
            &worker,
            "aegis_delivery_attempt_duration_seconds_count",
            delivered + 1.0,
        ),
        (&worker, "aegis_event_delivery_lag_seconds_count", delivered),
        (&worker, "aegis_deliveries_in_flight", 0.0),
        (&worker, r#"aegis_queue_consumer_up{queue="tasks"}"#, 1.0),
        (&api, "aegis_webhooks_reenabled_total", 1.0),
        // Nothing retried: every endpoint answered at once.
        (&worker, r#"aegis_delivery_attempts_total{outcome="retry"}"#, f64::NAN),
        (
            &api,
            r#"aegis_events_ingested_total{event_type="POAM_OVERDUE"}"#,
            f64::NAN,
        ),
    ];
    let scrapes = [
        ("api", scrape(&api).await),
        ("ingester", scrape(&ingester).await),
        ("worker", scrape(&worker).await),
    ];
    for (process, series, expected) in expectations {
        let text = &scrapes
            .iter()
            .find(|(role, _)| *role == process.role)
            .expect("scraped")
            .1;
        let value = sample(text, series);
        if expected.is_nan() {
            assert_eq!(value, None, "{} should not export {series}", process.role);
        } else {
            assert_eq!(value, Some(expected), "{}: {series}\n{text}", process.role);
        }
    }
    // The exported metrics are the catalogue's, and the operations guide
    // documents every one of them.
    let catalogue: Vec<&str> = aegis_webhook_core::metrics::CATALOGUE
        .iter()
        .map(|(name, _)| *name)
        .collect();
    for (role, text) in &scrapes {
        for line in text.lines().filter(|line| line.starts_with("aegis_")) {
            let series = line.split(['{', ' ']).next().expect("a name");
            let name = ["_count", "_sum", "_bucket"]
                .iter()
                .find_map(|suffix| series.strip_suffix(suffix))
                .unwrap_or(series);
            assert!(
                catalogue.contains(&name),
                "{role} exports {name}, which is not in the catalogue"
            );
        }
    }
    let guide = std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/operations.md"))
        .expect("docs/operations.md");
    for name in catalogue {
        assert!(
            guide.contains(&format!("`{name}")),
            "docs/operations.md does not document {name}"
        );
    }
    drop((api, ingester, worker));
}
