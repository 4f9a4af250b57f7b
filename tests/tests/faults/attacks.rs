//! Hostile GraphQL requests against a running API process (issue 14): the
//! 250-alias page query and the fragment bomb are refused at once, the
//! process keeps answering its probes and the intake meanwhile, and its
//! memory does not grow. A separate process, so its resident memory is its
//! own.

use std::time::{Duration, Instant};

use aegis_webhook_storage::tenants;
use aegis_webhook_tests::processes::ProcessCluster;
use aegis_webhook_tests::support::{envelope, seed_poam_overdue_data};

/// The alias attack of issue 14: 250 aliases of a full page of webhooks with
/// their stats (about 12 KB).
fn alias_query() -> String {
    let aliases: String = (0..250)
        .map(|i| format!(" a{i}: webhooks(first: 100) {{ nodes {{ stats {{ succeeded }} }} }}"))
        .collect();
    format!("{{{aliases} }}")
}

/// The fragment bomb of issue 14: each fragment spreads the one before twice,
/// 2^29 spreads in about 1.2 KB.
fn fragment_bomb() -> String {
    let mut query = String::from("{ tenant { ...F29 } }\nfragment F0 on Tenant { id }\n");
    for level in 1..=29 {
        query.push_str(&format!(
            "fragment F{level} on Tenant {{ ...F{} ...F{} }}\n",
            level - 1,
            level - 1
        ));
    }
    query
}

const REFUSED_WITHIN: Duration = Duration::from_millis(100);
const PROBE_WITHIN: Duration = Duration::from_millis(50);
const MAX_GROWTH: u64 = 50 * 1024 * 1024;
const ROUNDS: usize = 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_queries_are_refused_at_once_while_probes_and_the_intake_answer() {
    let _serial = crate::SERIAL.lock().await;
    let Some(mut cluster) = ProcessCluster::prepare("attacks").await else {
        return;
    };
    let key = tenants::generate_api_key();
    cluster.set("AEGIS_BOOTSTRAP_API_KEY", key.clone());
    // Enough rate for the attack itself to reach the server every time.
    cluster.set("AEGIS_API_RATE_LIMIT", "1000");
    cluster.set("AEGIS_API_RATE_BURST", "1000");
    let tenant_id = cluster
        .tenant_with_webhooks("default", "http://127.0.0.1:9/unused", 100)
        .await;
    let api = cluster.spawn("api").await;
    let addr = api.addr.expect("the API listens");
    let client = reqwest::Client::new();
    let graphql = format!("http://{addr}/graphql");
    let healthz = format!("http://{addr}/healthz");
    let intake = format!("http://{addr}/v1/events");
    let event = envelope(tenant_id, "POAM_OVERDUE", seed_poam_overdue_data());

    // Warm: the first requests open connections and fill caches.
    for _ in 0..3 {
        let answer: serde_json::Value = client
            .post(&graphql)
            .bearer_auth(&key)
            .json(&serde_json::json!({ "query": "{ webhooks(first: 5) { nodes { id stats { succeeded } } } }" }))
            .send()
            .await
            .expect("query")
            .json()
            .await
            .expect("JSON");
        assert!(answer["errors"].is_null(), "{answer}");
        client.get(&healthz).send().await.expect("healthz");
    }
    let before = api.resident_bytes();

    let attacks = [
        ("the alias query", alias_query()),
        ("the fragment bomb", fragment_bomb()),
    ];
    let mut slowest_refusal = Duration::ZERO;
    let mut slowest_health = Duration::ZERO;
    let mut intake_times = Vec::new();
    for _ in 0..ROUNDS {
        for (name, query) in &attacks {
            // The attack and the probes at the same time.
            let attack = async {
                let sent = Instant::now();
                let response = client
                    .post(&graphql)
                    .bearer_auth(&key)
                    .json(&serde_json::json!({ "query": query }))
                    .send()
                    .await
                    .expect("attack");
                let answer: serde_json::Value = response.json().await.expect("JSON");
                (sent.elapsed(), answer)
            };
            let probes = async {
                let sent = Instant::now();
                let health = client.get(&healthz).send().await.expect("healthz");
                let health_took = sent.elapsed();
                assert_eq!(health.status(), 200);
                let sent = Instant::now();
                let posted = client
                    .post(&intake)
                    .bearer_auth(&cluster.ingest_token)
                    .json(&event)
                    .send()
                    .await
                    .expect("intake");
                let post_took = sent.elapsed();
                assert_eq!(posted.status(), 202, "{}", posted.text().await.unwrap_or_default());
                (health_took, post_took)
            };
            let ((took, answer), (health_took, post_took)) = tokio::join!(attack, probes);
            assert_eq!(
                answer["errors"][0]["extensions"]["code"], "BAD_USER_INPUT",
                "{name}: {answer}"
            );
            assert!(answer["data"].is_null(), "{name} ran: {answer}");
            slowest_refusal = slowest_refusal.max(took);
            slowest_health = slowest_health.max(health_took);
            intake_times.push(post_took);
        }
    }
    let after = api.resident_bytes();
    intake_times.sort();
    // The 95th percentile: an intake POST waits for the broker's confirm,
    // which waits for its disk, and one fsync in forty may be slow for
    // reasons no GraphQL request touches (seen once: 77 ms in CI). What the
    // attacks could hold up, the runtime's threads, shows in every /healthz.
    let intake_p95 = intake_times[intake_times.len() * 95 / 100 - 1];
    let intake_max = intake_times[intake_times.len() - 1];
    eprintln!(
        "attacks: slowest refusal {slowest_refusal:?}, slowest /healthz {slowest_health:?}, intake p95 {intake_p95:?} (max {intake_max:?}), resident {} → {} MiB",
        before / (1024 * 1024),
        after / (1024 * 1024)
    );
    assert!(
        slowest_refusal < REFUSED_WITHIN,
        "an attack took {slowest_refusal:?} to refuse"
    );
    assert!(
        slowest_health < PROBE_WITHIN,
        "/healthz took {slowest_health:?} during the attacks"
    );
    assert!(
        intake_p95 < PROBE_WITHIN,
        "the intake took {intake_p95:?} (95th percentile) during the attacks"
    );
    assert!(
        after.saturating_sub(before) < MAX_GROWTH,
        "the process grew from {before} to {after} bytes"
    );
    api.terminate(Duration::from_secs(30)).await;
}
