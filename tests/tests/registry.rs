//! The service registry with real nodes on 127.0.0.1 (mDNS off): ranked
//! lookups over ten nodes, updates and departures, gossip, and records
//! refused wherever they enter.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use libp2p::identity::Keypair;
use ollamacron_node_core::{Node, NodeEvent, NodeHandle, RecordVia};
use ollamacron_service_registry::{RankedService, ServiceInfo, ServiceQuery};
use ollamacron_tests::{
    TCP_ONLY, eventually_within, loopback_config, metric_value, start, wait_for_event,
};

/// Lookups over a fresh mesh settle well within this on loopback; the
/// bound only keeps a broken build from hanging.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(60);

fn service(id: &str, service_type: &str, tags: &[&str], capabilities: &[&str]) -> ServiceInfo {
    ServiceInfo {
        id: id.to_owned(),
        name: id.to_owned(),
        service_type: service_type.to_owned(),
        tags: tags.iter().map(ToString::to_string).collect(),
        capabilities: capabilities.iter().map(ToString::to_string).collect(),
        ..ServiceInfo::default()
    }
}

/// (peer id, service id) of each answer.
fn ids(found: &[RankedService]) -> BTreeSet<(String, String)> {
    found
        .iter()
        .map(|r| (r.service.peer_id.clone(), r.service.id.clone()))
        .collect()
}

fn assert_ranked(found: &[RankedService]) {
    for pair in found.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(
            a.score.total > b.score.total
                || (a.score.total == b.score.total
                    && (&a.service.peer_id, &a.service.id) < (&b.service.peer_id, &b.service.id)),
            "not best first: {a:?} before {b:?}"
        );
    }
    for r in found {
        assert!((0.0..=1.0).contains(&r.score.total), "{r:?}");
    }
}

/// Start `n` nodes where node i bootstraps from node i-1; node i's extra
/// settings come from `extra(i)`.
async fn start_line(n: usize, extra: impl Fn(usize) -> Vec<(String, String)>) -> Vec<NodeHandle> {
    let mut nodes: Vec<NodeHandle> = Vec::new();
    for i in 0..n {
        let bootstrap = match nodes.last() {
            Some(prev) => prev.dialable_addrs().await.unwrap()[0].to_string(),
            None => String::new(),
        };
        let extra = extra(i);
        let mut overrides: Vec<(&str, &str)> = vec![("bootstrap", bootstrap.as_str())];
        overrides.extend(extra.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        nodes.push(start(loopback_config(TCP_ONLY, &overrides)).await.unwrap());
    }
    nodes
}

/// Wait until `node`'s lookup for `query` returns exactly `expected`.
async fn settles_to(
    node: &NodeHandle,
    query: &ServiceQuery,
    expected: &BTreeSet<(String, String)>,
    what: &str,
) -> Vec<RankedService> {
    let found = eventually_within(SETTLE_TIMEOUT, what, || async {
        let found = node.find_services(query.clone()).await.ok()?;
        (ids(&found) == *expected).then_some(found)
    })
    .await;
    match found {
        Ok(found) => found,
        Err(e) => {
            let last = node.find_services(query.clone()).await.unwrap();
            panic!("{e}: expected {expected:?}, last answer {:?}", ids(&last));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_nodes_find_exactly_the_right_services_best_first() {
    // A port nothing listens on: node 5's health URL fails every probe.
    let dead_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let region = |i: usize| if i.is_multiple_of(2) { "eu" } else { "us" };
    let nodes = start_line(10, |i| {
        let mut settings = vec![
            ("region".into(), region(i).into()),
            ("health_check_interval".into(), "1s".into()),
        ];
        if i == 1 {
            // The asker ranks on advertised throughput alone, so the order
            // (and what a limit keeps) is known in advance.
            settings.push((
                "score_weights".into(),
                "{reliability: 0, latency: 0, throughput: 1, availability: 0}".into(),
            ));
        }
        settings
    })
    .await;
    let peer = |i: usize| nodes[i].peer_id().to_string();

    // Every node an LLM (gpu on every third, tools on even nodes), even
    // nodes an embedding model, the last one a classifier.
    let mut llms = BTreeSet::new();
    let mut embeddings = BTreeSet::new();
    for (i, node) in nodes.iter().enumerate() {
        let tag = if i.is_multiple_of(3) { "gpu" } else { "cpu" };
        let caps: &[&str] = if i.is_multiple_of(2) {
            &["completion", "tools"]
        } else {
            &["completion"]
        };
        let mut llm = service(&format!("llm-{i}"), "llm", &[tag], caps);
        llm.throughput = Some(100_000.0 * i as f64);
        if i == 5 {
            llm.health_check_url = Some(format!("http://127.0.0.1:{dead_port}/health"));
        }
        node.register_service(llm).await.unwrap();
        llms.insert((peer(i), format!("llm-{i}")));
        if i.is_multiple_of(2) {
            node.register_service(service(
                &format!("embed-{i}"),
                "embedding",
                &[],
                &["embedding"],
            ))
            .await
            .unwrap();
            embeddings.insert((peer(i), format!("embed-{i}")));
        }
    }
    nodes[9]
        .register_service(service("classify-9", "classification", &[], &[]))
        .await
        .unwrap();
    let classifiers = BTreeSet::from([(peer(9), "classify-9".to_owned())]);

    let by_type = |t: &str| ServiceQuery {
        service_type: Some(t.to_owned()),
        ..ServiceQuery::default()
    };
    for (i, node) in nodes.iter().enumerate() {
        for (t, expected) in [
            ("llm", &llms),
            ("embedding", &embeddings),
            ("classification", &classifiers),
        ] {
            let found =
                settles_to(node, &by_type(t), expected, &format!("node {i}: all {t}")).await;
            assert_ranked(&found);
            assert_eq!(
                found.iter().filter(|r| r.local).count(),
                expected.iter().filter(|(p, _)| *p == peer(i)).count(),
                "node {i} marks exactly its own services local"
            );
        }
        let nothing = node.find_services(by_type("translation")).await.unwrap();
        assert!(nothing.is_empty(), "{nothing:?}");
    }

    let asker = &nodes[1];
    let gpu: BTreeSet<_> = [0, 3, 6, 9]
        .iter()
        .map(|i| (peer(*i), format!("llm-{i}")))
        .collect();
    let query = ServiceQuery {
        tags: vec!["gpu".into()],
        ..by_type("llm")
    };
    settles_to(asker, &query, &gpu, "gpu LLMs").await;

    let even: BTreeSet<_> = (0..10)
        .step_by(2)
        .map(|i| (peer(i), format!("llm-{i}")))
        .collect();
    let query = ServiceQuery {
        capabilities: vec!["tools".into()],
        ..by_type("llm")
    };
    settles_to(asker, &query, &even, "LLMs with tools").await;
    let query = ServiceQuery {
        region: Some("eu".into()),
        ..by_type("llm")
    };
    settles_to(asker, &query, &even, "LLMs in eu").await;
    let both = ServiceQuery {
        tags: vec!["gpu".into()],
        region: Some("eu".into()),
        ..by_type("llm")
    };
    let gpu_eu: BTreeSet<_> = [0, 6]
        .iter()
        .map(|i| (peer(*i), format!("llm-{i}")))
        .collect();
    settles_to(asker, &both, &gpu_eu, "gpu LLMs in eu").await;

    // A capability alone walks the capability key.
    let query = ServiceQuery {
        capabilities: vec!["embedding".into()],
        ..ServiceQuery::default()
    };
    settles_to(asker, &query, &embeddings, "anything with embedding").await;

    // Reliability is measured: node 5's probe fails, so it drops out.
    let mut reliable = llms.clone();
    reliable.remove(&(peer(5), "llm-5".to_owned()));
    let query = ServiceQuery {
        min_reliability: Some(0.5),
        ..by_type("llm")
    };
    let found = settles_to(asker, &query, &reliable, "reliable LLMs").await;
    assert!(
        found.iter().all(|r| r.score.reliability >= 0.5),
        "{found:?}"
    );

    // Latency is measured too: every node answers pings on loopback within
    // a second, none in 0 ms, while the local service takes no time at all.
    let query = ServiceQuery {
        max_latency_ms: Some(1000.0),
        ..by_type("llm")
    };
    settles_to(asker, &query, &llms, "LLMs within a second").await;
    let query = ServiceQuery {
        max_latency_ms: Some(0.0),
        ..by_type("llm")
    };
    let local_only = BTreeSet::from([(peer(1), "llm-1".to_owned())]);
    settles_to(asker, &query, &local_only, "LLMs within 0 ms").await;

    // The asker scores on throughput (100k × node number) alone: the best
    // three are nodes 9, 8 and 7, in that order, and the limit keeps them.
    let query = ServiceQuery {
        limit: Some(3),
        ..by_type("llm")
    };
    let top = asker.find_services(query).await.unwrap();
    assert_ranked(&top);
    let top: Vec<&str> = top.iter().map(|r| r.service.id.as_str()).collect();
    assert_eq!(top, ["llm-9", "llm-8", "llm-7"]);
    let zero = ServiceQuery {
        limit: Some(0),
        ..by_type("llm")
    };
    assert!(asker.find_services(zero).await.unwrap().is_empty());

    for node in nodes {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn departures_and_updates_reach_the_other_nodes() {
    let settings = |_| {
        vec![
            ("record_ttl".to_owned(), "10s".to_owned()),
            ("record_refresh_interval".to_owned(), "3s".to_owned()),
            ("enable_pubsub".to_owned(), "true".to_owned()),
        ]
    };
    let nodes = start_line(3, settings).await;
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    c.register_service(service("leaving", "llm", &[], &[]))
        .await
        .unwrap();
    b.register_service(service("changing", "llm", &["v1"], &[]))
        .await
        .unwrap();
    let llm = ServiceQuery {
        service_type: Some("llm".into()),
        ..ServiceQuery::default()
    };
    let both = BTreeSet::from([
        (c.peer_id().to_string(), "leaving".to_owned()),
        (b.peer_id().to_string(), "changing".to_owned()),
    ]);
    settles_to(a, &llm, &both, "both services").await;

    // An update: a new tag is seen (through gossip and the DHT put).
    let mut events = a.subscribe();
    let changed_at = Instant::now();
    b.register_service(service("changing", "llm", &["v2"], &[]))
        .await
        .unwrap();
    let b_id = b.peer_id();
    wait_for_event(&mut events, "ServiceUpdated from b", |e| match e {
        NodeEvent::ServiceUpdated {
            peer_id,
            service_id,
            ..
        } if *peer_id == b_id && service_id == "changing" => Some(()),
        _ => None,
    })
    .await
    .unwrap();
    let v2 = ServiceQuery {
        tags: vec!["v2".into()],
        ..llm.clone()
    };
    let found = a.find_services(v2).await.unwrap();
    assert_eq!(ids(&found).len(), 1, "{found:?}");
    eprintln!("update seen after {:?}", changed_at.elapsed());

    // A departure: c's service leaves a's answers within one TTL.
    let c_id = c.peer_id();
    let stopped_at = Instant::now();
    c.shutdown().await.unwrap();
    let only_b = BTreeSet::from([(b.peer_id().to_string(), "changing".to_owned())]);
    settles_to(a, &llm, &only_b, "c's service to be gone").await;
    let gone_after = stopped_at.elapsed();
    eprintln!("departure seen after {gone_after:?}");
    assert!(
        gone_after < Duration::from_secs(10) + Duration::from_secs(6),
        "gone within the 10 s TTL (plus the 5 s expiry sweep): {gone_after:?}"
    );
    let removed = a.find_services(llm.clone()).await.unwrap();
    assert!(
        removed
            .iter()
            .all(|r| r.service.peer_id != c_id.to_string())
    );

    // Unregistering withdraws at once.
    b.unregister_service("changing").await.unwrap();
    assert!(!b.unregister_service("changing").await.unwrap());
    settles_to(a, &llm, &BTreeSet::new(), "b's withdrawal").await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_dht_off_sync_and_gossip_carry_records() {
    let settings = |_| {
        vec![
            ("enable_dht".to_owned(), "false".to_owned()),
            ("enable_pubsub".to_owned(), "true".to_owned()),
        ]
    };
    let nodes = start_line(3, settings).await;
    let (a, c) = (&nodes[0], &nodes[2]);
    c.register_service(service("gossiped", "embedding", &[], &[]))
        .await
        .unwrap();
    let query = ServiceQuery {
        service_type: Some("embedding".into()),
        ..ServiceQuery::default()
    };
    let expected = BTreeSet::from([(c.peer_id().to_string(), "gossiped".to_owned())]);
    settles_to(a, &query, &expected, "the gossiped service").await;
    let metrics = a.metrics_text();
    assert!(
        metrics.contains("ollamacron_records_accepted_total{via=\"gossip\"}")
            || metrics.contains("ollamacron_records_accepted_total{via=\"sync\"}"),
        "the record came by gossip or record sync:\n{metrics}"
    );
    let mut updated = service("gossiped", "embedding", &["new"], &[]);
    updated.description = "changed".into();
    let mut events = a.subscribe();
    c.register_service(updated).await.unwrap();
    let c_id = c.peer_id();
    wait_for_event(&mut events, "the gossiped update", |e| match e {
        NodeEvent::ServiceUpdated { peer_id, .. } if *peer_id == c_id => Some(()),
        _ => None,
    })
    .await
    .unwrap();
    for node in nodes {
        node.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_from_the_config_file_are_advertised() {
    let a = start(loopback_config(TCP_ONLY, &[])).await.unwrap();
    let bootstrap = a.dialable_addrs().await.unwrap()[0].to_string();
    let config = ollamacron_config::ConfigLoader::new()
        .yaml_str(
            "test.yaml",
            format!(
                "listen: [{TCP_ONLY}]\nenable_mdns: false\nenable_metrics: false\n\
                 bootstrap: [{bootstrap}]\nregion: eu\n\
                 services:\n  - name: llama3:8b\n    type: llm\n    tags: [gpu]\n    \
                 capabilities: [completion, tools]\n    metadata: {{context_length: \"8192\"}}\n"
            ),
        )
        .load()
        .unwrap();
    let b = Node::new(config)
        .with_keypair(Keypair::generate_ed25519())
        .start()
        .await
        .unwrap();
    assert_eq!(b.local_services().await.unwrap().len(), 1);
    let query = ServiceQuery {
        service_type: Some("llm".into()),
        tags: vec!["gpu".into()],
        region: Some("eu".into()),
        ..ServiceQuery::default()
    };
    let expected = BTreeSet::from([(b.peer_id().to_string(), "llama3:8b".to_owned())]);
    let found = settles_to(&a, &query, &expected, "b's configured service").await;
    let s = &found[0].service;
    assert_eq!(s.name, "llama3:8b");
    assert_eq!(s.metadata["context_length"], "8192");
    assert!(
        s.addresses
            .iter()
            .any(|addr| addr.ends_with(&format!("/p2p/{}", b.peer_id()))),
        "{:?}",
        s.addresses
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_services_that_make_an_oversized_record_stop_the_start() {
    let config = ollamacron_config::ConfigLoader::new()
        .yaml_str(
            "big.yaml",
            format!(
                "listen: [{TCP_ONLY}]\nenable_mdns: false\nenable_metrics: false\n\
                 max_record_size: 1KiB\nmax_string_length: 1024\n\
                 services:\n  - {{name: a, type: llm, description: {}}}\n",
                "x".repeat(1000)
            ),
        )
        .load()
        .unwrap();
    let e = start(config).await.unwrap_err();
    assert!(
        e.to_string().contains("do not fit in a record") && e.to_string().contains("1024-byte"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_services_are_refused_with_the_reason() {
    let node = start(loopback_config(TCP_ONLY, &[("max_string_length", "64")]))
        .await
        .unwrap();
    let e = node
        .register_service(service("", "llm", &[], &[]))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("id must not be empty"), "{e}");
    let e = node
        .register_service(service("x", "", &[], &[]))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("type must not be empty"), "{e}");
    let e = node
        .register_service(service("x", "llm", &[&"t".repeat(65)], &[]))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("tags") && e.to_string().contains("65 bytes > 64"),
        "{e}"
    );
    assert!(node.local_services().await.unwrap().is_empty());
    node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_service_changes_is_one_publication() {
    let nodes = start_line(2, |_| {
        vec![("max_string_length".to_owned(), "64".to_owned())]
    })
    .await;
    let (a, b) = (&nodes[0], &nodes[1]);
    b.register_service(service("old", "llm", &[], &[]))
        .await
        .unwrap();
    let llm = ServiceQuery {
        service_type: Some("llm".into()),
        ..ServiceQuery::default()
    };
    let b_peer = b.peer_id().to_string();
    settles_to(
        a,
        &llm,
        &BTreeSet::from([(b_peer.clone(), "old".to_owned())]),
        "b's first service",
    )
    .await;
    let published = "ollamacron_records_published_total";
    let before = metric_value(b, published);

    let refused = b
        .update_services(
            vec![
                service("one", "llm", &[], &[]),
                service("too-long", "llm", &[&"t".repeat(65)], &[]),
                service("two", "llm", &["fast"], &[]),
            ],
            vec!["old".to_owned(), "never-registered".to_owned()],
        )
        .await
        .unwrap();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].0, "too-long");
    assert!(
        refused[0].1.to_string().contains("65 bytes > 64"),
        "{}",
        refused[0].1
    );
    let local: BTreeSet<String> = b
        .local_services()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(local, BTreeSet::from(["one".to_owned(), "two".to_owned()]));
    assert!(
        (metric_value(b, published) - before - 1.0).abs() < f64::EPSILON,
        "one removal and two additions are one publication: {before} then {}",
        metric_value(b, published)
    );
    // What was published is the whole batch.
    let both = BTreeSet::from([
        (b_peer.clone(), "one".to_owned()),
        (b_peer, "two".to_owned()),
    ]);
    settles_to(a, &llm, &both, "b's batch").await;

    // Nothing to change publishes nothing.
    let refused = b
        .update_services(Vec::new(), vec!["old".to_owned()])
        .await
        .unwrap();
    assert!(refused.is_empty());
    assert!((metric_value(b, published) - before - 1.0).abs() < f64::EPSILON);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// The peer id in a `RecordRejected` for `via`, and its reason.
async fn next_rejection(
    events: &mut tokio::sync::broadcast::Receiver<NodeEvent>,
    via: RecordVia,
) -> (Option<PeerId>, &'static str) {
    wait_for_event(events, "a rejected record", |e| match e {
        NodeEvent::RecordRejected {
            peer,
            via: v,
            reason,
            ..
        } if *v == via => Some((*peer, *reason)),
        _ => None,
    })
    .await
    .unwrap()
}

mod bad_records {
    use super::*;
    use libp2p::kad::{ProviderRecord, Record};
    use ollamacron_node_core::PROTOCOL_VERSION;
    use ollamacron_service_registry::{
        NodeRecord, RECORD_VERSION, RecordLimits, sign_record, verify_record,
    };
    use ollamacron_tests::kad_peer::KadPeer;

    fn now_ms() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            .try_into()
            .unwrap()
    }

    fn node_key(peer: &PeerId) -> libp2p::kad::RecordKey {
        libp2p::kad::RecordKey::new(&format!("/ollamacron/node/{peer}"))
    }

    fn service_type_key(t: &str) -> libp2p::kad::RecordKey {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(format!("/ollamacron/services/{t}").as_bytes());
        let mut bytes = vec![0x12, 0x20];
        bytes.extend_from_slice(&digest);
        libp2p::kad::RecordKey::new(&bytes)
    }

    /// A record of `key`'s peer with one service, signed by `key`; the
    /// service's description is `padding` bytes long.
    fn signed(
        key: &Keypair,
        sequence: u64,
        issued_at: u64,
        ttl_ms: u64,
        padding: usize,
    ) -> Vec<u8> {
        let peer = key.public().to_peer_id().to_string();
        let mut s = service("victim-llm", "victim-type", &[], &[]);
        s.peer_id = peer.clone();
        s.description = "x".repeat(padding);
        let record = NodeRecord {
            version: RECORD_VERSION,
            peer_id: peer,
            sequence,
            issued_at,
            expires_at: issued_at + ttl_ms,
            services: vec![s],
            ..NodeRecord::default()
        };
        let permissive = RecordLimits {
            max_record_bytes: usize::MAX,
            max_services: usize::MAX,
            max_string_bytes: usize::MAX,
            max_list_items: usize::MAX,
            min_ttl: Duration::ZERO,
            max_ttl: Duration::MAX,
        };
        sign_record(&record, key, &permissive).unwrap()
    }

    /// Every kind of bad record for `victim`, labelled with the reason a
    /// node must give. `held` is the sequence of the victim's real record.
    fn bad_records(
        victim: &Keypair,
        rogue: &Keypair,
        real: &[u8],
        held: u64,
    ) -> Vec<(&'static str, Vec<u8>)> {
        let now = now_ms();
        let mut tampered = real.to_vec();
        let at = tampered
            .windows(b"victim-llm".len())
            .position(|w| w == b"victim-llm")
            .expect("the service id is in the payload");
        tampered[at] = b'V';
        // Signed by the rogue, naming itself, under the victim's key.
        let spoofed = signed(rogue, held + 1, now, 60_000, 0);
        vec![
            ("malformed", b"plain garbage, not an envelope".to_vec()),
            ("wrong_signer", spoofed),
            ("bad_signature", tampered),
            (
                "expired",
                signed(victim, held + 2, now - 100_000, 60_000, 0),
            ),
            ("stale_sequence", signed(victim, held - 1, now, 60_000, 0)),
            // Over the 64 KiB record limit, under Kademlia's message limit.
            (
                "too_large",
                signed(victim, held + 3, now, 60_000, 68 * 1024),
            ),
        ]
    }

    /// The value of `ollamacron_records_rejected_total{reason, via}`.
    fn rejected(node: &NodeHandle, reason: &str, via: &str) -> u64 {
        let prefix =
            format!("ollamacron_records_rejected_total{{reason=\"{reason}\",via=\"{via}\"}} ");
        node.metrics_text()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.trim().parse().ok())
            .unwrap_or(0)
    }

    fn record(key: libp2p::kad::RecordKey, value: Vec<u8>) -> Record {
        Record {
            key,
            value,
            publisher: None,
            expires: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_puts_are_refused_counted_and_the_real_record_survives() {
        let victim_key = Keypair::generate_ed25519();
        // Announcing with the first peer: the victim's record is put on
        // the holder at once.
        let victim = Node::new(loopback_config(TCP_ONLY, &[("dht_announce_delay", "0s")]))
            .with_keypair(victim_key.clone())
            .start()
            .await
            .unwrap();
        let victim_id = victim.peer_id();
        let holder = start(loopback_config(
            TCP_ONLY,
            &[
                (
                    "bootstrap",
                    &victim.dialable_addrs().await.unwrap()[0].to_string(),
                ),
                ("enable_metrics", "false"),
            ],
        ))
        .await
        .unwrap();
        victim
            .register_service(service("victim-llm", "victim-type", &[], &[]))
            .await
            .unwrap();
        let expected = BTreeSet::from([(victim_id.to_string(), "victim-llm".to_owned())]);
        let query = ServiceQuery {
            service_type: Some("victim-type".into()),
            ..ServiceQuery::default()
        };
        settles_to(
            &holder,
            &query,
            &expected,
            "the victim's service at the holder",
        )
        .await;

        // An independent peer reads the record like any implementation would.
        let rogue = KadPeer::start(PROTOCOL_VERSION).await.unwrap();
        rogue
            .dial(holder.dialable_addrs().await.unwrap()[0].clone())
            .await
            .unwrap();
        let providers = eventually_within(SETTLE_TIMEOUT, "providers of the type key", || async {
            let p = rogue
                .providers(service_type_key("victim-type"))
                .await
                .ok()?;
            p.contains(&victim_id).then_some(p)
        })
        .await
        .unwrap();
        assert!(providers.contains(&victim_id));
        let (real, held) = eventually_within(SETTLE_TIMEOUT, "the victim's record", || async {
            let found = rogue.get(node_key(&victim_id)).await.ok()?;
            found.into_iter().find_map(|(_, r)| {
                let decoded = verify_record(
                    &r.value,
                    &victim_id,
                    now_ms(),
                    None,
                    &RecordLimits::default(),
                )
                .ok()?;
                Some((r.value, decoded.sequence))
            })
        })
        .await
        .unwrap();

        // Every bad PUT is refused, by reason, and named in an event.
        let mut events = holder.subscribe();
        for (reason, bytes) in bad_records(&victim_key, rogue.keypair(), &real, held) {
            rogue
                .put_to(record(node_key(&victim_id), bytes), holder.peer_id())
                .await
                .unwrap();
            let (from, got) = next_rejection(&mut events, RecordVia::Put).await;
            assert_eq!(got, reason);
            assert_eq!(from, Some(rogue.peer_id()));
        }
        // A record under a key that is no node's is refused too.
        rogue
            .put_to(
                record(libp2p::kad::RecordKey::new(&"/elsewhere"), real.clone()),
                holder.peer_id(),
            )
            .await
            .unwrap();
        assert_eq!(
            next_rejection(&mut events, RecordVia::Put).await.1,
            "malformed"
        );

        let metrics = holder.metrics_text();
        for reason in [
            "malformed",
            "wrong_signer",
            "bad_signature",
            "expired",
            "stale_sequence",
            "too_large",
        ] {
            assert!(
                metrics.contains(&format!(
                    "ollamacron_records_rejected_total{{reason=\"{reason}\",via=\"put\"}}"
                )),
                "{reason} counted:\n{metrics}"
            );
        }

        // The real record survives: the holder itself still serves it, and
        // still lists the victim's service.
        let found = rogue.get(node_key(&victim_id)).await.unwrap();
        assert!(
            found
                .iter()
                .any(|(from, _)| *from == Some(holder.peer_id())),
            "the holder answers: {found:?}"
        );
        for (_, r) in &found {
            let decoded = verify_record(
                &r.value,
                &victim_id,
                now_ms(),
                None,
                &RecordLimits::default(),
            )
            .expect("only the real record is served");
            assert!(decoded.sequence >= held);
            assert_eq!(decoded.services[0].id, "victim-llm");
        }
        let found = holder.find_services(query).await.unwrap();
        assert_eq!(ids(&found), expected);
        holder.shutdown().await.unwrap();
        victim.shutdown().await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn bad_answers_to_gets_are_refused_and_the_real_record_is_kept() {
        // The victim is never connected: the only source of its record is a
        // rogue DHT peer that serves whatever it is told to.
        let victim_key = Keypair::generate_ed25519();
        let victim_id = victim_key.public().to_peer_id();
        let rogue = KadPeer::start(PROTOCOL_VERSION).await.unwrap();
        let rogue_addr = rogue.dialable_addr().await.unwrap();
        let asker = start(loopback_config(
            TCP_ONLY,
            &[
                ("bootstrap", &rogue_addr.to_string()),
                ("lookup_cache_fresh", "0s"),
                ("lookup_timeout", "10s"),
                // Records older than this are fetched again on every walk.
                ("record_refresh_interval", "1s"),
            ],
        ))
        .await
        .unwrap();
        let somewhere: libp2p::Multiaddr = "/ip4/127.0.0.1/tcp/9".parse().unwrap();
        let mut provider =
            ProviderRecord::new(service_type_key("victim-type"), victim_id, vec![somewhere]);
        provider.expires = None;
        rogue.add_provider(provider).await.unwrap();
        let query = ServiceQuery {
            service_type: Some("victim-type".into()),
            ..ServiceQuery::default()
        };
        // Wait until the asker's DHT holds the rogue.
        eventually_within(SETTLE_TIMEOUT, "the rogue in the routing table", || async {
            let status = asker.discovery().await.ok()?;
            (status.dht_routing_table_size > 0).then_some(())
        })
        .await
        .unwrap();

        let real_sequence = now_ms();
        let real = signed(&victim_key, real_sequence, now_ms(), 300_000, 0);
        let real_bytes = real.clone();
        let mut events = asker.subscribe();
        let bad = bad_records(&victim_key, rogue.keypair(), &real, real_sequence);
        // Before the real record is held, a stale one is simply accepted.
        let others = bad.into_iter().filter(|(r, _)| *r != "stale_sequence");
        for (reason, bytes) in others {
            rogue
                .store(record(node_key(&victim_id), bytes))
                .await
                .unwrap();
            let found = asker.find_services(query.clone()).await.unwrap();
            assert!(
                found.is_empty(),
                "{reason}: nothing unverified is used: {found:?}"
            );
            let (from, got) = next_rejection(&mut events, RecordVia::Get).await;
            assert_eq!(got, reason);
            assert_eq!(from, Some(rogue.peer_id()));
        }

        // The real record is accepted…
        rogue
            .store(record(node_key(&victim_id), real))
            .await
            .unwrap();
        let expected = BTreeSet::from([(victim_id.to_string(), "victim-llm".to_owned())]);
        settles_to(&asker, &query, &expected, "the real record").await;
        // …and every bad record served after it is refused, keeping the
        // real one (the asker fetches again once a held record is older
        // than its refresh interval, 1s here).
        let bad = bad_records(&victim_key, rogue.keypair(), &real_bytes, real_sequence);
        for (reason, bytes) in bad {
            let before = rejected(&asker, reason, "get");
            rogue
                .store(record(node_key(&victim_id), bytes))
                .await
                .unwrap();
            eventually_within(
                SETTLE_TIMEOUT,
                &format!("{reason} to be refused"),
                || async {
                    let found = asker.find_services(query.clone()).await.ok()?;
                    assert_eq!(ids(&found), expected, "{reason}: the real record is kept");
                    (rejected(&asker, reason, "get") > before).then_some(())
                },
            )
            .await
            .unwrap();
        }
        let metrics = asker.metrics_text();
        assert!(
            metrics.contains(
                "ollamacron_records_rejected_total{reason=\"bad_signature\",via=\"get\"}"
            ),
            "{metrics}"
        );
        asker.shutdown().await.unwrap();
    }
}
