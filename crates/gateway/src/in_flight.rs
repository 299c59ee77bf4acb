//! Requests in flight per key (a serving peer, an asking peer), each
//! counted until its guard is dropped; a key leaves with its last request.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};

/// Counts of requests in flight, by key.
#[derive(Debug)]
pub(crate) struct InFlight<K>(Mutex<HashMap<K, usize>>);

impl<K> Default for InFlight<K> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

/// One request counted in [`InFlight`] until dropped.
pub(crate) struct InFlightGuard<K: Eq + Hash> {
    table: Arc<InFlight<K>>,
    key: K,
}

impl<K: Eq + Hash + Clone> InFlight<K> {
    /// Requests in flight for `key`.
    #[cfg(test)]
    fn count(&self, key: &K) -> usize {
        self.lock().get(key).copied().unwrap_or(0)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, usize>> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Count one more for `key` unless it already has `max`.
    pub(crate) fn try_start(self: &Arc<Self>, key: &K, max: usize) -> Option<InFlightGuard<K>> {
        let mut map = self.lock();
        let count = map.entry(key.clone()).or_default();
        if *count >= max {
            if *count == 0 {
                map.remove(key);
            }
            return None;
        }
        *count += 1;
        Some(InFlightGuard {
            table: self.clone(),
            key: key.clone(),
        })
    }
}

impl<K: Eq + Hash> Drop for InFlightGuard<K> {
    fn drop(&mut self) {
        let mut map = self
            .table
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = map.get_mut(&self.key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                map.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_guards_and_limits_hold() {
        let table: Arc<InFlight<&str>> = Arc::default();
        let a = table.try_start(&"a", 2);
        let b = table.try_start(&"a", 2);
        assert!(a.is_some() && b.is_some());
        assert!(table.try_start(&"a", 2).is_none(), "the limit holds");
        assert_eq!(table.count(&"a"), 2);
        drop(a);
        assert_eq!(table.count(&"a"), 1);
        drop(b);
        assert_eq!(table.count(&"a"), 0);
        assert!(
            table.lock().is_empty(),
            "a key leaves with its last request"
        );
        assert!(table.try_start(&"z", 0).is_none());
        assert!(table.lock().is_empty(), "a refused key leaves no entry");
    }
}
