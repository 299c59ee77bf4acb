//! What a node reports about itself: the types of `NodeHandle::status`,
//! `peers`, `connected_peers`, `known_peers` and `discovery` (and of the
//! API's `GET /v1/status`, `/v1/peers`, `/v1/discovery`).

use std::fmt;
use std::time::{Duration, SystemTime};

use libp2p::{Multiaddr, PeerId};
use ollamacron_config::NodeConfig;
use serde::{Deserialize, Serialize};

use crate::event::Direction;
use crate::state::NodeState;

/// How a peer was learned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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

/// Whether peers can reach this node directly: the NAT crate's, the one
/// type for it (serialised `public`, `private`, `unknown`).
pub use ollamacron_nat::Reachability;

/// How we are connected to a peer, in [`PeerInfo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConnectionKind {
    /// At least one direct connection (it wins over relayed ones).
    Direct,
    /// Only through a relay.
    Relayed,
    /// Not connected.
    None,
}

impl ConnectionKind {
    /// Lower-case name, as in the API.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Relayed => "relayed",
            Self::None => "none",
        }
    }
}

impl fmt::Display for ConnectionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// NAT traversal at a glance, in [`NodeStatus`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraversalStatus {
    /// Relays holding a reservation of ours (peers reach us through them).
    pub relays: Vec<PeerId>,
    /// Whether we serve as a relay right now (public, relay service on).
    pub relay_service: bool,
    /// Circuits our relay service opened for other peers.
    pub circuits_served: u64,
    /// Hole punching (DCUtR) since start.
    pub hole_punch: HolePunchCounts,
    /// Why the node is or is not reachable, in words an operator can act
    /// on: the verdict and its source, the reservations held, what to do.
    /// (Empty from a node older than this field.)
    #[serde(default)]
    pub why: String,
}

/// DCUtR outcomes since start, in [`TraversalStatus`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolePunchCounts {
    /// Relayed connections on which hole punching started.
    pub attempts: u64,
    /// Punches that produced a direct connection.
    pub succeeded: u64,
    /// Punches that failed (the connection stays relayed).
    pub failed: u64,
}

/// Connection counts in [`NodeStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionCounts {
    /// Peers with at least one connection.
    pub peers: usize,
    /// Connections the peers opened.
    pub inbound: usize,
    /// Connections we opened.
    pub outbound: usize,
    /// Duplicate direct connections to a peer (from simultaneous dials)
    /// this node closed since start. Both ends close, and count, a
    /// cross-dial's duplicate; only its dialer a second dial of one side.
    #[serde(default)]
    pub duplicates_closed: u64,
    /// Connections established since start (both directions, direct and
    /// relayed, closed ones too).
    #[serde(default)]
    pub established_total: u64,
    /// Peers banned now for handing us invalid records (their connections
    /// are refused for 10 minutes).
    #[serde(default)]
    pub banned_now: usize,
    /// Peers banned since start.
    #[serde(default)]
    pub banned_total: u64,
}

/// Service counts in [`NodeStatus`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceCounts {
    /// Services this node offers.
    pub local: usize,
    /// Services of other nodes, from verified records.
    pub remote: usize,
    /// Other nodes whose verified record we hold.
    pub nodes: usize,
}

/// The node at a glance, from [`NodeHandle::status`] (and `GET /v1/status`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// How far this node's clock is from its peers', from the records
    /// they sign (a warning beyond [`CLOCK_WARNING_OFFSET`](crate::CLOCK_WARNING_OFFSET)).
    #[serde(default)]
    pub clock: crate::ClockStatus,
    /// The gateway and the API, and who can reach them.
    pub http: HttpStatus,
    /// `max_bandwidth` and how often streams waited for it; `None`
    /// without a limit.
    #[serde(default)]
    pub bandwidth: Option<crate::bandwidth::BandwidthStatus>,
}

/// The node's HTTP servers as `GET /v1/status` shows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpStatus {
    /// The Ollama-compatible gateway, when it runs.
    pub gateway: Option<HttpServerStatus>,
    /// The local API, when it runs.
    pub api: Option<HttpServerStatus>,
}

/// One HTTP server of the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
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
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Kademlia requests this node has sent (counted as its queries finish).
    #[serde(default)]
    pub dht_requests_sent: u64,
    /// Model keys whose last DHT announcement reached no peer: found only
    /// by asking this node until a retry reaches one.
    #[serde(default)]
    pub dht_unannounced_keys: usize,
}

/// Where a gateway's breaker for a serving node stands, in [`PeerInfo`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

#[cfg(test)]
mod tests {
    use std::fmt::Debug;

    use serde::de::DeserializeOwned;

    use super::*;
    use crate::metrics::MetricsSnapshot;

    /// `value` to JSON and back: equal, and the second JSON is the first.
    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: &T) {
        let json = serde_json::to_string(value).unwrap();
        let back: T = serde_json::from_str(&json)
            .unwrap_or_else(|e| panic!("{e} in {json} ({})", std::any::type_name::<T>()));
        assert_eq!(&back, value, "{json}");
        assert_eq!(serde_json::to_string(&back).unwrap(), json);
    }

    #[test]
    fn connection_counts_of_an_older_node_read_with_zero_new_counters() {
        let old: ConnectionCounts =
            serde_json::from_str(r#"{"peers":2,"inbound":1,"outbound":2}"#).unwrap();
        assert_eq!((old.duplicates_closed, old.established_total), (0, 0));
        assert_eq!((old.peers, old.inbound, old.outbound), (2, 1, 2));
    }

    fn peer() -> PeerId {
        libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id()
    }

    fn addr(s: &str) -> Multiaddr {
        s.parse().unwrap()
    }

    fn discovery(relay: PeerId) -> DiscoveryStatus {
        DiscoveryStatus {
            sources: vec![
                SourceStatus {
                    source: DiscoverySource::Mdns,
                    enabled: true,
                    active: false,
                    detail: "unavailable: no multicast interface".to_owned(),
                },
                SourceStatus {
                    source: DiscoverySource::Dht,
                    enabled: true,
                    active: true,
                    detail: format!("12 peers in the routing table, bootstrapped via {relay}"),
                },
                SourceStatus {
                    source: DiscoverySource::Bootstrap,
                    enabled: false,
                    active: false,
                    detail: "off (no bootstrap peers)".to_owned(),
                },
            ],
            stats: DiscoverySource::ALL
                .iter()
                .zip(1..)
                .map(|(s, n)| {
                    (
                        *s,
                        SourceStats {
                            peers_discovered: 10 * n,
                            connection_failures: n,
                            successful_connections: 9 * n,
                            peers_lost: n / 2,
                        },
                    )
                })
                .collect(),
            known_peers: 17,
            dht_routing_table_size: 12,
            dht_providers: 3,
            dht_requests_sent: 40,
            dht_unannounced_keys: 2,
        }
    }

    // serde_json's `float_roundtrip` feature is on (workspace), so a float
    // of 16 or 17 significant digits comes back exactly too: see
    // `latencies_round_trip_exactly`.
    #[test]
    fn latencies_round_trip_exactly() {
        for latency in [121.062_260_000_000_01_f64, 0.1 + 0.2, 1.0 / 3.0] {
            let text = serde_json::to_string(&latency).unwrap();
            let back: f64 = serde_json::from_str(&text).unwrap();
            assert_eq!(back.to_bits(), latency.to_bits(), "{text}");
        }
    }

    #[test]
    fn node_status_round_trips() {
        let (me, relay) = (peer(), peer());
        let mut status = NodeStatus {
            peer_id: me,
            state: NodeState::Running,
            version: "0.1.0".to_owned(),
            uptime_secs: 3723.25,
            listen_addrs: vec![
                addr("/ip4/0.0.0.0/tcp/4001"),
                addr("/ip4/0.0.0.0/udp/4001/quic-v1"),
                addr("/ip6/::/tcp/4001"),
            ],
            external_addrs: vec![
                addr("/ip4/203.0.113.7/tcp/4001"),
                addr(&format!(
                    "/ip4/198.51.100.2/tcp/4001/p2p/{relay}/p2p-circuit"
                )),
                addr("/dns4/node.example.org/tcp/443/wss"),
            ],
            reachability: Reachability::Private,
            nat: TraversalStatus {
                relays: vec![relay],
                relay_service: false,
                circuits_served: 0,
                hole_punch: HolePunchCounts {
                    attempts: 5,
                    succeeded: 3,
                    failed: 2,
                },
                why: "private: AutoNAT peers could not dial us back".to_owned(),
            },
            connections: ConnectionCounts {
                peers: 4,
                inbound: 3,
                outbound: 2,
                duplicates_closed: 1,
                established_total: 7,
                banned_now: 1,
                banned_total: 2,
            },
            discovery: discovery(relay),
            services: ServiceCounts {
                local: 2,
                remote: 9,
                nodes: 3,
            },
            clock: crate::ClockStatus::default(),
            http: HttpStatus {
                gateway: Some(HttpServerStatus::new(
                    "0.0.0.0:11434".parse().unwrap(),
                    false,
                )),
                api: Some(HttpServerStatus::new("[::1]:9090".parse().unwrap(), true)),
            },
            bandwidth: Some(crate::bandwidth::BandwidthStatus {
                limit_bytes_per_s: 1 << 20,
                inbound_waits: 3,
                outbound_waits: 0,
            }),
        };
        round_trip(&status);
        status.state = NodeState::Stopping;
        status.reachability = Reachability::Public;
        status.listen_addrs.clear();
        status.external_addrs.clear();
        status.nat = TraversalStatus::default();
        status.http = HttpStatus {
            gateway: None,
            api: Some(HttpServerStatus::new(
                "[fe80::1%3]:9090".parse().unwrap(),
                false,
            )),
        };
        round_trip(&status);
    }

    #[test]
    fn peer_infos_round_trip() {
        let (a, b, relay) = (peer(), peer(), peer());
        let peers = vec![
            PeerInfo {
                peer_id: a,
                sources: vec![DiscoverySource::Mdns, DiscoverySource::Identify],
                addresses: vec![
                    addr("/ip4/192.168.1.20/tcp/4001"),
                    addr(&format!("/ip4/192.168.1.20/udp/4001/quic-v1/p2p/{a}")),
                ],
                connected: true,
                connection: ConnectionKind::Direct,
                latency_ms: Some(12.5),
                last_seen_ms: 1_700_000_000_123,
                agent_version: Some("ollamacron-node/0.1.0".to_owned()),
                failures: 0,
                breaker: BreakerState::HalfOpen,
            },
            PeerInfo {
                peer_id: b,
                sources: vec![DiscoverySource::Dht],
                addresses: vec![addr(&format!(
                    "/ip4/198.51.100.2/tcp/4001/p2p/{relay}/p2p-circuit/p2p/{b}"
                ))],
                connected: true,
                connection: ConnectionKind::Relayed,
                latency_ms: Some(187.25),
                last_seen_ms: 1_700_000_004_000,
                agent_version: None,
                failures: 2,
                breaker: BreakerState::Open,
            },
            PeerInfo {
                peer_id: relay,
                sources: vec![],
                addresses: vec![],
                connected: false,
                connection: ConnectionKind::None,
                latency_ms: None,
                last_seen_ms: 0,
                agent_version: None,
                failures: 7,
                breaker: BreakerState::Closed,
            },
        ];
        round_trip(&peers);
    }

    #[test]
    fn peer_tables_and_discovery_round_trip() {
        let (a, b) = (peer(), peer());
        let seen = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789);
        round_trip(&KnownPeer {
            peer_id: a,
            addresses: vec![
                addr("/ip4/10.0.0.5/tcp/4001"),
                addr("/ip6/fe80::2/tcp/4001"),
            ],
            sources: vec![DiscoverySource::Bootstrap, DiscoverySource::Dht],
            first_seen: seen,
            last_seen: seen + Duration::from_millis(90_500),
            connected: true,
            failures: 1,
            foreign: false,
        });
        round_trip(&KnownPeer {
            peer_id: b,
            addresses: vec![],
            sources: vec![],
            first_seen: SystemTime::UNIX_EPOCH,
            last_seen: SystemTime::UNIX_EPOCH,
            connected: false,
            failures: 0,
            foreign: true,
        });
        round_trip(&ConnectedPeer {
            peer_id: a,
            addresses: vec![addr("/ip4/10.0.0.5/tcp/4001")],
            direction: Direction::Inbound,
            connected_for: Duration::new(754, 120_000_017),
            protocol_version: Some(crate::PROTOCOL_VERSION.to_owned()),
            agent_version: Some("ollamacron-node/0.1.0".to_owned()),
            rtt: Some(Duration::from_micros(12_345)),
        });
        round_trip(&ConnectedPeer {
            peer_id: b,
            addresses: vec![],
            direction: Direction::Outbound,
            connected_for: Duration::ZERO,
            protocol_version: None,
            agent_version: None,
            rtt: None,
        });
        let discovery = discovery(a);
        round_trip(&discovery);
        round_trip(&discovery.sources[0]);
        round_trip(&discovery.stats[1].1);
        round_trip(&SourceStats::default());
        round_trip(&MetricsSnapshot {
            state: NodeState::Running,
            uptime: Duration::new(86_400, 999_999_999),
            peers_connected: 4,
            connections_inbound: 3,
            connections_outbound: 2,
            connections_trimmed: 11,
            listen_addrs: 3,
        });
    }

    /// `as_str` (what the CLI prints) is the name the API serialises.
    #[test]
    fn enums_round_trip_under_their_names() {
        fn check<T: Serialize + DeserializeOwned + PartialEq + Debug>(value: &T, name: &str) {
            assert_eq!(
                serde_json::to_value(value).unwrap(),
                serde_json::Value::from(name)
            );
            round_trip(value);
        }
        for s in DiscoverySource::ALL {
            check(&s, s.as_str());
            assert_eq!(s.to_string(), s.as_str());
        }
        for r in [
            Reachability::Public,
            Reachability::Private,
            Reachability::Unknown,
        ] {
            check(&r, r.as_str());
            assert_eq!(r.to_string(), r.as_str());
        }
        for c in [
            ConnectionKind::Direct,
            ConnectionKind::Relayed,
            ConnectionKind::None,
        ] {
            check(&c, c.as_str());
            assert_eq!(c.to_string(), c.as_str());
        }
        for b in [
            BreakerState::Closed,
            BreakerState::Open,
            BreakerState::HalfOpen,
        ] {
            check(&b, b.as_str());
        }
        for s in NodeState::ALL {
            check(&s, s.as_str());
            assert_eq!(s.to_string(), s.as_str());
        }
        for d in [Direction::Inbound, Direction::Outbound] {
            check(&d, d.as_str());
        }
        let unknown: Result<Reachability, _> = serde_json::from_str("\"sideways\"");
        assert!(unknown.is_err());
    }
}
