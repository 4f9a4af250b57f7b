//! The `aegis-webhook` command line as an operator meets it. Being an
//! integration test also makes `cargo test --workspace` build the binary,
//! which the benchmark smoke test (`tests/tests/e2e/bench.rs`) runs.

use std::process::Command;

fn aegis_webhook() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_aegis-webhook"));
    // Only the defaults: no configuration file, none of the caller's settings.
    command.current_dir(std::env::temp_dir());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("AEGIS_") {
            command.env_remove(name);
        }
    }
    command
}

#[test]
fn help_lists_every_subcommand() {
    let output = aegis_webhook()
        .arg("--help")
        .output()
        .expect("run aegis-webhook --help");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for subcommand in [
        "dev", "api", "ingester", "worker", "migrate", "publish", "apikey", "tenant",
    ] {
        assert!(help.contains(subcommand), "--help does not list {subcommand}:\n{help}");
    }
}

#[test]
fn publish_without_a_broker_says_where_events_go_instead() {
    let output = aegis_webhook()
        .args(["publish", "event.json"])
        .output()
        .expect("run aegis-webhook publish");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("AEGIS_AMQP_URL"), "{stderr}");
}
