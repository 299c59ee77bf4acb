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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MdnsConfig {
    /// Interval of mDNS queries.
    pub query_interval: Duration,
    /// How long an answer stays valid without being refreshed.
    pub ttl: Duration,
    /// Use IPv6 multicast instead of IPv4.
    pub enable_ipv6: bool,
}

impl Default for MdnsConfig {
    fn default() -> Self {
        Self {
            query_interval: Duration::from_secs(10),
            ttl: Duration::from_secs(60),
            enable_ipv6: false,
        }
    }
}

/// Why mDNS could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start mDNS (multicast on UDP port 5353): {0}")]
pub struct MdnsError(#[from] std::io::Error);

/// A peer seen or lost on the local network.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MdnsEvent {
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

/// libp2p's tokio mDNS behaviour with per-peer [`MdnsEvent`]s.
pub struct Behaviour {
    inner: mdns::tokio::Behaviour,
    local_peer: PeerId,
    events: VecDeque<MdnsEvent>,
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
    pub fn new(config: MdnsConfig, local_peer: PeerId) -> Result<Self, MdnsError> {
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
        let mut by_peer: BTreeMap<PeerId, Vec<Multiaddr>> = BTreeMap::new();
        for (peer, addr) in pairs {
            if peer != self.local_peer {
                by_peer.entry(peer).or_default().push(addr);
            }
        }
        self.events
            .extend(by_peer.into_iter().map(|(peer, addresses)| {
                if expired {
                    MdnsEvent::Expired { peer, addresses }
                } else {
                    MdnsEvent::Discovered { peer, addresses }
                }
            }));
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = <mdns::tokio::Behaviour as NetworkBehaviour>::ConnectionHandler;
    type ToSwarm = MdnsEvent;

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
