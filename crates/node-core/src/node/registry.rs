//! The service registry inside the swarm task: publishing our signed
//! record, verifying every record that comes in (Kademlia PUT and GET,
//! gossip), health checks, and ranked lookups.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance};
use libp2p::identity::Keypair;
use libp2p::kad::store::RecordStore;
use libp2p::kad::{self, GetRecordOk, QueryId, QueryResult, RecordKey};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::ConnectionId;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::{Multiaddr, PeerId};
use ollamacron_config::{MAX_RECORD_TTL, MIN_RECORD_TTL, NodeConfig, ServiceConfig};
use ollamacron_discovery_dht::{
    capability_key, namespace_key, node_record_key, node_record_peer, service_type_key,
};
use ollamacron_scoring::ReliabilityWindow;
use ollamacron_service_registry::{
    Accepted, Candidate, ChangeKind, LocalServices, QualityInputs, RankedService, RecordCache,
    RecordLimits, RejectReason, ScoreWeights, ServiceChange, ServiceInfo, ServiceQuery,
    ServiceStatus, rank_services, sign_record, verify_record,
};
use tokio::sync::{mpsc, oneshot};

use super::SwarmTask;
use crate::behaviour::SERVICES_TOPIC;
use crate::error::NodeError;
use crate::event::{NodeEvent, RecordVia};

/// A lookup answered from the cache starts a walk in the background when
/// the last walk for its key is this old (or `lookup_cache_fresh`, if shorter).
const REVALIDATE_AFTER: Duration = Duration::from_secs(2);
/// A burst of peers subscribing to the topic costs one re-publication.
const GOSSIP_REPUBLISH_DEBOUNCE: Duration = Duration::from_millis(200);
/// Re-publications for new subscribers are at least this far apart, so a
/// peer that keeps re-subscribing cannot make every node flood the topic
/// (a newcomer also gets our record by a direct DHT put).
const GOSSIP_REPUBLISH_MIN_INTERVAL: Duration = Duration::from_secs(5);
/// Most providers of one walk whose records are fetched.
const MAX_PROVIDERS_PER_WALK: usize = 256;
/// Most records waiting to be fetched.
const MAX_FETCH_QUEUE: usize = 1024;
/// Most addresses from a peer's own record used to dial it for a health
/// check (only those naming the peer; the DHT and identify supply the rest).
const MAX_HEALTH_DIAL_ADDRESSES: usize = 4;
/// Longest an HTTP health probe may take.
const HTTP_PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most HTTP probes in flight at once.
const MAX_CONCURRENT_PROBES: usize = 16;
/// Most keys whose last walk time is remembered.
const MAX_WALKED_KEYS: usize = 1024;
/// Most record fetches (`get_record` walks) at once; more wait their turn.
const MAX_CONCURRENT_FETCHES: usize = 32;
/// Most lookups waiting for the DHT at once; more are answered from the cache.
const MAX_PENDING_LOOKUPS: usize = 256;

/// Milliseconds since the Unix epoch.
pub(super) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A service declared in the config file, as the registry holds it.
pub(super) fn service_from_config(config: &ServiceConfig) -> ServiceInfo {
    ServiceInfo {
        id: config.effective_id().to_owned(),
        name: config.name.clone(),
        service_type: config.service_type.clone(),
        version: config.version.clone(),
        description: config.description.clone(),
        port: config.port,
        metadata: config.metadata.clone(),
        tags: config.tags.clone(),
        capabilities: config.capabilities.clone(),
        protocols: config.protocols.clone(),
        health_check_url: config.health_check_url.clone(),
        latency_ms: config.latency_ms,
        throughput: config.throughput,
        reliability: config.reliability,
        status: ServiceStatus::Available,
        ..ServiceInfo::default()
    }
}

/// Outcomes of health checks of one peer or service.
#[derive(Debug, Default)]
struct Health {
    window: ReliabilityWindow,
    last_good_ms: Option<u64>,
}

impl Health {
    fn record(&mut self, ok: bool, now_ms: u64) {
        self.window.record(ok);
        if ok {
            self.last_good_ms = Some(now_ms);
        }
    }
}

/// A lookup waiting for the DHT.
struct PendingLookup {
    key: RecordKey,
    query: ServiceQuery,
    reply: oneshot::Sender<Vec<RankedService>>,
    deadline: Instant,
    walk_done: bool,
    outstanding: HashSet<PeerId>,
}

/// What a health probe found.
pub(super) struct ProbeResult {
    peer: PeerId,
    service_id: String,
    ok: bool,
}

/// The registry's state; the code that drives it is `impl SwarmTask` below.
pub(super) struct RegistryState {
    local: LocalServices,
    cache: RecordCache,
    limits: RecordLimits,
    weights: ScoreWeights,
    ttl: Duration,
    lookup_timeout: Duration,
    lookup_cache_fresh: Duration,
    refresh_interval: Duration,
    region: Option<String>,
    node_tags: Vec<String>,
    /// Our latest signed record and its sequence.
    own: Option<(Vec<u8>, u64)>,
    /// Whether the last published record had services (an empty one is
    /// published once, to withdraw them, then no more).
    advertising: bool,
    peer_health: HashMap<PeerId, Health>,
    service_health: HashMap<(PeerId, String), Health>,
    walks: HashMap<QueryId, RecordKey>,
    walked_at: HashMap<RecordKey, Instant>,
    fetches: HashMap<QueryId, PeerId>,
    /// Records to fetch once a running fetch finishes.
    fetch_queue: std::collections::VecDeque<PeerId>,
    fetch_queued: HashSet<PeerId>,
    lookups: Vec<PendingLookup>,
    health_dials: HashMap<ConnectionId, PeerId>,
    probes_in_flight: usize,
    probe_tx: mpsc::Sender<ProbeResult>,
    gossip_republish_at: Option<Instant>,
    gossip_republished: Option<Instant>,
}

impl RegistryState {
    /// The registry of `peer` as `config` describes it, with the services
    /// the config declares; probe results arrive on the returned receiver.
    pub(super) fn new(
        keypair: &Keypair,
        config: &NodeConfig,
    ) -> Result<(Self, mpsc::Receiver<ProbeResult>), NodeError> {
        let peer = keypair.public().to_peer_id();
        let to_usize = |v: u32| usize::try_from(v).unwrap_or(usize::MAX);
        let limits = RecordLimits {
            max_record_bytes: usize::try_from(config.max_record_size.bytes()).unwrap_or(usize::MAX),
            max_services: to_usize(config.max_services_per_record),
            max_string_bytes: to_usize(config.max_string_length),
            max_list_items: to_usize(config.max_list_items),
            min_ttl: MIN_RECORD_TTL,
            max_ttl: MAX_RECORD_TTL,
        };
        let w = config.score_weights;
        let mut local = LocalServices::new(peer, limits.max_services);
        let now = unix_ms();
        for service in &config.services {
            local
                .register(service_from_config(service), now)
                .map_err(NodeError::from)?;
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
        sign_record(&trial, keypair, &limits).map_err(|e| NodeError::Service {
            message: format!("the configured services do not fit in a record: {e}"),
            field: None,
        })?;
        let (probe_tx, probe_rx) = mpsc::channel(MAX_CONCURRENT_PROBES * 4);
        let state = Self {
            local,
            cache: RecordCache::new(to_usize(config.dht_max_records)),
            limits,
            weights: ScoreWeights {
                reliability: w.reliability,
                latency: w.latency,
                throughput: w.throughput,
                availability: w.availability,
            },
            ttl: config.record_ttl,
            lookup_timeout: config.lookup_timeout,
            lookup_cache_fresh: config.lookup_cache_fresh,
            refresh_interval: config.record_refresh_interval,
            region: config.region.clone(),
            node_tags: config.tags.clone(),
            own: None,
            advertising: false,
            peer_health: HashMap::new(),
            service_health: HashMap::new(),
            walks: HashMap::new(),
            walked_at: HashMap::new(),
            fetches: HashMap::new(),
            fetch_queue: std::collections::VecDeque::new(),
            fetch_queued: HashSet::new(),
            lookups: Vec::new(),
            health_dials: HashMap::new(),
            probes_in_flight: 0,
            probe_tx,
            gossip_republish_at: None,
            gossip_republished: None,
        };
        Ok((state, probe_rx))
    }

    /// The earliest moment the registry has something to do.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.lookups
            .iter()
            .map(|l| l.deadline)
            .chain(self.gossip_republish_at)
            .min()
    }
}

/// The DHT key a lookup walks: the type's, else the first capability's,
/// else the namespace (every node).
fn lookup_key(query: &ServiceQuery) -> RecordKey {
    match (&query.service_type, query.capabilities.first()) {
        (Some(t), _) => service_type_key(t),
        (None, Some(c)) => capability_key(c),
        (None, None) => namespace_key(),
    }
}

fn change_event(change: ServiceChange, local: bool) -> NodeEvent {
    let ServiceChange {
        peer,
        service_id,
        service_type,
        kind,
    } = change;
    match kind {
        ChangeKind::Added => NodeEvent::ServiceAdded {
            peer_id: peer,
            service_id,
            service_type,
            local,
        },
        ChangeKind::Updated => NodeEvent::ServiceUpdated {
            peer_id: peer,
            service_id,
            service_type,
            local,
        },
        ChangeKind::Removed => NodeEvent::ServiceRemoved {
            peer_id: peer,
            service_id,
            service_type,
            local,
        },
    }
}

impl SwarmTask {
    // ----- our own record -------------------------------------------------

    /// Addresses peers can reach us at, for the services in our record.
    fn record_addresses(&self) -> Vec<String> {
        let peer = *self.swarm.local_peer_id();
        let max = self.registry.limits.max_list_items;
        // Relay addresses only as confirmed (the one we reserved through).
        self.swarm
            .external_addresses()
            .chain(
                self.listen_addrs
                    .iter()
                    .filter(|a| !ollamacron_nat::is_relayed(a)),
            )
            .filter(|a| self.loopback_only || !super::is_loopback(a))
            .filter(|a| {
                !a.iter().any(|p| match p {
                    Protocol::Ip4(ip) => ip.is_unspecified(),
                    Protocol::Ip6(ip) => ip.is_unspecified(),
                    _ => false,
                })
            })
            .map(|a| super::with_peer(a.clone(), peer).to_string())
            .filter(|a| a.len() <= self.registry.limits.max_string_bytes)
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .take(max)
            .collect()
    }

    /// Our addresses changed (a relay reservation came or went): publish a
    /// record that lists them and re-announce as provider, so peers that
    /// find our services can dial us.
    pub(super) fn announce_addresses(&mut self) {
        if *self.state.borrow() != crate::state::NodeState::Running {
            return;
        }
        self.publish_record();
        if let Some(dht) = self.swarm.behaviour_mut().dht.as_mut() {
            dht.refresh_now();
        }
    }

    /// Sign a new record of our services and publish it: in the DHT under
    /// our node key, as provider of every type and capability key, and on
    /// the gossip topic. An empty record is published once, to withdraw
    /// what we advertised before.
    pub(super) fn publish_record(&mut self) {
        if self.registry.local.is_empty() && !self.registry.advertising {
            return;
        }
        let addresses = self.record_addresses();
        let state = &mut self.registry;
        let record = state.local.next_record(
            unix_ms(),
            state.ttl,
            state.region.as_deref(),
            &state.node_tags,
            &addresses,
        );
        let envelope = match sign_record(&record, &self.keypair, &state.limits) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::error!(error = %e, "cannot sign our service record; not published");
                return;
            }
        };
        state.advertising = !record.services.is_empty();
        state.own = Some((envelope.clone(), record.sequence));
        let keys: HashSet<RecordKey> = record
            .services
            .iter()
            .flat_map(|s| {
                std::iter::once(service_type_key(&s.service_type))
                    .chain(s.capabilities.iter().map(|c| capability_key(c)))
            })
            .collect();
        let ttl = state.ttl;
        let peer = *self.swarm.local_peer_id();
        if let Some(dht) = self.swarm.behaviour_mut().dht.as_mut() {
            dht.set_provided_keys(keys);
            dht.publish_record(kad::Record {
                key: node_record_key(&peer),
                value: envelope.clone(),
                publisher: Some(peer),
                expires: Some(Instant::now() + ttl),
            });
        }
        self.gossip_publish(envelope);
        self.metrics.record_published();
        tracing::debug!(
            sequence = record.sequence,
            services = record.services.len(),
            "published our service record"
        );
    }

    fn gossip_publish(&mut self, envelope: Vec<u8>) {
        if let Some(gossip) = self.swarm.behaviour_mut().gossip.as_mut()
            && let Err(e) = gossip.publish(IdentTopic::new(SERVICES_TOPIC), envelope)
        {
            // No subscribed peer yet is normal; they get it when they subscribe.
            tracing::debug!(error = %e, "record not gossiped");
        }
    }

    /// Add or replace a local service and publish at once. The new record
    /// is signed on a copy first, so a service that would make the record
    /// invalid is refused with the reason and changes nothing.
    pub(super) fn register_service(&mut self, service: ServiceInfo) -> Result<(), NodeError> {
        let change = self.try_register(service)?;
        self.emit(change_event(change, true));
        self.update_service_gauges();
        self.publish_record();
        Ok(())
    }

    /// Add or replace a local service if the record stays valid with it
    /// (signed on a copy first); nothing is published.
    fn try_register(&mut self, service: ServiceInfo) -> Result<ServiceChange, NodeError> {
        let mut trial = self.registry.local.clone();
        let change = trial
            .register(service, unix_ms())
            .map_err(NodeError::from)?;
        let addresses = self.record_addresses();
        let state = &self.registry;
        let record = trial.next_record(
            unix_ms(),
            state.ttl,
            state.region.as_deref(),
            &state.node_tags,
            &addresses,
        );
        sign_record(&record, &self.keypair, &state.limits).map_err(NodeError::from)?;
        self.registry.local = trial;
        Ok(change)
    }

    /// Remove the services with the ids in `remove`, add or replace each of
    /// `add`, and publish one record for all of it. A service of `add` that
    /// would make the record invalid is left out; those come back with
    /// their ids and reasons.
    pub(super) fn update_services(
        &mut self,
        add: Vec<ServiceInfo>,
        remove: &[String],
    ) -> Vec<(String, NodeError)> {
        let mut changed = false;
        // An id in both lists is replaced (one update), not removed and added.
        for id in remove.iter().filter(|id| !add.iter().any(|s| s.id == **id)) {
            if let Some(change) = self.registry.local.unregister(id) {
                self.emit(change_event(change, true));
                changed = true;
            }
        }
        let mut refused = Vec::new();
        for service in add {
            let id = service.id.clone();
            match self.try_register(service) {
                Ok(change) => {
                    self.emit(change_event(change, true));
                    changed = true;
                }
                Err(e) => refused.push((id, e)),
            }
        }
        if changed {
            self.update_service_gauges();
            self.publish_record();
        }
        refused
    }

    /// Remove a local service and publish at once; false if there was none.
    pub(super) fn unregister_service(&mut self, id: &str) -> bool {
        let Some(change) = self.registry.local.unregister(id) else {
            return false;
        };
        self.emit(change_event(change, true));
        self.update_service_gauges();
        self.publish_record();
        true
    }

    pub(super) fn local_services(&self) -> Vec<ServiceInfo> {
        self.registry.local.iter().cloned().collect()
    }

    pub(super) fn service_counts(&self) -> super::ServiceCounts {
        super::ServiceCounts {
            local: self.registry.local.len(),
            remote: self
                .registry
                .cache
                .iter()
                .map(|(_, c)| c.record.services.len())
                .sum(),
            nodes: self.registry.cache.len(),
        }
    }

    fn update_service_gauges(&self) {
        let counts = self.service_counts();
        self.metrics.set_service_counts(counts.local, counts.remote);
    }

    // ----- records coming in ----------------------------------------------

    /// Verify `envelope` as `owner`'s record and hold it; emit what changed,
    /// or count and report the rejection. `from` is who handed it to us.
    fn accept_record(
        &mut self,
        owner: PeerId,
        envelope: &[u8],
        via: RecordVia,
        from: Option<PeerId>,
        floor: Option<u64>,
    ) -> Result<Accepted, RejectReason> {
        let now = unix_ms();
        let result = if owner == *self.swarm.local_peer_id() {
            // Only we sign our records: anything but our latest is stale or forged.
            match &self.registry.own {
                Some((own, _)) if own == envelope => Ok(Accepted::Unchanged),
                own => verify_record(
                    envelope,
                    &owner,
                    now,
                    own.as_ref().map(|(_, seq)| seq.saturating_add(1)),
                    &self.registry.limits,
                )
                .map(|_| Accepted::Unchanged),
            }
        } else {
            self.registry
                .cache
                .accept_at_least(owner, envelope, now, &self.registry.limits, floor)
        };
        match &result {
            Ok(Accepted::Stored { changes }) => {
                tracing::debug!(%owner, peer = ?from, via = via.as_str(), "record accepted");
                self.metrics.record_accepted(via.as_str());
                let first = !self.registry.peer_health.contains_key(&owner);
                for change in changes.clone() {
                    if change.peer != owner {
                        // Evicted to make room: forget what we measured of it.
                        self.registry.peer_health.remove(&change.peer);
                        self.registry
                            .service_health
                            .retain(|(p, _), _| *p != change.peer);
                    }
                    self.emit(change_event(change, false));
                }
                self.update_service_gauges();
                if first {
                    // A first sign of the peer: check it now, not in a minute.
                    self.check_peer(owner);
                }
            }
            Ok(Accepted::Unchanged) => {}
            Err(reason) => {
                tracing::debug!(peer = ?from, %owner, via = via.as_str(), %reason, "record rejected");
                self.metrics.record_rejected(reason.as_str(), via.as_str());
                self.emit(NodeEvent::RecordRejected {
                    peer: from,
                    via,
                    reason: reason.as_str(),
                    detail: reason.to_string(),
                });
            }
        }
        result
    }

    /// A peer asks us to store a record: only a verified node record for
    /// the peer its key names is stored.
    fn on_inbound_put(&mut self, source: PeerId, record: kad::Record) {
        let Some(owner) = node_record_peer(&record.key) else {
            let reason = RejectReason::Malformed(format!(
                "key {:?} is not /ollamacron/node/<peer id>",
                String::from_utf8_lossy(record.key.as_ref())
            ));
            tracing::debug!(peer = %source, %reason, "record rejected");
            self.metrics
                .record_rejected(reason.as_str(), RecordVia::Put.as_str());
            self.emit(NodeEvent::RecordRejected {
                peer: Some(source),
                via: RecordVia::Put,
                reason: reason.as_str(),
                detail: reason.to_string(),
            });
            return;
        };
        if owner == *self.swarm.local_peer_id() {
            // Our own key: we hold our latest record; check and count the rest.
            let _ = self.accept_record(owner, &record.value, RecordVia::Put, Some(source), None);
            return;
        }
        // The copy in the DHT store counts too: the cache may have evicted it.
        let stored_sequence = self.swarm.behaviour_mut().dht.as_mut().and_then(|dht| {
            let stored = dht.kad_mut().store_mut().get(&record.key)?;
            verify_record(
                &stored.value,
                &owner,
                unix_ms(),
                None,
                &self.registry.limits,
            )
            .ok()
            .map(|r| r.sequence)
        });
        if self
            .accept_record(
                owner,
                &record.value,
                RecordVia::Put,
                Some(source),
                stored_sequence,
            )
            .is_err()
        {
            return;
        }
        // Kept in the store exactly as long as the record itself is valid.
        let expires_at = self
            .registry
            .cache
            .get(&owner)
            .map_or(0, |c| c.record.expires_at);
        let lifetime = Duration::from_millis(expires_at.saturating_sub(unix_ms()));
        let record = kad::Record {
            expires: Some(Instant::now() + lifetime),
            ..record
        };
        if let Some(dht) = self.swarm.behaviour_mut().dht.as_mut()
            && let Err(e) = dht.kad_mut().store_mut().put(record)
        {
            tracing::debug!(%owner, error = %e, "verified record not stored in the DHT");
        }
    }

    /// Kademlia events that concern records and lookups.
    pub(super) fn on_registry_kad(&mut self, event: kad::Event) {
        match event {
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::PutRecord {
                        source,
                        record: Some(record),
                        ..
                    },
            } => self.on_inbound_put(source, record),
            kad::Event::OutboundQueryProgressed {
                id, result, step, ..
            } => {
                if let Some(key) = self.registry.walks.get(&id).cloned() {
                    self.on_walk_progress(&key, result);
                    if step.last {
                        self.registry.walks.remove(&id);
                        self.on_walk_done(&key);
                    }
                } else if let Some(owner) = self.registry.fetches.get(&id).copied() {
                    let got_valid = self.on_fetch_progress(owner, result);
                    if got_valid {
                        // One newer verified answer will do; stop asking.
                        if let Some(dht) = self.swarm.behaviour_mut().dht.as_mut()
                            && let Some(mut query) = dht.kad_mut().query_mut(&id)
                        {
                            query.finish();
                        }
                    }
                    if step.last || got_valid {
                        self.on_fetch_done(owner);
                    }
                    if step.last {
                        self.registry.fetches.remove(&id);
                        self.fetch_next();
                    }
                }
            }
            _ => {}
        }
    }

    fn on_walk_progress(&mut self, key: &RecordKey, result: QueryResult) {
        let QueryResult::GetProviders(Ok(kad::GetProvidersOk::FoundProviders {
            providers, ..
        })) = result
        else {
            return;
        };
        let me = *self.swarm.local_peer_id();
        let now = unix_ms();
        let refresh_ms = u64::try_from(self.registry.refresh_interval.as_millis()).unwrap_or(0);
        for provider in providers.into_iter().take(MAX_PROVIDERS_PER_WALK) {
            if provider == me {
                continue;
            }
            // A record we hold that is not past its owner's refresh is current.
            let current = self
                .registry
                .cache
                .get(&provider)
                .is_some_and(|c| c.record.issued_at.saturating_add(refresh_ms) > now);
            if current {
                continue;
            }
            let pending = self.registry.fetch_queued.contains(&provider)
                || self.registry.fetches.values().any(|p| *p == provider);
            if !pending {
                if self.registry.fetch_queue.len() >= MAX_FETCH_QUEUE {
                    continue;
                }
                self.registry.fetch_queue.push_back(provider);
                self.registry.fetch_queued.insert(provider);
                self.fetch_next();
            }
            for lookup in self.registry.lookups.iter_mut().filter(|l| l.key == *key) {
                lookup.outstanding.insert(provider);
            }
        }
    }

    /// Start queued fetches while fewer than `MAX_CONCURRENT_FETCHES` run.
    fn fetch_next(&mut self) {
        while self.registry.fetches.len() < MAX_CONCURRENT_FETCHES {
            let Some(provider) = self.registry.fetch_queue.pop_front() else {
                return;
            };
            self.registry.fetch_queued.remove(&provider);
            let Some(dht) = self.swarm.behaviour_mut().dht.as_mut() else {
                return;
            };
            let id = dht.kad_mut().get_record(node_record_key(&provider));
            self.registry.fetches.insert(id, provider);
        }
    }

    fn on_walk_done(&mut self, key: &RecordKey) {
        if self.registry.walked_at.len() >= MAX_WALKED_KEYS {
            let fresh = self.registry.lookup_cache_fresh;
            self.registry.walked_at.retain(|_, at| at.elapsed() < fresh);
        }
        if self.registry.walked_at.len() < MAX_WALKED_KEYS {
            self.registry.walked_at.insert(key.clone(), Instant::now());
        }
        for lookup in self.registry.lookups.iter_mut().filter(|l| l.key == *key) {
            lookup.walk_done = true;
        }
        self.answer_lookups(false);
    }

    /// Returns whether a record newer than the one held arrived.
    fn on_fetch_progress(&mut self, owner: PeerId, result: QueryResult) -> bool {
        let QueryResult::GetRecord(Ok(GetRecordOk::FoundRecord(found))) = result else {
            return false;
        };
        if found.record.key != node_record_key(&owner) {
            return false;
        }
        matches!(
            self.accept_record(owner, &found.record.value, RecordVia::Get, found.peer, None),
            Ok(Accepted::Stored { .. })
        )
    }

    fn on_fetch_done(&mut self, owner: PeerId) {
        for lookup in &mut self.registry.lookups {
            lookup.outstanding.remove(&owner);
        }
        self.answer_lookups(false);
    }

    /// A gossiped record: verified like any other before gossipsub may
    /// forward it.
    pub(super) fn on_gossip(&mut self, event: gossipsub::Event) {
        match event {
            gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            } => {
                let acceptance = match message.source {
                    Some(author) => {
                        match self.accept_record(
                            author,
                            &message.data,
                            RecordVia::Gossip,
                            Some(author),
                            None,
                        ) {
                            Ok(Accepted::Stored { .. }) => MessageAcceptance::Accept,
                            Ok(Accepted::Unchanged) | Err(RejectReason::StaleSequence { .. }) => {
                                MessageAcceptance::Ignore
                            }
                            Err(_) => MessageAcceptance::Reject,
                        }
                    }
                    None => MessageAcceptance::Reject,
                };
                if let Some(gossip) = self.swarm.behaviour_mut().gossip.as_mut() {
                    gossip.report_message_validation_result(
                        &message_id,
                        &propagation_source,
                        acceptance,
                    );
                }
            }
            gossipsub::Event::Subscribed { peer_id, .. } => {
                tracing::debug!(%peer_id, "peer subscribed to service records");
                if self.registry.own.is_some() && self.registry.gossip_republish_at.is_none() {
                    let earliest = self
                        .registry
                        .gossip_republished
                        .map_or(Instant::now(), |at| at + GOSSIP_REPUBLISH_MIN_INTERVAL);
                    self.registry.gossip_republish_at =
                        Some(earliest.max(Instant::now() + GOSSIP_REPUBLISH_DEBOUNCE));
                }
            }
            _ => {}
        }
    }

    /// Timers: lookup deadlines and the gossip re-publication.
    pub(super) fn on_registry_deadline(&mut self) {
        if self
            .registry
            .gossip_republish_at
            .is_some_and(|at| at <= Instant::now())
        {
            self.registry.gossip_republish_at = None;
            self.registry.gossip_republished = Some(Instant::now());
            if let Some((envelope, _)) = self.registry.own.clone() {
                self.gossip_publish(envelope);
            }
        }
        self.answer_lookups(false);
    }

    /// Drop expired records (their services leave every answer at once;
    /// this tells subscribers).
    pub(super) fn expire_records(&mut self) {
        let gone = self.registry.cache.expire(unix_ms());
        if gone.is_empty() {
            return;
        }
        let peers: HashSet<PeerId> = gone.iter().map(|c| c.peer).collect();
        for peer in peers {
            if self.registry.cache.get(&peer).is_none() {
                self.registry.peer_health.remove(&peer);
                self.registry.service_health.retain(|(p, _), _| *p != peer);
            }
        }
        for change in gone {
            self.emit(change_event(change, false));
        }
        self.update_service_gauges();
    }

    // ----- lookups ----------------------------------------------------------

    /// Answer `query` from the verified cache at once when it has matching
    /// services or a walk for the key finished within `lookup_cache_fresh`,
    /// walking again in the background when the last walk is older than
    /// `REVALIDATE_AFTER`; only when the cache has nothing and no fresh walk
    /// does the answer wait for the DHT walk (at most `lookup_timeout`).
    pub(super) fn find_services(
        &mut self,
        query: ServiceQuery,
        reply: oneshot::Sender<Vec<RankedService>>,
    ) {
        let key = lookup_key(&query);
        let age = self.registry.walked_at.get(&key).map(Instant::elapsed);
        let fresh = age.is_some_and(|a| a < self.registry.lookup_cache_fresh);
        let revalidate_after = REVALIDATE_AFTER.min(self.registry.lookup_cache_fresh);
        let answer = self.rank(&query);
        if self.swarm.behaviour().dht.as_ref().is_none()
            || fresh
            || !answer.is_empty()
            || self.registry.lookups.len() >= MAX_PENDING_LOOKUPS
        {
            if age.is_none_or(|a| a >= revalidate_after) {
                self.start_walk(&key);
            }
            self.metrics.lookup_answered("cache");
            let _ = reply.send(answer);
            return;
        }
        self.start_walk(&key);
        self.registry.lookups.push(PendingLookup {
            key,
            query,
            reply,
            deadline: Instant::now() + self.registry.lookup_timeout,
            walk_done: false,
            outstanding: HashSet::new(),
        });
    }

    fn start_walk(&mut self, key: &RecordKey) {
        if self.registry.walks.values().any(|k| k == key) {
            return;
        }
        if let Some(dht) = self.swarm.behaviour_mut().dht.as_mut() {
            let id = dht.kad_mut().get_providers(key.clone());
            self.registry.walks.insert(id, key.clone());
        }
    }

    /// Answer every lookup whose record fetches are done and whose walk is
    /// done or already found a match, or whose deadline passed (with what
    /// it has); `all` answers every one (shutdown).
    pub(super) fn answer_lookups(&mut self, all: bool) {
        let now = Instant::now();
        let mut waiting = Vec::new();
        for lookup in std::mem::take(&mut self.registry.lookups) {
            let settled = lookup.outstanding.is_empty();
            // With no fetch in flight, a lookup answers once the walk is
            // done or, before that, as soon as a verified record matches:
            // the walk goes on and later lookups see what else it finds.
            let answer = (all || settled || lookup.deadline <= now)
                .then(|| self.rank(&lookup.query))
                .filter(|answer| {
                    all || lookup.deadline <= now || lookup.walk_done || !answer.is_empty()
                });
            match answer {
                Some(answer) => {
                    let label = match (settled, lookup.walk_done) {
                        (true, true) => "walk",
                        (true, false) if !answer.is_empty() => "first_match",
                        _ => "deadline",
                    };
                    self.metrics.lookup_answered(label);
                    let _ = lookup.reply.send(answer);
                }
                None => waiting.push(lookup),
            }
        }
        self.registry.lookups = waiting;
    }

    /// Every matching service we know — ours and those of unexpired
    /// verified records — scored on what we measured, best first.
    fn rank(&self, query: &ServiceQuery) -> Vec<RankedService> {
        let now = unix_ms();
        let me = *self.swarm.local_peer_id();
        let state = &self.registry;
        let mut candidates = Vec::new();
        for service in state.local.iter() {
            let health = state.service_health.get(&(me, service.id.clone()));
            candidates.push(Candidate {
                service: service.clone(),
                region: state.region.clone(),
                inputs: QualityInputs {
                    measured_rtt: Some(Duration::ZERO),
                    measured_reliability: health.and_then(|h| h.window.ratio()),
                    advertised_reliability: service.reliability,
                    advertised_throughput: service.throughput,
                    since_last_good_check: health
                        .map_or(Some(Duration::ZERO), |h| since(h.last_good_ms, now)),
                    ..QualityInputs::default()
                },
                local: true,
            });
        }
        for (peer, cached) in state.cache.iter() {
            let record = &cached.record;
            if record.expires_at <= now {
                continue;
            }
            let peer_health = state.peer_health.get(peer);
            let entry = self.peers.get(peer);
            let rtt = entry.and_then(super::PeerEntry::rtt);
            let rtt_via_relay = entry.is_some_and(super::PeerEntry::rtt_via_relay);
            for service in &record.services {
                let service_health = state.service_health.get(&(*peer, service.id.clone()));
                // A service with its own probe is judged by it; else by its node's.
                let health = service_health.or(peer_health);
                candidates.push(Candidate {
                    service: service.clone(),
                    region: record.region.clone(),
                    inputs: QualityInputs {
                        measured_rtt: rtt,
                        rtt_via_relay,
                        advertised_latency_ms: service.latency_ms,
                        measured_reliability: health.and_then(|h| h.window.ratio()),
                        advertised_reliability: service.reliability,
                        advertised_throughput: service.throughput,
                        since_last_good_check: health.and_then(|h| since(h.last_good_ms, now)),
                    },
                    local: false,
                });
            }
        }
        rank_services(candidates, query, &state.weights)
    }

    // ----- health -----------------------------------------------------------

    /// Check every node we hold services of (connection and ping; dial it
    /// when not connected) and probe every `health_check_url` we may.
    pub(super) fn run_health_checks(&mut self) {
        let peers: Vec<PeerId> = self.registry.cache.iter().map(|(p, _)| *p).collect();
        for peer in peers {
            self.check_peer(peer);
        }
        let me = *self.swarm.local_peer_id();
        let mut probes: Vec<(PeerId, String, String)> = self
            .registry
            .local
            .iter()
            .filter_map(|s| Some((me, s.id.clone(), s.health_check_url.clone()?)))
            .collect();
        // Local services without a URL are up while the node is.
        let now = unix_ms();
        let unprobed: Vec<String> = self
            .registry
            .local
            .iter()
            .filter(|s| s.health_check_url.is_none())
            .map(|s| s.id.clone())
            .collect();
        for id in unprobed {
            self.registry
                .service_health
                .entry((me, id))
                .or_default()
                .record(true, now);
        }
        for (peer, cached) in self.registry.cache.iter() {
            let hosts = self.peer_hosts(peer);
            for service in &cached.record.services {
                if let Some(url) = &service.health_check_url
                    && url_host(url).is_some_and(|h| hosts.contains(&h))
                {
                    probes.push((*peer, service.id.clone(), url.clone()));
                }
            }
        }
        for (peer, service_id, url) in probes {
            if self.registry.probes_in_flight >= MAX_CONCURRENT_PROBES {
                break;
            }
            self.registry.probes_in_flight += 1;
            let tx = self.registry.probe_tx.clone();
            tokio::spawn(async move {
                let ok = http_probe(&url).await;
                let _ = tx
                    .send(ProbeResult {
                        peer,
                        service_id,
                        ok,
                    })
                    .await;
            });
        }
    }

    /// IP addresses the peer is connected from: a peer's health URL is
    /// probed only on its own machine, never on an address it merely names.
    fn peer_hosts(&self, peer: &PeerId) -> HashSet<String> {
        self.connections
            .values()
            .filter(|c| c.peer == *peer)
            // Over a relay the address is the relay's, not the peer's.
            .filter(|c| !c.remote.iter().any(|p| matches!(p, Protocol::P2pCircuit)))
            .flat_map(|c| c.remote.iter())
            .filter_map(|p| match p {
                Protocol::Ip4(ip) => Some(ip.to_string()),
                Protocol::Ip6(ip) => Some(ip.to_string()),
                _ => None,
            })
            .collect()
    }

    pub(super) fn on_probe_result(&mut self, result: ProbeResult) {
        self.registry.probes_in_flight = self.registry.probes_in_flight.saturating_sub(1);
        let me = *self.swarm.local_peer_id();
        let now = unix_ms();
        let known = if result.peer == me {
            self.registry.local.get(&result.service_id).is_some()
        } else {
            self.registry.cache.get(&result.peer).is_some()
        };
        if !known {
            return;
        }
        if result.peer == me && result.ok {
            self.registry
                .local
                .set_last_health_check(&result.service_id, now);
        }
        self.registry
            .service_health
            .entry((result.peer, result.service_id))
            .or_default()
            .record(result.ok, now);
    }

    /// One liveness check of a peer: connected (ping keeps it honest) is
    /// good; otherwise dial it, and the dial's outcome counts. Whether it
    /// has spare capacity plays no part.
    fn check_peer(&mut self, peer: PeerId) {
        let now = unix_ms();
        if self.swarm.is_connected(&peer) {
            self.registry
                .peer_health
                .entry(peer)
                .or_default()
                .record(true, now);
            return;
        }
        // By peer id: the DHT and identify know its addresses. From its own
        // record only a few that name it, so a record cannot make every
        // node connect to addresses of a third party.
        let addresses: Vec<Multiaddr> = self
            .registry
            .cache
            .get(&peer)
            .into_iter()
            .flat_map(|c| c.record.services.iter())
            .flat_map(|s| s.addresses.iter())
            .filter_map(|a| a.parse::<Multiaddr>().ok())
            .filter(|a| matches!(a.iter().last(), Some(Protocol::P2p(p)) if p == peer))
            .filter(|a| self.usable_remote(a))
            .collect::<HashSet<_>>()
            .into_iter()
            .take(MAX_HEALTH_DIAL_ADDRESSES)
            .collect();
        let opts = DialOpts::peer_id(peer)
            .addresses(addresses)
            .extend_addresses_through_behaviour()
            // Not blocked by a dial already under way: discovery may be
            // stuck on an address that never answers (a LAN address behind
            // another NAT) while this dial has the relay address.
            .condition(PeerCondition::Disconnected)
            .build();
        let id = opts.connection_id();
        match self.swarm.dial(opts) {
            Ok(()) => {
                self.registry.health_dials.insert(id, peer);
            }
            Err(libp2p::swarm::DialError::DialPeerConditionFalse(_)) => {}
            Err(e) => {
                tracing::debug!(%peer, error = %e, "health check cannot dial");
                self.registry
                    .peer_health
                    .entry(peer)
                    .or_default()
                    .record(false, now);
            }
        }
    }

    /// A health-check dial finished.
    pub(super) fn on_health_dial(&mut self, connection: ConnectionId, ok: bool) {
        if let Some(peer) = self.registry.health_dials.remove(&connection) {
            self.registry
                .peer_health
                .entry(peer)
                .or_default()
                .record(ok, unix_ms());
        }
    }
}

fn since(at_ms: Option<u64>, now_ms: u64) -> Option<Duration> {
    at_ms.map(|at| Duration::from_millis(now_ms.saturating_sub(at)))
}

/// The host of an `http://host[:port]/…` URL (brackets of IPv6 removed).
fn url_host(url: &str) -> Option<String> {
    let rest = url.strip_prefix("http://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let authority = authority.rsplit('@').next()?;
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().map(str::to_owned);
    }
    authority.split(':').next().map(str::to_owned)
}

/// GET `url`; healthy when it answers 2xx within `HTTP_PROBE_TIMEOUT`.
async fn http_probe(url: &str) -> bool {
    let Ok(uri) = url.parse::<axum::http::Uri>() else {
        return false;
    };
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        ollamacron_http::http_client();
    match tokio::time::timeout(HTTP_PROBE_TIMEOUT, client.get(uri)).await {
        Ok(Ok(response)) => response.status().is_success(),
        Ok(Err(e)) => {
            tracing::debug!(%url, error = %e, "health probe failed");
            false
        }
        Err(_) => {
            tracing::debug!(%url, "health probe timed out");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configured_weights_default_to_the_scorers() {
        let w = ollamacron_config::ScoreWeightsConfig::default();
        let d = ScoreWeights::default();
        assert_eq!(
            [w.reliability, w.latency, w.throughput, w.availability],
            [d.reliability, d.latency, d.throughput, d.availability]
        );
    }

    #[test]
    fn url_hosts() {
        assert_eq!(
            url_host("http://127.0.0.1:8080/health").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(url_host("http://[::1]:80/").as_deref(), Some("::1"));
        assert_eq!(
            url_host("http://user@10.0.0.1/x").as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(
            url_host("http://example.org").as_deref(),
            Some("example.org")
        );
        assert_eq!(url_host("https://example.org"), None);
    }

    #[test]
    fn lookups_walk_the_most_specific_key() {
        let by_type = ServiceQuery {
            service_type: Some("llm".into()),
            capabilities: vec!["vision".into()],
            ..ServiceQuery::default()
        };
        assert_eq!(lookup_key(&by_type), service_type_key("llm"));
        let by_capability = ServiceQuery {
            capabilities: vec!["vision".into()],
            ..ServiceQuery::default()
        };
        assert_eq!(lookup_key(&by_capability), capability_key("vision"));
        assert_eq!(lookup_key(&ServiceQuery::default()), namespace_key());
    }
}
