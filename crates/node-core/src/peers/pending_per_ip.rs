//! At most [`MAX_PENDING_INCOMING_PER_IP`] inbound connections still
//! negotiating from one IP address. The node-wide pending limit alone
//! lets one host that opens silent TCP connections hold every slot until
//! the upgrade times out, and no other peer gets in meanwhile.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    ConnectionDenied, ConnectionId, FromSwarm, NetworkBehaviour, THandler, THandlerInEvent,
    THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

/// Most inbound connections negotiating at once from one IP address.
pub(crate) const MAX_PENDING_INCOMING_PER_IP: usize = 16;

/// Why a connection was denied (in the swarm's `ListenFailure`).
#[derive(Debug, thiserror::Error)]
#[error("{ip} already has {MAX_PENDING_INCOMING_PER_IP} inbound connections negotiating")]
pub(crate) struct TooManyPendingFromIp {
    ip: IpAddr,
}

/// Counts pending inbound connections by remote IP.
#[derive(Debug, Default)]
pub(crate) struct Behaviour {
    pending: HashMap<ConnectionId, IpAddr>,
    per_ip: HashMap<IpAddr, usize>,
}

fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(ip) => Some(IpAddr::V4(ip)),
        Protocol::Ip6(ip) => Some(IpAddr::V6(ip)),
        _ => None,
    })
}

impl Behaviour {
    fn settled(&mut self, connection: ConnectionId) {
        if let Some(ip) = self.pending.remove(&connection)
            && let Some(count) = self.per_ip.get_mut(&ip)
        {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        // Relayed connections name the relay's address: not counted here.
        if remote_addr
            .iter()
            .any(|p| matches!(p, Protocol::P2pCircuit))
        {
            return Ok(());
        }
        let Some(ip) = ip_of(remote_addr) else {
            return Ok(());
        };
        let count = self.per_ip.entry(ip).or_default();
        if *count >= MAX_PENDING_INCOMING_PER_IP {
            return Err(ConnectionDenied::new(TooManyPendingFromIp { ip }));
        }
        *count += 1;
        self.pending.insert(connection_id, ip);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        self.settled(connection_id);
        Ok(dummy::ConnectionHandler)
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
            FromSwarm::ListenFailure(e) => self.settled(e.connection_id),
            FromSwarm::ConnectionEstablished(e) => self.settled(e.connection_id),
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

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Self::ToSwarm, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}
