//! The commented default config file that `ollamacron-node init` writes.

use serde_yaml_ng::{Mapping, Value};

use crate::ConfigError;
use crate::load::default_mapping;

/// Documentation of each field, in file order: key, what it does, and an
/// example for fields whose default is unset.
const FIELD_DOCS: &[(&str, &str, Option<&str>)] = &[
    (
        "node_id",
        "Expected peer id of this node; the node refuses to start with a key of another id. Unset: accept whatever key is at private_key_path.",
        Some("12D3KooW..."),
    ),
    (
        "data_dir",
        "Directory for the identity key and other state. Unset: $XDG_DATA_HOME/ollamacron, else ~/.local/share/ollamacron.",
        Some("/var/lib/ollamacron"),
    ),
    (
        "private_key_path",
        "Protobuf-encoded libp2p ed25519 key; created (mode 0600) when missing. Unset: <data_dir>/identity.key.",
        Some("/var/lib/ollamacron/identity.key"),
    ),
    (
        "listen",
        "Addresses to listen on: TCP, QUIC-v1 (UDP), and /ws with enable_websocket; IPv4 and IPv6 by default (a host without IPv6 listens on IPv4 only, and says so). Port 0 lets the OS choose.",
        None,
    ),
    (
        "bootstrap",
        "Peers to connect to on start, each ending in /p2p/<peer id>.",
        None,
    ),
    (
        "bootstrap_min_connections",
        "Keep at least this many bootstrap peers connected.",
        None,
    ),
    (
        "bootstrap_max_connections",
        "Dial no more bootstrap peers once this many are connected.",
        None,
    ),
    (
        "bootstrap_check_interval",
        "How often the bootstrap connections are checked.",
        None,
    ),
    (
        "bootstrap_backoff_initial",
        "First retry delay after a failed bootstrap dial; doubles per failure, with jitter.",
        None,
    ),
    (
        "bootstrap_backoff_max",
        "Longest retry delay for an unreachable bootstrap peer.",
        None,
    ),
    (
        "relay_nodes",
        "Relays to use when this node is behind NAT, each ending in /p2p/<peer id>.",
        None,
    ),
    (
        "enable_mdns",
        "Find peers on the local network with mDNS.",
        None,
    ),
    ("mdns_query_interval", "Interval of mDNS queries.", None),
    (
        "enable_dht",
        "Take part in the private Kademlia DHT (/ollamacron/kad/1.0.0).",
        None,
    ),
    (
        "dht_mode",
        "Kademlia mode: auto (server while reachable or unknown, client while private, detected or forced), server or client.",
        None,
    ),
    (
        "dht_bootstrap_interval",
        "Interval of Kademlia bootstrap (routing table refresh).",
        None,
    ),
    (
        "dht_provide_interval",
        "Interval of re-announcing this node's provider keys (the /ollamacron namespace, its service types, capabilities and models).",
        None,
    ),
    (
        "dht_discovery_interval",
        "Interval of looking up the namespace's providers (peer discovery).",
        None,
    ),
    (
        "dht_announce_delay",
        "How long after its first DHT peer the node announces its keys and puts its record in the DHT (so they land on the peers closest to each key); neighbours get the record at once by record sync.",
        None,
    ),
    ("dht_query_timeout", "Longest a DHT query may run.", None),
    (
        "dht_max_records",
        "Most records the local DHT store holds.",
        None,
    ),
    (
        "dht_max_providers_per_key",
        "Most providers the local DHT store keeps per key.",
        None,
    ),
    (
        "dht_max_value_size",
        "Largest DHT record value accepted.",
        None,
    ),
    (
        "enable_pubsub",
        "Spread service records with gossipsub (topic /ollamacron/services/1).",
        None,
    ),
    (
        "enable_nat_service",
        "Relay traffic (circuit relay v2) for peers behind NAT while this node is public (node_type: relay does too). Every node answers AutoNAT probes regardless.",
        None,
    ),
    (
        "enable_hole_punch",
        "Upgrade relayed connections to direct ones (DCUtR).",
        None,
    ),
    (
        "enable_auto_relay",
        "Reserve a slot on a relay when this node is not publicly reachable.",
        None,
    ),
    (
        "force_reachability",
        "Skip reachability detection (AutoNAT): public or private. Unset: detect.",
        Some("private"),
    ),
    (
        "autonat_only_global_ips",
        "AutoNAT dials back, and asks, only global IP addresses. Turn off where the internet side uses private or documentation addresses (test networks, NAT inside a larger private network).",
        None,
    ),
    (
        "enable_upnp",
        "Ask the local gateway for port mappings with UPnP (a failure is logged, not fatal).",
        None,
    ),
    (
        "relay_max_reservations",
        "Relay service: most reservations held at once; more are refused, never queued.",
        None,
    ),
    (
        "relay_max_reservations_per_peer",
        "Relay service: most reservations one peer may hold.",
        None,
    ),
    (
        "relay_reservation_duration",
        "Relay service: how long a reservation lasts before the peer must renew it.",
        None,
    ),
    (
        "relay_max_circuits",
        "Relay service: most relayed connections open at once.",
        None,
    ),
    (
        "relay_max_circuits_per_peer",
        "Relay service: most relayed connections one peer may have open.",
        None,
    ),
    (
        "relay_max_circuit_duration",
        "Relay service: a relayed connection is closed after this long (hole punching usually replaces it first).",
        None,
    ),
    (
        "relay_max_circuit_bytes",
        "Relay service: a relayed connection is closed after this many bytes each way.",
        None,
    ),
    ("enable_websocket", "Also offer WebSocket over TCP.", None),
    (
        "conn_mgr_low",
        "The node connects by itself (dials discovered peers, looks up the DHT namespace, health-checks by dialing) only while fewer peers are connected; trimming keeps at least this many connections.",
        None,
    ),
    (
        "conn_mgr_high",
        "Hard limit of established connections; when reached, connections are closed until conn_mgr_low remain (redundant ones first, then the youngest past conn_mgr_grace).",
        None,
    ),
    (
        "conn_mgr_grace",
        "Connections younger than this are never trimmed.",
        None,
    ),
    (
        "idle_connection_timeout",
        "A connection no protocol uses is closed after this long, unless it is one of the node's neighbours (up to conn_mgr_low connections either side keeps open while idle).",
        None,
    ),
    (
        "dial_timeout",
        "Longest an outgoing dial (connect and handshake) may take.",
        None,
    ),
    ("enable_tls", "Offer TLS 1.3 on TCP.", None),
    (
        "enable_noise",
        "Offer Noise on TCP (at least one of enable_tls and enable_noise must be on).",
        None,
    ),
    (
        "require_auth",
        "A private network: admit only peers holding the network key at psk_path, checked before any other protocol runs. TCP only: QUIC addresses are refused while it is on.",
        None,
    ),
    (
        "psk_path",
        "The network key (libp2p pnet format), made by `ollamacron-node init --psk FILE`. Unset: <data_dir>/swarm.key.",
        Some("/etc/ollamacron/swarm.key"),
    ),
    (
        "allowed_peers",
        "When not empty, only these peer ids may connect, either way; others are disconnected right after the handshake (and counted). Must include the bootstrap and relay peers.",
        Some("[12D3KooW...]"),
    ),
    (
        "max_memory",
        "Refuse new connections while the process uses more than this. Unset: no limit.",
        Some("512MiB"),
    ),
    (
        "max_cpu",
        "CPU cores (runtime worker threads) the node may use. Unset: all cores.",
        Some("2"),
    ),
    (
        "max_bandwidth",
        "Bytes per second all libp2p streams together may read, and may write (each way). Unset: no limit.",
        Some("100MiB"),
    ),
    (
        "node_type",
        "Role: full (serves models), client (uses the pool only), bootstrap or relay.",
        None,
    ),
    (
        "region",
        "Free-form region used when selecting services.",
        Some("eu-west"),
    ),
    ("tags", "Free-form tags describing this node.", None),
    (
        "services",
        concat!(
            "Services this node advertises, with no code. Each needs a name and a type; id defaults to the name.\n",
            "Other keys: version, description, port, metadata, tags, capabilities, protocols,\n",
            "health_check_url (http://, 2xx = healthy), latency_ms, throughput, reliability. For example:\n",
            "services:\n",
            "  - name: llama3:8b\n",
            "    type: llm\n",
            "    tags: [gpu]\n",
            "    capabilities: [completion, tools]",
        ),
        None,
    ),
    (
        "enable_ollama",
        "Advertise the models of the local Ollama (/api/tags, /api/show) as services, re-read every ollama_poll_interval; off on node_type: client.",
        None,
    ),
    (
        "ollama_url",
        "The local Ollama. Unset: OLLAMA_HOST when set (as the ollama CLI reads it), else http://127.0.0.1:11434.",
        Some("http://127.0.0.1:11434"),
    ),
    (
        "ollama_poll_interval",
        "How often the local Ollama's models are read (changes are re-advertised at once).",
        None,
    ),
    (
        "enable_gateway",
        "Serve the Ollama/OpenAI-compatible gateway: point Ollama and OpenAI clients at gateway_listen and each request goes to the best node that has its model.",
        None,
    ),
    (
        "gateway_listen",
        "Address of the gateway. Keep it on loopback unless you put it behind a proxy.",
        None,
    ),
    (
        "gateway_failover_attempts",
        "Nodes tried for one request when one fails before answering (refused, unreachable, model gone, 5xx).",
        None,
    ),
    (
        "gateway_first_byte_timeout",
        "Longest wait for a serving node to start answering; a request with stream false starts answering when it is complete.",
        None,
    ),
    (
        "gateway_max_concurrent",
        "Most inference requests this node serves for peers at once; more are refused with 429 so the asking node tries another.",
        None,
    ),
    (
        "gateway_max_concurrent_per_peer",
        "Most inference requests this node serves for one peer at once (more get 429).",
        None,
    ),
    (
        "gateway_max_request_bytes",
        "Largest request body the gateway takes, e.g. a chat with images (and a serving node from a peer); larger ones get a JSON 413.",
        None,
    ),
    (
        "gateway_queue_max",
        "Requests the gateway holds, in arrival order, while every node with their model is at its limit (each node takes gateway_max_concurrent_per_peer of them); one more gets 503 with Retry-After, as a full Ollama answers.",
        None,
    ),
    (
        "gateway_queue_timeout",
        "Longest a request waits in that queue before a 503.",
        None,
    ),
    (
        "gateway_allowed_hosts",
        "Host names the gateway answers besides localhost, loopback addresses and its own address (any address when it listens on 0.0.0.0); * allows any. Others get 403, which stops DNS-rebinding pages.",
        None,
    ),
    (
        "gateway_allowed_origins",
        "Browser origins the gateway answers besides pages on this machine (http(s)://localhost, 127.0.0.1, [::1], 0.0.0.0, any port) and app://, file://, tauri://, vscode-webview://, vscode-file:// (Ollama's defaults), plus OLLAMA_ORIGINS; * is a wildcard. Other origins get 403.",
        None,
    ),
    (
        "gateway_api_keys",
        "When not empty, every gateway request needs Authorization: Bearer <key> with one of these (the openai clients send their api_key so). Set one before listening beyond loopback.",
        None,
    ),
    (
        "gateway_api_key_file",
        "A file of further gateway keys, one per line; # starts a comment.",
        Some("/etc/ollamacron/gateway.keys"),
    ),
    (
        "record_ttl",
        "Lifetime of this node's signed service record; peers drop its services this long after the last refresh (10s to 1h).",
        None,
    ),
    (
        "record_refresh_interval",
        "How often the record is re-signed and re-published besides on every change; shorter than record_ttl.",
        None,
    ),
    (
        "health_check_interval",
        "How often services of other nodes are checked (connection, ping, their health_check_url).",
        None,
    ),
    (
        "lookup_timeout",
        "Longest a service lookup walks the DHT before answering with what it has.",
        None,
    ),
    (
        "lookup_cache_fresh",
        "A lookup with nothing cached waits for a DHT walk unless one for the same key finished this recently.",
        None,
    ),
    (
        "max_record_size",
        "Largest signed service record page accepted from a peer or published; at most dht_max_value_size.",
        None,
    ),
    (
        "max_services_per_record",
        "Most services in one page of the node record (a record has up to 16 pages).",
        None,
    ),
    (
        "max_string_length",
        "Longest string in a record, in bytes.",
        None,
    ),
    (
        "max_list_items",
        "Most tags, capabilities, protocols, addresses or metadata entries per service.",
        None,
    ),
    (
        "score_weights",
        "Weights of the service quality score (each >= 0, not all 0; only ratios matter).",
        None,
    ),
    (
        "enable_metrics",
        "Serve Prometheus metrics at http://<api_listen>/metrics.",
        None,
    ),
    (
        "api_listen",
        "Address of the local HTTP API. Keep it on loopback unless you put it behind a proxy.",
        None,
    ),
    (
        "api_allowed_hosts",
        "Host names the API answers besides localhost, loopback addresses and its own address; * allows any.",
        None,
    ),
    (
        "api_allowed_origins",
        "Browser origins the API answers besides pages on this machine and desktop apps; * is a wildcard.",
        None,
    ),
    (
        "api_keys",
        "When not empty, every API request but /healthz needs Authorization: Bearer <key> with one of these; the CLI sends the first. Set one before listening beyond loopback.",
        None,
    ),
    (
        "api_key_file",
        "A file of further API keys, one per line; # starts a comment.",
        Some("/etc/ollamacron/api.keys"),
    ),
    (
        "http_header_read_timeout",
        "The gateway and the API close a connection whose request headers take longer than this from their first byte.",
        None,
    ),
    (
        "http_body_read_timeout",
        "The gateway and the API refuse a request whose whole body has not arrived this long after its headers.",
        None,
    ),
    (
        "http_idle_timeout",
        "The gateway and the API close a connection idle this long before or between requests.",
        None,
    ),
    (
        "http_max_connections",
        "Most connections each of the gateway and the API keeps open; one more gets 503.",
        None,
    ),
    (
        "enable_tracing",
        "Also log span timings, and export the spans to otlp_endpoint when it is set.",
        None,
    ),
    (
        "otlp_endpoint",
        "With enable_tracing: the OTLP/HTTP collector (http://host:4318) spans are exported to; one request is one trace across the gateway node and the serving node.",
        Some("http://127.0.0.1:4318"),
    ),
    ("enable_logging", "Write logs to standard error.", None),
    (
        "log_level",
        "Log filter in RUST_LOG syntax; RUST_LOG wins when set.",
        None,
    ),
    ("log_format", "text or json.", None),
    (
        "ping_interval",
        "Interval of ping probes on each connection (latency).",
        None,
    ),
    (
        "shutdown_timeout",
        "How long a graceful shutdown waits for connections to close.",
        None,
    ),
];

/// Every config key with its one-line documentation, in file order.
pub fn field_docs() -> impl Iterator<Item = (&'static str, &'static str)> {
    FIELD_DOCS.iter().map(|(key, doc, _)| (*key, *doc))
}

/// The default configuration as a commented YAML file. Loading it gives
/// exactly [`NodeConfig::default`](crate::NodeConfig::default).
///
/// # Errors
/// Only if serialisation fails, which the defaults never cause.
pub fn default_config_yaml() -> Result<String, ConfigError> {
    let defaults = default_mapping()?;
    let mut out = String::from(
        "# Ollamacron node configuration.\n\
         # Precedence: built-in defaults < this file < OLLAMACRON_<KEY> environment < command-line flags.\n\
         # Durations are human strings (500ms, 30s, 5m, 1h); sizes are like 512MiB or 2GB.\n",
    );
    for (key, doc, example) in FIELD_DOCS {
        let value = defaults.get(*key).cloned().unwrap_or(Value::Null);
        out.push('\n');
        for line in doc.lines() {
            out.push_str("# ");
            out.push_str(line);
            out.push('\n');
        }
        match (&value, example) {
            (Value::Null, Some(example)) => {
                out.push_str(&format!("# {key}: {example}\n"));
            }
            _ => {
                let mut single = Mapping::new();
                single.insert(Value::String((*key).to_owned()), value);
                let text = serde_yaml_ng::to_string(&single)
                    .map_err(|e| ConfigError::Serialize(e.to_string()))?;
                out.push_str(&text);
            }
        }
    }
    Ok(out)
}
