//! Processes starting and failing: replicas started at the same instant, as on
//! a first install, where every start-up write (the bootstrap tenant and key,
//! the broker topology) is made by several processes at once and every process
//! must come up and stay up; and a process whose HTTP server dies, which must
//! exit rather than live on without it.

use std::time::Duration;

use aegis_webhook::FAIL_HTTP_SERVER_AFTER_ENV;
use aegis_webhook_core::db::{self, tenants};
use aegis_webhook_core::secret::SecretCipher;
use aegis_webhook_tests::processes::RoleProcess;
use aegis_webhook_tests::support::{Backend, amqp_url, fresh_database, scanner_channel, scratch_dir};

/// The settings of every process of a fresh install, with its bootstrap key: a
/// migrated, empty database (the migrate Job ran) and a broker without this
/// deployment's queues.
async fn fresh_install() -> Option<(Vec<(String, String)>, String)> {
    let database_url = fresh_database(Backend::Postgres, &scratch_dir()).await?;
    let migrator = db::connect(&database_url).await.expect("connect");
    db::migrate(&migrator).await.expect("migrate");
    migrator.close().await.expect("close");
    let key = tenants::generate_api_key();
    let settings = [
        ("AEGIS_DATABASE_URL", database_url),
        ("AEGIS_DATABASE_MAX_CONNECTIONS", "4".to_owned()),
        ("AEGIS_AMQP_URL", amqp_url()),
        ("AEGIS_AMQP_PREFIX", format!("startup-{}.", Uuid::new_v4().simple())),
        ("AEGIS_AMQP_QUEUE_EXPIRY", "1m".to_owned()),
        ("AEGIS_SECRET_KEY", SecretCipher::generate_key()),
        ("AEGIS_INGEST_TOKEN", format!("ingest-{}", Uuid::new_v4().simple())),
        ("AEGIS_BOOTSTRAP_API_KEY", key.clone()),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_owned(), value))
    .collect();
    Some((settings, key))
}
use uuid::Uuid;

const ROUNDS: usize = 20;
const ROLES: [&str; 4] = ["api", "api", "ingester", "worker"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_started_together_with_one_bootstrap_key_all_come_up() {
    let _serial = crate::SERIAL.lock().await;
    if scanner_channel().await.is_none() {
        return;
    }
    for round in 0..ROUNDS {
        let Some((settings, key)) = fresh_install().await else {
            return;
        };

        // `spawn` fails the test if a process exits before it serves.
        let mut processes = futures::future::join_all(ROLES.map(|role| RoleProcess::spawn(role, &settings))).await;

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
        for process in processes {
            let role = process.role;
            let status = process.terminate(Duration::from_secs(30)).await;
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
    if scanner_channel().await.is_none() {
        return;
    }
    let Some((mut settings, _)) = fresh_install().await else {
        return;
    };
    settings.push((FAIL_HTTP_SERVER_AFTER_ENV.to_owned(), "1s".to_owned()));
    for role in ["api", "worker"] {
        let mut process = RoleProcess::spawn(role, &settings).await;
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
