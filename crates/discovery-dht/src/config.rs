//! How the DHT is run.

use std::time::Duration;

use libp2p::StreamProtocol;
use libp2p::kad;

/// Whether this node answers DHT queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Answer queries and store records (publicly reachable or on a LAN).
    Server,
    /// Only ask (behind NAT).
    Client,
}

impl From<Mode> for kad::Mode {
    fn from(mode: Mode) -> Self {
        match mode {
            Mode::Server => Self::Server,
            Mode::Client => Self::Client,
        }
    }
}

impl From<kad::Mode> for Mode {
    fn from(mode: kad::Mode) -> Self {
        match mode {
            kad::Mode::Server => Self::Server,
            kad::Mode::Client => Self::Client,
        }
    }
}

/// How the DHT is run: [`Config::new`] with a protocol id and a namespace
/// of your own, then the `with_*` setters.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// The Kademlia protocol id. Only peers on the same id exchange DHT
    /// traffic: pick one of your own (`/my-app/kad/1.0.0`) to run a private
    /// DHT, never `/ipfs/kad/1.0.0`.
    pub protocol: StreamProtocol,
    /// The namespace: the providers of [`provider_key`](crate::provider_key)`(&namespace)`
    /// are "the network", found and reported as [`Event::ProviderFound`](crate::Event::ProviderFound).
    pub namespace: String,
    /// Server or client mode.
    pub mode: Mode,
    /// Interval of Kademlia bootstrap (routing table refresh).
    pub bootstrap_interval: Duration,
    /// Interval of re-announcing the provided keys (the namespace and
    /// [`Behaviour::set_provided_keys`](crate::Behaviour::set_provided_keys)).
    pub provide_interval: Duration,
    /// Longest interval between lookups of the namespace's providers.
    pub discovery_interval: Duration,
    /// Longest a query may run.
    pub query_timeout: Duration,
    /// Most records the local store holds.
    pub max_records: usize,
    /// Most providers the local store keeps per key.
    pub max_providers_per_key: usize,
    /// Largest record value accepted, in bytes.
    pub max_value_bytes: usize,
    /// Longest a stored record lives when it comes without an expiry.
    pub max_record_ttl: Duration,
    /// Announce this node as a provider of the namespace.
    pub advertise_namespace: bool,
    /// How long after the first peer enters the routing table the DHT
    /// waits before it announces its keys and looks up the namespace: by
    /// then the table holds the peers closest to each key, so provider
    /// records land where lookups will look, and a joining node sends no
    /// announcement walk while it has one peer.
    pub announce_delay: Duration,
    /// How long after an announcement of an exact key (see
    /// [`Behaviour::set_exact_keys`](crate::Behaviour::set_exact_keys))
    /// that reached no peer (its walk timed out, or every peer failed) it
    /// is tried again; then at doubling intervals up to `provide_interval`,
    /// each spread over its second half. A model's key must not stay
    /// unfindable until the next round because the network was busy when
    /// the node joined.
    pub announce_retry: Duration,
    /// Look up the namespace again soon (then at doubling intervals) when a
    /// peer we do not know as a provider connects, to find nodes that just
    /// joined within a second. Off, lookups run every `discovery_interval`.
    pub eager_discovery: bool,
    /// The namespace lookup runs only while fewer peers than this are
    /// connected: its answer is for finding peers to connect to, and a
    /// node that has enough of them (a node dials discovered peers only up
    /// to a target) would walk the DHT for nothing. `usize::MAX`: always.
    pub discovery_until_peers: usize,
}

impl Config {
    /// A DHT on `protocol` whose network is the providers of `namespace`;
    /// everything else at its default: server mode, bootstrap and provide
    /// every 5 min, namespace lookups at most 30 s apart, 30 s query
    /// timeout, 1024 records of up to 64 KiB living at most 1 h, 256
    /// providers per key, the namespace advertised, announcements 5 s after
    /// the first peer (one that reached no peer tried again after 10 s), eager discovery, and namespace lookups however many
    /// peers are connected.
    #[must_use]
    pub fn new(protocol: StreamProtocol, namespace: impl Into<String>) -> Self {
        Self {
            protocol,
            namespace: namespace.into(),
            mode: Mode::Server,
            bootstrap_interval: Duration::from_secs(300),
            provide_interval: Duration::from_secs(300),
            discovery_interval: Duration::from_secs(30),
            query_timeout: Duration::from_secs(30),
            max_records: 1024,
            max_providers_per_key: 256,
            max_value_bytes: 64 * 1024,
            max_record_ttl: Duration::from_secs(3600),
            advertise_namespace: true,
            announce_delay: Duration::from_secs(5),
            announce_retry: Duration::from_secs(10),
            eager_discovery: true,
            discovery_until_peers: usize::MAX,
        }
    }

    /// Sets [`Config::mode`].
    #[must_use]
    pub fn with_mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Sets [`Config::bootstrap_interval`].
    #[must_use]
    pub fn with_bootstrap_interval(mut self, interval: Duration) -> Self {
        self.bootstrap_interval = interval;
        self
    }

    /// Sets [`Config::provide_interval`].
    #[must_use]
    pub fn with_provide_interval(mut self, interval: Duration) -> Self {
        self.provide_interval = interval;
        self
    }

    /// Sets [`Config::discovery_interval`].
    #[must_use]
    pub fn with_discovery_interval(mut self, interval: Duration) -> Self {
        self.discovery_interval = interval;
        self
    }

    /// Sets [`Config::query_timeout`].
    #[must_use]
    pub fn with_query_timeout(mut self, timeout: Duration) -> Self {
        self.query_timeout = timeout;
        self
    }

    /// Sets [`Config::max_records`].
    #[must_use]
    pub fn with_max_records(mut self, max_records: usize) -> Self {
        self.max_records = max_records;
        self
    }

    /// Sets [`Config::max_providers_per_key`].
    #[must_use]
    pub fn with_max_providers_per_key(mut self, max_providers_per_key: usize) -> Self {
        self.max_providers_per_key = max_providers_per_key;
        self
    }

    /// Sets [`Config::max_value_bytes`].
    #[must_use]
    pub fn with_max_value_bytes(mut self, max_value_bytes: usize) -> Self {
        self.max_value_bytes = max_value_bytes;
        self
    }

    /// Sets [`Config::max_record_ttl`].
    #[must_use]
    pub fn with_max_record_ttl(mut self, ttl: Duration) -> Self {
        self.max_record_ttl = ttl;
        self
    }

    /// Sets [`Config::advertise_namespace`].
    #[must_use]
    pub fn with_advertise_namespace(mut self, advertise: bool) -> Self {
        self.advertise_namespace = advertise;
        self
    }

    /// Sets [`Config::announce_delay`].
    #[must_use]
    pub fn with_announce_delay(mut self, delay: Duration) -> Self {
        self.announce_delay = delay;
        self
    }

    /// Sets [`Config::announce_retry`].
    #[must_use]
    pub fn with_announce_retry(mut self, retry: Duration) -> Self {
        self.announce_retry = retry;
        self
    }

    /// Sets [`Config::eager_discovery`].
    #[must_use]
    pub fn with_eager_discovery(mut self, eager: bool) -> Self {
        self.eager_discovery = eager;
        self
    }

    /// Sets [`Config::discovery_until_peers`].
    #[must_use]
    pub fn with_discovery_until_peers(mut self, peers: usize) -> Self {
        self.discovery_until_peers = peers;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setters_set_their_field_only() {
        let base = Config::new(StreamProtocol::new("/my-app/kad/1.0.0"), "/my-app");
        assert_eq!(base.protocol.as_ref(), "/my-app/kad/1.0.0");
        assert_eq!(base.namespace, "/my-app");
        assert_eq!(base.mode, Mode::Server);
        let changed = base
            .clone()
            .with_mode(Mode::Client)
            .with_bootstrap_interval(Duration::from_secs(1))
            .with_provide_interval(Duration::from_secs(2))
            .with_discovery_interval(Duration::from_secs(3))
            .with_query_timeout(Duration::from_secs(4))
            .with_max_records(5)
            .with_max_providers_per_key(6)
            .with_max_value_bytes(7)
            .with_max_record_ttl(Duration::from_secs(8))
            .with_advertise_namespace(false)
            .with_announce_delay(Duration::from_secs(9))
            .with_announce_retry(Duration::from_secs(10))
            .with_eager_discovery(false)
            .with_discovery_until_peers(7);
        let expected = Config {
            mode: Mode::Client,
            bootstrap_interval: Duration::from_secs(1),
            provide_interval: Duration::from_secs(2),
            discovery_interval: Duration::from_secs(3),
            query_timeout: Duration::from_secs(4),
            max_records: 5,
            max_providers_per_key: 6,
            max_value_bytes: 7,
            max_record_ttl: Duration::from_secs(8),
            advertise_namespace: false,
            announce_delay: Duration::from_secs(9),
            announce_retry: Duration::from_secs(10),
            eager_discovery: false,
            discovery_until_peers: 7,
            ..base
        };
        assert_eq!(changed, expected);
    }

    #[test]
    fn modes_map_onto_kademlia_and_back() {
        for mode in [Mode::Server, Mode::Client] {
            assert_eq!(Mode::from(kad::Mode::from(mode)), mode);
        }
    }
}
