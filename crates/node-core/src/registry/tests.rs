//! Behaviour-level tests of the registry behaviour on the memory transport.
//!
//! Two nodes each run only a [`Behaviour`] (DHT on, pubsub off) in their
//! own `Swarm`. The test does what the swarm task does: it feeds each the
//! other's identify information, calls `start`, routes commands to the
//! registry's methods (answering through `answer_after_events`) and reads
//! the events.

use libp2p::Swarm;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p_swarm_test::SwarmExt;
use ollamacron_config::DhtMode;
use tokio::sync::oneshot;
use tokio::sync::oneshot::error::TryRecvError;

use super::*;
use crate::test_swarms::{drive, listen, until};

/// How long a node is watched for events that must not come.
const QUIET: Duration = Duration::from_millis(700);
const SERVICE_ID: &str = "llama3";

/// DHT on (a server, as a reachable node is), pubsub and mDNS off.
fn config() -> NodeConfig {
    NodeConfig {
        enable_mdns: false,
        enable_dht: true,
        enable_pubsub: false,
        dht_mode: DhtMode::Server,
        dht_query_timeout: Duration::from_secs(10),
        listen: vec![Protocol::Memory(0).into()],
        ..NodeConfig::default()
    }
}

/// A node, its key, and the memory address it listens on.
struct Node {
    swarm: Swarm<Behaviour>,
    key: Keypair,
    addr: Multiaddr,
}

async fn node() -> Node {
    let config = config();
    let mut keypair = None;
    let mut swarm = Swarm::new_ephemeral_tokio(|key| {
        keypair = Some(key.clone());
        Behaviour::new(
            &key,
            &config,
            ollamacron_nat::Reachability::Unknown,
            false,
            &super::Restored::default(),
        )
        .expect("a registry of no services")
    });
    let addr = listen(&mut swarm).await;
    Node {
        swarm,
        key: keypair.expect("the swarm's key"),
        addr,
    }
}

/// What identify tells of an Ollamacron node that speaks the DHT.
fn identify_info(node: &Node) -> identify::Info {
    identify::Info {
        public_key: node.key.public(),
        protocol_version: PROTOCOL_VERSION.to_owned(),
        agent_version: crate::behaviour::agent_version(),
        listen_addrs: vec![node.addr.clone()],
        protocols: vec![keys::KAD_PROTOCOL],
        observed_addr: Multiaddr::empty(),
        signed_peer_record: None,
    }
}

fn llm() -> ServiceInfo {
    ServiceInfo {
        id: SERVICE_ID.to_owned(),
        name: "llama3:8b".to_owned(),
        service_type: "llm".to_owned(),
        capabilities: vec!["completion".to_owned()],
        ..ServiceInfo::default()
    }
}

fn llm_query() -> ServiceQuery {
    ServiceQuery {
        service_type: Some("llm".to_owned()),
        ..ServiceQuery::default()
    }
}

/// The value on `reply` once there is one, driving every swarm meanwhile.
async fn reply_of<T>(swarms: &mut [Swarm<Behaviour>], reply: &mut oneshot::Receiver<T>) -> T {
    until(swarms, "the reply", |_, _| reply.try_recv().ok()).await
}

/// Two started registries, connected, each knowing the other as a DHT
/// peer (identify fed in as the swarm task does); `[a, b]`.
async fn pair() -> (Vec<Swarm<Behaviour>>, [PeerId; 2]) {
    let a = node().await;
    let b = node().await;
    let peers = [*a.swarm.local_peer_id(), *b.swarm.local_peer_id()];
    let infos = [identify_info(&a), identify_info(&b)];
    let b_addr = b.addr.clone();
    let mut swarms = vec![a.swarm, b.swarm];
    swarms[0].dial(b_addr).unwrap();
    let mut connected = [false, false];
    until(&mut swarms, "the connection", |_, event| {
        if let Some((i, SwarmEvent::ConnectionEstablished { peer_id, .. })) = event {
            assert_eq!(peer_id, peers[1 - i]);
            connected[i] = true;
        }
        (connected == [true, true]).then_some(())
    })
    .await;
    for i in 0..2 {
        swarms[i]
            .behaviour_mut()
            .on_identified(peers[1 - i], &infos[1 - i]);
    }
    // Each DHT has the other in its routing table.
    let mut routed = [false, false];
    until(&mut swarms, "both routing tables", |_, event| {
        if let Some((
            i,
            SwarmEvent::Behaviour(Event::Dht(dht::Event::RoutingUpdated { peer, .. })),
        )) = event
        {
            assert_eq!(peer, peers[1 - i]);
            routed[i] = true;
        }
        (routed == [true, true]).then_some(())
    })
    .await;
    for swarm in &mut swarms {
        swarm.behaviour_mut().start();
    }
    (swarms, peers)
}

/// Register [`llm`] on swarm 0 as the `RegisterService` command does, and
/// drive until swarm 1 accepted it and the command's reply came. The reply
/// must come after the events the command caused.
async fn register_on_a(swarms: &mut [Swarm<Behaviour>], a_peer: PeerId) -> RecordVia {
    let (tx, mut rx) = oneshot::channel();
    let registered = swarms[0].behaviour_mut().register_service(&llm());
    swarms[0]
        .behaviour_mut()
        .answer_after_events(tx, registered);
    assert_eq!(
        rx.try_recv().unwrap_err(),
        TryRecvError::Empty,
        "answered after the events"
    );

    let mut a_events: Vec<String> = Vec::new();
    let mut answered: Option<(Result<(), NodeError>, Vec<String>)> = None;
    let mut accepted = None;
    until(
        swarms,
        "b to accept a's record and a's reply",
        |_, event| {
            // Before recording the event: an answer sent in this poll came
            // before it.
            if answered.is_none()
                && let Ok(reply) = rx.try_recv()
            {
                answered = Some((reply, a_events.clone()));
            }
            match event {
                Some((0, SwarmEvent::Behaviour(event))) => a_events.push(format!("{event:?}")),
                Some((1, SwarmEvent::Behaviour(Event::Accepted { via, changes }))) => {
                    assert!(matches!(via, RecordVia::Put | RecordVia::Get), "{via:?}");
                    assert_eq!(
                        changes,
                        [ServiceChange {
                            peer: a_peer,
                            service_id: SERVICE_ID.to_owned(),
                            service_type: "llm".to_owned(),
                            kind: ChangeKind::Added,
                        }]
                    );
                    accepted = Some(via);
                }
                Some((1, SwarmEvent::Behaviour(e @ Event::Rejected { .. }))) => {
                    panic!("a's record was rejected: {e:?}")
                }
                _ => {}
            }
            (answered.is_some() && accepted.is_some()).then_some(())
        },
    )
    .await;
    let (reply, before) = answered.unwrap();
    reply.expect("registered");
    assert!(
        before.iter().any(|e| e.starts_with("LocalChanged"))
            && before.iter().any(|e| e == "Published")
            && before.iter().any(|e| e.starts_with("ServiceCounts")),
        "the reply came before the events it caused: {before:?}"
    );
    accepted.unwrap()
}

#[tokio::test]
async fn a_registered_service_reaches_the_other_node_and_answers_its_lookups() {
    let (mut swarms, [a_peer, _]) = pair().await;
    register_on_a(&mut swarms, a_peer).await;
    let a = swarms[0].behaviour();
    assert_eq!(a.local_services_with_origin().len(), 1);
    assert_eq!(a.service_counts().local, 1);
    let b = swarms[1].behaviour();
    assert_eq!(
        (b.service_counts().remote, b.service_counts().nodes),
        (1, 1)
    );

    // b holds the record: the lookup is answered from its cache at once.
    let (tx, mut rx) = oneshot::channel();
    swarms[1].behaviour_mut().find_services(llm_query(), tx);
    let found = rx.try_recv().expect("answered at once");
    let how = until(&mut swarms, "the lookup's event", |_, event| match event {
        Some((1, SwarmEvent::Behaviour(Event::LookupAnswered { how }))) => Some(how),
        _ => None,
    })
    .await;
    assert_eq!(how, "cache");
    assert_eq!(found.len(), 1, "{found:?}");
    let service = &found[0];
    assert_eq!(service.service.id, SERVICE_ID);
    assert_eq!(service.service.peer_id, a_peer.to_string());
    assert!(!service.local);
    assert!(!service.service.addresses.is_empty());
    assert!(
        service
            .service
            .addresses
            .iter()
            .all(|addr| addr.ends_with(&format!("/p2p/{a_peer}"))),
        "{:?}",
        service.service.addresses
    );

    // A lookup of another type finds nothing of a's.
    let (tx, mut rx) = oneshot::channel();
    let query = ServiceQuery {
        service_type: Some("embedding".to_owned()),
        ..ServiceQuery::default()
    };
    swarms[1].behaviour_mut().find_services(query, tx);
    assert!(reply_of(&mut swarms, &mut rx).await.is_empty());
}

#[tokio::test]
async fn a_record_signed_by_another_key_is_rejected() {
    let (mut swarms, [a_peer, b_peer]) = pair().await;
    register_on_a(&mut swarms, a_peer).await;

    // Mallory signs a record of her own, valid as hers, and a puts it
    // under a's node key on b.
    let mallory = Keypair::generate_ed25519();
    let mallory_peer = mallory.public().to_peer_id();
    let mut services = LocalServices::new(mallory_peer, 4);
    services
        .register(
            ServiceInfo {
                id: "evil".to_owned(),
                ..llm()
            },
            unix_ms(),
        )
        .unwrap();
    let record = services.next_record(unix_ms(), Duration::from_secs(60), None, &[], &[]);
    let limits = swarms[1].behaviour().limits;
    let envelope = sign_record(&record, &mallory, &limits).expect("a valid record of mallory's");
    assert!(verify_record(&envelope, &mallory_peer, unix_ms(), None, &limits).is_ok());
    let forged = Record {
        key: keys::node_record_key(&a_peer),
        value: envelope,
        publisher: None,
        expires: None,
    };
    swarms[0]
        .behaviour_mut()
        .inner
        .dht
        .as_mut()
        .unwrap()
        .put_record_to(forged, [b_peer]);

    let reason = until(
        &mut swarms,
        "b to reject the forged record",
        |_, event| match event {
            Some((1, SwarmEvent::Behaviour(Event::Rejected { peer, via, reason }))) => {
                assert_eq!(peer, Some(a_peer), "who handed it over");
                assert_eq!(via, RecordVia::Put);
                Some(reason)
            }
            Some((1, SwarmEvent::Behaviour(e @ Event::Accepted { .. }))) => {
                panic!("the forged record was accepted: {e:?}")
            }
            _ => None,
        },
    )
    .await;
    let RejectReason::WrongSigner { claimed, signer } = &reason else {
        panic!("expected WrongSigner, got {reason:?}");
    };
    assert_eq!(*claimed, a_peer.to_string());
    assert_eq!(*signer, mallory_peer.to_string());

    // b still holds a's own record, in its cache and its DHT store.
    let b = swarms[1].behaviour();
    let held = b.cache.get(&a_peer).expect("a's record kept");
    let ids: Vec<&str> = held.record.services.iter().map(|s| s.id.as_str()).collect();
    assert_eq!(ids, [SERVICE_ID]);
    let stored = b
        .dht()
        .unwrap()
        .stored_record(&keys::node_record_key(&a_peer))
        .expect("a's record in b's store");
    assert!(verify_record(&stored.value, &a_peer, unix_ms(), None, &limits).is_ok());
    let (tx, mut rx) = oneshot::channel();
    swarms[1].behaviour_mut().find_services(llm_query(), tx);
    let found = reply_of(&mut swarms, &mut rx).await;
    let ids: Vec<&str> = found.iter().map(|s| s.service.id.as_str()).collect();
    assert_eq!(ids, [SERVICE_ID]);
}

#[tokio::test]
async fn an_unregistered_service_is_dropped_by_the_other_node() {
    let (mut swarms, [a_peer, _]) = pair().await;
    register_on_a(&mut swarms, a_peer).await;

    let (tx, mut rx) = oneshot::channel();
    let removed = swarms[0].behaviour_mut().unregister_service(SERVICE_ID);
    swarms[0].behaviour_mut().answer_after_events(tx, removed);
    let mut dropped = false;
    let mut answered = None;
    until(
        &mut swarms,
        "b to drop the service and a's reply",
        |_, event| {
            if answered.is_none()
                && let Ok(reply) = rx.try_recv()
            {
                answered = Some(reply);
            }
            if let Some((1, SwarmEvent::Behaviour(Event::Accepted { changes, .. }))) = event {
                assert_eq!(
                    changes,
                    [ServiceChange {
                        peer: a_peer,
                        service_id: SERVICE_ID.to_owned(),
                        service_type: "llm".to_owned(),
                        kind: ChangeKind::Removed,
                    }]
                );
                dropped = true;
            }
            (dropped && answered.is_some()).then_some(())
        },
    )
    .await;
    assert_eq!(answered, Some(true), "the service was there");
    assert!(
        swarms[0]
            .behaviour()
            .local_services_with_origin()
            .is_empty()
    );
    let counts = swarms[1].behaviour().service_counts();
    assert_eq!(counts.remote, 0);

    let (tx, mut rx) = oneshot::channel();
    swarms[1].behaviour_mut().find_services(llm_query(), tx);
    assert!(reply_of(&mut swarms, &mut rx).await.is_empty());

    // Nothing more to remove, and nothing more published.
    assert!(!swarms[0].behaviour_mut().unregister_service(SERVICE_ID));
    let late = drive(&mut swarms, QUIET, &mut |_, event| match event {
        Some((0, SwarmEvent::Behaviour(e @ (Event::Published | Event::LocalChanged(_))))) => {
            Some(format!("{e:?}"))
        }
        _ => None,
    })
    .await;
    assert_eq!(late, None);
}

/// Where each local service came from: `update_services` (the Ollama
/// mirror's way in, its ids prefixed `ollama/`) adds `ollama` services and
/// may replace or remove any service, an API one included (which is then
/// the mirror's); `register_service` adds `api` ones.
#[tokio::test]
async fn local_services_say_where_they_came_from() {
    let mut node = node().await;
    let service = |id: &str, version: &str| ServiceInfo {
        id: id.to_owned(),
        name: id.to_owned(),
        service_type: "llm".to_owned(),
        version: version.to_owned(),
        ..ServiceInfo::default()
    };
    let origins = |registry: &Behaviour| {
        let mut listed: Vec<(String, String, ServiceOrigin)> = registry
            .local_services_with_origin()
            .into_iter()
            .map(|s| (s.service.id, s.service.version, s.origin))
            .collect();
        listed.sort_by(|a, b| a.0.cmp(&b.0));
        listed
    };
    let registry = node.swarm.behaviour_mut();
    registry.register_service(&service("mine", "1")).unwrap();
    registry.register_service(&service("taken", "1")).unwrap();
    let refused = registry.update_services(
        vec![service("ollama/phi3:mini", "2"), service("taken", "2")],
        &[],
    );
    assert!(refused.is_empty(), "{refused:?}");
    assert_eq!(
        origins(registry),
        vec![
            ("mine".to_owned(), "1".to_owned(), ServiceOrigin::Api),
            (
                "ollama/phi3:mini".to_owned(),
                "2".to_owned(),
                ServiceOrigin::Ollama
            ),
            ("taken".to_owned(), "2".to_owned(), ServiceOrigin::Ollama),
        ]
    );
    registry.update_services(
        Vec::new(),
        &["ollama/phi3:mini".to_owned(), "mine".to_owned()],
    );
    registry.register_service(&service("taken", "3")).unwrap();
    assert_eq!(
        origins(registry),
        vec![("taken".to_owned(), "3".to_owned(), ServiceOrigin::Api)]
    );
}
