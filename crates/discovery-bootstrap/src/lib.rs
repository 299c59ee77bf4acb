#![doc = include_str!("../README.md")]

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::multiaddr::Protocol;
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, DialError, FromSwarm, NetworkBehaviour, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};
use rand::Rng;
use tokio::time::{Instant, Sleep};

/// A connection that lasted this long proves the peer healthy and clears
/// its failure count; one that drops sooner counts as a failure, so a peer
/// that accepts and then drops us is not redialed in a tight loop.
pub const STABLE_CONNECTION: Duration = Duration::from_secs(30);

/// How [`Behaviour`] keeps bootstrap connections.
///
/// Start from [`Config::default`] and change what you need with the
/// `with_*` setters; new settings can be added without breaking callers.
///
/// ```
/// use std::time::Duration;
/// use ollamacron_discovery_bootstrap::Config;
///
/// let config = Config::default()
///     .with_min_connections(1)
///     .with_backoff_max(Duration::from_secs(60));
/// assert!(config.peers.is_empty());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Config {
    /// Bootstrap peers; each address must end in `/p2p/<peer id>` (others
    /// are ignored with a warning). Several addresses of one peer are fine.
    pub peers: Vec<Multiaddr>,
    /// Keep at least this many bootstrap peers connected.
    pub min_connections: usize,
    /// Dial no more peers once this many are connected or being dialed.
    pub max_connections: usize,
    /// How often the connections are checked.
    pub check_interval: Duration,
    /// Retry delay after the first failure; doubles with each further one.
    pub backoff_initial: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            peers: Vec::new(),
            min_connections: 2,
            max_connections: 5,
            check_interval: Duration::from_secs(30),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
        }
    }
}

impl Config {
    /// The bootstrap peers, each address ending in `/p2p/<peer id>`. See
    /// [`Config::peers`].
    #[must_use]
    pub fn with_peers(mut self, peers: Vec<Multiaddr>) -> Self {
        self.peers = peers;
        self
    }

    /// Keep at least this many bootstrap peers connected. See
    /// [`Config::min_connections`].
    #[must_use]
    pub fn with_min_connections(mut self, min_connections: usize) -> Self {
        self.min_connections = min_connections;
        self
    }

    /// Dial no more peers once this many are connected or being dialed.
    /// See [`Config::max_connections`].
    #[must_use]
    pub fn with_max_connections(mut self, max_connections: usize) -> Self {
        self.max_connections = max_connections;
        self
    }

    /// How often the connections are checked. See
    /// [`Config::check_interval`].
    #[must_use]
    pub fn with_check_interval(mut self, interval: Duration) -> Self {
        self.check_interval = interval;
        self
    }

    /// Retry delay after the first failure (doubling with each further
    /// one). See [`Config::backoff_initial`].
    #[must_use]
    pub fn with_backoff_initial(mut self, delay: Duration) -> Self {
        self.backoff_initial = delay;
        self
    }

    /// Longest retry delay. See [`Config::backoff_max`].
    #[must_use]
    pub fn with_backoff_max(mut self, delay: Duration) -> Self {
        self.backoff_max = delay;
        self
    }
}

/// What happened to a bootstrap peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A dial to the peer started.
    Dialing {
        /// The peer.
        peer: PeerId,
        /// How many dials failed before this one.
        failures: u32,
    },
    /// The first connection to the peer was established.
    Connected {
        /// The peer.
        peer: PeerId,
    },
    /// The last connection to the peer closed.
    Disconnected {
        /// The peer.
        peer: PeerId,
    },
    /// A dial failed; the peer is retried after `retry_in`.
    DialFailed {
        /// The peer.
        peer: PeerId,
        /// Why, as the swarm put it.
        error: String,
        /// Consecutive failures so far.
        failures: u32,
        /// Delay before the next attempt.
        retry_in: Duration,
    },
}

/// The state of one bootstrap peer, as [`Behaviour::peers`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapPeerStatus {
    /// The peer.
    pub peer: PeerId,
    /// Its configured addresses.
    pub addresses: Vec<Multiaddr>,
    /// Open connections to it.
    pub connections: usize,
    /// Whether a dial is under way.
    pub dialing: bool,
    /// Consecutive failed dials.
    pub failures: u32,
    /// When the next attempt is allowed, if it is in backoff.
    pub retry_at: Option<std::time::Instant>,
}

#[derive(Debug)]
struct BootstrapPeer {
    addresses: Vec<Multiaddr>,
    connections: usize,
    /// When the current connection streak began.
    connected_at: Option<Instant>,
    dialing: Option<ConnectionId>,
    failures: u32,
    retry_at: Option<Instant>,
}

/// Dials the configured bootstrap peers on start and keeps between
/// `min_connections` and `max_connections` of them connected, retrying
/// unreachable ones with exponential backoff and jitter. Add it to your own
/// `#[derive(NetworkBehaviour)]`; it opens no streams.
pub struct Behaviour {
    config: Config,
    peers: HashMap<PeerId, BootstrapPeer>,
    /// Configured order, so dials are tried in the order the operator wrote.
    order: Vec<PeerId>,
    events: VecDeque<ToSwarm<Event, Infallible>>,
    timer: Pin<Box<Sleep>>,
    next_check: Instant,
    started: bool,
    check_now: bool,
}

impl std::fmt::Debug for Behaviour {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Behaviour")
            .field("config", &self.config)
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

impl Behaviour {
    /// A behaviour for `local_peer` (its own addresses among `config.peers`
    /// are skipped). Must be created inside a tokio runtime.
    #[must_use]
    pub fn new(local_peer: PeerId, config: Config) -> Self {
        let mut peers: HashMap<PeerId, BootstrapPeer> = HashMap::new();
        let mut order = Vec::new();
        for addr in &config.peers {
            let Some(Protocol::P2p(peer)) = addr.iter().last() else {
                tracing::warn!(%addr, "bootstrap address without /p2p/<peer id> ignored");
                continue;
            };
            if peer == local_peer {
                tracing::info!(%addr, "skipping a bootstrap address of this node itself");
                continue;
            }
            let entry = peers.entry(peer).or_insert_with(|| {
                order.push(peer);
                BootstrapPeer {
                    addresses: Vec::new(),
                    connections: 0,
                    connected_at: None,
                    dialing: None,
                    failures: 0,
                    retry_at: None,
                }
            });
            if !entry.addresses.contains(addr) {
                entry.addresses.push(addr.clone());
            }
        }
        let now = Instant::now();
        Self {
            next_check: now + config.check_interval,
            config,
            peers,
            order,
            events: VecDeque::new(),
            timer: Box::pin(tokio::time::sleep_until(now)),
            started: false,
            check_now: true,
        }
    }

    /// Whether `peer` is one of the configured bootstrap peers.
    #[must_use]
    pub fn is_bootstrap_peer(&self, peer: &PeerId) -> bool {
        self.peers.contains_key(peer)
    }

    /// How many bootstrap peers are connected.
    #[must_use]
    pub fn connected_count(&self) -> usize {
        self.peers.values().filter(|p| p.connections > 0).count()
    }

    /// The state of every bootstrap peer, in configured order.
    #[must_use]
    pub fn peers(&self) -> Vec<BootstrapPeerStatus> {
        let now = Instant::now();
        self.order
            .iter()
            .filter_map(|id| {
                let p = self.peers.get(id)?;
                Some(BootstrapPeerStatus {
                    peer: *id,
                    addresses: p.addresses.clone(),
                    connections: p.connections,
                    dialing: p.dialing.is_some(),
                    failures: p.failures,
                    retry_at: p.retry_at.filter(|at| *at > now).map(Instant::into_std),
                })
            })
            .collect()
    }

    /// The delay after `failures` consecutive failures: `backoff_initial`
    /// doubled per failure, capped at `backoff_max`, times a random factor in
    /// [0.75, 1.25) (still capped), so that many nodes do not retry in step.
    #[must_use]
    pub fn backoff(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(30);
        let base = self
            .config
            .backoff_initial
            .saturating_mul(1u32 << exponent)
            .min(self.config.backoff_max);
        let jitter: f64 = rand::thread_rng().gen_range(0.75..1.25);
        base.mul_f64(jitter).min(self.config.backoff_max)
    }

    /// Start dials where the policy asks for them.
    fn plan_dials(&mut self, now: Instant) {
        for peer in self.peers.values_mut() {
            if peer
                .connected_at
                .is_some_and(|at| now.saturating_duration_since(at) >= STABLE_CONNECTION)
            {
                peer.failures = 0;
            }
        }
        let connected = self.connected_count();
        let dialing = self.peers.values().filter(|p| p.dialing.is_some()).count();
        let initial = !self.started;
        self.started = true;
        if !initial && connected >= self.config.min_connections {
            return;
        }
        let mut budget = if initial {
            usize::MAX
        } else {
            self.config
                .max_connections
                .saturating_sub(connected + dialing)
        };
        for id in &self.order {
            if budget == 0 {
                break;
            }
            let Some(peer) = self.peers.get_mut(id) else {
                continue;
            };
            let in_backoff = peer.retry_at.is_some_and(|at| at > now);
            if peer.connections > 0 || peer.dialing.is_some() || in_backoff {
                continue;
            }
            let opts = DialOpts::peer_id(*id)
                .addresses(peer.addresses.clone())
                .condition(PeerCondition::DisconnectedAndNotDialing)
                .build();
            peer.dialing = Some(opts.connection_id());
            tracing::debug!(peer = %id, failures = peer.failures, "dialing bootstrap peer");
            self.events
                .push_back(ToSwarm::GenerateEvent(Event::Dialing {
                    peer: *id,
                    failures: peer.failures,
                }));
            self.events.push_back(ToSwarm::Dial { opts });
            budget -= 1;
        }
    }

    /// When the timer should fire next: the periodic check, or earlier when
    /// a peer in backoff becomes eligible while we are below the minimum.
    fn next_wakeup(&self) -> Instant {
        let connected = self.connected_count();
        let dialing = self.peers.values().filter(|p| p.dialing.is_some()).count();
        // Wake early for a retry only when the policy could start a dial.
        let below_min = connected < self.config.min_connections
            && connected + dialing < self.config.max_connections;
        let earliest_retry = self
            .peers
            .values()
            .filter(|p| p.connections == 0 && p.dialing.is_none())
            .filter_map(|p| p.retry_at)
            .min();
        match earliest_retry {
            Some(at) if below_min => at.min(self.next_check),
            _ => self.next_check,
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Event;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_pending_outbound_connection(
        &mut self,
        _: ConnectionId,
        maybe_peer: Option<PeerId>,
        _: &[Multiaddr],
        _: Endpoint,
    ) -> Result<Vec<Multiaddr>, ConnectionDenied> {
        // Anyone dialing a bootstrap peer by id gets its configured addresses.
        Ok(maybe_peer
            .and_then(|p| self.peers.get(&p))
            .map(|p| p.addresses.clone())
            .unwrap_or_default())
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm<'_>) {
        match event {
            FromSwarm::ConnectionEstablished(e) => {
                let Some(peer) = self.peers.get_mut(&e.peer_id) else {
                    return;
                };
                peer.connections += 1;
                if peer.dialing == Some(e.connection_id) || peer.connections == 1 {
                    peer.dialing = None;
                }
                peer.retry_at = None;
                if peer.connections == 1 {
                    peer.connected_at = Some(Instant::now());
                    self.events
                        .push_back(ToSwarm::GenerateEvent(Event::Connected { peer: e.peer_id }));
                }
            }
            FromSwarm::ConnectionClosed(e) => {
                let Some(peer) = self.peers.get_mut(&e.peer_id) else {
                    return;
                };
                peer.connections = e.remaining_established;
                if e.remaining_established == 0 {
                    let lasted = peer.connected_at.take().map(|at| at.elapsed());
                    if lasted.is_some_and(|d| d >= STABLE_CONNECTION) {
                        peer.failures = 0;
                    } else {
                        // Dropped soon after connecting: back off like a failed dial.
                        peer.failures = peer.failures.saturating_add(1);
                        let failures = peer.failures;
                        let delay = self.backoff(failures);
                        if let Some(peer) = self.peers.get_mut(&e.peer_id) {
                            peer.retry_at = Some(Instant::now() + delay);
                        }
                    }
                    self.events
                        .push_back(ToSwarm::GenerateEvent(Event::Disconnected {
                            peer: e.peer_id,
                        }));
                    self.check_now = true;
                }
            }
            FromSwarm::DialFailure(e) => {
                let Some(id) = e.peer_id else { return };
                let backoff_base = self.peers.get(&id).map(|p| p.failures + 1);
                let Some(failures) = backoff_base else { return };
                let retry_in = self.backoff(failures);
                let Some(peer) = self.peers.get_mut(&id) else {
                    return;
                };
                if peer.dialing != Some(e.connection_id) {
                    return;
                }
                peer.dialing = None;
                if matches!(e.error, DialError::DialPeerConditionFalse(_)) {
                    // Someone else is already dialing or connected: not a failure.
                    return;
                }
                peer.failures = failures;
                peer.retry_at = Some(Instant::now() + retry_in);
                tracing::debug!(peer = %id, failures, ?retry_in, error = %e.error, "bootstrap dial failed");
                self.events
                    .push_back(ToSwarm::GenerateEvent(Event::DialFailed {
                        peer: id,
                        error: e.error.to_string(),
                        failures,
                        retry_in,
                    }));
                self.check_now = true;
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        if let Some(event) = self.events.pop_front() {
            return Poll::Ready(event);
        }
        let now = Instant::now();
        let timer_fired = self.timer.as_mut().poll(cx).is_ready();
        if timer_fired || self.check_now {
            self.check_now = false;
            if now >= self.next_check {
                self.next_check = now + self.config.check_interval;
            }
            self.plan_dials(now);
            let wake = self.next_wakeup().max(now);
            self.timer.as_mut().reset(wake);
            // Register the waker for the new deadline.
            let _ = self.timer.as_mut().poll(cx);
        }
        match self.events.pop_front() {
            Some(event) => Poll::Ready(event),
            None => Poll::Pending,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn behaviour(initial_ms: u64, max_ms: u64) -> Behaviour {
        Behaviour::new(
            PeerId::random(),
            Config::default()
                .with_backoff_initial(Duration::from_millis(initial_ms))
                .with_backoff_max(Duration::from_millis(max_ms)),
        )
    }

    #[test]
    fn setters_change_only_their_field() {
        let peer: Multiaddr = format!("/ip4/127.0.0.1/tcp/1/p2p/{}", PeerId::random())
            .parse()
            .unwrap();
        let config = Config::default()
            .with_peers(vec![peer.clone()])
            .with_min_connections(1)
            .with_max_connections(2)
            .with_check_interval(Duration::from_secs(3))
            .with_backoff_initial(Duration::from_secs(4))
            .with_backoff_max(Duration::from_secs(5));
        assert_eq!(config.peers, vec![peer]);
        assert_eq!(config.min_connections, 1);
        assert_eq!(config.max_connections, 2);
        assert_eq!(config.check_interval, Duration::from_secs(3));
        assert_eq!(config.backoff_initial, Duration::from_secs(4));
        assert_eq!(config.backoff_max, Duration::from_secs(5));
        let default = Config::default();
        assert_eq!(
            Config::default().with_min_connections(1).max_connections,
            default.max_connections
        );
    }

    #[tokio::test]
    async fn backoff_grows_with_jitter_and_is_capped() {
        let b = behaviour(1000, 10_000);
        for _ in 0..50 {
            let first = b.backoff(1);
            assert!(
                first >= Duration::from_millis(750) && first < Duration::from_millis(1250),
                "{first:?}"
            );
            let third = b.backoff(3);
            assert!(
                third >= Duration::from_millis(3000) && third < Duration::from_millis(5000),
                "{third:?}"
            );
            assert!(b.backoff(40) <= Duration::from_millis(10_000));
        }
    }

    #[tokio::test]
    async fn own_and_peerless_addresses_are_skipped() {
        let me = PeerId::random();
        let other = PeerId::random();
        let b = Behaviour::new(
            me,
            Config::default().with_peers(vec![
                format!("/ip4/127.0.0.1/tcp/1/p2p/{me}").parse().unwrap(),
                "/ip4/127.0.0.1/tcp/2".parse().unwrap(),
                format!("/ip4/127.0.0.1/tcp/3/p2p/{other}").parse().unwrap(),
                format!("/ip4/127.0.0.2/tcp/3/p2p/{other}").parse().unwrap(),
            ]),
        );
        let peers = b.peers();
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].peer, other);
        assert_eq!(peers[0].addresses.len(), 2);
        assert!(!b.is_bootstrap_peer(&me));
    }
}
