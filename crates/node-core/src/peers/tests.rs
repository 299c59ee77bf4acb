//! Behaviour-level tests of the peers behaviour on the memory transport.
//!
//! Each node is a `Swarm` running only [`Behaviour`], driven by the test as
//! the swarm task would: its methods are called directly, its events read
//! from the swarm.

use libp2p::Swarm;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p_swarm_test::SwarmExt;
use tokio::sync::oneshot::error::TryRecvError;

use super::*;
use crate::test_swarms::{drive, listen, until, unused_address};

/// How long a node is watched for events that must not come.
const QUIET: Duration = Duration::from_millis(700);

type Reply = oneshot::Receiver<Result<PeerId, NodeError>>;

/// A config with mDNS off, memory addresses only and a short ping interval.
fn config() -> NodeConfig {
    NodeConfig {
        enable_mdns: false,
        listen: vec![Protocol::Memory(0).into()],
        ping_interval: Duration::from_millis(200),
        ..NodeConfig::default()
    }
}

/// How long a duplicate stays open here (the node's is longer).
const DUPLICATE_DELAY: Duration = Duration::from_millis(60);

fn node(config: &NodeConfig, protected: HashSet<PeerId>) -> Swarm<Behaviour> {
    Swarm::new_ephemeral_tokio(|key| {
        let mut behaviour = Behaviour::new(key.public().to_peer_id(), config, protected);
        behaviour.duplicate_close_delay = DUPLICATE_DELAY;
        behaviour
    })
}

fn peer(swarm: &Swarm<Behaviour>) -> PeerId {
    *swarm.local_peer_id()
}

/// Swarm `from` dials `to` at `addr`; driven until both see the connection.
async fn connect(swarms: &mut [Swarm<Behaviour>], from: usize, to: usize, addr: &Multiaddr) {
    let (from_peer, to_peer) = (peer(&swarms[from]), peer(&swarms[to]));
    swarms[from].dial(addr.clone()).unwrap();
    let mut seen = [false, false];
    until(swarms, "the connection on both sides", |_, event| {
        if let Some((i, SwarmEvent::ConnectionEstablished { peer_id, .. })) = event {
            if i == from && peer_id == to_peer {
                seen[0] = true;
            }
            if i == to && peer_id == from_peer {
                seen[1] = true;
            }
        }
        (seen == [true, true]).then_some(())
    })
    .await;
}

/// The answer on `reply`, once there is one (driving every swarm meanwhile).
async fn answer(swarms: &mut [Swarm<Behaviour>], reply: &mut Reply) -> Result<PeerId, NodeError> {
    until(swarms, "the dial's answer", |_, _| reply.try_recv().ok()).await
}

#[tokio::test]
async fn connected_swarms_agree_on_peers_directions_and_counts() {
    let a = node(&config(), HashSet::new());
    let mut b = node(&config(), HashSet::new());
    let b_addr = listen(&mut b).await;
    let (a_peer, b_peer) = (peer(&a), peer(&b));
    for swarm in [&a, &b] {
        assert_eq!(swarm.behaviour().peer_count(), 0);
        assert!(swarm.behaviour().connected_peers().is_empty());
    }
    let mut swarms = vec![a, b];
    connect(&mut swarms, 0, 1, &b_addr).await;

    let (a, b) = (swarms[0].behaviour(), swarms[1].behaviour());
    assert_eq!((a.peer_count(), b.peer_count()), (1, 1));
    assert_eq!((a.connection_count(), b.connection_count()), (1, 1));
    assert_eq!(a.count(Direction::Outbound), 1);
    assert_eq!(a.count(Direction::Inbound), 0);
    assert_eq!(b.count(Direction::Inbound), 1);
    assert_eq!(b.count(Direction::Outbound), 0);

    let a_sees = a.connected_peers();
    assert_eq!(a_sees.len(), 1, "{a_sees:?}");
    assert_eq!(a_sees[0].peer_id, b_peer);
    assert_eq!(a_sees[0].direction, Direction::Outbound);
    assert_eq!(a_sees[0].addresses, std::slice::from_ref(&b_addr));
    let b_sees = b.connected_peers();
    assert_eq!(b_sees.len(), 1, "{b_sees:?}");
    assert_eq!(b_sees[0].peer_id, a_peer);
    assert_eq!(b_sees[0].direction, Direction::Inbound);

    assert_eq!(a.dialed_addresses(&b_peer), [b_addr]);
    assert!(b.dialed_addresses(&a_peer).is_empty(), "b dialed nobody");
    for (behaviour, other) in [(a, b_peer), (b, a_peer)] {
        let entry = behaviour
            .entry(&other)
            .expect("an entry per connected peer");
        assert_eq!(entry.connection(), ConnectionKind::Direct);
    }

    // The last connection closing empties both sides, each reporting that
    // nothing is measured any more.
    assert!(swarms[0].disconnect_peer_id(b_peer).is_ok());
    let mut unmeasured = [false, false];
    until(
        &mut swarms,
        "both sides to forget the peer",
        |swarms, event| {
            if let Some((i, SwarmEvent::Behaviour(Event::PathChanged { path: None, peer }))) = event
            {
                assert_eq!(peer, [b_peer, a_peer][i]);
                unmeasured[i] = true;
            }
            (unmeasured == [true, true]
                && swarms.iter().all(|s| s.behaviour().connection_count() == 0))
            .then_some(())
        },
    )
    .await;
    for (swarm, other) in swarms.iter().zip([b_peer, a_peer]) {
        let behaviour = swarm.behaviour();
        assert_eq!(behaviour.peer_count(), 0);
        assert_eq!(behaviour.count(Direction::Inbound), 0);
        assert_eq!(behaviour.count(Direction::Outbound), 0);
        assert!(behaviour.connected_peers().is_empty());
        assert!(behaviour.entry(&other).is_none());
    }
}

#[tokio::test]
async fn a_ping_reports_the_path_and_sets_the_round_trip() {
    let a = node(&config(), HashSet::new());
    let mut b = node(&config(), HashSet::new());
    let b_addr = listen(&mut b).await;
    let peers = [peer(&b), peer(&a)];
    let mut swarms = vec![a, b];
    connect(&mut swarms, 0, 1, &b_addr).await;
    assert!(
        swarms[0]
            .behaviour()
            .entry(&peers[0])
            .unwrap()
            .rtt()
            .is_none(),
        "nothing measured before a ping"
    );

    let mut measured: [Option<Duration>; 2] = [None, None];
    until(&mut swarms, "a path on both sides", |swarms, event| {
        if let Some((i, SwarmEvent::Behaviour(Event::PathChanged { peer, path }))) = event {
            assert_eq!(peer, peers[i]);
            let (rtt, via_relay) = path.expect("a ping measures the path");
            assert!(!via_relay, "a direct connection");
            // What the event reports is what the entry holds now.
            let entry = swarms[i].behaviour().entry(&peer).unwrap();
            assert_eq!(entry.rtt(), Some(rtt));
            assert!(!entry.rtt_via_relay());
            measured[i] = Some(rtt);
        }
        measured.iter().all(Option::is_some).then_some(())
    })
    .await;
    for (i, swarm) in swarms.iter().enumerate() {
        let listed = swarm.behaviour().connected_peers();
        assert_eq!(listed.len(), 1);
        assert!(listed[0].rtt.is_some(), "connected_peers shows the RTT");
        assert!(swarm.behaviour().entry(&peers[i]).unwrap().rtt().is_some());
    }
}

#[tokio::test]
async fn dial_answers_with_the_peer_once_connected() {
    let mut a = node(&config(), HashSet::new());
    let mut b = node(&config(), HashSet::new());
    let b_addr = listen(&mut b).await;
    let b_peer = peer(&b);
    let target = b_addr.clone().with(Protocol::P2p(b_peer));
    let (tx1, mut rx1) = oneshot::channel();
    let (tx2, mut rx2) = oneshot::channel();
    a.behaviour_mut().dial(target.clone(), tx1);
    a.behaviour_mut().dial(target.clone(), tx2);
    assert_eq!(
        a.behaviour().dials.len(),
        1,
        "the second dial joins the first"
    );
    assert_eq!(
        rx1.try_recv().unwrap_err(),
        TryRecvError::Empty,
        "not before connecting"
    );
    let mut swarms = vec![a, b];

    assert_eq!(answer(&mut swarms, &mut rx1).await.unwrap(), b_peer);
    assert_eq!(answer(&mut swarms, &mut rx2).await.unwrap(), b_peer);
    assert_eq!(swarms[0].behaviour().peer_count(), 1);
    assert_eq!(swarms[0].behaviour().connection_count(), 1, "one dial");

    // A connected peer is answered at once, without a dial.
    let (tx, mut rx) = oneshot::channel();
    swarms[0].behaviour_mut().dial(target, tx);
    assert_eq!(rx.try_recv().unwrap().unwrap(), b_peer);
    assert!(swarms[0].behaviour().dials.is_empty());

    // An address without a peer id is dialed, and answered with who
    // answered; the second connection is a duplicate its dialer closes.
    let (tx, mut rx) = oneshot::channel();
    swarms[0].behaviour_mut().dial(b_addr, tx);
    assert_eq!(answer(&mut swarms, &mut rx).await.unwrap(), b_peer);
    assert_eq!(swarms[0].behaviour().peer_count(), 1);
    until(&mut swarms, "the duplicate to close", |swarms, _| {
        swarms
            .iter()
            .all(|s| s.behaviour().connection_count() == 1)
            .then_some(())
    })
    .await;
    assert_eq!(swarms[0].behaviour().duplicates_closed_total(), 1);
    assert_eq!(swarms[0].behaviour().established_total(), 2);
    assert_eq!(swarms[0].behaviour().peer_count(), 1);
}

#[tokio::test]
async fn dial_of_an_address_nobody_listens_on_fails_naming_it() {
    let a = node(&config(), HashSet::new());
    let mut swarms = vec![a];
    for addr in [
        unused_address(),
        unused_address().with(Protocol::P2p(PeerId::random())),
    ] {
        let (tx, mut rx) = oneshot::channel();
        swarms[0].behaviour_mut().dial(addr.clone(), tx);
        let error = answer(&mut swarms, &mut rx).await.unwrap_err();
        let NodeError::Dial { target, reason } = &error else {
            panic!("expected a dial error, got {error:?}");
        };
        assert_eq!(*target, addr.to_string());
        assert!(!reason.is_empty());
        assert!(error.to_string().contains(&addr.to_string()), "{error}");
        assert!(swarms[0].behaviour().dials.is_empty());
        assert_eq!(swarms[0].behaviour().peer_count(), 0);
    }
}

#[tokio::test]
async fn a_peer_outside_allowed_peers_is_refused_and_not_kept() {
    let member = node(&config(), HashSet::new());
    let mut outsider = node(&config(), HashSet::new());
    let outsider_addr = listen(&mut outsider).await;
    let (member_peer, outsider_peer) = (peer(&member), peer(&outsider));
    let mut strict = node(
        &NodeConfig {
            allowed_peers: vec![member_peer.to_string()],
            ..config()
        },
        HashSet::new(),
    );
    let strict_addr = listen(&mut strict).await;
    let mut swarms = vec![strict, member, outsider];

    // The listed peer gets in.
    connect(&mut swarms, 1, 0, &strict_addr).await;
    assert_eq!(swarms[0].behaviour().peer_count(), 1);

    // The outsider dials in: refused before it is established, and its
    // side ends too.
    swarms[2].dial(strict_addr.clone()).unwrap();
    let mut refused = 0;
    let mut outsider_done = false;
    until(&mut swarms, "the refusal on both sides", |swarms, event| {
        match event {
            Some((0, SwarmEvent::Behaviour(Event::Refused { reason }))) => {
                assert_eq!(reason, Refusal::NotAllowed);
                refused += 1;
            }
            Some((0, SwarmEvent::ConnectionEstablished { peer_id, .. })) => {
                assert_ne!(peer_id, outsider_peer, "the outsider was let in");
            }
            Some((
                2,
                SwarmEvent::OutgoingConnectionError { .. } | SwarmEvent::ConnectionClosed { .. },
            )) => outsider_done = true,
            _ => {}
        }
        (refused == 1 && outsider_done && swarms[2].behaviour().connection_count() == 0)
            .then_some(())
    })
    .await;
    let strict = swarms[0].behaviour();
    assert_eq!(strict.peer_count(), 1);
    assert!(strict.entry(&outsider_peer).is_none());
    let listed: Vec<PeerId> = strict.connected_peers().iter().map(|p| p.peer_id).collect();
    assert_eq!(listed, [member_peer]);

    // Dialing the outsider is refused too, and the dial says so.
    let (tx, mut rx) = oneshot::channel();
    swarms[0]
        .behaviour_mut()
        .dial(outsider_addr.with(Protocol::P2p(outsider_peer)), tx);
    let mut refused = false;
    let error = until(&mut swarms, "the refused dial", |_, event| {
        if let Some((0, SwarmEvent::Behaviour(Event::Refused { reason }))) = event {
            assert_eq!(reason, Refusal::NotAllowed);
            refused = true;
        }
        rx.try_recv().ok()
    })
    .await
    .unwrap_err();
    assert!(refused, "the refusal is reported before the dial returns");
    assert!(matches!(error, NodeError::Dial { .. }), "{error:?}");
    assert_eq!(swarms[0].behaviour().peer_count(), 1);
}

#[tokio::test]
async fn trimming_closes_down_to_low_and_never_a_protected_peer() {
    const SPOKES: usize = 6;
    let spokes: Vec<Swarm<Behaviour>> = (0..SPOKES)
        .map(|_| node(&config(), HashSet::new()))
        .collect();
    let spoke_peers: Vec<PeerId> = spokes.iter().map(peer).collect();
    // The fourth spoke reaches `high` and is the youngest connection then:
    // the first to go, were it not protected.
    let protected = spoke_peers[3];
    let mut hub = node(
        &NodeConfig {
            conn_mgr_low: 2,
            conn_mgr_high: 4,
            conn_mgr_grace: Duration::ZERO,
            ..config()
        },
        HashSet::from([protected]),
    );
    let hub_addr = listen(&mut hub).await;
    let mut swarms = vec![hub];
    swarms.extend(spokes);

    let mut trimmed = 0;
    for spoke in 1..=SPOKES {
        let spoke_peer = spoke_peers[spoke - 1];
        // The connection that makes `high` (4) is trimmed down to `low` (2).
        let expect_trim = swarms[0].behaviour().connection_count() + 1 == 4;
        let want = if expect_trim { 2 } else { spoke - trimmed };
        swarms[spoke].dial(hub_addr.clone()).unwrap();
        let mut established = false;
        let mut reported = false;
        until(
            &mut swarms,
            "the connection (and the trim)",
            |swarms, event| {
                match event {
                    Some((0, SwarmEvent::ConnectionEstablished { peer_id, .. })) => {
                        assert_eq!(peer_id, spoke_peer);
                        established = true;
                    }
                    Some((0, SwarmEvent::Behaviour(Event::Trimmed { closed }))) => {
                        assert!(expect_trim, "trimmed below high");
                        assert_eq!(closed, 2, "from high (4) down to low (2)");
                        reported = true;
                    }
                    Some((0, SwarmEvent::ConnectionClosed { peer_id, .. })) => {
                        assert!(expect_trim, "a connection closed below high");
                        assert_ne!(peer_id, protected, "a protected peer was trimmed");
                    }
                    _ => {}
                }
                (established
                    && reported == expect_trim
                    && swarms[0].behaviour().connection_count() == want)
                    .then_some(())
            },
        )
        .await;
        if expect_trim {
            trimmed += 2;
        }
    }

    let hub = swarms[0].behaviour();
    assert_eq!(trimmed, 4, "trimmed twice");
    assert_eq!(hub.trimmed_total(), 4);
    assert_eq!(hub.connection_count(), 2, "ends at low");
    let mut kept: Vec<PeerId> = hub.connected_peers().iter().map(|p| p.peer_id).collect();
    let mut expected = vec![spoke_peers[0], protected];
    kept.sort();
    expected.sort();
    assert_eq!(kept, expected, "the oldest and the protected one stay");
    // Nothing else is closed afterwards (the periodic check agrees).
    let late = drive(&mut swarms, QUIET, &mut |_, event| match event {
        Some((0, SwarmEvent::ConnectionClosed { peer_id, .. })) => Some(peer_id),
        _ => None,
    })
    .await;
    assert_eq!(late, None);
}

/// Whether `a` sorts before `b` as the tie-break compares them.
fn smaller(a: PeerId, b: PeerId) -> bool {
    a.to_bytes() < b.to_bytes()
}

/// Two listening nodes with fresh keys, the one with the smaller peer id
/// first if `smaller_first`, and their addresses.
async fn pair(config: &NodeConfig, smaller_first: bool) -> (Vec<Swarm<Behaviour>>, Vec<Multiaddr>) {
    let mut a = node(config, HashSet::new());
    let mut b = node(config, HashSet::new());
    if smaller(peer(&a), peer(&b)) != smaller_first {
        std::mem::swap(&mut a, &mut b);
    }
    let addrs = vec![listen(&mut a).await, listen(&mut b).await];
    (vec![a, b], addrs)
}

/// Drive two nodes until every connection attempt has ended on both sides
/// (node i made `dialed[i]` dials and was dialed `accepted[i]` times), and
/// each is left with exactly one connection and nothing still closing.
/// A node closes a connection only once it is [`DUPLICATE_DELAY`] old (by
/// its own record of when the connection was established).
async fn settle(swarms: &mut [Swarm<Behaviour>], dialed: [usize; 2], accepted: [usize; 2]) {
    let mut seen = ([0; 2], [0; 2]);
    let mut established: HashMap<(usize, ConnectionId), Instant> = HashMap::new();
    until(swarms, "one connection on each side", |swarms, event| {
        match event {
            Some((
                i,
                SwarmEvent::ConnectionEstablished {
                    endpoint,
                    connection_id,
                    ..
                },
            )) => {
                // The behaviour's own clock: the test sees the event later
                // (its thread may be preempted in between on a busy machine).
                let at = swarms[i].behaviour().connections[&connection_id].established;
                established.insert((i, connection_id), at);
                if endpoint.is_dialer() {
                    seen.0[i] += 1;
                } else {
                    seen.1[i] += 1;
                }
            }
            Some((i, SwarmEvent::OutgoingConnectionError { .. })) => seen.0[i] += 1,
            Some((i, SwarmEvent::IncomingConnectionError { .. })) => seen.1[i] += 1,
            // Connections idle out after a while (only ping runs on them,
            // and it keeps none alive): a duplicate nobody closed would,
            // in time, and look settled.
            Some((
                i,
                SwarmEvent::ConnectionClosed {
                    cause: Some(libp2p::swarm::ConnectionError::KeepAliveTimeout),
                    ..
                },
            )) => panic!("node {i}: a connection idled out instead of being closed"),
            Some((
                i,
                SwarmEvent::ConnectionClosed {
                    connection_id,
                    cause,
                    ..
                },
            )) => {
                if cause.is_none() {
                    // Closed here: not before its delay.
                    let age = established[&(i, connection_id)].elapsed();
                    assert!(age >= DUPLICATE_DELAY, "node {i} closed one after {age:?}");
                }
                let left = swarms[i].behaviour().connection_count();
                assert!(left > 0, "node {i} closed its last connection to the peer");
            }
            _ => {}
        }
        (seen == (dialed, accepted)
            && swarms.iter().all(|s| {
                s.behaviour().connection_count() == 1 && s.behaviour().duplicates.is_empty()
            }))
        .then_some(())
    })
    .await;
}

/// Node `dialer`'s one connection is outbound and node `listener`'s
/// inbound: the same connection, `dialer`'s.
fn kept_the_dial_of(swarms: &[Swarm<Behaviour>], dialer: usize, listener: usize) {
    let (d, l) = (swarms[dialer].behaviour(), swarms[listener].behaviour());
    assert_eq!(
        (d.count(Direction::Outbound), d.count(Direction::Inbound)),
        (1, 0)
    );
    assert_eq!(
        (l.count(Direction::Inbound), l.count(Direction::Outbound)),
        (1, 0)
    );
    assert_eq!(d.connected_peers()[0].direction, Direction::Outbound);
    assert_eq!(l.connected_peers()[0].direction, Direction::Inbound);
    assert_eq!((d.peer_count(), l.peer_count()), (1, 1));
}

#[tokio::test]
async fn cross_dials_keep_the_one_connection_the_smaller_peer_dialed() {
    // Fresh keys each round; half the rounds the smaller id is node 0
    // (which is also polled first), half node 1.
    for round in 0..20 {
        let smaller_first = round % 2 == 0;
        let (mut swarms, addrs) = pair(&config(), smaller_first).await;
        swarms[0].dial(addrs[1].clone()).unwrap();
        swarms[1].dial(addrs[0].clone()).unwrap();
        settle(&mut swarms, [1, 1], [1, 1]).await;

        let (small, large) = if smaller_first { (0, 1) } else { (1, 0) };
        kept_the_dial_of(&swarms, small, large);
        let closed: Vec<u64> = swarms
            .iter()
            .map(|s| s.behaviour().duplicates_closed_total())
            .collect();
        // Either end may close the loser first (now and then both do), and
        // each counts what it closed.
        assert!(closed.iter().all(|c| *c <= 1), "round {round}: {closed:?}");
        assert!(closed.iter().sum::<u64>() >= 1, "round {round}: {closed:?}");
        for s in &swarms {
            let established = s.behaviour().established_total();
            assert!(
                (1..=2).contains(&established),
                "round {round}: {established}"
            );
        }
    }
}

#[tokio::test]
async fn a_second_dial_of_one_side_is_closed_by_its_dialer_only() {
    for round in 0..10 {
        // Node 0 dials twice; half the rounds it has the smaller id.
        let dialer_smaller = round % 2 == 0;
        let (mut swarms, addrs) = pair(&config(), dialer_smaller).await;
        swarms[0].dial(addrs[1].clone()).unwrap();
        swarms[0].dial(addrs[1].clone()).unwrap();
        settle(&mut swarms, [2, 0], [0, 2]).await;

        kept_the_dial_of(&swarms, 0, 1);
        assert_eq!(
            swarms[0].behaviour().duplicates_closed_total(),
            1,
            "round {round}: the dialer closes the newer one"
        );
        assert_eq!(
            swarms[1].behaviour().duplicates_closed_total(),
            0,
            "round {round}: the listener closes none"
        );
    }
}

#[tokio::test]
async fn an_awaited_dial_that_loses_the_tie_break_still_answers_with_the_peer() {
    for round in 0..10 {
        // Node 1 (the larger id) awaits its dial: the connection that loses.
        let (mut swarms, addrs) = pair(&config(), true).await;
        let small = peer(&swarms[0]);
        let (tx, mut rx) = oneshot::channel();
        swarms[1]
            .behaviour_mut()
            .dial(addrs[0].clone().with(Protocol::P2p(small)), tx);
        swarms[0].dial(addrs[1].clone()).unwrap();
        settle(&mut swarms, [1, 1], [1, 1]).await;

        kept_the_dial_of(&swarms, 0, 1);
        let answered = answer(&mut swarms, &mut rx).await;
        assert_eq!(answered.unwrap(), small, "round {round}");
    }
}

#[tokio::test]
async fn a_cross_dial_at_conn_mgr_high_is_not_trimmed_as_well() {
    // Two connections reach `high`: trimming must not pick the one the
    // tie-break keeps (the newer one, when the loser came first).
    let config = NodeConfig {
        conn_mgr_low: 1,
        conn_mgr_high: 2,
        conn_mgr_grace: Duration::ZERO,
        ..config()
    };
    for round in 0..10 {
        let smaller_first = round % 2 == 0;
        let (mut swarms, addrs) = pair(&config, smaller_first).await;
        swarms[0].dial(addrs[1].clone()).unwrap();
        swarms[1].dial(addrs[0].clone()).unwrap();
        settle(&mut swarms, [1, 1], [1, 1]).await;

        let (small, large) = if smaller_first { (0, 1) } else { (1, 0) };
        kept_the_dial_of(&swarms, small, large);
        for s in &swarms {
            assert_eq!(s.behaviour().trimmed_total(), 0, "round {round}");
        }
    }
}

#[tokio::test]
async fn an_awaited_dial_that_fails_while_the_peer_is_connected_answers_with_the_peer() {
    let a = node(&config(), HashSet::new());
    let mut b = node(&config(), HashSet::new());
    let b_addr = listen(&mut b).await;
    let b_peer = peer(&b);
    let mut swarms = vec![a, b];
    connect(&mut swarms, 0, 1, &b_addr).await;

    // A dial that raced a connection from the peer and lost, as the swarm
    // reports it (a lost race is hard to time on the memory transport);
    // then the same for a peer nobody is connected to.
    for (target, expect) in [(b_peer, Some(b_peer)), (PeerId::random(), None)] {
        let (tx, mut rx) = oneshot::channel();
        let id = ConnectionId::new_unchecked(usize::MAX);
        swarms[0].behaviour_mut().dials.insert(
            id,
            PendingDial {
                target: format!("{b_addr}/p2p/{target}"),
                peer: Some(target),
                replies: vec![tx],
            },
        );
        swarms[0]
            .behaviour_mut()
            .on_swarm_event(FromSwarm::DialFailure(libp2p::swarm::DialFailure {
                peer_id: Some(target),
                error: &DialError::Aborted,
                connection_id: id,
            }));
        let answered = answer(&mut swarms, &mut rx).await;
        assert_eq!(answered.ok(), expect);
    }
}

#[tokio::test]
async fn a_duplicate_whose_survivor_closes_first_is_kept() {
    const DELAY: Duration = Duration::from_millis(300);
    let (mut swarms, addrs) = pair(&config(), true).await;
    for s in &mut swarms {
        s.behaviour_mut().duplicate_close_delay = DELAY;
    }
    swarms[0].dial(addrs[1].clone()).unwrap();
    swarms[1].dial(addrs[0].clone()).unwrap();
    until(
        &mut swarms,
        "both connections on both sides",
        |swarms, _| {
            swarms
                .iter()
                .all(|s| s.behaviour().connection_count() == 2)
                .then_some(())
        },
    )
    .await;
    // The one to keep (node 0, the smaller id, dialed it) closes before the
    // other's delay is over: the other is all that is left, and stays.
    let kept = swarms[0]
        .behaviour()
        .connections
        .iter()
        .find(|(_, c)| c.dialed_by_us)
        .map(|(id, _)| *id)
        .unwrap();
    assert!(swarms[0].close_connection(kept));
    until(&mut swarms, "the kept one to close", |swarms, _| {
        swarms
            .iter()
            .all(|s| s.behaviour().connection_count() == 1)
            .then_some(())
    })
    .await;
    let late = drive(&mut swarms, DELAY + QUIET, &mut |_, event| match event {
        Some((i, SwarmEvent::ConnectionClosed { .. })) => Some(i),
        _ => None,
    })
    .await;
    assert_eq!(late, None, "the last connection was closed");
    kept_the_dial_of(&swarms, 1, 0);
    for s in &swarms {
        assert_eq!(s.behaviour().duplicates_closed_total(), 0);
        assert!(s.behaviour().duplicates.is_empty());
    }
}

/// How long an idle connection that is not kept stays open in the
/// keep-alive tests.
const IDLE_TIMEOUT: Duration = Duration::from_millis(400);

/// [`node`] whose swarm closes idle connections after [`IDLE_TIMEOUT`].
fn idling_node(config: &NodeConfig) -> Swarm<Behaviour> {
    use libp2p::core::transport::MemoryTransport;
    use libp2p::core::upgrade::Version;
    use libp2p::{Transport as _, noise, yamux};
    let key = libp2p::identity::Keypair::generate_ed25519();
    let transport = MemoryTransport::default()
        .upgrade(Version::V1)
        .authenticate(noise::Config::new(&key).unwrap())
        .multiplex(yamux::Config::default())
        .boxed();
    let behaviour = Behaviour::new(key.public().to_peer_id(), config, HashSet::new());
    Swarm::new(
        transport,
        behaviour,
        key.public().to_peer_id(),
        libp2p::swarm::Config::with_tokio_executor().with_idle_connection_timeout(IDLE_TIMEOUT),
    )
}

/// Drive `swarms` for `time` (they only idle): whatever closes as idle
/// closes meanwhile.
async fn idle_for(swarms: &mut [Swarm<Behaviour>], time: Duration) {
    let _ = drive(swarms, time, &mut |_, _| None::<()>).await;
}

/// [`config`] keeping at most `neighbours` connections open while idle.
fn keeping(neighbours: usize) -> NodeConfig {
    NodeConfig {
        conn_mgr_low: neighbours,
        ..config()
    }
}

/// Node 0, keeping one neighbour, connected to nodes 1 and 2 (in that
/// order), which keep none of their own; with the peer ids of 1 and 2.
async fn one_neighbour_of_two() -> (Vec<Swarm<Behaviour>>, PeerId, PeerId) {
    let a = idling_node(&keeping(1));
    let mut b = idling_node(&keeping(0));
    let mut c = idling_node(&keeping(0));
    let b_addr = listen(&mut b).await;
    let c_addr = listen(&mut c).await;
    let (b_peer, c_peer) = (peer(&b), peer(&c));
    let mut swarms = vec![a, b, c];
    connect(&mut swarms, 0, 1, &b_addr).await;
    connect(&mut swarms, 0, 2, &c_addr).await;
    (swarms, b_peer, c_peer)
}

#[tokio::test]
async fn idle_connections_neither_side_keeps_close_while_the_kept_ones_stay() {
    let (mut swarms, b_peer, c_peer) = one_neighbour_of_two().await;
    assert!(swarms[0].behaviour().is_kept(&b_peer));
    assert!(!swarms[0].behaviour().is_kept(&c_peer));

    // The connection to node 2 is idle and kept by neither side: it
    // closes. Node 0 keeps node 1, and its neighbour stream keeps node 1's
    // side open though node 1 keeps nothing itself.
    until(
        &mut swarms,
        "the unkept connection to close",
        |swarms, _| (!swarms[0].is_connected(&c_peer)).then_some(()),
    )
    .await;
    idle_for(&mut swarms, IDLE_TIMEOUT * 4).await;
    assert!(
        swarms[0].is_connected(&b_peer),
        "the kept connection closed"
    );
    assert!(!swarms[1].behaviour().is_kept(&peer(&swarms[0])));
}

#[tokio::test]
async fn a_connection_the_remote_keeps_stays_open_though_we_keep_none() {
    let a = idling_node(&keeping(0));
    let mut b = idling_node(&keeping(1));
    let b_addr = listen(&mut b).await;
    let (a_peer, b_peer) = (peer(&a), peer(&b));
    let mut swarms = vec![a, b];
    connect(&mut swarms, 0, 1, &b_addr).await;
    assert!(!swarms[0].behaviour().is_kept(&b_peer));
    assert!(swarms[1].behaviour().is_kept(&a_peer));
    idle_for(&mut swarms, IDLE_TIMEOUT * 4).await;
    assert!(
        swarms[0].is_connected(&b_peer),
        "the remote's neighbour closed as idle"
    );
}

#[tokio::test]
async fn when_a_kept_connection_closes_another_peer_is_kept_instead() {
    let (mut swarms, b_peer, c_peer) = one_neighbour_of_two().await;
    assert!(!swarms[0].behaviour().is_kept(&c_peer));
    assert!(swarms[0].disconnect_peer_id(b_peer).is_ok());
    until(&mut swarms, "the kept peer to leave", |swarms, _| {
        (!swarms[0].is_connected(&b_peer)).then_some(())
    })
    .await;
    assert!(swarms[0].behaviour().is_kept(&c_peer));
    idle_for(&mut swarms, IDLE_TIMEOUT * 4).await;
    assert!(
        swarms[0].is_connected(&c_peer),
        "the new neighbour closed as idle"
    );
}
