#![doc = include_str!("../README.md")]

mod keys;
mod load;
mod network_key;
mod service;
mod size;
mod template;
mod validate;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use libp2p::{Multiaddr, PeerId};
use serde::{Deserialize, Serialize};

pub use load::{ConfigError, ConfigLoader, ENV_PREFIX, Origin, RESERVED_ENV_VARS};
pub use network_key::{
    NetworkKeyError, parse_network_key, read_network_key, write_new_network_key,
};
pub use service::{ScoreWeightsConfig, ServiceConfig};
pub use size::{ByteSize, ByteSizeParseError};
pub use template::{default_config_yaml, field_docs};
pub use validate::{
    MAX_CPU_CORES, MAX_DHT_ANNOUNCE_DELAY, MAX_DHT_VALUE_SIZE, MAX_DURATION, MAX_KEY_BYTES,
    MAX_LABEL_BYTES, MAX_RECORD_COUNT_LIMIT, MAX_RECORD_PAGES, MAX_RECORD_TTL,
    MAX_SHUTDOWN_TIMEOUT, MAX_TAGS, MIN_DHT_VALUE_SIZE, MIN_KEY_BYTES, MIN_MAX_MEMORY,
    MIN_PROBE_INTERVAL, MIN_RECORD_SIZE, MIN_RECORD_STRING_LENGTH, MIN_RECORD_TTL,
    MIN_RELAY_CIRCUIT_BYTES, MIN_REQUEST_BYTES, MIN_TIMER_INTERVAL, ValidationError,
};

/// The TCP and UDP port a node listens on by default.
pub const DEFAULT_P2P_PORT: u16 = 11436;
/// The loopback port of the local HTTP API (metrics, status) by default.
pub const DEFAULT_API_PORT: u16 = 11437;
/// The loopback port of the Ollama-compatible gateway by default.
pub const DEFAULT_GATEWAY_PORT: u16 = 11435;
/// Name of the identity key file inside the data directory.
pub const IDENTITY_FILE_NAME: &str = "identity.key";
/// The file in the data directory that keeps the services registered
/// through the API across restarts.
pub const REGISTRATIONS_FILE_NAME: &str = "services.json";
/// Name of the network key file inside the data directory.
pub const NETWORK_KEY_FILE_NAME: &str = "swarm.key";

/// The whole configuration of one node.
///
/// Field names are the YAML keys (and, upper-cased behind `OLLAMACRON_`, the
/// environment variables). See [`default_config_yaml`] for every field with
/// its documentation and default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Expected peer id of this node. When set, the node refuses to start
    /// with a key whose peer id differs (guards against a wrong key file).
    #[serde(deserialize_with = "lenient::opt_string")]
    pub node_id: Option<String>,
    /// Directory for the identity key and other state. `None` means the
    /// platform default (see [`NodeConfig::data_dir`]).
    pub data_dir: Option<PathBuf>,
    /// Path of the protobuf-encoded libp2p identity key; `None` means
    /// `<data_dir>/identity.key`.
    pub private_key_path: Option<PathBuf>,
    /// Multiaddrs to listen on (TCP, QUIC-v1, and `/ws` when WebSocket is on).
    #[serde(deserialize_with = "multiaddrs::deserialize")]
    pub listen: Vec<Multiaddr>,
    /// Bootstrap peers, each a multiaddr ending in `/p2p/<peer id>`.
    #[serde(deserialize_with = "multiaddrs::deserialize")]
    pub bootstrap: Vec<Multiaddr>,
    /// Keep at least this many bootstrap peers connected.
    pub bootstrap_min_connections: usize,
    /// Dial no more bootstrap peers once this many are connected.
    pub bootstrap_max_connections: usize,
    /// How often the bootstrap connections are checked.
    #[serde(with = "duration")]
    pub bootstrap_check_interval: Duration,
    /// First retry delay after a failed bootstrap dial (doubles per failure, with jitter).
    #[serde(with = "duration")]
    pub bootstrap_backoff_initial: Duration,
    /// Longest retry delay for an unreachable bootstrap peer.
    #[serde(with = "duration")]
    pub bootstrap_backoff_max: Duration,
    /// Relay peers for NAT traversal, each ending in `/p2p/<peer id>`.
    #[serde(deserialize_with = "multiaddrs::deserialize")]
    pub relay_nodes: Vec<Multiaddr>,
    /// Discover peers on the local network with mDNS.
    pub enable_mdns: bool,
    /// Interval of mDNS queries.
    #[serde(with = "duration")]
    pub mdns_query_interval: Duration,
    /// Take part in the private Kademlia DHT.
    pub enable_dht: bool,
    /// Kademlia mode: `auto` (server unless forced private), `server` or `client`.
    pub dht_mode: DhtMode,
    /// Interval of Kademlia bootstrap (routing table refresh).
    #[serde(with = "duration")]
    pub dht_bootstrap_interval: Duration,
    /// Interval of re-announcing this node's provider keys (the namespace,
    /// its service types, capabilities and models).
    #[serde(with = "duration")]
    pub dht_provide_interval: Duration,
    /// Interval of looking up the namespace's providers (peer discovery).
    #[serde(with = "duration")]
    pub dht_discovery_interval: Duration,
    /// How long after its first DHT peer a node waits before announcing
    /// its keys (provider records) and putting its record in the DHT, so
    /// they land on the peers closest to each key; its neighbours get its
    /// record at once by record sync.
    #[serde(with = "duration")]
    pub dht_announce_delay: Duration,
    /// Longest a DHT query may run.
    #[serde(with = "duration")]
    pub dht_query_timeout: Duration,
    /// Most records the local DHT store holds.
    pub dht_max_records: usize,
    /// Most providers the local DHT store keeps per key.
    pub dht_max_providers_per_key: usize,
    /// Largest DHT record value accepted.
    pub dht_max_value_size: ByteSize,
    /// Spread service records with gossipsub.
    pub enable_pubsub: bool,
    /// Offer AutoNAT and relay service to other peers.
    pub enable_nat_service: bool,
    /// Upgrade relayed connections to direct ones (DCUtR).
    pub enable_hole_punch: bool,
    /// Reserve a slot on relays when this node is not publicly reachable.
    pub enable_auto_relay: bool,
    /// Skip reachability detection and assume this value.
    pub force_reachability: Option<Reachability>,
    /// AutoNAT dials back (and asks) only global IP addresses. Turn off
    /// where the "internet" side uses private or documentation addresses
    /// (test networks, a NAT inside a larger private network).
    pub autonat_only_global_ips: bool,
    /// Ask the local gateway for port mappings with UPnP.
    pub enable_upnp: bool,
    /// Relay service: most reservations held at once (more are refused).
    pub relay_max_reservations: usize,
    /// Relay service: most reservations one peer may hold.
    pub relay_max_reservations_per_peer: usize,
    /// Relay service: how long a reservation lasts before it must be renewed.
    #[serde(with = "duration")]
    pub relay_reservation_duration: Duration,
    /// Relay service: most relayed circuits open at once.
    pub relay_max_circuits: usize,
    /// Relay service: most relayed circuits one peer may have open.
    pub relay_max_circuits_per_peer: usize,
    /// Relay service: a circuit is closed after this long.
    #[serde(with = "duration")]
    pub relay_max_circuit_duration: Duration,
    /// Relay service: a circuit is closed after this many bytes each way.
    pub relay_max_circuit_bytes: ByteSize,
    /// Also offer WebSocket (TCP) transport; `/ws` listen addresses need it.
    pub enable_websocket: bool,
    /// The peers a node connects to by itself: discovered peers are
    /// dialed, the DHT's namespace looked up and unconnected peers
    /// health-checked by dialing only while fewer are connected; and
    /// connection trimming keeps at least this many connections.
    pub conn_mgr_low: usize,
    /// Hard limit of established connections; trimming starts here.
    pub conn_mgr_high: usize,
    /// Connections younger than this are never trimmed.
    #[serde(with = "duration")]
    pub conn_mgr_grace: Duration,
    /// A connection no protocol uses is closed after this long, unless
    /// it is one of the node's neighbours: each node keeps up to
    /// `conn_mgr_low` connections open while idle (the first it makes or
    /// accepts, replaced as they close), and a connection either side
    /// keeps stays open.
    #[serde(with = "duration")]
    pub idle_connection_timeout: Duration,
    /// Longest an outgoing dial (connect and handshake) may take.
    #[serde(with = "duration")]
    pub dial_timeout: Duration,
    /// Offer TLS 1.3 on TCP.
    pub enable_tls: bool,
    /// Offer Noise on TCP.
    pub enable_noise: bool,
    /// A private network: admit only peers holding the pre-shared network
    /// key at `psk_path` (TCP only; QUIC cannot carry it).
    pub require_auth: bool,
    /// The network key (libp2p pnet format); `None` means
    /// `<data_dir>/swarm.key`. Create one with `ollamacron-node init --psk`.
    pub psk_path: Option<PathBuf>,
    /// When not empty, only these peer ids may connect (both ways); other
    /// peers are disconnected right after the handshake.
    pub allowed_peers: Vec<String>,
    /// Refuse new connections while the process uses more memory than this.
    pub max_memory: Option<ByteSize>,
    /// Number of CPU cores (runtime worker threads) the node may use.
    pub max_cpu: Option<u32>,
    /// Bytes per second all libp2p streams together may read, and may
    /// write (enforced each way by a token bucket).
    pub max_bandwidth: Option<ByteSize>,
    /// The role of this node.
    pub node_type: NodeType,
    /// Free-form region (e.g. `eu-west`), used when selecting services.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub region: Option<String>,
    /// Free-form tags describing this node.
    pub tags: Vec<String>,
    /// Services this node advertises without any code.
    pub services: Vec<ServiceConfig>,
    /// Advertise the models of the local Ollama as services (not on
    /// `node_type: client` nodes).
    pub enable_ollama: bool,
    /// The local Ollama; `None` means `OLLAMA_HOST` when set (read as the
    /// `ollama` CLI reads it), else `http://127.0.0.1:11434`.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub ollama_url: Option<String>,
    /// How often the local Ollama's models are read.
    #[serde(with = "duration")]
    pub ollama_poll_interval: Duration,
    /// Serve the Ollama/OpenAI-compatible gateway on `gateway_listen`.
    pub enable_gateway: bool,
    /// Address of the gateway; loopback by default.
    pub gateway_listen: SocketAddr,
    /// Nodes tried for one request when the first fails before answering.
    pub gateway_failover_attempts: usize,
    /// Longest wait for a serving node to start answering (a request that
    /// does not stream starts answering when it is complete).
    #[serde(with = "duration")]
    pub gateway_first_byte_timeout: Duration,
    /// Most inference requests this node serves for peers at once; more are
    /// refused (HTTP 429) so the asking gateway tries another node.
    pub gateway_max_concurrent: usize,
    /// Most inference requests this node serves for one peer at once.
    pub gateway_max_concurrent_per_peer: usize,
    /// Largest request body the gateway takes (and a serving node takes
    /// from a peer); larger ones get a JSON 413.
    pub gateway_max_request_bytes: ByteSize,
    /// Requests the gateway holds while every node with their model is at
    /// its limit; one more gets 503, as from a full Ollama.
    pub gateway_queue_max: usize,
    /// Longest a request waits in that queue before a 503.
    #[serde(with = "duration")]
    pub gateway_queue_timeout: Duration,
    /// `Host` names the gateway answers besides loopback ones and its own
    /// address (`*`: any). A page of another name is refused (DNS rebinding).
    pub gateway_allowed_hosts: Vec<String>,
    /// Browser origins the gateway answers besides pages on this machine
    /// and desktop apps (Ollama's defaults) and `OLLAMA_ORIGINS`; `*` is a
    /// wildcard (`https://*.example.com`).
    pub gateway_allowed_origins: Vec<String>,
    /// When not empty, every gateway request needs `Authorization: Bearer <key>`
    /// with one of these keys.
    pub gateway_api_keys: Vec<String>,
    /// A file of further gateway keys, one per line (`#` comments).
    pub gateway_api_key_file: Option<PathBuf>,
    /// Lifetime of this node's signed record: peers drop its services this
    /// long after the last refresh.
    #[serde(with = "duration")]
    pub record_ttl: Duration,
    /// How often the record is re-signed and re-published (besides on change).
    #[serde(with = "duration")]
    pub record_refresh_interval: Duration,
    /// How often the services of other nodes are health-checked.
    #[serde(with = "duration")]
    pub health_check_interval: Duration,
    /// Longest a service lookup walks the DHT before answering with what it has.
    #[serde(with = "duration")]
    pub lookup_timeout: Duration,
    /// A lookup whose cache holds no match still answers at once (without
    /// waiting for a DHT walk) when a walk for the same key finished this
    /// recently; one with matches always answers from the cache.
    #[serde(with = "duration")]
    pub lookup_cache_fresh: Duration,
    /// Largest signed record accepted from a peer (and published).
    pub max_record_size: ByteSize,
    /// Most services in one node record.
    pub max_services_per_record: usize,
    /// Longest string in a record, in bytes.
    pub max_string_length: usize,
    /// Most tags, capabilities, protocols, addresses or metadata entries per service.
    pub max_list_items: usize,
    /// Weights of the quality score.
    pub score_weights: ScoreWeightsConfig,
    /// Serve Prometheus metrics on `api_listen`.
    pub enable_metrics: bool,
    /// Address of the local HTTP API (`/metrics`); loopback by default.
    pub api_listen: SocketAddr,
    /// `Host` names the API answers besides loopback ones and its own
    /// address (`*`: any).
    pub api_allowed_hosts: Vec<String>,
    /// Browser origins the API answers besides pages on this machine and
    /// desktop apps.
    pub api_allowed_origins: Vec<String>,
    /// When not empty, every API request (but `/healthz`) needs
    /// `Authorization: Bearer <key>` with one of these keys.
    pub api_keys: Vec<String>,
    /// A file of further API keys, one per line (`#` comments).
    pub api_key_file: Option<PathBuf>,
    /// The gateway and the API close a connection whose request headers
    /// take longer than this from their first byte.
    #[serde(with = "duration")]
    pub http_header_read_timeout: Duration,
    /// ... and a request whose body takes longer than this after its headers.
    #[serde(with = "duration")]
    pub http_body_read_timeout: Duration,
    /// ... and a connection idle this long between requests (or before the first).
    #[serde(with = "duration")]
    pub http_idle_timeout: Duration,
    /// Most connections each of the gateway and the API keeps open; one
    /// more is answered 503.
    pub http_max_connections: usize,
    /// Log span timings (span close events) along with events, and export
    /// the spans to `otlp_endpoint` when it is set.
    pub enable_tracing: bool,
    /// With `enable_tracing`: the OTLP/HTTP collector spans are exported
    /// to (`http://host:4318`; spans go to its `/v1/traces`); `None`: spans
    /// are only logged.
    #[serde(deserialize_with = "lenient::opt_string")]
    pub otlp_endpoint: Option<String>,
    /// Write logs to standard error.
    pub enable_logging: bool,
    /// Log filter in `RUST_LOG` syntax (`RUST_LOG` itself wins when set).
    #[serde(deserialize_with = "lenient::string")]
    pub log_level: String,
    /// Log line format.
    pub log_format: LogFormat,
    /// Interval of ping probes on each connection (latency measurement).
    #[serde(with = "duration")]
    pub ping_interval: Duration,
    /// How long a graceful shutdown waits for connections to close.
    #[serde(with = "duration")]
    pub shutdown_timeout: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node_id: None,
            data_dir: None,
            private_key_path: None,
            listen: default_listen(),
            bootstrap: Vec::new(),
            bootstrap_min_connections: 2,
            bootstrap_max_connections: 5,
            bootstrap_check_interval: Duration::from_secs(30),
            bootstrap_backoff_initial: Duration::from_secs(1),
            bootstrap_backoff_max: Duration::from_secs(300),
            relay_nodes: Vec::new(),
            enable_mdns: true,
            mdns_query_interval: Duration::from_secs(10),
            enable_dht: true,
            dht_mode: DhtMode::Auto,
            dht_bootstrap_interval: Duration::from_secs(300),
            dht_provide_interval: Duration::from_secs(300),
            dht_discovery_interval: Duration::from_secs(30),
            dht_announce_delay: Duration::from_secs(5),
            dht_query_timeout: Duration::from_secs(30),
            dht_max_records: 1024,
            dht_max_providers_per_key: 256,
            dht_max_value_size: ByteSize::from_bytes(64 * 1024),
            enable_pubsub: false,
            enable_nat_service: false,
            enable_hole_punch: true,
            enable_auto_relay: true,
            force_reachability: None,
            autonat_only_global_ips: true,
            enable_upnp: false,
            relay_max_reservations: 128,
            relay_max_reservations_per_peer: 4,
            relay_reservation_duration: Duration::from_secs(60 * 60),
            relay_max_circuits: 16,
            relay_max_circuits_per_peer: 4,
            relay_max_circuit_duration: Duration::from_secs(2 * 60),
            relay_max_circuit_bytes: ByteSize::from_bytes(1 << 20),
            enable_websocket: false,
            conn_mgr_low: 32,
            conn_mgr_high: 400,
            conn_mgr_grace: Duration::from_secs(30),
            idle_connection_timeout: Duration::from_secs(10),
            dial_timeout: Duration::from_secs(30),
            enable_tls: true,
            enable_noise: true,
            require_auth: false,
            psk_path: None,
            allowed_peers: Vec::new(),
            max_memory: None,
            max_cpu: None,
            max_bandwidth: None,
            node_type: NodeType::Full,
            region: None,
            tags: Vec::new(),
            services: Vec::new(),
            enable_ollama: true,
            ollama_url: None,
            ollama_poll_interval: Duration::from_secs(30),
            enable_gateway: true,
            gateway_listen: SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_GATEWAY_PORT)),
            gateway_failover_attempts: 3,
            gateway_first_byte_timeout: Duration::from_secs(300),
            gateway_max_concurrent: 32,
            gateway_max_concurrent_per_peer: 8,
            gateway_max_request_bytes: ByteSize::from_mib(100),
            gateway_queue_max: 512,
            gateway_queue_timeout: Duration::from_secs(300),
            gateway_allowed_hosts: Vec::new(),
            gateway_allowed_origins: Vec::new(),
            gateway_api_keys: Vec::new(),
            gateway_api_key_file: None,
            record_ttl: Duration::from_secs(300),
            record_refresh_interval: Duration::from_secs(120),
            health_check_interval: Duration::from_secs(60),
            lookup_timeout: Duration::from_secs(5),
            lookup_cache_fresh: Duration::from_secs(10),
            max_record_size: ByteSize::from_bytes(64 * 1024),
            max_services_per_record: 64,
            max_string_length: 256,
            max_list_items: 32,
            score_weights: ScoreWeightsConfig::default(),
            enable_metrics: true,
            api_listen: SocketAddr::from((Ipv4Addr::LOCALHOST, DEFAULT_API_PORT)),
            api_allowed_hosts: Vec::new(),
            api_allowed_origins: Vec::new(),
            api_keys: Vec::new(),
            api_key_file: None,
            http_header_read_timeout: Duration::from_secs(10),
            http_body_read_timeout: Duration::from_secs(120),
            http_idle_timeout: Duration::from_secs(60),
            http_max_connections: 1024,
            enable_tracing: false,
            otlp_endpoint: None,
            enable_logging: true,
            log_level: "info".to_owned(),
            log_format: LogFormat::Text,
            ping_interval: Duration::from_secs(15),
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}

/// TCP and QUIC on every IPv4 and IPv6 address, on the same port (a host
/// without IPv6 listens on IPv4 only, and says so).
fn default_listen() -> Vec<Multiaddr> {
    use libp2p::multiaddr::Protocol;
    [
        Protocol::Ip4(Ipv4Addr::UNSPECIFIED),
        Protocol::Ip6(std::net::Ipv6Addr::UNSPECIFIED),
    ]
    .into_iter()
    .flat_map(|ip| {
        let any = Multiaddr::empty().with(ip);
        [
            any.clone().with(Protocol::Tcp(DEFAULT_P2P_PORT)),
            any.with(Protocol::Udp(DEFAULT_P2P_PORT))
                .with(Protocol::QuicV1),
        ]
    })
    .collect()
}

impl NodeConfig {
    /// The data directory: `data_dir` when set, else
    /// `$XDG_DATA_HOME/ollamacron`, else `$HOME/.local/share/ollamacron`,
    /// else `./.ollamacron`.
    #[must_use]
    pub fn data_dir(&self) -> PathBuf {
        if let Some(dir) = &self.data_dir {
            return dir.clone();
        }
        let non_empty = |name| std::env::var_os(name).filter(|v| !v.is_empty());
        if let Some(xdg) = non_empty("XDG_DATA_HOME") {
            return PathBuf::from(xdg).join("ollamacron");
        }
        if let Some(home) = non_empty("HOME") {
            return PathBuf::from(home).join(".local/share/ollamacron");
        }
        PathBuf::from(".ollamacron")
    }

    /// The identity key file: `private_key_path` when set, else
    /// `<data_dir>/identity.key`.
    #[must_use]
    pub fn private_key_path(&self) -> PathBuf {
        self.private_key_path
            .clone()
            .unwrap_or_else(|| self.data_dir().join(IDENTITY_FILE_NAME))
    }

    /// Where the services registered through the API are kept:
    /// `<data_dir>/services.json`.
    #[must_use]
    pub fn registrations_path(&self) -> PathBuf {
        self.data_dir().join(REGISTRATIONS_FILE_NAME)
    }

    /// The network key file: `psk_path` when set, else
    /// `<data_dir>/swarm.key`.
    #[must_use]
    pub fn psk_path(&self) -> PathBuf {
        self.psk_path
            .clone()
            .unwrap_or_else(|| self.data_dir().join(NETWORK_KEY_FILE_NAME))
    }

    /// The allowed peer ids, parsed (validation guarantees they parse).
    #[must_use]
    pub fn allowed_peer_ids(&self) -> Vec<PeerId> {
        self.allowed_peers
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect()
    }

    /// The expected peer id, parsed (validation guarantees it parses).
    #[must_use]
    pub fn expected_peer_id(&self) -> Option<PeerId> {
        self.node_id.as_deref().and_then(|s| s.parse().ok())
    }

    /// This configuration as YAML (every field, no comments).
    ///
    /// # Errors
    /// Only if serialisation fails, which no value of this type causes.
    pub fn to_yaml(&self) -> Result<String, ConfigError> {
        serde_yaml_ng::to_string(self).map_err(|e| ConfigError::Serialize(e.to_string()))
    }
}

/// Reachability forced by configuration instead of detected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reachability {
    /// Publicly reachable: DHT server mode, may serve as relay.
    Public,
    /// Behind NAT or a firewall: DHT client mode, uses relays.
    Private,
}

/// Kademlia mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DhtMode {
    /// Server unless the node is (forced or detected) private.
    Auto,
    /// Always answer DHT queries.
    Server,
    /// Only ask; never answer.
    Client,
}

/// What part a node plays in the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeType {
    /// Serves its local models and routes requests (the default).
    Full,
    /// Routes requests and takes part in discovery, serves no models.
    Client,
    /// A well-known, stable peer others bootstrap from.
    Bootstrap,
    /// Relays traffic for peers behind NAT.
    Relay,
}

/// Format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Durations as human strings (`30s`, `5m`, `1h 30m`).
mod duration {
    use std::time::Duration;

    use serde::{Deserializer, Serializer, de};

    pub(crate) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_duration(*d))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let raw = super::lenient::string(d)?;
        humantime::parse_duration(&raw).map_err(|e| {
            de::Error::custom(format!(
                "`{raw}` is not a duration: {e} (write e.g. `500ms`, `30s`, `5m`, `1h`)"
            ))
        })
    }
}

/// Multiaddr lists whose errors name the bad value.
mod multiaddrs {
    use libp2p::Multiaddr;
    use serde::{Deserialize, Deserializer, de};

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Multiaddr>, D::Error> {
        let raw = Vec::<String>::deserialize(d)?;
        raw.iter()
            .map(|s| {
                s.parse::<Multiaddr>().map_err(|e| {
                    de::Error::custom(format!(
                        "`{s}` is not a multiaddr: {e} (write e.g. `/ip4/192.0.2.1/tcp/{}`)",
                        super::DEFAULT_P2P_PORT
                    ))
                })
            })
            .collect()
    }
}

/// Strings that also accept numbers and booleans (`region: 1234`,
/// `OLLAMACRON_REGION=1234`), so a value never fails for looking numeric.
mod lenient {
    use std::fmt;

    use serde::{Deserializer, de};

    struct Scalar;

    impl de::Visitor<'_> for Scalar {
        type Value = String;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_f64<E: de::Error>(self, v: f64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<String, E> {
            Ok(v.to_string())
        }
    }

    struct OptScalar;

    impl<'de> de::Visitor<'de> for OptScalar {
        type Value = Option<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a string or nothing")
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            string(d).map(Some)
        }
    }

    pub(crate) fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        d.deserialize_any(Scalar)
    }

    pub(crate) fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        d.deserialize_option(OptScalar)
    }
}
