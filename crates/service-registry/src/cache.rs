//! The verified records of other nodes, and what changed when one arrives.

use std::collections::HashMap;

use libp2p::PeerId;

use crate::record::{NodeRecord, RecordLimits, RejectReason, verify_record};
use crate::service::ServiceInfo;

/// How a service changed between two records of its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChangeKind {
    /// It is new.
    Added,
    /// It is still there, with other contents.
    Updated,
    /// It is gone (removed by its node, or its record expired).
    Removed,
}

/// One service that changed.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ServiceChange {
    /// The node serving it.
    pub peer: PeerId,
    /// The service id.
    pub service_id: String,
    /// Its type.
    pub service_type: String,
    /// What happened.
    pub kind: ChangeKind,
}

/// What [`RecordCache::accept`] did with a valid record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// It replaced (or was the first) record of its node.
    Stored {
        /// Services added, updated and removed by it — and, when the cache
        /// was full, the services of the node evicted to make room.
        changes: Vec<ServiceChange>,
    },
    /// The very record already held.
    Unchanged,
}

/// A verified record with the envelope it came in.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedRecord {
    /// The decoded record.
    pub record: NodeRecord,
    /// The signed envelope, as received.
    pub envelope: Vec<u8>,
}

/// The latest verified record of each known node, bounded in count.
///
/// Every record enters through [`RecordCache::accept`], which verifies it
/// against the peer it is for and the sequence already held; nothing
/// unverified is ever stored.
///
/// ```
/// use libp2p::identity::Keypair;
/// use ollamacron_service_registry::{
///     Accepted, ChangeKind, NodeRecord, RECORD_VERSION, RecordCache, RecordLimits, ServiceInfo,
///     sign_record,
/// };
///
/// let key = Keypair::generate_ed25519();
/// let peer = key.public().to_peer_id();
/// let now = 1_700_000_000_000;
/// let record = NodeRecord {
///     version: RECORD_VERSION,
///     peer_id: peer.to_string(),
///     sequence: 1,
///     issued_at: now,
///     expires_at: now + 300_000,
///     services: vec![ServiceInfo {
///         id: "llama3".into(),
///         service_type: "llm".into(),
///         peer_id: peer.to_string(),
///         ..ServiceInfo::default()
///     }],
///     ..NodeRecord::default()
/// };
/// let limits = RecordLimits::default();
/// let bytes = sign_record(&record, &key, &limits)?;
///
/// let mut cache = RecordCache::new(1024);
/// let Accepted::Stored { changes } = cache.accept(peer, &bytes, now, &limits)? else { panic!() };
/// assert_eq!(changes[0].kind, ChangeKind::Added);
/// assert_eq!(cache.accept(peer, &bytes, now, &limits)?, Accepted::Unchanged);
/// // Past its expiry the record and its services are gone.
/// assert_eq!(cache.expire(now + 300_000)[0].kind, ChangeKind::Removed);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct RecordCache {
    records: HashMap<PeerId, CachedRecord>,
    max_records: usize,
}

impl RecordCache {
    /// A cache of at most `max_records` nodes (at least one).
    #[must_use]
    pub fn new(max_records: usize) -> Self {
        Self {
            records: HashMap::new(),
            max_records: max_records.max(1),
        }
    }

    /// The sequence of the record held for `peer`.
    #[must_use]
    pub fn held_sequence(&self, peer: &PeerId) -> Option<u64> {
        self.records.get(peer).map(|c| c.record.sequence)
    }

    /// The record held for `peer`.
    #[must_use]
    pub fn get(&self, peer: &PeerId) -> Option<&CachedRecord> {
        self.records.get(peer)
    }

    /// Every held record.
    pub fn iter(&self) -> impl Iterator<Item = (&PeerId, &CachedRecord)> {
        self.records.iter()
    }

    /// Nodes held.
    #[must_use]
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether no record is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Verify `envelope` as the record of `peer` at `now_ms` (see
    /// [`verify_record`]), against the sequence held, and store it.
    ///
    /// # Errors
    /// The [`RejectReason`]; the cache is then unchanged.
    pub fn accept(
        &mut self,
        peer: PeerId,
        envelope: &[u8],
        now_ms: u64,
        limits: &RecordLimits,
    ) -> Result<Accepted, RejectReason> {
        self.accept_at_least(peer, envelope, now_ms, limits, None)
    }

    /// [`RecordCache::accept`], also refusing a sequence below `floor` (the
    /// sequence of a copy held elsewhere, such as the DHT store).
    ///
    /// # Errors
    /// The [`RejectReason`]; the cache is then unchanged.
    pub fn accept_at_least(
        &mut self,
        peer: PeerId,
        envelope: &[u8],
        now_ms: u64,
        limits: &RecordLimits,
        floor: Option<u64>,
    ) -> Result<Accepted, RejectReason> {
        let held = self.records.get(&peer);
        if held.is_some_and(|h| h.envelope == envelope) {
            return Ok(Accepted::Unchanged);
        }
        let held_sequence = held.map(|h| h.record.sequence).max(floor);
        let record = verify_record(envelope, &peer, now_ms, held_sequence, limits)?;
        let mut changes = diff(
            peer,
            held.map_or(&[][..], |h| &h.record.services),
            &record.services,
        );
        if held.is_none() && self.records.len() >= self.max_records {
            changes.extend(self.evict_soonest_expiring());
        }
        self.records.insert(
            peer,
            CachedRecord {
                record,
                envelope: envelope.to_vec(),
            },
        );
        Ok(Accepted::Stored { changes })
    }

    /// Drop every record expired at `now_ms`; returns the services that went.
    pub fn expire(&mut self, now_ms: u64) -> Vec<ServiceChange> {
        let expired: Vec<PeerId> = self
            .records
            .iter()
            .filter(|(_, c)| c.record.expires_at <= now_ms)
            .map(|(p, _)| *p)
            .collect();
        expired
            .into_iter()
            .flat_map(|peer| self.remove(&peer))
            .collect()
    }

    /// Forget `peer`'s record; returns the services that went.
    pub fn remove(&mut self, peer: &PeerId) -> Vec<ServiceChange> {
        self.records
            .remove(peer)
            .map(|c| diff(*peer, &c.record.services, &[]))
            .unwrap_or_default()
    }

    fn evict_soonest_expiring(&mut self) -> Vec<ServiceChange> {
        let soonest = self
            .records
            .iter()
            .min_by_key(|(_, c)| c.record.expires_at)
            .map(|(p, _)| *p);
        soonest.map(|peer| self.remove(&peer)).unwrap_or_default()
    }
}

/// The services added, updated and removed going from `old` to `new`.
#[must_use]
pub fn diff(peer: PeerId, old: &[ServiceInfo], new: &[ServiceInfo]) -> Vec<ServiceChange> {
    let change = |s: &ServiceInfo, kind| ServiceChange {
        peer,
        service_id: s.id.clone(),
        service_type: s.service_type.clone(),
        kind,
    };
    let mut changes = Vec::new();
    for s in new {
        match old.iter().find(|o| o.id == s.id) {
            None => changes.push(change(s, ChangeKind::Added)),
            Some(o) if !same_service(o, s) => changes.push(change(s, ChangeKind::Updated)),
            Some(_) => {}
        }
    }
    for o in old {
        if !new.iter().any(|s| s.id == o.id) {
            changes.push(change(o, ChangeKind::Removed));
        }
    }
    changes
}

/// Equal but for the timestamps every refresh moves.
fn same_service(a: &ServiceInfo, b: &ServiceInfo) -> bool {
    let strip = |s: &ServiceInfo| ServiceInfo {
        updated_at: 0,
        expires_at: 0,
        last_health_check: None,
        ..s.clone()
    };
    strip(a) == strip(b)
}
