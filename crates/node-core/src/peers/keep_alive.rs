//! Which connections stay open while idle.
//!
//! A libp2p connection closes once no handler wants it kept and no stream
//! is open, after `idle_connection_timeout` of that. Kademlia walks and
//! health checks open connections to peers a node talks to once; in a
//! large mesh those would otherwise pile up for the whole timeout (at 300
//! simulated nodes, 175 peers a node with the DHT against 53 without).
//! This behaviour keeps a connection open when the peer behaviour marks
//! it: up to `conn_mgr_low` peers, one connection each, are the node's
//! neighbours. Each side decides alone, so a kept connection also holds
//! one idle stream on [`NEIGHBOUR_PROTOCOL`] open: the remote keeps the
//! connection for as long as the stream is open (libp2p keeps a connection
//! with an open stream alive), even when it does not count us among its
//! own neighbours. Every other connection closes when idle, like any
//! libp2p connection.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::AsyncRead;
use libp2p::PeerId;
use libp2p::core::transport::PortUse;
use libp2p::core::upgrade::ReadyUpgrade;
use libp2p::core::{Endpoint, Multiaddr};
use libp2p::swarm::handler::{
    ConnectionEvent, DialUpgradeError, FullyNegotiatedInbound, FullyNegotiatedOutbound,
};
use libp2p::swarm::{
    ConnectionDenied, ConnectionHandler, ConnectionHandlerEvent, ConnectionId, FromSwarm,
    NetworkBehaviour, NotifyHandler, Stream, StreamProtocol, SubstreamProtocol, THandler,
    THandlerInEvent, THandlerOutEvent, ToSwarm,
};

/// The neighbour stream: opened on a connection its opener keeps while
/// idle, held open with nothing sent either way, closed when the opener
/// stops keeping the connection. Either side may close it at any time.
pub(crate) const NEIGHBOUR_PROTOCOL: StreamProtocol =
    StreamProtocol::new("/ollamacron/neighbour/1.0.0");

/// Bytes read (and dropped) at a time from a neighbour stream: nothing is
/// expected, so this only drains what a misbehaving peer sends.
const DRAIN_BYTES: usize = 64;
/// Neighbour streams opened per spell of keeping a connection: a remote
/// that closes or refuses them does not make us open them in a loop.
const MAX_NEIGHBOUR_STREAMS: u8 = 3;

/// Marks connections to keep open while idle; the peer behaviour decides
/// which ([`Behaviour::set_kept`]).
#[derive(Debug, Default)]
pub(crate) struct Behaviour {
    queued: VecDeque<ToSwarm<Infallible, bool>>,
}

impl Behaviour {
    /// Keep `connection` (to `peer`) open while idle, or stop keeping it.
    pub(crate) fn set_kept(&mut self, peer: PeerId, connection: ConnectionId, kept: bool) {
        self.queued.push_back(ToSwarm::NotifyHandler {
            peer_id: peer,
            handler: NotifyHandler::One(connection),
            event: kept,
        });
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = Handler;
    type ToSwarm = Infallible;

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(Handler::default())
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(Handler::default())
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn on_swarm_event(&mut self, _: FromSwarm<'_>) {}

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        self.queued.pop_front().map_or(Poll::Pending, Poll::Ready)
    }
}

/// A connection's keep-alive flag and the neighbour streams that make
/// the remote keep the connection too.
#[derive(Default)]
pub(crate) struct Handler {
    kept: bool,
    /// Our neighbour stream, while kept.
    outbound: Option<Stream>,
    /// A neighbour stream was requested and has not come back yet.
    requesting: bool,
    /// Neighbour streams requested since the connection became kept; at
    /// [`MAX_NEIGHBOUR_STREAMS`] (or when the remote does not speak the
    /// protocol) the connection is kept on our side only.
    attempts: u8,
    /// The remote's neighbour stream (the latest; it keeps one at most).
    inbound: Option<Stream>,
}

impl std::fmt::Debug for Handler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handler")
            .field("kept", &self.kept)
            .field("outbound", &self.outbound.is_some())
            .field("inbound", &self.inbound.is_some())
            .finish_non_exhaustive()
    }
}

/// Whether `stream` is still open: drains (and drops) whatever the remote
/// sent; `false` at its end or on an error.
fn still_open(stream: &mut Stream, cx: &mut Context<'_>) -> bool {
    let mut buf = [0u8; DRAIN_BYTES];
    loop {
        match Pin::new(&mut *stream).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(0) | Err(_)) => return false,
            Poll::Ready(Ok(_)) => {}
            Poll::Pending => return true,
        }
    }
}

impl ConnectionHandler for Handler {
    type FromBehaviour = bool;
    type ToBehaviour = Infallible;
    type InboundProtocol = ReadyUpgrade<StreamProtocol>;
    type OutboundProtocol = ReadyUpgrade<StreamProtocol>;
    type InboundOpenInfo = ();
    type OutboundOpenInfo = ();

    fn listen_protocol(&self) -> SubstreamProtocol<Self::InboundProtocol> {
        SubstreamProtocol::new(ReadyUpgrade::new(NEIGHBOUR_PROTOCOL), ())
    }

    fn connection_keep_alive(&self) -> bool {
        self.kept
    }

    fn on_behaviour_event(&mut self, kept: bool) {
        if kept && !self.kept {
            self.attempts = 0;
        }
        self.kept = kept;
        if !kept {
            // Dropped, the stream closes: the remote may let go too.
            self.outbound = None;
        }
    }

    fn poll(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<ConnectionHandlerEvent<Self::OutboundProtocol, (), Self::ToBehaviour>> {
        if let Some(stream) = self.inbound.as_mut()
            && !still_open(stream, cx)
        {
            self.inbound = None;
        }
        if let Some(stream) = self.outbound.as_mut()
            && !still_open(stream, cx)
        {
            // The remote closed it (or the connection is going): opened
            // again below while we keep the connection.
            self.outbound = None;
        }
        if self.kept
            && self.outbound.is_none()
            && !self.requesting
            && self.attempts < MAX_NEIGHBOUR_STREAMS
        {
            self.requesting = true;
            self.attempts = self.attempts.saturating_add(1);
            return Poll::Ready(ConnectionHandlerEvent::OutboundSubstreamRequest {
                protocol: SubstreamProtocol::new(ReadyUpgrade::new(NEIGHBOUR_PROTOCOL), ()),
            });
        }
        Poll::Pending
    }

    fn on_connection_event(
        &mut self,
        event: ConnectionEvent<'_, Self::InboundProtocol, Self::OutboundProtocol>,
    ) {
        match event {
            ConnectionEvent::FullyNegotiatedInbound(FullyNegotiatedInbound {
                protocol: stream,
                ..
            }) => self.inbound = Some(stream),
            ConnectionEvent::FullyNegotiatedOutbound(FullyNegotiatedOutbound {
                protocol: stream,
                ..
            }) => {
                self.requesting = false;
                if self.kept {
                    self.outbound = Some(stream);
                }
            }
            ConnectionEvent::DialUpgradeError(DialUpgradeError { error, .. }) => {
                self.requesting = false;
                if matches!(error, libp2p::swarm::StreamUpgradeError::NegotiationFailed) {
                    // An older node: keeping the connection is ours alone.
                    self.attempts = MAX_NEIGHBOUR_STREAMS;
                }
                // Other errors (a timeout, the connection closing): the
                // next poll asks again, up to the bound.
            }
            _ => {}
        }
    }
}
