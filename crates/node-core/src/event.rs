//! Events the node publishes on its broadcast bus.

use libp2p::{Multiaddr, PeerId};
use serde::Serialize;

use crate::state::NodeState;
use crate::status::DiscoverySource;

/// Which side opened a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// The remote dialed us.
    Inbound,
    /// We dialed the remote.
    Outbound,
}

impl Direction {
    /// Lower-case name, as in metrics.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

/// Something that happened in the node. Subscribers that fall behind lose
/// the oldest events (`RecvError::Lagged`); the node never waits for them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum NodeEvent {
    /// The lifecycle state changed.
    StateChanged {
        /// Previous state.
        from: NodeState,
        /// New state.
        to: NodeState,
    },
    /// The node is running and listening.
    Started {
        /// Our peer id.
        peer_id: PeerId,
        /// The addresses we listen on.
        listen_addrs: Vec<Multiaddr>,
    },
    /// The node has stopped; no further events follow.
    Stopped,
    /// A listener reported a new address.
    ListenAddrAdded {
        /// The address.
        addr: Multiaddr,
    },
    /// A listen address went away.
    ListenAddrRemoved {
        /// The address.
        addr: Multiaddr,
    },
    /// The first connection to a peer was established.
    PeerConnected {
        /// The peer.
        peer_id: PeerId,
        /// Its address on this connection.
        addr: Multiaddr,
        /// Who dialed.
        direction: Direction,
    },
    /// The last connection to a peer closed.
    PeerDisconnected {
        /// The peer.
        peer_id: PeerId,
    },
    /// A peer told us who it is (identify).
    PeerIdentified {
        /// The peer.
        peer_id: PeerId,
        /// Its protocol version, `/ollamacron/1.0.0` for our nodes.
        protocol_version: String,
        /// Its agent, e.g. `ollamacron-node/0.1.0`.
        agent_version: String,
    },
    /// A discovery source reported a peer for the first time.
    PeerDiscovered {
        /// The peer.
        peer_id: PeerId,
        /// The source.
        source: DiscoverySource,
    },
    /// A peer was forgotten: its last source lost it, or it stayed unreachable.
    PeerLost {
        /// The peer.
        peer_id: PeerId,
        /// The source that lost it.
        source: DiscoverySource,
    },
    /// A dial made by discovery (bootstrap, mDNS, DHT) failed.
    DialFailed {
        /// The peer.
        peer_id: PeerId,
        /// Which source's peer it was.
        source: DiscoverySource,
        /// Consecutive failures.
        failures: u32,
        /// Delay before it is tried again.
        #[serde(with = "duration_ms")]
        retry_in: std::time::Duration,
    },
    /// Connections were closed by the trimming policy.
    ConnectionsTrimmed {
        /// How many.
        count: usize,
    },
    /// A service appeared: registered here, or in a verified record of another node.
    ServiceAdded {
        /// The node serving it.
        peer_id: PeerId,
        /// The service id.
        service_id: String,
        /// Its type.
        service_type: String,
        /// Whether this node serves it.
        local: bool,
    },
    /// A service changed (tags, capabilities, status, …).
    ServiceUpdated {
        /// The node serving it.
        peer_id: PeerId,
        /// The service id.
        service_id: String,
        /// Its type.
        service_type: String,
        /// Whether this node serves it.
        local: bool,
    },
    /// A service went away: unregistered, dropped from its node's record,
    /// or its record expired.
    ServiceRemoved {
        /// The node that served it.
        peer_id: PeerId,
        /// The service id.
        service_id: String,
        /// Its type.
        service_type: String,
        /// Whether this node served it.
        local: bool,
    },
    /// Our reachability changed (AutoNAT).
    ReachabilityChanged {
        /// The new value.
        reachability: crate::Reachability,
        /// The address a peer dialed us back on, when public.
        address: Option<Multiaddr>,
    },
    /// A relay reservation of ours became active, or ended.
    RelayReservation {
        /// The relay.
        relay: PeerId,
        /// Active (peers can reach us through it) or ended.
        active: bool,
    },
    /// DCUtR tried to replace a relayed connection with a direct one.
    HolePunch {
        /// The peer.
        peer_id: PeerId,
        /// A direct connection was made.
        success: bool,
        /// Why not, when it failed.
        error: Option<String>,
    },
    /// A peer handed us records no honest node passes on (forged,
    /// malformed) and was disconnected; its connections are refused for
    /// `ban` (see `ollamacron_peers_banned_total`).
    PeerBanned {
        /// The peer.
        peer_id: PeerId,
        /// Why, in words: how many invalid records, and the last reason.
        reason: String,
        /// How long its connections are refused.
        ban: std::time::Duration,
    },
    /// A node record was refused and not stored.
    RecordRejected {
        /// The peer that sent it (for a DHT answer or a put) or published
        /// it (gossip), when known.
        peer: Option<PeerId>,
        /// Where it came from.
        via: RecordVia,
        /// Why, as a metrics label (`bad_signature`, `expired`, …).
        reason: &'static str,
        /// Why, in words.
        detail: String,
    },
}

/// Where a node record entered the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RecordVia {
    /// An inbound Kademlia PUT.
    Put,
    /// A Kademlia GET answer.
    Get,
    /// A gossipsub message.
    Gossip,
    /// Record sync with a neighbour (`/ollamacron/records/1.0.0`).
    Sync,
}

impl RecordVia {
    /// Lower-case name, as in metrics.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Put => "put",
            Self::Get => "get",
            Self::Gossip => "gossip",
            Self::Sync => "sync",
        }
    }
}

/// Durations as whole milliseconds in JSON.
mod duration_ms {
    use serde::Serializer;

    pub(crate) fn serialize<S: Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u128(d.as_millis())
    }
}
