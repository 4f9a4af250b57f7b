//! The bulk lanes' own runtime: threads of a lower priority, so a flood
//! takes mostly the CPU nobody else in the process wants.
//!
//! On a busy machine, every step of an express event (its fan-out, the
//! worker taking its task, the claim, the POST) waits for its turn: behind
//! the ready tasks of the process's runtime, and for a core. Fair lanes
//! alone do not change that, since the bulk lanes' work is what fills the
//! run queues. So each process runs its bulk lanes' work on a tokio runtime
//! of its own whose threads have a lower priority (nice [`BULK_NICE`] on
//! Linux, relative to the process): where they compete for a core they get
//! about a tenth of its time, so an express step that wakes up mostly runs
//! first, and a tenant alone still gets the whole machine (nice only
//! matters when threads compete). It weighs threads against others of the
//! same CPU group (in Kubernetes, the pod's), not other containers.
//!
//! What the bulk work does I/O with is opened on this runtime too (its
//! PostgreSQL pool, its HTTP client's connections): tokio drives a socket's
//! readiness from the runtime that opened it, so a socket shared between
//! the runtimes would make express steps wait for the bulk runtime's
//! threads, or the other way round.

use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::Context as _;
use tokio::runtime::{Handle, Runtime};

/// How much lower than the process the bulk runtime's threads run: 10 nice
/// levels weigh about a tenth where both want the same core (Linux's
/// scheduler; capped at the lowest priority, 19).
pub const BULK_NICE: i32 = 10;

/// The runtime; shut down (without waiting for its tasks) when dropped, after
/// the roles that use it have stopped.
pub struct BulkRuntime {
    runtime: Option<Runtime>,
}

impl std::fmt::Debug for BulkRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BulkRuntime").finish_non_exhaustive()
    }
}

impl BulkRuntime {
    /// Starts `threads` worker threads (at least one), each lowering its own
    /// priority as it starts to [`BULK_NICE`] below the calling thread's
    /// (so a process run under `nice` keeps its bulk threads below itself).
    /// Where the OS refuses (or is not Linux) the threads run at the
    /// priority they started with, and a warning says so once.
    pub fn start(threads: usize) -> anyhow::Result<Self> {
        static NUMBER: AtomicUsize = AtomicUsize::new(0);
        let nice = bulk_nice();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name_fn(|| format!("aegis-bulk-{}", NUMBER.fetch_add(1, Ordering::Relaxed)))
            .on_thread_start(move || set_this_threads_nice(nice))
            .enable_all()
            .build()
            .context("failed to start the bulk lanes' runtime")?;
        Ok(BulkRuntime { runtime: Some(runtime) })
    }

    pub fn handle(&self) -> &Handle {
        self.runtime.as_ref().expect("present until dropped").handle()
    }
}

impl Drop for BulkRuntime {
    fn drop(&mut self) {
        // Dropping a runtime blocks on its tasks, which an async context
        // must not do: whatever is left of them is cancelled.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// The nice value of the bulk runtime's threads: [`BULK_NICE`] below the
/// calling thread's, at most the lowest priority (19).
#[cfg(target_os = "linux")]
fn bulk_nice() -> i32 {
    this_threads_nice().map_or(BULK_NICE, |nice| (nice + BULK_NICE).min(19))
}

/// Sets the calling thread's nice value (on Linux a nice value is a
/// thread's own). Every thread of the runtime sets the same value, whatever
/// it inherited from the thread that spawned it.
#[cfg(target_os = "linux")]
fn set_this_threads_nice(nice: i32) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    if let Err(error) = rustix::process::setpriority_process(Some(rustix::thread::gettid()), nice) {
        WARNED.call_once(|| {
            tracing::warn!(%error, "cannot lower the bulk runtime's priority; bulk work competes with express work");
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn bulk_nice() -> i32 {
    BULK_NICE
}

#[cfg(not(target_os = "linux"))]
fn set_this_threads_nice(_nice: i32) {}

/// This thread's nice value (Linux), for tests.
#[cfg(target_os = "linux")]
pub fn this_threads_nice() -> std::io::Result<i32> {
    rustix::process::getpriority_process(Some(rustix::thread::gettid())).map_err(std::io::Error::from)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn the_bulk_runtimes_threads_run_at_a_lower_priority_and_others_do_not() {
        let before = this_threads_nice().expect("nice");
        let bulk = BulkRuntime::start(2).expect("runtime");
        let inside = bulk
            .handle()
            .block_on(async { tokio::spawn(async { this_threads_nice() }).await })
            .expect("joined")
            .expect("nice");
        assert_eq!(inside, (before + BULK_NICE).min(19));
        assert_eq!(this_threads_nice().expect("nice"), before);
    }
}
