//! The HTTP JSON bodies: a service registration (`POST /v1/services`)
//! parses to a service the record accepts or refuses with a reason, and
//! the gateway finds the model a request names or says what is wrong;
//! never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use libp2p::identity::Keypair;
use ollamacron_gateway::requested_model;
use ollamacron_service_registry::{LocalServices, RecordLimits, ServiceInfo, sign_record_pages};

const NOW_MS: u64 = 1_700_000_000_000;

fuzz_target!(|data: &[u8]| {
    let _ = requested_model(data);
    let Ok(service) = serde_json::from_slice::<ServiceInfo>(data) else {
        return;
    };
    let Ok(key) = Keypair::ed25519_from_bytes([9u8; 32]) else {
        return;
    };
    let limits = RecordLimits::default();
    let mut local = LocalServices::new(key.public().to_peer_id(), limits.max_paged_services());
    if local.register(service, NOW_MS).is_ok() {
        let record = local.next_record(NOW_MS, std::time::Duration::from_secs(300), None, &[], &[]);
        let _ = sign_record_pages(&record, &key, &limits);
    }
});
