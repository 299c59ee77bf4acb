#![doc = include_str!("../README.md")]

mod config;
mod inner;
#[doc(hidden)]
pub mod reservations;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, ListenOpts, NetworkBehaviour,
    NewExternalAddrCandidate, THandler, THandlerInEvent, THandlerOutEvent, ToSwarm,
};
use libp2p::{PeerId, autonat, dcutr, relay, upnp};
use tokio::time::{Instant, Sleep};

pub use config::{Config, RelayLimits};
use inner::{Inner, InnerEvent};
use reservations::{ReservationAction, Reservations};

/// The protocol a relay server speaks (circuit relay v2 "hop"); a peer that
/// lists it in identify can be reserved on.
pub const RELAY_HOP_PROTOCOL: libp2p::StreamProtocol = relay::HOP_PROTOCOL_NAME;

/// Whether peers can dial this node directly.
///
/// Serialised as `public`, `private` or `unknown` (as [`Reachability::as_str`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reachability {
    /// Peers can dial us (AutoNAT dial-backs succeed, or forced).
    Public,
    /// Peers cannot dial us: behind NAT or a firewall (or forced).
    Private,
    /// Not known yet.
    Unknown,
}

impl Reachability {
    /// `public`, `private` or `unknown`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Private => "private",
            Self::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Reachability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Whether an address goes through a relay (`/p2p-circuit`).
#[must_use]
pub fn is_relayed(address: &Multiaddr) -> bool {
    address.iter().any(|p| p == Protocol::P2pCircuit)
}

/// Whether an address is on the loopback interface (useless to a peer on
/// another host).
#[must_use]
pub fn is_loopback(address: &Multiaddr) -> bool {
    address.iter().any(|p| match p {
        Protocol::Ip4(ip) => ip.is_loopback(),
        Protocol::Ip6(ip) => ip.is_loopback(),
        _ => false,
    })
}

/// The peers we reach only through a relay, shared with the transport.
///
/// A direct dial to such a peer is (or may become) a hole punch, and a TCP
/// hole punch needs the dial to leave from the listening port: a transport
/// that otherwise dials from fresh ports asks [`RelayedPeers::contains`]
/// before choosing one.
#[derive(Debug, Clone, Default)]
pub struct RelayedPeers(Arc<RwLock<HashSet<PeerId>>>);

impl RelayedPeers {
    /// Whether `peer` is connected through a relay only.
    #[must_use]
    pub fn contains(&self, peer: &PeerId) -> bool {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(peer)
    }

    fn set(&self, peer: PeerId, relayed_only: bool) {
        let mut set = self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if relayed_only {
            set.insert(peer);
        } else {
            set.remove(&peer);
        }
    }
}

/// What the NAT behaviour reports.
#[derive(Debug)]
pub enum Event {
    /// Our reachability changed (detected by AutoNAT).
    ReachabilityChanged {
        /// The new value.
        reachability: Reachability,
        /// The address a peer dialed us back on, when public.
        address: Option<Multiaddr>,
    },
    /// We asked a relay for a reservation.
    ReservationRequested {
        /// The relay.
        relay: PeerId,
        /// Its address.
        address: Multiaddr,
    },
    /// A relay accepted (or renewed) our reservation: peers can reach us
    /// through it.
    ReservationAccepted {
        /// The relay.
        relay: PeerId,
        /// A renewal of an existing reservation.
        renewal: bool,
    },
    /// A reservation was refused, expired or lost with the relay.
    ReservationClosed {
        /// The relay.
        relay: PeerId,
        /// Why, when it was an error.
        reason: Option<String>,
        /// When we try again; `None` when a discovered relay was given up.
        retry_in: Option<Duration>,
    },
    /// A connection through a relay was established.
    RelayedConnection {
        /// The peer at the other end (inbound) or the relay (outbound).
        peer: PeerId,
        /// Someone dialed us through our reservation.
        inbound: bool,
    },
    /// DCUtR tried to turn a relayed connection into a direct one.
    HolePunch {
        /// The peer.
        peer: PeerId,
        /// The direct connection, or why there is none.
        result: Result<ConnectionId, String>,
    },
    /// What our relay server did for others.
    RelayServer(RelayServerEvent),
    /// UPnP mapped a port on the gateway.
    PortMapped {
        /// Our listen address.
        local: Multiaddr,
        /// The gateway's address that forwards to it.
        external: Multiaddr,
    },
    /// A UPnP mapping could not be renewed.
    PortMappingExpired {
        /// The gateway's address that no longer forwards.
        external: Multiaddr,
    },
    /// UPnP could not map ports.
    PortMappingUnavailable {
        /// Why.
        reason: &'static str,
    },
}

/// What a relay server did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayServerEvent {
    /// A peer got (or renewed) a reservation.
    ReservationAccepted {
        /// The peer.
        peer: PeerId,
        /// It renewed one it held.
        renewed: bool,
    },
    /// A reservation was refused (a limit, or the rate limiter).
    ReservationDenied {
        /// The peer.
        peer: PeerId,
        /// The status sent back.
        status: String,
    },
    /// A reservation ended (expired or its connection closed).
    ReservationEnded {
        /// The peer.
        peer: PeerId,
    },
    /// A circuit between two peers was opened.
    CircuitAccepted {
        /// Who asked.
        src: PeerId,
        /// Who it reaches.
        dst: PeerId,
    },
    /// A circuit was refused.
    CircuitDenied {
        /// Who asked.
        src: PeerId,
        /// Who it would reach.
        dst: PeerId,
        /// The status sent back.
        status: String,
    },
    /// A circuit closed.
    CircuitClosed {
        /// Who asked.
        src: PeerId,
        /// Who it reached.
        dst: PeerId,
    },
    /// The relay protocol is now offered (`true`, we are public) or not.
    Serving(bool),
}

/// AutoNAT, circuit relay v2 (server and client), DCUtR and UPnP as one
/// behaviour, with reachability tracking and automatic relay reservations
/// while private.
///
/// Build it with [`Behaviour::new`], which also returns the relay client
/// transport to put in front of the node's transport.
pub struct Behaviour {
    /// This node (never a relay of its own).
    local_peer: PeerId,
    inner: Inner,
    forced: Option<Reachability>,
    reachability: Reachability,
    auto_relay: bool,
    reservations: Reservations,
    retry: Option<Pin<Box<Sleep>>>,
    retry_at: Option<Instant>,
    listens_beyond_loopback: bool,
    /// We listen on an IPv4 address beyond loopback.
    listens_ipv4: bool,
    /// The last public verdict was confirmed over IPv6 only: IPv4 peers
    /// may still need a relay (IPv4 behind NAT, IPv6 open).
    public_over_ipv6: bool,
    /// The relay service is offered now.
    serving: bool,
    /// Open (direct, relayed) connections per peer.
    connection_kinds: HashMap<PeerId, (usize, usize)>,
    relayed_peers: RelayedPeers,
    queued: VecDeque<ToSwarm<Event, THandlerInEvent<Inner>>>,
}

impl fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Behaviour")
            .field("reachability", &self.reachability)
            .field("forced", &self.forced)
            .field("reservations", &self.reservations)
            .finish_non_exhaustive()
    }
}

impl Behaviour {
    /// The behaviour and the relay client transport. Combine the transport
    /// with the node's own (`relay_transport.or_transport(…)`, upgraded
    /// with the same security and muxer) so `/p2p-circuit` addresses can be
    /// dialed and listened on.
    #[must_use]
    pub fn new(local_peer: PeerId, config: &Config) -> (Self, relay::client::Transport) {
        let (relay_transport, relay_client) = relay::client::new(local_peer);
        (
            Self::with_relay_client(local_peer, config, relay_client),
            relay_transport,
        )
    }

    /// The behaviour around a relay client made elsewhere (as
    /// `SwarmBuilder::with_relay_client` does).
    #[must_use]
    pub fn with_relay_client(
        local_peer: PeerId,
        config: &Config,
        relay_client: relay::client::Behaviour,
    ) -> Self {
        let autonat = autonat::Behaviour::new(
            local_peer,
            autonat::Config {
                timeout: config.autonat_timeout,
                boot_delay: config.autonat_boot_delay,
                retry_interval: config.autonat_retry_interval,
                refresh_interval: config.autonat_refresh_interval,
                only_global_ips: config.autonat_only_global_ips,
                ..autonat::Config::default()
            },
        );
        let relay_server = config.relay_server.map(|limits| {
            let mut server = relay::Behaviour::new(local_peer, limits.to_relay_config());
            // Offered only while we are public, which we decide below.
            server.set_status(Some(relay::Status::Disable));
            server
        });
        let inner = Inner {
            autonat,
            relay_server: relay_server.into(),
            relay_client,
            dcutr: config
                .hole_punch
                .then(|| dcutr::Behaviour::new(local_peer))
                .into(),
            upnp: config.upnp.then(upnp::tokio::Behaviour::default).into(),
        };
        let mut behaviour = Self {
            local_peer,
            inner,
            forced: config.force_reachability,
            reachability: Reachability::Unknown,
            auto_relay: config.auto_relay,
            reservations: Reservations::new(
                // A fleet-wide config may list this node among its relays:
                // it never reserves on itself.
                &config
                    .relay_nodes
                    .iter()
                    .filter(|a| reservations::peer_of(a) != Some(local_peer))
                    .cloned()
                    .collect::<Vec<_>>(),
                config.max_discovered_relays,
                config.max_discovered_relay_failures,
                config.reservation_backoff_initial,
                config.reservation_backoff_max,
            ),
            retry: None,
            retry_at: None,
            listens_beyond_loopback: false,
            listens_ipv4: false,
            public_over_ipv6: false,
            serving: false,
            connection_kinds: HashMap::new(),
            relayed_peers: RelayedPeers::default(),
            queued: VecDeque::new(),
        };
        // Until AutoNAT decides, reachability is unknown: reservations are
        // wanted from the start (a node behind NAT is dialable through its
        // relay in its first seconds, as go-libp2p's autorelay does).
        behaviour.apply(config.force_reachability.unwrap_or(Reachability::Unknown));
        behaviour
    }

    /// The peers reached only through a relay, kept up to date (for the
    /// transport, see [`RelayedPeers`]).
    #[must_use]
    pub fn relayed_peers(&self) -> RelayedPeers {
        self.relayed_peers.clone()
    }

    /// Count a connection opened (`+1`) or closed (`-1`) and update
    /// [`RelayedPeers`].
    fn track_connection(&mut self, peer: PeerId, relayed: bool, opened: bool) {
        let counts = self.connection_kinds.entry(peer).or_default();
        let slot = if relayed {
            &mut counts.1
        } else {
            &mut counts.0
        };
        *slot = if opened {
            slot.saturating_add(1)
        } else {
            slot.saturating_sub(1)
        };
        let (direct, relayed_count) = *counts;
        if direct == 0 && relayed_count == 0 {
            self.connection_kinds.remove(&peer);
        }
        self.relayed_peers
            .set(peer, direct == 0 && relayed_count > 0);
    }

    /// Whether a confirmed address of ours is worth offering for hole
    /// punching: not relayed, and loopback only on a loopback-only node.
    fn is_punch_candidate(&self, address: &Multiaddr) -> bool {
        let useless_loopback = self.listens_beyond_loopback && is_loopback(address);
        !is_relayed(address) && !useless_loopback
    }

    /// Our reachability: forced, detected, or unknown.
    #[must_use]
    pub fn reachability(&self) -> Reachability {
        self.reachability
    }

    /// Whether the reachability is forced by configuration.
    #[must_use]
    pub fn is_forced(&self) -> bool {
        self.forced.is_some()
    }

    /// Relays holding an accepted reservation of ours.
    #[must_use]
    pub fn active_relays(&self) -> Vec<PeerId> {
        self.reservations.active()
    }

    /// Whether we offer relay service right now.
    #[must_use]
    pub fn is_relaying(&self) -> bool {
        self.serving
    }

    /// A connected peer speaks [`RELAY_HOP_PROTOCOL`]: it may be reserved
    /// on when no relay is configured. The first address that is not
    /// itself relayed is used.
    pub fn add_relay_candidate(&mut self, peer: PeerId, addresses: &[Multiaddr]) {
        if peer == self.local_peer {
            return;
        }
        if let Some(address) = addresses.iter().find(|a| !is_relayed(a)) {
            self.reservations
                .add_candidate(peer, address.clone(), Instant::now());
        }
    }

    /// Set the reachability and act on it: relay service only while
    /// public, reservations while not public (private or unknown).
    fn apply(&mut self, reachability: Reachability) {
        self.reachability = reachability;
        if let Some(server) = self.inner.relay_server.as_mut() {
            let serve = reachability == Reachability::Public;
            let was_serving = self.serving;
            server.set_status(Some(if serve {
                relay::Status::Enable
            } else {
                relay::Status::Disable
            }));
            // libp2p reports no status change for a status set by hand.
            self.serving = serve;
            if serve != was_serving {
                self.emit(Event::RelayServer(RelayServerEvent::Serving(serve)));
            }
        }
        // Reserve while private and while unknown; only a public node needs
        // none, unless it was found public over IPv6 only while it also
        // listens on IPv4 (IPv4 behind NAT, IPv6 open: IPv4 peers need the relay).
        let wanted = wants_reservations(
            self.auto_relay,
            reachability,
            self.public_over_ipv6,
            self.listens_ipv4,
        );
        for action in self.reservations.set_wanted(wanted) {
            if let ReservationAction::Close { id } = action {
                self.queued.push_back(ToSwarm::RemoveListener { id });
            }
        }
    }

    fn emit(&mut self, event: Event) {
        self.queued.push_back(ToSwarm::GenerateEvent(event));
    }

    fn on_inner(&mut self, event: InnerEvent) {
        match event {
            InnerEvent::Autonat(autonat::Event::StatusChanged { old, new }) => {
                tracing::debug!(?old, ?new, "AutoNAT status changed");
                if self.forced.is_some() {
                    return;
                }
                let (reachability, address) = match new {
                    autonat::NatStatus::Public(address) => (Reachability::Public, Some(address)),
                    autonat::NatStatus::Private => (Reachability::Private, None),
                    autonat::NatStatus::Unknown => (Reachability::Unknown, None),
                };
                let over_ipv6 = address
                    .as_ref()
                    .is_some_and(|a| matches!(a.iter().next(), Some(Protocol::Ip6(_))));
                if over_ipv6 != self.public_over_ipv6 {
                    // Same verdict, another family: the reservations may change.
                    self.public_over_ipv6 = over_ipv6;
                    if reachability == self.reachability {
                        self.apply(reachability);
                    }
                }
                if reachability != self.reachability {
                    self.apply(reachability);
                    self.emit(Event::ReachabilityChanged {
                        reachability,
                        address,
                    });
                }
            }
            InnerEvent::Autonat(autonat::Event::OutboundProbe(probe)) => {
                tracing::debug!(?probe, "AutoNAT probe");
            }
            InnerEvent::Autonat(autonat::Event::InboundProbe(probe)) => {
                tracing::debug!(?probe, "AutoNAT probe from a peer");
            }
            InnerEvent::RelayServer(event) => {
                if let Some(event) = server_event(event) {
                    self.emit(Event::RelayServer(event));
                }
            }
            InnerEvent::RelayClient(relay::client::Event::ReservationReqAccepted {
                relay_peer_id,
                renewal,
                ..
            }) => {
                self.reservations.accepted(&relay_peer_id);
                self.emit(Event::ReservationAccepted {
                    relay: relay_peer_id,
                    renewal,
                });
            }
            InnerEvent::RelayClient(relay::client::Event::OutboundCircuitEstablished {
                relay_peer_id,
                ..
            }) => self.emit(Event::RelayedConnection {
                peer: relay_peer_id,
                inbound: false,
            }),
            InnerEvent::RelayClient(relay::client::Event::InboundCircuitEstablished {
                src_peer_id,
                ..
            }) => self.emit(Event::RelayedConnection {
                peer: src_peer_id,
                inbound: true,
            }),
            InnerEvent::Dcutr(dcutr::Event {
                remote_peer_id,
                result,
            }) => self.emit(Event::HolePunch {
                peer: remote_peer_id,
                result: result.map_err(|e| e.to_string()),
            }),
            InnerEvent::Upnp(event) => match event {
                upnp::Event::NewExternalAddr {
                    local_addr,
                    external_addr,
                } => self.emit(Event::PortMapped {
                    local: local_addr,
                    external: external_addr,
                }),
                upnp::Event::ExpiredExternalAddr { external_addr, .. } => {
                    self.emit(Event::PortMappingExpired {
                        external: external_addr,
                    });
                }
                upnp::Event::GatewayNotFound => self.emit(Event::PortMappingUnavailable {
                    reason: "no UPnP gateway answered on the local network",
                }),
                upnp::Event::NonRoutableGateway => {
                    self.emit(Event::PortMappingUnavailable {
                        reason: "the UPnP gateway is itself behind another NAT",
                    });
                }
            },
        }
    }

    /// Open circuit listeners the reservations call for; arm the retry timer.
    fn drive_reservations(&mut self) {
        let now = Instant::now();
        let (actions, next) = self.reservations.poll_actions(now);
        for action in actions {
            match action {
                ReservationAction::Listen { relay, address } => {
                    let opts = ListenOpts::new(address.clone().with(Protocol::P2pCircuit));
                    self.reservations.listening(&relay, opts.listener_id());
                    tracing::debug!(%relay, %address, "requesting a relay reservation");
                    self.queued.push_back(ToSwarm::ListenOn { opts });
                    self.emit(Event::ReservationRequested { relay, address });
                }
                ReservationAction::Close { id } => {
                    self.queued.push_back(ToSwarm::RemoveListener { id });
                }
            }
        }
        if next != self.retry_at {
            self.retry_at = next;
            self.retry = next.map(|at| Box::pin(tokio::time::sleep_until(at)));
        }
    }
}

/// Whether to hold relay reservations: with auto relay on, unless public
/// everywhere (public, and not only over IPv6 while also on IPv4).
fn wants_reservations(
    auto_relay: bool,
    reachability: Reachability,
    public_over_ipv6: bool,
    listens_ipv4: bool,
) -> bool {
    let public_everywhere =
        reachability == Reachability::Public && !(public_over_ipv6 && listens_ipv4);
    auto_relay && !public_everywhere
}

/// The relay server events worth reporting (the deprecated ones are logged
/// by libp2p itself).
#[allow(deprecated)]
fn server_event(event: relay::Event) -> Option<RelayServerEvent> {
    Some(match event {
        relay::Event::ReservationReqAccepted {
            src_peer_id,
            renewed,
        } => RelayServerEvent::ReservationAccepted {
            peer: src_peer_id,
            renewed,
        },
        relay::Event::ReservationReqDenied {
            src_peer_id,
            status,
        } => RelayServerEvent::ReservationDenied {
            peer: src_peer_id,
            status: format!("{status:?}"),
        },
        relay::Event::ReservationClosed { src_peer_id }
        | relay::Event::ReservationTimedOut { src_peer_id } => {
            RelayServerEvent::ReservationEnded { peer: src_peer_id }
        }
        relay::Event::CircuitReqAccepted {
            src_peer_id,
            dst_peer_id,
        } => RelayServerEvent::CircuitAccepted {
            src: src_peer_id,
            dst: dst_peer_id,
        },
        relay::Event::CircuitReqDenied {
            src_peer_id,
            dst_peer_id,
            status,
        } => RelayServerEvent::CircuitDenied {
            src: src_peer_id,
            dst: dst_peer_id,
            status: format!("{status:?}"),
        },
        relay::Event::CircuitClosed {
            src_peer_id,
            dst_peer_id,
            ..
        } => RelayServerEvent::CircuitClosed {
            src: src_peer_id,
            dst: dst_peer_id,
        },
        relay::Event::StatusChanged { status } => {
            RelayServerEvent::Serving(status == relay::Status::Enable)
        }
        _ => return None,
    })
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = THandler<Inner>;
    type ToSwarm = Event;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.inner
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

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
        match &event {
            FromSwarm::ListenerClosed(closed) => {
                if let Some((relay, retry_in)) =
                    self.reservations.closed(closed.listener_id, Instant::now())
                {
                    let reason = closed.reason.err().map(|e| error_chain(e));
                    self.emit(Event::ReservationClosed {
                        relay,
                        reason,
                        retry_in,
                    });
                }
            }
            FromSwarm::ConnectionEstablished(established) => {
                self.track_connection(established.peer_id, established.endpoint.is_relayed(), true);
            }
            FromSwarm::ConnectionClosed(closed) => {
                self.track_connection(closed.peer_id, closed.endpoint.is_relayed(), false);
                if closed.remaining_established == 0 {
                    self.reservations.remove_candidate(&closed.peer_id);
                }
            }
            FromSwarm::NewListenAddr(listen)
                if !is_relayed(listen.addr) && !is_loopback(listen.addr) =>
            {
                self.listens_beyond_loopback = true;
                if matches!(listen.addr.iter().next(), Some(Protocol::Ip4(_))) {
                    self.listens_ipv4 = true;
                }
            }
            // A loopback address only helps a peer on the same host: it is
            // a candidate only for a node that listens on nothing else.
            FromSwarm::ExternalAddrConfirmed(confirmed)
                if self.is_punch_candidate(confirmed.addr) =>
            {
                // DCUtR learns hole punch candidates only from observed
                // addresses, and the swarm drops an observation equal to
                // a confirmed address (a forced-public node's listen
                // address, a UPnP mapping, an AutoNAT result). Those are
                // the best candidates of all: hand them over as well.
                self.inner
                    .dcutr
                    .on_swarm_event(FromSwarm::NewExternalAddrCandidate(
                        NewExternalAddrCandidate {
                            addr: confirmed.addr,
                        },
                    ));
            }
            _ => {}
        }
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
            if let Some(event) = self.queued.pop_front() {
                return Poll::Ready(event);
            }
            if let Some(retry) = self.retry.as_mut()
                && retry.as_mut().poll(cx).is_ready()
            {
                self.retry = None;
                self.retry_at = None;
            }
            self.drive_reservations();
            if let Some(retry) = self.retry.as_mut() {
                // Register the waker for the (possibly new) deadline.
                let _ = retry.as_mut().poll(cx);
            }
            if !self.queued.is_empty() {
                continue;
            }
            match self.inner.poll(cx) {
                Poll::Ready(ToSwarm::GenerateEvent(event)) => self.on_inner(event),
                Poll::Ready(other) => {
                    return Poll::Ready(other.map_out(|_| {
                        unreachable!("generated events are matched in the arm above")
                    }));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// An error with its sources, `a: b: c`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reservations_are_held_unless_public_everywhere() {
        use Reachability::{Private, Public, Unknown};
        assert!(wants_reservations(true, Private, false, true));
        assert!(
            wants_reservations(true, Unknown, false, true),
            "while unknown too"
        );
        assert!(!wants_reservations(true, Public, false, true));
        assert!(
            wants_reservations(true, Public, true, true),
            "public over IPv6 only, IPv4 may be behind NAT"
        );
        assert!(
            !wants_reservations(true, Public, true, false),
            "an IPv6-only node public over IPv6 is public"
        );
        assert!(
            !wants_reservations(false, Private, false, true),
            "auto relay off"
        );
    }

    #[test]
    fn reachability_serialises_as_its_lowercase_name() {
        for reachability in [
            Reachability::Public,
            Reachability::Private,
            Reachability::Unknown,
        ] {
            let json = serde_json::to_string(&reachability).unwrap();
            assert_eq!(json, format!("\"{}\"", reachability.as_str()));
            let back: Reachability = serde_json::from_str(&json).unwrap();
            assert_eq!(back, reachability);
        }
        assert!(serde_json::from_str::<Reachability>("\"Public\"").is_err());
    }

    #[test]
    fn setters_change_only_their_field() {
        let limits = RelayLimits::default()
            .with_max_reservations(1)
            .with_max_reservations_per_peer(2)
            .with_reservation_duration(Duration::from_secs(3))
            .with_max_circuits(4)
            .with_max_circuits_per_peer(5)
            .with_max_circuit_duration(Duration::from_secs(6))
            .with_max_circuit_bytes(7);
        assert_eq!(limits.max_reservations, 1);
        assert_eq!(limits.max_reservations_per_peer, 2);
        assert_eq!(limits.reservation_duration, Duration::from_secs(3));
        assert_eq!(limits.max_circuits, 4);
        assert_eq!(limits.max_circuits_per_peer, 5);
        assert_eq!(limits.max_circuit_duration, Duration::from_secs(6));
        assert_eq!(limits.max_circuit_bytes, 7);
        assert_eq!(
            RelayLimits::default().with_max_circuits(4).max_reservations,
            RelayLimits::default().max_reservations
        );

        let relay: Multiaddr = format!("/ip4/203.0.113.1/tcp/4001/p2p/{}", PeerId::random())
            .parse()
            .unwrap();
        let config = Config::default()
            .with_force_reachability(Some(Reachability::Private))
            .with_autonat_only_global_ips(false)
            .with_autonat_boot_delay(Duration::from_secs(11))
            .with_autonat_retry_interval(Duration::from_secs(12))
            .with_autonat_refresh_interval(Duration::from_secs(13))
            .with_autonat_timeout(Duration::from_secs(14))
            .with_relay_server(Some(limits))
            .with_auto_relay(false)
            .with_relay_nodes(vec![relay.clone()])
            .with_max_discovered_relays(15)
            .with_reservation_backoff_initial(Duration::from_secs(16))
            .with_reservation_backoff_max(Duration::from_secs(17))
            .with_max_discovered_relay_failures(18)
            .with_hole_punch(false)
            .with_upnp(true);
        assert_eq!(config.force_reachability, Some(Reachability::Private));
        assert!(!config.autonat_only_global_ips);
        assert_eq!(config.autonat_boot_delay, Duration::from_secs(11));
        assert_eq!(config.autonat_retry_interval, Duration::from_secs(12));
        assert_eq!(config.autonat_refresh_interval, Duration::from_secs(13));
        assert_eq!(config.autonat_timeout, Duration::from_secs(14));
        assert_eq!(config.relay_server, Some(limits));
        assert!(!config.auto_relay);
        assert_eq!(config.relay_nodes, vec![relay]);
        assert_eq!(config.max_discovered_relays, 15);
        assert_eq!(config.reservation_backoff_initial, Duration::from_secs(16));
        assert_eq!(config.reservation_backoff_max, Duration::from_secs(17));
        assert_eq!(config.max_discovered_relay_failures, 18);
        assert!(!config.hole_punch);
        assert!(config.upnp);
        assert_eq!(
            Config::default().with_upnp(true).hole_punch,
            Config::default().hole_punch
        );
    }
}
