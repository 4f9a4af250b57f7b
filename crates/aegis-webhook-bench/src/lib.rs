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

pub mod api;
pub mod broker;
pub mod events;
pub mod options;
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
use std::time::Duration;

use anyhow::Context as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use options::Args;
use options::{Mode, Pace, Plan, Via};
use procstat::Machine;
use publish::Published;
use receiver::{Receiver, Tally};
use report::{
    Deliveries, Latency, MachineLoad, ProcessUsage, Report, ServiceUsage, Settings, Throughput, per_thousand,
};
use system::System;

/// How often the wait checks for completion and redraws the progress bar.
/// The measured times come from the receipts themselves, not from this tick.
const TICK: Duration = Duration::from_millis(50);

/// Runs one benchmark and returns its report, also written as JSON when asked.
/// An error means the run could not be made (the system did not start, a
/// service is unreachable); a run that was made but lost deliveries returns a
/// report whose `passed` is false.
pub async fn run(args: Args) -> anyhow::Result<Report> {
    let plan = Plan::resolve(args)?;
    let interrupt = watch_signals()?;
    let started_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);

    let events = Arc::new(events::Events::generate(plan.events));
    let secrets: Vec<String> = (0..plan.webhooks)
        .map(|index| format!("bench-secret-{index}-{}", Uuid::new_v4().simple()))
        .collect();
    let receiver = Receiver::start(events.clone(), secrets.clone(), plan.response_delay).await?;

    // The processes' logs and the embedded data folder; kept when a run fails.
    let work_dir = std::env::temp_dir().join(format!("aegis-bench-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&work_dir).with_context(|| format!("failed to create {}", work_dir.display()))?;
    let mut system = System::new(&plan.bin, &work_dir);
    let measured = measure(&plan, &mut system, &receiver, &events, &secrets, &interrupt).await;
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

    let report = build_report(&plan, measured, &events, shutdown_problems, started_at);
    if let Some(path) = &plan.json {
        write_json(path, &report)?;
    }
    if report.passed {
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
    published: Published,
    tally: Tally,
    start: CpuReading,
    end: CpuReading,
    /// (name, pid, peak RSS in bytes) of each spawned process, read at the end.
    processes: Vec<(String, u32, Option<u64>)>,
    own_peak_rss: Option<u64>,
}

async fn measure(
    plan: &Plan,
    system: &mut System,
    receiver: &Receiver,
    events: &Arc<events::Events>,
    secrets: &[String],
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
    let api = system.api.clone().context("the started system has no API")?;
    let tenant_id = api.tenant_id().await?;
    eprintln!("aegis-bench: creating {} webhooks", secrets.len());
    for (index, secret) in secrets.iter().enumerate() {
        api.create_webhook(&receiver.url(index), secret).await?;
    }

    let amqp = match plan.via {
        Via::Amqp => {
            let broker = system.broker().context("--via amqp needs production mode")?;
            Some((broker.publisher().await?, broker.events_exchange()))
        }
        Via::Http => None,
    };
    let services = plan.mode == Mode::Production;
    eprintln!(
        "aegis-bench: publishing {} events via {} to {} webhooks",
        plan.events, plan.via, plan.webhooks
    );
    let start = CpuReading::take(system, services);
    let publisher = match amqp {
        Some((channel, exchange)) => tokio::spawn(publish::via_amqp(
            channel,
            exchange,
            events.clone(),
            tenant_id,
            plan.pace,
            plan.amqp_in_flight as usize,
        )),
        None => {
            let client = reqwest::Client::builder()
                .pool_max_idle_per_host(usize::from(plan.http_clients))
                .build()
                .context("failed to build the HTTP client")?;
            tokio::spawn(publish::via_http(
                client,
                api.intake_url(),
                api.ingest_token.clone(),
                events.clone(),
                tenant_id,
                plan.pace,
                usize::from(plan.http_clients),
            ))
        }
    };

    let (ended, published) = wait_for_deliveries(plan, system, receiver, events, publisher, interrupt).await;
    let end = CpuReading::take(system, services);
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
    Ok(Measured {
        ended,
        published,
        tally: receiver.tally(),
        start,
        end,
        processes,
        own_peak_rss,
    })
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

/// Waits until every expected delivery is verified, or the run cannot
/// complete (timeout, a process ended, publishing failed, interrupted).
async fn wait_for_deliveries(
    plan: &Plan,
    system: &mut System,
    receiver: &Receiver,
    events: &events::Events,
    mut publisher: JoinHandle<Published>,
    interrupt: &CancellationToken,
) -> (Ended, Published) {
    let expected = plan.expected_deliveries();
    let bar = progress_bar(expected);
    let deadline = tokio::time::Instant::now() + plan.timeout;
    let mut published = None;
    let ended = loop {
        if interrupt.is_cancelled() {
            break Ended::Interrupted;
        }
        let counts = receiver.counts();
        bar.set_position(counts.verified);
        bar.set_message(format!(
            "· published {}/{} · {} duplicates · {} invalid · {} unexpected",
            events.published(),
            events.len(),
            counts.duplicates,
            counts.invalid_signatures,
            counts.unexpected
        ));
        if counts.verified >= expected {
            break Ended::Complete;
        }
        if let Some((process, status)) = system.exited() {
            break Ended::ProcessExited(format!("{} ({status}); see {}", process.name, process.log.display()));
        }
        if published.is_none() && publisher.is_finished() {
            let outcome = (&mut publisher).await.unwrap_or_else(|error| Published {
                finished: true,
                failed: 1,
                first_error: Some(format!("the publisher failed: {error}")),
                ..Published::default()
            });
            let failed = outcome.failed > 0;
            published = Some(outcome);
            if failed {
                break Ended::PublishFailed;
            }
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
    // When every delivery arrived, only the last confirms can be outstanding;
    // otherwise publishing stops where it is.
    let allowance = if ended == Ended::Complete {
        Duration::from_secs(5)
    } else {
        Duration::ZERO
    };
    let mut published = match published {
        Some(published) => published,
        None => match tokio::time::timeout(allowance, &mut publisher).await {
            Ok(Ok(published)) => published,
            _ => {
                publisher.abort();
                Published::default()
            }
        },
    };
    published.handed_over = u64::from(events.published());
    (ended, published)
}

fn seconds(ticks: u64) -> f64 {
    procstat::ticks_to_duration(ticks).as_secs_f64()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn build_report(
    plan: &Plan,
    measured: Measured,
    events: &events::Events,
    shutdown_problems: Vec<String>,
    started_at: String,
) -> Report {
    let Measured {
        ended,
        mut published,
        tally,
        start,
        end,
        processes,
        own_peak_rss,
    } = measured;
    let expected = plan.expected_deliveries();
    let verified = tally.verified;
    let machine = Machine::read();

    let span = events.publish_span();
    let elapsed = match (span, tally.last_verified_at) {
        (Some((first, _)), Some(last)) => last.saturating_duration_since(first).as_secs_f64(),
        _ => 0.0,
    };
    let publish_seconds = span.map_or(0.0, |(first, last)| last.duration_since(first).as_secs_f64());
    let deliveries_per_second = if elapsed > 0.0 { verified as f64 / elapsed } else { 0.0 };

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

    let window = end.at.duration_since(start.at).as_secs_f64();
    let machine_load = match (start.machine_busy, end.machine_busy) {
        (Some(before), Some(after)) => {
            let busy = seconds(after.saturating_sub(before));
            let cores = machine.cores as f64;
            Some(MachineLoad {
                window_seconds: window,
                busy_cpu_seconds: busy,
                busy_percent: if window > 0.0 {
                    busy * 100.0 / (window * cores)
                } else {
                    0.0
                },
                other_cpu_seconds: (busy - system_cpu - load_generator.cpu_seconds).max(0.0),
            })
        }
        _ => None,
    };

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
            rate_per_second: match plan.pace {
                Pace::Burst => None,
                Pace::Rate { per_second } => Some(per_second),
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
        latency_ms: Latency::from_micros(tally.latencies_us),
        acceptance_ms,
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
