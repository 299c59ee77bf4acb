//! The composed `NetworkBehaviour` of a node.

use std::time::Duration;

use libp2p::identity::Keypair;
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{
    allow_block_list, connection_limits, gossipsub, identify, memory_connection_limits, ping,
};
use ollamacron_config::{DhtMode as ConfigDhtMode, NodeConfig, NodeType, Reachability};
use ollamacron_discovery_bootstrap::{self as bootstrap, BootstrapConfig};
use ollamacron_discovery_dht::{self as dht, DhtConfig, DhtMode};
use ollamacron_discovery_mdns::{self as mdns, MdnsConfig};
use ollamacron_nat::{self as nat, NatConfig, RelayLimits};

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

/// Extra time an AutoNAT dial-back request gets over `dial_timeout`, so the
/// server gives up dialing an unreachable address before we stop waiting.
const AUTONAT_TIMEOUT_MARGIN: Duration = Duration::from_secs(15);

/// The NAT traversal settings of a node configuration.
pub(crate) fn nat_config(config: &NodeConfig) -> NatConfig {
    let relay_server =
        (config.enable_nat_service || config.node_type == NodeType::Relay).then(|| RelayLimits {
            max_reservations: usize::try_from(config.relay_max_reservations).unwrap_or(usize::MAX),
            max_reservations_per_peer: usize::try_from(config.relay_max_reservations_per_peer)
                .unwrap_or(usize::MAX),
            reservation_duration: config.relay_reservation_duration,
            max_circuits: usize::try_from(config.relay_max_circuits).unwrap_or(usize::MAX),
            max_circuits_per_peer: usize::try_from(config.relay_max_circuits_per_peer)
                .unwrap_or(usize::MAX),
            max_circuit_duration: config.relay_max_circuit_duration,
            max_circuit_bytes: config.relay_max_circuit_bytes.bytes(),
        });
    NatConfig {
        force_reachability: config.force_reachability.map(|r| match r {
            Reachability::Public => nat::Reachability::Public,
            Reachability::Private => nat::Reachability::Private,
        }),
        autonat_only_global_ips: config.autonat_only_global_ips,
        autonat_timeout: config.dial_timeout.saturating_add(AUTONAT_TIMEOUT_MARGIN),
        relay_server,
        auto_relay: config.enable_auto_relay,
        relay_nodes: config.relay_nodes.clone(),
        hole_punch: config.enable_hole_punch,
        upnp: config.enable_upnp,
        ..NatConfig::default()
    }
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

/// The Kademlia mode for a reachability: `auto` follows it (client while
/// private, server otherwise, so a lone LAN whose reachability stays
/// unknown still has servers); `server` and `client` are fixed.
pub(crate) fn dht_mode(config: &NodeConfig, reachability: nat::Reachability) -> DhtMode {
    match config.dht_mode {
        ConfigDhtMode::Server => DhtMode::Server,
        ConfigDhtMode::Client => DhtMode::Client,
        ConfigDhtMode::Auto => match reachability {
            nat::Reachability::Private => DhtMode::Client,
            nat::Reachability::Public | nat::Reachability::Unknown => DhtMode::Server,
        },
    }
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
        let bootstrap = bootstrap::Behaviour::new(
            local,
            BootstrapConfig {
                peers: config.bootstrap.clone(),
                min_connections: usize::try_from(config.bootstrap_min_connections)
                    .unwrap_or(usize::MAX),
                max_connections: usize::try_from(config.bootstrap_max_connections)
                    .unwrap_or(usize::MAX),
                check_interval: config.bootstrap_check_interval,
                backoff_initial: config.bootstrap_backoff_initial,
                backoff_max: config.bootstrap_backoff_max,
            },
        );
        let (mdns, mdns_error) = if config.enable_mdns {
            let mdns_config = MdnsConfig {
                query_interval: config.mdns_query_interval,
                ..MdnsConfig::default()
            };
            match mdns::Behaviour::new(mdns_config, local) {
                Ok(b) => (Some(b), None),
                Err(e) => (None, Some(e.to_string())),
            }
        } else {
            (None, None)
        };
        let dht = config.enable_dht.then(|| {
            dht::Behaviour::new(
                local,
                DhtConfig {
                    mode: dht_mode(config, nat.reachability()),
                    bootstrap_interval: config.dht_bootstrap_interval,
                    provide_interval: config.dht_provide_interval,
                    discovery_interval: config.dht_discovery_interval,
                    query_timeout: config.dht_query_timeout,
                    max_records: usize::try_from(config.dht_max_records).unwrap_or(usize::MAX),
                    max_providers_per_key: usize::try_from(config.dht_max_providers_per_key)
                        .unwrap_or(usize::MAX),
                    max_value_bytes: usize::try_from(config.dht_max_value_size.bytes())
                        .unwrap_or(usize::MAX),
                    max_record_ttl: ollamacron_config::MAX_RECORD_TTL,
                    advertise_namespace: true,
                },
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_limit_defaults_are_the_nat_crates() {
        let config = NodeConfig {
            enable_nat_service: true,
            ..NodeConfig::default()
        };
        assert_eq!(
            nat_config(&config).relay_server,
            Some(RelayLimits::default())
        );
        assert_eq!(nat_config(&NodeConfig::default()).relay_server, None);
        let relay = NodeConfig {
            node_type: NodeType::Relay,
            ..NodeConfig::default()
        };
        assert!(nat_config(&relay).relay_server.is_some());
    }

    #[test]
    fn kademlia_mode_follows_reachability_only_in_auto() {
        let auto = NodeConfig::default();
        assert_eq!(dht_mode(&auto, nat::Reachability::Private), DhtMode::Client);
        assert_eq!(dht_mode(&auto, nat::Reachability::Public), DhtMode::Server);
        assert_eq!(dht_mode(&auto, nat::Reachability::Unknown), DhtMode::Server);
        let server = NodeConfig {
            dht_mode: ConfigDhtMode::Server,
            ..NodeConfig::default()
        };
        assert_eq!(
            dht_mode(&server, nat::Reachability::Private),
            DhtMode::Server
        );
    }
}
