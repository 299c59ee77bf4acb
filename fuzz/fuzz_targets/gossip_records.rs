//! Gossip message handling: a run of messages (each a 2-byte length and
//! its bytes, from one of three peers) into a small verified cache. Junk
//! never panics and the cache never holds more than it may.

#![no_main]

use libfuzzer_sys::fuzz_target;
use libp2p::identity::Keypair;
use ollamacron_service_registry::{RecordCache, RecordLimits};

const NOW_MS: u64 = 1_700_000_000_000;
const MAX_RECORDS: usize = 2;

fuzz_target!(|data: &[u8]| {
    let peers: Vec<_> = (1u8..=3)
        .filter_map(|b| Keypair::ed25519_from_bytes([b; 32]).ok())
        .map(|k| k.public().to_peer_id())
        .collect();
    let limits = RecordLimits::default();
    let mut cache = RecordCache::new(MAX_RECORDS);
    let mut rest = data;
    while let [from, hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (message, next) = tail.split_at(len);
        let Some(peer) = peers.get(usize::from(*from) % peers.len().max(1)) else {
            return;
        };
        let _ = cache.accept_at_least(*peer, message, NOW_MS, &limits, None);
        assert!(cache.len() <= MAX_RECORDS, "the cache outgrew its bound");
        rest = next;
    }
    let _ = cache.expire(NOW_MS + 3_600_000);
    assert_eq!(cache.len(), 0, "everything expires");
});
