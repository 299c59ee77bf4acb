//! The DHT store's hot path: answering a provider request
//! (`RecordStore::providers`, a copy of the key's providers, shuffled) and
//! taking a provider announcement (`add_provider` of a provider the key
//! already lists, the steady state: every provider re-announces each
//! `provide_interval`), for a key with 1, 32 and 256 providers (256 is the
//! default `max_providers_per_key`).

#![allow(missing_docs, clippy::unwrap_used)]

use std::hint::black_box;

use criterion::{BatchSize, BenchmarkId, Criterion, criterion_group, criterion_main};
use libp2p::kad::store::{MemoryStoreConfig, RecordStore};
use libp2p::kad::{ProviderRecord, RecordKey};
use libp2p::{Multiaddr, PeerId};
use ollamacron_discovery_dht::{DhtStore, provider_key};

const SIZES: [usize; 3] = [1, 32, 256];

/// A store with `n` providers of `key`, each with one address, and the
/// record of the provider listed last (the longest scan on re-announce).
fn store_with(n: usize, key: &RecordKey) -> (DhtStore, ProviderRecord) {
    let mut store = DhtStore::new(
        PeerId::random(),
        MemoryStoreConfig {
            max_providers_per_key: 256,
            ..MemoryStoreConfig::default()
        },
    );
    let mut last = None;
    for i in 0..n {
        let address: Multiaddr = format!("/ip4/10.0.{}.{}/tcp/4001", i / 256, i % 256)
            .parse()
            .unwrap();
        let record = ProviderRecord::new(key.clone(), PeerId::random(), vec![address]);
        store.add_provider(record.clone()).unwrap();
        last = Some(record);
    }
    (store, last.unwrap())
}

fn bench_store(c: &mut Criterion) {
    let key = provider_key("/bench");
    let mut group = c.benchmark_group("dht_store");
    for n in SIZES {
        let (store, _) = store_with(n, &key);
        assert_eq!(store.providers(&key).len(), n);
        group.bench_with_input(BenchmarkId::new("providers", n), &store, |b, store| {
            b.iter(|| black_box(store.providers(black_box(&key))));
        });
    }
    for n in SIZES {
        let (mut store, last) = store_with(n, &key);
        group.bench_function(BenchmarkId::new("add_provider", n), |b| {
            b.iter_batched(
                || last.clone(),
                |record| store.add_provider(black_box(record)).unwrap(),
                BatchSize::SmallInput,
            );
        });
        assert_eq!(store.providers(&key).len(), n);
    }
    group.finish();
}

criterion_group!(benches, bench_store);
criterion_main!(benches);
