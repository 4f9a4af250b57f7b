//! The Rust snippets of `docs/verifying-webhooks.md`, compiled as part of the
//! tests crate. Each file here is byte for byte the fenced block of the same
//! title in the docs (the `verification_docs` e2e test compares them), so the
//! code customers copy is the code the tests run against real deliveries.

pub mod verify_aegis_signature;
pub mod verify_with_aegis_webhook_verify;
