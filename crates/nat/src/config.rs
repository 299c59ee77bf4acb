//! What the NAT behaviour does, with its defaults.

use std::time::Duration;

use libp2p::Multiaddr;

use crate::Reachability;

/// Configuration of [`Behaviour`](crate::Behaviour).
///
/// Start from [`Config::default`] and change what you need with the
/// `with_*` setters; new settings can be added without breaking callers.
///
/// ```
/// use std::time::Duration;
/// use ollamacron_nat::{Config, Reachability, RelayLimits};
///
/// let config = Config::default()
///     .with_force_reachability(Some(Reachability::Public))
///     .with_relay_server(Some(RelayLimits::default().with_max_reservations(64)))
///     .with_reservation_backoff_max(Duration::from_secs(30));
/// assert!(config.auto_relay, "untouched settings keep their defaults");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
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

impl Default for Config {
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

impl Config {
    /// Skip detection and be `reachability` from the start (`None`: detect
    /// with AutoNAT). See [`Config::force_reachability`].
    #[must_use]
    pub fn with_force_reachability(mut self, reachability: Option<Reachability>) -> Self {
        self.force_reachability = reachability;
        self
    }

    /// Whether AutoNAT only dials back, and only asks peers seen at, global
    /// IP addresses. See [`Config::autonat_only_global_ips`].
    #[must_use]
    pub fn with_autonat_only_global_ips(mut self, only_global_ips: bool) -> Self {
        self.autonat_only_global_ips = only_global_ips;
        self
    }

    /// Delay before the first AutoNAT probe. See
    /// [`Config::autonat_boot_delay`].
    #[must_use]
    pub fn with_autonat_boot_delay(mut self, delay: Duration) -> Self {
        self.autonat_boot_delay = delay;
        self
    }

    /// Interval between AutoNAT probes while the status is not yet certain.
    /// See [`Config::autonat_retry_interval`].
    #[must_use]
    pub fn with_autonat_retry_interval(mut self, interval: Duration) -> Self {
        self.autonat_retry_interval = interval;
        self
    }

    /// Interval between AutoNAT probes once the status is certain. See
    /// [`Config::autonat_refresh_interval`].
    #[must_use]
    pub fn with_autonat_refresh_interval(mut self, interval: Duration) -> Self {
        self.autonat_refresh_interval = interval;
        self
    }

    /// Longest an AutoNAT dial-back request may take (keep it above the
    /// transport's dial timeout). See [`Config::autonat_timeout`].
    #[must_use]
    pub fn with_autonat_timeout(mut self, timeout: Duration) -> Self {
        self.autonat_timeout = timeout;
        self
    }

    /// Serve as a circuit relay with these limits while public (`None`:
    /// never relay). See [`Config::relay_server`].
    #[must_use]
    pub fn with_relay_server(mut self, limits: Option<RelayLimits>) -> Self {
        self.relay_server = limits;
        self
    }

    /// Whether to reserve slots on relays while private. See
    /// [`Config::auto_relay`].
    #[must_use]
    pub fn with_auto_relay(mut self, auto_relay: bool) -> Self {
        self.auto_relay = auto_relay;
        self
    }

    /// The relays to reserve on, each ending in `/p2p/<peer id>` (empty:
    /// use discovered relays). See [`Config::relay_nodes`].
    #[must_use]
    pub fn with_relay_nodes(mut self, relay_nodes: Vec<Multiaddr>) -> Self {
        self.relay_nodes = relay_nodes;
        self
    }

    /// How many discovered relays to hold reservations on when none is
    /// configured. See [`Config::max_discovered_relays`].
    #[must_use]
    pub fn with_max_discovered_relays(mut self, max_relays: usize) -> Self {
        self.max_discovered_relays = max_relays;
        self
    }

    /// First retry delay of a reservation that failed or ended. See
    /// [`Config::reservation_backoff_initial`].
    #[must_use]
    pub fn with_reservation_backoff_initial(mut self, delay: Duration) -> Self {
        self.reservation_backoff_initial = delay;
        self
    }

    /// Longest retry delay of a reservation. See
    /// [`Config::reservation_backoff_max`].
    #[must_use]
    pub fn with_reservation_backoff_max(mut self, delay: Duration) -> Self {
        self.reservation_backoff_max = delay;
        self
    }

    /// Consecutive failures after which a discovered relay is dropped for
    /// another one. See [`Config::max_discovered_relay_failures`].
    #[must_use]
    pub fn with_max_discovered_relay_failures(mut self, max_failures: u32) -> Self {
        self.max_discovered_relay_failures = max_failures;
        self
    }

    /// Whether to upgrade relayed connections to direct ones with DCUtR.
    /// See [`Config::hole_punch`].
    #[must_use]
    pub fn with_hole_punch(mut self, hole_punch: bool) -> Self {
        self.hole_punch = hole_punch;
        self
    }

    /// Whether to ask the local gateway for port mappings with UPnP. See
    /// [`Config::upnp`].
    #[must_use]
    pub fn with_upnp(mut self, upnp: bool) -> Self {
        self.upnp = upnp;
        self
    }
}

/// Bounds on what a relay server gives away. More requests than these are
/// refused at once (`RESOURCE_LIMIT_EXCEEDED`), never queued.
///
/// Start from [`RelayLimits::default`] and change what you need with the
/// `with_*` setters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
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
    /// Most reservations held at once, over all peers. See
    /// [`RelayLimits::max_reservations`].
    #[must_use]
    pub fn with_max_reservations(mut self, max_reservations: usize) -> Self {
        self.max_reservations = max_reservations;
        self
    }

    /// Most reservations one peer may hold. See
    /// [`RelayLimits::max_reservations_per_peer`].
    #[must_use]
    pub fn with_max_reservations_per_peer(mut self, max_reservations: usize) -> Self {
        self.max_reservations_per_peer = max_reservations;
        self
    }

    /// How long a reservation lasts before the client must renew it. See
    /// [`RelayLimits::reservation_duration`].
    #[must_use]
    pub fn with_reservation_duration(mut self, duration: Duration) -> Self {
        self.reservation_duration = duration;
        self
    }

    /// Most relayed circuits open at once, over all peers. See
    /// [`RelayLimits::max_circuits`].
    #[must_use]
    pub fn with_max_circuits(mut self, max_circuits: usize) -> Self {
        self.max_circuits = max_circuits;
        self
    }

    /// Most relayed circuits one peer may have open. See
    /// [`RelayLimits::max_circuits_per_peer`].
    #[must_use]
    pub fn with_max_circuits_per_peer(mut self, max_circuits: usize) -> Self {
        self.max_circuits_per_peer = max_circuits;
        self
    }

    /// How long a circuit may stay open. See
    /// [`RelayLimits::max_circuit_duration`].
    #[must_use]
    pub fn with_max_circuit_duration(mut self, duration: Duration) -> Self {
        self.max_circuit_duration = duration;
        self
    }

    /// How many bytes (each direction) a circuit may carry. See
    /// [`RelayLimits::max_circuit_bytes`].
    #[must_use]
    pub fn with_max_circuit_bytes(mut self, max_bytes: u64) -> Self {
        self.max_circuit_bytes = max_bytes;
        self
    }

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
