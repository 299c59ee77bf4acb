//! Record pages: a node with more services than one envelope holds signs
//! them into pages (format version 2), and a cache fed the pages in any
//! order sees the whole node — with real keys and real signatures.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::collections::BTreeMap;
use std::time::Duration;

use libp2p::PeerId;
use libp2p::core::SignedEnvelope;
use libp2p::identity::Keypair;
use ollamacron_service_registry::{
    Accepted, ChangeKind, LocalServices, MAX_RECORD_PAGES, NODE_RECORD_DOMAIN,
    NODE_RECORD_PAYLOAD_TYPE, NodeRecord, RECORD_VERSION, RECORD_VERSION_PAGED, RecordCache,
    RecordError, RecordLimits, RejectReason, ServiceInfo, ServiceStatus, SignedPage, sign_record,
    sign_record_pages, verify_record,
};
use proptest::prelude::*;
use serde::Serialize;

const NOW: u64 = 1_700_000_000_000;
const TTL: Duration = Duration::from_secs(300);

fn addresses() -> Vec<String> {
    vec![
        "/ip4/203.0.113.7/tcp/11436".into(),
        "/ip4/203.0.113.7/udp/11436/quic-v1".into(),
        "/ip6/2001:db8::7/tcp/11436".into(),
    ]
}

/// A 64-hex digest that differs per model.
fn digest(i: usize) -> String {
    let mut x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..4)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            format!("{x:016x}")
        })
        .collect()
}

/// A service the way the Ollama integration registers a model.
fn ollama_model(i: usize) -> ServiceInfo {
    let metadata: BTreeMap<String, String> = [
        ("family", "llama".to_owned()),
        ("parameter_size", format!("{}B", 1 + i % 70)),
        ("quantization_level", "Q4_K_M".to_owned()),
        ("format", "gguf".to_owned()),
        ("context_length", "8192".to_owned()),
        ("size_bytes", format!("{}", 4_661_224_676 + i * 1_000)),
        ("modified_at", "2025-01-15T10:21:33Z".to_owned()),
        ("embedding_length", "4096".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    ServiceInfo {
        id: format!("ollama/model-{i}:latest"),
        name: format!("model-{i}:latest"),
        service_type: "llm".into(),
        version: digest(i),
        description: format!("Ollama model model-{i}:latest"),
        port: Some(11434),
        metadata,
        tags: vec!["gpu".into(), "q4_k_m".into(), "llama".into()],
        capabilities: vec!["completion".into(), "tools".into()],
        protocols: vec!["ollama".into(), "openai".into()],
        health_check_url: Some("http://127.0.0.1:11434/api/tags".into()),
        ..ServiceInfo::default()
    }
}

/// A node of `key` offering `models`, and its next record.
fn node_with(key: &Keypair, models: impl IntoIterator<Item = ServiceInfo>) -> LocalServices {
    let limits = RecordLimits::default();
    let mut local = LocalServices::new(key.public().to_peer_id(), limits.max_paged_services());
    for model in models {
        local.register(model, NOW).unwrap();
    }
    local
}

fn next(local: &mut LocalServices, now: u64) -> NodeRecord {
    local.next_record(now, TTL, Some("eu-west"), &["gpu".into()], &addresses())
}

/// A fixed pseudo-random permutation of `items`.
fn shuffled<T>(mut items: Vec<T>, seed: u64) -> Vec<T> {
    let mut x = seed | 1;
    for i in (1..items.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let j = usize::try_from(x % (i as u64 + 1)).unwrap();
        items.swap(i, j);
    }
    items
}

fn payload(envelope: &[u8]) -> Vec<u8> {
    let envelope = SignedEnvelope::from_protobuf_encoding(envelope).unwrap();
    let (payload, _) = envelope
        .payload_and_signing_key(NODE_RECORD_DOMAIN.to_owned(), NODE_RECORD_PAYLOAD_TYPE)
        .unwrap();
    payload.to_vec()
}

fn changes(accepted: &Accepted) -> Vec<(String, ChangeKind)> {
    match accepted {
        Accepted::Stored { changes } => changes
            .iter()
            .map(|c| (c.service_id.clone(), c.kind))
            .collect(),
        Accepted::Unchanged => Vec::new(),
    }
}

fn ids(services: &[ServiceInfo]) -> Vec<&str> {
    services.iter().map(|s| s.id.as_str()).collect()
}

#[test]
fn five_hundred_ollama_models_sign_into_pages_and_merge_back_whole() {
    let key = Keypair::generate_ed25519();
    let peer = key.public().to_peer_id();
    let limits = RecordLimits::default();
    let mut local = node_with(&key, (0..500).map(ollama_model));
    let record = next(&mut local, NOW);
    assert_eq!(record.services.len(), 500);

    let pages = sign_record_pages(&record, &key, &limits).unwrap();
    // 64 services a page, and these are small enough that the count decides.
    assert_eq!(pages.len(), 500usize.div_ceil(limits.max_services));
    let sizes: Vec<usize> = pages.iter().map(|p| p.envelope.len()).collect();
    eprintln!(
        "500 Ollama models: {} pages of {sizes:?} bytes ({} in all)",
        pages.len(),
        sizes.iter().sum::<usize>()
    );
    let mut seen = 0;
    for (i, page) in pages.iter().enumerate() {
        assert_eq!(usize::from(page.page), i);
        assert_eq!(usize::from(page.pages), pages.len());
        assert!(page.envelope.len() <= limits.max_record_bytes);
        let back = verify_record(&page.envelope, &peer, NOW, None, &limits).unwrap();
        assert_eq!(back.version, RECORD_VERSION_PAGED);
        assert_eq!((back.page, back.pages), (page.page, page.pages));
        assert_eq!(back.sequence, record.sequence);
        assert_eq!(back.issued_at, record.issued_at);
        assert_eq!(back.expires_at, record.expires_at);
        assert!(back.services.len() <= limits.max_services);
        // In order, whole: addresses, peer id and expiry filled back in.
        assert_eq!(
            back.services,
            record.services[seen..seen + back.services.len()]
        );
        seen += back.services.len();
    }
    assert_eq!(seen, 500);

    let mut cache = RecordCache::new(16);
    let mut added = 0;
    for page in shuffled(pages.clone(), 0x5eed) {
        let got = cache.accept(peer, &page.envelope, NOW, &limits).unwrap();
        added += changes(&got)
            .iter()
            .filter(|(_, k)| *k == ChangeKind::Added)
            .count();
        assert_eq!(
            cache.accept(peer, &page.envelope, NOW, &limits).unwrap(),
            Accepted::Unchanged
        );
    }
    assert_eq!(added, 500, "each service reported added once");
    let held = cache.get(&peer).unwrap();
    assert_eq!(held.record.services, record.services);
    assert_eq!(held.record.sequence, record.sequence);
    assert_eq!(held.record.region.as_deref(), Some("eu-west"));
    assert_eq!(usize::from(held.record.pages), pages.len());
    assert_eq!(held.envelope, pages[0].envelope);
    let served: Vec<(u16, u64, Vec<u8>)> = held
        .page_envelopes()
        .map(|(p, s, e)| (p, s, e.to_vec()))
        .collect();
    let expected: Vec<(u16, u64, Vec<u8>)> = pages
        .iter()
        .map(|p| (p.page, record.sequence, p.envelope.clone()))
        .collect();
    assert_eq!(served, expected);
    assert_eq!(cache.held_sequence(&peer), Some(record.sequence));
    assert_eq!(cache.held_page_sequence(&peer, 7), Some(record.sequence));
    assert_eq!(cache.held_page_sequence(&peer, 8), None);

    // Expiry takes every page, and reports every service.
    let gone = cache.expire(record.expires_at);
    assert_eq!(gone.len(), 500);
    assert!(gone.iter().all(|c| c.kind == ChangeKind::Removed));
    assert!(cache.is_empty());
}

#[test]
fn a_record_that_fits_one_page_is_signed_as_version_one_byte_for_byte() {
    let key = Keypair::generate_ed25519();
    let limits = RecordLimits::default();
    let mut local = node_with(&key, (0..64).map(ollama_model));
    let record = next(&mut local, NOW);
    let pages = sign_record_pages(&record, &key, &limits).unwrap();
    assert_eq!(pages.len(), 1);
    assert_eq!((pages[0].page, pages[0].pages), (0, 1));
    let single = sign_record(&record, &key, &limits).unwrap();
    assert_eq!(pages[0].envelope, single);
    assert_eq!(payload(&single)[0], RECORD_VERSION);
    let back = verify_record(&single, &key.public().to_peer_id(), NOW, None, &limits).unwrap();
    assert_eq!(back, record);
    assert_eq!(
        (back.version, back.page, back.pages),
        (RECORD_VERSION, 0, 1)
    );
    eprintln!(
        "64 Ollama models in one version-1 page: {} bytes",
        single.len()
    );

    // `version`, `page` and `pages` of the input do not matter.
    let odd = NodeRecord {
        version: 9,
        page: 3,
        pages: 0,
        ..record
    };
    assert_eq!(sign_record_pages(&odd, &key, &limits).unwrap(), pages);
}

#[test]
fn one_service_in_version_two_is_smaller_by_its_node_fields() {
    let key = Keypair::generate_ed25519();
    let limits = RecordLimits::default();
    let with = |n: usize| {
        let mut local = node_with(&key, (0..n).map(ollama_model));
        let record = next(&mut local, NOW);
        let record = NodeRecord {
            version: RECORD_VERSION_PAGED,
            ..record
        };
        let v2 = payload(&sign_record(&record, &key, &limits).unwrap()).len();
        let v1 = payload(
            &sign_record(
                &NodeRecord {
                    version: RECORD_VERSION,
                    ..record
                },
                &key,
                &limits,
            )
            .unwrap(),
        )
        .len();
        (v1, v2)
    };
    // From one service to two: the second costs its own bytes only (the
    // page's addresses are there with the first).
    let (v1_1, v2_1) = with(1);
    let (v1_2, v2_2) = with(2);
    let (v1_64, v2_64) = with(64);
    let (v1_service, v2_service) = (v1_2 - v1_1, v2_2 - v2_1);
    eprintln!(
        "one Ollama-like service: {v1_service} bytes in version 1, {v2_service} in version 2; \
         64 services: {v1_64} vs {v2_64} payload bytes"
    );
    // The peer id (1 + 52), the three addresses and the expiry, per service.
    let peer_len = key.public().to_peer_id().to_string().len() + 1;
    let addresses_len: usize = 1 + addresses().iter().map(|a| a.len() + 1).sum::<usize>();
    let expiry_len = 6; // a varint of a Unix time in milliseconds
    assert_eq!(
        v1_service - v2_service,
        peer_len + addresses_len + expiry_len
    );
    assert!(v2_64 < v1_64);
}

#[test]
fn a_node_that_shrinks_to_one_page_drops_its_old_pages() {
    let key = Keypair::generate_ed25519();
    let peer = key.public().to_peer_id();
    let limits = RecordLimits::default();
    let mut local = node_with(&key, (0..150).map(ollama_model));
    let big = next(&mut local, NOW);
    let old = sign_record_pages(&big, &key, &limits).unwrap();
    assert_eq!(old.len(), 3);
    let mut cache = RecordCache::new(16);
    for page in &old {
        cache.accept(peer, &page.envelope, NOW, &limits).unwrap();
    }
    assert_eq!(cache.get(&peer).unwrap().record.services.len(), 150);

    // Down to 10 models (of old page 0): one page, version 1.
    for s in &big.services[10..] {
        local.unregister(&s.id).unwrap();
    }
    let small = next(&mut local, NOW + 1000);
    let new = sign_record_pages(&small, &key, &limits).unwrap();
    assert_eq!(new.len(), 1);
    let got = cache
        .accept(peer, &new[0].envelope, NOW + 1000, &limits)
        .unwrap();
    let removed: Vec<String> = changes(&got)
        .into_iter()
        .filter(|(_, k)| *k == ChangeKind::Removed)
        .map(|(id, _)| id)
        .collect();
    assert_eq!(removed.len(), 140);
    let held = cache.get(&peer).unwrap();
    assert_eq!(held.pages.len(), 1);
    assert_eq!(held.record.services, small.services);
    for page in &old[1..] {
        let page = verify_record(&page.envelope, &peer, NOW, None, &limits).unwrap();
        for service in &page.services {
            assert!(removed.contains(&service.id));
            assert!(!held.record.services.iter().any(|s| s.id == service.id));
        }
    }
    assert_eq!(held.record.pages, 1);
    // An old page arriving late does not bring them back.
    let late = cache.accept(peer, &old[2].envelope, NOW + 1000, &limits);
    assert!(
        matches!(late, Err(RejectReason::StaleSequence { .. })),
        "{late:?}"
    );
    assert_eq!(cache.get(&peer).unwrap().record.services.len(), 10);
}

#[test]
fn pages_of_mixed_sequences_merge_until_the_new_ones_arrive() {
    let key = Keypair::generate_ed25519();
    let peer = key.public().to_peer_id();
    let limits = RecordLimits::default();
    let mut local = node_with(&key, (0..128).map(ollama_model));
    let first = next(&mut local, NOW);
    let old = sign_record_pages(&first, &key, &limits).unwrap();
    assert_eq!(old.len(), 2);
    // Services are paged in id order: page 0 holds order[..64], page 1 the rest.
    let order: Vec<String> = first.services.iter().map(|s| s.id.clone()).collect();

    // The node drops its first 10 services and retags order[64..74]:
    // those move to page 0.
    for id in &order[..10] {
        local.unregister(id).unwrap();
    }
    for id in &order[64..74] {
        let mut model = local.get(id).unwrap().clone();
        model.tags.push("new".into());
        local.register(model, NOW + 1000).unwrap();
    }
    let second = next(&mut local, NOW + 1000);
    let new = sign_record_pages(&second, &key, &limits).unwrap();
    assert_eq!(new.len(), 2);

    let mut cache = RecordCache::new(16);
    for page in &old {
        cache.accept(peer, &page.envelope, NOW, &limits).unwrap();
    }
    let got = cache
        .accept(peer, &new[0].envelope, NOW + 1000, &limits)
        .unwrap();
    let held = cache.get(&peer).unwrap();
    // New page 0 (order[10..74]) and old page 1 (order[64..128]): both
    // visible, each id once, the newer page's copy of order[64..74].
    assert_eq!(ids(&held.record.services), order[10..]);
    assert_eq!(held.record.sequence, second.sequence);
    assert_eq!(cache.held_sequence(&peer), Some(second.sequence));
    let moved = held
        .record
        .services
        .iter()
        .find(|s| s.id == order[70])
        .unwrap();
    assert!(moved.tags.contains(&"new".to_owned()));
    assert_eq!(cache.held_page_sequence(&peer, 0), Some(second.sequence));
    assert_eq!(cache.held_page_sequence(&peer, 1), Some(first.sequence));
    let mut got = changes(&got);
    got.sort_by(|a, b| a.0.cmp(&b.0));
    let mut expected: Vec<(String, ChangeKind)> = order[64..74]
        .iter()
        .map(|id| (id.clone(), ChangeKind::Updated))
        .chain(
            order[..10]
                .iter()
                .map(|id| (id.clone(), ChangeKind::Removed)),
        )
        .collect();
    expected.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(got, expected);

    // New page 1: the merged view is the new record.
    let got = cache
        .accept(peer, &new[1].envelope, NOW + 1000, &limits)
        .unwrap();
    assert_eq!(changes(&got), [], "nothing else changed");
    let held = cache.get(&peer).unwrap();
    assert_eq!(held.record.services, second.services);

    // The old page 1 is stale now.
    let stale = cache
        .accept(peer, &old[1].envelope, NOW + 1000, &limits)
        .unwrap_err();
    assert_eq!(
        stale,
        RejectReason::StaleSequence {
            got: first.sequence,
            held: second.sequence
        }
    );
    // And a floor from elsewhere counts per page too.
    let mut fresh = RecordCache::new(16);
    let floored = fresh
        .accept_at_least(peer, &old[1].envelope, NOW, &limits, Some(second.sequence))
        .unwrap_err();
    assert_eq!(floored.as_str(), "stale_sequence");
}

#[test]
fn a_page_expires_on_its_own() {
    let key = Keypair::generate_ed25519();
    let peer = key.public().to_peer_id();
    let limits = RecordLimits::default();
    let mut local = node_with(&key, (0..100).map(ollama_model));
    let first = next(&mut local, NOW);
    let old = sign_record_pages(&first, &key, &limits).unwrap();
    let later = next(&mut local, NOW + 60_000);
    let new = sign_record_pages(&later, &key, &limits).unwrap();
    let mut cache = RecordCache::new(16);
    cache.accept(peer, &old[1].envelope, NOW, &limits).unwrap();
    cache
        .accept(peer, &new[0].envelope, NOW + 60_000, &limits)
        .unwrap();
    let held = cache.get(&peer).unwrap();
    assert_eq!(held.record.expires_at, first.expires_at, "the earliest");
    assert_eq!(held.record.services.len(), 100);
    let gone = cache.expire(first.expires_at);
    assert_eq!(gone.len(), 36, "old page 1's services");
    assert_eq!(cache.get(&peer).unwrap().record.services.len(), 64);
    assert_eq!(
        cache.get(&peer).unwrap().record.expires_at,
        later.expires_at
    );
}

/// Format version 2 as the README describes it, written independently of
/// the crate.
#[derive(Serialize)]
struct ReadmeV2 {
    version: u8,
    peer_id: String,
    sequence: u64,
    issued_at: u64,
    expires_at: u64,
    region: Option<String>,
    node_tags: Vec<String>,
    addresses: Vec<String>,
    page: u16,
    pages: u16,
    services: Vec<ReadmeV2Service>,
}

#[derive(Serialize)]
struct ReadmeV2Service {
    id: String,
    name: String,
    service_type: String,
    version: String,
    description: String,
    port: Option<u16>,
    metadata: BTreeMap<String, String>,
    tags: Vec<String>,
    status: ServiceStatus,
    health_check_url: Option<String>,
    last_health_check: Option<u64>,
    capabilities: Vec<String>,
    protocols: Vec<String>,
    latency_ms: Option<f64>,
    throughput: Option<f64>,
    reliability: Option<f64>,
    registered_at: u64,
    updated_at: u64,
}

impl ReadmeV2 {
    fn of(record: &NodeRecord, page: u16, pages: u16, services: &[ServiceInfo]) -> Self {
        Self {
            version: RECORD_VERSION_PAGED,
            peer_id: record.peer_id.clone(),
            sequence: record.sequence,
            issued_at: record.issued_at,
            expires_at: record.expires_at,
            region: record.region.clone(),
            node_tags: record.node_tags.clone(),
            addresses: record.node_addresses().to_vec(),
            page,
            pages,
            services: services
                .iter()
                .map(|s| ReadmeV2Service {
                    id: s.id.clone(),
                    name: s.name.clone(),
                    service_type: s.service_type.clone(),
                    version: s.version.clone(),
                    description: s.description.clone(),
                    port: s.port,
                    metadata: s.metadata.clone(),
                    tags: s.tags.clone(),
                    status: s.status,
                    health_check_url: s.health_check_url.clone(),
                    last_health_check: s.last_health_check,
                    capabilities: s.capabilities.clone(),
                    protocols: s.protocols.clone(),
                    latency_ms: s.latency_ms,
                    throughput: s.throughput,
                    reliability: s.reliability,
                    registered_at: s.registered_at,
                    updated_at: s.updated_at,
                })
                .collect(),
        }
    }

    fn sign(&self, key: &Keypair) -> Vec<u8> {
        SignedEnvelope::new(
            key,
            NODE_RECORD_DOMAIN.to_owned(),
            NODE_RECORD_PAYLOAD_TYPE.to_vec(),
            postcard::to_allocvec(self).unwrap(),
        )
        .unwrap()
        .into_protobuf_encoding()
    }
}

#[test]
fn version_two_pages_are_the_layout_the_readme_describes() {
    let key = Keypair::generate_ed25519();
    let limits = RecordLimits::default();
    let mut local = node_with(&key, (0..100).map(ollama_model));
    let mut record = next(&mut local, NOW);
    record.services[3].latency_ms = Some(12.5);
    record.services[5].status = ServiceStatus::Busy;
    record.services[7].last_health_check = Some(NOW - 5);
    let pages = sign_record_pages(&record, &key, &limits).unwrap();
    assert_eq!(pages.len(), 2);
    let mut at = 0;
    for page in &pages {
        let n = verify_record(
            &page.envelope,
            &key.public().to_peer_id(),
            NOW,
            None,
            &limits,
        )
        .unwrap()
        .services
        .len();
        let readme = ReadmeV2::of(&record, page.page, page.pages, &record.services[at..at + n]);
        assert_eq!(
            payload(&page.envelope),
            postcard::to_allocvec(&readme).unwrap()
        );
        at += n;
    }
}

#[test]
fn bad_page_fields_are_refused() {
    let key = Keypair::generate_ed25519();
    let peer = key.public().to_peer_id();
    let limits = RecordLimits::default();
    let mut local = node_with(&key, (0..3).map(ollama_model));
    let record = next(&mut local, NOW);
    let bad_page = |page, pages| RejectReason::BadPage {
        page,
        pages,
        max: MAX_RECORD_PAGES,
    };
    for (page, pages) in [(2, 2), (0, 0), (5, 3), (0, MAX_RECORD_PAGES + 1)] {
        let bytes = ReadmeV2::of(&record, page, pages, &record.services).sign(&key);
        let err = verify_record(&bytes, &peer, NOW, None, &limits).unwrap_err();
        assert_eq!(err, bad_page(page, pages));
        assert_eq!(err.as_str(), "bad_page");
        // Nor will the crate sign them.
        let paged = NodeRecord {
            version: RECORD_VERSION_PAGED,
            page,
            pages,
            ..record.clone()
        };
        assert!(matches!(
            sign_record(&paged, &key, &limits),
            Err(RecordError::Invalid(RejectReason::BadPage { .. }))
        ));
    }
    // The last page of 16 is fine.
    let last = ReadmeV2::of(
        &record,
        MAX_RECORD_PAGES - 1,
        MAX_RECORD_PAGES,
        &record.services,
    );
    let back = verify_record(&last.sign(&key), &peer, NOW, None, &limits).unwrap();
    assert_eq!(back.services, record.services);
    // Version 1 is page 0 of 1, always.
    let v1_page_1 = NodeRecord {
        page: 1,
        pages: 2,
        ..record.clone()
    };
    assert_eq!(
        sign_record(&v1_page_1, &key, &limits)
            .unwrap_err()
            .to_string(),
        RecordError::Invalid(bad_page(1, 2)).to_string()
    );

    // A page outside the page count its node signed at the same sequence.
    let mut cache = RecordCache::new(4);
    let two = ReadmeV2::of(&record, 0, 2, &record.services[..1]).sign(&key);
    cache.accept(peer, &two, NOW, &limits).unwrap();
    let outside = ReadmeV2::of(&record, 2, 3, &record.services[1..]).sign(&key);
    assert_eq!(
        cache.accept(peer, &outside, NOW, &limits).unwrap_err(),
        bad_page(2, 2)
    );
    // A version this node does not read.
    let mut future = ReadmeV2::of(&record, 0, 1, &record.services);
    future.version = RECORD_VERSION_PAGED + 1;
    assert_eq!(
        verify_record(&future.sign(&key), &peer, NOW, None, &limits).unwrap_err(),
        RejectReason::UnsupportedVersion(RECORD_VERSION_PAGED + 1)
    );
}

#[test]
fn services_that_do_not_fit_name_the_reason() {
    let key = Keypair::generate_ed25519();
    let limits = RecordLimits::default();
    // More than 16 pages of 64.
    let mut local = LocalServices::new(key.public().to_peer_id(), usize::MAX);
    for i in 0..=usize::from(MAX_RECORD_PAGES) * 64 {
        local.register(ollama_model(i), NOW).unwrap();
    }
    let record = next(&mut local, NOW);
    let err = sign_record_pages(&record, &key, &limits).unwrap_err();
    assert!(
        matches!(
            err,
            RecordError::Invalid(RejectReason::OverLimit { field: "pages", .. })
        ),
        "{err}"
    );
    // One service alone larger than a page.
    let tight = RecordLimits {
        max_record_bytes: 600,
        ..limits
    };
    let mut local = node_with(&key, (0..20).map(ollama_model));
    let record = next(&mut local, NOW);
    let err = sign_record_pages(&record, &key, &tight).unwrap_err();
    assert!(
        matches!(
            err,
            RecordError::Invalid(RejectReason::TooLarge { max: 600, .. })
        ),
        "{err}"
    );
    // A service with addresses of its own cannot share a page's.
    let mut local = node_with(&key, (0..100).map(ollama_model));
    let mut record = next(&mut local, NOW);
    record.services[42].addresses.pop();
    let err = sign_record_pages(&record, &key, &limits).unwrap_err();
    assert!(
        matches!(&err, RecordError::Unpageable { service, field: "addresses" } if *service == record.services[42].id),
        "{err}"
    );
    // Ids stay unique across pages.
    let mut record = next(&mut local, NOW);
    record.services[99].id = record.services[0].id.clone();
    let err = sign_record_pages(&record, &key, &limits).unwrap_err();
    assert!(
        matches!(err, RecordError::Invalid(RejectReason::DuplicateService(_))),
        "{err}"
    );
}

#[test]
fn pages_are_as_few_as_the_byte_limit_allows() {
    let key = Keypair::generate_ed25519();
    let peer = key.public().to_peer_id();
    // Small pages: the byte limit decides, not the count.
    let limits = RecordLimits {
        max_record_bytes: 4096,
        ..RecordLimits::default()
    };
    let mut local = node_with(&key, (0..60).map(ollama_model));
    let record = next(&mut local, NOW);
    let pages = sign_record_pages(&record, &key, &limits).unwrap();
    let counts: Vec<usize> = pages
        .iter()
        .map(|p| {
            assert!(p.envelope.len() <= 4096);
            verify_record(&p.envelope, &peer, NOW, None, &limits)
                .unwrap()
                .services
                .len()
        })
        .collect();
    assert_eq!(counts.iter().sum::<usize>(), 60);
    // Greedy: a page with the next page's first service too would have been
    // over the limit, or within the margin kept for the varints and the
    // signature (24 bytes).
    let unbounded = RecordLimits {
        max_record_bytes: usize::MAX,
        ..limits
    };
    for (i, page) in pages.iter().enumerate().skip(1) {
        let before: usize = counts[..i].iter().sum();
        let more = NodeRecord {
            version: RECORD_VERSION_PAGED,
            page: page.page - 1,
            pages: page.pages,
            services: record.services[before - counts[i - 1]..=before].to_vec(),
            ..record.clone()
        };
        let size = sign_record(&more, &key, &unbounded).unwrap().len();
        assert!(size > 4096 - 24, "page {} could hold one more", i - 1);
    }
}

/// A node's services from generated sizes.
fn generated(peer: &PeerId, shapes: &[(u8, u8, u8, u8)]) -> NodeRecord {
    let services = shapes
        .iter()
        .enumerate()
        .map(|(i, &(name, description, tags, metadata))| ServiceInfo {
            id: format!("s{i}"),
            name: "n".repeat(usize::from(name)),
            service_type: "llm".into(),
            description: "d".repeat(usize::from(description)),
            peer_id: peer.to_string(),
            addresses: addresses(),
            tags: (0..tags).map(|t| format!("tag-{t}")).collect(),
            metadata: (0..metadata)
                .map(|m| (format!("key-{m}"), format!("value-{i}-{m}")))
                .collect(),
            expires_at: NOW + 300_000,
            ..ServiceInfo::default()
        })
        .collect();
    NodeRecord {
        peer_id: peer.to_string(),
        sequence: 9,
        issued_at: NOW,
        expires_at: NOW + 300_000,
        services,
        ..NodeRecord::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn generated_services_round_trip_through_pages_and_the_cache(
        shapes in proptest::collection::vec((0u8..=64, 0u8..=255, 0u8..8, 0u8..8), 0..64),
        seed in any::<u64>(),
    ) {
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let limits = RecordLimits {
            max_record_bytes: 4096,
            max_services: 8,
            ..RecordLimits::default()
        };
        let record = generated(&peer, &shapes);
        let pages: Vec<SignedPage> = sign_record_pages(&record, &key, &limits).unwrap();
        prop_assert!(!pages.is_empty());
        if pages.len() == 1 {
            prop_assert_eq!(&pages[0].envelope, &sign_record(&record, &key, &limits).unwrap());
        }
        let mut cache = RecordCache::new(4);
        for page in shuffled(pages.clone(), seed) {
            prop_assert!(page.envelope.len() <= limits.max_record_bytes);
            let back = verify_record(&page.envelope, &peer, NOW, None, &limits).unwrap();
            prop_assert!(back.services.len() <= limits.max_services);
            cache.accept(peer, &page.envelope, NOW, &limits).unwrap();
        }
        let held = cache.get(&peer).unwrap();
        prop_assert_eq!(&held.record.services, &record.services);
        prop_assert_eq!(held.pages.len(), pages.len());
    }

    #[test]
    fn arbitrary_signed_payloads_never_panic(
        version in prop_oneof![Just(RECORD_VERSION), Just(RECORD_VERSION_PAGED), any::<u8>()],
        body in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        let key = Keypair::generate_ed25519();
        let mut payload = vec![version];
        payload.extend(body);
        let bytes = SignedEnvelope::new(
            &key,
            NODE_RECORD_DOMAIN.to_owned(),
            NODE_RECORD_PAYLOAD_TYPE.to_vec(),
            payload,
        )
        .unwrap()
        .into_protobuf_encoding();
        let peer = key.public().to_peer_id();
        let _ = verify_record(&bytes, &peer, NOW, None, &RecordLimits::default());
        let _ = RecordCache::new(1).accept(peer, &bytes, NOW, &RecordLimits::default());
    }

    #[test]
    fn mutated_pages_never_panic_and_never_verify_changed(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let limits = RecordLimits::default();
        let record = generated(&peer, &[(10, 10, 3, 3); 70]);
        let pages = sign_record_pages(&record, &key, &limits).unwrap();
        let original = verify_record(&pages[1].envelope, &peer, NOW, None, &limits).unwrap();
        let mut mutated = pages[1].envelope.clone();
        for (at, x) in flips {
            let i = at % mutated.len();
            mutated[i] ^= x;
        }
        if let Ok(back) = verify_record(&mutated, &peer, NOW, None, &limits) {
            prop_assert_eq!(back, original);
        }
    }
}
