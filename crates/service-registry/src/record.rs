//! The node record: every service of one node, versioned, sequenced, with
//! an expiry, postcard-encoded inside a libp2p signed envelope.

use std::time::Duration;

use libp2p::PeerId;
use libp2p::core::SignedEnvelope;
use libp2p::identity::Keypair;
use serde::{Deserialize, Serialize};

use crate::service::ServiceInfo;

/// Version of the record format this crate writes and reads.
pub const RECORD_VERSION: u8 = 1;
/// Domain-separation string of the envelope signature, so a node-record
/// signature can never be replayed as any other signed libp2p message.
pub const NODE_RECORD_DOMAIN: &str = "ollamacron-node-record";
/// How far ahead of our clock a record's `issued_at` may be: clocks of
/// honest nodes differ a little; a record dated further ahead would outlive
/// its TTL.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);
/// Payload type of the envelope.
pub const NODE_RECORD_PAYLOAD_TYPE: &[u8] = b"/ollamacron/node-record/1";

/// Everything one node advertises. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Format version, [`RECORD_VERSION`].
    pub version: u8,
    /// Base58 peer id of the node; must be the signer.
    pub peer_id: String,
    /// Grows with every change; an older one never replaces a newer one.
    pub sequence: u64,
    /// When it was signed.
    pub issued_at: u64,
    /// When it lapses unless re-published.
    pub expires_at: u64,
    /// The node's region, if configured.
    pub region: Option<String>,
    /// The node's tags.
    pub node_tags: Vec<String>,
    /// Its services.
    pub services: Vec<ServiceInfo>,
}

/// Bounds on a record, checked before anything is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordLimits {
    /// Largest encoded envelope, in bytes.
    pub max_record_bytes: usize,
    /// Most services in one record.
    pub max_services: usize,
    /// Longest string field, in bytes.
    pub max_string_bytes: usize,
    /// Most items in any list or map (tags, capabilities, metadata, …).
    pub max_list_items: usize,
    /// Shortest accepted lifetime (`expires_at - issued_at`).
    pub min_ttl: Duration,
    /// Longest accepted lifetime.
    pub max_ttl: Duration,
}

impl Default for RecordLimits {
    fn default() -> Self {
        Self {
            max_record_bytes: 64 * 1024,
            max_services: 64,
            max_string_bytes: 256,
            max_list_items: 32,
            min_ttl: Duration::from_secs(10),
            max_ttl: Duration::from_secs(3600),
        }
    }
}

/// Why a record was refused; [`RejectReason::as_str`] is its metrics label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RejectReason {
    /// Larger than `max_record_bytes`.
    #[error("record is {size} bytes, over the {max}-byte limit")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// Not a signed envelope, or its payload does not decode.
    #[error("record does not decode: {0}")]
    Malformed(String),
    /// The signature does not verify.
    #[error("record signature does not verify")]
    BadSignature,
    /// Signed by another peer than the one it names or is stored under.
    #[error("record for {claimed} is signed by {signer}")]
    WrongSigner {
        /// The peer the record (or its key) names.
        claimed: String,
        /// The peer whose key signed it.
        signer: String,
    },
    /// A format version this node does not read.
    #[error("record version {0} is not supported (this node reads {RECORD_VERSION})")]
    UnsupportedVersion(u8),
    /// Past its expiry.
    #[error("record expired at {expires_at} (now {now})")]
    Expired {
        /// Its expiry.
        expires_at: u64,
        /// The time of the check.
        now: u64,
    },
    /// Lifetime outside the accepted range.
    #[error("record lifetime of {ttl_ms} ms is outside {min_ms}..={max_ms} ms")]
    BadTtl {
        /// Its lifetime.
        ttl_ms: u64,
        /// Shortest accepted.
        min_ms: u64,
        /// Longest accepted.
        max_ms: u64,
    },
    /// Issued further in the future than clock skew explains.
    #[error("record issued at {issued_at}, more than {skew_ms} ms after now ({now})")]
    FromTheFuture {
        /// Its issue time.
        issued_at: u64,
        /// The time of the check.
        now: u64,
        /// The tolerated skew.
        skew_ms: u64,
    },
    /// Two services of the record share an id.
    #[error("record lists service id {0:?} twice")]
    DuplicateService(String),
    /// Older than the record already held.
    #[error("record sequence {got} is older than the held {held}")]
    StaleSequence {
        /// Its sequence.
        got: u64,
        /// The held record's sequence.
        held: u64,
    },
    /// A field over its limit.
    #[error("record field {field} is over its limit ({detail})")]
    OverLimit {
        /// Which field.
        field: &'static str,
        /// By how much.
        detail: String,
    },
}

impl RejectReason {
    /// Short label for metrics (`reason="bad_signature"`).
    #[must_use]
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::Malformed(_) => "malformed",
            Self::BadSignature => "bad_signature",
            Self::WrongSigner { .. } => "wrong_signer",
            Self::UnsupportedVersion(_) => "unsupported_version",
            Self::Expired { .. } => "expired",
            Self::BadTtl { .. } => "bad_ttl",
            Self::StaleSequence { .. } => "stale_sequence",
            Self::OverLimit { .. } => "over_limit",
            Self::FromTheFuture { .. } => "from_the_future",
            Self::DuplicateService(_) => "duplicate_service",
        }
    }
}

/// Why a record could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The record breaks the limits (it would be refused by every peer).
    #[error("record would be refused: {0}")]
    Invalid(#[from] RejectReason),
    /// Encoding failed.
    #[error("cannot encode record: {0}")]
    Encode(String),
    /// Signing failed.
    #[error("cannot sign record: {0}")]
    Sign(String),
}

/// Encode `record` with postcard, sign it into an envelope with `keypair`,
/// and return the envelope's bytes. The record must name the keypair's peer
/// and pass `limits`.
///
/// # Errors
/// [`RecordError`] when the record is over the limits, names another peer,
/// or cannot be encoded or signed.
pub fn sign_record(
    record: &NodeRecord,
    keypair: &Keypair,
    limits: &RecordLimits,
) -> Result<Vec<u8>, RecordError> {
    let signer = keypair.public().to_peer_id().to_string();
    if record.peer_id != signer {
        return Err(RejectReason::WrongSigner {
            claimed: record.peer_id.clone(),
            signer,
        }
        .into());
    }
    check_contents(record, limits)?;
    let payload = postcard::to_allocvec(record).map_err(|e| RecordError::Encode(e.to_string()))?;
    let envelope = SignedEnvelope::new(
        keypair,
        NODE_RECORD_DOMAIN.to_owned(),
        NODE_RECORD_PAYLOAD_TYPE.to_vec(),
        payload,
    )
    .map_err(|e| RecordError::Sign(e.to_string()))?;
    let bytes = envelope.into_protobuf_encoding();
    if bytes.len() > limits.max_record_bytes {
        return Err(RejectReason::TooLarge {
            size: bytes.len(),
            max: limits.max_record_bytes,
        }
        .into());
    }
    Ok(bytes)
}

/// Verify envelope `bytes` stored under `expected_peer`'s key: size,
/// decoding, signature, signer, version, expiry and lifetime at `now_ms`,
/// every field limit, and (when a record is held) that the sequence is not
/// older. Never panics, whatever the bytes.
///
/// # Errors
/// The first [`RejectReason`] that applies.
pub fn verify_record(
    bytes: &[u8],
    expected_peer: &PeerId,
    now_ms: u64,
    held_sequence: Option<u64>,
    limits: &RecordLimits,
) -> Result<NodeRecord, RejectReason> {
    if bytes.len() > limits.max_record_bytes {
        return Err(RejectReason::TooLarge {
            size: bytes.len(),
            max: limits.max_record_bytes,
        });
    }
    let envelope = SignedEnvelope::from_protobuf_encoding(bytes)
        .map_err(|e| RejectReason::Malformed(e.to_string()))?;
    let (payload, key) = envelope
        .payload_and_signing_key(NODE_RECORD_DOMAIN.to_owned(), NODE_RECORD_PAYLOAD_TYPE)
        .map_err(|e| match e {
            libp2p::core::signed_envelope::ReadPayloadError::InvalidSignature => {
                RejectReason::BadSignature
            }
            other => RejectReason::Malformed(other.to_string()),
        })?;
    let signer = key.to_peer_id();
    if signer != *expected_peer {
        return Err(RejectReason::WrongSigner {
            claimed: expected_peer.to_string(),
            signer: signer.to_string(),
        });
    }
    let record: NodeRecord =
        postcard::from_bytes(payload).map_err(|e| RejectReason::Malformed(e.to_string()))?;
    if record.version != RECORD_VERSION {
        return Err(RejectReason::UnsupportedVersion(record.version));
    }
    if record.peer_id != signer.to_string() {
        return Err(RejectReason::WrongSigner {
            claimed: record.peer_id,
            signer: signer.to_string(),
        });
    }
    let skew_ms = millis(MAX_CLOCK_SKEW);
    if record.issued_at > now_ms.saturating_add(skew_ms) {
        return Err(RejectReason::FromTheFuture {
            issued_at: record.issued_at,
            now: now_ms,
            skew_ms,
        });
    }
    if record.expires_at <= now_ms {
        return Err(RejectReason::Expired {
            expires_at: record.expires_at,
            now: now_ms,
        });
    }
    if let Some(held) = held_sequence
        && record.sequence < held
    {
        return Err(RejectReason::StaleSequence {
            got: record.sequence,
            held,
        });
    }
    check_contents(&record, limits)?;
    Ok(record)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Lifetime and every size bound.
fn check_contents(record: &NodeRecord, limits: &RecordLimits) -> Result<(), RejectReason> {
    let ttl_ms = record.expires_at.saturating_sub(record.issued_at);
    let (min_ms, max_ms) = (millis(limits.min_ttl), millis(limits.max_ttl));
    if !(min_ms..=max_ms).contains(&ttl_ms) {
        return Err(RejectReason::BadTtl {
            ttl_ms,
            min_ms,
            max_ms,
        });
    }
    let over = |field: &'static str, detail: String| RejectReason::OverLimit { field, detail };
    let string = |field: &'static str, value: &str| {
        if value.len() > limits.max_string_bytes {
            Err(over(
                field,
                format!("{} bytes > {}", value.len(), limits.max_string_bytes),
            ))
        } else {
            Ok(())
        }
    };
    let list = |field: &'static str, len: usize| {
        if len > limits.max_list_items {
            Err(over(
                field,
                format!("{len} items > {}", limits.max_list_items),
            ))
        } else {
            Ok(())
        }
    };
    if record.services.len() > limits.max_services {
        return Err(over(
            "services",
            format!("{} > {}", record.services.len(), limits.max_services),
        ));
    }
    if let Some(region) = &record.region {
        string("region", region)?;
    }
    list("node_tags", record.node_tags.len())?;
    for tag in &record.node_tags {
        string("node_tags", tag)?;
    }
    for s in &record.services {
        for (field, value) in [
            ("id", &s.id),
            ("name", &s.name),
            ("type", &s.service_type),
            ("version", &s.version),
            ("description", &s.description),
            ("peer_id", &s.peer_id),
        ] {
            string(field, value)?;
        }
        if let Some(url) = &s.health_check_url {
            string("health_check_url", url)?;
        }
        for (field, items) in [
            ("addresses", &s.addresses),
            ("tags", &s.tags),
            ("capabilities", &s.capabilities),
            ("protocols", &s.protocols),
        ] {
            list(field, items.len())?;
            for item in items {
                string(field, item)?;
            }
        }
        list("metadata", s.metadata.len())?;
        for (k, v) in &s.metadata {
            string("metadata", k)?;
            string("metadata", v)?;
        }
        if record.services.iter().filter(|o| o.id == s.id).count() > 1 {
            return Err(RejectReason::DuplicateService(s.id.clone()));
        }
        if s.id.is_empty() {
            return Err(over("id", "empty".to_owned()));
        }
        if s.peer_id != record.peer_id {
            return Err(RejectReason::WrongSigner {
                claimed: s.peer_id.clone(),
                signer: record.peer_id.clone(),
            });
        }
    }
    Ok(())
}
