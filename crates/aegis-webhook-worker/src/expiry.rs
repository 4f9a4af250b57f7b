//! Expiry: removes what has passed its retention, every `AEGIS_EXPIRY_INTERVAL`,
//! in each worker process (see [`Expiry::pass`] for replicas running theirs
//! at once).
//!
//! One pass, as named steps:
//! 1. make the partitions ahead of time (PostgreSQL);
//! 2. drop the partitions every tenant's retention has passed, unless a
//!    pending delivery holds one: then delete its final rows instead;
//! 3. for each tenant, delete its final deliveries past its retention that no
//!    partition drop will take (all of them on SQLite), then its events that
//!    no delivery refers to any more, then drop the bodies past its body
//!    retention.
//!
//! What is decided (cutoffs, the horizon, which partitions to make or drop) is
//! `core::retention`, pure; this module only runs it. Every step works in
//! batches of `AEGIS_EXPIRY_BATCH` rows and stops after [`MAX_BATCHES`] of
//! them, so one pass is bounded and the next goes on where it stopped;
//! between two batches it rests as long as the last one took, so its writes
//! are spread out among the deliveries' own.

use std::time::{Duration, Instant};

use aegis_webhook_core::config::Config;
use aegis_webhook_core::ids::TenantId;
use aegis_webhook_core::metrics;
use aegis_webhook_core::retention::{self, PartitionPlan, Retention};
use aegis_webhook_storage::partitions::{self, Expired};
use aegis_webhook_storage::retention as expire;
use chrono::{DateTime, Utc};
use sea_orm::{DatabaseConnection, DbBackend};
use tokio_util::sync::CancellationToken;

/// Batches one step of one pass runs at most, for one tenant or partition.
pub const MAX_BATCHES: u32 = 50;

/// Between two batches of a step with more to do: expiry keeps to its share
/// of the time ([`retention::EXPIRY_SHARE`]), so a backlog is worked off
/// spread out instead of in one long run of commits.
async fn rest_after(batch_took: Duration) {
    tokio::time::sleep(retention::rest_after_batch(batch_took, retention::EXPIRY_SHARE)).await;
}

/// What one pass removed and made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Removed {
    pub partitions_created: usize,
    pub partitions_dropped: usize,
    pub deliveries: u64,
    pub events: u64,
    pub bodies: u64,
}

#[derive(Clone)]
pub struct Expiry {
    db: DatabaseConnection,
    default: Retention,
    bounds: retention::Bounds,
    plan: PartitionPlan,
    batch: u64,
}

impl std::fmt::Debug for Expiry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Expiry")
            .field("default", &self.default)
            .field("plan", &self.plan)
            .finish_non_exhaustive()
    }
}

impl Expiry {
    pub fn new(config: &Config, db: DatabaseConnection) -> anyhow::Result<Expiry> {
        Ok(Expiry {
            db,
            default: config.retention_policy()?,
            bounds: config.retention_bounds()?,
            plan: config.partition_plan(),
            batch: u64::from(config.expiry_batch),
        })
    }

    fn partitioned(&self) -> bool {
        self.db.get_database_backend() == DbBackend::Postgres
    }

    /// One pass at `now`. Replicas may run theirs at the same time: partition
    /// changes take the migration lock, and a row delete that meets rows
    /// another replica is deleting waits, then finds them gone. No connection
    /// is held for the pass as a lease: with a small pool it would starve the
    /// worker's own statements (and the pass itself).
    pub async fn pass(&self, now: DateTime<Utc>) -> anyhow::Result<Removed> {
        self.remove(now).await
    }

    async fn remove(&self, now: DateTime<Utc>) -> anyhow::Result<Removed> {
        let mut removed = Removed {
            partitions_created: partitions::ensure(&self.db, self.plan, now).await?,
            ..Removed::default()
        };
        // Choices made under wider bounds hold only within today's.
        let tenants: Vec<_> = expire::tenants_and_overrides(&self.db)
            .await?
            .into_iter()
            .map(|(tenant_id, chosen)| (tenant_id, self.bounds.clamp(chosen)))
            .collect();
        let longest = retention::longest(self.default, tenants.iter().map(|(_, chosen)| *chosen));
        let horizon = retention::horizon(now, longest);
        if self.partitioned() {
            self.expire_partitions(horizon, &mut removed).await?;
        }
        let partitions = self.partitioned().then_some((horizon, self.plan.width()));
        for (tenant_id, chosen) in tenants {
            let own = retention::effective(self.default, chosen);
            let cutoffs = own.cutoffs(now);
            if let Some(before) = retention::row_cutoff(cutoffs.records_before, partitions) {
                removed.deliveries += self
                    .in_batches(|limit| expire::delete_final_deliveries(&self.db, tenant_id, before, limit))
                    .await?;
            }
            removed.events += self.delete_events(tenant_id, cutoffs.records_before).await?;
            if own.drops_bodies_early() {
                removed.bodies += self
                    .in_batches(|limit| expire::expunge_bodies(&self.db, tenant_id, cutoffs.bodies_before, now, limit))
                    .await?;
            }
        }
        Ok(removed)
    }

    /// The tenant's events before `before` that no delivery refers to, batch
    /// after batch, each going on from where the last one stopped.
    async fn delete_events(&self, tenant_id: TenantId, before: DateTime<Utc>) -> anyhow::Result<u64> {
        let (mut total, mut after) = (0, None);
        for _ in 0..MAX_BATCHES {
            let started = Instant::now();
            let (deleted, last) =
                expire::delete_unreferenced_events(&self.db, tenant_id, before, after, self.batch).await?;
            total += deleted;
            match last {
                Some(last) => after = Some(last),
                None => break,
            }
            rest_after(started.elapsed()).await;
        }
        Ok(total)
    }

    /// Drops the partitions before `horizon`; from one a pending delivery
    /// holds, deletes the final rows. The partition that took in the rows
    /// older than partitioning spans all of them, so it would wait for its
    /// newest row: its rows are deleted as they pass the horizon instead.
    async fn expire_partitions(&self, horizon: DateTime<Utc>, removed: &mut Removed) -> anyhow::Result<()> {
        let listed = partitions::list(&self.db).await?;
        if let Some(legacy) = listed.iter().find(|partition| partition.range.from.is_none())
            && !retention::partition_expired(legacy.range, horizon)
        {
            let until = legacy.range.to.min(horizon);
            removed.deliveries += self
                .in_batches(|limit| expire::delete_final_deliveries_between(&self.db, None, until, limit))
                .await?;
        }
        let expired = listed
            .into_iter()
            .filter(|partition| retention::partition_expired(partition.range, horizon));
        for partition in expired {
            match partitions::drop_expired(&self.db, partition).await? {
                Expired::Dropped(partition) => {
                    tracing::info!(partition = %partition.suffix, "dropped an expired partition of the deliveries");
                    removed.partitions_dropped += 1;
                }
                Expired::HeldByPending(partition) => {
                    let range = partition.range;
                    removed.deliveries += self
                        .in_batches(|limit| {
                            expire::delete_final_deliveries_between(&self.db, range.from, range.to, limit)
                        })
                        .await?;
                }
                Expired::Busy(partition) => {
                    tracing::debug!(partition = %partition.suffix, "an expired partition's locks were busy; the next pass drops it");
                }
            }
        }
        Ok(())
    }

    /// Runs `step` batch after batch until one removes less than a batch, or
    /// [`MAX_BATCHES`] ran; returns how many rows they removed.
    async fn in_batches<F, Fut>(&self, mut step: F) -> anyhow::Result<u64>
    where
        F: FnMut(u64) -> Fut,
        Fut: std::future::Future<Output = Result<u64, aegis_webhook_storage::StoreError>>,
    {
        let mut total = 0;
        for _ in 0..MAX_BATCHES {
            let started = Instant::now();
            let removed = step(self.batch).await?;
            total += removed;
            if removed < self.batch {
                break;
            }
            rest_after(started.elapsed()).await;
        }
        Ok(total)
    }

    /// A pass every `interval` until `stop`; the first one at start, so a
    /// process that was down a long time catches up at once.
    pub async fn run(self, interval: Duration, stop: CancellationToken) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                () = stop.cancelled() => return,
            }
            let started = Instant::now();
            // A stop does not wait for a pass (which may wait on a busy
            // database): what it had not done, the next start does.
            let passed = tokio::select! {
                passed = self.pass(Utc::now()) => passed,
                () = stop.cancelled() => return,
            };
            match passed {
                Ok(removed) => {
                    metrics::expiry_pass(started.elapsed());
                    metrics::expired("deliveries", removed.deliveries);
                    metrics::expired("events", removed.events);
                    metrics::expired("bodies", removed.bodies);
                    metrics::expired("partitions", removed.partitions_dropped as u64);
                    if removed != Removed::default() {
                        tracing::info!(?removed, took = ?started.elapsed(), "expiry pass");
                    }
                }
                Err(error) => tracing::error!(error = format!("{error:#}"), "expiry pass failed; the next one retries"),
            }
        }
    }
}
