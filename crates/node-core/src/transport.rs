//! The transport stack: TCP (+ WebSocket) with Noise and/or TLS and Yamux,
//! QUIC-v1 — or, instead of those, a transport the node is given
//! ([`Node::with_transport`](crate::Node::with_transport)) — relayed
//! (`/p2p-circuit`) connections, DNS resolution over all of them, the
//! private-network (pnet) handshake when a network key is set, and
//! bandwidth metrics.

use std::future::Future;
use std::iter::{Chain, Map};
use std::time::Duration;

use either::Either;
use futures::future::{self, MapOk};
use futures::{AsyncRead, AsyncWrite, TryFutureExt};
use libp2p::core::either::EitherFuture;
use libp2p::core::muxing::StreamMuxerBox;
use std::pin::Pin;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::timeout::TransportTimeout;
use libp2p::core::transport::{
    Boxed, DialOpts as TransportDialOpts, ListenerId, PortUse, TransportError, TransportEvent,
};
use libp2p::core::upgrade::{
    InboundConnectionUpgrade, OutboundConnectionUpgrade, UpgradeInfo, Version,
};
use libp2p::identity::Keypair;
use libp2p::metrics::{BandwidthTransport, Registry};
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::{Multiaddr, PeerId, Transport, dns, noise, quic, tcp, tls, websocket, yamux};
use ollamacron_config::NodeConfig;
use ollamacron_nat::RelayedPeers;

use crate::error::NodeError;

/// Longest a TCP connection may take to negotiate security and muxing.
const UPGRADE_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest this node, as an AutoNAT server, tries to dial a peer back. A
/// peer behind a NAT that drops unsolicited packets never answers; with
/// the whole `dial_timeout` (30 s) its private verdict would wait for it.
/// A reachable peer answers a dial-back well within this.
const AUTONAT_DIAL_BACK_TIMEOUT: Duration = Duration::from_secs(5);

/// The node's authenticated, multiplexed transport.
pub(crate) type NodeTransport = Boxed<(PeerId, StreamMuxerBox)>;

/// Build the transport the configuration asks for, registering its
/// bandwidth counters in `registry`.
///
/// `relay` carries `/p2p-circuit` connections. With a network key (`psk`,
/// a private network) every TCP and relayed connection starts with the
/// pnet handshake, and QUIC — which cannot carry it — is left out. A
/// `given` transport replaces TCP, WebSocket and QUIC.
pub(crate) fn build_transport(
    key: &Keypair,
    config: &NodeConfig,
    registry: &mut Registry,
    relay: libp2p::relay::client::Transport,
    relayed_peers: RelayedPeers,
    psk: Option<PreSharedKey>,
    given: Option<NodeTransport>,
) -> Result<NodeTransport, NodeError> {
    let relay = match psk {
        Some(psk) => secure_and_multiplex(
            relay.and_then(move |socket, _| PnetConfig::new(psk).handshake(socket)),
            key,
            config,
        )?,
        None => secure_and_multiplex(relay, key, config)?,
    };
    let direct = match given {
        Some(given) => {
            if psk.is_some() {
                tracing::warn!(
                    "require_auth: the network key guards relayed connections only; the given transport must guard its own"
                );
            }
            given
        }
        None => direct_transport(key, config, relayed_peers, psk)?,
    };
    let combined = relay
        .or_transport(direct)
        .map(|either, _| either.into_inner())
        .boxed();

    let resolved = match dns::tokio::Transport::system(combined) {
        Ok(dns) => dns.boxed(),
        Err(e) => {
            return Err(NodeError::Transport {
                what: "DNS",
                reason: format!("cannot read the system resolver configuration: {e}"),
            });
        }
    };

    // The whole outgoing dial (DNS, connect, security, muxer) is bounded by
    // `dial_timeout`; an AutoNAT dial-back by a shorter one of its own.
    let dial_back = DialBackTimeout {
        inner: resolved,
        timeout: config.dial_timeout.min(AUTONAT_DIAL_BACK_TIMEOUT),
    }
    .boxed();
    let bounded = TransportTimeout::with_outgoing_timeout(dial_back, config.dial_timeout).boxed();
    Ok(BandwidthTransport::new(bounded, registry)
        .map(|(peer, conn), _| (peer, StreamMuxerBox::new(conn)))
        .boxed())
}

/// The node's own direct transports: TCP (+ WebSocket) and QUIC, or TCP
/// alone with the pnet handshake on a private network.
fn direct_transport(
    key: &Keypair,
    config: &NodeConfig,
    relayed_peers: RelayedPeers,
    psk: Option<PreSharedKey>,
) -> Result<NodeTransport, NodeError> {
    let tcp_config = tcp::Config::default().nodelay(true);
    let fresh_tcp = FreshSourcePort {
        inner: tcp::tokio::Transport::new(tcp_config.clone()),
        keep_port_for: relayed_peers.clone(),
    };
    let tcp = match psk {
        Some(psk) => secure_and_multiplex(
            fresh_tcp.and_then(move |socket, _| PnetConfig::new(psk).handshake(socket)),
            key,
            config,
        )?,
        None => secure_and_multiplex(fresh_tcp, key, config)?,
    };
    let tcp = if config.enable_websocket && psk.is_none() {
        // DNS goes inside WebSocket so `/dns4/<host>/.../wss` keeps the host
        // name for TLS.
        let inner = dns::tokio::Transport::system(FreshSourcePort {
            inner: tcp::tokio::Transport::new(tcp_config),
            keep_port_for: relayed_peers,
        })
        .map_err(|e| NodeError::Transport {
            what: "DNS",
            reason: format!("cannot read the system resolver configuration: {e}"),
        })?;
        let ws = secure_and_multiplex(websocket::Config::new(inner), key, config)?;
        ws.or_transport(tcp)
            .map(|either, _| either.into_inner())
            .boxed()
    } else {
        tcp
    };

    Ok(if psk.is_some() {
        tcp
    } else {
        quic::tokio::Transport::new(quic::Config::new(key))
            .map(|(peer, conn), _| (peer, StreamMuxerBox::new(conn)))
            .or_transport(tcp)
            .map(|either, _| either.into_inner())
            .boxed()
    })
}

/// TCP that dials from a fresh source port unless hole punching.
///
/// libp2p dials from the listening port by default. When two nodes that
/// listen on TCP dial each other at the same moment (both discover the
/// other through mDNS or the DHT), the two dials share one address pair and
/// the kernel merges them into a single simultaneous-open connection on
/// which both sides act as the dialer: the security handshake fails and
/// neither dial succeeds. A fresh port per dial avoids that. A hole punch
/// needs the listening port (the NAT mapping the peer aims at): a dial
/// with role `Listener`, or any direct dial to a peer we reach only
/// through a relay (DCUtR's other side dials with role `Dialer`), keeps it.
#[derive(Debug)]
struct FreshSourcePort<T> {
    inner: T,
    keep_port_for: RelayedPeers,
}

impl<T> FreshSourcePort<T> {
    fn is_hole_punch(&self, addr: &Multiaddr) -> bool {
        match addr.iter().last() {
            Some(libp2p::multiaddr::Protocol::P2p(peer)) => self.keep_port_for.contains(&peer),
            _ => false,
        }
    }
}

impl<T: Transport + Unpin> Transport for FreshSourcePort<T> {
    type Output = T::Output;
    type Error = T::Error;
    type ListenerUpgrade = T::ListenerUpgrade;
    type Dial = T::Dial;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        self.inner.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.inner.remove_listener(id)
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        mut opts: TransportDialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        if opts.role == Endpoint::Dialer && !self.is_hole_punch(&addr) {
            opts.port_use = PortUse::New;
        }
        self.inner.dial(addr, opts)
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        Pin::new(&mut self.inner).poll(cx)
    }
}

/// AutoNAT's dial-backs get their own timeout: they are the only dials
/// for which libp2p asks the transport for a new port (`PortUse::New`
/// from the swarm; every behaviour of ours and libp2p's others reuse).
struct DialBackTimeout {
    inner: Boxed<(PeerId, StreamMuxerBox)>,
    timeout: Duration,
}

impl Transport for DialBackTimeout {
    type Output = (PeerId, StreamMuxerBox);
    type Error = std::io::Error;
    type ListenerUpgrade = <Boxed<(PeerId, StreamMuxerBox)> as Transport>::ListenerUpgrade;
    type Dial = Pin<Box<dyn Future<Output = Result<Self::Output, Self::Error>> + Send>>;

    fn listen_on(
        &mut self,
        id: ListenerId,
        addr: Multiaddr,
    ) -> Result<(), TransportError<Self::Error>> {
        self.inner.listen_on(id, addr)
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        self.inner.remove_listener(id)
    }

    fn dial(
        &mut self,
        addr: Multiaddr,
        opts: TransportDialOpts,
    ) -> Result<Self::Dial, TransportError<Self::Error>> {
        let dial_back = opts.port_use == PortUse::New;
        let dial = self.inner.dial(addr, opts)?;
        if !dial_back {
            return Ok(dial);
        }
        let timeout = self.timeout;
        Ok(Box::pin(async move {
            match tokio::time::timeout(timeout, dial).await {
                Ok(result) => result,
                Err(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "AutoNAT dial-back gave up after {}",
                        humantime::format_duration(timeout)
                    ),
                )),
            }
        }))
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        Pin::new(&mut self.inner).poll(cx)
    }
}

/// Add Noise and/or TLS (Noise preferred) and Yamux to a stream transport.
fn secure_and_multiplex<T>(
    transport: T,
    key: &Keypair,
    config: &NodeConfig,
) -> Result<NodeTransport, NodeError>
where
    T: Transport + Send + Unpin + 'static,
    T::Output: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    T::Error: Send + Sync + 'static,
    T::Dial: Send + 'static,
    T::ListenerUpgrade: Send + 'static,
{
    let noise = || {
        noise::Config::new(key).map_err(|e| NodeError::Transport {
            what: "Noise",
            reason: e.to_string(),
        })
    };
    let tls = || {
        tls::Config::new(key).map_err(|e| NodeError::Transport {
            what: "TLS",
            reason: e.to_string(),
        })
    };
    let builder = transport.upgrade(Version::V1Lazy);
    let upgraded = match (config.enable_noise, config.enable_tls) {
        (true, true) => builder
            .authenticate(SecuritySelect(noise()?, tls()?))
            .multiplex(yamux::Config::default())
            .timeout(UPGRADE_TIMEOUT)
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
        (true, false) => builder
            .authenticate(noise()?)
            .multiplex(yamux::Config::default())
            .timeout(UPGRADE_TIMEOUT)
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
        (false, true) => builder
            .authenticate(tls()?)
            .multiplex(yamux::Config::default())
            .timeout(UPGRADE_TIMEOUT)
            .map(|(peer, muxer), _| (peer, StreamMuxerBox::new(muxer)))
            .boxed(),
        (false, false) => {
            return Err(NodeError::Transport {
                what: "TCP",
                reason: "neither enable_noise nor enable_tls is on".to_owned(),
            });
        }
    };
    Ok(upgraded)
}

/// Offers two security protocols; the first is preferred. Both produce a
/// `(PeerId, stream)`, so the result can be multiplexed like either alone.
#[derive(Debug, Clone)]
struct SecuritySelect<A, B>(A, B);

impl<A, B> UpgradeInfo for SecuritySelect<A, B>
where
    A: UpgradeInfo,
    B: UpgradeInfo,
{
    type Info = Either<A::Info, B::Info>;
    type InfoIter = Chain<
        Map<<A::InfoIter as IntoIterator>::IntoIter, fn(A::Info) -> Self::Info>,
        Map<<B::InfoIter as IntoIterator>::IntoIter, fn(B::Info) -> Self::Info>,
    >;

    fn protocol_info(&self) -> Self::InfoIter {
        let first: fn(A::Info) -> Self::Info = Either::Left;
        let second: fn(B::Info) -> Self::Info = Either::Right;
        self.0
            .protocol_info()
            .into_iter()
            .map(first)
            .chain(self.1.protocol_info().into_iter().map(second))
    }
}

type Factored<TA, TB> =
    fn(future::Either<(PeerId, TA), (PeerId, TB)>) -> (PeerId, future::Either<TA, TB>);

impl<C, A, B, TA, TB> InboundConnectionUpgrade<C> for SecuritySelect<A, B>
where
    A: InboundConnectionUpgrade<C, Output = (PeerId, TA)>,
    B: InboundConnectionUpgrade<C, Output = (PeerId, TB)>,
{
    type Output = (PeerId, future::Either<TA, TB>);
    type Error = Either<A::Error, B::Error>;
    type Future = MapOk<EitherFuture<A::Future, B::Future>, Factored<TA, TB>>;

    fn upgrade_inbound(self, socket: C, info: Self::Info) -> Self::Future {
        let factor: Factored<TA, TB> = future::Either::factor_first;
        match info {
            Either::Left(info) => EitherFuture::First(self.0.upgrade_inbound(socket, info)),
            Either::Right(info) => EitherFuture::Second(self.1.upgrade_inbound(socket, info)),
        }
        .map_ok(factor)
    }
}

impl<C, A, B, TA, TB> OutboundConnectionUpgrade<C> for SecuritySelect<A, B>
where
    A: OutboundConnectionUpgrade<C, Output = (PeerId, TA)>,
    B: OutboundConnectionUpgrade<C, Output = (PeerId, TB)>,
{
    type Output = (PeerId, future::Either<TA, TB>);
    type Error = Either<A::Error, B::Error>;
    type Future = MapOk<EitherFuture<A::Future, B::Future>, Factored<TA, TB>>;

    fn upgrade_outbound(self, socket: C, info: Self::Info) -> Self::Future {
        let factor: Factored<TA, TB> = future::Either::factor_first;
        match info {
            Either::Left(info) => EitherFuture::First(self.0.upgrade_outbound(socket, info)),
            Either::Right(info) => EitherFuture::Second(self.1.upgrade_outbound(socket, info)),
        }
        .map_ok(factor)
    }
}
