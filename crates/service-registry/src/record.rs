//! The node record: every service of one node, versioned, sequenced, with
//! an expiry, postcard-encoded inside a libp2p signed envelope — in one
//! page (format version 1) or, for a node with more services than one
//! envelope holds, in up to [`MAX_RECORD_PAGES`] pages (format version 2).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::ops::Range;
use std::time::Duration;

use libp2p::PeerId;
use libp2p::core::SignedEnvelope;
use libp2p::identity::Keypair;
use serde::{Deserialize, Serialize};

use crate::service::{ServiceInfo, ServiceStatus};

/// Bytes a page may need beyond the envelope of the same page without
/// services and the postcard encodings of its services: the varints of the
/// payload length and the service count grow with them (at most 2 and 4
/// bytes for a page within 64 KiB and 2^28 services), and some signatures
/// vary in length (DER-encoded ECDSA by a few bytes).
const PAGE_MARGIN: usize = 24;

/// Version of the single-page record format: what a node writes when all
/// its services fit in one envelope, and all that nodes before record
/// pages read.
pub const RECORD_VERSION: u8 = 1;
/// Version of the paged record format: one page of a node's services, the
/// node's addresses written once per page instead of once per service.
pub const RECORD_VERSION_PAGED: u8 = 2;
/// Most pages one node's services may be split into.
pub const MAX_RECORD_PAGES: u16 = 16;
/// Domain-separation string of the envelope signature, so a node-record
/// signature can never be replayed as any other signed libp2p message.
pub const NODE_RECORD_DOMAIN: &str = "ollamacron-node-record";
/// How far ahead of the clock it is judged by a record's `issued_at` may
/// be: our clock when the record is checked as it stands, else our estimate
/// of its author's clock (see [`MAX_CLOCK_OFFSET`]), which is never behind
/// the record's own `issued_at` but may be a little off.
pub const MAX_CLOCK_SKEW: Duration = Duration::from_secs(60);
/// How far a record's author's clock may be estimated to be from ours,
/// either way, when its record is judged by the author's clock: a node
/// whose clock is 10 minutes off is still a member; a record dated more
/// than this (and [`MAX_CLOCK_SKEW`]) ahead of our clock is refused as
/// [`RejectReason::FromTheFuture`], and one older than its lifetime and
/// this as [`RejectReason::Expired`].
pub const MAX_CLOCK_OFFSET: Duration = Duration::from_secs(60 * 60);
/// Payload type of the envelope (the same for both format versions).
pub const NODE_RECORD_PAYLOAD_TYPE: &[u8] = b"/ollamacron/node-record/1";

/// Everything one node advertises — or, for a node split into pages, one
/// page of it. Times are Unix milliseconds.
///
/// This is the decoded form; the bytes on the wire are format version 1
/// or 2 (see the crate's README). [`Default`] is an empty record of format
/// [`RECORD_VERSION`], page 0 of 1.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRecord {
    /// Format version: [`RECORD_VERSION`] (one page) or
    /// [`RECORD_VERSION_PAGED`] (a page of several).
    pub version: u8,
    /// Base58 peer id of the node; must be the signer.
    pub peer_id: String,
    /// Grows with every change; an older one never replaces a newer one.
    /// Every page of one publication carries the same sequence.
    pub sequence: u64,
    /// When it was signed.
    pub issued_at: u64,
    /// When it lapses unless re-published.
    pub expires_at: u64,
    /// The node's region, if configured.
    pub region: Option<String>,
    /// The node's tags.
    pub node_tags: Vec<String>,
    /// Its services (of this page, for one page of several).
    pub services: Vec<ServiceInfo>,
    /// Which page this is, from 0; always 0 in format version 1.
    pub page: u16,
    /// How many pages the node's services are split into, at least 1 and
    /// at most [`MAX_RECORD_PAGES`]; always 1 in format version 1.
    pub pages: u16,
}

impl Default for NodeRecord {
    fn default() -> Self {
        Self {
            version: RECORD_VERSION,
            peer_id: String::new(),
            sequence: 0,
            issued_at: 0,
            expires_at: 0,
            region: None,
            node_tags: Vec::new(),
            services: Vec::new(),
            page: 0,
            pages: 1,
        }
    }
}

impl NodeRecord {
    /// Whether this record is one page of several (`pages > 1`).
    #[must_use]
    pub fn is_paged(&self) -> bool {
        self.pages > 1
    }

    /// The node's addresses as its services carry them (those of the first
    /// service; every service of a record made by
    /// [`LocalServices::next_record`](crate::LocalServices::next_record)
    /// carries the same). Empty for a record without services.
    #[must_use]
    pub fn node_addresses(&self) -> &[String] {
        self.services.first().map_or(&[], |s| &s.addresses)
    }
}

/// One signed page of a node's record, from [`sign_record_pages`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedPage {
    /// Its index, from 0.
    pub page: u16,
    /// How many pages the record has.
    pub pages: u16,
    /// The signed envelope.
    pub envelope: Vec<u8>,
}

/// Format version 1, the postcard layout of the record before pages: a
/// single page. Field order is the wire format; never reorder.
#[derive(Serialize, Deserialize)]
struct WireV1<'a> {
    version: u8,
    peer_id: Cow<'a, str>,
    sequence: u64,
    issued_at: u64,
    expires_at: u64,
    region: Option<Cow<'a, str>>,
    node_tags: Cow<'a, [String]>,
    services: Cow<'a, [ServiceInfo]>,
}

/// Format version 2: one page of a node's services, the node's addresses
/// once. Field order is the wire format; never reorder.
#[derive(Serialize, Deserialize)]
struct WireV2<'a> {
    version: u8,
    peer_id: Cow<'a, str>,
    sequence: u64,
    issued_at: u64,
    expires_at: u64,
    region: Option<Cow<'a, str>>,
    node_tags: Cow<'a, [String]>,
    addresses: Cow<'a, [String]>,
    page: u16,
    pages: u16,
    services: Cow<'a, [ServiceV2<'a>]>,
}

/// A service in format version 2: [`ServiceInfo`] without `peer_id`,
/// `addresses` and `expires_at`, which the page holds once for all its
/// services. Field order is the wire format; never reorder.
#[derive(Clone, Serialize, Deserialize)]
struct ServiceV2<'a> {
    id: Cow<'a, str>,
    name: Cow<'a, str>,
    service_type: Cow<'a, str>,
    version: Cow<'a, str>,
    description: Cow<'a, str>,
    port: Option<u16>,
    metadata: Cow<'a, BTreeMap<String, String>>,
    tags: Cow<'a, [String]>,
    status: ServiceStatus,
    health_check_url: Option<Cow<'a, str>>,
    last_health_check: Option<u64>,
    capabilities: Cow<'a, [String]>,
    protocols: Cow<'a, [String]>,
    latency_ms: Option<f64>,
    throughput: Option<f64>,
    reliability: Option<f64>,
    registered_at: u64,
    updated_at: u64,
}

impl<'a> From<&'a ServiceInfo> for ServiceV2<'a> {
    fn from(s: &'a ServiceInfo) -> Self {
        Self {
            id: Cow::Borrowed(&s.id),
            name: Cow::Borrowed(&s.name),
            service_type: Cow::Borrowed(&s.service_type),
            version: Cow::Borrowed(&s.version),
            description: Cow::Borrowed(&s.description),
            port: s.port,
            metadata: Cow::Borrowed(&s.metadata),
            tags: Cow::Borrowed(&s.tags),
            status: s.status,
            health_check_url: s.health_check_url.as_deref().map(Cow::Borrowed),
            last_health_check: s.last_health_check,
            capabilities: Cow::Borrowed(&s.capabilities),
            protocols: Cow::Borrowed(&s.protocols),
            latency_ms: s.latency_ms,
            throughput: s.throughput,
            reliability: s.reliability,
            registered_at: s.registered_at,
            updated_at: s.updated_at,
        }
    }
}

/// The service without its node's fields: `peer_id` and `addresses` empty,
/// `expires_at` zero, for the decoder to fill in from the page.
impl From<ServiceV2<'_>> for ServiceInfo {
    fn from(s: ServiceV2<'_>) -> Self {
        Self {
            id: s.id.into_owned(),
            name: s.name.into_owned(),
            service_type: s.service_type.into_owned(),
            version: s.version.into_owned(),
            description: s.description.into_owned(),
            peer_id: String::new(),
            addresses: Vec::new(),
            port: s.port,
            metadata: s.metadata.into_owned(),
            tags: s.tags.into_owned(),
            status: s.status,
            health_check_url: s.health_check_url.map(Cow::into_owned),
            last_health_check: s.last_health_check,
            capabilities: s.capabilities.into_owned(),
            protocols: s.protocols.into_owned(),
            latency_ms: s.latency_ms,
            throughput: s.throughput,
            reliability: s.reliability,
            registered_at: s.registered_at,
            updated_at: s.updated_at,
            expires_at: 0,
        }
    }
}

impl<'a> WireV1<'a> {
    fn of(record: &'a NodeRecord, version: u8) -> Self {
        Self {
            version,
            peer_id: Cow::Borrowed(&record.peer_id),
            sequence: record.sequence,
            issued_at: record.issued_at,
            expires_at: record.expires_at,
            region: record.region.as_deref().map(Cow::Borrowed),
            node_tags: Cow::Borrowed(&record.node_tags),
            services: Cow::Borrowed(&record.services),
        }
    }

    fn into_record(self) -> NodeRecord {
        NodeRecord {
            version: self.version,
            peer_id: self.peer_id.into_owned(),
            sequence: self.sequence,
            issued_at: self.issued_at,
            expires_at: self.expires_at,
            region: self.region.map(Cow::into_owned),
            node_tags: self.node_tags.into_owned(),
            services: self.services.into_owned(),
            page: 0,
            pages: 1,
        }
    }
}

impl<'a> WireV2<'a> {
    /// Page `page` of `pages` of `record`, holding `services`.
    fn of(
        record: &'a NodeRecord,
        addresses: &'a [String],
        page: u16,
        pages: u16,
        services: &'a [ServiceV2<'a>],
    ) -> Self {
        Self {
            version: RECORD_VERSION_PAGED,
            peer_id: Cow::Borrowed(&record.peer_id),
            sequence: record.sequence,
            issued_at: record.issued_at,
            expires_at: record.expires_at,
            region: record.region.as_deref().map(Cow::Borrowed),
            node_tags: Cow::Borrowed(&record.node_tags),
            addresses: Cow::Borrowed(addresses),
            page,
            pages,
            services: Cow::Borrowed(services),
        }
    }

    /// The page, every service given the page's peer id, addresses and expiry.
    fn into_record(self) -> NodeRecord {
        let peer_id = self.peer_id.into_owned();
        let addresses = self.addresses.into_owned();
        let expires_at = self.expires_at;
        let services = self
            .services
            .into_owned()
            .into_iter()
            .map(|s| ServiceInfo {
                peer_id: peer_id.clone(),
                addresses: addresses.clone(),
                expires_at,
                ..ServiceInfo::from(s)
            })
            .collect();
        NodeRecord {
            version: self.version,
            peer_id,
            sequence: self.sequence,
            issued_at: self.issued_at,
            expires_at,
            region: self.region.map(Cow::into_owned),
            node_tags: self.node_tags.into_owned(),
            services,
            page: self.page,
            pages: self.pages,
        }
    }
}

/// Bounds on a record, checked before anything is stored. With pages, each
/// bound applies to each page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordLimits {
    /// Largest encoded envelope (one page), in bytes.
    pub max_record_bytes: usize,
    /// Most services in one record (one page).
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

impl RecordLimits {
    /// Most services one node can advertise in pages:
    /// `max_services * MAX_RECORD_PAGES` (fewer when they are large: each
    /// page must also stay within `max_record_bytes`). The cap to give
    /// [`LocalServices::new`](crate::LocalServices::new).
    #[must_use]
    pub fn max_paged_services(&self) -> usize {
        self.max_services
            .saturating_mul(usize::from(MAX_RECORD_PAGES))
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
    #[error(
        "record version {0} is not supported (this node reads {RECORD_VERSION} and {RECORD_VERSION_PAGED})"
    )]
    UnsupportedVersion(u8),
    /// Past its expiry.
    #[error("record expired at {expires_at} (now {now} by the clock it is judged by)")]
    Expired {
        /// Its expiry.
        expires_at: u64,
        /// The time of the check, by the clock it is judged by (ours, or
        /// our estimate of its author's).
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
    #[error(
        "record issued at {issued_at}, more than {skew_ms} ms after now ({now} by the clock it is judged by)"
    )]
    FromTheFuture {
        /// Its issue time.
        issued_at: u64,
        /// The time of the check, by the clock it is judged by (ours, or
        /// our estimate of its author's, at most [`MAX_CLOCK_OFFSET`] ahead).
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
    /// Page fields that do not make sense: `pages` outside
    /// `1..=MAX_RECORD_PAGES`, `page` not below `pages`, a version-1 record
    /// other than page 0 of 1, or a page outside the page count its node
    /// signed for the same sequence.
    #[error("record page {page} of {pages} is invalid (pages must be 1..={max}, page below pages)")]
    BadPage {
        /// Its page index.
        page: u16,
        /// Its (or its node's) page count.
        pages: u16,
        /// [`MAX_RECORD_PAGES`].
        max: u16,
    },
}

impl RejectReason {
    /// Whether the bytes are invalid for every node, whatever its clock,
    /// its limits or what it holds (malformed, a bad signature or signer, a
    /// service twice): no
    /// honest node passes such a record on, since each verifies a record
    /// before it stores or forwards it, so the peer that handed it over is
    /// misbehaving. A record that is expired, from the future, stale, over a
    /// size limit, of another version, with a lifetime outside ours or a page
    /// that conflicts with one we hold may come from an honest node whose
    /// clock, configuration, version or view differs from ours.
    #[must_use]
    pub fn proves_misbehaviour(&self) -> bool {
        match self {
            Self::Malformed(_)
            | Self::BadSignature
            | Self::WrongSigner { .. }
            | Self::DuplicateService(_) => true,
            // A page may conflict with what we hold rather than be bad in
            // itself, and the lifetime range may be widened by a later
            // version.
            Self::BadPage { .. }
            | Self::BadTtl { .. }
            | Self::TooLarge { .. }
            | Self::UnsupportedVersion(_)
            | Self::Expired { .. }
            | Self::StaleSequence { .. }
            | Self::OverLimit { .. }
            | Self::FromTheFuture { .. } => false,
        }
    }

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
            Self::BadPage { .. } => "bad_page",
        }
    }
}

/// Why a record could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The record breaks the limits (it would be refused by every peer).
    #[error("record would be refused: {0}")]
    Invalid(#[from] RejectReason),
    /// A paged record (format version 2) holds one peer id, address list
    /// and expiry for all its services; this service has its own.
    #[error(
        "service {service:?} cannot go in a paged record: its {field} differs from the record's (a page holds one for all its services)"
    )]
    Unpageable {
        /// The service id.
        service: String,
        /// `peer_id`, `addresses` or `expires_at`.
        field: &'static str,
    },
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
/// The layout follows `record.version`: [`RECORD_VERSION_PAGED`] writes
/// format version 2 (every service must then carry the record's peer id and
/// expiry and the same addresses), any other version the version-1 layout
/// (which must be page 0 of 1). To split a node's services into pages, use
/// [`sign_record_pages`].
///
/// # Errors
/// [`RecordError`] when the record is over the limits, names another peer,
/// or cannot be encoded or signed.
pub fn sign_record(
    record: &NodeRecord,
    keypair: &Keypair,
    limits: &RecordLimits,
) -> Result<Vec<u8>, RecordError> {
    check_signer(record, keypair)?;
    check_contents(record, limits)?;
    let payload = if record.version == RECORD_VERSION_PAGED {
        let addresses = pageable_addresses(record)?;
        let services: Vec<ServiceV2<'_>> = record.services.iter().map(ServiceV2::from).collect();
        encode(&WireV2::of(
            record,
            addresses,
            record.page,
            record.pages,
            &services,
        ))?
    } else {
        encode(&WireV1::of(record, record.version))?
    };
    let bytes = sign_payload(payload, keypair)?;
    within_size(bytes, limits)
}

/// Sign all of a node's services as few pages as they fit in, each within
/// `limits` (at most `max_services` services and `max_record_bytes` bytes).
///
/// `record` holds every service of the node — possibly more than
/// `max_services` — in the order they are to be paged; its `version`,
/// `page` and `pages` are ignored. When everything fits in one envelope the
/// answer is one page in format version 1, byte for byte what
/// [`sign_record`] makes of the record as page 0 of 1, which nodes before
/// record pages read too. Otherwise the services are split greedily, in
/// order, into format-version-2 pages, which all share the record's
/// sequence, issue time and expiry; every service must then carry the
/// record's peer id and expiry and the same addresses (as those of
/// [`LocalServices::next_record`](crate::LocalServices::next_record) do).
///
/// Each service is encoded once to learn its size; pages are packed by
/// size against a measured envelope overhead plus a margin, and every
/// envelope is checked after signing (a page still too large is split
/// further).
///
/// # Errors
/// [`RecordError::Invalid`] with [`RejectReason::TooLarge`] when one
/// service alone does not fit in a page, with
/// [`RejectReason::OverLimit`] on field `pages` when more than
/// [`MAX_RECORD_PAGES`] pages would be needed, or with any reason
/// [`sign_record`] gives; [`RecordError::Unpageable`] for a service with a
/// peer id, addresses or expiry of its own.
pub fn sign_record_pages(
    record: &NodeRecord,
    keypair: &Keypair,
    limits: &RecordLimits,
) -> Result<Vec<SignedPage>, RecordError> {
    check_signer(record, keypair)?;
    check_node(record, limits, None)?;
    if record.services.len() <= limits.max_services {
        let single = sign_payload(encode(&WireV1::of(record, RECORD_VERSION))?, keypair)?;
        if single.len() <= limits.max_record_bytes {
            return Ok(vec![SignedPage {
                page: 0,
                pages: 1,
                envelope: single,
            }]);
        }
        if record.services.is_empty() {
            return Err(RejectReason::TooLarge {
                size: single.len(),
                max: limits.max_record_bytes,
            }
            .into());
        }
    }
    sign_paged(record, keypair, limits, PAGE_MARGIN)
}

/// The services of `record` in version-2 pages, packed against the
/// envelope of an empty page plus `margin` bytes.
fn sign_paged(
    record: &NodeRecord,
    keypair: &Keypair,
    limits: &RecordLimits,
    margin: usize,
) -> Result<Vec<SignedPage>, RecordError> {
    let addresses = pageable_addresses(record)?;
    let services: Vec<ServiceV2<'_>> = record.services.iter().map(ServiceV2::from).collect();
    let sign_page = |page: u16, pages: u16, range: Range<usize>| {
        let services = &services[range];
        let wire = WireV2::of(record, addresses, page, pages, services);
        sign_payload(encode(&wire)?, keypair)
    };
    if limits.max_services == 0 {
        return Err(RejectReason::OverLimit {
            field: "services",
            detail: format!("{} > 0", services.len()),
        }
        .into());
    }
    let overhead = sign_page(0, 1, 0..0)?.len() + margin;
    let budget = limits.max_record_bytes.saturating_sub(overhead);
    let mut ranges: Vec<Range<usize>> = Vec::new();
    let (mut start, mut bytes) = (0, 0usize);
    for (i, service) in services.iter().enumerate() {
        let size = postcard::experimental::serialized_size(service)
            .map_err(|e| RecordError::Encode(e.to_string()))?;
        if size > budget {
            // Maybe the margin is too cautious: measure this one alone.
            let alone = sign_page(0, 1, i..i + 1)?;
            if alone.len() > limits.max_record_bytes {
                return Err(RejectReason::TooLarge {
                    size: alone.len(),
                    max: limits.max_record_bytes,
                }
                .into());
            }
        }
        let fits = i - start < limits.max_services && bytes.saturating_add(size) <= budget;
        if i > start && !fits {
            ranges.push(start..i);
            (start, bytes) = (i, 0);
        }
        bytes = bytes.saturating_add(size);
    }
    ranges.push(start..services.len());
    loop {
        let pages = u16::try_from(ranges.len())
            .ok()
            .filter(|n| *n <= MAX_RECORD_PAGES)
            .ok_or_else(|| RejectReason::OverLimit {
                field: "pages",
                detail: format!(
                    "{} services need {} pages of at most {} services and {} bytes > {MAX_RECORD_PAGES}",
                    services.len(),
                    ranges.len(),
                    limits.max_services,
                    limits.max_record_bytes,
                ),
            })?;
        let mut signed = Vec::with_capacity(ranges.len());
        let mut split = Vec::with_capacity(ranges.len());
        let mut fit = true;
        for (page, range) in (0..pages).zip(&ranges) {
            let envelope = sign_page(page, pages, range.clone())?;
            if envelope.len() > limits.max_record_bytes {
                if range.len() == 1 {
                    return Err(RejectReason::TooLarge {
                        size: envelope.len(),
                        max: limits.max_record_bytes,
                    }
                    .into());
                }
                fit = false;
                let mid = range.start + range.len() / 2;
                split.extend([range.start..mid, mid..range.end]);
            } else {
                split.push(range.clone());
            }
            signed.push(SignedPage {
                page,
                pages,
                envelope,
            });
        }
        if fit {
            return Ok(signed);
        }
        ranges = split;
    }
}

/// Verify envelope `bytes` stored under `expected_peer`'s key: size,
/// decoding, signature, signer, version, expiry and lifetime at `now_ms`,
/// every field limit, page fields, and (when a record is held) that the
/// sequence is not older. Reads format versions 1 and 2; a version-1 record
/// is page 0 of 1, the services of a version-2 page get the page's peer id,
/// addresses and expiry. Never panics, whatever the bytes.
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
    verify_with(
        bytes,
        expected_peer,
        now_ms,
        limits,
        |_| 0,
        |record| match held_sequence {
            Some(held) if record.sequence < held => Err(RejectReason::StaleSequence {
                got: record.sequence,
                held,
            }),
            _ => Ok(()),
        },
    )
}

/// [`verify_record`], judging the record's times by its author's clock:
/// `author_offset_ms` says, given the decoded record whose signature
/// checked, how far (milliseconds, author's minus ours) its author's clock
/// is estimated to be from ours (clamped to [`MAX_CLOCK_OFFSET`] either
/// way); the record returned has its times (`issued_at`, `expires_at` and
/// its services' `expires_at`) moved into our clock by that much. `fresh`
/// decides whether the decoded, unexpired record may replace what is held
/// (before its contents are checked).
pub(crate) fn verify_with(
    bytes: &[u8],
    expected_peer: &PeerId,
    now_ms: u64,
    limits: &RecordLimits,
    author_offset_ms: impl FnOnce(&NodeRecord) -> i64,
    fresh: impl FnOnce(&NodeRecord) -> Result<(), RejectReason>,
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
    let record = decode(payload)?;
    if record.peer_id != signer.to_string() {
        return Err(RejectReason::WrongSigner {
            claimed: record.peer_id,
            signer: signer.to_string(),
        });
    }
    let offset_ms = clamp_clock_offset(author_offset_ms(&record));
    // Now by the author's clock, as estimated.
    let author_now = now_ms.saturating_add_signed(offset_ms);
    let skew_ms = millis(MAX_CLOCK_SKEW);
    if record.issued_at > author_now.saturating_add(skew_ms) {
        return Err(RejectReason::FromTheFuture {
            issued_at: record.issued_at,
            now: author_now,
            skew_ms,
        });
    }
    if record.expires_at <= author_now {
        return Err(RejectReason::Expired {
            expires_at: record.expires_at,
            now: author_now,
        });
    }
    fresh(&record)?;
    check_contents(&record, limits)?;
    let mut record = record;
    if offset_ms != 0 {
        let to_ours = offset_ms.saturating_neg();
        record.issued_at = record.issued_at.saturating_add_signed(to_ours);
        record.expires_at = record.expires_at.saturating_add_signed(to_ours);
        for service in &mut record.services {
            service.expires_at = service.expires_at.saturating_add_signed(to_ours);
        }
    }
    Ok(record)
}

/// `offset_ms` (an author's clock minus ours) bounded to
/// [`MAX_CLOCK_OFFSET`] either way, as a record is judged by it.
#[must_use]
pub fn clamp_clock_offset(offset_ms: i64) -> i64 {
    let max_ms = i64::try_from(millis(MAX_CLOCK_OFFSET)).unwrap_or(i64::MAX);
    offset_ms.clamp(-max_ms, max_ms)
}

/// The record in `payload`, by its first byte (the version, a postcard `u8`).
fn decode(payload: &[u8]) -> Result<NodeRecord, RejectReason> {
    let malformed = |e: postcard::Error| RejectReason::Malformed(e.to_string());
    match payload.first() {
        // Trailing bytes after a version-1 record were always ignored.
        Some(&RECORD_VERSION) => Ok(postcard::from_bytes::<WireV1<'_>>(payload)
            .map_err(malformed)?
            .into_record()),
        Some(&RECORD_VERSION_PAGED) => {
            let (wire, rest) =
                postcard::take_from_bytes::<WireV2<'_>>(payload).map_err(malformed)?;
            if !rest.is_empty() {
                return Err(RejectReason::Malformed(format!(
                    "{} bytes after the record",
                    rest.len()
                )));
            }
            Ok(wire.into_record())
        }
        Some(&other) => Err(RejectReason::UnsupportedVersion(other)),
        None => Err(RejectReason::Malformed("empty payload".to_owned())),
    }
}

fn encode(wire: &impl Serialize) -> Result<Vec<u8>, RecordError> {
    postcard::to_allocvec(wire).map_err(|e| RecordError::Encode(e.to_string()))
}

fn sign_payload(payload: Vec<u8>, keypair: &Keypair) -> Result<Vec<u8>, RecordError> {
    SignedEnvelope::new(
        keypair,
        NODE_RECORD_DOMAIN.to_owned(),
        NODE_RECORD_PAYLOAD_TYPE.to_vec(),
        payload,
    )
    .map(SignedEnvelope::into_protobuf_encoding)
    .map_err(|e| RecordError::Sign(e.to_string()))
}

fn within_size(bytes: Vec<u8>, limits: &RecordLimits) -> Result<Vec<u8>, RecordError> {
    if bytes.len() > limits.max_record_bytes {
        return Err(RejectReason::TooLarge {
            size: bytes.len(),
            max: limits.max_record_bytes,
        }
        .into());
    }
    Ok(bytes)
}

fn check_signer(record: &NodeRecord, keypair: &Keypair) -> Result<(), RecordError> {
    let signer = keypair.public().to_peer_id().to_string();
    if record.peer_id != signer {
        return Err(RejectReason::WrongSigner {
            claimed: record.peer_id.clone(),
            signer,
        }
        .into());
    }
    Ok(())
}

/// The addresses a paged record writes once for all its services; every
/// service must carry them, the record's peer id and its expiry.
fn pageable_addresses(record: &NodeRecord) -> Result<&[String], RecordError> {
    let addresses = record.node_addresses();
    for s in &record.services {
        let field = if s.peer_id != record.peer_id {
            "peer_id"
        } else if s.addresses != addresses {
            "addresses"
        } else if s.expires_at != record.expires_at {
            "expires_at"
        } else {
            continue;
        };
        return Err(RecordError::Unpageable {
            service: s.id.clone(),
            field,
        });
    }
    Ok(addresses)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Page fields, lifetime and every size bound, of one page.
fn check_contents(record: &NodeRecord, limits: &RecordLimits) -> Result<(), RejectReason> {
    let valid_page = if record.version == RECORD_VERSION {
        record.page == 0 && record.pages == 1
    } else {
        (1..=MAX_RECORD_PAGES).contains(&record.pages) && record.page < record.pages
    };
    if !valid_page {
        return Err(RejectReason::BadPage {
            page: record.page,
            pages: record.pages,
            max: MAX_RECORD_PAGES,
        });
    }
    check_node(record, limits, Some(limits.max_services))
}

/// Lifetime and every size bound but the page fields; the service count
/// against `max_services` when given. Service ids must be unique.
fn check_node(
    record: &NodeRecord,
    limits: &RecordLimits,
    max_services: Option<usize>,
) -> Result<(), RejectReason> {
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
    if let Some(max) = max_services
        && record.services.len() > max
    {
        return Err(over(
            "services",
            format!("{} > {max}", record.services.len()),
        ));
    }
    if let Some(region) = &record.region {
        string("region", region)?;
    }
    list("node_tags", record.node_tags.len())?;
    for tag in &record.node_tags {
        string("node_tags", tag)?;
    }
    let mut ids = HashSet::with_capacity(record.services.len());
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
        if !ids.insert(s.id.as_str()) {
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

    use super::*;

    /// `NodeRecord` as it was before pages: its derived postcard encoding
    /// is format version 1.
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct BeforePages {
        version: u8,
        peer_id: String,
        sequence: u64,
        issued_at: u64,
        expires_at: u64,
        region: Option<String>,
        node_tags: Vec<String>,
        services: Vec<ServiceInfo>,
    }

    fn record(key: &Keypair, services: usize) -> NodeRecord {
        let peer_id = key.public().to_peer_id().to_string();
        NodeRecord {
            peer_id: peer_id.clone(),
            sequence: 42,
            issued_at: 1_700_000_000_000,
            expires_at: 1_700_000_300_000,
            region: Some("eu".into()),
            node_tags: vec!["gpu".into()],
            services: (0..services)
                .map(|i| ServiceInfo {
                    id: format!("s{i}"),
                    service_type: "llm".into(),
                    peer_id: peer_id.clone(),
                    addresses: vec!["/ip4/192.0.2.1/tcp/1".into()],
                    expires_at: 1_700_000_300_000,
                    metadata: [("k".to_owned(), "v".to_owned())].into(),
                    latency_ms: Some(1.5),
                    ..ServiceInfo::default()
                })
                .collect(),
            ..NodeRecord::default()
        }
    }

    fn payload_of(envelope: &[u8]) -> Vec<u8> {
        let envelope = SignedEnvelope::from_protobuf_encoding(envelope).unwrap();
        let (payload, _) = envelope
            .payload_and_signing_key(NODE_RECORD_DOMAIN.to_owned(), NODE_RECORD_PAYLOAD_TYPE)
            .unwrap();
        payload.to_vec()
    }

    #[test]
    fn a_single_page_is_version_one_as_before_pages() {
        let key = Keypair::generate_ed25519();
        let limits = RecordLimits::default();
        let record = record(&key, 3);
        let pages = sign_record_pages(&record, &key, &limits).unwrap();
        assert_eq!(pages.len(), 1);
        assert_eq!(
            pages[0].envelope,
            sign_record(&record, &key, &limits).unwrap()
        );
        let payload = payload_of(&pages[0].envelope);
        // The golden check: the layout of the record before pages.
        let before = BeforePages {
            version: RECORD_VERSION,
            peer_id: record.peer_id.clone(),
            sequence: record.sequence,
            issued_at: record.issued_at,
            expires_at: record.expires_at,
            region: record.region.clone(),
            node_tags: record.node_tags.clone(),
            services: record.services.clone(),
        };
        assert_eq!(payload, postcard::to_allocvec(&before).unwrap());
        assert_eq!(
            postcard::from_bytes::<BeforePages>(&payload).unwrap(),
            before
        );
        let wire: WireV1<'_> = postcard::from_bytes(&payload).unwrap();
        assert_eq!(wire.version, RECORD_VERSION);
        assert_eq!(wire.into_record(), record);
    }

    #[test]
    fn the_payloads_of_an_empty_record_byte_by_byte() {
        let record = NodeRecord {
            peer_id: "p".into(),
            sequence: 300,
            issued_at: 1,
            expires_at: 2,
            ..NodeRecord::default()
        };
        // version, peer_id (length, bytes), sequence (varint 300 = ac 02),
        // issued_at, expires_at, region (None), node_tags (0 items),
        // services (0 items).
        assert_eq!(
            postcard::to_allocvec(&WireV1::of(&record, RECORD_VERSION)).unwrap(),
            [1, 1, b'p', 0xac, 0x02, 1, 2, 0, 0, 0]
        );
        // … then, in version 2, addresses (0 items), page, pages before
        // the services.
        assert_eq!(
            postcard::to_allocvec(&WireV2::of(&record, &[], 3, 4, &[])).unwrap(),
            [2, 1, b'p', 0xac, 0x02, 1, 2, 0, 0, 0, 3, 4, 0]
        );
    }

    #[test]
    fn a_version_two_service_leaves_out_the_node_fields() {
        let key = Keypair::generate_ed25519();
        let record = record(&key, 1);
        let service = &record.services[0];
        let v1 = postcard::to_allocvec(service).unwrap();
        let v2 = postcard::to_allocvec(&ServiceV2::from(service)).unwrap();
        let absent =
            postcard::to_allocvec(&(&service.peer_id, &service.addresses, service.expires_at))
                .unwrap();
        assert_eq!(v1.len(), v2.len() + absent.len());
        let back = ServiceInfo::from(postcard::from_bytes::<ServiceV2<'_>>(&v2).unwrap());
        assert_eq!(
            back,
            ServiceInfo {
                peer_id: String::new(),
                addresses: Vec::new(),
                expires_at: 0,
                ..service.clone()
            }
        );
    }

    #[test]
    fn a_page_over_the_limit_after_signing_is_split_further() {
        let key = Keypair::generate_ed25519();
        let peer = key.public().to_peer_id();
        let mut record = record(&key, 40);
        for (i, s) in record.services.iter_mut().enumerate() {
            s.id = format!("s{i:02}"); // all of one size
        }
        let services: Vec<ServiceV2<'_>> = record.services.iter().map(ServiceV2::from).collect();
        let addresses = record.node_addresses();
        let sign = |range: Range<usize>| {
            let wire = WireV2::of(&record, addresses, 0, 1, &services[range]);
            sign_payload(encode(&wire).unwrap(), &key).unwrap().len()
        };
        let empty = sign(0..0);
        let size = postcard::experimental::serialized_size(&services[0]).unwrap();
        // Without a margin, 16 services seem to fit exactly; the varints of
        // the payload length and the service count make them a little more.
        let limits = RecordLimits {
            max_record_bytes: empty + 16 * size,
            ..RecordLimits::default()
        };
        assert!(sign(0..16) > limits.max_record_bytes);
        let pages = sign_paged(&record, &key, &limits, 0).unwrap();
        // Packed 16 + 16 + 8, the first two split in halves.
        assert_eq!(pages.len(), 5);
        let mut back = Vec::new();
        for page in &pages {
            assert!(page.envelope.len() <= limits.max_record_bytes);
            assert_eq!(usize::from(page.pages), pages.len());
            let page =
                verify_record(&page.envelope, &peer, record.issued_at, None, &limits).unwrap();
            back.extend(page.services);
        }
        assert_eq!(back, record.services);
        // With the margin, the packing is right the first time.
        let packed = sign_paged(&record, &key, &limits, PAGE_MARGIN).unwrap();
        assert!(
            packed
                .iter()
                .all(|p| p.envelope.len() <= limits.max_record_bytes)
        );
    }

    #[test]
    fn trailing_bytes_after_a_version_two_page_are_malformed() {
        let key = Keypair::generate_ed25519();
        let record = NodeRecord {
            version: RECORD_VERSION_PAGED,
            ..record(&key, 2)
        };
        let services: Vec<ServiceV2<'_>> = record.services.iter().map(ServiceV2::from).collect();
        let mut payload = postcard::to_allocvec(&WireV2::of(
            &record,
            record.node_addresses(),
            0,
            1,
            &services,
        ))
        .unwrap();
        assert_eq!(decode(&payload).unwrap(), record);
        payload.push(0);
        assert!(matches!(decode(&payload), Err(RejectReason::Malformed(_))));
        assert!(matches!(decode(&[]), Err(RejectReason::Malformed(_))));
        assert_eq!(decode(&[7]), Err(RejectReason::UnsupportedVersion(7)));
    }
}
