//! Processes starting and failing: replicas started at the same instant, as on
//! a first install, where every start-up write (the bootstrap tenant and key,
//! the broker topology) is made by several processes at once and every process
//! must come up and stay up; and a process whose HTTP server dies, which must
//! exit rather than live on without it.

use std::time::Duration;

use aegis_webhook::FAIL_HTTP_SERVER_AFTER_ENV;
use aegis_webhook_storage::tenants;
use aegis_webhook_tests::processes::ProcessCluster;

/// A fresh install, with its bootstrap key: a migrated, empty database (the
/// migrate Job ran) and a broker without this deployment's queues.
async fn fresh_install() -> Option<(ProcessCluster, String)> {
    let mut cluster = ProcessCluster::prepare("startup").await?;
    let key = tenants::generate_api_key();
    cluster.set("AEGIS_AMQP_QUEUE_EXPIRY", "1m");
    // Quick to start, twenty times over: one retry tier to declare, one
    // database connection to open per process.
    cluster.set("AEGIS_RETRY_SCHEDULE", "0s,1s");
    cluster.set("AEGIS_DATABASE_MAX_CONNECTIONS", "1");
    cluster.set("AEGIS_BOOTSTRAP_API_KEY", key.clone());
    Some((cluster, key))
}

const ROUNDS: usize = 20;
const ROLES: [&str; 4] = ["api", "api", "ingester", "worker"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_started_together_with_one_bootstrap_key_all_come_up() {
    let _serial = crate::SERIAL.lock().await;
    for round in 0..ROUNDS {
        let Some((cluster, key)) = fresh_install().await else {
            return;
        };

        // `spawn` fails the test if a process exits before it serves.
        let mut processes = futures::future::join_all(ROLES.map(|role| cluster.spawn(role))).await;

        let client = reqwest::Client::new();
        let mut tenant_ids = Vec::new();
        for api in processes.iter().filter(|process| process.role == "api") {
            let url = format!("http://{}/graphql", api.addr.expect("the API listens"));
            let response: serde_json::Value = client
                .post(url)
                .bearer_auth(&key)
                .json(&serde_json::json!({ "query": "{ tenant { id } }" }))
                .send()
                .await
                .expect("query the API")
                .json()
                .await
                .expect("a JSON answer");
            let id = response["data"]["tenant"]["id"].as_str();
            tenant_ids.push(
                id.unwrap_or_else(|| panic!("round {round}: the key was refused: {response}"))
                    .to_owned(),
            );
        }
        assert!(
            tenant_ids.iter().all(|id| *id == tenant_ids[0]),
            "round {round}: one tenant, {tenant_ids:?}"
        );
        for process in &mut processes {
            assert!(
                process.is_running(),
                "round {round}: the {} process exited after it came up",
                process.role
            );
        }
        // Stopped together, as a rollout's scale-down stops them.
        let stopped = futures::future::join_all(processes.into_iter().map(|process| async move {
            let role = process.role;
            (role, process.terminate(Duration::from_secs(30)).await)
        }))
        .await;
        for (role, status) in stopped {
            assert!(
                status.success(),
                "round {round}: the {role} process stopped with {status}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_whose_http_server_fails_exits_non_zero() {
    let _serial = crate::SERIAL.lock().await;
    let Some((mut cluster, _)) = fresh_install().await else {
        return;
    };
    cluster.set(FAIL_HTTP_SERVER_AFTER_ENV, "1s");
    for role in ["api", "worker"] {
        let mut process = cluster.spawn(role).await;
        let healthz = format!("http://{}/healthz", process.addr.expect("every role listens"));
        let answer = reqwest::get(&healthz)
            .await
            .expect("the server answers before it fails");
        assert_eq!(answer.status(), 200);
        let status = process.wait(Duration::from_secs(30)).await;
        assert!(
            !status.success(),
            "the {role} process lived on without its HTTP server: {status}"
        );
        assert!(reqwest::get(&healthz).await.is_err(), "nothing serves any more");
    }
}
