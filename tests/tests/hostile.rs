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
use ollamacron_tests::{TCP_ONLY, eventually, loopback_config, metric_value, start};

/// The malformed records the holder refused from puts, in its metrics.
const MALFORMED_PUTS: &str = "ollamacron_records_rejected_total{reason=\"malformed\",via=\"put\"} ";
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

/// A peer that keeps putting forged and malformed records is disconnected
/// and refused after the eighth within a minute (counted in metrics and
/// `status`), while an honest peer stays connected and served; below that
/// count the rogue stays connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_putting_invalid_records_is_banned_and_the_node_keeps_serving() {
    use libp2p::kad::{Record, RecordKey};
    use ollamacron_node_core::NodeEvent;

    let (holder, holder_addr, honest) = holder_with_an_honest_peer(&[]).await;
    let rogue = rogue_reading_from(&holder_addr, &honest).await;
    let mut events = holder.subscribe();
    let garbage = |i: usize| Record {
        key: RecordKey::new(&format!("/ollamacron/node/{}", libp2p::PeerId::random())),
        value: format!("forged record {i}, not an envelope").into_bytes(),
        publisher: None,
        expires: None,
    };
    // Seven: refused and counted, the rogue still connected.
    for i in 0..7 {
        rogue.put_to(garbage(i), holder.peer_id()).await.unwrap();
    }
    eventually("seven rejections counted", || async {
        (metric_value(&holder, MALFORMED_PUTS) == 7.0).then_some(())
    })
    .await
    .unwrap();
    assert!(
        connected(&holder).await.contains(&rogue.peer_id()),
        "below the limit the rogue stays"
    );
    // The eighth: banned (the connection may close before the put is
    // acknowledged, so the rogue may see it fail).
    let _ = rogue.put_to(garbage(7), holder.peer_id()).await;
    let banned = tokio::time::timeout(ollamacron_tests::EVENT_TIMEOUT, async {
        loop {
            if let Ok(NodeEvent::PeerBanned {
                peer_id, reason, ..
            }) = events.recv().await
            {
                break (peer_id, reason);
            }
        }
    })
    .await
    .expect("no PeerBanned event");
    assert_eq!(banned.0, rogue.peer_id());
    assert!(banned.1.contains("8 invalid records"), "{}", banned.1);
    eventually("the rogue disconnected", || async {
        (!connected(&holder).await.contains(&rogue.peer_id())).then_some(())
    })
    .await
    .unwrap();
    // It cannot come back, however often it tries: each connection is
    // closed as it is established, no put reaches the registry.
    for i in 8..13 {
        let _ = rogue.dial(holder_addr.clone()).await;
        assert!(
            rogue.put_to(garbage(i), holder.peer_id()).await.is_err(),
            "a banned peer's put was taken"
        );
        assert!(!connected(&holder).await.contains(&rogue.peer_id()));
    }
    assert_eq!(metric_value(&holder, MALFORMED_PUTS), 8.0);
    let status = holder.status().await.unwrap();
    assert_eq!(
        (
            status.connections.banned_now,
            status.connections.banned_total
        ),
        (1, 1)
    );
    assert_eq!(metric_value(&holder, "ollamacron_peers_banned_total "), 1.0);
    // The honest peer is still connected and served.
    assert!(connected(&holder).await.contains(&honest.peer_id()));
    finds_the_honest_service(&holder)
        .await
        .expect("the honest service is still found");
    honest.shutdown().await.unwrap();
    holder.shutdown().await.unwrap();
}

/// The peers `node` is connected to.
async fn connected(
    node: &ollamacron_node_core::NodeHandle,
) -> Vec<ollamacron_node_core::libp2p::PeerId> {
    let peers = node.connected_peers().await.unwrap();
    peers.iter().map(|p| p.peer_id).collect()
}

/// Records signed by hundreds of fresh identities (one host can make any
/// number), each valid and longer-lived than an honest record, fill the
/// bounded cache, but never push out the record of a peer the node is
/// connected to; the cache stays at its bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_of_many_fake_identities_do_not_evict_a_connected_peers_record() {
    use libp2p::kad::{Record, RecordKey};
    use ollamacron_service_registry::{NodeRecord, RECORD_VERSION, RecordLimits, sign_record};

    const MAX_RECORDS: usize = 16;
    const IDENTITIES: usize = 200;
    let max_records = MAX_RECORDS.to_string();
    let (holder, holder_addr, honest) =
        holder_with_an_honest_peer(&[("dht_max_records", max_records.as_str())]).await;
    let rogue = rogue_reading_from(&holder_addr, &honest).await;
    let now_ms = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    // Each lives an hour, the honest record five minutes: by expiry alone
    // the honest one would make room first.
    let lifetime_ms = 60 * 60 * 1000;
    for i in 0..IDENTITIES {
        let key = libp2p::identity::Keypair::generate_ed25519();
        let peer = key.public().to_peer_id().to_string();
        let record = NodeRecord {
            version: RECORD_VERSION,
            peer_id: peer.clone(),
            sequence: 1,
            issued_at: now_ms,
            expires_at: now_ms + lifetime_ms,
            services: vec![ServiceInfo {
                id: format!("junk-{i}"),
                name: format!("junk-{i}"),
                service_type: "junk".to_owned(),
                peer_id: peer.clone(),
                expires_at: now_ms + lifetime_ms,
                ..ServiceInfo::default()
            }],
            ..NodeRecord::default()
        };
        let value = sign_record(&record, &key, &RecordLimits::default()).unwrap();
        let put = Record {
            key: RecordKey::new(&format!("/ollamacron/node/{peer}")),
            value,
            publisher: None,
            expires: None,
        };
        rogue.put_to(put, holder.peer_id()).await.unwrap();
    }
    // Every one was verified and taken (the cache was full many times over).
    let identities = f64::from(u32::try_from(IDENTITIES).unwrap());
    let accepted = eventually("the fake records taken", || async {
        let taken = metric_value(&holder, "ollamacron_records_accepted_total{via=\"put\"} ");
        (taken >= identities).then_some(taken)
    })
    .await
    .unwrap();
    assert!(accepted >= identities);
    // And records it evicted were not taken again from its neighbour over
    // and over (before it remembered them: thousands).
    let synced = metric_value(&holder, "ollamacron_records_accepted_total{via=\"sync\"} ");
    assert!(
        synced <= identities,
        "{synced} records taken again through sync"
    );
    let status = holder.status().await.unwrap();
    assert!(
        status.services.nodes <= MAX_RECORDS,
        "cache over its bound: {:?}",
        status.services
    );
    assert_eq!(
        status.connections.banned_total, 0,
        "valid records never ban"
    );
    finds_the_honest_service(&holder)
        .await
        .expect("the connected peer's record was pushed out by junk");
    honest.shutdown().await.unwrap();
    holder.shutdown().await.unwrap();
}

/// A node taking puts (a DHT server from the start: on loopback it would
/// be a client until it learns it is reachable), with metrics and `extra`
/// settings, and an honest peer connected to it whose `llama3:8b` it finds.
async fn holder_with_an_honest_peer(
    extra: &[(&str, &str)],
) -> (
    ollamacron_node_core::NodeHandle,
    ollamacron_node_core::libp2p::Multiaddr,
    ollamacron_node_core::NodeHandle,
) {
    let mut settings = vec![("enable_metrics", "true"), ("dht_mode", "server")];
    settings.extend_from_slice(extra);
    let holder = start(loopback_config(TCP_ONLY, &settings)).await.unwrap();
    let holder_addr = holder.dialable_addrs().await.unwrap().remove(0);
    let honest = start(loopback_config(
        TCP_ONLY,
        &[("bootstrap", holder_addr.to_string().as_str())],
    ))
    .await
    .unwrap();
    honest
        .register_service(ServiceInfo {
            id: "llama3:8b".to_owned(),
            name: "llama3:8b".to_owned(),
            service_type: "llm".to_owned(),
            ..ServiceInfo::default()
        })
        .await
        .unwrap();
    eventually("the honest peer's service at the holder", || {
        finds_the_honest_service(&holder)
    })
    .await
    .unwrap();
    (holder, holder_addr, honest)
}

/// `Some` when `node` finds exactly one `llm` service (the honest peer's).
async fn finds_the_honest_service(node: &ollamacron_node_core::NodeHandle) -> Option<()> {
    let query = ServiceQuery {
        service_type: Some("llm".to_owned()),
        ..ServiceQuery::default()
    };
    (node.find_services(query).await.ok()?.len() == 1).then_some(())
}

/// A plain Kademlia peer connected to the holder at `holder_addr`, once the
/// holder answers its requests (it reads `honest`'s record from it).
async fn rogue_reading_from(
    holder_addr: &ollamacron_node_core::libp2p::Multiaddr,
    honest: &ollamacron_node_core::NodeHandle,
) -> ollamacron_tests::kad_peer::KadPeer {
    let rogue = ollamacron_tests::kad_peer::KadPeer::start(ollamacron_node_core::PROTOCOL_VERSION)
        .await
        .unwrap();
    rogue.dial(holder_addr.clone()).await.unwrap();
    let key = libp2p::kad::RecordKey::new(&format!("/ollamacron/node/{}", honest.peer_id()));
    eventually(
        "the rogue reads the honest record from the holder",
        || async { (!rogue.get(key.clone()).await.ok()?.is_empty()).then_some(()) },
    )
    .await
    .unwrap();
    rogue
}
