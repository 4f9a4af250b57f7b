//! The `aegis-webhook` program as a library: how processes are assembled from the
//! crates, so tests start exactly what `main` starts.

pub mod credentials;
pub mod otlp;

use std::net::SocketAddr;
use std::sync::Arc;

use aegis_webhook_api::AppState;
use aegis_webhook_core::config::{Config, Sensitive};
use aegis_webhook_core::db::{self, tenants};
use aegis_webhook_core::queue::Queue;
use aegis_webhook_core::queue::memory::MemoryQueue;
use aegis_webhook_core::queue::rabbitmq::{Prefetch, RabbitQueue, Topology};
use aegis_webhook_core::secret::SecretCipher;
use aegis_webhook_core::target::TargetPolicy;
use aegis_webhook_ingester::Ingester;
use aegis_webhook_worker::Worker;
use aegis_webhook_worker::reconciler::Reconciler;
use anyhow::Context as _;
use sea_orm::DatabaseConnection;
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
    api: Option<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
    ingester: Option<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
    worker: Option<(CancellationToken, JoinHandle<anyhow::Result<()>>)>,
    reconciler: Option<(CancellationToken, JoinHandle<()>)>,
    /// Cancelled when a role ends without being asked to: the process must not
    /// keep running with a part missing (an orchestrator restarts it).
    role_failed: CancellationToken,
}

/// Runs a role until it ends; an end nobody asked for (an error, or a return
/// before `stop`) cancels `role_failed`.
fn spawn_role<F>(
    name: &'static str,
    role: F,
    stop: CancellationToken,
    role_failed: CancellationToken,
) -> JoinHandle<anyhow::Result<()>>
where
    F: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    tokio::spawn(async move {
        let result = role.await;
        if let Err(error) = &result {
            tracing::error!(role = name, error = format!("{error:#}"), "role failed");
            role_failed.cancel();
        } else if !stop.is_cancelled() {
            tracing::error!(role = name, "role ended unexpectedly");
            role_failed.cancel();
        }
        result
    })
}

impl std::fmt::Debug for RunningSystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningSystem")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

async fn join(name: &str, part: Option<(CancellationToken, JoinHandle<anyhow::Result<()>>)>) -> anyhow::Result<()> {
    if let Some((token, handle)) = part {
        token.cancel();
        handle.await.with_context(|| format!("the {name} task panicked"))??;
    }
    Ok(())
}

impl RunningSystem {
    /// Completes when a role ended without being asked to.
    pub async fn role_failed(&self) {
        self.role_failed.cancelled().await;
    }

    /// Stops in dependency order: no new events (API), then the ingester drains
    /// what already arrived, then workers finish in-flight attempts within the
    /// grace period. Whatever is left stays pending in the database.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        join("API", self.api.take()).await?;
        join("ingester", self.ingester.take()).await?;
        join("worker", self.worker.take()).await?;
        if let Some((token, handle)) = self.reconciler.take() {
            token.cancel();
            handle.await.context("the reconciler task panicked")?;
        }
        self.db.clone().close().await.context("failed to close the database")?;
        Ok(())
    }
}

/// Opens the database and, when configured, bootstraps tenant `default` with
/// `AEGIS_BOOTSTRAP_API_KEY`.
pub async fn open_database(config: &Config, run_migrations: bool) -> anyhow::Result<DatabaseConnection> {
    let db = db::connect_with(&config.database_url(), config.database_max_connections).await?;
    if run_migrations {
        db::migrate(&db).await?;
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

/// Starts the given roles on an open database. `listener` is required with the
/// API role; without it, a listener serves only probes and metrics.
pub async fn start(
    config: &Config,
    roles: Roles,
    db: DatabaseConnection,
    listener: Option<TcpListener>,
) -> anyhow::Result<RunningSystem> {
    aegis_webhook_core::metrics::install();
    let cipher = secret_cipher(config)?;
    let (queue, memory_queue) = open_queue(config, roles).await?;
    let role_failed = CancellationToken::new();

    let api = match (roles.api, listener) {
        (false, None) => None,
        (false, Some(listener)) => {
            let addr = listener.local_addr().context("failed to read the listener's address")?;
            let token = CancellationToken::new();
            let router = aegis_webhook_api::ops_router(db.clone(), queue.clone());
            let handle = tokio::spawn(aegis_webhook_api::serve(listener, router, token.clone()));
            Some((addr, token, handle))
        }
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
            };
            let addr = listener.local_addr().context("failed to read the listener's address")?;
            let token = CancellationToken::new();
            let handle = tokio::spawn(aegis_webhook_api::serve(
                listener,
                aegis_webhook_api::router(state),
                token.clone(),
            ));
            Some((addr, token, handle))
        }
    };
    let addr = api.as_ref().map(|(addr, _, _)| *addr);

    let ingester = roles.ingester.then(|| {
        let token = CancellationToken::new();
        let ingesting = Ingester::new(db.clone(), queue.clone()).run(token.clone(), usize::from(config.amqp_prefetch));
        let handle = spawn_role("ingester", ingesting, token.clone(), role_failed.clone());
        (token, handle)
    });

    let (worker, reconciler) = if roles.worker {
        let worker = Worker::new(config, db.clone(), queue.clone(), cipher)?;
        let token = CancellationToken::new();
        let working = worker.run(token.clone(), config.shutdown_grace);
        let handle = spawn_role("worker", working, token.clone(), role_failed.clone());
        let reconciler_token = CancellationToken::new();
        // The in-process queue starts empty, so every pending delivery is
        // re-enqueued at start: stopping the process loses nothing. A broker
        // keeps its messages; there the periodic pass finds what went missing.
        let reconciler_handle = tokio::spawn(Reconciler::new(db.clone(), queue.clone()).run(
            memory_queue.is_some(),
            config.reconcile_interval,
            config.reconcile_grace,
            reconciler_token.clone(),
        ));
        (Some((token, handle)), Some((reconciler_token, reconciler_handle)))
    } else {
        (None, None)
    };

    Ok(RunningSystem {
        addr,
        db,
        queue,
        memory_queue,
        api: api.map(|(_, token, handle)| (token, handle)),
        ingester,
        worker,
        reconciler,
        role_failed,
    })
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
            let queue = RabbitQueue::connect(url.expose(), topology, prefetch)
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
            let memory = MemoryQueue::new();
            Ok((Arc::new(memory.clone()), Some(memory)))
        }
    }
}

/// What `dev` printed for the user.
#[derive(Debug, Clone)]
pub struct DevSetup {
    pub tenant_id: uuid::Uuid,
    pub api_key: String,
    pub ingest_token: String,
}

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

    let db = open_database(&config, true).await?;
    let tenant = tenants::ensure_tenant(&db, DEFAULT_TENANT).await?;
    let system = start(&config, Roles::ALL, db, Some(listener)).await?;
    Ok((
        system,
        DevSetup {
            tenant_id: tenant.id,
            api_key,
            ingest_token,
        },
    ))
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
