//! The system under test, started from the `aegis-webhook` binary as separate
//! processes, so that each one's CPU time and memory can be measured:
//!
//! - embedded: one `dev` process with its own data folder (a fresh SQLite
//!   file) and credentials the benchmark chose;
//! - production: a fresh PostgreSQL database, a unique RabbitMQ prefix,
//!   `migrate`, then `api`, `ingester` and N `worker` processes, each with its
//!   own `AEGIS_LISTEN`.
//!
//! The noisy scenario's second tenant is made as an operator makes one, with
//! `aegis-webhook tenant create` and `apikey create` on the database before
//! the serving processes start.
//!
//! [`System`] records every resource as soon as it exists, so
//! [`System::shutdown`] releases whatever was started even when starting
//! failed halfway or was interrupted.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use aegis_webhook_core::retry::RetrySchedule;
use aegis_webhook_core::secret::SecretCipher;
use aegis_webhook_storage::tenants::generate_api_key;
use anyhow::Context as _;

use crate::api::Api;
use crate::broker::{Broker, QUEUE_EXPIRY};
use crate::options::{Mode, Plan};
use crate::postgres::FreshDatabase;
use crate::process::{Spawned, run_once};

/// How long processes get to become ready.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `migrate` may take.
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);
/// `AEGIS_SHUTDOWN_GRACE` of the processes: nothing is in flight when the
/// benchmark stops them, so a short grace keeps the end of a run quick.
const SHUTDOWN_GRACE: &str = "5s";
/// How long a process has after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `tenant create` and `apikey create` may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(60);
/// The name of the noisy scenario's tenant B (tenant A is the bootstrap
/// tenant, `default`).
pub const QUIET_TENANT: &str = "bench-quiet";

/// The key in what `aegis-webhook apikey create` prints (`api key: <key>`).
fn api_key_in(output: &str) -> Option<&str> {
    output
        .lines()
        .find_map(|line| line.strip_prefix("api key:"))
        .map(str::trim)
        .filter(|key| !key.is_empty())
}

#[derive(Debug)]
pub struct System {
    bin: PathBuf,
    log_dir: PathBuf,
    pub processes: Vec<Spawned>,
    /// The API as the bootstrap tenant (tenant A in the noisy scenario) uses it.
    pub api: Option<Api>,
    /// The same API with tenant B's key (noisy scenario).
    pub quiet_api: Option<Api>,
    database: Option<FreshDatabase>,
    broker: Option<Broker>,
}

/// Where [`free_port`] looks: below Linux's default ephemeral range
/// (32768–60999), which the kernel hands out for every outgoing connection
/// and every bind to port 0.
const LISTEN_PORTS: std::ops::Range<u16> = 20_000..32_768;

/// An unused port on loopback for a process's `AEGIS_LISTEN`, which the
/// process binds seconds later. Not one found by binding to port 0: that is
/// an ephemeral port, and in those seconds an outgoing connection (to
/// PostgreSQL, to RabbitMQ) or another program's listener may take it (seen
/// in CI, with the tests running side by side: the API failed to bind, and
/// another test's server answered in its place). A random port below the
/// ephemeral range is taken only by another listener choosing the same way.
fn free_port() -> anyhow::Result<u16> {
    for _ in 0..100 {
        let port = rand::random_range(LISTEN_PORTS);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("found no free port on 127.0.0.1 in {LISTEN_PORTS:?} after 100 tries")
}

fn setting(name: &str, value: impl Into<String>) -> (String, String) {
    (name.to_owned(), value.into())
}

impl System {
    pub fn new(bin: &Path, log_dir: &Path) -> System {
        System {
            bin: bin.to_owned(),
            log_dir: log_dir.to_owned(),
            processes: Vec::new(),
            api: None,
            quiet_api: None,
            database: None,
            broker: None,
        }
    }

    /// The run's PostgreSQL database (production mode).
    pub fn database_url(&self) -> Option<String> {
        self.database.as_ref().map(FreshDatabase::url)
    }

    /// The broker connection (production mode).
    pub fn broker(&self) -> Option<&Broker> {
        self.broker.as_ref()
    }

    /// Starts the plan's mode and waits until it takes events.
    pub async fn start(&mut self, plan: &Plan) -> anyhow::Result<()> {
        match plan.mode {
            Mode::Embedded => self.start_embedded(plan).await,
            Mode::Production => self.start_production(plan).await,
        }
    }

    /// Settings every process gets, before its own and the caller's `--set`.
    fn base_settings(plan: &Plan) -> Vec<(String, String)> {
        let mut settings = vec![
            setting("AEGIS_LOG", "warn"),
            setting("AEGIS_SHUTDOWN_GRACE", SHUTDOWN_GRACE),
            setting("AEGIS_SECRET_KEY", SecretCipher::generate_key()),
        ];
        if let Some(concurrency) = plan.concurrency {
            settings.push(setting("AEGIS_WORKER_CONCURRENCY", concurrency.to_string()));
        }
        settings
    }

    fn spawn(&mut self, args: &[&str], name: &str, settings: &[(String, String)]) -> anyhow::Result<()> {
        let spawned = Spawned::spawn(&self.bin, args, name, settings, &self.log_dir)?;
        self.processes.push(spawned);
        Ok(())
    }

    /// With the caller's `--set` settings last, so they win.
    fn with_overrides(plan: &Plan, mut settings: Vec<(String, String)>) -> Vec<(String, String)> {
        settings.extend(plan.settings.iter().cloned());
        settings
    }

    /// Creates tenant B with `settings` (the database's) and returns its API
    /// key, read from what `apikey create` prints.
    async fn create_quiet_tenant(&self, settings: &[(String, String)]) -> anyhow::Result<String> {
        run_once(
            &self.bin,
            &["tenant", "create", QUIET_TENANT],
            "tenant-create",
            settings,
            &self.log_dir,
            ADMIN_TIMEOUT,
        )
        .await?;
        let name = "apikey-create";
        run_once(
            &self.bin,
            &["apikey", "create", "--tenant", QUIET_TENANT],
            name,
            settings,
            &self.log_dir,
            ADMIN_TIMEOUT,
        )
        .await?;
        let log = self.log_dir.join(format!("{name}.log"));
        let output = std::fs::read_to_string(&log).with_context(|| format!("failed to read {}", log.display()))?;
        api_key_in(&output)
            .map(str::to_owned)
            .with_context(|| format!("`apikey create` printed no `api key:` line; see {}", log.display()))
    }

    async fn start_embedded(&mut self, plan: &Plan) -> anyhow::Result<()> {
        let port = free_port()?;
        let api = Api {
            base_url: format!("http://127.0.0.1:{port}"),
            api_key: generate_api_key(),
            ingest_token: format!("aegis_ingest_bench_{}", uuid::Uuid::new_v4().simple()),
            http: reqwest::Client::new(),
        };
        let mut settings = Self::base_settings(plan);
        settings.push(setting(
            "AEGIS_DATA_DIR",
            self.log_dir.join("data").display().to_string(),
        ));
        if plan.quiet.is_some() {
            // `dev` would migrate the SQLite file at start; the tenant needs
            // the tables first, and the file is `dev`'s alone once it runs.
            let admin = Self::with_overrides(plan, settings.clone());
            run_once(
                &self.bin,
                &["migrate"],
                "migrate",
                &admin,
                &self.log_dir,
                MIGRATE_TIMEOUT,
            )
            .await?;
            let key = self.create_quiet_tenant(&admin).await?;
            self.quiet_api = Some(Api {
                api_key: key,
                ..api.clone()
            });
        }
        settings.extend([
            setting("AEGIS_LISTEN", format!("127.0.0.1:{port}")),
            setting("AEGIS_BOOTSTRAP_API_KEY", api.api_key.clone()),
            setting("AEGIS_INGEST_TOKEN", api.ingest_token.clone()),
        ]);
        self.spawn(&["dev"], "dev", &Self::with_overrides(plan, settings))?;
        self.api = Some(api);
        self.wait_until_ready(0).await
    }

    async fn start_production(&mut self, plan: &Plan) -> anyhow::Result<()> {
        let retry_schedule = match plan.setting("AEGIS_RETRY_SCHEDULE") {
            Some(text) => text
                .parse::<RetrySchedule>()
                .map_err(|error| anyhow::anyhow!("AEGIS_RETRY_SCHEDULE `{text}`: {error}"))?,
            None => RetrySchedule::default(),
        };
        let broker = Broker::connect(&plan.amqp_url, &retry_schedule).await?;
        let prefix = broker.prefix.clone();
        self.broker = Some(broker);
        let database = FreshDatabase::create(&plan.postgres_url).await?;
        let database_url = database.url();
        self.database = Some(database);

        let mut base = Self::base_settings(plan);
        base.extend([
            setting("AEGIS_DATABASE_URL", database_url),
            setting("AEGIS_AMQP_URL", plan.amqp_url.clone()),
            setting("AEGIS_AMQP_PREFIX", prefix),
            setting("AEGIS_AMQP_QUEUE_EXPIRY", QUEUE_EXPIRY),
            setting("AEGIS_ALLOW_PRIVATE_TARGETS", "127.0.0.0/8"),
        ]);
        let with_own = |own: Vec<(String, String)>| {
            let mut settings = base.clone();
            settings.extend(own);
            Self::with_overrides(plan, settings)
        };

        run_once(
            &self.bin,
            &["migrate"],
            "migrate",
            &with_own(Vec::new()),
            &self.log_dir,
            MIGRATE_TIMEOUT,
        )
        .await?;

        let port = free_port()?;
        let api = Api {
            base_url: format!("http://127.0.0.1:{port}"),
            api_key: generate_api_key(),
            ingest_token: format!("aegis_ingest_bench_{}", uuid::Uuid::new_v4().simple()),
            http: reqwest::Client::new(),
        };
        if plan.quiet.is_some() {
            let key = self.create_quiet_tenant(&with_own(Vec::new())).await?;
            self.quiet_api = Some(Api {
                api_key: key,
                ..api.clone()
            });
        }
        // Only the API bootstraps the tenant, so processes do not race to create it.
        let api_settings = with_own(vec![
            setting("AEGIS_LISTEN", format!("127.0.0.1:{port}")),
            setting("AEGIS_BOOTSTRAP_API_KEY", api.api_key.clone()),
            setting("AEGIS_INGEST_TOKEN", api.ingest_token.clone()),
        ]);
        self.spawn(&["api"], "api", &api_settings)?;
        self.api = Some(api);
        let ingester_settings = with_own(vec![setting("AEGIS_LISTEN", format!("127.0.0.1:{}", free_port()?))]);
        self.spawn(&["ingester"], "ingester", &ingester_settings)?;
        for number in 1..=plan.workers {
            let worker_settings = with_own(vec![setting("AEGIS_LISTEN", format!("127.0.0.1:{}", free_port()?))]);
            self.spawn(&["worker"], &format!("worker-{number}"), &worker_settings)?;
        }
        self.wait_until_ready(u32::from(plan.workers)).await
    }

    /// Waits until the API is ready and, with a broker, the ingester and
    /// `workers` workers consume; fails as soon as a process exits.
    async fn wait_until_ready(&mut self, workers: u32) -> anyhow::Result<()> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some((process, status)) = self.exited() {
                return Err(process
                    .exit_error(status)
                    .context("a process of the system failed to start"));
            }
            let api_ready = match &self.api {
                Some(api) => api.is_ready().await,
                None => true,
            };
            let consumers_ready = match (&self.broker, api_ready) {
                (Some(broker), true) => broker.consumers_attached(1, workers).await?,
                _ => api_ready,
            };
            if consumers_ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                anyhow::bail!(
                    "the system was not ready within {STARTUP_TIMEOUT:?} (API /readyz, then the ingester's and \
                     workers' consumers); logs are in {}",
                    self.log_dir.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The first process that has ended, if any, with its status.
    pub fn exited(&mut self) -> Option<(&Spawned, ExitStatus)> {
        for process in &mut self.processes {
            if let Some(status) = process.exited() {
                return Some((process, status));
            }
        }
        None
    }

    /// Stops every process with SIGTERM, deletes the run's RabbitMQ names and
    /// drops its database. Returns what did not go as it should.
    pub async fn shutdown(&mut self) -> Vec<String> {
        let stopping = self.processes.drain(..).map(|process| process.terminate(STOP_TIMEOUT));
        let mut problems: Vec<String> = futures::future::join_all(stopping)
            .await
            .iter()
            .filter_map(|stopped| stopped.problem())
            .collect();
        if let Some(broker) = self.broker.take() {
            if let Err(error) = broker.delete_topology().await {
                problems.push(format!("{error:#}"));
            }
            broker.close().await;
        }
        if let Some(database) = self.database.take()
            && let Err(error) = database.drop_database().await
        {
            problems.push(format!("{error:#}"));
        }
        problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_key_is_read_from_what_apikey_create_prints() {
        let printed = "tenant:  bench-quiet (0190b3c4-0000-7000-8000-000000000000)\n\
                       key id:  0190b3c4-0000-7000-8000-000000000001\n\
                       scopes:  read,write,secrets\n\
                       api key: aegis_abc123\n\
                       The key is shown only this once; it is stored hashed.\n";
        assert_eq!(api_key_in(printed), Some("aegis_abc123"));
        assert_eq!(api_key_in("api key: \n"), None);
        assert_eq!(api_key_in("no tenant `bench-quiet`"), None);
    }
}
