//! `aegis-bench`: parses the command line, runs one benchmark, prints its
//! summary on stdout; exits 1 when a delivery was missing or invalid.

use std::process::ExitCode;

use clap::Parser as _;

#[tokio::main]
async fn main() -> ExitCode {
    let args = aegis_webhook_bench::Args::parse();
    match aegis_webhook_bench::run(args).await {
        Ok(report) => {
            print!("{report}");
            if report.passed {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(error) => {
            eprintln!("aegis-bench: {error:#}");
            ExitCode::FAILURE
        }
    }
}
