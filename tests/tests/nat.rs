//! NAT traversal on loopback, with real nodes: relay reservations and their
//! limits, connections through a relay (and how they are reported and
//! scored), and DCUtR turning a relayed connection into a direct one.
//!
//! Reachability is forced here (AutoNAT needs real NATs: see
//! `cargo xtask nat-test`, which builds them in network namespaces).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::time::Duration;

use ollamacron_node_core::libp2p::multiaddr::Protocol;
use ollamacron_node_core::libp2p::{Multiaddr, PeerId};
use ollamacron_node_core::registry::{ServiceInfo, ServiceQuery};
use ollamacron_node_core::{ConnectionKind, NodeEvent, NodeHandle, Reachability};
use ollamacron_tests::{
    TCP_ONLY, eventually, eventually_within, loopback_config, metric_value, start, wait_for_event,
};

/// A public relay on loopback with the given extra settings.
async fn relay(extra: &[(&str, &str)]) -> (NodeHandle, Multiaddr) {
    let mut overrides = vec![
        ("force_reachability", "public"),
        ("enable_nat_service", "true"),
    ];
    overrides.extend_from_slice(extra);
    let node = start(loopback_config(TCP_ONLY, &overrides)).await.unwrap();
    let addr = node.dialable_addrs().await.unwrap().remove(0);
    (node, addr)
}

/// A node forced private that reserves on `relay_addr`.
async fn private_node(relay_addr: &Multiaddr, extra: &[(&str, &str)]) -> NodeHandle {
    let relays = format!("[{relay_addr}]");
    let mut overrides = vec![
        ("force_reachability", "private"),
        ("relay_nodes", relays.as_str()),
        ("ping_interval", "1s"),
    ];
    overrides.extend_from_slice(extra);
    start(loopback_config(TCP_ONLY, &overrides)).await.unwrap()
}

/// This node's `/p2p-circuit` addresses (one per reservation).
async fn circuit_addrs(node: &NodeHandle) -> Vec<Multiaddr> {
    node.dialable_addrs()
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.iter().any(|p| p == Protocol::P2pCircuit))
        .collect()
}

async fn connection_to(node: &NodeHandle, peer: PeerId) -> (ConnectionKind, Option<f64>) {
    node.peers()
        .await
        .unwrap()
        .into_iter()
        .find(|p| p.peer_id == peer)
        .map_or((ConnectionKind::None, None), |p| {
            (p.connection, p.latency_ms)
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reservations_beyond_the_relay_limit_are_refused_and_a_freed_slot_is_reused() {
    let (relay, relay_addr) = relay(&[
        ("relay_max_reservations", "2"),
        ("relay_max_reservations_per_peer", "1"),
    ])
    .await;
    assert!(relay.status().await.unwrap().reachability == Reachability::Public);

    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(private_node(&relay_addr, &[]).await);
    }
    // Two reservations are accepted and at least one is refused at once.
    eventually(
        "two accepted reservations and a refusal at the relay",
        || {
            let relay = relay.clone();
            async move {
                let accepted = metric_value(
                    &relay,
                    "ollamacron_relay_served_reservations_total{result=\"accepted\"}",
                );
                let denied = metric_value(
                    &relay,
                    "ollamacron_relay_served_reservations_total{result=\"denied\"}",
                );
                (accepted >= 2.0 && denied >= 1.0).then_some(())
            }
        },
    )
    .await
    .unwrap();
    let mut holders = Vec::new();
    let mut refused = Vec::new();
    for c in &clients {
        if circuit_addrs(c).await.is_empty() {
            refused.push(c.clone());
        } else {
            holders.push(c.clone());
        }
    }
    assert_eq!(holders.len(), 2, "exactly the limit holds reservations");
    assert_eq!(refused.len(), 1);
    let refused = &refused[0];
    assert!(
        metric_value(
            refused,
            "ollamacron_relay_reservations_total{result=\"failed\"}"
        ) >= 1.0,
        "the refused client counted its failure"
    );
    // The refused client retries with backoff; it keeps being refused
    // while the relay is full, and is never parked in a queue there.
    let accepted_before = metric_value(
        &relay,
        "ollamacron_relay_served_reservations_total{result=\"accepted\"}",
    );
    assert!((accepted_before - 2.0).abs() < f64::EPSILON);

    // A holder leaves: its slot goes to the client that was refused.
    let mut events = refused.subscribe();
    holders[0].shutdown().await.unwrap();
    let relay_id = relay.peer_id();
    eventually_within(
        Duration::from_secs(30),
        "the refused client to get the freed slot",
        || {
            let refused = refused.clone();
            async move { (!circuit_addrs(&refused).await.is_empty()).then_some(()) }
        },
    )
    .await
    .unwrap();
    wait_for_event(&mut events, "the reservation event", |e| match e {
        NodeEvent::RelayReservation { relay, active } if *relay == relay_id && *active => Some(()),
        _ => None,
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_node_is_reached_through_its_relay_reported_relayed_and_never_hidden() {
    let (relay, relay_addr) = relay(&[]).await;
    let private = private_node(&relay_addr, &[("enable_pubsub", "true")]).await;
    assert_eq!(
        private.status().await.unwrap().reachability,
        Reachability::Private
    );
    let circuit = eventually("a reservation on the relay", || {
        let private = private.clone();
        async move { circuit_addrs(&private).await.into_iter().next() }
    })
    .await
    .unwrap();
    assert!(circuit.to_string().contains(&relay.peer_id().to_string()));

    // Hole punching off on the dialer: the connection stays relayed. On
    // loopback every address works, so DHT discovery would dial the node
    // directly: the dialer stays out of the DHT.
    let other = start(loopback_config(
        TCP_ONLY,
        &[
            ("enable_hole_punch", "false"),
            ("enable_dht", "false"),
            ("enable_pubsub", "true"),
            ("ping_interval", "1s"),
        ],
    ))
    .await
    .unwrap();
    assert_eq!(other.dial(circuit).await.unwrap(), private.peer_id());
    let (kind, latency) = eventually("a ping over the relayed connection", || {
        let other = other.clone();
        let peer = private.peer_id();
        async move {
            let (kind, latency) = connection_to(&other, peer).await;
            latency.map(|l| (kind, l))
        }
    })
    .await
    .unwrap();
    assert_eq!(kind, ConnectionKind::Relayed);
    assert!(latency.is_finite() && latency >= 0.0, "{latency}");
    // Its service comes once the relayed connection is up: the record
    // reaches `other` over it (sync and gossip) and by way of the relay,
    // and a node already connected is not dialed for a health check.
    private
        .register_service(ServiceInfo {
            id: "behind-nat".into(),
            name: "behind-nat".into(),
            service_type: "llm".into(),
            ..ServiceInfo::default()
        })
        .await
        .unwrap();

    // Its service is found, scored on the relay path's RTT, and not hidden
    // by a latency bound (the relay path is not the peer's latency).
    let query = ServiceQuery {
        service_type: Some("llm".into()),
        max_latency_ms: Some(0.0),
        ..ServiceQuery::default()
    };
    let found = eventually("the relayed peer's service", || {
        let other = other.clone();
        let query = query.clone();
        async move {
            let found = other.find_services(query).await.ok()?;
            found.into_iter().find(|s| s.service.id == "behind-nat")
        }
    })
    .await
    .unwrap();
    assert!(found.score.total.is_finite() && found.score.total > 0.0);
    assert!(found.score.latency < 1.0, "the relay RTT costs score");
    assert!(
        metric_value(
            &relay,
            "ollamacron_relay_served_circuits_total{result=\"accepted\"}"
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dcutr_upgrades_a_relayed_connection_to_a_direct_one() {
    let (_relay, relay_addr) = relay(&[]).await;
    let private = private_node(&relay_addr, &[]).await;
    let circuit = eventually("a reservation on the relay", || {
        let private = private.clone();
        async move { circuit_addrs(&private).await.into_iter().next() }
    })
    .await
    .unwrap();
    // Out of the DHT, so that discovery cannot dial the node directly
    // first (on loopback every address works).
    let other = start(loopback_config(
        TCP_ONLY,
        &[("ping_interval", "1s"), ("enable_dht", "false")],
    ))
    .await
    .unwrap();
    // DCUtR reports the outcome on the side that dials the direct connection.
    let mut events = other.subscribe();
    let private_id = private.peer_id();
    assert_eq!(other.dial(circuit).await.unwrap(), private.peer_id());
    let error = wait_for_event(&mut events, "a hole punch outcome", |e| match e {
        NodeEvent::HolePunch { peer_id, error, .. } if *peer_id == private_id => {
            Some(error.clone())
        }
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(error, None, "loopback has no NAT: the punch must succeed");
    eventually("a direct connection, with its own RTT", || {
        let other = other.clone();
        let peer = private.peer_id();
        async move {
            let (kind, latency) = connection_to(&other, peer).await;
            (kind == ConnectionKind::Direct && latency.is_some()).then_some(())
        }
    })
    .await
    .unwrap();
    assert!(metric_value(&private, "ollamacron_hole_punch_attempts_total") >= 1.0);
    assert!(metric_value(&other, "ollamacron_hole_punches_total{result=\"success\"}") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_configured_relays_a_private_node_reserves_on_a_discovered_one() {
    let (relay, relay_addr) = relay(&[]).await;
    // No relay_nodes: the relay is only a bootstrap peer here, and is
    // chosen because identify says it offers relay service.
    let bootstrap = format!("[{relay_addr}]");
    let private = start(loopback_config(
        TCP_ONLY,
        &[
            ("force_reachability", "private"),
            ("bootstrap", bootstrap.as_str()),
        ],
    ))
    .await
    .unwrap();
    let circuit = eventually("a reservation on the discovered relay", || {
        let private = private.clone();
        async move { circuit_addrs(&private).await.into_iter().next() }
    })
    .await
    .unwrap();
    assert!(circuit.to_string().contains(&relay.peer_id().to_string()));
    let status = private.status().await.unwrap();
    assert_eq!(status.nat.relays, vec![relay.peer_id()]);
    // Private: Kademlia runs in client mode.
    let dht = status
        .discovery
        .sources
        .iter()
        .find(|s| s.source == ollamacron_node_core::DiscoverySource::Dht)
        .unwrap();
    assert!(dht.detail.starts_with("client mode"), "{}", dht.detail);
    let relay_status = relay.status().await.unwrap();
    assert!(relay_status.nat.relay_service);
    assert!(
        relay_status
            .discovery
            .sources
            .iter()
            .any(|s| s.detail.starts_with("server mode"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_of_unknown_reachability_reserves_on_its_relay_and_is_dialed_through_it() {
    let (relay, relay_addr) = relay(&[]).await;
    // Not forced: on loopback AutoNAT (global addresses only) never
    // decides, so the node stays `unknown`, as one behind a NAT does in
    // its first seconds. It reserves anyway.
    let relays = format!("[{relay_addr}]");
    let node = start(loopback_config(
        TCP_ONLY,
        &[("relay_nodes", relays.as_str()), ("ping_interval", "1s")],
    ))
    .await
    .unwrap();
    let circuit = eventually("a reservation while reachability is unknown", || {
        let node = node.clone();
        async move { circuit_addrs(&node).await.into_iter().next() }
    })
    .await
    .unwrap();
    assert_eq!(
        node.status().await.unwrap().reachability,
        Reachability::Unknown
    );
    let status = node.status().await.unwrap();
    assert_eq!(
        status.nat.relays,
        [relay.peer_id()],
        "the reservation is held"
    );
    // The status says why, in words an operator can act on.
    assert!(
        status
            .nat
            .why
            .starts_with("unknown: AutoNAT has not decided")
            && status.nat.why.contains("autonat_only_global_ips")
            && status
                .nat
                .why
                .contains("reachable through 1 relay reservation"),
        "{}",
        status.nat.why
    );
    assert!(circuit.to_string().contains(&relay.peer_id().to_string()));
    // A peer dials it through the relay.
    let other = start(loopback_config(
        TCP_ONLY,
        &[("enable_hole_punch", "false"), ("enable_dht", "false")],
    ))
    .await
    .unwrap();
    assert_eq!(other.dial(circuit).await.unwrap(), node.peer_id());
    let (kind, _) = eventually("the relayed connection", || {
        let other = other.clone();
        let peer = node.peer_id();
        async move {
            let found = connection_to(&other, peer).await;
            (found.0 != ConnectionKind::None).then_some(found)
        }
    })
    .await
    .unwrap();
    assert_eq!(kind, ConnectionKind::Relayed);
}
