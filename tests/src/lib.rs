//! Support shared by the test binaries: a running system per test on its own
//! database, capturing receivers on loopback, signature checks as receivers make
//! them, the verification docs' Rust snippets, child processes for the fault
//! tests, and a queue whose publishes fail on demand.

pub mod browser;
pub mod doc_snippets;
pub mod flaky;
pub mod hostile;
pub mod processes;
pub mod signature;
pub mod support;

/// Runs an `async fn(Backend)` test once per database backend.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),+ $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                super::$name($crate::support::Backend::Sqlite).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                super::$name($crate::support::Backend::Postgres).await
            }
        }
    )+};
}
