//! A circuit breaker per serving node, fed by live requests: a node that
//! fails [`TRIP_AFTER_FAILURES`] requests in a row (refused, reset, 5xx
//! before the first byte) is cooled down, with a back-off that doubles
//! from [`FIRST_COOL_DOWN`] to [`LONGEST_COOL_DOWN`] while its probes fail,
//! and is not chosen while another node can serve; after the cool-down
//! one request probes it back. Being busy (429) is no failure.
//!
//! Its states are node-core's [`BreakerState`], as `GET /v1/peers` shows
//! them.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use ollamacron_node_core::BreakerState;

/// Failures in a row that open a node's breaker.
pub(crate) const TRIP_AFTER_FAILURES: u32 = 3;
/// The first cool-down.
pub(crate) const FIRST_COOL_DOWN: Duration = Duration::from_secs(1);
/// The longest cool-down.
pub(crate) const LONGEST_COOL_DOWN: Duration = Duration::from_secs(60);

#[derive(Debug, Default)]
struct Breaker {
    failures_in_row: u32,
    open_until: Option<Instant>,
    cool_down: Duration,
    /// When the probe on its way was sent; one older than
    /// [`PROBE_GIVEN_UP_AFTER`] (busy, or its client went away) no longer
    /// holds the node back.
    probing_since: Option<Instant>,
}

/// How long a probe may be out before another request may probe.
const PROBE_GIVEN_UP_AFTER: Duration = Duration::from_secs(30);

impl Breaker {
    fn probing(&self, now: Instant) -> bool {
        self.probing_since
            .is_some_and(|since| now.duration_since(since) < PROBE_GIVEN_UP_AFTER)
    }

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
        let now = Instant::now();
        self.lock().get(key).is_none_or(|b| match b.state(now) {
            BreakerState::Closed => true,
            BreakerState::Open => false,
            BreakerState::HalfOpen => !b.probing(now),
        })
    }

    /// A request is about to go to `key` (it waited for a slot, and the
    /// breaker may have moved since it was admitted): whether it may, now.
    /// When half open, this request becomes the probe. `fallback`: no
    /// other node can serve, so it goes regardless.
    pub(crate) fn sending(&self, key: &str, fallback: bool) -> bool {
        let now = Instant::now();
        let mut breakers = self.lock();
        let Some(b) = breakers.get_mut(key) else {
            return true;
        };
        match b.state(now) {
            BreakerState::Closed => true,
            BreakerState::Open => fallback,
            BreakerState::HalfOpen if b.probing(now) => fallback,
            BreakerState::HalfOpen => {
                b.probing_since = Some(now);
                true
            }
        }
    }

    /// `key` answered: a closed or probed breaker closes (a late answer to
    /// a request sent before it opened leaves it cooling down). Whether it
    /// was open or half open before.
    pub(crate) fn succeeded(&self, key: &str) -> bool {
        let now = Instant::now();
        let mut breakers = self.lock();
        match breakers.get(key).map(|b| b.state(now)) {
            None | Some(BreakerState::Open) => false,
            Some(BreakerState::Closed) => {
                breakers.remove(key);
                false
            }
            Some(BreakerState::HalfOpen) => {
                breakers.remove(key);
                true
            }
        }
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
            b.probing_since = None;
        }
        (b.state(now), b.open_until.filter(|_| opened))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pretend `key`'s cool-down has passed.
    fn cooled(breakers: &Breakers, key: &str) {
        let past = Instant::now().checked_sub(Duration::from_millis(1));
        if let Some(b) = breakers.lock().get_mut(key) {
            b.open_until = past;
        }
    }

    #[test]
    fn failures_in_a_row_open_and_a_probe_closes() {
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
        assert!(!breakers.sending("a", false), "not sent while cooling down");
        assert!(breakers.sending("a", true), "unless nothing else can serve");
        assert!(!breakers.succeeded("a"), "a late answer leaves it cooling");
        assert_eq!(breakers.state("a"), BreakerState::Open);
        cooled(&breakers, "a");
        assert!(breakers.sending("a", false), "the probe");
        assert!(breakers.succeeded("a"), "it was half open");
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
        cooled(&breakers, "a");
        assert_eq!(breakers.state("a"), BreakerState::HalfOpen);
        assert!(breakers.admits("a"));
        assert!(breakers.sending("a", false));
        assert!(!breakers.admits("a"), "one probe at a time");
        assert!(!breakers.sending("a", false));
        assert_eq!(breakers.failed("a").0, BreakerState::Open);
        let cool_down = breakers.lock().get("a").map(|b| b.cool_down);
        assert_eq!(cool_down, Some(FIRST_COOL_DOWN * 2));
    }

    #[test]
    fn a_probe_that_never_reports_is_given_up() {
        let breakers = Breakers::default();
        for _ in 0..TRIP_AFTER_FAILURES {
            breakers.failed("a");
        }
        cooled(&breakers, "a");
        assert!(breakers.sending("a", false));
        assert!(!breakers.admits("a"));
        if let Some(b) = breakers.lock().get_mut("a") {
            b.probing_since = Instant::now().checked_sub(PROBE_GIVEN_UP_AFTER);
        }
        assert!(breakers.admits("a"), "another request may probe");
    }
}
