//! The latency transport: libp2p's [`MemoryTransport`] with a one-way
//! delay on every link, per-node byte counters, and crashes.
//!
//! Node `i` of a [`SimNetwork`] listens on `/memory/<base_port + i>`. A
//! connection between nodes `a` and `b` is a link whose round trip is drawn
//! once per pair from the network's RTT range with a seeded generator, so
//! every connection between the same two nodes has the same RTT in every
//! run with the same seed. Every byte written on a link arrives at the
//! other end half that RTT later (in order; bandwidth is not modelled),
//! and a dial completes one RTT after it starts (TCP's handshake).
//!
//! On the memory channel the dialer first sends the link's id (8 bytes),
//! then each write as a frame: the instant it may be read (8 bytes, in
//! nanoseconds since the network's epoch), its length (4 bytes) and the
//! bytes. The reader holds a frame back until its instant. Neither the id
//! nor the frame headers are counted as traffic: the counters see what
//! the node's Noise sessions put on the wire.

use std::collections::HashMap;
use std::io;
use std::ops::RangeInclusive;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::future::BoxFuture;
use futures::task::AtomicWaker;
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, FutureExt};
use ollamacron_node_core::libp2p::core::muxing::StreamMuxerBox;
use ollamacron_node_core::libp2p::core::transport::memory::{Channel, MemoryTransportError};
use ollamacron_node_core::libp2p::core::transport::{
    Boxed, DialOpts, ListenerId, MemoryTransport, TransportError, TransportEvent,
};
use ollamacron_node_core::libp2p::core::upgrade::Version;
use ollamacron_node_core::libp2p::identity::Keypair;
use ollamacron_node_core::libp2p::multiaddr::Protocol;
use ollamacron_node_core::libp2p::{Multiaddr, PeerId, Transport, noise, yamux};
use tokio::time::{Instant, Sleep};

/// Bytes of a frame header: the instant it may be read, and its length.
const HEADER_LEN: usize = 12;
/// Largest frame: a longer write is accepted in parts.
const MAX_FRAME_LEN: usize = 64 * 1024;
/// Longest a connection may take to negotiate security and muxing (as
/// the node's own TCP transport).
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(20);
/// Largest frame buffer a stream keeps between writes.
const KEEP_OUT_CAPACITY: usize = 4 * 1024;
/// Once a node's link list is this long, dropped links are swept out.
const LINK_SWEEP_AT: usize = 64;

/// Which end of a link a stream is.
const DIALER: usize = 0;
const LISTENER: usize = 1;
/// Which waker of an end: its reader's or its writer's.
const READ: usize = 0;
const WRITE: usize = 1;

/// What a [`SimNetwork`] is made of.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Number of nodes (indices `0..nodes`).
    pub nodes: usize,
    /// The range every link's round trip is drawn from (uniformly).
    pub rtt: RangeInclusive<Duration>,
    /// Seed of the per-link draws.
    pub seed: u64,
    /// Node `i` listens on `/memory/<base_port + i>`; must be at least 1.
    pub base_port: u64,
}

impl SimConfig {
    /// `nodes` nodes with round trips in `rtt`, seed 1, on `/memory/1…`.
    #[must_use]
    pub fn new(nodes: usize, rtt: RangeInclusive<Duration>) -> Self {
        Self {
            nodes,
            rtt,
            seed: 1,
            base_port: 1,
        }
    }
}

/// Bytes a node sent and received over its links.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Bytes written by the node.
    pub sent: u64,
    /// Bytes delivered to the node.
    pub received: u64,
}

impl Traffic {
    /// Sent plus received.
    #[must_use]
    pub fn total(self) -> u64 {
        self.sent + self.received
    }
}

/// An in-memory network of nodes with per-link latency. Cheap to clone;
/// every clone is the same network.
#[derive(Clone)]
pub struct SimNetwork {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for SimNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimNetwork")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

struct Shared {
    config: SimConfig,
    epoch: Instant,
    nodes: Vec<NodeSlot>,
    /// Links a dialer opened whose listener has not claimed them yet.
    pending: Mutex<HashMap<u64, Arc<Link>>>,
    next_link: AtomicU64,
}

#[derive(Default)]
struct NodeSlot {
    sent: AtomicU64,
    received: AtomicU64,
    crashed: AtomicBool,
    links: Mutex<Vec<Weak<Link>>>,
}

/// One connection between two nodes.
struct Link {
    id: u64,
    /// The dialer's and the listener's node.
    ends: [usize; 2],
    one_way: Duration,
    severed: AtomicBool,
    /// `wakers[end][READ | WRITE]`: woken when the link is severed.
    wakers: [[AtomicWaker; 2]; 2],
}

impl Link {
    fn sever(&self) {
        self.severed.store(true, Ordering::SeqCst);
        for end in &self.wakers {
            for waker in end {
                waker.wake();
            }
        }
    }

    fn is_severed(&self) -> bool {
        self.severed.load(Ordering::SeqCst)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn refused(why: String) -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionRefused, why)
}

fn reset() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionReset,
        "the simulated link was severed (a node crashed)",
    )
}

fn memory_error(e: MemoryTransportError) -> io::Error {
    let kind = match e {
        MemoryTransportError::Unreachable => io::ErrorKind::ConnectionRefused,
        MemoryTransportError::AlreadyInUse => io::ErrorKind::AddrInUse,
    };
    io::Error::new(kind, e)
}

/// SplitMix64: one step of a small seeded generator, good enough to draw
/// a link's RTT from (seed, pair).
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The `/memory/<port>` of an address (a `/p2p/...` suffix is allowed).
fn memory_port(addr: &Multiaddr) -> Option<u64> {
    let mut it = addr.iter();
    match (it.next(), it.next()) {
        (Some(Protocol::Memory(port)), None | Some(Protocol::P2p(_))) => Some(port),
        _ => None,
    }
}

impl SimNetwork {
    /// A network of `config.nodes` nodes, none crashed.
    ///
    /// # Panics
    /// If `config.base_port` is 0 (the memory transport's "any port").
    #[must_use]
    pub fn new(config: SimConfig) -> Self {
        assert!(config.base_port > 0, "base_port must be at least 1");
        let nodes = (0..config.nodes).map(|_| NodeSlot::default()).collect();
        Self {
            shared: Arc::new(Shared {
                config,
                epoch: Instant::now(),
                nodes,
                pending: Mutex::new(HashMap::new()),
                next_link: AtomicU64::new(1),
            }),
        }
    }

    /// Number of nodes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.shared.nodes.len()
    }

    /// Whether the network has no nodes.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.shared.nodes.is_empty()
    }

    /// The address node `node` listens on: `/memory/<base_port + node>`.
    #[must_use]
    pub fn address(&self, node: usize) -> Multiaddr {
        Protocol::Memory(self.shared.config.base_port + node as u64).into()
    }

    /// The node listening at `/memory/<port>`, if one of ours does.
    fn node_at(&self, port: u64) -> Option<usize> {
        let index = port.checked_sub(self.shared.config.base_port)?;
        usize::try_from(index)
            .ok()
            .filter(|&i| i < self.shared.nodes.len())
    }

    /// The round trip of the link between `a` and `b` (the same both
    /// ways, and for every connection between them).
    #[must_use]
    pub fn rtt(&self, a: usize, b: usize) -> Duration {
        let range = &self.shared.config.rtt;
        let (min, max) = (*range.start(), *range.end());
        if max <= min {
            return min;
        }
        let (lo, hi) = (a.min(b) as u64, a.max(b) as u64);
        let draw = splitmix64(self.shared.config.seed ^ splitmix64((lo << 32) | hi));
        let span = u64::try_from((max - min).as_nanos()).unwrap_or(u64::MAX);
        min + Duration::from_nanos(draw % span.saturating_add(1))
    }

    /// What node `node` has sent and received so far.
    ///
    /// # Panics
    /// If `node` is not a node of this network.
    #[must_use]
    pub fn traffic(&self, node: usize) -> Traffic {
        let slot = &self.shared.nodes[node];
        Traffic {
            sent: slot.sent.load(Ordering::Relaxed),
            received: slot.received.load(Ordering::Relaxed),
        }
    }

    /// Crash node `node`: every link it has is cut at once (both ends see
    /// the connection reset, as when a process dies), and from now on it
    /// can neither dial nor be dialed nor listen. Stopping its node task
    /// is the caller's (nothing it sends can leave any more).
    ///
    /// # Panics
    /// If `node` is not a node of this network.
    pub fn crash(&self, node: usize) {
        let slot = &self.shared.nodes[node];
        slot.crashed.store(true, Ordering::SeqCst);
        let links = std::mem::take(&mut *lock(&slot.links));
        for link in links.iter().filter_map(Weak::upgrade) {
            link.sever();
        }
    }

    /// Whether node `node` crashed.
    ///
    /// # Panics
    /// If `node` is not a node of this network.
    #[must_use]
    pub fn is_crashed(&self, node: usize) -> bool {
        self.shared.nodes[node].crashed.load(Ordering::SeqCst)
    }

    /// Node `node`'s raw latency transport (streams, not yet secured).
    ///
    /// # Panics
    /// If `node` is not a node of this network.
    #[must_use]
    pub fn raw_transport(&self, node: usize) -> LatencyTransport {
        assert!(node < self.len(), "node {node} of {}", self.len());
        LatencyTransport {
            inner: MemoryTransport::new(),
            net: self.clone(),
            node,
        }
    }

    /// Node `node`'s transport as a node is given it
    /// ([`Node::with_transport`](ollamacron_node_core::Node::with_transport)):
    /// the latency transport upgraded with Noise (authenticated with `key`,
    /// the node's identity) and Yamux, as the node upgrades TCP.
    ///
    /// # Errors
    /// Noise refuses the key.
    ///
    /// # Panics
    /// If `node` is not a node of this network.
    pub fn transport(
        &self,
        node: usize,
        key: &Keypair,
    ) -> Result<Boxed<(PeerId, StreamMuxerBox)>, noise::Error> {
        Ok(self
            .raw_transport(node)
            .upgrade(Version::V1Lazy)
            .authenticate(noise::Config::new(key)?)
            .multiplex(yamux::Config::default())
            .timeout(UPGRADE_TIMEOUT)
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed())
    }

    /// A new link from `dialer` to `listener`, registered with both so a
    /// crash of either severs it.
    fn open_link(&self, dialer: usize, listener: usize) -> io::Result<Arc<Link>> {
        let link = Arc::new(Link {
            id: self.shared.next_link.fetch_add(1, Ordering::Relaxed),
            ends: [dialer, listener],
            one_way: self.rtt(dialer, listener) / 2,
            severed: AtomicBool::new(false),
            wakers: Default::default(),
        });
        for node in [dialer, listener] {
            let mut links = lock(&self.shared.nodes[node].links);
            if links.len() >= LINK_SWEEP_AT && links.len().is_power_of_two() {
                links.retain(|l| l.strong_count() > 0);
            }
            links.push(Arc::downgrade(&link));
        }
        // After registering: a crash either saw the link or is seen here.
        if self.is_crashed(dialer) || self.is_crashed(listener) {
            link.sever();
            return Err(reset());
        }
        lock(&self.shared.pending).insert(link.id, Arc::clone(&link));
        Ok(link)
    }

    /// The link a dialer announced with `id`, for its listener `node`.
    fn claim_link(&self, id: u64, node: usize) -> io::Result<Arc<Link>> {
        let link = lock(&self.shared.pending)
            .remove(&id)
            .ok_or_else(|| refused(format!("no simulated link {id} is waiting")))?;
        if link.ends[LISTENER] != node {
            return Err(refused(format!("link {id} is not node {node}'s")));
        }
        if link.is_severed() {
            return Err(reset());
        }
        Ok(link)
    }
}

/// One node's latency transport: `/memory/<port>` addresses only, each
/// connection a [`LinkStream`].
pub struct LatencyTransport {
    inner: MemoryTransport,
    net: SimNetwork,
    node: usize,
}

impl Transport for LatencyTransport {
    type Output = LinkStream;
    type Error = io::Error;
    type ListenerUpgrade = BoxFuture<'static, io::Result<LinkStream>>;
    type Dial = BoxFuture<'static, io::Result<LinkStream>>;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        if memory_port(&addr).is_none() {
            return Err(TransportError::MultiaddrNotSupported(addr));
        }
        if self.net.is_crashed(self.node) {
            return Err(TransportError::Other(refused(format!(
                "node {} crashed",
                self.node
            ))));
        }
        self.inner
            .listen_on(id, addr)
            .map_err(|e| e.map(memory_error))
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.inner.remove_listener(id)
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: DialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        let Some(port) = memory_port(&addr) else {
            return Err(TransportError::MultiaddrNotSupported(addr));
        };
        let Some(target) = self.net.node_at(port) else {
            return Err(TransportError::Other(refused(format!(
                "no simulated node listens on /memory/{port}"
            ))));
        };
        for node in [self.node, target] {
            if self.net.is_crashed(node) {
                return Err(TransportError::Other(refused(format!(
                    "node {node} crashed"
                ))));
            }
        }
        let dial = self
            .inner
            .dial(addr, opts)
            .map_err(|e| e.map(memory_error))?;
        let net = self.net.clone();
        let node = self.node;
        Ok(async move {
            let mut channel = dial.await.map_err(memory_error)?;
            let link = net.open_link(node, target)?;
            channel.write_all(&link.id.to_le_bytes()).await?;
            // The handshake of a TCP connection: one round trip before the
            // dialer may send.
            tokio::time::sleep(link.one_way * 2).await;
            if link.is_severed() {
                return Err(reset());
            }
            Ok(LinkStream::new(channel, net, link, DIALER))
        }
        .boxed())
    }

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        let this = self.get_mut();
        let event = ready!(Pin::new(&mut this.inner).poll(cx));
        let net = this.net.clone();
        let node = this.node;
        Poll::Ready(
            event
                .map_upgrade(move |upgrade| {
                    async move {
                        let mut channel = upgrade.await.map_err(memory_error)?;
                        let mut id = [0u8; 8];
                        channel.read_exact(&mut id).await?;
                        let link = net.claim_link(u64::from_le_bytes(id), node)?;
                        Ok(LinkStream::new(channel, net, link, LISTENER))
                    }
                    .boxed()
                })
                .map_err(memory_error),
        )
    }
}

/// One end of a link: what the node reads arrives the link's one-way
/// latency after the other end wrote it.
pub struct LinkStream {
    inner: Channel<Vec<u8>>,
    net: SimNetwork,
    link: Arc<Link>,
    end: usize,
    /// The header being read, and how much of it is in.
    header: [u8; HEADER_LEN],
    header_read: usize,
    /// What is left of the frame being read, and when it may be read.
    payload_left: usize,
    readable_at: Option<Instant>,
    timer: Option<Pin<Box<Sleep>>>,
    /// A frame written to us but not yet taken by the channel.
    out: Vec<u8>,
    out_sent: usize,
}

impl LinkStream {
    fn new(inner: Channel<Vec<u8>>, net: SimNetwork, link: Arc<Link>, end: usize) -> Self {
        Self {
            inner,
            net,
            link,
            end,
            header: [0; HEADER_LEN],
            header_read: 0,
            payload_left: 0,
            readable_at: None,
            timer: None,
            out: Vec::new(),
            out_sent: 0,
        }
    }

    /// The node at this end.
    #[must_use]
    pub fn node(&self) -> usize {
        self.link.ends[self.end]
    }

    /// The node at the other end.
    #[must_use]
    pub fn peer(&self) -> usize {
        self.link.ends[1 - self.end]
    }

    /// This link's one-way latency (half its RTT).
    #[must_use]
    pub fn one_way(&self) -> Duration {
        self.link.one_way
    }

    fn slot(&self) -> &NodeSlot {
        &self.net.shared.nodes[self.node()]
    }

    /// Wait until `at` on this stream's timer.
    fn poll_until(&mut self, cx: &mut Context<'_>, at: Instant) -> Poll<()> {
        if Instant::now() >= at {
            return Poll::Ready(());
        }
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
        if timer.deadline() != at {
            timer.as_mut().reset(at);
        }
        timer.as_mut().poll(cx)
    }

    /// Hand the buffered frame to the channel.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_sent < self.out.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.out_sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_sent += n;
        }
        if self.out.capacity() > KEEP_OUT_CAPACITY {
            // The channel copied it: a large buffer is not kept per link
            // (it would count as the node's heap).
            self.out = Vec::new();
            self.out_sent = 0;
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for LinkStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.link.wakers[this.end][READ].register(cx.waker());
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        loop {
            if this.link.is_severed() {
                return Poll::Ready(Err(reset()));
            }
            if this.payload_left > 0 {
                if let Some(at) = this.readable_at {
                    ready!(this.poll_until(cx, at));
                    this.readable_at = None;
                }
                let max = buf.len().min(this.payload_left);
                let n = ready!(Pin::new(&mut this.inner).poll_read(cx, &mut buf[..max]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                }
                this.payload_left -= n;
                this.slot().received.fetch_add(n as u64, Ordering::Relaxed);
                return Poll::Ready(Ok(n));
            }
            let n = ready!(
                Pin::new(&mut this.inner).poll_read(cx, &mut this.header[this.header_read..])
            )?;
            if n == 0 {
                return Poll::Ready(if this.header_read == 0 {
                    Ok(0)
                } else {
                    Err(io::ErrorKind::UnexpectedEof.into())
                });
            }
            this.header_read += n;
            if this.header_read == HEADER_LEN {
                this.header_read = 0;
                let mut at = [0u8; 8];
                let mut len = [0u8; 4];
                at.copy_from_slice(&this.header[..8]);
                len.copy_from_slice(&this.header[8..]);
                this.payload_left = u32::from_le_bytes(len) as usize;
                this.readable_at =
                    Some(this.net.shared.epoch + Duration::from_nanos(u64::from_le_bytes(at)));
            }
        }
    }
}

impl AsyncWrite for LinkStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.link.wakers[this.end][WRITE].register(cx.waker());
        if this.link.is_severed() {
            return Poll::Ready(Err(reset()));
        }
        ready!(this.poll_drain(cx))?;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = buf.len().min(MAX_FRAME_LEN);
        let readable_at = (Instant::now() + this.link.one_way) - this.net.shared.epoch;
        let at = u64::try_from(readable_at.as_nanos()).unwrap_or(u64::MAX);
        this.out.clear();
        this.out_sent = 0;
        this.out.extend_from_slice(&at.to_le_bytes());
        this.out
            .extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_le_bytes());
        this.out.extend_from_slice(&buf[..n]);
        this.slot().sent.fetch_add(n as u64, Ordering::Relaxed);
        // Taken now if the channel has room; else on the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_drain(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.link.wakers[this.end][WRITE].register(cx.waker());
        if this.link.is_severed() {
            return Poll::Ready(Err(reset()));
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.link.is_severed() {
            return Poll::Ready(Ok(()));
        }
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_close(cx)
    }
}

impl Drop for LinkStream {
    fn drop(&mut self) {
        if self.end == DIALER {
            // A listener that never claimed the link will not.
            lock(&self.net.shared.pending).remove(&self.link.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rtt_is_in_range_the_same_both_ways_and_reproducible() {
        let rtt = Duration::from_millis(20)..=Duration::from_millis(80);
        let net = SimNetwork::new(SimConfig::new(50, rtt.clone()));
        let again = SimNetwork::new(SimConfig::new(50, rtt.clone()));
        let mut distinct = std::collections::HashSet::new();
        for a in 0..50 {
            for b in 0..50 {
                let d = net.rtt(a, b);
                assert!(rtt.contains(&d), "{d:?}");
                assert_eq!(d, net.rtt(b, a));
                assert_eq!(d, again.rtt(a, b));
                distinct.insert(d);
            }
        }
        assert!(distinct.len() > 1000, "spread over the range");
        let other_seed = SimNetwork::new(SimConfig {
            seed: 2,
            ..SimConfig::new(50, rtt)
        });
        assert!((0..50).any(|b| other_seed.rtt(0, b) != net.rtt(0, b)));
    }

    #[test]
    fn addresses_map_back_to_their_nodes() {
        let net = SimNetwork::new(SimConfig {
            base_port: 1000,
            ..SimConfig::new(3, Duration::ZERO..=Duration::ZERO)
        });
        assert_eq!(net.address(2).to_string(), "/memory/1002");
        assert_eq!(net.node_at(1002), Some(2));
        assert_eq!(net.node_at(1003), None);
        assert_eq!(net.node_at(999), None);
        let with_peer: Multiaddr =
            "/memory/5/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
                .parse()
                .unwrap();
        assert_eq!(memory_port(&with_peer), Some(5));
    }
}
