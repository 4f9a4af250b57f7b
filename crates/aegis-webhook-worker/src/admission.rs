//! Per-webhook admission: at most `per_webhook` attempts to one webhook are in
//! flight in this process, so a slow or hanging endpoint ties up only its own
//! slots. Tasks beyond that wait here, unacknowledged, in their webhook's line,
//! which holds at most as many as the webhook may have in flight, so one slow
//! webhook cannot fill the room every other webhook's line needs; when its
//! line is full, or the lines hold `waiting_limit` tasks in all, further ones
//! are handed back to the queue for later (see [`Admission::Full`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

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
    /// Its webhook is busy and the lines are full: hand it back for later.
    Full(Taken),
}

#[derive(Default)]
struct Lane {
    in_flight: usize,
    waiting: VecDeque<Taken>,
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

    /// Admits a task; tasks without a webhook id (old `V1` tasks) always run.
    pub fn admit(&self, taken: Taken) -> Admission {
        let Some(webhook) = taken.task.webhook_id() else {
            return Admission::Run(taken);
        };
        let mut state = self.state.lock().expect("not poisoned");
        let waiting = state.waiting;
        let lane = state.lanes.entry(webhook).or_default();
        if lane.in_flight < self.per_webhook {
            lane.in_flight += 1;
            Admission::Run(taken)
        } else if lane.waiting.len() < self.per_webhook && waiting < self.waiting_limit {
            lane.waiting.push_back(taken);
            state.waiting += 1;
            Admission::Waiting
        } else {
            Admission::Full(taken)
        }
    }

    /// Ends an attempt to `webhook`: returns the next task waiting for it, which
    /// takes over the slot, or frees the slot.
    pub fn finish(&self, webhook: Option<WebhookId>) -> Option<Taken> {
        let webhook = webhook?;
        let mut state = self.state.lock().expect("not poisoned");
        let lane = state.lanes.get_mut(&webhook)?;
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
        let mut state = self.state.lock().expect("not poisoned");
        state.waiting = 0;
        state
            .lanes
            .values_mut()
            .flat_map(|lane| lane.waiting.drain(..))
            .collect()
    }

    /// Tasks waiting in all lines.
    pub fn waiting(&self) -> usize {
        self.state.lock().expect("not poisoned").waiting
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

    fn is_run(admission: &Admission) -> bool {
        matches!(admission, Admission::Run(_))
    }

    #[test]
    fn a_busy_webhook_waits_without_blocking_others_and_overflow_is_handed_back() {
        let lanes = Lanes::new(3, 4);
        let (slow, other) = (WebhookId::generate(), WebhookId::generate());
        for _ in 0..3 {
            assert!(is_run(&lanes.admit(taken(slow))));
        }
        for _ in 0..3 {
            assert!(matches!(lanes.admit(taken(slow)), Admission::Waiting));
        }
        // Its line holds as many as it may run: the rest is handed back,
        // and the room left in the lines stays for other webhooks.
        assert!(matches!(lanes.admit(taken(slow)), Admission::Full(_)));
        for _ in 0..3 {
            assert!(is_run(&lanes.admit(taken(other))));
        }
        assert!(matches!(lanes.admit(taken(other)), Admission::Waiting));
        // Now the lines are full in all.
        assert!(matches!(lanes.admit(taken(other)), Admission::Full(_)));
        assert!(lanes.finish(Some(other)).is_some());
        for _ in 0..3 {
            assert!(lanes.finish(Some(other)).is_none());
        }
        assert!(lanes.finish(Some(slow)).is_some());
        assert_eq!(lanes.waiting(), 2);
        assert_eq!(lanes.drain_waiting().len(), 2);
        assert_eq!(lanes.waiting(), 0);
        for _ in 0..3 {
            assert!(lanes.finish(Some(slow)).is_none());
        }
        assert!(lanes.finish(None).is_none());
    }

    #[test]
    fn a_finished_attempt_hands_its_slot_to_the_next_in_line() {
        let lanes = Lanes::new(2, 3);
        let slow = WebhookId::generate();
        assert!(is_run(&lanes.admit(taken(slow))));
        assert!(is_run(&lanes.admit(taken(slow))));
        for _ in 0..2 {
            assert!(matches!(lanes.admit(taken(slow)), Admission::Waiting));
        }
        assert_eq!(lanes.waiting(), 2);
        assert!(lanes.finish(Some(slow)).is_some());
        assert!(is_run(&lanes.admit(taken(WebhookId::generate()))));
        assert!(lanes.finish(Some(slow)).is_some());
        assert_eq!(lanes.waiting(), 0);
        assert!(lanes.finish(Some(slow)).is_none());
        assert!(lanes.finish(Some(slow)).is_none());
        // Both slots are free again.
        assert!(is_run(&lanes.admit(taken(slow))));
        assert!(is_run(&lanes.admit(taken(slow))));
        assert!(lanes.finish(None).is_none());
    }
}
