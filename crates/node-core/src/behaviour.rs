//! The composed `NetworkBehaviour` of a node.

use libp2p::identity::Keypair;
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{connection_limits, identify, memory_connection_limits, ping};
use ollamacron_config::NodeConfig;

/// Identify protocol version every Ollamacron node announces.
pub const PROTOCOL_VERSION: &str = "/ollamacron/1.0.0";

/// Most connections kept to a single peer (simultaneous dials make two).
const MAX_CONNECTIONS_PER_PEER: u32 = 4;
/// Most inbound connections still negotiating at once.
const MAX_PENDING_INCOMING: u32 = 128;

/// Identify agent string: `ollamacron-node/<version>`.
#[must_use]
pub fn agent_version() -> String {
    format!("ollamacron-node/{}", env!("CARGO_PKG_VERSION"))
}

/// Everything the swarm runs, composed with `#[derive(NetworkBehaviour)]`.
/// Limits come first so they can deny a connection before anything else
/// sees it.
#[derive(NetworkBehaviour)]
pub(crate) struct NodeBehaviour {
    pub(crate) connection_limits: connection_limits::Behaviour,
    pub(crate) memory_limits: Toggle<memory_connection_limits::Behaviour>,
    pub(crate) identify: identify::Behaviour,
    pub(crate) ping: ping::Behaviour,
}

impl NodeBehaviour {
    pub(crate) fn new(key: &Keypair, config: &NodeConfig) -> Self {
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_established(Some(config.conn_mgr_high))
            .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
            .with_max_pending_incoming(Some(MAX_PENDING_INCOMING));
        let memory_limits = config.max_memory.map(|max| {
            memory_connection_limits::Behaviour::with_max_bytes(
                usize::try_from(max.bytes()).unwrap_or(usize::MAX),
            )
        });
        let identify = identify::Behaviour::new(
            identify::Config::new(PROTOCOL_VERSION.to_owned(), key.public())
                .with_agent_version(agent_version())
                .with_push_listen_addr_updates(true),
        );
        let ping = ping::Behaviour::new(ping::Config::new().with_interval(config.ping_interval));
        Self {
            connection_limits: connection_limits::Behaviour::new(limits),
            memory_limits: memory_limits.into(),
            identify,
            ping,
        }
    }
}
