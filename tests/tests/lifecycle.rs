//! Identity persistence, start failures, metrics over HTTP, trimming.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use ollamacron_config::ConfigLoader;
use ollamacron_node_core::{Node, NodeError, NodeEvent, NodeState};
use ollamacron_tests::{TCP_ONLY, eventually, loopback_config, start, wait_for_event};

fn config_in(dir: &std::path::Path, overrides: &[(&str, &str)]) -> ollamacron_config::NodeConfig {
    let data_dir = dir.to_string_lossy().into_owned();
    let mut all = vec![("data_dir", data_dir.as_str())];
    all.extend_from_slice(overrides);
    loopback_config(TCP_ONLY, &all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_with_the_same_data_dir_keeps_the_peer_id() {
    let dir = tempfile::tempdir().unwrap();
    let first = Node::new(config_in(dir.path(), &[])).start().await.unwrap();
    let id = first.peer_id();
    first.shutdown().await.unwrap();

    let second = Node::new(config_in(dir.path(), &[])).start().await.unwrap();
    assert_eq!(second.peer_id(), id);
    second.shutdown().await.unwrap();

    let other_dir = tempfile::tempdir().unwrap();
    let third = Node::new(config_in(other_dir.path(), &[]))
        .start()
        .await
        .unwrap();
    assert_ne!(third.peer_id(), id, "a new data dir is a new identity");
    third.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_key_file_fails_clearly_and_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("identity.key");
    std::fs::write(&key, b"\x08\x01\x12garbage").unwrap();
    let err = Node::new(config_in(dir.path(), &[]))
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, NodeError::Identity(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains(&key.display().to_string()) && msg.contains("corrupt"),
        "{msg}"
    );
    assert_eq!(
        std::fs::read(&key).unwrap(),
        b"\x08\x01\x12garbage",
        "never silently replaced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_id_must_match_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::new(config_in(dir.path(), &[])).start().await.unwrap();
    let id = node.peer_id().to_string();
    node.shutdown().await.unwrap();

    let ok = Node::new(config_in(dir.path(), &[("node_id", id.as_str())]))
        .start()
        .await
        .unwrap();
    ok.shutdown().await.unwrap();

    let stranger = ollamacron_node_core::libp2p::PeerId::random().to_string();
    let err = Node::new(config_in(dir.path(), &[("node_id", stranger.as_str())]))
        .start()
        .await
        .unwrap_err();
    assert!(matches!(err, NodeError::WrongIdentity { .. }), "{err:?}");
    assert!(err.to_string().contains(&stranger), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_in_use_is_a_listen_error_naming_the_address() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let err = start(loopback_config(&listen, &[])).await.unwrap_err();
    assert!(matches!(err, NodeError::Listen { .. }), "{err:?}");
    assert!(err.to_string().contains(&listen), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_listeners_still_runs_and_dials() {
    let server = start(loopback_config(TCP_ONLY, &[])).await.unwrap();
    let config = ConfigLoader::new()
        .set("listen", "")
        .set("enable_mdns", "false")
        .set("enable_metrics", "false")
        .load()
        .unwrap();
    let client = start(config).await.unwrap();
    assert_eq!(client.state(), NodeState::Running);
    assert!(client.listen_addrs().await.unwrap().is_empty());
    let addr = server.dialable_addrs().await.unwrap().remove(0);
    assert_eq!(client.dial(addr).await.unwrap(), server.peer_id());
    client.shutdown().await.unwrap();
    server.shutdown().await.unwrap();
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let response = ollamacron_tests::http_request(addr, "GET", path, None)
        .await
        .unwrap();
    (response.status, response.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_served_over_http_on_api_listen() {
    let node = start(loopback_config(
        TCP_ONLY,
        &[("enable_metrics", "true"), ("api_listen", "127.0.0.1:0")],
    ))
    .await
    .unwrap();
    let peer = start(loopback_config(TCP_ONLY, &[])).await.unwrap();
    peer.dial(node.dialable_addrs().await.unwrap().remove(0))
        .await
        .unwrap();
    let api = node.api_addr().unwrap();
    assert!(api.ip().is_loopback());

    let (status, body) = eventually("the inbound connection in /metrics", || async {
        let (status, body) = http_get(api, "/metrics").await;
        body.contains("ollamacron_connections{direction=\"inbound\"} 1")
            .then_some((status, body))
    })
    .await
    .unwrap();
    assert_eq!(status, 200);
    for expected in [
        "ollamacron_node_state{state=\"running\"} 1",
        "ollamacron_node_state{state=\"stopped\"} 0",
        "ollamacron_peers_connected 1",
        "ollamacron_uptime_seconds",
        "ollamacron_build_info{version=",
        "libp2p_swarm_connections_incoming_total",
        "libp2p_bandwidth_bytes_total",
    ] {
        assert!(body.contains(expected), "missing {expected} in:\n{body}");
    }
    assert_eq!(http_get(api, "/healthz").await.0, 200);
    assert_eq!(http_get(api, "/nope").await.0, 404);
    assert!(node.metrics_text().contains("ollamacron_node_state"));

    peer.shutdown().await.unwrap();
    node.shutdown().await.unwrap();
    // The API closes with the node.
    eventually("the API to close", || async {
        tokio::net::TcpStream::connect(api)
            .await
            .is_err()
            .then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_port_in_use_is_an_error_naming_api_listen() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = holder.local_addr().unwrap().to_string();
    let err = start(loopback_config(
        TCP_ONLY,
        &[("enable_metrics", "true"), ("api_listen", addr.as_str())],
    ))
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("api_listen") && err.to_string().contains(&addr),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_high_are_trimmed_to_low() {
    let hub = start(loopback_config(
        TCP_ONLY,
        &[
            ("conn_mgr_low", "1"),
            ("conn_mgr_high", "3"),
            ("conn_mgr_grace", "0s"),
            // Only the test's own dials: no discovery redialing the hub.
            ("enable_dht", "false"),
        ],
    ))
    .await
    .unwrap();
    let mut events = hub.subscribe();
    let addr = hub.dialable_addrs().await.unwrap().remove(0);
    let mut spokes = Vec::new();
    for _ in 0..3 {
        let spoke = start(loopback_config(TCP_ONLY, &[("enable_dht", "false")]))
            .await
            .unwrap();
        // The third dial may be trimmed as soon as it lands; either outcome is fine here.
        let _ = spoke.dial(addr.clone()).await;
        spokes.push(spoke);
    }
    let trimmed = wait_for_event(&mut events, "a trim", |e| match e {
        NodeEvent::ConnectionsTrimmed { count } => Some(*count),
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(trimmed, 2, "3 connections at high=3 are trimmed to low=1");
    eventually("the hub to hold one connection", || async {
        let m = hub.metrics().await.ok()?;
        (m.connections_inbound == 1 && m.connections_trimmed == 2).then_some(())
    })
    .await
    .unwrap();
    for node in spokes.iter().chain([&hub]) {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grace_period_protects_young_connections() {
    let hub = start(loopback_config(
        TCP_ONLY,
        &[
            ("conn_mgr_low", "1"),
            ("conn_mgr_high", "2"),
            ("conn_mgr_grace", "1h"),
            ("enable_dht", "false"),
        ],
    ))
    .await
    .unwrap();
    let addr = hub.dialable_addrs().await.unwrap().remove(0);
    let no_dht = [("enable_dht", "false")];
    let a = start(loopback_config(TCP_ONLY, &no_dht)).await.unwrap();
    let b = start(loopback_config(TCP_ONLY, &no_dht)).await.unwrap();
    a.dial(addr.clone()).await.unwrap();
    b.dial(addr.clone()).await.unwrap();
    // At the hard limit of 2 the hub refuses a third connection (the dialer
    // may see it open before the hub closes it), and none is trimmed.
    let c = start(loopback_config(TCP_ONLY, &no_dht)).await.unwrap();
    let _ = c.dial(addr).await;
    eventually("the refused connection to close on the dialer", || async {
        c.connected_peers().await.ok()?.is_empty().then_some(())
    })
    .await
    .unwrap();
    let m = hub.metrics().await.unwrap();
    assert_eq!((m.connections_inbound, m.connections_trimmed), (2, 0));
    for node in [a, b, c, hub] {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_before_start_see_the_whole_start() {
    let node = Node::new(loopback_config(TCP_ONLY, &[]))
        .with_keypair(ollamacron_node_core::libp2p::identity::Keypair::generate_ed25519());
    let mut events = node.subscribe();
    let handle = node.start().await.unwrap();
    wait_for_event(&mut events, "Starting -> Running", |e| {
        matches!(
            e,
            NodeEvent::StateChanged {
                from: NodeState::Starting,
                to: NodeState::Running
            }
        )
        .then_some(())
    })
    .await
    .unwrap();
    let (peer_id, addrs) = wait_for_event(&mut events, "Started", |e| match e {
        NodeEvent::Started {
            peer_id,
            listen_addrs,
        } => Some((*peer_id, listen_addrs.clone())),
        _ => None,
    })
    .await
    .unwrap();
    assert_eq!(peer_id, handle.peer_id());
    assert_eq!(addrs, handle.listen_addrs().await.unwrap());
    handle.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_validates_a_hand_built_config() {
    let mut config = loopback_config(TCP_ONLY, &[]);
    config.conn_mgr_low = 900;
    let err = start(config).await.unwrap_err();
    assert!(matches!(err, NodeError::Config(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("conn_mgr_low (900) must be <= conn_mgr_high (400)"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_dials_of_one_peer_share_the_connection() {
    let a = start(loopback_config(TCP_ONLY, &[])).await.unwrap();
    let b = start(loopback_config(TCP_ONLY, &[])).await.unwrap();
    let addr = a.dialable_addrs().await.unwrap().remove(0);
    let (first, second) = tokio::join!(b.dial(addr.clone()), b.dial(addr));
    assert_eq!(first.unwrap(), a.peer_id());
    assert_eq!(second.unwrap(), a.peer_id());
    assert_eq!(b.metrics().await.unwrap().connections_outbound, 1);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_node_on_the_same_tcp_port_is_refused() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    let first = start(loopback_config(&listen, &[])).await.unwrap();
    let err = start(loopback_config(&listen, &[])).await.unwrap_err();
    assert!(matches!(err, NodeError::Listen { .. }), "{err:?}");
    assert!(err.to_string().contains(&listen), "{err}");
    first.shutdown().await.unwrap();
}
