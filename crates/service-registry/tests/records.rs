//! Signing and verification of node records: every way a record can be
//! wrong is refused with its reason, and nothing panics on any input.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use libp2p::PeerId;
use libp2p::identity::Keypair;
use ollamacron_service_registry::{
    MAX_RECORD_PAGES, NodeRecord, RECORD_VERSION, RECORD_VERSION_PAGED, RecordLimits, RejectReason,
    ServiceInfo, sign_record, verify_record,
};
use proptest::prelude::*;

const NOW: u64 = 1_700_000_000_000;
const TTL_MS: u64 = 300_000;

fn record_for(key: &Keypair, sequence: u64) -> NodeRecord {
    let peer = key.public().to_peer_id().to_string();
    NodeRecord {
        version: RECORD_VERSION,
        peer_id: peer.clone(),
        sequence,
        issued_at: NOW,
        expires_at: NOW + TTL_MS,
        region: Some("eu-west".into()),
        node_tags: vec!["gpu".into()],
        services: vec![ServiceInfo {
            id: "s1".into(),
            name: "llama3:8b".into(),
            service_type: "llm".into(),
            peer_id: peer,
            tags: vec!["q4".into()],
            capabilities: vec!["completion".into(), "tools".into()],
            ..ServiceInfo::default()
        }],
        page: 0,
        pages: 1,
    }
}

fn peer(key: &Keypair) -> PeerId {
    key.public().to_peer_id()
}

fn reason(bytes: &[u8], under: &PeerId, held: Option<u64>) -> &'static str {
    verify_record(bytes, under, NOW, held, &RecordLimits::default())
        .unwrap_err()
        .as_str()
}

#[test]
fn a_signed_record_verifies_and_round_trips() {
    let key = Keypair::generate_ed25519();
    let record = record_for(&key, 3);
    let bytes = sign_record(&record, &key, &RecordLimits::default()).unwrap();
    let back = verify_record(&bytes, &peer(&key), NOW, Some(3), &RecordLimits::default()).unwrap();
    assert_eq!(back, record);
}

#[test]
fn a_record_signed_by_another_key_under_the_victims_key_is_refused() {
    let victim = Keypair::generate_ed25519();
    let attacker = Keypair::generate_ed25519();
    // The attacker signs a record that claims to be the victim's.
    let mut forged = record_for(&attacker, 99);
    let bytes = sign_record(&forged, &attacker, &RecordLimits::default()).unwrap();
    assert_eq!(reason(&bytes, &peer(&victim), None), "wrong_signer");
    // Naming the victim inside does not help: signing refuses, and a record
    // whose body names another peer than its signer is refused on read.
    forged.peer_id = peer(&victim).to_string();
    assert!(sign_record(&forged, &attacker, &RecordLimits::default()).is_err());
}

#[test]
fn a_tampered_record_is_refused() {
    let key = Keypair::generate_ed25519();
    let bytes = sign_record(&record_for(&key, 1), &key, &RecordLimits::default()).unwrap();
    // Flip a byte of the payload ("llama3" -> "llamb3").
    let at = bytes.windows(6).position(|w| w == b"llama3").unwrap() + 4;
    let mut tampered = bytes;
    tampered[at] ^= 0x03;
    assert_eq!(reason(&tampered, &peer(&key), None), "bad_signature");
}

#[test]
fn expired_stale_and_badly_timed_records_are_refused() {
    let key = Keypair::generate_ed25519();
    let limits = RecordLimits::default();
    let bytes = sign_record(&record_for(&key, 5), &key, &limits).unwrap();
    let later = NOW + TTL_MS + 1;
    let err = verify_record(&bytes, &peer(&key), later, None, &limits).unwrap_err();
    assert_eq!(err.as_str(), "expired", "{err}");
    assert_eq!(reason(&bytes, &peer(&key), Some(6)), "stale_sequence");
    // The same sequence again (a re-publication) is fine.
    verify_record(&bytes, &peer(&key), NOW, Some(5), &limits).unwrap();

    let mut forever = record_for(&key, 1);
    forever.expires_at = NOW + 10 * 24 * 3600 * 1000;
    let err = sign_record(&forever, &key, &limits).unwrap_err();
    assert!(err.to_string().contains("lifetime"), "{err}");

    // Dated a year ahead, a record with a valid lifetime would outlive it.
    let mut future = record_for(&key, 1);
    let year_ms = 365 * 24 * 3600 * 1000;
    future.issued_at += year_ms;
    future.expires_at += year_ms;
    let bytes = sign_record(&future, &key, &limits).unwrap();
    assert_eq!(reason(&bytes, &peer(&key), None), "from_the_future");
    // A little clock skew is tolerated.
    let mut skewed = record_for(&key, 1);
    skewed.issued_at += 30_000;
    skewed.expires_at += 30_000;
    let bytes = sign_record(&skewed, &key, &limits).unwrap();
    verify_record(&bytes, &peer(&key), NOW, None, &limits).unwrap();
}

#[test]
fn a_service_id_listed_twice_is_refused() {
    let key = Keypair::generate_ed25519();
    let mut twice = record_for(&key, 1);
    twice.services.push(twice.services[0].clone());
    let err = sign_record(&twice, &key, &RecordLimits::default()).unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");
}

#[test]
fn oversized_records_and_fields_are_refused() {
    let key = Keypair::generate_ed25519();
    let limits = RecordLimits::default();
    let mut big = record_for(&key, 1);
    big.services[0].description = "x".repeat(10_000);
    let err = sign_record(&big, &key, &limits).unwrap_err();
    assert!(err.to_string().contains("description"), "{err}");

    // A record over the byte limit is refused before it is even decoded.
    let generous = RecordLimits {
        max_record_bytes: 1 << 20,
        max_string_bytes: 1 << 20,
        ..limits
    };
    let bytes = sign_record(&big, &key, &generous).unwrap();
    assert_eq!(reason(&bytes, &peer(&key), None), "over_limit");
    let mut huge = big;
    huge.services[0].description = "x".repeat(100_000);
    let bytes = sign_record(&huge, &key, &generous).unwrap();
    assert_eq!(reason(&bytes, &peer(&key), None), "too_large");

    let mut many = record_for(&key, 1);
    many.services[0].tags = (0..100).map(|i| format!("t{i}")).collect();
    assert!(sign_record(&many, &key, &limits).is_err());
}

#[test]
fn garbage_is_malformed() {
    let someone = PeerId::random();
    assert_eq!(reason(b"", &someone, None), "malformed");
    assert_eq!(
        reason(b"definitely not an envelope", &someone, None),
        "malformed"
    );
}

#[test]
fn a_future_version_is_refused_by_name() {
    let key = Keypair::generate_ed25519();
    let mut record = record_for(&key, 1);
    record.version = RECORD_VERSION_PAGED + 1;
    // Signing checks contents, not the version: peers of a later release may write it.
    let bytes = sign_record(&record, &key, &RecordLimits::default()).unwrap();
    assert_eq!(reason(&bytes, &peer(&key), None), "unsupported_version");
}

#[test]
fn every_reason_has_a_distinct_label() {
    let labels = [
        RejectReason::TooLarge { size: 1, max: 0 }.as_str(),
        RejectReason::Malformed(String::new()).as_str(),
        RejectReason::BadSignature.as_str(),
        RejectReason::WrongSigner {
            claimed: String::new(),
            signer: String::new(),
        }
        .as_str(),
        RejectReason::UnsupportedVersion(2).as_str(),
        RejectReason::Expired {
            expires_at: 0,
            now: 1,
        }
        .as_str(),
        RejectReason::BadTtl {
            ttl_ms: 0,
            min_ms: 1,
            max_ms: 2,
        }
        .as_str(),
        RejectReason::StaleSequence { got: 1, held: 2 }.as_str(),
        RejectReason::FromTheFuture {
            issued_at: 2,
            now: 1,
            skew_ms: 0,
        }
        .as_str(),
        RejectReason::DuplicateService(String::new()).as_str(),
        RejectReason::OverLimit {
            field: "x",
            detail: String::new(),
        }
        .as_str(),
        RejectReason::BadPage {
            page: 1,
            pages: 1,
            max: MAX_RECORD_PAGES,
        }
        .as_str(),
    ];
    let unique: std::collections::HashSet<_> = labels.iter().collect();
    assert_eq!(unique.len(), labels.len());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let _ = verify_record(&bytes, &PeerId::random(), NOW, None, &RecordLimits::default());
    }

    #[test]
    fn mutated_records_never_panic_and_never_verify_changed(
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
    ) {
        let key = Keypair::generate_ed25519();
        let record = record_for(&key, 1);
        let bytes = sign_record(&record, &key, &RecordLimits::default()).unwrap();
        let mut mutated = bytes;
        for (at, x) in flips {
            let i = at % mutated.len();
            mutated[i] ^= x;
        }
        if let Ok(back) = verify_record(&mutated, &peer(&key), NOW, None, &RecordLimits::default()) {
            // Only a mutation that left the signed content intact may pass.
            prop_assert_eq!(back, record);
        }
    }
}

/// A record whose author's clock is 10 minutes slow, or 10 minutes fast:
/// refused when judged by our clock, accepted by the author's, held with
/// its times in ours; an estimate beyond an hour counts as an hour.
#[test]
fn a_record_is_judged_by_its_authors_clock_within_an_hour() {
    use ollamacron_service_registry::{MAX_CLOCK_OFFSET, RecordCache};
    let key = Keypair::generate_ed25519();
    let limits = RecordLimits::default();
    for offset_ms in [-600_000_i64, 600_000] {
        let mut record = record_for(&key, 1);
        record.issued_at = NOW.saturating_add_signed(offset_ms);
        record.expires_at = record.issued_at + TTL_MS;
        for service in &mut record.services {
            service.expires_at = record.expires_at;
        }
        let bytes = sign_record(&record, &key, &limits).unwrap();
        let expected = if offset_ms < 0 {
            "expired"
        } else {
            "from_the_future"
        };
        assert_eq!(reason(&bytes, &peer(&key), None), expected);

        let mut cache = RecordCache::new(16);
        cache
            .accept_by_author_clock(peer(&key), &bytes, NOW, &limits, None, |_| offset_ms)
            .unwrap();
        let held = &cache.get(&peer(&key)).unwrap().record;
        assert_eq!(held.issued_at, NOW, "moved into our clock");
        assert_eq!(held.expires_at, NOW + TTL_MS);
        assert!(held.services.iter().all(|s| s.expires_at == NOW + TTL_MS));
        // And it expires by our clock exactly when its lifetime is over.
        assert!(cache.expire(NOW + TTL_MS - 1).is_empty());
        assert_eq!(cache.expire(NOW + TTL_MS).len(), 1);
    }
    // Two hours ahead, the estimate saying so: judged an hour ahead at most.
    let two_hours_ms = 2 * u64::try_from(MAX_CLOCK_OFFSET.as_millis()).unwrap();
    let mut record = record_for(&key, 2);
    record.issued_at = NOW + two_hours_ms;
    record.expires_at = record.issued_at + TTL_MS;
    let bytes = sign_record(&record, &key, &limits).unwrap();
    let mut cache = RecordCache::new(16);
    let err = cache
        .accept_by_author_clock(peer(&key), &bytes, NOW, &limits, None, |_| {
            i64::try_from(two_hours_ms).unwrap()
        })
        .unwrap_err();
    assert_eq!(err.as_str(), "from_the_future", "{err}");
}
