//! The worker's database round trips, shared by its in-flight attempts: one
//! statement claims the deliveries of many tasks and reads them back with
//! their events and webhooks, and one transaction records many attempts (see
//! [`aegis_webhook_core::batch`]). Per attempt that is two round trips shared
//! with its neighbours instead of seven of its own.
//!
//! Attempts of the express lane have batchers of their own, as the
//! ingester's express fan-outs do: an express attempt does not queue for,
//! nor share a statement with, the batches of the bulk attempts a flood
//! keeps in flight. Given a bulk stage, the bulk lane's attempts have
//! batchers of their own on its runtime with its pool (see
//! `aegis_webhook_core::bulk_runtime`); without one they share the due
//! retries' batchers.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use aegis_webhook_core::batch::Batcher;
use aegis_webhook_core::ids::{DeliveryId, EventId, WebhookId};
use aegis_webhook_core::queue::Lane;
use aegis_webhook_core::retry::AutoDisable;
use aegis_webhook_core::secret::SecretCipher;
use aegis_webhook_storage::BulkStage;
use aegis_webhook_storage::deliveries::{self, ClaimRequest, Delivery, Recorded};
use aegis_webhook_storage::events::StoredEvent;
use aegis_webhook_storage::webhooks::{self, HealthChange, Webhook};
use aegis_webhook_storage::write_gate::{Precedence, WriteTurns};
use anyhow::Context as _;
use chrono::Utc;
use sea_orm::{DatabaseConnection, TransactionTrait as _};

/// The most requests one statement or transaction serves.
const MAX_BATCH: usize = 256;
/// Batches of one kind in flight at once: one waits on the database while the
/// next fills.
const PARALLEL_BATCHES: usize = 2;

/// A claimed delivery with what its attempt is built from.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub delivery: Delivery,
    pub webhook: Target,
    pub event: Arc<StoredEvent>,
}

/// The webhook of a claimed delivery, as read.
#[derive(Debug, Clone)]
pub enum Target {
    Found(Arc<Webhook>),
    Deleted,
    /// Its row cannot be read back; why.
    Unreadable(String),
    /// Its secret was sealed with another `AEGIS_SECRET_KEY` than this
    /// worker's; why.
    KeyMissing(String),
}

/// What a finished attempt does to its webhook's health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// A retry is scheduled: the delivery has not failed yet.
    Unchanged,
    /// Delivered. `had_streak`: the webhook had failures recorded when the
    /// attempt was claimed, so the success must end the streak; otherwise
    /// there is nothing to write.
    Succeeded { had_streak: bool },
    /// The delivery failed for good.
    Failed,
    /// The receiver answered 410 Gone: disable the webhook, saying this.
    Gone { reason: String },
}

/// An attempt to record, the claim it was made under, and what follows
/// from it.
#[derive(Debug, Clone)]
pub struct Recording {
    pub recorded: Recorded,
    pub webhook_id: WebhookId,
    pub health: Health,
}

/// Why recording an attempt disabled its webhook: the metric's label.
pub type DisabledBecause = Option<&'static str>;

/// What recording an attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The delivery moved on as the attempt said, and the webhook's health
    /// with it.
    Moved(DisabledBecause),
    /// The claim had run out and another worker took the attempt over: it
    /// is logged, and nothing else follows from it (see
    /// [`deliveries::record_attempt`]).
    TakenOver,
}

/// The claim and record batchers of one class of attempts.
#[derive(Clone, Debug)]
struct Batchers {
    claims: Batcher<ClaimRequest, Option<Claimed>>,
    records: Batcher<Recording, Applied>,
}

impl Batchers {
    fn spawn(
        names: (&'static str, &'static str),
        db: DatabaseConnection,
        precedence: Precedence,
        cipher: SecretCipher,
        lease: Duration,
        auto_disable: AutoDisable,
    ) -> Self {
        let turns = WriteTurns::of(&db, precedence);
        let claims = {
            let (db, turns) = (db.clone(), turns.clone());
            Batcher::spawn(names.0, MAX_BATCH, PARALLEL_BATCHES, move |wanted| {
                let (db, cipher, turns) = (db.clone(), cipher.clone(), turns.clone());
                async move {
                    let _turn = turns.take().await;
                    claim_batch(&db, &cipher, lease, wanted).await
                }
            })
        };
        let records = Batcher::spawn(names.1, MAX_BATCH, PARALLEL_BATCHES, move |recordings| {
            let (db, turns) = (db.clone(), turns.clone());
            async move {
                let _turn = turns.take().await;
                record_batch(&db, &auto_disable, recordings).await
            }
        });
        Batchers { claims, records }
    }
}

#[derive(Clone, Debug)]
pub struct Store {
    /// For attempts taken from the express lane.
    express: Batchers,
    /// For the due retries'.
    due: Batchers,
    /// For the bulk lane's: on the bulk stage, or the due retries'.
    bulk: Batchers,
}

impl Store {
    /// Starts the batchers on the current runtime with `db`, and the bulk
    /// lane's on `bulk`'s runtime with its pool if given. `lease` is how
    /// long a claim lasts.
    pub fn spawn(
        db: DatabaseConnection,
        bulk: Option<&BulkStage>,
        cipher: SecretCipher,
        lease: Duration,
        auto_disable: AutoDisable,
    ) -> Self {
        let batchers =
            |names, db, precedence| Batchers::spawn(names, db, precedence, cipher.clone(), lease, auto_disable);
        let due = batchers(("claim", "record"), db.clone(), Precedence::Behind);
        Store {
            express: batchers(("express claim", "express record"), db, Precedence::First),
            bulk: match bulk {
                Some(bulk) => {
                    let _on_bulk_runtime = bulk.runtime.enter();
                    batchers(("bulk claim", "bulk record"), bulk.db.clone(), Precedence::Behind)
                }
                None => due.clone(),
            },
            due,
        }
    }

    fn batchers(&self, lane: Lane) -> &Batchers {
        match lane {
            Lane::Express => &self.express,
            Lane::Due => &self.due,
            Lane::Bulk => &self.bulk,
        }
    }

    /// Claims attempt `attempt` of the delivery (see [`deliveries::claim_leases`]) and
    /// loads what the attempt needs; `None` when it cannot be claimed. `lane`
    /// is the lane its task was taken from.
    pub async fn claim(&self, delivery_id: DeliveryId, attempt: u32, lane: Lane) -> anyhow::Result<Option<Claimed>> {
        self.batchers(lane)
            .claims
            .call(ClaimRequest { delivery_id, attempt })
            .await
    }

    /// Records the attempt and, while its claim is the delivery's, moves
    /// the delivery on, releases the claim and applies the webhook's
    /// health; all committed before it returns.
    pub async fn record(&self, recording: Recording, lane: Lane) -> anyhow::Result<Applied> {
        self.batchers(lane).records.call(recording).await
    }
}

async fn claim_batch(
    db: &DatabaseConnection,
    cipher: &SecretCipher,
    lease: Duration,
    wanted: Vec<ClaimRequest>,
) -> anyhow::Result<Vec<Option<Claimed>>> {
    let deliveries::Leases {
        deliveries: claimed,
        events,
        webhooks,
    } = deliveries::claim_leases(db, cipher, &wanted, lease, Utc::now()).await?;
    let webhooks: HashMap<WebhookId, Target> = webhooks
        .into_iter()
        .map(|read| match read {
            Ok(webhook) => (webhook.id, Target::Found(Arc::new(webhook))),
            Err(unreadable) if unreadable.sealed_with_another_key => {
                (unreadable.id, Target::KeyMissing(unreadable.reason))
            }
            Err(unreadable) => (unreadable.id, Target::Unreadable(unreadable.reason)),
        })
        .collect();
    let events: HashMap<EventId, Arc<StoredEvent>> =
        events.into_iter().map(|event| (event.id, Arc::new(event))).collect();
    let mut claimed: HashMap<DeliveryId, Delivery> =
        claimed.into_iter().map(|delivery| (delivery.id, delivery)).collect();
    wanted
        .into_iter()
        .map(|request| {
            // Two tasks for one attempt in the same batch: the first gets it.
            let delivery = match claimed.get(&request.delivery_id) {
                Some(delivery) if delivery.attempts + 1 == request.attempt => claimed.remove(&request.delivery_id),
                _ => None,
            };
            let Some(delivery) = delivery else {
                return Ok(None);
            };
            let event = events
                .get(&delivery.event_id)
                .cloned()
                .context("the event of a claimed delivery vanished")?;
            let webhook = webhooks.get(&delivery.webhook_id).cloned().unwrap_or(Target::Deleted);
            Ok(Some(Claimed {
                delivery,
                webhook,
                event,
            }))
        })
        .collect()
}

async fn record_batch(
    db: &DatabaseConnection,
    auto_disable: &AutoDisable,
    recordings: Vec<Recording>,
) -> anyhow::Result<Vec<Applied>> {
    let now = Utc::now();
    let transaction = db.begin().await.context("failed to begin recording attempts")?;
    // Moved apart, not copied: an attempt carries its receiver's answer.
    let (recorded, effects): (Vec<Recorded>, Vec<(WebhookId, Health)>) = recordings
        .into_iter()
        .map(|recording| (recording.recorded, (recording.webhook_id, recording.health)))
        .unzip();
    webhooks::lock_for_health_changes(&transaction, &health_may_change(&effects)).await?;
    let moved = deliveries::record_attempts(&transaction, &recorded).await?;
    let mut applied: Vec<Applied> = moved
        .iter()
        .map(|&moved| {
            if moved {
                Applied::Moved(None)
            } else {
                Applied::TakenOver
            }
        })
        .collect();
    for (webhook_id, (change, gone, last)) in health_changes(&effects, &moved) {
        // A 410 disables at once, whatever the streak.
        let policy = if gone.is_some() {
            &AutoDisable::NEVER
        } else {
            auto_disable
        };
        let failing = webhooks::record_health_change(&transaction, webhook_id, change, policy, now).await?;
        if let Some(reason) = gone {
            webhooks::disable_webhook(&transaction, webhook_id, reason, now).await?;
            applied[last] = Applied::Moved(Some("gone"));
        } else if failing.is_some() {
            applied[last] = Applied::Moved(Some("failing"));
        }
    }
    transaction.commit().await.context("failed to commit attempts")?;
    Ok(applied)
}

/// The webhooks whose health the recordings' `effects` (each attempt's
/// webhook and what it does to its health) may change, before it is known
/// which of them still hold their claims: the record locks them first.
fn health_may_change(effects: &[(WebhookId, Health)]) -> Vec<WebhookId> {
    effects
        .iter()
        .filter(|(_, health)| !matches!(health, Health::Unchanged | Health::Succeeded { had_streak: false }))
        .map(|(webhook_id, _)| *webhook_id)
        .collect()
}

/// Each webhook's health change over the recordings' `effects` whose
/// attempts `moved` their deliveries, in order, with a 410's reason and the
/// index of its last such recording (which reports a disabling). Attempts
/// taken over change nothing: the worker that took them over counts them.
fn health_changes<'a>(
    effects: &'a [(WebhookId, Health)],
    moved: &[bool],
) -> BTreeMap<WebhookId, (HealthChange, Option<&'a str>, usize)> {
    let mut health: BTreeMap<WebhookId, (HealthChange, Option<&str>, usize)> = BTreeMap::new();
    for (index, (webhook_id, effect)) in effects.iter().enumerate() {
        if !moved[index] {
            continue;
        }
        let (change, gone, last) = health.entry(*webhook_id).or_default();
        *last = index;
        match effect {
            Health::Unchanged => {}
            // Failures earlier in this batch are not written yet: a success
            // simply drops them, and resets the database's streak if it had one.
            Health::Succeeded { had_streak } => {
                *change = HealthChange {
                    reset: change.reset || *had_streak,
                    failures: 0,
                };
            }
            Health::Failed => change.failures += 1,
            Health::Gone { reason } => {
                change.failures += 1;
                *gone = Some(reason);
            }
        }
    }
    health
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_attempts_that_moved_their_delivery_change_health() {
        let (a, b) = (WebhookId::generate(), WebhookId::generate());
        let effects = [
            (a, Health::Failed),
            (a, Health::Succeeded { had_streak: false }),
            (
                b,
                Health::Gone {
                    reason: "gone".to_owned(),
                },
            ),
            (b, Health::Failed),
        ];
        // All moved: a's success drops the failure before it; b counts two
        // failures, one a 410, reported on b's last recording.
        let all = health_changes(&effects, &[true; 4]);
        assert_eq!(all[&a], (HealthChange::default(), None, 1));
        assert_eq!(
            all[&b],
            (
                HealthChange {
                    reset: false,
                    failures: 2
                },
                Some("gone"),
                3
            )
        );
        // The success taken over: a's failure stands. The 410 taken over:
        // b counts one failure and is not disabled.
        let some = health_changes(&effects, &[true, false, false, true]);
        assert_eq!(
            some[&a],
            (
                HealthChange {
                    reset: false,
                    failures: 1
                },
                None,
                0
            )
        );
        assert_eq!(
            some[&b],
            (
                HealthChange {
                    reset: false,
                    failures: 1
                },
                None,
                3
            )
        );
        // Nothing moved: nothing changes.
        assert!(health_changes(&effects, &[false; 4]).is_empty());
    }

    #[test]
    fn the_webhooks_locked_first_are_those_whose_health_may_change() {
        let (quiet, streak, failing, gone) = (
            WebhookId::generate(),
            WebhookId::generate(),
            WebhookId::generate(),
            WebhookId::generate(),
        );
        let effects = [
            (quiet, Health::Unchanged),
            (quiet, Health::Succeeded { had_streak: false }),
            (streak, Health::Succeeded { had_streak: true }),
            (failing, Health::Failed),
            (
                gone,
                Health::Gone {
                    reason: "gone".to_owned(),
                },
            ),
        ];
        assert_eq!(health_may_change(&effects), [streak, failing, gone]);
    }
}
