//! A bootstrap peer that accepts and then drops us is not redialed in a
//! tight loop: a short-lived connection counts as a failure.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::time::{Duration, Instant};

use futures::StreamExt;
use libp2p::connection_limits::{self, ConnectionLimits};
use libp2p::swarm::SwarmEvent;
use libp2p::{SwarmBuilder, noise, tcp, yamux};
use ollamacron_discovery_bootstrap::{Behaviour, Config, Event};

const BACKOFF_INITIAL: Duration = Duration::from_millis(200);
const TEST_TIMEOUT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_drops_us_at_once_is_retried_with_backoff() {
    // A seed that accepts TCP and Noise, then refuses every inbound connection.
    let mut seed = SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|_| {
            connection_limits::Behaviour::new(
                ConnectionLimits::default().with_max_established_incoming(Some(0)),
            )
        })
        .unwrap()
        .build();
    seed.listen_on("/ip4/127.0.0.1/tcp/0".parse().unwrap())
        .unwrap();
    let addr = loop {
        if let SwarmEvent::NewListenAddr { address, .. } = seed.select_next_some().await {
            break address;
        }
    };
    let seed_id = *seed.local_peer_id();
    tokio::spawn(async move {
        loop {
            seed.select_next_some().await;
        }
    });

    let mut node = SwarmBuilder::with_new_identity()
        .with_tokio()
        .with_tcp(
            tcp::Config::default(),
            noise::Config::new,
            yamux::Config::default,
        )
        .unwrap()
        .with_behaviour(|key| {
            Behaviour::new(
                key.public().to_peer_id(),
                Config::default()
                    .with_peers(vec![addr.with_p2p(seed_id).unwrap()])
                    .with_min_connections(1)
                    .with_max_connections(1)
                    .with_check_interval(Duration::from_secs(60))
                    .with_backoff_initial(BACKOFF_INITIAL)
                    .with_backoff_max(Duration::from_secs(10)),
            )
        })
        .unwrap()
        .build();

    // Record every dial: (when this test saw it, failures before it).
    let run = async {
        let mut dials: Vec<(Instant, u32)> = Vec::new();
        let mut last_drop: Option<Instant> = None;
        let mut gaps = Vec::new();
        while dials.len() < 3 {
            if let SwarmEvent::Behaviour(event) = node.select_next_some().await {
                match event {
                    Event::Dialing { failures, .. } => {
                        if let Some(dropped) = last_drop {
                            gaps.push(dropped.elapsed());
                        }
                        dials.push((Instant::now(), failures));
                    }
                    Event::Disconnected { .. } | Event::DialFailed { .. } => {
                        // From the dial as this test saw it, which came
                        // before the behaviour saw the drop: the test's
                        // thread may be preempted before it sees an event,
                        // so timing from when it saw the drop would make a
                        // redial look early.
                        last_drop = dials.last().map(|d| d.0);
                    }
                    Event::Connected { .. } => {}
                }
            }
        }
        (dials, gaps)
    };
    let (dials, gaps) = tokio::time::timeout(TEST_TIMEOUT, run).await.unwrap();
    let failures: Vec<u32> = dials.iter().map(|d| d.1).collect();
    assert_eq!(failures, [0, 1, 2], "each drop counts as a failure");
    // Each redial waits at least the (jittered, doubling) backoff.
    assert!(gaps[0] >= BACKOFF_INITIAL.mul_f64(0.75), "{gaps:?}");
    assert!(gaps[1] >= BACKOFF_INITIAL.mul_f64(1.5), "{gaps:?}");
}
