//! The peer behaviour: who we are connected to and how. It owns the
//! connections and their kinds (direct or relayed), per-connection round
//! trips, the allow-list and connection limits, closing redundant relayed
//! connections and duplicate direct ones (a tie-break both sides agree
//! on), trimming with its own timer, and dials someone awaits.
//! It sees every connection through `FromSwarm` and closes connections
//! with `ToSwarm::CloseConnection`; the swarm task only reads it.

mod dials;
mod keep_alive;
mod pending_per_ip;

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use libp2p::allow_block_list::{self, AllowedPeers, BlockedPeers, NotAllowed};
use libp2p::core::{ConnectedPoint, Endpoint};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{
    CloseConnection, ConnectionDenied, ConnectionId, DialError, FromSwarm, ListenError,
    NetworkBehaviour, THandlerInEvent, ToSwarm,
};
use libp2p::{Multiaddr, PeerId, connection_limits, memory_connection_limits, ping};
use ollamacron_config::NodeConfig;
use tokio::sync::oneshot;

use crate::error::NodeError;
use crate::event::Direction;
use crate::status::{BreakerState, ConnectedPeer, ConnectionKind};
use crate::trim::{TrimCandidate, TrimPolicy};

use self::dials::{PendingDial, dial_error_reason};

/// Most connections kept to a single peer (simultaneous dials make two).
const MAX_CONNECTIONS_PER_PEER: u32 = 4;
/// Most inbound connections still negotiating at once.
const MAX_PENDING_INCOMING: u32 = 128;
/// How long a duplicate direct connection stays open before the tie-break
/// closes it (counted from when it was established): what started on it
/// right away, above all the record push every new peer gets and identify,
/// finishes first (see [`Behaviour::close_duplicate_direct`]).
const DUPLICATE_CLOSE_DELAY: Duration = Duration::from_millis(500);
/// How often the trimming policy runs besides on each new connection.
const TRIM_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// At most one warning per this interval for refused private-network
/// handshakes.
const REFUSAL_WARNING_INTERVAL: Duration = Duration::from_secs(60);

/// How long a peer that misbehaved (see [`Behaviour::ban`]) stays
/// disconnected: its connections are refused, inbound and outbound.
pub(crate) const PEER_BAN_DURATION: Duration = Duration::from_secs(10 * 60);

/// The libp2p behaviours whose state is the peer behaviour's. Limits come
/// first so they can deny a connection before anything else sees it.
#[derive(libp2p::swarm::NetworkBehaviour)]
pub(crate) struct Inner {
    allowed_peers: Toggle<allow_block_list::Behaviour<AllowedPeers>>,
    banned_peers: allow_block_list::Behaviour<BlockedPeers>,
    connection_limits: connection_limits::Behaviour,
    pending_per_ip: pending_per_ip::Behaviour,
    memory_limits: Toggle<memory_connection_limits::Behaviour>,
    keep_alive: keep_alive::Behaviour,
    ping: ping::Behaviour,
}

/// Why a connection was refused, in [`Event::Refused`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The peer is not in `allowed_peers`.
    NotAllowed,
    /// The private-network handshake failed (no or another network key).
    Handshake,
}

/// What the peer behaviour reports.
#[derive(Debug)]
pub(crate) enum Event {
    /// A ping finished (for metrics).
    Pinged(ping::Event),
    /// The trimming policy closed connections.
    Trimmed { closed: usize },
    /// The tie-break closed a duplicate direct connection.
    DuplicateClosed,
    /// A connection was refused before it was established.
    Refused { reason: Refusal },
    /// The round trip a peer is scored on changed (a ping, or its last
    /// direct connection closed): `None` once nothing is measured.
    PathChanged {
        peer: PeerId,
        path: Option<(Duration, bool)>,
    },
}

struct Connection {
    peer: PeerId,
    remote: Multiaddr,
    direction: Direction,
    /// Whether we dialed it as far as the two ends agree: the role we
    /// took in the upgrade. It differs from `direction` only on a hole
    /// punch, where both ends dial and one overrides its role to listener.
    dialed_by_us: bool,
    established: Instant,
    /// Through a relay (`/p2p-circuit`).
    relayed: bool,
}

/// What we know of one connected peer.
#[derive(Debug, Default)]
pub(crate) struct PeerEntry {
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
    pub(crate) fn rtt(&self) -> Option<Duration> {
        if self.direct > 0 {
            self.direct_rtt.or(self.relayed_rtt)
        } else {
            self.relayed_rtt.or(self.direct_rtt)
        }
    }

    /// Whether the RTT of [`PeerEntry::rtt`] is a relay path's.
    pub(crate) fn rtt_via_relay(&self) -> bool {
        !(self.direct > 0 && self.direct_rtt.is_some()) && self.relayed_rtt.is_some()
    }

    /// The scored round trip and whether it is a relay path's.
    fn path(&self) -> Option<(Duration, bool)> {
        self.rtt().map(|rtt| (rtt, self.rtt_via_relay()))
    }

    /// Direct, relayed or none.
    pub(crate) fn connection(&self) -> ConnectionKind {
        if self.direct > 0 {
            ConnectionKind::Direct
        } else if self.relayed > 0 {
            ConnectionKind::Relayed
        } else {
            ConnectionKind::None
        }
    }

    /// Its identify agent, once it identified itself.
    pub(crate) fn agent_version(&self) -> Option<&str> {
        self.agent_version.as_deref()
    }
}

/// The peer behaviour (see the module docs).
pub(crate) struct Behaviour {
    inner: Inner,
    local_peer: PeerId,
    connections: HashMap<ConnectionId, Connection>,
    peers: HashMap<PeerId, PeerEntry>,
    /// Peers trimming never disconnects (the bootstrap peers).
    protected: HashSet<PeerId>,
    /// The neighbours: peers whose connection (this one) stays open while
    /// idle, at most `conn_mgr_low` (`trim.low`) of them. Every other
    /// connection closes after `idle_connection_timeout` of idleness.
    kept: HashMap<PeerId, ConnectionId>,
    trim: TrimPolicy,
    trim_tick: tokio::time::Interval,
    /// Connections trimming closed that have not reported closed yet.
    closing: HashSet<ConnectionId>,
    trimmed_total: u64,
    /// Duplicate direct connections the tie-break chose to close that have
    /// not reported closed yet: their peer, and when to close them (`None`
    /// once asked to).
    duplicates: HashMap<ConnectionId, (PeerId, Option<Instant>)>,
    duplicates_closed_total: u64,
    /// [`DUPLICATE_CLOSE_DELAY`] (shorter in tests).
    duplicate_close_delay: Duration,
    /// Wakes `poll` when the next duplicate is due.
    duplicate_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// Connections established since start.
    established_total: u64,
    dials: HashMap<ConnectionId, PendingDial>,
    /// Dials that finished, answered once the events queued before them
    /// are out (so a refusal is counted before its dial returns).
    finished_dials: VecDeque<(PendingDial, Result<PeerId, String>)>,
    /// Peers whose breaker the gateway opened, until when they cool down.
    breakers: HashMap<PeerId, Instant>,
    /// Failed handshakes are refusals (a private network).
    require_auth: bool,
    /// When a refused handshake was last logged as a warning.
    refusal_warned: Option<Instant>,
    /// Banned peers, until when (lifted on the trim tick).
    banned: HashMap<PeerId, Instant>,
    banned_total: u64,
    queued: VecDeque<ToSwarm<Event, THandlerInEvent<Inner>>>,
}

impl Behaviour {
    /// The peer behaviour of `local_peer` as `config` describes it;
    /// trimming never closes connections to `protected` peers.
    pub(crate) fn new(local_peer: PeerId, config: &NodeConfig, protected: HashSet<PeerId>) -> Self {
        let allowed = config.allowed_peer_ids();
        let allowed_peers = (!allowed.is_empty()).then(|| {
            let mut list = allow_block_list::Behaviour::<AllowedPeers>::default();
            for peer in allowed {
                list.allow_peer(peer);
            }
            list
        });
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_established(Some(
                u32::try_from(config.conn_mgr_high).unwrap_or(u32::MAX),
            ))
            .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
            .with_max_pending_incoming(Some(MAX_PENDING_INCOMING));
        let memory_limits = config.max_memory.map(|max| {
            memory_connection_limits::Behaviour::with_max_bytes(
                usize::try_from(max.bytes()).unwrap_or(usize::MAX),
            )
        });
        let mut trim_tick = tokio::time::interval(TRIM_CHECK_INTERVAL);
        trim_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            inner: Inner {
                allowed_peers: allowed_peers.into(),
                banned_peers: allow_block_list::Behaviour::default(),
                connection_limits: connection_limits::Behaviour::new(limits),
                pending_per_ip: pending_per_ip::Behaviour::default(),
                memory_limits: memory_limits.into(),
                keep_alive: keep_alive::Behaviour::default(),
                ping: ping::Behaviour::new(ping::Config::new().with_interval(config.ping_interval)),
            },
            local_peer,
            connections: HashMap::new(),
            peers: HashMap::new(),
            protected,
            kept: HashMap::new(),
            trim: TrimPolicy {
                low: config.conn_mgr_low,
                high: config.conn_mgr_high,
                grace: config.conn_mgr_grace,
            },
            trim_tick,
            closing: HashSet::new(),
            trimmed_total: 0,
            duplicates: HashMap::new(),
            duplicates_closed_total: 0,
            duplicate_close_delay: DUPLICATE_CLOSE_DELAY,
            duplicate_timer: None,
            established_total: 0,
            dials: HashMap::new(),
            finished_dials: VecDeque::new(),
            breakers: HashMap::new(),
            require_auth: config.require_auth,
            refusal_warned: None,
            banned: HashMap::new(),
            banned_total: 0,
            queued: VecDeque::new(),
        }
    }

    /// Disconnect `peer` and refuse its connections, inbound and outbound,
    /// for `duration` (a peer that misbehaved; never a protected one, whose
    /// misbehaviour is only logged, nor ourselves). Whether it was banned now.
    pub(crate) fn ban(&mut self, peer: PeerId, duration: Duration, reason: &str) -> bool {
        if peer == self.local_peer || self.protected.contains(&peer) {
            tracing::warn!(%peer, %reason, "a bootstrap peer misbehaved; kept connected as it is configured");
            return false;
        }
        let until = Instant::now() + duration;
        if self.banned.insert(peer, until).is_some() {
            return false;
        }
        self.banned_total += 1;
        self.inner.banned_peers.block_peer(peer);
        tracing::warn!(%peer, %reason, ban_secs = duration.as_secs(), "disconnected a misbehaving peer; its connections are refused until the ban ends");
        true
    }

    /// Peers banned now, and since start.
    pub(crate) fn banned(&self) -> (usize, u64) {
        (self.banned.len(), self.banned_total)
    }

    /// Lift the bans that are over.
    fn lift_bans(&mut self) {
        let now = Instant::now();
        let over: Vec<PeerId> = self
            .banned
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(peer, _)| *peer)
            .collect();
        for peer in over {
            self.banned.remove(&peer);
            self.inner.banned_peers.unblock_peer(peer);
            tracing::info!(%peer, "ban over: the peer may connect again");
        }
    }

    /// Peers with at least one open connection.
    pub(crate) fn peer_count(&self) -> usize {
        self.peers.len()
    }

    /// Open connections in `direction`.
    pub(crate) fn count(&self, direction: Direction) -> usize {
        self.connections
            .values()
            .filter(|c| c.direction == direction)
            .count()
    }

    /// Open connections.
    pub(crate) fn connection_count(&self) -> usize {
        self.connections.len()
    }

    /// Connections trimming closed since start.
    pub(crate) fn trimmed_total(&self) -> u64 {
        self.trimmed_total
    }

    /// Duplicate direct connections this node closed since start (see
    /// [`Behaviour::close_duplicate_direct`]): a cross-dial's duplicate by
    /// whichever end's delay ran out first (now and then both), a second
    /// dial of the same side by its dialer.
    pub(crate) fn duplicates_closed_total(&self) -> u64 {
        self.duplicates_closed_total
    }

    /// Connections (direct and relayed, either direction) established
    /// since start.
    pub(crate) fn established_total(&self) -> u64 {
        self.established_total
    }

    /// What we know of a connected peer.
    pub(crate) fn entry(&self, peer: &PeerId) -> Option<&PeerEntry> {
        self.peers.get(peer)
    }

    /// Addresses we dialed `peer` at directly, on open connections.
    pub(crate) fn dialed_addresses(&self, peer: &PeerId) -> Vec<Multiaddr> {
        self.connections
            .values()
            .filter(|c| c.peer == *peer && c.direction == Direction::Outbound && !c.relayed)
            .map(|c| c.remote.clone())
            .collect()
    }

    /// The gateway's breaker for `peer`.
    pub(crate) fn breaker(&self, peer: &PeerId) -> BreakerState {
        match self.breakers.get(peer) {
            None => BreakerState::Closed,
            Some(until) if Instant::now() < *until => BreakerState::Open,
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// The gateway's breaker for `peer` opened (cooling down until
    /// `cooling_until`) or closed (`None`).
    pub(crate) fn report_breaker(&mut self, peer: PeerId, cooling_until: Option<Instant>) {
        match cooling_until {
            Some(until) => {
                self.breakers.insert(peer, until);
            }
            None => {
                self.breakers.remove(&peer);
            }
        }
    }

    /// A peer identified itself; `true` if its versions changed.
    pub(crate) fn identified(
        &mut self,
        peer: PeerId,
        protocol_version: &str,
        agent_version: &str,
    ) -> bool {
        let entry = self.peers.entry(peer).or_default();
        let changed = entry.protocol_version.as_deref() != Some(protocol_version)
            || entry.agent_version.as_deref() != Some(agent_version);
        entry.protocol_version = Some(protocol_version.to_owned());
        entry.agent_version = Some(agent_version.to_owned());
        changed
    }

    /// Every peer with at least one open connection, by peer id.
    pub(crate) fn connected_peers(&self) -> Vec<ConnectedPeer> {
        let mut by_peer: HashMap<PeerId, Vec<&Connection>> = HashMap::new();
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

    /// Dial `addr` for someone awaiting `reply`: a peer already connected
    /// answers at once, and a second dial of a peer being dialed joins
    /// the first.
    pub(crate) fn dial(
        &mut self,
        addr: Multiaddr,
        reply: oneshot::Sender<Result<PeerId, NodeError>>,
    ) {
        let target = addr.to_string();
        let peer = match addr.iter().last() {
            Some(libp2p::multiaddr::Protocol::P2p(peer)) => Some(peer),
            _ => None,
        };
        if let Some(peer) = peer {
            if self
                .peers
                .get(&peer)
                .is_some_and(|e| e.direct + e.relayed > 0)
            {
                let _ = reply.send(Ok(peer));
                return;
            }
            if let Some(pending) = self.dials.values_mut().find(|d| d.peer == Some(peer)) {
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
        self.dials.insert(
            opts.connection_id(),
            PendingDial {
                target,
                peer,
                replies: vec![reply],
            },
        );
        self.queued.push_back(ToSwarm::Dial { opts });
    }

    /// Answer every awaited dial with `reason` (the node is stopping).
    pub(crate) fn fail_dials(&mut self, reason: &str) {
        for (pending, result) in self.finished_dials.drain(..) {
            match result {
                Ok(peer) => pending.succeed(peer),
                Err(reason) => pending.fail(&reason),
            }
        }
        for (_, pending) in self.dials.drain() {
            pending.fail(reason);
        }
    }

    /// Two nodes that dial each other through a relay at once end up with
    /// two circuits, and two hole punches that fight over the same ports.
    /// Both sides keep the circuit the smaller peer id dialed (the oldest
    /// one, if several) and close the others.
    fn close_redundant_relayed(&mut self, peer: PeerId) {
        let keep_direction = if self.local_peer < peer {
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
            self.queued.push_back(ToSwarm::CloseConnection {
                peer_id: peer,
                connection: CloseConnection::One(id),
            });
        }
    }

    /// Two nodes that dial each other at once (or one that dials a peer
    /// twice: TCP and QUIC, a health dial racing a discovery dial) end up
    /// with two direct connections. Exactly one survives, and both ends
    /// agree which without talking, whatever order they saw them in:
    ///
    /// - the connections the smaller peer id (by `to_bytes()`) dialed win
    ///   over those the other one dialed: the smaller end closes its
    ///   inbound ones, the other end its outbound ones, which are the same
    ///   connections;
    /// - among several the same end dialed, only that end closes, all but
    ///   the oldest; the listener never does (each end may see them in
    ///   another order, and two choices could close them all).
    ///
    /// "Dialed" is the role in the upgrade, so a hole punch (both ends
    /// dial, one as listener) counts once, for the same end on both sides.
    /// Relayed connections are left to [`Behaviour::close_redundant_relayed`];
    /// ones already closing (trimmed, or closed here) are not counted.
    ///
    /// The loser is chosen when the second connection is established but
    /// closed only [`DUPLICATE_CLOSE_DELAY`] after it was itself
    /// established. Closing resets every stream still open on it, and
    /// nobody is told: Kademlia fails a query's peer only when its last
    /// connection closes, so a request of ours on the loser is simply never
    /// answered (a lookup waits out its per-peer timeout, 10 s) and a
    /// request the remote sent on it fails there. The first connection to a
    /// peer, which may be the loser, carries at once identify and the
    /// direct push of our record (sent once per peer, on its first
    /// connection); closing at once lost that push for about one pair in
    /// twenty in a 32-node mesh, and its record then came from a DHT walk
    /// ten seconds later. The delay lets that finish; what the swarm routes
    /// to the loser meanwhile (a Kademlia request goes to any connection of
    /// the peer) is lost only if still in flight at the close. Trimming
    /// leaves the loser alone meanwhile. A dial someone awaits was answered
    /// with success at `ConnectionEstablished`, even when its connection
    /// loses: the peer is connected.
    fn close_duplicate_direct(&mut self, peer: PeerId) {
        let mut ours: Vec<(Instant, ConnectionId)> = Vec::new();
        let mut theirs: Vec<(Instant, ConnectionId)> = Vec::new();
        for (id, c) in &self.connections {
            if c.peer != peer || c.relayed || !self.is_live(id) {
                continue;
            }
            if c.dialed_by_us {
                ours.push((c.established, *id));
            } else {
                theirs.push((c.established, *id));
            }
        }
        if ours.len() + theirs.len() < 2 {
            return;
        }
        ours.sort_unstable();
        let smaller = self.local_peer.to_bytes() < peer.to_bytes();
        let mut close: Vec<ConnectionId> = Vec::new();
        // Their dials lose to ours when we are the smaller id (else they
        // win, or they are all theirs and theirs to choose from).
        if smaller && !ours.is_empty() {
            close.extend(theirs.iter().map(|(_, id)| *id));
        }
        // Ours lose to theirs when they are the smaller id; else we keep
        // the oldest of ours.
        let keep_ours = usize::from(smaller || theirs.is_empty());
        close.extend(ours.iter().skip(keep_ours).map(|(_, id)| *id));
        for id in close {
            let Some(established) = self.connections.get(&id).map(|c| c.established) else {
                continue;
            };
            let at = established + self.duplicate_close_delay;
            tracing::debug!(%peer, connection = ?id, "a duplicate direct connection; closing it soon");
            self.duplicates.insert(id, (peer, Some(at)));
        }
        self.close_due_duplicates(Instant::now());
    }

    /// A connection to `peer` that was not a duplicate closed. If it was the
    /// one kept, the duplicates still waiting for their delay are no longer
    /// duplicates (both ends see the close and decide alike): they are
    /// judged again, so the peer stays connected.
    fn on_survivor_closed(&mut self, peer: PeerId) {
        let kept = self
            .connections
            .iter()
            .any(|(id, c)| c.peer == peer && !c.relayed && !self.duplicates.contains_key(id));
        if kept {
            return;
        }
        let before = self.duplicates.len();
        self.duplicates
            .retain(|_, (p, at)| *p != peer || at.is_none());
        if self.duplicates.len() < before {
            tracing::debug!(%peer, "the connection kept closed; its duplicates are judged again");
            self.close_duplicate_direct(peer);
        }
    }

    /// Close the duplicates whose delay is over at `now`.
    fn close_due_duplicates(&mut self, now: Instant) {
        for (id, (peer, at)) in &mut self.duplicates {
            if at.is_none_or(|at| at > now) {
                continue;
            }
            *at = None;
            self.duplicates_closed_total += 1;
            tracing::debug!(%peer, connection = ?id, "closing a duplicate direct connection");
            self.queued.push_back(ToSwarm::CloseConnection {
                peer_id: *peer,
                connection: CloseConnection::One(*id),
            });
            self.queued
                .push_back(ToSwarm::GenerateEvent(Event::DuplicateClosed));
        }
    }

    /// Arm the timer for the next duplicate due; its time once it is due.
    fn poll_duplicate_timer(&mut self, cx: &mut Context<'_>) -> Option<Instant> {
        let Some(next) = self.duplicates.values().filter_map(|(_, at)| *at).min() else {
            self.duplicate_timer = None;
            return None;
        };
        let deadline = tokio::time::Instant::from_std(next);
        let timer = self
            .duplicate_timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        timer.as_mut().poll(cx).is_ready().then_some(next)
    }

    fn trim_connections(&mut self) {
        let candidates: Vec<TrimCandidate> = self
            .connections
            .iter()
            // Duplicates are on their way out: trimming neither counts them
            // nor, choosing the newer of two, closes the one kept instead.
            .filter(|(id, _)| !self.duplicates.contains_key(id))
            .map(|(id, c)| TrimCandidate {
                id: *id,
                peer: c.peer,
                established: c.established,
                protected: self.protected.contains(&c.peer),
            })
            .collect();
        let chosen = self.trim.connections_to_close(&candidates, Instant::now());
        if chosen.is_empty() {
            return;
        }
        let mut closed = 0;
        for id in chosen {
            let Some(connection) = self.connections.get(&id) else {
                continue;
            };
            if !self.closing.insert(id) {
                // Chosen before and still closing: counted once.
                continue;
            }
            self.queued.push_back(ToSwarm::CloseConnection {
                peer_id: connection.peer,
                connection: CloseConnection::One(id),
            });
            closed += 1;
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
            self.queued
                .push_back(ToSwarm::GenerateEvent(Event::Trimmed { closed }));
        }
    }

    fn on_established(
        &mut self,
        peer: PeerId,
        connection_id: ConnectionId,
        endpoint: &ConnectedPoint,
    ) {
        let (remote, direction) = match endpoint {
            ConnectedPoint::Dialer { address, .. } => (address.clone(), Direction::Outbound),
            ConnectedPoint::Listener { send_back_addr, .. } => {
                (send_back_addr.clone(), Direction::Inbound)
            }
        };
        let relayed = endpoint.is_relayed();
        let dialed_by_us = matches!(
            endpoint,
            ConnectedPoint::Dialer {
                role_override: Endpoint::Dialer,
                ..
            }
        );
        tracing::debug!(peer_id = %peer, %remote, ?direction, relayed, "connection established");
        self.connections.insert(
            connection_id,
            Connection {
                peer,
                remote,
                direction,
                dialed_by_us,
                established: Instant::now(),
                relayed,
            },
        );
        self.established_total += 1;
        let entry = self.peers.entry(peer).or_default();
        if relayed {
            entry.relayed += 1;
            if entry.relayed > 1 {
                self.close_redundant_relayed(peer);
            }
        } else {
            entry.direct += 1;
            if entry.direct > 1 {
                self.close_duplicate_direct(peer);
            }
        }
        if let Some(pending) = self.dials.remove(&connection_id) {
            self.finished_dials.push_back((pending, Ok(peer)));
        }
        self.keep_established(peer, connection_id, relayed);
        self.trim_connections();
    }

    /// A new connection becomes the peer's kept one when the peer has none
    /// and there is room, or when it is direct and the kept one relayed.
    fn keep_established(&mut self, peer: PeerId, connection_id: ConnectionId, relayed: bool) {
        match self.kept.get(&peer).copied() {
            Some(kept) => {
                let kept_relayed = self.connections.get(&kept).is_some_and(|c| c.relayed);
                if kept_relayed && !relayed {
                    self.inner.keep_alive.set_kept(peer, kept, false);
                    self.keep(peer, connection_id);
                }
            }
            None if self.kept.len() < self.trim.low => self.keep(peer, connection_id),
            None => {}
        }
    }

    fn keep(&mut self, peer: PeerId, connection_id: ConnectionId) {
        self.kept.insert(peer, connection_id);
        self.inner.keep_alive.set_kept(peer, connection_id, true);
    }

    /// The kept connection of `peer` closed: its other connection is kept
    /// instead (direct first), or else the room goes to another peer (a
    /// protected one first, then the longest connected).
    fn replace_kept(&mut self, peer: PeerId) {
        self.kept.remove(&peer);
        let same_peer = self
            .connections
            .iter()
            .filter(|(id, c)| c.peer == peer && self.is_live(id))
            .min_by_key(|(id, c)| (c.relayed, c.established, **id))
            .map(|(id, _)| *id);
        if let Some(id) = same_peer {
            self.keep(peer, id);
            return;
        }
        if self.kept.len() >= self.trim.low {
            return;
        }
        let other = self
            .connections
            .iter()
            .filter(|(id, c)| !self.kept.contains_key(&c.peer) && self.is_live(id))
            .min_by_key(|(id, c)| {
                (
                    !self.protected.contains(&c.peer),
                    c.relayed,
                    c.established,
                    **id,
                )
            })
            .map(|(id, c)| (c.peer, *id));
        if let Some((other, id)) = other {
            self.keep(other, id);
        }
    }

    /// Whether `id` stays open: neither a duplicate waiting to close nor
    /// closed by trimming.
    fn is_live(&self, id: &ConnectionId) -> bool {
        !self.duplicates.contains_key(id) && !self.closing.contains(id)
    }

    /// Whether `peer` is one of the neighbours kept connected while idle.
    #[cfg(test)]
    pub(crate) fn is_kept(&self, peer: &PeerId) -> bool {
        self.kept.contains_key(peer)
    }

    fn on_closed(&mut self, peer: PeerId, connection_id: ConnectionId, remaining: usize) {
        if let Some(closed) = self.connections.remove(&connection_id)
            && let Some(entry) = self.peers.get_mut(&peer)
        {
            let before = entry.path();
            if closed.relayed {
                entry.relayed = entry.relayed.saturating_sub(1);
            } else {
                entry.direct = entry.direct.saturating_sub(1);
                if entry.direct == 0 {
                    entry.direct_rtt = None;
                }
            }
            let after = entry.path();
            if remaining > 0 && after != before {
                self.queued
                    .push_back(ToSwarm::GenerateEvent(Event::PathChanged {
                        peer,
                        path: after,
                    }));
            }
        }
        self.closing.remove(&connection_id);
        if self.duplicates.remove(&connection_id).is_none() {
            self.on_survivor_closed(peer);
        }
        if self.kept.get(&peer) == Some(&connection_id) {
            self.replace_kept(peer);
        }
        if remaining == 0 && self.peers.remove(&peer).is_some() {
            self.queued
                .push_back(ToSwarm::GenerateEvent(Event::PathChanged {
                    peer,
                    path: None,
                }));
        }
    }

    fn on_ping(&mut self, event: ping::Event) {
        let mut path = None;
        match &event.result {
            Ok(rtt) => {
                let relayed = self
                    .connections
                    .get(&event.connection)
                    .is_some_and(|c| c.relayed);
                if let Some(entry) = self.peers.get_mut(&event.peer) {
                    if relayed {
                        entry.relayed_rtt = Some(*rtt);
                    } else {
                        entry.direct_rtt = Some(*rtt);
                    }
                    path = entry.path();
                }
            }
            Err(e) => tracing::debug!(peer = %event.peer, error = %e, "ping failed"),
        }
        if path.is_some() {
            self.queued
                .push_back(ToSwarm::GenerateEvent(Event::PathChanged {
                    peer: event.peer,
                    path,
                }));
        }
        self.queued
            .push_back(ToSwarm::GenerateEvent(Event::Pinged(event)));
    }

    /// A connection a behaviour denied: the allow-list's are refusals.
    fn on_denied(&mut self, peer: Option<PeerId>, remote: &str, cause: &ConnectionDenied) {
        if cause.downcast_ref::<NotAllowed>().is_some() {
            tracing::warn!(peer = ?peer, %remote, "disconnected a peer that is not in allowed_peers");
            self.queued
                .push_back(ToSwarm::GenerateEvent(Event::Refused {
                    reason: Refusal::NotAllowed,
                }));
        }
    }

    /// An inbound connection failed before it was established. On a private
    /// network a failed handshake is most often a peer without the key.
    /// Anyone can cause these, so at most one warning per
    /// [`REFUSAL_WARNING_INTERVAL`]; the metric counts them all.
    fn on_handshake_failed(&mut self, remote: &str, error: &str) {
        if !self.require_auth {
            return;
        }
        self.queued
            .push_back(ToSwarm::GenerateEvent(Event::Refused {
                reason: Refusal::Handshake,
            }));
        let now = Instant::now();
        if self
            .refusal_warned
            .is_some_and(|at| now.duration_since(at) < REFUSAL_WARNING_INTERVAL)
        {
            tracing::debug!(%remote, %error, "refused a connection: private-network handshake failed");
            return;
        }
        self.refusal_warned = Some(now);
        tracing::warn!(
            %remote,
            %error,
            "refused a connection: the private-network handshake failed (the peer lacks our network key, require_auth); further refusals this minute are logged at debug and counted in ollamacron_connections_refused_total"
        );
    }
}

impl NetworkBehaviour for Behaviour {
    type ToSwarm = Event;

    delegate_connections_to_inner!();

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        match &event {
            FromSwarm::ConnectionEstablished(e) => {
                self.on_established(e.peer_id, e.connection_id, e.endpoint);
            }
            FromSwarm::ConnectionClosed(e) => {
                self.on_closed(e.peer_id, e.connection_id, e.remaining_established);
            }
            FromSwarm::DialFailure(e) => {
                let reason = dial_error_reason(e.error);
                tracing::debug!(peer = ?e.peer_id, %reason, "outgoing connection failed");
                if let DialError::Denied { cause } = e.error {
                    self.on_denied(e.peer_id, "(outbound)", cause);
                }
                if let Some(pending) = self.dials.remove(&e.connection_id) {
                    // Connected anyway (its dial raced theirs, which won):
                    // what the waiter wanted.
                    let connected = pending
                        .peer
                        .or(e.peer_id)
                        .filter(|p| self.peers.get(p).is_some_and(|e| e.direct + e.relayed > 0));
                    let result = connected.ok_or(reason);
                    self.finished_dials.push_back((pending, result));
                }
            }
            FromSwarm::ListenFailure(e) => {
                let remote = e.send_back_addr.to_string();
                let error = crate::error::error_chain(e.error);
                match e.error {
                    ListenError::Denied { cause } => self.on_denied(e.peer_id, &remote, cause),
                    ListenError::Transport(_) => self.on_handshake_failed(&remote, &error),
                    _ => {}
                }
                tracing::debug!(%remote, %error, "incoming connection failed");
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
            if let Some((pending, result)) = self.finished_dials.pop_front() {
                match result {
                    Ok(peer) => pending.succeed(peer),
                    Err(reason) => pending.fail(&reason),
                }
                continue;
            }
            if self.trim_tick.poll_tick(cx).is_ready() {
                self.lift_bans();
                self.trim_connections();
                continue;
            }
            if let Some(due) = self.poll_duplicate_timer(cx) {
                // The timer's clock may run apart from `Instant::now()`
                // (paused in tests): what it woke for is due either way.
                self.close_due_duplicates(due.max(Instant::now()));
                continue;
            }
            match self.inner.poll(cx) {
                Poll::Ready(ToSwarm::GenerateEvent(InnerEvent::Ping(event))) => {
                    self.on_ping(event);
                }
                Poll::Ready(ToSwarm::GenerateEvent(
                    InnerEvent::AllowedPeers(never)
                    | InnerEvent::ConnectionLimits(never)
                    | InnerEvent::MemoryLimits(never)
                    | InnerEvent::KeepAlive(never),
                )) => match never {},
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
