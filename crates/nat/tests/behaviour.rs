//! The NAT behaviour between swarms on libp2p's in-memory transport: a
//! forced-public relay server and forced-private clients behind it, each
//! client's transport being the relay client transport in front of the
//! memory transport (noise + yamux on both), as a node builds it. The swarms
//! are driven with `libp2p-swarm-test`'s `SwarmExt`.
//!
//! AutoNAT detection, DCUtR and UPnP need real networks (global IP
//! addresses, two NATs, a gateway) and are not exercised here.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::time::Duration;

use libp2p::core::transport::MemoryTransport;
use libp2p::core::{Transport, upgrade};
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, noise, yamux};
use libp2p_swarm_test::SwarmExt;
use ollamacron_nat::{
    Behaviour, Config, Event, Reachability, RelayLimits, RelayServerEvent, is_relayed,
};
use tokio::time::{Instant, timeout};

/// Bound on every test; a hang is a failure, not a stuck CI run.
const TEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Connections stay open for the whole test (the behaviour's handlers may
/// all be idle).
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// A memory "port" nobody listens on: dials to it fail at once. Listeners
/// take random ports (`/memory/0`), so a clash is a 1-in-2^64 chance.
const UNUSED_MEMORY_PORT: u64 = 4001;
/// Slack for timer granularity when comparing measured gaps with delays.
const TIMER_SLACK: Duration = Duration::from_millis(5);

/// A swarm with a fresh identity running the NAT behaviour with `config`,
/// on relay client transport + memory transport, noise and yamux: what
/// `Swarm::new_ephemeral_tokio` cannot build (the `SwarmExt` methods still
/// drive it).
fn nat_swarm(config: &Config) -> Swarm<Behaviour> {
    let key = Keypair::generate_ed25519();
    let peer = key.public().to_peer_id();
    let (behaviour, relay_transport) = Behaviour::new(peer, config);
    let transport = relay_transport
        .or_transport(MemoryTransport::default())
        .upgrade(upgrade::Version::V1)
        .authenticate(noise::Config::new(&key).unwrap())
        .multiplex(yamux::Config::default())
        .boxed();
    Swarm::new(
        transport,
        behaviour,
        peer,
        libp2p::swarm::Config::with_tokio_executor()
            .with_idle_connection_timeout(IDLE_CONNECTION_TIMEOUT),
    )
}

// --- Configurations ------------------------------------------------------

/// A relay that knows it is public.
fn relay_config(limits: RelayLimits) -> Config {
    Config::default()
        .with_force_reachability(Some(Reachability::Public))
        .with_relay_server(Some(limits))
}

/// A node that knows it is private, reserving on `relays` (empty: on
/// discovered relays).
fn private_config(relays: Vec<Multiaddr>) -> Config {
    Config::default()
        .with_force_reachability(Some(Reachability::Private))
        .with_relay_nodes(relays)
}

/// A relay server listening on a memory address: the swarm, its address
/// (with `/p2p`) and its id. It says it serves before anything else. The
/// tests drive it alongside its clients (or run it in the background).
async fn listening_relay(limits: RelayLimits) -> (Swarm<Behaviour>, Multiaddr, PeerId) {
    let mut relay = nat_swarm(&relay_config(limits));
    assert_eq!(relay.behaviour().reachability(), Reachability::Public);
    assert!(relay.behaviour().is_forced());
    assert!(
        relay.behaviour().is_relaying(),
        "a forced-public relay serves at once"
    );
    relay
        .listen_on(Multiaddr::empty().with(Protocol::Memory(0)))
        .unwrap();
    let mut address = None;
    let mut serving = false;
    while address.is_none() || !serving {
        match relay.next_swarm_event().await {
            SwarmEvent::NewListenAddr { address: a, .. } => address = Some(a),
            SwarmEvent::Behaviour(Event::RelayServer(RelayServerEvent::Serving(true))) => {
                serving = true;
            }
            SwarmEvent::Behaviour(event) => panic!("before serving: {event:?}"),
            _ => {}
        }
    }
    let address = address.unwrap();
    // The relay hands out its confirmed addresses in reservations.
    relay.add_external_address(address.clone());
    let id = *relay.local_peer_id();
    (relay, address.with_p2p(id).unwrap(), id)
}

// --- Tests -------------------------------------------------------------

#[tokio::test]
async fn a_private_node_gets_a_reservation_on_its_configured_relay() {
    timeout(TEST_TIMEOUT, async {
        let (mut relay, relay_address, relay_id) = listening_relay(RelayLimits::default()).await;
        let mut client = nat_swarm(&private_config(vec![relay_address.clone()]));
        let client_id = *client.local_peer_id();
        assert_eq!(client.behaviour().reachability(), Reachability::Private);
        assert!(client.behaviour().is_forced());
        assert!(
            !client.behaviour().is_relaying(),
            "no relay server configured"
        );
        assert!(client.behaviour().active_relays().is_empty());

        let client_side = async {
            match client.next_behaviour_event().await {
                Event::ReservationRequested { relay, address } => {
                    assert_eq!(relay, relay_id);
                    assert_eq!(address, relay_address);
                }
                other => panic!("expected a reservation request, got {other:?}"),
            }
            // The acceptance, and the circuit address confirmed as external
            // (for identify and the DHT to announce), in either order.
            let mut accepted = false;
            let mut confirmed = None;
            while !accepted || confirmed.is_none() {
                match client.next_swarm_event().await {
                    SwarmEvent::Behaviour(Event::ReservationAccepted { relay, renewal }) => {
                        assert_eq!(relay, relay_id);
                        assert!(!renewal);
                        accepted = true;
                    }
                    SwarmEvent::Behaviour(Event::ReservationClosed { reason, .. }) => {
                        panic!("reservation closed: {reason:?}");
                    }
                    SwarmEvent::ExternalAddrConfirmed { address } if is_relayed(&address) => {
                        confirmed = Some(address);
                    }
                    _ => {}
                }
            }
            confirmed.unwrap()
        };
        // The relay says so too.
        let relay_side = relay.wait(|event| match event {
            SwarmEvent::Behaviour(Event::RelayServer(RelayServerEvent::ReservationAccepted {
                peer,
                renewed,
            })) => Some((peer, renewed)),
            _ => None,
        });
        let (confirmed, (peer, renewed)) = tokio::join!(client_side, relay_side);

        assert!(
            confirmed
                .to_string()
                .starts_with(&relay_address.to_string()),
            "{confirmed} is reached through {relay_address}"
        );
        assert_eq!(client.behaviour().active_relays(), vec![relay_id]);
        assert_eq!(peer, client_id);
        assert!(!renewed);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_relay_candidate_is_reserved_on_when_no_relay_is_configured() {
    timeout(TEST_TIMEOUT, async {
        let (relay, relay_address, relay_id) = listening_relay(RelayLimits::default()).await;
        tokio::spawn(relay.loop_on_next());
        let mut client = nat_swarm(&private_config(Vec::new()));
        client.dial(relay_address.clone()).unwrap();
        client
            .wait(|event| match event {
                SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == relay_id => {
                    Some(())
                }
                SwarmEvent::Behaviour(Event::ReservationRequested { relay, .. }) => {
                    panic!("requested a reservation on {relay} before any relay was known")
                }
                _ => None,
            })
            .await;

        // As identify would report it: a circuit address (never used for a
        // reservation) before the direct one.
        let circuit = relay_address
            .clone()
            .with(Protocol::P2pCircuit)
            .with(Protocol::P2p(PeerId::random()));
        let direct = relay_address.clone();
        client
            .behaviour_mut()
            .add_relay_candidate(relay_id, &[circuit, direct]);

        let address = client
            .wait(|event| match event {
                SwarmEvent::Behaviour(Event::ReservationRequested { relay, address }) => {
                    assert_eq!(relay, relay_id);
                    Some(address)
                }
                _ => None,
            })
            .await;
        assert_eq!(address, relay_address, "the direct address, with /p2p");
        client
            .wait(|event| match event {
                SwarmEvent::Behaviour(Event::ReservationAccepted { relay, .. }) => {
                    assert_eq!(relay, relay_id);
                    Some(())
                }
                SwarmEvent::Behaviour(Event::ReservationClosed { reason, .. }) => {
                    panic!("reservation closed: {reason:?}")
                }
                _ => None,
            })
            .await;
        assert_eq!(client.behaviour().active_relays(), vec![relay_id]);
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn an_unreachable_relay_is_retried_with_doubling_backoff_up_to_the_cap() {
    const BACKOFF_INITIAL: Duration = Duration::from_millis(40);
    const BACKOFF_MAX: Duration = Duration::from_millis(160);
    const ATTEMPTS: usize = 4;
    timeout(TEST_TIMEOUT, async {
        let nobody = Multiaddr::empty()
            .with(Protocol::Memory(UNUSED_MEMORY_PORT))
            .with(Protocol::P2p(PeerId::random()));
        let config = private_config(vec![nobody.clone()])
            .with_reservation_backoff_initial(BACKOFF_INITIAL)
            .with_reservation_backoff_max(BACKOFF_MAX);
        let mut client = nat_swarm(&config);

        let mut delays = Vec::new();
        // Measured from the previous request as this test saw it, which
        // came before the behaviour saw that attempt fail: the test's
        // thread may be preempted before it sees an event, so timing from
        // when it saw the failure would make a retry look early.
        let mut requested_at: Option<Instant> = None;
        let mut closed_at: Option<(Instant, Duration)> = None;
        let mut requests = 0;
        while delays.len() < ATTEMPTS {
            match client.next_behaviour_event().await {
                Event::ReservationRequested { address, .. } => {
                    assert_eq!(address, nobody);
                    if let Some((at, delay)) = closed_at.take() {
                        let waited = at.elapsed();
                        assert!(
                            waited + TIMER_SLACK >= delay,
                            "retried after {waited:?}, before the {delay:?} backoff"
                        );
                    }
                    requested_at = Some(Instant::now());
                    requests += 1;
                }
                Event::ReservationClosed { retry_in, .. } => {
                    let delay = retry_in.expect("a configured relay is never given up");
                    let at = requested_at.take().expect("a request before it closed");
                    closed_at = Some((at, delay));
                    delays.push(delay);
                }
                Event::ReservationAccepted { .. } => panic!("nobody listens there"),
                _ => {}
            }
        }
        assert_eq!(
            delays,
            [
                BACKOFF_INITIAL,
                BACKOFF_INITIAL * 2,
                BACKOFF_MAX,
                BACKOFF_MAX
            ]
        );
        assert_eq!(requests, ATTEMPTS, "one request per attempt");
        assert!(client.behaviour().active_relays().is_empty());
    })
    .await
    .expect("test timed out");
}

#[tokio::test]
async fn a_relay_at_its_reservation_limit_refuses_the_next_client() {
    timeout(TEST_TIMEOUT, async {
        let (mut relay, relay_address, relay_id) =
            listening_relay(RelayLimits::default().with_max_reservations(1)).await;

        let mut first = nat_swarm(&private_config(vec![relay_address.clone()]));
        let first_id = *first.local_peer_id();
        let first_side = first.wait(|event| match event {
            SwarmEvent::Behaviour(Event::ReservationAccepted { relay, .. }) => {
                assert_eq!(relay, relay_id);
                Some(())
            }
            _ => None,
        });
        // The relay accepts the first client before it denies anyone.
        let relay_side =
            relay.wait(|event| match event {
                SwarmEvent::Behaviour(Event::RelayServer(
                    RelayServerEvent::ReservationAccepted { peer, .. },
                )) => Some(peer),
                SwarmEvent::Behaviour(Event::RelayServer(
                    RelayServerEvent::ReservationDenied { peer, .. },
                )) => panic!("denied {peer} before the second client came"),
                _ => None,
            });
        let ((), accepted) = tokio::join!(first_side, relay_side);
        assert_eq!(accepted, first_id);
        // Keep it connected (and its reservation held) in the background.
        tokio::spawn(first.loop_on_next());

        let mut second = nat_swarm(&private_config(vec![relay_address]));
        let second_id = *second.local_peer_id();
        let second_side = second.wait(|event| match event {
            SwarmEvent::Behaviour(Event::ReservationClosed {
                relay,
                reason,
                retry_in,
            }) => {
                assert_eq!(relay, relay_id);
                Some((reason, retry_in))
            }
            SwarmEvent::Behaviour(Event::ReservationAccepted { .. }) => {
                panic!("the relay holds one reservation at most")
            }
            _ => None,
        });
        let relay_side =
            relay.wait(|event| match event {
                SwarmEvent::Behaviour(Event::RelayServer(
                    RelayServerEvent::ReservationAccepted { peer, .. },
                )) => panic!("accepted {peer} beyond the limit"),
                SwarmEvent::Behaviour(Event::RelayServer(
                    RelayServerEvent::ReservationDenied { peer, status },
                )) => Some((peer, status)),
                _ => None,
            });
        let ((reason, retry_in), denied) = tokio::join!(second_side, relay_side);
        assert!(reason.is_some(), "a refusal carries its reason");
        assert_eq!(
            retry_in,
            Some(Config::default().reservation_backoff_initial)
        );
        assert!(second.behaviour().active_relays().is_empty());
        assert_eq!(denied.0, second_id);
        assert_eq!(denied.1, "ResourceLimitExceeded");
    })
    .await
    .expect("test timed out");
}
