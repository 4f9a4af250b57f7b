//! The reconciler: the database is the source of truth and the queue a fast
//! path, so pending deliveries whose task went missing (a crash between commit
//! and publish, a restart of the in-process queue, a lost message) are found here
//! and published again. Safe in many replicas: a duplicate task loses the claim.
//! A periodic pass waits while tasks wait in the queue: behind a backlog
//! longer than the grace, every waiting delivery would look lost.

use std::sync::Arc;
use std::time::Duration;

use aegis_webhook_core::queue::{self, AfterCommit, DeliveryTask, Queue, Stream, Writer};
use aegis_webhook_storage::deliveries;
use chrono::{DateTime, Utc};
use sea_orm::DatabaseConnection;
use tokio_util::sync::CancellationToken;

/// Deliveries handled per database round trip.
const BATCH: u64 = 500;
/// Publishes failing in a row that end a pass early.
const GIVE_UP_AFTER: usize = 8;

#[derive(Clone)]
pub struct Reconciler {
    db: DatabaseConnection,
    queue: Arc<dyn Queue>,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler").finish_non_exhaustive()
    }
}

impl Reconciler {
    pub fn new(db: DatabaseConnection, queue: Arc<dyn Queue>) -> Self {
        Reconciler { db, queue }
    }

    /// One periodic pass: re-publishes the pending deliveries unclaimed for
    /// `grace` past their due time, unless tasks wait in the queue (then
    /// `None`: see [`Reconciler::tasks_waiting`]).
    pub async fn pass(&self, grace: Duration, stop: &CancellationToken) -> anyhow::Result<Option<usize>> {
        if self.tasks_waiting().await {
            tracing::debug!("tasks wait in the queue; reconciliation waits for the next pass");
            return Ok(None);
        }
        let overdue = Utc::now() - chrono::Duration::from_std(grace).unwrap_or_default();
        Ok(Some(self.republish(Some(overdue), stop).await?))
    }

    /// Whether delivery tasks wait in any lane now. Then an unclaimed pending
    /// delivery past its grace is most likely one of them, behind a backlog
    /// longer than the grace, not lost; a pass would publish the whole
    /// backlog a second time (into the express lane), slowing everyone. Lost
    /// tasks are found by the first pass after the backlog drains. If the
    /// depths cannot be read, the pass runs.
    async fn tasks_waiting(&self) -> bool {
        match self.queue.lane_depths().await {
            Ok(depths) => depths
                .iter()
                .any(|(stream, _, depth)| *stream == Stream::Tasks && *depth > 0),
            Err(_) => false,
        }
    }

    /// Publishes a task for every unclaimed pending delivery due before
    /// `due_before` (every one, for `None`), each delayed until it is due.
    /// Returns how many it published. A publish that fails is counted like
    /// every writer's ([`queue::publish_after_commit`]) and the pass goes on
    /// (the delivery is still pending, so the next pass finds it again),
    /// unless [`GIVE_UP_AFTER`] fail in a row: the broker is down, and the next
    /// pass tries again. `stop` ends the pass between two publishes, so a
    /// shutdown does not wait for a long pass against a broker that is away.
    pub async fn republish(
        &self,
        due_before: Option<DateTime<Utc>>,
        stop: &CancellationToken,
    ) -> anyhow::Result<usize> {
        let now = Utc::now();
        let mut published = 0;
        let mut failed_in_a_row = 0;
        let mut cursor = None;
        loop {
            let batch = deliveries::pending_unclaimed(&self.db, due_before, now, BATCH, cursor).await?;
            for pending in &batch {
                if stop.is_cancelled() {
                    return Ok(published);
                }
                let delay = (pending.due_at - now).to_std().unwrap_or(Duration::ZERO);
                let task = DeliveryTask::new(pending.id, pending.webhook_id, pending.next_attempt);
                let publish = self.queue.publish_task(task, delay);
                match queue::publish_after_commit(Writer::Reconciler, "a pending delivery", publish).await {
                    AfterCommit::Published => {
                        published += 1;
                        failed_in_a_row = 0;
                    }
                    AfterCommit::LeftToReconciler => failed_in_a_row += 1,
                }
                if failed_in_a_row >= GIVE_UP_AFTER {
                    tracing::warn!(
                        published,
                        "the broker refuses publishes; the rest waits for the next pass"
                    );
                    return Ok(published);
                }
            }
            match batch.last() {
                Some(last) if batch.len() as u64 == BATCH => cursor = Some((last.due_at, last.id)),
                _ => break,
            }
        }
        Ok(published)
    }

    /// At start, every pending delivery is re-enqueued (the in-process queue kept
    /// nothing); after that, every `interval`, those overdue by more than `grace`.
    pub async fn run(
        self,
        recover_all_at_start: bool,
        interval: Duration,
        grace: Duration,
        shutdown: CancellationToken,
    ) {
        if recover_all_at_start {
            match self.republish(None, &shutdown).await {
                Ok(count) => tracing::info!(count, "pending deliveries re-enqueued at start"),
                Err(error) => tracing::error!(error = format!("{error:#}"), "start-up recovery failed"),
            }
        }
        let mut ticks = tokio::time::interval(interval);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = shutdown.cancelled() => return,
            }
            match self.pass(grace, &shutdown).await {
                Ok(None | Some(0)) => {}
                Ok(Some(count)) => tracing::warn!(count, "re-published deliveries whose task went missing"),
                Err(error) => tracing::error!(error = format!("{error:#}"), "reconciliation failed"),
            }
        }
    }
}
