//! End-to-end tests of Aegis Webhooks: the real system over HTTP, real receivers
//! on loopback, and both databases (SQLite, and the machine's PostgreSQL).

mod bad_input;
mod pipeline;
mod rabbitmq;
mod signature;
mod storage;
mod support;

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
