//! What the kernel knows about processes and the machine, read from `/proc`
//! (Linux only): CPU time (`utime + stime` in `/proc/<pid>/stat`), peak
//! resident memory (`VmHWM` in `/proc/<pid>/status`), and the CPU model,
//! cores, memory and kernel the figures were measured on.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;

/// CPU time a process has used, user and system, in clock ticks.
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("failed to read {path}"))?;
    parse_stat(&text)
        .map(|stat| stat.cpu_ticks)
        .with_context(|| format!("{path} is not in the expected format"))
}

/// Converts clock ticks (`sysconf(_SC_CLK_TCK)`, usually 100 a second) to time.
pub fn ticks_to_duration(ticks: u64) -> Duration {
    let per_second = rustix::param::clock_ticks_per_second().max(1);
    Duration::from_nanos(ticks.saturating_mul(1_000_000_000) / per_second)
}

/// The most resident memory a process has used so far (`VmHWM`), in bytes.
pub fn peak_rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("failed to read {path}"))?;
    status_kib(&text, "VmHWM")
        .map(|kib| kib * 1024)
        .with_context(|| format!("{path} has no VmHWM line"))
}

/// CPU time the whole machine spent busy since boot, in clock ticks, all cores
/// together: `user + nice + system + irq + softirq` from the first line of
/// `/proc/stat` (idle, I/O wait and time stolen by the hypervisor are not
/// busy; guest time is already inside user and nice).
pub fn machine_busy_ticks() -> Option<u64> {
    parse_machine_busy(&std::fs::read_to_string("/proc/stat").ok()?)
}

fn parse_machine_busy(text: &str) -> Option<u64> {
    let line = text.lines().find(|line| line.starts_with("cpu "))?;
    let fields: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .map(|field| field.parse().ok())
        .collect::<Option<_>>()?;
    let field = |index: usize| fields.get(index).copied().unwrap_or(0);
    // user, nice, system, (idle), (iowait), irq, softirq
    Some(field(0) + field(1) + field(2) + field(5) + field(6))
}

/// The fields of `/proc/<pid>/stat` this program uses.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stat {
    /// The executable's name (at most 15 bytes), as `ps -o comm` shows it.
    command: String,
    cpu_ticks: u64,
}

/// `/proc/<pid>/stat` is `pid (comm) state ppid …`; `comm` may hold spaces and
/// parentheses, so the fields after it are counted from the last `)`. `utime`
/// and `stime` are fields 14 and 15 (proc(5)).
fn parse_stat(text: &str) -> Option<Stat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let command = text.get(open + 1..close)?.to_owned();
    // Fields after the command start with field 3 (state).
    let mut fields = text.get(close + 1..)?.split_ascii_whitespace().skip(14 - 3);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Stat {
        command,
        cpu_ticks: utime + stime,
    })
}

/// A `Name:   1234 kB` line of `/proc/<pid>/status`, in KiB.
fn status_kib(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(name)?.strip_prefix(':')?;
        value.trim().trim_end_matches("kB").trim().parse().ok()
    })
}

/// CPU ticks of every process whose command is `command`, by pid: the
/// processes of a service such as PostgreSQL (`postgres`) or RabbitMQ
/// (`beam.smp`). Processes that vanish while being read are skipped.
pub fn cpu_ticks_of_command(command: &str) -> HashMap<u32, u64> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    entries
        .filter_map(|entry| {
            let pid: u32 = entry.ok()?.file_name().to_str()?.parse().ok()?;
            let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let stat = parse_stat(&text)?;
            (stat.command == command).then_some((pid, stat.cpu_ticks))
        })
        .collect()
}

/// CPU ticks a group of processes used between two readings: processes that
/// started in between count from zero; those that ended in between are lost
/// (a service's long-lived processes, the ones doing the work, are kept).
pub fn ticks_between(start: &HashMap<u32, u64>, end: &HashMap<u32, u64>) -> u64 {
    end.iter()
        .map(|(pid, ticks)| ticks.saturating_sub(start.get(pid).copied().unwrap_or(0)))
        .sum()
}

/// The machine the figures come from.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    pub cpu_model: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub kernel: String,
}

impl Machine {
    pub fn read() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == "model name").then(|| value.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_gib = status_kib(&meminfo, "MemTotal").unwrap_or(0) as f64 / (1024.0 * 1024.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|release| format!("Linux {}", release.trim()))
            .unwrap_or_else(|_| "unknown".to_owned());
        Machine {
            cpu_model,
            cores,
            memory_gib,
            kernel,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_command_even_with_spaces_in_it() {
        let text = "4242 (tokio (runtime) x) S 1 4242 4242 0 -1 4194304 2711 0 0 0 150 37 0 0 20 0 9 0 1234 \
                    123456789 5000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                command: "tokio (runtime) x".to_owned(),
                cpu_ticks: 187
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn status_values_are_read_in_kib() {
        let text = "Name:\tworker\nVmPeak:\t  900 kB\nVmHWM:\t   51200 kB\nVmRSS:\t 40000 kB\n";
        assert_eq!(status_kib(text, "VmHWM"), Some(51_200));
        assert_eq!(status_kib(text, "VmSwap"), None);
    }

    #[test]
    fn this_process_can_be_measured() {
        let pid = std::process::id();
        cpu_ticks(pid).expect("own CPU time");
        assert!(peak_rss_bytes(pid).expect("own peak RSS") > 0);
        let own_command = cpu_ticks_of_command(
            &parse_stat(&std::fs::read_to_string("/proc/self/stat").expect("stat"))
                .expect("parses")
                .command,
        );
        assert!(own_command.contains_key(&pid));
    }

    #[test]
    fn machine_busy_time_leaves_out_idle_iowait_and_steal() {
        let text = "cpu  100 5 30 9000 40 2 3 50 0 0\ncpu0 50 2 15 4500 20 1 1 25 0 0\nintr 1\n";
        assert_eq!(parse_machine_busy(text), Some(140));
        assert_eq!(parse_machine_busy("intr 1\n"), None);
        assert!(machine_busy_ticks().is_some());
    }

    #[test]
    fn processes_that_appear_between_readings_count_from_zero() {
        let start = HashMap::from([(1, 100), (2, 50)]);
        let end = HashMap::from([(1, 130), (3, 7)]);
        assert_eq!(ticks_between(&start, &end), 37);
    }
}
