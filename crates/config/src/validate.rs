//! The rules a merged configuration must follow before anything starts.

use std::fmt;
use std::time::Duration;

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

use crate::{ByteSize, NodeConfig};

/// Longest accepted tag or region, in bytes.
pub const MAX_LABEL_BYTES: usize = 64;
/// Most tags a node may carry.
pub const MAX_TAGS: usize = 32;
/// Smallest `max_memory`: below it a node would refuse every connection.
pub const MIN_MAX_MEMORY: ByteSize = ByteSize::from_mib(32);
/// Most CPU cores `max_cpu` may name.
pub const MAX_CPU_CORES: u32 = 1024;
/// Shortest accepted `ping_interval` and `idle_connection_timeout`.
pub const MIN_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Shortest accepted period of the discovery timers and dial timeout.
pub const MIN_TIMER_INTERVAL: Duration = Duration::from_millis(100);
/// Smallest accepted `gateway_max_request_bytes`.
pub const MIN_REQUEST_BYTES: ByteSize = ByteSize::from_bytes(1024);
/// Longest accepted API or gateway key, in bytes.
pub const MAX_KEY_BYTES: usize = 512;
/// Shortest accepted API or gateway key, in bytes (use a long random one).
pub const MIN_KEY_BYTES: usize = 8;

/// A key fit to send as `Authorization: Bearer <key>`.
pub(crate) fn check_key(key: &str) -> Result<(), String> {
    if key.len() < MIN_KEY_BYTES || key.len() > MAX_KEY_BYTES {
        return Err(format!(
            "must be {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes long (a long random string)"
        ));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("must be printable ASCII without spaces".to_owned());
    }
    Ok(())
}

/// Smallest accepted `dht_max_value_size`.
pub const MIN_DHT_VALUE_SIZE: ByteSize = ByteSize::from_bytes(1024);
/// Largest accepted `dht_max_value_size`.
pub const MAX_DHT_VALUE_SIZE: ByteSize = ByteSize::from_mib(1);
/// Longest accepted period or timeout of any duration field: longer ones
/// overflow timers, and nobody means them.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Longest accepted `dht_announce_delay`.
pub const MAX_DHT_ANNOUNCE_DELAY: Duration = Duration::from_secs(600);
/// Pages a node record may have: a node offers up to this many times
/// `max_services_per_record` services (the record format's limit, as in
/// `ollamacron_service_registry::MAX_RECORD_PAGES`).
pub const MAX_RECORD_PAGES: usize = 16;
/// Shortest `record_ttl` (and the shortest lifetime accepted from a peer).
pub const MIN_RECORD_TTL: Duration = Duration::from_secs(10);
/// Longest `record_ttl` (and the longest lifetime accepted from a peer).
pub const MAX_RECORD_TTL: Duration = Duration::from_secs(3600);
/// Smallest `max_record_size`.
pub const MIN_RECORD_SIZE: ByteSize = ByteSize::from_bytes(1024);
/// Smallest `max_string_length`: peer ids (52 bytes) and addresses must fit.
pub const MIN_RECORD_STRING_LENGTH: usize = 64;
/// Largest `max_services_per_record`, `max_string_length` and `max_list_items`.
pub const MAX_RECORD_COUNT_LIMIT: usize = 4096;
/// Smallest accepted `relay_max_circuit_bytes`: room for the handshakes
/// before DCUtR upgrades a relayed connection.
pub const MIN_RELAY_CIRCUIT_BYTES: ByteSize = ByteSize::from_bytes(16 * 1024);
/// Longest accepted `shutdown_timeout`.
pub const MAX_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(600);

/// One broken rule: the field, its value, and what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field} ({value}) {rule}")]
pub struct ValidationError {
    /// The field, e.g. `bootstrap[2]`.
    pub field: String,
    /// The offending value as written.
    pub value: String,
    /// What is wrong and what would be allowed.
    pub rule: String,
}

impl NodeConfig {
    /// Check every rule; return all that are broken.
    ///
    /// # Errors
    /// Each broken rule, naming the field, the value and what is allowed.
    pub fn validate(&self) -> Result<(), Vec<ValidationError>> {
        let mut errors = Vec::new();
        let mut fail = |field: &str, value: &dyn fmt::Display, rule: String| {
            errors.push(ValidationError {
                field: field.to_owned(),
                value: value.to_string(),
                rule,
            });
        };

        if let Some(id) = &self.node_id
            && let Err(e) = id.parse::<PeerId>()
        {
            fail(
                "node_id",
                id,
                format!(
                    "is not a peer id ({e}); use the base58 id `ollamacron-node id` prints, or leave it unset"
                ),
            );
        }

        for (i, addr) in self.listen.iter().enumerate() {
            if let Err(rule) = check_listen_addr(addr, self.enable_websocket) {
                fail(&format!("listen[{i}]"), addr, rule);
            }
        }
        for (name, list) in [
            ("bootstrap", &self.bootstrap),
            ("relay_nodes", &self.relay_nodes),
        ] {
            for (i, addr) in list.iter().enumerate() {
                if let Err(rule) = check_peer_addr(addr) {
                    fail(&format!("{name}[{i}]"), addr, rule);
                }
            }
        }
        for (i, addr) in self.relay_nodes.iter().enumerate() {
            let peers = addr
                .iter()
                .filter(|p| matches!(p, Protocol::P2p(_)))
                .count();
            if addr.iter().any(|p| p == Protocol::P2pCircuit) || peers > 1 {
                fail(
                    &format!("relay_nodes[{i}]"),
                    addr,
                    "must be the relay's own address (e.g. /ip4/203.0.113.1/tcp/11436/p2p/<relay id>), \
                     not a relayed one"
                        .to_owned(),
                );
            }
        }

        if self.conn_mgr_high == 0 {
            fail(
                "conn_mgr_high",
                &self.conn_mgr_high,
                "must be at least 1".to_owned(),
            );
        }
        if self.conn_mgr_low > self.conn_mgr_high {
            fail(
                "conn_mgr_low",
                &self.conn_mgr_low,
                format!("must be <= conn_mgr_high ({})", self.conn_mgr_high),
            );
        }
        if self.bootstrap_max_connections == 0 {
            fail(
                "bootstrap_max_connections",
                &0,
                "must be at least 1".to_owned(),
            );
        }
        if self.bootstrap_min_connections > self.bootstrap_max_connections {
            fail(
                "bootstrap_min_connections",
                &self.bootstrap_min_connections,
                format!(
                    "must be <= bootstrap_max_connections ({})",
                    self.bootstrap_max_connections
                ),
            );
        }
        if self.bootstrap_backoff_max < self.bootstrap_backoff_initial {
            fail(
                "bootstrap_backoff_max",
                &humantime::format_duration(self.bootstrap_backoff_max),
                format!(
                    "must be >= bootstrap_backoff_initial ({})",
                    humantime::format_duration(self.bootstrap_backoff_initial)
                ),
            );
        }
        // Every duration: a floor where too short means busy-looping or
        // flapping, and a ceiling past which timers overflow.
        for (name, value, min) in [
            (
                "bootstrap_check_interval",
                self.bootstrap_check_interval,
                MIN_TIMER_INTERVAL,
            ),
            (
                "bootstrap_backoff_initial",
                self.bootstrap_backoff_initial,
                MIN_TIMER_INTERVAL,
            ),
            (
                "bootstrap_backoff_max",
                self.bootstrap_backoff_max,
                Duration::ZERO,
            ),
            (
                "mdns_query_interval",
                self.mdns_query_interval,
                MIN_TIMER_INTERVAL,
            ),
            (
                "dht_bootstrap_interval",
                self.dht_bootstrap_interval,
                MIN_TIMER_INTERVAL,
            ),
            (
                "dht_provide_interval",
                self.dht_provide_interval,
                MIN_TIMER_INTERVAL,
            ),
            (
                "dht_discovery_interval",
                self.dht_discovery_interval,
                MIN_TIMER_INTERVAL,
            ),
            (
                "dht_query_timeout",
                self.dht_query_timeout,
                MIN_TIMER_INTERVAL,
            ),
            ("dial_timeout", self.dial_timeout, MIN_TIMER_INTERVAL),
            (
                "relay_reservation_duration",
                self.relay_reservation_duration,
                MIN_PROBE_INTERVAL,
            ),
            (
                "relay_max_circuit_duration",
                self.relay_max_circuit_duration,
                MIN_PROBE_INTERVAL,
            ),
            ("conn_mgr_grace", self.conn_mgr_grace, Duration::ZERO),
            ("ping_interval", self.ping_interval, MIN_PROBE_INTERVAL),
            (
                "record_refresh_interval",
                self.record_refresh_interval,
                MIN_PROBE_INTERVAL,
            ),
            (
                "health_check_interval",
                self.health_check_interval,
                MIN_PROBE_INTERVAL,
            ),
            ("lookup_timeout", self.lookup_timeout, MIN_TIMER_INTERVAL),
            (
                "ollama_poll_interval",
                self.ollama_poll_interval,
                MIN_PROBE_INTERVAL,
            ),
            (
                "gateway_first_byte_timeout",
                self.gateway_first_byte_timeout,
                MIN_PROBE_INTERVAL,
            ),
            (
                "lookup_cache_fresh",
                self.lookup_cache_fresh,
                Duration::ZERO,
            ),
            (
                "idle_connection_timeout",
                self.idle_connection_timeout,
                MIN_PROBE_INTERVAL,
            ),
            (
                "http_header_read_timeout",
                self.http_header_read_timeout,
                MIN_TIMER_INTERVAL,
            ),
            (
                "http_body_read_timeout",
                self.http_body_read_timeout,
                MIN_TIMER_INTERVAL,
            ),
            (
                "http_idle_timeout",
                self.http_idle_timeout,
                MIN_TIMER_INTERVAL,
            ),
        ] {
            let bound = if value < min {
                Some(format!(
                    "must be at least {}",
                    humantime::format_duration(min)
                ))
            } else if value > MAX_DURATION {
                Some(format!(
                    "must be at most {}",
                    humantime::format_duration(MAX_DURATION)
                ))
            } else {
                None
            };
            if let Some(rule) = bound {
                fail(name, &humantime::format_duration(value), rule);
            }
        }
        if self.dht_announce_delay > MAX_DHT_ANNOUNCE_DELAY {
            fail(
                "dht_announce_delay",
                &humantime::format_duration(self.dht_announce_delay),
                format!(
                    "must be at most {} (0s announces with the first peer)",
                    humantime::format_duration(MAX_DHT_ANNOUNCE_DELAY)
                ),
            );
        }
        for (name, value) in [
            ("dht_max_records", self.dht_max_records),
            ("dht_max_providers_per_key", self.dht_max_providers_per_key),
        ] {
            if value == 0 {
                fail(name, &0, "must be at least 1".to_owned());
            }
        }
        if !(MIN_DHT_VALUE_SIZE..=MAX_DHT_VALUE_SIZE).contains(&self.dht_max_value_size) {
            fail(
                "dht_max_value_size",
                &self.dht_max_value_size,
                format!("must be between {MIN_DHT_VALUE_SIZE} and {MAX_DHT_VALUE_SIZE}"),
            );
        }
        if !self.enable_tls && !self.enable_noise {
            fail(
                "enable_noise",
                &false,
                "and enable_tls (false) leave TCP without a security protocol; enable at least one"
                    .to_owned(),
            );
        }
        if self.require_auth {
            let path = self.psk_path();
            if let Err(e) = crate::read_network_key(&path) {
                fail(
                    "psk_path",
                    &path.display(),
                    format!("must hold the network key when require_auth is on: {e}"),
                );
            }
            if self.enable_websocket {
                fail(
                    "enable_websocket",
                    &true,
                    "cannot be combined with require_auth: WebSocket clients (browsers) cannot \
                     do the private-network handshake; turn one of them off"
                        .to_owned(),
                );
            }
            for (name, list) in [
                ("listen", &self.listen),
                ("bootstrap", &self.bootstrap),
                ("relay_nodes", &self.relay_nodes),
            ] {
                for (i, addr) in list.iter().enumerate() {
                    if addr
                        .iter()
                        .any(|p| matches!(p, Protocol::QuicV1 | Protocol::Quic))
                    {
                        fail(
                            &format!("{name}[{i}]"),
                            addr,
                            "is QUIC, which cannot carry the network key of require_auth (a \
                             private network protects TCP only); use a /tcp/ address"
                                .to_owned(),
                        );
                    }
                }
            }
        }
        let mut allowed = std::collections::HashSet::new();
        for (i, id) in self.allowed_peers.iter().enumerate() {
            match id.parse::<PeerId>() {
                Ok(peer) => {
                    allowed.insert(peer);
                }
                Err(e) => fail(
                    &format!("allowed_peers[{i}]"),
                    id,
                    format!(
                        "is not a peer id ({e}); use the base58 id `ollamacron-node id` prints"
                    ),
                ),
            }
        }
        if !allowed.is_empty() {
            for (name, list) in [
                ("bootstrap", &self.bootstrap),
                ("relay_nodes", &self.relay_nodes),
            ] {
                for (i, addr) in list.iter().enumerate() {
                    if let Some(Protocol::P2p(peer)) = addr.iter().last()
                        && !allowed.contains(&peer)
                    {
                        fail(
                            &format!("{name}[{i}]"),
                            addr,
                            format!(
                                "names a peer that is not in allowed_peers, so it would be \
                                 disconnected; add {peer} to allowed_peers"
                            ),
                        );
                    }
                }
            }
        }
        for (name, value) in [
            ("gateway_failover_attempts", self.gateway_failover_attempts),
            ("gateway_max_concurrent", self.gateway_max_concurrent),
            ("http_max_connections", self.http_max_connections),
            (
                "gateway_max_concurrent_per_peer",
                self.gateway_max_concurrent_per_peer,
            ),
            ("relay_max_reservations", self.relay_max_reservations),
            (
                "relay_max_reservations_per_peer",
                self.relay_max_reservations_per_peer,
            ),
            ("relay_max_circuits", self.relay_max_circuits),
            (
                "relay_max_circuits_per_peer",
                self.relay_max_circuits_per_peer,
            ),
        ] {
            if value == 0 {
                fail(name, &0, "must be at least 1".to_owned());
            }
        }
        if self.relay_max_circuit_bytes < MIN_RELAY_CIRCUIT_BYTES {
            fail(
                "relay_max_circuit_bytes",
                &self.relay_max_circuit_bytes,
                format!("must be at least {MIN_RELAY_CIRCUIT_BYTES}"),
            );
        }

        if let Some(max) = self.max_memory
            && max < MIN_MAX_MEMORY
        {
            fail(
                "max_memory",
                &max,
                format!("must be at least {MIN_MAX_MEMORY}, or unset for no limit"),
            );
        }
        if let Some(cpu) = self.max_cpu
            && !(1..=MAX_CPU_CORES).contains(&cpu)
        {
            fail(
                "max_cpu",
                &cpu,
                format!("must be between 1 and {MAX_CPU_CORES} cores, or unset for all cores"),
            );
        }
        if let Some(bw) = self.max_bandwidth
            && bw.bytes() == 0
        {
            fail(
                "max_bandwidth",
                &bw,
                "must be more than 0 bytes per second, or unset for no limit".to_owned(),
            );
        }

        if let Some(region) = &self.region
            && let Err(rule) = check_label(region)
        {
            fail("region", region, rule);
        }
        if self.tags.len() > MAX_TAGS {
            fail(
                "tags",
                &format!("{} tags", self.tags.len()),
                format!("must hold at most {MAX_TAGS} tags"),
            );
        }
        for (i, tag) in self.tags.iter().enumerate() {
            if let Err(rule) = check_label(tag) {
                fail(&format!("tags[{i}]"), tag, rule);
            }
        }

        self.validate_registry(&mut fail);
        self.validate_http(&mut fail);

        if self.shutdown_timeout > MAX_SHUTDOWN_TIMEOUT {
            fail(
                "shutdown_timeout",
                &humantime::format_duration(self.shutdown_timeout),
                format!(
                    "must be at most {}",
                    humantime::format_duration(MAX_SHUTDOWN_TIMEOUT)
                ),
            );
        }
        if self.log_level.trim().is_empty() {
            fail(
                "log_level",
                &"\"\"",
                "must be a filter such as `info` or `ollamacron=debug,libp2p=info`".to_owned(),
            );
        }

        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// The gateway's and the API's request size, hosts, origins and keys.
    fn validate_http(&self, fail: &mut impl FnMut(&str, &dyn fmt::Display, String)) {
        if let Some(endpoint) = &self.otlp_endpoint {
            if let Err(rule) = check_otlp_endpoint(endpoint) {
                fail("otlp_endpoint", endpoint, rule);
            } else if !self.enable_tracing {
                fail(
                    "otlp_endpoint",
                    endpoint,
                    "is set but enable_tracing is false: set enable_tracing: true to export spans, or leave otlp_endpoint unset".to_owned(),
                );
            }
        }
        if self.gateway_max_request_bytes < MIN_REQUEST_BYTES {
            fail(
                "gateway_max_request_bytes",
                &self.gateway_max_request_bytes,
                format!("must be at least {MIN_REQUEST_BYTES}"),
            );
        }
        for (name, hosts) in [
            ("gateway_allowed_hosts", &self.gateway_allowed_hosts),
            ("api_allowed_hosts", &self.api_allowed_hosts),
        ] {
            for (i, host) in hosts.iter().enumerate() {
                if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
                    fail(
                        &format!("{name}[{i}]"),
                        &format!("{host:?}"),
                        "must be a host name or address without scheme or path (e.g. box.lan)"
                            .to_owned(),
                    );
                }
            }
        }
        for (name, origins) in [
            ("gateway_allowed_origins", &self.gateway_allowed_origins),
            ("api_allowed_origins", &self.api_allowed_origins),
        ] {
            for (i, origin) in origins.iter().enumerate() {
                if origin.is_empty() || origin.contains(char::is_whitespace) {
                    fail(
                        &format!("{name}[{i}]"),
                        &format!("{origin:?}"),
                        "must be an origin such as https://app.example.com (* is a wildcard)"
                            .to_owned(),
                    );
                }
            }
        }
        for (name, keys) in [
            ("gateway_api_keys", &self.gateway_api_keys),
            ("api_keys", &self.api_keys),
        ] {
            for (i, key) in keys.iter().enumerate() {
                if let Err(rule) = check_key(key) {
                    fail(&format!("{name}[{i}]"), &"<hidden>", rule);
                }
            }
        }
    }
}

impl NodeConfig {
    /// Record lifetimes, record limits, declared services and score weights.
    fn validate_registry(&self, fail: &mut impl FnMut(&str, &dyn fmt::Display, String)) {
        let human = |d: Duration| humantime::format_duration(d).to_string();
        if !(MIN_RECORD_TTL..=MAX_RECORD_TTL).contains(&self.record_ttl) {
            fail(
                "record_ttl",
                &human(self.record_ttl),
                format!(
                    "must be between {} and {}",
                    human(MIN_RECORD_TTL),
                    human(MAX_RECORD_TTL)
                ),
            );
        }
        if self.record_refresh_interval >= self.record_ttl {
            fail(
                "record_refresh_interval",
                &human(self.record_refresh_interval),
                format!(
                    "must be shorter than record_ttl ({}), or records lapse between refreshes",
                    human(self.record_ttl)
                ),
            );
        }
        if self.max_record_size < MIN_RECORD_SIZE || self.max_record_size > self.dht_max_value_size
        {
            fail(
                "max_record_size",
                &self.max_record_size,
                format!(
                    "must be between {MIN_RECORD_SIZE} and dht_max_value_size ({})",
                    self.dht_max_value_size
                ),
            );
        }
        for (name, value, min) in [
            ("max_services_per_record", self.max_services_per_record, 1),
            (
                "max_string_length",
                self.max_string_length,
                MIN_RECORD_STRING_LENGTH,
            ),
            ("max_list_items", self.max_list_items, 1),
        ] {
            if !(min..=MAX_RECORD_COUNT_LIMIT).contains(&value) {
                fail(
                    name,
                    &value,
                    format!("must be between {min} and {MAX_RECORD_COUNT_LIMIT}"),
                );
            }
        }

        let max_items = self.max_list_items;
        if self.tags.len() > max_items {
            fail(
                "tags",
                &format!("{} tags", self.tags.len()),
                format!(
                    "must hold at most max_list_items ({max_items}): they travel in the node record"
                ),
            );
        }
        let max_services = self
            .max_services_per_record
            .saturating_mul(MAX_RECORD_PAGES);
        if self.services.len() > max_services {
            fail(
                "services",
                &format!("{} services", self.services.len()),
                format!(
                    "must hold at most {MAX_RECORD_PAGES} x max_services_per_record ({max_services}): a record has at most {MAX_RECORD_PAGES} pages"
                ),
            );
        }
        let max_string = self.max_string_length;
        let mut ids = std::collections::HashSet::new();
        for (i, service) in self.services.iter().enumerate() {
            let at = |field: &str| format!("services[{i}].{field}");
            let id = service.effective_id();
            if service.name.trim().is_empty() {
                fail(&at("name"), &"\"\"", "must not be empty".to_owned());
            }
            if service.service_type.trim().is_empty() {
                fail(
                    &at("type"),
                    &"\"\"",
                    "must not be empty (llm, embedding, classification, translation, …)".to_owned(),
                );
            }
            if service.id.as_deref().is_some_and(|id| id.trim().is_empty()) {
                fail(
                    &at("id"),
                    &"\"\"",
                    "must not be empty; leave it out to use the name".to_owned(),
                );
            }
            if !id.is_empty() && !ids.insert(id.to_owned()) {
                fail(
                    &at("id"),
                    &id,
                    "is used by another service; ids must be unique (id defaults to name)"
                        .to_owned(),
                );
            }
            let mut strings: Vec<(String, &str)> = vec![
                (at("id"), id),
                (at("name"), &service.name),
                (at("type"), &service.service_type),
                (at("version"), &service.version),
                (at("description"), &service.description),
            ];
            if let Some(url) = &service.health_check_url {
                strings.push((at("health_check_url"), url));
            }
            for (field, list) in [
                ("tags", &service.tags),
                ("capabilities", &service.capabilities),
                ("protocols", &service.protocols),
            ] {
                if list.len() > max_items {
                    fail(
                        &at(field),
                        &format!("{} items", list.len()),
                        format!("must hold at most max_list_items ({max_items})"),
                    );
                }
                for (j, item) in list.iter().enumerate() {
                    if item.is_empty() {
                        fail(
                            &format!("{}[{j}]", at(field)),
                            &"\"\"",
                            "must not be empty".to_owned(),
                        );
                    }
                    strings.push((format!("{}[{j}]", at(field)), item));
                }
            }
            if service.metadata.len() > max_items {
                fail(
                    &at("metadata"),
                    &format!("{} entries", service.metadata.len()),
                    format!("must hold at most max_list_items ({max_items})"),
                );
            }
            for (k, v) in &service.metadata {
                strings.push((format!("{}.{k}", at("metadata")), k));
                strings.push((format!("{}.{k}", at("metadata")), v));
            }
            for (field, value) in strings {
                if value.len() > max_string {
                    fail(
                        &field,
                        &format!("{} bytes", value.len()),
                        format!("must be at most max_string_length ({max_string}) bytes"),
                    );
                }
            }
            if let Some(url) = &service.health_check_url
                && !url.starts_with("http://")
            {
                fail(
                    &at("health_check_url"),
                    url,
                    "must be an http:// URL (probed with GET; 2xx is healthy)".to_owned(),
                );
            }
            if let Some(r) = service.reliability
                && !(0.0..=1.0).contains(&r)
            {
                fail(&at("reliability"), &r, "must be between 0 and 1".to_owned());
            }
            for (field, value) in [
                ("latency_ms", service.latency_ms),
                ("throughput", service.throughput),
            ] {
                if let Some(v) = value
                    && !(v.is_finite() && v >= 0.0)
                {
                    fail(&at(field), &v, "must be a finite number >= 0".to_owned());
                }
            }
        }

        let w = &self.score_weights;
        let weights = [
            ("reliability", w.reliability),
            ("latency", w.latency),
            ("throughput", w.throughput),
            ("availability", w.availability),
        ];
        for (name, value) in weights {
            if !(value.is_finite() && value >= 0.0) {
                fail(
                    &format!("score_weights.{name}"),
                    &value,
                    "must be a finite number >= 0".to_owned(),
                );
            }
        }
        if weights.iter().map(|(_, v)| v).sum::<f64>() <= 0.0 {
            fail(
                "score_weights",
                &"all 0",
                "at least one weight must be above 0".to_owned(),
            );
        }
    }
}

fn check_label(label: &str) -> Result<(), String> {
    if label.is_empty() || label.len() > MAX_LABEL_BYTES {
        return Err(format!("must be 1 to {MAX_LABEL_BYTES} bytes long"));
    }
    if label.chars().any(char::is_control) {
        return Err("must not contain control characters".to_owned());
    }
    Ok(())
}

/// A listen address: an IP address, then `tcp[/ws]` or `udp/quic-v1`.
fn check_listen_addr(addr: &Multiaddr, websocket: bool) -> Result<(), String> {
    const ALLOWED: &str = "use /ip4|ip6/<addr>/tcp/<port>, /ip4|ip6/<addr>/udp/<port>/quic-v1, \
                           or /ip4|ip6/<addr>/tcp/<port>/ws with enable_websocket";
    let mut it = addr.iter();
    match it.next() {
        Some(Protocol::Ip4(_) | Protocol::Ip6(_)) => {}
        _ => return Err(format!("must start with /ip4 or /ip6; {ALLOWED}")),
    }
    match (it.next(), it.next(), it.next()) {
        (Some(Protocol::Tcp(_)), None, None)
        | (Some(Protocol::Udp(_)), Some(Protocol::QuicV1), None) => Ok(()),
        (Some(Protocol::Tcp(_)), Some(Protocol::Ws(_)), None) if websocket => Ok(()),
        (Some(Protocol::Tcp(_)), Some(Protocol::Ws(_)), None) => {
            Err("is a WebSocket address but enable_websocket is false".to_owned())
        }
        _ => Err(format!(
            "is not a transport this node listens on; {ALLOWED}"
        )),
    }
}

/// A peer's address: a dialable transport address ending in `/p2p/<peer id>`.
fn check_peer_addr(addr: &Multiaddr) -> Result<(), String> {
    match addr.iter().last() {
        Some(Protocol::P2p(_)) => {}
        _ => {
            return Err("must end with /p2p/<peer id> so the peer can be authenticated".to_owned());
        }
    }
    let has_transport = addr
        .iter()
        .any(|p| matches!(p, Protocol::Tcp(_) | Protocol::QuicV1));
    match addr.iter().next() {
        // A /dnsaddr name resolves to complete addresses.
        Some(Protocol::Dnsaddr(_)) => Ok(()),
        Some(
            Protocol::Ip4(_)
            | Protocol::Ip6(_)
            | Protocol::Dns(_)
            | Protocol::Dns4(_)
            | Protocol::Dns6(_),
        ) => {
            if has_transport {
                Ok(())
            } else {
                Err("names no transport: add /tcp/<port> or /udp/<port>/quic-v1 before /p2p/<peer id>"
                    .to_owned())
            }
        }
        _ => Err(
            "must start with /ip4, /ip6, /dns, /dns4, /dns6 or /dnsaddr before /p2p/<peer id>"
                .to_owned(),
        ),
    }
}

/// An OTLP/HTTP endpoint: `http://host[:port][/path]`, no query.
fn check_otlp_endpoint(endpoint: &str) -> Result<(), String> {
    if endpoint.starts_with("https://") {
        return Err("must be an http:// URL: no TLS client is built in (export to a collector or agent on this machine or a trusted network)".to_owned());
    }
    let Some(rest) = endpoint.strip_prefix("http://") else {
        return Err("must be an http:// URL, e.g. http://127.0.0.1:4318".to_owned());
    };
    let authority = rest.split('/').next().unwrap_or_default();
    if authority.is_empty() || authority.contains(|c: char| c.is_whitespace() || c == '@') {
        return Err("must name a host, e.g. http://127.0.0.1:4318".to_owned());
    }
    // `host`, `host:port`, `[v6]` or `[v6]:port`.
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let Some((address, after)) = v6.split_once(']') else {
                return Err(format!("has an unclosed [ in {authority:?}"));
            };
            if address.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(format!("has no valid IPv6 address in {authority:?}"));
            }
            match after {
                "" => (address, None),
                _ => match after.strip_prefix(':') {
                    Some(port) => (address, Some(port)),
                    None => return Err(format!("has no valid port in {authority:?}")),
                },
            }
        }
        None => match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        },
    };
    if host.is_empty() || host.contains(['[', ']']) {
        return Err(format!("must name a host, not {authority:?}"));
    }
    if let Some(port) = port
        && port.parse::<u16>().map_or(true, |p| p == 0)
    {
        return Err(format!("has no valid port in {authority:?}"));
    }
    if rest.contains(['?', '#']) || rest.contains(char::is_whitespace) {
        return Err("may not have a query, a fragment or spaces".to_owned());
    }
    Ok(())
}
