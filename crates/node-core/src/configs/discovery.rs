//! `NodeConfig` onto the bootstrap and mDNS crates' configs.

use ollamacron_config::NodeConfig;
use ollamacron_discovery_bootstrap::BootstrapConfig;
use ollamacron_discovery_mdns::MdnsConfig;

/// The bootstrap behaviour's settings.
pub(crate) fn bootstrap_config(config: &NodeConfig) -> BootstrapConfig {
    BootstrapConfig {
        peers: config.bootstrap.clone(),
        min_connections: usize::try_from(config.bootstrap_min_connections).unwrap_or(usize::MAX),
        max_connections: usize::try_from(config.bootstrap_max_connections).unwrap_or(usize::MAX),
        check_interval: config.bootstrap_check_interval,
        backoff_initial: config.bootstrap_backoff_initial,
        backoff_max: config.bootstrap_backoff_max,
    }
}

/// The mDNS behaviour's settings.
pub(crate) fn mdns_config(config: &NodeConfig) -> MdnsConfig {
    MdnsConfig {
        query_interval: config.mdns_query_interval,
        ..MdnsConfig::default()
    }
}
