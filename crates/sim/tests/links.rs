//! The latency transport on its own (a round trip, the counters, a crash)
//! and under real node cores that find each other's services over it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::HashSet;
use std::pin::Pin;
use std::time::Duration;

use futures::{AsyncReadExt, AsyncWriteExt};
use ollamacron_node_core::config::{NodeConfig, Reachability};
use ollamacron_node_core::libp2p::core::transport::{
    DialOpts, ListenerId, PortUse, TransportEvent,
};
use ollamacron_node_core::libp2p::core::{Endpoint, Transport};
use ollamacron_node_core::libp2p::identity::Keypair;
use ollamacron_node_core::libp2p::multiaddr::Protocol;
use ollamacron_node_core::registry::{ServiceInfo, ServiceQuery};
use ollamacron_node_core::{Node, NodeHandle};
use ollamacron_sim::{LatencyTransport, LinkStream, SimConfig, SimNetwork};

/// Longest any step may take before the test fails (no upper bound on
/// how fast anything is: only that it happens).
const LIMIT: Duration = Duration::from_secs(60);

fn network(nodes: usize) -> SimNetwork {
    SimNetwork::new(SimConfig {
        // Away from other tests' memory ports.
        base_port: (rand::random::<u64>() >> 2) | 1,
        ..SimConfig::new(nodes, Duration::from_millis(20)..=Duration::from_millis(80))
    })
}

/// The next connection `transport` accepts, upgraded.
async fn accept(transport: &mut LatencyTransport) -> LinkStream {
    loop {
        let event = std::future::poll_fn(|cx| Pin::new(&mut *transport).poll(cx)).await;
        if let TransportEvent::Incoming { upgrade, .. } = event {
            return upgrade.await.expect("the listener side of the link");
        }
    }
}

fn dialer() -> DialOpts {
    DialOpts {
        role: Endpoint::Dialer,
        port_use: PortUse::New,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_trip_takes_at_least_the_link_rtt_and_every_byte_is_counted() {
    let net = network(2);
    let rtt = net.rtt(0, 1);
    let mut a = net.raw_transport(0);
    let mut b = net.raw_transport(1);
    b.listen_on(ListenerId::next(), net.address(1))
        .expect("listen on /memory");
    let server = tokio::spawn(async move {
        let mut stream = accept(&mut b).await;
        assert_eq!((stream.node(), stream.peer()), (1, 0));
        let mut ping = [0u8; 4];
        stream.read_exact(&mut ping).await.expect("the ping");
        stream.write_all(b"pong").await.expect("the pong");
        stream.flush().await.expect("flushed");
        // Stay open until the dialer has read it.
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest).await;
        (ping, b)
    });

    let dial_started = tokio::time::Instant::now();
    let dial = a.dial(net.address(1), dialer()).expect("a dial");
    let mut stream = tokio::time::timeout(LIMIT, dial)
        .await
        .expect("the dial in time")
        .expect("connected");
    assert!(
        dial_started.elapsed() >= rtt,
        "a dial is a handshake: one RTT"
    );
    assert_eq!(stream.one_way(), rtt / 2);

    let started = tokio::time::Instant::now();
    stream.write_all(b"ping").await.expect("the ping");
    stream.flush().await.expect("flushed");
    let mut pong = [0u8; 4];
    tokio::time::timeout(LIMIT, stream.read_exact(&mut pong))
        .await
        .expect("the pong in time")
        .expect("the pong");
    let round_trip = started.elapsed();
    assert_eq!(&pong, b"pong");
    assert!(
        round_trip >= rtt,
        "a round trip ({round_trip:?}) takes at least the link's RTT ({rtt:?})"
    );
    // The memory channel ends (EOF at the other end) when it is dropped.
    stream.close().await.expect("closed");
    drop(stream);
    let (ping, mut b) = server.await.expect("the server side");
    assert_eq!(&ping, b"ping");
    for node in [0, 1] {
        let traffic = net.traffic(node);
        assert_eq!((traffic.sent, traffic.received), (4, 4), "node {node}");
    }

    // A crash cuts the link at both ends and refuses new dials.
    let mut stream = tokio::time::timeout(LIMIT, a.dial(net.address(1), dialer()).expect("a dial"))
        .await
        .expect("the dial in time")
        .expect("connected");
    let mut accepted = accept(&mut b).await;
    net.crash(1);
    assert!(net.is_crashed(1));
    let mut byte = [0u8; 1];
    assert!(
        stream.read(&mut byte).await.is_err(),
        "the dialer's end is cut"
    );
    assert!(
        accepted.read(&mut byte).await.is_err(),
        "the crashed end too"
    );
    assert!(
        a.dial(net.address(1), dialer()).is_err(),
        "no one answers there"
    );
    assert_eq!(net.traffic(0).sent, 4, "nothing more was sent");
}

fn service(name: &str) -> ServiceInfo {
    ServiceInfo {
        id: name.to_owned(),
        name: name.to_owned(),
        service_type: "llm".to_owned(),
        capabilities: vec!["completion".to_owned()],
        protocols: vec!["ollama".to_owned()],
        ..ServiceInfo::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_node_cores_find_each_others_services_over_the_links() {
    let net = network(3);
    let keys: Vec<Keypair> = (0..3).map(|_| Keypair::generate_ed25519()).collect();
    let first = net
        .address(0)
        .with(Protocol::P2p(keys[0].public().to_peer_id()));
    let mut nodes: Vec<NodeHandle> = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        let config = NodeConfig {
            enable_mdns: false,
            listen: vec![net.address(i)],
            bootstrap: if i == 0 {
                Vec::new()
            } else {
                vec![first.clone()]
            },
            force_reachability: Some(Reachability::Public),
            ..NodeConfig::default()
        };
        let node = Node::new(config)
            .with_transport(net.transport(i, key).expect("a Noise key"))
            .with_keypair(key.clone())
            .start()
            .await
            .expect("the node starts on /memory");
        node.register_service(service(&format!("model-{i}:latest")))
            .await
            .expect("registered");
        nodes.push(node);
    }
    let everyone: HashSet<String> = nodes.iter().map(|n| n.peer_id().to_string()).collect();
    let query = ServiceQuery {
        service_type: Some("llm".to_owned()),
        ..ServiceQuery::default()
    };
    for node in &nodes {
        let seen = tokio::time::timeout(LIMIT, async {
            loop {
                let found = node.find_services(query.clone()).await.expect("a lookup");
                let peers: HashSet<String> = found.into_iter().map(|s| s.service.peer_id).collect();
                if peers == everyone {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
        .await;
        assert!(seen.is_ok(), "{} did not see every service", node.peer_id());
    }

    // Node 1's ping of node 0 crossed their link both ways.
    let rtt = net.rtt(0, 1);
    let peer0 = nodes[0].peer_id();
    let measured = tokio::time::timeout(LIMIT, async {
        loop {
            let peers = nodes[1].peers().await.expect("peers");
            if let Some(ms) = peers
                .iter()
                .find(|p| p.peer_id == peer0)
                .and_then(|p| p.latency_ms)
            {
                return ms;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("a ping of node 0");
    assert!(
        measured >= rtt.as_secs_f64() * 1000.0,
        "measured {measured} ms over a link of {rtt:?}"
    );
    for i in 0..3 {
        let traffic = net.traffic(i);
        assert!(
            traffic.sent > 0 && traffic.received > 0,
            "node {i}: {traffic:?}"
        );
    }
    for node in nodes {
        node.shutdown().await.expect("a clean stop");
    }
}
