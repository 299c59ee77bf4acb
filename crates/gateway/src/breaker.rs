//! A circuit breaker per serving node, fed by live requests: a node that
//! fails [`TRIP_AFTER_FAILURES`] requests in a row (refused, reset, 5xx
//! before the first byte) is cooled down, with a back-off that doubles
//! from [`FIRST_COOL_DOWN`] to [`LONGEST_COOL_DOWN`] while its probes fail,
//! and is not chosen while another node can serve; after the cool-down
//! one request probes it back. Being busy (429) is no failure.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

/// Failures in a row that open a node's breaker.
pub(crate) const TRIP_AFTER_FAILURES: u32 = 3;
/// The first cool-down.
pub(crate) const FIRST_COOL_DOWN: Duration = Duration::from_secs(1);
/// The longest cool-down.
pub(crate) const LONGEST_COOL_DOWN: Duration = Duration::from_secs(60);

/// Where a node's breaker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BreakerState {
    /// Requests go to it.
    Closed,
    /// Cooling down: not chosen while another node can serve.
    Open,
    /// Cooled down: the next request probes it.
    HalfOpen,
}

impl BreakerState {
    /// As the metric shows it: 0 closed, 1 half open, 2 open.
    pub(crate) fn gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::HalfOpen => 1,
            Self::Open => 2,
        }
    }
}

#[derive(Debug, Default)]
struct Breaker {
    failures_in_row: u32,
    open_until: Option<Instant>,
    cool_down: Duration,
    probing: bool,
}

impl Breaker {
    fn state(&self, now: Instant) -> BreakerState {
        match self.open_until {
            None => BreakerState::Closed,
            Some(until) if now < until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }
}

/// Every serving node's breaker, by peer.
#[derive(Debug, Default)]
pub(crate) struct Breakers(Mutex<HashMap<String, Breaker>>);

impl Breakers {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Breaker>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Where `key`'s breaker stands now.
    #[cfg(test)]
    pub(crate) fn state(&self, key: &str) -> BreakerState {
        self.lock()
            .get(key)
            .map_or(BreakerState::Closed, |b| b.state(Instant::now()))
    }

    /// Whether a request may go to `key` now: closed, or half open with
    /// no probe on its way.
    pub(crate) fn admits(&self, key: &str) -> bool {
        self.lock()
            .get(key)
            .is_none_or(|b| match b.state(Instant::now()) {
                BreakerState::Closed => true,
                BreakerState::Open => false,
                BreakerState::HalfOpen => !b.probing,
            })
    }

    /// A request is going to `key`: when it is half open, this is its probe.
    pub(crate) fn sending(&self, key: &str) {
        if let Some(b) = self.lock().get_mut(key)
            && b.state(Instant::now()) == BreakerState::HalfOpen
        {
            b.probing = true;
        }
    }

    /// `key` answered: its breaker closes. Whether it was open or half
    /// open before.
    pub(crate) fn succeeded(&self, key: &str) -> bool {
        self.lock()
            .remove(key)
            .is_some_and(|b| b.open_until.is_some())
    }

    /// `key` failed a request: the state now, and until when it cools
    /// down when this opened it.
    pub(crate) fn failed(&self, key: &str) -> (BreakerState, Option<Instant>) {
        let now = Instant::now();
        let mut breakers = self.lock();
        let b = breakers.entry(key.to_owned()).or_default();
        b.failures_in_row = b.failures_in_row.saturating_add(1);
        let was = b.state(now);
        let opened = match was {
            // A failed probe: cool down twice as long.
            BreakerState::HalfOpen => {
                b.cool_down = (b.cool_down * 2).min(LONGEST_COOL_DOWN);
                true
            }
            BreakerState::Closed if b.failures_in_row >= TRIP_AFTER_FAILURES => {
                b.cool_down = FIRST_COOL_DOWN;
                true
            }
            BreakerState::Closed | BreakerState::Open => false,
        };
        if opened {
            b.open_until = Some(now + b.cool_down);
            b.probing = false;
        }
        (b.state(now), b.open_until.filter(|_| opened))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_in_a_row_open_and_a_success_closes() {
        let breakers = Breakers::default();
        assert!(breakers.admits("a"));
        for _ in 1..TRIP_AFTER_FAILURES {
            assert_eq!(breakers.failed("a"), (BreakerState::Closed, None));
        }
        let (state, until) = breakers.failed("a");
        assert_eq!(state, BreakerState::Open);
        assert!(until.is_some());
        assert!(!breakers.admits("a"));
        assert!(breakers.admits("b"), "one node's breaker only");
        assert!(breakers.succeeded("a"), "it was open");
        assert!(breakers.admits("a"));
        // A success in between starts the count again.
        breakers.failed("a");
        assert!(!breakers.succeeded("a"), "it was closed");
        for _ in 1..TRIP_AFTER_FAILURES {
            breakers.failed("a");
        }
        assert_eq!(breakers.state("a"), BreakerState::Closed);
    }

    #[test]
    fn a_cooled_down_node_gets_one_probe_and_a_failed_probe_doubles_the_cool_down() {
        let breakers = Breakers::default();
        for _ in 0..TRIP_AFTER_FAILURES {
            breakers.failed("a");
        }
        // Pretend the cool-down has passed.
        let past = Instant::now().checked_sub(Duration::from_millis(1));
        breakers
            .lock()
            .get_mut("a")
            .unwrap_or_else(|| unreachable!())
            .open_until = past;
        assert_eq!(breakers.state("a"), BreakerState::HalfOpen);
        assert!(breakers.admits("a"));
        breakers.sending("a");
        assert!(!breakers.admits("a"), "one probe at a time");
        assert_eq!(breakers.failed("a").0, BreakerState::Open);
        let cool_down = breakers.lock().get("a").map(|b| b.cool_down);
        assert_eq!(cool_down, Some(FIRST_COOL_DOWN * 2));
    }
}
