//! Health checks: every node we hold services of is checked for liveness
//! (connected, or dialed), and every `health_check_url` we may probe is
//! probed over HTTP. Liveness never depends on spare capacity.

use std::collections::HashSet;
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::swarm::ToSwarm;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId};
use ollamacron_scoring::ReliabilityWindow;

use super::{Behaviour, unix_ms};

/// Most addresses from a peer's own record used to dial it for a health
/// check (only those naming the peer; the DHT and identify supply the rest).
const MAX_HEALTH_DIAL_ADDRESSES: usize = 4;
/// Longest an HTTP health probe may take.
const HTTP_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most health-check dials in flight at once: in a large mesh every node
/// holds the records of every other, and a check round must not dial them
/// all at once. Peers least recently seen well go first; the rest wait for
/// the next round.
const MAX_HEALTH_DIALS_IN_FLIGHT: usize = 8;
/// Most HTTP probes in flight at once.
const MAX_CONCURRENT_PROBES: usize = 16;
/// Probe results waiting for the registry.
pub(super) const PROBE_QUEUE_LEN: usize = MAX_CONCURRENT_PROBES * 4;

/// Outcomes of health checks of one peer or service.
#[derive(Debug, Default)]
pub(super) struct Health {
    pub(super) window: ReliabilityWindow,
    pub(super) last_good_ms: Option<u64>,
}

impl Health {
    pub(super) fn record(&mut self, ok: bool, now_ms: u64) {
        self.window.record(ok);
        if ok {
            self.last_good_ms = Some(now_ms);
        }
    }
}

/// What a health probe found.
pub(super) struct ProbeResult {
    peer: PeerId,
    service_id: String,
    ok: bool,
}

impl Behaviour {
    /// Check every node we hold services of (connection and ping; dial it
    /// when not connected) and probe every `health_check_url` we may.
    pub(super) fn run_health_checks(&mut self) {
        let mut peers: Vec<(Option<u64>, PeerId)> = self
            .cache
            .iter()
            .map(|(p, _)| (self.peer_health.get(p).and_then(|h| h.last_good_ms), *p))
            .collect();
        // Never seen well first, then the longest ago.
        peers.sort_unstable();
        for (_, peer) in peers {
            self.check_peer(peer);
        }
        let me = self.local_peer;
        let mut probes: Vec<(PeerId, String, String)> = self
            .local
            .iter()
            .filter_map(|s| Some((me, s.id.clone(), s.health_check_url.clone()?)))
            .collect();
        // Local services without a URL are up while the node is.
        let now = unix_ms();
        let unprobed: Vec<String> = self
            .local
            .iter()
            .filter(|s| s.health_check_url.is_none())
            .map(|s| s.id.clone())
            .collect();
        for id in unprobed {
            self.service_health
                .entry((me, id))
                .or_default()
                .record(true, now);
        }
        for (peer, cached) in self.cache.iter() {
            let hosts = self.peer_hosts(peer);
            for service in &cached.record.services {
                if let Some(url) = &service.health_check_url
                    && url_host(url).is_some_and(|h| hosts.contains(&h))
                {
                    probes.push((*peer, service.id.clone(), url.clone()));
                }
            }
        }
        for (peer, service_id, url) in probes {
            if self.probes_in_flight >= MAX_CONCURRENT_PROBES {
                break;
            }
            self.probes_in_flight += 1;
            let tx = self.probe_tx.clone();
            tokio::spawn(async move {
                let ok = http_probe(&url).await;
                let _ = tx
                    .send(ProbeResult {
                        peer,
                        service_id,
                        ok,
                    })
                    .await;
            });
        }
    }

    /// IP addresses the peer is connected from: a peer's health URL is
    /// probed only on its own machine, never on an address it merely names.
    fn peer_hosts(&self, peer: &PeerId) -> HashSet<String> {
        self.connections
            .values()
            .filter(|(p, _)| p == peer)
            // Over a relay the address is the relay's, not the peer's.
            .filter(|(_, remote)| !remote.iter().any(|p| matches!(p, Protocol::P2pCircuit)))
            .flat_map(|(_, remote)| remote.iter())
            .filter_map(|p| match p {
                Protocol::Ip4(ip) => Some(ip.to_string()),
                Protocol::Ip6(ip) => Some(ip.to_string()),
                _ => None,
            })
            .collect()
    }

    pub(super) fn on_probe_result(&mut self, result: ProbeResult) {
        self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
        let me = self.local_peer;
        let now = unix_ms();
        let known = if result.peer == me {
            self.local.get(&result.service_id).is_some()
        } else {
            self.cache.get(&result.peer).is_some()
        };
        if !known {
            return;
        }
        if result.peer == me && result.ok {
            self.local.set_last_health_check(&result.service_id, now);
        }
        self.service_health
            .entry((result.peer, result.service_id))
            .or_default()
            .record(result.ok, now);
    }

    /// One liveness check of a peer: connected (ping keeps it honest) is
    /// good; otherwise dial it, and the dial's outcome counts. Whether it
    /// has spare capacity plays no part.
    pub(super) fn check_peer(&mut self, peer: PeerId) {
        let now = unix_ms();
        if self.connected.contains(&peer) {
            self.peer_health.entry(peer).or_default().record(true, now);
            return;
        }
        if self.health_dials.len() >= MAX_HEALTH_DIALS_IN_FLIGHT
            || self.connected.len() >= self.health_dials_below_peers
            || self.health_dials.values().any(|p| *p == peer)
        {
            return;
        }
        let addresses = self.record_addresses_of(&peer);
        // A global IPv6 address first: when both sides have one, the
        // direct path is dialed before anything else (a relay is for peers
        // that cannot be reached directly). All are dialed at once, so a
        // firewalled IPv6 path costs nothing.
        let mut addresses = addresses;
        addresses.sort_by_key(|a| !is_global_ipv6(a));
        let opts = DialOpts::peer_id(peer)
            .addresses(addresses)
            .extend_addresses_through_behaviour()
            // Not blocked by a dial already under way: discovery may be
            // stuck on an address that never answers (a LAN address behind
            // another NAT) while this dial has the relay address.
            .condition(PeerCondition::Disconnected)
            .build();
        self.health_dials.insert(opts.connection_id(), peer);
        self.queued.push_back(ToSwarm::Dial { opts });
    }

    /// Addresses of `peer` from its own record: by peer id the DHT and
    /// identify know its addresses; from its record only a few that name
    /// it, so a record cannot make every node connect to addresses of a
    /// third party.
    pub(super) fn record_addresses_of(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.cache
            .get(peer)
            .into_iter()
            .flat_map(|c| c.record.services.iter())
            .flat_map(|s| s.addresses.iter())
            .filter_map(|a| a.parse::<Multiaddr>().ok())
            .filter(|a| matches!(a.iter().last(), Some(Protocol::P2p(p)) if p == *peer))
            .filter(|a| self.usable_remote(a))
            .collect::<HashSet<_>>()
            .into_iter()
            .take(MAX_HEALTH_DIAL_ADDRESSES)
            .collect()
    }

    /// `peer` signed a new record at `issued_at_ms` (and it reached us):
    /// it was alive then, whether or not we are connected to it.
    pub(super) fn signed_at(&mut self, peer: PeerId, issued_at_ms: u64) {
        let issued = issued_at_ms.min(unix_ms());
        let health = self.peer_health.entry(peer).or_default();
        if health.last_good_ms.is_none_or(|at| at < issued) {
            health.last_good_ms = Some(issued);
        }
    }

    /// A health-check dial finished.
    pub(super) fn on_health_dial(&mut self, connection: libp2p::swarm::ConnectionId, ok: bool) {
        if let Some(peer) = self.health_dials.remove(&connection) {
            if !ok {
                tracing::debug!(%peer, "health check cannot dial");
            }
            self.peer_health
                .entry(peer)
                .or_default()
                .record(ok, unix_ms());
        }
    }
}

/// A global unicast IPv6 address (not loopback, link-local, unique-local
/// or documentation), not through a relay.
fn is_global_ipv6(addr: &Multiaddr) -> bool {
    let Some(Protocol::Ip6(ip)) = addr.iter().next() else {
        return false;
    };
    let segments = ip.segments();
    // 2000::/3 is global unicast; 2001:db8::/32 is for documentation.
    (segments[0] & 0xe000) == 0x2000
        && !(segments[0] == 0x2001 && segments[1] == 0x0db8)
        && !ollamacron_nat::is_relayed(addr)
}

/// The host of an `http://host[:port]/…` URL (brackets of IPv6 removed).
fn url_host(url: &str) -> Option<String> {
    let rest = url.strip_prefix("http://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().map(str::to_owned);
    }
    authority.split(':').next().map(str::to_owned)
}

/// GET `url`; healthy when it answers 2xx within `HTTP_PROBE_TIMEOUT`.
async fn http_probe(url: &str) -> bool {
    let Ok(uri) = url.parse::<axum::http::Uri>() else {
        return false;
    };
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        ollamacron_http::http_client();
    match tokio::time::timeout(HTTP_PROBE_TIMEOUT, client.get(uri)).await {
        Ok(Ok(response)) => response.status().is_success(),
        Ok(Err(e)) => {
            tracing::debug!(%url, error = %e, "health probe failed");
            false
        }
        Err(_) => {
            tracing::debug!(%url, "health probe timed out");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ollamacron_service_registry::ScoreWeights;

    #[test]
    fn configured_weights_default_to_the_scorers() {
        let w = ollamacron_config::ScoreWeightsConfig::default();
        let d = ScoreWeights::default();
        assert_eq!(
            [w.reliability, w.latency, w.throughput, w.availability],
            [d.reliability, d.latency, d.throughput, d.availability]
        );
    }

    #[test]
    fn only_global_ipv6_addresses_count_as_global() {
        let global: Multiaddr = "/ip6/2a01:4f8::1/tcp/1".parse().unwrap();
        assert!(is_global_ipv6(&global));
        for not in [
            "/ip6/::1/tcp/1",
            "/ip6/fe80::1/tcp/1",
            "/ip6/fd00::2/tcp/1",
            "/ip6/2001:db8::1/tcp/1",
            "/ip4/8.8.8.8/tcp/1",
            "/ip6/2a01:4f8::1/tcp/1/p2p/12D3KooWAf3JtkEWALnUhiyWVZFspkm78WeUM8vCWLBD72EQovKZ/p2p-circuit",
        ] {
            assert!(!is_global_ipv6(&not.parse().unwrap()), "{not}");
        }
    }

    #[test]
    fn url_hosts() {
        assert_eq!(
            url_host("http://127.0.0.1:8080/health").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(url_host("http://[::1]:80/").as_deref(), Some("::1"));
        assert_eq!(
            url_host("http://user@10.0.0.1/x").as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(
            url_host("http://example.org").as_deref(),
            Some("example.org")
        );
        assert_eq!(url_host("https://example.org"), None);
    }
}
