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
        aegis-bench --mode production --scenario steady --rate 100 --duration 30s --breakdown\n  \
        aegis-bench --mode production --scenario slow --concurrency 256 --workers 2\n  \
        aegis-bench --mode production --scenario noisy\n  \
        aegis-bench --mode production --scenario noisy --set AEGIS_FAIRNESS=off\n  \
        aegis-bench --mode production --scenario portal"
)]
pub struct Args {
    /// `embedded`: one `aegis-webhook dev` process (SQLite, in-process queue).
    /// `production`: `migrate`, then `api`, `ingester` and --workers `worker`
    /// processes around a fresh PostgreSQL database and RabbitMQ.
    #[arg(long, value_enum, default_value_t = Mode::Embedded)]
    pub mode: Mode,
    /// `burst`: every event at once. `steady`: --rate events/s for --duration.
    /// `slow`: like burst, with every response delayed by --response-delay.
    /// `noisy`: tenant A publishes --events to --webhooks as fast as possible
    /// while tenant B publishes --rate events/s to one webhook until A's
    /// deliveries have all arrived; reports B's latency beside A's throughput.
    /// `portal`: --events deliveries to one webhook, then times the customer
    /// portal's pages (delivery log, webhook, delivery) with a portal session,
    /// --page-requests GETs of each, one at a time.
    #[arg(long, value_enum, default_value_t = Scenario::Burst)]
    pub scenario: Scenario,
    /// How events reach the system: `amqp` (the events exchange; default in
    /// production) or `http` (POST /v1/events; the only path in embedded mode).
    #[arg(long, value_enum)]
    pub via: Option<Via>,
    /// Events to publish [burst: 2000, slow: 1000, noisy: 20000 (tenant A's),
    /// portal: 10000; steady publishes rate × duration].
    #[arg(long)]
    pub events: Option<u32>,
    /// Webhooks, each subscribed to every event [burst: 10, steady: 1, slow: 2,
    /// noisy: 10 (tenant A's; tenant B has one), portal: 1 (the pages are the
    /// first webhook's)].
    #[arg(long)]
    pub webhooks: Option<u16>,
    /// Events per second: steady scenario [100]; noisy scenario, tenant B's [10].
    #[arg(long)]
    pub rate: Option<u32>,
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
    /// Portal scenario: timed GETs of each page, one at a time, after
    /// a few warm-up ones.
    #[arg(long, default_value_t = 100)]
    pub page_requests: u32,
    /// How long after the first publish to wait for every delivery; then the
    /// report says what arrived and the exit status is 1 [noisy: 600s, others: 120s].
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
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
    /// Also trace every event and report where its time goes, step by step:
    /// starts an OTLP/HTTP collector in this program, points every process at
    /// it (`AEGIS_OTLP_ENDPOINT`) and, after the run, reports each step's
    /// p50/p90/p99 from publish to receipt (in the noisy scenario, of tenant
    /// B's events: their path through A's flood). Tracing costs a little:
    /// compare the latency with a run without it.
    #[arg(long)]
    pub breakdown: bool,
    /// Keep the processes' logs (and the embedded data folder) after a run
    /// that passed too, and say where: to match the slowest deliveries with
    /// what the processes were doing. A failed run always keeps them.
    #[arg(long)]
    pub keep_logs: bool,
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
    Noisy,
    Portal,
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

/// The noisy scenario's second tenant, B: one webhook, and events at a steady
/// rate from the first publish until tenant A's deliveries have all arrived.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quiet {
    pub per_second: u32,
}

impl Quiet {
    /// B's webhooks.
    pub const WEBHOOKS: u16 = 1;

    pub fn pace(self) -> Pace {
        Pace::Rate {
            per_second: self.per_second,
        }
    }

    /// The most events B can publish before a run of `timeout` gives up: its
    /// events are generated before the run, like A's.
    pub fn most_events(self, timeout: Duration) -> anyhow::Result<u32> {
        let events = u128::from(self.per_second) * timeout.as_millis() / 1000 + 1;
        u32::try_from(events).context("--rate × --timeout is too many events for tenant B")
    }
}

/// The portal scenario's settings for every process, before the caller's
/// `--set`: the API key's rate limit out of the way of sequential page loads.
pub const PORTAL_RATE_LIMITS: [(&str, &str); 2] =
    [("AEGIS_API_RATE_LIMIT", "1000000"), ("AEGIS_API_RATE_BURST", "1000000")];

/// A run, fully resolved.
#[derive(Debug, Clone)]
pub struct Plan {
    pub mode: Mode,
    pub scenario: Scenario,
    pub via: Via,
    pub events: u32,
    pub webhooks: u16,
    pub pace: Pace,
    /// Noisy scenario: tenant B (the events and webhooks above are tenant A's).
    pub quiet: Option<Quiet>,
    pub response_delay: Duration,
    pub workers: u16,
    pub concurrency: Option<u32>,
    pub http_clients: u16,
    pub amqp_in_flight: u32,
    /// Portal scenario: timed GETs of each page.
    pub page_requests: u32,
    pub timeout: Duration,
    pub settle: Duration,
    pub json: Option<PathBuf>,
    pub bin: PathBuf,
    pub postgres_url: String,
    pub amqp_url: String,
    pub settings: Vec<(String, String)>,
    /// `--breakdown`: the processes export traces to the benchmark.
    pub breakdown: bool,
    pub keep_logs: bool,
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
        let rate = |default: u32| match args.rate.unwrap_or(default) {
            0 => anyhow::bail!("--rate must be at least 1 event per second"),
            rate => Ok(rate),
        };
        let mut quiet = None;
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
                let rate = rate(100)?;
                let events = (u128::from(rate) * args.duration.as_millis() / 1000).max(1);
                (
                    u32::try_from(events).context("--rate × --duration is too many events")?,
                    args.webhooks.unwrap_or(1),
                    Pace::Rate { per_second: rate },
                    args.response_delay.unwrap_or(Duration::ZERO),
                )
            }
            Scenario::Noisy => {
                quiet = Some(Quiet { per_second: rate(10)? });
                (
                    args.events.unwrap_or(20_000),
                    args.webhooks.unwrap_or(10),
                    Pace::Burst,
                    args.response_delay.unwrap_or(Duration::ZERO),
                )
            }
            Scenario::Portal => (
                args.events.unwrap_or(10_000),
                args.webhooks.unwrap_or(1),
                Pace::Burst,
                args.response_delay.unwrap_or(Duration::ZERO),
            ),
        };
        let timeout = args.timeout.unwrap_or(match args.scenario {
            // 200,000 deliveries at the defaults, ten times the burst's: a
            // FIFO system took 366 s on a shared 2-core machine.
            Scenario::Noisy => Duration::from_secs(600),
            Scenario::Burst | Scenario::Steady | Scenario::Slow | Scenario::Portal => Duration::from_secs(120),
        });
        if let Some(quiet) = quiet {
            // Refused now rather than when the events are generated.
            quiet.most_events(timeout)?;
        }
        if events == 0 || webhooks == 0 {
            anyhow::bail!("--events and --webhooks must be at least 1");
        }
        if args.workers == 0 || args.http_clients == 0 || args.amqp_in_flight == 0 {
            anyhow::bail!("--workers, --http-clients and --amqp-in-flight must be at least 1");
        }
        if args.concurrency == Some(0) {
            anyhow::bail!("--concurrency must be at least 1");
        }
        if args.page_requests == 0 {
            anyhow::bail!("--page-requests must be at least 1");
        }
        let mut settings = Vec::new();
        if args.scenario == Scenario::Portal {
            // The pages are timed one after another, faster than a person
            // clicks: the API key's rate limit (50/s by default, which the
            // session counts against) would answer 429 and be what is
            // measured. Lifted for this scenario; a --set of the same name wins.
            settings.extend(
                PORTAL_RATE_LIMITS
                    .iter()
                    .map(|(name, value)| ((*name).to_owned(), (*value).to_owned())),
            );
        }
        settings.extend(args.settings);
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
            quiet,
            response_delay,
            workers: args.workers,
            concurrency: args.concurrency,
            http_clients: args.http_clients,
            amqp_in_flight: args.amqp_in_flight,
            page_requests: args.page_requests,
            timeout,
            settle: args.settle,
            json: args.json,
            bin,
            postgres_url: args.postgres_url.trim_end_matches('/').to_owned(),
            amqp_url: args.amqp_url,
            settings,
            breakdown: args.breakdown,
            keep_logs: args.keep_logs,
        })
    }

    /// Deliveries of the events and webhooks above (tenant A's in the noisy
    /// scenario; B's depend on how long A takes).
    pub fn expected_deliveries(&self) -> u64 {
        u64::from(self.events) * u64::from(self.webhooks)
    }

    /// `AEGIS_FAIRNESS` as the run sets it: `on` (the system's default) unless
    /// `--set AEGIS_FAIRNESS=…` says otherwise.
    pub fn fairness(&self) -> &str {
        self.setting("AEGIS_FAIRNESS").unwrap_or("on")
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

        for other in [&burst, &steady, &slow] {
            assert_eq!((other.quiet, other.timeout), (None, Duration::from_secs(120)));
        }
    }

    #[test]
    fn the_noisy_scenario_floods_from_tenant_a_beside_ten_events_a_second_from_b() {
        let noisy = plan(&["--mode", "production", "--scenario", "noisy"]).expect("noisy");
        assert_eq!(
            (noisy.events, noisy.webhooks, noisy.expected_deliveries(), noisy.pace),
            (20_000, 10, 200_000, Pace::Burst)
        );
        assert_eq!(noisy.quiet, Some(Quiet { per_second: 10 }));
        assert_eq!((noisy.via, noisy.timeout), (Via::Amqp, Duration::from_secs(600)));
        assert_eq!(noisy.fairness(), "on");
        // B's events are generated beforehand: enough for the whole timeout.
        let quiet = noisy.quiet.expect("tenant B");
        assert_eq!(quiet.most_events(noisy.timeout).expect("events"), 6001);
        assert_eq!(quiet.pace().offset(25), Duration::from_millis(2500));

        let small = plan(&[
            "--scenario",
            "noisy",
            "--events",
            "2000",
            "--rate",
            "50",
            "--timeout",
            "60s",
            "--set",
            "AEGIS_FAIRNESS=off",
        ])
        .expect("noisy, small");
        assert_eq!((small.events, small.quiet), (2000, Some(Quiet { per_second: 50 })));
        assert_eq!(small.fairness(), "off");

        // --rate is tenant B's in the noisy scenario; steady keeps its own default.
        let steady = plan(&["--scenario", "steady", "--rate", "20", "--duration", "2s"]).expect("steady");
        assert_eq!((steady.events, steady.quiet), (40, None));
        let error = plan(&["--scenario", "noisy", "--rate", "0"])
            .expect_err("no events from B")
            .to_string();
        assert!(error.contains("--rate must be at least 1"), "{error}");
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
    fn the_portal_scenario_fills_one_webhook_with_ten_thousand_deliveries() {
        let portal = plan(&["--mode", "production", "--scenario", "portal"]).expect("portal");
        assert_eq!(
            (
                portal.events,
                portal.webhooks,
                portal.expected_deliveries(),
                portal.pace
            ),
            (10_000, 1, 10_000, Pace::Burst)
        );
        assert_eq!((portal.page_requests, portal.timeout), (100, Duration::from_secs(120)));
        // The API key's rate limit is lifted, unless the caller says otherwise.
        assert_eq!(portal.setting("AEGIS_API_RATE_LIMIT"), Some("1000000"));
        let limited = plan(&["--scenario", "portal", "--set", "AEGIS_API_RATE_LIMIT=50"]).expect("portal");
        assert_eq!(limited.setting("AEGIS_API_RATE_LIMIT"), Some("50"));
        assert_eq!(plan(&[]).expect("burst").setting("AEGIS_API_RATE_LIMIT"), None);
        let error = plan(&["--scenario", "portal", "--page-requests", "0"])
            .expect_err("no requests")
            .to_string();
        assert!(error.contains("--page-requests"), "{error}");
    }

    #[test]
    fn the_last_setting_of_a_name_wins() {
        let plan = plan(&["--set", "AEGIS_LOG=info", "--set", "AEGIS_LOG=debug"]).expect("plan");
        assert_eq!(plan.setting("AEGIS_LOG"), Some("debug"));
        assert_eq!(plan.setting("AEGIS_AMQP_PREFETCH"), None);
    }
}
