//! Layered configuration: built-in defaults, then an optional `aegis-webhook.toml`,
//! then `AEGIS_*` environment variables. Validated once, at load.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer};

use crate::retention::{self, Retention, RetentionError};
use crate::retry::RetrySchedule;
use crate::target::TargetPolicy;

/// The file read when present in the working directory (or named by `--config`).
pub const DEFAULT_CONFIG_FILE: &str = "aegis-webhook.toml";

/// A configuration value that must never be printed or logged.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Sensitive(String);

impl Sensitive {
    pub fn new(value: impl Into<String>) -> Self {
        Sensitive(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Sensitive {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// One broker URL of `amqp_url`: a secret (it carries the password), so
/// only its `host:port` is ever shown.
#[derive(Clone, PartialEq, Eq)]
pub struct AmqpUrl {
    url: Sensitive,
    address: String,
}

impl AmqpUrl {
    pub fn expose(&self) -> &str {
        self.url.expose()
    }

    /// `host:port`, without credentials: what logs and errors may show.
    pub fn address(&self) -> &str {
        &self.address
    }
}

impl fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AmqpUrl({} [credentials redacted])", self.address)
    }
}

/// `amqp_url`: the broker's URL, or several: the nodes of a cluster reached
/// without a load balancer, which connections try in turn (as other AMQP
/// clients' address lists). Comma-separated in the environment, a TOML array
/// or comma-separated in the file; a comma inside a password is written `%2C`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmqpUrls(Vec<AmqpUrl>);

impl AmqpUrls {
    /// Parses a comma-separated list. Errors never quote an entry: it may
    /// hold a password.
    pub fn parse(list: &str) -> Result<AmqpUrls, String> {
        Self::from_entries(list.split(','))
    }

    fn from_entries<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<AmqpUrls, String> {
        let entries: Vec<&str> = entries
            .into_iter()
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .collect();
        if entries.is_empty() {
            return Err("amqp_url is empty: give amqp://user:password@host:5672/%2f".to_owned());
        }
        let count = entries.len();
        entries
            .into_iter()
            .enumerate()
            .map(|(index, entry)| {
                let refused = |why: &str| format!("amqp_url: entry {} of {count} {why}", index + 1);
                let url = url::Url::parse(entry).map_err(|_| refused("is not a URL"))?;
                if !matches!(url.scheme(), "amqp" | "amqps") {
                    return Err(refused("is not an amqp:// or amqps:// URL"));
                }
                let host = url.host_str().filter(|host| !host.is_empty());
                let host = host.ok_or_else(|| refused("has no host"))?;
                let port = url.port().unwrap_or(if url.scheme() == "amqps" { 5671 } else { 5672 });
                Ok(AmqpUrl {
                    url: Sensitive::new(entry),
                    address: format!("{host}:{port}"),
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(AmqpUrls)
    }

    /// The URLs in the order given; never empty.
    pub fn urls(&self) -> &[AmqpUrl] {
        &self.0
    }
}

impl<'de> Deserialize<'de> for AmqpUrls {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let entries = list_entries(deserializer)?;
        AmqpUrls::from_entries(entries.iter().map(String::as_str)).map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Whether tenants share the system fairly (see [`crate::fairness`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fairness {
    /// Work beyond its tenant's share waits in the bulk lanes.
    #[default]
    On,
    /// One lane per stage, first in, first out (for comparison).
    Off,
}

/// Whether an api process's PostgreSQL statements end at the requests'
/// deadline (a `statement_timeout` of `AEGIS_GRAPHQL_TIMEOUT`, set as each
/// connection opens).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApiStatementTimeout {
    #[default]
    On,
    /// For a pooler (PgBouncer in transaction mode) that would hand the
    /// setting on to other processes' statements: bound them at the role.
    Off,
}

/// Every setting of every process. Field names are the lowercase form of the
/// environment variables without their `AEGIS_` prefix.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Config {
    /// `postgres://…` or `sqlite://…`; defaults to `aegis.db` in `data_dir`.
    pub database_url: Option<String>,
    /// Connections in the database pool of one process (PostgreSQL; SQLite uses
    /// a few, as it has one writer). An ingester or a worker opens
    /// `database_bulk_connections` more, the pool of its bulk lanes (see
    /// `bulk_runtime`).
    pub database_max_connections: u32,
    /// PostgreSQL connections an ingester or a worker opens for its bulk
    /// lanes: how many of a flood's statements it runs at once. Where a flood
    /// keeps PostgreSQL's cores busy, each one more speeds the flood a little
    /// and slows every other tenant's statements (docs/operations.md, "Fair
    /// sharing between tenants").
    pub database_bulk_connections: u32,
    /// RabbitMQ: one URL, or a cluster's nodes in turn; absent means the
    /// in-process queue.
    pub amqp_url: Option<AmqpUrls>,
    /// Prefix of every exchange and queue name, so systems can share a broker.
    pub amqp_prefix: String,
    /// Messages one consumer holds unacknowledged (the ingester's; workers use
    /// `worker_concurrency`).
    pub amqp_prefetch: u16,
    /// Queues unused this long are deleted by the broker; unset in production,
    /// set by tests that create throwaway topologies.
    #[serde(with = "humantime_serde_compat::option")]
    pub amqp_queue_expiry: Option<Duration>,
    /// Address of the HTTP server (GraphQL, intake, probes).
    pub listen: SocketAddr,
    /// Base64 of the 32-byte key that seals webhook secrets at rest.
    pub secret_key: Option<Sensitive>,
    /// Service credential of `POST /v1/events`.
    pub ingest_token: Option<Sensitive>,
    /// Makes sure tenant `default` exists and holds this API key.
    pub bootstrap_api_key: Option<Sensitive>,
    /// CIDRs workers may reach although they are not public (and over http).
    #[serde(deserialize_with = "list_or_comma_separated")]
    pub allow_private_targets: Vec<IpNet>,
    pub retry_schedule: RetrySchedule,
    /// The longest `Retry-After` a receiver can ask for; longer asks are cut to it.
    #[serde(with = "humantime_serde_compat")]
    pub retry_after_max: Duration,
    /// The shortest wait after a 429 or a timeout.
    #[serde(with = "humantime_serde_compat")]
    pub retry_throttled_floor: Duration,
    /// Whole-request timeout of a delivery attempt: connect, TLS, headers, body.
    #[serde(with = "humantime_serde_compat")]
    pub request_timeout: Duration,
    /// How much longer than `request_timeout` a worker's claim on an attempt
    /// lasts, for the database writes around the request. A crashed worker's
    /// attempts, or ones it failed to record, are made again once their
    /// claims end (the reconciler's grace later if their tasks were lost
    /// too); an attempt recorded later than this may be sent twice, and its
    /// record then changes only the log.
    #[serde(with = "humantime_serde_compat")]
    pub claim_margin: Duration,
    /// Largest upstream event accepted, in bytes.
    pub max_event_bytes: usize,
    /// How much of a receiver's response body is kept in the attempt log.
    pub max_response_body_bytes: usize,
    /// Whether GraphQL introspection (and so GraphiQL's schema view) is on.
    pub graphql_introspection: bool,
    /// Largest GraphQL request body, in bytes.
    pub graphql_max_body_bytes: usize,
    /// How long the HTTP server waits for a request's headers, counted from
    /// when it starts waiting (a new connection, or an idle keep-alive one):
    /// slow-header and idle connections are closed after it.
    #[serde(with = "humantime_serde_compat")]
    pub http_header_read_timeout: Duration,
    /// The longest one HTTP request may take, body read included (408 past it).
    #[serde(with = "humantime_serde_compat")]
    pub http_request_timeout: Duration,
    /// HTTP connections one process serves at once; more wait to be accepted.
    pub http_max_connections: usize,
    /// How long a rotated-out secret keeps signing `webhook-signature`.
    #[serde(with = "humantime_serde_compat")]
    pub secret_rotation_grace: Duration,
    /// The longest one GraphQL request may run once admitted; its work is
    /// cancelled past it.
    #[serde(with = "humantime_serde_compat")]
    pub graphql_timeout: Duration,
    /// Whether an api process's PostgreSQL statements end at `graphql_timeout`.
    pub api_statement_timeout: ApiStatementTimeout,
    /// Requests per second one API key may make, on average (`/graphql`).
    pub api_rate_limit: u32,
    /// Requests one API key may make at once above its rate, after a quiet spell.
    pub api_rate_burst: u32,
    /// Requests one API key may have in progress at once.
    pub api_max_concurrent_requests: u32,
    /// Events per second one ingest token may post to `/v1/events`, on average.
    pub intake_rate_limit: u32,
    /// Events one ingest token may post at once above its rate.
    pub intake_rate_burst: u32,
    /// Webhooks one tenant may have.
    pub max_webhooks_per_tenant: u32,
    /// Project ids one webhook's filter may name.
    pub max_project_ids_per_webhook: u32,
    /// Characters a webhook's description may have.
    pub max_description_chars: u32,
    /// Characters a webhook secret chosen by the customer must have at least.
    pub secret_min_chars: u32,
    /// Different characters such a secret must have at least.
    pub secret_min_distinct_chars: u32,
    /// Deliveries one worker process sends at once. Many: an attempt spends
    /// most of its time waiting (on the receiver, and on the batched database
    /// round trips it shares with the others), so slots are cheap.
    pub worker_concurrency: usize,
    /// Requests one worker process sends to one webhook at once, so a slow or
    /// hanging endpoint ties up at most this many of the worker's slots.
    pub webhook_concurrency: usize,
    /// `on`: work beyond its tenant's share waits in the bulk lanes, so no
    /// tenant's flood delays another's events; `off`: first in, first out.
    pub fairness: Fairness,
    /// Events per second one tenant may have ingested in the express lane
    /// (per ingester process); more wait in the bulk lane.
    pub fair_share_events_per_second: u32,
    /// Events one tenant may send at once, after a quiet spell, that still go
    /// in the express lane.
    pub fair_share_event_burst: u32,
    /// Deliveries per second one tenant's events may put in the express lane
    /// of the delivery tasks (per ingester process).
    pub fair_share_deliveries_per_second: u32,
    /// Deliveries one tenant may put in the express lane at once after a
    /// quiet spell; an event with more subscribers than this goes bulk.
    pub fair_share_delivery_burst: u32,
    /// While the express lane has work, about one take in this many looks at
    /// the bulk lane first, so bulk tenants are never starved.
    pub bulk_lane_share: u32,
    /// Consecutive failed deliveries after which a webhook is disabled
    /// (provided they span `auto_disable_after`); 0 never disables.
    pub auto_disable_after_failures: u32,
    /// The shortest span of failures that disables a webhook.
    #[serde(with = "humantime_serde_compat")]
    pub auto_disable_after: Duration,
    /// How often pending deliveries whose task went missing are re-published.
    #[serde(with = "humantime_serde_compat")]
    pub reconcile_interval: Duration,
    /// How overdue a pending delivery must be before the reconciler re-publishes it.
    #[serde(with = "humantime_serde_compat")]
    pub reconcile_grace: Duration,
    /// How long final events, deliveries and attempts are kept, counted from
    /// their creation; pending deliveries are kept until they are final.
    #[serde(with = "humantime_serde_compat")]
    pub retention: Duration,
    /// How long event payloads and response bodies are kept; unset, as long as
    /// the records. The delivery log stays readable without them.
    #[serde(with = "humantime_serde_compat::option")]
    pub body_retention: Option<Duration>,
    /// The shortest retention a tenant may choose for itself.
    #[serde(with = "humantime_serde_compat")]
    pub retention_min: Duration,
    /// The longest retention a tenant may choose for itself.
    #[serde(with = "humantime_serde_compat")]
    pub retention_max: Duration,
    /// How often each worker process looks for data past its retention
    /// (replicas' passes may overlap: the work is idempotent).
    #[serde(with = "humantime_serde_compat")]
    pub expiry_interval: Duration,
    /// Rows one expiry statement deletes or empties at most.
    pub expiry_batch: u32,
    /// The span of creation time one partition of the deliveries and their
    /// attempts covers (PostgreSQL); expiry drops a partition at a time.
    #[serde(with = "humantime_serde_compat")]
    pub partition_width: Duration,
    /// Where the default SQLite file and `dev`'s generated credentials live.
    pub data_dir: PathBuf,
    /// How long a stopping process waits for in-flight deliveries.
    #[serde(with = "humantime_serde_compat")]
    pub shutdown_grace: Duration,
    pub log_format: LogFormat,
    /// Base URL of an OTLP/HTTP collector (`http://otel-collector:4318`): spans
    /// are exported to `<url>/v1/traces`, as with `OTEL_EXPORTER_OTLP_ENDPOINT`.
    /// Unset, no exporter is built and nothing is exported.
    pub otlp_endpoint: Option<String>,
    /// The address customers reach the API at (`https://webhooks.example.com`),
    /// for the links it makes (`createPortalSession`); unset, those links are
    /// paths only. `dev` sets it to its own address.
    pub public_url: Option<String>,
    /// Origins allowed to show the portal in a frame (`https://app.example.com`,
    /// comma-separated); empty: no page may frame it. Set, the session cookie
    /// becomes `SameSite=None; Secure; Partitioned` so it is sent in the frame.
    pub portal_frame_ancestors: String,
    /// Whether the portal's cookie is `Secure` (sent over HTTPS only). `dev`,
    /// which serves no TLS, turns it off unless framing is configured.
    pub portal_cookie_secure: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            database_url: None,
            database_max_connections: 16,
            // Measured on 2 cores running everything (docs/performance.md,
            // "A sixth machine", alternating): with 2 rather than 3, the
            // other tenant's p99 once the flood was published was 33–46 ms
            // rather than 43–63 ms, for a flood 2–4 % slower. (Before
            // sqlx 0.9.1 set TCP_NODELAY, while a flood's statements
            // stalled on delayed acknowledgements, 2 had cost it 10–13 %.)
            database_bulk_connections: 2,
            amqp_url: None,
            amqp_prefix: String::new(),
            amqp_prefetch: 32,
            amqp_queue_expiry: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            secret_key: None,
            ingest_token: None,
            bootstrap_api_key: None,
            allow_private_targets: Vec::new(),
            retry_schedule: RetrySchedule::default(),
            retry_after_max: Duration::from_secs(3600),
            retry_throttled_floor: Duration::from_secs(5),
            request_timeout: Duration::from_secs(15),
            claim_margin: Duration::from_secs(10),
            max_event_bytes: 256 * 1024,
            max_response_body_bytes: 64 * 1024,
            graphql_introspection: true,
            graphql_max_body_bytes: 256 * 1024,
            http_header_read_timeout: Duration::from_secs(10),
            http_request_timeout: Duration::from_secs(30),
            http_max_connections: 1024,
            secret_rotation_grace: Duration::from_secs(24 * 3600),
            graphql_timeout: Duration::from_secs(10),
            api_statement_timeout: ApiStatementTimeout::On,
            api_rate_limit: 50,
            api_rate_burst: 100,
            api_max_concurrent_requests: 16,
            intake_rate_limit: 5000,
            intake_rate_burst: 20000,
            max_webhooks_per_tenant: 250,
            max_project_ids_per_webhook: 100,
            max_description_chars: 1000,
            secret_min_chars: 16,
            secret_min_distinct_chars: 8,
            worker_concurrency: 256,
            webhook_concurrency: 64,
            fairness: Fairness::On,
            // Small against the machine: a flooding tenant's events within
            // its share are fanned out in the express lane, ahead of other
            // tenants' (measured, noisy benchmark on 2 cores: at 200 a
            // second, 10 webhooks each, they took 40 % of the machine while
            // the flood was being moved, and tenant B's p99 was 281–466 ms;
            // at 20, 86–107 ms; docs/performance.md). A steady stream beyond
            // it costs little: its excess passes through the bulk lane at
            // once, since the bulk lane waits only while the ingester is
            // behind (BulkPause); one tenant at 100 events/s, p50 5.8 ms.
            fair_share_events_per_second: 20,
            // Small bursts: what a new flood puts in the express lane before
            // its share runs out is what other tenants' alerts wait behind
            // (measured: bursts of 100 events and 500 deliveries held tenant
            // B's alerts back by up to half a second in the noisy benchmark).
            // 250 deliveries is the default webhook quota, so one event of
            // any tenant can still go express after a quiet spell.
            fair_share_event_burst: 20,
            fair_share_deliveries_per_second: 200,
            fair_share_delivery_burst: 250,
            bulk_lane_share: 8,
            auto_disable_after_failures: 100,
            auto_disable_after: Duration::from_secs(24 * 3600),
            reconcile_interval: Duration::from_secs(30),
            reconcile_grace: Duration::from_secs(60),
            retention: Duration::from_secs(30 * DAY_SECONDS),
            body_retention: None,
            retention_min: Duration::from_secs(DAY_SECONDS),
            retention_max: Duration::from_secs(90 * DAY_SECONDS),
            expiry_interval: Duration::from_secs(60),
            expiry_batch: 1000,
            partition_width: Duration::from_secs(DAY_SECONDS),
            data_dir: PathBuf::from("aegis-data"),
            shutdown_grace: Duration::from_secs(25),
            log_format: LogFormat::Text,
            otlp_endpoint: None,
            public_url: None,
            portal_frame_ancestors: String::new(),
            portal_cookie_secure: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The most partitions the retention settings may keep (PostgreSQL).
const MAX_PARTITIONS: u64 = 1000;

/// Seconds in a day, for the retention defaults.
const DAY_SECONDS: u64 = 24 * 3600;

impl Config {
    /// The operator's retention, which tenants without a choice of their own get.
    pub fn retention_policy(&self) -> Result<Retention, RetentionError> {
        Retention::new(self.retention, self.body_retention.unwrap_or(self.retention))
    }

    /// The range tenants may choose their retention in.
    pub fn retention_bounds(&self) -> Result<retention::Bounds, RetentionError> {
        retention::Bounds::new(self.retention_min, self.retention_max)
    }

    /// How the deliveries' partitions are laid out (PostgreSQL).
    pub fn partition_plan(&self) -> retention::PartitionPlan {
        retention::PartitionPlan::new(self.partition_width, self.expiry_interval)
    }

    /// Defaults, then `file` (or `aegis-webhook.toml` if it exists), then `AEGIS_*`.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let file = file.unwrap_or(Path::new(DEFAULT_CONFIG_FILE));
        Self::from_figment(Figment::new().merge(Toml::file(file)).merge(Env::prefixed("AEGIS_")))
    }

    pub fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.worker_concurrency == 0 {
            return Err(ConfigError::Invalid("worker_concurrency must be at least 1".into()));
        }
        if self.webhook_concurrency == 0 {
            return Err(ConfigError::Invalid("webhook_concurrency must be at least 1".into()));
        }
        if self.request_timeout.is_zero() {
            return Err(ConfigError::Invalid("request_timeout must be positive".into()));
        }
        if self.http_header_read_timeout.is_zero() || self.http_request_timeout.is_zero() {
            return Err(ConfigError::Invalid(
                "http_header_read_timeout and http_request_timeout must be positive".into(),
            ));
        }
        if self.http_max_connections == 0 {
            return Err(ConfigError::Invalid("http_max_connections must be at least 1".into()));
        }
        if self.database_bulk_connections == 0 {
            return Err(ConfigError::Invalid(
                "database_bulk_connections must be at least 1: a flood's work still needs the database".into(),
            ));
        }
        if self.max_event_bytes < 1024 {
            return Err(ConfigError::Invalid("max_event_bytes must be at least 1024".into()));
        }
        self.retention_policy()
            .map_err(|error| ConfigError::Invalid(format!("retention: {error}")))?;
        self.retention_bounds()
            .map_err(|error| ConfigError::Invalid(format!("retention_min, retention_max: {error}")))?;
        if self.expiry_interval.is_zero() || self.partition_width < Duration::from_secs(60) {
            return Err(ConfigError::Invalid(
                "expiry_interval must be positive and partition_width at least one minute".into(),
            ));
        }
        // Every partition is a pair of tables kept until the longest
        // retention has passed it: too many make planning and DDL slow.
        let longest = self.retention.max(self.retention_max).as_secs();
        let partitions = longest / self.partition_width.as_secs().max(1);
        if partitions > MAX_PARTITIONS {
            return Err(ConfigError::Invalid(format!(
                "partition_width is too narrow for the retention: the longest retention ({}) would keep {partitions} partitions, and at most {MAX_PARTITIONS} are allowed; widen partition_width",
                humantime::format_duration(self.retention.max(self.retention_max))
            )));
        }
        if self.expiry_batch == 0 {
            return Err(ConfigError::Invalid("expiry_batch must be at least 1".into()));
        }
        if self.graphql_timeout.is_zero() {
            return Err(ConfigError::Invalid("graphql_timeout must be positive".into()));
        }
        for (name, value) in [
            ("api_rate_limit", self.api_rate_limit),
            ("api_rate_burst", self.api_rate_burst),
            ("api_max_concurrent_requests", self.api_max_concurrent_requests),
            ("intake_rate_limit", self.intake_rate_limit),
            ("intake_rate_burst", self.intake_rate_burst),
            ("fair_share_events_per_second", self.fair_share_events_per_second),
            ("fair_share_event_burst", self.fair_share_event_burst),
            (
                "fair_share_deliveries_per_second",
                self.fair_share_deliveries_per_second,
            ),
            ("fair_share_delivery_burst", self.fair_share_delivery_burst),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!("{name} must be at least 1")));
            }
        }
        if self.bulk_lane_share < 2 {
            return Err(ConfigError::Invalid(
                "bulk_lane_share must be at least 2: at 1 the bulk lane would always go first".into(),
            ));
        }
        if self.secret_min_chars < 8 {
            return Err(ConfigError::Invalid(
                "secret_min_chars must be at least 8: shorter secrets can be guessed".into(),
            ));
        }
        if self.reconcile_interval.is_zero() {
            return Err(ConfigError::Invalid("reconcile_interval must be positive".into()));
        }
        if let Some(url) = &self.public_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(ConfigError::Invalid(
                "public_url must be an http:// or https:// URL (https://webhooks.example.com)".into(),
            ));
        }
        for origin in self.portal_frame_ancestors() {
            // An origin and nothing else, exactly as a browser writes it: it
            // goes into the Content-Security-Policy header as a source.
            // No wildcard: a list of the sites that may frame it.
            let valid = !origin.contains('*')
                && url::Url::parse(origin).is_ok_and(|url| {
                    matches!(url.scheme(), "http" | "https") && url.origin().ascii_serialization() == origin
                });
            if !valid {
                return Err(ConfigError::Invalid(format!(
                    "portal_frame_ancestors: `{origin}` is not an origin (https://app.example.com)"
                )));
            }
        }
        if !self.portal_frame_ancestors().is_empty() && !self.portal_cookie_secure {
            return Err(ConfigError::Invalid(
                "portal_frame_ancestors needs portal_cookie_secure: browsers send a framed page's cookie only when it is Secure".into(),
            ));
        }
        if let Some(endpoint) = &self.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(ConfigError::Invalid(
                "otlp_endpoint must be an http:// or https:// URL (OTLP over HTTP, e.g. http://otel-collector:4318)"
                    .into(),
            ));
        }
        let url = self.database_url();
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://") || url.starts_with("sqlite:")) {
            return Err(ConfigError::Invalid(
                "database_url must start with postgres:// or sqlite:".into(),
            ));
        }
        Ok(())
    }

    /// The configured database, or a SQLite file in `data_dir`.
    pub fn database_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!("sqlite://{}/aegis.db?mode=rwc", self.data_dir.display()),
        }
    }

    /// The origins of `portal_frame_ancestors`, trimmed.
    pub fn portal_frame_ancestors(&self) -> Vec<&str> {
        self.portal_frame_ancestors
            .split(',')
            .map(str::trim)
            .filter(|origin| !origin.is_empty())
            .collect()
    }

    /// Each tenant's shares, or `None` when fairness is off.
    pub fn fair_shares(&self) -> Option<crate::fairness::Shares> {
        use crate::fairness::{Share, Shares};
        let share = |per_second: u32, burst: u32| Share {
            per_second: NonZeroU32::new(per_second).expect("validated positive"),
            burst: NonZeroU32::new(burst).expect("validated positive"),
        };
        (self.fairness == Fairness::On).then(|| Shares {
            events: share(self.fair_share_events_per_second, self.fair_share_event_burst),
            deliveries: share(self.fair_share_deliveries_per_second, self.fair_share_delivery_burst),
        })
    }

    /// How consumers share their takes between lanes.
    pub fn lane_weights(&self) -> crate::queue::LaneWeights {
        crate::queue::LaneWeights {
            bulk_share: self.bulk_lane_share,
            ..crate::queue::LaneWeights::default()
        }
    }

    pub fn backpressure(&self) -> crate::retry::Backpressure {
        crate::retry::Backpressure {
            retry_after_max: self.retry_after_max,
            throttled_floor: self.retry_throttled_floor,
        }
    }

    pub fn auto_disable(&self) -> crate::retry::AutoDisable {
        crate::retry::AutoDisable {
            after_failures: self.auto_disable_after_failures,
            after: self.auto_disable_after,
        }
    }

    /// What one tenant may hold and what its input may look like.
    pub fn quotas(&self) -> Quotas {
        Quotas {
            webhooks_per_tenant: self.max_webhooks_per_tenant,
            project_ids_per_webhook: self.max_project_ids_per_webhook,
            description_chars: self.max_description_chars,
            secret: crate::secret::SecretRules {
                min_chars: self.secret_min_chars as usize,
                min_distinct_chars: self.secret_min_distinct_chars as usize,
            },
        }
    }

    pub fn target_policy(&self) -> TargetPolicy {
        TargetPolicy::new(self.allow_private_targets.clone())
    }
}

/// Per-tenant quotas and input rules of the API (`Config::quotas`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quotas {
    pub webhooks_per_tenant: u32,
    pub project_ids_per_webhook: u32,
    pub description_chars: u32,
    pub secret: crate::secret::SecretRules,
}

impl Default for Quotas {
    fn default() -> Self {
        Config::default().quotas()
    }
}

/// A list setting's entries, trimmed, empty ones dropped: lists come from
/// TOML as arrays and from the environment as `a,b,c`.
fn list_entries<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Spec {
        Text(String),
        List(Vec<String>),
    }
    let entries = match Spec::deserialize(deserializer)? {
        Spec::Text(text) => text.split(',').map(str::to_owned).collect(),
        Spec::List(list) => list,
    };
    Ok(entries
        .into_iter()
        .map(|entry| entry.trim().to_owned())
        .filter(|entry| !entry.is_empty())
        .collect())
}

fn list_or_comma_separated<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
    list_entries(deserializer)?
        .into_iter()
        .map(|part| {
            part.parse::<IpNet>()
                .or_else(|_| part.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| serde::de::Error::custom(format!("`{part}` is not a CIDR or IP address")))
        })
        .collect()
}

/// Durations as human text (`15s`, `2m`), the way operators write them.
mod humantime_serde_compat {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        humantime::parse_duration(&text)
            .map_err(|_| serde::de::Error::custom(format!("`{text}` is not a duration such as `15s`")))
    }

    pub mod option {
        use std::time::Duration;

        use serde::{Deserialize, Deserializer};

        pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
            Option::<String>::deserialize(deserializer)?
                .map(|text| {
                    humantime::parse_duration(&text)
                        .map_err(|_| serde::de::Error::custom(format!("`{text}` is not a duration such as `15s`")))
                })
                .transpose()
        }
    }
}

#[cfg(test)]
// figment's `Jail` closures must return its large error type; not ours to shrink.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        figment::Jail::expect_with(|_jail| {
            let config = Config::load(None).expect("defaults load");
            assert_eq!(config.listen.to_string(), "127.0.0.1:8080");
            assert_eq!(config.request_timeout, Duration::from_secs(15));
            assert_eq!(config.retry_schedule, RetrySchedule::default());
            assert!(config.amqp_url.is_none());
            assert_eq!(config.database_url(), "sqlite://aegis-data/aegis.db?mode=rwc");
            Ok(())
        });
    }

    #[test]
    fn the_file_is_overridden_by_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "aegis-webhook.toml",
                r#"
                    listen = "0.0.0.0:9000"
                    request_timeout = "3s"
                    retry_schedule = ["0s", "1s"]
                    allow_private_targets = ["10.0.0.0/8"]
                "#,
            )?;
            jail.set_env("AEGIS_LISTEN", "127.0.0.1:9100");
            jail.set_env("AEGIS_RETRY_SCHEDULE", "0s,100ms,200ms");
            jail.set_env("AEGIS_ALLOW_PRIVATE_TARGETS", "127.0.0.0/8, ::1");
            jail.set_env("AEGIS_SECRET_KEY", "c2VjcmV0");
            let config = Config::load(None).expect("loads");
            assert_eq!(config.listen.to_string(), "127.0.0.1:9100");
            assert_eq!(config.request_timeout, Duration::from_secs(3));
            assert_eq!(config.retry_schedule.max_attempts(), 3);
            assert_eq!(config.allow_private_targets.len(), 2);
            assert_eq!(format!("{:?}", config.secret_key), "Some([redacted])");
            Ok(())
        });
    }

    #[test]
    fn the_broker_url_may_list_a_clusters_nodes_and_never_shows_a_password() {
        let one = AmqpUrls::parse("amqp://aegis:s3cret@rabbitmq:5672/%2f").expect("one URL");
        assert_eq!(one.urls().len(), 1);
        assert_eq!(one.urls()[0].expose(), "amqp://aegis:s3cret@rabbitmq:5672/%2f");
        assert_eq!(one.urls()[0].address(), "rabbitmq:5672");

        let three = AmqpUrls::parse(
            " amqp://aegis:s3cret@10.0.0.1:5701/%2f, amqps://aegis:s3cret@rabbit-1.example ,amqp://aegis:s%2Cc@[::1]/v,",
        )
        .expect("three URLs");
        let addresses: Vec<&str> = three.urls().iter().map(AmqpUrl::address).collect();
        assert_eq!(addresses, ["10.0.0.1:5701", "rabbit-1.example:5671", "[::1]:5672"]);
        assert_eq!(three.urls()[2].expose(), "amqp://aegis:s%2Cc@[::1]/v");
        let shown = format!("{three:?}");
        assert!(!shown.contains("s3cret") && shown.contains("10.0.0.1:5701"), "{shown}");

        for (bad, why) in [
            ("", "amqp_url is empty"),
            (" , ", "amqp_url is empty"),
            (
                "amqp://aegis:s3cret@rabbitmq:5672/%2f,http://aegis:s3cret@x",
                "entry 2 of 2 is not an amqp://",
            ),
            ("aegis:s3cret@rabbitmq:5672", "entry 1 of 1 is not an amqp://"),
            ("rabbitmq s3cret", "entry 1 of 1 is not a URL"),
            ("amqp://aegis:s3cret@/%2f", "entry 1 of 1 is not a URL"),
            ("amqp:///%2f", "entry 1 of 1 has no host"),
        ] {
            let error = AmqpUrls::parse(bad).expect_err(bad);
            assert!(error.contains(why), "{bad}: {error}");
            assert!(!error.contains("s3cret"), "{bad}: {error}");
        }
    }

    #[test]
    fn the_broker_urls_come_from_the_environment_or_a_toml_array() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "aegis-webhook.toml",
                r#"amqp_url = ["amqp://a:p@node-1:5672/%2f", "amqp://a:p@node-2:5672/%2f"]"#,
            )?;
            let config = Config::load(None).expect("loads");
            let addresses: Vec<&str> = config
                .amqp_url
                .as_ref()
                .expect("set")
                .urls()
                .iter()
                .map(AmqpUrl::address)
                .collect();
            assert_eq!(addresses, ["node-1:5672", "node-2:5672"]);

            jail.set_env(
                "AEGIS_AMQP_URL",
                "amqp://a:p@c1:5701/%2f,amqp://a:p@c2:5702/%2f,amqp://a:p@c3:5703/%2f",
            );
            let config = Config::load(None).expect("loads");
            assert_eq!(config.amqp_url.as_ref().expect("set").urls().len(), 3);

            jail.set_env(
                "AEGIS_AMQP_URL",
                "amqp://a:t0ps3cret@c1:5701/%2f,redis://a:t0ps3cret@c2",
            );
            let error = Config::load(None).expect_err("not AMQP").to_string();
            assert!(error.contains("entry 2 of 2"), "{error}");
            assert!(!error.contains("t0ps3cret"), "{error}");
            Ok(())
        });
    }

    #[test]
    fn invalid_values_are_refused_with_their_name() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("AEGIS_REQUEST_TIMEOUT", "soon");
            let error = Config::load(None).expect_err("bad duration").to_string();
            assert!(error.contains("soon"), "{error}");
            jail.set_env("AEGIS_REQUEST_TIMEOUT", "1s");
            jail.set_env("AEGIS_WORKER_CONCURRENCY", "0");
            let error = Config::load(None).expect_err("zero").to_string();
            assert!(error.contains("worker_concurrency"), "{error}");
            jail.set_env("AEGIS_WORKER_CONCURRENCY", "4");
            jail.set_env("AEGIS_DATABASE_BULK_CONNECTIONS", "0");
            let error = Config::load(None).expect_err("no bulk connections").to_string();
            assert!(error.contains("database_bulk_connections"), "{error}");
            jail.set_env("AEGIS_DATABASE_BULK_CONNECTIONS", "5");
            assert_eq!(Config::load(None).expect("five").database_bulk_connections, 5);
            jail.set_env("AEGIS_DATABASE_URL", "mysql://x");
            assert!(Config::load(None).is_err());
            Ok(())
        });
    }

    #[test]
    fn the_portal_may_be_framed_only_by_origins_written_as_browsers_write_them() {
        let framed = |origins: &str, secure: bool| Config {
            portal_frame_ancestors: origins.to_owned(),
            portal_cookie_secure: secure,
            ..Config::default()
        };
        assert!(
            framed("https://app.aegis.example, http://localhost:3000", true)
                .validate()
                .is_ok()
        );
        for bad in [
            "https://*",
            "https://app.aegis.example/",
            "https://app.aegis.example/path",
            "https://app.aegis.example\tdata:",
            "https://app.aegis.example; script-src *",
            "app.aegis.example",
            "javascript:alert(1)",
            "https://APP.aegis.example",
        ] {
            let error = framed(bad, true).validate().expect_err(bad).to_string();
            assert!(error.contains("portal_frame_ancestors"), "{bad}: {error}");
        }
        let error = framed("https://app.aegis.example", false)
            .validate()
            .expect_err("not Secure");
        assert!(error.to_string().contains("portal_cookie_secure"), "{error}");
    }

    /// docs/operations.md's configuration reference: one row per setting, the
    /// variable named after it, and each default exactly what the code uses.
    #[test]
    fn the_operations_guide_documents_every_setting_and_its_default() {
        let guide = include_str!("../../../docs/operations.md");
        let table = guide
            .split("## Configuration reference")
            .nth(1)
            .expect("docs/operations.md has a configuration reference");
        let rows: Vec<Vec<String>> = table
            .lines()
            .skip_while(|line| !line.starts_with("| Setting |"))
            .skip(2)
            .take_while(|line| line.starts_with('|'))
            .map(|line| {
                line.trim_matches('|')
                    .split(" | ")
                    .map(|cell| cell.trim().trim_matches('`').to_owned())
                    .collect()
            })
            .collect();
        let documented: Vec<&str> = rows.iter().map(|row| row[0].as_str()).collect();
        let mut in_code: Vec<&str> = serde_aux::serde_introspection::serde_introspect::<Config>().to_vec();
        let mut sorted = documented.clone();
        sorted.sort_unstable();
        in_code.sort_unstable();
        assert_eq!(sorted, in_code, "documented settings against Config's fields");

        let defaults = format!("{:?}", Config::default());
        for row in &rows {
            let (field, variable, default) = (&row[0], &row[1], &row[2]);
            assert_eq!(*variable, format!("AEGIS_{}", field.to_uppercase()), "{field}");
            if default == "(unset)" {
                assert!(
                    defaults.contains(&format!("{field}: None")),
                    "{field} is documented unset"
                );
                continue;
            }
            // The documented default, written in a config file, must give the
            // same configuration as no setting at all.
            let value = match default.as_str() {
                "true" | "false" | "[]" | "\"\"" => default.clone(),
                number if number.parse::<u64>().is_ok() => number.to_owned(),
                text => format!("{text:?}"),
            };
            let config: Config = Figment::new()
                .merge(Toml::string(&format!("{field} = {value}")))
                .extract()
                .unwrap_or_else(|error| panic!("{field}'s documented default {default} does not parse: {error}"));
            assert_eq!(
                format!("{config:?}"),
                defaults,
                "{field}'s documented default is not the code's"
            );
        }
    }
}
