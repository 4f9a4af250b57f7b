//! Everything the Aegis Webhooks processes share, and nothing transport-specific:
//! domain types, signing, delivery policy, configuration, the queue port and its
//! in-process adapter, storage, the target URL policy and telemetry setup.

pub mod batch;
pub mod config;
pub mod db;
pub mod event;
pub mod ids;
pub mod metrics;
pub mod queue;
pub mod retry;
pub mod secret;
pub mod signing;
pub mod target;
pub mod telemetry;

/// The `User-Agent` of every webhook request.
pub const USER_AGENT: &str = concat!("Aegis-Webhooks/", env!("CARGO_PKG_VERSION"));
