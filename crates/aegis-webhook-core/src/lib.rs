//! The domain of Aegis Webhooks and its ports, shared by every process and
//! free of any transport, database or broker: events and typed ids, signing,
//! delivery policy, configuration, the queue port with its in-process adapter
//! and consume loop, the target URL policy, metrics and telemetry setup. The
//! adapters are crates of their own (`aegis-webhook-storage`,
//! `aegis-webhook-rabbitmq`).

pub mod access;
pub mod batch;
pub mod bulk_runtime;
pub mod config;
pub mod event;
pub mod fairness;
pub mod ids;
pub mod metrics;
pub mod queue;
pub mod retention;
pub mod retry;
pub mod secret;
pub mod signing;
pub mod target;
pub mod telemetry;

/// The `User-Agent` of every webhook request.
pub const USER_AGENT: &str = concat!("Aegis-Webhooks/", env!("CARGO_PKG_VERSION"));
