//! The record store: libp2p's bounded `MemoryStore`, with providers handed
//! out in random order.

use std::borrow::Cow;

use libp2p::PeerId;
use libp2p::kad::store::{MemoryStore, MemoryStoreConfig, RecordStore, Result};
use libp2p::kad::{ProviderRecord, Record, RecordKey};
use rand::seq::SliceRandom;

/// A [`MemoryStore`] whose `providers` come back shuffled.
///
/// Kademlia answers a provider lookup with at most `replication_factor`
/// (20) providers, taken from the front of the store's list. With more
/// providers than that under one key — every node provides the namespace —
/// a fixed order would hide the same providers from every lookup, forever.
/// Shuffled, each answer is a fresh sample, and a lookup that asks a
/// handful of peers sees all of them.
pub struct DhtStore {
    inner: MemoryStore,
}

impl std::fmt::Debug for DhtStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DhtStore").finish_non_exhaustive()
    }
}

impl DhtStore {
    /// A store for `local_peer` with these bounds.
    #[must_use]
    pub fn new(local_peer: PeerId, config: MemoryStoreConfig) -> Self {
        Self {
            inner: MemoryStore::with_config(local_peer, config),
        }
    }
}

impl RecordStore for DhtStore {
    type RecordsIter<'a> = <MemoryStore as RecordStore>::RecordsIter<'a>;
    type ProvidedIter<'a> = <MemoryStore as RecordStore>::ProvidedIter<'a>;

    fn get(&self, key: &RecordKey) -> Option<Cow<'_, Record>> {
        self.inner.get(key)
    }

    fn put(&mut self, record: Record) -> Result<()> {
        self.inner.put(record)
    }

    fn remove(&mut self, key: &RecordKey) {
        self.inner.remove(key);
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        self.inner.records()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> Result<()> {
        self.inner.add_provider(record)
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        let mut providers = self.inner.providers(key);
        providers.shuffle(&mut rand::thread_rng());
        providers
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.inner.provided()
    }

    fn remove_provider(&mut self, key: &RecordKey, provider: &PeerId) {
        self.inner.remove_provider(key, provider);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_provider_comes_first_sometimes() {
        let local = PeerId::random();
        let mut store = DhtStore::new(local, MemoryStoreConfig::default());
        let key = RecordKey::new(&"k");
        let peers: Vec<PeerId> = (0..5).map(|_| PeerId::random()).collect();
        for p in &peers {
            store
                .add_provider(ProviderRecord::new(key.clone(), *p, Vec::new()))
                .unwrap();
        }
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..500 {
            let list = store.providers(&key);
            assert_eq!(list.len(), 5);
            firsts.insert(list[0].provider);
        }
        assert_eq!(
            firsts.len(),
            5,
            "with 500 draws every provider leads at least once"
        );
    }
}
