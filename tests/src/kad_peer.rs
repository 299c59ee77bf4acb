//! An independent Kademlia peer, built from plain rust-libp2p: TCP with
//! Noise and Yamux, identify, and Kademlia on `/ollamacron/kad/1.0.0` with
//! libp2p's own unfiltered store. It stores whatever it is given, so tests use it
//! both as another implementation reading our records and as a rogue peer
//! serving or pushing bad ones.

use std::time::Duration;

use futures::StreamExt;
use libp2p::kad::store::RecordStore;
use libp2p::kad::{self, ProviderRecord, QueryId, QueryResult, Record, RecordKey};
use libp2p::swarm::dial_opts::{DialOpts, PeerCondition};
use libp2p::swarm::{NetworkBehaviour, SwarmEvent};
use libp2p::{Multiaddr, PeerId, StreamProtocol, SwarmBuilder, identify, noise, tcp, yamux};
use tokio::sync::{mpsc, oneshot};

/// Room for large (and over-large) records in one message.
const MAX_PACKET_BYTES: usize = 1024 * 1024;
/// Longest any request to the peer may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(NetworkBehaviour)]
struct KadPeerBehaviour {
    identify: identify::Behaviour,
    kad: kad::Behaviour<kad::store::MemoryStore>,
}

/// Records found so far under a key, with who answered.
type FoundRecords = Vec<(Option<PeerId>, Record)>;
type PendingGet = (QueryId, FoundRecords, oneshot::Sender<FoundRecords>);
type PendingProviders = (QueryId, Vec<PeerId>, oneshot::Sender<Vec<PeerId>>);

enum Request {
    Dial(Multiaddr, oneshot::Sender<Result<(), String>>),
    PutTo(Record, PeerId, oneshot::Sender<Result<(), String>>),
    Get(RecordKey, oneshot::Sender<FoundRecords>),
    Providers(RecordKey, oneshot::Sender<Vec<PeerId>>),
    StoreLocal(Record),
    AddProvider(ProviderRecord),
    Addrs(oneshot::Sender<Vec<Multiaddr>>),
}

/// A running independent peer; dropped, it stops.
pub struct KadPeer {
    peer_id: PeerId,
    keypair: libp2p::identity::Keypair,
    requests: mpsc::Sender<Request>,
}

impl KadPeer {
    /// Start one listening on 127.0.0.1, in DHT server mode, announcing
    /// `protocol_version` through identify.
    ///
    /// # Errors
    /// A description of what could not be built.
    pub async fn start(protocol_version: &str) -> Result<Self, String> {
        let keypair = libp2p::identity::Keypair::generate_ed25519();
        let protocol_version = protocol_version.to_owned();
        let mut swarm = SwarmBuilder::with_existing_identity(keypair.clone())
            .with_tokio()
            .with_tcp(
                tcp::Config::default(),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| e.to_string())?
            .with_behaviour(|key| {
                let peer = key.public().to_peer_id();
                let mut config = kad::Config::new(StreamProtocol::new("/ollamacron/kad/1.0.0"));
                config.set_max_packet_size(MAX_PACKET_BYTES);
                let mut kad = kad::Behaviour::with_config(
                    peer,
                    kad::store::MemoryStore::with_config(
                        peer,
                        kad::store::MemoryStoreConfig {
                            max_value_bytes: MAX_PACKET_BYTES,
                            ..kad::store::MemoryStoreConfig::default()
                        },
                    ),
                    config,
                );
                kad.set_mode(Some(kad::Mode::Server));
                KadPeerBehaviour {
                    identify: identify::Behaviour::new(identify::Config::new(
                        protocol_version.clone(),
                        key.public(),
                    )),
                    kad,
                }
            })
            .map_err(|e| e.to_string())?
            .build();
        swarm
            .listen_on("/ip4/127.0.0.1/tcp/0".parse().map_err(|e| format!("{e}"))?)
            .map_err(|e| e.to_string())?;
        let peer_id = *swarm.local_peer_id();
        let (requests, mut inbox) = mpsc::channel::<Request>(16);
        tokio::spawn(async move {
            let mut dials: Vec<(PeerId, oneshot::Sender<Result<(), String>>)> = Vec::new();
            let mut puts: Vec<(QueryId, oneshot::Sender<Result<(), String>>)> = Vec::new();
            let mut gets: Vec<PendingGet> = Vec::new();
            let mut provider_queries: Vec<PendingProviders> = Vec::new();
            let mut listen: Vec<Multiaddr> = Vec::new();
            loop {
                tokio::select! {
                    request = inbox.recv() => match request {
                        None => break,
                        Some(Request::Dial(addr, reply)) => {
                            let peer = addr.iter().find_map(|p| match p {
                                libp2p::multiaddr::Protocol::P2p(peer) => Some(peer),
                                _ => None,
                            });
                            // From a port of its own, not the listening one: another
                            // dial to the same peer may hold that address pair already
                            // (the kernel answers "address already in use").
                            let dialed = peer.map(|peer| swarm.dial(
                                DialOpts::peer_id(peer).condition(PeerCondition::Always).addresses(vec![addr.clone()]).allocate_new_port().build(),
                            ));
                            match (peer, dialed) {
                                (Some(peer), Some(Ok(()))) => {
                                    swarm.behaviour_mut().kad.add_address(&peer, addr);
                                    dials.push((peer, reply));
                                }
                                (_, Some(Err(e))) => { let _ = reply.send(Err(e.to_string())); }
                                _ => { let _ = reply.send(Err("address lacks /p2p".into())); }
                            }
                        }
                        Some(Request::PutTo(record, peer, reply)) => {
                            let id = swarm.behaviour_mut().kad.put_record_to(record, std::iter::once(peer), kad::Quorum::One);
                            puts.push((id, reply));
                        }
                        Some(Request::Get(key, reply)) => {
                            let id = swarm.behaviour_mut().kad.get_record(key);
                            gets.push((id, Vec::new(), reply));
                        }
                        Some(Request::Providers(key, reply)) => {
                            let id = swarm.behaviour_mut().kad.get_providers(key);
                            provider_queries.push((id, Vec::new(), reply));
                        }
                        Some(Request::StoreLocal(record)) => {
                            let _ = swarm.behaviour_mut().kad.store_mut().put(record);
                        }
                        Some(Request::AddProvider(record)) => {
                            let _ = swarm.behaviour_mut().kad.store_mut().add_provider(record);
                        }
                        Some(Request::Addrs(reply)) => {
                            let _ = reply.send(listen.clone());
                        }
                    },
                    event = swarm.select_next_some() => match event {
                        SwarmEvent::NewListenAddr { address, .. } => listen.push(address),
                        SwarmEvent::ConnectionEstablished { peer_id, .. } => {
                            let (done, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut dials).into_iter().partition(|(p, _)| *p == peer_id);
                            dials = rest;
                            for (_, reply) in done { let _ = reply.send(Ok(())); }
                        }
                        SwarmEvent::OutgoingConnectionError { peer_id: Some(peer), error, .. } => {
                            let (done, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut dials).into_iter().partition(|(p, _)| *p == peer);
                            dials = rest;
                            for (_, reply) in done { let _ = reply.send(Err(error.to_string())); }
                        }
                        SwarmEvent::Behaviour(KadPeerBehaviourEvent::Kad(kad::Event::OutboundQueryProgressed { id, result, step, .. })) => {
                            match result {
                                QueryResult::PutRecord(r) => {
                                    if let Some(i) = puts.iter().position(|(q, _)| *q == id) {
                                        let (_, reply) = puts.swap_remove(i);
                                        let _ = reply.send(r.map(|_| ()).map_err(|e| e.to_string()));
                                    }
                                }
                                QueryResult::GetRecord(r) => {
                                    if let Some(entry) = gets.iter_mut().find(|(q, _, _)| *q == id)
                                        && let Ok(kad::GetRecordOk::FoundRecord(found)) = r
                                    {
                                        entry.1.push((found.peer, found.record));
                                    }
                                    if step.last && let Some(i) = gets.iter().position(|(q, _, _)| *q == id) {
                                        let (_, found, reply) = gets.swap_remove(i);
                                        let _ = reply.send(found);
                                    }
                                }
                                QueryResult::GetProviders(r) => {
                                    if let Some(entry) = provider_queries.iter_mut().find(|(q, _, _)| *q == id)
                                        && let Ok(kad::GetProvidersOk::FoundProviders { providers, .. }) = r
                                    {
                                        entry.1.extend(providers);
                                    }
                                    if step.last && let Some(i) = provider_queries.iter().position(|(q, _, _)| *q == id) {
                                        let (_, found, reply) = provider_queries.swap_remove(i);
                                        let _ = reply.send(found);
                                    }
                                }
                                _ => {}
                            }
                        }
                        _ => {}
                    }
                }
            }
        });
        Ok(Self {
            peer_id,
            keypair,
            requests,
        })
    }

    /// Its peer id.
    #[must_use]
    pub fn peer_id(&self) -> PeerId {
        self.peer_id
    }

    /// Its identity key (to sign records as this peer).
    #[must_use]
    pub fn keypair(&self) -> &libp2p::identity::Keypair {
        &self.keypair
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Request) -> Result<T, String> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(make(tx))
            .await
            .map_err(|_| "the peer's task has ended".to_owned())?;
        tokio::time::timeout(QUERY_TIMEOUT, rx)
            .await
            .map_err(|_| format!("no answer within {QUERY_TIMEOUT:?}"))?
            .map_err(|_| "the peer's task has ended".to_owned())
    }

    /// Its listen addresses with `/p2p/<peer id>`.
    ///
    /// # Errors
    /// When the peer's task has ended or has no address yet.
    pub async fn dialable_addr(&self) -> Result<Multiaddr, String> {
        let peer = self.peer_id;
        crate::eventually("the Kademlia peer to listen", || async {
            self.ask(Request::Addrs)
                .await
                .ok()?
                .first()
                .map(|a| a.clone().with(libp2p::multiaddr::Protocol::P2p(peer)))
        })
        .await
    }

    /// Dial `addr` (ending in `/p2p/<peer id>`) and add it to the routing table.
    ///
    /// # Errors
    /// The dial's failure.
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), String> {
        self.ask(|tx| Request::Dial(addr, tx)).await?
    }

    /// PUT `record` to `peer` only.
    ///
    /// # Errors
    /// When the peer does not acknowledge it.
    pub async fn put_to(&self, record: Record, peer: PeerId) -> Result<(), String> {
        self.ask(|tx| Request::PutTo(record, peer, tx)).await?
    }

    /// Every record found under `key`, with who answered.
    ///
    /// # Errors
    /// When the query does not finish in time.
    pub async fn get(&self, key: RecordKey) -> Result<FoundRecords, String> {
        self.ask(|tx| Request::Get(key, tx)).await
    }

    /// Every provider found under `key`.
    ///
    /// # Errors
    /// When the query does not finish in time.
    pub async fn providers(&self, key: RecordKey) -> Result<Vec<PeerId>, String> {
        self.ask(|tx| Request::Providers(key, tx)).await
    }

    /// Hold `record` in its own store, unverified, to serve to whoever asks.
    ///
    /// # Errors
    /// When the peer's task has ended.
    pub async fn store(&self, record: Record) -> Result<(), String> {
        self.requests
            .send(Request::StoreLocal(record))
            .await
            .map_err(|_| "the peer's task has ended".to_owned())
    }

    /// Hold a provider record in its own store, to serve to whoever asks.
    ///
    /// # Errors
    /// When the peer's task has ended.
    pub async fn add_provider(&self, record: ProviderRecord) -> Result<(), String> {
        self.requests
            .send(Request::AddProvider(record))
            .await
            .map_err(|_| "the peer's task has ended".to_owned())
    }
}
