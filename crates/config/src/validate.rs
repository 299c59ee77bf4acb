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
/// Smallest accepted `dht_max_value_size`.
pub const MIN_DHT_VALUE_SIZE: ByteSize = ByteSize::from_bytes(1024);
/// Largest accepted `dht_max_value_size`.
pub const MAX_DHT_VALUE_SIZE: ByteSize = ByteSize::from_mib(1);
/// Longest accepted period or timeout of any duration field: longer ones
/// overflow timers, and nobody means them.
pub const MAX_DURATION: Duration = Duration::from_secs(30 * 24 * 3600);
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
            ("conn_mgr_grace", self.conn_mgr_grace, Duration::ZERO),
            ("ping_interval", self.ping_interval, MIN_PROBE_INTERVAL),
            (
                "idle_connection_timeout",
                self.idle_connection_timeout,
                MIN_PROBE_INTERVAL,
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
            fail(
                "require_auth",
                &true,
                "needs a network key (`psk_path`) or an allow-list (`allowed_peers`), which this \
                 version does not support yet; set it to false"
                    .to_owned(),
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
