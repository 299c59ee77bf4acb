#![doc = include_str!("../README.md")]

use std::collections::{BTreeMap, VecDeque};
use std::task::{Context, Poll};
use std::time::Duration;

use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{PeerId, mdns};

/// mDNS settings.
///
/// Start from [`Config::default`] and change what you need with the
/// `with_*` setters; new settings can be added without breaking callers.
///
/// ```
/// use std::time::Duration;
/// use ollamacron_discovery_mdns::Config;
///
/// let config = Config::default().with_query_interval(Duration::from_secs(5));
/// assert_eq!(config.query_interval, Duration::from_secs(5));
/// assert!(!config.enable_ipv6);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// Interval of mDNS queries.
    pub query_interval: Duration,
    /// How long an answer stays valid without being refreshed.
    pub ttl: Duration,
    /// Use IPv6 multicast instead of IPv4.
    pub enable_ipv6: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            query_interval: Duration::from_secs(10),
            ttl: Duration::from_secs(60),
            enable_ipv6: false,
        }
    }
}

impl Config {
    /// Interval of mDNS queries. See [`Config::query_interval`].
    #[must_use]
    pub fn with_query_interval(mut self, interval: Duration) -> Self {
        self.query_interval = interval;
        self
    }

    /// How long an answer stays valid without being refreshed. See
    /// [`Config::ttl`].
    #[must_use]
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Use IPv6 multicast instead of IPv4. See [`Config::enable_ipv6`].
    #[must_use]
    pub fn with_enable_ipv6(mut self, enable_ipv6: bool) -> Self {
        self.enable_ipv6 = enable_ipv6;
        self
    }
}

/// Why mDNS could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start mDNS (multicast on UDP port 5353): {0}")]
pub struct MdnsError(#[from] std::io::Error);

/// A peer seen or lost on the local network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A peer answered, with these addresses.
    Discovered {
        /// The peer.
        peer: PeerId,
        /// Its advertised addresses.
        addresses: Vec<Multiaddr>,
    },
    /// These addresses of a peer were not refreshed within the TTL.
    Expired {
        /// The peer.
        peer: PeerId,
        /// The addresses that expired.
        addresses: Vec<Multiaddr>,
    },
}

/// libp2p's tokio mDNS behaviour with per-peer [`Event`]s.
pub struct Behaviour {
    inner: mdns::tokio::Behaviour,
    local_peer: PeerId,
    events: VecDeque<Event>,
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Behaviour")
            .field("local_peer", &self.local_peer)
            .finish_non_exhaustive()
    }
}

impl Behaviour {
    /// Start mDNS for `local_peer`. Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`MdnsError`] when the multicast socket cannot be opened.
    pub fn new(config: Config, local_peer: PeerId) -> Result<Self, MdnsError> {
        let inner = mdns::tokio::Behaviour::new(
            mdns::Config {
                ttl: config.ttl,
                query_interval: config.query_interval,
                enable_ipv6: config.enable_ipv6,
            },
            local_peer,
        )?;
        Ok(Self {
            inner,
            local_peer,
            events: VecDeque::new(),
        })
    }

    /// Peers currently known through mDNS.
    pub fn discovered_peers(&self) -> impl Iterator<Item = &PeerId> {
        self.inner.discovered_nodes()
    }

    fn group(&mut self, pairs: Vec<(PeerId, Multiaddr)>, expired: bool) {
        self.events
            .extend(per_peer(self.local_peer, pairs, expired));
    }
}

/// libp2p's `(peer, address)` pairs as one event per peer with all its
/// addresses (in the order given), peers in id order, without `local_peer`.
fn per_peer(
    local_peer: PeerId,
    pairs: Vec<(PeerId, Multiaddr)>,
    expired: bool,
) -> impl Iterator<Item = Event> {
    let mut by_peer: BTreeMap<PeerId, Vec<Multiaddr>> = BTreeMap::new();
    for (peer, addr) in pairs {
        if peer != local_peer {
            by_peer.entry(peer).or_default().push(addr);
        }
    }
    by_peer.into_iter().map(move |(peer, addresses)| {
        if expired {
            Event::Expired { peer, addresses }
        } else {
            Event::Discovered { peer, addresses }
        }
    })
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = <mdns::tokio::Behaviour as NetworkBehaviour>::ConnectionHandler;
    type ToSwarm = Event;

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner.handle_established_inbound_connection(
            connection_id,
            peer,
            local_addr,
            remote_addr,
        )
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.inner.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.inner.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )
    }

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        self.inner.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.inner
            .on_connection_handler_event(peer, connection_id, event);
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Poll::Ready(ToSwarm::GenerateEvent(event));
            }
            match self.inner.poll(cx) {
                Poll::Ready(ToSwarm::GenerateEvent(mdns::Event::Discovered(pairs))) => {
                    self.group(pairs, false);
                }
                Poll::Ready(ToSwarm::GenerateEvent(mdns::Event::Expired(pairs))) => {
                    self.group(pairs, true);
                }
                Poll::Ready(other) => {
                    // Proven invariant: both generated events are matched above.
                    return Poll::Ready(
                        other.map_out(|_| unreachable!("mDNS events are handled above")),
                    );
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> Multiaddr {
        format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap()
    }

    #[test]
    fn setters_change_only_their_field() {
        let config = Config::default()
            .with_query_interval(Duration::from_secs(1))
            .with_ttl(Duration::from_secs(2))
            .with_enable_ipv6(true);
        assert_eq!(config.query_interval, Duration::from_secs(1));
        assert_eq!(config.ttl, Duration::from_secs(2));
        assert!(config.enable_ipv6);
        let ttl_only = Config::default().with_ttl(Duration::from_secs(2));
        assert_eq!(ttl_only.query_interval, Config::default().query_interval);
    }

    #[test]
    fn pairs_become_one_event_per_peer_without_the_local_peer() {
        let local = PeerId::random();
        let (a, b) = (PeerId::random(), PeerId::random());
        let pairs = vec![(a, addr(1)), (local, addr(2)), (b, addr(3)), (a, addr(4))];
        let mut expected = vec![
            Event::Discovered {
                peer: a,
                addresses: vec![addr(1), addr(4)],
            },
            Event::Discovered {
                peer: b,
                addresses: vec![addr(3)],
            },
        ];
        expected.sort_by_key(|e| match e {
            Event::Discovered { peer, .. } | Event::Expired { peer, .. } => *peer,
        });
        assert_eq!(
            per_peer(local, pairs.clone(), false).collect::<Vec<_>>(),
            expected
        );

        let expired: Vec<Event> = per_peer(local, pairs, true).collect();
        assert_eq!(expired.len(), 2);
        for (event, discovered) in expired.iter().zip(&expected) {
            let (
                Event::Expired { peer, addresses },
                Event::Discovered {
                    peer: p,
                    addresses: a,
                },
            ) = (event, discovered)
            else {
                panic!("expected expiries, got {event:?}");
            };
            assert_eq!((peer, addresses), (p, a));
        }
    }

    #[test]
    fn only_the_local_peer_makes_no_event() {
        let local = PeerId::random();
        assert_eq!(per_peer(local, vec![(local, addr(1))], false).count(), 0);
        assert_eq!(per_peer(local, Vec::new(), true).count(), 0);
    }
}
