//! The composed `NetworkBehaviour` of a node.

use libp2p::identity::Keypair;
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    allow_block_list, connection_limits, gossipsub, identify, memory_connection_limits, ping,
};
use ollamacron_config::NodeConfig;
use ollamacron_discovery_bootstrap as bootstrap;
use ollamacron_discovery_dht as dht;
use ollamacron_discovery_mdns as mdns;
use ollamacron_nat as nat;

/// Identify protocol version every Ollamacron node announces.
pub const PROTOCOL_VERSION: &str = "/ollamacron/1.0.0";

/// The gossipsub topic that carries signed node records (when pubsub is on).
pub const SERVICES_TOPIC: &str = "/ollamacron/services/1";
/// Room for gossipsub framing around the largest record.
const GOSSIP_OVERHEAD_BYTES: usize = 4 * 1024;

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
    pub(crate) allowed_peers: Toggle<allow_block_list::Behaviour<allow_block_list::AllowedPeers>>,
    pub(crate) connection_limits: connection_limits::Behaviour,
    pub(crate) memory_limits: Toggle<memory_connection_limits::Behaviour>,
    pub(crate) identify: identify::Behaviour,
    pub(crate) ping: ping::Behaviour,
    pub(crate) bootstrap: bootstrap::Behaviour,
    pub(crate) mdns: Toggle<mdns::Behaviour>,
    pub(crate) dht: Toggle<dht::Behaviour>,
    pub(crate) gossip: Toggle<gossipsub::Behaviour>,
    pub(crate) nat: nat::Behaviour,
    /// Application stream protocols (see [`NodeHandle::stream_control`](crate::NodeHandle::stream_control)).
    pub(crate) streams: libp2p_stream::Behaviour,
}

/// Gossipsub for node records: every message is signed by its author and
/// held back until the registry has verified the record in it.
fn gossip(key: &Keypair, config: &NodeConfig) -> Result<gossipsub::Behaviour, String> {
    let max_record = usize::try_from(config.max_record_size.bytes()).unwrap_or(usize::MAX);
    let gossip_config = gossipsub::ConfigBuilder::default()
        .validation_mode(gossipsub::ValidationMode::Strict)
        .validate_messages()
        .max_transmit_size(max_record.saturating_add(GOSSIP_OVERHEAD_BYTES))
        .build()
        .map_err(|e| e.to_string())?;
    let mut behaviour = gossipsub::Behaviour::new(
        gossipsub::MessageAuthenticity::Signed(key.clone()),
        gossip_config,
    )
    .map_err(str::to_owned)?;
    behaviour
        .subscribe(&gossipsub::IdentTopic::new(SERVICES_TOPIC))
        .map_err(|e| e.to_string())?;
    Ok(behaviour)
}

impl NodeBehaviour {
    /// The behaviour, and why mDNS is off when it was asked for but could
    /// not start.
    pub(crate) fn new(
        key: &Keypair,
        config: &NodeConfig,
        nat: nat::Behaviour,
    ) -> (Self, Option<String>) {
        let local = key.public().to_peer_id();
        let allowed = config.allowed_peer_ids();
        let allowed_peers = (!allowed.is_empty()).then(|| {
            let mut list = allow_block_list::Behaviour::<allow_block_list::AllowedPeers>::default();
            for peer in allowed {
                list.allow_peer(peer);
            }
            list
        });
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
                .with_push_listen_addr_updates(true)
                // Announce what we confirmed as reachable (listen addresses
                // beyond loopback, relay addresses, AutoNAT's findings), not
                // every interface we bind.
                .with_hide_listen_addrs(true),
        );
        let ping = ping::Behaviour::new(ping::Config::new().with_interval(config.ping_interval));
        let bootstrap = bootstrap::Behaviour::new(local, crate::configs::bootstrap_config(config));
        let (mdns, mdns_error) = if config.enable_mdns {
            match mdns::Behaviour::new(crate::configs::mdns_config(config), local) {
                Ok(b) => (Some(b), None),
                Err(e) => (None, Some(e.to_string())),
            }
        } else {
            (None, None)
        };
        let dht = config.enable_dht.then(|| {
            dht::Behaviour::new(
                local,
                crate::configs::dht_config(config, nat.reachability()),
            )
        });
        let gossip = if config.enable_pubsub {
            match gossip(key, config) {
                Ok(b) => Some(b),
                Err(reason) => {
                    tracing::error!(%reason, "cannot start gossipsub; records spread through the DHT only");
                    None
                }
            }
        } else {
            None
        };
        let behaviour = Self {
            allowed_peers: allowed_peers.into(),
            connection_limits: connection_limits::Behaviour::new(limits),
            memory_limits: memory_limits.into(),
            identify,
            ping,
            bootstrap,
            mdns: mdns.into(),
            dht: dht.into(),
            gossip: gossip.into(),
            nat,
            streams: libp2p_stream::Behaviour::new(),
        };
        (behaviour, mdns_error)
    }
}
