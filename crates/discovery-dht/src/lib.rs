#![doc = include_str!("../README.md")]

mod config;
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
use libp2p::kad::{self, GetClosestPeersOk, GetProvidersOk, GetRecordOk, QueryResult};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm,
};
use libp2p::{PeerId, StreamProtocol};
use tokio::time::{Instant, Interval, MissedTickBehavior, Sleep};

pub use config::{Config, Mode};
pub use keys::provider_key;
pub use libp2p::kad::{QueryId, Record, RecordKey};
pub use store::DhtStore;

/// After the routing table grows, wait this long for more peers before
/// re-advertising, so a burst of new peers costs one announcement.
const READVERTISE_DEBOUNCE: Duration = Duration::from_millis(150);
/// The routing table must grow this many times over since the last
/// announcement before the exact keys are announced again (besides
/// `provide_interval`): a growing network costs log4(N) rounds.
const REANNOUNCE_GROWTH_FACTOR: usize = 4;
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
/// Most announcements (walks) at once; more keys wait their turn, so a
/// node with hundreds of models announces them at a bounded pace.
const MAX_CONCURRENT_PROVIDES: usize = 8;
/// Provider records we store for others live this many provide intervals:
/// a provider that stops re-announcing is forgotten after missing two.
const PROVIDER_TTL_INTERVALS: u32 = 3;
/// Most doublings of [`Config::announce_retry`] (then `provide_interval`
/// caps it anyway).
const MAX_RETRY_DOUBLINGS: u32 = 16;

/// What the DHT learned, and the results of the queries started with
/// [`Behaviour::get_providers`], [`Behaviour::get_record`],
/// [`Behaviour::put_record`] and [`Behaviour::put_record_to`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Event {
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
    /// The Kademlia mode changed.
    ModeChanged {
        /// The new mode.
        mode: Mode,
    },
    /// The DHT re-announced its keys (provide tick, [`Behaviour::refresh_now`],
    /// routing-table growth): a good moment to re-put the records you keep
    /// published.
    Advertising,
    /// Progress of a query started with [`Behaviour::get_providers`]: one
    /// per step that found providers. The providers may include the local
    /// peer when it provides the key itself.
    ProvidersFound {
        /// The query.
        query: QueryId,
        /// Providers found in this step.
        providers: HashSet<PeerId>,
        /// Requests the query had sent when this step came (a bound on
        /// the hops it took to get here: each hop is at least one).
        requests: u32,
    },
    /// A record found by a query started with [`Behaviour::get_record`].
    RecordFound {
        /// The query.
        query: QueryId,
        /// The record.
        record: Record,
        /// The peer that had it; `None` for the local store.
        peer: Option<PeerId>,
    },
    /// A query started with [`Behaviour::get_providers`],
    /// [`Behaviour::get_record`], [`Behaviour::put_record`] or
    /// [`Behaviour::put_record_to`] ended (its last step): exactly once per
    /// such query, after its `ProvidersFound` / `RecordFound`.
    QueryFinished {
        /// The query.
        query: QueryId,
        /// `get_providers`: finished without error (finding none is still
        /// ok). `get_record`: finished without error; finding nothing
        /// (Kademlia's `NotFound`) is not ok. Puts: stored on at least one
        /// peer.
        ok: bool,
        /// Requests the query sent in all.
        requests: u32,
    },
    /// A peer asked us to store `record` (an inbound PUT). It is **not**
    /// stored: verify it and call [`Behaviour::store_record`] to keep it.
    InboundRecord {
        /// The peer that sent it.
        source: PeerId,
        /// The record, its expiry already bounded by
        /// [`Config::max_record_ttl`].
        record: Record,
    },
}

/// Whether a query (or its last step) ended without error.
fn query_ok(result: &QueryResult) -> bool {
    match result {
        QueryResult::Bootstrap(r) => r.is_ok(),
        QueryResult::GetClosestPeers(r) => r.is_ok(),
        QueryResult::GetProviders(r) => r.is_ok(),
        QueryResult::StartProviding(r) | QueryResult::RepublishProvider(r) => r.is_ok(),
        QueryResult::GetRecord(r) => r.is_ok(),
        QueryResult::PutRecord(r) | QueryResult::RepublishRecord(r) => r.is_ok(),
    }
}

/// A failed announcement of an exact key, waiting to be tried again.
#[derive(Debug, Clone, Copy)]
struct AnnounceRetry {
    /// Failures in a row.
    attempts: u32,
    /// When it is tried again.
    due: Instant,
}

/// Kademlia on [`Config::protocol`] with a bounded memory store, plus the
/// timers that advertise the node under the namespace key and look up the
/// other providers. Add it to your own `#[derive(NetworkBehaviour)]`.
pub struct Behaviour {
    kad: kad::Behaviour<DhtStore>,
    /// A read view of the store `kad` owns.
    store: DhtStore,
    config: Config,
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
    /// The first announcement, `announce_delay` after the first peer.
    announce_timer: Pin<Box<Sleep>>,
    announce_pending: bool,
    /// When the keys were last announced (`None`: not yet).
    announced_at: Option<Instant>,
    /// Routing table size at the last announcement: the next one on growth
    /// waits until the table has grown [`REANNOUNCE_GROWTH_FACTOR`]-fold,
    /// so a growing network costs log4(N) rounds, not one per new peer.
    advertised_at_size: usize,
    /// In-flight announcements, by key: one per key at a time.
    provide_queries: HashMap<QueryId, RecordKey>,
    /// Keys announced besides the namespace.
    provided_keys: HashSet<RecordKey>,
    /// The provided keys re-announced when the routing table grows;
    /// `None`: every key (see [`Behaviour::set_exact_keys`]).
    exact_keys: Option<HashSet<RecordKey>>,
    /// Keys waiting for an announcement slot.
    provide_backlog: VecDeque<RecordKey>,
    /// Exact keys whose last announcement reached no peer: when each is
    /// tried again, and how many times in a row it failed.
    announce_retries: HashMap<RecordKey, AnnounceRetry>,
    /// Fires at the earliest of `announce_retries`.
    retry_timer: Pin<Box<Sleep>>,
    /// Queries the user started, reported as events; until their last step.
    user_queries: HashSet<QueryId>,
    /// Peers with at least one open connection.
    connected: HashSet<PeerId>,
    discovery_queries: HashSet<QueryId>,
    address_queries: HashMap<QueryId, PeerId>,
    bootstrap_reported: bool,
    routing: HashMap<PeerId, Vec<Multiaddr>>,
    providers: HashSet<PeerId>,
    /// Kademlia requests sent by the queries that finished.
    requests_sent: u64,
    /// Our periodic bootstraps, which refresh every bucket (Kademlia's
    /// automatic ones stop after the lookup of our own key).
    full_bootstraps: HashSet<QueryId>,
    events: VecDeque<Event>,
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Behaviour")
            .field("config", &self.config)
            .field("routing_table_size", &self.routing.len())
            .field("providers", &self.providers.len())
            .field("user_queries", &self.user_queries.len())
            .finish_non_exhaustive()
    }
}

impl Behaviour {
    /// The DHT of `local_peer`. Must be created inside a tokio runtime.
    #[must_use]
    pub fn new(local_peer: PeerId, config: Config) -> Self {
        let mut kad_config = kad::Config::new(config.protocol.clone());
        kad_config
            .set_query_timeout(config.query_timeout)
            .set_max_packet_size(config.max_value_bytes + PACKET_OVERHEAD_BYTES)
            .set_periodic_bootstrap_interval(None)
            // Inbound records and provider announcements come to us first:
            // we see who announces the namespace the moment they do, and an
            // inbound record is stored only by whoever verifies it (it
            // reaches the user as `Event::InboundRecord`, never the store).
            // Re-announcing is ours (`provide_interval`), not Kademlia's.
            .set_record_filtering(kad::StoreInserts::FilterBoth)
            .set_provider_publication_interval(None)
            .set_provider_record_ttl(Some(
                config
                    .provide_interval
                    .saturating_mul(PROVIDER_TTL_INTERVALS),
            ))
            // The user re-puts its records (on `Event::Advertising`).
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
        let store_view = store.share();
        let namespace = provider_key(&config.namespace);
        let mut kad = kad::Behaviour::with_config(local_peer, store, kad_config);
        kad.set_mode(Some(config.mode.into()));
        // Store our own provider record at once, so a peer that asks us
        // directly finds us even before the routing table fills.
        let mut provide_queries = HashMap::new();
        if config.advertise_namespace {
            match kad.start_providing(namespace.clone()) {
                Ok(id) => {
                    provide_queries.insert(id, namespace.clone());
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
            store: store_view,
            config,
            local_peer,
            namespace,
            provide_tick,
            bootstrap_tick,
            discovery_timer: Box::pin(tokio::time::sleep_until(now + discovery_interval)),
            ramp: discovery_interval,
            readvertise: Box::pin(tokio::time::sleep_until(now)),
            readvertise_pending: false,
            announce_timer: Box::pin(tokio::time::sleep_until(now)),
            announce_pending: false,
            announced_at: None,
            advertised_at_size: 0,
            provide_queries,
            provided_keys: HashSet::new(),
            exact_keys: None,
            provide_backlog: VecDeque::new(),
            announce_retries: HashMap::new(),
            retry_timer: Box::pin(tokio::time::sleep_until(now)),
            user_queries: HashSet::new(),
            connected: HashSet::new(),
            discovery_queries: HashSet::new(),
            address_queries: HashMap::new(),
            bootstrap_reported: false,
            routing: HashMap::new(),
            providers: HashSet::new(),
            requests_sent: 0,
            full_bootstraps: HashSet::new(),
            events: VecDeque::new(),
        }
    }

    /// The mode Kademlia runs in now.
    #[must_use]
    pub fn mode(&self) -> Mode {
        self.config.mode
    }

    /// Switch between server and client mode.
    pub fn set_mode(&mut self, mode: Mode) {
        self.config.mode = mode;
        self.kad.set_mode(Some(mode.into()));
    }

    /// The Kademlia protocol id, [`Config::protocol`].
    #[must_use]
    pub fn protocol(&self) -> &StreamProtocol {
        &self.config.protocol
    }

    /// The provider key of the namespace: `provider_key(&config.namespace)`.
    #[must_use]
    pub fn namespace_key(&self) -> &RecordKey {
        &self.namespace
    }

    /// Peers in the routing table, as reported by [`Event::RoutingUpdated`]
    /// so far (a peer given to [`Behaviour::add_address`] counts once its
    /// event has been polled).
    #[must_use]
    pub fn routing_table_size(&self) -> usize {
        self.routing.len()
    }

    /// Whether `peer` is in the routing table (as [`Event::RoutingUpdated`]
    /// reported it).
    #[must_use]
    pub fn is_in_routing_table(&self, peer: &PeerId) -> bool {
        self.routing.contains_key(peer)
    }

    /// The peers of the routing table (as [`Event::RoutingUpdated`]
    /// reported them), in no particular order.
    pub fn routing_peers(&self) -> impl Iterator<Item = &PeerId> {
        self.routing.keys()
    }

    /// Kademlia requests this node has sent, by queries of every kind
    /// (walks, bootstrap, announcements, puts), finished or running.
    #[must_use]
    pub fn requests_sent(&self) -> u64 {
        self.kad
            .iter_queries()
            .map(|q| u64::from(q.stats().num_requests()))
            .fold(self.requests_sent, u64::saturating_add)
    }

    /// Providers of the namespace found so far.
    #[must_use]
    pub fn providers(&self) -> &HashSet<PeerId> {
        &self.providers
    }

    /// Tell the DHT where a peer that speaks [`Config::protocol`] listens
    /// (from identify, mDNS or a bootstrap address). Addresses of peers that
    /// do not speak it are ignored by the caller, not here.
    pub fn add_address(&mut self, peer: &PeerId, address: Multiaddr) {
        self.kad.add_address(peer, address);
    }

    /// Announce every key and look up the namespace's providers now (for
    /// example after our addresses changed). Before the first announcement
    /// (`announce_delay` after the first peer) this waits for it instead.
    pub fn refresh_now(&mut self) {
        if self.routing.is_empty() || self.announced_at.is_none() {
            return;
        }
        self.announce();
    }

    /// Whether the keys have been announced (the first announcement comes
    /// [`Config::announce_delay`] after the first peer).
    #[must_use]
    pub fn has_announced(&self) -> bool {
        self.announced_at.is_some()
    }

    fn announce(&mut self) {
        self.mark_announced();
        self.advertise();
        self.look_up_now();
    }

    /// An announcement starts now: growth is counted from this table size.
    fn mark_announced(&mut self) {
        self.announced_at = Some(Instant::now());
        self.advertised_at_size = self.routing.len();
    }

    /// Look up the namespace's providers now and, with eager discovery,
    /// again soon, then less and less often: peers that joined just after
    /// us are found within a second, and a quiet network costs one lookup
    /// per `discovery_interval`.
    fn look_up_now(&mut self) {
        self.discover();
        if self.config.eager_discovery {
            self.look_again_soon();
        }
    }

    /// Of the provided keys, those whose every provider a lookup must find
    /// (a model that one node among hundreds serves): only they, not the
    /// namespace or the keys that many nodes provide, are announced again
    /// each time the routing table has grown four times over, so their
    /// provider records move to the peers closest to them in the grown
    /// network. A lookup of a key that many nodes provide needs some of
    /// its providers, not all (an answer holds 20 at most), and every node
    /// that joins later announces it to the closest peers of its day: those
    /// keys wait for `provide_interval`. Until this is called every key is
    /// announced again on growth.
    pub fn set_exact_keys(&mut self, keys: HashSet<RecordKey>) {
        // Retries are of provided keys only (`set_provided_keys` keeps
        // them so): of those, the exact ones stay.
        self.announce_retries.retain(|k, _| keys.contains(k));
        self.exact_keys = Some(keys);
    }

    /// Provide exactly `keys` besides the namespace: announce new ones now
    /// (and on every refresh), stop providing the ones no longer listed.
    pub fn set_provided_keys(&mut self, keys: HashSet<RecordKey>) {
        let gone: Vec<RecordKey> = self.provided_keys.difference(&keys).cloned().collect();
        for key in gone {
            self.kad.stop_providing(&key);
        }
        self.provide_backlog.retain(|k| keys.contains(k));
        self.announce_retries.retain(|k, _| keys.contains(k));
        let new: Vec<RecordKey> = keys.difference(&self.provided_keys).cloned().collect();
        self.provided_keys = keys;
        for key in new {
            if self.announced_at.is_some() {
                self.provide(key);
            } else {
                // The walk that stores it on the closest peers goes out
                // with the first announcement.
                self.store_local_provider(key);
            }
        }
    }

    /// Look up the providers of `key`: [`Event::ProvidersFound`] for each
    /// step that finds some, then one [`Event::QueryFinished`].
    pub fn get_providers(&mut self, key: RecordKey) -> QueryId {
        let id = self.kad.get_providers(key);
        self.user_queries.insert(id);
        id
    }

    /// Look up the record of `key` (the local store first, then the peers
    /// closest to it): [`Event::RecordFound`] for each copy found, then one
    /// [`Event::QueryFinished`].
    pub fn get_record(&mut self, key: RecordKey) -> QueryId {
        let id = self.kad.get_record(key);
        self.user_queries.insert(id);
        id
    }

    /// Store `record` locally (as its publisher) and on the peers closest to
    /// its key, with [`kad::Quorum::One`]: [`Event::QueryFinished`] tells
    /// whether at least one peer stored it. Fails, without a query, if the
    /// local store refuses the record (too large, store full).
    ///
    /// Records are not re-published by the DHT: put them again on
    /// [`Event::Advertising`].
    pub fn put_record(&mut self, record: Record) -> Result<QueryId, kad::store::Error> {
        let id = self.kad.put_record(record, kad::Quorum::One)?;
        self.user_queries.insert(id);
        Ok(id)
    }

    /// Send `record` to exactly `peers` (no walk, not stored locally), with
    /// [`kad::Quorum::One`]: [`Event::QueryFinished`] tells whether at least
    /// one of them stored it. With no peers the query fails at once.
    pub fn put_record_to(
        &mut self,
        record: Record,
        peers: impl IntoIterator<Item = PeerId>,
    ) -> QueryId {
        let peers: Vec<PeerId> = peers.into_iter().collect();
        let id = self
            .kad
            .put_record_to(record, peers.into_iter(), kad::Quorum::One);
        self.user_queries.insert(id);
        id
    }

    /// Stop a query started with this API early (Kademlia's
    /// `query_mut(id).finish()`): it still reports its
    /// [`Event::QueryFinished`]. `false` if it is not running (finished, or
    /// not one of the user's queries).
    pub fn finish_query(&mut self, query: QueryId) -> bool {
        if !self.user_queries.contains(&query) {
            return false;
        }
        match self.kad.query_mut(&query) {
            Some(mut running) => {
                running.finish();
                true
            }
            None => false,
        }
    }

    /// The providers of `key` in the local store (ours included, when we
    /// provide it), expired records too.
    #[must_use]
    pub fn stored_providers(&self, key: &RecordKey) -> Vec<PeerId> {
        self.store
            .providers(key)
            .into_iter()
            .map(|p| p.provider)
            .collect()
    }

    /// A record of the local store (cloned); `None` if there is none or it
    /// has expired.
    #[must_use]
    pub fn stored_record(&self, key: &RecordKey) -> Option<Record> {
        let record = self.store.get(key)?.into_owned();
        (!record.is_expired(std::time::Instant::now())).then_some(record)
    }

    /// Put `record` into the local store only (as it is: no publisher or
    /// expiry is set), e.g. an [`Event::InboundRecord`] that passed your
    /// checks. Peers that ask for its key get it from us.
    pub fn store_record(&mut self, record: Record) -> Result<(), kad::store::Error> {
        self.kad.store_mut().put(record)
    }

    /// Announce the namespace (when configured) and every provided key,
    /// then tell the user ([`Event::Advertising`]). One query per key at a
    /// time: a burst of triggers costs one walk each.
    fn advertise(&mut self) {
        let mut keys: Vec<RecordKey> = self.provided_keys.iter().cloned().collect();
        if self.config.advertise_namespace {
            keys.push(self.namespace.clone());
        }
        self.advertise_keys(keys);
    }

    /// Announce `keys`, then tell the user ([`Event::Advertising`]).
    fn advertise_keys(&mut self, keys: Vec<RecordKey>) {
        for key in keys {
            self.provide(key);
        }
        self.events.push_back(Event::Advertising);
    }

    /// Store our provider record of `key` locally (no walk): peers that
    /// ask us directly find it at once.
    fn store_local_provider(&mut self, key: RecordKey) {
        let record = kad::ProviderRecord::new(key, self.local_peer, Vec::new());
        if let Err(e) = self.kad.store_mut().add_provider(record) {
            tracing::warn!(error = %e, "cannot store a provider record");
        }
    }

    fn provide(&mut self, key: RecordKey) {
        if self.provide_queries.values().any(|k| *k == key) {
            return;
        }
        if self.provide_queries.len() >= MAX_CONCURRENT_PROVIDES {
            if !self.provide_backlog.contains(&key) {
                self.store_local_provider(key.clone());
                self.provide_backlog.push_back(key);
            }
            return;
        }
        match self.kad.start_providing(key.clone()) {
            Ok(id) => {
                self.provide_queries.insert(id, key);
            }
            Err(e) => tracing::warn!(error = %e, "cannot store a provider record"),
        }
    }

    fn discover(&mut self) {
        // One lookup at a time: triggers during a lookup are served by it.
        // None while enough peers are connected: its answer would only
        // find more peers to connect to.
        if !self.discovery_queries.is_empty()
            || self.connected.len() >= self.config.discovery_until_peers
        {
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
                .push_back(Event::ProviderFound { peer, addresses });
        }
    }

    /// Handle a Kademlia event: what the user should see goes to `events`.
    fn on_kad_event(&mut self, event: kad::Event) {
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
        // Each step of a bootstrap is a query of its own (its stats are
        // that step's); other queries report cumulative stats, counted at
        // their last step.
        if let kad::Event::OutboundQueryProgressed {
            result,
            stats,
            step,
            ..
        } = &event
            && (step.last || matches!(result, QueryResult::Bootstrap(_)))
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
            let ok = query_ok(result);
            self.requests_sent = self
                .requests_sent
                .saturating_add(u64::from(stats.num_requests()));
            tracing::trace!(
                query = kind,
                ok,
                requests = stats.num_requests(),
                answered = stats.num_successes(),
                failed = stats.num_failures(),
                elapsed_ms = stats.duration().map_or(0, |d| d.as_millis()),
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
                // Kademlia bootstraps by itself while the table is small.
                if is_new_peer {
                    match self.announced_at {
                        None if !self.announce_pending => {
                            self.announce_pending = true;
                            self.announce_timer
                                .as_mut()
                                .reset(Instant::now() + self.config.announce_delay);
                        }
                        Some(at)
                            if at.elapsed() >= self.config.announce_delay
                                && self.routing.len()
                                    >= self
                                        .advertised_at_size
                                        .saturating_mul(REANNOUNCE_GROWTH_FACTOR) =>
                        {
                            self.schedule_readvertise();
                        }
                        _ => {}
                    }
                }
                self.events.push_back(Event::RoutingUpdated {
                    peer,
                    addresses,
                    is_new_peer,
                });
            }
            kad::Event::OutboundQueryProgressed {
                id,
                result,
                step,
                stats,
            } => self.on_query_progressed(id, result, &step, &stats),
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
                    return;
                }
                if namespace {
                    self.on_providers(HashSet::from([provider]));
                }
            }
            kad::Event::InboundRequest {
                request:
                    kad::InboundRequest::PutRecord {
                        source,
                        record: Some(record),
                        ..
                    },
            } => self
                .events
                .push_back(Event::InboundRecord { source, record }),
            kad::Event::ModeChanged { new_mode } => self.events.push_back(Event::ModeChanged {
                mode: new_mode.into(),
            }),
            // Inbound requests Kademlia answers itself (logged above),
            // routability notices, results of its own jobs.
            other => tracing::trace!(event = ?other, "DHT event not reported"),
        }
    }

    fn on_query_progressed(
        &mut self,
        id: QueryId,
        result: QueryResult,
        step: &kad::ProgressStep,
        stats: &kad::QueryStats,
    ) {
        let requests = stats.num_requests();
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
            return;
        }
        if self.provide_queries.contains_key(&id) {
            if !step.last {
                return;
            }
            let Some(key) = self.provide_queries.remove(&id) else {
                return;
            };
            if let Some(next) = self.provide_backlog.pop_front() {
                self.provide(next);
            }
            let ok = matches!(result, QueryResult::StartProviding(Ok(_)));
            // Kademlia reports success when every peer of the walk failed
            // too: then the record is stored nowhere but here. With no
            // request at all (an empty table) the first peer's
            // announcement follows anyway.
            let stored = ok && (requests == 0 || stats.num_successes() > 0);
            self.on_announced(key.clone(), stored);
            if key != self.namespace {
                tracing::debug!(ok, stored, "announced a provider key");
                return;
            }
            if !ok {
                tracing::debug!(?result, "namespace announcement did not complete");
            }
            self.events.push_back(Event::Advertised { ok });
            return;
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
                return;
            };
            if let Some(found) = peers
                .into_iter()
                .find(|p| p.peer_id == wanted && !p.addrs.is_empty())
            {
                self.events.push_back(Event::PeerAddresses {
                    peer: found.peer_id,
                    addresses: found.addrs,
                });
            }
            return;
        }
        if self.user_queries.contains(&id) {
            if step.last {
                self.user_queries.remove(&id);
            }
            self.on_user_query_progressed(id, result, step.last, requests);
            return;
        }
        if let QueryResult::Bootstrap(bootstrap) = &result {
            let done = step.last
                || bootstrap.is_err()
                || matches!(bootstrap, Ok(ok) if ok.num_remaining == 0);
            if !done {
                // Kademlia bootstraps by itself while the routing table has
                // fewer than 20 peers: a lookup of our own key, then a walk
                // to a random key of every bucket beyond the closest one.
                // The lookup is what a joining node needs; the bucket walks
                // (most of the cost) are left to our own periodic bootstrap
                // (`bootstrap_interval`): the far buckets fill from the peers
                // we meet. Finished here, a walk sends nothing.
                if !self.full_bootstraps.contains(&id)
                    && let Some(mut query) = self.kad.query_mut(&id)
                {
                    query.finish();
                }
                return;
            }
            self.full_bootstraps.remove(&id);
            let ok = bootstrap.is_ok();
            self.events.push_back(Event::BootstrapFinished {
                ok,
                routing_table_size: self.routing.len(),
            });
            if ok && !self.bootstrap_reported {
                // The first successful bootstrap: look up the namespace at
                // once rather than at the next tick. The keys are not
                // announced again: a walk finds the closest peers however
                // few the table held when it started, and a second round
                // of every walk (the bootstrap of a loaded node often ends
                // after `announce_delay`) doubled a joining node's
                // announcements. Not yet announced, they wait for the delay.
                self.bootstrap_reported = true;
                if self.announced_at.is_some() {
                    self.look_up_now();
                }
            }
            return;
        }
        // Kademlia's own jobs (record replication): nothing to report.
        tracing::trace!(?result, "DHT query progress not reported");
    }

    /// Report a step of a query of the user's: what it found, and on its
    /// last step, how it ended.
    fn on_user_query_progressed(
        &mut self,
        query: QueryId,
        result: QueryResult,
        last: bool,
        requests: u32,
    ) {
        let ok = query_ok(&result);
        match result {
            QueryResult::GetProviders(Ok(GetProvidersOk::FoundProviders { providers, .. }))
                if !providers.is_empty() =>
            {
                self.events.push_back(Event::ProvidersFound {
                    query,
                    providers,
                    requests,
                });
            }
            QueryResult::GetRecord(Ok(GetRecordOk::FoundRecord(found))) => {
                self.events.push_back(Event::RecordFound {
                    query,
                    record: found.record,
                    peer: found.peer,
                });
            }
            QueryResult::PutRecord(Err(e)) if last => {
                tracing::debug!(error = %e, "a put of the user's did not complete");
            }
            _ => {}
        }
        if last {
            self.events.push_back(Event::QueryFinished {
                query,
                ok,
                requests,
            });
        }
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

    /// The routing table has grown [`REANNOUNCE_GROWTH_FACTOR`]-fold since
    /// the last announcement: announce the exact keys again (every key
    /// when none were set) and tell the user, whose records are exact too.
    fn reannounce_grown(&mut self) {
        if self.routing.is_empty() || self.announced_at.is_none() {
            return;
        }
        let Some(exact) = &self.exact_keys else {
            self.announce();
            return;
        };
        let keys: Vec<RecordKey> = self.provided_keys.intersection(exact).cloned().collect();
        self.mark_announced();
        tracing::debug!(
            routing = self.routing.len(),
            keys = keys.len(),
            "the routing table grew; announcing the exact keys again"
        );
        self.advertise_keys(keys);
    }

    /// The exact keys whose last announcement reached no peer: stored
    /// only here until a retry ([`Config::announce_retry`]) reaches one.
    pub fn unannounced_keys(&self) -> impl Iterator<Item = &RecordKey> {
        self.announce_retries.keys()
    }

    /// An announcement of `key` ended: an exact key that reached no peer
    /// is tried again later (at doubling intervals), one that did is done.
    fn on_announced(&mut self, key: RecordKey, stored: bool) {
        if stored || !self.is_retried(&key) {
            self.announce_retries.remove(&key);
            return;
        }
        let attempts = self
            .announce_retries
            .get(&key)
            .map_or(1, |r| r.attempts.saturating_add(1));
        let delay = self
            .config
            .announce_retry
            .saturating_mul(1 << (attempts - 1).min(MAX_RETRY_DOUBLINGS))
            .min(self.config.provide_interval);
        // Spread over [delay/2, delay]: nodes that failed together (a busy
        // network) do not all try again at once.
        let delay = delay.mul_f64(rand::Rng::gen_range(&mut rand::thread_rng(), 0.5..=1.0));
        let due = Instant::now() + delay;
        tracing::debug!(
            attempts,
            ?delay,
            "an exact key's announcement reached no peer; trying again"
        );
        self.announce_retries
            .insert(key, AnnounceRetry { attempts, due });
        self.arm_retry_timer();
    }

    /// Whether a failed announcement of `key` is tried again: the exact
    /// keys (every provided key when none were set), not the namespace.
    fn is_retried(&self, key: &RecordKey) -> bool {
        self.provided_keys.contains(key)
            && self
                .exact_keys
                .as_ref()
                .is_none_or(|exact| exact.contains(key))
    }

    fn arm_retry_timer(&mut self) {
        if let Some(due) = self.announce_retries.values().map(|r| r.due).min()
            && self.retry_timer.deadline() != due
        {
            self.retry_timer.as_mut().reset(due);
        }
    }

    /// Announce the keys whose retry is due (those still retried).
    fn retry_due_announcements(&mut self) {
        let now = Instant::now();
        let due: Vec<RecordKey> = self
            .announce_retries
            .iter()
            .filter(|(_, r)| r.due <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            if self.is_retried(&key) {
                // Kept with its count (and a due time past every retry)
                // until the walk ends: a failure backs off further.
                if let Some(retry) = self.announce_retries.get_mut(&key) {
                    retry.due = now + self.config.provide_interval;
                }
                self.provide(key);
            } else {
                self.announce_retries.remove(&key);
            }
        }
        self.arm_retry_timer();
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
    type ToSwarm = Event;

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
            }
            FromSwarm::ConnectionClosed(e) if e.remaining_established == 0 => {
                self.connected.remove(&e.peer_id);
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
            if self.config.eager_discovery && self.announced_at.is_some() {
                self.look_again_soon();
            }
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
            if self.bootstrap_tick.poll_tick(cx).is_ready() && !self.routing.is_empty() {
                match self.kad.bootstrap() {
                    Ok(id) => {
                        self.full_bootstraps.insert(id);
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot bootstrap the DHT"),
                }
            }
            if self.provide_tick.poll_tick(cx).is_ready()
                && !self.routing.is_empty()
                && self.announced_at.is_some()
            {
                self.advertise();
            }
            if self.announce_pending && self.announce_timer.as_mut().poll(cx).is_ready() {
                self.announce_pending = false;
                if !self.routing.is_empty() {
                    self.announce();
                }
            }
            if self.discovery_timer.as_mut().poll(cx).is_ready() {
                if !self.routing.is_empty() && self.announced_at.is_some() {
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
            if !self.announce_retries.is_empty() && self.retry_timer.as_mut().poll(cx).is_ready() {
                self.retry_due_announcements();
                // Register the waker for the next deadline.
                let _ = self.retry_timer.as_mut().poll(cx);
            }
            if self.readvertise_pending && self.readvertise.as_mut().poll(cx).is_ready() {
                self.readvertise_pending = false;
                self.reannounce_grown();
            }
            match self.kad.poll(cx) {
                Poll::Ready(ToSwarm::GenerateEvent(event)) => self.on_kad_event(event),
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
