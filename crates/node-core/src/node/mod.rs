//! Starting a node: [`Node`] builds the swarm and spawns the task that
//! owns it ([`task`]); everything else talks to it through the
//! [`NodeHandle`] ([`handle`]).

mod events;
mod handle;
mod nat;
mod task;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
use libp2p::identity::Keypair;
use libp2p::metrics::Registry;
use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId, Swarm};
use ollamacron_config::{NodeConfig, ValidationError};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::bandwidth::BandwidthLimit;
use crate::behaviour::NodeBehaviour;
use crate::configs::nat_config;
use crate::error::{NodeError, error_chain};
use crate::event::NodeEvent;
use crate::identity::load_or_create_identity;
use crate::metrics::NodeMetrics;
use crate::registrations::RegistrationFile;
use crate::registry::Restored;
use crate::state::NodeState;
use crate::transport::{NodeTransport, build_transport};

pub use self::handle::NodeHandle;
pub(crate) use self::handle::WeakNodeHandle;
use self::handle::{HandleShared, RegistrationStore, StreamControl};
use self::task::{ListenerStatus, SwarmTask, TraversalCounters};

/// Commands waiting for the swarm task.
const COMMAND_QUEUE_LEN: usize = 64;
/// Events kept for slow subscribers before the oldest are dropped.
const EVENT_BUS_LEN: usize = 1024;
/// Longest `Node::start` waits for every listener to come up.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Builds and starts a node.
///
/// ```no_run
/// # async fn run() -> Result<(), ollamacron_node_core::NodeError> {
/// let config = ollamacron_config::NodeConfig::default();
/// let node = ollamacron_node_core::Node::new(config).start().await?;
/// println!("{} is {}", node.peer_id(), node.state());
/// node.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Node {
    config: NodeConfig,
    keypair: Option<Keypair>,
    transport: Option<NodeTransport>,
    registrations: Option<RegistrationFile>,
    events: broadcast::Sender<NodeEvent>,
}

impl Node {
    /// A node with this configuration; its key is loaded from (or created
    /// at) `private_key_path` unless [`Node::with_keypair`] supplies one.
    #[must_use]
    pub fn new(config: NodeConfig) -> Self {
        let (events, _) = broadcast::channel(EVENT_BUS_LEN);
        Self {
            config,
            keypair: None,
            transport: None,
            registrations: None,
            events,
        }
    }

    /// Subscribe to the node's events before it starts, to see `Started`
    /// and everything on the way there.
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.events.subscribe()
    }

    /// Use this identity instead of the key file.
    #[must_use]
    pub fn with_keypair(mut self, keypair: Keypair) -> Self {
        self.keypair = Some(keypair);
        self
    }

    /// Keep the services registered through
    /// [`NodeHandle::register_service`] (the API's `POST /v1/services`, the
    /// CLI's `services register`) in `file`, and offer the services it
    /// holds from the start, in the node's first record: registrations
    /// survive a restart, graceful or not. `ollamacron-node run` keeps them
    /// in `<data_dir>/services.json`. Without a file they last as long as
    /// the process.
    #[must_use]
    pub fn with_registration_file(mut self, file: RegistrationFile) -> Self {
        self.registrations = Some(file);
        self
    }

    /// Carry the node's direct connections over `transport` instead of
    /// TCP, QUIC and WebSocket: an in-memory network in tests and in the
    /// simulator (`cargo xtask sim`), where many nodes share one process.
    ///
    /// `transport` delivers authenticated, multiplexed connections, e.g. a
    /// [`MemoryTransport`](libp2p::core::transport::MemoryTransport)
    /// upgraded with Noise and Yamux; build its security upgrade with the
    /// key given to [`Node::with_keypair`], so that peers see the node's
    /// own peer id. The node adds to it what it adds to its own
    /// transports: relayed (`/p2p-circuit`) connections through the relay
    /// client that NAT traversal needs, DNS resolution, the dial timeouts
    /// and the bandwidth metrics. The network key of `require_auth` is not
    /// applied to this transport's connections (they come upgraded); the
    /// allow-list still is.
    ///
    /// `listen`, `bootstrap` and `relay_nodes` may then hold this
    /// transport's addresses (e.g. `/memory/7`, `/memory/3/p2p/<peer id>`):
    /// the configuration's address rules (TCP or QUIC over IP) apply only
    /// to addresses that start with an IP address or a DNS name, and a
    /// peer's address must still end with `/p2p/<peer id>`.
    #[must_use]
    pub fn with_transport(mut self, transport: Boxed<(PeerId, StreamMuxerBox)>) -> Self {
        self.transport = Some(transport);
        self
    }

    /// Load the identity, build the swarm, open the listeners, and spawn
    /// the swarm task on the current tokio runtime. Returns once the node
    /// is `Running`. The HTTP API is not part of the node: start it on the
    /// handle with [`start_api`](crate::start_api).
    ///
    /// # Errors
    /// The configuration breaks a rule, the identity cannot be loaded or
    /// does not match `node_id`, a transport cannot be built, an address
    /// cannot be bound, or the listeners do not come up within
    /// `START_TIMEOUT`.
    pub async fn start(self) -> Result<NodeHandle, NodeError> {
        let (state_tx, state_rx) = watch::channel(NodeState::Initializing);
        let fail = |e: NodeError| {
            state_tx.send_replace(NodeState::Error);
            e
        };
        let validated = if self.transport.is_some() {
            validate_with_own_transport(&self.config)
        } else {
            self.config.validate()
        };
        validated.map_err(|errors| fail(NodeError::Config(errors)))?;
        let keypair = match self.keypair {
            Some(k) => k,
            None => {
                let path = self.config.private_key_path();
                let (keypair, _created) =
                    load_or_create_identity(&path).map_err(|e| fail(e.into()))?;
                if let Some(expected) = self.config.expected_peer_id() {
                    let actual = keypair.public().to_peer_id();
                    if actual != expected {
                        return Err(fail(NodeError::WrongIdentity {
                            path,
                            expected: expected.to_string(),
                            actual: actual.to_string(),
                        }));
                    }
                }
                keypair
            }
        };
        let peer_id = keypair.public().to_peer_id();
        state_tx.send_replace(NodeState::Starting);

        let psk = if self.config.require_auth {
            let path = self.config.psk_path();
            let key = ollamacron_config::read_network_key(&path)
                .map_err(|e| fail(NodeError::NetworkKey(e.to_string())))?;
            tracing::info!(path = %path.display(), fingerprint = %key.fingerprint(), "private network: only peers holding this network key can connect (TCP only)");
            Some(key)
        } else {
            None
        };
        let (nat, relay_transport) =
            ollamacron_nat::Behaviour::new(peer_id, &nat_config(&self.config));
        let mut registry = Registry::default();
        let bandwidth = self
            .config
            .max_bandwidth
            .map(|limit| BandwidthLimit::new(limit.bytes()));
        if let Some(limit) = &bandwidth {
            limit.register(&mut registry);
        }
        let transport = build_transport(
            &keypair,
            &self.config,
            &mut registry,
            relay_transport,
            nat.relayed_peers(),
            psk,
            self.transport,
        )
        .map_err(fail)?;
        let transport = match &bandwidth {
            Some(limit) => limit.limit_transport(transport),
            None => transport,
        };
        log_active_limits(&self.config);
        let loopback_only = self.config.listen.iter().all(crate::addr::is_loopback);
        let restored = match &self.registrations {
            Some(file) => {
                let services = file.load().map_err(|e| fail(e.into()))?;
                if !services.is_empty() {
                    tracing::info!(path = %file.path().display(), count = services.len(), "restored the services registered through the API");
                }
                Restored {
                    path: file.path().to_owned(),
                    services,
                }
            }
            None => Restored::default(),
        };
        let behaviour = NodeBehaviour::new(&keypair, &self.config, nat, loopback_only, &restored)
            .map_err(&fail)?;
        let swarm_config = libp2p::swarm::Config::with_tokio_executor()
            .with_idle_connection_timeout(self.config.idle_connection_timeout);
        let mut swarm = Swarm::new(transport, behaviour, peer_id, swarm_config);
        let metrics = NodeMetrics::new(registry);
        metrics.set_state(NodeState::Starting);
        metrics.set_reachability(swarm.behaviour().nat.reachability().as_str());

        let mut listeners = HashMap::new();
        if self.config.listen.is_empty() {
            tracing::warn!(
                "listen is empty: this node dials out but no peer can dial it (unless a relay reservation gives it an address)"
            );
        }
        // Only a node with an IPv6 listen address asks the host about IPv6.
        let ipv6 = !self.config.listen.iter().any(is_ipv6) || ipv6_available();
        let (listen, without_ipv6) = usable_listen_addrs(&self.config.listen, ipv6);
        if !without_ipv6.is_empty() {
            let skipped: Vec<String> = without_ipv6.iter().map(ToString::to_string).collect();
            tracing::info!(skipped = %skipped.join(", "), "this host has no IPv6: listening on IPv4 only");
        }
        for addr in &listen {
            ensure_tcp_port_free(addr).map_err(&fail)?;
            let id = swarm.listen_on(addr.clone()).map_err(|e| {
                fail(NodeError::Listen {
                    addr: addr.clone(),
                    reason: transport_error_reason(&e),
                })
            })?;
            listeners.insert(id, ListenerStatus::new(addr.clone()));
        }

        let (command_tx, command_rx) = mpsc::channel(COMMAND_QUEUE_LEN);
        let event_tx = self.events;
        let (started_tx, started_rx) = oneshot::channel();
        let handle = NodeHandle {
            commands: command_tx,
            shared: HandleShared {
                peer_id,
                events: event_tx.clone(),
                state: state_rx,
                metrics: metrics.endpoint.clone(),
                api_addr: Arc::new(OnceLock::new()),
                streams: StreamControl(swarm.behaviour().streams.new_control()),
                registrations: self
                    .registrations
                    .map(|file| Arc::new(RegistrationStore::new(file))),
            },
        };
        let task = SwarmTask {
            swarm,
            commands: command_rx,
            events: event_tx,
            state: state_tx,
            metrics,
            listeners,
            listen_addrs: Vec::new(),
            started: Some(started_tx),
            shutdown_waiters: Vec::new(),
            traversal: TraversalCounters::default(),
            loopback_only,
            config: self.config,
            bandwidth,
        };
        tokio::spawn(task.run());

        match tokio::time::timeout(START_TIMEOUT, started_rx).await {
            Ok(Ok(Ok(()))) => Ok(handle),
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(_)) => Err(NodeError::Failed),
            Err(_) => {
                let _ = handle.shutdown().await;
                Err(NodeError::StartTimeout(START_TIMEOUT))
            }
        }
    }
}

/// Validate `config` for a node given its transport: an address that does
/// not start with an IP address or a DNS name is that transport's, so the
/// rules for TCP and QUIC addresses do not apply to it. It is checked as a
/// stand-in TCP address with the same `/p2p/...` part (so a peer's address
/// must still name the peer), and an error names the address as written.
fn validate_with_own_transport(config: &NodeConfig) -> Result<(), Vec<ValidationError>> {
    fn is_ip_or_dns(addr: &Multiaddr) -> bool {
        matches!(
            addr.iter().next(),
            Some(
                Protocol::Ip4(_)
                    | Protocol::Ip6(_)
                    | Protocol::Dns(_)
                    | Protocol::Dns4(_)
                    | Protocol::Dns6(_)
                    | Protocol::Dnsaddr(_)
            )
        )
    }
    let stand_in = |addr: &Multiaddr| -> Multiaddr {
        let mut tcp: Multiaddr = Multiaddr::empty()
            .with(Protocol::Ip4(std::net::Ipv4Addr::LOCALHOST))
            .with(Protocol::Tcp(1));
        for p in addr.iter().skip_while(|p| !matches!(p, Protocol::P2p(_))) {
            tcp.push(p);
        }
        tcp
    };
    let mut checked = config.clone();
    let mut originals: HashMap<String, String> = HashMap::new();
    for (name, list) in [
        ("listen", &mut checked.listen),
        ("bootstrap", &mut checked.bootstrap),
        ("relay_nodes", &mut checked.relay_nodes),
    ] {
        for (i, addr) in list.iter_mut().enumerate() {
            if !is_ip_or_dns(addr) {
                originals.insert(format!("{name}[{i}]"), addr.to_string());
                *addr = stand_in(addr);
            }
        }
    }
    checked.validate().map_err(|mut errors| {
        for error in &mut errors {
            if let Some(original) = originals.get(&error.field) {
                error.value.clone_from(original);
            }
        }
        errors
    })
}

/// Say which configured limits are in force.
fn log_active_limits(config: &NodeConfig) {
    if let Some(limit) = config.max_bandwidth {
        tracing::info!(%limit, "max_bandwidth: every libp2p stream together moves at most this per second each way");
    }
}

/// libp2p's TCP listeners set `SO_REUSEPORT` (for hole punching), so a
/// second node on the same fixed port would bind too and the kernel would
/// split inbound connections between the two. Binding the port once
/// without that option first turns the clash into a clear error.
fn ensure_tcp_port_free(addr: &Multiaddr) -> Result<(), NodeError> {
    let mut ip = None;
    let mut port = None;
    for protocol in addr.iter() {
        match protocol {
            Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(std::net::IpAddr::V6(a)),
            Protocol::Tcp(p) => port = Some(p),
            _ => {}
        }
    }
    let (Some(ip), Some(port)) = (ip, port) else {
        return Ok(());
    };
    if port == 0 {
        return Ok(());
    }
    let in_use = |e: std::io::Error| NodeError::Listen {
        addr: addr.clone(),
        reason: if e.kind() == std::io::ErrorKind::AddrInUse {
            format!("{e} (is another node already listening on it?)")
        } else {
            e.to_string()
        },
    };
    let socket_addr = SocketAddr::new(ip, port);
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(socket_addr),
        socket2::Type::STREAM,
        None,
    )
    .map_err(in_use)?;
    // As std's `TcpListener::bind`: a port left in TIME_WAIT is free
    // (on Windows the option would let it bind over a live listener).
    #[cfg(not(windows))]
    socket.set_reuse_address(true).map_err(in_use)?;
    if ip.is_ipv6() {
        // As libp2p binds it: IPv6 only, so the IPv4 listener on the same
        // port is no clash.
        socket.set_only_v6(true).map_err(in_use)?;
    }
    socket.bind(&socket_addr.into()).map_err(in_use)
}

fn is_ipv6(addr: &Multiaddr) -> bool {
    matches!(addr.iter().next(), Some(Protocol::Ip6(_)))
}

/// Whether this node can use IPv6: the host has an IPv6 address (in
/// `/proc/net/if_inet6`, on Linux) and an IPv6 socket can be bound (a
/// sandbox may forbid the address family while the host has addresses).
fn ipv6_available() -> bool {
    let has_address = std::fs::read_to_string("/proc/net/if_inet6")
        .map_or(true, |addresses| !addresses.trim().is_empty());
    has_address && std::net::TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, 0)).is_ok()
}

/// The listen addresses to open, and the IPv6 ones left out: on a host
/// without IPv6 those are skipped, as long as an IPv4 one remains (with
/// only IPv6 ones, they are tried and fail with their reason).
fn usable_listen_addrs(listen: &[Multiaddr], ipv6: bool) -> (Vec<Multiaddr>, Vec<Multiaddr>) {
    if ipv6 || listen.iter().all(is_ipv6) {
        return (listen.to_vec(), Vec::new());
    }
    listen.iter().cloned().partition(|a| !is_ipv6(a))
}

fn transport_error_reason<E: std::error::Error>(e: &libp2p::TransportError<E>) -> String {
    match e {
        libp2p::TransportError::MultiaddrNotSupported(addr) => {
            format!("no transport of this node supports {addr}")
        }
        libp2p::TransportError::Other(inner) => error_chain(inner),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_ipv6_only_the_ipv6_listen_addresses_are_left_out() {
        let listen = ollamacron_config::NodeConfig::default().listen;
        let (open, skipped) = usable_listen_addrs(&listen, false);
        assert_eq!(open.len(), 2, "{open:?}");
        assert!(open.iter().all(|a| !is_ipv6(a)));
        assert_eq!(skipped.len(), 2);
        assert!(skipped.iter().all(is_ipv6));
        assert_eq!(usable_listen_addrs(&listen, true), (listen, Vec::new()));
        let only_v6: Vec<Multiaddr> = vec!["/ip6/::1/tcp/0".parse().unwrap()];
        assert_eq!(
            usable_listen_addrs(&only_v6, false),
            (only_v6, Vec::new()),
            "tried, to fail with the reason"
        );
    }

    #[test]
    fn with_a_given_transport_its_addresses_pass_and_peers_must_still_be_named() {
        let peer = libp2p::identity::Keypair::generate_ed25519()
            .public()
            .to_peer_id();
        let mut config = NodeConfig {
            listen: vec!["/memory/7".parse().unwrap()],
            bootstrap: vec![format!("/memory/3/p2p/{peer}").parse().unwrap()],
            ..NodeConfig::default()
        };
        assert!(config.validate().is_err(), "not a TCP or QUIC address");
        assert_eq!(validate_with_own_transport(&config), Ok(()));
        config.bootstrap.push("/memory/4".parse().unwrap());
        let errors = validate_with_own_transport(&config).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].field, "bootstrap[1]");
        assert_eq!(errors[0].value, "/memory/4", "named as written");
        config.bootstrap.pop();
        config.listen.push("/ip4/127.0.0.1/udp/1".parse().unwrap());
        let errors = validate_with_own_transport(&config).unwrap_err();
        assert_eq!(
            errors[0].field, "listen[1]",
            "IP addresses keep their rules"
        );
    }

    #[test]
    fn the_port_check_sees_ipv4_and_ipv6_listeners_apart() {
        let v4 = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = v4.local_addr().unwrap().port();
        let same_v4: Multiaddr = format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap();
        assert!(ensure_tcp_port_free(&same_v4).is_err());
        if ipv6_available() {
            let v6: Multiaddr = format!("/ip6/::/tcp/{port}").parse().unwrap();
            assert!(ensure_tcp_port_free(&v6).is_ok(), "IPv6 only: no clash");
        }
    }
}
