//! Events the node publishes on its broadcast bus.

use libp2p::{Multiaddr, PeerId};
use serde::Serialize;

use crate::state::NodeState;

/// Which side opened a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
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
    /// Connections were closed by the trimming policy.
    ConnectionsTrimmed {
        /// How many.
        count: usize,
    },
}
