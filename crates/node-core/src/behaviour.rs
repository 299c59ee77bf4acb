//! The composed `NetworkBehaviour` of a node: one behaviour per owner of
//! state (peers, discovery, registry, NAT traversal), plus identify and
//! application streams.

use libp2p::identify;
use libp2p::identity::Keypair;
use libp2p::swarm::NetworkBehaviour;
use ollamacron_config::NodeConfig;
use ollamacron_nat as nat;

use crate::error::NodeError;
use crate::{discovery, peers, registry};

/// Identify protocol version every Ollamacron node announces.
pub const PROTOCOL_VERSION: &str = "/ollamacron/1.0.0";

/// Identify agent string: `ollamacron-node/<version>`.
#[must_use]
pub fn agent_version() -> String {
    format!("ollamacron-node/{}", env!("CARGO_PKG_VERSION"))
}

/// Everything the swarm runs, composed with `#[derive(NetworkBehaviour)]`.
/// The peer behaviour comes first: its limits and allow-list deny a
/// connection before anything else sees it.
#[derive(NetworkBehaviour)]
pub(crate) struct NodeBehaviour {
    pub(crate) peers: peers::Behaviour,
    pub(crate) identify: identify::Behaviour,
    pub(crate) discovery: discovery::Behaviour,
    pub(crate) registry: registry::Behaviour,
    pub(crate) nat: nat::Behaviour,
    /// Application stream protocols (see [`NodeHandle::stream_control`](crate::NodeHandle::stream_control)).
    pub(crate) streams: libp2p_stream::Behaviour,
}

impl NodeBehaviour {
    /// The behaviour of `key`'s node as `config` describes it.
    ///
    /// # Errors
    /// The configured services are invalid or do not fit in a record.
    pub(crate) fn new(
        key: &Keypair,
        config: &NodeConfig,
        nat: nat::Behaviour,
        loopback_only: bool,
        restored: &registry::Restored,
    ) -> Result<Self, NodeError> {
        let local = key.public().to_peer_id();
        let identify = identify::Behaviour::new(
            identify::Config::new(PROTOCOL_VERSION.to_owned(), key.public())
                .with_agent_version(agent_version())
                .with_push_listen_addr_updates(true)
                // Announce what we confirmed as reachable (listen addresses
                // beyond loopback, relay addresses, AutoNAT's findings), not
                // every interface we bind.
                .with_hide_listen_addrs(true),
        );
        let discovery = discovery::Behaviour::new(local, config, loopback_only);
        let registry =
            registry::Behaviour::new(key, config, nat.reachability(), loopback_only, restored)?;
        let peers = peers::Behaviour::new(local, config, discovery.bootstrap_peer_ids());
        Ok(Self {
            peers,
            identify,
            discovery,
            registry,
            nat,
            streams: libp2p_stream::Behaviour::new(),
        })
    }
}
