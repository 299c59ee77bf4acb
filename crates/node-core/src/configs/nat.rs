//! `NodeConfig` onto `ollamacron_nat::Config`.

use std::time::Duration;

use ollamacron_config::{NodeConfig, NodeType, Reachability};
use ollamacron_nat::{self as nat, RelayLimits};

/// Extra time an AutoNAT dial-back request gets over `dial_timeout`, so the
/// server gives up dialing an unreachable address before we stop waiting.
const AUTONAT_TIMEOUT_MARGIN: Duration = Duration::from_secs(15);

/// The NAT traversal settings of a node configuration.
pub(crate) fn nat_config(config: &NodeConfig) -> nat::Config {
    let relay_server =
        (config.enable_nat_service || config.node_type == NodeType::Relay).then(|| {
            RelayLimits::default()
                .with_max_reservations(config.relay_max_reservations)
                .with_max_reservations_per_peer(config.relay_max_reservations_per_peer)
                .with_reservation_duration(config.relay_reservation_duration)
                .with_max_circuits(config.relay_max_circuits)
                .with_max_circuits_per_peer(config.relay_max_circuits_per_peer)
                .with_max_circuit_duration(config.relay_max_circuit_duration)
                .with_max_circuit_bytes(config.relay_max_circuit_bytes.bytes())
        });
    nat::Config::default()
        .with_force_reachability(config.force_reachability.map(|r| match r {
            Reachability::Public => nat::Reachability::Public,
            Reachability::Private => nat::Reachability::Private,
        }))
        .with_autonat_only_global_ips(config.autonat_only_global_ips)
        .with_autonat_timeout(config.dial_timeout.saturating_add(AUTONAT_TIMEOUT_MARGIN))
        .with_relay_server(relay_server)
        .with_auto_relay(config.enable_auto_relay)
        .with_relay_nodes(config.relay_nodes.clone())
        .with_hole_punch(config.enable_hole_punch)
        .with_upnp(config.enable_upnp)
}
