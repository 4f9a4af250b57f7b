//! Fair sharing between tenants: which lane an event or an event's deliveries
//! wait in, so that one tenant's flood never queues another tenant's alert
//! behind it.
//!
//! Every tenant has a share of each stage's capacity: a rate with a burst
//! (GCRA, the `governor` crate), kept in this process's memory. Work within
//! its tenant's share goes to the express lane, work beyond it to the bulk
//! lane; consumers take from the express lane first and from the bulk lane
//! whenever the express lane is empty (see [`crate::queue::LanePicker`]), so a
//! tenant alone on the system still gets all of it. Work sent to the bulk lane
//! takes nothing from the tenant's share: a tenant that stops flooding is back
//! in the express lane as soon as its share has room for its next event, at
//! most `burst / rate` after it stopped.
//!
//! The decision is a pure function of the tenant's recent history and the
//! clock, which is injected (tests run it on a fake one). Tenants idle for
//! longer than their burst window are forgotten ([`FairShare::forget_idle`]),
//! so memory grows with the tenants active in the last seconds, not with all
//! tenants.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::ids::TenantId;
use crate::queue::Lane;

/// A tenant's share of one stage: `per_second` on average, `burst` at once
/// after a quiet spell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

impl Share {
    fn quota(self) -> Quota {
        Quota::per_second(self.per_second).allow_burst(self.burst)
    }
}

/// The shares of both stages where a backlog can form.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shares {
    /// Events a tenant may have ingested in the express lane.
    pub events: Share,
    /// Deliveries a tenant's events may put in the express lane of the tasks.
    pub deliveries: Share,
}

type Limiter<C> = RateLimiter<TenantId, DefaultKeyedStateStore<TenantId>, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// Decides lanes by tenant; `off` puts everything in the express lane (plain
/// first-in, first-out, as before fairness).
pub struct FairShare<C: Clock = DefaultClock> {
    stages: Option<(Limiter<C>, Limiter<C>)>,
    /// Events decided so far: every [`FORGET_EVERY`] the idle are forgotten.
    decided: AtomicU64,
}

/// How many events' lanes are decided between two [`FairShare::forget_idle`].
const FORGET_EVERY: u64 = 4096;

impl<C: Clock> std::fmt::Debug for FairShare<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FairShare")
            .field("on", &self.stages.is_some())
            .finish_non_exhaustive()
    }
}

impl FairShare<DefaultClock> {
    /// Fair sharing with `shares` on the system clock; `None` switches it off.
    pub fn new(shares: Option<Shares>) -> Self {
        Self::with_clock(shares, &DefaultClock::default())
    }
}

impl<C: Clock + Clone> FairShare<C> {
    pub fn with_clock(shares: Option<Shares>, clock: &C) -> Self {
        FairShare {
            stages: shares.map(|shares| {
                (
                    RateLimiter::dashmap_with_clock(shares.events.quota(), clock.clone()),
                    RateLimiter::dashmap_with_clock(shares.deliveries.quota(), clock.clone()),
                )
            }),
            decided: AtomicU64::new(0),
        }
    }

    pub fn is_on(&self) -> bool {
        self.stages.is_some()
    }

    /// The lane of one event of `tenant` waiting to be ingested.
    pub fn lane_of_event(&self, tenant: TenantId) -> Lane {
        if self.decided.fetch_add(1, Ordering::Relaxed) % FORGET_EVERY == FORGET_EVERY - 1 {
            self.forget_idle();
        }
        match &self.stages {
            None => Lane::Express,
            Some((events, _)) => lane_within(events, tenant, 1),
        }
    }

    /// The lane of `count` deliveries of one event of `tenant`: all of them
    /// travel in one message, so they share a lane.
    pub fn lane_of_deliveries(&self, tenant: TenantId, count: usize) -> Lane {
        match &self.stages {
            None => Lane::Express,
            Some((_, deliveries)) => lane_within(deliveries, tenant, count),
        }
    }

    /// Forgets tenants whose share is whole again: they would be decided the
    /// same way as a tenant never seen. Call it now and then.
    pub fn forget_idle(&self) {
        if let Some((events, deliveries)) = &self.stages {
            for limiter in [events, deliveries] {
                limiter.retain_recent();
                limiter.shrink_to_fit();
            }
        }
    }

    /// Tenants remembered, for tests and metrics.
    pub fn remembered(&self) -> usize {
        self.stages
            .as_ref()
            .map_or(0, |(events, deliveries)| events.len().max(deliveries.len()))
    }
}

/// When the ingester may start on a message of the bulk lane of events.
///
/// While the ingester is moving a flood out of the express lane (deferring
/// the events of a tenant beyond its share), every other tenant's events
/// wait behind the flood's in that lane until the move reaches them; fanning
/// out the bulk lane meanwhile only takes CPU, database and broker time from
/// the move. So once the move has fallen behind (the ingester held at least
/// `backlog` messages of the express lane when it deferred one), bulk
/// messages wait while events are being deferred (one in the last `quiet`),
/// but for at most `at_most` from the first deferral that found the move
/// behind: past that, the flood is long, not a burst, and the bulk lane is
/// ingested alongside the move until the deferrals stop for `quiet` (a new
/// flood then gets a new pause). So a tenant that stays over its share, by a little or a lot,
/// holds the bulk lane back once, for `at_most`, never for as long as it
/// goes on; and a tenant over its share whose events the ingester keeps up
/// with (nobody waits behind them) never holds it back at all: its events
/// pass through the bulk lane at once. Each ingester replica watches its own
/// deferrals.
///
/// Measured (noisy scenario, production, 2 cores; docs/performance.md):
/// with a pause of at most 1 s, tenant B's p99 was 329–784 ms against
/// 1,468–1,538 ms without the pause, and 1,329–1,799 ms in a slower sitting
/// in which A's publishing lasted longer than the second; with 5 s, 281 and
/// 340 ms in that sitting. Pausing only while the move was behind at that
/// moment (a move of a full message in the last `quiet`) did worse (p99 533
/// and 1,333 ms): a flood once behind is paused for until it ends, since the
/// bulk messages begun in a moment the move caught up take seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BulkPause {
    pub quiet: Duration,
    pub at_most: Duration,
    /// Express messages held by the ingester (taken, not yet settled) from
    /// which the move counts as behind.
    pub backlog: usize,
}

impl Default for BulkPause {
    fn default() -> Self {
        BulkPause {
            quiet: Duration::from_millis(200),
            at_most: Duration::from_secs(5),
            backlog: 256,
        }
    }
}

/// The deferrals a [`BulkPause`] watches: when the current flood's last was
/// made, and since when its move has been behind, if it has fallen behind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Deferrals {
    last: Option<Instant>,
    behind_since: Option<Instant>,
}

impl BulkPause {
    /// An event was deferred at `now`, with `held` messages of the express
    /// lane in the ingester's hands: it begins a flood if none was deferred
    /// for `quiet` before it, and finds the flood's move behind if `held`
    /// reaches `backlog`.
    pub fn deferred(&self, deferrals: &mut Deferrals, now: Instant, held: usize) {
        let continues = deferrals
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.quiet);
        if !continues {
            deferrals.behind_since = None;
        }
        deferrals.last = Some(now);
        if held >= self.backlog && deferrals.behind_since.is_none() {
            deferrals.behind_since = Some(now);
        }
    }

    /// How much longer a bulk message waits at `now`; zero means it may
    /// start. Its answer changes only with the clock and new deferrals.
    pub fn remaining(&self, deferrals: &Deferrals, now: Instant) -> Duration {
        let (Some(began), Some(last)) = (deferrals.behind_since, deferrals.last) else {
            return Duration::ZERO;
        };
        let quiet_at = last + self.quiet;
        let bound_at = began + self.at_most;
        quiet_at.min(bound_at).saturating_duration_since(now)
    }
}

/// Express if the tenant's share has room for `count` more now (and takes
/// it), bulk otherwise (taking nothing). More than a whole burst at once is
/// bulk: no share could ever hold it.
fn lane_within<C: Clock>(limiter: &Limiter<C>, tenant: TenantId, count: usize) -> Lane {
    let Some(count) = u32::try_from(count).ok().and_then(NonZeroU32::new) else {
        return Lane::Express;
    };
    match limiter.check_key_n(&tenant, count) {
        Ok(Ok(())) => Lane::Express,
        Ok(Err(_)) | Err(_) => Lane::Bulk,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use governor::clock::FakeRelativeClock;

    use super::*;

    fn share(per_second: u32, burst: u32) -> Share {
        Share {
            per_second: NonZeroU32::new(per_second).expect("positive"),
            burst: NonZeroU32::new(burst).expect("positive"),
        }
    }

    fn shares() -> Shares {
        Shares {
            events: share(50, 100),
            deliveries: share(200, 500),
        }
    }

    #[test]
    fn a_flood_goes_to_the_bulk_lane_once_its_burst_is_spent_and_a_trickle_never_does() {
        let clock = FakeRelativeClock::default();
        let fair = FairShare::with_clock(Some(shares()), &clock);
        let (flood, trickle) = (TenantId::generate(), TenantId::generate());
        let lanes: Vec<Lane> = (0..300).map(|_| fair.lane_of_event(flood)).collect();
        assert_eq!(lanes.iter().filter(|lane| **lane == Lane::Express).count(), 100);
        assert!(lanes[100..].iter().all(|lane| *lane == Lane::Bulk));
        // A second later the flood has earned 50 more events; the trickle,
        // 10 events a second all along, was never held back.
        for _ in 0..10 {
            clock.advance(Duration::from_millis(100));
            assert_eq!(fair.lane_of_event(trickle), Lane::Express);
            assert_eq!(fair.lane_of_deliveries(trickle, 1), Lane::Express);
        }
        let lanes: Vec<Lane> = (0..100).map(|_| fair.lane_of_event(flood)).collect();
        assert_eq!(lanes.iter().filter(|lane| **lane == Lane::Express).count(), 50);
    }

    #[test]
    fn deliveries_count_by_the_event_and_an_event_bigger_than_the_burst_is_bulk() {
        let clock = FakeRelativeClock::default();
        let fair = FairShare::with_clock(Some(shares()), &clock);
        let tenant = TenantId::generate();
        // 50 events of 10 deliveries fill the burst of 500; the next waits.
        for _ in 0..50 {
            assert_eq!(fair.lane_of_deliveries(tenant, 10), Lane::Express);
        }
        assert_eq!(fair.lane_of_deliveries(tenant, 10), Lane::Bulk);
        // At 200 a second, room for 10 more comes back within 50 ms.
        clock.advance(Duration::from_millis(50));
        assert_eq!(fair.lane_of_deliveries(tenant, 10), Lane::Express);
        assert_eq!(fair.lane_of_deliveries(TenantId::generate(), 501), Lane::Bulk);
        assert_eq!(fair.lane_of_deliveries(TenantId::generate(), 0), Lane::Express);
    }

    #[test]
    fn a_tenant_that_stops_flooding_is_express_again_within_burst_over_rate() {
        let clock = FakeRelativeClock::default();
        let fair = FairShare::with_clock(Some(shares()), &clock);
        let tenant = TenantId::generate();
        // A long flood: thousands of events, nearly all bulk (which takes
        // nothing from the share, so the flood's length does not matter).
        for _ in 0..5_000 {
            fair.lane_of_event(tenant);
            fair.lane_of_deliveries(tenant, 10);
        }
        assert_eq!(fair.lane_of_event(tenant), Lane::Bulk);
        // It stops. burst / rate later (events 100/50 = 2 s, deliveries
        // 500/200 = 2.5 s), its whole burst is express again.
        clock.advance(Duration::from_millis(2_500));
        let events: Vec<Lane> = (0..100).map(|_| fair.lane_of_event(tenant)).collect();
        assert!(events.iter().all(|lane| *lane == Lane::Express), "{events:?}");
        let deliveries: Vec<Lane> = (0..50).map(|_| fair.lane_of_deliveries(tenant, 10)).collect();
        assert!(deliveries.iter().all(|lane| *lane == Lane::Express), "{deliveries:?}");
    }

    #[test]
    fn bulk_waits_while_a_flood_is_being_moved_for_at_most_once_per_flood() {
        let pause = BulkPause {
            quiet: Duration::from_millis(200),
            at_most: Duration::from_secs(5),
            backlog: 256,
        };
        let ms = Duration::from_millis;
        let behind = 1_024;
        let t0 = Instant::now();
        let mut deferrals = Deferrals::default();
        // Nothing deferred: start now.
        assert_eq!(pause.remaining(&deferrals, t0), Duration::ZERO);
        // A deferral with the move behind: wait until none has been made for
        // 200 ms.
        pause.deferred(&mut deferrals, t0, behind);
        assert_eq!(pause.remaining(&deferrals, t0 + ms(50)), ms(150));
        assert_eq!(pause.remaining(&deferrals, t0 + ms(200)), Duration::ZERO);
        // A tenant over its share, deferring one event every 20 ms without
        // end, behind at first, then kept up with: the bulk lane waits 5 s
        // from the first deferral that found the move behind (the flood's
        // first, here), then not at all while the flood goes on.
        for step in 1..=1_000u32 {
            let held = if step < 10 { behind } else { 3 };
            pause.deferred(&mut deferrals, t0 + ms(20) * step, held);
        }
        let (first, last) = (t0, t0 + ms(20_000));
        assert_eq!(pause.remaining(&deferrals, first + ms(4_900)), ms(100));
        assert_eq!(pause.remaining(&deferrals, last), Duration::ZERO);
        assert_eq!(pause.remaining(&deferrals, last + ms(1)), Duration::ZERO);
        // It stops; after 200 ms of quiet a new flood that falls behind gets
        // a new pause, from the deferral that found it behind on.
        let later = last + ms(300);
        pause.deferred(&mut deferrals, later, 0);
        assert_eq!(pause.remaining(&deferrals, later + ms(10)), Duration::ZERO);
        pause.deferred(&mut deferrals, later + ms(150), behind);
        assert_eq!(pause.remaining(&deferrals, later + ms(160)), ms(190));
        pause.deferred(&mut deferrals, later + ms(170), 0);
        assert_eq!(pause.remaining(&deferrals, later + ms(180)), ms(190));
    }

    #[test]
    fn a_tenant_over_its_share_that_the_ingester_keeps_up_with_never_pauses_the_bulk_lane() {
        let pause = BulkPause::default();
        let t0 = Instant::now();
        let mut deferrals = Deferrals::default();
        // 80 events a second beyond its share, for a minute, each deferred
        // with a few express messages in hand.
        for step in 0..4_800u32 {
            let now = t0 + Duration::from_micros(12_500) * step;
            pause.deferred(&mut deferrals, now, usize::try_from(step % 5).expect("small"));
            assert_eq!(pause.remaining(&deferrals, now), Duration::ZERO, "at step {step}");
        }
        // One more with the lane one short of a backlog: still none.
        let now = t0 + Duration::from_secs(60);
        pause.deferred(&mut deferrals, now, pause.backlog - 1);
        assert_eq!(pause.remaining(&deferrals, now), Duration::ZERO);
        // Then it bursts and the move falls behind: the pause begins there,
        // a minute into the flood, and lasts at most `at_most` from there.
        pause.deferred(&mut deferrals, now, pause.backlog);
        assert_eq!(pause.remaining(&deferrals, now), pause.quiet);
        let step = Duration::from_millis(20);
        for n in 1..=300u32 {
            pause.deferred(&mut deferrals, now + step * n, pause.backlog);
        }
        let ms = Duration::from_millis;
        assert_eq!(pause.remaining(&deferrals, now + ms(4_900)), ms(100));
        assert_eq!(pause.remaining(&deferrals, now + ms(5_000)), Duration::ZERO);
    }

    #[test]
    fn switched_off_everything_is_express_and_idle_tenants_are_forgotten() {
        let off = FairShare::new(None);
        let tenant = TenantId::generate();
        assert!((0..10_000).all(|_| off.lane_of_event(tenant) == Lane::Express));
        assert_eq!(off.lane_of_deliveries(tenant, 100_000), Lane::Express);

        let clock = FakeRelativeClock::default();
        let fair = FairShare::with_clock(Some(shares()), &clock);
        for _ in 0..1_000 {
            fair.lane_of_event(TenantId::generate());
        }
        assert_eq!(fair.remembered(), 1_000);
        clock.advance(Duration::from_secs(3));
        fair.forget_idle();
        assert_eq!(fair.remembered(), 0);
    }
}
