//! The one place `NodeConfig` is mapped onto each crate's own config.

mod dht;
mod discovery;
mod nat;
mod registry;

pub(crate) use dht::{dht_config, dht_mode};
pub(crate) use discovery::{bootstrap_config, mdns_config};
pub(crate) use nat::nat_config;
pub(crate) use registry::{gossip, record_limits, score_weights};

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use ollamacron_config::{DhtMode as ConfigDhtMode, NodeConfig, NodeType};
    use ollamacron_discovery_dht::Mode as DhtMode;
    use ollamacron_nat::{self as nat, RelayLimits};

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
    fn node_settings_reach_the_nat_and_discovery_configs() {
        let node = NodeConfig {
            enable_nat_service: true,
            relay_max_reservations: 7,
            enable_hole_punch: false,
            bootstrap_min_connections: 3,
            bootstrap_check_interval: Duration::from_secs(9),
            mdns_query_interval: Duration::from_secs(4),
            ..NodeConfig::default()
        };
        let nat = nat_config(&node);
        assert_eq!(nat.relay_server.map(|l| l.max_reservations), Some(7));
        assert!(!nat.hole_punch);
        assert!(nat.autonat_timeout > node.dial_timeout);
        // What the node does not set keeps the NAT crate's default.
        let defaults = nat::Config::default();
        assert_eq!(
            nat.reservation_backoff_max,
            defaults.reservation_backoff_max
        );
        let bootstrap = bootstrap_config(&node);
        assert_eq!(bootstrap.min_connections, 3);
        assert_eq!(bootstrap.check_interval, Duration::from_secs(9));
        assert_eq!(bootstrap.peers, node.bootstrap);
        let mdns = mdns_config(&node);
        assert_eq!(mdns.query_interval, Duration::from_secs(4));
        assert_eq!(mdns.ttl, ollamacron_discovery_mdns::Config::default().ttl);
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
