//! The task that owns the `Swarm`. It only routes: commands from handles
//! to the behaviour that owns the state, each behaviour's events to
//! metrics, the event bus and the behaviours that act on them. The state
//! itself lives in the behaviours (peers, discovery, registry, nat).

use std::collections::HashMap;

use futures::StreamExt;
use libp2p::core::transport::ListenerId;
use libp2p::metrics::Recorder;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, Swarm, identify};
use ollamacron_config::NodeConfig;
use tokio::sync::{broadcast, oneshot, watch};

use super::events;
use super::handle::Command;
use crate::addr::{is_link_local, is_loopback, is_relayed, with_peer};
use crate::bandwidth::BandwidthLimit;
use crate::behaviour::{NodeBehaviour, NodeBehaviourEvent};
use crate::discovery::{self, DhtSummary};
use crate::error::{NodeError, error_chain};
use crate::event::{Direction, NodeEvent};
use crate::metrics::{MetricsSnapshot, NodeMetrics};
use crate::peers;
use crate::registry;
use crate::state::NodeState;
use crate::status::{
    ConnectionCounts, DiscoveryStatus, HolePunchCounts, HttpStatus, NodeStatus, PeerInfo,
    TraversalStatus,
};

/// A configured listener and whether it reported an address yet.
pub(super) struct ListenerStatus {
    configured: Multiaddr,
    reported: bool,
}

impl ListenerStatus {
    pub(super) fn new(configured: Multiaddr) -> Self {
        Self {
            configured,
            reported: false,
        }
    }
}

/// NAT traversal since start, for the status.
#[derive(Debug, Default)]
pub(super) struct TraversalCounters {
    pub(super) hole_punch: HolePunchCounts,
    pub(super) circuits_served: u64,
    /// The address AutoNAT's peers dialed us back at, when public.
    pub(super) confirmed_at: Option<Multiaddr>,
}

/// Owns the swarm; the only code that touches it.
pub(super) struct SwarmTask {
    pub(super) config: NodeConfig,
    /// `max_bandwidth`, when set.
    pub(super) bandwidth: Option<BandwidthLimit>,
    pub(super) swarm: Swarm<NodeBehaviour>,
    pub(super) commands: tokio::sync::mpsc::Receiver<Command>,
    pub(super) events: broadcast::Sender<NodeEvent>,
    pub(super) state: watch::Sender<NodeState>,
    pub(super) metrics: NodeMetrics,
    pub(super) listeners: HashMap<ListenerId, ListenerStatus>,
    pub(super) listen_addrs: Vec<Multiaddr>,
    pub(super) started: Option<oneshot::Sender<Result<(), NodeError>>>,
    pub(super) shutdown_waiters: Vec<oneshot::Sender<()>>,
    pub(super) traversal: TraversalCounters,
    /// Every configured listen address is on loopback (tests, one host):
    /// then loopback addresses are announced and dialed; otherwise a
    /// peer's loopback address would only reach ourselves.
    pub(super) loopback_only: bool,
}

impl SwarmTask {
    pub(super) async fn run(mut self) {
        if self.listeners.is_empty() {
            self.mark_running();
        }
        loop {
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
            }
            if self.state.borrow().is_terminal() {
                break;
            }
        }
        self.stop().await;
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

    pub(super) fn emit(&self, event: NodeEvent) {
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
        let behaviour = self.swarm.behaviour_mut();
        behaviour.discovery.set_running(true);
        behaviour.registry.start();
    }

    fn fail_start(&mut self, error: NodeError) {
        tracing::error!(%error, "node failed to start");
        self.set_state(NodeState::Error);
        if let Some(started) = self.started.take() {
            let _ = started.send(Err(error));
        }
    }

    fn on_command(&mut self, command: Command) {
        let behaviour = self.swarm.behaviour_mut();
        match command {
            Command::ListenAddrs { reply } => {
                let _ = reply.send(self.listen_addrs.clone());
            }
            Command::Dial { addr, reply } => {
                if *self.state.borrow() == NodeState::Running {
                    behaviour.peers.dial(addr, reply);
                } else {
                    let _ = reply.send(Err(NodeError::NotRunning));
                }
            }
            Command::ConnectedPeers { reply } => {
                let _ = reply.send(behaviour.peers.connected_peers());
            }
            Command::ReportBreaker {
                peer,
                cooling_until,
            } => behaviour.peers.report_breaker(peer, cooling_until),
            Command::KnownPeers { reply } => {
                let _ = reply.send(behaviour.discovery.known_peers());
            }
            Command::RegisterService { service, reply } => {
                let registered = behaviour.registry.register_service(&service);
                behaviour.registry.answer_after_events(reply, registered);
            }
            Command::UpdateServices { add, remove, reply } => {
                let refused = behaviour.registry.update_services(add, &remove);
                behaviour.registry.answer_after_events(reply, refused);
            }
            Command::UnregisterService { id, reply } => {
                let removed = behaviour.registry.unregister_service(&id);
                behaviour.registry.answer_after_events(reply, removed);
            }
            Command::LocalServices { reply } => {
                let _ = reply.send(behaviour.registry.local_services_with_origin());
            }
            Command::FindServices { query, reply } => {
                behaviour.registry.find_services(query, reply);
            }
            Command::FindModelProviders { model, reply } => {
                behaviour.registry.find_model_providers(&model, reply);
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::Peers { reply } => {
                let _ = reply.send(self.peer_infos());
            }
            Command::Discovery { reply } => {
                let _ = reply.send(self.discovery_status());
            }
            Command::Metrics { reply } => {
                let _ = reply.send(self.snapshot());
            }
            Command::Shutdown { reply } => self.shutdown_waiters.push(reply),
        }
    }

    fn status(&self) -> NodeStatus {
        let behaviour = self.swarm.behaviour();
        let nat = &behaviour.nat;
        let peers = &behaviour.peers;
        NodeStatus {
            peer_id: *self.swarm.local_peer_id(),
            state: *self.state.borrow(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_secs: self.metrics.endpoint.uptime().as_secs_f64(),
            listen_addrs: self.listen_addrs.clone(),
            external_addrs: self.swarm.external_addresses().cloned().collect(),
            reachability: nat.reachability(),
            nat: TraversalStatus {
                relays: nat.active_relays(),
                relay_service: nat.is_relaying(),
                circuits_served: self.traversal.circuits_served,
                hole_punch: self.traversal.hole_punch,
                why: super::nat::reachability_reason(
                    nat,
                    &self.config,
                    self.traversal.confirmed_at.as_ref(),
                ),
            },
            connections: ConnectionCounts {
                peers: peers.peer_count(),
                inbound: peers.count(Direction::Inbound),
                outbound: peers.count(Direction::Outbound),
                duplicates_closed: peers.duplicates_closed_total(),
                established_total: peers.established_total(),
                banned_now: peers.banned().0,
                banned_total: peers.banned().1,
            },
            discovery: self.discovery_status(),
            services: behaviour.registry.service_counts(),
            clock: behaviour.registry.clock_status(),
            http: HttpStatus::of(&self.config),
            bandwidth: self.bandwidth.as_ref().map(BandwidthLimit::status),
        }
    }

    /// Every known peer with what discovery and the peer behaviour know.
    fn peer_infos(&self) -> Vec<PeerInfo> {
        let unix_ms = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        };
        let behaviour = self.swarm.behaviour();
        behaviour
            .discovery
            .known_peers()
            .into_iter()
            .map(|p| {
                let entry = behaviour.peers.entry(&p.peer_id);
                PeerInfo {
                    peer_id: p.peer_id,
                    sources: p.sources,
                    addresses: p.addresses,
                    connected: p.connected,
                    connection: entry
                        .map_or(crate::status::ConnectionKind::None, |e| e.connection()),
                    latency_ms: entry
                        .and_then(peers::PeerEntry::rtt)
                        .map(|d| d.as_secs_f64() * 1000.0),
                    last_seen_ms: unix_ms(p.last_seen),
                    agent_version: entry.and_then(|e| e.agent_version().map(str::to_owned)),
                    failures: p.failures,
                    breaker: behaviour.peers.breaker(&p.peer_id),
                }
            })
            .collect()
    }

    fn dht_summary(&self) -> Option<DhtSummary> {
        self.swarm.behaviour().registry.dht().map(|dht| DhtSummary {
            server: dht.mode() == ollamacron_discovery_dht::Mode::Server,
            routing_table_size: dht.routing_table_size(),
            providers: dht.providers().len(),
            requests_sent: dht.requests_sent(),
            unannounced_keys: dht.unannounced_keys().count(),
        })
    }

    fn discovery_status(&self) -> DiscoveryStatus {
        self.swarm
            .behaviour()
            .discovery
            .status(self.dht_summary(), |s| self.metrics.source_stats(s))
    }

    fn snapshot(&self) -> MetricsSnapshot {
        let peers = &self.swarm.behaviour().peers;
        MetricsSnapshot {
            state: *self.state.borrow(),
            uptime: self.metrics.endpoint.uptime(),
            peers_connected: peers.peer_count(),
            connections_inbound: peers.count(Direction::Inbound),
            connections_outbound: peers.count(Direction::Outbound),
            connections_trimmed: peers.trimmed_total(),
            listen_addrs: self.listen_addrs.len(),
        }
    }

    fn update_connection_gauges(&self) {
        let peers = &self.swarm.behaviour().peers;
        for direction in [Direction::Inbound, Direction::Outbound] {
            self.metrics
                .set_connections(direction, peers.count(direction), peers.peer_count());
        }
    }

    fn update_table_gauges(&self) {
        let routing = self.dht_summary().map_or(0, |d| d.routing_table_size);
        self.metrics
            .set_table_sizes(self.swarm.behaviour().discovery.known_count(), routing);
    }

    fn on_swarm_event(&mut self, event: SwarmEvent<NodeBehaviourEvent>) {
        self.metrics.libp2p.record(&event);
        match event {
            SwarmEvent::Behaviour(NodeBehaviourEvent::Peers(event)) => self.on_peers(event),
            SwarmEvent::Behaviour(NodeBehaviourEvent::Identify(event)) => {
                self.metrics.libp2p.record(&event);
                self.on_identify(event);
            }
            SwarmEvent::Behaviour(NodeBehaviourEvent::Discovery(event)) => {
                self.on_discovery(&event);
            }
            SwarmEvent::Behaviour(NodeBehaviourEvent::Registry(event)) => self.on_registry(event),
            SwarmEvent::Behaviour(NodeBehaviourEvent::Nat(event)) => self.on_nat(event),
            SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } => self.on_new_listen_addr(listener_id, address),
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
                self.swarm.remove_external_address(&address);
                let relayed = is_relayed(&address);
                self.emit(NodeEvent::ListenAddrRemoved { addr: address });
                if relayed {
                    self.swarm.behaviour_mut().registry.announce_addresses();
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
                if addresses.iter().any(is_relayed) {
                    // A reservation ended: stop announcing its address.
                    self.swarm.behaviour_mut().registry.announce_addresses();
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
                // DCUtR starts on the side that accepted the relayed
                // connection: that side counts the attempt.
                if endpoint.is_relayed() && endpoint.is_listener() && self.config.enable_hole_punch
                {
                    self.metrics.hole_punch_started();
                    self.traversal.hole_punch.attempts += 1;
                }
                if num_established.get() == 1 {
                    self.emit(NodeEvent::PeerConnected {
                        peer_id,
                        addr: endpoint.get_remote_address().clone(),
                        direction: if endpoint.is_dialer() {
                            Direction::Outbound
                        } else {
                            Direction::Inbound
                        },
                    });
                }
                self.update_connection_gauges();
                if *self.state.borrow() == NodeState::Stopping {
                    self.swarm.close_connection(connection_id);
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established,
                cause,
                ..
            } => {
                tracing::debug!(%peer_id, cause = ?cause.as_ref().map(ToString::to_string), "connection closed");
                if num_established == 0 {
                    self.emit(NodeEvent::PeerDisconnected { peer_id });
                }
                self.update_connection_gauges();
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer_id = ?peer_id, %error, "dial failed");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                tracing::debug!(%send_back_addr, %error, "incoming connection failed");
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

    fn on_new_listen_addr(&mut self, listener_id: ListenerId, address: Multiaddr) {
        let peer_id = *self.swarm.local_peer_id();
        let relayed = is_relayed(&address);
        let new = !self.listen_addrs.contains(&address);
        if new {
            tracing::info!(address = %with_peer(address.clone(), peer_id), "listening");
            self.listen_addrs.push(address.clone());
        }
        // What we listen on is what we announce (identify, DHT provider
        // records), with AutoNAT's findings added; loopback only when that
        // is all we have. Of the addresses a relay reports, the relay
        // client confirms the one we reserved through (and expires it with
        // the reservation): the others are the relay's to claim, not ours
        // to announce.
        if !relayed && !is_link_local(&address) && (self.loopback_only || !is_loopback(&address)) {
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
            // Peers that find our services must learn the relay address:
            // re-sign the record and re-announce (once per reservation,
            // not on every renewal).
            self.swarm.behaviour_mut().registry.announce_addresses();
        }
    }

    fn on_peers(&mut self, event: peers::Event) {
        self.metrics.record(&event);
        match event {
            peers::Event::Pinged(event) => self.metrics.libp2p.record(&event),
            peers::Event::PathChanged { peer, path } => {
                self.swarm.behaviour_mut().registry.set_path(peer, path);
            }
            peers::Event::Trimmed { closed } => {
                self.emit(NodeEvent::ConnectionsTrimmed { count: closed });
            }
            peers::Event::Refused { .. } | peers::Event::DuplicateClosed => {}
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
                let behaviour = self.swarm.behaviour_mut();
                let changed = behaviour.peers.identified(
                    peer_id,
                    &info.protocol_version,
                    &info.agent_version,
                );
                behaviour.discovery.on_identified(peer_id, &info);
                behaviour.registry.on_identified(peer_id, &info);
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

    fn on_discovery(&mut self, event: &discovery::Event) {
        self.metrics.record(event);
        if let Some(node_event) = events::from_discovery(event) {
            self.emit(node_event);
        }
        if let discovery::Event::TableChanged { .. } = event {
            self.update_table_gauges();
        }
    }

    fn on_registry(&mut self, event: registry::Event) {
        self.metrics.record(&event);
        for node_event in events::from_registry(&event) {
            self.emit(node_event);
        }
        match event {
            registry::Event::Dht(event) => self.on_dht(event),
            registry::Event::Gossip(event) => self.metrics.libp2p.record(event.as_ref()),
            registry::Event::Misbehaving {
                peer,
                invalid_records,
                reason,
            } => {
                let reason = format!(
                    "{invalid_records} invalid records within a minute, the last one: {reason}"
                );
                let ban = peers::PEER_BAN_DURATION;
                if self.swarm.behaviour_mut().peers.ban(peer, ban, &reason) {
                    self.metrics.peers_banned.inc();
                    self.emit(NodeEvent::PeerBanned {
                        peer_id: peer,
                        reason,
                        ban,
                    });
                }
            }
            _ => {}
        }
    }

    /// What the DHT learned of peers goes to discovery.
    fn on_dht(&mut self, event: ollamacron_discovery_dht::Event) {
        use ollamacron_discovery_dht::Event;
        let discovery = &mut self.swarm.behaviour_mut().discovery;
        match event {
            Event::ProviderFound { peer, addresses } => {
                discovery.on_dht_provider(peer, &addresses);
            }
            Event::PeerAddresses { peer, addresses } => {
                discovery.on_dht_addresses(peer, &addresses);
            }
            Event::RoutingUpdated {
                peer, addresses, ..
            } => discovery.on_dht_routing(peer, &addresses),
            Event::BootstrapFinished {
                ok,
                routing_table_size,
            } => {
                tracing::debug!(ok, routing_table_size, "DHT bootstrap finished");
                self.update_table_gauges();
            }
            Event::Advertised { ok } => {
                tracing::debug!(ok, "announced the namespace in the DHT");
            }
            Event::ModeChanged { mode } => {
                tracing::info!(?mode, "DHT mode changed");
            }
            _ => {}
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
            let behaviour = self.swarm.behaviour_mut();
            behaviour.discovery.set_running(false);
            behaviour.registry.answer_lookups(true);
            behaviour.registry.flush_answers();
            behaviour.peers.fail_dials("the node is shutting down");
            let listener_ids: Vec<ListenerId> = self.listeners.keys().copied().collect();
            for id in listener_ids {
                self.swarm.remove_listener(id);
            }
            let peers: Vec<libp2p::PeerId> = self.swarm.connected_peers().copied().collect();
            for peer in peers {
                let _ = self.swarm.disconnect_peer_id(peer);
            }
            let deadline = tokio::time::sleep(self.config.shutdown_timeout);
            tokio::pin!(deadline);
            while self.swarm.behaviour().peers.connection_count() > 0 {
                tokio::select! {
                    event = self.swarm.select_next_some() => self.on_swarm_event(event),
                    () = &mut deadline => {
                        tracing::warn!(open = self.swarm.behaviour().peers.connection_count(), "shutdown timeout: dropping remaining connections");
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
