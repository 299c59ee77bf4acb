//! Address helpers shared by the behaviours and the handle.

use libp2p::multiaddr::Protocol;
use libp2p::{Multiaddr, PeerId};

pub(crate) use ollamacron_nat::{is_loopback, is_relayed};

/// `addr` ending in `/p2p/<peer>`; relay circuit addresses already do.
pub(crate) fn with_peer(addr: Multiaddr, peer: PeerId) -> Multiaddr {
    if matches!(addr.iter().last(), Some(Protocol::P2p(p)) if p == peer) {
        addr
    } else {
        addr.with(Protocol::P2p(peer))
    }
}
