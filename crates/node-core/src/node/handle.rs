//! `NodeHandle`: the cheap, cloneable way to talk to a running node. Every
//! method that needs the swarm sends a [`Command`] to the swarm task and
//! awaits its reply.

use std::net::SocketAddr;
use std::time::Instant;

use libp2p::{Multiaddr, PeerId};
use ollamacron_service_registry::{RankedService, ServiceInfo, ServiceQuery};

use crate::registrations::RegistrationFile;
use crate::registry::{LocalService, ModelProviders, ServiceOrigin};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::addr::with_peer;
use crate::error::NodeError;
use crate::event::NodeEvent;
use crate::metrics::{MetricsEndpoint, MetricsSnapshot};
use crate::state::NodeState;
use crate::status::{ConnectedPeer, DiscoveryStatus, KnownPeer, NodeStatus, PeerInfo};

/// What the swarm task is asked to do.
pub(super) enum Command {
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
        reply: oneshot::Sender<Vec<LocalService>>,
    },
    FindServices {
        query: ServiceQuery,
        reply: oneshot::Sender<Vec<RankedService>>,
    },
    FindModelProviders {
        model: String,
        reply: oneshot::Sender<ModelProviders>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

/// A cheap, cloneable handle to a running node. Every method that needs
/// the swarm sends a command to the swarm task and awaits its reply.
#[derive(Debug, Clone)]
pub struct NodeHandle {
    pub(super) commands: mpsc::Sender<Command>,
    pub(super) shared: HandleShared,
}

/// What every handle, strong or weak, reads without the swarm task.
#[derive(Debug, Clone)]
pub(super) struct HandleShared {
    pub(super) peer_id: PeerId,
    pub(super) events: broadcast::Sender<NodeEvent>,
    pub(super) state: watch::Receiver<NodeState>,
    pub(super) metrics: MetricsEndpoint,
    /// Set once by [`start_api`](crate::start_api).
    pub(super) api_addr: std::sync::Arc<std::sync::OnceLock<SocketAddr>>,
    pub(super) streams: StreamControl,
    /// Where API registrations are kept, when the node keeps them.
    pub(super) registrations: Option<std::sync::Arc<RegistrationStore>>,
}

/// The registration file and the lock that orders its writes: a change
/// and the write of its result are one step, so two registrations at once
/// cannot leave the file with the older list.
#[derive(Debug)]
pub(super) struct RegistrationStore {
    file: RegistrationFile,
    writing: tokio::sync::Mutex<()>,
}

impl RegistrationStore {
    pub(super) fn new(file: RegistrationFile) -> Self {
        Self {
            file,
            writing: tokio::sync::Mutex::new(()),
        }
    }
}

/// [`libp2p_stream::Control`], which has no `Debug` of its own.
#[derive(Clone)]
pub(super) struct StreamControl(pub(super) libp2p_stream::Control);

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

    /// The bound address of the HTTP API, once [`start_api`](crate::start_api)
    /// serves it for this node.
    #[must_use]
    pub fn api_addr(&self) -> Option<SocketAddr> {
        self.shared.api_addr.get().copied()
    }

    /// The node's metrics registry and uptime, for the API.
    pub(crate) fn metrics_endpoint(&self) -> MetricsEndpoint {
        self.shared.metrics.clone()
    }

    /// The node's lifecycle state as a watch, for the API.
    pub(crate) fn state_watch(&self) -> watch::Receiver<NodeState> {
        self.shared.state.clone()
    }

    /// Record where the node's API listens (once).
    pub(crate) fn set_api_addr(&self, addr: SocketAddr) {
        let _ = self.shared.api_addr.set(addr);
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
    /// into this node's record and published at once. When the node keeps
    /// a registration file ([`Node::with_registration_file`](crate::Node::with_registration_file)),
    /// the service is saved there before this returns, and offered again
    /// after a restart.
    ///
    /// # Errors
    /// [`NodeError::Service`] naming what is wrong (empty id or type, a
    /// field over the record limits, too many services); nothing changes.
    /// [`NodeError::Registration`] when it cannot be saved: it is offered
    /// then, but only until the node stops.
    pub async fn register_service(&self, service: ServiceInfo) -> Result<(), NodeError> {
        self.changing_registrations(|node, _| async move {
            node.request(|reply| Command::RegisterService {
                service: Box::new(service),
                reply,
            })
            .await??;
            Ok(((), true))
        })
        .await
    }

    /// Run `change`, which answers its result and whether the API's
    /// registrations changed. When the node keeps a registration file
    /// (`change` is told whether it does), the change and the write of its
    /// result are one step under the file's lock, in a task of its own: a
    /// caller that goes away (an HTTP client hanging up) cannot stop it
    /// halfway.
    async fn changing_registrations<T, F, Fut>(&self, change: F) -> Result<T, NodeError>
    where
        T: Send + 'static,
        F: FnOnce(Self, bool) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(T, bool), NodeError>> + Send,
    {
        let Some(store) = self.shared.registrations.clone() else {
            return change(self.clone(), false).await.map(|(value, _)| value);
        };
        let node = self.clone();
        tokio::spawn(async move {
            let _writing = store.writing.lock().await;
            let (value, changed) = change(node.clone(), true).await?;
            if changed {
                node.save_registrations(&store).await?;
            }
            Ok(value)
        })
        .await
        .map_err(|_| NodeError::Failed)?
    }

    /// Write the API's registrations to the registration file (the caller
    /// holds its lock).
    async fn save_registrations(
        &self,
        store: &std::sync::Arc<RegistrationStore>,
    ) -> Result<(), NodeError> {
        let store = std::sync::Arc::clone(store);
        let services: Vec<ServiceInfo> = self
            .local_services_with_origin()
            .await?
            .into_iter()
            .filter(|s| s.origin == ServiceOrigin::Api)
            .map(|s| s.service)
            .collect();
        tokio::task::spawn_blocking(move || store.file.store(&services))
            .await
            .map_err(|_| NodeError::Failed)??;
        Ok(())
    }

    /// Stop offering the services with the ids in `remove`, then offer each
    /// of `add` (replacing the one with the same id), and sign and publish
    /// one record for all of it: changing N services costs one publication,
    /// not N (an id in both lists is simply replaced). Each service of `add`
    /// is checked on its own, as
    /// [`register_service`](Self::register_service) checks it; one that
    /// would make the record invalid is left out and returned with its id
    /// and the reason, and the others still apply. The services it adds
    /// are listed as mirrored (`ollama`) and never saved; one registered
    /// through the API that it replaces or removes leaves the registration
    /// file too.
    ///
    /// # Errors
    /// [`NodeError::NotRunning`] once the node has stopped;
    /// [`NodeError::Registration`] when the registration file cannot be
    /// rewritten.
    pub async fn update_services(
        &self,
        add: Vec<ServiceInfo>,
        remove: Vec<String>,
    ) -> Result<Vec<(String, NodeError)>, NodeError> {
        self.changing_registrations(|node, kept| async move {
            // A service registered through the API that this replaces or
            // removes leaves the registration file too.
            let touched_api = kept
                && node.local_services_with_origin().await?.iter().any(|s| {
                    s.origin == ServiceOrigin::Api
                        && (remove.contains(&s.service.id)
                            || add.iter().any(|a| a.id == s.service.id))
                });
            let refused = node
                .request(|reply| Command::UpdateServices { add, remove, reply })
                .await?;
            Ok((refused, touched_api))
        })
        .await
    }

    /// Stop offering a service; `false` if none had this id. A registration
    /// file the node keeps no longer holds it when this returns.
    ///
    /// # Errors
    /// [`NodeError::NotRunning`] once the node has stopped;
    /// [`NodeError::Registration`] when the file cannot be written (the
    /// service would come back after a restart).
    pub async fn unregister_service(&self, id: &str) -> Result<bool, NodeError> {
        let id = id.to_owned();
        self.changing_registrations(|node, _| async move {
            let removed = node
                .request(|reply| Command::UnregisterService { id, reply })
                .await?;
            Ok((removed, removed))
        })
        .await
    }

    /// The services this node offers.
    ///
    /// # Errors
    /// [`NodeError::NotRunning`] once the node has stopped.
    pub async fn local_services(&self) -> Result<Vec<ServiceInfo>, NodeError> {
        Ok(self
            .local_services_with_origin()
            .await?
            .into_iter()
            .map(|s| s.service)
            .collect())
    }

    /// The services this node offers, with where each came from (the
    /// configuration, the API, or Ollama).
    ///
    /// # Errors
    /// [`NodeError::NotRunning`] once the node has stopped.
    pub async fn local_services_with_origin(&self) -> Result<Vec<LocalService>, NodeError> {
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

    /// Every model of the mesh (services of the [`MODEL_SERVICE_TYPES`](crate::MODEL_SERVICE_TYPES),
    /// ours included) with the nodes serving it, loaded or cold, their
    /// load and how we reach them: one lookup per type, side by side, as
    /// [`NodeHandle::find_services`] answers it.
    ///
    /// # Errors
    /// [`NodeError::NotRunning`] once the node has stopped.
    pub async fn models(&self) -> Result<Vec<crate::MeshModel>, NodeError> {
        // The lookups at once: each may wait for the network.
        let lookups = crate::MODEL_SERVICE_TYPES.iter().map(|kind| {
            self.find_services(ServiceQuery {
                service_type: Some((*kind).to_owned()),
                ..ServiceQuery::default()
            })
        });
        let (found, peers) = futures::join!(futures::future::try_join_all(lookups), self.peers());
        let services = found?.into_iter().flatten().collect();
        let peers = peers?;
        Ok(crate::mesh_models(services, &peers))
    }

    /// The providers of `model` (`name` = `name:latest`) in the DHT, from
    /// one exact query of its key (`/ollamacron/models/<name:tag>`) that
    /// bypasses the cache, with the requests it took. For diagnostics and
    /// measurements; [`NodeHandle::find_services`] with
    /// [`ServiceQuery::model`] is the ranked, verified answer.
    ///
    /// # Errors
    /// [`NodeError::NotRunning`] once the node has stopped.
    pub async fn find_model_providers(&self, model: &str) -> Result<ModelProviders, NodeError> {
        let model = model.to_owned();
        self.request(|reply| Command::FindModelProviders { model, reply })
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
