//! Per-webhook admission: at most `per_webhook` attempts to one webhook are in
//! flight in this process, so a slow or hanging endpoint ties up only its own
//! slots. Tasks beyond that wait here, unacknowledged, in their webhook's line,
//! which holds at most as many as the webhook may have in flight, so one slow
//! webhook cannot fill the room every other webhook's line needs; when its
//! line is full, or the lines hold `waiting_limit` tasks in all, further ones
//! are handed back to the queue for later (see [`Admission::Full`]).

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use aegis_webhook_core::ids::WebhookId;
use aegis_webhook_core::queue::DeliveryTask;

use crate::receipt::Receipt;

/// A task taken from the queue, with its share of the message that carried it.
pub struct Taken {
    pub task: DeliveryTask,
    pub receipt: Receipt,
}

/// What [`Lanes::admit`] decided.
pub enum Admission {
    /// Send it now; call [`Lanes::finish`] when done.
    Run(Taken),
    /// It waits in its webhook's line; `finish` hands it out later.
    Waiting,
    /// Its webhook is busy and the lines are full: hand it back for later,
    /// [`hold_back_for`] this long an attempt of the webhook takes (its
    /// recent attempt time, or, before one has finished, how long its
    /// attempts have been running).
    Full(Taken, Duration),
}

/// The shortest hold-back: the broker's shortest delay tier.
pub const MIN_HOLD_BACK: Duration = Duration::from_millis(250);

/// How long a task handed back (its webhook's slots and line full) stays
/// away: about the time the tasks ahead of it take, a full line's worth, two
/// attempt times (`attempt`, the webhook's), at least [`MIN_HOLD_BACK`] and at
/// most `longest` (the request timeout, the longest a slot stays busy). So a
/// burst to one fast endpoint comes back in a moment, not after a request
/// timeout, and one to a hanging endpoint is not taken again and again.
pub fn hold_back_for(attempt: Duration, longest: Duration) -> Duration {
    (attempt * 2).clamp(MIN_HOLD_BACK.min(longest), longest)
}

struct Lane {
    in_flight: usize,
    waiting: VecDeque<Taken>,
    /// Recent attempt time (a moving average), once one has finished.
    recent: Option<Duration>,
    /// Since when the webhook has had attempts in flight.
    busy_since: Instant,
}

#[derive(Default)]
struct State {
    lanes: HashMap<WebhookId, Lane>,
    waiting: usize,
}

pub struct Lanes {
    per_webhook: usize,
    waiting_limit: usize,
    state: Mutex<State>,
}

impl Lanes {
    pub fn new(per_webhook: usize, waiting_limit: usize) -> Self {
        Lanes {
            per_webhook: per_webhook.max(1),
            waiting_limit,
            state: Mutex::default(),
        }
    }

    /// Admits a task at `now`; tasks without a webhook id (old `V1` tasks)
    /// always run.
    pub fn admit(&self, taken: Taken, now: Instant) -> Admission {
        let Some(webhook) = taken.task.webhook_id() else {
            return Admission::Run(taken);
        };
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let waiting = state.waiting;
        let lane = state.lanes.entry(webhook).or_insert_with(|| Lane {
            in_flight: 0,
            waiting: VecDeque::new(),
            recent: None,
            busy_since: now,
        });
        if lane.in_flight < self.per_webhook {
            lane.in_flight += 1;
            Admission::Run(taken)
        } else if lane.waiting.len() < self.per_webhook && waiting < self.waiting_limit {
            lane.waiting.push_back(taken);
            state.waiting += 1;
            Admission::Waiting
        } else {
            let attempt = lane
                .recent
                .unwrap_or_else(|| now.saturating_duration_since(lane.busy_since));
            Admission::Full(taken, attempt)
        }
    }

    /// Ends an attempt to `webhook` that `took` this long: returns the next
    /// task waiting for it, which takes over the slot, or frees the slot.
    pub fn finish(&self, webhook: Option<WebhookId>, took: Duration) -> Option<Taken> {
        let webhook = webhook?;
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let lane = state.lanes.get_mut(&webhook)?;
        // A moving average: one slow answer does not send the next burst
        // away for long, and a webhook turning slow is followed within a few.
        lane.recent = Some(match lane.recent {
            Some(recent) => (recent * 3 + took) / 4,
            None => took,
        });
        if let Some(next) = lane.waiting.pop_front() {
            state.waiting -= 1;
            return Some(next);
        }
        lane.in_flight = lane.in_flight.saturating_sub(1);
        if lane.in_flight == 0 {
            state.lanes.remove(&webhook);
        }
        None
    }

    /// Takes every waiting task, for handing back at shutdown.
    pub fn drain_waiting(&self) -> Vec<Taken> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.waiting = 0;
        state
            .lanes
            .values_mut()
            .flat_map(|lane| lane.waiting.drain(..))
            .collect()
    }

    /// Tasks waiting in all lines.
    pub fn waiting(&self) -> usize {
        self.state.lock().unwrap_or_else(PoisonError::into_inner).waiting
    }
}

#[cfg(test)]
mod tests {
    use aegis_webhook_core::ids::DeliveryId;

    use super::*;
    use aegis_webhook_core::queue::{Acknowledger, QueueError, QueueMessage};
    use async_trait::async_trait;

    struct NoAck;

    #[async_trait]
    impl Acknowledger for NoAck {
        async fn ack(self: Box<Self>) -> Result<(), QueueError> {
            Ok(())
        }
        async fn requeue(self: Box<Self>) -> Result<(), QueueError> {
            Ok(())
        }
    }

    fn taken(webhook: WebhookId) -> Taken {
        let task = DeliveryTask::new(DeliveryId::generate(), webhook, 1);
        Taken {
            task,
            receipt: Receipt::split(QueueMessage::new(task.encode(), Box::new(NoAck)), 1)
                .pop()
                .expect("one receipt"),
        }
    }

    const MS: Duration = Duration::from_millis(1);

    fn now() -> Instant {
        Instant::now()
    }

    fn is_run(admission: &Admission) -> bool {
        matches!(admission, Admission::Run(_))
    }

    #[test]
    fn a_busy_webhook_waits_without_blocking_others_and_overflow_is_handed_back() {
        let lanes = Lanes::new(3, 4);
        let (slow, other) = (WebhookId::generate(), WebhookId::generate());
        for _ in 0..3 {
            assert!(is_run(&lanes.admit(taken(slow), now())));
        }
        for _ in 0..3 {
            assert!(matches!(lanes.admit(taken(slow), now()), Admission::Waiting));
        }
        // Its line holds as many as it may run: the rest is handed back,
        // and the room left in the lines stays for other webhooks.
        assert!(matches!(lanes.admit(taken(slow), now()), Admission::Full(..)));
        for _ in 0..3 {
            assert!(is_run(&lanes.admit(taken(other), now())));
        }
        assert!(matches!(lanes.admit(taken(other), now()), Admission::Waiting));
        // Now the lines are full in all.
        assert!(matches!(lanes.admit(taken(other), now()), Admission::Full(..)));
        assert!(lanes.finish(Some(other), MS).is_some());
        for _ in 0..3 {
            assert!(lanes.finish(Some(other), MS).is_none());
        }
        assert!(lanes.finish(Some(slow), MS).is_some());
        assert_eq!(lanes.waiting(), 2);
        assert_eq!(lanes.drain_waiting().len(), 2);
        assert_eq!(lanes.waiting(), 0);
        for _ in 0..3 {
            assert!(lanes.finish(Some(slow), MS).is_none());
        }
        assert!(lanes.finish(None, MS).is_none());
    }

    #[test]
    fn a_finished_attempt_hands_its_slot_to_the_next_in_line() {
        let lanes = Lanes::new(2, 3);
        let slow = WebhookId::generate();
        assert!(is_run(&lanes.admit(taken(slow), now())));
        assert!(is_run(&lanes.admit(taken(slow), now())));
        for _ in 0..2 {
            assert!(matches!(lanes.admit(taken(slow), now()), Admission::Waiting));
        }
        assert_eq!(lanes.waiting(), 2);
        assert!(lanes.finish(Some(slow), MS).is_some());
        assert!(is_run(&lanes.admit(taken(WebhookId::generate()), now())));
        assert!(lanes.finish(Some(slow), MS).is_some());
        assert_eq!(lanes.waiting(), 0);
        assert!(lanes.finish(Some(slow), MS).is_none());
        assert!(lanes.finish(Some(slow), MS).is_none());
        // Both slots are free again.
        assert!(is_run(&lanes.admit(taken(slow), now())));
        assert!(is_run(&lanes.admit(taken(slow), now())));
        assert!(lanes.finish(None, MS).is_none());
    }

    #[test]
    fn a_handed_back_task_stays_away_about_two_attempt_times_of_its_webhook() {
        let timeout = Duration::from_secs(15);
        // A fast endpoint: the broker's shortest delay.
        assert_eq!(hold_back_for(MS, timeout), MIN_HOLD_BACK);
        assert_eq!(hold_back_for(Duration::from_secs(1), timeout), Duration::from_secs(2));
        // A slow one: never past the request timeout.
        assert_eq!(hold_back_for(Duration::from_secs(14), timeout), timeout);
        // A timeout shorter than the shortest hold-back wins.
        let short = Duration::from_millis(100);
        assert_eq!(hold_back_for(MS, short), short);
    }

    #[test]
    fn the_handed_back_task_carries_how_long_its_webhooks_attempts_take() {
        let lanes = Lanes::new(1, 1);
        let webhook = WebhookId::generate();
        let start = Instant::now();
        assert!(is_run(&lanes.admit(taken(webhook), start)));
        assert!(matches!(lanes.admit(taken(webhook), start), Admission::Waiting));
        // Nothing finished yet: as long as the webhook has been busy.
        let later = start + Duration::from_secs(3);
        let Admission::Full(_, attempt) = lanes.admit(taken(webhook), later) else {
            panic!("the line is full");
        };
        assert_eq!(attempt, Duration::from_secs(3));
        assert!(lanes.finish(Some(webhook), Duration::from_millis(400)).is_some());
        assert!(matches!(lanes.admit(taken(webhook), later), Admission::Waiting));
        let Admission::Full(_, attempt) = lanes.admit(taken(webhook), later) else {
            panic!("the line is full");
        };
        assert_eq!(attempt, Duration::from_millis(400));
        // One much slower attempt moves the average a quarter of the way.
        assert!(lanes.finish(Some(webhook), Duration::from_millis(2000)).is_some());
        assert!(matches!(lanes.admit(taken(webhook), later), Admission::Waiting));
        let Admission::Full(_, attempt) = lanes.admit(taken(webhook), later) else {
            panic!("the line is full");
        };
        assert_eq!(attempt, Duration::from_millis(800));
    }
}
