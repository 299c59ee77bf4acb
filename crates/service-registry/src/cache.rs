//! The verified records of other nodes, page by page, and what changed
//! when one arrives.

use std::collections::{HashMap, HashSet, VecDeque};

use libp2p::PeerId;

use crate::record::{MAX_RECORD_PAGES, NodeRecord, RecordLimits, RejectReason, verify_with};
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

/// What [`RecordCache::accept`] did with a valid record page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// It replaced (or was the first) copy of its page of its node.
    Stored {
        /// Services added, updated and removed in the node's merged view
        /// by it — and, when the cache was full, the services of the node
        /// evicted to make room.
        changes: Vec<ServiceChange>,
    },
    /// The very page already held.
    Unchanged,
}

/// One verified page of a node's record, with the envelope it came in.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedPage {
    /// The decoded page (its services carry the node's peer id and
    /// addresses and the page's expiry), its times (`issued_at`,
    /// `expires_at`, its services' `expires_at`) in our clock when it was
    /// accepted by its author's
    /// ([`RecordCache::accept_by_author_clock`]); the envelope as signed.
    pub record: NodeRecord,
    /// The signed envelope, as received.
    pub envelope: Vec<u8>,
}

/// What the cache holds of one node: its verified pages and their merged
/// view.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedRecord {
    /// The node's merged view, as page 0 of 1: the services of every held
    /// page (one per id; a service listed by two held pages is taken from
    /// the page with the higher sequence); `version`, `sequence`,
    /// `issued_at`, `region`, `node_tags` and `pages` of page 0 when held,
    /// else of the newest held page; `expires_at` the earliest expiry of
    /// the held pages. For a node of one page, exactly that page.
    pub record: NodeRecord,
    /// The signed envelope of page 0 as received (of the lowest held page
    /// while page 0 is not held).
    pub envelope: Vec<u8>,
    /// Every held page, by page index; at most
    /// [`MAX_RECORD_PAGES`].
    pub pages: Vec<CachedPage>,
}

impl CachedRecord {
    /// `(page, sequence, envelope)` of every held page, by page index: what
    /// to serve to re-publish the node's record.
    pub fn page_envelopes(&self) -> impl Iterator<Item = (u16, u64, &[u8])> {
        self.pages
            .iter()
            .map(|p| (p.record.page, p.record.sequence, p.envelope.as_slice()))
    }

    /// The held page `page`.
    #[must_use]
    pub fn page(&self, page: u16) -> Option<&CachedPage> {
        self.pages.iter().find(|p| p.record.page == page)
    }

    /// The merged view of `pages` (sorted by page index); `None` if empty.
    fn from_pages(pages: Vec<CachedPage>) -> Option<Self> {
        let header = pages.iter().find(|p| p.record.page == 0).or_else(|| {
            // The newest; of equal sequences, the lowest page.
            pages.iter().rev().max_by_key(|p| p.record.sequence)
        })?;
        let mut winner: HashMap<&str, (u64, u16)> = HashMap::new();
        for p in &pages {
            let this = (p.record.sequence, p.record.page);
            for s in &p.record.services {
                winner
                    .entry(s.id.as_str())
                    .and_modify(|w| {
                        if this.0 > w.0 {
                            *w = this;
                        }
                    })
                    .or_insert(this);
            }
        }
        let services = pages
            .iter()
            .flat_map(|p| {
                let this = (p.record.sequence, p.record.page);
                let winner = &winner;
                p.record
                    .services
                    .iter()
                    .filter(move |s| winner.get(s.id.as_str()) == Some(&this))
            })
            .cloned()
            .collect();
        let expires_at = pages
            .iter()
            .map(|p| p.record.expires_at)
            .min()
            .unwrap_or(header.record.expires_at);
        let record = NodeRecord {
            version: header.record.version,
            peer_id: header.record.peer_id.clone(),
            sequence: header.record.sequence,
            issued_at: header.record.issued_at,
            expires_at,
            region: header.record.region.clone(),
            node_tags: header.record.node_tags.clone(),
            services,
            page: 0,
            pages: header.record.pages,
        };
        let envelope = pages.first()?.envelope.clone();
        Some(Self {
            record,
            envelope,
            pages,
        })
    }
}

/// The latest verified record pages of each known node, bounded in count
/// of nodes.
///
/// Every page enters through [`RecordCache::accept`], which verifies it
/// against the peer it is for and the sequence already held for that page;
/// nothing unverified is ever stored. A node's pages are held by index and
/// seen merged ([`CachedRecord::record`]).
///
/// The pages of one publication arrive one by one, in any order, so the
/// merged view is eventually consistent: a newer page replaces its older
/// copy, while the other pages stay as held until their newer copies
/// arrive. A page whose node signed, at a sequence at least as new, fewer
/// pages than its index (the node shrank) is dropped when that newer page
/// arrives, and refused when it arrives after it.
///
/// ```
/// use libp2p::identity::Keypair;
/// use ollamacron_service_registry::{
///     Accepted, ChangeKind, NodeRecord, RecordCache, RecordLimits, ServiceInfo, sign_record,
///     sign_record_pages,
/// };
///
/// let key = Keypair::generate_ed25519();
/// let peer = key.public().to_peer_id();
/// let now = 1_700_000_000_000;
/// let service = |id: String| ServiceInfo {
///     id,
///     service_type: "llm".into(),
///     peer_id: peer.to_string(),
///     expires_at: now + 300_000,
///     ..ServiceInfo::default()
/// };
/// let record = NodeRecord {
///     peer_id: peer.to_string(),
///     sequence: 1,
///     issued_at: now,
///     expires_at: now + 300_000,
///     services: vec![service("llama3".into())],
///     ..NodeRecord::default()
/// };
/// let limits = RecordLimits::default();
/// let bytes = sign_record(&record, &key, &limits)?;
///
/// let mut cache = RecordCache::new(1024);
/// let Accepted::Stored { changes } = cache.accept(peer, &bytes, now, &limits)? else { panic!() };
/// assert_eq!(changes[0].kind, ChangeKind::Added);
/// assert_eq!(cache.accept(peer, &bytes, now, &limits)?, Accepted::Unchanged);
///
/// // A node with 100 services publishes two pages; the cache merges them.
/// let big = NodeRecord {
///     sequence: 2,
///     services: (0..100).map(|i| service(format!("m{i}"))).collect(),
///     ..record
/// };
/// for page in sign_record_pages(&big, &key, &limits)?.iter().rev() {
///     cache.accept(peer, &page.envelope, now, &limits)?;
/// }
/// let held = cache.get(&peer).unwrap();
/// assert_eq!((held.pages.len(), held.record.services.len()), (2, 100));
/// // Past their expiry the pages and their services are gone.
/// assert_eq!(cache.expire(now + 300_000).len(), 100);
/// assert!(cache.is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct RecordCache {
    records: HashMap<PeerId, CachedRecord>,
    max_records: usize,
    /// Peers known to be alive (connected): their records make room last.
    live: HashSet<PeerId>,
    /// Records that made room, by owner: their sequence (of page 0), page
    /// count and expiry; at most [`MAX_EVICTED_REMEMBERED`] (or four times
    /// `max_records`), the oldest forgotten first.
    evicted: HashMap<PeerId, (u64, u16, u64)>,
    evicted_order: VecDeque<PeerId>,
}

/// How many evicted records a [`RecordCache`] remembers at least (a few
/// dozen bytes each), so that a flood of records from many identities is
/// not taken again from neighbours as soon as it made room.
pub const MAX_EVICTED_REMEMBERED: usize = 4096;

impl RecordCache {
    /// A cache of at most `max_records` nodes (at least one), each of at
    /// most [`MAX_RECORD_PAGES`] pages.
    #[must_use]
    pub fn new(max_records: usize) -> Self {
        Self {
            records: HashMap::new(),
            max_records: max_records.max(1),
            live: HashSet::new(),
            evicted: HashMap::new(),
            evicted_order: VecDeque::new(),
        }
    }

    /// Mark `peer` as known to be alive (connected to us) or not: when the
    /// cache is full, a live peer's record makes room only when every held
    /// record is a live peer's, so records of many identities nobody is
    /// connected to (one host can sign any number) never push out those of
    /// the peers we talk to. The caller bounds the set (its connections).
    pub fn set_live(&mut self, peer: PeerId, live: bool) {
        if live {
            self.live.insert(peer);
        } else {
            self.live.remove(&peer);
        }
    }

    /// The sequence of the record held for `peer`: of its page 0, or of
    /// its newest page while page 0 is not held.
    #[must_use]
    pub fn held_sequence(&self, peer: &PeerId) -> Option<u64> {
        self.records.get(peer).map(|c| c.record.sequence)
    }

    /// The sequence of page `page` held for `peer`.
    #[must_use]
    pub fn held_page_sequence(&self, peer: &PeerId, page: u16) -> Option<u64> {
        self.records
            .get(peer)
            .and_then(|c| c.page(page))
            .map(|p| p.record.sequence)
    }

    /// The record held for `peer`: its merged view and its pages.
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

    /// Verify `envelope` as a record page of `peer` at `now_ms` (see
    /// [`verify_record`](crate::verify_record)), against the sequence held
    /// for that page, and store it.
    ///
    /// A page older than the held copy of the same page is refused
    /// ([`RejectReason::StaleSequence`]); so is one whose index is at or
    /// above the page count of a newer held page of its node (the node
    /// shrank since), while one at or above the page count of a held page
    /// of the same sequence is [`RejectReason::BadPage`]. Storing a page
    /// with sequence `s` and page count `n` drops the held pages at index
    /// `n` or above with sequences up to `s`; held pages of older sequences
    /// below `n` stay until their newer copies arrive.
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
    /// sequence of a copy of the same page held elsewhere, such as the DHT
    /// store).
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
        self.accept_by_author_clock(peer, envelope, now_ms, limits, floor, |_| 0)
    }

    /// [`RecordCache::accept_at_least`], judging the page's times by its
    /// author's clock: `author_offset_ms` says, given the decoded page
    /// whose signature checked, how far (milliseconds, the author's minus
    /// ours) the author's clock is estimated to be from ours, at most
    /// [`MAX_CLOCK_OFFSET`](crate::MAX_CLOCK_OFFSET) either way. The page is
    /// held with its times moved into our clock by that much, so that
    /// [`RecordCache::expire`] and every reader of the held records compare
    /// them with our clock; the envelope is held as received.
    ///
    /// # Errors
    /// The [`RejectReason`]; the cache is then unchanged.
    pub fn accept_by_author_clock(
        &mut self,
        peer: PeerId,
        envelope: &[u8],
        now_ms: u64,
        limits: &RecordLimits,
        floor: Option<u64>,
        author_offset_ms: impl FnOnce(&NodeRecord) -> i64,
    ) -> Result<Accepted, RejectReason> {
        let held = self.records.get(&peer);
        if held.is_some_and(|h| h.pages.iter().any(|p| p.envelope == envelope)) {
            return Ok(Accepted::Unchanged);
        }
        let record = verify_with(envelope, &peer, now_ms, limits, author_offset_ms, |page| {
            fresh(held, page, floor)
        })?;
        let (mut pages, old) = match self.records.remove(&peer) {
            Some(c) => (c.pages, c.record.services),
            None => (Vec::new(), Vec::new()),
        };
        let is_new = pages.is_empty();
        let (index, sequence, count) = (record.page, record.sequence, record.pages);
        pages.retain(|p| {
            p.record.page != index && !(p.record.page >= count && p.record.sequence <= sequence)
        });
        let at = pages.partition_point(|p| p.record.page < index);
        pages.insert(
            at,
            CachedPage {
                record,
                envelope: envelope.to_vec(),
            },
        );
        let Some(merged) = CachedRecord::from_pages(pages) else {
            // Unreachable: the page just inserted is there.
            return Ok(Accepted::Stored {
                changes: diff(peer, &old, &[]),
            });
        };
        let mut changes = diff(peer, &old, &merged.record.services);
        if is_new && self.records.len() >= self.max_records {
            changes.extend(self.evict_soonest_expiring());
        }
        self.evicted.remove(&peer);
        self.records.insert(peer, merged);
        Ok(Accepted::Stored { changes })
    }

    /// Drop every page expired at `now_ms` (a node whose pages all expired
    /// is gone); returns the services that went — and, rarely, those
    /// updated because an older copy of them on another page is left.
    pub fn expire(&mut self, now_ms: u64) -> Vec<ServiceChange> {
        self.evicted
            .retain(|_, (_, _, expires_at)| *expires_at > now_ms);
        let expiring: Vec<PeerId> = self
            .records
            .iter()
            .filter(|(_, c)| c.record.expires_at <= now_ms)
            .map(|(p, _)| *p)
            .collect();
        let mut changes = Vec::new();
        for peer in expiring {
            let Some(held) = self.records.remove(&peer) else {
                continue;
            };
            let live: Vec<CachedPage> = held
                .pages
                .into_iter()
                .filter(|p| p.record.expires_at > now_ms)
                .collect();
            match CachedRecord::from_pages(live) {
                Some(merged) => {
                    changes.extend(diff(peer, &held.record.services, &merged.record.services));
                    self.records.insert(peer, merged);
                }
                None => changes.extend(diff(peer, &held.record.services, &[])),
            }
        }
        changes
    }

    /// Forget every page of `peer`; returns the services that went.
    pub fn remove(&mut self, peer: &PeerId) -> Vec<ServiceChange> {
        self.records
            .remove(peer)
            .map(|c| diff(*peer, &c.record.services, &[]))
            .unwrap_or_default()
    }

    /// Make room: the record closest to expiry of a peer not known to be
    /// alive, else of any; it is remembered as evicted.
    fn evict_soonest_expiring(&mut self) -> Vec<ServiceChange> {
        let soonest = self
            .records
            .iter()
            .min_by_key(|(p, c)| (self.live.contains(*p), c.record.expires_at))
            .map(|(p, c)| (*p, (c.record.sequence, c.record.pages, c.record.expires_at)));
        let Some((peer, evicted)) = soonest else {
            return Vec::new();
        };
        if self.evicted.insert(peer, evicted).is_none() {
            self.evicted_order.push_back(peer);
        }
        let remembered = MAX_EVICTED_REMEMBERED.max(self.max_records.saturating_mul(4));
        while self.evicted.len() > remembered {
            let Some(oldest) = self.evicted_order.pop_front() else {
                break;
            };
            self.evicted.remove(&oldest);
        }
        if self.evicted_order.len() > remembered.saturating_mul(2) {
            let evicted = &self.evicted;
            self.evicted_order.retain(|p| evicted.contains_key(p));
        }
        self.remove(&peer)
    }

    /// The records that made room for others and are not held again yet,
    /// unexpired: owner, sequence (of page 0) and page count. A cache
    /// smaller than the records of the mesh uses them to not take
    /// neighbours' copies of them again at once (which would evict
    /// others, to be taken again in turn, without end); a lookup that
    /// needs one still fetches it.
    pub fn evicted(&self) -> impl Iterator<Item = (&PeerId, u64, u16)> + '_ {
        self.evicted
            .iter()
            .map(|(p, (sequence, pages, _))| (p, *sequence, *pages))
    }

    /// The sequence of `peer`'s record when it made room for another (see
    /// [`RecordCache::evicted`]).
    #[must_use]
    pub fn evicted_sequence(&self, peer: &PeerId) -> Option<u64> {
        self.evicted.get(peer).map(|(sequence, _, _)| *sequence)
    }
}

/// Whether `page` may replace what is held of its node: not older than the
/// held copy of the same page or `floor`, and not outside the page count
/// of a held page at least as new.
fn fresh(
    held: Option<&CachedRecord>,
    page: &NodeRecord,
    floor: Option<u64>,
) -> Result<(), RejectReason> {
    let same = held
        .and_then(|h| h.page(page.page))
        .map(|p| p.record.sequence);
    if let Some(held) = same.max(floor)
        && page.sequence < held
    {
        return Err(RejectReason::StaleSequence {
            got: page.sequence,
            held,
        });
    }
    let others = held.map_or(&[][..], |h| &h.pages);
    for other in others.iter().filter(|o| o.record.page != page.page) {
        let o = &other.record;
        if o.pages <= page.page && o.sequence > page.sequence {
            return Err(RejectReason::StaleSequence {
                got: page.sequence,
                held: o.sequence,
            });
        }
        if o.pages <= page.page && o.sequence == page.sequence {
            return Err(RejectReason::BadPage {
                page: page.page,
                pages: o.pages,
                max: MAX_RECORD_PAGES,
            });
        }
    }
    Ok(())
}

/// The services added, updated and removed going from `old` to `new`:
/// first those of `new` (in its order) that are added or updated, then
/// those of `old` (in its order) that are gone.
#[must_use]
pub fn diff(peer: PeerId, old: &[ServiceInfo], new: &[ServiceInfo]) -> Vec<ServiceChange> {
    let change = |s: &ServiceInfo, kind| ServiceChange {
        peer,
        service_id: s.id.clone(),
        service_type: s.service_type.clone(),
        kind,
    };
    let mut old_by_id: HashMap<&str, &ServiceInfo> = HashMap::with_capacity(old.len());
    for o in old {
        old_by_id.entry(o.id.as_str()).or_insert(o);
    }
    let new_ids: HashSet<&str> = new.iter().map(|s| s.id.as_str()).collect();
    let mut changes = Vec::new();
    for s in new {
        match old_by_id.get(s.id.as_str()) {
            None => changes.push(change(s, ChangeKind::Added)),
            Some(o) if !same_service(o, s) => changes.push(change(s, ChangeKind::Updated)),
            Some(_) => {}
        }
    }
    for o in old {
        if !new_ids.contains(o.id.as_str()) {
            changes.push(change(o, ChangeKind::Removed));
        }
    }
    changes
}

/// Equal but for the timestamps every refresh moves (`updated_at`,
/// `expires_at`, `last_health_check`).
fn same_service(a: &ServiceInfo, b: &ServiceInfo) -> bool {
    // Destructured so that a new field cannot be forgotten here.
    let ServiceInfo {
        id,
        name,
        service_type,
        version,
        description,
        peer_id,
        addresses,
        port,
        metadata,
        tags,
        status,
        health_check_url,
        last_health_check: _,
        capabilities,
        protocols,
        latency_ms,
        throughput,
        reliability,
        registered_at,
        updated_at: _,
        expires_at: _,
    } = a;
    *id == b.id
        && *name == b.name
        && *service_type == b.service_type
        && *version == b.version
        && *description == b.description
        && *peer_id == b.peer_id
        && *addresses == b.addresses
        && *port == b.port
        && *metadata == b.metadata
        && *tags == b.tags
        && *status == b.status
        && *health_check_url == b.health_check_url
        && *capabilities == b.capabilities
        && *protocols == b.protocols
        && *latency_ms == b.latency_ms
        && *throughput == b.throughput
        && *reliability == b.reliability
        && *registered_at == b.registered_at
}
