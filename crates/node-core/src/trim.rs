//! Which connections to close when there are too many.
//!
//! When the number of established connections reaches `conn_mgr_high`, the
//! node closes connections until `conn_mgr_low` remain, never closing one
//! younger than `conn_mgr_grace` nor a protected one. Redundant connections
//! (a second connection to the same peer) go first, then the youngest
//! connections past their grace period: the older a connection, the longer
//! it has proven useful.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::swarm::ConnectionId;

/// The trimming thresholds (from `conn_mgr_low`, `conn_mgr_high`, `conn_mgr_grace`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrimPolicy {
    /// Keep at least this many connections.
    pub low: usize,
    /// Start trimming at this many connections.
    pub high: usize,
    /// Never close connections younger than this.
    pub grace: Duration,
}

/// What the policy needs to know of one open connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrimCandidate {
    /// The connection.
    pub id: ConnectionId,
    /// The peer at the other end.
    pub peer: PeerId,
    /// When it was established.
    pub established: Instant,
    /// Never trim it (bootstrap peers and the like).
    pub protected: bool,
}

impl TrimPolicy {
    /// The connections to close now, in the order to close them.
    #[must_use]
    pub fn connections_to_close(
        &self,
        connections: &[TrimCandidate],
        now: Instant,
    ) -> Vec<ConnectionId> {
        if connections.len() < self.high {
            return Vec::new();
        }
        let excess = connections.len().saturating_sub(self.low);
        // A connection is redundant when its peer has an older one: closing
        // it costs nothing, while closing the oldest would drop the peer.
        let mut oldest: HashMap<PeerId, (Instant, ConnectionId)> = HashMap::new();
        for c in connections {
            let entry = oldest.entry(c.peer).or_insert((c.established, c.id));
            if (c.established, c.id) < *entry {
                *entry = (c.established, c.id);
            }
        }
        let mut candidates: Vec<&TrimCandidate> = connections
            .iter()
            .filter(|c| !c.protected && now.saturating_duration_since(c.established) >= self.grace)
            .collect();
        // Redundant connections first, then youngest first; the id breaks ties
        // so the choice is deterministic.
        candidates.sort_by_key(|c| {
            let redundant = oldest.get(&c.peer).is_some_and(|(_, id)| *id != c.id);
            (!redundant, std::cmp::Reverse(c.established), c.id)
        });
        candidates.into_iter().take(excess).map(|c| c.id).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: usize, peer: PeerId, age_s: u64, now: Instant, protected: bool) -> TrimCandidate {
        TrimCandidate {
            id: ConnectionId::new_unchecked(id),
            peer,
            established: now - Duration::from_secs(age_s),
            protected,
        }
    }

    fn policy(low: usize, high: usize, grace_s: u64) -> TrimPolicy {
        TrimPolicy {
            low,
            high,
            grace: Duration::from_secs(grace_s),
        }
    }

    #[test]
    fn below_high_nothing_is_trimmed() {
        let now = Instant::now() + Duration::from_secs(1000);
        let conns: Vec<_> = (0..4)
            .map(|i| conn(i, PeerId::random(), 100, now, false))
            .collect();
        assert!(policy(1, 5, 0).connections_to_close(&conns, now).is_empty());
    }

    #[test]
    fn trims_down_to_low_youngest_first_sparing_grace_and_protected() {
        let now = Instant::now() + Duration::from_secs(1000);
        let conns = vec![
            conn(0, PeerId::random(), 500, now, false), // oldest: kept
            conn(1, PeerId::random(), 300, now, false),
            conn(2, PeerId::random(), 200, now, false),
            conn(3, PeerId::random(), 5, now, false), // in grace
            conn(4, PeerId::random(), 100, now, true), // protected
        ];
        let chosen = policy(2, 5, 30).connections_to_close(&conns, now);
        let ids: Vec<_> = conns.iter().map(|c| c.id).collect();
        assert_eq!(chosen, vec![ids[2], ids[1], ids[0]]);
    }

    #[test]
    fn grace_can_leave_more_than_low() {
        let now = Instant::now() + Duration::from_secs(1000);
        let conns: Vec<_> = (0..5)
            .map(|i| conn(i, PeerId::random(), 1, now, false))
            .collect();
        assert!(
            policy(1, 5, 60)
                .connections_to_close(&conns, now)
                .is_empty()
        );
    }

    #[test]
    fn redundant_connections_go_first() {
        let now = Instant::now() + Duration::from_secs(1000);
        let twice = PeerId::random();
        let conns = vec![
            conn(0, PeerId::random(), 10, now, false),
            conn(1, twice, 400, now, false),
            conn(2, twice, 300, now, false),
            conn(3, PeerId::random(), 20, now, false),
        ];
        let chosen = policy(3, 4, 0).connections_to_close(&conns, now);
        assert_eq!(chosen, vec![ConnectionId::new_unchecked(2)]);
    }

    #[test]
    fn a_peer_keeps_its_oldest_connection() {
        let now = Instant::now() + Duration::from_secs(1000);
        let x = PeerId::random();
        let conns = vec![
            conn(0, x, 500, now, false),
            conn(1, x, 400, now, false),
            conn(2, PeerId::random(), 300, now, false),
            conn(3, PeerId::random(), 200, now, false),
        ];
        // Two must go: x's younger connection, then the youngest other peer.
        let chosen = policy(2, 4, 0).connections_to_close(&conns, now);
        assert_eq!(
            chosen,
            vec![
                ConnectionId::new_unchecked(1),
                ConnectionId::new_unchecked(3)
            ]
        );
    }
}
