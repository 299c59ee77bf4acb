//! Hostile load on a node's TCP listener: hundreds of connections from
//! another loopback address (127.0.0.2) that never speak libp2p (half of
//! them send garbage, half nothing at all). Every garbage connection is closed by the node, and
//! while all of them are open the node keeps serving: its API answers, a
//! real peer joins and finds its service, and none of the junk counts as
//! a peer. Counts are asserted, not times.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::net::SocketAddr;

use ollamacron_node_core::libp2p::multiaddr::Protocol;
use ollamacron_node_core::registry::{ServiceInfo, ServiceQuery};
use ollamacron_tests::{TCP_ONLY, eventually, loopback_config, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Junk connections of each kind (the test holds both ends of each in one
/// process, so twice as many descriptors; CI's limit may be 1024).
const JUNK_EACH: usize = 200;

/// A TCP connection to `target` from 127.0.0.2.
async fn connect_from_another_host(target: SocketAddr) -> TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(([127, 0, 0, 2], 0).into()).unwrap();
    socket.connect(target).await.unwrap()
}

fn tcp_port(addr: &ollamacron_node_core::libp2p::Multiaddr) -> Option<u16> {
    addr.iter().find_map(|p| match p {
        Protocol::Tcp(port) => Some(port),
        _ => None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_half_open_connections_are_closed_and_the_node_keeps_serving() {
    let target = start(loopback_config(TCP_ONLY, &[])).await.unwrap();
    target
        .register_service(ServiceInfo {
            id: "llama3:8b".to_owned(),
            name: "llama3:8b".to_owned(),
            service_type: "llm".to_owned(),
            ..ServiceInfo::default()
        })
        .await
        .unwrap();
    let addr = target.dialable_addrs().await.unwrap().remove(0);
    let socket: SocketAddr = ([127, 0, 0, 1], tcp_port(&addr).unwrap()).into();

    // Half-open: connected, silent.
    let mut silent = Vec::new();
    for _ in 0..JUNK_EACH {
        silent.push(connect_from_another_host(socket).await);
    }
    // Garbage: not multistream-select, then waiting for the node to hang up.
    let mut closed_by_the_node = tokio::task::JoinSet::new();
    for i in 0..JUNK_EACH {
        let mut stream = connect_from_another_host(socket).await;
        closed_by_the_node.spawn(async move {
            let garbage = format!("GET / HTTP/1.1\r\n\r\n{}\n", "\u{0}junk".repeat(i % 50));
            let _ = stream.write_all(garbage.as_bytes()).await;
            let mut buf = [0u8; 1024];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => {}
                }
            }
        });
    }

    // While all of that is open (the silent ones hold their host's pending
    // slots until the upgrade times out, but only that host's): the node
    // answers, and a real peer joins and finds its service.
    let status = target.status().await.unwrap();
    assert_eq!(status.connections.peers, 0, "junk is no peer");
    let bootstrap = format!("[{addr}]");
    let peer = start(loopback_config(
        TCP_ONLY,
        &[("bootstrap", bootstrap.as_str())],
    ))
    .await
    .unwrap();
    let llm = ServiceQuery {
        service_type: Some("llm".into()),
        ..ServiceQuery::default()
    };
    eventually("the new peer to find the target's service", || {
        let (peer, llm) = (peer.clone(), llm.clone());
        async move {
            let found = peer.find_services(llm).await.ok()?;
            found
                .iter()
                .any(|r| r.service.name == "llama3:8b")
                .then_some(())
        }
    })
    .await
    .unwrap();

    // Every garbage connection was closed by the node (a read that never
    // ends would keep the join waiting until the event timeout).
    let mut closed = 0;
    let all = eventually("every garbage connection to be closed by the node", || {
        let ready = closed_by_the_node.try_join_next().map(|r| r.unwrap());
        if ready == Some(true) {
            closed += 1;
        }
        let done = closed == JUNK_EACH;
        async move { done.then_some(()) }
    })
    .await;
    assert!(
        all.is_ok(),
        "{closed} of {JUNK_EACH} garbage connections closed by the node"
    );
    let status = target.status().await.unwrap();
    assert_eq!(status.connections.peers, 1, "only the real peer is a peer");
    drop(silent);
}
