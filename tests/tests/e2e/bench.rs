//! The benchmark (`aegis-bench`, crates/aegis-webhook-bench) as a smoke test:
//! a tiny run in each mode (and of the noisy scenario's two tenants),
//! asserting from its JSON report that every delivery arrived verified and
//! none was invalid. No timing is asserted.
//!
//! Nothing is built here. `cargo test --workspace` builds the `aegis-bench`
//! and `aegis-webhook` binaries (their crates have integration tests, which is
//! what makes cargo build a package's binaries for a test run) into the
//! target folder this test binary runs from.

use std::time::Duration;

use serde_json::Value;

use crate::support::{amqp_url, built_binary, postgres_reachable, postgres_server, scanner_channel, scratch_dir};

const EVENTS: u64 = 20;
const WEBHOOKS: u64 = 2;

/// Runs `aegis-bench` with `arguments` and returns its JSON report; fails
/// with the benchmark's own output when it fails.
async fn run_bench(arguments: &[&str]) -> Value {
    let report_path = scratch_dir().join("report.json");
    let run = tokio::process::Command::new(built_binary("aegis-bench"))
        .args(arguments)
        .args(["--events", &EVENTS.to_string(), "--webhooks", &WEBHOOKS.to_string()])
        .args(["--timeout", "90s", "--settle", "0s", "--json"])
        .arg(&report_path)
        .arg("--bin")
        .arg(built_binary("aegis-webhook"))
        .args(["--postgres-url", &postgres_server(), "--amqp-url", &amqp_url()])
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(240), run)
        .await
        .expect("aegis-bench ends within 240 s")
        .expect("aegis-bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "aegis-bench {arguments:?} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    let text = std::fs::read_to_string(&report_path).expect("aegis-bench writes its JSON report");
    serde_json::from_str(&text).expect("the report is JSON")
}

fn assert_every_delivery_verified(report: &Value) {
    let deliveries = &report["deliveries"];
    let expected = EVENTS * WEBHOOKS;
    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!(deliveries["expected"], expected, "{report:#}");
    assert_eq!(deliveries["verified"], expected, "{report:#}");
    assert_eq!(deliveries["missing"], 0, "{report:#}");
    assert_eq!(deliveries["invalid_signatures"], 0, "{report:#}");
    assert_eq!(deliveries["unexpected"], 0, "{report:#}");
    assert_eq!(report["latency_ms"]["samples"], expected, "{report:#}");
    assert!(
        report["processes"]
            .as_array()
            .is_some_and(|processes| !processes.is_empty()),
        "every spawned process is measured: {report:#}"
    );
}

/// PostgreSQL and RabbitMQ, or a loud skip (a failure in CI).
async fn production_services_reachable() -> bool {
    postgres_reachable().await && scanner_channel().await.is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_run_verifies_every_delivery() {
    let report = run_bench(&["--mode", "embedded"]).await;
    assert_every_delivery_verified(&report);
    assert_eq!(report["processes"][0]["name"], "dev");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_run_over_amqp_verifies_every_delivery() {
    if !production_services_reachable().await {
        return;
    }
    let report = run_bench(&["--mode", "production", "--via", "amqp", "--workers", "1"]).await;
    assert_every_delivery_verified(&report);
    let names: Vec<&str> = report["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .filter_map(|process| process["name"].as_str())
        .collect();
    assert_eq!(names, ["api", "ingester", "worker-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_run_over_http_verifies_every_delivery() {
    if !production_services_reachable().await {
        return;
    }
    let report = run_bench(&["--mode", "production", "--via", "http", "--workers", "1"]).await;
    assert_every_delivery_verified(&report);
}

/// The noisy scenario: tenant B (a second tenant the benchmark makes) gets
/// every one of its deliveries at its own webhook, beside tenant A's.
fn assert_both_tenants_complete(report: &Value, fairness: &str) {
    assert_eq!(report["passed"], true, "{report:#}");
    assert_eq!(
        report["deliveries"]["unexpected"], 0,
        "no delivery at another tenant's webhook: {report:#}"
    );
    let tenants = &report["tenants"];
    assert_eq!(tenants["fairness"], fairness, "{report:#}");
    let (a, b) = (&tenants["tenant_a"], &tenants["tenant_b"]);
    assert_eq!(a["deliveries"]["verified"], EVENTS * WEBHOOKS, "{report:#}");
    assert_eq!(a["deliveries"]["missing"], 0, "{report:#}");
    let b_verified = b["deliveries"]["verified"].as_u64().expect("a count");
    assert!(b_verified >= 1, "tenant B published from the start: {report:#}");
    assert_eq!(b["deliveries"]["expected"], b_verified, "{report:#}");
    assert_eq!(b["latency_ms"]["samples"], b_verified, "{report:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_noisy_run_keeps_the_tenants_apart() {
    let report = run_bench(&["--mode", "embedded", "--scenario", "noisy", "--rate", "50"]).await;
    assert_both_tenants_complete(&report, "on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_noisy_run_keeps_the_tenants_apart_with_fairness_off() {
    if !production_services_reachable().await {
        return;
    }
    let report = run_bench(&[
        "--mode",
        "production",
        "--scenario",
        "noisy",
        "--rate",
        "50",
        "--set",
        "AEGIS_FAIRNESS=off",
    ])
    .await;
    assert_both_tenants_complete(&report, "off");
}

/// The portal scenario: after the deliveries, every page of the portal it
/// times answered 200 each time, and the delivery log showed the deliveries
/// the run made (two webhooks: the webhook's 20, all 40 unfiltered).
fn assert_portal_pages_measured(report: &Value) {
    assert_every_delivery_verified(report);
    let portal = &report["portal"];
    assert_eq!(portal["deliveries_in_database"], EVENTS * WEBHOOKS, "{report:#}");
    assert_eq!(portal["webhook_deliveries"], EVENTS, "{report:#}");
    let pages = portal["pages"].as_array().expect("the pages' figures");
    let rows: Vec<&Value> = pages.iter().map(|page| &page["rows"]).collect();
    assert_eq!(
        rows,
        [
            &Value::from(EVENTS),
            &Value::from(EVENTS * WEBHOOKS),
            &Value::Null,
            &Value::Null
        ],
        "{report:#}"
    );
    for page in pages {
        assert_eq!(page["latency_ms"]["samples"], 3, "{report:#}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_portal_run_times_every_page() {
    let report = run_bench(&["--mode", "embedded", "--scenario", "portal", "--page-requests", "3"]).await;
    assert_portal_pages_measured(&report);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn production_portal_run_times_every_page() {
    if !production_services_reachable().await {
        return;
    }
    let report = run_bench(&["--mode", "production", "--scenario", "portal", "--page-requests", "3"]).await;
    assert_portal_pages_measured(&report);
}
