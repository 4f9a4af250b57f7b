//! Separate OS processes for the fault and telemetry tests. A test binary re-runs
//! itself as a child with `AEGIS_TEST_ROLE` set, and the child runs one role
//! exactly as `aegis-webhook api|ingester|worker` would (configuration from
//! `AEGIS_*`, its own telemetry, `aegis_webhook::start`, stop on SIGTERM, the
//! last spans flushed), so SIGKILL and SIGTERM hit a real process without
//! depending on a separately built binary.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use aegis_webhook::{Roles, open_database, run_until_signal, start, telemetry_settings};
use aegis_webhook_core::config::Config;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const ROLE_ENV: &str = "AEGIS_TEST_ROLE";
const READY: &str = "AEGIS_ROLE_READY";

/// The body of the ignored `role_process` test of each binary that spawns role
/// processes: what a child process runs.
pub async fn role_process_main() {
    let role = std::env::var(ROLE_ENV).expect("role_process only runs as a child of a test");
    let roles = match role.as_str() {
        "api" => Roles::API,
        "ingester" => Roles::INGESTER,
        "worker" => Roles::WORKER,
        other => panic!("unknown role {other}"),
    };
    let config = Config::load(None).expect("configuration");
    // Children always log warnings and errors (to the test's stderr), so a
    // failing role explains itself; AEGIS_LOG raises the level. With
    // AEGIS_OTLP_ENDPOINT they export traces, as `aegis-webhook <role>` does.
    let telemetry = telemetry_settings(&config, roles.service_name()).expect("telemetry");
    aegis_webhook_core::telemetry::init(telemetry);
    let db = open_database(&config, false).await.expect("database");
    // Every role listens, as `aegis-webhook <role>` does: the API, or probes and metrics.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let system = start(&config, roles, db, Some(listener)).await.expect("start");
    let addr = system.addr.map_or_else(|| "-".to_owned(), |addr| addr.to_string());
    println!("{READY} {addr}");
    let stopped = run_until_signal(system).await;
    // As `main` does on the way out: the last spans are exported.
    tokio::task::spawn_blocking(aegis_webhook_core::telemetry::shutdown)
        .await
        .expect("flush the last spans");
    stopped.expect("clean stop");
}

/// One child process running one role.
pub struct RoleProcess {
    pub role: &'static str,
    pub addr: Option<SocketAddr>,
    child: Child,
}

impl RoleProcess {
    /// Starts `role` with the given `AEGIS_*` settings and waits until it serves.
    pub async fn spawn(role: &'static str, settings: &[(String, String)]) -> RoleProcess {
        let exe = std::env::current_exe().expect("the test binary");
        let mut command = Command::new(exe);
        command
            .args([
                "--ignored",
                "--exact",
                "role_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(ROLE_ENV, role)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // Only what the test says: nothing from the developer's own AEGIS_* (or
        // OpenTelemetry) setup.
        for (key, _) in std::env::vars() {
            if (key.starts_with("AEGIS_") && !key.starts_with("AEGIS_TEST_")) || key.starts_with("OTEL_") {
                command.env_remove(key);
            }
        }
        if std::env::var_os("TEST_LOG").is_none() {
            command.env("AEGIS_LOG", "warn");
        }
        for (key, value) in settings {
            command.env(key, value);
        }
        let mut child = command.spawn().expect("spawn a role process");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await.expect("read the child's output") {
                // libtest prints `test role_process ... ` first, on the same line.
                if let Some((_, addr)) = line.split_once(READY) {
                    return addr.trim().parse().ok();
                }
            }
            panic!("the {role} process exited before it was ready");
        })
        .await
        .unwrap_or_else(|_| panic!("the {role} process did not start within 60 s"));
        // Keep draining its output so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        RoleProcess { role, addr, child }
    }

    /// Whether the process has not ended (by itself or otherwise) yet.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("ask for the process's status").is_none()
    }

    /// SIGKILL: no chance to clean up, as when a node dies.
    pub async fn kill(&mut self) {
        self.child.kill().await.expect("SIGKILL");
    }

    /// Waits for the process to end by itself.
    pub async fn wait(&mut self, within: Duration) -> std::process::ExitStatus {
        tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the {} process did not end within {within:?}", self.role))
            .expect("wait")
    }

    /// SIGTERM, as Kubernetes sends on scale-down; returns the exit status.
    pub async fn terminate(mut self, within: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
        tokio::time::timeout(within, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the {} process did not stop within {within:?}", self.role))
            .expect("wait")
    }
}
