//! Private networks on loopback: only peers holding the network key
//! connect (`require_auth`), and only listed peers stay connected
//! (`allowed_peers`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::path::Path;

use ollamacron_config::write_new_network_key;
use ollamacron_node_core::libp2p::PeerId;
use ollamacron_node_core::libp2p::identity::Keypair;
use ollamacron_node_core::{Node, NodeHandle};
use ollamacron_tests::{TCP_ONLY, eventually, loopback_config, metric_value, start};

fn private_config(key: &Path) -> ollamacron_config::NodeConfig {
    let path = key.display().to_string();
    loopback_config(
        TCP_ONLY,
        &[("require_auth", "true"), ("psk_path", path.as_str())],
    )
}

async fn connected_to(node: &NodeHandle, peer: PeerId) -> bool {
    node.connected_peers()
        .await
        .unwrap()
        .iter()
        .any(|p| p.peer_id == peer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_peers_holding_the_network_key_connect() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("swarm.key");
    let other_key = dir.path().join("other.key");
    write_new_network_key(&key).unwrap();
    write_new_network_key(&other_key).unwrap();

    let a = start(private_config(&key)).await.unwrap();
    let member = start(private_config(&key)).await.unwrap();
    // A peer without the key cannot tell a refusal from a silent peer: it
    // gives up after its dial timeout (and `a`, seeing the socket close,
    // refuses it at once).
    let mut wrong_key_config = private_config(&other_key);
    wrong_key_config.dial_timeout = std::time::Duration::from_secs(2);
    let wrong_key = start(wrong_key_config).await.unwrap();
    let no_key = start(loopback_config(TCP_ONLY, &[("dial_timeout", "2s")]))
        .await
        .unwrap();
    let addr = a.dialable_addrs().await.unwrap().remove(0);

    assert_eq!(member.dial(addr.clone()).await.unwrap(), a.peer_id());
    let refused = "ollamacron_connections_refused_total{reason=\"handshake\"}";
    for outsider in [&wrong_key, &no_key] {
        let before = metric_value(&a, refused);
        let error = outsider.dial(addr.clone()).await.unwrap_err();
        assert!(
            error.to_string().contains(&addr.to_string()),
            "the dial error names the address: {error}"
        );
        // The refusal happens in the handshake, before any protocol, and
        // is counted (and logged) by the network's node.
        eventually("the refusal to be counted", || {
            let a = a.clone();
            async move { (metric_value(&a, refused) > before).then_some(()) }
        })
        .await
        .unwrap();
        assert!(!connected_to(&a, outsider.peer_id()).await);
    }
    // The dialer counts the connection as made once it sends the last
    // handshake message; `a` counts it once it has read that message, so
    // wait for `a` to see it (bounded) rather than race it.
    eventually("the network's node to list the member", || {
        let a = a.clone();
        let member = member.peer_id();
        async move { connected_to(&a, member).await.then_some(()) }
    })
    .await
    .unwrap();
    // No QUIC listener: it could not carry the key.
    let listen = a.listen_addrs().await.unwrap();
    assert!(
        listen.iter().all(|l| !l.to_string().contains("quic")),
        "{listen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_readable_key_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = ollamacron_config::NodeConfig {
        require_auth: true,
        psk_path: Some(dir.path().join("missing.key")),
        listen: vec![TCP_ONLY.parse().unwrap()],
        enable_mdns: false,
        enable_metrics: false,
        ..ollamacron_config::NodeConfig::default()
    };
    let error = Node::new(config)
        .with_keypair(Keypair::generate_ed25519())
        .start()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("psk_path") && error.contains("missing.key"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_not_on_the_allow_list_are_disconnected_both_ways() {
    let friend_key = Keypair::generate_ed25519();
    let friend_id = friend_key.public().to_peer_id();
    let allowed = format!("[{friend_id}]");
    let a = Node::new(loopback_config(
        TCP_ONLY,
        &[("allowed_peers", allowed.as_str())],
    ))
    .with_keypair(Keypair::generate_ed25519())
    .start()
    .await
    .unwrap();
    let friend = Node::new(loopback_config(TCP_ONLY, &[]))
        .with_keypair(friend_key)
        .start()
        .await
        .unwrap();
    let stranger = start(loopback_config(TCP_ONLY, &[])).await.unwrap();
    let addr = a.dialable_addrs().await.unwrap().remove(0);

    assert_eq!(friend.dial(addr.clone()).await.unwrap(), a.peer_id());
    let not_allowed = "ollamacron_connections_refused_total{reason=\"not_allowed\"}";
    // The stranger's handshake completes, then `a` closes the connection.
    let _ = stranger.dial(addr).await;
    eventually("the stranger to be refused and disconnected", || {
        let (a, stranger) = (a.clone(), stranger.clone());
        async move {
            let refused = metric_value(&a, not_allowed) >= 1.0;
            let gone = !connected_to(&stranger, a.peer_id()).await
                && !connected_to(&a, stranger.peer_id()).await;
            (refused && gone).then_some(())
        }
    })
    .await
    .unwrap();
    // And `a` does not dial strangers either.
    let stranger_addr = stranger.dialable_addrs().await.unwrap().remove(0);
    assert!(a.dial(stranger_addr).await.is_err());
    assert!(metric_value(&a, not_allowed) >= 2.0);
    assert!(connected_to(&a, friend_id).await, "the friend stays");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_network_works_through_a_relay() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("swarm.key");
    write_new_network_key(&key).unwrap();
    let path = key.display().to_string();
    let with = |extra: &[(&str, &str)]| {
        let mut all = vec![("require_auth", "true"), ("psk_path", path.as_str())];
        all.extend_from_slice(extra);
        loopback_config(TCP_ONLY, &all)
    };
    let relay = start(with(&[
        ("force_reachability", "public"),
        ("enable_nat_service", "true"),
    ]))
    .await
    .unwrap();
    let relay_addr = format!("[{}]", relay.dialable_addrs().await.unwrap().remove(0));
    let private = start(with(&[
        ("force_reachability", "private"),
        ("relay_nodes", relay_addr.as_str()),
        ("enable_hole_punch", "false"),
    ]))
    .await
    .unwrap();
    let circuit = eventually("a reservation through the private network", || {
        let private = private.clone();
        async move {
            private
                .dialable_addrs()
                .await
                .ok()?
                .into_iter()
                .find(|a| a.to_string().contains("p2p-circuit"))
        }
    })
    .await
    .unwrap();
    // The relayed connection carries the pnet handshake end to end too.
    let member = start(with(&[
        ("enable_hole_punch", "false"),
        ("enable_dht", "false"),
    ]))
    .await
    .unwrap();
    assert_eq!(
        member.dial(circuit.clone()).await.unwrap(),
        private.peer_id()
    );
    let outsider = start(loopback_config(TCP_ONLY, &[("dial_timeout", "2s")]))
        .await
        .unwrap();
    assert!(outsider.dial(circuit).await.is_err(), "no key, no relay");
}
