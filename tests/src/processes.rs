//! Separate OS processes for the fault and telemetry tests. A test binary re-runs
//! itself as a child with `AEGIS_TEST_ROLE` set, and the child runs one role
//! exactly as `aegis-webhook api|ingester|worker` would (configuration from
//! `AEGIS_*`, its own telemetry, `aegis_webhook::start`, stop on SIGTERM, the
//! last spans flushed), so SIGKILL and SIGTERM hit a real process without
//! depending on a separately built binary. [`ProcessCluster`] is what those
//! processes share: a migrated PostgreSQL database, a broker prefix of their
//! own, and the settings each is started with.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use aegis_webhook::{Roles, open_database_for, run_until_signal, start, telemetry_settings};
use aegis_webhook_core::config::Config;
use aegis_webhook_core::ids::TenantId;
use aegis_webhook_core::retry::RetrySchedule;
use aegis_webhook_core::secret::SecretCipher;
use aegis_webhook_rabbitmq::Topology;
use aegis_webhook_storage as db;
use uuid::Uuid;

use crate::support::{Backend, amqp_url, migrated_database, scanner_channel, scratch_dir};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const ROLE_ENV: &str = "AEGIS_TEST_ROLE";
const READY: &str = "AEGIS_ROLE_READY";
/// How long a role process may take to serve: a process retries the broker
/// for about a minute and a half before it gives up, and a broker busy
/// deleting queues may keep it waiting that long.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The body of the ignored `role_process` test of each binary that spawns role
/// processes: what a child process runs.
pub async fn role_process_main() {
    let role = std::env::var(ROLE_ENV).expect("role_process only runs as a child of a test");
    let roles = match role.as_str() {
        "api" => Roles::API,
        "ingester" => Roles::INGESTER,
        "worker" => Roles::WORKER,
        other => panic!("unknown role {other}"),
    };
    let config = Config::load(None).expect("configuration");
    // Children always log warnings and errors (to the test's stderr), so a
    // failing role explains itself; AEGIS_LOG raises the level. With
    // AEGIS_OTLP_ENDPOINT they export traces, as `aegis-webhook <role>` does.
    let telemetry = telemetry_settings(&config, roles.service_name()).expect("telemetry");
    aegis_webhook_core::telemetry::init(telemetry);
    let db = open_database_for(&config, roles).await.expect("database");
    // Every role listens, as `aegis-webhook <role>` does: the API, or probes and metrics.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let system = start(&config, roles, db, Some(listener)).await.expect("start");
    let addr = system.addr.map_or_else(|| "-".to_owned(), |addr| addr.to_string());
    println!("{READY} {addr}");
    let stopped = run_until_signal(system).await;
    // As `main` does on the way out: the last spans are exported.
    tokio::task::spawn_blocking(aegis_webhook_core::telemetry::shutdown)
        .await
        .expect("flush the last spans");
    // As `main` does: a role that failed ends the process with an error.
    if let Err(error) = stopped {
        eprintln!("Error: {error:#}");
        std::process::exit(1);
    }
}

/// One child process running one role.
pub struct RoleProcess {
    pub role: &'static str,
    pub addr: Option<SocketAddr>,
    child: Child,
}

impl RoleProcess {
    /// Starts `role` with the given `AEGIS_*` settings and waits until it serves.
    pub async fn spawn(role: &'static str, settings: &[(String, String)]) -> RoleProcess {
        let exe = std::env::current_exe().expect("the test binary");
        let mut command = Command::new(exe);
        command
            .args([
                "--ignored",
                "--exact",
                "role_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE_ENV, role)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // Only what the test says: nothing from the developer's own AEGIS_* (or
        // OpenTelemetry) setup.
        for (key, _) in std::env::vars() {
            if (key.starts_with("AEGIS_") && !key.starts_with("AEGIS_TEST_")) || key.starts_with("OTEL_") {
                command.env_remove(key);
            }
        }
        if std::env::var_os("TEST_LOG").is_none() {
            command.env("AEGIS_LOG", "warn");
        }
        for (key, value) in settings {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("spawn a role process");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(START_TIMEOUT, async {
            while let Some(line) = lines.next_line().await.expect("read the child's output") {
                // libtest prints `test role_process ... ` first, on the same line.
                if let Some((_, addr)) = line.split_once(READY) {
                    return addr.trim().parse().ok();
                }
            }
            panic!("the {role} process exited before it was ready");
        })
        .await
        .unwrap_or_else(|_| panic!("the {role} process did not start within {START_TIMEOUT:?}"));
        // Keep draining its output so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        RoleProcess { role, addr, child }
    }

    /// Whether the process has not ended (by itself or otherwise) yet.
    /// The resident memory of the process now, in bytes (`VmRSS`).
    pub fn resident_bytes(&self) -> u64 {
        let pid = self.child.id().expect("the process runs");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/<pid>/status");
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status");
        kib * 1024
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("ask for the process's status").is_none()
    }

    /// SIGKILL: no chance to clean up, as when a node dies.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("SIGKILL");
    }

    /// Waits for the process to end by itself.
    pub async fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the {} process did not end within {within:?}", self.role))
            .expect("wait")
    }

    /// SIGTERM, as Kubernetes sends on scale-down; returns the exit status.
    pub async fn terminate(mut self, within: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the {} process did not stop within {within:?}", self.role))
            .expect("wait")
    }
}

/// PostgreSQL and RabbitMQ prepared for role processes: a migrated database
/// (as after the migrate Job), a queue prefix of its own, and the settings
/// every process of the cluster gets.
pub struct ProcessCluster {
    pub database_url: String,
    pub secret_key: String,
    pub ingest_token: String,
    settings: Vec<(String, String)>,
}

impl ProcessCluster {
    /// `None` (after a loud notice) when PostgreSQL or RabbitMQ is unreachable
    /// outside CI; in CI that fails. `prefix` names the queues' prefix.
    pub async fn prepare(prefix: &str) -> Option<ProcessCluster> {
        scanner_channel().await?;
        Self::prepare_on(prefix, &amqp_url()).await
    }

    /// [`ProcessCluster::prepare`] on the broker (or brokers, comma-separated)
    /// of `amqp_url` instead of the machine's RabbitMQ.
    pub async fn prepare_on(prefix: &str, amqp_url: &str) -> Option<ProcessCluster> {
        let database_url = migrated_database(Backend::Postgres, &scratch_dir()).await?;
        let secret_key = SecretCipher::generate_key();
        let ingest_token = format!("ingest-{}", Uuid::new_v4().simple());
        let settings = [
            ("AEGIS_DATABASE_URL", database_url.clone()),
            ("AEGIS_DATABASE_MAX_CONNECTIONS", "4".to_owned()),
            ("AEGIS_AMQP_URL", amqp_url.to_owned()),
            ("AEGIS_AMQP_PREFIX", format!("{prefix}-{}.", Uuid::new_v4().simple())),
            ("AEGIS_AMQP_QUEUE_EXPIRY", "10m".to_owned()),
            ("AEGIS_SECRET_KEY", secret_key.clone()),
            ("AEGIS_INGEST_TOKEN", ingest_token.clone()),
            ("AEGIS_ALLOW_PRIVATE_TARGETS", "127.0.0.0/8".to_owned()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect();
        Some(ProcessCluster {
            database_url,
            secret_key,
            ingest_token,
            settings,
        })
    }

    /// Tenant `tenant` with `count` webhooks for `POAM_OVERDUE` on `receiver_url`;
    /// returns the tenant's id.
    pub async fn tenant_with_webhooks(&self, tenant: &str, receiver_url: &str, count: usize) -> TenantId {
        let db = db::connect(&self.database_url).await.expect("connect");
        let cipher = SecretCipher::from_base64(&self.secret_key).expect("key");
        let tenant = crate::support::tenant_with_webhooks(&db, &cipher, tenant, receiver_url, count).await;
        db.close().await.expect("close");
        tenant
    }

    /// Sets (or replaces) a setting for every process started after.
    pub fn set(&mut self, key: &str, value: impl Into<String>) {
        self.settings.retain(|(existing, _)| existing != key);
        self.settings.push((key.to_owned(), value.into()));
    }

    /// The settings with one more (or replaced), for one process.
    pub fn with(&self, key: &str, value: &str) -> Vec<(String, String)> {
        let mut settings = self.settings.clone();
        settings.retain(|(existing, _)| existing != key);
        settings.push((key.to_owned(), value.to_owned()));
        settings
    }

    pub fn settings(&self) -> &[(String, String)] {
        &self.settings
    }

    /// Starts `role` with the cluster's settings.
    pub async fn spawn(&self, role: &'static str) -> RoleProcess {
        RoleProcess::spawn(role, &self.settings).await
    }

    /// Waits until every queue of the cluster answers a passive declare,
    /// which a quorum queue does once it has a leader again: a test that
    /// restarts the broker calls it before it may end. Its teardown deletes
    /// the queues, and deleting a quorum queue whose dead-letter worker is
    /// still starting trips a RabbitMQ bug (rabbitmq-server#16652, seen on
    /// 3.10.8 in a CI run here): the worker's crash loop stops
    /// `rabbit_fifo_dlx_sup`, after which no queue with at-least-once
    /// dead-lettering can be declared until the node restarts, and every
    /// later test waited for the broker until the run's time was up.
    pub async fn await_queues_answer(&self, timeout: Duration) {
        let (Some(urls), Some(topology)) = (self.setting("AEGIS_AMQP_URL"), self.topology()) else {
            return;
        };
        let url = urls.split(',').next().unwrap_or(urls).trim().to_owned();
        let queues = topology.queues();
        crate::support::eventually(timeout, "every queue to answer after the broker restarted", || {
            let (url, queues) = (url.clone(), queues.clone());
            async move {
                let connection = lapin::Connection::connect(&url, Default::default()).await.ok()?;
                let answered = tokio::time::timeout(Duration::from_secs(5), async {
                    for queue in queues {
                        // A refused passive declare closes its channel.
                        let channel = connection.create_channel().await.ok()?;
                        let passive = lapin::options::QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        };
                        channel
                            .queue_declare(queue.as_str().into(), passive, Default::default())
                            .await
                            .ok()?;
                        let _ = channel.close(200, "answered".into()).await;
                    }
                    Some(())
                })
                .await;
                // Closed whatever the answer, so the polling leaves no
                // connection behind.
                let _ = connection.close(200, "queues checked".into()).await;
                answered.ok().flatten()
            }
        })
        .await;
    }

    fn setting(&self, key: &str) -> Option<&str> {
        self.settings
            .iter()
            .find(|(existing, _)| existing == key)
            .map(|(_, value)| value.as_str())
    }

    /// The queues and exchanges the cluster's processes declare; `None` when
    /// its settings name none (never a panic: this runs in a drop, which may
    /// be a failed test's unwinding).
    fn topology(&self) -> Option<Topology> {
        let schedule = match self.setting("AEGIS_RETRY_SCHEDULE") {
            Some(text) => text.parse::<RetrySchedule>().ok()?,
            None => RetrySchedule::default(),
        };
        let prefix = self.setting("AEGIS_AMQP_PREFIX")?;
        Some(Topology::new(prefix, schedule.delays(), None))
    }
}

/// How long a cluster's teardown may take, per broker address tried.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(30);

impl Drop for ProcessCluster {
    /// Deletes the cluster's queues and exchanges, so each test leaves the
    /// broker as it found it. Left to expire instead, a run's hundreds of
    /// quorum queues (the start-up test alone makes 280) were created and
    /// deleted in the broker's background while later tests ran, and held
    /// its connections up for minutes (a CI run failed on it: a process
    /// could not connect within 60 s). Deleting here, synchronously, makes
    /// every test pay for its own queues before the next one starts. Best
    /// effort: a broker that is gone (the cluster test's) is skipped.
    fn drop(&mut self) {
        let (Some(urls), Some(topology)) = (self.setting("AEGIS_AMQP_URL").map(str::to_owned), self.topology()) else {
            return;
        };
        // Its own thread and runtime: a drop may run on a runtime's thread,
        // where blocking on another future is not allowed.
        let teardown = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the teardown");
            runtime.block_on(async {
                for url in urls.split(',') {
                    let deleted = tokio::time::timeout(TEARDOWN_TIMEOUT, async {
                        let connection = lapin::Connection::connect(url.trim(), Default::default()).await?;
                        let channel = connection.create_channel().await?;
                        topology.delete(&channel).await?;
                        connection.close(200, "test done".into()).await
                    })
                    .await;
                    match deleted {
                        Ok(Ok(())) => return,
                        Ok(Err(error)) => {
                            eprintln!("could not delete a test's queues ({error}); trying the next address")
                        }
                        Err(_) => eprintln!("deleting a test's queues took over {TEARDOWN_TIMEOUT:?}"),
                    }
                }
            });
        });
        let _ = teardown.join();
    }
}
