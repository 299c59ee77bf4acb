//! Prometheus metrics: libp2p's own plus the node's.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use libp2p::metrics::{Metrics as Libp2pMetrics, Registry};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;

use crate::event::Direction;
use crate::state::NodeState;
use crate::status::{DiscoverySource, SourceStats};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RejectLabel {
    reason: &'static str,
    via: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ViaLabel {
    via: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnswerLabel {
    answer: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReachabilityLabel {
    reachability: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

/// How a DCUtR hole punch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HolePunchOutcome {
    Success,
    Failure,
}

/// What became of a relay reservation or circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RelayOutcome {
    Accepted,
    Denied,
    Failed,
}

impl RelayOutcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Accepted => "accepted",
            Self::Denied => "denied",
            Self::Failed => "failed",
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RefusalReason {
    /// The peer is not in `allowed_peers`.
    NotAllowed,
    /// The private-network handshake failed.
    Handshake,
}

/// Reachability, hole punching, relaying and refused connections.
struct NatMetrics {
    reachability: Family<ReachabilityLabel, Gauge>,
    hole_punch_attempts: Counter,
    hole_punches: Family<ResultLabel, Counter>,
    relay_reservations: Family<ResultLabel, Counter>,
    relay_served_reservations: Family<ResultLabel, Counter>,
    relay_served_circuits: Family<ResultLabel, Counter>,
    connections_refused: Family<ReasonLabel, Counter>,
}

impl NatMetrics {
    fn new(ours: &mut Registry) -> Self {
        let reachability = Family::<ReachabilityLabel, Gauge>::default();
        ours.register(
            "reachability",
            "1 for the node's current reachability (public, private, unknown)",
            reachability.clone(),
        );
        let hole_punch_attempts = Counter::default();
        ours.register(
            "hole_punch_attempts",
            "Relayed connections on which DCUtR hole punching started",
            hole_punch_attempts.clone(),
        );
        let hole_punches = Family::<ResultLabel, Counter>::default();
        ours.register(
            "hole_punches",
            "Hole punch outcomes (success: a direct connection replaced the relayed one)",
            hole_punches.clone(),
        );
        let relay_reservations = Family::<ResultLabel, Counter>::default();
        ours.register(
            "relay_reservations",
            "Our reservations on relays: accepted, or failed (refused, lost, expired)",
            relay_reservations.clone(),
        );
        let relay_served_reservations = Family::<ResultLabel, Counter>::default();
        ours.register(
            "relay_served_reservations",
            "Reservations other peers asked of our relay service: accepted or denied",
            relay_served_reservations.clone(),
        );
        let relay_served_circuits = Family::<ResultLabel, Counter>::default();
        ours.register(
            "relay_served_circuits",
            "Circuits other peers asked our relay service for: accepted or denied",
            relay_served_circuits.clone(),
        );
        let connections_refused = Family::<ReasonLabel, Counter>::default();
        ours.register(
            "connections_refused",
            "Connections refused: not_allowed (allowed_peers) or handshake (private-network key)",
            connections_refused.clone(),
        );
        Self {
            reachability,
            hole_punch_attempts,
            hole_punches,
            relay_reservations,
            relay_served_reservations,
            relay_served_circuits,
            connections_refused,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

/// The node's own metrics, registered under the `ollamacron_` prefix.
pub(crate) struct NodeMetrics {
    pub(crate) libp2p: Libp2pMetrics,
    connections: Family<DirectionLabel, Gauge>,
    peers: Gauge,
    state: Family<StateLabel, Gauge>,
    trimmed: Counter,
    duplicates_closed: Counter,
    discovered: Family<SourceLabel, Counter>,
    dial_failures: Family<SourceLabel, Counter>,
    dial_successes: Family<SourceLabel, Counter>,
    lost: Family<SourceLabel, Counter>,
    known_peers: Gauge,
    routing_table: Gauge,
    records_rejected: Family<RejectLabel, Counter>,
    /// Peers banned for handing us invalid records.
    pub(crate) peers_banned: Counter,
    records_accepted: Family<ViaLabel, Counter>,
    records_published: Counter,
    services_local: Gauge,
    services_remote: Gauge,
    lookups: Family<AnswerLabel, Counter>,
    nat: NatMetrics,
    pub(crate) endpoint: MetricsEndpoint,
}

/// What a discovery counter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DiscoveryCounter {
    Discovered,
    DialFailure,
    DialSuccess,
    Lost,
}

impl NodeMetrics {
    /// Register everything in `registry` (which already holds the
    /// transport's bandwidth counters) and take ownership of it.
    pub(crate) fn new(mut registry: Registry) -> Self {
        let libp2p = Libp2pMetrics::new(&mut registry);
        let ours = registry.sub_registry_with_prefix("ollamacron");
        let connections = Family::<DirectionLabel, Gauge>::default();
        ours.register(
            "connections",
            "Established connections by direction",
            connections.clone(),
        );
        let peers = Gauge::default();
        ours.register(
            "peers_connected",
            "Peers with at least one connection",
            peers.clone(),
        );
        let state = Family::<StateLabel, Gauge>::default();
        ours.register(
            "node_state",
            "1 for the node's current lifecycle state",
            state.clone(),
        );
        let trimmed = Counter::default();
        ours.register(
            "connections_trimmed",
            "Connections closed by the trimming policy",
            trimmed.clone(),
        );
        let duplicates_closed = Counter::default();
        ours.register(
            "duplicate_connections_closed",
            "Duplicate direct connections to a peer (simultaneous dials) this node closed",
            duplicates_closed.clone(),
        );
        let uptime = Gauge::<f64, AtomicU64>::default();
        ours.register(
            "uptime_seconds",
            "Seconds since the node started",
            uptime.clone(),
        );
        let runtime_tasks = Gauge::default();
        ours.register(
            "runtime_tasks",
            "Tasks alive in the node's async runtime (read when the metrics are scraped)",
            runtime_tasks.clone(),
        );
        let counter_family = |ours: &mut Registry, name: &str, help: &str| {
            let family = Family::<SourceLabel, Counter>::default();
            ours.register(name, help, family.clone());
            family
        };
        let discovered = counter_family(
            ours,
            "discovery_peers_discovered",
            "Peers reported for the first time, by discovery source",
        );
        let dial_failures = counter_family(
            ours,
            "discovery_connection_failures",
            "Failed dials of discovered peers, by discovery source",
        );
        let dial_successes = counter_family(
            ours,
            "discovery_successful_connections",
            "Successful dials of discovered peers, by discovery source",
        );
        let lost = counter_family(
            ours,
            "discovery_peers_lost",
            "Peers forgotten, by the discovery source that lost them",
        );
        let known_peers = Gauge::default();
        ours.register(
            "known_peers",
            "Peers in the known-peer table",
            known_peers.clone(),
        );
        let routing_table = Gauge::default();
        ours.register(
            "dht_routing_table_size",
            "Peers in the Kademlia routing table",
            routing_table.clone(),
        );
        let records_rejected = Family::<RejectLabel, Counter>::default();
        ours.register(
            "records_rejected",
            "Node records refused, by reason and by where they came from (put, get, gossip)",
            records_rejected.clone(),
        );
        let peers_banned = Counter::default();
        ours.register(
            "peers_banned",
            "Peers disconnected and refused for 10 minutes for handing us records no honest node passes on (forged or malformed)",
            peers_banned.clone(),
        );
        let records_accepted = Family::<ViaLabel, Counter>::default();
        ours.register(
            "records_accepted",
            "Verified node records that changed what we hold, by where they came from",
            records_accepted.clone(),
        );
        let records_published = Counter::default();
        ours.register(
            "records_published",
            "Times this node signed and published its record",
            records_published.clone(),
        );
        let services_local = Gauge::default();
        ours.register(
            "services_local",
            "Services this node offers",
            services_local.clone(),
        );
        let services_remote = Gauge::default();
        ours.register(
            "services_remote",
            "Services of other nodes held from verified records",
            services_remote.clone(),
        );
        let lookups = Family::<AnswerLabel, Counter>::default();
        ours.register(
            "service_lookups",
            "Service lookups, by how they were answered (cache, first_match, walk, deadline)",
            lookups.clone(),
        );
        let build = Family::<VersionLabel, Gauge>::default();
        build
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        ours.register(
            "build_info",
            "Version of this node (value is always 1)",
            build,
        );

        let nat = NatMetrics::new(ours);

        Self {
            libp2p,
            nat,
            connections,
            peers,
            state,
            trimmed,
            duplicates_closed,
            discovered,
            dial_failures,
            dial_successes,
            lost,
            known_peers,
            routing_table,
            records_rejected,
            peers_banned,
            records_accepted,
            records_published,
            services_local,
            services_remote,
            lookups,
            endpoint: MetricsEndpoint {
                registry: Arc::new(Mutex::new(registry)),
                uptime,
                runtime_tasks,
                started: Instant::now(),
            },
        }
    }

    pub(crate) fn set_reachability(&self, current: &'static str) {
        for r in ["public", "private", "unknown"] {
            self.nat
                .reachability
                .get_or_create(&ReachabilityLabel { reachability: r })
                .set(i64::from(r == current));
        }
    }

    pub(crate) fn hole_punch_started(&self) {
        self.nat.hole_punch_attempts.inc();
    }

    pub(crate) fn hole_punch(&self, outcome: HolePunchOutcome) {
        let result = match outcome {
            HolePunchOutcome::Success => "success",
            HolePunchOutcome::Failure => "failure",
        };
        self.nat
            .hole_punches
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    pub(crate) fn relay_reservation(&self, outcome: RelayOutcome) {
        self.nat
            .relay_reservations
            .get_or_create(&ResultLabel {
                result: outcome.as_str(),
            })
            .inc();
    }

    pub(crate) fn relay_served(&self, outcome: RelayOutcome, circuit: bool) {
        let family = if circuit {
            &self.nat.relay_served_circuits
        } else {
            &self.nat.relay_served_reservations
        };
        family
            .get_or_create(&ResultLabel {
                result: outcome.as_str(),
            })
            .inc();
    }

    pub(crate) fn connection_refused(&self, reason: RefusalReason) {
        let reason = match reason {
            RefusalReason::NotAllowed => "not_allowed",
            RefusalReason::Handshake => "handshake",
        };
        self.nat
            .connections_refused
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub(crate) fn set_state(&self, to: NodeState) {
        for s in NodeState::ALL {
            self.state
                .get_or_create(&StateLabel { state: s.as_str() })
                .set(i64::from(s == to));
        }
    }

    pub(crate) fn set_connections(&self, direction: Direction, count: usize, peers: usize) {
        self.connections
            .get_or_create(&DirectionLabel {
                direction: direction.as_str(),
            })
            .set(i64::try_from(count).unwrap_or(i64::MAX));
        self.peers.set(i64::try_from(peers).unwrap_or(i64::MAX));
    }

    fn discovery_family(&self, counter: DiscoveryCounter) -> &Family<SourceLabel, Counter> {
        match counter {
            DiscoveryCounter::Discovered => &self.discovered,
            DiscoveryCounter::DialFailure => &self.dial_failures,
            DiscoveryCounter::DialSuccess => &self.dial_successes,
            DiscoveryCounter::Lost => &self.lost,
        }
    }

    pub(crate) fn count(&self, counter: DiscoveryCounter, source: DiscoverySource) {
        self.discovery_family(counter)
            .get_or_create(&SourceLabel {
                source: source.as_str(),
            })
            .inc();
    }

    pub(crate) fn source_stats(&self, source: DiscoverySource) -> SourceStats {
        let get = |counter| {
            self.discovery_family(counter)
                .get_or_create(&SourceLabel {
                    source: source.as_str(),
                })
                .get()
        };
        SourceStats {
            peers_discovered: get(DiscoveryCounter::Discovered),
            connection_failures: get(DiscoveryCounter::DialFailure),
            successful_connections: get(DiscoveryCounter::DialSuccess),
            peers_lost: get(DiscoveryCounter::Lost),
        }
    }

    pub(crate) fn set_table_sizes(&self, known_peers: usize, routing_table: usize) {
        self.known_peers
            .set(i64::try_from(known_peers).unwrap_or(i64::MAX));
        self.routing_table
            .set(i64::try_from(routing_table).unwrap_or(i64::MAX));
    }

    pub(crate) fn record_rejected(&self, reason: &'static str, via: &'static str) {
        self.records_rejected
            .get_or_create(&RejectLabel { reason, via })
            .inc();
    }

    pub(crate) fn record_accepted(&self, via: &'static str) {
        self.records_accepted.get_or_create(&ViaLabel { via }).inc();
    }

    pub(crate) fn record_published(&self) {
        self.records_published.inc();
    }

    pub(crate) fn set_service_counts(&self, local: usize, remote: usize) {
        self.services_local
            .set(i64::try_from(local).unwrap_or(i64::MAX));
        self.services_remote
            .set(i64::try_from(remote).unwrap_or(i64::MAX));
    }

    pub(crate) fn lookup_answered(&self, answer: &'static str) {
        self.lookups.get_or_create(&AnswerLabel { answer }).inc();
    }

    pub(crate) fn add_trimmed(&self, count: usize) {
        self.trimmed
            .inc_by(u64::try_from(count).unwrap_or(u64::MAX));
    }
}

/// Renders the registry as Prometheus text; cheap to clone, shared by the
/// HTTP server and every `NodeHandle`.
/// The metrics of each peer behaviour event, in one place.
impl libp2p::metrics::Recorder<crate::peers::Event> for NodeMetrics {
    fn record(&self, event: &crate::peers::Event) {
        use crate::peers::{Event, Refusal};
        match event {
            Event::Trimmed { closed } => self.add_trimmed(*closed),
            Event::DuplicateClosed => {
                self.duplicates_closed.inc();
            }
            Event::Refused { reason } => self.connection_refused(match reason {
                Refusal::NotAllowed => RefusalReason::NotAllowed,
                Refusal::Handshake => RefusalReason::Handshake,
            }),
            Event::Pinged(_) | Event::PathChanged { .. } => {}
        }
    }
}

/// The metrics of each discovery event, in one place.
impl libp2p::metrics::Recorder<crate::discovery::Event> for NodeMetrics {
    fn record(&self, event: &crate::discovery::Event) {
        use crate::discovery::Event;
        match event {
            Event::Discovered { source, .. } => self.count(DiscoveryCounter::Discovered, *source),
            Event::Lost { source, .. } => self.count(DiscoveryCounter::Lost, *source),
            Event::DialSucceeded { source } => self.count(DiscoveryCounter::DialSuccess, *source),
            Event::DialFailed { source, .. } => self.count(DiscoveryCounter::DialFailure, *source),
            Event::TableChanged { .. } => {}
        }
    }
}

/// The metrics of each registry event, in one place.
impl libp2p::metrics::Recorder<crate::registry::Event> for NodeMetrics {
    fn record(&self, event: &crate::registry::Event) {
        use crate::registry::Event;
        match event {
            Event::Published => self.record_published(),
            Event::Accepted { via, .. } => self.record_accepted(via.as_str()),
            Event::Rejected { via, reason, .. } => {
                self.record_rejected(reason.as_str(), via.as_str());
            }
            Event::ServiceCounts { local, remote } => self.set_service_counts(*local, *remote),
            Event::LookupAnswered { how } => self.lookup_answered(how),
            // A ban is counted where it is made (a bootstrap peer is not banned).
            Event::Misbehaving { .. }
            | Event::LocalChanged(_)
            | Event::Expired(_)
            | Event::Dht(_)
            | Event::Gossip(_) => {}
        }
    }
}

#[derive(Clone)]
pub(crate) struct MetricsEndpoint {
    registry: Arc<Mutex<Registry>>,
    uptime: Gauge<f64, AtomicU64>,
    runtime_tasks: Gauge,
    started: Instant,
}

impl MetricsEndpoint {
    /// Let `register` add metrics under the `ollamacron` prefix.
    pub(crate) fn register(&self, register: impl FnOnce(&mut Registry)) {
        let mut registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        register(registry.sub_registry_with_prefix("ollamacron"));
    }
}

impl std::fmt::Debug for MetricsEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetricsEndpoint").finish_non_exhaustive()
    }
}

impl MetricsEndpoint {
    pub(crate) fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// OpenMetrics text of every registered metric.
    pub(crate) fn encode(&self) -> String {
        self.uptime.set(self.uptime().as_secs_f64());
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let tasks = runtime.metrics().num_alive_tasks();
            self.runtime_tasks
                .set(i64::try_from(tasks).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        // A poisoned lock only means a panic elsewhere mid-encode; the
        // registry itself is still consistent, so keep serving it.
        let registry = self
            .registry
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }
}

/// A point-in-time summary of the node, from `NodeHandle::metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct MetricsSnapshot {
    /// Lifecycle state.
    pub state: NodeState,
    /// Time since the node started.
    pub uptime: Duration,
    /// Peers with at least one connection.
    pub peers_connected: usize,
    /// Established inbound connections.
    pub connections_inbound: usize,
    /// Established outbound connections.
    pub connections_outbound: usize,
    /// Connections closed by the trimming policy since start.
    pub connections_trimmed: u64,
    /// Addresses the node listens on.
    pub listen_addrs: usize,
}
