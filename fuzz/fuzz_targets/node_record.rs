//! The signed node record: any bytes verify to a record or a reason, never
//! a panic; and every record we sign from services made of the bytes is
//! one we accept.

#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use libp2p::identity::Keypair;
use ollamacron_service_registry::{
    LocalServices, RecordLimits, ServiceInfo, sign_record_pages, verify_record,
};

/// A fixed "now" (Unix ms), so that runs repeat.
const NOW_MS: u64 = 1_700_000_000_000;

fuzz_target!(|data: &[u8]| {
    let Ok(key) = Keypair::ed25519_from_bytes([7u8; 32]) else {
        return;
    };
    let peer = key.public().to_peer_id();
    let limits = RecordLimits::default();
    let _ = verify_record(data, &peer, NOW_MS, None, &limits);
    let _ = verify_record(data, &peer, NOW_MS, Some(u64::MAX), &limits);

    let text = String::from_utf8_lossy(data);
    let mut local = LocalServices::new(peer, limits.max_paged_services());
    for (i, part) in text.split('\n').take(8).enumerate() {
        let service = ServiceInfo {
            id: format!("s{i}"),
            name: part.to_owned(),
            service_type: "llm".to_owned(),
            tags: part.split(',').map(str::to_owned).collect(),
            ..ServiceInfo::default()
        };
        let _ = local.register(service, NOW_MS);
    }
    let record = local.next_record(NOW_MS, Duration::from_secs(300), None, &[], &[]);
    if let Ok(pages) = sign_record_pages(&record, &key, &limits) {
        for page in &pages {
            if let Err(reason) = verify_record(&page.envelope, &peer, NOW_MS, None, &limits) {
                panic!("a record we signed is refused: {reason}");
            }
        }
    }
});
