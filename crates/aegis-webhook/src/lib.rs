//! The `aegis-webhook` program as a library: how processes are assembled from the
//! crates, so tests start exactly what `main` starts.

pub mod credentials;
pub mod ops;
pub mod otlp;

use std::net::SocketAddr;
use std::sync::Arc;

use aegis_webhook_api::AppState;
use aegis_webhook_core::bulk_runtime::BulkRuntime;
use aegis_webhook_core::config::{Config, Sensitive};
use aegis_webhook_core::queue::Queue;
use aegis_webhook_core::queue::memory::MemoryQueue;
use aegis_webhook_core::secret::SecretCipher;
use aegis_webhook_core::target::TargetPolicy;
use aegis_webhook_ingester::Ingester;
use aegis_webhook_rabbitmq::{Prefetch, RabbitQueue, Topology};
use aegis_webhook_storage::{self as db, BulkStage, tenants};
use aegis_webhook_worker::Worker;
use aegis_webhook_worker::expiry::Expiry;
use aegis_webhook_worker::reconciler::Reconciler;
use anyhow::Context as _;
use sea_orm::{DatabaseConnection, DbBackend};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use credentials::DevCredentials;
pub use otlp::telemetry_settings;

/// The tenant `dev` and `AEGIS_BOOTSTRAP_API_KEY` set up.
pub const DEFAULT_TENANT: &str = "default";

/// Which parts a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub api: bool,
    pub ingester: bool,
    pub worker: bool,
}

impl Roles {
    pub const ALL: Roles = Roles {
        api: true,
        ingester: true,
        worker: true,
    };
    pub const API: Roles = Roles {
        api: true,
        ingester: false,
        worker: false,
    };
    pub const INGESTER: Roles = Roles {
        api: false,
        ingester: true,
        worker: false,
    };
    pub const WORKER: Roles = Roles {
        api: false,
        ingester: false,
        worker: true,
    };

    /// The process's name in traces: `aegis-webhook-api`, `-ingester`,
    /// `-worker`, or `-dev` for every role in one process.
    pub fn service_name(self) -> &'static str {
        match self {
            Roles::ALL => "aegis-webhook-dev",
            Roles::API => "aegis-webhook-api",
            Roles::INGESTER => "aegis-webhook-ingester",
            Roles::WORKER => "aegis-webhook-worker",
            _ => "aegis-webhook",
        }
    }
}

/// A started process: its parts run in tasks until [`RunningSystem::stop`].
pub struct RunningSystem {
    /// Where the process serves HTTP: the API, or only probes and metrics.
    pub addr: Option<SocketAddr>,
    pub db: DatabaseConnection,
    pub queue: Arc<dyn Queue>,
    /// Set when the queue is the in-process one, for inspection.
    pub memory_queue: Option<MemoryQueue>,
    /// The HTTP server: the API with the probes, or the probes alone.
    http: Option<Supervised>,
    ingester: Option<Supervised>,
    worker: Option<Supervised>,
    reconciler: Option<Supervised>,
    /// Removes what has passed its retention, beside the workers.
    expiry: Option<Supervised>,
    /// Reads the lanes' depths into their gauges, beside the consuming roles.
    lane_depths: Option<Supervised>,
    /// Where the consuming roles run their bulk lanes' work, and the runtime
    /// under it (see `aegis_webhook_core::bulk_runtime`).
    bulk: Option<(BulkStage, BulkRuntime)>,
    /// Cancelled when a supervised task ends without being asked to: the
    /// process must not keep running with a part missing (an orchestrator
    /// restarts it).
    role_failed: CancellationToken,
}

/// Set to a duration (`500ms`) to make the HTTP server task fail that long
/// after start, as a crashed server would: the fault test that checks the
/// process then exits non-zero sets it.
pub const FAIL_HTTP_SERVER_AFTER_ENV: &str = "AEGIS_TEST_FAIL_HTTP_SERVER_AFTER";

/// A long-lived task of the process, asked to stop with its token.
pub struct Supervised {
    name: &'static str,
    stop: CancellationToken,
    handle: JoinHandle<anyhow::Result<()>>,
}

impl Supervised {
    /// Asks the task to stop and waits for it: its error, if it ended with one.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.handle
            .await
            .with_context(|| format!("the {} task's supervisor failed", self.name))?
    }
}

/// Runs `task` until it ends, as every long-lived task of a process runs: an
/// end nobody asked for (an error, a panic, or a return before `stop`)
/// cancels `role_failed`, which stops the process with an error.
pub fn supervise<F>(
    name: &'static str,
    task: impl FnOnce(CancellationToken) -> F,
    role_failed: &CancellationToken,
) -> Supervised
where
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let stop = CancellationToken::new();
    let running = tokio::spawn(task(stop.clone()));
    let (asked, role_failed) = (stop.clone(), role_failed.clone());
    let handle = tokio::spawn(async move {
        let result = match running.await {
            Ok(result) => result,
            Err(error) if error.is_panic() => Err(anyhow::anyhow!("the {name} task panicked")),
            Err(_) => Err(anyhow::anyhow!("the {name} task was cancelled")),
        };
        if let Err(error) = &result {
            tracing::error!(role = name, error = format!("{error:#}"), "role failed");
            role_failed.cancel();
        } else if !asked.is_cancelled() {
            tracing::error!(role = name, "role ended unexpectedly");
            role_failed.cancel();
        }
        result
    });
    Supervised { name, stop, handle }
}

impl std::fmt::Debug for RunningSystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningSystem")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl RunningSystem {
    /// Completes when a role ended without being asked to.
    pub async fn role_failed(&self) {
        self.role_failed.cancelled().await;
    }

    /// Stops in dependency order: no new events (API), then the ingester drains
    /// what already arrived, then workers finish in-flight attempts within the
    /// grace period. Whatever is left stays pending in the database.
    pub async fn stop(self) -> anyhow::Result<()> {
        // Every part is stopped, even after one of them failed; the first
        // failure is the answer.
        let mut first_failure = Ok(());
        for part in [
            self.http,
            self.ingester,
            self.worker,
            self.reconciler,
            self.expiry,
            self.lane_depths,
        ]
        .into_iter()
        .flatten()
        {
            let stopped = part.stop().await;
            if first_failure.is_ok() {
                first_failure = stopped;
            }
        }
        if let Some((stage, runtime)) = self.bulk {
            let closed = stage.close().await;
            if first_failure.is_ok() {
                first_failure = closed;
            }
            drop(runtime);
        }
        self.db.close().await.context("failed to close the database")?;
        first_failure
    }
}

/// Opens the database and, when configured, bootstraps tenant `default` with
/// `AEGIS_BOOTSTRAP_API_KEY`.
pub async fn open_database(config: &Config, run_migrations: bool) -> anyhow::Result<DatabaseConnection> {
    let db = db::connect_with(&config.database_url(), config.database_max_connections).await?;
    prepare_database(config, db, run_migrations).await
}

/// [`open_database`] for a process running `roles`. An API process's
/// statements are cancelled by PostgreSQL once they run longer than
/// `AEGIS_GRAPHQL_TIMEOUT` (unless `AEGIS_API_STATEMENT_TIMEOUT=off`): its
/// requests are abandoned at that deadline, and a statement abandoned (an
/// expensive query a client repeats) would otherwise run on in the server.
/// The other roles' statements are bounded by their batches, and `dev`
/// keeps them all in one pool.
pub async fn open_database_for(config: &Config, roles: Roles) -> anyhow::Result<DatabaseConnection> {
    use aegis_webhook_core::config::ApiStatementTimeout;
    let url = config.database_url();
    let db = if roles == Roles::API && config.api_statement_timeout == ApiStatementTimeout::On {
        db::connect_bounded(&url, config.database_max_connections, config.graphql_timeout).await?
    } else {
        db::connect_with(&url, config.database_max_connections).await?
    };
    prepare_database(config, db, false).await
}

/// What every process does with its database before it starts: the
/// migrations (if asked) or the partitions ahead, and the bootstrap key.
async fn prepare_database(
    config: &Config,
    db: DatabaseConnection,
    run_migrations: bool,
) -> anyhow::Result<DatabaseConnection> {
    if run_migrations {
        db::migrate(&db, config.partition_plan()).await?;
    } else {
        // Every process writes deliveries (the API's test events, too), so each
        // makes sure their partitions reach ahead before it starts.
        db::partitions::ensure(&db, config.partition_plan(), chrono::Utc::now())
            .await
            .context(
                "failed to make the deliveries' partitions (are migrations applied? run `aegis-webhook migrate`)",
            )?;
    }
    if let Some(key) = &config.bootstrap_api_key {
        let tenant = tenants::ensure_tenant(&db, DEFAULT_TENANT)
            .await
            .context("failed to bootstrap the default tenant (are migrations applied? run `aegis-webhook migrate`)")?;
        tenants::add_api_key(&db, tenant.id, key.expose())
            .await
            .context("failed to store AEGIS_BOOTSTRAP_API_KEY")?;
    }
    Ok(db)
}

/// The cipher of webhook secrets, from `AEGIS_SECRET_KEY`.
pub fn secret_cipher(config: &Config) -> anyhow::Result<SecretCipher> {
    let key = config
        .secret_key
        .as_ref()
        .context("AEGIS_SECRET_KEY is required: base64 of 32 random bytes (for example `openssl rand -base64 32`)")?;
    SecretCipher::from_base64(key.expose()).context("AEGIS_SECRET_KEY is invalid")
}

/// Refuses to start a process whose `AEGIS_SECRET_KEY` is not the key the
/// stored webhook secrets were sealed with (there is one key: operations.md,
/// "Secret-key rotation"): an API would seal new secrets the other replicas
/// cannot open, and a worker could send nothing. One stored secret is
/// enough to tell; a database without webhooks passes.
pub async fn check_secret_key(db: &DatabaseConnection, cipher: &SecretCipher) -> anyhow::Result<()> {
    let sample = db::webhooks::one_sealed_secret(db)
        .await
        .context("failed to read a stored webhook secret to check AEGIS_SECRET_KEY against")?;
    match sample {
        Some(sealed) if cipher.sealed_with_another_key(&sealed) => anyhow::bail!(
            "AEGIS_SECRET_KEY is not the key the stored webhook secrets were sealed with (key `{}`); every api, ingester and worker needs that same key (docs/operations.md, \"Secret-key rotation\")",
            SecretCipher::key_id_of(&sealed).unwrap_or_default()
        ),
        _ => Ok(()),
    }
}

/// Starts the given roles on an open database. `listener` is required with the
/// API role; without it, a listener serves only probes and metrics.
pub async fn start(
    config: &Config,
    roles: Roles,
    db: DatabaseConnection,
    listener: Option<TcpListener>,
) -> anyhow::Result<RunningSystem> {
    let (queue, memory_queue) = open_queue(config, roles).await?;
    start_on_queue(config, roles, db, listener, queue, memory_queue).await
}

/// [`start`] on a queue the caller opened with [`open_queue`] (and may have
/// wrapped: the fault tests make its publishes fail). `memory_queue` is the
/// in-process queue when that is what `queue` stands on.
pub async fn start_on_queue(
    config: &Config,
    roles: Roles,
    db: DatabaseConnection,
    listener: Option<TcpListener>,
    queue: Arc<dyn Queue>,
    memory_queue: Option<MemoryQueue>,
) -> anyhow::Result<RunningSystem> {
    aegis_webhook_core::metrics::install();
    let cipher = secret_cipher(config)?;
    check_secret_key(&db, &cipher).await?;
    let role_failed = CancellationToken::new();
    // On PostgreSQL the consuming roles run their bulk lanes' work on a
    // runtime of lower-priority threads. Not on SQLite (`dev`): there the
    // lanes share the file's one writer (express first: `write_gate`), and
    // the bulk lane's own batchers only add writers; measured no better
    // (embedded noisy benchmark, tenant B's p99/max: 245/480 ms in one run
    // with it, 160/356 and 209/780 in two without; with the write gate,
    // 166/265 and 102/174 with it, 62/78 and 68/118 without).
    let bulk = match (roles.ingester || roles.worker) && db.get_database_backend() == DbBackend::Postgres {
        true => {
            let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
            let runtime = BulkRuntime::start(threads)?;
            let stage = BulkStage::open(
                runtime.handle().clone(),
                &config.database_url(),
                config.database_bulk_connections,
            )
            .await?;
            Some((stage, runtime))
        }
        false => None,
    };
    let bulk_stage = bulk.as_ref().map(|(stage, _)| stage.clone());

    // Every role listens: the API serves everything there, the others their
    // probes and metrics.
    let routes = match (roles.api, listener) {
        (false, None) => None,
        (false, Some(listener)) => Some((listener, ops::router(db.clone(), queue.clone()))),
        (true, None) => anyhow::bail!("the API role needs a listener"),
        (true, Some(listener)) => {
            let state = AppState {
                db: db.clone(),
                cipher: cipher.clone(),
                queue: queue.clone(),
                policy: Arc::new(config.target_policy()),
                ingest_token: config.ingest_token.clone(),
                max_event_bytes: config.max_event_bytes,
                secret_rotation_grace: config.secret_rotation_grace,
                graphql_introspection: config.graphql_introspection,
                graphql_max_body_bytes: config.graphql_max_body_bytes,
                graphql_timeout: config.graphql_timeout,
                quotas: config.quotas(),
                retention: aegis_webhook_api::RetentionSettings {
                    default: config.retention_policy()?,
                    bounds: config.retention_bounds()?,
                },
                limits: Arc::new(aegis_webhook_api::limits::Limits::new(
                    aegis_webhook_api::limits::LimitSettings {
                        api_rate: config.api_rate_limit,
                        api_burst: config.api_rate_burst,
                        api_concurrent: config.api_max_concurrent_requests,
                        intake_rate: config.intake_rate_limit,
                        intake_burst: config.intake_rate_burst,
                    },
                )),
                busy_log: Arc::new(aegis_webhook_api::limits::LogThrottle::new(
                    std::time::Duration::from_secs(10),
                )),
                public_url: config.public_url.clone(),
                portal: aegis_webhook_api::portal::Settings {
                    frame_ancestors: config.portal_frame_ancestors().into_iter().map(str::to_owned).collect(),
                    cookie_secure: config.portal_cookie_secure,
                },
            };
            let router = aegis_webhook_api::router(state).merge(ops::router(db.clone(), queue.clone()));
            Some((listener, router))
        }
    };
    let mut addr = None;
    let http = match routes {
        None => None,
        Some((listener, router)) => {
            addr = Some(listener.local_addr().context("failed to read the listener's address")?);
            let fail_after = injected_http_failure()?;
            let limits = ops::HttpLimits::from_config(config);
            Some(supervise(
                "HTTP server",
                |stop| async move {
                    let serving = ops::serve(listener, router, stop, limits);
                    match fail_after {
                        None => serving.await,
                        Some(after) => tokio::select! {
                            served = serving => served,
                            () = tokio::time::sleep(after) => {
                                anyhow::bail!("{FAIL_HTTP_SERVER_AFTER_ENV} is set: the HTTP server task fails")
                            }
                        },
                    }
                },
                &role_failed,
            ))
        }
    };

    let ingester = roles.ingester.then(|| {
        let fair = Arc::new(aegis_webhook_core::fairness::FairShare::new(config.fair_shares()));
        let ingester = match bulk_stage.clone() {
            Some(stage) => Ingester::with_bulk_stage(db.clone(), queue.clone(), fair, config.max_event_bytes, stage),
            None => Ingester::new(db.clone(), queue.clone(), fair, config.max_event_bytes),
        };
        let concurrency = usize::from(config.amqp_prefetch);
        supervise("ingester", |stop| ingester.run(stop, concurrency), &role_failed)
    });

    let (worker, reconciler, expiry) = if roles.worker {
        let worker = match bulk_stage {
            Some(stage) => Worker::with_bulk_stage(config, db.clone(), queue.clone(), cipher, stage)?,
            None => Worker::new(config, db.clone(), queue.clone(), cipher)?,
        };
        let grace = config.shutdown_grace;
        let working = supervise("worker", |stop| worker.run(stop, grace), &role_failed);
        // The in-process queue starts empty, so every pending delivery is
        // re-enqueued at start: stopping the process loses nothing. A broker
        // keeps its messages; there the periodic pass finds what went missing.
        let reconciler = Reconciler::new(db.clone(), queue.clone());
        let (recover_all, interval, grace) = (
            memory_queue.is_some(),
            config.reconcile_interval,
            config.reconcile_grace,
        );
        let reconciling = supervise(
            "reconciler",
            |stop| async move {
                reconciler.run(recover_all, interval, grace, stop).await;
                Ok(())
            },
            &role_failed,
        );
        let expiry = Expiry::new(config, db.clone())?;
        let interval = config.expiry_interval;
        let expiring = supervise(
            "expiry",
            |stop| async move {
                expiry.run(interval, stop).await;
                Ok(())
            },
            &role_failed,
        );
        (Some(working), Some(reconciling), Some(expiring))
    } else {
        (None, None, None)
    };

    let lane_depths = (roles.ingester || roles.worker).then(|| {
        let queue = queue.clone();
        supervise(
            "lane depths",
            |stop| async move {
                aegis_webhook_core::queue::watch_lane_depths(
                    queue.as_ref(),
                    aegis_webhook_core::queue::LANE_DEPTH_INTERVAL,
                    stop,
                )
                .await;
                Ok(())
            },
            &role_failed,
        )
    });

    Ok(RunningSystem {
        addr,
        lane_depths,
        bulk,
        db,
        queue,
        memory_queue,
        http,
        ingester,
        worker,
        reconciler,
        expiry,
        role_failed,
    })
}

/// The fault that [`FAIL_HTTP_SERVER_AFTER_ENV`] asks for, if any.
fn injected_http_failure() -> anyhow::Result<Option<std::time::Duration>> {
    std::env::var(FAIL_HTTP_SERVER_AFTER_ENV)
        .ok()
        .map(|after| {
            humantime::parse_duration(&after)
                .with_context(|| format!("{FAIL_HTTP_SERVER_AFTER_ENV} is not a duration: {after}"))
        })
        .transpose()
}

/// RabbitMQ when `AEGIS_AMQP_URL` is set, else the in-process queue (returned
/// a second time, typed, for inspection).
pub async fn open_queue(config: &Config, roles: Roles) -> anyhow::Result<(Arc<dyn Queue>, Option<MemoryQueue>)> {
    match &config.amqp_url {
        Some(url) => {
            let topology = Topology::new(
                &config.amqp_prefix,
                config.retry_schedule.delays(),
                config.amqp_queue_expiry,
            );
            let prefetch = Prefetch {
                events: config.amqp_prefetch,
                // Room for as many tasks waiting in webhooks' lines as in flight
                // (see the worker's admission).
                tasks: u16::try_from(config.worker_concurrency.saturating_mul(2)).unwrap_or(u16::MAX),
            };
            let queue = RabbitQueue::connect(url, topology, prefetch, config.lane_weights())
                .await
                .context("failed to set up RabbitMQ")?;
            Ok((Arc::new(queue), None))
        }
        None => {
            if roles != Roles::ALL {
                tracing::warn!(
                    "no AEGIS_AMQP_URL: the in-process queue only connects roles inside one process; \
                     run `aegis-webhook dev`, or set AEGIS_AMQP_URL for separate processes"
                );
            }
            let memory = MemoryQueue::with_weights(config.lane_weights());
            Ok((Arc::new(memory.clone()), Some(memory)))
        }
    }
}

/// What `dev` printed for the user.
#[derive(Debug, Clone)]
pub struct DevSetup {
    pub tenant_id: aegis_webhook_core::ids::TenantId,
    pub api_key: String,
    pub ingest_token: String,
    /// A single-use link into the portal for tenant `default`, made at
    /// start: see [`DEV_PORTAL_LINK_LIFETIME`].
    pub portal_link: String,
}

/// How long the portal link `dev` prints at start stays usable (once), and
/// how long the session it opens lasts: a working day, so a link printed in
/// the morning still opens; the next start prints a new one.
pub const DEV_PORTAL_LINK_LIFETIME: chrono::Duration = chrono::Duration::hours(12);

/// `aegis-webhook dev`: SQLite in the data folder, migrations applied, loopback
/// targets allowed, tenant `default` with an API key and an ingest token (from
/// the environment, or generated once and kept in the data folder), and every
/// role in this one process.
pub async fn start_dev(mut config: Config, listener: TcpListener) -> anyhow::Result<(RunningSystem, DevSetup)> {
    let credentials = DevCredentials::load_or_create(&config.data_dir)?;
    let api_key = config
        .bootstrap_api_key
        .get_or_insert_with(|| Sensitive::new(credentials.api_key.clone()))
        .expose()
        .to_owned();
    let ingest_token = config
        .ingest_token
        .get_or_insert_with(|| Sensitive::new(credentials.ingest_token.clone()))
        .expose()
        .to_owned();
    config
        .secret_key
        .get_or_insert_with(|| Sensitive::new(credentials.secret_key.clone()));
    for loopback in TargetPolicy::allowing_loopback_ranges() {
        if !config.allow_private_targets.contains(&loopback) {
            config.allow_private_targets.push(loopback);
        }
    }

    let address = listener.local_addr()?;
    let public_url = config
        .public_url
        .get_or_insert_with(|| format!("http://{address}"))
        .clone();
    if config.portal_frame_ancestors().is_empty() {
        // `dev` serves no TLS. (A framed portal keeps Secure: browsers send a
        // cookie into another site's frame only when it is.)
        config.portal_cookie_secure = false;
    }

    let db = open_database(&config, true).await?;
    let tenant = tenants::ensure_tenant(&db, DEFAULT_TENANT).await?;
    let portal_link = dev_portal_link(&db, &api_key, &public_url).await?;
    let system = start(&config, Roles::ALL, db, Some(listener)).await?;
    Ok((
        system,
        DevSetup {
            tenant_id: tenant.id,
            api_key,
            ingest_token,
            portal_link,
        },
    ))
}

/// A portal link for the bootstrap key's tenant, with the key's scopes.
async fn dev_portal_link(db: &DatabaseConnection, api_key: &str, public_url: &str) -> anyhow::Result<String> {
    let holder = tenants::authenticate(db, api_key)
        .await?
        .context("dev's API key is not stored: cannot make a portal link")?;
    let now = chrono::Utc::now();
    let link = aegis_webhook_storage::portal::NewLink {
        tenant_id: holder.tenant_id,
        api_key_id: holder.key_id,
        scopes: holder.scopes,
        link_expires_at: now + DEV_PORTAL_LINK_LIFETIME,
        session_ttl: DEV_PORTAL_LINK_LIFETIME,
        theme: aegis_webhook_storage::portal::Theme::default(),
    };
    let (_, token) = aegis_webhook_storage::portal::create_link(db, link, now).await?;
    Ok(format!("{}/portal/open/{token}", public_url.trim_end_matches('/')))
}

/// Runs until SIGINT or SIGTERM (how Kubernetes stops a pod), then stops in
/// order: see [`RunningSystem::stop`].
pub async fn run_until_signal(system: RunningSystem) -> anyhow::Result<()> {
    let terminate = async {
        #[cfg(unix)]
        {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(error) => {
                    tracing::error!(error = %error, "cannot listen for SIGTERM; only Ctrl-C stops this process");
                    std::future::pending::<()>().await;
                }
            }
        }
        #[cfg(not(unix))]
        std::future::pending::<()>().await;
    };
    let role_failed = tokio::select! {
        _ = tokio::signal::ctrl_c() => false,
        () = terminate => false,
        () = system.role_failed() => true,
    };
    tracing::info!("stopping");
    let stopped = system.stop().await;
    if role_failed {
        anyhow::bail!("a role failed (see the log above); stopped the rest");
    }
    stopped
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_supervised_task_that_fails_panics_or_returns_unasked_fails_the_process() {
        type End = fn() -> anyhow::Result<()>;
        let ends: [(&str, End); 3] = [
            ("an error", || Err(anyhow::anyhow!("boom"))),
            ("a panic", || panic!("boom")),
            ("a return nobody asked for", || Ok(())),
        ];
        for (how, end) in ends {
            let role_failed = CancellationToken::new();
            let task = supervise("test", |_stop| async move { end() }, &role_failed);
            tokio::time::timeout(std::time::Duration::from_secs(5), role_failed.cancelled())
                .await
                .unwrap_or_else(|_| panic!("{how} did not fail the process"));
            let stopped = task.stop().await;
            assert_eq!(
                stopped.is_err(),
                how != "a return nobody asked for",
                "{how}: {stopped:?}"
            );
        }
    }

    #[tokio::test]
    async fn a_supervised_task_asked_to_stop_does_not_fail_the_process() {
        let role_failed = CancellationToken::new();
        let task = supervise(
            "test",
            |stop| async move {
                stop.cancelled().await;
                Ok(())
            },
            &role_failed,
        );
        task.stop().await.expect("a clean stop");
        assert!(!role_failed.is_cancelled());
    }
}
