//! The bootstrap behaviour between swarms of `libp2p-swarm-test` (memory
//! transport): connecting to configured peers, backing off from unreachable
//! ones, and the min/max connection policy.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::time::{Duration, Instant};

use libp2p::core::Endpoint;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{ConnectionId, NetworkBehaviour, dummy};
use libp2p::{Multiaddr, PeerId, Swarm};
use libp2p_swarm_test::SwarmExt;
use ollamacron_discovery_bootstrap::{Behaviour, Config, Event};
use tokio::time::timeout;

/// Bound on every test; a hang is a failure, not a stuck CI run.
const TEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Longer than any test: only dial failures and disconnections trigger dials.
const CHECK_INTERVAL: Duration = Duration::from_secs(60);
/// A memory "port" nobody listens on: dials to it fail at once. Listeners
/// take random ports (`/memory/0`), so a clash is a 1-in-2^64 chance.
const UNUSED_MEMORY_PORT: u64 = 4001;
/// Slack for timer granularity when comparing measured gaps with delays.
const TIMER_SLACK: Duration = Duration::from_millis(5);
/// The backoff's random factor is in [0.75, 1.25).
const JITTER_MIN: f64 = 0.75;
const JITTER_MAX: f64 = 1.25;

/// A peer that only accepts connections, listening on a fresh memory
/// address (and, unused, on 127.0.0.1) and running in the background; its
/// memory address, with `/p2p`. Its idle connections close after
/// swarm-test's default 10 s, longer than any test here.
async fn spawn_seed() -> Multiaddr {
    let mut seed = Swarm::new_ephemeral_tokio(|_| dummy::Behaviour);
    let (memory, _) = seed.listen().await;
    let address = memory.with_p2p(*seed.local_peer_id()).unwrap();
    tokio::spawn(seed.loop_on_next());
    address
}

fn peer_of(address: &Multiaddr) -> PeerId {
    match address.iter().last() {
        Some(Protocol::P2p(peer)) => peer,
        _ => panic!("{address} has no /p2p"),
    }
}

fn node(config: Config) -> Swarm<Behaviour> {
    Swarm::new_ephemeral_tokio(|key| Behaviour::new(key.public().to_peer_id(), config))
}

// --- Tests -------------------------------------------------------------

#[tokio::test]
async fn a_configured_listening_peer_is_dialed_and_connected() {
    timeout(TEST_TIMEOUT, async {
        let seed_address = spawn_seed().await;
        let seed = peer_of(&seed_address);
        let mut node = node(
            Config::default()
                .with_peers(vec![seed_address.clone()])
                .with_check_interval(CHECK_INTERVAL),
        );
        assert!(node.behaviour().is_bootstrap_peer(&seed));
        // Anyone dialing the seed by id is offered its configured address.
        let offered = node
            .behaviour_mut()
            .handle_pending_outbound_connection(
                ConnectionId::new_unchecked(0),
                Some(seed),
                &[],
                Endpoint::Dialer,
            )
            .unwrap();
        assert_eq!(offered, vec![seed_address.clone()]);

        assert_eq!(
            node.next_behaviour_event().await,
            Event::Dialing {
                peer: seed,
                failures: 0
            }
        );
        assert_eq!(
            node.next_behaviour_event().await,
            Event::Connected { peer: seed }
        );
        assert_eq!(node.behaviour().connected_count(), 1);
        let status = node.behaviour().peers();
        assert_eq!(status.len(), 1);
        assert_eq!(status[0].peer, seed);
        assert_eq!(status[0].addresses, vec![seed_address]);
        assert_eq!(status[0].connections, 1);
        assert!(!status[0].dialing);
        assert_eq!(status[0].failures, 0);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn an_unreachable_peer_fails_with_growing_backoff_and_is_retried() {
    const BACKOFF_INITIAL: Duration = Duration::from_millis(40);
    const BACKOFF_MAX: Duration = Duration::from_secs(10);
    const FAILURES: u32 = 4;
    timeout(TEST_TIMEOUT, async {
        let nobody = PeerId::random();
        let address = Multiaddr::empty()
            .with(Protocol::Memory(UNUSED_MEMORY_PORT))
            .with(Protocol::P2p(nobody));
        let mut node = node(
            Config::default()
                .with_peers(vec![address])
                .with_min_connections(1)
                .with_check_interval(CHECK_INTERVAL)
                .with_backoff_initial(BACKOFF_INITIAL)
                .with_backoff_max(BACKOFF_MAX),
        );

        let mut retries: Vec<Duration> = Vec::new();
        // When the behaviour said the retry may start, by its own clock:
        // this test sees each event later (its thread may be preempted in
        // between on a busy machine), so its own clock would make a
        // redial look early. `None` once that time had passed before we
        // looked: then there is nothing left to check.
        let mut retry_at: Option<Instant> = None;
        let mut dials = Vec::new();
        while retries.len() < FAILURES as usize {
            match node.next_behaviour_event().await {
                Event::Dialing { peer, failures } => {
                    assert_eq!(peer, nobody);
                    if let Some(at) = retry_at.take() {
                        let now = Instant::now();
                        assert!(
                            now + TIMER_SLACK >= at,
                            "redialed {:?} before the backoff ended",
                            at - now
                        );
                    }
                    dials.push(failures);
                }
                Event::DialFailed {
                    peer,
                    failures,
                    retry_in,
                    ..
                } => {
                    assert_eq!(peer, nobody);
                    assert_eq!(failures as usize, retries.len() + 1);
                    retry_at = node.behaviour().peers()[0].retry_at;
                    retries.push(retry_in);
                }
                other => panic!("nobody listens there: {other:?}"),
            }
        }
        assert_eq!(dials, [0, 1, 2, 3], "retried after each failure");
        for (n, retry_in) in retries.iter().enumerate() {
            let base = BACKOFF_INITIAL * 2u32.pow(u32::try_from(n).unwrap());
            assert!(
                *retry_in >= base.mul_f64(JITTER_MIN) && *retry_in < base.mul_f64(JITTER_MAX),
                "failure {}: {retry_in:?} is not {base:?} with jitter",
                n + 1
            );
        }
        assert!(
            retries.windows(2).all(|w| w[0] < w[1]),
            "backoff grows: {retries:?}"
        );
        let status = node.behaviour().peers();
        assert_eq!(status[0].failures, FAILURES);
        assert!(status[0].retry_at.is_some(), "in backoff");
        assert_eq!(node.behaviour().connected_count(), 0);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn below_min_connections_no_more_than_max_connections_are_redialed() {
    const PEERS: usize = 3;
    const MIN_CONNECTIONS: usize = 2;
    const MAX_CONNECTIONS: usize = 2;
    /// Reconnects wait out this backoff (jitter only shortens it: capped).
    const BACKOFF: Duration = Duration::from_millis(20);
    /// Many backoffs long: a third dial would have happened by then.
    const QUIET_WINDOW: Duration = Duration::from_millis(300);
    timeout(TEST_TIMEOUT, async {
        let mut addresses = Vec::new();
        for _ in 0..PEERS {
            addresses.push(spawn_seed().await);
        }
        let seeds: Vec<PeerId> = addresses.iter().map(peer_of).collect();
        let mut node = node(
            Config::default()
                .with_peers(addresses)
                .with_min_connections(MIN_CONNECTIONS)
                .with_max_connections(MAX_CONNECTIONS)
                .with_check_interval(CHECK_INTERVAL)
                .with_backoff_initial(BACKOFF)
                .with_backoff_max(BACKOFF),
        );

        // On start every configured peer is dialed, whatever the limits.
        let mut connected = Vec::new();
        while connected.len() < PEERS {
            if let Event::Connected { peer } = node.next_behaviour_event().await {
                connected.push(peer);
            }
        }
        connected.sort_unstable();
        let mut expected = seeds.clone();
        expected.sort_unstable();
        assert_eq!(connected, expected);

        // All connections drop: fewer than `min_connections` remain, and
        // only `max_connections` peers are dialed again.
        for seed in &seeds {
            node.disconnect_peer_id(*seed).unwrap();
        }
        let mut disconnected = 0;
        let mut redialed = Vec::new();
        let mut reconnected = 0;
        while disconnected < PEERS || reconnected < MAX_CONNECTIONS {
            match node.next_behaviour_event().await {
                Event::Disconnected { .. } => disconnected += 1,
                Event::Dialing { peer, .. } => redialed.push(peer),
                Event::Connected { .. } => reconnected += 1,
                Event::DialFailed { error, .. } => panic!("seeds are listening: {error}"),
            }
        }
        assert_eq!(redialed.len(), MAX_CONNECTIONS, "{redialed:?}");
        assert_ne!(redialed[0], redialed[1]);

        // The minimum is met: the third peer stays unconnected after its
        // backoff has long passed.
        let more = timeout(QUIET_WINDOW, node.next_behaviour_event()).await;
        assert!(more.is_err(), "unexpected {more:?}");
        assert_eq!(node.behaviour().connected_count(), MIN_CONNECTIONS);
    })
    .await
    .expect("test timed out");
}
