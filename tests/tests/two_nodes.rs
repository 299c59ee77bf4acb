//! Two real nodes on 127.0.0.1: connect over TCP and over QUIC, identify
//! each other, and shut down to `Stopped`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use ollamacron_node_core::{NodeEvent, NodeHandle, NodeState, PROTOCOL_VERSION, agent_version};
use ollamacron_tests::{QUIC_ONLY, TCP_ONLY, loopback_config, start, wait_for_event};

async fn connect_and_identify(listen: &str) {
    let a = start(loopback_config(listen, &[])).await.unwrap();
    let b = start(loopback_config(listen, &[])).await.unwrap();
    assert_eq!(a.state(), NodeState::Running);

    let mut a_events = a.subscribe();
    let mut b_events = b.subscribe();
    let addr = a.dialable_addrs().await.unwrap().remove(0);
    assert_eq!(b.dial(addr).await.unwrap(), a.peer_id());

    // Each side identifies the other with our protocol version and agent.
    for (events, other) in [(&mut a_events, b.peer_id()), (&mut b_events, a.peer_id())] {
        let (version, agent) = wait_for_event(events, "identify of the other node", |e| match e {
            NodeEvent::PeerIdentified {
                peer_id,
                protocol_version,
                agent_version,
            } if *peer_id == other => Some((protocol_version.clone(), agent_version.clone())),
            _ => None,
        })
        .await
        .unwrap();
        assert_eq!(version, PROTOCOL_VERSION);
        assert_eq!(agent, agent_version());
    }

    for (node, other) in [(&a, &b), (&b, &a)] {
        let peers = node.connected_peers().await.unwrap();
        assert_eq!(peers.len(), 1, "{peers:?}");
        assert_eq!(peers[0].peer_id, other.peer_id());
        assert_eq!(peers[0].protocol_version.as_deref(), Some(PROTOCOL_VERSION));
        let metrics = node.metrics().await.unwrap();
        assert_eq!(metrics.peers_connected, 1);
        assert_eq!(
            metrics.connections_inbound + metrics.connections_outbound,
            1
        );
    }

    shut_down(&b).await;
    // a sees b go away.
    wait_for_event(&mut a_events, "b disconnecting", |e| {
        matches!(e, NodeEvent::PeerDisconnected { peer_id } if *peer_id == b.peer_id())
            .then_some(())
    })
    .await
    .unwrap();
    shut_down(&a).await;
}

async fn shut_down(node: &NodeHandle) {
    let mut events = node.subscribe();
    node.shutdown().await.unwrap();
    assert_eq!(node.state(), NodeState::Stopped);
    wait_for_event(&mut events, "Stopped", |e| {
        matches!(e, NodeEvent::Stopped).then_some(())
    })
    .await
    .unwrap();
    // A stopped node refuses commands clearly, and shutting down again is fine.
    assert!(node.connected_peers().await.is_err());
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_connect_over_tcp() {
    connect_and_identify(TCP_ONLY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_connect_over_quic() {
    connect_and_identify(QUIC_ONLY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_only_node_talks_to_noise_and_tls_node() {
    let tls_only = start(loopback_config(TCP_ONLY, &[("enable_noise", "false")]))
        .await
        .unwrap();
    let both = start(loopback_config(TCP_ONLY, &[])).await.unwrap();
    let noise_only = start(loopback_config(TCP_ONLY, &[("enable_tls", "false")]))
        .await
        .unwrap();

    let addr = both.dialable_addrs().await.unwrap().remove(0);
    assert_eq!(tls_only.dial(addr.clone()).await.unwrap(), both.peer_id());
    assert_eq!(noise_only.dial(addr).await.unwrap(), both.peer_id());

    // No common security protocol: the dial fails with a reason, nobody panics.
    let addr = noise_only.dialable_addrs().await.unwrap().remove(0);
    let err = tls_only.dial(addr).await.unwrap_err().to_string();
    assert!(err.starts_with("cannot dial"), "{err}");

    for node in [tls_only, both, noise_only] {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialing_a_dead_address_fails_with_the_reason() {
    let node = start(loopback_config(TCP_ONLY, &[])).await.unwrap();
    // Bind then drop a listener to get a loopback port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = node
        .dial(format!("/ip4/127.0.0.1/tcp/{port}").parse().unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains(&format!("/ip4/127.0.0.1/tcp/{port}")), "{err}");
    assert_eq!(node.state(), NodeState::Running);
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dialing_a_connected_peer_again_reuses_the_connection() {
    let a = start(loopback_config(TCP_ONLY, &[])).await.unwrap();
    let b = start(loopback_config(TCP_ONLY, &[])).await.unwrap();
    let addr = a.dialable_addrs().await.unwrap().remove(0);
    b.dial(addr.clone()).await.unwrap();
    b.dial(addr).await.unwrap();
    let metrics = b.metrics().await.unwrap();
    assert_eq!(metrics.connections_outbound, 1);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dual_stack_node_is_reached_over_ipv4_and_ipv6_at_once() {
    // A host without IPv6 cannot run this test; the node itself copes (it
    // listens on IPv4 only), which the unit tests of the listen split show.
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("SKIPPED: this host has no IPv6 loopback");
        return;
    }
    let dual = start(loopback_config(
        "/ip4/127.0.0.1/tcp/0,/ip6/::1/tcp/0,/ip4/127.0.0.1/udp/0/quic-v1,/ip6/::1/udp/0/quic-v1",
        &[],
    ))
    .await
    .unwrap();
    let addrs = dual.dialable_addrs().await.unwrap();
    let pick = |v6: bool, quic: bool| {
        addrs
            .iter()
            .find(|a| {
                let s = a.to_string();
                s.starts_with(if v6 { "/ip6/" } else { "/ip4/" }) && s.contains("quic-v1") == quic
            })
            .cloned()
            .unwrap_or_else(|| panic!("no {v6} {quic} address in {addrs:?}"))
    };
    for (v6, quic) in [(false, false), (true, false), (false, true), (true, true)] {
        let listen = match (v6, quic) {
            (false, false) => "/ip4/127.0.0.1/tcp/0",
            (true, false) => "/ip6/::1/tcp/0",
            (false, true) => "/ip4/127.0.0.1/udp/0/quic-v1",
            (true, true) => "/ip6/::1/udp/0/quic-v1",
        };
        let peer = start(loopback_config(listen, &[])).await.unwrap();
        assert_eq!(
            peer.dial(pick(v6, quic)).await.unwrap(),
            dual.peer_id(),
            "over {listen}"
        );
        // The listener may list the connection a moment after the dialer.
        ollamacron_tests::eventually("the dual-stack node to list the peer", || {
            let (dual, id) = (dual.clone(), peer.peer_id());
            async move {
                dual.connected_peers()
                    .await
                    .unwrap()
                    .iter()
                    .any(|p| p.peer_id == id)
                    .then_some(())
            }
        })
        .await
        .unwrap();
        peer.shutdown().await.unwrap();
    }
    dual.shutdown().await.unwrap();
}
