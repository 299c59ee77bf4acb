//! `NodeConfig` onto the bootstrap and mDNS crates' configs.

use ollamacron_config::NodeConfig;
use ollamacron_discovery_bootstrap as bootstrap;
use ollamacron_discovery_mdns as mdns;

/// The bootstrap behaviour's settings.
pub(crate) fn bootstrap_config(config: &NodeConfig) -> bootstrap::Config {
    bootstrap::Config::default()
        .with_peers(config.bootstrap.clone())
        .with_min_connections(config.bootstrap_min_connections)
        .with_max_connections(config.bootstrap_max_connections)
        .with_check_interval(config.bootstrap_check_interval)
        .with_backoff_initial(config.bootstrap_backoff_initial)
        .with_backoff_max(config.bootstrap_backoff_max)
}

/// The mDNS behaviour's settings.
pub(crate) fn mdns_config(config: &NodeConfig) -> mdns::Config {
    mdns::Config::default().with_query_interval(config.mdns_query_interval)
}
