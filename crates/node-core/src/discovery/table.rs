//! The table of known peers: who we know, from which sources, at which
//! addresses, whether we are connected, and whether (and when) to dial them.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use libp2p::{Multiaddr, PeerId};

use crate::status::{DiscoverySource, KnownPeer};

/// Most peers the table remembers; beyond it the longest-unseen
/// disconnected peer is forgotten.
pub(crate) const MAX_KNOWN_PEERS: usize = 10_000;
/// Most addresses remembered per peer (newest kept).
pub(crate) const MAX_ADDRESSES_PER_PEER: usize = 16;
/// A discovered (non-bootstrap) peer that failed this many dials in a row
/// is forgotten and reported lost.
pub(crate) const MAX_DIAL_FAILURES: u32 = 8;

#[derive(Debug)]
struct PeerEntry {
    addresses: Vec<Multiaddr>,
    sources: Vec<DiscoverySource>,
    first_seen: SystemTime,
    last_seen: SystemTime,
    last_seen_at: Instant,
    connected: bool,
    dialing: bool,
    failures: u32,
    retry_at: Option<Instant>,
    foreign: bool,
}

/// What a failed dial did to a peer's entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DialOutcome {
    /// It stays, to be retried after `retry_in`.
    Retry {
        /// Consecutive failures.
        failures: u32,
        /// Backoff before the next dial.
        retry_in: Duration,
    },
    /// It failed too often and was forgotten.
    Forgotten,
    /// It was not in the table (already forgotten).
    Unknown,
}

/// What `PeerTable::report` changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Reported {
    /// The source reported this peer for the first time.
    pub(crate) new_for_source: bool,
}

/// The known-peer table.
#[derive(Debug)]
pub(crate) struct PeerTable {
    local: PeerId,
    peers: HashMap<PeerId, PeerEntry>,
}

impl PeerTable {
    pub(crate) fn new(local: PeerId) -> Self {
        Self {
            local,
            peers: HashMap::new(),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.peers.len()
    }

    /// A source reports `peer` at `addresses`. `None` for our own id.
    pub(crate) fn report(
        &mut self,
        peer: PeerId,
        addresses: &[Multiaddr],
        source: DiscoverySource,
    ) -> Option<Reported> {
        if peer == self.local {
            return None;
        }
        if !self.peers.contains_key(&peer)
            && self.peers.len() >= MAX_KNOWN_PEERS
            && !self.evict_one()
        {
            // Full of connected and bootstrap peers: remember no more.
            return None;
        }
        let now = SystemTime::now();
        let entry = self.peers.entry(peer).or_insert_with(|| PeerEntry {
            addresses: Vec::new(),
            sources: Vec::new(),
            first_seen: now,
            last_seen: now,
            last_seen_at: Instant::now(),
            connected: false,
            dialing: false,
            failures: 0,
            retry_at: None,
            foreign: false,
        });
        entry.last_seen = now;
        entry.last_seen_at = Instant::now();
        for addr in addresses {
            add_address(&mut entry.addresses, addr);
        }
        let new_for_source = !entry.sources.contains(&source);
        if new_for_source {
            entry.sources.push(source);
            entry.sources.sort_unstable();
        }
        Some(Reported { new_for_source })
    }

    /// Forget the disconnected peer seen longest ago; `false` if none can go.
    fn evict_one(&mut self) -> bool {
        let victim = self
            .peers
            .iter()
            .filter(|(_, e)| !e.connected && !e.sources.contains(&DiscoverySource::Bootstrap))
            .min_by_key(|(_, e)| e.last_seen_at)
            .map(|(id, _)| *id);
        victim.is_some_and(|id| self.peers.remove(&id).is_some())
    }

    /// Learn an address of a peer we already know (from the DHT or the swarm).
    pub(crate) fn add_address(&mut self, peer: &PeerId, addr: &Multiaddr) {
        if let Some(entry) = self.peers.get_mut(peer) {
            add_address(&mut entry.addresses, addr);
        }
    }

    pub(crate) fn set_connected(&mut self, peer: &PeerId, connected: bool) {
        if let Some(entry) = self.peers.get_mut(peer) {
            entry.connected = connected;
            entry.dialing = false;
            if connected {
                entry.failures = 0;
                entry.retry_at = None;
                entry.last_seen = SystemTime::now();
                entry.last_seen_at = Instant::now();
            }
        }
    }

    pub(crate) fn set_foreign(&mut self, peer: &PeerId) {
        if let Some(entry) = self.peers.get_mut(peer) {
            entry.foreign = true;
        }
    }

    /// The addresses to dial `peer` at, if the policy allows a dial now.
    pub(crate) fn dial_candidate(&mut self, peer: &PeerId, now: Instant) -> Option<Vec<Multiaddr>> {
        let entry = self.peers.get_mut(peer)?;
        let in_backoff = entry.retry_at.is_some_and(|at| at > now);
        if entry.connected
            || entry.dialing
            || entry.foreign
            || in_backoff
            || entry.addresses.is_empty()
        {
            return None;
        }
        entry.dialing = true;
        Some(entry.addresses.clone())
    }

    /// Record a failed dial.
    pub(crate) fn dial_failed(
        &mut self,
        peer: &PeerId,
        backoff: impl FnOnce(u32) -> Duration,
    ) -> DialOutcome {
        let Some(entry) = self.peers.get_mut(peer) else {
            return DialOutcome::Unknown;
        };
        entry.dialing = false;
        entry.failures = entry.failures.saturating_add(1);
        let bootstrap = entry.sources.contains(&DiscoverySource::Bootstrap);
        if !bootstrap && !entry.connected && entry.failures >= MAX_DIAL_FAILURES {
            self.peers.remove(peer);
            return DialOutcome::Forgotten;
        }
        let delay = backoff(entry.failures);
        entry.retry_at = Some(Instant::now() + delay);
        DialOutcome::Retry {
            failures: entry.failures,
            retry_in: delay,
        }
    }

    /// Disconnected, non-foreign, non-bootstrap peers whose backoff is over,
    /// with the source to credit a dial to; at most `limit`.
    pub(crate) fn redial_candidates(
        &self,
        now: Instant,
        limit: usize,
    ) -> Vec<(PeerId, DiscoverySource)> {
        self.peers
            .iter()
            .filter(|(_, e)| {
                !e.connected
                    && !e.dialing
                    && !e.foreign
                    && !e.addresses.is_empty()
                    && e.retry_at.is_none_or(|at| at <= now)
                    && !e.sources.contains(&DiscoverySource::Bootstrap)
            })
            .filter_map(|(id, e)| {
                let source = e
                    .sources
                    .iter()
                    .copied()
                    .find(|s| matches!(s, DiscoverySource::Mdns | DiscoverySource::Dht))?;
                Some((*id, source))
            })
            .take(limit)
            .collect()
    }

    /// Forget `peer` (its only source lost it); `true` if it was known and
    /// not connected.
    pub(crate) fn lose(&mut self, peer: &PeerId, source: DiscoverySource) -> bool {
        let Some(entry) = self.peers.get_mut(peer) else {
            return false;
        };
        entry.sources.retain(|s| *s != source);
        // Identify only tells addresses of peers we were connected to; it
        // does not keep a disconnected peer known.
        let still_known = entry
            .sources
            .iter()
            .any(|s| *s != DiscoverySource::Identify);
        if entry.connected || still_known {
            return false;
        }
        self.peers.remove(peer);
        true
    }

    pub(crate) fn snapshot(&self) -> Vec<KnownPeer> {
        let mut peers: Vec<KnownPeer> = self
            .peers
            .iter()
            .map(|(id, e)| KnownPeer {
                peer_id: *id,
                addresses: e.addresses.clone(),
                sources: e.sources.clone(),
                first_seen: e.first_seen,
                last_seen: e.last_seen,
                connected: e.connected,
                failures: e.failures,
                foreign: e.foreign,
            })
            .collect();
        peers.sort_by_key(|p| p.peer_id);
        peers
    }
}

fn add_address(list: &mut Vec<Multiaddr>, addr: &Multiaddr) {
    if let Some(pos) = list.iter().position(|a| a == addr) {
        let existing = list.remove(pos);
        list.push(existing);
        return;
    }
    if list.len() >= MAX_ADDRESSES_PER_PEER {
        list.remove(0);
    }
    list.push(addr.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> Multiaddr {
        format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap()
    }

    #[test]
    fn reports_merge_sources_and_addresses() {
        let mut table = PeerTable::new(PeerId::random());
        let p = PeerId::random();
        assert!(
            table
                .report(p, &[addr(1)], DiscoverySource::Mdns)
                .unwrap()
                .new_for_source
        );
        assert!(
            !table
                .report(p, &[addr(1)], DiscoverySource::Mdns)
                .unwrap()
                .new_for_source
        );
        assert!(
            table
                .report(p, &[addr(2)], DiscoverySource::Dht)
                .unwrap()
                .new_for_source
        );
        let snap = table.snapshot();
        assert_eq!(
            snap[0].sources,
            [DiscoverySource::Mdns, DiscoverySource::Dht]
        );
        assert_eq!(snap[0].addresses, [addr(1), addr(2)]);
    }

    #[test]
    fn own_id_is_never_recorded() {
        let me = PeerId::random();
        let mut table = PeerTable::new(me);
        assert!(table.report(me, &[addr(1)], DiscoverySource::Dht).is_none());
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn addresses_are_bounded_newest_kept() {
        let mut table = PeerTable::new(PeerId::random());
        let p = PeerId::random();
        let many: Vec<Multiaddr> = (0..40).map(addr).collect();
        table.report(p, &many, DiscoverySource::Identify);
        let snap = table.snapshot();
        assert_eq!(snap[0].addresses.len(), MAX_ADDRESSES_PER_PEER);
        assert_eq!(snap[0].addresses.last(), Some(&addr(39)));
    }

    #[test]
    fn dial_policy_skips_connected_dialing_foreign_and_backoff() {
        let mut table = PeerTable::new(PeerId::random());
        let p = PeerId::random();
        let now = Instant::now();
        assert!(table.dial_candidate(&p, now).is_none(), "unknown");
        table.report(p, &[], DiscoverySource::Dht);
        assert!(table.dial_candidate(&p, now).is_none(), "no address");
        table.report(p, &[addr(1)], DiscoverySource::Dht);
        assert_eq!(table.dial_candidate(&p, now), Some(vec![addr(1)]));
        assert!(table.dial_candidate(&p, now).is_none(), "already dialing");
        assert_eq!(
            table.dial_failed(&p, |_| Duration::from_secs(10)),
            DialOutcome::Retry {
                failures: 1,
                retry_in: Duration::from_secs(10)
            }
        );
        assert!(
            table.dial_candidate(&p, Instant::now()).is_none(),
            "in backoff"
        );
        assert!(
            table
                .dial_candidate(&p, Instant::now() + Duration::from_secs(11))
                .is_some()
        );
        table.set_connected(&p, true);
        assert!(
            table.dial_candidate(&p, Instant::now()).is_none(),
            "connected"
        );
        table.set_connected(&p, false);
        table.set_foreign(&p);
        assert!(
            table.dial_candidate(&p, Instant::now()).is_none(),
            "foreign"
        );
    }

    #[test]
    fn unreachable_discovered_peers_are_forgotten_bootstrap_ones_kept() {
        let mut table = PeerTable::new(PeerId::random());
        let p = PeerId::random();
        let b = PeerId::random();
        table.report(p, &[addr(1)], DiscoverySource::Mdns);
        table.report(b, &[addr(2)], DiscoverySource::Bootstrap);
        for _ in 1..MAX_DIAL_FAILURES {
            assert!(matches!(
                table.dial_failed(&p, |_| Duration::ZERO),
                DialOutcome::Retry { .. }
            ));
        }
        assert_eq!(
            table.dial_failed(&p, |_| Duration::ZERO),
            DialOutcome::Forgotten
        );
        assert_eq!(
            table.dial_failed(&p, |_| Duration::ZERO),
            DialOutcome::Unknown
        );
        for _ in 0..MAX_DIAL_FAILURES * 2 {
            assert!(matches!(
                table.dial_failed(&b, |_| Duration::ZERO),
                DialOutcome::Retry { .. }
            ));
        }
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn losing_the_last_source_forgets_a_disconnected_peer() {
        let mut table = PeerTable::new(PeerId::random());
        let p = PeerId::random();
        table.report(p, &[addr(1)], DiscoverySource::Mdns);
        table.report(p, &[addr(1)], DiscoverySource::Dht);
        assert!(
            !table.lose(&p, DiscoverySource::Mdns),
            "still known via the DHT"
        );
        assert!(table.lose(&p, DiscoverySource::Dht));
        assert_eq!(table.len(), 0);
    }

    #[test]
    fn identify_alone_does_not_keep_a_lost_peer() {
        let mut table = PeerTable::new(PeerId::random());
        let p = PeerId::random();
        table.report(p, &[addr(1)], DiscoverySource::Mdns);
        table.report(p, &[addr(1)], DiscoverySource::Identify);
        assert!(table.lose(&p, DiscoverySource::Mdns));
    }

    #[test]
    fn redial_candidates_are_disconnected_discovered_peers_out_of_backoff() {
        let mut table = PeerTable::new(PeerId::random());
        let (dht, boot, ident) = (PeerId::random(), PeerId::random(), PeerId::random());
        table.report(dht, &[addr(1)], DiscoverySource::Dht);
        table.report(boot, &[addr(2)], DiscoverySource::Bootstrap);
        table.report(ident, &[addr(3)], DiscoverySource::Identify);
        let now = Instant::now();
        assert_eq!(
            table.redial_candidates(now, 10),
            vec![(dht, DiscoverySource::Dht)]
        );
        table.dial_failed(&dht, |_| Duration::from_secs(60));
        assert!(table.redial_candidates(Instant::now(), 10).is_empty());
        assert_eq!(
            table
                .redial_candidates(Instant::now() + Duration::from_secs(61), 10)
                .len(),
            1
        );
    }
}
