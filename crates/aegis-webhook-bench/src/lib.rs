//! `aegis-bench`: the end-to-end benchmark of Aegis Webhooks (issue 6).
//!
//! One run starts the system from the `aegis-webhook` binary as separate
//! processes ([`system`]), creates webhooks through the GraphQL API pointing
//! at its own receiver on loopback ([`receiver`]), publishes events over AMQP
//! or the HTTP intake ([`publish`]), and waits until every expected delivery
//! has arrived with a valid signature. Then it stops everything and reports
//! ([`report`]) throughput from the first publish to the last receipt,
//! event→receipt latency percentiles, CPU time and peak memory of every
//! process ([`procstat`]), duplicates, and the machine.
//!
//! The measured window is the first publish to the last verified receipt;
//! starting the system and creating webhooks are outside it.
//!
//! The noisy scenario has two tenants, each a [`Load`]: tenant A (the
//! bootstrap tenant) publishes its events as fast as the burst does while
//! tenant B publishes a few a second from the same moment until A's
//! deliveries have all arrived; the report gives each tenant's figures.
//!
//! The portal scenario is a burst to one webhook followed by the customer
//! portal's pages ([`portal`]): once every delivery has arrived (and the API
//! counts them all), a portal session fetches the delivery log, the webhook's
//! page and one delivery's page, each many times, one at a time, and the
//! report gives each page's time from request to whole body.

pub mod api;
pub mod breakdown;
pub mod broker;
pub mod events;
pub mod options;
pub mod portal;
pub mod postgres;
pub mod process;
pub mod procstat;
pub mod publish;
pub mod receiver;
pub mod report;
pub mod system;

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use futures::FutureExt as _;
use futures::future::BoxFuture;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use options::Args;
use options::{Mode, Pace, Plan, Quiet, Scenario, Via};
use procstat::Machine;
use publish::Published;
use receiver::{Receiver, Tally};
use report::{
    ByPhase, Deliveries, Latency, MachineLoad, PageTiming, Portal, ProcessUsage, Report, ServiceUsage, Settings,
    SlowDelivery, TableSample, TenantFigures, Tenants, Throughput, mib, per_thousand,
};
use system::System;

/// How often the wait checks for completion and redraws the progress bar.
/// The measured times come from the receipts themselves, not from this tick.
const TICK: Duration = Duration::from_millis(50);

/// One tenant's share of a run: its events, its webhooks' secrets, and when it
/// publishes. Tenant [`NOISY`] is the bootstrap tenant (the only one outside
/// the noisy scenario, tenant A in it); tenant [`QUIET`] is the noisy
/// scenario's tenant B, which publishes until A's deliveries have all arrived.
#[derive(Debug)]
struct Load {
    events: Arc<events::Events>,
    secrets: Vec<String>,
    pace: Pace,
}

const NOISY: usize = 0;
const QUIET: usize = 1;

impl Load {
    fn generate(tenant: usize, events: u32, webhooks: u16, pace: Pace) -> Load {
        Load {
            events: Arc::new(events::Events::generate(events)),
            secrets: (0..webhooks)
                .map(|index| format!("bench-secret-{tenant}-{index}-{}", Uuid::new_v4().simple()))
                .collect(),
            pace,
        }
    }

    fn webhooks(&self) -> u64 {
        self.secrets.len() as u64
    }
}

/// Runs one benchmark and returns its report, also written as JSON when asked.
/// An error means the run could not be made (the system did not start, a
/// service is unreachable); a run that was made but lost deliveries returns a
/// report whose `passed` is false.
pub async fn run(args: Args) -> anyhow::Result<Report> {
    let mut plan = Plan::resolve(args)?;
    let interrupt = watch_signals()?;
    // Before every other setting, so that a `--set` of the same name wins.
    let collector = match plan.breakdown {
        true => {
            let collector = breakdown::Collector::start().await?;
            let exporting = [("AEGIS_OTLP_ENDPOINT".to_owned(), collector.endpoint())]
                .into_iter()
                .chain(
                    breakdown::EXPORT_SETTINGS
                        .iter()
                        .map(|(name, value)| ((*name).to_owned(), (*value).to_owned())),
                );
            plan.settings.splice(0..0, exporting);
            Some(collector)
        }
        false => None,
    };
    let started_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);

    let mut loads = vec![Load::generate(NOISY, plan.events, plan.webhooks, plan.pace)];
    if let Some(quiet) = plan.quiet {
        let most = quiet.most_events(plan.timeout)?;
        loads.push(Load::generate(QUIET, most, Quiet::WEBHOOKS, quiet.pace()));
    }
    let tenants = loads
        .iter()
        .map(|load| (load.events.clone(), load.secrets.clone()))
        .collect();
    let receiver = Receiver::start(tenants, plan.response_delay).await?;

    // The processes' logs and the embedded data folder; kept when a run fails.
    let work_dir = std::env::temp_dir().join(format!("aegis-bench-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&work_dir).with_context(|| format!("failed to create {}", work_dir.display()))?;
    let mut system = System::new(&plan.bin, &work_dir);
    let measured = measure(&plan, &mut system, &receiver, &loads, &interrupt).await;
    eprintln!("aegis-bench: stopping the system");
    let shutdown_problems = system.shutdown().await;
    let measured = match measured {
        Ok(measured) => measured,
        Err(error) => {
            eprintln!("aegis-bench: the processes' logs are kept in {}", work_dir.display());
            for problem in shutdown_problems {
                eprintln!("aegis-bench: while stopping: {problem}");
            }
            return Err(error);
        }
    };

    // After the shutdown: each process exports its last spans as it stops.
    let breakdown = collector.map(|collector| {
        let (spans, refused) = collector.take();
        // The noisy scenario's question is tenant B's path through A's flood.
        let traced = loads.get(QUIET).unwrap_or(&loads[NOISY]);
        breakdown::analyse(spans, refused, &traced.events, &receiver.receipts())
    });
    let mut report = build_report(&plan, measured, &loads, shutdown_problems, started_at);
    report.breakdown = breakdown;
    if let Some(path) = &plan.json {
        write_json(path, &report)?;
    }
    if report.passed && !plan.keep_logs {
        let _ = std::fs::remove_dir_all(&work_dir);
    } else {
        eprintln!("aegis-bench: the processes' logs are kept in {}", work_dir.display());
    }
    Ok(report)
}

fn write_json(path: &Path, report: &Report) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(report).context("failed to serialize the report")?;
    std::fs::write(path, json + "\n").with_context(|| format!("failed to write {}", path.display()))
}

/// Cancelled on SIGINT or SIGTERM, so the run can stop its processes and drop
/// its database instead of dying with them running.
fn watch_signals() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("failed to listen for SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("failed to listen for SIGTERM")?;
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        cancel.cancel();
    });
    Ok(token)
}

/// How waiting for the deliveries ended.
#[derive(Debug, Clone, PartialEq)]
enum Ended {
    Complete,
    TimedOut(Duration),
    Interrupted,
    ProcessExited(String),
    PublishFailed,
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ended::Complete => f.write_str("complete"),
            Ended::TimedOut(after) => write!(f, "timed out {after:?} after the first publish"),
            Ended::Interrupted => f.write_str("interrupted"),
            Ended::ProcessExited(what) => write!(f, "a process of the system ended: {what}"),
            Ended::PublishFailed => f.write_str("events could not all be published"),
        }
    }
}

/// CPU time of every measured process, and of the machine, at one moment.
#[derive(Debug)]
struct CpuReading {
    at: std::time::Instant,
    /// All cores busy, whoever the work was for.
    machine_busy: Option<u64>,
    /// By pid: the spawned processes.
    processes: HashMap<u32, u64>,
    own: u64,
    postgres: HashMap<u32, u64>,
    rabbitmq: HashMap<u32, u64>,
}

const POSTGRES_COMMAND: &str = "postgres";
const RABBITMQ_COMMAND: &str = "beam.smp";

impl CpuReading {
    fn take(system: &System, services: bool) -> CpuReading {
        CpuReading {
            at: std::time::Instant::now(),
            machine_busy: procstat::machine_busy_ticks(),
            processes: system
                .processes
                .iter()
                .filter_map(|process| Some((process.pid, procstat::cpu_ticks(process.pid).ok()?)))
                .collect(),
            own: procstat::cpu_ticks(std::process::id()).unwrap_or(0),
            postgres: if services {
                procstat::cpu_ticks_of_command(POSTGRES_COMMAND)
            } else {
                HashMap::new()
            },
            rabbitmq: if services {
                procstat::cpu_ticks_of_command(RABBITMQ_COMMAND)
            } else {
                HashMap::new()
            },
        }
    }
}

/// Everything a report is made from.
#[derive(Debug)]
struct Measured {
    ended: Ended,
    /// By tenant, as the loads.
    published: Vec<Published>,
    /// All tenants together, and each alone.
    tally: Tally,
    tallies: Vec<Tally>,
    start: CpuReading,
    end: CpuReading,
    /// (name, pid, peak RSS in bytes) of each spawned process, read at the end.
    processes: Vec<(String, u32, Option<u64>)>,
    own_peak_rss: Option<u64>,
    /// Portal scenario: the pages' figures, or why they could not be measured.
    portal: Option<Result<Portal, String>>,
    /// Production mode: the tables' sizes through the run.
    table_sizes: Vec<TableSample>,
}

/// A tenant's publisher, built but not yet started, and what stops it early.
struct Publisher {
    publishing: BoxFuture<'static, Published>,
    stop: CancellationToken,
}

async fn measure(
    plan: &Plan,
    system: &mut System,
    receiver: &Receiver,
    loads: &[Load],
    interrupt: &CancellationToken,
) -> anyhow::Result<Measured> {
    eprintln!(
        "aegis-bench: starting the system ({} mode) from {}",
        plan.mode,
        plan.bin.display()
    );
    tokio::select! {
        started = system.start(plan) => started?,
        () = interrupt.cancelled() => anyhow::bail!("interrupted while starting the system"),
    }
    let mut apis = vec![system.api.clone().context("the started system has no API")?];
    if loads.len() > QUIET {
        apis.push(system.quiet_api.clone().context("the started system has no tenant B")?);
    }
    let mut tenant_ids = Vec::new();
    // By tenant, in the receiver's order.
    let mut webhook_ids: Vec<Vec<Uuid>> = Vec::new();
    for (tenant, (load, api)) in loads.iter().zip(&apis).enumerate() {
        let tenant_id = api.tenant_id().await?;
        if tenant_ids.contains(&tenant_id) {
            anyhow::bail!("tenant B's API key answered tenant A's id {tenant_id}");
        }
        eprintln!(
            "aegis-bench: creating {} webhook{}{}",
            load.secrets.len(),
            if load.secrets.len() == 1 { "" } else { "s" },
            if loads.len() > 1 {
                format!(" for tenant {}", tenant_label(tenant))
            } else {
                String::new()
            }
        );
        let mut ids = Vec::new();
        for (index, secret) in load.secrets.iter().enumerate() {
            ids.push(api.create_webhook(&receiver.url(tenant, index), secret).await?);
        }
        webhook_ids.push(ids);
        tenant_ids.push(tenant_id);
    }

    // Every publisher is made ready first, so that they start together.
    let mut publishers = Vec::new();
    let mut separate_connections = Vec::new();
    for (tenant, (load, api)) in loads.iter().zip(&apis).enumerate() {
        let stop = CancellationToken::new();
        let publishing = match plan.via {
            Via::Amqp => {
                let broker = system.broker().context("--via amqp needs production mode")?;
                let channel = if tenant == NOISY {
                    broker.publisher().await?
                } else {
                    // Tenant B's few events do not queue behind A's flood in
                    // the benchmark's own socket.
                    let separate = broker.separate_publisher("aegis-bench-tenant-b").await?;
                    let channel = separate.channel.clone();
                    separate_connections.push(separate);
                    channel
                };
                publish::via_amqp(
                    channel,
                    broker.events_exchange(),
                    load.events.clone(),
                    tenant_ids[tenant],
                    load.pace,
                    plan.amqp_in_flight as usize,
                    stop.clone(),
                )
                .boxed()
            }
            Via::Http => {
                // A client (and so a connection pool) per tenant.
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(usize::from(plan.http_clients))
                    .build()
                    .context("failed to build the HTTP client")?;
                let intake = publish::Intake {
                    client,
                    url: api.intake_url(),
                    ingest_token: api.ingest_token.clone(),
                };
                publish::via_http(
                    intake,
                    load.events.clone(),
                    tenant_ids[tenant],
                    load.pace,
                    usize::from(plan.http_clients),
                    stop.clone(),
                )
                .boxed()
            }
        };
        publishers.push(Publisher { publishing, stop });
    }
    let services = plan.mode == Mode::Production;
    match plan.quiet {
        None => eprintln!(
            "aegis-bench: publishing {} events via {} to {} webhooks",
            plan.events, plan.via, plan.webhooks
        ),
        Some(quiet) => eprintln!(
            "aegis-bench: publishing via {}: tenant A {} events to {} webhooks as fast as possible, tenant B {} \
             events/s to {} webhook until A's deliveries have all arrived (AEGIS_FAIRNESS={})",
            plan.via,
            plan.events,
            plan.webhooks,
            quiet.per_second,
            Quiet::WEBHOOKS,
            plan.fairness()
        ),
    }
    let sampling = match system.database_url() {
        Some(url) => Some(TableSampler::start(&url).await?),
        None => None,
    };
    let start = CpuReading::take(system, services);
    let (handles, stops) = publishers
        .into_iter()
        .map(|publisher| (tokio::spawn(publisher.publishing), publisher.stop))
        .unzip();

    let (ended, published) = wait_for_deliveries(plan, system, receiver, loads, handles, stops, interrupt).await;
    let end = CpuReading::take(system, services);
    let table_sizes = match sampling {
        Some(sampling) => sampling.finish().await,
        None => Vec::new(),
    };
    for separate in separate_connections {
        separate.close().await;
    }
    let processes = system
        .processes
        .iter()
        .map(|process| {
            let peak = procstat::peak_rss_bytes(process.pid).ok();
            (process.name.clone(), process.pid, peak)
        })
        .collect();
    let own_peak_rss = procstat::peak_rss_bytes(std::process::id()).ok();
    if ended == Ended::Complete && !plan.settle.is_zero() {
        // Late duplicates (a retry racing a slow acknowledgement) still count.
        tokio::select! {
            () = tokio::time::sleep(plan.settle) => {}
            () = interrupt.cancelled() => {}
        }
    }
    let portal = match (plan.scenario, &ended) {
        (Scenario::Portal, Ended::Complete) => {
            let webhook_id = webhook_ids[NOISY].first().copied().context("the run made no webhook")?;
            let measured = measure_portal(plan, system, webhook_id, interrupt).await;
            if let Err(error) = &measured {
                eprintln!("aegis-bench: THE PORTAL FAILED: {error:#}");
            }
            Some(measured.map_err(|error| format!("{error:#}")))
        }
        (Scenario::Portal, _) => Some(Err("not measured: the deliveries did not all arrive".to_owned())),
        _ => None,
    };
    Ok(Measured {
        ended,
        published,
        tally: receiver.tally(),
        tallies: (0..loads.len()).map(|tenant| receiver.tally_of(tenant)).collect(),
        start,
        end,
        processes,
        own_peak_rss,
        portal,
        table_sizes,
    })
}

/// How often the growing tables' sizes are read during a production run.
const TABLE_SAMPLE_EVERY: Duration = Duration::from_secs(30);

/// Reads the database's table sizes every [`TABLE_SAMPLE_EVERY`] while the
/// load runs, on a connection of its own, so a report shows whether they
/// grow (retention) and by how much per delivery (capacity).
struct TableSampler {
    stop: CancellationToken,
    sampling: tokio::task::JoinHandle<Vec<TableSample>>,
}

impl TableSampler {
    async fn start(url: &str) -> anyhow::Result<TableSampler> {
        let db = sea_orm::Database::connect(url)
            .await
            .context("failed to connect to the run's database to read its table sizes")?;
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let sampling = tokio::spawn(async move {
            let started = Instant::now();
            let mut samples = Vec::new();
            let mut ticks = tokio::time::interval(TABLE_SAMPLE_EVERY);
            loop {
                let last = tokio::select! {
                    _ = ticks.tick() => false,
                    () = stopped.cancelled() => true,
                };
                match postgres::table_sizes(&db).await {
                    Ok(sizes) => samples.push(TableSample {
                        at_seconds: started.elapsed().as_secs_f64(),
                        sizes,
                    }),
                    Err(error) => eprintln!("aegis-bench: {error:#}"),
                }
                if last {
                    let _ = db.close().await;
                    return samples;
                }
            }
        });
        Ok(TableSampler { stop, sampling })
    }

    /// One last reading, then every reading taken.
    async fn finish(self) -> Vec<TableSample> {
        self.stop.cancel();
        self.sampling.await.unwrap_or_default()
    }
}

/// Untimed GETs of each portal page before its timed ones: the connection
/// is open, the server's caches and PostgreSQL's buffers are warm.
const PORTAL_WARMUP: u32 = 5;

/// How long, after the last receipt, the API may take to count every
/// delivery as done (the worker records outcomes in batches).
const COUNTS_TIMEOUT: Duration = Duration::from_secs(60);

/// The portal scenario's second part: once the API counts every delivery as
/// done, opens a portal session with the bootstrap key and times each page.
async fn measure_portal(
    plan: &Plan,
    system: &System,
    webhook_id: Uuid,
    interrupt: &CancellationToken,
) -> anyhow::Result<Portal> {
    let api = system.api.clone().context("the started system has no API")?;
    let expected = plan.expected_deliveries();
    let deadline = Instant::now() + COUNTS_TIMEOUT;
    let counts = loop {
        let counts = api.delivery_counts().await?;
        let total: u64 = counts.iter().map(|(_, counts)| counts.total()).sum();
        let pending: u64 = counts.iter().map(|(_, counts)| counts.pending).sum();
        if total == expected && pending == 0 {
            break counts;
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "{COUNTS_TIMEOUT:?} after the last receipt the API counts {total} deliveries ({pending} pending), \
                 not {expected} done"
            );
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(100)) => {}
            () = interrupt.cancelled() => anyhow::bail!("interrupted before the portal was measured"),
        }
    };
    let deliveries_in_database: u64 = counts.iter().map(|(_, counts)| counts.total()).sum();
    let webhook_deliveries = counts
        .iter()
        .find(|(id, _)| *id == webhook_id)
        .map(|(_, counts)| counts.total())
        .with_context(|| format!("the API does not list webhook {webhook_id}"))?;

    let session = portal::Session::open(&api).await?;
    let log_of_webhook = format!("/portal/deliveries?webhook={webhook_id}");
    let first = session.get(&log_of_webhook).await?;
    let delivery_id = *portal::delivery_links(&first.body)
        .first()
        .with_context(|| format!("{log_of_webhook} links to no delivery"))?;
    let pages = [
        (
            "delivery log, one webhook",
            log_of_webhook,
            Some(webhook_deliveries.min(portal::LOG_PAGE_ROWS)),
        ),
        (
            "delivery log, unfiltered",
            "/portal/deliveries".to_owned(),
            Some(deliveries_in_database.min(portal::LOG_PAGE_ROWS)),
        ),
        ("webhook, 24-hour chart", format!("/portal/webhooks/{webhook_id}"), None),
        ("one delivery", format!("/portal/deliveries/{delivery_id}"), None),
    ];

    let services = plan.mode == Mode::Production;
    let server = system
        .processes
        .iter()
        .find(|process| process.name == "api" || process.name == "dev")
        .map(|process| process.pid);
    let phase_start = CpuReading::take(system, services);
    let mut timings = Vec::new();
    for (page, path, expected_rows) in pages {
        eprintln!(
            "aegis-bench: portal: {page}: {PORTAL_WARMUP} warm-up and {} timed GETs of {path}",
            plan.page_requests
        );
        for _ in 0..PORTAL_WARMUP {
            session.get(&path).await?;
        }
        let before = CpuReading::take(system, services);
        let mut micros = Vec::new();
        let mut body = String::new();
        for _ in 0..plan.page_requests {
            if interrupt.is_cancelled() {
                anyhow::bail!("interrupted while timing the portal");
            }
            let fetched = session.get(&path).await?;
            micros.push(u64::try_from(fetched.elapsed.as_micros()).unwrap_or(u64::MAX));
            body = fetched.body;
        }
        let after = CpuReading::take(system, services);
        let rows = match expected_rows {
            Some(expected_rows) => {
                let rows = portal::delivery_links(&body).len() as u64;
                if rows != expected_rows {
                    anyhow::bail!("{path} shows {rows} deliveries, not the first {expected_rows}");
                }
                Some(rows)
            }
            None => None,
        };
        let per_request = |ticks: u64| seconds(ticks) * 1000.0 / f64::from(plan.page_requests);
        timings.push(PageTiming {
            page: page.to_owned(),
            path,
            rows,
            body_kib: body.len() as f64 / 1024.0,
            latency_ms: Latency::from_micros(micros).context("no request was timed")?,
            server_cpu_ms_per_request: server.and_then(|pid| {
                let ticks = after.processes.get(&pid)?.checked_sub(*before.processes.get(&pid)?)?;
                Some(per_request(ticks))
            }),
            postgres_cpu_ms_per_request: services
                .then(|| per_request(procstat::ticks_between(&before.postgres, &after.postgres))),
        });
    }
    let phase_end = CpuReading::take(system, services);
    Ok(Portal {
        deliveries_in_database,
        webhook_deliveries,
        webhook_id: webhook_id.to_string(),
        warmup_requests: PORTAL_WARMUP,
        target_ms: 200.0,
        pages: timings,
        server_peak_rss_mib: server.and_then(|pid| procstat::peak_rss_bytes(pid).ok()).map(mib),
        machine_load: machine_load(
            &phase_start,
            &phase_end,
            Machine::read().cores,
            accounted_seconds(&phase_start, &phase_end),
        ),
    })
}

/// CPU seconds between two readings of the run's own processes, PostgreSQL,
/// RabbitMQ and the benchmark.
fn accounted_seconds(start: &CpuReading, end: &CpuReading) -> f64 {
    let processes: u64 = end
        .processes
        .iter()
        .map(|(pid, after)| after.saturating_sub(start.processes.get(pid).copied().unwrap_or(0)))
        .sum();
    seconds(
        processes
            + procstat::ticks_between(&start.postgres, &end.postgres)
            + procstat::ticks_between(&start.rabbitmq, &end.rabbitmq)
            + end.own.saturating_sub(start.own),
    )
}

/// How busy the machine was between two readings, and how much of it was
/// not `accounted` CPU seconds (the run's).
fn machine_load(start: &CpuReading, end: &CpuReading, cores: usize, accounted: f64) -> Option<MachineLoad> {
    let (before, after) = (start.machine_busy?, end.machine_busy?);
    let window = end.at.duration_since(start.at).as_secs_f64();
    let busy = seconds(after.saturating_sub(before));
    let cores = cores as f64;
    Some(MachineLoad {
        window_seconds: window,
        busy_cpu_seconds: busy,
        busy_percent: if window > 0.0 {
            busy * 100.0 / (window * cores)
        } else {
            0.0
        },
        other_cpu_seconds: (busy - accounted).max(0.0),
    })
}

/// `A` or `B`, as the noisy scenario names its tenants.
fn tenant_label(tenant: usize) -> char {
    if tenant == NOISY { 'A' } else { 'B' }
}

fn progress_bar(expected: u64) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(expected), ProgressDrawTarget::stderr());
    let style = ProgressStyle::with_template(
        "{spinner} {elapsed_precise} [{bar:30}] {pos}/{len} deliveries verified ({per_sec}) {msg}",
    )
    .expect("the progress template is valid")
    .progress_chars("=> ");
    bar.set_style(style);
    bar
}

/// Where the noisy scenario's tenant B stands.
#[derive(Debug, Clone, Copy, PartialEq)]
struct QuietProgress {
    /// Asked to stop publishing.
    stopped: bool,
    /// Its publisher has ended: `handed_over` is final.
    publisher_done: bool,
    handed_over: u64,
    webhooks: u64,
    verified: u64,
}

/// What waiting does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Wait,
    /// Tenant A's deliveries have all arrived: tenant B stops publishing, and
    /// the wait goes on for B's outstanding deliveries.
    StopQuiet,
    Complete,
}

/// The next step, from tenant A's (or the only tenant's) verified and
/// expected deliveries and, in the noisy scenario, where tenant B stands.
fn next_step(verified: u64, expected: u64, quiet: Option<QuietProgress>) -> Step {
    if verified < expected {
        return Step::Wait;
    }
    match quiet {
        None => Step::Complete,
        Some(quiet) if !quiet.stopped => Step::StopQuiet,
        Some(quiet) if quiet.publisher_done && quiet.verified >= quiet.handed_over * quiet.webhooks => Step::Complete,
        Some(_) => Step::Wait,
    }
}

/// Waits until every expected delivery is verified, or the run cannot
/// complete (timeout, a process ended, publishing failed, interrupted).
/// Returns each tenant's publishing outcome.
async fn wait_for_deliveries(
    plan: &Plan,
    system: &mut System,
    receiver: &Receiver,
    loads: &[Load],
    mut publishers: Vec<JoinHandle<Published>>,
    stops: Vec<CancellationToken>,
    interrupt: &CancellationToken,
) -> (Ended, Vec<Published>) {
    let expected = plan.expected_deliveries();
    let bar = progress_bar(expected);
    let deadline = tokio::time::Instant::now() + plan.timeout;
    let mut outcomes: Vec<Option<Published>> = vec![None; publishers.len()];
    let mut quiet_stopped = false;
    let ended = loop {
        if interrupt.is_cancelled() {
            break Ended::Interrupted;
        }
        let all = receiver.counts();
        let noisy = receiver.counts_of(NOISY);
        let quiet = loads.get(QUIET).map(|load| QuietProgress {
            stopped: quiet_stopped,
            publisher_done: outcomes[QUIET].is_some(),
            handed_over: u64::from(load.events.published()),
            webhooks: load.webhooks(),
            verified: receiver.counts_of(QUIET).verified,
        });
        bar.set_position(noisy.verified);
        let published = loads[NOISY].events.published();
        let mut message = format!("· published {published}/{}", loads[NOISY].events.len());
        if let Some(quiet) = quiet {
            message.push_str(&format!(
                " · tenant B {}/{} verified",
                quiet.verified,
                quiet.handed_over * quiet.webhooks
            ));
        }
        bar.set_message(format!(
            "{message} · {} duplicates · {} invalid · {} unexpected",
            all.duplicates, all.invalid_signatures, all.unexpected
        ));
        match next_step(noisy.verified, expected, quiet) {
            Step::Complete => break Ended::Complete,
            Step::StopQuiet => {
                stops[QUIET].cancel();
                quiet_stopped = true;
            }
            Step::Wait => {}
        }
        if let Some((process, status)) = system.exited() {
            break Ended::ProcessExited(format!("{} ({status}); see {}", process.name, process.log.display()));
        }
        let mut failed = false;
        for (outcome, publisher) in outcomes.iter_mut().zip(publishers.iter_mut()) {
            if outcome.is_none() && publisher.is_finished() {
                let finished = publisher.await.unwrap_or_else(|error| Published {
                    finished: true,
                    failed: 1,
                    first_error: Some(format!("the publisher failed: {error}")),
                    ..Published::default()
                });
                failed |= finished.failed > 0;
                *outcome = Some(finished);
            }
        }
        if failed {
            break Ended::PublishFailed;
        }
        if tokio::time::Instant::now() >= deadline {
            break Ended::TimedOut(plan.timeout);
        }
        tokio::select! {
            () = tokio::time::sleep(TICK) => {}
            () = interrupt.cancelled() => {}
        }
    };
    bar.finish_and_clear();
    // Whatever still publishes stops where it is.
    for stop in &stops {
        stop.cancel();
    }
    // When every delivery arrived, only the last confirms can be outstanding;
    // otherwise publishing stops where it is.
    let allowance = if ended == Ended::Complete {
        Duration::from_secs(5)
    } else {
        Duration::ZERO
    };
    let mut published = Vec::new();
    for ((outcome, mut publisher), load) in outcomes.into_iter().zip(publishers).zip(loads) {
        let mut outcome = match outcome {
            Some(outcome) => outcome,
            None => match tokio::time::timeout(allowance, &mut publisher).await {
                Ok(Ok(outcome)) => outcome,
                _ => {
                    publisher.abort();
                    Published::default()
                }
            },
        };
        outcome.handed_over = u64::from(load.events.published());
        published.push(outcome);
    }
    (ended, published)
}

fn seconds(ticks: u64) -> f64 {
    procstat::ticks_to_duration(ticks).as_secs_f64()
}

/// The measured times of some deliveries: from the first publish to the last
/// verified receipt, deliveries per second over it, and from the first
/// publish to the last.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Timing {
    seconds: f64,
    deliveries_per_second: f64,
    publish_seconds: f64,
}

impl Timing {
    fn of(verified: u64, span: Option<(Instant, Instant)>, last_verified_at: Option<Instant>) -> Timing {
        let seconds = match (span, last_verified_at) {
            (Some((first, _)), Some(last)) => last.saturating_duration_since(first).as_secs_f64(),
            _ => 0.0,
        };
        Timing {
            seconds,
            deliveries_per_second: if seconds > 0.0 { verified as f64 / seconds } else { 0.0 },
            publish_seconds: span.map_or(0.0, |(first, last)| last.duration_since(first).as_secs_f64()),
        }
    }
}

/// The first and the last publish of all tenants together.
fn combined_span(spans: impl IntoIterator<Item = Option<(Instant, Instant)>>) -> Option<(Instant, Instant)> {
    spans
        .into_iter()
        .flatten()
        .reduce(|(first, last), (other_first, other_last)| (first.min(other_first), last.max(other_last)))
}

/// One tenant's figures in the noisy scenario: what it handed over, what
/// arrived of it (of `expected`), how fast and how late, and, given when
/// another tenant's flood was published until, how late while it was and
/// after.
fn tenant_figures(
    tally: Tally,
    published: &Published,
    span: Option<(Instant, Instant)>,
    expected: u64,
    webhooks: u16,
    rate_per_second: Option<u32>,
    flood_published_until: Option<SystemTime>,
) -> TenantFigures {
    let timing = Timing::of(tally.verified, span, tally.last_verified_at);
    let slowest = SlowDelivery::listed(&tally.slowest);
    let latency_by_phase_ms =
        flood_published_until.and_then(|until| ByPhase::split(&tally.slowest, tally.verified, until));
    TenantFigures {
        events: published.handed_over,
        webhooks,
        rate_per_second,
        deliveries: Deliveries {
            expected,
            received: tally.requests,
            verified: tally.verified,
            missing: expected.saturating_sub(tally.verified),
            duplicates: tally.duplicates,
            invalid_signatures: tally.invalid_signatures,
            unexpected: tally.unexpected,
        },
        seconds: timing.seconds,
        deliveries_per_second: timing.deliveries_per_second,
        publish_seconds: timing.publish_seconds,
        latency_ms: Latency::from_micros(tally.latencies_us),
        acceptance_ms: Latency::from_micros(published.acceptance_us.clone()),
        slowest,
        latency_by_phase_ms,
    }
}

fn build_report(
    plan: &Plan,
    measured: Measured,
    loads: &[Load],
    shutdown_problems: Vec<String>,
    started_at: String,
) -> Report {
    let Measured {
        ended,
        published: by_tenant,
        tally,
        tallies,
        start,
        end,
        processes,
        own_peak_rss,
        portal,
        table_sizes,
    } = measured;
    let spans: Vec<_> = loads.iter().map(|load| load.events.publish_span()).collect();
    let tenants = plan.quiet.map(|quiet| {
        let mut tallies = tallies.into_iter();
        let mut figures = |tenant: usize, expected: u64, rate, flood_published_until| {
            let tally = tallies.next().unwrap_or_default();
            let webhooks = u16::try_from(loads[tenant].secrets.len()).unwrap_or(u16::MAX);
            tenant_figures(
                tally,
                &by_tenant[tenant],
                spans[tenant],
                expected,
                webhooks,
                rate,
                flood_published_until,
            )
        };
        // The receivers stamp arrivals with the wall clock; A's last publish
        // was an `Instant`.
        let a_published_until = spans[NOISY].map(|(_, last)| receiver::wall_clock_of(last));
        Tenants {
            fairness: plan.fairness().to_owned(),
            // Every one of A's events; as many of B's as it handed over.
            tenant_a: figures(NOISY, plan.expected_deliveries(), None, None),
            tenant_b: figures(
                QUIET,
                by_tenant[QUIET].handed_over * u64::from(Quiet::WEBHOOKS),
                Some(quiet.per_second),
                a_published_until,
            ),
        }
    });
    // All tenants together; tenant B's deliveries are as many as it handed over.
    let expected = plan.expected_deliveries()
        + by_tenant
            .iter()
            .zip(loads)
            .skip(1)
            .map(|(published, load)| published.handed_over * load.webhooks())
            .sum::<u64>();
    let mut published = Published {
        finished: by_tenant.iter().all(|published| published.finished),
        handed_over: by_tenant.iter().map(|published| published.handed_over).sum(),
        ..Published::default()
    };
    for part in by_tenant {
        published.merge(part);
    }
    let verified = tally.verified;
    let machine = Machine::read();

    let span = combined_span(spans);
    let Timing {
        seconds: elapsed,
        deliveries_per_second,
        publish_seconds,
    } = Timing::of(verified, span, tally.last_verified_at);

    let worker_concurrency = plan
        .concurrency
        .or_else(|| plan.setting("AEGIS_WORKER_CONCURRENCY")?.parse().ok())
        .unwrap_or_else(|| {
            u32::try_from(aegis_webhook_core::config::Config::default().worker_concurrency).unwrap_or(u32::MAX)
        });
    let workers = match plan.mode {
        Mode::Embedded => 1,
        Mode::Production => plan.workers,
    };
    let ceiling = (!plan.response_delay.is_zero())
        .then(|| f64::from(workers) * f64::from(worker_concurrency) / plan.response_delay.as_secs_f64());

    let usage = |name: String, pid: u32, ticks: u64, peak: Option<u64>| ProcessUsage {
        name,
        pid,
        cpu_seconds: seconds(ticks),
        cpu_seconds_per_1000_deliveries: per_thousand(seconds(ticks), verified),
        peak_rss_mib: peak.map(mib),
    };
    let process_usage: Vec<ProcessUsage> = processes
        .into_iter()
        .map(|(name, pid, peak)| {
            let ticks = end
                .processes
                .get(&pid)
                .copied()
                .unwrap_or(0)
                .saturating_sub(start.processes.get(&pid).copied().unwrap_or(0));
            usage(name, pid, ticks, peak)
        })
        .collect();
    let mut services = Vec::new();
    if plan.mode == Mode::Production {
        for (name, command, before, after) in [
            ("postgres", POSTGRES_COMMAND, &start.postgres, &end.postgres),
            ("rabbitmq", RABBITMQ_COMMAND, &start.rabbitmq, &end.rabbitmq),
        ] {
            let cpu_seconds = seconds(procstat::ticks_between(before, after));
            services.push(ServiceUsage {
                name: name.to_owned(),
                command: command.to_owned(),
                processes: after.len(),
                cpu_seconds,
                cpu_seconds_per_1000_deliveries: per_thousand(cpu_seconds, verified),
            });
        }
    }
    let system_cpu = process_usage.iter().map(|usage| usage.cpu_seconds).sum::<f64>()
        + services.iter().map(|service| service.cpu_seconds).sum::<f64>();
    let load_generator = usage(
        "aegis-bench".to_owned(),
        std::process::id(),
        end.own.saturating_sub(start.own),
        own_peak_rss,
    );

    let machine_load = machine_load(&start, &end, machine.cores, system_cpu + load_generator.cpu_seconds);

    let acceptance_ms = Latency::from_micros(std::mem::take(&mut published.acceptance_us));
    let missing = expected.saturating_sub(verified);
    let mut problems = Vec::new();
    if ended != Ended::Complete {
        problems.push(format!("the wait ended early: {ended}"));
    }
    if missing > 0 {
        problems.push(format!(
            "{missing} of {expected} expected deliveries did not arrive verified"
        ));
    }
    if let Some(tenants) = &tenants {
        for (label, figures) in [("A", &tenants.tenant_a), ("B", &tenants.tenant_b)] {
            let d = &figures.deliveries;
            if d.missing > 0 {
                problems.push(format!(
                    "tenant {label}: {} of {} expected deliveries did not arrive verified",
                    d.missing, d.expected
                ));
            }
        }
    }
    if tally.invalid_signatures > 0 {
        problems.push(format!(
            "{} requests had a missing or wrong X-Aegis-Signature",
            tally.invalid_signatures
        ));
    }
    if tally.unexpected > 0 {
        problems.push(format!(
            "{} requests were not expected deliveries (unknown event or webhook, or a pair delivered twice under \
             different X-Aegis-Delivery ids)",
            tally.unexpected
        ));
    }
    let portal = match portal {
        Some(Ok(portal)) => Some(portal),
        Some(Err(error)) => {
            problems.push(format!("the portal's pages: {error}"));
            None
        }
        None => None,
    };
    if published.failed > 0 {
        problems.push(format!(
            "{} events failed to publish: {}",
            published.failed,
            published.first_error.as_deref().unwrap_or("no reason given")
        ));
    }
    let passed = problems.is_empty();
    let mut warnings = Vec::new();
    if tally.duplicates > 0 {
        warnings.push(format!(
            "{} duplicate deliveries (a repeated X-Aegis-Delivery; allowed by at-least-once delivery)",
            tally.duplicates
        ));
    }
    if let Some(load) = &machine_load {
        // More than a tenth of the machine went to work that is not the run's.
        if load.other_cpu_seconds > 0.1 * load.window_seconds * machine.cores as f64 {
            warnings.push(format!(
                "other processes on this machine used {:.1} CPU s during the measured {:.1} s: the figures are \
                 disturbed; run again on an idle machine",
                load.other_cpu_seconds, load.window_seconds
            ));
        }
    }
    if let Some(load) = portal.as_ref().and_then(|portal| portal.machine_load.as_ref())
        && load.other_cpu_seconds > 0.1 * load.window_seconds * machine.cores as f64
    {
        warnings.push(format!(
            "other processes on this machine used {:.1} CPU s while the portal's pages were timed ({:.1} s): the \
             figures are disturbed; run again on an idle machine",
            load.other_cpu_seconds, load.window_seconds
        ));
    }
    if table_sizes.iter().any(|sample| !sample.sizes.autovacuum) {
        warnings.push(
            "PostgreSQL's autovacuum is off on this server: the space of deleted rows is never reused, so a \
             table expiry deletes from (events) grows as if nothing were deleted; production servers run it"
                .to_owned(),
        );
    }
    warnings.extend(shutdown_problems);

    Report {
        passed,
        problems,
        warnings,
        ended: ended.to_string(),
        mode: plan.mode,
        scenario: plan.scenario,
        via: plan.via,
        events: plan.events,
        webhooks: plan.webhooks,
        settings: Settings {
            workers,
            worker_concurrency,
            response_delay_ms: plan.response_delay.as_secs_f64() * 1000.0,
            rate_per_second: match (plan.pace, plan.quiet) {
                (_, Some(quiet)) => Some(quiet.per_second),
                (Pace::Burst, None) => None,
                (Pace::Rate { per_second }, None) => Some(per_second),
            },
            http_clients: (plan.via == Via::Http).then_some(plan.http_clients),
            amqp_in_flight: (plan.via == Via::Amqp).then_some(plan.amqp_in_flight),
            extra: plan
                .settings
                .iter()
                .map(|(name, value)| format!("{name}={value}"))
                .collect(),
        },
        deliveries: Deliveries {
            expected,
            received: tally.requests,
            verified,
            missing,
            duplicates: tally.duplicates,
            invalid_signatures: tally.invalid_signatures,
            unexpected: tally.unexpected,
        },
        published,
        throughput: Throughput {
            seconds: elapsed,
            deliveries_per_second,
            publish_seconds,
            ceiling_deliveries_per_second: ceiling,
            percent_of_ceiling: ceiling.map(|ceiling| deliveries_per_second * 100.0 / ceiling),
        },
        slowest: SlowDelivery::listed(&tally.slowest),
        latency_ms: Latency::from_micros(tally.latencies_us),
        acceptance_ms,
        tenants,
        portal,
        table_sizes,
        breakdown: None,
        processes: process_usage,
        services,
        load_generator,
        system_cpu_seconds_per_1000_deliveries: per_thousand(system_cpu, verified),
        machine_load,
        machine,
        binary: plan.bin.display().to_string(),
        started_at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quiet(stopped: bool, publisher_done: bool, handed_over: u64, verified: u64) -> Option<QuietProgress> {
        Some(QuietProgress {
            stopped,
            publisher_done,
            handed_over,
            webhooks: 1,
            verified,
        })
    }

    #[test]
    fn tenant_b_publishes_until_a_is_complete_then_the_wait_ends_with_bs_deliveries() {
        // One tenant: complete when its deliveries are.
        assert_eq!(next_step(9, 10, None), Step::Wait);
        assert_eq!(next_step(10, 10, None), Step::Complete);
        // B keeps publishing while A drains, however far ahead B's deliveries are.
        assert_eq!(next_step(9, 10, quiet(false, false, 30, 30)), Step::Wait);
        assert_eq!(next_step(10, 10, quiet(false, false, 31, 30)), Step::StopQuiet);
        // Stopped: the wait goes on until B's publisher has ended and every
        // event it handed over has arrived.
        assert_eq!(next_step(10, 10, quiet(true, false, 31, 31)), Step::Wait);
        assert_eq!(next_step(10, 10, quiet(true, true, 32, 31)), Step::Wait);
        assert_eq!(next_step(10, 10, quiet(true, true, 32, 32)), Step::Complete);
    }

    #[test]
    fn each_tenants_throughput_and_latency_are_its_own() {
        let first = Instant::now();
        let span = Some((first, first + Duration::from_secs(1)));
        let tally = Tally {
            requests: 41,
            verified: 40,
            duplicates: 1,
            latencies_us: (1..=40).map(|ms| ms * 1000).collect(),
            last_verified_at: Some(first + Duration::from_secs(4)),
            ..Tally::default()
        };
        let published = Published {
            handed_over: 21,
            finished: true,
            accepted: 21,
            acceptance_us: vec![500; 21],
            ..Published::default()
        };
        let figures = tenant_figures(tally, &published, span, 42, 2, Some(10), None);
        let d = &figures.deliveries;
        assert_eq!(
            (d.expected, d.received, d.verified, d.missing, d.duplicates),
            (42, 41, 40, 2, 1)
        );
        assert_eq!(
            (figures.events, figures.webhooks, figures.rate_per_second),
            (21, 2, Some(10))
        );
        // From the tenant's first publish to its last receipt.
        assert_eq!(
            (figures.seconds, figures.deliveries_per_second, figures.publish_seconds),
            (4.0, 10.0, 1.0)
        );
        let latency = figures.latency_ms.expect("latencies");
        assert_eq!((latency.samples, latency.p50, latency.max), (40, 20.0, 40.0));
        assert_eq!(figures.acceptance_ms.expect("acceptances").p99, 0.5);

        let nothing = tenant_figures(Tally::default(), &Published::default(), None, 0, 1, None, None);
        assert_eq!((nothing.deliveries_per_second, nothing.seconds), (0.0, 0.0));
        assert!(nothing.latency_ms.is_none());
    }

    #[test]
    fn both_tenants_together_span_from_the_first_publish_to_the_last() {
        let zero = Instant::now();
        let at = |ms| zero + Duration::from_millis(ms);
        assert_eq!(
            combined_span([Some((at(5), at(900))), None, Some((at(0), at(2000)))]),
            Some((at(0), at(2000)))
        );
        assert_eq!(combined_span([None, None]), None);
    }
}
