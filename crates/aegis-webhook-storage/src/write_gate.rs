//! SQLite's one write lock, taken in turn inside the process, express writers
//! first.
//!
//! SQLite lets one connection write at a time; a connection that finds the
//! file locked sleeps in SQLite's busy handler (1, 2, 5 … 100 ms) and tries
//! again, whoever else has come since. Under a flood the bulk lanes' batches
//! keep the lock busy, and an express batch (the fan-out or the claim of a
//! tenant within its share) waited up to hundreds of milliseconds that way.
//! So the process's writers of the hot paths queue here instead, before they
//! touch the database: an express writer waits only for the transaction in
//! progress, not for bulk writers queued before it; writers of the same
//! precedence go first come, first served. A bulk writer steps back for
//! express writers for at most [`MOST_STEPPED_BACK`], then takes its turn in
//! arrival order, so a stream of express writes slows the bulk lanes but
//! never stops them. PostgreSQL has no such lock (rows lock, not the
//! database), so there is no gate and a turn is free.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Weak};

use sea_orm::{DatabaseConnection, DbBackend};
use tokio::sync::{Mutex, MutexGuard, Notify};
use tokio::time::{Duration, Instant};

/// How long a `Behind` writer lets `First` writers that come after it go
/// first: a bulk batch's transaction takes milliseconds, so express writers
/// arriving faster than that for this long are a stream, not a burst.
pub const MOST_STEPPED_BACK: Duration = Duration::from_millis(100);

/// Which writers a turn goes before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precedence {
    /// Work of the express lanes: goes before every waiting `Behind` writer.
    First,
    /// Work of the bulk lanes and due retries: waits while a `First` writer
    /// does, for at most [`MOST_STEPPED_BACK`].
    Behind,
}

/// Turns at the write lock of one SQLite file, of one precedence.
#[derive(Clone, Debug)]
pub struct WriteTurns {
    gate: Option<Arc<WriteGate>>,
    precedence: Precedence,
}

impl WriteTurns {
    /// Turns at `db`'s write lock (shared by every pool this process opened on
    /// the same file); on PostgreSQL every turn is free.
    pub fn of(db: &DatabaseConnection, precedence: Precedence) -> Self {
        let gate = (db.get_database_backend() == DbBackend::Sqlite).then(|| {
            let file = db
                .get_sqlite_connection_pool()
                .connect_options()
                .get_filename()
                .to_owned();
            // One gate for one file however its path was spelled.
            gate_of(std::fs::canonicalize(&file).unwrap_or(file))
        });
        WriteTurns { gate, precedence }
    }

    /// Waits for this writer's turn; the turn lasts until the answer is dropped.
    pub async fn take(&self) -> Option<MutexGuard<'_, ()>> {
        match &self.gate {
            Some(gate) => Some(gate.enter(self.precedence).await),
            None => None,
        }
    }
}

/// The gates of the SQLite files open in this process, by file.
static GATES: LazyLock<std::sync::Mutex<HashMap<PathBuf, Weak<WriteGate>>>> = LazyLock::new(Default::default);

fn gate_of(file: PathBuf) -> Arc<WriteGate> {
    let mut gates = GATES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    gates.retain(|_, gate| gate.strong_count() > 0);
    if let Some(gate) = gates.get(&file).and_then(Weak::upgrade) {
        return gate;
    }
    let gate = Arc::new(WriteGate::default());
    gates.insert(file, Arc::downgrade(&gate));
    gate
}

/// A lock whose `First` waiters go before its `Behind` waiters: tokio's fair
/// mutex, which a `Behind` writer enters only while no `First` writer waits,
/// and hands straight back if one came while it queued.
#[derive(Debug, Default)]
pub struct WriteGate {
    lock: Mutex<()>,
    /// `First` writers waiting for the lock.
    first_waiting: AtomicUsize,
    /// Told when `first_waiting` falls to zero.
    no_first_waiting: Notify,
}

impl WriteGate {
    pub async fn enter(&self, precedence: Precedence) -> MutexGuard<'_, ()> {
        match precedence {
            Precedence::First => {
                let _waiting = FirstWaiting::count(self);
                self.lock.lock().await
            }
            Precedence::Behind => {
                let deadline = Instant::now() + MOST_STEPPED_BACK;
                loop {
                    let stepped_back_enough = tokio::time::timeout_at(deadline, self.until_no_first_waits())
                        .await
                        .is_err();
                    let turn = self.lock.lock().await;
                    if stepped_back_enough || self.first_waiting.load(Ordering::SeqCst) == 0 {
                        return turn;
                    }
                    // A `First` writer queued meanwhile: the lock passes to
                    // the writer queued longest, so dropping it now lets that
                    // one (or a `Behind` writer before it, which steps back in
                    // turn) go.
                    drop(turn);
                }
            }
        }
    }

    async fn until_no_first_waits(&self) {
        loop {
            let told = self.no_first_waiting.notified();
            tokio::pin!(told);
            // Registered before the count is read, so a fall to zero between
            // the read and the wait is not missed.
            told.as_mut().enable();
            if self.first_waiting.load(Ordering::SeqCst) == 0 {
                return;
            }
            told.await;
        }
    }
}

/// Counts a `First` writer as waiting until it has the lock or gave up.
struct FirstWaiting<'a>(&'a WriteGate);

impl<'a> FirstWaiting<'a> {
    fn count(gate: &'a WriteGate) -> Self {
        gate.first_waiting.fetch_add(1, Ordering::SeqCst);
        FirstWaiting(gate)
    }
}

impl Drop for FirstWaiting<'_> {
    fn drop(&mut self) {
        if self.0.first_waiting.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.no_first_waiting.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use super::*;

    /// Spawns a writer that records `name` once it has its turn, then holds
    /// the turn until `release` is told; returns once it has queued.
    async fn writer(
        gate: &Arc<WriteGate>,
        precedence: Precedence,
        name: &'static str,
        order: &Order,
        release: &Arc<Notify>,
    ) -> tokio::task::JoinHandle<()> {
        let (gate, order, release) = (gate.clone(), order.clone(), release.clone());
        let task = tokio::spawn(async move {
            let _turn = gate.enter(precedence).await;
            order.lock().unwrap().push(name);
            release.notified().await;
        });
        settle().await;
        task
    }

    type Order = Arc<StdMutex<Vec<&'static str>>>;

    /// A gate, the order in which writers got their turns, and what ends a turn.
    fn fixture() -> (Arc<WriteGate>, Order, Arc<Notify>) {
        (Arc::default(), Arc::default(), Arc::new(Notify::new()))
    }

    async fn settle() {
        for _ in 0..20 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn an_express_writer_goes_before_bulk_writers_that_queued_first() {
        let (gate, order, release) = fixture();
        let holder = writer(&gate, Precedence::Behind, "bulk holding", &order, &release).await;
        let bulk = writer(&gate, Precedence::Behind, "bulk queued", &order, &release).await;
        let express = writer(&gate, Precedence::First, "express", &order, &release).await;
        assert_eq!(*order.lock().unwrap(), ["bulk holding"]);

        for expected in [
            vec!["bulk holding", "express"],
            vec!["bulk holding", "express", "bulk queued"],
        ] {
            release.notify_one();
            settle().await;
            assert_eq!(*order.lock().unwrap(), expected);
        }
        release.notify_one();
        for task in [holder, express, bulk] {
            task.await.unwrap();
        }
    }

    #[tokio::test]
    async fn writers_of_one_precedence_take_turns_in_order() {
        let (gate, order, release) = fixture();
        let mut tasks = Vec::new();
        for name in ["first", "second", "third"] {
            tasks.push(writer(&gate, Precedence::First, name, &order, &release).await);
        }
        for _ in 0..3 {
            release.notify_one();
            settle().await;
        }
        assert_eq!(*order.lock().unwrap(), ["first", "second", "third"]);
        for task in tasks {
            task.await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_bulk_writer_steps_back_for_express_writers_for_a_bounded_time() {
        let (gate, order, release) = fixture();
        let holder = writer(&gate, Precedence::First, "express holding", &order, &release).await;
        let express = writer(&gate, Precedence::First, "express queued", &order, &release).await;
        let bulk = writer(&gate, Precedence::Behind, "bulk", &order, &release).await;
        // Once the bulk writer has stepped back long enough it queues in
        // arrival order, before the express writers still to come.
        tokio::time::sleep(MOST_STEPPED_BACK).await;
        settle().await;
        let late = writer(&gate, Precedence::First, "express late", &order, &release).await;
        for _ in 0..4 {
            release.notify_one();
            settle().await;
        }
        assert_eq!(
            *order.lock().unwrap(),
            ["express holding", "express queued", "bulk", "express late"]
        );
        for task in [holder, express, bulk, late] {
            task.await.unwrap();
        }
    }

    #[tokio::test]
    async fn an_express_writer_that_gives_up_waiting_holds_no_bulk_writer_back() {
        let (gate, order, release) = fixture();
        let holder = writer(&gate, Precedence::Behind, "bulk holding", &order, &release).await;
        let express = writer(&gate, Precedence::First, "express", &order, &release).await;
        let bulk = writer(&gate, Precedence::Behind, "bulk queued", &order, &release).await;
        express.abort();
        assert!(express.await.unwrap_err().is_cancelled());
        release.notify_one();
        settle().await;
        assert_eq!(*order.lock().unwrap(), ["bulk holding", "bulk queued"]);
        release.notify_one();
        holder.await.unwrap();
        bulk.await.unwrap();
    }
}
