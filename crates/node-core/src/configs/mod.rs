//! The one place `NodeConfig` is mapped onto each crate's own config.

mod dht;
mod discovery;
mod nat;

pub(crate) use dht::{dht_config, dht_mode};
pub(crate) use discovery::{bootstrap_config, mdns_config};
pub(crate) use nat::nat_config;

#[cfg(test)]
mod tests {
    use super::*;
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
