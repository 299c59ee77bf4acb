//! The verified cache, the local service set and ranked answers.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::time::Duration;

use libp2p::PeerId;
use libp2p::identity::Keypair;
use ollamacron_service_registry::{
    Accepted, Candidate, ChangeKind, LocalServices, QualityInputs, RecordCache, RecordLimits,
    RegisterError, ScoreWeights, ServiceInfo, ServiceQuery, ServiceStatus, rank_services,
    sign_record,
};

const NOW: u64 = 1_700_000_000_000;
const TTL: Duration = Duration::from_secs(300);

fn service(id: &str, tags: &[&str]) -> ServiceInfo {
    ServiceInfo {
        id: id.into(),
        name: id.into(),
        service_type: "llm".into(),
        tags: tags.iter().map(ToString::to_string).collect(),
        ..ServiceInfo::default()
    }
}

/// A node's signed record holding `services`, published at `now`.
fn publish(local: &mut LocalServices, key: &Keypair, now: u64) -> Vec<u8> {
    let record = local.next_record(now, TTL, Some("eu"), &[], &[]);
    sign_record(&record, key, &RecordLimits::default()).unwrap()
}

fn kinds(accepted: &Accepted) -> Vec<(String, ChangeKind)> {
    match accepted {
        Accepted::Stored { changes } => changes
            .iter()
            .map(|c| (c.service_id.clone(), c.kind))
            .collect(),
        Accepted::Unchanged => Vec::new(),
    }
}

#[test]
fn the_cache_reports_what_changed_and_refuses_what_is_stale() {
    let key = Keypair::generate_ed25519();
    let peer = key.public().to_peer_id();
    let limits = RecordLimits::default();
    let mut local = LocalServices::new(peer, 8);
    local.register(service("a", &["v1"]), NOW).unwrap();
    local.register(service("b", &[]), NOW).unwrap();
    let first = publish(&mut local, &key, NOW);

    let mut cache = RecordCache::new(16);
    let got = cache.accept(peer, &first, NOW, &limits).unwrap();
    assert_eq!(
        kinds(&got),
        [
            ("a".into(), ChangeKind::Added),
            ("b".into(), ChangeKind::Added)
        ]
    );
    assert_eq!(
        cache.accept(peer, &first, NOW, &limits).unwrap(),
        Accepted::Unchanged
    );

    // A refresh with nothing new changes no service.
    let refresh = publish(&mut local, &key, NOW + 1000);
    assert_eq!(
        kinds(&cache.accept(peer, &refresh, NOW + 1000, &limits).unwrap()),
        []
    );

    local.register(service("a", &["v2"]), NOW + 2000).unwrap();
    local.unregister("b").unwrap();
    let second = publish(&mut local, &key, NOW + 2000);
    let got = cache.accept(peer, &second, NOW + 2000, &limits).unwrap();
    assert_eq!(
        kinds(&got),
        [
            ("a".into(), ChangeKind::Updated),
            ("b".into(), ChangeKind::Removed)
        ]
    );
    assert_eq!(cache.get(&peer).unwrap().record.services[0].tags, ["v2"]);

    // The first record again is older: refused, and the cache keeps the newest.
    let stale = cache.accept(peer, &first, NOW + 3000, &limits).unwrap_err();
    assert_eq!(stale.as_str(), "stale_sequence");
    assert_eq!(cache.get(&peer).unwrap().envelope, second);

    // Under another peer's name it is refused too.
    let other = PeerId::random();
    assert_eq!(
        cache
            .accept(other, &second, NOW, &limits)
            .unwrap_err()
            .as_str(),
        "wrong_signer"
    );
    assert!(cache.get(&other).is_none());

    // Expiry removes the record and reports its services.
    let expires = cache.get(&peer).unwrap().record.expires_at;
    assert!(cache.expire(expires - 1).is_empty());
    let gone = cache.expire(expires);
    assert_eq!(gone.len(), 1);
    assert_eq!(gone[0].kind, ChangeKind::Removed);
    assert!(cache.is_empty());
}

#[test]
fn a_full_cache_makes_room_by_dropping_the_record_closest_to_expiry() {
    let limits = RecordLimits::default();
    let mut cache = RecordCache::new(2);
    let mut peers = Vec::new();
    let mut last = None;
    for i in 0..3u64 {
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let mut local = LocalServices::new(peer, 8);
        local.register(service("a", &[]), NOW).unwrap();
        // Later nodes publish later, so they expire later.
        let bytes = publish(&mut local, &key, NOW + i * 1000);
        last = Some(cache.accept(peer, &bytes, NOW + i * 1000, &limits).unwrap());
        peers.push(peer);
    }
    assert_eq!(cache.len(), 2);
    let Some(Accepted::Stored { changes }) = last else {
        panic!("the third record is stored")
    };
    assert!(
        changes
            .iter()
            .any(|c| c.peer == peers[0] && c.kind == ChangeKind::Removed),
        "the eviction is reported: {changes:?}"
    );
    assert!(cache.get(&peers[0]).is_none(), "the soonest to expire went");
    assert!(cache.get(&peers[2]).is_some());
}

#[test]
fn local_services_are_stamped_bounded_and_sequenced() {
    let me = PeerId::random();
    let mut local = LocalServices::new(me, 2);
    let added = local.register(service("a", &[]), NOW).unwrap();
    assert_eq!(added.kind, ChangeKind::Added);
    assert_eq!(local.get("a").unwrap().peer_id, me.to_string());
    let updated = local.register(service("a", &["x"]), NOW + 5).unwrap();
    assert_eq!(updated.kind, ChangeKind::Updated);
    assert_eq!(local.get("a").unwrap().registered_at, NOW, "kept");
    assert_eq!(local.get("a").unwrap().updated_at, NOW + 5);
    local.register(service("b", &[]), NOW).unwrap();
    assert_eq!(
        local.register(service("c", &[]), NOW),
        Err(RegisterError::TooMany {
            id: "c".into(),
            max: 2
        })
    );
    assert_eq!(
        local.register(service("", &[]), NOW),
        Err(RegisterError::EmptyId)
    );
    assert!(local.unregister("zzz").is_none());

    let first = local.next_record(NOW, TTL, None, &[], &["/ip4/1.2.3.4/tcp/1".into()]);
    let second = local.next_record(NOW, TTL, None, &[], &[]);
    assert!(first.sequence >= NOW, "above any earlier run's sequence");
    assert!(second.sequence > first.sequence);
    assert_eq!(first.expires_at, NOW + 300_000);
    assert!(
        first
            .services
            .iter()
            .all(|s| s.expires_at == first.expires_at)
    );
    assert_eq!(first.services[0].addresses, ["/ip4/1.2.3.4/tcp/1"]);
}

fn candidate(peer: &str, id: &str, region: &str, inputs: QualityInputs) -> Candidate {
    Candidate {
        service: ServiceInfo {
            peer_id: peer.into(),
            ..service(id, &["gpu"])
        },
        region: Some(region.into()),
        inputs,
        local: false,
    }
}

#[test]
fn ranking_filters_on_measurements_and_breaks_ties_by_peer_then_id() {
    let fast = QualityInputs {
        measured_rtt: Some(Duration::from_millis(10)),
        measured_reliability: Some(1.0),
        since_last_good_check: Some(Duration::ZERO),
        ..QualityInputs::default()
    };
    let slow_but_claims_fast = QualityInputs {
        measured_rtt: Some(Duration::from_millis(900)),
        advertised_latency_ms: Some(1.0),
        measured_reliability: Some(0.2),
        advertised_reliability: Some(1.0),
        since_last_good_check: Some(Duration::ZERO),
        ..QualityInputs::default()
    };
    let mut down = candidate("p4", "s4", "eu", fast);
    down.service.status = ServiceStatus::Unavailable;
    let candidates = vec![
        candidate("p2", "s2", "eu", fast),
        candidate("p1", "s9", "eu", fast),
        candidate("p1", "s1", "eu", fast),
        candidate("p3", "s3", "us", slow_but_claims_fast),
        down,
    ];
    let weights = ScoreWeights::default();
    let all = rank_services(candidates.clone(), &ServiceQuery::default(), &weights);
    let order: Vec<&str> = all.iter().map(|r| r.service.id.as_str()).collect();
    assert_eq!(
        order,
        ["s1", "s9", "s2", "s3"],
        "ties by peer, then id; unavailable left out"
    );

    let strict = ServiceQuery {
        min_reliability: Some(0.5),
        max_latency_ms: Some(100.0),
        ..ServiceQuery::default()
    };
    let ids: Vec<String> = rank_services(candidates.clone(), &strict, &weights)
        .into_iter()
        .map(|r| r.service.id)
        .collect();
    assert_eq!(
        ids,
        ["s1", "s9", "s2"],
        "measured values decide, not claims"
    );

    let us = ServiceQuery {
        region: Some("us".into()),
        ..ServiceQuery::default()
    };
    assert_eq!(rank_services(candidates.clone(), &us, &weights).len(), 1);
    let two = ServiceQuery {
        limit: Some(2),
        ..ServiceQuery::default()
    };
    let top: Vec<String> = rank_services(candidates, &two, &weights)
        .into_iter()
        .map(|r| r.service.id)
        .collect();
    assert_eq!(top, ["s1", "s9"]);
}

#[test]
fn an_rtt_through_a_relay_lowers_the_score_but_never_hides_the_peer() {
    let direct = |ms| QualityInputs {
        measured_rtt: Some(Duration::from_millis(ms)),
        measured_reliability: Some(1.0),
        since_last_good_check: Some(Duration::ZERO),
        ..QualityInputs::default()
    };
    let relayed = QualityInputs {
        rtt_via_relay: true,
        ..direct(400)
    };
    let candidates = vec![
        candidate("peer-direct-fast", "a", "eu", direct(20)),
        candidate("peer-direct-slow", "b", "eu", direct(400)),
        candidate("peer-relayed", "c", "eu", relayed),
    ];
    let weights = ScoreWeights::default();
    let bounded = ServiceQuery {
        max_latency_ms: Some(100.0),
        ..ServiceQuery::default()
    };
    let ids: Vec<String> = rank_services(candidates.clone(), &bounded, &weights)
        .into_iter()
        .map(|r| r.service.id)
        .collect();
    // The slow direct peer is filtered; the relayed one, whose RTT is the
    // relay path's and says nothing against the peer, is kept, below the
    // fast one.
    assert_eq!(ids, ["a", "c"]);
    let all = rank_services(candidates, &ServiceQuery::default(), &weights);
    let score = |id: &str| {
        all.iter()
            .find(|r| r.service.id == id)
            .map(|r| r.score)
            .unwrap()
    };
    assert!(score("c").latency > 0.0 && score("c").total.is_finite());
    assert!(score("c").latency < score("a").latency);
    assert!(
        (score("c").latency - score("b").latency).abs() < 1e-9,
        "scored as measured"
    );
}
