//! The behaviour on libp2p's memory transport: namespace discovery, the
//! typed queries and inbound records, and isolation by protocol id.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::{HashMap, HashSet};
use std::task::Poll;
use std::time::Duration;

use libp2p::futures::StreamExt;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, StreamProtocol, Swarm};
use libp2p_swarm_test::SwarmExt;
use ollamacron_discovery_dht::{
    Behaviour, Config, Event, Mode, QueryId, Record, RecordKey, provider_key,
};

const PROTOCOL: &str = "/my-app/kad/1.0.0";
const NAMESPACE: &str = "/my-app";
/// Longest any expected outcome may take.
const LIMIT: Duration = Duration::from_secs(20);
/// How long a node is watched for events that must not come.
const QUIET: Duration = Duration::from_millis(1500);

fn config(protocol: &'static str) -> Config {
    Config::new(StreamProtocol::new(protocol), NAMESPACE)
        .with_discovery_interval(Duration::from_secs(1))
        .with_announce_delay(Duration::ZERO)
        .with_query_timeout(Duration::from_secs(10))
}

/// A node on `protocol` listening on a memory address (also its external
/// address, so its provider announcements carry it).
async fn node(protocol: &'static str) -> (Swarm<Behaviour>, Multiaddr) {
    node_with(config(protocol)).await
}

/// [`node`] with its own config.
async fn node_with(config: Config) -> (Swarm<Behaviour>, Multiaddr) {
    let mut swarm =
        Swarm::new_ephemeral_tokio(|key| Behaviour::new(key.public().to_peer_id(), config));
    let listener = swarm.listen_on(Protocol::Memory(0).into()).unwrap();
    let address = tokio::time::timeout(LIMIT, async {
        loop {
            // The namespace announcement of a lone node may finish first.
            if let SwarmEvent::NewListenAddr {
                listener_id,
                address,
            } = swarm.select_next_some().await
                && listener_id == listener
            {
                return address;
            }
        }
    })
    .await
    .expect("listening on a memory address");
    swarm.add_external_address(address.clone());
    (swarm, address)
}

/// Drive all `swarms` until `on_event` (index of the swarm, its behaviour,
/// one of its events) returns `Some`, for at most `limit`: `None` if it
/// never did.
async fn drive<T>(
    swarms: &mut [Swarm<Behaviour>],
    limit: Duration,
    mut on_event: impl FnMut(usize, &mut Behaviour, Event) -> Option<T>,
) -> Option<T> {
    let run = std::future::poll_fn(|cx| {
        loop {
            let mut progressed = false;
            for (index, swarm) in swarms.iter_mut().enumerate() {
                if let Poll::Ready(Some(event)) = swarm.poll_next_unpin(cx) {
                    progressed = true;
                    if let SwarmEvent::Behaviour(event) = event
                        && let Some(out) = on_event(index, swarm.behaviour_mut(), event)
                    {
                        return Poll::Ready(out);
                    }
                }
            }
            if !progressed {
                return Poll::Pending;
            }
        }
    });
    tokio::time::timeout(limit, run).await.ok()
}

/// [`drive`] that must succeed within [`LIMIT`].
async fn until<T>(
    swarms: &mut [Swarm<Behaviour>],
    what: &str,
    on_event: impl FnMut(usize, &mut Behaviour, Event) -> Option<T>,
) -> T {
    drive(swarms, LIMIT, on_event)
        .await
        .unwrap_or_else(|| panic!("timed out waiting for {what}"))
}

fn peer(swarm: &Swarm<Behaviour>) -> PeerId {
    *swarm.local_peer_id()
}

fn record(key: &str, value: &[u8]) -> Record {
    Record::new(RecordKey::new(&key), value.to_vec())
}

/// Whether `event` is a result of a query of the user's.
fn is_query_event(event: &Event) -> bool {
    matches!(
        event,
        Event::ProvidersFound { .. } | Event::RecordFound { .. } | Event::QueryFinished { .. }
    )
}

/// Drive `swarms` for [`QUIET`] and fail on any event of `query`.
async fn no_more_events_of(swarms: &mut [Swarm<Behaviour>], query: QueryId) {
    let late = drive(swarms, QUIET, |_, _, event| match event {
        Event::ProvidersFound { query: q, .. }
        | Event::RecordFound { query: q, .. }
        | Event::QueryFinished { query: q, .. }
            if q == query =>
        {
            Some(event)
        }
        _ => None,
    })
    .await;
    assert!(late.is_none(), "event after QueryFinished: {late:?}");
}

#[tokio::test]
async fn three_nodes_find_each_other_as_namespace_providers() {
    let (hub, hub_addr) = node(PROTOCOL).await;
    let (b, _) = node(PROTOCOL).await;
    let (c, _) = node(PROTOCOL).await;
    let mut swarms = vec![hub, b, c];
    let peers: Vec<PeerId> = swarms.iter().map(peer).collect();
    for swarm in &mut swarms[1..] {
        assert_eq!(swarm.behaviour().namespace_key(), &provider_key(NAMESPACE));
        assert_eq!(swarm.behaviour().protocol().as_ref(), PROTOCOL);
        // Only the hub's address is known: b and c find each other through it.
        swarm
            .behaviour_mut()
            .add_address(&peers[0], hub_addr.clone());
    }
    let mut found: Vec<HashSet<PeerId>> = vec![HashSet::new(); 3];
    let mut advertising = [false; 3];
    until(
        &mut swarms,
        "every node to find the other two",
        |i, _, event| {
            assert!(!is_query_event(&event), "no query of ours runs: {event:?}");
            match event {
                Event::Advertising => advertising[i] = true,
                Event::ProviderFound { peer, .. } => {
                    assert_ne!(peer, peers[i], "a node never reports itself");
                    assert!(found[i].insert(peer), "{peer} reported twice");
                }
                _ => {}
            }
            found.iter().all(|f| f.len() == 2).then_some(())
        },
    )
    .await;
    // b and c re-announced once their routing table had the hub; the hub's
    // table stays empty (it only ever accepted connections).
    assert_eq!(advertising, [false, true, true]);
    for swarm in &swarms[1..] {
        assert!(swarm.behaviour().is_in_routing_table(&peers[0]));
        assert!(swarm.behaviour().routing_peers().any(|p| *p == peers[0]));
    }
    for (i, swarm) in swarms.iter().enumerate() {
        let others: HashSet<PeerId> = peers.iter().copied().filter(|p| *p != peers[i]).collect();
        assert_eq!(swarm.behaviour().providers(), &others, "node {i}");
    }
}

/// A node with enough peers connected (`discovery_until_peers`) does not
/// look the namespace up; one without the limit, in the same mesh, does.
/// The limited node is a DHT client, so it stores no provider records and
/// learns providers by its own lookups alone.
#[tokio::test]
async fn a_node_with_enough_peers_does_not_look_up_the_namespace() {
    let (mut hub, hub_addr) = node(PROTOCOL).await;
    let (b, _) = node(PROTOCOL).await;
    let (mut c, _) = node_with(
        config(PROTOCOL)
            .with_mode(Mode::Client)
            .with_discovery_until_peers(1),
    )
    .await;
    // Connected before the hub enters its routing table (which starts its
    // first announcement and lookup): c never has fewer than one peer.
    c.connect(&mut hub).await;
    let mut swarms = vec![hub, b, c];
    let peers: Vec<PeerId> = swarms.iter().map(peer).collect();
    for swarm in &mut swarms[1..] {
        swarm
            .behaviour_mut()
            .add_address(&peers[0], hub_addr.clone());
    }
    // b finds the hub and c by its lookups, one every second.
    let mut found_by_b = HashSet::new();
    until(&mut swarms, "b to find the hub and c", |i, _, event| {
        if let Event::ProviderFound { peer, .. } = event {
            assert_ne!(i, 2, "c looked the namespace up with a peer connected");
            if i == 1 {
                found_by_b.insert(peer);
            }
        }
        (found_by_b.len() == 2).then_some(())
    })
    .await;
    // Three more of c's discovery intervals: still no lookup of c's.
    let late = drive(&mut swarms, Duration::from_secs(3), |i, _, event| {
        matches!(event, Event::ProviderFound { .. } if i == 2).then_some(event)
    })
    .await;
    assert!(late.is_none(), "c looked the namespace up: {late:?}");
    assert!(swarms[2].behaviour().providers().is_empty());
}

#[tokio::test]
async fn put_record_to_arrives_as_inbound_record_and_is_kept_only_when_stored() {
    let (a, _) = node(PROTOCOL).await;
    let (b, b_addr) = node(PROTOCOL).await;
    let mut swarms = vec![a, b];
    let (a_peer, b_peer) = (peer(&swarms[0]), peer(&swarms[1]));
    swarms[0].behaviour_mut().add_address(&b_peer, b_addr);
    let sent = record("/my-app/info/a", b"hello");
    let query = swarms[0]
        .behaviour_mut()
        .put_record_to(sent.clone(), [b_peer]);

    let mut inbound = None;
    let mut finished = None;
    until(
        &mut swarms,
        "the record and the put's end",
        |i, _, event| {
            match (i, event) {
                (1, Event::InboundRecord { source, record }) => {
                    assert!(inbound.is_none(), "one inbound record");
                    inbound = Some((source, record));
                }
                (0, Event::QueryFinished { query: q, ok, .. }) if q == query => {
                    assert!(finished.is_none(), "one QueryFinished");
                    finished = Some(ok);
                }
                (_, event) => assert!(!is_query_event(&event), "unexpected {event:?}"),
            }
            (inbound.is_some() && finished.is_some()).then_some(())
        },
    )
    .await;

    let (source, received) = inbound.unwrap();
    assert_eq!(source, a_peer);
    assert_eq!(received.key, sent.key);
    assert_eq!(received.value, sent.value);
    assert!(received.expires.is_some(), "bounded by max_record_ttl");
    assert_eq!(finished, Some(true), "b answered the put");
    // Not stored by Kademlia, nor by the sender (put_record_to is remote only).
    assert!(swarms[1].behaviour().stored_record(&sent.key).is_none());
    assert!(swarms[0].behaviour().stored_record(&sent.key).is_none());

    swarms[1]
        .behaviour_mut()
        .store_record(received.clone())
        .unwrap();
    let stored = swarms[1].behaviour().stored_record(&sent.key).unwrap();
    assert_eq!(stored.value, b"hello");
    no_more_events_of(&mut swarms, query).await;
}

#[tokio::test]
async fn put_record_stores_locally_and_on_the_closest_peer() {
    let (a, _) = node(PROTOCOL).await;
    let (b, b_addr) = node(PROTOCOL).await;
    let mut swarms = vec![a, b];
    let b_peer = peer(&swarms[1]);
    swarms[0].behaviour_mut().add_address(&b_peer, b_addr);
    let sent = record("/my-app/info/a", b"v1");
    let query = swarms[0].behaviour_mut().put_record(sent.clone()).unwrap();
    assert_eq!(
        swarms[0]
            .behaviour()
            .stored_record(&sent.key)
            .unwrap()
            .value,
        b"v1"
    );

    let mut inbound = false;
    let mut finished = None;
    until(
        &mut swarms,
        "the record and the put's end",
        |i, _, event| {
            match (i, event) {
                (1, Event::InboundRecord { record, .. }) if record.key == sent.key => {
                    inbound = true;
                }
                (0, Event::QueryFinished { query: q, ok, .. }) if q == query => {
                    assert!(finished.is_none(), "one QueryFinished");
                    finished = Some(ok);
                }
                _ => {}
            }
            (inbound && finished.is_some()).then_some(())
        },
    )
    .await;
    assert_eq!(finished, Some(true));
    assert!(swarms[1].behaviour().stored_record(&sent.key).is_none());
}

#[tokio::test]
async fn get_record_finds_a_stored_record_then_finishes_once() {
    let (a, _) = node(PROTOCOL).await;
    let (b, b_addr) = node(PROTOCOL).await;
    let mut swarms = vec![a, b];
    let b_peer = peer(&swarms[1]);
    let kept = record("/my-app/info/b", b"from b");
    swarms[1]
        .behaviour_mut()
        .store_record(kept.clone())
        .unwrap();
    swarms[0].behaviour_mut().add_address(&b_peer, b_addr);
    let query = swarms[0].behaviour_mut().get_record(kept.key.clone());

    let mut seen: Vec<Event> = Vec::new();
    until(
        &mut swarms,
        "the record and the query's end",
        |i, _, event| {
            if i == 0 && is_query_event(&event) {
                let last = matches!(event, Event::QueryFinished { .. });
                seen.push(event);
                return last.then_some(());
            }
            None
        },
    )
    .await;

    let [
        Event::RecordFound {
            query: found_by,
            record,
            peer,
        },
        Event::QueryFinished {
            query: ended, ok, ..
        },
    ] = seen.as_slice()
    else {
        panic!("expected RecordFound then QueryFinished, got {seen:?}");
    };
    assert_eq!((*found_by, *ended), (query, query));
    assert_eq!(record.value, b"from b");
    assert_eq!(*peer, Some(b_peer));
    assert!(ok, "a found record is a successful get");
    no_more_events_of(&mut swarms, query).await;
    assert!(
        !swarms[0].behaviour_mut().finish_query(query),
        "not running"
    );
}

#[tokio::test]
async fn get_record_looks_in_the_local_store_first() {
    let (mut a, _) = node(PROTOCOL).await;
    let kept = record("/my-app/info/a", b"mine");
    a.behaviour_mut().store_record(kept.clone()).unwrap();
    let query = a.behaviour_mut().get_record(kept.key.clone());
    let mut swarms = vec![a];
    let mut seen = Vec::new();
    until(&mut swarms, "the query's end", |_, _, event| {
        if is_query_event(&event) {
            let last = matches!(event, Event::QueryFinished { .. });
            seen.push(event);
            return last.then_some(());
        }
        None
    })
    .await;
    assert!(
        matches!(
            seen.as_slice(),
            [
                Event::RecordFound { query: q1, peer: None, record },
                Event::QueryFinished { query: q2, ok: true, .. },
            ] if *q1 == query && *q2 == query && record.value == b"mine"
        ),
        "{seen:?}"
    );
}

#[tokio::test]
async fn get_record_of_a_missing_key_finishes_not_ok() {
    let (a, _) = node(PROTOCOL).await;
    let (b, b_addr) = node(PROTOCOL).await;
    let mut swarms = vec![a, b];
    let b_peer = peer(&swarms[1]);
    swarms[0].behaviour_mut().add_address(&b_peer, b_addr);
    let query = swarms[0]
        .behaviour_mut()
        .get_record(RecordKey::new(&"/my-app/info/nobody"));
    let ok = until(&mut swarms, "the query's end", |i, _, event| match event {
        Event::RecordFound { .. } => panic!("nothing to find"),
        Event::QueryFinished { query: q, ok, .. } if i == 0 && q == query => Some(ok),
        _ => None,
    })
    .await;
    assert!(!ok, "NotFound is not ok");
}

#[tokio::test]
async fn get_providers_finds_a_provided_key() {
    let (a, _) = node(PROTOCOL).await;
    let (b, b_addr) = node(PROTOCOL).await;
    let mut swarms = vec![a, b];
    let b_peer = peer(&swarms[1]);
    let key = provider_key("/my-app/services/llm");
    swarms[1]
        .behaviour_mut()
        .set_provided_keys(HashSet::from([key.clone()]));
    swarms[0].behaviour_mut().add_address(&b_peer, b_addr);
    let query = swarms[0].behaviour_mut().get_providers(key);

    let mut providers = HashSet::new();
    let mut steps = 0;
    let ok = until(&mut swarms, "the lookup's end", |i, _, event| {
        match event {
            Event::ProvidersFound {
                query: q,
                providers: found,
                requests,
            } if q == query => {
                assert_eq!(i, 0);
                assert!(!found.is_empty(), "only steps that found some");
                assert!(requests >= 1, "b answered a request");
                steps += 1;
                providers.extend(found);
            }
            Event::QueryFinished { query: q, ok, .. } if q == query => return Some(ok),
            _ => {}
        }
        None
    })
    .await;
    assert!(ok);
    assert!(steps >= 1);
    assert_eq!(providers, HashSet::from([b_peer]));
    no_more_events_of(&mut swarms, query).await;
}

#[tokio::test]
async fn finish_query_still_reports_one_query_finished() {
    let (a, _) = node(PROTOCOL).await;
    let (b, b_addr) = node(PROTOCOL).await;
    let mut swarms = vec![a, b];
    let b_peer = peer(&swarms[1]);
    swarms[0].behaviour_mut().add_address(&b_peer, b_addr);
    let query = swarms[0]
        .behaviour_mut()
        .get_providers(provider_key("/my-app/services/none"));
    assert!(swarms[0].behaviour_mut().finish_query(query));
    until(
        &mut swarms,
        "the stopped query's end",
        |i, _, event| match event {
            Event::QueryFinished { query: q, .. } if i == 0 && q == query => Some(()),
            _ => None,
        },
    )
    .await;
    no_more_events_of(&mut swarms, query).await;
    assert!(!swarms[0].behaviour_mut().finish_query(query));
}

#[tokio::test]
async fn nodes_on_different_protocols_exchange_no_dht_traffic() {
    let (a, _) = node(PROTOCOL).await;
    let (b, b_addr) = node("/other-app/kad/1.0.0").await;
    let mut swarms = vec![a, b];
    let b_peer = peer(&swarms[1]);
    // Same namespace, different protocol: a knows where b listens.
    swarms[0].behaviour_mut().add_address(&b_peer, b_addr);
    let kept = record("/my-app/info/b", b"from b");
    swarms[1]
        .behaviour_mut()
        .store_record(kept.clone())
        .unwrap();
    let put = swarms[0]
        .behaviour_mut()
        .put_record_to(record("/my-app/info/a", b"hello"), [b_peer]);
    let get = swarms[0].behaviour_mut().get_record(kept.key.clone());

    let mut ended: HashMap<QueryId, bool> = HashMap::new();
    let check = |i: usize, event: &Event| {
        assert!(
            !matches!(
                event,
                Event::ProviderFound { .. }
                    | Event::InboundRecord { .. }
                    | Event::RecordFound { .. }
                    | Event::ProvidersFound { .. }
            ),
            "node {i}: {event:?}"
        );
        assert!(
            !(i == 1 && matches!(event, Event::RoutingUpdated { .. })),
            "b learns nothing of a: {event:?}"
        );
    };
    until(&mut swarms, "both queries to fail", |i, _, event| {
        check(i, &event);
        if let Event::QueryFinished { query, ok, .. } = event {
            assert!(ended.insert(query, ok).is_none(), "one QueryFinished");
        }
        (ended.len() == 2).then_some(())
    })
    .await;
    assert_eq!(ended, HashMap::from([(put, false), (get, false)]));
    // Nor does anything arrive later (announcements, lookups).
    let late = drive(&mut swarms, QUIET, |i, _, event| {
        check(i, &event);
        None::<()>
    })
    .await;
    assert!(late.is_none());
    assert_eq!(swarms[1].behaviour().routing_table_size(), 0);
    assert!(swarms[0].behaviour().providers().is_empty());
    assert!(swarms[1].behaviour().providers().is_empty());
}

/// Paused time: the clock jumps to the next timer whenever nothing else
/// can happen, so a minute-long delay is checked exactly and at once.
#[tokio::test(start_paused = true)]
async fn keys_are_announced_only_after_the_announce_delay() {
    const DELAY: Duration = Duration::from_secs(60);
    let (a, _) = node_with(config(PROTOCOL).with_announce_delay(DELAY)).await;
    let (b, b_addr) = node_with(config(PROTOCOL).with_announce_delay(DELAY)).await;
    let mut swarms = vec![a, b];
    let b_peer = peer(&swarms[1]);
    let key = provider_key("/my-app/services/llm");
    swarms[0]
        .behaviour_mut()
        .set_provided_keys(HashSet::from([key.clone()]));
    let start = tokio::time::Instant::now();
    swarms[0].behaviour_mut().add_address(&b_peer, b_addr);
    let mut routed_at = None;
    drive(&mut swarms, DELAY * 3, |i, behaviour, event| {
        match event {
            Event::RoutingUpdated { .. } if i == 0 => {
                routed_at.get_or_insert_with(tokio::time::Instant::now);
            }
            Event::Advertising if i == 0 => {
                assert!(behaviour.has_announced());
                return Some(());
            }
            _ if i == 0 => assert!(!behaviour.has_announced(), "announced early"),
            _ => {}
        }
        None
    })
    .await
    .expect("the announcement comes after the delay");
    let routed_at = routed_at.expect("b entered a's routing table first");
    assert!(routed_at - start < DELAY, "routing is not delayed");
    assert!(
        tokio::time::Instant::now() - routed_at >= DELAY,
        "announced {:?} after the first peer, before the {DELAY:?} delay",
        tokio::time::Instant::now() - routed_at
    );
}

/// Drive `swarms` in short slices until `done` holds for them, within
/// [`LIMIT`]; what it waits for (a peer's store) announces no event.
async fn until_state(
    swarms: &mut [Swarm<Behaviour>],
    what: &str,
    mut done: impl FnMut(&[Swarm<Behaviour>]) -> bool,
) {
    const SLICE: Duration = Duration::from_millis(20);
    let start = tokio::time::Instant::now();
    while !done(swarms) {
        assert!(start.elapsed() < LIMIT, "timed out waiting for {what}");
        let _ = drive(swarms, SLICE, |_, _, _| None::<()>).await;
    }
}

#[tokio::test]
async fn only_exact_keys_are_announced_again_when_the_routing_table_grows() {
    let exact = provider_key("/my-app/models/llama3:8b");
    let shared = provider_key("/my-app/services/llm");
    let mut swarms = Vec::new();
    let mut addresses = Vec::new();
    for _ in 0..8 {
        let (swarm, address) = node(PROTOCOL).await;
        swarms.push(swarm);
        addresses.push(address);
    }
    let peers: Vec<PeerId> = swarms.iter().map(peer).collect();
    let a = peers[0];
    swarms[0]
        .behaviour_mut()
        .set_exact_keys(HashSet::from([exact.clone()]));
    swarms[0]
        .behaviour_mut()
        .set_provided_keys(HashSet::from([exact.clone(), shared.clone()]));

    // With one peer in the table, the first announcement stores both keys
    // on it.
    swarms[0]
        .behaviour_mut()
        .add_address(&peers[1], addresses[1].clone());
    until_state(&mut swarms, "both keys on the first peer", |s| {
        let b = s[1].behaviour();
        b.stored_providers(&exact).contains(&a) && b.stored_providers(&shared).contains(&a)
    })
    .await;

    // Four more peers: the table has grown four times over, and the exact
    // key (only) goes to them.
    for i in 2..6 {
        swarms[0]
            .behaviour_mut()
            .add_address(&peers[i], addresses[i].clone());
    }
    until_state(&mut swarms, "the exact key on every new peer", |s| {
        s[2..6]
            .iter()
            .all(|n| n.behaviour().stored_providers(&exact).contains(&a))
    })
    .await;
    for (i, n) in swarms.iter().enumerate().take(6).skip(2) {
        assert!(
            !n.behaviour().stored_providers(&shared).contains(&a),
            "peer {i} was given the shared key again"
        );
    }

    // Growth is counted from the table of that announcement: two more
    // peers are not four times as many, and get nothing.
    for i in 6..8 {
        swarms[0]
            .behaviour_mut()
            .add_address(&peers[i], addresses[i].clone());
    }
    let _ = drive(&mut swarms, QUIET, |_, _, _| None::<()>).await;
    for (i, n) in swarms.iter().enumerate().skip(6) {
        assert!(
            !n.behaviour().stored_providers(&exact).contains(&a),
            "peer {i} was given the exact key: announced again without 4x growth"
        );
    }
}

#[tokio::test]
async fn an_exact_key_whose_announcement_reached_no_peer_is_announced_again_soon() {
    const QUERY_TIMEOUT: Duration = Duration::from_millis(500);
    let exact = provider_key("/my-app/models/llama3:8b");
    let (mut a, _) = node_with(
        config(PROTOCOL)
            .with_query_timeout(QUERY_TIMEOUT)
            .with_announce_retry(Duration::from_millis(200))
            // Only a retry can bring the key to b within `LIMIT`.
            .with_provide_interval(Duration::from_secs(3600)),
    )
    .await;
    let (b, b_address) = node(PROTOCOL).await;
    let a_peer = peer(&a);
    let b_peer = peer(&b);
    a.behaviour_mut()
        .set_exact_keys(HashSet::from([exact.clone()]));
    a.behaviour_mut()
        .set_provided_keys(HashSet::from([exact.clone()]));
    a.behaviour_mut().add_address(&b_peer, b_address);
    let mut swarms = vec![a, b];

    // b is not polled: a's walk cannot reach it and times out (Kademlia's
    // timeouts run on the real clock).
    let _ = drive(&mut swarms[..1], QUERY_TIMEOUT * 3, |_, _, _| None::<()>).await;
    assert!(
        swarms[0]
            .behaviour()
            .unannounced_keys()
            .any(|k| *k == exact),
        "the timed-out announcement is waiting to be tried again"
    );
    assert!(
        !swarms[1]
            .behaviour()
            .stored_providers(&exact)
            .contains(&a_peer)
    );

    // Once b answers, a retry brings the key to it.
    until_state(&mut swarms, "the exact key on b", |s| {
        s[1].behaviour().stored_providers(&exact).contains(&a_peer)
    })
    .await;
    until_state(&mut swarms, "no retry left", |s| {
        s[0].behaviour().unannounced_keys().next().is_none()
    })
    .await;
}

#[tokio::test]
async fn the_first_bootstrap_after_the_announcement_announces_nothing_again() {
    let (mut a, _) = node(PROTOCOL).await;
    let (b, b_address) = node(PROTOCOL).await;
    let b_peer = peer(&b);
    a.behaviour_mut()
        .set_provided_keys(HashSet::from([provider_key("/my-app/models/llama3:8b")]));
    a.behaviour_mut().add_address(&b_peer, b_address);
    let mut swarms = vec![a, b];
    // With no announce delay the keys go out at once; the bootstrap ends
    // a round trip later.
    let mut advertised = 0;
    until(
        &mut swarms,
        "a's first successful bootstrap",
        |i, _, event| {
            match event {
                Event::Advertising if i == 0 => advertised += 1,
                Event::BootstrapFinished { ok: true, .. } if i == 0 => {
                    assert_eq!(advertised, 1, "announced once before the bootstrap ended");
                    return Some(());
                }
                _ => {}
            }
            None
        },
    )
    .await;
    let again = drive(&mut swarms, QUIET, |i, _, event| {
        (i == 0 && matches!(event, Event::Advertising)).then_some(())
    })
    .await;
    assert!(again.is_none(), "the bootstrap announced the keys again");
}
