//! A plain rust-libp2p peer (TCP + Noise + Yamux, nothing of ours) can dial
//! a node, identify it and ping it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::time::Duration;

use ollamacron_node_core::{PROTOCOL_VERSION, agent_version};
use ollamacron_tests::probe::probe;
use ollamacron_tests::{TCP_ONLY, loopback_config, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_libp2p_peer_identifies_and_pings_a_node() {
    let node = start(loopback_config(TCP_ONLY, &[])).await.unwrap();
    let addr = node.dialable_addrs().await.unwrap().remove(0);

    let report = probe(addr, Duration::from_secs(20)).await.unwrap();
    assert_eq!(report.peer_id, node.peer_id());
    assert_eq!(report.protocol_version, PROTOCOL_VERSION);
    assert_eq!(report.agent_version, agent_version());
    assert!(
        report
            .protocols
            .iter()
            .any(|p| p.as_ref() == "/ipfs/ping/1.0.0"),
        "{:?}",
        report.protocols
    );
    assert!(
        report
            .protocols
            .iter()
            .any(|p| p.as_ref() == "/ipfs/id/1.0.0"),
        "{:?}",
        report.protocols
    );
    node.shutdown().await.unwrap();
}
