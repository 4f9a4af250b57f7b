//! End-to-end tests of Aegis Webhooks: the real system over HTTP, real receivers
//! on loopback, and both databases (SQLite, and the machine's PostgreSQL).

mod api;
mod bad_input;
mod bench;
mod fairness;
mod hostile_receivers;
mod http_limits;
mod pipeline;
mod portal;
mod portal_browser;
mod rabbitmq;
mod retention;
mod steps;
mod storage;
mod tenancy;
mod verification_docs;

pub use aegis_webhook_tests::{on_both_backends, signature, support};
