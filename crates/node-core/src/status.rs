//! What a node reports about itself: the types of `NodeHandle::status`,
//! `peers`, `connected_peers`, `known_peers` and `discovery` (and of the
//! API's `GET /v1/status`, `/v1/peers`, `/v1/discovery`).

use std::fmt;
use std::time::{Duration, SystemTime};

use libp2p::{Multiaddr, PeerId};
use ollamacron_config::NodeConfig;
use serde::Serialize;

use crate::event::Direction;
use crate::state::NodeState;

/// How a peer was learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiscoverySource {
    /// Local-network multicast.
    Mdns,
    /// The Kademlia DHT (namespace providers, routing table).
    Dht,
    /// A configured bootstrap peer.
    Bootstrap,
    /// A peer's identify information (it connected to us, or told us its addresses).
    Identify,
}

impl DiscoverySource {
    /// Every source, in a fixed order.
    pub const ALL: [Self; 4] = [Self::Mdns, Self::Dht, Self::Bootstrap, Self::Identify];

    /// Lower-case name, as in metrics and the API.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mdns => "mdns",
            Self::Dht => "dht",
            Self::Bootstrap => "bootstrap",
            Self::Identify => "identify",
        }
    }
}

impl fmt::Display for DiscoverySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One known peer, as `NodeHandle::known_peers` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KnownPeer {
    /// The peer.
    pub peer_id: PeerId,
    /// Addresses we know for it, newest last.
    pub addresses: Vec<Multiaddr>,
    /// Every source that reported it.
    pub sources: Vec<DiscoverySource>,
    /// When it was first reported.
    pub first_seen: SystemTime,
    /// When it was last reported or connected.
    pub last_seen: SystemTime,
    /// Whether a connection is open.
    pub connected: bool,
    /// Consecutive failed dials.
    pub failures: u32,
    /// Whether identify showed it is not an Ollamacron node.
    pub foreign: bool,
}

/// One connected peer, as `NodeHandle::connected_peers` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectedPeer {
    /// The peer.
    pub peer_id: PeerId,
    /// Its address on each open connection.
    pub addresses: Vec<Multiaddr>,
    /// Who dialed the oldest open connection.
    pub direction: Direction,
    /// How long the oldest open connection has been up.
    pub connected_for: Duration,
    /// Identify protocol version, once the peer has identified itself.
    pub protocol_version: Option<String>,
    /// Identify agent version, once the peer has identified itself.
    pub agent_version: Option<String>,
    /// Latest ping round-trip time.
    pub rtt: Option<Duration>,
}

/// Whether peers can reach this node directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reachability {
    /// Reachable from the internet.
    Public,
    /// Behind NAT or a firewall.
    Private,
    /// Not known (not forced, and not detected yet).
    Unknown,
}

impl From<ollamacron_nat::Reachability> for Reachability {
    fn from(r: ollamacron_nat::Reachability) -> Self {
        match r {
            ollamacron_nat::Reachability::Public => Self::Public,
            ollamacron_nat::Reachability::Private => Self::Private,
            ollamacron_nat::Reachability::Unknown => Self::Unknown,
        }
    }
}

/// How we are connected to a peer, in [`PeerInfo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionKind {
    /// At least one direct connection (it wins over relayed ones).
    Direct,
    /// Only through a relay.
    Relayed,
    /// Not connected.
    None,
}

/// NAT traversal at a glance, in [`NodeStatus`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TraversalStatus {
    /// Relays holding a reservation of ours (peers reach us through them).
    pub relays: Vec<PeerId>,
    /// Whether we serve as a relay right now (public, relay service on).
    pub relay_service: bool,
    /// Circuits our relay service opened for other peers.
    pub circuits_served: u64,
    /// Hole punching (DCUtR) since start.
    pub hole_punch: HolePunchCounts,
}

/// DCUtR outcomes since start, in [`TraversalStatus`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HolePunchCounts {
    /// Relayed connections on which hole punching started.
    pub attempts: u64,
    /// Punches that produced a direct connection.
    pub succeeded: u64,
    /// Punches that failed (the connection stays relayed).
    pub failed: u64,
}

/// Connection counts in [`NodeStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ConnectionCounts {
    /// Peers with at least one connection.
    pub peers: usize,
    /// Connections the peers opened.
    pub inbound: usize,
    /// Connections we opened.
    pub outbound: usize,
}

/// Service counts in [`NodeStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ServiceCounts {
    /// Services this node offers.
    pub local: usize,
    /// Services of other nodes, from verified records.
    pub remote: usize,
    /// Other nodes whose verified record we hold.
    pub nodes: usize,
}

/// The node at a glance, from [`NodeHandle::status`] (and `GET /v1/status`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeStatus {
    /// Our peer id.
    pub peer_id: PeerId,
    /// Lifecycle state.
    pub state: NodeState,
    /// `ollamacron-node` version.
    pub version: String,
    /// Seconds since start.
    pub uptime_secs: f64,
    /// Addresses we listen on.
    pub listen_addrs: Vec<Multiaddr>,
    /// Addresses peers see us at (observed and confirmed).
    pub external_addrs: Vec<Multiaddr>,
    /// Whether peers can reach us directly.
    pub reachability: Reachability,
    /// Relays, hole punching and relay service.
    pub nat: TraversalStatus,
    /// Open connections.
    pub connections: ConnectionCounts,
    /// Discovery sources and their counters.
    pub discovery: DiscoveryStatus,
    /// Services known.
    pub services: ServiceCounts,
    /// The gateway and the API, and who can reach them.
    pub http: HttpStatus,
}

/// The node's HTTP servers as `GET /v1/status` shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpStatus {
    /// The Ollama-compatible gateway, when it runs.
    pub gateway: Option<HttpServerStatus>,
    /// The local API, when it runs.
    pub api: Option<HttpServerStatus>,
}

/// One HTTP server of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HttpServerStatus {
    /// Its configured address.
    pub listen: std::net::SocketAddr,
    /// It listens beyond loopback.
    pub beyond_loopback: bool,
    /// Every request needs a bearer key.
    pub requires_key: bool,
    /// Anyone who reaches it may use it: beyond loopback with no key.
    pub open_to_network: bool,
}

impl HttpServerStatus {
    fn new(listen: std::net::SocketAddr, requires_key: bool) -> Self {
        let beyond_loopback = !listen.ip().is_loopback();
        Self {
            listen,
            beyond_loopback,
            requires_key,
            open_to_network: beyond_loopback && !requires_key,
        }
    }
}

impl HttpStatus {
    /// What `config` runs.
    #[must_use]
    pub fn of(config: &NodeConfig) -> Self {
        Self {
            gateway: config.enable_gateway.then(|| {
                HttpServerStatus::new(
                    config.gateway_listen,
                    !config.gateway_api_keys.is_empty() || config.gateway_api_key_file.is_some(),
                )
            }),
            api: config.enable_metrics.then(|| {
                HttpServerStatus::new(
                    config.api_listen,
                    !config.api_keys.is_empty() || config.api_key_file.is_some(),
                )
            }),
        }
    }
}

/// One known peer as `GET /v1/peers` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PeerInfo {
    /// The peer.
    pub peer_id: PeerId,
    /// Discovery sources that reported it.
    pub sources: Vec<DiscoverySource>,
    /// Addresses we know for it.
    pub addresses: Vec<Multiaddr>,
    /// Whether a connection is open.
    pub connected: bool,
    /// Direct, relayed (only through a relay) or none.
    pub connection: ConnectionKind,
    /// Latest ping round trip, in milliseconds: of a direct connection
    /// when there is one, else of the relay path.
    pub latency_ms: Option<f64>,
    /// When it was last seen (reported or connected), Unix milliseconds.
    pub last_seen_ms: u64,
    /// Its identify agent, once it identified itself.
    pub agent_version: Option<String>,
    /// Consecutive failed dials.
    pub failures: u32,
    /// This node's gateway's breaker for it: `closed`, `open` (cooling
    /// down after failed requests) or `half_open` (cooled down, the next
    /// request probes it).
    pub breaker: BreakerState,
}

/// Whether a discovery source is on and working, for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SourceStatus {
    /// The source.
    pub source: DiscoverySource,
    /// Turned on by configuration.
    pub enabled: bool,
    /// Running (enabled and able to work).
    pub active: bool,
    /// What it is doing or why it is not.
    pub detail: String,
}

/// Counters of one discovery source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SourceStats {
    /// Peers this source reported for the first time.
    pub peers_discovered: u64,
    /// Dials of peers from this source that failed.
    pub connection_failures: u64,
    /// Dials of peers from this source that succeeded.
    pub successful_connections: u64,
    /// Peers this source reported gone.
    pub peers_lost: u64,
}

/// Discovery as a whole, from `NodeHandle::discovery`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiscoveryStatus {
    /// Each source's state.
    pub sources: Vec<SourceStatus>,
    /// Each source's counters.
    pub stats: Vec<(DiscoverySource, SourceStats)>,
    /// Peers in the known-peer table.
    pub known_peers: usize,
    /// Peers in the Kademlia routing table.
    pub dht_routing_table_size: usize,
    /// Namespace providers found through the DHT.
    pub dht_providers: usize,
}

/// Where a gateway's breaker for a serving node stands, in [`PeerInfo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    /// Requests go to it.
    Closed,
    /// Cooling down after failed requests: not chosen while another node
    /// can serve.
    Open,
    /// Cooled down: the next request probes it.
    HalfOpen,
}

impl BreakerState {
    /// As the API shows it: `closed`, `open` or `half_open`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }
}
