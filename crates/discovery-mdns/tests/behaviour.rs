//! The mDNS behaviour, as far as it can be exercised without multicast.
//!
//! Network rule: these tests never send multicast. libp2p's mDNS opens its
//! UDP sockets and sends queries only when the behaviour is polled (one task
//! per non-loopback interface), so no test here puts it in a swarm or polls
//! it: they build it and ask it questions. Discovery and expiry themselves
//! need two nodes on a multicast-capable link; the translation of libp2p's
//! `(peer, address)` pairs into per-peer events is unit-tested in `src/`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::time::Duration;

use libp2p::PeerId;
use libp2p::core::Endpoint;
use libp2p::swarm::{ConnectionId, NetworkBehaviour};
use ollamacron_discovery_mdns::{Behaviour, Config};

/// Configurations a node may use: the defaults, short intervals, IPv6.
fn configs() -> [Config; 3] {
    [
        Config::default(),
        Config::default()
            .with_query_interval(Duration::from_secs(1))
            .with_ttl(Duration::from_secs(5)),
        Config::default().with_enable_ipv6(true),
    ]
}

#[tokio::test]
async fn a_behaviour_built_from_a_config_knows_no_peers_yet() {
    for config in configs() {
        let mdns =
            Behaviour::new(config, PeerId::random()).unwrap_or_else(|e| panic!("{config:?}: {e}"));
        assert_eq!(mdns.discovered_peers().count(), 0, "{config:?}");
    }
}

#[tokio::test]
async fn a_dial_is_offered_no_addresses_for_a_peer_it_has_not_discovered() {
    let mut mdns = Behaviour::new(Config::default(), PeerId::random()).unwrap();
    for peer in [Some(PeerId::random()), None] {
        let offered = mdns
            .handle_pending_outbound_connection(
                ConnectionId::new_unchecked(0),
                peer,
                &[],
                Endpoint::Dialer,
            )
            .unwrap();
        assert!(offered.is_empty(), "{peer:?}: {offered:?}");
    }
}
