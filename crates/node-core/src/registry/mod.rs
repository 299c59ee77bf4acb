//! Services on the network: the record and query types (re-exported from
//! `ollamacron-service-registry`), the DHT keys of the wire contract
//! ([`keys`]), and — inside the node — the registry behaviour: our signed record and its publication
//! ([`publish`]), verification of every record that comes in, at every
//! entry point ([`verify`]), ranked lookups with the DHT walks and record
//! fetches behind them ([`lookup`]), and health checks ([`health`]). It
//! owns the Kademlia DHT and gossipsub as inner behaviours and tracks the
//! queries it starts itself; what the DHT learns about peers goes out as
//! [`Event::Dht`] for discovery.

mod clock;
mod health;
mod invalid;
pub mod keys;
mod lookup;
mod publish;
mod sync;
mod verify;

pub use self::clock::{CLOCK_WARNING_OFFSET, ClockStatus};
pub use self::sync::SYNC_PROTOCOL;
pub use ollamacron_service_registry::*;

use std::collections::{HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use libp2p::gossipsub;
use libp2p::identity::Keypair;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::{
    ConnectionId, DialError, FromSwarm, NetworkBehaviour, THandlerInEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId, identify};
use ollamacron_config::NodeConfig;
use ollamacron_discovery_dht::{self as dht, QueryId, Record, RecordKey};
use tokio::sync::mpsc;

use crate::behaviour::PROTOCOL_VERSION;
use crate::error::NodeError;
use crate::event::RecordVia;

use self::health::{Health, ProbeResult};
use self::lookup::PendingLookup;
pub(crate) use self::publish::service_from_config;

/// The gossipsub topic that carries signed node records (when pubsub is on).
pub const SERVICES_TOPIC: &str = "/ollamacron/services/1";
/// Where a local service came from (`GET /v1/services/local`'s `origin`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceOrigin {
    /// The configuration's `services`.
    Config,
    /// Registered through the API or the CLI
    /// ([`NodeHandle::register_service`](crate::NodeHandle::register_service)):
    /// kept in the registration file, when the node has one, across restarts.
    Api,
    /// Mirrored from the local Ollama (or another local source) through
    /// [`NodeHandle::update_services`](crate::NodeHandle::update_services):
    /// found again at every start, never saved.
    Ollama,
}

impl ServiceOrigin {
    /// The name the API and the CLI show.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Api => "api",
            Self::Ollama => "ollama",
        }
    }
}

/// A service this node offers, with where it came from.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LocalService {
    /// The service.
    #[serde(flatten)]
    pub service: ServiceInfo,
    /// Where it came from.
    pub origin: ServiceOrigin,
}

/// The services a node's registration file gave back at start.
#[derive(Debug, Clone, Default)]
pub(crate) struct Restored {
    /// The file (named in errors).
    pub(crate) path: std::path::PathBuf,
    pub(crate) services: Vec<ServiceInfo>,
}

/// Most of a peer's identify listen addresses passed to Kademlia.
const MAX_IDENTIFY_ADDRESSES: usize = 8;
/// How often expired records are dropped (their services leave answers at
/// once; this tells subscribers).
const EXPIRY_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// The earliest first tick of the periodic timers, as a share of their
/// period.
const FIRST_TICK_FRACTION: f64 = 0.5;
/// The deadline timer's resting point when nothing is due.
const IDLE_DEADLINE: Duration = Duration::from_secs(3600);

/// Milliseconds since the Unix epoch.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The DHT and gossipsub, whose queries and messages the registry drives.
#[derive(libp2p::swarm::NetworkBehaviour)]
pub(crate) struct Inner {
    dht: Toggle<dht::Behaviour>,
    gossip: Toggle<gossipsub::Behaviour>,
    sync: libp2p::request_response::Behaviour<sync::SyncCodec>,
}

/// What the registry reports.
#[derive(Debug)]
pub(crate) enum Event {
    /// We signed and published a new record of our services.
    Published,
    /// A peer's record was verified and stored; `changes` are what it
    /// changed (including services of peers evicted to make room).
    Accepted {
        via: RecordVia,
        changes: Vec<ServiceChange>,
    },
    /// A record was refused: `peer` handed it to us.
    Rejected {
        peer: Option<PeerId>,
        via: RecordVia,
        reason: RejectReason,
    },
    /// `peer` handed us `invalid_records` records no honest node passes on
    /// within [`invalid::INVALID_RECORD_WINDOW`], the last refused for
    /// `reason`: it is to be banned.
    Misbehaving {
        peer: PeerId,
        invalid_records: u32,
        reason: RejectReason,
    },
    /// One of our own services was added, updated or removed.
    LocalChanged(ServiceChange),
    /// Records expired, with the services they took along.
    Expired(Vec<ServiceChange>),
    /// Services known now: ours, and of other nodes.
    ServiceCounts { local: usize, remote: usize },
    /// A lookup was answered: from the cache, after the walk, at its
    /// first match, or at its deadline.
    LookupAnswered { how: &'static str },
    /// What the DHT learned of peers and of itself (never a raw Kademlia
    /// event): providers, addresses, routing, bootstrap, mode.
    Dht(dht::Event),
    /// A gossipsub event, after the registry acted on it (for metrics).
    Gossip(Box<gossipsub::Event>),
}

/// Our latest record: its signed pages and their common sequence.
#[derive(Debug, Clone)]
pub(crate) struct OwnRecord {
    sequence: u64,
    pages: Vec<SignedPage>,
}

/// Who provides a model in the DHT, from one exact query of its key
/// (the cache is not consulted), and what the query cost.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelProviders {
    /// The providers found (this node too, when it serves the model).
    pub providers: Vec<PeerId>,
    /// Requests sent before the first provider was found: a bound on the
    /// hops the query took (each hop is at least one request).
    pub requests_to_first: Option<u32>,
    /// Requests the query sent in all.
    pub requests: u32,
}

struct PendingProviders {
    found: HashSet<PeerId>,
    requests_to_first: Option<u32>,
    reply: tokio::sync::oneshot::Sender<ModelProviders>,
}

/// The registry behaviour (see the module docs).
pub(crate) struct Behaviour {
    inner: Inner,
    keypair: Keypair,
    local_peer: PeerId,
    /// Publication starts once the node runs.
    running: bool,
    /// Loopback addresses are ours to announce and usable to dial.
    loopback_only: bool,
    local: LocalServices,
    /// Where each local service (by id) came from.
    origins: HashMap<String, ServiceOrigin>,
    cache: RecordCache,
    /// How far each record author's clock is from ours.
    clocks: clock::PeerClocks,
    /// Invalid records per peer, towards a ban.
    invalid: invalid::InvalidRecords,
    limits: RecordLimits,
    weights: ScoreWeights,
    ttl: Duration,
    lookup_timeout: Duration,
    lookup_cache_fresh: Duration,
    refresh_interval: Duration,
    region: Option<String>,
    node_tags: Vec<String>,
    /// Our latest signed record.
    own: Option<OwnRecord>,
    /// Whether the last published record had services (an empty one is
    /// published once, to withdraw them, then no more).
    advertising: bool,
    /// The DHT copies of our record's pages, re-put on every DHT refresh,
    /// and their puts in flight (one round at a time; `outdated` when it
    /// changed meanwhile).
    own_dht: Vec<Record>,
    own_puts: HashSet<QueryId>,
    own_outdated: bool,
    /// When our record was last put, and when the next put is due.
    own_put_at: Option<Instant>,
    own_put_due: Option<Instant>,
    /// Direct pushes of our record to connected peers, in flight.
    pushes: HashSet<QueryId>,
    /// Connected peers that have the current version of our record.
    pushed: HashSet<PeerId>,
    /// Our listen and confirmed external addresses.
    listen_addrs: Vec<Multiaddr>,
    external_addrs: Vec<Multiaddr>,
    /// Open connections: peer and remote address.
    connections: HashMap<ConnectionId, (PeerId, Multiaddr)>,
    connected: HashSet<PeerId>,
    /// A health check dials an unconnected node only while fewer peers
    /// than this (`conn_mgr_low`) are connected: in a large mesh a node
    /// cannot connect to every other, and there a node's freshly signed
    /// record (which reaches everyone by record sync) is the sign of life
    /// it gives.
    health_dials_below_peers: usize,
    /// Each connected peer's scored round trip, and whether it is a relay
    /// path's (from the peer behaviour).
    paths: HashMap<PeerId, (Duration, bool)>,
    peer_health: HashMap<PeerId, Health>,
    service_health: HashMap<(PeerId, String), Health>,
    walks: HashMap<QueryId, RecordKey>,
    /// Exact provider queries of models ([`Behaviour::find_model_providers`]).
    provider_queries: HashMap<QueryId, PendingProviders>,
    walked_at: HashMap<RecordKey, Instant>,
    /// Record pages being fetched: owner and page.
    fetches: HashMap<QueryId, (PeerId, u16)>,
    /// Pages to fetch once a running fetch finishes.
    fetch_queue: VecDeque<(PeerId, u16)>,
    fetch_queued: HashSet<(PeerId, u16)>,
    lookups: Vec<PendingLookup>,
    health_dials: HashMap<ConnectionId, PeerId>,
    probes_in_flight: usize,
    probe_tx: mpsc::Sender<ProbeResult>,
    probe_rx: mpsc::Receiver<ProbeResult>,
    gossip_republish_at: Option<Instant>,
    gossip_republished: Option<Instant>,
    /// Record sync with neighbours.
    sync: sync::SyncState,
    sync_tick: tokio::time::Interval,
    catch_up_tick: tokio::time::Interval,
    refresh_tick: tokio::time::Interval,
    health_tick: tokio::time::Interval,
    expiry_tick: tokio::time::Interval,
    deadline: Pin<Box<tokio::time::Sleep>>,
    queued: VecDeque<ToSwarm<Event, THandlerInEvent<Inner>>>,
    /// Answers to commands, sent once the events they caused are out (so
    /// a publication is counted before `register_service` returns).
    answers: VecDeque<Box<dyn FnOnce() + Send>>,
}

impl Behaviour {
    /// The registry of `keypair`'s node as `config` describes it, with the
    /// services the config declares; the DHT starts in the mode that
    /// `reachability` calls for.
    ///
    /// `restored` are the services registered through the API before a
    /// restart (from the registration file); they replace a configured
    /// service of the same id, as their registration did.
    ///
    /// # Errors
    /// The configured or restored services are invalid or do not fit in
    /// a record.
    pub(crate) fn new(
        keypair: &Keypair,
        config: &NodeConfig,
        reachability: ollamacron_nat::Reachability,
        loopback_only: bool,
        restored: &Restored,
    ) -> Result<Self, NodeError> {
        let peer = keypair.public().to_peer_id();
        let limits = crate::configs::record_limits(config);
        let mut local = LocalServices::new(peer, limits.max_paged_services());
        let mut origins = HashMap::new();
        let now = unix_ms();
        for service in &config.services {
            let service = service_from_config(service);
            origins.insert(service.id.clone(), ServiceOrigin::Config);
            local.register(service, now).map_err(NodeError::from)?;
        }
        for service in &restored.services {
            if origins.insert(service.id.clone(), ServiceOrigin::Api) == Some(ServiceOrigin::Config)
            {
                tracing::info!(id = %service.id, path = %restored.path.display(), "a service registered through the API replaces the configured one of the same id (unregister it to offer the configured one again after a restart)");
            }
            local.register(service.clone(), now).map_err(|e| {
                crate::registrations::RegistrationError::Refused {
                    path: restored.path.clone(),
                    id: service.id.clone(),
                    reason: e.to_string(),
                }
            })?;
        }
        // The services must make a record every peer accepts: refuse to
        // start rather than run without advertising them.
        let trial = local.clone().next_record(
            now,
            config.record_ttl,
            config.region.as_deref(),
            &config.tags,
            &[],
        );
        sign_record_pages(&trial, keypair, &limits).map_err(|e| NodeError::Service {
            message: format!("the configured services (with those restored from the registration file) do not fit in a record: {e}"),
            field: None,
        })?;
        let dht = config.enable_dht.then(|| {
            let mut dht =
                dht::Behaviour::new(peer, crate::configs::dht_config(config, reachability));
            // No model keys until our first record: a node that serves
            // nothing re-announces nothing as the routing table grows.
            dht.set_exact_keys(std::collections::HashSet::new());
            dht
        });
        let gossip = if config.enable_pubsub {
            match crate::configs::gossip(keypair, config, SERVICES_TOPIC) {
                Ok(b) => Some(b),
                Err(reason) => {
                    tracing::error!(%reason, "cannot start gossipsub; records spread through the DHT only");
                    None
                }
            }
        } else {
            None
        };
        // The first tick comes at a random point of the second half of
        // the period: nodes started together (a fleet after a power cut,
        // the simulator) do not refresh and sync in lockstep.
        let periodic = |period: Duration| {
            let first = period
                .mul_f64(FIRST_TICK_FRACTION + rand::random::<f64>() * (1.0 - FIRST_TICK_FRACTION));
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + first, period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick
        };
        let mut expiry_tick = tokio::time::interval(EXPIRY_CHECK_INTERVAL);
        expiry_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (probe_tx, probe_rx) = mpsc::channel(health::PROBE_QUEUE_LEN);
        Ok(Self {
            inner: Inner {
                dht: dht.into(),
                gossip: gossip.into(),
                sync: sync::behaviour(),
            },
            keypair: keypair.clone(),
            local_peer: peer,
            running: false,
            loopback_only,
            local,
            origins,
            cache: RecordCache::new(config.dht_max_records),
            clocks: clock::PeerClocks::new(config.dht_max_records),
            invalid: invalid::InvalidRecords::default(),
            limits,
            weights: crate::configs::score_weights(config),
            ttl: config.record_ttl,
            lookup_timeout: config.lookup_timeout,
            lookup_cache_fresh: config.lookup_cache_fresh,
            refresh_interval: config.record_refresh_interval,
            region: config.region.clone(),
            node_tags: config.tags.clone(),
            own: None,
            advertising: false,
            own_dht: Vec::new(),
            own_puts: HashSet::new(),
            own_outdated: false,
            own_put_at: None,
            own_put_due: None,
            pushes: HashSet::new(),
            pushed: HashSet::new(),
            listen_addrs: Vec::new(),
            external_addrs: Vec::new(),
            connections: HashMap::new(),
            connected: HashSet::new(),
            health_dials_below_peers: config.conn_mgr_low,
            paths: HashMap::new(),
            peer_health: HashMap::new(),
            service_health: HashMap::new(),
            walks: HashMap::new(),
            provider_queries: HashMap::new(),
            walked_at: HashMap::new(),
            fetches: HashMap::new(),
            fetch_queue: VecDeque::new(),
            fetch_queued: HashSet::new(),
            lookups: Vec::new(),
            health_dials: HashMap::new(),
            probes_in_flight: 0,
            probe_tx,
            probe_rx,
            gossip_republish_at: None,
            gossip_republished: None,
            sync: sync::SyncState::default(),
            sync_tick: periodic(sync::SYNC_INTERVAL),
            catch_up_tick: periodic(sync::CATCH_UP_INTERVAL),
            refresh_tick: periodic(config.record_refresh_interval),
            health_tick: periodic(config.health_check_interval),
            expiry_tick,
            deadline: Box::pin(tokio::time::sleep(IDLE_DEADLINE)),
            queued: VecDeque::new(),
            answers: VecDeque::new(),
        })
    }

    fn emit(&mut self, event: Event) {
        self.queued.push_back(ToSwarm::GenerateEvent(event));
    }

    /// Send `value` on `reply` once the events queued so far are out.
    pub(crate) fn answer_after_events<T: Send + 'static>(
        &mut self,
        reply: tokio::sync::oneshot::Sender<T>,
        value: T,
    ) {
        self.answers.push_back(Box::new(move || {
            let _ = reply.send(value);
        }));
    }

    /// Send every answer still waiting (the node stops).
    pub(crate) fn flush_answers(&mut self) {
        for answer in self.answers.drain(..) {
            answer();
        }
    }

    /// Look up the providers of `model`'s key in the DHT, whatever the
    /// cache holds; the answer comes when the query ends (no DHT: none).
    pub(crate) fn find_model_providers(
        &mut self,
        model: &str,
        reply: tokio::sync::oneshot::Sender<ModelProviders>,
    ) {
        let Some(dht) = self.inner.dht.as_mut() else {
            let _ = reply.send(ModelProviders {
                providers: Vec::new(),
                requests_to_first: None,
                requests: 0,
            });
            return;
        };
        let id = dht.get_providers(keys::model_key(model));
        self.provider_queries.insert(
            id,
            PendingProviders {
                found: HashSet::new(),
                requests_to_first: None,
                reply,
            },
        );
    }

    /// The envelopes of our record's pages.
    fn own_envelopes(&self) -> Vec<Vec<u8>> {
        self.own
            .iter()
            .flat_map(|own| own.pages.iter().map(|p| p.envelope.clone()))
            .collect()
    }

    /// The DHT, when it runs.
    pub(crate) fn dht(&self) -> Option<&dht::Behaviour> {
        self.inner.dht.as_ref()
    }

    /// Switch the DHT between server and client mode.
    pub(crate) fn set_dht_mode(&mut self, mode: dht::Mode) {
        if let Some(dht) = self.inner.dht.as_mut() {
            dht.set_mode(mode);
        }
    }

    /// The peer behaviour measured `peer`'s round trip anew (`None`: no
    /// longer connected or measured).
    pub(crate) fn set_path(&mut self, peer: PeerId, path: Option<(Duration, bool)>) {
        match path {
            Some(path) => {
                self.paths.insert(peer, path);
            }
            None => {
                self.paths.remove(&peer);
            }
        }
    }

    /// Whether a peer's address is worth dialing: a loopback address of
    /// another host only leads back to ourselves.
    fn usable_remote(&self, addr: &Multiaddr) -> bool {
        self.loopback_only || !ollamacron_nat::is_loopback(addr)
    }

    /// A peer identified itself: an Ollamacron node that speaks our DHT
    /// gets its addresses into the routing table and our record at once.
    pub(crate) fn on_identified(&mut self, peer: PeerId, info: &identify::Info) {
        let speaks_sync =
            info.protocol_version == PROTOCOL_VERSION && info.protocols.contains(&SYNC_PROTOCOL);
        if !speaks_sync {
            self.on_sync_peer_gone(&peer);
        }
        if info.protocol_version != PROTOCOL_VERSION {
            return;
        }
        if speaks_sync && self.connected.contains(&peer) {
            self.on_sync_peer(peer);
        }
        if !info.protocols.contains(&keys::KAD_PROTOCOL) {
            return;
        }
        let addresses: Vec<Multiaddr> = info
            .listen_addrs
            .iter()
            .filter(|a| self.usable_remote(a))
            .take(MAX_IDENTIFY_ADDRESSES)
            .cloned()
            .collect();
        let Some(dht) = self.inner.dht.as_mut() else {
            return;
        };
        for addr in addresses {
            dht.add_address(&peer, addr);
        }
        if self.connected.contains(&peer) && !self.sync.peers.contains(&peer) {
            self.push_own_record(vec![peer]);
        }
    }

    fn on_dht(&mut self, event: dht::Event) {
        match event {
            dht::Event::Advertising => self.put_own_record(),
            dht::Event::RoutingUpdated {
                peer, is_new_peer, ..
            } => {
                if is_new_peer && self.connected.contains(&peer) && !self.sync.peers.contains(&peer)
                {
                    self.push_own_record(vec![peer]);
                }
                self.emit(Event::Dht(event));
            }
            dht::Event::ProvidersFound {
                query,
                providers,
                requests,
            } => {
                if let Some(pending) = self.provider_queries.get_mut(&query) {
                    pending.requests_to_first.get_or_insert(requests);
                    pending.found.extend(providers);
                } else if let Some(key) = self.walks.get(&query).cloned() {
                    self.on_walk_progress(&key, providers);
                }
            }
            dht::Event::RecordFound {
                query,
                record,
                peer,
            } => {
                if let Some(owner) = self.fetches.get(&query).copied() {
                    self.on_fetch_progress(query, owner, &record, peer);
                }
            }
            dht::Event::QueryFinished {
                query,
                ok,
                requests,
            } => {
                if let Some(pending) = self.provider_queries.remove(&query) {
                    let _ = pending.reply.send(ModelProviders {
                        providers: pending.found.into_iter().collect(),
                        requests_to_first: pending.requests_to_first,
                        requests,
                    });
                } else {
                    self.on_query_finished(query, ok);
                }
            }
            dht::Event::InboundRecord { source, record } => self.on_inbound_put(source, record),
            other => self.emit(Event::Dht(other)),
        }
    }

    fn on_query_finished(&mut self, query: QueryId, ok: bool) {
        if let Some(key) = self.walks.remove(&query) {
            self.on_walk_done(&key);
        } else if let Some((owner, page)) = self.fetches.remove(&query) {
            self.on_fetch_done(owner, page);
            self.fetch_next();
        } else if self.pushes.remove(&query) {
            if !ok {
                tracing::debug!("a direct push of our record failed");
            }
        } else if self.own_puts.remove(&query) {
            tracing::debug!(ok, "stored a page of our service record in the DHT");
            if self.own_puts.is_empty() && std::mem::take(&mut self.own_outdated) {
                let due = self
                    .own_put_at
                    .map_or_else(Instant::now, |at| at + publish::MIN_DHT_PUT_INTERVAL);
                self.own_put_due = Some(due);
            }
        }
    }

    /// The earliest moment the registry has something to do.
    fn next_deadline(&self) -> Option<Instant> {
        self.lookups
            .iter()
            .map(|l| l.deadline)
            .chain(self.gossip_republish_at)
            .chain(self.sync.deadline())
            .chain(self.own_put_due)
            .min()
    }

    /// Timers: lookup deadlines and the gossip re-publication.
    fn on_deadline(&mut self) {
        if self
            .gossip_republish_at
            .is_some_and(|at| at <= Instant::now())
        {
            self.gossip_republish_at = None;
            self.gossip_republished = Some(Instant::now());
            for envelope in self.own_envelopes() {
                self.gossip_publish(envelope);
            }
        }
        self.flush_outbox();
        if self.own_put_due.is_some_and(|at| at <= Instant::now()) {
            self.own_put_due = None;
            if self.own_puts.is_empty() {
                self.put_own_record();
            } else {
                self.own_outdated = true;
            }
        }
        self.answer_lookups(false);
    }

    /// Poll the registry's own timers and probe results; `true` if one
    /// fired (there may be more to do).
    fn poll_timers(&mut self, cx: &mut Context<'_>) -> bool {
        if self.refresh_tick.poll_tick(cx).is_ready() {
            self.publish_record();
            return true;
        }
        if self.health_tick.poll_tick(cx).is_ready() {
            self.run_health_checks();
            return true;
        }
        if self.sync_tick.poll_tick(cx).is_ready() {
            self.on_sync_tick();
            return true;
        }
        if self.catch_up_tick.poll_tick(cx).is_ready() {
            self.on_catch_up_tick();
            return true;
        }
        if self.expiry_tick.poll_tick(cx).is_ready() {
            self.expire_records();
            return true;
        }
        if let Poll::Ready(Some(result)) = self.probe_rx.poll_recv(cx) {
            self.on_probe_result(result);
            return true;
        }
        let due = self
            .next_deadline()
            .unwrap_or_else(|| Instant::now() + IDLE_DEADLINE);
        let due = tokio::time::Instant::from_std(due);
        if self.deadline.deadline() != due {
            self.deadline.as_mut().reset(due);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.on_deadline();
            // Rest until the next deadline is set.
            self.deadline
                .as_mut()
                .reset(tokio::time::Instant::now() + IDLE_DEADLINE);
            return true;
        }
        false
    }
}

impl NetworkBehaviour for Behaviour {
    type ToSwarm = Event;

    delegate_connections_to_inner!();

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        match &event {
            FromSwarm::ConnectionEstablished(e) => {
                let remote = e.endpoint.get_remote_address().clone();
                self.connections
                    .insert(e.connection_id, (e.peer_id, remote));
                self.connected.insert(e.peer_id);
                self.cache.set_live(e.peer_id, true);
                // A node whose record we hold and never checked: being
                // connected is its first good check.
                if let Some(health) = self.peer_health.get_mut(&e.peer_id)
                    && health.last_good_ms.is_none()
                    && health.window.ratio().is_none()
                {
                    health.record(true, unix_ms());
                }
                self.on_health_dial(e.connection_id, true);
            }
            FromSwarm::ConnectionClosed(e) => {
                self.connections.remove(&e.connection_id);
                if e.remaining_established == 0 {
                    self.connected.remove(&e.peer_id);
                    self.cache.set_live(e.peer_id, false);
                    self.pushed.remove(&e.peer_id);
                    self.on_sync_peer_gone(&e.peer_id);
                }
            }
            FromSwarm::DialFailure(e) => {
                if matches!(e.error, DialError::DialPeerConditionFalse(_)) {
                    // Another dial is under way or we are connected.
                    self.health_dials.remove(&e.connection_id);
                } else {
                    self.on_health_dial(e.connection_id, false);
                }
            }
            FromSwarm::NewListenAddr(e) if !self.listen_addrs.contains(e.addr) => {
                self.listen_addrs.push(e.addr.clone());
            }
            FromSwarm::ExpiredListenAddr(e) => self.listen_addrs.retain(|a| a != e.addr),
            FromSwarm::ExternalAddrConfirmed(e) if !self.external_addrs.contains(e.addr) => {
                self.external_addrs.push(e.addr.clone());
            }
            FromSwarm::ExternalAddrExpired(e) => self.external_addrs.retain(|a| a != e.addr),
            _ => {}
        }
        let first_connection = match &event {
            FromSwarm::ConnectionEstablished(e) if e.other_established == 0 => Some(e.peer_id),
            _ => None,
        };
        self.inner.on_swarm_event(event);
        // A new peer is a sync neighbour from its first connection on, not
        // only once identify says so: under load an identify exchange can
        // time out, and a node whose neighbours were all learned that way
        // would be left with connections and no records. A peer that turns
        // out not to speak the protocol is dropped again (identify, or the
        // first request it refuses). After the inner behaviours saw the
        // connection, so that sync requests go out on it.
        if let Some(peer) = first_connection {
            self.on_sync_peer(peer);
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        loop {
            if let Some(event) = self.queued.pop_front() {
                return Poll::Ready(event);
            }
            if let Some(answer) = self.answers.pop_front() {
                answer();
                continue;
            }
            if self.poll_timers(cx) {
                continue;
            }
            match self.inner.poll(cx) {
                Poll::Ready(ToSwarm::GenerateEvent(InnerEvent::Dht(event))) => self.on_dht(event),
                Poll::Ready(ToSwarm::GenerateEvent(InnerEvent::Sync(event))) => {
                    self.on_sync_event(event);
                }
                Poll::Ready(ToSwarm::GenerateEvent(InnerEvent::Gossip(event))) => {
                    self.on_gossip(&event);
                    self.emit(Event::Gossip(Box::new(event)));
                }
                Poll::Ready(other) => {
                    return Poll::Ready(other.map_out(|_| {
                        unreachable!("generated events are matched in the arms above")
                    }));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests;
