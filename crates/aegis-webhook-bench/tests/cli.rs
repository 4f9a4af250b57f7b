//! The `aegis-bench` command line as a user meets it, without starting a
//! system. Being an integration test also makes `cargo test --workspace`
//! build the `aegis-bench` binary, which the end-to-end smoke test
//! (`tests/tests/e2e/bench.rs`) runs.

use std::process::Command;

fn aegis_bench() -> Command {
    Command::new(env!("CARGO_BIN_EXE_aegis-bench"))
}

#[test]
fn help_names_every_mode_scenario_and_publishing_path() {
    let output = aegis_bench().arg("--help").output().expect("run aegis-bench --help");
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for word in [
        "embedded",
        "production",
        "burst",
        "steady",
        "slow",
        "noisy",
        "portal",
        "--page-requests",
        "AEGIS_FAIRNESS=off",
        "amqp",
        "http",
        "--json",
        "--timeout",
    ] {
        assert!(help.contains(word), "--help does not mention {word}:\n{help}");
    }
}

#[test]
fn a_run_that_cannot_be_made_is_refused_before_anything_starts() {
    let output = aegis_bench()
        .args(["--mode", "embedded", "--via", "amqp"])
        .output()
        .expect("run aegis-bench");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("embedded mode has no broker"), "{stderr}");
}
