//! The command line — which system to start, which load to put on it — and the
//! [`Plan`] it resolves to, with every default filled in and every combination
//! that cannot run refused before anything starts.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use serde::Serialize;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "aegis-bench",
    version,
    about = "End-to-end benchmark of Aegis Webhooks: starts the system as separate processes, publishes \
             events, receives and verifies every delivery, and reports throughput, latency, CPU and memory",
    after_help = "Examples:\n  \
        aegis-bench --mode embedded\n  \
        aegis-bench --mode production --via amqp --json burst.json\n  \
        aegis-bench --mode production --scenario steady --rate 100 --duration 30s\n  \
        aegis-bench --mode production --scenario slow --concurrency 256 --workers 2"
)]
pub struct Args {
    /// `embedded`: one `aegis-webhook dev` process (SQLite, in-process queue).
    /// `production`: `migrate`, then `api`, `ingester` and --workers `worker`
    /// processes around a fresh PostgreSQL database and RabbitMQ.
    #[arg(long, value_enum, default_value_t = Mode::Embedded)]
    pub mode: Mode,
    /// `burst`: every event at once. `steady`: --rate events/s for --duration.
    /// `slow`: like burst, with every response delayed by --response-delay.
    #[arg(long, value_enum, default_value_t = Scenario::Burst)]
    pub scenario: Scenario,
    /// How events reach the system: `amqp` (the events exchange; default in
    /// production) or `http` (POST /v1/events; the only path in embedded mode).
    #[arg(long, value_enum)]
    pub via: Option<Via>,
    /// Events to publish [burst: 2000, slow: 1000; steady publishes rate × duration].
    #[arg(long)]
    pub events: Option<u32>,
    /// Webhooks, each subscribed to every event [burst: 10, steady: 1, slow: 2].
    #[arg(long)]
    pub webhooks: Option<u16>,
    /// Steady scenario: events per second.
    #[arg(long, default_value_t = 100)]
    pub rate: u32,
    /// Steady scenario: how long to publish.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub duration: Duration,
    /// How long the receiver waits before answering each request [slow: 200ms, others: 0s].
    #[arg(long, value_parser = parse_duration)]
    pub response_delay: Option<Duration>,
    /// Worker processes (production mode).
    #[arg(long, default_value_t = 1)]
    pub workers: u16,
    /// `AEGIS_WORKER_CONCURRENCY` of every worker [the system's default, 256].
    #[arg(long)]
    pub concurrency: Option<u32>,
    /// Concurrent clients posting events with --via http.
    #[arg(long, default_value_t = 32)]
    pub http_clients: u16,
    /// Unconfirmed publishes in flight with --via amqp.
    #[arg(long, default_value_t = 1000)]
    pub amqp_in_flight: u32,
    /// How long after the first publish to wait for every delivery; then the
    /// report says what arrived and the exit status is 1.
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    pub timeout: Duration,
    /// How long to keep listening after the last expected delivery, to count
    /// late duplicates (not part of the measured time).
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub settle: Duration,
    /// Also write the summary as JSON to this file.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// The `aegis-webhook` binary [default: the one beside this program].
    #[arg(long, value_name = "PATH")]
    pub bin: Option<PathBuf>,
    /// PostgreSQL server for production mode, without a database name; the
    /// user must be allowed to create and drop databases.
    #[arg(
        long,
        env = "AEGIS_BENCH_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    pub postgres_url: String,
    /// RabbitMQ for production mode.
    #[arg(
        long,
        env = "AEGIS_BENCH_AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f"
    )]
    pub amqp_url: String,
    /// An extra setting for every spawned process, after the benchmark's own
    /// (repeatable): `--set AEGIS_AMQP_PREFETCH=128`.
    #[arg(long = "set", value_name = "AEGIS_NAME=VALUE", value_parser = parse_setting)]
    pub settings: Vec<(String, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Embedded,
    Production,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    Burst,
    Steady,
    Slow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Amqp,
    Http,
}

macro_rules! display_as_value_name {
    ($($kind:ty),+) => {$(
        impl fmt::Display for $kind {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let value = self.to_possible_value().expect("no variant is skipped");
                f.write_str(value.get_name())
            }
        }
    )+};
}
display_as_value_name!(Mode, Scenario, Via);

/// When events are published.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Pace {
    /// All of them, as fast as the publisher goes.
    Burst,
    /// Event `i` at `i / per_second` seconds after the first.
    Rate { per_second: u32 },
}

impl Pace {
    /// How long after the start event `index` is due.
    pub fn offset(self, index: u32) -> Duration {
        match self {
            Pace::Burst => Duration::ZERO,
            Pace::Rate { per_second } => {
                Duration::from_nanos(u64::from(index) * 1_000_000_000 / u64::from(per_second.max(1)))
            }
        }
    }
}

/// A run, fully resolved.
#[derive(Debug, Clone)]
pub struct Plan {
    pub mode: Mode,
    pub scenario: Scenario,
    pub via: Via,
    pub events: u32,
    pub webhooks: u16,
    pub pace: Pace,
    pub response_delay: Duration,
    pub workers: u16,
    pub concurrency: Option<u32>,
    pub http_clients: u16,
    pub amqp_in_flight: u32,
    pub timeout: Duration,
    pub settle: Duration,
    pub json: Option<PathBuf>,
    pub bin: PathBuf,
    pub postgres_url: String,
    pub amqp_url: String,
    pub settings: Vec<(String, String)>,
}

impl Plan {
    pub fn resolve(args: Args) -> anyhow::Result<Plan> {
        let via = match (args.mode, args.via) {
            (Mode::Embedded, Some(Via::Amqp)) => {
                anyhow::bail!("embedded mode has no broker: use --via http, or --mode production")
            }
            (Mode::Embedded, _) => Via::Http,
            (Mode::Production, via) => via.unwrap_or(Via::Amqp),
        };
        if args.mode == Mode::Embedded && args.workers != 1 {
            anyhow::bail!("embedded mode runs one `dev` process; --workers needs --mode production");
        }
        let (events, webhooks, pace, response_delay) = match args.scenario {
            Scenario::Burst => (
                args.events.unwrap_or(2000),
                args.webhooks.unwrap_or(10),
                Pace::Burst,
                args.response_delay.unwrap_or(Duration::ZERO),
            ),
            Scenario::Slow => (
                args.events.unwrap_or(1000),
                args.webhooks.unwrap_or(2),
                Pace::Burst,
                args.response_delay.unwrap_or(Duration::from_millis(200)),
            ),
            Scenario::Steady => {
                if args.events.is_some() {
                    anyhow::bail!("the steady scenario publishes --rate × --duration events; drop --events");
                }
                if args.rate == 0 {
                    anyhow::bail!("--rate must be at least 1 event per second");
                }
                let events = (u128::from(args.rate) * args.duration.as_millis() / 1000).max(1);
                (
                    u32::try_from(events).context("--rate × --duration is too many events")?,
                    args.webhooks.unwrap_or(1),
                    Pace::Rate { per_second: args.rate },
                    args.response_delay.unwrap_or(Duration::ZERO),
                )
            }
        };
        if events == 0 || webhooks == 0 {
            anyhow::bail!("--events and --webhooks must be at least 1");
        }
        if args.workers == 0 || args.http_clients == 0 || args.amqp_in_flight == 0 {
            anyhow::bail!("--workers, --http-clients and --amqp-in-flight must be at least 1");
        }
        if args.concurrency == Some(0) {
            anyhow::bail!("--concurrency must be at least 1");
        }
        let bin = match args.bin {
            Some(bin) => bin,
            None => std::env::current_exe()
                .context("failed to find this program's own path")?
                .parent()
                .context("this program's path has no folder")?
                .join("aegis-webhook"),
        };
        if !bin.is_file() {
            anyhow::bail!(
                "no aegis-webhook binary at {}: build it (`cargo build --release -p aegis-webhook`) or pass --bin",
                bin.display()
            );
        }
        Ok(Plan {
            mode: args.mode,
            scenario: args.scenario,
            via,
            events,
            webhooks,
            pace,
            response_delay,
            workers: args.workers,
            concurrency: args.concurrency,
            http_clients: args.http_clients,
            amqp_in_flight: args.amqp_in_flight,
            timeout: args.timeout,
            settle: args.settle,
            json: args.json,
            bin,
            postgres_url: args.postgres_url.trim_end_matches('/').to_owned(),
            amqp_url: args.amqp_url,
            settings: args.settings,
        })
    }

    pub fn expected_deliveries(&self) -> u64 {
        u64::from(self.events) * u64::from(self.webhooks)
    }

    /// The value of a `--set` setting, if given.
    pub fn setting(&self, name: &str) -> Option<&str> {
        self.settings
            .iter()
            .rev()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|error| format!("`{text}` is not a duration such as 30s or 200ms ({error})"))
}

fn parse_setting(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("`{text}` is not NAME=VALUE"))?;
    if !name.starts_with("AEGIS_") {
        return Err(format!("`{name}` is not an AEGIS_* setting"));
    }
    Ok((name.to_owned(), value.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(arguments: &[&str]) -> anyhow::Result<Plan> {
        // Any existing file stands in for the binary.
        let bin = std::env::current_exe().expect("test binary");
        let mut all = vec!["aegis-bench", "--bin", bin.to_str().expect("UTF-8 path")];
        all.extend_from_slice(arguments);
        Plan::resolve(Args::try_parse_from(all)?)
    }

    #[test]
    fn each_scenario_has_the_issues_defaults() {
        let burst = plan(&[]).expect("burst");
        assert_eq!(
            (burst.events, burst.webhooks, burst.expected_deliveries()),
            (2000, 10, 20_000)
        );
        assert_eq!(
            (burst.mode, burst.via, burst.pace),
            (Mode::Embedded, Via::Http, Pace::Burst)
        );

        let steady = plan(&["--mode", "production", "--scenario", "steady"]).expect("steady");
        assert_eq!((steady.events, steady.webhooks, steady.via), (3000, 1, Via::Amqp));
        assert_eq!(steady.pace.offset(150), Duration::from_millis(1500));

        let slow = plan(&["--scenario", "slow"]).expect("slow");
        assert_eq!(slow.response_delay, Duration::from_millis(200));
    }

    #[test]
    fn combinations_that_cannot_run_are_refused_with_the_reason() {
        let error = plan(&["--via", "amqp"])
            .expect_err("no broker in embedded mode")
            .to_string();
        assert!(error.contains("no broker"), "{error}");
        let error = plan(&["--workers", "2"]).expect_err("one dev process").to_string();
        assert!(error.contains("--mode production"), "{error}");
        let error = plan(&["--scenario", "steady", "--events", "5"])
            .expect_err("rate × duration")
            .to_string();
        assert!(error.contains("--rate"), "{error}");
        assert!(plan(&["--set", "PATH=/bin"]).is_err());
        let missing = Args::try_parse_from(["aegis-bench", "--bin", "/nonexistent/aegis-webhook"]).expect("parses");
        let error = Plan::resolve(missing).expect_err("no binary there").to_string();
        assert!(error.contains("cargo build --release -p aegis-webhook"), "{error}");
    }

    #[test]
    fn the_last_setting_of_a_name_wins() {
        let plan = plan(&["--set", "AEGIS_LOG=info", "--set", "AEGIS_LOG=debug"]).expect("plan");
        assert_eq!(plan.setting("AEGIS_LOG"), Some("debug"));
        assert_eq!(plan.setting("AEGIS_AMQP_PREFETCH"), None);
    }
}
