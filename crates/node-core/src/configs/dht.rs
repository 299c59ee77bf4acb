//! `NodeConfig` onto `ollamacron_discovery_dht`'s config.

use ollamacron_config::{DhtMode as ConfigDhtMode, NodeConfig};
use ollamacron_discovery_dht::{self as dht, Mode as DhtMode};
use ollamacron_nat as nat;

use crate::registry::keys::{KAD_PROTOCOL, NAMESPACE};

/// The DHT's settings for a node that is `reachability` now: Ollamacron's
/// protocol id and namespace (the wire contract), the configured timers
/// and limits.
pub(crate) fn dht_config(config: &NodeConfig, reachability: nat::Reachability) -> dht::Config {
    dht::Config::new(KAD_PROTOCOL, NAMESPACE)
        .with_mode(dht_mode(config, reachability))
        .with_bootstrap_interval(config.dht_bootstrap_interval)
        .with_provide_interval(config.dht_provide_interval)
        .with_discovery_interval(config.dht_discovery_interval)
        .with_announce_delay(config.dht_announce_delay)
        .with_query_timeout(config.dht_query_timeout)
        .with_max_records(config.dht_max_records)
        .with_max_providers_per_key(config.dht_max_providers_per_key)
        .with_max_value_bytes(
            usize::try_from(config.dht_max_value_size.bytes()).unwrap_or(usize::MAX),
        )
        .with_max_record_ttl(ollamacron_config::MAX_RECORD_TTL)
        .with_advertise_namespace(true)
        // Records spread by sync between neighbours; the namespace lookup
        // only finds nodes, every `dht_discovery_interval`.
        .with_eager_discovery(false)
        // Discovered peers are dialed up to `conn_mgr_low`; beyond that
        // the namespace lookup would find peers no one dials.
        .with_discovery_until_peers(config.conn_mgr_low)
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
