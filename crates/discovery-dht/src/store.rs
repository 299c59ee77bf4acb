//! The record store: libp2p's bounded `MemoryStore`, with providers handed
//! out in random order.

use std::borrow::Cow;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

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
///
/// The records live behind an uncontended lock, so that
/// [`Behaviour::stored_record`](crate::Behaviour::stored_record) can read
/// them through `&self` (Kademlia lends its store out only mutably). Every
/// method takes the lock once and never calls out while holding it.
pub struct DhtStore {
    inner: Arc<Mutex<MemoryStore>>,
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
            inner: Arc::new(Mutex::new(MemoryStore::with_config(local_peer, config))),
        }
    }

    /// A second handle on the same records (the behaviour's read view).
    pub(crate) fn share(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }

    fn lock(&self) -> MutexGuard<'_, MemoryStore> {
        // Nothing panics while holding the lock; if something ever did, the
        // store is still a consistent `MemoryStore`.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl RecordStore for DhtStore {
    type RecordsIter<'a> = std::vec::IntoIter<Cow<'a, Record>>;
    type ProvidedIter<'a> = std::vec::IntoIter<Cow<'a, ProviderRecord>>;

    // Kademlia turns the records it gets into owned ones at once (to answer
    // a request, to start a lookup, to republish), so handing out owned
    // copies costs no extra clone on any path that matters.
    fn get(&self, key: &RecordKey) -> Option<Cow<'_, Record>> {
        self.lock()
            .get(key)
            .map(|record| Cow::Owned(record.into_owned()))
    }

    fn put(&mut self, record: Record) -> Result<()> {
        self.lock().put(record)
    }

    fn remove(&mut self, key: &RecordKey) {
        self.lock().remove(key);
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        let records: Vec<Cow<'_, Record>> = self
            .lock()
            .records()
            .map(|record| Cow::Owned(record.into_owned()))
            .collect();
        records.into_iter()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> Result<()> {
        self.lock().add_provider(record)
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        let mut providers = self.lock().providers(key);
        providers.shuffle(&mut rand::thread_rng());
        providers
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        let provided: Vec<Cow<'_, ProviderRecord>> = self
            .lock()
            .provided()
            .map(|record| Cow::Owned(record.into_owned()))
            .collect();
        provided.into_iter()
    }

    fn remove_provider(&mut self, key: &RecordKey, provider: &PeerId) {
        self.lock().remove_provider(key, provider);
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

    #[test]
    fn a_shared_handle_sees_the_same_records() {
        let mut store = DhtStore::new(PeerId::random(), MemoryStoreConfig::default());
        let view = store.share();
        let key = RecordKey::new(&"k");
        assert!(view.get(&key).is_none());
        store.put(Record::new(key.clone(), b"v".to_vec())).unwrap();
        assert_eq!(view.get(&key).unwrap().value, b"v");
        assert_eq!(view.records().count(), 1);
        store.remove(&key);
        assert!(view.get(&key).is_none());
    }
}
