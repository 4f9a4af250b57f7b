//! Acknowledgements of one channel, many to a frame where that is safe.
//!
//! Every `basic.ack` to a quorum queue is a command in its Raft log, written
//! to the broker's WAL beside the publishes: measured on a quorum queue with
//! 20,000 messages flowing through it (2 cores, RabbitMQ 3.10), acking each
//! message drained about 11,000 a second with a p50/p99 of 20–90 / 88–168 ms
//! from publish to consume; one ack for every 256 messages, about 16,800 a
//! second at 5–10 / 25–49 ms. The ingester settles the envelopes it moves to
//! the bulk lane a deferral at a time, up to 256 at once, so most of its acks
//! can go out together.
//!
//! An ack with `multiple` set acknowledges every message of the channel
//! delivered up to its tag and not yet settled, including any the client has
//! received but not yet handed out. So one is sent only up to the highest tag
//! below which every tag (the broker numbers a channel's deliveries 1, 2, 3 …)
//! has been settled by this process; requeues go out first, one by one. An ack
//! above that prefix goes out on its own at once: nothing is held back waiting
//! for a slower message. The state belongs to one channel as the broker
//! numbers it: a reconnect makes new channels and new state (lapin's own
//! auto-recovery, which would renumber a channel under the same consumer, is
//! left off). Past [`MOST_TRACKED`] tags settled above an unsettled one, or
//! after a frame failed, the channel acks one by one until it is replaced.

use std::collections::BTreeSet;

/// How many settled tags above the prefix are remembered: beyond this (one
/// message of the channel kept unsettled while tens of thousands after it
/// were settled), the channel stops acking many at once rather than grow.
const MOST_TRACKED: usize = 65_536;

/// The settled tags of one channel.
#[derive(Debug, Default)]
pub(crate) struct SettledTags {
    /// Every tag up to this one is settled.
    through: u64,
    /// Settled tags above `through + 1`.
    above: BTreeSet<u64>,
    /// Set once `above` outgrew [`MOST_TRACKED`].
    given_up: bool,
}

/// The frames that settle a batch, to be sent in this order.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Frames {
    /// `basic.nack` with requeue, one per tag.
    pub requeues: Vec<u64>,
    /// One `basic.ack` with `multiple`, at this tag.
    pub ack_through: Option<u64>,
    /// `basic.ack` one per tag.
    pub acks: Vec<u64>,
}

impl SettledTags {
    /// Records that `acks` and `requeues` (tags not settled before) are
    /// settled now, and answers the frames that say so to the broker.
    pub(crate) fn settle(&mut self, acks: &[u64], requeues: &[u64]) -> Frames {
        if self.given_up {
            return Frames {
                requeues: requeues.to_vec(),
                ack_through: None,
                acks: acks.to_vec(),
            };
        }
        debug_assert!(
            acks.iter()
                .chain(requeues)
                .all(|tag| *tag > self.through && !self.above.contains(tag)),
            "a tag is settled once"
        );
        self.above.extend(acks.iter().chain(requeues));
        while self.above.remove(&(self.through + 1)) {
            self.through += 1;
        }
        if self.above.len() > MOST_TRACKED {
            self.give_up();
        }
        let (within, beyond): (Vec<u64>, Vec<u64>) = acks.iter().partition(|tag| **tag <= self.through);
        Frames {
            requeues: requeues.to_vec(),
            ack_through: within.into_iter().max(),
            acks: beyond,
        }
    }
}

impl SettledTags {
    /// From now on every ack goes out alone: for a channel where frames
    /// that were planned may not have been sent.
    pub(crate) fn give_up(&mut self) {
        self.given_up = true;
        self.above.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(requeues: &[u64], ack_through: Option<u64>, acks: &[u64]) -> Frames {
        Frames {
            requeues: requeues.to_vec(),
            ack_through,
            acks: acks.to_vec(),
        }
    }

    #[test]
    fn acks_of_every_tag_so_far_go_out_as_one() {
        let mut tags = SettledTags::default();
        assert_eq!(tags.settle(&[3, 1, 2, 4], &[]), frames(&[], Some(4), &[]));
        assert_eq!(tags.settle(&[5], &[]), frames(&[], Some(5), &[]));
    }

    #[test]
    fn an_ack_above_an_unsettled_tag_goes_out_alone_and_at_once() {
        let mut tags = SettledTags::default();
        // Tag 1 is still being handled (or not yet handed out): 2 and 3
        // must not be acknowledged together with it.
        assert_eq!(tags.settle(&[2, 3], &[]), frames(&[], None, &[2, 3]));
        // Once 1 is settled, the next multiple ack may cover 2 and 3 again:
        // the broker ignores tags already acknowledged below the one named.
        assert_eq!(tags.settle(&[1, 4], &[]), frames(&[], Some(4), &[]));
    }

    #[test]
    fn requeues_go_out_first_and_alone_and_count_as_settled() {
        let mut tags = SettledTags::default();
        assert_eq!(tags.settle(&[1, 3], &[2]), frames(&[2], Some(3), &[]));
        // A requeue alone moves the prefix without an ack to send.
        assert_eq!(tags.settle(&[], &[4]), frames(&[4], None, &[]));
        assert_eq!(tags.settle(&[6], &[]), frames(&[], None, &[6]));
        assert_eq!(tags.settle(&[5], &[]), frames(&[], Some(5), &[]));
    }

    #[test]
    fn after_giving_up_every_ack_goes_out_alone() {
        let mut tags = SettledTags::default();
        tags.give_up();
        assert_eq!(tags.settle(&[1, 2], &[3]), frames(&[3], None, &[1, 2]));
    }

    #[test]
    fn a_tag_kept_unsettled_forever_ends_the_tracking_not_the_acks() {
        let mut tags = SettledTags::default();
        let beyond: Vec<u64> = (2..=MOST_TRACKED as u64 + 2).collect();
        assert_eq!(tags.settle(&beyond, &[]), frames(&[], None, &beyond));
        assert!(tags.above.is_empty());
        // Tag 1 settles at last, and every ack after it goes out alone.
        assert_eq!(tags.settle(&[1], &[]), frames(&[], None, &[1]));
    }
}
