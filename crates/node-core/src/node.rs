//! Starting a node, the task that owns its `Swarm`, and the `NodeHandle`
//! everything else uses to talk to it.

mod nat;
mod registry;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::core::ConnectedPoint;
use libp2p::core::transport::ListenerId;
use libp2p::identity::Keypair;
use libp2p::metrics::{Recorder, Registry};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{ConnectionId, DialError, ListenError, SwarmEvent};
use libp2p::{Multiaddr, PeerId, Swarm, identify, ping};
use ollamacron_config::NodeConfig;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::behaviour::{NodeBehaviour, NodeBehaviourEvent, PROTOCOL_VERSION};
use crate::configs::nat_config;
use crate::discovery::{DialOutcome, PeerTable};
use crate::error::NodeError;
use crate::event::{Direction, NodeEvent};
use crate::identity::load_or_create_identity;
use crate::metrics::DiscoveryCounter;
use crate::metrics::{MetricsEndpoint, MetricsSnapshot, NodeMetrics};
use crate::state::NodeState;
use crate::status::{
    BreakerState, ConnectedPeer, ConnectionCounts, ConnectionKind, DiscoverySource,
    DiscoveryStatus, HolePunchCounts, HttpStatus, KnownPeer, NodeStatus, PeerInfo, ServiceCounts,
    SourceStatus, TraversalStatus,
};
use crate::transport::build_transport;
use crate::trim::{TrimCandidate, TrimPolicy};
use ollamacron_discovery_bootstrap::BootstrapEvent;
use ollamacron_discovery_dht::{DhtEvent, DhtMode, KAD_PROTOCOL};
use ollamacron_discovery_mdns::MdnsEvent;
use ollamacron_service_registry::{RankedService, ServiceInfo, ServiceQuery};

use self::registry::{ProbeResult, RegistryState};

/// Commands waiting for the swarm task.
const COMMAND_QUEUE_LEN: usize = 64;
/// Events kept for slow subscribers before the oldest are dropped.
const EVENT_BUS_LEN: usize = 1024;
/// Longest `Node::start` waits for every listener to come up.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// mDNS queries without an answer before the node warns that multicast
/// may be blocked.
const MDNS_SILENT_QUERIES: u32 = 6;
/// Most of a peer's identify listen addresses passed to Kademlia.
const MAX_IDENTIFY_ADDRESSES: usize = 8;
/// Most known peers redialed per maintenance pass.
const REDIALS_PER_PASS: usize = 16;
/// How often the trimming policy runs besides on each new connection.
const TRIM_CHECK_INTERVAL: Duration = Duration::from_secs(5);

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

    /// Load the identity, build the swarm, open the listeners and the HTTP
    /// API, and spawn the swarm task on the current tokio runtime. Returns
    /// once the node is `Running`.
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
        self.config
            .validate()
            .map_err(|errors| fail(NodeError::Config(errors)))?;
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
        let (registry_state, probe_rx) =
            RegistryState::new(&keypair, &self.config).map_err(&fail)?;

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
        let transport = build_transport(
            &keypair,
            &self.config,
            &mut registry,
            relay_transport,
            nat.relayed_peers(),
            psk,
        )
        .map_err(fail)?;
        log_inactive_settings(&self.config);
        let (behaviour, mdns_error) = NodeBehaviour::new(&keypair, &self.config, nat);
        if let Some(reason) = &mdns_error {
            tracing::warn!(%reason, "mDNS is unavailable: LAN discovery is off, relying on bootstrap peers and the DHT");
        }
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
        for addr in &self.config.listen {
            ensure_tcp_port_free(addr).map_err(&fail)?;
            let id = swarm.listen_on(addr.clone()).map_err(|e| {
                fail(NodeError::Listen {
                    addr: addr.clone(),
                    reason: transport_error_reason(&e),
                })
            })?;
            listeners.insert(id, ListenerStatus::new(addr.clone()));
        }

        let api_listener = if self.config.enable_metrics {
            let addr = self.config.api_listen;
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| fail(NodeError::ApiListen { addr, source }))?;
            let local = listener
                .local_addr()
                .map_err(|source| fail(NodeError::ApiListen { addr, source }))?;
            let server = crate::http::ApiServer::new(listener, &self.config).map_err(&fail)?;
            Some((server, local))
        } else {
            None
        };
        let api_addr = api_listener.as_ref().map(|(_, local)| *local);

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
                api_addr,
                streams: StreamControl(swarm.behaviour().streams.new_control()),
            },
        };
        let trim = TrimPolicy {
            low: usize::try_from(self.config.conn_mgr_low).unwrap_or(usize::MAX),
            high: usize::try_from(self.config.conn_mgr_high).unwrap_or(usize::MAX),
            grace: self.config.conn_mgr_grace,
        };
        let shutdown_timeout = self.config.shutdown_timeout;
        let loopback_only = self.config.listen.iter().all(is_loopback);
        let task = SwarmTask {
            keypair,
            registry: registry_state,
            probe_rx,
            swarm,
            commands: command_rx,
            events: event_tx,
            state: state_tx,
            metrics,
            listeners,
            listen_addrs: Vec::new(),
            connections: HashMap::new(),
            peers: HashMap::new(),
            pending_dials: HashMap::new(),
            breakers: HashMap::new(),
            closing: HashSet::new(),
            started: Some(started_tx),
            trim,
            trimmed_total: 0,
            shutdown_timeout,
            table: PeerTable::new(peer_id),
            auto_dials: HashMap::new(),
            auto_dialed: HashSet::new(),
            mdns_error,
            mdns_found_any: false,
            mdns_silence_reported: false,
            config: self.config,
            shutdown_waiters: Vec::new(),
            hole_punch: HolePunchCounts::default(),
            circuits_served: 0,
            handshake_refusal_warned: None,
            loopback_only,
        };
        tokio::spawn(task.run());
        if let Some((server, local)) = api_listener {
            server.spawn(
                handle.shared.metrics.clone(),
                handle.shared.state.clone(),
                handle.downgrade(),
            );
            tracing::info!(addr = %local, "serving the HTTP API at http://{local}/v1/status (metrics at /metrics)");
        }

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

/// Say which configured features this version does not run yet, so that
/// nobody believes a setting is in force when it is not.
fn log_inactive_settings(config: &NodeConfig) {
    let mut inactive = Vec::new();
    if config.max_bandwidth.is_some() {
        inactive.push("max_bandwidth");
    }
    if !inactive.is_empty() {
        tracing::info!(
            settings = %inactive.join(", "),
            "set but not active in this version (bandwidth limits come later)"
        );
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
    std::net::TcpListener::bind(SocketAddr::new(ip, port))
        .map(drop)
        .map_err(|e| NodeError::Listen {
            addr: addr.clone(),
            reason: format!("{e} (is another node already listening on it?)"),
        })
}

fn transport_error_reason<E: std::error::Error>(e: &libp2p::TransportError<E>) -> String {
    match e {
        libp2p::TransportError::MultiaddrNotSupported(addr) => {
            format!("no transport of this node supports {addr}")
        }
        libp2p::TransportError::Other(inner) => error_chain(inner),
    }
}

/// An error and its sources, joined: libp2p errors often say little at the top.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

pub(crate) use ollamacron_nat::is_loopback;

/// `addr` ending in `/p2p/<peer>`; relay circuit addresses already do.
pub(crate) fn with_peer(addr: Multiaddr, peer: PeerId) -> Multiaddr {
    if matches!(addr.iter().last(), Some(Protocol::P2p(p)) if p == peer) {
        addr
    } else {
        addr.with(Protocol::P2p(peer))
    }
}

enum Command {
    ReportBreaker {
        peer: PeerId,
        cooling_until: Option<Instant>,
    },
    Status {
        reply: oneshot::Sender<NodeStatus>,
    },
    Peers {
        reply: oneshot::Sender<Vec<PeerInfo>>,
    },
    KnownPeers {
        reply: oneshot::Sender<Vec<KnownPeer>>,
    },
    Discovery {
        reply: oneshot::Sender<DiscoveryStatus>,
    },
    ListenAddrs {
        reply: oneshot::Sender<Vec<Multiaddr>>,
    },
    Dial {
        addr: Multiaddr,
        reply: oneshot::Sender<Result<PeerId, NodeError>>,
    },
    ConnectedPeers {
        reply: oneshot::Sender<Vec<ConnectedPeer>>,
    },
    Metrics {
        reply: oneshot::Sender<MetricsSnapshot>,
    },
    RegisterService {
        service: Box<ServiceInfo>,
        reply: oneshot::Sender<Result<(), NodeError>>,
    },
    UpdateServices {
        add: Vec<ServiceInfo>,
        remove: Vec<String>,
        reply: oneshot::Sender<Vec<(String, NodeError)>>,
    },
    UnregisterService {
        id: String,
        reply: oneshot::Sender<bool>,
    },
    LocalServices {
        reply: oneshot::Sender<Vec<ServiceInfo>>,
    },
    FindServices {
        query: ServiceQuery,
        reply: oneshot::Sender<Vec<RankedService>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// A cheap, cloneable handle to a running node. Every method that needs
/// the swarm sends a command to the swarm task and awaits its reply.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    commands: mpsc::Sender<Command>,
    shared: HandleShared,
}

/// What every handle, strong or weak, reads without the swarm task.
#[derive(Debug, Clone)]
struct HandleShared {
    peer_id: PeerId,
    events: broadcast::Sender<NodeEvent>,
    state: watch::Receiver<NodeState>,
    metrics: MetricsEndpoint,
    api_addr: Option<SocketAddr>,
    streams: StreamControl,
}

/// [`libp2p_stream::Control`], which has no `Debug` of its own.
#[derive(Clone)]
struct StreamControl(libp2p_stream::Control);

impl std::fmt::Debug for StreamControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamControl")
    }
}

/// A [`NodeHandle`] that does not keep the node running: the node stops
/// when every strong handle is gone, whoever holds weak ones.
#[derive(Debug, Clone)]
pub(crate) struct WeakNodeHandle {
    commands: mpsc::WeakSender<Command>,
    shared: HandleShared,
}

impl WeakNodeHandle {
    /// The handle, while the node still takes commands.
    pub(crate) fn upgrade(&self) -> Option<NodeHandle> {
        Some(NodeHandle {
            commands: self.commands.upgrade()?,
            shared: self.shared.clone(),
        })
    }
}

impl NodeHandle {
    pub(crate) fn downgrade(&self) -> WeakNodeHandle {
        WeakNodeHandle {
            commands: self.commands.downgrade(),
            shared: self.shared.clone(),
        }
    }

    /// This node's peer id.
    #[must_use]
    pub fn peer_id(&self) -> PeerId {
        self.shared.peer_id
    }

    /// The current lifecycle state (also readable after the node stopped).
    #[must_use]
    pub fn state(&self) -> NodeState {
        *self.shared.state.borrow()
    }

    /// Wait until the node reaches `Stopped` or `Error`, and return it.
    pub async fn stopped(&self) -> NodeState {
        let mut state = self.shared.state.clone();
        let reached = state.wait_for(|s| s.is_terminal()).await.map(|s| *s);
        // On error the task is gone; it always publishes a terminal state first.
        reached.unwrap_or_else(|_| *state.borrow())
    }

    /// Subscribe to node events from now on. A subscriber that falls more
    /// than 1024 events behind loses the oldest ones.
    #[must_use]
    pub fn subscribe(&self) -> broadcast::Receiver<NodeEvent> {
        self.shared.events.subscribe()
    }

    /// A control for application stream protocols on the node's
    /// connections (relayed ones too): open a stream to a peer, or accept
    /// a protocol's inbound streams. Peers are admitted by the network's
    /// auth (`require_auth`, `allowed_peers`) before any stream opens.
    #[must_use]
    pub fn stream_control(&self) -> libp2p_stream::Control {
        self.shared.streams.0.clone()
    }

    /// The bound address of the HTTP API, when metrics are enabled.
    #[must_use]
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.shared.api_addr
    }

    /// Register more metrics (under the `ollamacron_` prefix) in the node's
    /// registry, served at `/metrics` with the node's own.
    pub fn register_metrics(&self, register: impl FnOnce(&mut libp2p::metrics::Registry)) {
        self.shared.metrics.register(register);
    }

    /// Every registered metric as Prometheus (OpenMetrics) text.
    #[must_use]
    pub fn metrics_text(&self) -> String {
        self.shared.metrics.encode()
    }

    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NodeError> {
        let (reply, response) = oneshot::channel();
        self.commands
            .send(make(reply))
            .await
            .map_err(|_| NodeError::NotRunning)?;
        response.await.map_err(|_| NodeError::NotRunning)
    }

    /// The addresses the node listens on (without `/p2p/<peer id>`).
    ///
    /// # Errors
    /// [`NodeError::NotRunning`] once the node has stopped.
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NodeError> {
        self.request(|reply| Command::ListenAddrs { reply }).await
    }

    /// The listen addresses with `/p2p/<peer id>` appended, ready to give
    /// to another node as a bootstrap address.
    ///
    /// # Errors
    /// [`NodeError::NotRunning`] once the node has stopped.
    pub async fn dialable_addrs(&self) -> Result<Vec<Multiaddr>, NodeError> {
        let peer_id = self.shared.peer_id;
        Ok(self
            .listen_addrs()
            .await?
            .into_iter()
            .map(|a| with_peer(a, peer_id))
            .collect())
    }

    /// Dial `addr` and wait until the connection is established. With a
    /// `/p2p/<peer id>` suffix the peer is authenticated against it, and a
    /// peer we are already connected to is not dialed again.
    ///
    /// # Errors
    /// [`NodeError::Dial`] with the reason the connection failed.
    pub async fn dial(&self, addr: Multiaddr) -> Result<PeerId, NodeError> {
        self.request(|reply| Command::Dial { addr, reply }).await?
    }

    /// Every peer with at least one open connection.
    ///
    /// # Errors
    /// [`NodeError::NotRunning`] once the node has stopped.
    pub async fn connected_peers(&self) -> Result<Vec<ConnectedPeer>, NodeError> {
        self.request(|reply| Command::ConnectedPeers { reply })
            .await
    }

    /// Every peer the node knows of, connected or not, with its sources.
    ///
    /// # Errors
    /// [`NodeError::NotRunning`] once the node has stopped.
    pub async fn known_peers(&self) -> Result<Vec<KnownPeer>, NodeError> {
        self.request(|reply| Command::KnownPeers { reply }).await
    }

    /// Which discovery sources are on and working, and their counters.
    ///
    /// # Errors
    /// [`NodeError::NotRunning`] once the node has stopped.
    pub async fn discovery(&self) -> Result<DiscoveryStatus, NodeError> {
        self.request(|reply| Command::Discovery { reply }).await
    }

    /// A summary of the node's counters.
    ///
    /// # Errors
    /// [`NodeError::NotRunning`] once the node has stopped.
    pub async fn metrics(&self) -> Result<MetricsSnapshot, NodeError> {
        self.request(|reply| Command::Metrics { reply }).await
    }

    /// The node at a glance: identity, state, addresses, reachability,
    /// connections, discovery and services.
    ///
    /// # Errors
    /// [`NodeError::NotRunning`] once the node has stopped.
    pub async fn status(&self) -> Result<NodeStatus, NodeError> {
        self.request(|reply| Command::Status { reply }).await
    }

    /// Every known peer with its sources, addresses, connection and latency.
    ///
    /// # Errors
    /// [`NodeError::NotRunning`] once the node has stopped.
    pub async fn peers(&self) -> Result<Vec<PeerInfo>, NodeError> {
        self.request(|reply| Command::Peers { reply }).await
    }

    /// Tell the node that its gateway's breaker for `peer` opened (cooling
    /// down until `cooling_until`) or closed (`None`), for `GET /v1/peers`.
    /// Dropped when the command queue is full: it is only shown.
    pub fn report_breaker(&self, peer: PeerId, cooling_until: Option<Instant>) {
        let _ = self.commands.try_send(Command::ReportBreaker {
            peer,
            cooling_until,
        });
    }

    /// Offer a service (or replace the one with the same id): it is signed
    /// into this node's record and published at once.
    ///
    /// # Errors
    /// [`NodeError::Service`] naming what is wrong (empty id or type, a
    /// field over the record limits, too many services); nothing changes.
    pub async fn register_service(&self, service: ServiceInfo) -> Result<(), NodeError> {
        self.request(|reply| Command::RegisterService {
            service: Box::new(service),
            reply,
        })
        .await?
    }

    /// Stop offering the services with the ids in `remove`, then offer each
    /// of `add` (replacing the one with the same id), and sign and publish
    /// one record for all of it: changing N services costs one publication,
    /// not N (an id in both lists is simply replaced). Each service of `add`
    /// is checked on its own, as
    /// [`register_service`](Self::register_service) checks it; one that
    /// would make the record invalid is left out and returned with its id
    /// and the reason, and the others still apply.
    ///
    /// # Errors
    /// [`NodeError::NotRunning`] once the node has stopped.
    pub async fn update_services(
        &self,
        add: Vec<ServiceInfo>,
        remove: Vec<String>,
    ) -> Result<Vec<(String, NodeError)>, NodeError> {
        self.request(|reply| Command::UpdateServices { add, remove, reply })
            .await
    }

    /// Stop offering a service; `false` if none had this id.
    ///
    /// # Errors
    /// [`NodeError::NotRunning`] once the node has stopped.
    pub async fn unregister_service(&self, id: &str) -> Result<bool, NodeError> {
        let id = id.to_owned();
        self.request(|reply| Command::UnregisterService { id, reply })
            .await
    }

    /// The services this node offers.
    ///
    /// # Errors
    /// [`NodeError::NotRunning`] once the node has stopped.
    pub async fn local_services(&self) -> Result<Vec<ServiceInfo>, NodeError> {
        self.request(|reply| Command::LocalServices { reply }).await
    }

    /// The services matching `query`, ours included, best first: found
    /// through the DHT (the providers of the type or capability key, then
    /// their verified records) or, when a walk is recent, from the
    /// verified cache at once. Returns what it has by `lookup_timeout`.
    ///
    /// # Errors
    /// [`NodeError::NotRunning`] once the node has stopped.
    pub async fn find_services(
        &self,
        query: ServiceQuery,
    ) -> Result<Vec<RankedService>, NodeError> {
        self.request(|reply| Command::FindServices { query, reply })
            .await
    }

    /// Stop gracefully: close listeners and connections (waiting up to
    /// `shutdown_timeout`), then reach `Stopped`. Calling it again, or on a
    /// stopped node, is fine.
    ///
    /// # Errors
    /// Only if the node ended in `Error` rather than `Stopped`.
    pub async fn shutdown(&self) -> Result<(), NodeError> {
        // Either the task stops us, or it is already gone; both end terminal.
        let _ = self.request(|reply| Command::Shutdown { reply }).await;
        match self.stopped().await {
            NodeState::Error => Err(NodeError::Failed),
            _ => Ok(()),
        }
    }
}

struct ListenerStatus {
    configured: Multiaddr,
    reported: bool,
}

impl ListenerStatus {
    fn new(configured: Multiaddr) -> Self {
        Self {
            configured,
            reported: false,
        }
    }
}

struct ConnectionEntry {
    peer: PeerId,
    remote: Multiaddr,
    direction: Direction,
    established: Instant,
    /// Through a relay (`/p2p-circuit`).
    relayed: bool,
}

#[derive(Default)]
struct PeerEntry {
    protocol_version: Option<String>,
    agent_version: Option<String>,
    /// Latest ping RTT on a direct connection.
    direct_rtt: Option<Duration>,
    /// Latest ping RTT through a relay: the relay path's, not the peer's.
    relayed_rtt: Option<Duration>,
    /// Open direct connections.
    direct: usize,
    /// Open relayed connections.
    relayed: usize,
}

impl PeerEntry {
    /// The RTT to score the peer on: the direct one once a direct
    /// connection exists, else the relay path's.
    fn rtt(&self) -> Option<Duration> {
        if self.direct > 0 {
            self.direct_rtt.or(self.relayed_rtt)
        } else {
            self.relayed_rtt.or(self.direct_rtt)
        }
    }

    /// Whether the RTT of [`PeerEntry::rtt`] is a relay path's.
    fn rtt_via_relay(&self) -> bool {
        !(self.direct > 0 && self.direct_rtt.is_some()) && self.relayed_rtt.is_some()
    }

    fn connection(&self) -> ConnectionKind {
        if self.direct > 0 {
            ConnectionKind::Direct
        } else if self.relayed > 0 {
            ConnectionKind::Relayed
        } else {
            ConnectionKind::None
        }
    }
}

/// A dial someone awaits; later dials of the same peer join it.
struct PendingDial {
    target: String,
    peer: Option<PeerId>,
    replies: Vec<oneshot::Sender<Result<PeerId, NodeError>>>,
}

impl PendingDial {
    fn finish(self, result: &Result<PeerId, NodeError>) {
        for reply in self.replies {
            let _ = reply.send(match result {
                Ok(peer) => Ok(*peer),
                Err(e) => Err(NodeError::Dial {
                    target: self.target.clone(),
                    reason: match e {
                        NodeError::Dial { reason, .. } => reason.clone(),
                        other => other.to_string(),
                    },
                }),
            });
        }
    }
}

/// Owns the swarm; the only code that touches it.
struct SwarmTask {
    config: NodeConfig,
    keypair: Keypair,
    registry: RegistryState,
    probe_rx: mpsc::Receiver<ProbeResult>,
    table: PeerTable,
    /// Dials made by discovery, by the source whose peer was dialed.
    auto_dials: HashMap<ConnectionId, DiscoverySource>,
    /// Peers we connected to because discovery dialed them.
    auto_dialed: HashSet<PeerId>,
    mdns_error: Option<String>,
    mdns_found_any: bool,
    mdns_silence_reported: bool,
    swarm: Swarm<NodeBehaviour>,
    commands: mpsc::Receiver<Command>,
    events: broadcast::Sender<NodeEvent>,
    state: watch::Sender<NodeState>,
    metrics: NodeMetrics,
    listeners: HashMap<ListenerId, ListenerStatus>,
    listen_addrs: Vec<Multiaddr>,
    connections: HashMap<ConnectionId, ConnectionEntry>,
    peers: HashMap<PeerId, PeerEntry>,
    pending_dials: HashMap<ConnectionId, PendingDial>,
    /// Peers whose breaker the gateway opened, until when they cool down.
    breakers: HashMap<PeerId, Instant>,
    /// Connections the trimming policy closed that have not reported closed yet.
    closing: HashSet<ConnectionId>,
    started: Option<oneshot::Sender<Result<(), NodeError>>>,
    trim: TrimPolicy,
    trimmed_total: u64,
    shutdown_timeout: Duration,
    shutdown_waiters: Vec<oneshot::Sender<()>>,
    hole_punch: HolePunchCounts,
    circuits_served: u64,
    /// When a refused handshake was last logged as a warning (the others
    /// in the same minute are counted and logged at debug).
    handshake_refusal_warned: Option<Instant>,
    /// Every configured listen address is on loopback (tests, one host):
    /// then loopback addresses are announced and dialed; otherwise a
    /// peer's loopback address would only reach ourselves.
    loopback_only: bool,
}

impl SwarmTask {
    async fn run(mut self) {
        // Configured bootstrap peers are known from the start, reachable or not.
        for peer in self.swarm.behaviour().bootstrap.peers() {
            self.discovered(peer.peer, &peer.addresses, DiscoverySource::Bootstrap);
        }
        if self.listeners.is_empty() {
            self.mark_running();
        }
        let mut trim_tick = tokio::time::interval(TRIM_CHECK_INTERVAL);
        trim_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let periodic = |period: Duration| {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick
        };
        let mut refresh_tick = periodic(self.config.record_refresh_interval);
        let mut health_tick = periodic(self.config.health_check_interval);
        loop {
            let registry_deadline = self.registry.next_deadline().map_or_else(
                || tokio::time::Instant::now() + Duration::from_secs(3600),
                tokio::time::Instant::from_std,
            );
            tokio::select! {
                event = self.swarm.select_next_some() => self.on_swarm_event(event),
                command = self.commands.recv() => match command {
                    Some(Command::Shutdown { reply }) => {
                        self.shutdown_waiters.push(reply);
                        break;
                    }
                    Some(command) => self.on_command(command),
                    // Every handle is gone: nobody can stop us later, so stop now.
                    None => break,
                },
                _ = trim_tick.tick() => {
                    self.trim_connections();
                    self.redial_known_peers();
                    self.report_mdns_silence();
                    self.expire_records();
                }
                _ = refresh_tick.tick() => self.publish_record(),
                _ = health_tick.tick() => self.run_health_checks(),
                () = tokio::time::sleep_until(registry_deadline) => self.on_registry_deadline(),
                Some(result) = self.probe_rx.recv() => self.on_probe_result(result),
            }
            if self.state.borrow().is_terminal() {
                break;
            }
        }
        self.stop().await;
    }

    /// Two nodes that dial each other through a relay at once end up with
    /// two circuits, and two hole punches that fight over the same ports.
    /// Both sides keep the circuit the smaller peer id dialed (the oldest
    /// one, if several) and close the others.
    fn close_redundant_relayed(&mut self, peer: PeerId) {
        let keep_direction = if *self.swarm.local_peer_id() < peer {
            Direction::Outbound
        } else {
            Direction::Inbound
        };
        let mut relayed: Vec<(ConnectionId, Direction, Instant)> = self
            .connections
            .iter()
            .filter(|(_, c)| c.peer == peer && c.relayed)
            .map(|(id, c)| (*id, c.direction, c.established))
            .collect();
        relayed.sort_by_key(|(_, direction, established)| {
            (*direction != keep_direction, *established)
        });
        let Some((keep, direction, _)) = relayed.first().copied() else {
            return;
        };
        if direction != keep_direction {
            // The circuit to keep has not arrived (yet): wait for it.
            return;
        }
        for (id, _, _) in relayed.into_iter().filter(|(id, _, _)| *id != keep) {
            tracing::debug!(%peer, connection = ?id, "closing a redundant relayed connection");
            self.swarm.close_connection(id);
        }
    }

    /// Whether a peer's address is worth dialing: a loopback address of
    /// another host only leads back to ourselves.
    fn usable_remote(&self, addr: &Multiaddr) -> bool {
        self.loopback_only || !is_loopback(addr)
    }

    fn set_state(&mut self, to: NodeState) {
        let from = *self.state.borrow();
        match from.transition(to) {
            Ok(to) => {
                self.state.send_replace(to);
                self.metrics.set_state(to);
                tracing::debug!(%from, %to, "node state changed");
                self.emit(NodeEvent::StateChanged { from, to });
            }
            Err(e) => tracing::error!(error = %e, "refused state change"),
        }
    }

    fn emit(&self, event: NodeEvent) {
        // No subscribers is fine; lagging ones lose old events.
        let _ = self.events.send(event);
    }

    fn mark_running(&mut self) {
        if *self.state.borrow() != NodeState::Starting {
            return;
        }
        self.set_state(NodeState::Running);
        let peer_id = *self.swarm.local_peer_id();
        tracing::info!(%peer_id, "node running");
        self.emit(NodeEvent::Started {
            peer_id,
            listen_addrs: self.listen_addrs.clone(),
        });
        if let Some(started) = self.started.take() {
            let _ = started.send(Ok(()));
        }
        let services = self.local_services();
        if !services.is_empty() {
            let ids: Vec<&str> = services.iter().map(|s| s.id.as_str()).collect();
            tracing::info!(count = services.len(), ids = %ids.join(", "), "advertising services");
        }
        self.publish_record();
    }

    fn fail_start(&mut self, error: NodeError) {
        tracing::error!(%error, "node failed to start");
        self.set_state(NodeState::Error);
        if let Some(started) = self.started.take() {
            let _ = started.send(Err(error));
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.listen_addrs.clone());
            }
            Command::Dial { addr, reply } => self.dial(addr, reply),
            Command::ConnectedPeers { reply } => {
                let _ = reply.send(self.connected_peers());
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::Peers { reply } => {
                let _ = reply.send(self.peer_infos());
            }
            Command::ReportBreaker {
                peer,
                cooling_until,
            } => match cooling_until {
                Some(until) => {
                    self.breakers.insert(peer, until);
                }
                None => {
                    self.breakers.remove(&peer);
                }
            },
            Command::KnownPeers { reply } => {
                let _ = reply.send(self.table.snapshot());
            }
            Command::Discovery { reply } => {
                let _ = reply.send(self.discovery_status());
            }
            Command::Metrics { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Command::RegisterService { service, reply } => {
                let _ = reply.send(self.register_service(*service));
            }
            Command::UpdateServices { add, remove, reply } => {
                let _ = reply.send(self.update_services(add, &remove));
            }
            Command::UnregisterService { id, reply } => {
                let _ = reply.send(self.unregister_service(&id));
            }
            Command::LocalServices { reply } => {
                let _ = reply.send(self.local_services());
            }
            Command::FindServices { query, reply } => self.find_services(query, reply),
            Command::Shutdown { reply } => self.shutdown_waiters.push(reply),
        }
    }

    fn dial(&mut self, addr: Multiaddr, reply: oneshot::Sender<Result<PeerId, NodeError>>) {
        if *self.state.borrow() != NodeState::Running {
            let _ = reply.send(Err(NodeError::NotRunning));
            return;
        }
        let target = addr.to_string();
        let peer = match addr.iter().last() {
            Some(Protocol::P2p(peer)) => Some(peer),
            _ => None,
        };
        if let Some(peer) = peer {
            if self.swarm.is_connected(&peer) {
                let _ = reply.send(Ok(peer));
                return;
            }
            if let Some(pending) = self
                .pending_dials
                .values_mut()
                .find(|d| d.peer == Some(peer))
            {
                pending.replies.push(reply);
                return;
            }
        }
        let opts = match peer {
            Some(peer) => DialOpts::peer_id(peer)
                .addresses(vec![addr])
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build(),
            None => DialOpts::unknown_peer_id().address(addr).build(),
        };
        let connection_id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.pending_dials.insert(
                    connection_id,
                    PendingDial {
                        target,
                        peer,
                        replies: vec![reply],
                    },
                );
            }
            Err(e) => {
                if let DialError::Denied { cause } = &e {
                    self.on_connection_denied(peer, "(outbound)", cause);
                }
                let _ = reply.send(Err(NodeError::Dial {
                    target,
                    reason: error_chain(&e),
                }));
            }
        }
    }

    fn connected_peers(&self) -> Vec<ConnectedPeer> {
        let mut by_peer: HashMap<PeerId, Vec<&ConnectionEntry>> = HashMap::new();
        for c in self.connections.values() {
            by_peer.entry(c.peer).or_default().push(c);
        }
        let mut peers: Vec<ConnectedPeer> = by_peer
            .into_iter()
            .filter_map(|(peer_id, mut conns)| {
                conns.sort_by_key(|c| c.established);
                let oldest = conns.first()?;
                let info = self.peers.get(&peer_id);
                Some(ConnectedPeer {
                    peer_id,
                    addresses: conns.iter().map(|c| c.remote.clone()).collect(),
                    direction: oldest.direction,
                    connected_for: oldest.established.elapsed(),
                    protocol_version: info.and_then(|i| i.protocol_version.clone()),
                    agent_version: info.and_then(|i| i.agent_version.clone()),
                    rtt: info.and_then(PeerEntry::rtt),
                })
            })
            .collect();
        peers.sort_by_key(|p| p.peer_id);
        peers
    }

    fn status(&self) -> NodeStatus {
        let nat = &self.swarm.behaviour().nat;
        let reachability = nat.reachability().into();
        let nat = TraversalStatus {
            relays: nat.active_relays(),
            relay_service: nat.is_relaying(),
            circuits_served: self.circuits_served,
            hole_punch: self.hole_punch,
        };
        NodeStatus {
            peer_id: *self.swarm.local_peer_id(),
            state: *self.state.borrow(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: self.metrics.endpoint.uptime().as_secs_f64(),
            listen_addrs: self.listen_addrs.clone(),
            external_addrs: self.swarm.external_addresses().cloned().collect(),
            reachability,
            nat,
            connections: ConnectionCounts {
                peers: self.peers.len(),
                inbound: self.count_direction(Direction::Inbound),
                outbound: self.count_direction(Direction::Outbound),
            },
            discovery: self.discovery_status(),
            services: self.service_counts(),
            http: HttpStatus::of(&self.config),
        }
    }

    fn peer_infos(&self) -> Vec<PeerInfo> {
        let unix_ms = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        };
        self.table
            .snapshot()
            .into_iter()
            .map(|p| {
                let entry = self.peers.get(&p.peer_id);
                PeerInfo {
                    peer_id: p.peer_id,
                    sources: p.sources,
                    addresses: p.addresses,
                    connected: p.connected,
                    connection: entry.map_or(ConnectionKind::None, PeerEntry::connection),
                    latency_ms: entry
                        .and_then(PeerEntry::rtt)
                        .map(|d| d.as_secs_f64() * 1000.0),
                    last_seen_ms: unix_ms(p.last_seen),
                    agent_version: entry.and_then(|e| e.agent_version.clone()),
                    failures: p.failures,
                    breaker: match self.breakers.get(&p.peer_id) {
                        None => BreakerState::Closed,
                        Some(until) if Instant::now() < *until => BreakerState::Open,
                        Some(_) => BreakerState::HalfOpen,
                    },
                }
            })
            .collect()
    }

    fn count_direction(&self, direction: Direction) -> usize {
        self.connections
            .values()
            .filter(|c| c.direction == direction)
            .count()
    }

    fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            state: *self.state.borrow(),
            uptime: self.metrics.endpoint.uptime(),
            peers_connected: self.peers.len(),
            connections_inbound: self.count_direction(Direction::Inbound),
            connections_outbound: self.count_direction(Direction::Outbound),
            connections_trimmed: self.trimmed_total,
            listen_addrs: self.listen_addrs.len(),
        }
    }

    fn update_connection_gauges(&self) {
        for direction in [Direction::Inbound, Direction::Outbound] {
            self.metrics.set_connections(
                direction,
                self.count_direction(direction),
                self.peers.len(),
            );
        }
    }

    fn trim_connections(&mut self) {
        let ages: Vec<TrimCandidate> = self
            .connections
            .iter()
            .map(|(id, c)| TrimCandidate {
                id: *id,
                peer: c.peer,
                established: c.established,
                protected: self.swarm.behaviour().bootstrap.is_bootstrap_peer(&c.peer),
            })
            .collect();
        let chosen = self.trim.connections_to_close(&ages, Instant::now());
        if chosen.is_empty() {
            return;
        }
        let mut closed = 0;
        for id in chosen {
            if self.swarm.close_connection(id) {
                self.closing.insert(id);
                closed += 1;
            }
        }
        if closed > 0 {
            tracing::info!(
                closed,
                connections = self.connections.len(),
                low = self.trim.low,
                high = self.trim.high,
                "trimmed connections"
            );
            self.trimmed_total += closed as u64;
            self.metrics.add_trimmed(closed);
            self.emit(NodeEvent::ConnectionsTrimmed { count: closed });
        }
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<NodeBehaviourEvent>) {
        self.metrics.libp2p.record(&event);
        match event {
            SwarmEvent::Behaviour(NodeBehaviourEvent::Identify(event)) => {
                self.metrics.libp2p.record(&event);
                self.on_identify(event);
            }
            SwarmEvent::Behaviour(NodeBehaviourEvent::Bootstrap(event)) => self.on_bootstrap(event),
            SwarmEvent::Behaviour(NodeBehaviourEvent::Mdns(event)) => self.on_mdns(event),
            SwarmEvent::Behaviour(NodeBehaviourEvent::Dht(event)) => self.on_dht(event),
            SwarmEvent::Behaviour(NodeBehaviourEvent::Gossip(event)) => {
                self.metrics.libp2p.record(&event);
                self.on_gossip(event);
            }
            SwarmEvent::NewExternalAddrOfPeer { peer_id, address }
                if self.usable_remote(&address) =>
            {
                self.table.add_address(&peer_id, &address);
            }
            SwarmEvent::Behaviour(NodeBehaviourEvent::Ping(event)) => {
                self.metrics.libp2p.record(&event);
                self.on_ping(event);
            }
            SwarmEvent::Behaviour(NodeBehaviourEvent::Nat(event)) => self.on_nat(event),
            SwarmEvent::Behaviour(
                NodeBehaviourEvent::ConnectionLimits(never)
                | NodeBehaviourEvent::MemoryLimits(never)
                | NodeBehaviourEvent::AllowedPeers(never),
            ) => match never {},
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => {
                let peer_id = *self.swarm.local_peer_id();
                let relayed = ollamacron_nat::is_relayed(&address);
                let new = !self.listen_addrs.contains(&address);
                if new {
                    tracing::info!(address = %with_peer(address.clone(), peer_id), "listening");
                    self.listen_addrs.push(address.clone());
                }
                // What we listen on is what we announce (identify, DHT
                // provider records), with AutoNAT's findings added; loopback
                // only when that is all we have. Of the addresses a relay
                // reports, the relay client confirms the one we reserved
                // through (and expires it with the reservation): the others
                // are the relay's to claim, not ours to announce.
                if !relayed && (self.loopback_only || !is_loopback(&address)) {
                    self.swarm.add_external_address(address.clone());
                }
                if let Some(l) = self.listeners.get_mut(&listener_id) {
                    l.reported = true;
                }
                if new {
                    self.emit(NodeEvent::ListenAddrAdded { addr: address });
                }
                if self.listeners.values().all(|l| l.reported) {
                    self.mark_running();
                }
                if relayed && new {
                    // Peers that find our services must learn the relay
                    // address: re-sign the record and re-announce (once per
                    // reservation, not on every renewal).
                    self.announce_addresses();
                }
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
                self.swarm.remove_external_address(&address);
                let relayed = ollamacron_nat::is_relayed(&address);
                self.emit(NodeEvent::ListenAddrRemoved { addr: address });
                if relayed {
                    self.announce_addresses();
                }
            }
            SwarmEvent::ListenerError { listener_id, error } => {
                let addr = self
                    .listeners
                    .get(&listener_id)
                    .map(|l| l.configured.clone());
                tracing::warn!(listener = ?addr, error = %error_chain(&error), "listener error");
            }
            SwarmEvent::ListenerClosed {
                listener_id,
                reason,
                addresses,
            } => {
                for a in &addresses {
                    self.listen_addrs.retain(|x| x != a);
                }
                if addresses.iter().any(ollamacron_nat::is_relayed) {
                    // A reservation ended: stop announcing its address.
                    self.announce_addresses();
                }
                if let Some(l) = self.listeners.remove(&listener_id) {
                    let reason = match &reason {
                        Ok(()) => "closed".to_owned(),
                        Err(e) => error_chain(e),
                    };
                    if self.started.is_some() && !l.reported {
                        self.fail_start(NodeError::Listen {
                            addr: l.configured,
                            reason,
                        });
                    } else if *self.state.borrow() == NodeState::Running {
                        tracing::warn!(addr = %l.configured, %reason, "listener closed");
                    }
                }
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                connection_id,
                endpoint,
                num_established,
                ..
            } => {
                let (remote, direction) = match &endpoint {
                    ConnectedPoint::Dialer { address, .. } => {
                        (address.clone(), Direction::Outbound)
                    }
                    ConnectedPoint::Listener { send_back_addr, .. } => {
                        (send_back_addr.clone(), Direction::Inbound)
                    }
                };
                let relayed = endpoint.is_relayed();
                tracing::debug!(%peer_id, %remote, ?direction, relayed, "connection established");
                self.connections.insert(
                    connection_id,
                    ConnectionEntry {
                        peer: peer_id,
                        remote: remote.clone(),
                        direction,
                        established: Instant::now(),
                        relayed,
                    },
                );
                let entry = self.peers.entry(peer_id).or_default();
                if relayed {
                    entry.relayed += 1;
                    if entry.relayed > 1 {
                        self.close_redundant_relayed(peer_id);
                    }
                    // DCUtR starts on the side that accepted the relayed
                    // connection: that side counts the attempt.
                    if self.config.enable_hole_punch && direction == Direction::Inbound {
                        self.metrics.hole_punch_started();
                        self.hole_punch.attempts += 1;
                    }
                } else {
                    entry.direct += 1;
                }
                self.table.set_connected(&peer_id, true);
                if let Some(source) = self.auto_dials.remove(&connection_id) {
                    self.metrics.count(DiscoveryCounter::DialSuccess, source);
                    self.auto_dialed.insert(peer_id);
                }
                if num_established.get() == 1 {
                    self.emit(NodeEvent::PeerConnected {
                        peer_id,
                        addr: remote,
                        direction,
                    });
                }
                if let Some(pending) = self.pending_dials.remove(&connection_id) {
                    pending.finish(&Ok(peer_id));
                }
                self.on_health_dial(connection_id, true);
                self.update_connection_gauges();
                if *self.state.borrow() == NodeState::Stopping {
                    self.swarm.close_connection(connection_id);
                } else {
                    self.trim_connections();
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                connection_id,
                num_established,
                cause,
                ..
            } => {
                if let Some(closed) = self.connections.remove(&connection_id)
                    && let Some(entry) = self.peers.get_mut(&peer_id)
                {
                    if closed.relayed {
                        entry.relayed = entry.relayed.saturating_sub(1);
                    } else {
                        entry.direct = entry.direct.saturating_sub(1);
                        if entry.direct == 0 {
                            entry.direct_rtt = None;
                        }
                    }
                }
                self.closing.remove(&connection_id);
                tracing::debug!(%peer_id, cause = ?cause.as_ref().map(ToString::to_string), "connection closed");
                if num_established == 0 {
                    self.peers.remove(&peer_id);
                    self.auto_dialed.remove(&peer_id);
                    self.table.set_connected(&peer_id, false);
                    self.emit(NodeEvent::PeerDisconnected { peer_id });
                }
                self.update_connection_gauges();
            }
            SwarmEvent::OutgoingConnectionError {
                connection_id,
                peer_id,
                error,
            } => {
                let reason = match &error {
                    DialError::Transport(attempts) => attempts
                        .iter()
                        .map(|(addr, e)| format!("{addr}: {}", error_chain(e)))
                        .collect::<Vec<_>>()
                        .join("; "),
                    other => error_chain(other),
                };
                tracing::debug!(peer = ?peer_id, %reason, "outgoing connection failed");
                if let DialError::Denied { cause } = &error {
                    self.on_connection_denied(peer_id, "(outbound)", cause);
                }
                if let (Some(source), Some(peer)) =
                    (self.auto_dials.remove(&connection_id), peer_id)
                {
                    self.on_auto_dial_failed(peer, source, &error);
                }
                if let Some(pending) = self.pending_dials.remove(&connection_id) {
                    let target = pending.target.clone();
                    pending.finish(&Err(NodeError::Dial { target, reason }));
                }
                self.on_health_dial(connection_id, false);
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                peer_id,
                ..
            } => {
                let remote = send_back_addr.to_string();
                match &error {
                    ListenError::Denied { cause } => {
                        self.on_connection_denied(peer_id, &remote, cause);
                    }
                    ListenError::Transport(_) => {
                        self.on_handshake_failed(&remote, &error_chain(&error));
                    }
                    _ => {}
                }
                tracing::debug!(%remote, error = %error_chain(&error), "incoming connection failed");
            }
            SwarmEvent::NewExternalAddrCandidate { address } => {
                tracing::debug!(%address, "a peer observed us at this address");
            }
            SwarmEvent::ExternalAddrConfirmed { address } => {
                tracing::info!(%address, "external address confirmed");
            }
            _ => {}
        }
    }

    fn on_identify(&mut self, event: identify::Event) {
        match event {
            identify::Event::Received { peer_id, info, .. } => {
                tracing::debug!(
                    %peer_id,
                    protocol_version = %info.protocol_version,
                    agent_version = %info.agent_version,
                    "peer identified"
                );
                let entry = self.peers.entry(peer_id).or_default();
                let changed = entry.protocol_version.as_deref() != Some(&info.protocol_version)
                    || entry.agent_version.as_deref() != Some(&info.agent_version);
                entry.protocol_version = Some(info.protocol_version.clone());
                entry.agent_version = Some(info.agent_version.clone());
                self.on_identified(peer_id, &info);
                self.note_relay_candidate(peer_id, &info);
                if changed {
                    self.emit(NodeEvent::PeerIdentified {
                        peer_id,
                        protocol_version: info.protocol_version,
                        agent_version: info.agent_version,
                    });
                }
            }
            identify::Event::Error { peer_id, error, .. } => {
                tracing::debug!(%peer_id, error = %error_chain(&error), "identify failed");
            }
            identify::Event::Sent { .. } | identify::Event::Pushed { .. } => {}
        }
    }

    /// A source reported `peer`: record it, announce it the first time.
    fn discovered(&mut self, peer: PeerId, addresses: &[Multiaddr], source: DiscoverySource) {
        let Some(reported) = self.table.report(peer, addresses, source) else {
            return;
        };
        if self.swarm.is_connected(&peer) {
            self.table.set_connected(&peer, true);
        }
        if reported.new_for_source {
            tracing::debug!(%peer, %source, "peer discovered");
            self.metrics.count(DiscoveryCounter::Discovered, source);
            self.emit(NodeEvent::PeerDiscovered {
                peer_id: peer,
                source,
            });
        }
        self.update_table_gauges();
    }

    fn lost(&mut self, peer: PeerId, source: DiscoverySource) {
        tracing::debug!(%peer, %source, "peer lost");
        self.metrics.count(DiscoveryCounter::Lost, source);
        self.emit(NodeEvent::PeerLost {
            peer_id: peer,
            source,
        });
        self.update_table_gauges();
    }

    fn update_table_gauges(&self) {
        let routing = self
            .swarm
            .behaviour()
            .dht
            .as_ref()
            .map_or(0, ollamacron_discovery_dht::Behaviour::routing_table_size);
        self.metrics.set_table_sizes(self.table.len(), routing);
    }

    /// Dial a discovered peer if the policy allows: not connected, not being
    /// dialed, not foreign, not in backoff, with an address, and while we
    /// hold fewer than `conn_mgr_low` peers (beyond that, knowing is enough).
    fn auto_dial(&mut self, peer: PeerId, source: DiscoverySource) {
        if *self.state.borrow() != NodeState::Running || self.swarm.is_connected(&peer) {
            return;
        }
        let low = usize::try_from(self.config.conn_mgr_low).unwrap_or(usize::MAX);
        if self.peers.len() >= low {
            return;
        }
        let Some(addresses) = self.table.dial_candidate(&peer, Instant::now()) else {
            return;
        };
        // Relay circuits are scarce (the relay limits them): discovery
        // alone never spends one. A peer reachable only through a relay is
        // dialed when its services are checked or used.
        let addresses: Vec<Multiaddr> = addresses
            .into_iter()
            .filter(|a| !ollamacron_nat::is_relayed(a))
            .collect();
        if addresses.is_empty() {
            tracing::debug!(%peer, "reachable only through a relay; not dialed for discovery");
            return;
        }
        let opts = DialOpts::peer_id(peer)
            .addresses(addresses)
            .condition(PeerCondition::DisconnectedAndNotDialing)
            .build();
        let connection_id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.auto_dials.insert(connection_id, source);
            }
            Err(e) => {
                self.table
                    .set_connected(&peer, self.swarm.is_connected(&peer));
                tracing::debug!(%peer, error = %error_chain(&e), "cannot dial discovered peer");
            }
        }
    }

    /// Dial known peers whose backoff is over, while below `conn_mgr_low`:
    /// a discovery event arrives once, a failed first dial must not be the end.
    fn redial_known_peers(&mut self) {
        let candidates = self
            .table
            .redial_candidates(Instant::now(), REDIALS_PER_PASS);
        for (peer, source) in candidates {
            self.auto_dial(peer, source);
        }
    }

    fn on_auto_dial_failed(&mut self, peer: PeerId, source: DiscoverySource, error: &DialError) {
        if matches!(error, DialError::DialPeerConditionFalse(_)) {
            // Someone else is dialing or connected: not a failure.
            self.table
                .set_connected(&peer, self.swarm.is_connected(&peer));
            return;
        }
        self.metrics.count(DiscoveryCounter::DialFailure, source);
        let bootstrap = &self.swarm.behaviour().bootstrap;
        match self.table.dial_failed(&peer, |n| bootstrap.backoff(n)) {
            DialOutcome::Retry { failures, retry_in } => self.emit(NodeEvent::DialFailed {
                peer_id: peer,
                source,
                failures,
                retry_in,
            }),
            DialOutcome::Forgotten => self.lost(peer, source),
            DialOutcome::Unknown => {}
        }
    }

    fn on_bootstrap(&mut self, event: BootstrapEvent) {
        match event {
            BootstrapEvent::Dialing { peer, failures } => {
                tracing::debug!(%peer, failures, "dialing bootstrap peer");
            }
            BootstrapEvent::Connected { peer } => {
                tracing::info!(%peer, "connected to bootstrap peer");
                self.discovered(peer, &[], DiscoverySource::Bootstrap);
                self.table.set_connected(&peer, true);
                self.metrics
                    .count(DiscoveryCounter::DialSuccess, DiscoverySource::Bootstrap);
            }
            BootstrapEvent::Disconnected { peer } => {
                tracing::debug!(%peer, "bootstrap peer disconnected");
            }
            BootstrapEvent::DialFailed {
                peer,
                error,
                failures,
                retry_in,
            } => {
                let retry = humantime::format_duration(Duration::from_millis(
                    u64::try_from(retry_in.as_millis()).unwrap_or(u64::MAX),
                ));
                if failures == 1 {
                    tracing::warn!(%peer, %error, retry_in = %retry, "cannot reach bootstrap peer");
                } else {
                    tracing::debug!(%peer, %error, failures, retry_in = %retry, "bootstrap peer still unreachable");
                }
                self.metrics
                    .count(DiscoveryCounter::DialFailure, DiscoverySource::Bootstrap);
                self.table.dial_failed(&peer, |_| retry_in);
                self.emit(NodeEvent::DialFailed {
                    peer_id: peer,
                    source: DiscoverySource::Bootstrap,
                    failures,
                    retry_in,
                });
            }
        }
    }

    fn on_mdns(&mut self, event: MdnsEvent) {
        match event {
            MdnsEvent::Discovered { peer, addresses } => {
                self.mdns_found_any = true;
                self.discovered(peer, &addresses, DiscoverySource::Mdns);
                self.auto_dial(peer, DiscoverySource::Mdns);
            }
            MdnsEvent::Expired { peer, .. } => {
                // Only some of its addresses may have expired.
                let still_seen = self
                    .swarm
                    .behaviour()
                    .mdns
                    .as_ref()
                    .is_some_and(|m| m.discovered_peers().any(|p| *p == peer));
                if !still_seen && self.table.lose(&peer, DiscoverySource::Mdns) {
                    self.lost(peer, DiscoverySource::Mdns);
                }
            }
        }
    }

    fn on_dht(&mut self, event: DhtEvent) {
        match event {
            DhtEvent::ProviderFound { peer, addresses } => {
                self.discovered(peer, &addresses, DiscoverySource::Dht);
                self.auto_dial(peer, DiscoverySource::Dht);
            }
            DhtEvent::PeerAddresses { peer, addresses } => {
                for addr in &addresses {
                    self.table.add_address(&peer, addr);
                }
                self.auto_dial(peer, DiscoverySource::Dht);
            }
            DhtEvent::RoutingUpdated {
                peer, addresses, ..
            } => self.discovered(peer, &addresses, DiscoverySource::Dht),
            DhtEvent::BootstrapFinished {
                ok,
                routing_table_size,
            } => {
                tracing::debug!(ok, routing_table_size, "DHT bootstrap finished");
                self.update_table_gauges();
            }
            DhtEvent::Advertised { ok } => {
                tracing::debug!(ok, "announced the namespace in the DHT");
            }
            DhtEvent::ModeChanged { mode } => {
                tracing::info!(%mode, "DHT mode changed");
            }
            DhtEvent::RecordPublished { ok, .. } => {
                tracing::debug!(ok, "stored our service record in the DHT");
            }
            DhtEvent::Kad(event) => {
                self.metrics.libp2p.record(event.as_ref());
                self.on_registry_kad(*event);
            }
        }
    }

    /// What identify tells discovery: the peer's addresses, whether it
    /// speaks our DHT, and whether it is an Ollamacron node at all.
    fn on_identified(&mut self, peer: PeerId, info: &identify::Info) {
        let addresses: Vec<Multiaddr> = info
            .listen_addrs
            .iter()
            .filter(|a| self.usable_remote(a))
            .cloned()
            .collect();
        self.discovered(peer, &addresses, DiscoverySource::Identify);
        if info.protocol_version != PROTOCOL_VERSION {
            self.table.set_foreign(&peer);
            if self.auto_dialed.contains(&peer) {
                tracing::debug!(%peer, protocol_version = %info.protocol_version, "discovered peer is not an Ollamacron node; disconnecting");
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            return;
        }
        let speaks_dht = info.protocols.contains(&KAD_PROTOCOL);
        if let (true, Some(dht)) = (speaks_dht, self.swarm.behaviour_mut().dht.as_mut()) {
            for addr in addresses.iter().take(MAX_IDENTIFY_ADDRESSES) {
                dht.add_address(&peer, addr.clone());
            }
            dht.peer_speaks_dht(peer);
        }
    }

    /// Warn once when mDNS runs but has heard nobody for a while: on Wi-Fi
    /// with client isolation, in containers or WSL2, multicast is often
    /// silently dropped.
    fn report_mdns_silence(&mut self) {
        if self.mdns_found_any
            || self.mdns_silence_reported
            || !self.swarm.behaviour().mdns.is_enabled()
        {
            return;
        }
        let quiet_for = self
            .config
            .mdns_query_interval
            .saturating_mul(MDNS_SILENT_QUERIES);
        if self.metrics.endpoint.uptime() < quiet_for {
            return;
        }
        self.mdns_silence_reported = true;
        tracing::warn!(
            quiet_for = %humantime::format_duration(quiet_for),
            "mDNS has found no peer; if other nodes run on this network, multicast may be blocked \
             (Wi-Fi client isolation, containers, WSL2): configure bootstrap peers"
        );
    }

    fn discovery_status(&self) -> DiscoveryStatus {
        let behaviour = self.swarm.behaviour();
        let mdns_detail = match (&self.mdns_error, behaviour.mdns.as_ref()) {
            (Some(reason), _) => format!("unavailable: {reason}"),
            (None, Some(mdns)) => format!(
                "{} peers on the local network",
                mdns.discovered_peers().count()
            ),
            (None, None) => "off (enable_mdns: false)".to_owned(),
        };
        let (dht_detail, routing, providers) = match behaviour.dht.as_ref() {
            Some(dht) => (
                format!(
                    "{} mode, {} peers in the routing table, {} namespace providers",
                    match dht.mode() {
                        DhtMode::Server => "server",
                        DhtMode::Client => "client",
                    },
                    dht.routing_table_size(),
                    dht.providers().len()
                ),
                dht.routing_table_size(),
                dht.providers().len(),
            ),
            None => ("off (enable_dht: false)".to_owned(), 0, 0),
        };
        let bootstrap = behaviour.bootstrap.peers();
        let connected = bootstrap.iter().filter(|p| p.connections > 0).count();
        let sources = vec![
            SourceStatus {
                source: DiscoverySource::Mdns,
                enabled: self.config.enable_mdns,
                active: behaviour.mdns.is_enabled(),
                detail: mdns_detail,
            },
            SourceStatus {
                source: DiscoverySource::Dht,
                enabled: self.config.enable_dht,
                active: behaviour.dht.is_enabled(),
                detail: dht_detail,
            },
            SourceStatus {
                source: DiscoverySource::Bootstrap,
                enabled: !bootstrap.is_empty(),
                active: connected > 0,
                detail: if bootstrap.is_empty() {
                    "no bootstrap peers configured".to_owned()
                } else {
                    format!(
                        "{connected} of {} bootstrap peers connected",
                        bootstrap.len()
                    )
                },
            },
            SourceStatus {
                source: DiscoverySource::Identify,
                enabled: true,
                active: true,
                detail: "addresses from every connected peer".to_owned(),
            },
        ];
        DiscoveryStatus {
            sources,
            stats: DiscoverySource::ALL
                .iter()
                .map(|s| (*s, self.metrics.source_stats(*s)))
                .collect(),
            known_peers: self.table.len(),
            dht_routing_table_size: routing,
            dht_providers: providers,
        }
    }

    fn on_ping(&mut self, event: ping::Event) {
        match event.result {
            Ok(rtt) => {
                let relayed = self
                    .connections
                    .get(&event.connection)
                    .is_some_and(|c| c.relayed);
                if let Some(entry) = self.peers.get_mut(&event.peer) {
                    if relayed {
                        entry.relayed_rtt = Some(rtt);
                    } else {
                        entry.direct_rtt = Some(rtt);
                    }
                }
            }
            Err(e) => tracing::debug!(peer = %event.peer, error = %e, "ping failed"),
        }
    }

    /// Close listeners and connections, wait for them (bounded), reach
    /// `Stopped`, and answer everyone waiting for the shutdown.
    async fn stop(mut self) {
        let state = *self.state.borrow();
        if !state.is_terminal() {
            self.set_state(NodeState::Stopping);
            if let Some(started) = self.started.take() {
                let _ = started.send(Err(NodeError::NotRunning));
            }
            self.answer_lookups(true);
            for (_, pending) in self.pending_dials.drain() {
                let target = pending.target.clone();
                pending.finish(&Err(NodeError::Dial {
                    target,
                    reason: "the node is shutting down".to_owned(),
                }));
            }
            let listener_ids: Vec<ListenerId> = self.listeners.keys().copied().collect();
            for id in listener_ids {
                self.swarm.remove_listener(id);
            }
            let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
            for peer in peers {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            let deadline = tokio::time::sleep(self.shutdown_timeout);
            tokio::pin!(deadline);
            while !self.connections.is_empty() {
                tokio::select! {
                    event = self.swarm.select_next_some() => self.on_swarm_event(event),
                    () = &mut deadline => {
                        tracing::warn!(open = self.connections.len(), "shutdown timeout: dropping remaining connections");
                        break;
                    }
                }
            }
            self.set_state(NodeState::Stopped);
            self.emit(NodeEvent::Stopped);
            tracing::info!("node stopped");
        }
        for waiter in self.shutdown_waiters.drain(..) {
            let _ = waiter.send(());
        }
    }
}
