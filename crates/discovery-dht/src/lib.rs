#![doc = include_str!("../README.md")]

mod keys;
mod store;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::kad::store::MemoryStoreConfig;
use libp2p::kad::store::RecordStore;
use libp2p::kad::{self, GetClosestPeersOk, GetProvidersOk, QueryId, QueryResult, RecordKey};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{PeerId, StreamProtocol};
use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep};

pub use keys::{
    NAMESPACE, capability_key, namespace_key, node_record_key, node_record_peer, provider_key,
    service_type_key,
};
pub use store::DhtStore;

/// The Kademlia protocol of the private Ollamacron DHT (never the IPFS one).
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/ollamacron/kad/1.0.0");

/// After the routing table grows, wait this long for more peers before
/// re-advertising, so a burst of new peers costs one announcement.
const READVERTISE_DEBOUNCE: Duration = Duration::from_millis(150);
/// Delay of the first lookup after a refresh; later ones double.
const FIRST_FOLLOW_UP_LOOKUP: Duration = Duration::from_millis(250);
/// Room for framing around the largest record value in one Kademlia message.
const PACKET_OVERHEAD_BYTES: usize = 16 * 1024;
/// Most addresses kept for one peer (provider records, the routing copy).
pub const MAX_ADDRESSES_PER_PEER: usize = 8;
/// Most namespace providers remembered for de-duplicating `ProviderFound`.
const MAX_TRACKED_PROVIDERS: usize = 100_000;
/// Most walks for providers' addresses at once.
const MAX_ADDRESS_QUERIES: usize = 4;
/// Provider records we store for others live this many provide intervals:
/// a provider that stops re-announcing is forgotten after missing two.
const PROVIDER_TTL_INTERVALS: u32 = 3;

/// Whether this node answers DHT queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DhtMode {
    /// Answer queries and store records (publicly reachable or on a LAN).
    Server,
    /// Only ask (behind NAT).
    Client,
}

/// How the DHT is run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhtConfig {
    /// Server or client mode.
    pub mode: DhtMode,
    /// Interval of Kademlia bootstrap (routing table refresh).
    pub bootstrap_interval: Duration,
    /// Interval of re-announcing the namespace provider record.
    pub provide_interval: Duration,
    /// Interval of looking up the namespace's providers.
    pub discovery_interval: Duration,
    /// Longest a query may run.
    pub query_timeout: Duration,
    /// Most records the local store holds.
    pub max_records: usize,
    /// Most providers the local store keeps per key.
    pub max_providers_per_key: usize,
    /// Largest record value accepted.
    pub max_value_bytes: usize,
    /// Longest a stored record lives when it comes without an expiry.
    pub max_record_ttl: Duration,
    /// Announce this node as a provider of the namespace.
    pub advertise_namespace: bool,
}

impl Default for DhtConfig {
    fn default() -> Self {
        Self {
            mode: DhtMode::Server,
            bootstrap_interval: Duration::from_secs(300),
            provide_interval: Duration::from_secs(300),
            discovery_interval: Duration::from_secs(30),
            query_timeout: Duration::from_secs(30),
            max_records: 1024,
            max_providers_per_key: 256,
            max_value_bytes: 64 * 1024,
            max_record_ttl: Duration::from_secs(3600),
            advertise_namespace: true,
        }
    }
}

/// What the DHT learned.
#[derive(Debug)]
pub enum DhtEvent {
    /// A provider of the namespace, reported once per peer.
    ProviderFound {
        /// The provider.
        peer: PeerId,
        /// Its addresses, when the routing table has them.
        addresses: Vec<Multiaddr>,
    },
    /// Addresses of a provider learned by a lookup of the peer.
    PeerAddresses {
        /// The peer.
        peer: PeerId,
        /// Its addresses.
        addresses: Vec<Multiaddr>,
    },
    /// A peer entered (or changed in) the routing table.
    RoutingUpdated {
        /// The peer.
        peer: PeerId,
        /// Its addresses in the table.
        addresses: Vec<Multiaddr>,
        /// Whether it is new to the table.
        is_new_peer: bool,
    },
    /// A bootstrap finished.
    BootstrapFinished {
        /// Whether it reached any peer.
        ok: bool,
        /// Peers in the routing table afterwards.
        routing_table_size: usize,
    },
    /// The namespace provider announcement finished.
    Advertised {
        /// Whether it was stored on at least one peer.
        ok: bool,
    },
    /// A [`Behaviour::publish_record`] put finished.
    RecordPublished {
        /// The record's key.
        key: RecordKey,
        /// Whether at least one peer stored it.
        ok: bool,
    },
    /// The Kademlia mode changed.
    ModeChanged {
        /// The new mode.
        mode: kad::Mode,
    },
    /// Any other Kademlia event (results of queries started through
    /// [`Behaviour::kad_mut`], inbound requests, …).
    Kad(Box<kad::Event>),
}

/// Kademlia on [`KAD_PROTOCOL`] with a bounded memory store, plus the
/// timers that advertise the node under the namespace key and look up the
/// other providers. Add it to your own `#[derive(NetworkBehaviour)]`.
pub struct Behaviour {
    kad: kad::Behaviour<DhtStore>,
    config: DhtConfig,
    local_peer: PeerId,
    namespace: RecordKey,
    provide_tick: Interval,
    /// Our own periodic bootstrap: Kademlia's warns every time it fires on
    /// an empty routing table, which a lone node's log does not need.
    bootstrap_tick: Interval,
    /// Next namespace lookup; lookups run at growing intervals (`ramp`)
    /// after the routing table changes, up to `discovery_interval`.
    discovery_timer: Pin<Box<Sleep>>,
    ramp: Duration,
    readvertise: Pin<Box<Sleep>>,
    readvertise_pending: bool,
    /// Routing table size at the last re-advertisement: the next one waits
    /// until the table has doubled, so a growing network costs log2(N)
    /// rounds of announcements, not one per new peer.
    advertised_at_size: usize,
    /// In-flight announcements, by key: one per key at a time.
    provide_queries: HashMap<QueryId, RecordKey>,
    /// Keys announced besides the namespace (service types, capabilities).
    provided_keys: HashSet<RecordKey>,
    /// The record re-put on every refresh, and its in-flight put.
    own_record: Option<kad::Record>,
    record_query: Option<QueryId>,
    /// The own record changed while its put was running.
    record_outdated: bool,
    /// Direct pushes of the own record to connected peers, in flight.
    push_queries: HashSet<QueryId>,
    /// Peers with at least one open connection.
    connected: HashSet<PeerId>,
    /// Connected peers that have the current version of our record.
    pushed: HashSet<PeerId>,
    discovery_queries: HashSet<QueryId>,
    address_queries: HashMap<QueryId, PeerId>,
    bootstrap_reported: bool,
    routing: HashMap<PeerId, Vec<Multiaddr>>,
    providers: HashSet<PeerId>,
    events: VecDeque<DhtEvent>,
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Behaviour")
            .field("config", &self.config)
            .field("routing_table_size", &self.routing.len())
            .field("providers", &self.providers.len())
            .finish_non_exhaustive()
    }
}

impl Behaviour {
    /// The DHT of `local_peer`. Must be created inside a tokio runtime.
    #[must_use]
    pub fn new(local_peer: PeerId, config: DhtConfig) -> Self {
        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        kad_config
            .set_query_timeout(config.query_timeout)
            .set_max_packet_size(config.max_value_bytes + PACKET_OVERHEAD_BYTES)
            .set_periodic_bootstrap_interval(None)
            // Inbound records and provider announcements come to us first:
            // we see who announces the namespace the moment they do, and an
            // inbound record is stored only by whoever verifies it (it
            // reaches the user as `DhtEvent::Kad`, never the store).
            // Re-announcing is ours (`provide_interval`), not Kademlia's.
            .set_record_filtering(kad::StoreInserts::FilterBoth)
            .set_provider_publication_interval(None)
            .set_provider_record_ttl(Some(
                config
                    .provide_interval
                    .saturating_mul(PROVIDER_TTL_INTERVALS),
            ))
            // Our own record is re-put by `publish_record` and every refresh.
            .set_publication_interval(None)
            .set_record_ttl(Some(config.max_record_ttl));
        let store = DhtStore::new(
            local_peer,
            MemoryStoreConfig {
                max_records: config.max_records,
                max_value_bytes: config.max_value_bytes,
                max_providers_per_key: config.max_providers_per_key,
                max_provided_keys: config.max_records,
            },
        );
        let mut kad = kad::Behaviour::with_config(local_peer, store, kad_config);
        kad.set_mode(Some(match config.mode {
            DhtMode::Server => kad::Mode::Server,
            DhtMode::Client => kad::Mode::Client,
        }));
        // Store our own provider record at once, so a peer that asks us
        // directly finds us even before the routing table fills.
        let mut provide_queries = HashMap::new();
        if config.advertise_namespace {
            match kad.start_providing(namespace_key()) {
                Ok(id) => {
                    provide_queries.insert(id, namespace_key());
                }
                Err(e) => tracing::warn!(error = %e, "cannot store the namespace provider record"),
            }
        }
        let now = Instant::now();
        let discovery_interval = config.discovery_interval;
        let mut provide_tick =
            tokio::time::interval_at(now + config.provide_interval, config.provide_interval);
        provide_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut bootstrap_tick =
            tokio::time::interval_at(now + config.bootstrap_interval, config.bootstrap_interval);
        bootstrap_tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        Self {
            kad,
            config,
            local_peer,
            namespace: namespace_key(),
            provide_tick,
            bootstrap_tick,
            discovery_timer: Box::pin(tokio::time::sleep_until(now + discovery_interval)),
            ramp: discovery_interval,
            readvertise: Box::pin(tokio::time::sleep_until(now)),
            readvertise_pending: false,
            advertised_at_size: 0,
            provide_queries,
            provided_keys: HashSet::new(),
            own_record: None,
            record_query: None,
            record_outdated: false,
            push_queries: HashSet::new(),
            connected: HashSet::new(),
            pushed: HashSet::new(),
            discovery_queries: HashSet::new(),
            address_queries: HashMap::new(),
            bootstrap_reported: false,
            routing: HashMap::new(),
            providers: HashSet::new(),
            events: VecDeque::new(),
        }
    }

    /// The Kademlia behaviour, for queries of your own (records, other keys).
    pub fn kad_mut(&mut self) -> &mut kad::Behaviour<DhtStore> {
        &mut self.kad
    }

    /// The mode Kademlia runs in now.
    #[must_use]
    pub fn mode(&self) -> DhtMode {
        self.config.mode
    }

    /// Switch between server and client mode.
    pub fn set_mode(&mut self, mode: DhtMode) {
        self.config.mode = mode;
        self.kad.set_mode(Some(match mode {
            DhtMode::Server => kad::Mode::Server,
            DhtMode::Client => kad::Mode::Client,
        }));
    }

    /// Peers in the routing table.
    #[must_use]
    pub fn routing_table_size(&self) -> usize {
        self.routing.len()
    }

    /// Providers of the namespace found so far.
    #[must_use]
    pub fn providers(&self) -> &HashSet<PeerId> {
        &self.providers
    }

    /// Tell the DHT where a peer that speaks [`KAD_PROTOCOL`] listens (from
    /// identify, mDNS or a bootstrap address). Addresses of peers that do
    /// not speak it are ignored by the caller, not here.
    pub fn add_address(&mut self, peer: &PeerId, address: Multiaddr) {
        self.kad.add_address(peer, address);
    }

    /// A connected peer was confirmed to speak [`KAD_PROTOCOL`] (identify):
    /// give it our record now, without waiting for the routing table.
    pub fn peer_speaks_dht(&mut self, peer: PeerId) {
        if self.connected.contains(&peer) {
            self.push_own_record(vec![peer]);
        }
    }

    /// Announce the namespace and look up its providers now, and start a
    /// bootstrap if the routing table has peers. Called on start and by the
    /// debounce after the routing table grows.
    pub fn refresh_now(&mut self) {
        if self.routing.is_empty() {
            return;
        }
        self.advertised_at_size = self.routing.len();
        self.advertise();
        self.discover();
        // Look again soon, then less and less often: peers that joined just
        // after us are found within a second, and a quiet network costs one
        // lookup per `discovery_interval`.
        self.look_again_soon();
    }

    /// Announce the namespace (when configured) and every provided key,
    /// and re-put the own record. One query per key at a time: a burst of
    /// triggers costs one walk each.
    fn advertise(&mut self) {
        let mut keys: Vec<RecordKey> = self.provided_keys.iter().cloned().collect();
        if self.config.advertise_namespace {
            keys.push(self.namespace.clone());
        }
        for key in keys {
            self.provide(key);
        }
        self.put_own_record();
    }

    fn provide(&mut self, key: RecordKey) {
        if self.provide_queries.values().any(|k| *k == key) {
            return;
        }
        match self.kad.start_providing(key.clone()) {
            Ok(id) => {
                self.provide_queries.insert(id, key);
            }
            Err(e) => tracing::warn!(error = %e, "cannot store a provider record"),
        }
    }

    /// PUT the own record to `peers` directly (not a walk).
    fn push_own_record(&mut self, peers: Vec<PeerId>) {
        let Some(record) = self.own_record.clone() else {
            return;
        };
        // Each connected peer gets each version of the record once.
        let peers: Vec<PeerId> = peers
            .into_iter()
            .filter(|p| self.pushed.insert(*p))
            .collect();
        if peers.is_empty() {
            return;
        }
        tracing::debug!(?peers, "pushing our record");
        let id = self
            .kad
            .put_record_to(record, peers.into_iter(), kad::Quorum::One);
        self.push_queries.insert(id);
    }

    fn put_own_record(&mut self) {
        let Some(record) = self.own_record.clone() else {
            return;
        };
        if self.record_query.is_some() {
            return;
        }
        match self.kad.put_record(record, kad::Quorum::One) {
            Ok(id) => self.record_query = Some(id),
            Err(e) => tracing::warn!(error = %e, "cannot store our own record"),
        }
    }

    /// Provide exactly `keys` besides the namespace: announce new ones now
    /// (and on every refresh), stop providing the ones no longer listed.
    pub fn set_provided_keys(&mut self, keys: HashSet<RecordKey>) {
        let gone: Vec<RecordKey> = self.provided_keys.difference(&keys).cloned().collect();
        for key in gone {
            self.kad.stop_providing(&key);
        }
        let new: Vec<RecordKey> = keys.difference(&self.provided_keys).cloned().collect();
        self.provided_keys = keys;
        for key in new {
            self.provide(key);
        }
    }

    /// Store `record` (our own) locally and on the peers closest to its
    /// key now, and again whenever the routing table grows and every
    /// `provide_interval`, until replaced. A put still running is not
    /// interrupted; its successor starts at the next refresh.
    ///
    /// Besides the closest peers, every connected peer of the routing table
    /// gets the record directly now, and every peer that joins the routing
    /// table later gets it when it does: in a small mesh every node holds
    /// every record without a lookup.
    pub fn publish_record(&mut self, record: kad::Record) {
        self.own_record = Some(record.clone());
        self.pushed.clear();
        let connected: Vec<PeerId> = self
            .routing
            .keys()
            .filter(|p| self.connected.contains(p))
            .copied()
            .collect();
        self.push_own_record(connected);
        if self.record_query.is_some() {
            // Store the newest one locally at once; peers get it as soon
            // as the running put finishes.
            if let Err(e) = self.kad.store_mut().put(record) {
                tracing::warn!(error = %e, "cannot store our own record");
            }
            self.record_outdated = true;
            return;
        }
        self.put_own_record();
    }

    fn discover(&mut self) {
        // One lookup at a time: triggers during a lookup are served by it.
        if !self.discovery_queries.is_empty() {
            return;
        }
        let id = self.kad.get_providers(self.namespace.clone());
        self.discovery_queries.insert(id);
    }

    fn addresses_of(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.routing.get(peer).cloned().unwrap_or_default()
    }

    fn on_providers(&mut self, providers: HashSet<PeerId>) {
        for peer in providers {
            if peer == self.local_peer || self.providers.contains(&peer) {
                continue;
            }
            if self.providers.len() < MAX_TRACKED_PROVIDERS {
                self.providers.insert(peer);
            }
            let addresses = self.addresses_of(&peer);
            // Kademlia hands provider addresses to the swarm itself
            // (`NewExternalAddrOfPeer`); a walk for the peer is only worth
            // it when nothing is known and few such walks already run.
            if addresses.is_empty()
                && !self.connected.contains(&peer)
                && self.address_queries.len() < MAX_ADDRESS_QUERIES
            {
                let id = self.kad.get_closest_peers(peer);
                self.address_queries.insert(id, peer);
            }
            self.events
                .push_back(DhtEvent::ProviderFound { peer, addresses });
        }
    }

    /// Handle a Kademlia event; `Some` if it should go to the user as is.
    fn on_kad_event(&mut self, event: kad::Event) -> Option<DhtEvent> {
        if let kad::Event::InboundRequest { request } = &event {
            let kind = match request {
                kad::InboundRequest::FindNode { .. } => "find_node",
                kad::InboundRequest::GetProvider { .. } => "get_providers",
                kad::InboundRequest::AddProvider { .. } => "add_provider",
                kad::InboundRequest::GetRecord { .. } => "get_record",
                kad::InboundRequest::PutRecord { .. } => "put_record",
            };
            tracing::trace!(kind, "inbound DHT request");
        }
        if let kad::Event::OutboundQueryProgressed {
            result,
            stats,
            step,
            ..
        } = &event
            && step.last
        {
            let kind = match result {
                QueryResult::Bootstrap(_) => "bootstrap",
                QueryResult::GetClosestPeers(_) => "get_closest_peers",
                QueryResult::GetProviders(_) => "get_providers",
                QueryResult::StartProviding(_) => "start_providing",
                QueryResult::RepublishProvider(_) => "republish_provider",
                QueryResult::GetRecord(_) => "get_record",
                QueryResult::PutRecord(_) => "put_record",
                QueryResult::RepublishRecord(_) => "republish_record",
            };
            tracing::trace!(
                query = kind,
                requests = stats.num_requests(),
                "DHT query finished"
            );
        }
        match event {
            kad::Event::RoutingUpdated {
                peer,
                is_new_peer,
                addresses,
                old_peer,
                ..
            } => {
                let mut addresses: Vec<Multiaddr> = addresses.into_vec();
                addresses.truncate(MAX_ADDRESSES_PER_PEER);
                if let Some(old) = old_peer {
                    self.routing.remove(&old);
                }
                self.routing.insert(peer, addresses.clone());
                if is_new_peer {
                    if self.connected.contains(&peer) {
                        self.push_own_record(vec![peer]);
                    }
                    if self.routing.len() == 1 {
                        // The first peer: walk towards ourselves to fill the table.
                        if let Err(e) = self.kad.bootstrap() {
                            tracing::debug!(error = %e, "cannot bootstrap the DHT");
                        }
                    }
                    if self.routing.len() >= self.advertised_at_size.saturating_mul(2) {
                        self.schedule_readvertise();
                    }
                }
                Some(DhtEvent::RoutingUpdated {
                    peer,
                    addresses,
                    is_new_peer,
                })
            }
            kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                stats,
            } => self.on_query_progressed(id, result, step, stats),
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::AddProvider {
                        record: Some(record),
                    },
            } => {
                let provider = record.provider;
                let namespace = record.key == self.namespace;
                if let Err(e) = self.kad.store_mut().add_provider(record) {
                    tracing::debug!(%provider, error = %e, "provider record not stored");
                    return None;
                }
                if namespace {
                    self.on_providers(HashSet::from([provider]));
                }
                None
            }
            kad::Event::ModeChanged { new_mode } => Some(DhtEvent::ModeChanged { mode: new_mode }),
            other => Some(DhtEvent::Kad(Box::new(other))),
        }
    }

    fn on_query_progressed(
        &mut self,
        id: QueryId,
        result: QueryResult,
        step: kad::ProgressStep,
        stats: kad::QueryStats,
    ) -> Option<DhtEvent> {
        if self.discovery_queries.contains(&id) {
            if let QueryResult::GetProviders(Ok(GetProvidersOk::FoundProviders {
                providers, ..
            })) = result
            {
                self.on_providers(providers);
            }
            if step.last {
                self.discovery_queries.remove(&id);
            }
            return None;
        }
        if self.provide_queries.contains_key(&id) {
            if !step.last {
                return None;
            }
            let key = self.provide_queries.remove(&id)?;
            let ok = matches!(result, QueryResult::StartProviding(Ok(_)));
            if key != self.namespace {
                tracing::debug!(ok, "announced a provider key");
                return None;
            }
            if !ok {
                tracing::debug!(?result, "namespace announcement did not complete");
            }
            return Some(DhtEvent::Advertised { ok });
        }
        if self.push_queries.contains(&id) {
            if let QueryResult::PutRecord(Err(e)) = &result {
                tracing::debug!(error = %e, "a direct push of our record failed");
            }
            if step.last {
                self.push_queries.remove(&id);
            }
            return None;
        }
        if self.record_query == Some(id) {
            if !step.last {
                return None;
            }
            self.record_query = None;
            if std::mem::take(&mut self.record_outdated) {
                self.put_own_record();
            }
            let (key, ok) = match result {
                QueryResult::PutRecord(Ok(kad::PutRecordOk { key })) => (key, true),
                QueryResult::PutRecord(Err(e)) => (e.key().clone(), false),
                _ => return None,
            };
            return Some(DhtEvent::RecordPublished { key, ok });
        }
        if let Some(wanted) = self.address_queries.get(&id).copied() {
            if step.last {
                self.address_queries.remove(&id);
            }
            let (QueryResult::GetClosestPeers(Ok(GetClosestPeersOk { peers, .. }))
            | QueryResult::GetClosestPeers(Err(kad::GetClosestPeersError::Timeout {
                peers,
                ..
            }))) = result
            else {
                return None;
            };
            return peers
                .into_iter()
                .find(|p| p.peer_id == wanted && !p.addrs.is_empty())
                .map(|p| DhtEvent::PeerAddresses {
                    peer: p.peer_id,
                    addresses: p.addrs,
                });
        }
        if let QueryResult::Bootstrap(bootstrap) = &result {
            let done = step.last
                || bootstrap.is_err()
                || matches!(bootstrap, Ok(ok) if ok.num_remaining == 0);
            if !done {
                return None;
            }
            let ok = bootstrap.is_ok();
            if ok && !self.bootstrap_reported {
                // The first successful bootstrap: advertise and look up at
                // once rather than at the next tick.
                self.bootstrap_reported = true;
                self.refresh_now();
            }
            return Some(DhtEvent::BootstrapFinished {
                ok,
                routing_table_size: self.routing.len(),
            });
        }
        Some(DhtEvent::Kad(Box::new(
            kad::Event::OutboundQueryProgressed {
                id,
                result,
                stats,
                step,
            },
        )))
    }

    /// Restart the lookup ramp: the next lookup in `FIRST_FOLLOW_UP_LOOKUP`
    /// (unless one is due sooner), then at doubling intervals.
    fn look_again_soon(&mut self) {
        let first = FIRST_FOLLOW_UP_LOOKUP.min(self.config.discovery_interval);
        let at = Instant::now() + first;
        self.ramp = first;
        if self.discovery_timer.deadline() > at {
            self.discovery_timer.as_mut().reset(at);
        }
    }

    fn schedule_readvertise(&mut self) {
        if !self.readvertise_pending {
            self.readvertise_pending = true;
            self.readvertise
                .as_mut()
                .reset(Instant::now() + READVERTISE_DEBOUNCE);
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = <kad::Behaviour<DhtStore> as NetworkBehaviour>::ConnectionHandler;
    type ToSwarm = DhtEvent;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        self.kad
            .handle_pending_inbound_connection(connection_id, local_addr, remote_addr)
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        local_addr: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.kad
            .handle_established_inbound_connection(connection_id, peer, local_addr, remote_addr)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        maybe_peer: Option<PeerId>,
        addresses: &[Multiaddr],
        effective_role: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        self.kad.handle_pending_outbound_connection(
            connection_id,
            maybe_peer,
            addresses,
            effective_role,
        )
    }

    fn handle_established_outbound_connection(
        &mut self,
        connection_id: ConnectionId,
        peer: PeerId,
        addr: &Multiaddr,
        role_override: Endpoint,
        port_use: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.kad.handle_established_outbound_connection(
            connection_id,
            peer,
            addr,
            role_override,
            port_use,
        )
    }

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        match &event {
            FromSwarm::ConnectionEstablished(e) => {
                self.connected.insert(e.peer_id);
                // A peer the routing table learned from a query, now
                // connected: it gets our record as a new peer would.
                if e.other_established == 0 && self.routing.contains_key(&e.peer_id) {
                    self.push_own_record(vec![e.peer_id]);
                }
            }
            FromSwarm::ConnectionClosed(e) if e.remaining_established == 0 => {
                self.connected.remove(&e.peer_id);
                self.pushed.remove(&e.peer_id);
            }
            _ => {}
        }
        if let FromSwarm::ConnectionEstablished(e) = &event
            && e.other_established == 0
            && e.peer_id != self.local_peer
            && !self.providers.contains(&e.peer_id)
        {
            // A peer we do not know as a provider connected: likely a node
            // that just joined and found us. Look for its announcement soon.
            self.look_again_soon();
        }
        self.kad.on_swarm_event(event);
    }

    fn on_connection_handler_event(
        &mut self,
        peer: PeerId,
        connection_id: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        self.kad
            .on_connection_handler_event(peer, connection_id, event);
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        loop {
            if let Some(event) = self.events.pop_front() {
                return Poll::Ready(ToSwarm::GenerateEvent(event));
            }
            if self.bootstrap_tick.poll_tick(cx).is_ready()
                && !self.routing.is_empty()
                && let Err(e) = self.kad.bootstrap()
            {
                tracing::debug!(error = %e, "cannot bootstrap the DHT");
            }
            if self.provide_tick.poll_tick(cx).is_ready() && !self.routing.is_empty() {
                self.advertise();
            }
            if self.discovery_timer.as_mut().poll(cx).is_ready() {
                if !self.routing.is_empty() {
                    self.discover();
                }
                self.ramp = self
                    .ramp
                    .saturating_mul(2)
                    .min(self.config.discovery_interval);
                self.discovery_timer
                    .as_mut()
                    .reset(Instant::now() + self.ramp);
                // Register the waker for the new deadline.
                let _ = self.discovery_timer.as_mut().poll(cx);
            }
            if self.readvertise_pending && self.readvertise.as_mut().poll(cx).is_ready() {
                self.readvertise_pending = false;
                self.refresh_now();
            }
            match self.kad.poll(cx) {
                Poll::Ready(ToSwarm::GenerateEvent(event)) => {
                    if let Some(out) = self.on_kad_event(event) {
                        self.events.push_back(out);
                    }
                }
                Poll::Ready(other) => {
                    // Proven invariant: generated events are matched above.
                    return Poll::Ready(
                        other.map_out(|_| unreachable!("Kademlia events are handled above")),
                    );
                }
                Poll::Pending => {
                    if self.events.is_empty() {
                        return Poll::Pending;
                    }
                }
            }
        }
    }
}
