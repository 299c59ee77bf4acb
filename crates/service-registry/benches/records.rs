//! Record costs: sign and verify one node record (the work of every
//! publication and of every record that arrives), a verified cache
//! accepting a record, and the same for a node of 500 services in pages.

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use libp2p::identity::Keypair;
use ollamacron_service_registry::{
    LocalServices, RecordCache, RecordLimits, ServiceInfo, sign_record, sign_record_pages,
    verify_record,
};

const NOW: u64 = 1_700_000_000_000;

/// A node with `n` services, each with a few tags and capabilities.
fn node(n: usize) -> (Keypair, LocalServices) {
    let key = Keypair::generate_ed25519();
    let limits = RecordLimits::default();
    let mut local = LocalServices::new(key.public().to_peer_id(), limits.max_paged_services());
    for i in 0..n {
        local
            .register(
                ServiceInfo {
                    id: format!("model-{i}"),
                    name: format!("model-{i}:8b-q4"),
                    service_type: "llm".into(),
                    tags: vec!["gpu".into(), "q4".into(), "llama".into()],
                    capabilities: vec!["completion".into(), "tools".into()],
                    ..ServiceInfo::default()
                },
                NOW,
            )
            .unwrap();
    }
    (key, local)
}

fn bench_records(c: &mut Criterion) {
    let limits = RecordLimits::default();
    let mut group = c.benchmark_group("record");
    for services in [1usize, 16] {
        let (key, mut local) = node(services);
        let peer = key.public().to_peer_id();
        let record = local.next_record(
            NOW,
            Duration::from_secs(300),
            Some("eu"),
            &[],
            &["/ip4/192.0.2.1/tcp/11436".into()],
        );
        group.bench_function(format!("sign/{services}-services"), |b| {
            b.iter(|| sign_record(black_box(&record), &key, &limits).unwrap());
        });
        let bytes = sign_record(&record, &key, &limits).unwrap();
        group.bench_function(format!("verify/{services}-services"), |b| {
            b.iter(|| verify_record(black_box(&bytes), &peer, NOW, None, &limits).unwrap());
        });
        group.bench_function(format!("cache-accept/{services}-services"), |b| {
            b.iter(|| {
                let mut cache = RecordCache::new(16);
                cache.accept(peer, black_box(&bytes), NOW, &limits).unwrap()
            });
        });
    }
    group.finish();

    let mut group = c.benchmark_group("pages");
    let (key, mut local) = node(500);
    let peer = key.public().to_peer_id();
    let record = local.next_record(
        NOW,
        Duration::from_secs(300),
        Some("eu"),
        &[],
        &["/ip4/192.0.2.1/tcp/11436".into()],
    );
    group.bench_function("sign/500-services", |b| {
        b.iter(|| sign_record_pages(black_box(&record), &key, &limits).unwrap());
    });
    let pages = sign_record_pages(&record, &key, &limits).unwrap();
    group.bench_function("cache-accept/500-services", |b| {
        b.iter(|| {
            let mut cache = RecordCache::new(16);
            for page in &pages {
                cache
                    .accept(peer, black_box(&page.envelope), NOW, &limits)
                    .unwrap();
            }
            cache
        });
    });
    group.finish();
}

criterion_group!(benches, bench_records);
criterion_main!(benches);
