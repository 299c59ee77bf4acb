//! Peer discovery with real nodes on 127.0.0.1 (mDNS off): bootstrap
//! chains, the DHT, backoff of dead bootstrap peers, disabled strategies,
//! and an independent Kademlia peer finding a node in the namespace.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::HashSet;
use std::time::Duration;

use libp2p::{PeerId, kad};
use ollamacron_node_core::{DiscoverySource, NodeEvent, NodeHandle, NodeState};
use ollamacron_tests::kad_peer::KadPeer;
use ollamacron_tests::probe::probe;
use ollamacron_tests::{TCP_ONLY, eventually_within, loopback_config, start, wait_for_event};
use sha2::{Digest, Sha256};

/// A line of nodes converges in well under this on loopback; the bound only
/// keeps a broken build from hanging.
const CONVERGENCE_TIMEOUT: Duration = Duration::from_secs(60);

/// Start `n` nodes where node i knows only node i-1.
async fn start_line(n: usize, extra: &[(&str, &str)]) -> Vec<NodeHandle> {
    let mut nodes: Vec<NodeHandle> = Vec::new();
    for _ in 0..n {
        let bootstrap = match nodes.last() {
            Some(prev) => prev.dialable_addrs().await.unwrap()[0].to_string(),
            None => String::new(),
        };
        let mut overrides = vec![("bootstrap", bootstrap.as_str())];
        overrides.extend_from_slice(extra);
        nodes.push(start(loopback_config(TCP_ONLY, &overrides)).await.unwrap());
    }
    nodes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_of_ten_nodes_learns_every_provider_through_the_dht() {
    let nodes = start_line(10, &[]).await;
    let ids: Vec<PeerId> = nodes.iter().map(NodeHandle::peer_id).collect();

    for (i, node) in nodes.iter().enumerate() {
        let others: HashSet<PeerId> = ids.iter().copied().filter(|p| *p != ids[i]).collect();
        eventually_within(
            CONVERGENCE_TIMEOUT,
            &format!("node {i} to know all 9 others through the DHT"),
            || async {
                let status = node.discovery().await.ok()?;
                let known = node.known_peers().await.ok()?;
                let via_dht: HashSet<PeerId> = known
                    .iter()
                    .filter(|p| p.sources.contains(&DiscoverySource::Dht))
                    .map(|p| p.peer_id)
                    .collect();
                (status.dht_providers == 9 && via_dht == others).then_some(())
            },
        )
        .await
        .unwrap();
    }
    // Node 0 was told of nobody, yet it knows the far end's addresses and
    // reaches it with them.
    let far = nodes[0]
        .known_peers()
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.peer_id == ids[9])
        .unwrap();
    let addr = far
        .addresses
        .iter()
        .find(|a| a.to_string().contains("/tcp/"))
        .unwrap_or_else(|| panic!("no TCP address for the far end: {far:?}"))
        .clone()
        .with(libp2p::multiaddr::Protocol::P2p(ids[9]));
    assert_eq!(nodes[0].dial(addr).await.unwrap(), ids[9]);
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_bootstrap_peer_is_retried_with_growing_backoff() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let ghost = PeerId::random();
    let dead = format!("/ip4/127.0.0.1/tcp/{port}/p2p/{ghost}");
    let node = start(loopback_config(
        TCP_ONLY,
        &[
            ("bootstrap", dead.as_str()),
            ("bootstrap_backoff_initial", "100ms"),
            ("bootstrap_backoff_max", "10s"),
        ],
    ))
    .await
    .unwrap();
    let mut events = node.subscribe();
    let mut delays = Vec::new();
    while delays.len() < 3 {
        let (failures, retry_in) =
            wait_for_event(&mut events, "a failed bootstrap dial", |e| match e {
                NodeEvent::DialFailed {
                    peer_id,
                    source: DiscoverySource::Bootstrap,
                    failures,
                    retry_in,
                } if *peer_id == ghost => Some((*failures, *retry_in)),
                _ => None,
            })
            .await
            .unwrap();
        delays.push((failures, retry_in));
    }
    // Consecutive failures, each waiting longer than the one before.
    let counts: Vec<u32> = delays.iter().map(|d| d.0).collect();
    assert!(counts.windows(2).all(|w| w[1] == w[0] + 1), "{delays:?}");
    assert!(delays.windows(2).all(|w| w[1].1 > w[0].1), "{delays:?}");

    assert_eq!(node.state(), NodeState::Running);
    let status = node.discovery().await.unwrap();
    let (_, bootstrap) = status
        .stats
        .iter()
        .find(|(s, _)| *s == DiscoverySource::Bootstrap)
        .unwrap();
    assert!(bootstrap.connection_failures >= 3, "{bootstrap:?}");
    assert!(
        node.metrics_text()
            .contains("ollamacron_discovery_connection_failures_total{source=\"bootstrap\"}")
    );
    let ghost_entry = node
        .known_peers()
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.peer_id == ghost);
    assert!(ghost_entry.is_some_and(|p| p.failures >= 3 && !p.connected));
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_dht_bootstrap_still_finds_peers() {
    let a = start(loopback_config(TCP_ONLY, &[])).await.unwrap();
    let addr = a.dialable_addrs().await.unwrap()[0].to_string();
    let b = start(loopback_config(
        TCP_ONLY,
        &[("enable_dht", "false"), ("bootstrap", addr.as_str())],
    ))
    .await
    .unwrap();
    let found = eventually_within(
        CONVERGENCE_TIMEOUT,
        "b to know a through bootstrap",
        || async {
            b.known_peers()
                .await
                .ok()?
                .into_iter()
                .find(|p| p.peer_id == a.peer_id() && p.connected)
        },
    )
    .await
    .unwrap();
    assert!(
        found.sources.contains(&DiscoverySource::Bootstrap),
        "{found:?}"
    );
    let status = b.discovery().await.unwrap();
    let dht = status
        .sources
        .iter()
        .find(|s| s.source == DiscoverySource::Dht)
        .unwrap();
    assert!(!dht.enabled && !dht.active, "{dht:?}");
    let bootstrap = status
        .sources
        .iter()
        .find(|s| s.source == DiscoverySource::Bootstrap)
        .unwrap();
    assert!(
        bootstrap.active && bootstrap.detail.contains("1 of 1"),
        "{bootstrap:?}"
    );
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_strategy_off_a_node_runs_alone() {
    let node = start(loopback_config(TCP_ONLY, &[("enable_dht", "false")]))
        .await
        .unwrap();
    assert_eq!(node.state(), NodeState::Running);
    let status = node.discovery().await.unwrap();
    assert!(
        status
            .sources
            .iter()
            .filter(|s| s.source != DiscoverySource::Identify)
            .all(|s| !s.active),
        "{status:?}"
    );
    assert_eq!(status.known_peers, 0);
    // It still accepts a peer that dials it, and learns it from identify.
    let peer = start(loopback_config(TCP_ONLY, &[("enable_dht", "false")]))
        .await
        .unwrap();
    peer.dial(node.dialable_addrs().await.unwrap().remove(0))
        .await
        .unwrap();
    let known = eventually_within(CONVERGENCE_TIMEOUT, "the dialer in the table", || async {
        node.known_peers()
            .await
            .ok()?
            .into_iter()
            .find(|p| p.peer_id == peer.peer_id())
    })
    .await
    .unwrap();
    assert_eq!(known.sources, [DiscoverySource::Identify]);
    peer.shutdown().await.unwrap();
    node.shutdown().await.unwrap();
}

/// The namespace key computed from the wire contract alone: the sha2-256
/// multihash of "/ollamacron" (what its raw-codec CIDv1 resolves to).
fn contract_namespace_key() -> kad::RecordKey {
    let digest = Sha256::digest(b"/ollamacron");
    let multihash = libp2p::multihash::Multihash::<64>::wrap(0x12, &digest).unwrap();
    kad::RecordKey::new(&multihash.to_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_kademlia_peer_finds_the_node_in_the_namespace() {
    let node = start(loopback_config(TCP_ONLY, &[])).await.unwrap();
    let addr = node.dialable_addrs().await.unwrap().remove(0);

    // The node announces our Kademlia protocol to any libp2p peer…
    let report = probe(addr.clone(), CONVERGENCE_TIMEOUT).await.unwrap();
    assert!(
        report
            .protocols
            .iter()
            .any(|p| p.as_ref() == "/ollamacron/kad/1.0.0"),
        "identify lists /ollamacron/kad/1.0.0: {:?}",
        report.protocols
    );
    // …and a plain rust-libp2p Kademlia peer finds it as a provider of the
    // namespace key computed from the wire contract alone.
    let kad_peer = KadPeer::start("/probe/1.0.0").await.unwrap();
    kad_peer.dial(addr).await.unwrap();
    let providers = eventually_within(
        CONVERGENCE_TIMEOUT,
        "the node as a namespace provider",
        || async {
            let found = kad_peer.providers(contract_namespace_key()).await.ok()?;
            found.contains(&node.peer_id()).then_some(found)
        },
    )
    .await
    .unwrap();
    assert!(providers.contains(&node.peer_id()), "{providers:?}");
    node.shutdown().await.unwrap();
}
