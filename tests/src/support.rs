//! Test support: a running system per test (its own SQLite file or PostgreSQL
//! database), a capturing HTTP receiver on loopback, and small request helpers.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aegis_webhook::{DevSetup, RunningSystem, start_dev};
use aegis_webhook_core::config::Config;
use aegis_webhook_core::queue::Queue;
use aegis_webhook_core::retry::RetrySchedule;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use sea_orm::{ConnectionTrait, Database};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::Notify;

/// Logs only when `TEST_LOG` is set, so failures are readable and runs are quiet.
pub fn init_logging() {
    if std::env::var_os("TEST_LOG").is_some() {
        aegis_webhook_core::telemetry::init(Default::default());
    }
}

/// Whether the tests run in CI, where a missing service fails a test
/// instead of skipping it.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some()
}

/// Where each test's database lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The server URL without a database name: `AEGIS_TEST_POSTGRES_URL`, or the
/// machine's PostgreSQL.
pub fn postgres_server() -> String {
    std::env::var("AEGIS_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// Test databases are named `aegis_test_<unix seconds>_<random>`; those of runs
/// older than this are dropped by the first test that needs PostgreSQL, so they
/// never pile up, while a run in progress elsewhere keeps its own.
const STALE_TEST_DATABASE_SECS: u64 = 3600;

async fn drop_stale_test_databases(admin: &sea_orm::DatabaseConnection) {
    static ONCE: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
    ONCE.get_or_init(|| async {
        let backend = admin.get_database_backend();
        let Ok(rows) = admin
            .query_all_raw(sea_orm::Statement::from_string(
                backend,
                "SELECT datname FROM pg_database WHERE datname LIKE 'aegis_test_%'".to_owned(),
            ))
            .await
        else {
            return;
        };
        let now = unix_now();
        for row in rows {
            let Ok(name) = row.try_get::<String>("", "datname") else {
                continue;
            };
            let created = name
                .strip_prefix("aegis_test_")
                .and_then(|rest| rest.split('_').next())
                .and_then(|secs| secs.parse::<u64>().ok());
            if created.is_none_or(|created| now.saturating_sub(created) > STALE_TEST_DATABASE_SECS) {
                // FORCE ends connections a crashed run left open (PostgreSQL 13+).
                let _ = admin
                    .execute_unprepared(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            }
        }
    })
    .await;
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_secs())
        .unwrap_or_default()
}

/// A fresh, empty database for one test; `None` (after a loud warning) when
/// PostgreSQL is unreachable outside CI. In CI an unreachable PostgreSQL fails.
pub async fn fresh_database(backend: Backend, scratch: &std::path::Path) -> Option<String> {
    match backend {
        Backend::Sqlite => Some(format!("sqlite://{}/aegis.db?mode=rwc", scratch.display())),
        Backend::Postgres => {
            let server = postgres_server();
            let admin = match Database::connect(format!("{server}/postgres")).await {
                Ok(admin) => admin,
                Err(error) => {
                    let message = format!(
                        "PostgreSQL is unreachable at {server} ({error}); start it (see README) or set AEGIS_TEST_POSTGRES_URL"
                    );
                    if in_ci() {
                        panic!("{message}");
                    }
                    eprintln!("\n!!!!!!!! SKIPPING A POSTGRESQL TEST: {message} !!!!!!!!\n");
                    return None;
                }
            };
            drop_stale_test_databases(&admin).await;
            let name = format!("aegis_test_{}_{}", unix_now(), uuid::Uuid::new_v4().simple());
            admin
                .execute_unprepared(&format!("CREATE DATABASE {name}"))
                .await
                .expect("create the test database");
            admin.close().await.expect("close the admin connection");
            Some(format!("{server}/{name}"))
        }
    }
}

/// Applies the migrations and makes the partitions of the default layout, as
/// `aegis-webhook migrate` does with the default configuration.
pub async fn migrate(db: &sea_orm::DatabaseConnection) -> anyhow::Result<()> {
    aegis_webhook_storage::migrate(db, Config::default().partition_plan()).await
}

/// A fresh database with every migration applied, as after the `migrate`
/// Job. On PostgreSQL a copy of a template migrated once per test process
/// (`CREATE DATABASE … TEMPLATE`), which is several times quicker than
/// migrating each one; `None` as [`fresh_database`].
pub async fn migrated_database(backend: Backend, scratch: &std::path::Path) -> Option<String> {
    let migrate = |url: String| async move {
        let db = aegis_webhook_storage::connect(&url).await.expect("connect");
        migrate(&db).await.expect("migrate");
        db.close().await.expect("close");
        url
    };
    match backend {
        Backend::Sqlite => Some(migrate(fresh_database(backend, scratch).await?).await),
        Backend::Postgres => {
            static TEMPLATE: tokio::sync::OnceCell<Option<String>> = tokio::sync::OnceCell::const_new();
            let template = TEMPLATE
                .get_or_init(|| async {
                    let url = migrate(fresh_database(Backend::Postgres, scratch).await?).await;
                    Some(url.rsplit('/').next().expect("a database name").to_owned())
                })
                .await
                .as_ref()?;
            let server = postgres_server();
            let admin = Database::connect(format!("{server}/postgres"))
                .await
                .expect("PostgreSQL answered a moment ago");
            let name = format!("aegis_test_{}_{}", unix_now(), uuid::Uuid::new_v4().simple());
            admin
                .execute_unprepared(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
                .await
                .expect("copy the migrated template");
            admin.close().await.expect("close the admin connection");
            Some(format!("{server}/{name}"))
        }
    }
}

/// Whether PostgreSQL answers, for tests that hand it to a separate program;
/// `false` (after a loud warning) when it is unreachable outside CI. In CI
/// that fails.
pub async fn postgres_reachable() -> bool {
    let server = postgres_server();
    match Database::connect(format!("{server}/postgres")).await {
        Ok(admin) => {
            let _ = admin.close().await;
            true
        }
        Err(error) => {
            let message = format!(
                "PostgreSQL is unreachable at {server} ({error}); start it (see README) or set AEGIS_TEST_POSTGRES_URL"
            );
            if in_ci() {
                panic!("{message}");
            }
            eprintln!("\n!!!!!!!! SKIPPING A POSTGRESQL TEST: {message} !!!!!!!!\n");
            false
        }
    }
}

/// The machine's RabbitMQ, or `AEGIS_TEST_AMQP_URL`.
pub fn amqp_url() -> String {
    std::env::var("AEGIS_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A plain AMQP channel, as a scanner would hold; `None` (after a loud warning)
/// when RabbitMQ is unreachable outside CI. In CI that fails.
pub async fn scanner_channel() -> Option<lapin::Channel> {
    match lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default()).await {
        Ok(connection) => Some(connection.create_channel().await.expect("channel")),
        Err(error) => {
            let message = format!(
                "RabbitMQ is unreachable at {} ({error}); start it (see README)",
                amqp_url()
            );
            if in_ci() {
                panic!("{message}");
            }
            eprintln!("\n!!!!!!!! SKIPPING A RABBITMQ TEST: {message} !!!!!!!!\n");
            None
        }
    }
}

/// Tenant `name` with `count` webhooks for `POAM_OVERDUE` on `receiver_url`,
/// written straight to the database (secrets sealed with `cipher`); returns
/// the tenant's id.
pub async fn tenant_with_webhooks(
    db: &sea_orm::DatabaseConnection,
    cipher: &aegis_webhook_core::secret::SecretCipher,
    name: &str,
    receiver_url: &str,
    count: usize,
) -> aegis_webhook_core::ids::TenantId {
    use aegis_webhook_core::target::{TargetPolicy, WebhookUrl};
    use aegis_webhook_storage::{tenants, webhooks};
    let tenant = tenants::ensure_tenant(db, name).await.expect("tenant");
    for _ in 0..count {
        webhooks::create_webhook(
            db,
            cipher,
            tenant.id,
            webhooks::NewWebhook {
                url: WebhookUrl::parse(receiver_url, &TargetPolicy::allowing_loopback()).expect("url"),
                events: vec![aegis_webhook_core::event::EventType::PoamOverdue],
                description: None,
                project_ids: vec![],
                secret: aegis_webhook_core::secret::SigningSecret::generate(),
                active: true,
            },
        )
        .await
        .expect("webhook");
    }
    tenant.id
}

/// A scratch folder unique to one test.
pub fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("aegis-test-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// A test configuration: short retry schedule, short timeouts, port 0.
pub fn test_config(database_url: String, data_dir: PathBuf) -> Config {
    Config {
        database_url: Some(database_url),
        data_dir,
        retry_schedule: "0s,100ms,200ms".parse::<RetrySchedule>().expect("valid schedule"),
        request_timeout: Duration::from_secs(5),
        shutdown_grace: Duration::from_secs(5),
        ..Config::default()
    }
}

/// The whole system (`dev`) on port 0.
pub struct TestApp {
    pub addr: SocketAddr,
    pub setup: DevSetup,
    pub system: Option<RunningSystem>,
    pub config: Config,
    pub http: reqwest::Client,
}

impl TestApp {
    /// Starts `dev` on a fresh database; `None` when the backend is unreachable
    /// outside CI (already reported).
    pub async fn spawn(backend: Backend) -> Option<TestApp> {
        Self::spawn_with(backend, |_| {}).await
    }

    pub async fn spawn_with(backend: Backend, adjust: impl FnOnce(&mut Config)) -> Option<TestApp> {
        init_logging();
        let scratch = scratch_dir();
        // `dev` migrates its database itself: on SQLite a new file, on
        // PostgreSQL a migrated copy (quicker; `dev` then finds nothing to do).
        let url = match backend {
            Backend::Sqlite => fresh_database(backend, &scratch).await?,
            Backend::Postgres => migrated_database(backend, &scratch).await?,
        };
        let mut config = test_config(url, scratch);
        adjust(&mut config);
        Some(Self::start(config).await)
    }

    /// Starts `dev` with exactly this configuration (for restarts on the same data).
    pub async fn start(config: Config) -> TestApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (system, setup) = start_dev(config.clone(), listener).await.expect("dev starts");
        TestApp {
            addr: system.addr.expect("dev serves HTTP"),
            setup,
            system: Some(system),
            config,
            http: reqwest::Client::new(),
        }
    }

    /// Every role as production runs it: no `dev` defaults (so no loopback
    /// targets), migrations applied first, tenant `default` holding a fresh key.
    pub async fn start_production(config: Config) -> TestApp {
        Self::start_production_wrapping(config, |queue| queue).await
    }

    /// [`TestApp::start_production`] on the queue `wrap` makes of the one the
    /// configuration opens (to inject faults into it).
    pub async fn start_production_wrapping(
        mut config: Config,
        wrap: impl FnOnce(Arc<dyn Queue>) -> Arc<dyn Queue>,
    ) -> TestApp {
        let api_key = aegis_webhook_storage::tenants::generate_api_key();
        config.bootstrap_api_key = Some(aegis_webhook_core::config::Sensitive::new(api_key.clone()));
        config.secret_key = Some(aegis_webhook_core::config::Sensitive::new(
            aegis_webhook_core::secret::SecretCipher::generate_key(),
        ));
        let ingest_token = "test-ingest-token".to_owned();
        config.ingest_token = Some(aegis_webhook_core::config::Sensitive::new(ingest_token.clone()));
        let db = aegis_webhook::open_database(&config, true).await.expect("database");
        let tenant = aegis_webhook_storage::tenants::tenant_by_name(&db, aegis_webhook::DEFAULT_TENANT)
            .await
            .expect("query")
            .expect("bootstrapped");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let roles = aegis_webhook::Roles::ALL;
        let (queue, memory_queue) = aegis_webhook::open_queue(&config, roles).await.expect("queue");
        let system = aegis_webhook::start_on_queue(&config, roles, db, Some(listener), wrap(queue), memory_queue)
            .await
            .expect("starts");
        TestApp {
            addr: system.addr.expect("serves HTTP"),
            setup: DevSetup {
                tenant_id: tenant.id,
                api_key,
                ingest_token,
                // Production prints no portal link; tests make their own.
                portal_link: String::new(),
            },
            system: Some(system),
            config,
            http: reqwest::Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn db(&self) -> &sea_orm::DatabaseConnection {
        &self.system.as_ref().expect("running").db
    }

    pub async fn stop(&mut self) {
        if let Some(system) = self.system.take() {
            system.stop().await.expect("stops cleanly");
        }
    }

    /// POSTs a GraphQL request with the given API key (or none); returns the
    /// HTTP status and the JSON answer.
    pub async fn graphql_as(&self, key: Option<&str>, query: &str, variables: Value) -> (StatusCode, Value) {
        let mut request = self
            .http
            .post(self.url("/graphql"))
            .json(&json!({ "query": query, "variables": variables }));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.expect("graphql request");
        let status = StatusCode::from_u16(response.status().as_u16()).expect("status");
        (status, response.json().await.expect("graphql answers JSON"))
    }

    /// A GraphQL request as the dev tenant; returns the JSON answer.
    pub async fn graphql(&self, query: &str, variables: Value) -> Value {
        self.graphql_as(Some(&self.setup.api_key), query, variables).await.1
    }

    /// Creates a webhook with the seed's mutation; returns its `createWebhook` object.
    pub async fn create_webhook(&self, url: &str, events: &[&str], secret: Option<&str>) -> Value {
        let answer = self
            .graphql(
                SEED_MUTATION,
                json!({ "input": { "url": url, "events": events, "secret": secret } }),
            )
            .await;
        assert!(answer.get("errors").is_none(), "createWebhook failed: {answer}");
        answer["data"]["createWebhook"].clone()
    }

    /// POSTs raw bytes to the intake with the given token.
    pub async fn post_event_as(&self, token: Option<&str>, body: impl Into<reqwest::Body>) -> (StatusCode, Value) {
        self.post_event_typed(token, Some("application/json"), body).await
    }

    /// POSTs a raw body to the intake with this `Content-Type` (none if `None`).
    pub async fn post_event_typed(
        &self,
        token: Option<&str>,
        content_type: Option<&str>,
        body: impl Into<reqwest::Body>,
    ) -> (StatusCode, Value) {
        let mut request = self.http.post(self.url("/v1/events")).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.expect("intake request");
        let status = StatusCode::from_u16(response.status().as_u16()).expect("status");
        let text = response.text().await.expect("body");
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// POSTs an envelope with the dev ingest token.
    pub async fn post_event(&self, envelope: &Value) -> (StatusCode, Value) {
        self.post_event_as(Some(&self.setup.ingest_token), envelope.to_string())
            .await
    }

    /// Counts rows of a table, straight from the database.
    /// The nodes of a `deliveries(filter: $filter …)` query, asserting no errors.
    pub async fn delivery_nodes(&self, query: &str, filter: Value) -> Vec<Value> {
        let answer = self.graphql(query, serde_json::json!({ "filter": filter })).await;
        assert!(answer["errors"].is_null(), "{answer}");
        answer["data"]["deliveries"]["edges"]
            .as_array()
            .expect("edges")
            .iter()
            .map(|edge| edge["node"].clone())
            .collect()
    }

    pub async fn count(&self, table: &str) -> i64 {
        count_rows(self.db(), table).await
    }
}

/// How many rows `table` holds.
pub async fn count_rows(db: &sea_orm::DatabaseConnection, table: &str) -> i64 {
    let row = db
        .query_one_raw(sea_orm::Statement::from_string(
            db.get_database_backend(),
            format!("SELECT COUNT(*) AS n FROM {table}"),
        ))
        .await
        .expect("count query")
        .expect("a row");
    row.try_get::<i64>("", "n").expect("count")
}

/// Makes `attempt` as a worker does: claims it (for a minute, now or, if
/// it is due later, then), then records it, moving its delivery on with
/// `next`. Panics when the attempt cannot be claimed (it is not the
/// delivery's next, or another claim holds it).
pub async fn claim_and_record(
    db: &sea_orm::DatabaseConnection,
    attempt: aegis_webhook_storage::deliveries::Attempt,
    next: aegis_webhook_storage::deliveries::NextStep,
) {
    use aegis_webhook_storage::deliveries::{self, Recorded};
    let due = deliveries::delivery_by_id(db, attempt.delivery_id)
        .await
        .expect("read")
        .expect("stored")
        .next_attempt_at;
    let now = due.into_iter().fold(chrono::Utc::now(), std::cmp::max);
    let lease = deliveries::claim(db, attempt.delivery_id, attempt.attempt, Duration::from_secs(60), now)
        .await
        .expect("claim")
        .expect("the attempt is the delivery's next, and no claim holds it");
    let recorded = Recorded { attempt, lease, next };
    assert!(deliveries::record_attempt(db, &recorded).await.expect("record"));
}

/// The seed document's mutation, verbatim.
pub const SEED_MUTATION: &str = r#"mutation CreateWebhook($input: WebhookInput!) {
  createWebhook(input: $input) {
    id
    url
    events
    secret
    active
  }
}"#;

/// The seed's `VULNERABILITY_DETECTED` data object.
pub fn seed_vulnerability_data() -> Value {
    json!({
        "vulnerabilityId": "456e7890-e89b-12d3-a456-426614174003",
        "cveId": "CVE-2024-47076",
        "severity": "CRITICAL",
        "cvssScore": 9.8,
        "component": { "name": "curl", "version": "7.68.0" },
        "projectId": "123e4567-e89b-12d3-a456-426614174000"
    })
}

pub fn seed_poam_overdue_data() -> Value {
    json!({
        "poamId": "567e8901-e89b-12d3-a456-426614174004",
        "vulnerabilityId": "456e7890-e89b-12d3-a456-426614174003",
        "cveId": "CVE-2024-47076",
        "scheduledCompletionDate": "2026-01-15",
        "daysOverdue": 5
    })
}

pub fn envelope(tenant_id: aegis_webhook_core::ids::TenantId, event: &str, data: Value) -> Value {
    json!({
        "event": event,
        "timestamp": "2025-12-16T15:30:00Z",
        "tenantId": tenant_id,
        "data": data
    })
}

/// One request as a receiver saw it.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: std::time::Instant,
}

impl Received {
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("header {name} missing"))
            .to_str()
            .expect("ASCII header")
    }
}

#[derive(Default)]
struct ReceiverState {
    received: Mutex<Vec<Received>>,
    /// Statuses to answer, in order; then `default_status`.
    script: Mutex<VecDeque<u16>>,
    default_status: Mutex<u16>,
    /// How long each answer takes.
    delay: Mutex<Duration>,
    /// Headers sent with every answer.
    headers: Mutex<Vec<(String, String)>>,
    /// While true, answers wait (requests are recorded as they arrive).
    held: tokio::sync::watch::Sender<bool>,
    arrived: Notify,
}

/// A real HTTP server on loopback that records every request.
pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<ReceiverState>,
}

impl Receiver {
    /// Answers the scripted statuses in order, then `then` forever.
    pub async fn start(script: &[u16], then: u16) -> Receiver {
        Self::start_slow(script, then, Duration::ZERO).await
    }

    /// Like [`Receiver::start`], taking `delay` over every answer.
    pub async fn start_slow(script: &[u16], then: u16, delay: Duration) -> Receiver {
        let state = Arc::new(ReceiverState::default());
        *state.delay.lock().expect("lock") = delay;
        state.script.lock().expect("lock").extend(script.iter().copied());
        *state.default_status.lock().expect("lock") = then;
        let app = axum::Router::new().fallback({
            let state = state.clone();
            move |headers: HeaderMap, body: Bytes| {
                let state = state.clone();
                async move {
                    state.received.lock().expect("lock").push(Received {
                        headers,
                        body,
                        at: std::time::Instant::now(),
                    });
                    state.arrived.notify_waiters();
                    let mut held = state.held.subscribe();
                    held.wait_for(|held| !held)
                        .await
                        .expect("the state outlives its server");
                    let delay = *state.delay.lock().expect("lock");
                    if !delay.is_zero() {
                        tokio::time::sleep(delay).await;
                    }
                    let status = state
                        .script
                        .lock()
                        .expect("lock")
                        .pop_front()
                        .unwrap_or(*state.default_status.lock().expect("lock"));
                    let mut headers = HeaderMap::new();
                    for (name, value) in state.headers.lock().expect("lock").iter() {
                        headers.insert(
                            axum::http::HeaderName::from_bytes(name.as_bytes()).expect("header name"),
                            value.parse().expect("header value"),
                        );
                    }
                    (StatusCode::from_u16(status).expect("status"), headers, "received")
                }
            }
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind receiver");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}/webhooks/aegis", self.addr)
    }

    /// Sends `name: value` with every answer from now on.
    pub fn set_header(&self, name: &str, value: &str) {
        self.state
            .headers
            .lock()
            .expect("lock")
            .push((name.to_owned(), value.to_owned()));
    }

    /// Holds every answer, from now until [`Receiver::release_answers`]:
    /// a test acts while a request is in flight.
    pub fn hold_answers(&self) {
        self.state.held.send_replace(true);
    }

    /// Lets held and later answers go.
    pub fn release_answers(&self) {
        self.state.held.send_replace(false);
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().expect("lock").clone()
    }

    /// Waits until at least `count` requests arrived, or panics after `timeout`.
    pub async fn wait_for(&self, count: usize, timeout: Duration) -> Vec<Received> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.state.arrived.notified();
            let received = self.received();
            if received.len() >= count {
                return received;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!(
                    "expected {count} requests within {timeout:?}, got {}",
                    self.received().len()
                );
            }
        }
    }
}

/// Polls `check` until it returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `createPortalSession` with `key`; returns the link's path.
pub async fn portal_link(app: &TestApp, key: &str, read_only: bool) -> String {
    let (status, answer) = app
        .graphql_as(
            Some(key),
            "mutation($readOnly: Boolean!) { createPortalSession(ttlSeconds: 600, readOnly: $readOnly) { path url } }",
            json!({ "readOnly": read_only }),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    let path = answer["data"]["createPortalSession"]["path"]
        .as_str()
        .unwrap_or_else(|| panic!("createPortalSession failed: {answer}"));
    assert_eq!(
        answer["data"]["createPortalSession"]["url"],
        json!(app.url(path)),
        "dev knows its own address"
    );
    path.to_owned()
}

/// A browser's part in the portal, over plain HTTP: keeps the session cookie,
/// follows no redirect (tests look at each answer), and sends forms with the
/// page's CSRF token.
pub struct PortalClient {
    base: String,
    http: reqwest::Client,
    pub cookie: Option<String>,
}

/// An answer of the portal: status, `Location`, body.
#[derive(Debug)]
pub struct PortalAnswer {
    pub status: StatusCode,
    pub location: Option<String>,
    pub headers: reqwest::header::HeaderMap,
    pub body: String,
}

impl PortalClient {
    pub fn new(app: &TestApp) -> PortalClient {
        PortalClient {
            base: app.url(""),
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("client"),
            cookie: None,
        }
    }

    /// Opens a link as a browser does: its page, then the page's POST (no
    /// `Origin`, as from a client that is not a browser); keeps the cookie
    /// it sets, if any. A link whose page is refused is not posted.
    pub async fn open(&mut self, path: &str) -> PortalAnswer {
        let page = self.get(path).await;
        if page.status != StatusCode::OK {
            return page;
        }
        let answer = self.post_raw(path, &[]).await;
        if let Some(cookie) = answer
            .headers
            .get_all("set-cookie")
            .iter()
            .filter_map(|value| value.to_str().ok())
            .find_map(|value| value.strip_prefix("aegis_portal="))
        {
            self.cookie = cookie.split(';').next().map(str::to_owned);
        }
        answer
    }

    async fn answer(response: reqwest::Response) -> PortalAnswer {
        PortalAnswer {
            status: response.status(),
            location: response
                .headers()
                .get("location")
                .and_then(|value| value.to_str().ok())
                .map(str::to_owned),
            headers: response.headers().clone(),
            body: response.text().await.expect("body"),
        }
    }

    fn with_cookie(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.cookie {
            Some(cookie) => request.header("cookie", format!("aegis_portal={cookie}")),
            None => request,
        }
    }

    pub async fn get(&self, path: &str) -> PortalAnswer {
        let request = self.with_cookie(self.http.get(format!("{}{path}", self.base)));
        Self::answer(request.send().await.expect("GET")).await
    }

    /// POSTs `fields` as a form, exactly as given (no token added).
    pub async fn post_raw(&self, path: &str, fields: &[(&str, &str)]) -> PortalAnswer {
        let body = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(fields)
            .finish();
        let request = self
            .with_cookie(self.http.post(format!("{}{path}", self.base)))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        Self::answer(request.send().await.expect("POST")).await
    }

    /// POSTs `fields` with the CSRF token of the session's pages.
    pub async fn post(&self, path: &str, fields: &[(&str, &str)]) -> PortalAnswer {
        let page = self.get("/portal/events").await;
        let token = csrf_token_of(&page.body).expect("a signed-in page carries a CSRF token");
        let mut fields = fields.to_vec();
        fields.push(("csrf", &token));
        self.post_raw(path, &fields).await
    }
}

/// The CSRF token a portal page's forms carry.
pub fn csrf_token_of(html: &str) -> Option<String> {
    let start = html.find(r#"name="csrf" value=""#)? + r#"name="csrf" value=""#.len();
    html[start..].split('"').next().map(str::to_owned)
}

/// A binary of the workspace, `<target>/<profile>/<name>`: a test runs as
/// `<target>/<profile>/deps/<test>-<hash>`, and `cargo test --workspace`
/// builds the binaries of packages with integration tests beside it.
pub fn built_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(std::path::Path::parent)
        .expect("the test binary is in <target>/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: `cargo test --workspace` builds it, or run \
         `cargo build -p aegis-webhook -p aegis-webhook-bench` before this test alone",
        path.display()
    );
    path
}

/// The text of the element with `id` in a page (no nested elements).
pub fn text_of_id(html: &str, id: &str) -> String {
    let marker = format!(r#"id="{id}""#);
    html.split(&marker)
        .nth(1)
        .and_then(|rest| rest.split_once('>'))
        .and_then(|(_, rest)| rest.split('<').next())
        .unwrap_or_else(|| panic!("no element #{id} in {html}"))
        .to_owned()
}
