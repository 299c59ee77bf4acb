//! The discovery behaviour: the known-peer table and everything that fills
//! it (bootstrap peers, mDNS, the DHT's providers and routing table,
//! identify), the auto-dial policy and its timer, mDNS silence reporting,
//! and each source's status. It dials with `ToSwarm::Dial` and sees its
//! own dials' outcomes through `FromSwarm`.

mod table;

use std::collections::{HashMap, HashSet, VecDeque};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{
    CloseConnection, ConnectionId, DialError, FromSwarm, NetworkBehaviour, THandlerInEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId, identify};
use ollamacron_config::NodeConfig;
use ollamacron_discovery_bootstrap as bootstrap;
use ollamacron_discovery_mdns as mdns;

use crate::behaviour::PROTOCOL_VERSION;
use crate::error::error_chain;
use crate::status::{DiscoverySource, DiscoveryStatus, KnownPeer, SourceStats, SourceStatus};

use self::table::DialOutcome;
pub(crate) use self::table::PeerTable;

/// mDNS queries without an answer before the node warns that multicast
/// may be blocked.
const MDNS_SILENT_QUERIES: u32 = 6;
/// Most known peers redialed per maintenance pass.
const REDIALS_PER_PASS: usize = 16;
/// How often backed-off peers are redialed and mDNS silence is checked.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(5);

/// The discovery sources that are libp2p behaviours of their own.
#[derive(libp2p::swarm::NetworkBehaviour)]
pub(crate) struct Inner {
    bootstrap: bootstrap::Behaviour,
    mdns: Toggle<mdns::Behaviour>,
}

/// What discovery reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Event {
    /// A source reported a peer for the first time.
    Discovered {
        peer: PeerId,
        source: DiscoverySource,
    },
    /// A source lost a peer (mDNS expiry, too many failed dials).
    Lost {
        peer: PeerId,
        source: DiscoverySource,
    },
    /// A dial of a discovered peer succeeded.
    DialSucceeded { source: DiscoverySource },
    /// A dial of a discovered peer failed: `retry` is the failures in a
    /// row and when it is dialed again, `None` when it is forgotten.
    DialFailed {
        peer: PeerId,
        source: DiscoverySource,
        retry: Option<(u32, Duration)>,
    },
    /// The table's size changed (or may have).
    TableChanged { known: usize },
}

/// What the DHT is doing, for discovery's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct DhtSummary {
    /// Serving queries (else a client).
    pub(crate) server: bool,
    /// Peers in its routing table.
    pub(crate) routing_table_size: usize,
    /// Namespace providers found.
    pub(crate) providers: usize,
    /// Kademlia requests sent so far.
    pub(crate) requests_sent: u64,
    /// Model keys whose last announcement reached no peer (retried).
    pub(crate) unannounced_keys: usize,
}

/// The discovery behaviour (see the module docs).
pub(crate) struct Behaviour {
    inner: Inner,
    table: PeerTable,
    /// Dials made by discovery, by the source whose peer was dialed.
    auto_dials: HashMap<ConnectionId, DiscoverySource>,
    /// Peers we connected to because discovery dialed them.
    auto_dialed: HashSet<PeerId>,
    /// Peers with at least one open connection.
    connected: HashSet<PeerId>,
    /// Dial discovered peers while fewer than this many are connected.
    dial_below_peers: usize,
    /// Auto-dialing runs once the node does.
    running: bool,
    enable_mdns: bool,
    enable_dht: bool,
    mdns_error: Option<String>,
    mdns_query_interval: Duration,
    mdns_found_any: bool,
    mdns_silence_reported: bool,
    started: Instant,
    /// Loopback addresses are usable (every listen address is on loopback).
    loopback_only: bool,
    maintenance_tick: tokio::time::Interval,
    queued: VecDeque<ToSwarm<Event, THandlerInEvent<Inner>>>,
}

impl Behaviour {
    /// Discovery for `local` as `config` describes it. mDNS that was asked
    /// for but cannot start is reported (a warning, and in the status).
    pub(crate) fn new(local: PeerId, config: &NodeConfig, loopback_only: bool) -> Self {
        let bootstrap = bootstrap::Behaviour::new(local, crate::configs::bootstrap_config(config));
        let (mdns, mdns_error) = if config.enable_mdns {
            match mdns::Behaviour::new(crate::configs::mdns_config(config), local) {
                Ok(b) => (Some(b), None),
                Err(e) => (None, Some(e.to_string())),
            }
        } else {
            (None, None)
        };
        if let Some(reason) = &mdns_error {
            tracing::warn!(%reason, "mDNS is unavailable: LAN discovery is off, relying on bootstrap peers and the DHT");
        }
        let mut maintenance_tick = tokio::time::interval(MAINTENANCE_INTERVAL);
        maintenance_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut behaviour = Self {
            inner: Inner {
                bootstrap,
                mdns: mdns.into(),
            },
            table: PeerTable::new(local),
            auto_dials: HashMap::new(),
            auto_dialed: HashSet::new(),
            connected: HashSet::new(),
            dial_below_peers: config.conn_mgr_low,
            running: false,
            enable_mdns: config.enable_mdns,
            enable_dht: config.enable_dht,
            mdns_error,
            mdns_query_interval: config.mdns_query_interval,
            mdns_found_any: false,
            mdns_silence_reported: false,
            started: Instant::now(),
            loopback_only,
            maintenance_tick,
            queued: VecDeque::new(),
        };
        // Configured bootstrap peers are known from the start, reachable or not.
        for peer in behaviour.inner.bootstrap.peers() {
            behaviour.discovered(peer.peer, &peer.addresses, DiscoverySource::Bootstrap);
        }
        behaviour
    }

    /// The node runs: discovered peers may be dialed from now on.
    pub(crate) fn set_running(&mut self, running: bool) {
        self.running = running;
    }

    /// The configured bootstrap peers.
    pub(crate) fn bootstrap_peer_ids(&self) -> HashSet<PeerId> {
        self.inner
            .bootstrap
            .peers()
            .into_iter()
            .map(|p| p.peer)
            .collect()
    }

    /// Every known peer with its sources.
    pub(crate) fn known_peers(&self) -> Vec<KnownPeer> {
        self.table.snapshot()
    }

    /// Peers in the table.
    pub(crate) fn known_count(&self) -> usize {
        self.table.len()
    }

    /// Whether a peer's address is worth dialing: a loopback address of
    /// another host only leads back to ourselves.
    fn usable_remote(&self, addr: &Multiaddr) -> bool {
        self.loopback_only || !ollamacron_nat::is_loopback(addr)
    }

    fn emit(&mut self, event: Event) {
        self.queued.push_back(ToSwarm::GenerateEvent(event));
    }

    /// A source reported `peer`: record it, announce it the first time.
    fn discovered(&mut self, peer: PeerId, addresses: &[Multiaddr], source: DiscoverySource) {
        let Some(reported) = self.table.report(peer, addresses, source) else {
            return;
        };
        if self.connected.contains(&peer) {
            self.table.set_connected(&peer, true);
        }
        if reported.new_for_source {
            tracing::debug!(%peer, %source, "peer discovered");
            self.emit(Event::Discovered { peer, source });
        }
        self.emit(Event::TableChanged {
            known: self.table.len(),
        });
    }

    fn lost(&mut self, peer: PeerId, source: DiscoverySource) {
        tracing::debug!(%peer, %source, "peer lost");
        self.emit(Event::Lost { peer, source });
        self.emit(Event::TableChanged {
            known: self.table.len(),
        });
    }

    /// Dial a discovered peer if the policy allows: not connected, not being
    /// dialed, not foreign, not in backoff, with an address, and while we
    /// hold fewer than `conn_mgr_low` peers (beyond that, knowing is enough).
    fn auto_dial(&mut self, peer: PeerId, source: DiscoverySource) {
        if !self.running || self.connected.contains(&peer) {
            return;
        }
        if self.connected.len() >= self.dial_below_peers {
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
        self.auto_dials.insert(opts.connection_id(), source);
        self.queued.push_back(ToSwarm::Dial { opts });
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
                .set_connected(&peer, self.connected.contains(&peer));
            return;
        }
        tracing::debug!(%peer, error = %error_chain(error), "cannot dial discovered peer");
        let bootstrap = &self.inner.bootstrap;
        match self.table.dial_failed(&peer, |n| bootstrap.backoff(n)) {
            DialOutcome::Retry { failures, retry_in } => self.emit(Event::DialFailed {
                peer,
                source,
                retry: Some((failures, retry_in)),
            }),
            DialOutcome::Forgotten => {
                self.emit(Event::DialFailed {
                    peer,
                    source,
                    retry: None,
                });
                self.lost(peer, source);
            }
            DialOutcome::Unknown => self.emit(Event::DialFailed {
                peer,
                source,
                retry: None,
            }),
        }
    }

    fn on_bootstrap(&mut self, event: bootstrap::Event) {
        match event {
            bootstrap::Event::Dialing { peer, failures } => {
                tracing::debug!(%peer, failures, "dialing bootstrap peer");
            }
            bootstrap::Event::Connected { peer } => {
                tracing::info!(%peer, "connected to bootstrap peer");
                self.discovered(peer, &[], DiscoverySource::Bootstrap);
                self.table.set_connected(&peer, true);
                self.emit(Event::DialSucceeded {
                    source: DiscoverySource::Bootstrap,
                });
            }
            bootstrap::Event::Disconnected { peer } => {
                tracing::debug!(%peer, "bootstrap peer disconnected");
            }
            bootstrap::Event::DialFailed {
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
                self.table.dial_failed(&peer, |_| retry_in);
                self.emit(Event::DialFailed {
                    peer,
                    source: DiscoverySource::Bootstrap,
                    retry: Some((failures, retry_in)),
                });
            }
        }
    }

    fn on_mdns(&mut self, event: mdns::Event) {
        match event {
            mdns::Event::Discovered { peer, addresses } => {
                self.mdns_found_any = true;
                self.discovered(peer, &addresses, DiscoverySource::Mdns);
                self.auto_dial(peer, DiscoverySource::Mdns);
            }
            mdns::Event::Expired { peer, .. } => {
                // Only some of its addresses may have expired.
                let still_seen = self
                    .inner
                    .mdns
                    .as_ref()
                    .is_some_and(|m| m.discovered_peers().any(|p| *p == peer));
                if !still_seen && self.table.lose(&peer, DiscoverySource::Mdns) {
                    self.lost(peer, DiscoverySource::Mdns);
                }
            }
        }
    }

    /// The DHT found a namespace provider.
    pub(crate) fn on_dht_provider(&mut self, peer: PeerId, addresses: &[Multiaddr]) {
        self.discovered(peer, addresses, DiscoverySource::Dht);
        self.auto_dial(peer, DiscoverySource::Dht);
    }

    /// The DHT looked up a provider's addresses.
    pub(crate) fn on_dht_addresses(&mut self, peer: PeerId, addresses: &[Multiaddr]) {
        for addr in addresses {
            self.table.add_address(&peer, addr);
        }
        self.auto_dial(peer, DiscoverySource::Dht);
    }

    /// A peer entered (or changed in) the DHT's routing table.
    pub(crate) fn on_dht_routing(&mut self, peer: PeerId, addresses: &[Multiaddr]) {
        self.discovered(peer, addresses, DiscoverySource::Dht);
    }

    /// What identify tells discovery: the peer's addresses, and whether it
    /// is an Ollamacron node at all (a foreign peer discovery dialed is
    /// disconnected).
    pub(crate) fn on_identified(&mut self, peer: PeerId, info: &identify::Info) {
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
                self.queued.push_back(ToSwarm::CloseConnection {
                    peer_id: peer,
                    connection: CloseConnection::All,
                });
            }
        }
    }

    /// Warn once when mDNS runs but has heard nobody for a while: on Wi-Fi
    /// with client isolation, in containers or WSL2, multicast is often
    /// silently dropped.
    fn report_mdns_silence(&mut self) {
        if self.mdns_found_any || self.mdns_silence_reported || !self.inner.mdns.is_enabled() {
            return;
        }
        let quiet_for = self.mdns_query_interval.saturating_mul(MDNS_SILENT_QUERIES);
        if self.started.elapsed() < quiet_for {
            return;
        }
        self.mdns_silence_reported = true;
        tracing::warn!(
            quiet_for = %humantime::format_duration(quiet_for),
            "mDNS has found no peer; if other nodes run on this network, multicast may be blocked \
             (Wi-Fi client isolation, containers, WSL2): configure bootstrap peers"
        );
    }

    /// Which sources are on and working; `dht` is the DHT's state when it
    /// runs, `stats` each source's counters.
    pub(crate) fn status(
        &self,
        dht: Option<DhtSummary>,
        stats: impl Fn(DiscoverySource) -> SourceStats,
    ) -> DiscoveryStatus {
        let mdns_detail = match (&self.mdns_error, self.inner.mdns.as_ref()) {
            (Some(reason), _) => format!("unavailable: {reason}"),
            (None, Some(mdns)) => format!(
                "{} peers on the local network",
                mdns.discovered_peers().count()
            ),
            (None, None) => "off (enable_mdns: false)".to_owned(),
        };
        let dht_detail = match dht {
            Some(dht) => {
                let mut detail = format!(
                    "{} mode, {} peers in the routing table, {} namespace providers",
                    if dht.server { "server" } else { "client" },
                    dht.routing_table_size,
                    dht.providers
                );
                if dht.unannounced_keys > 0 {
                    detail.push_str(&format!(
                        ", {} model keys not yet announced to any peer (retrying)",
                        dht.unannounced_keys
                    ));
                }
                detail
            }
            None => "off (enable_dht: false)".to_owned(),
        };
        let bootstrap = self.inner.bootstrap.peers();
        let connected = bootstrap.iter().filter(|p| p.connections > 0).count();
        let sources = vec![
            SourceStatus {
                source: DiscoverySource::Mdns,
                enabled: self.enable_mdns,
                active: self.inner.mdns.is_enabled(),
                detail: mdns_detail,
            },
            SourceStatus {
                source: DiscoverySource::Dht,
                enabled: self.enable_dht,
                active: dht.is_some(),
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
                .map(|s| (*s, stats(*s)))
                .collect(),
            known_peers: self.table.len(),
            dht_routing_table_size: dht.map_or(0, |d| d.routing_table_size),
            dht_providers: dht.map_or(0, |d| d.providers),
            dht_requests_sent: dht.map_or(0, |d| d.requests_sent),
            dht_unannounced_keys: dht.map_or(0, |d| d.unannounced_keys),
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ToSwarm = Event;

    delegate_connections_to_inner!();

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        match &event {
            FromSwarm::ConnectionEstablished(e) => {
                self.connected.insert(e.peer_id);
                self.table.set_connected(&e.peer_id, true);
                if let Some(source) = self.auto_dials.remove(&e.connection_id) {
                    self.emit(Event::DialSucceeded { source });
                    self.auto_dialed.insert(e.peer_id);
                }
            }
            FromSwarm::ConnectionClosed(e) if e.remaining_established == 0 => {
                self.connected.remove(&e.peer_id);
                self.auto_dialed.remove(&e.peer_id);
                self.table.set_connected(&e.peer_id, false);
            }
            FromSwarm::DialFailure(e) => {
                if let (Some(source), Some(peer)) =
                    (self.auto_dials.remove(&e.connection_id), e.peer_id)
                {
                    self.on_auto_dial_failed(peer, source, e.error);
                }
            }
            FromSwarm::NewExternalAddrOfPeer(e) if self.usable_remote(e.addr) => {
                self.table.add_address(&e.peer_id, e.addr);
            }
            _ => {}
        }
        self.inner.on_swarm_event(event);
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        loop {
            if let Some(event) = self.queued.pop_front() {
                return Poll::Ready(event);
            }
            if self.maintenance_tick.poll_tick(cx).is_ready() {
                self.redial_known_peers();
                self.report_mdns_silence();
                continue;
            }
            match self.inner.poll(cx) {
                Poll::Ready(ToSwarm::GenerateEvent(InnerEvent::Bootstrap(event))) => {
                    self.on_bootstrap(event);
                }
                Poll::Ready(ToSwarm::GenerateEvent(InnerEvent::Mdns(event))) => {
                    self.on_mdns(event);
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
