//! Peers that hand us records no honest node would pass on (see
//! [`RejectReason::proves_misbehaviour`]): a few are a mistake or a
//! neighbour's bug and only counted; [`INVALID_RECORDS_BEFORE_BAN`] within
//! [`INVALID_RECORD_WINDOW`] and the peer is reported to be banned.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use ollamacron_service_registry::RejectReason;

/// Invalid records from one peer, within [`INVALID_RECORD_WINDOW`], that
/// get it banned.
pub(crate) const INVALID_RECORDS_BEFORE_BAN: u32 = 8;
/// How long invalid records of a peer count towards its ban.
pub(crate) const INVALID_RECORD_WINDOW: Duration = Duration::from_secs(60);
/// Most peers counted at once (each is a connected peer; beyond, the
/// oldest count makes room).
const MAX_COUNTED_PEERS: usize = 4096;

/// Invalid records per peer within the window.
#[derive(Debug, Default)]
pub(super) struct InvalidRecords {
    /// Per peer: how many, since when.
    counts: HashMap<PeerId, (u32, Instant)>,
}

impl InvalidRecords {
    /// Count a record `peer` handed us that was refused for `reason`: the
    /// count when it reaches [`INVALID_RECORDS_BEFORE_BAN`] (then it starts
    /// again); `None` below it, or when `reason` does not prove the peer
    /// misbehaves.
    pub(super) fn count(&mut self, peer: PeerId, reason: &RejectReason) -> Option<u32> {
        if !reason.proves_misbehaviour() {
            return None;
        }
        let now = Instant::now();
        if !self.counts.contains_key(&peer) && self.counts.len() >= MAX_COUNTED_PEERS {
            self.expire();
            if self.counts.len() >= MAX_COUNTED_PEERS {
                let oldest = self
                    .counts
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(p, _)| *p);
                if let Some(oldest) = oldest {
                    self.counts.remove(&oldest);
                }
            }
        }
        let entry = self.counts.entry(peer).or_insert((0, now));
        if now.saturating_duration_since(entry.1) >= INVALID_RECORD_WINDOW {
            *entry = (0, now);
        }
        entry.0 += 1;
        if entry.0 < INVALID_RECORDS_BEFORE_BAN {
            return None;
        }
        self.counts.remove(&peer);
        Some(INVALID_RECORDS_BEFORE_BAN)
    }

    /// Forget counts whose window is over.
    pub(super) fn expire(&mut self) {
        let now = Instant::now();
        self.counts
            .retain(|_, (_, since)| now.saturating_duration_since(*since) < INVALID_RECORD_WINDOW);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_records_no_honest_node_passes_on_count_towards_a_ban() {
        let mut invalid = InvalidRecords::default();
        let peer = PeerId::random();
        let expired = RejectReason::Expired {
            expires_at: 1,
            now: 2,
        };
        for _ in 0..100 {
            assert_eq!(invalid.count(peer, &expired), None, "clocks differ");
        }
        for _ in 1..INVALID_RECORDS_BEFORE_BAN {
            assert_eq!(invalid.count(peer, &RejectReason::BadSignature), None);
        }
        assert_eq!(
            invalid.count(peer, &RejectReason::BadSignature),
            Some(INVALID_RECORDS_BEFORE_BAN)
        );
        // Another peer's count is its own.
        assert_eq!(
            invalid.count(PeerId::random(), &RejectReason::BadSignature),
            None
        );
    }

    #[test]
    fn counted_peers_are_bounded() {
        let mut invalid = InvalidRecords::default();
        for _ in 0..MAX_COUNTED_PEERS + 100 {
            invalid.count(PeerId::random(), &RejectReason::BadSignature);
        }
        assert!(invalid.counts.len() <= MAX_COUNTED_PEERS);
    }
}
