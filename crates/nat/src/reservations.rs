//! Which relays to hold reservations on, and when to (re)try.
//!
//! Plain state, no I/O: the behaviour turns its decisions into
//! `ToSwarm::ListenOn` / `RemoveListener` and feeds back listener events.
//!
//! Public (and hidden from the docs) only so that `benches/reservations.rs`
//! can measure it: not part of the crate's API, and it may change in any
//! release. Use [`Behaviour`](crate::Behaviour).

use std::collections::HashMap;
use std::time::Duration;

use libp2p::core::transport::ListenerId;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};
use rand::seq::IteratorRandom;
use tokio::time::Instant;

/// One relay we want (or wanted) a reservation on.
#[derive(Debug)]
struct RelayTarget {
    /// The relay's address, ending in `/p2p/<relay>`.
    address: Multiaddr,
    /// Configured by the operator (kept forever) or discovered.
    configured: bool,
    state: TargetState,
    /// Failures since the last accepted reservation.
    failures: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TargetState {
    /// Not listening; may listen now (or at `not_before`).
    Idle { not_before: Option<Instant> },
    /// A `/p2p-circuit` listener is open (reservation pending or held).
    Listening { id: ListenerId, accepted: bool },
}

/// What the behaviour should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum ReservationAction {
    /// Open a circuit listener on this relay address (`…/p2p/<relay>/p2p-circuit`).
    Listen {
        /// The relay.
        relay: PeerId,
        /// Its address, ending in `/p2p/<relay>`.
        address: Multiaddr,
    },
    /// Close this circuit listener.
    Close {
        /// The listener.
        id: ListenerId,
    },
}

/// Reservations on relays, with backoff.
#[derive(Debug)]
pub struct Reservations {
    targets: HashMap<PeerId, RelayTarget>,
    /// Discovered relays not (yet) used, with an address each.
    candidates: HashMap<PeerId, Multiaddr>,
    max_discovered: usize,
    max_discovered_failures: u32,
    backoff_initial: Duration,
    backoff_max: Duration,
    wanted: bool,
    /// Discovered relays given up on, and when: not candidates again until
    /// [`GIVE_UP_FOR`] has passed.
    given_up: HashMap<PeerId, Instant>,
}

/// How long a discovered relay that kept failing is not tried again.
const GIVE_UP_FOR: Duration = Duration::from_secs(10 * 60);
/// Most discovered relays remembered as given up (and most candidates kept).
const MAX_REMEMBERED_RELAYS: usize = 256;

/// The peer id an address ends with.
pub(crate) fn peer_of(address: &Multiaddr) -> Option<PeerId> {
    match address.iter().last() {
        Some(Protocol::P2p(peer)) => Some(peer),
        _ => None,
    }
}

impl Reservations {
    /// Reservations on the `configured` relays (addresses that do not end
    /// in `/p2p/<relay>` are skipped) or, with none configured, on up to
    /// `max_discovered` discovered ones, each dropped after
    /// `max_discovered_failures` failures in a row. Retries wait
    /// `backoff_initial`, doubled per failure up to `backoff_max`. Nothing
    /// is requested until [`Reservations::set_wanted`].
    #[must_use]
    pub fn new(
        configured: &[Multiaddr],
        max_discovered: usize,
        max_discovered_failures: u32,
        backoff_initial: Duration,
        backoff_max: Duration,
    ) -> Self {
        let targets = configured
            .iter()
            .filter_map(|address| {
                let peer = peer_of(address)?;
                Some((
                    peer,
                    RelayTarget {
                        address: address.clone(),
                        configured: true,
                        state: TargetState::Idle { not_before: None },
                        failures: 0,
                    },
                ))
            })
            .collect();
        Self {
            targets,
            candidates: HashMap::new(),
            max_discovered,
            max_discovered_failures,
            backoff_initial,
            backoff_max,
            wanted: false,
            given_up: HashMap::new(),
        }
    }

    fn has_configured(&self) -> bool {
        self.targets.values().any(|t| t.configured)
    }

    /// Whether reservations should be held (the node is private).
    pub fn set_wanted(&mut self, wanted: bool) -> Vec<ReservationAction> {
        self.wanted = wanted;
        if wanted {
            return Vec::new();
        }
        let mut actions = Vec::new();
        for target in self.targets.values_mut() {
            if let TargetState::Listening { id, .. } = target.state {
                actions.push(ReservationAction::Close { id });
            }
            target.state = TargetState::Idle { not_before: None };
            target.failures = 0;
        }
        actions
    }

    /// A connected peer speaks the relay (hop) protocol at `address`.
    /// Only a direct address is taken: no `/p2p-circuit`, and `/p2p` (if
    /// any) only at the end, naming the relay.
    pub fn add_candidate(&mut self, relay: PeerId, address: Multiaddr, now: Instant) {
        if self.targets.contains_key(&relay) {
            return;
        }
        if let Some(at) = self.given_up.get(&relay) {
            if now.duration_since(*at) < GIVE_UP_FOR {
                return;
            }
            self.given_up.remove(&relay);
        }
        let peers = address
            .iter()
            .filter(|p| matches!(p, Protocol::P2p(_)))
            .count();
        let address = match (peer_of(&address), peers) {
            (Some(p), 1) if p == relay => address,
            (None, 0) => address.with(Protocol::P2p(relay)),
            _ => return,
        };
        if address.iter().any(|p| p == Protocol::P2pCircuit) {
            return;
        }
        if self.candidates.len() >= MAX_REMEMBERED_RELAYS && !self.candidates.contains_key(&relay) {
            return;
        }
        self.candidates.insert(relay, address);
    }

    /// A peer disconnected: a discovered candidate that is not in use goes.
    pub fn remove_candidate(&mut self, relay: &PeerId) {
        self.candidates.remove(relay);
    }

    /// Listeners to open now; when to ask again (the earliest backoff).
    pub fn poll_actions(&mut self, now: Instant) -> (Vec<ReservationAction>, Option<Instant>) {
        if !self.wanted {
            return (Vec::new(), None);
        }
        // Without configured relays, promote discovered ones up to the limit.
        if !self.has_configured() {
            while self.targets.len() < self.max_discovered {
                // At random: no peer can make itself everyone's relay by
                // choosing its id, and private nodes spread over relays.
                let Some(relay) = self
                    .candidates
                    .keys()
                    .copied()
                    .choose(&mut rand::thread_rng())
                else {
                    break;
                };
                if let Some(address) = self.candidates.remove(&relay) {
                    self.targets.insert(
                        relay,
                        RelayTarget {
                            address,
                            configured: false,
                            state: TargetState::Idle { not_before: None },
                            failures: 0,
                        },
                    );
                }
            }
        }
        let mut actions = Vec::new();
        let mut next: Option<Instant> = None;
        for (relay, target) in &mut self.targets {
            if let TargetState::Idle { not_before } = target.state {
                match not_before {
                    Some(at) if at > now => {
                        next = Some(next.map_or(at, |n| n.min(at)));
                    }
                    _ => actions.push(ReservationAction::Listen {
                        relay: *relay,
                        address: target.address.clone(),
                    }),
                }
            }
        }
        (actions, next)
    }

    /// The behaviour opened a listener for `relay`.
    pub fn listening(&mut self, relay: &PeerId, id: ListenerId) {
        if let Some(target) = self.targets.get_mut(relay) {
            target.state = TargetState::Listening {
                id,
                accepted: false,
            };
        }
    }

    /// The relay accepted (or renewed) our reservation.
    pub fn accepted(&mut self, relay: &PeerId) {
        if let Some(target) = self.targets.get_mut(relay) {
            target.failures = 0;
            if let TargetState::Listening { id, .. } = target.state {
                target.state = TargetState::Listening { id, accepted: true };
            }
        }
    }

    /// The relay whose listener this is, if it is one of ours.
    pub(crate) fn relay_of(&self, id: ListenerId) -> Option<PeerId> {
        self.targets.iter().find_map(|(relay, t)| {
            matches!(t.state, TargetState::Listening { id: l, .. } if l == id).then_some(*relay)
        })
    }

    /// Relays holding an accepted reservation of ours.
    pub fn active(&self) -> Vec<PeerId> {
        let mut relays: Vec<PeerId> = self
            .targets
            .iter()
            .filter(|(_, t)| matches!(t.state, TargetState::Listening { accepted: true, .. }))
            .map(|(relay, _)| *relay)
            .collect();
        relays.sort_unstable();
        relays
    }

    /// A circuit listener closed (reservation refused, expired without
    /// renewal, or the relay went away). Returns the relay and how long
    /// until the next attempt, or `None` for the delay when a discovered
    /// relay was given up.
    pub fn closed(&mut self, id: ListenerId, now: Instant) -> Option<(PeerId, Option<Duration>)> {
        let relay = self.relay_of(id)?;
        let target = self.targets.get_mut(&relay)?;
        target.failures = target.failures.saturating_add(1);
        if !target.configured && target.failures >= self.max_discovered_failures {
            self.targets.remove(&relay);
            if self.given_up.len() >= MAX_REMEMBERED_RELAYS {
                self.given_up
                    .retain(|_, at| now.duration_since(*at) < GIVE_UP_FOR);
            }
            if self.given_up.len() < MAX_REMEMBERED_RELAYS {
                self.given_up.insert(relay, now);
            }
            return Some((relay, None));
        }
        let exponent = target.failures.saturating_sub(1).min(16);
        let delay = self
            .backoff_initial
            .saturating_mul(1 << exponent)
            .min(self.backoff_max);
        target.state = TargetState::Idle {
            not_before: Some(now + delay),
        };
        Some((relay, Some(delay)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn relay_addr(peer: PeerId) -> Multiaddr {
        format!("/ip4/203.0.113.1/tcp/4001/p2p/{peer}")
            .parse()
            .unwrap()
    }

    fn reservations(configured: &[Multiaddr]) -> Reservations {
        Reservations::new(
            configured,
            2,
            3,
            Duration::from_secs(1),
            Duration::from_secs(8),
        )
    }

    #[test]
    fn nothing_happens_until_wanted_and_everything_closes_when_unwanted() {
        let relay = PeerId::random();
        let mut r = reservations(&[relay_addr(relay)]);
        let now = Instant::now();
        assert_eq!(r.poll_actions(now).0, vec![]);
        assert_eq!(r.set_wanted(true), vec![]);
        let (actions, next) = r.poll_actions(now);
        assert_eq!(
            actions,
            vec![ReservationAction::Listen {
                relay,
                address: relay_addr(relay)
            }]
        );
        assert_eq!(next, None);
        let id = ListenerId::next();
        r.listening(&relay, id);
        assert_eq!(r.poll_actions(now).0, vec![], "one listener per relay");
        r.accepted(&relay);
        assert_eq!(r.active(), vec![relay]);
        assert_eq!(r.set_wanted(false), vec![ReservationAction::Close { id }]);
        assert!(r.active().is_empty());
    }

    #[test]
    fn failures_back_off_exponentially_up_to_the_cap() {
        let relay = PeerId::random();
        let mut r = reservations(&[relay_addr(relay)]);
        r.set_wanted(true);
        let mut now = Instant::now();
        let mut delays = Vec::new();
        for _ in 0..6 {
            let (actions, _) = r.poll_actions(now);
            assert_eq!(actions.len(), 1);
            let id = ListenerId::next();
            r.listening(&relay, id);
            let (who, delay) = r.closed(id, now).unwrap();
            assert_eq!(who, relay);
            let delay = delay.expect("a configured relay is never given up");
            delays.push(delay.as_secs());
            let (actions, next) = r.poll_actions(now);
            assert!(actions.is_empty(), "no retry before the backoff ends");
            assert_eq!(next, Some(now + delay));
            now += delay;
        }
        assert_eq!(delays, vec![1, 2, 4, 8, 8, 8]);
        // Success resets the count.
        let id = ListenerId::next();
        r.poll_actions(now);
        r.listening(&relay, id);
        r.accepted(&relay);
        assert_eq!(r.closed(id, now).unwrap().1, Some(Duration::from_secs(1)));
    }

    #[test]
    fn discovered_relays_fill_up_to_the_limit_and_are_dropped_after_repeated_failures() {
        let mut r = reservations(&[]);
        r.set_wanted(true);
        let peers: Vec<PeerId> = (0..3).map(|_| PeerId::random()).collect();
        let now = Instant::now();
        for p in &peers {
            r.add_candidate(*p, "/ip4/203.0.113.9/tcp/1".parse().unwrap(), now);
        }
        // A circuit address, or one naming another peer, is never a relay
        // candidate.
        let circuit = PeerId::random();
        r.add_candidate(
            circuit,
            format!("/ip4/203.0.113.9/tcp/1/p2p/{}/p2p-circuit", peers[0])
                .parse()
                .unwrap(),
            now,
        );
        r.add_candidate(
            circuit,
            format!("/ip4/203.0.113.9/tcp/1/p2p/{}/p2p/{circuit}", peers[0])
                .parse()
                .unwrap(),
            now,
        );
        assert!(!r.candidates.contains_key(&circuit));
        let (actions, _) = r.poll_actions(now);
        assert_eq!(actions.len(), 2, "at most max_discovered relays");
        let ReservationAction::Listen {
            relay: first,
            address,
        } = &actions[0]
        else {
            panic!("expected a listen");
        };
        assert_eq!(peer_of(address), Some(*first));
        let first = *first;
        for _ in 0..3 {
            let id = ListenerId::next();
            r.listening(&first, id);
            let (_, delay) = r.closed(id, now).unwrap();
            if delay.is_none() {
                break;
            }
            // Force an immediate retry for the test.
            r.targets.get_mut(&first).unwrap().state = TargetState::Idle { not_before: None };
        }
        assert!(!r.targets.contains_key(&first), "given up after 3 failures");
        let (actions, _) = r.poll_actions(now);
        let relays: Vec<PeerId> = actions
            .iter()
            .filter_map(|a| match a {
                ReservationAction::Listen { relay, .. } => Some(*relay),
                ReservationAction::Close { .. } => None,
            })
            .collect();
        assert_eq!(relays.len(), 2, "the next candidate replaces it");
        assert!(!relays.contains(&first));
        // Identify reports it again: it stays out for a while.
        r.add_candidate(first, "/ip4/203.0.113.9/tcp/1".parse().unwrap(), now);
        assert!(!r.candidates.contains_key(&first));
        r.add_candidate(
            first,
            "/ip4/203.0.113.9/tcp/1".parse().unwrap(),
            now + GIVE_UP_FOR,
        );
        assert!(r.candidates.contains_key(&first), "tried again later");
    }

    #[test]
    fn configured_relays_are_used_instead_of_discovered_ones() {
        let configured = PeerId::random();
        let mut r = reservations(&[relay_addr(configured)]);
        r.set_wanted(true);
        let now = Instant::now();
        r.add_candidate(
            PeerId::random(),
            "/ip4/203.0.113.9/tcp/1".parse().unwrap(),
            now,
        );
        let (actions, _) = r.poll_actions(now);
        assert_eq!(actions.len(), 1);
        assert!(
            matches!(&actions[0], ReservationAction::Listen { relay, .. } if *relay == configured)
        );
    }
}
