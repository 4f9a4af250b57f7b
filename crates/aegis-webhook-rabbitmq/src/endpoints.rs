//! Which broker address a connection tries next. `AEGIS_AMQP_URL` may list a
//! cluster's nodes (where no load balancer stands in front of them); each
//! connect tries every address once, beginning after the last one that
//! failed, so a process whose node went away moves on to the next node at
//! once instead of waiting for the dead one first, and processes spread over
//! the nodes as their nodes fail. With one address this is that address.

use aegis_webhook_core::config::{AmqpUrl, AmqpUrls};

/// The addresses and where the next connect begins.
#[derive(Debug, Clone)]
pub(crate) struct Endpoints {
    urls: Vec<AmqpUrl>,
    /// Index of the first address the next connect tries.
    next: usize,
}

impl Endpoints {
    pub(crate) fn new(urls: &AmqpUrls) -> Endpoints {
        Endpoints {
            urls: urls.urls().to_vec(),
            next: 0,
        }
    }

    /// The order of one connect: every address once, from `next` on, wrapping.
    pub(crate) fn attempt_order(&self) -> Vec<usize> {
        let count = self.urls.len();
        (0..count).map(|offset| (self.next + offset) % count).collect()
    }

    /// The connection to address `index` failed, or was lost: the next
    /// connect begins with the one after it.
    pub(crate) fn failed(&mut self, index: usize) {
        self.next = (index + 1) % self.urls.len();
    }

    pub(crate) fn url(&self, index: usize) -> &AmqpUrl {
        &self.urls[index]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn three() -> Endpoints {
        Endpoints::new(&AmqpUrls::parse("amqp://c1:5701,amqp://c2:5702,amqp://c3:5703").expect("valid"))
    }

    #[test]
    fn a_connect_tries_every_address_once_from_the_first() {
        let endpoints = three();
        assert_eq!(endpoints.attempt_order(), [0, 1, 2]);
        assert_eq!(endpoints.url(1).address(), "c2:5702");
    }

    #[test]
    fn after_a_failure_the_next_connect_begins_with_the_following_address() {
        let mut endpoints = three();
        // Connected to c1, which then went away.
        endpoints.failed(0);
        assert_eq!(endpoints.attempt_order(), [1, 2, 0]);
        // c2 refused as well during that connect: c3 is next, then c1.
        endpoints.failed(1);
        assert_eq!(endpoints.attempt_order(), [2, 0, 1]);
        // The last address failing wraps around to the first.
        endpoints.failed(2);
        assert_eq!(endpoints.attempt_order(), [0, 1, 2]);
    }

    #[test]
    fn when_every_address_failed_the_next_round_begins_where_this_one_did() {
        let mut endpoints = three();
        endpoints.failed(0);
        let round = endpoints.attempt_order();
        for index in &round {
            endpoints.failed(*index);
        }
        assert_eq!(endpoints.attempt_order(), round);
    }

    #[test]
    fn one_address_is_always_that_address() {
        let mut endpoints = Endpoints::new(&AmqpUrls::parse("amqp://rabbitmq").expect("valid"));
        assert_eq!(endpoints.attempt_order(), [0]);
        endpoints.failed(0);
        assert_eq!(endpoints.attempt_order(), [0]);
    }
}
