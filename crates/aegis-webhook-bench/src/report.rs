//! The summary of a run: one [`Report`], printed as text on stdout and
//! optionally written as JSON with the same fields.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::breakdown::Breakdown;
use crate::options::{Mode, Scenario, Via};
use crate::procstat::Machine;
use crate::publish::Published;
use crate::receiver::Slow;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Every expected delivery arrived verified, none invalid or unexpected.
    pub passed: bool,
    /// Why the run failed, when it did.
    pub problems: Vec<String>,
    /// What is worth knowing but does not fail a run: duplicates, a process
    /// that did not stop cleanly.
    pub warnings: Vec<String>,
    /// How the wait ended: `complete`, `timed out after …`, `interrupted`, …
    pub ended: String,
    pub mode: Mode,
    pub scenario: Scenario,
    pub via: Via,
    /// Events and webhooks (tenant A's in the noisy scenario).
    pub events: u32,
    pub webhooks: u16,
    pub settings: Settings,
    /// All tenants together, as `published`, `throughput` and the latencies.
    pub deliveries: Deliveries,
    pub published: Published,
    pub throughput: Throughput,
    /// Event→receipt of each verified delivery (first receipt of each).
    pub latency_ms: Option<Latency>,
    /// The slowest deliveries (up to 1,000: the tail past a 60,000-delivery
    /// run's p99), slowest first, with when they arrived, to be matched with
    /// the processes' and the database's logs.
    pub slowest: Vec<SlowDelivery>,
    /// Event handed over → the broker's confirm (AMQP) or the intake's 202
    /// (HTTP): the publishing part of the latency.
    pub acceptance_ms: Option<Latency>,
    /// Noisy scenario: each tenant's figures, and the fairness setting.
    pub tenants: Option<Tenants>,
    /// Portal scenario: how long the customer portal's pages took, once the
    /// deliveries were in.
    pub portal: Option<Portal>,
    /// Production mode: the growing tables' sizes every 30 s and at the end.
    pub table_sizes: Vec<TableSample>,
    /// `--breakdown`: one event's path, step by step, from its traces.
    pub breakdown: Option<Breakdown>,
    /// The system's processes, each measured alone.
    pub processes: Vec<ProcessUsage>,
    /// PostgreSQL and RabbitMQ (production mode): every process of each.
    pub services: Vec<ServiceUsage>,
    /// This program: the publisher and the receiver, sharing the machine.
    pub load_generator: ProcessUsage,
    /// CPU of the system's processes and services together (not the load
    /// generator), per 1,000 verified deliveries.
    pub system_cpu_seconds_per_1000_deliveries: Option<f64>,
    /// How busy the whole machine was during the measured window.
    pub machine_load: Option<MachineLoad>,
    pub machine: Machine,
    /// The `aegis-webhook` binary that ran.
    pub binary: String,
    /// When the run started (UTC).
    pub started_at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub workers: u16,
    /// `AEGIS_WORKER_CONCURRENCY` of each worker.
    pub worker_concurrency: u32,
    pub response_delay_ms: f64,
    /// Steady scenario: events per second; noisy scenario: tenant B's.
    pub rate_per_second: Option<u32>,
    pub http_clients: Option<u16>,
    pub amqp_in_flight: Option<u32>,
    /// The `--set` settings, `NAME=VALUE`.
    pub extra: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Deliveries {
    pub expected: u64,
    /// Requests the receiver got, whatever they carried.
    pub received: u64,
    /// Distinct (event, webhook) pairs with a valid signature and a new
    /// `X-Aegis-Delivery`.
    pub verified: u64,
    pub missing: u64,
    /// Repeats of an `X-Aegis-Delivery` already received (at-least-once
    /// delivery allows them; they do not fail a run).
    pub duplicates: u64,
    pub invalid_signatures: u64,
    /// Validly signed requests nobody asked for (unknown event or webhook, or
    /// an (event, webhook) pair under a second `X-Aegis-Delivery`).
    pub unexpected: u64,
}

/// The noisy scenario's two tenants, side by side.
#[derive(Debug, Clone, Serialize)]
pub struct Tenants {
    /// `AEGIS_FAIRNESS` as the run set it: `on` (the default) or what
    /// `--set AEGIS_FAIRNESS=…` gave every process.
    pub fairness: String,
    /// Publishes every event as fast as possible: its throughput.
    pub tenant_a: TenantFigures,
    /// Publishes at a steady rate until A's deliveries have all arrived: its
    /// latency.
    pub tenant_b: TenantFigures,
}

/// One tenant's deliveries, each counted at that tenant's own webhooks.
#[derive(Debug, Clone, Serialize)]
pub struct TenantFigures {
    /// Events handed over.
    pub events: u64,
    pub webhooks: u16,
    /// Events per second, when published at a rate.
    pub rate_per_second: Option<u32>,
    pub deliveries: Deliveries,
    /// The tenant's first publish to its last verified receipt.
    pub seconds: f64,
    /// Verified deliveries ÷ `seconds`.
    pub deliveries_per_second: f64,
    /// The tenant's first publish to its last.
    pub publish_seconds: f64,
    /// Event→receipt of each of the tenant's verified deliveries.
    pub latency_ms: Option<Latency>,
    /// Event handed over → accepted, for the tenant's events.
    pub acceptance_ms: Option<Latency>,
    /// The tenant's slowest deliveries (up to 1,000: all of B's in a default
    /// run), slowest first, with when they arrived: where in the run B's
    /// tail happened.
    pub slowest: Vec<SlowDelivery>,
    /// Tenant B's latency split by when its events were published: while A
    /// was still publishing (the flood crossing the broker, and being moved
    /// aside) and after (the flood draining). Only when `slowest` holds
    /// every one of B's verified deliveries, so the split covers them all.
    pub latency_by_phase_ms: Option<ByPhase>,
}

/// A tenant's latency while another was publishing its flood, and after.
#[derive(Debug, Clone, Serialize)]
pub struct ByPhase {
    pub while_flood_published: Option<Latency>,
    pub after: Option<Latency>,
}

impl ByPhase {
    /// Splits every delivery of `kept` by whether its event was published
    /// (arrival minus latency) before `flood_published_until`; `None` unless
    /// `kept` holds all `verified` deliveries.
    pub fn split(
        kept: &BinaryHeap<Reverse<Slow>>,
        verified: u64,
        flood_published_until: SystemTime,
    ) -> Option<ByPhase> {
        if kept.is_empty() || kept.len() as u64 != verified {
            return None;
        }
        let (during, after): (Vec<Slow>, Vec<Slow>) = kept.iter().map(|Reverse(slow)| *slow).partition(|slow| {
            slow.arrived
                .checked_sub(Duration::from_micros(slow.latency_us))
                .is_some_and(|published| published < flood_published_until)
        });
        let micros = |slows: Vec<Slow>| slows.into_iter().map(|slow| slow.latency_us).collect();
        Some(ByPhase {
            while_flood_published: Latency::from_micros(micros(during)),
            after: Latency::from_micros(micros(after)),
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Throughput {
    /// First publish to last verified receipt.
    pub seconds: f64,
    pub deliveries_per_second: f64,
    /// First publish to last publish.
    pub publish_seconds: f64,
    /// With a response delay: workers × concurrency ÷ delay, the most the
    /// system's concurrency allows.
    pub ceiling_deliveries_per_second: Option<f64>,
    pub percent_of_ceiling: Option<f64>,
}

/// One of the slowest deliveries of a run.
#[derive(Debug, Clone, Serialize)]
pub struct SlowDelivery {
    /// When it arrived at the receiver (UTC, RFC 3339, milliseconds).
    pub arrived: String,
    pub latency_ms: f64,
}

impl SlowDelivery {
    /// The kept slow deliveries, slowest first.
    pub fn listed(kept: &BinaryHeap<Reverse<Slow>>) -> Vec<SlowDelivery> {
        let mut slowest: Vec<Slow> = kept.iter().map(|Reverse(slow)| *slow).collect();
        slowest.sort_unstable_by_key(|slow| Reverse(slow.latency_us));
        slowest
            .into_iter()
            .map(|slow| SlowDelivery {
                arrived: chrono::DateTime::<chrono::Utc>::from(slow.arrived)
                    .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                latency_ms: slow.latency_us as f64 / 1000.0,
            })
            .collect()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub samples: usize,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    /// Nearest-rank percentiles of latencies in microseconds, in milliseconds.
    pub fn from_micros(mut micros: Vec<u64>) -> Option<Latency> {
        if micros.is_empty() {
            return None;
        }
        micros.sort_unstable();
        let at = |percent: f64| {
            let rank = ((percent / 100.0) * micros.len() as f64).ceil() as usize;
            micros[rank.clamp(1, micros.len()) - 1] as f64 / 1000.0
        };
        Some(Latency {
            samples: micros.len(),
            p50: at(50.0),
            p90: at(90.0),
            p99: at(99.0),
            max: micros[micros.len() - 1] as f64 / 1000.0,
        })
    }
}

/// The portal scenario's figures: each page fetched `requests` times, one at
/// a time, over the deliveries the run made.
#[derive(Debug, Clone, Serialize)]
pub struct Portal {
    /// Every delivery in the database, as the API counts them (the sum of
    /// every webhook's `stats`), when the pages were measured.
    pub deliveries_in_database: u64,
    /// The measured webhook's.
    pub webhook_deliveries: u64,
    pub webhook_id: String,
    /// Untimed GETs of each page before its timed ones.
    pub warmup_requests: u32,
    /// The delivery log's first page (one webhook) should take less than
    /// this: the portal's target, compared with its p99.
    pub target_ms: f64,
    pub pages: Vec<PageTiming>,
    /// The server process's (`api` or `dev`) peak RSS after the pages.
    pub server_peak_rss_mib: Option<f64>,
    /// The machine over the timed requests of every page.
    pub machine_load: Option<MachineLoad>,
}

/// One page of the portal, timed.
#[derive(Debug, Clone, Serialize)]
pub struct PageTiming {
    /// What the page is: `delivery log, one webhook`, …
    pub page: String,
    /// The path requested, with its query.
    pub path: String,
    /// Rows (deliveries linked) on the page, for the delivery log.
    pub rows: Option<u64>,
    /// The size of the page's HTML.
    pub body_kib: f64,
    /// Request sent → whole body read, over the timed requests (every one
    /// answered 200).
    pub latency_ms: Latency,
    /// CPU time of the server process (`api` or `dev`) over the timed
    /// requests, per request.
    pub server_cpu_ms_per_request: Option<f64>,
    /// PostgreSQL's (production mode), per request.
    pub postgres_cpu_ms_per_request: Option<f64>,
}

/// The machine's busy CPU time over the measured window (`/proc/stat`), to
/// tell an undisturbed run from one that shared the cores with other work.
#[derive(Debug, Clone, Serialize)]
pub struct MachineLoad {
    /// From just before the first publish to just after the last receipt.
    pub window_seconds: f64,
    /// All cores together, whoever the work was for.
    pub busy_cpu_seconds: f64,
    /// Of all cores over the window.
    pub busy_percent: f64,
    /// Busy time not accounted to the run's processes, PostgreSQL, RabbitMQ
    /// or the benchmark: other work on the machine (and the kernel's own).
    pub other_cpu_seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessUsage {
    pub name: String,
    pub pid: u32,
    /// User + system CPU time from the first publish to the last receipt.
    pub cpu_seconds: f64,
    pub cpu_seconds_per_1000_deliveries: Option<f64>,
    /// `VmHWM`: the most resident memory since the process started.
    pub peak_rss_mib: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServiceUsage {
    /// `postgres` or `rabbitmq`.
    pub name: String,
    /// The command counted (`postgres`, `beam.smp`) and how many processes had it.
    pub command: String,
    pub processes: usize,
    pub cpu_seconds: f64,
    pub cpu_seconds_per_1000_deliveries: Option<f64>,
}

/// CPU seconds per 1,000 deliveries, when any arrived.
pub fn per_thousand(cpu_seconds: f64, deliveries: u64) -> Option<f64> {
    (deliveries > 0).then(|| cpu_seconds * 1000.0 / deliveries as f64)
}

fn optional(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |value| format!("{value:.decimals$}"))
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let settings = &self.settings;
        let d = &self.deliveries;
        let t = &self.throughput;
        writeln!(
            f,
            "Aegis Webhooks benchmark — {}",
            if self.passed { "PASS" } else { "FAIL" }
        )?;
        let shape = match self.mode {
            Mode::Embedded => "one `dev` process (SQLite, in-process queue)".to_owned(),
            Mode::Production => format!(
                "api, ingester, {} worker{} (PostgreSQL, RabbitMQ)",
                settings.workers,
                if settings.workers == 1 { "" } else { "s" }
            ),
        };
        writeln!(f, "  mode          {} — {shape}", self.mode)?;
        let pace = match settings.rate_per_second {
            Some(rate) => format!("{rate} events/s"),
            None => "as fast as possible".to_owned(),
        };
        match (&self.tenants, settings.rate_per_second) {
            (Some(_), Some(rate)) => writeln!(
                f,
                "  scenario      {}: tenant A {} events × {} webhooks as fast as possible, tenant B {rate} events/s × 1 \
                 webhook until A's deliveries have all arrived, via {}",
                self.scenario, self.events, self.webhooks, self.via
            )?,
            _ => writeln!(
                f,
                "  scenario      {}: {} events × {} webhooks, {pace}, via {}",
                self.scenario, self.events, self.webhooks, self.via
            )?,
        }
        let mut knobs = format!(
            "worker concurrency {}, response delay {} ms",
            settings.worker_concurrency, settings.response_delay_ms
        );
        if let Some(clients) = settings.http_clients {
            knobs.push_str(&format!(", {clients} HTTP clients"));
        }
        if let Some(in_flight) = settings.amqp_in_flight {
            knobs.push_str(&format!(", {in_flight} unconfirmed publishes in flight"));
        }
        for extra in &settings.extra {
            knobs.push_str(&format!(", {extra}"));
        }
        writeln!(f, "  settings      {knobs}")?;
        writeln!(f, "  ended         {}", self.ended)?;
        writeln!(
            f,
            "  deliveries    {} expected, {} verified, {} missing; {} requests, {} duplicates, {} invalid signatures, {} unexpected",
            d.expected, d.verified, d.missing, d.received, d.duplicates, d.invalid_signatures, d.unexpected
        )?;
        let p = &self.published;
        let handed_over = match &self.tenants {
            Some(tenants) => format!(
                "{} events handed over (tenant A {} of {}, tenant B {})",
                p.handed_over, tenants.tenant_a.events, self.events, tenants.tenant_b.events
            ),
            None => format!("{} of {} events handed over", p.handed_over, self.events),
        };
        writeln!(
            f,
            "  published     {handed_over}, {} accepted, {} failed{}{}",
            p.accepted,
            p.failed,
            if p.finished { "" } else { "; stopped before it finished" },
            p.first_error
                .as_ref()
                .map_or_else(String::new, |error| format!(" (first failure: {error})"))
        )?;
        // The noisy scenario's overall figures mix its tenants; each one's follow.
        let all = if self.tenants.is_some() { ", both tenants" } else { "" };
        writeln!(
            f,
            "  throughput    {:.0} deliveries/s end to end ({} in {:.2} s, first publish to last receipt{all}; publishing took {:.2} s)",
            t.deliveries_per_second, d.verified, t.seconds, t.publish_seconds
        )?;
        if let (Some(ceiling), Some(percent)) = (t.ceiling_deliveries_per_second, t.percent_of_ceiling) {
            writeln!(
                f,
                "  ceiling       {ceiling:.0} deliveries/s (workers × concurrency ÷ response delay); reached {percent:.0} %"
            )?;
        }
        match &self.latency_ms {
            Some(l) => writeln!(
                f,
                "  latency       p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms (event → receipt, {} deliveries{all})",
                l.p50, l.p90, l.p99, l.max, l.samples
            )?,
            None => writeln!(f, "  latency       -")?,
        }
        if !self.slowest.is_empty() {
            let listed: Vec<String> = self
                .slowest
                .iter()
                .take(5)
                .map(|slow| format!("{:.1} ms at {}", slow.latency_ms, slow.arrived))
                .collect();
            writeln!(f, "  slowest       {}", listed.join(", "))?;
        }
        if let Some(l) = &self.acceptance_ms {
            let by = match self.via {
                Via::Amqp => "broker confirm",
                Via::Http => "intake 202",
            };
            writeln!(
                f,
                "  accepted in   p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms (event handed over → {by})",
                l.p50, l.p90, l.p99, l.max
            )?;
        }
        if let Some(tenants) = &self.tenants {
            writeln!(f, "  fairness      AEGIS_FAIRNESS={}", tenants.fairness)?;
            tenant_lines(f, "A", &tenants.tenant_a)?;
            tenant_lines(f, "B", &tenants.tenant_b)?;
        }
        if let Some(portal) = &self.portal {
            portal_lines(f, portal)?;
        }
        if !self.table_sizes.is_empty() {
            writeln!(
                f,
                "  tables        at s   events (MiB)     deliveries (MiB)  attempts (MiB)    WAL written (MiB)  connections (TLS)"
            )?;
            let first_wal = self.table_sizes.first().map_or(0, |sample| sample.sizes.wal_bytes);
            for sample in &self.table_sizes {
                let sizes = &sample.sizes;
                writeln!(
                    f,
                    "                {:>5.0}  {:>8} ({:>6.1})  {:>8} ({:>6.1})  {:>8} ({:>6.1})  {:>8.1}  {:>11} ({})",
                    sample.at_seconds,
                    sizes.events,
                    mib(sizes.events_bytes),
                    sizes.deliveries,
                    mib(sizes.deliveries_bytes),
                    sizes.attempts,
                    mib(sizes.attempts_bytes),
                    mib(sizes.wal_bytes.saturating_sub(first_wal)),
                    sizes.connections,
                    sizes.tls_connections
                )?;
            }
        }
        if let Some(breakdown) = &self.breakdown {
            write!(f, "{breakdown}")?;
        }
        writeln!(
            f,
            "  CPU, memory   {:<28} {:>9} {:>18} {:>14}",
            "process", "CPU s", "CPU s / 1k deliv.", "peak RSS MiB"
        )?;
        let process_line = |f: &mut fmt::Formatter<'_>, usage: &ProcessUsage, label: &str| {
            writeln!(
                f,
                "                {:<28} {:>9.2} {:>18} {:>14}",
                label,
                usage.cpu_seconds,
                optional(usage.cpu_seconds_per_1000_deliveries, 3),
                optional(usage.peak_rss_mib, 1)
            )
        };
        for usage in &self.processes {
            process_line(f, usage, &format!("{} (pid {})", usage.name, usage.pid))?;
        }
        for service in &self.services {
            writeln!(
                f,
                "                {:<28} {:>9.2} {:>18} {:>14}",
                format!("{} ({} × {})", service.name, service.processes, service.command),
                service.cpu_seconds,
                optional(service.cpu_seconds_per_1000_deliveries, 3),
                "-"
            )?;
        }
        writeln!(
            f,
            "                {:<28} {:>9} {:>18}",
            "system total",
            "",
            optional(self.system_cpu_seconds_per_1000_deliveries, 3)
        )?;
        process_line(f, &self.load_generator, "aegis-bench (load + receiver)")?;
        if let Some(load) = &self.machine_load {
            writeln!(
                f,
                "  machine load  {:.0} % of all cores busy over {:.2} s; {:.2} CPU s of it not this run's",
                load.busy_percent, load.window_seconds, load.other_cpu_seconds
            )?;
        }
        let m = &self.machine;
        writeln!(
            f,
            "  machine       {}, {} cores, {:.1} GiB RAM, {}",
            m.cpu_model, m.cores, m.memory_gib, m.kernel
        )?;
        writeln!(f, "  binary        {}", self.binary)?;
        for problem in &self.problems {
            writeln!(f, "  problem       {problem}")?;
        }
        for warning in &self.warnings {
            writeln!(f, "  warning       {warning}")?;
        }
        Ok(())
    }
}

fn latency_text(latency: Option<&Latency>) -> String {
    latency.map_or_else(
        || "-".to_owned(),
        |l| {
            format!(
                "p50 {:.1} ms, p90 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                l.p50, l.p90, l.p99, l.max
            )
        },
    )
}

/// The portal scenario's pages: one line each, request → whole body.
fn portal_lines(f: &mut fmt::Formatter<'_>, portal: &Portal) -> fmt::Result {
    let requests = portal.pages.first().map_or(0, |page| page.latency_ms.samples);
    writeln!(
        f,
        "  portal        {} deliveries in the database, {} of them the webhook's ({}); {requests} timed GETs of each \
         page one at a time after {} warm-up, request → whole body",
        portal.deliveries_in_database, portal.webhook_deliveries, portal.webhook_id, portal.warmup_requests
    )?;
    writeln!(
        f,
        "                {:<34} {:>8} {:>8} {:>8} {:>8} {:>5} {:>8} {:>11} {:>10}",
        "page", "p50 ms", "p90 ms", "p99 ms", "max ms", "rows", "KiB", "server CPU", "PostgreSQL"
    )?;
    for page in &portal.pages {
        let l = &page.latency_ms;
        writeln!(
            f,
            "                {:<34} {:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>5} {:>8.1} {:>11} {:>10}",
            page.page,
            l.p50,
            l.p90,
            l.p99,
            l.max,
            page.rows.map_or_else(|| "-".to_owned(), |rows| rows.to_string()),
            page.body_kib,
            optional(page.server_cpu_ms_per_request, 2),
            optional(page.postgres_cpu_ms_per_request, 2)
        )?;
    }
    writeln!(
        f,
        "                (CPU: ms per request; the server is the `api` or `dev` process){}",
        portal
            .server_peak_rss_mib
            .map_or_else(String::new, |mib| format!("; server peak RSS {mib:.1} MiB"))
    )?;
    if let Some(log) = portal.pages.first() {
        let p99 = log.latency_ms.p99;
        writeln!(
            f,
            "  portal target {} under {:.0} ms: p99 {p99:.1} ms — {}",
            log.page,
            portal.target_ms,
            if p99 < portal.target_ms {
                "met".to_owned()
            } else {
                format!("missed by {:.1} ms", p99 - portal.target_ms)
            }
        )?;
    }
    if let Some(load) = &portal.machine_load {
        writeln!(
            f,
            "  portal load   {:.0} % of all cores busy over {:.2} s of timed requests; {:.2} CPU s of it not this run's",
            load.busy_percent, load.window_seconds, load.other_cpu_seconds
        )?;
    }
    Ok(())
}

/// Two lines for one of the noisy scenario's tenants: its deliveries, then
/// its throughput and latency.
fn tenant_lines(f: &mut fmt::Formatter<'_>, label: &str, tenant: &TenantFigures) -> fmt::Result {
    let d = &tenant.deliveries;
    let pace = match tenant.rate_per_second {
        Some(rate) => format!(" at {rate}/s"),
        None => String::new(),
    };
    writeln!(
        f,
        "  tenant {label}      {} events{pace} × {} webhook{}: {} of {} deliveries verified, {} missing, {} duplicates, {} \
         invalid signatures, {} unexpected",
        tenant.events,
        tenant.webhooks,
        if tenant.webhooks == 1 { "" } else { "s" },
        d.verified,
        d.expected,
        d.missing,
        d.duplicates,
        d.invalid_signatures,
        d.unexpected
    )?;
    writeln!(
        f,
        "                {:.0} deliveries/s ({} in {:.2} s, its first publish to its last receipt; publishing took \
         {:.2} s); latency {} (event → receipt, {} deliveries)",
        tenant.deliveries_per_second,
        d.verified,
        tenant.seconds,
        tenant.publish_seconds,
        latency_text(tenant.latency_ms.as_ref()),
        tenant.latency_ms.as_ref().map_or(0, |l| l.samples)
    )?;
    if let Some(phases) = &tenant.latency_by_phase_ms {
        let samples = |latency: &Option<Latency>| latency.as_ref().map_or(0, |l| l.samples);
        writeln!(
            f,
            "                published while A was publishing: {} ({} deliveries); after: {} ({} deliveries)",
            latency_text(phases.while_flood_published.as_ref()),
            samples(&phases.while_flood_published),
            latency_text(phases.after.as_ref()),
            samples(&phases.after)
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_splits_by_whether_the_flood_was_still_being_published() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let at_ms = |ms: u64| start + Duration::from_millis(ms);
        // (published at, latency): the flood is published until 1,000 ms.
        let deliveries = [(0, 120), (400, 80), (999, 60), (1_000, 9), (5_000, 30), (9_000, 12)];
        let kept: BinaryHeap<Reverse<Slow>> = deliveries
            .iter()
            .map(|&(published, latency)| {
                Reverse(Slow {
                    latency_us: latency * 1000,
                    arrived: at_ms(published + latency),
                })
            })
            .collect();
        let phases = ByPhase::split(&kept, 6, at_ms(1_000)).expect("every delivery kept");
        let during = phases.while_flood_published.expect("three during");
        let after = phases.after.expect("three after");
        assert_eq!((during.samples, during.p50, during.max), (3, 80.0, 120.0));
        assert_eq!((after.samples, after.p50, after.max), (3, 12.0, 30.0));
        // A split of some of the deliveries only would say nothing true.
        assert!(ByPhase::split(&kept, 7, at_ms(1_000)).is_none());
        assert!(ByPhase::split(&BinaryHeap::new(), 0, at_ms(1_000)).is_none());
    }

    #[test]
    fn percentiles_are_nearest_rank_in_milliseconds() {
        let latency = Latency::from_micros((1..=1000).rev().map(|ms| ms * 1000).collect()).expect("samples");
        assert_eq!(
            (latency.p50, latency.p90, latency.p99, latency.max),
            (500.0, 900.0, 990.0, 1000.0)
        );
        let one = Latency::from_micros(vec![1500]).expect("one sample");
        assert_eq!((one.p50, one.p99, one.max, one.samples), (1.5, 1.5, 1.5, 1));
        assert!(Latency::from_micros(Vec::new()).is_none());
    }

    #[test]
    fn cpu_is_normalised_per_thousand_deliveries() {
        assert_eq!(per_thousand(3.0, 20_000), Some(0.15));
        assert_eq!(per_thousand(3.0, 0), None);
    }
}

/// The growing tables' sizes `at_seconds` after the load started.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TableSample {
    pub at_seconds: f64,
    pub sizes: crate::postgres::TableSizes,
}

/// Bytes in MiB, for reports.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}
