//! `aegis-webhook` processes spawned by the benchmark: each with exactly the
//! settings the benchmark gives it (none of the caller's own `AEGIS_*`), its
//! output in a log file, and a stop by SIGTERM as an orchestrator would.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::Context as _;
use tokio::process::{Child, Command};

/// One running process.
#[derive(Debug)]
pub struct Spawned {
    /// `dev`, `api`, `ingester`, `worker-1`, …
    pub name: String,
    pub pid: u32,
    pub log: PathBuf,
    child: Child,
}

/// How a process ended when the benchmark stopped it.
#[derive(Debug, Clone)]
pub struct Stopped {
    pub name: String,
    pub status: Option<ExitStatus>,
    /// SIGTERM did not stop it in time, so it was killed.
    pub killed: bool,
}

impl Stopped {
    /// What went wrong, if anything: a process should exit 0 on SIGTERM.
    pub fn problem(&self) -> Option<String> {
        match (self.killed, self.status) {
            (true, _) => Some(format!("{} did not stop on SIGTERM and was killed", self.name)),
            (false, Some(status)) if status.success() => None,
            (false, Some(status)) => Some(format!("{} exited with {status} when stopped", self.name)),
            (false, None) => Some(format!("{}: its exit status could not be read", self.name)),
        }
    }
}

fn command(bin: &Path, args: &[&str], settings: &[(String, String)], log: &Path) -> anyhow::Result<Command> {
    let output = std::fs::File::create(log).with_context(|| format!("failed to create {}", log.display()))?;
    let errors = output
        .try_clone()
        .with_context(|| format!("failed to reopen {}", log.display()))?;
    let mut command = Command::new(bin);
    command
        .args(args)
        .stdin(Stdio::null())
        .stdout(output)
        .stderr(errors)
        // A last resort only: the benchmark stops its processes with SIGTERM.
        .kill_on_drop(true);
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("AEGIS_") {
            command.env_remove(name);
        }
    }
    command.envs(settings.iter().map(|(name, value)| (name, value)));
    Ok(command)
}

impl Spawned {
    /// Starts `bin args…` with `settings`, logging to `<log_dir>/<name>.log`.
    pub fn spawn(
        bin: &Path,
        args: &[&str],
        name: &str,
        settings: &[(String, String)],
        log_dir: &Path,
    ) -> anyhow::Result<Spawned> {
        let log = log_dir.join(format!("{name}.log"));
        let mut child = command(bin, args, settings, &log)?
            .spawn()
            .with_context(|| format!("failed to start {} {}", bin.display(), args.join(" ")))?;
        let Some(pid) = child.id() else {
            let _ = child.start_kill();
            anyhow::bail!("{name} exited as soon as it started; see {}", log.display());
        };
        Ok(Spawned {
            name: name.to_owned(),
            pid,
            log,
            child,
        })
    }

    /// The exit status, if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// An error saying that this process ended, with the end of its log.
    pub fn exit_error(&self, status: ExitStatus) -> anyhow::Error {
        anyhow::anyhow!(
            "{} exited ({status}); the end of {}:\n{}",
            self.name,
            self.log.display(),
            log_tail(&self.log, 15)
        )
    }

    /// SIGTERM, then up to `within` for the process to end; SIGKILL after that.
    pub async fn terminate(mut self, within: Duration) -> Stopped {
        if let Some(status) = self.exited() {
            return Stopped {
                name: self.name,
                status: Some(status),
                killed: false,
            };
        }
        let pid = i32::try_from(self.pid).ok().and_then(rustix::process::Pid::from_raw);
        if let Some(pid) = pid {
            // It may have ended since the check above; then there is nothing to do.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => Stopped {
                name: self.name,
                status: status.ok(),
                killed: false,
            },
            Err(_) => {
                let _ = self.child.kill().await;
                Stopped {
                    name: self.name,
                    status: None,
                    killed: true,
                }
            }
        }
    }
}

/// Runs `bin args…` to completion (for `migrate`); fails with the end of its
/// log when it fails or takes longer than `within`.
pub async fn run_once(
    bin: &Path,
    args: &[&str],
    name: &str,
    settings: &[(String, String)],
    log_dir: &Path,
    within: Duration,
) -> anyhow::Result<()> {
    let mut spawned = Spawned::spawn(bin, args, name, settings, log_dir)?;
    let status = tokio::time::timeout(within, spawned.child.wait())
        .await
        .with_context(|| format!("{name} did not finish within {within:?}; see {}", spawned.log.display()))?
        .with_context(|| format!("failed to wait for {name}"))?;
    if !status.success() {
        return Err(spawned.exit_error(status));
    }
    Ok(())
}

/// The last `lines` lines of a log file, for error messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
