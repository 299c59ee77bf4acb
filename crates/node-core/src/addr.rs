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

/// An IPv6 link-local address (`fe80::/10`): without its interface it
/// leads nowhere for a peer, so it is never announced.
pub(crate) fn is_link_local(addr: &Multiaddr) -> bool {
    matches!(addr.iter().next(), Some(Protocol::Ip6(ip)) if ip.is_unicast_link_local())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ipv6_link_local_addresses_are_link_local() {
        let yes: Multiaddr = "/ip6/fe80::fc:ff:fe00:1/tcp/1".parse().unwrap();
        assert!(is_link_local(&yes));
        for no in [
            "/ip6/fd00::2/tcp/1",
            "/ip6/::1/tcp/1",
            "/ip4/169.254.1.1/tcp/1",
        ] {
            assert!(!is_link_local(&no.parse().unwrap()), "{no}");
        }
    }
}
