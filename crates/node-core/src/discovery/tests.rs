//! Behaviour-level tests of the discovery behaviour on the memory transport.
//!
//! Each node is a `Swarm` running only [`Behaviour`]; the test calls the
//! methods the swarm task calls (`set_running`, `on_dht_provider`,
//! `on_identified`) and reads the events the swarm reports.

use libp2p::Swarm;
use libp2p::identity::Keypair;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p_swarm_test::SwarmExt;

use super::*;
use crate::test_swarms::{drive, listen, until, unused_address};

/// How long a node is watched for events that must not come.
const QUIET: Duration = Duration::from_millis(700);

/// A config with mDNS off and memory addresses only.
fn config() -> NodeConfig {
    NodeConfig {
        enable_mdns: false,
        listen: vec![Protocol::Memory(0).into()],
        ..NodeConfig::default()
    }
}

fn node(config: &NodeConfig) -> (Swarm<Behaviour>, Keypair) {
    let mut keypair = None;
    let swarm = Swarm::new_ephemeral_tokio(|key| {
        keypair = Some(key.clone());
        Behaviour::new(key.public().to_peer_id(), config, false)
    });
    (swarm, keypair.expect("the swarm's key"))
}

fn peer(swarm: &Swarm<Behaviour>) -> PeerId {
    *swarm.local_peer_id()
}

/// What identify would tell of `key`'s node.
fn identify_info(
    key: &Keypair,
    protocol_version: &str,
    listen_addrs: Vec<Multiaddr>,
) -> identify::Info {
    identify::Info {
        public_key: key.public(),
        protocol_version: protocol_version.to_owned(),
        agent_version: "test-agent/0".to_owned(),
        listen_addrs,
        protocols: Vec::new(),
        observed_addr: Multiaddr::empty(),
        signed_peer_record: None,
    }
}

/// The entry of `peer` in `swarm`'s table.
fn known(swarm: &Swarm<Behaviour>, peer: PeerId) -> KnownPeer {
    swarm
        .behaviour()
        .known_peers()
        .into_iter()
        .find(|p| p.peer_id == peer)
        .unwrap_or_else(|| panic!("{peer} is not known"))
}

/// Whether discovery has a dial queued or in flight.
fn dialing(swarm: &Swarm<Behaviour>) -> bool {
    let behaviour = swarm.behaviour();
    !behaviour.auto_dials.is_empty()
        || behaviour
            .queued
            .iter()
            .any(|e| matches!(e, ToSwarm::Dial { .. }))
}

/// Drive `swarms` for [`QUIET`] and fail if swarm 0 dials, connects or
/// closes a connection meanwhile.
async fn no_connection_changes(swarms: &mut [Swarm<Behaviour>]) {
    let late = drive(swarms, QUIET, &mut |_, event| match event {
        Some((
            0,
            event @ (SwarmEvent::Dialing { .. }
            | SwarmEvent::ConnectionEstablished { .. }
            | SwarmEvent::ConnectionClosed { .. }
            | SwarmEvent::Behaviour(Event::DialSucceeded { .. } | Event::DialFailed { .. })),
        )) => Some(format!("{event:?}")),
        _ => None,
    })
    .await;
    assert_eq!(late, None, "nothing was to happen");
}

/// Drive until swarm 0 reports a successful dial of `source`'s peer and
/// holds a connection to `peer`.
async fn dial_succeeds(swarms: &mut [Swarm<Behaviour>], peer: PeerId, source: DiscoverySource) {
    let mut connected = false;
    let mut succeeded = false;
    until(swarms, "discovery's dial to succeed", |_, event| {
        match event {
            Some((0, SwarmEvent::ConnectionEstablished { peer_id, .. })) => {
                assert_eq!(peer_id, peer);
                connected = true;
            }
            Some((0, SwarmEvent::Behaviour(Event::DialSucceeded { source: s }))) => {
                assert_eq!(s, source);
                succeeded = true;
            }
            Some((0, SwarmEvent::Behaviour(e @ Event::DialFailed { .. }))) => {
                panic!("the dial failed: {e:?}")
            }
            _ => {}
        }
        (connected && succeeded).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_bootstrap_peer_is_known_at_once_and_dialed() {
    let (mut listener, _) = node(&config());
    let listener_addr = listen(&mut listener).await;
    let listener_peer = peer(&listener);
    let boot = listener_addr.with(Protocol::P2p(listener_peer));
    let (mut dialer, _) = node(&NodeConfig {
        bootstrap: vec![boot.clone()],
        ..config()
    });

    // Known before the swarm ran at all.
    assert_eq!(
        dialer.behaviour().bootstrap_peer_ids(),
        HashSet::from([listener_peer])
    );
    let entry = known(&dialer, listener_peer);
    assert_eq!(entry.sources, [DiscoverySource::Bootstrap]);
    assert_eq!(entry.addresses, [boot]);
    assert!(!entry.connected);
    assert_eq!(entry.failures, 0);

    dialer.behaviour_mut().set_running(true);
    let mut swarms = vec![dialer, listener];
    let mut events = Vec::new();
    until(&mut swarms, "the bootstrap connection", |_, event| {
        if let Some((0, SwarmEvent::Behaviour(event))) = event {
            let done = matches!(event, Event::DialSucceeded { .. });
            events.push(event);
            return done.then_some(());
        }
        None
    })
    .await;
    assert_eq!(
        events.first(),
        Some(&Event::Discovered {
            peer: listener_peer,
            source: DiscoverySource::Bootstrap
        }),
        "{events:?}"
    );
    assert_eq!(
        events.last(),
        Some(&Event::DialSucceeded {
            source: DiscoverySource::Bootstrap
        })
    );
    let entry = known(&swarms[0], listener_peer);
    assert!(entry.connected);
    assert_eq!(entry.failures, 0);
    let status = swarms[0]
        .behaviour()
        .status(None, |_| crate::status::SourceStats::default());
    let bootstrap = status
        .sources
        .iter()
        .find(|s| s.source == DiscoverySource::Bootstrap)
        .unwrap();
    assert!(bootstrap.enabled && bootstrap.active, "{bootstrap:?}");
    assert_eq!(bootstrap.detail, "1 of 1 bootstrap peers connected");
    let mdns = status
        .sources
        .iter()
        .find(|s| s.source == DiscoverySource::Mdns)
        .unwrap();
    assert!(!mdns.enabled && !mdns.active, "{mdns:?}");
    assert_eq!(status.known_peers, 1);
}

#[tokio::test]
async fn a_dht_provider_is_dialed_while_below_conn_mgr_low() {
    let (mut first, _) = node(&config());
    let (mut second, _) = node(&config());
    let first_addr = listen(&mut first).await;
    let second_addr = listen(&mut second).await;
    let (first_peer, second_peer) = (peer(&first), peer(&second));
    let (mut dialer, _) = node(&NodeConfig {
        conn_mgr_low: 1,
        ..config()
    });
    dialer.behaviour_mut().set_running(true);
    dialer
        .behaviour_mut()
        .on_dht_provider(first_peer, std::slice::from_ref(&first_addr));
    assert!(dialing(&dialer), "below conn_mgr_low: dialed");
    let mut swarms = vec![dialer, first, second];
    dial_succeeds(&mut swarms, first_peer, DiscoverySource::Dht).await;
    let entry = known(&swarms[0], first_peer);
    assert_eq!(entry.sources, [DiscoverySource::Dht]);
    assert_eq!(entry.addresses, [first_addr]);
    assert!(entry.connected);

    // At conn_mgr_low, knowing a provider is enough.
    swarms[0]
        .behaviour_mut()
        .on_dht_provider(second_peer, std::slice::from_ref(&second_addr));
    assert!(!dialing(&swarms[0]), "at conn_mgr_low: not dialed");
    no_connection_changes(&mut swarms).await;
    let entry = known(&swarms[0], second_peer);
    assert_eq!(entry.sources, [DiscoverySource::Dht]);
    assert_eq!(entry.addresses, [second_addr]);
    assert!(!entry.connected);
    assert_eq!(entry.failures, 0);
}

#[tokio::test]
async fn a_stopped_discovery_does_not_dial_providers() {
    let (mut listener, _) = node(&config());
    let listener_addr = listen(&mut listener).await;
    let listener_peer = peer(&listener);
    let (mut dialer, _) = node(&config());
    dialer.behaviour_mut().set_running(true);
    dialer.behaviour_mut().set_running(false);
    dialer
        .behaviour_mut()
        .on_dht_provider(listener_peer, std::slice::from_ref(&listener_addr));
    assert!(!dialing(&dialer), "stopped: not dialed");
    let mut swarms = vec![dialer, listener];
    no_connection_changes(&mut swarms).await;
    let entry = known(&swarms[0], listener_peer);
    assert_eq!(entry.sources, [DiscoverySource::Dht]);
    assert!(!entry.connected);

    // The same report once running is dialed.
    swarms[0].behaviour_mut().set_running(true);
    swarms[0]
        .behaviour_mut()
        .on_dht_provider(listener_peer, std::slice::from_ref(&listener_addr));
    assert!(dialing(&swarms[0]));
    dial_succeeds(&mut swarms, listener_peer, DiscoverySource::Dht).await;
    assert!(known(&swarms[0], listener_peer).connected);
}

#[tokio::test]
async fn an_unreachable_provider_fails_with_a_retry_and_is_listed_failing() {
    let (mut dialer, _) = node(&NodeConfig {
        bootstrap_backoff_initial: Duration::from_secs(60),
        bootstrap_backoff_max: Duration::from_secs(600),
        ..config()
    });
    dialer.behaviour_mut().set_running(true);
    let ghost = PeerId::random();
    let addr = unused_address();
    dialer
        .behaviour_mut()
        .on_dht_provider(ghost, std::slice::from_ref(&addr));
    let mut swarms = vec![dialer];
    let (failures, retry_in) = until(&mut swarms, "the dial to fail", |_, event| match event {
        Some((
            0,
            SwarmEvent::Behaviour(Event::DialFailed {
                peer,
                source,
                retry,
            }),
        )) => {
            assert_eq!(peer, ghost);
            assert_eq!(source, DiscoverySource::Dht);
            Some(retry.expect("kept, to be retried"))
        }
        Some((0, SwarmEvent::Behaviour(e @ Event::DialSucceeded { .. }))) => {
            panic!("nobody listens there: {e:?}")
        }
        _ => None,
    })
    .await;
    assert_eq!(failures, 1);
    // backoff_initial, with jitter in [0.75, 1.25).
    assert!(
        retry_in >= Duration::from_secs(45) && retry_in < Duration::from_secs(75),
        "{retry_in:?}"
    );
    let entry = known(&swarms[0], ghost);
    assert_eq!(entry.failures, 1);
    assert!(!entry.connected);
    assert!(!entry.foreign);
    assert_eq!(entry.sources, [DiscoverySource::Dht]);
    assert_eq!(entry.addresses, std::slice::from_ref(&addr));

    // In backoff: reported again, not dialed again.
    swarms[0]
        .behaviour_mut()
        .on_dht_provider(ghost, std::slice::from_ref(&addr));
    assert!(!dialing(&swarms[0]), "in backoff");
}

#[tokio::test]
async fn a_foreign_peer_discovery_dialed_is_disconnected() {
    let (mut listener, listener_key) = node(&config());
    let listener_addr = listen(&mut listener).await;
    let listener_peer = peer(&listener);
    let (mut dialer, _) = node(&config());
    dialer.behaviour_mut().set_running(true);
    dialer
        .behaviour_mut()
        .on_dht_provider(listener_peer, std::slice::from_ref(&listener_addr));
    let mut swarms = vec![dialer, listener];
    dial_succeeds(&mut swarms, listener_peer, DiscoverySource::Dht).await;

    let info = identify_info(
        &listener_key,
        "/another-app/1.0.0",
        vec![listener_addr.clone()],
    );
    swarms[0]
        .behaviour_mut()
        .on_identified(listener_peer, &info);
    assert!(
        swarms[0].behaviour().queued.iter().any(|e| matches!(
            e,
            ToSwarm::CloseConnection { peer_id, connection: CloseConnection::All }
                if *peer_id == listener_peer
        )),
        "discovery closes the connection it made"
    );
    until(
        &mut swarms,
        "the foreign peer's connection to close",
        |_, event| {
            match event {
                Some((
                    0,
                    SwarmEvent::ConnectionClosed {
                        peer_id,
                        num_established,
                        cause,
                        ..
                    },
                )) => {
                    assert_eq!(peer_id, listener_peer);
                    // Closed by us, not left to idle out.
                    assert!(cause.is_none(), "{cause:?}");
                    (num_established == 0).then_some(())
                }
                _ => None,
            }
        },
    )
    .await;
    let entry = known(&swarms[0], listener_peer);
    assert!(entry.foreign);
    assert!(!entry.connected);
    assert_eq!(
        entry.sources,
        [DiscoverySource::Dht, DiscoverySource::Identify]
    );

    // A foreign peer is not dialed again, however it is reported.
    swarms[0]
        .behaviour_mut()
        .on_dht_provider(listener_peer, std::slice::from_ref(&listener_addr));
    assert!(!dialing(&swarms[0]), "foreign: not dialed");
    no_connection_changes(&mut swarms).await;
}

#[tokio::test]
async fn identify_closes_no_ollamacron_peer_nor_a_foreign_one_discovery_did_not_dial() {
    let (mut provider, provider_key) = node(&config());
    let provider_addr = listen(&mut provider).await;
    let provider_peer = peer(&provider);
    let (mut local, _) = node(&config());
    let local_addr = listen(&mut local).await;
    let (visitor, visitor_key) = node(&config());
    let visitor_peer = peer(&visitor);
    local.behaviour_mut().set_running(true);
    local
        .behaviour_mut()
        .on_dht_provider(provider_peer, std::slice::from_ref(&provider_addr));
    let mut swarms = vec![local, provider, visitor];
    dial_succeeds(&mut swarms, provider_peer, DiscoverySource::Dht).await;
    // A foreign peer dials us: discovery did not make that connection.
    swarms[2].dial(local_addr).unwrap();
    until(
        &mut swarms,
        "the visitor's connection",
        |_, event| match event {
            Some((0, SwarmEvent::ConnectionEstablished { peer_id, .. }))
                if peer_id == visitor_peer =>
            {
                Some(())
            }
            _ => None,
        },
    )
    .await;

    let ours = identify_info(&provider_key, PROTOCOL_VERSION, vec![provider_addr]);
    let foreign = identify_info(&visitor_key, "/another-app/1.0.0", Vec::new());
    swarms[0]
        .behaviour_mut()
        .on_identified(provider_peer, &ours);
    swarms[0]
        .behaviour_mut()
        .on_identified(visitor_peer, &foreign);
    assert!(
        !swarms[0]
            .behaviour()
            .queued
            .iter()
            .any(|e| matches!(e, ToSwarm::CloseConnection { .. })),
        "nothing to close"
    );
    no_connection_changes(&mut swarms).await;

    let provider_entry = known(&swarms[0], provider_peer);
    assert!(provider_entry.connected && !provider_entry.foreign);
    let visitor_entry = known(&swarms[0], visitor_peer);
    assert!(visitor_entry.connected, "kept");
    assert!(visitor_entry.foreign, "but marked foreign");
    assert_eq!(visitor_entry.sources, [DiscoverySource::Identify]);
}
