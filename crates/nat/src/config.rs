//! What the NAT behaviour does, with its defaults.

use std::time::Duration;

use libp2p::Multiaddr;

use crate::Reachability;

/// Configuration of [`Behaviour`](crate::Behaviour).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatConfig {
    /// Skip detection: the node is this and says so from the start.
    /// AutoNAT still answers other peers' probes.
    pub force_reachability: Option<Reachability>,
    /// AutoNAT only dials back global IP addresses and only asks peers
    /// seen at a global address. Turn off for private test networks and
    /// LANs that use non-global addresses on their "internet" side.
    pub autonat_only_global_ips: bool,
    /// Delay before the first AutoNAT probe (peers must be connected by then).
    pub autonat_boot_delay: Duration,
    /// Interval between probes while the status is unknown or not yet certain.
    pub autonat_retry_interval: Duration,
    /// Interval between probes once the status is certain.
    pub autonat_refresh_interval: Duration,
    /// Longest an AutoNAT dial-back request may take. Keep it above the
    /// transport's dial timeout: the server must give up dialing an
    /// unreachable address before the asker gives up waiting.
    pub autonat_timeout: Duration,
    /// Serve as a circuit relay (v2) with these limits, while this node is
    /// public. `None`: never relay.
    pub relay_server: Option<RelayLimits>,
    /// Reserve slots on relays while this node is private.
    pub auto_relay: bool,
    /// Relays to reserve on, each ending in `/p2p/<peer id>`. Empty: use
    /// discovered peers that speak the relay protocol.
    pub relay_nodes: Vec<Multiaddr>,
    /// How many discovered relays to hold reservations on when no relay is
    /// configured.
    pub max_discovered_relays: usize,
    /// First retry delay after a reservation fails or ends (doubles per
    /// failure).
    pub reservation_backoff_initial: Duration,
    /// Longest retry delay of a reservation.
    pub reservation_backoff_max: Duration,
    /// A discovered relay that failed this many times in a row is dropped
    /// for another one.
    pub max_discovered_relay_failures: u32,
    /// Upgrade relayed connections to direct ones with DCUtR.
    pub hole_punch: bool,
    /// Ask the local gateway for port mappings with UPnP.
    pub upnp: bool,
}

impl Default for NatConfig {
    fn default() -> Self {
        Self {
            force_reachability: None,
            autonat_only_global_ips: true,
            autonat_boot_delay: Duration::from_secs(2),
            autonat_retry_interval: Duration::from_secs(30),
            autonat_refresh_interval: Duration::from_secs(15 * 60),
            autonat_timeout: Duration::from_secs(45),
            relay_server: None,
            auto_relay: true,
            relay_nodes: Vec::new(),
            max_discovered_relays: 2,
            reservation_backoff_initial: Duration::from_secs(1),
            reservation_backoff_max: Duration::from_secs(60),
            max_discovered_relay_failures: 3,
            hole_punch: true,
            upnp: false,
        }
    }
}

/// Bounds on what a relay server gives away. More requests than these are
/// refused at once (`RESOURCE_LIMIT_EXCEEDED`), never queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayLimits {
    /// Most reservations held at once, over all peers.
    pub max_reservations: usize,
    /// Most reservations one peer may hold.
    pub max_reservations_per_peer: usize,
    /// How long a reservation lasts before the client must renew it.
    pub reservation_duration: Duration,
    /// Most relayed circuits open at once, over all peers.
    pub max_circuits: usize,
    /// Most relayed circuits one peer may have open.
    pub max_circuits_per_peer: usize,
    /// A circuit is closed after this long.
    pub max_circuit_duration: Duration,
    /// A circuit is closed after this many bytes (each direction).
    pub max_circuit_bytes: u64,
}

impl Default for RelayLimits {
    fn default() -> Self {
        Self {
            max_reservations: 128,
            max_reservations_per_peer: 4,
            reservation_duration: Duration::from_secs(60 * 60),
            max_circuits: 16,
            max_circuits_per_peer: 4,
            max_circuit_duration: Duration::from_secs(2 * 60),
            max_circuit_bytes: 1 << 20,
        }
    }
}

impl RelayLimits {
    /// The libp2p relay configuration with these limits and libp2p's
    /// default rate limiters.
    pub(crate) fn to_relay_config(self) -> libp2p::relay::Config {
        libp2p::relay::Config {
            max_reservations: self.max_reservations,
            max_reservations_per_peer: self.max_reservations_per_peer,
            reservation_duration: self.reservation_duration,
            max_circuits: self.max_circuits,
            max_circuits_per_peer: self.max_circuits_per_peer,
            max_circuit_duration: self.max_circuit_duration,
            max_circuit_bytes: self.max_circuit_bytes,
            ..libp2p::relay::Config::default()
        }
    }
}
