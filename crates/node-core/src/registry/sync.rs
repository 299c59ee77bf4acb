//! Record sync between neighbours, `/ollamacron/records/1.0.0`: how node
//! records spread without a DHT walk per provider.
//!
//! - **Pull** (anti-entropy): a node sends a neighbour the list of records
//!   it holds — owner, page and sequence of each, no contents — and gets
//!   back the records the neighbour holds that are missing from the list or
//!   newer, up to a byte budget (`more` says ask again). A node pulls from
//!   its first neighbours when it joins, from one random neighbour every
//!   [`SYNC_INTERVAL`], and from a neighbour whose list shows records it
//!   lacks.
//! - **Catch-up**: every [`CATCH_UP_INTERVAL`] (doubling up to 30 s while
//!   catch-ups find nothing) a node sends one random
//!   neighbour a Bloom filter of the records it holds (10 bits a record)
//!   and gets back those the filter does not hold: nothing when the two
//!   agree, so the records a push missed arrive within seconds at little
//!   cost. Each filter is salted afresh, so a record a false positive hid
//!   from one catch-up is not hidden from the next.
//! - **Push**: our own record, whenever it changes, goes to every
//!   neighbour at once; a record that is new to us is offered, batched, to
//!   [`PUSH_FANOUT`] random neighbours (owner, page and sequence only) and
//!   pushed to those that want it (an epidemic: every node has it after
//!   about log(N) steps, and receives one copy of it, not one per
//!   neighbour that passes it on; pulls repair what a push missed).
//!
//! Every record is verified like any other before it is stored or passed
//! on. The owner, page and sequence sent beside a record are unverified
//! hints, used only to skip what we already hold (cheaply, before any
//! signature check); a lying hint can make us skip a record, never accept
//! one.

use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::time::{Duration, Instant};

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::request_response::{self, OutboundRequestId, ProtocolSupport, ResponseChannel};
use libp2p::{PeerId, StreamProtocol};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::clock::Delivery;
use super::{Behaviour, unix_ms};
use crate::event::RecordVia;
use ollamacron_service_registry::RejectReason;

/// The record sync protocol (wire contract).
pub const SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/ollamacron/records/1.0.0");
/// Largest sync message read, in bytes (its 4-byte length prefix excluded).
const MAX_SYNC_MESSAGE_BYTES: usize = 2 * 1024 * 1024;
/// Record bytes one pull answer carries at most; the rest is `more`.
const MAX_ANSWER_RECORD_BYTES: usize = 1024 * 1024;
/// Most entries in a pull's list of held records.
const MAX_DIGEST_ENTRIES: usize = 16 * 1024;
/// Neighbours each batch of newly learned records is passed on to.
pub(super) const PUSH_FANOUT: usize = 6;
/// Newly learned records wait this long to be passed on in one batch.
const PUSH_BATCH_DELAY: Duration = Duration::from_millis(2);
/// Pushes of ours one neighbour may have unanswered at once.
const MAX_PUSHES_IN_FLIGHT: usize = 2;
/// Most records waiting to be passed on (older ones are left to pulls).
const MAX_OUTBOX_RECORDS: usize = 4096;
/// Neighbours a joining node pulls from (one after the other).
const JOIN_PULLS: usize = 2;
/// How often a node pulls from one random neighbour.
pub(super) const SYNC_INTERVAL: Duration = Duration::from_secs(300);
/// Longest a sync request may take. A request costs two round trips at
/// least (stream negotiation, then the answer), and a loaded peer's round
/// trips reach 6–13 s (1000 simulated nodes on two cores): with 10 s every
/// request to such a peer failed, and a node whose only neighbours they
/// were held nothing but its own record.
const SYNC_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How often (at the shortest) a node sends one random neighbour a filter
/// of what it holds, to get back what the filter lacks.
pub(super) const CATCH_UP_INTERVAL: Duration = Duration::from_secs(1);
/// The longest pause between catch-ups while they find nothing.
const MAX_CATCH_UP_INTERVAL: Duration = Duration::from_secs(30);
/// Sync streams one connection may have open at once.
const MAX_SYNC_STREAMS: usize = 8;

/// One record a node holds, without its contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RecordRef {
    /// The owner's peer id (its bytes).
    owner: Vec<u8>,
    /// The page of the owner's record.
    page: u16,
    /// The page's sequence.
    sequence: u64,
}

/// A record with its (unverified) owner, page and sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SyncedRecord {
    owner: Vec<u8>,
    page: u16,
    sequence: u64,
    /// The signed envelope.
    envelope: Vec<u8>,
}

/// A sync request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum SyncRequest {
    /// "These are the records I hold: send me what I lack."
    Pull(Vec<RecordRef>),
    /// "These records are new to me; perhaps to you too."
    Push(Vec<SyncedRecord>),
    /// "These records are new to me: which do you lack?" (answered with
    /// [`SyncResponse::Want`], then pushed).
    Offer(Vec<RecordRef>),
    /// "Send me what this filter of the records I hold does not hold."
    Missing(RecordFilter),
}

/// A Bloom filter of records (owner, page, sequence): bit `i` of byte
/// `i / 8` (least significant first) set for each of `hashes` indices
/// `(h1 + j * h2) mod (8 * bits.len())`, `j` from 0, where `h1` and `h2`
/// are the first two big-endian u32s of the SHA-256 of the salt (8 bytes,
/// big-endian), the owner's peer id bytes, the page (2 bytes) and the
/// sequence (8 bytes, both big-endian).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RecordFilter {
    salt: u64,
    hashes: u8,
    bits: Vec<u8>,
}

/// Filter bits per record: about 1% false positives with 7 hashes.
const FILTER_BITS_PER_RECORD: usize = 10;
/// Hashes per record in a filter.
const FILTER_HASHES: u8 = 7;
/// Most hashes per record accepted in a peer's filter.
const MAX_FILTER_HASHES: u8 = 16;

impl RecordFilter {
    fn indices(&self, owner: &[u8], page: u16, sequence: u64) -> impl Iterator<Item = usize> {
        use sha2::Digest;
        let mut hasher = sha2::Sha256::new();
        hasher.update(self.salt.to_be_bytes());
        hasher.update(owner);
        hasher.update(page.to_be_bytes());
        hasher.update(sequence.to_be_bytes());
        let digest = hasher.finalize();
        let h1 = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        let h2 = u32::from_be_bytes([digest[4], digest[5], digest[6], digest[7]]);
        let m = self.bits.len().saturating_mul(8).max(1);
        (0..u32::from(self.hashes)).map(move |j| {
            let at = u64::from(h1).wrapping_add(u64::from(j).wrapping_mul(u64::from(h2)));
            usize::try_from(at % m as u64).unwrap_or(0)
        })
    }

    /// A filter of `records`, salted with `salt`.
    fn of<'a>(records: impl Iterator<Item = (&'a [u8], u16, u64)> + Clone, salt: u64) -> Self {
        let count = records.clone().count();
        let bytes = count
            .saturating_mul(FILTER_BITS_PER_RECORD)
            .div_ceil(8)
            .max(8);
        let mut filter = Self {
            salt,
            hashes: FILTER_HASHES,
            bits: vec![0; bytes],
        };
        for (owner, page, sequence) in records {
            let indices: Vec<usize> = filter.indices(owner, page, sequence).collect();
            for i in indices {
                filter.bits[i / 8] |= 1 << (i % 8);
            }
        }
        filter
    }

    fn contains(&self, owner: &[u8], page: u16, sequence: u64) -> bool {
        !self.bits.is_empty()
            && self
                .indices(owner, page, sequence)
                .all(|i| self.bits[i / 8] & (1 << (i % 8)) != 0)
    }
}

/// A sync answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum SyncResponse {
    /// The records the puller lacks; `more` when the budget ran out.
    Records {
        records: Vec<SyncedRecord>,
        more: bool,
    },
    /// A push was taken.
    Taken,
    /// The offered records the peer lacks, by their index in the offer.
    Want(Vec<u32>),
}

/// Postcard messages behind a 4-byte big-endian length.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SyncCodec;

async fn read_message<T, M>(io: &mut T) -> io::Result<M>
where
    T: AsyncRead + Unpin + Send,
    M: for<'de> Deserialize<'de>,
{
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await?;
    let len = usize::try_from(u32::from_be_bytes(len)).unwrap_or(usize::MAX);
    if len > MAX_SYNC_MESSAGE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("sync message of {len} bytes, over the {MAX_SYNC_MESSAGE_BYTES}-byte limit"),
        ));
    }
    let mut bytes = vec![0; len];
    io.read_exact(&mut bytes).await?;
    postcard::from_bytes(&bytes).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("sync message does not decode: {e}"),
        )
    })
}

async fn write_message<T, M>(io: &mut T, message: &M) -> io::Result<()>
where
    T: AsyncWrite + Unpin + Send,
    M: Serialize,
{
    let bytes = postcard::to_allocvec(message)
        .map_err(|e| io::Error::other(format!("cannot encode a sync message: {e}")))?;
    if bytes.len() > MAX_SYNC_MESSAGE_BYTES {
        return Err(io::Error::other(format!(
            "sync message of {} bytes, over the {MAX_SYNC_MESSAGE_BYTES}-byte limit",
            bytes.len()
        )));
    }
    let len = u32::try_from(bytes.len()).map_err(io::Error::other)?;
    io.write_all(&len.to_be_bytes()).await?;
    io.write_all(&bytes).await?;
    io.close().await
}

impl request_response::Codec for SyncCodec {
    type Protocol = StreamProtocol;
    type Request = SyncRequest;
    type Response = SyncResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<SyncRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io).await
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<SyncResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        read_message(io).await
    }

    async fn write_request<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        request: SyncRequest,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_message(io, &request).await
    }

    async fn write_response<T>(
        &mut self,
        _: &StreamProtocol,
        io: &mut T,
        response: SyncResponse,
    ) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        write_message(io, &response).await
    }
}

/// The request-response behaviour that carries sync messages.
pub(crate) fn behaviour() -> request_response::Behaviour<SyncCodec> {
    request_response::Behaviour::with_codec(
        SyncCodec,
        [(SYNC_PROTOCOL, ProtocolSupport::Full)],
        request_response::Config::default()
            .with_request_timeout(SYNC_REQUEST_TIMEOUT)
            .with_max_concurrent_streams(MAX_SYNC_STREAMS),
    )
}

/// The sync state of the registry.
#[derive(Debug, Default)]
pub(super) struct SyncState {
    /// Connected peers that speak the sync protocol.
    pub(super) peers: HashSet<PeerId>,
    /// Neighbours that have the current version of our record.
    pushed: HashSet<PeerId>,
    /// The pull in flight (one at a time: each pull's list includes what
    /// the previous one brought).
    pull: Option<(OutboundRequestId, PeerId)>,
    /// Pulls waiting their turn.
    pull_queue: VecDeque<PeerId>,
    /// Join pulls started so far.
    join_pulls: usize,
    /// Records new to us, to pass on.
    outbox: Vec<SyncedRecord>,
    outbox_due: Option<Instant>,
    /// The batch waits for a neighbour with room.
    outbox_waits: bool,
    /// Our pushes in flight, and how many each neighbour has.
    pushes: HashMap<OutboundRequestId, PeerId>,
    pushes_to: HashMap<PeerId, usize>,
    /// Which of those carry our own record.
    own_pushes: HashSet<OutboundRequestId>,
    /// Our offers in flight, with the records they offer.
    offers: HashMap<OutboundRequestId, Vec<SyncedRecord>>,
    /// The catch-up in flight.
    catch_up: Option<(OutboundRequestId, PeerId)>,
    /// When the next catch-up is due, and the pause after it: doubled
    /// (up to [`MAX_CATCH_UP_INTERVAL`]) each time a catch-up finds
    /// nothing, back to [`CATCH_UP_INTERVAL`] when it finds something.
    catch_up_at: Option<Instant>,
    catch_up_every: Duration,
}

impl SyncState {
    /// When the next batch of records is due to go out.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.outbox_due
    }
}

fn peer_of(bytes: &[u8]) -> Option<PeerId> {
    PeerId::from_bytes(bytes).ok()
}

impl Behaviour {
    /// A peer connected (or identify said it speaks the sync protocol): it
    /// gets our record, and a joining node pulls from it.
    pub(super) fn on_sync_peer(&mut self, peer: PeerId) {
        if !self.sync.peers.insert(peer) {
            return;
        }
        self.push_own_record_to([peer]);
        if self.sync.join_pulls < JOIN_PULLS {
            self.sync.join_pulls += 1;
            self.queue_pull(peer);
        }
    }

    /// The last connection to `peer` closed.
    pub(super) fn on_sync_peer_gone(&mut self, peer: &PeerId) {
        self.sync.peers.remove(peer);
        self.sync.pushes_to.remove(peer);
        let gone: Vec<OutboundRequestId> = self
            .sync
            .pushes
            .iter()
            .filter(|(_, p)| *p == peer)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            self.sync.pushes.remove(&id);
            self.sync.own_pushes.remove(&id);
            self.sync.offers.remove(&id);
        }
        self.sync.pushed.remove(peer);
        self.sync.pull_queue.retain(|p| p != peer);
    }

    /// Our record changed: every neighbour gets the new one.
    pub(super) fn push_own_record_to_all(&mut self) {
        self.sync.pushed.clear();
        let peers: Vec<PeerId> = self.sync.peers.iter().copied().collect();
        self.push_own_record_to(peers);
    }

    fn push_own_record_to(&mut self, peers: impl IntoIterator<Item = PeerId>) {
        let Some(own) = &self.own else {
            return;
        };
        let owner = self.local_peer.to_bytes();
        let records: Vec<SyncedRecord> = own
            .pages
            .iter()
            .map(|page| SyncedRecord {
                owner: owner.clone(),
                page: page.page,
                sequence: own.sequence,
                envelope: page.envelope.clone(),
            })
            .collect();
        for peer in peers {
            // Always sent (our own record is never held back), counted.
            if self.sync.peers.contains(&peer) && self.sync.pushed.insert(peer) {
                let id = self.send_push(peer, records.clone());
                self.sync.own_pushes.insert(id);
            }
        }
    }

    /// Every page we hold, ours first: owner, page, sequence, envelope.
    fn held_pages(&self) -> impl Iterator<Item = (PeerId, u16, u64, &[u8])> {
        let now = unix_ms();
        let own = self.own.iter().flat_map(move |own| {
            own.pages
                .iter()
                .map(move |p| (self.local_peer, p.page, own.sequence, p.envelope.as_slice()))
        });
        let cached = self
            .cache
            .iter()
            .filter(move |(_, c)| c.record.expires_at > now)
            .flat_map(|(peer, c)| {
                c.page_envelopes()
                    .map(move |(page, sequence, envelope)| (*peer, page, sequence, envelope))
            });
        own.chain(cached)
    }

    fn queue_pull(&mut self, peer: PeerId) {
        let busy = self.sync.pull.is_some_and(|(_, p)| p == peer);
        if !busy && !self.sync.pull_queue.contains(&peer) {
            self.sync.pull_queue.push_back(peer);
        }
        self.pull_next();
    }

    fn pull_next(&mut self) {
        while self.sync.pull.is_none() {
            let Some(peer) = self.sync.pull_queue.pop_front() else {
                return;
            };
            if !self.sync.peers.contains(&peer) {
                continue;
            }
            let list = self.held_records();
            let id = self.inner.sync.send_request(&peer, SyncRequest::Pull(list));
            self.sync.pull = Some((id, peer));
        }
    }

    /// Every catch-up tick: send one random neighbour a filter of what we
    /// hold; it answers with what the filter lacks.
    pub(super) fn on_catch_up_tick(&mut self) {
        if self.sync.catch_up.is_some()
            || self.sync.catch_up_at.is_some_and(|at| at > Instant::now())
        {
            return;
        }
        let Some(peer) = self.random_sync_peer() else {
            return;
        };
        let mut held = self.held_records();
        held.extend(self.evicted_records().take(MAX_DIGEST_ENTRIES));
        let filter = RecordFilter::of(
            held.iter()
                .map(|r| (r.owner.as_slice(), r.page, r.sequence)),
            rand::random(),
        );
        let id = self
            .inner
            .sync
            .send_request(&peer, SyncRequest::Missing(filter));
        self.sync.catch_up = Some((id, peer));
    }

    /// The records we hold (ours too) that `filter` does not, up to the
    /// byte budget.
    fn answer_missing(&self, filter: &RecordFilter) -> SyncResponse {
        if filter.hashes == 0 || filter.hashes > MAX_FILTER_HASHES || filter.bits.is_empty() {
            return SyncResponse::Records {
                records: Vec::new(),
                more: false,
            };
        }
        let (records, more) = self
            .held_records_wanted(|owner, page, sequence| !filter.contains(owner, page, sequence));
        SyncResponse::Records { records, more }
    }

    /// The records we hold, ours included, that `wanted` (owner bytes,
    /// page, sequence) picks, up to the byte budget; `true` when the
    /// budget left some out.
    fn held_records_wanted(
        &self,
        wanted: impl Fn(&[u8], u16, u64) -> bool,
    ) -> (Vec<SyncedRecord>, bool) {
        let mut records = Vec::new();
        let mut bytes = 0usize;
        for (owner, page, sequence, envelope) in self.held_pages() {
            let owner_bytes = owner.to_bytes();
            if !wanted(&owner_bytes, page, sequence) {
                continue;
            }
            if bytes.saturating_add(envelope.len()) > MAX_ANSWER_RECORD_BYTES && !records.is_empty()
            {
                return (records, true);
            }
            bytes = bytes.saturating_add(envelope.len());
            records.push(SyncedRecord {
                owner: owner_bytes,
                page,
                sequence,
                envelope: envelope.to_vec(),
            });
        }
        (records, false)
    }

    fn random_sync_peer(&self) -> Option<PeerId> {
        let peers: Vec<PeerId> = self.sync.peers.iter().copied().collect();
        peers.choose(&mut rand::thread_rng()).copied()
    }

    /// Every sync tick: pull from one random neighbour.
    pub(super) fn on_sync_tick(&mut self) {
        if let Some(peer) = self.random_sync_peer() {
            self.queue_pull(peer);
        }
    }

    /// What we hold, as a pull lists it: our record and every unexpired
    /// record of the cache.
    fn held_records(&self) -> Vec<RecordRef> {
        self.held_pages()
            .map(|(owner, page, sequence, _)| RecordRef {
                owner: owner.to_bytes(),
                page,
                sequence,
            })
            .take(MAX_DIGEST_ENTRIES)
            .collect()
    }

    /// The records the cache evicted to make room: in a catch-up's filter
    /// (so that the neighbour does not send them again), never in a pull's
    /// list (which would tell the neighbour we hold what we cannot serve).
    fn evicted_records(&self) -> impl Iterator<Item = RecordRef> + '_ {
        self.cache.evicted().flat_map(|(owner, sequence, pages)| {
            let owner = owner.to_bytes();
            (0..pages.max(1)).map(move |page| RecordRef {
                owner: owner.clone(),
                page,
                sequence,
            })
        })
    }

    /// The records we hold, ours included, that `theirs` lacks or has
    /// older, up to the byte budget; and whether `theirs` lists records
    /// that we lack or hold older.
    fn answer_pull(&self, theirs: &[RecordRef]) -> (Vec<SyncedRecord>, bool, bool) {
        let listed: HashMap<(&[u8], u16), u64> = theirs
            .iter()
            .map(|r| ((r.owner.as_slice(), r.page), r.sequence))
            .collect();
        let (records, more) = self.held_records_wanted(|owner, page, sequence| {
            listed
                .get(&(owner, page))
                .is_none_or(|held| *held < sequence)
        });
        let they_have_more = theirs.iter().any(|r| self.lacks(r));
        (records, more, they_have_more)
    }

    /// Whether we lack the record `r` names (or hold it older), and did
    /// not evict it to make room.
    fn lacks(&self, r: &RecordRef) -> bool {
        peer_of(&r.owner).is_some_and(|owner| {
            owner != self.local_peer
                && self
                    .held_sequence(&owner, r.page)
                    .or(self.cache.evicted_sequence(&owner))
                    .is_none_or(|held| held < r.sequence)
        })
    }

    /// The sequence of page `page` of `owner`'s record that we hold (ours:
    /// our latest).
    fn held_sequence(&self, owner: &PeerId, page: u16) -> Option<u64> {
        if *owner == self.local_peer {
            self.own.as_ref().map(|own| own.sequence)
        } else {
            self.cache.held_page_sequence(owner, page)
        }
    }

    /// A record from a neighbour: skipped when its hint says we hold it
    /// already, else verified and, when new, passed on. `pushed`: it came
    /// in a push, which carries a node's own record as it signs it.
    fn take_synced(&mut self, from: PeerId, record: &SyncedRecord, pushed: bool) {
        let Some(owner) = peer_of(&record.owner) else {
            let reason = RejectReason::Malformed("the owner is not a peer id".to_owned());
            self.reject(Some(from), RecordVia::Sync, reason);
            return;
        };
        if self
            .held_sequence(&owner, record.page)
            .is_some_and(|held| held >= record.sequence)
        {
            return;
        }
        // Evicted to make room, and passed on by a neighbour: not again
        // (its owner's own push is taken).
        if from != owner
            && self
                .cache
                .evicted_sequence(&owner)
                .is_some_and(|evicted| evicted >= record.sequence)
        {
            return;
        }
        let delivery = if from != owner {
            Delivery::Passed
        } else if pushed {
            Delivery::Pushed
        } else {
            Delivery::Synced
        };
        let _ = self.accept_record_as(
            owner,
            &record.envelope,
            RecordVia::Sync,
            Some(from),
            None,
            delivery,
        );
    }

    /// A record new to us (verified and stored, not by gossip, which
    /// spreads its own): pass it on in the next batch.
    pub(super) fn pass_on(&mut self, owner: PeerId, envelope: &[u8]) {
        if self.sync.peers.is_empty() || self.sync.outbox.len() >= MAX_OUTBOX_RECORDS {
            return;
        }
        let Some((page, sequence, _)) = self.cache.get(&owner).and_then(|held| {
            held.page_envelopes()
                .find(|(_, _, stored)| *stored == envelope)
        }) else {
            return;
        };
        self.sync.outbox.push(SyncedRecord {
            owner: owner.to_bytes(),
            page,
            sequence,
            envelope: envelope.to_vec(),
        });
        self.sync
            .outbox_due
            .get_or_insert_with(|| Instant::now() + PUSH_BATCH_DELAY);
    }

    /// The batch is due: to [`PUSH_FANOUT`] random neighbours that have
    /// fewer than [`MAX_PUSHES_IN_FLIGHT`] of our pushes unanswered. When
    /// none has room, the batch waits (and grows) until a push is answered:
    /// a slow link gets fewer, larger batches instead of a pile of streams.
    pub(super) fn flush_outbox(&mut self) {
        if self.sync.outbox_due.is_none_or(|due| due > Instant::now()) {
            return;
        }
        let mut peers: Vec<PeerId> = self
            .sync
            .peers
            .iter()
            .filter(|p| self.sync.pushes_to.get(p).copied().unwrap_or(0) < MAX_PUSHES_IN_FLIGHT)
            .copied()
            .collect();
        if peers.is_empty() {
            // Sent when a push is answered.
            self.sync.outbox_due = None;
            self.sync.outbox_waits = true;
            return;
        }
        self.sync.outbox_due = None;
        self.sync.outbox_waits = false;
        // At most a message's worth; the rest goes in the next batch.
        let mut bytes = 0usize;
        let fits = self
            .sync
            .outbox
            .iter()
            .take_while(|r| {
                bytes = bytes.saturating_add(r.envelope.len());
                bytes <= MAX_ANSWER_RECORD_BYTES
            })
            .count()
            .max(1);
        let rest = self.sync.outbox.split_off(fits.min(self.sync.outbox.len()));
        let batch = std::mem::replace(&mut self.sync.outbox, rest);
        if !self.sync.outbox.is_empty() {
            self.sync.outbox_due = Some(Instant::now());
        }
        peers.shuffle(&mut rand::thread_rng());
        for peer in peers.into_iter().take(PUSH_FANOUT) {
            // Not back to the owners: they hold their own records.
            let records: Vec<SyncedRecord> = batch
                .iter()
                .filter(|r| peer_of(&r.owner) != Some(peer))
                .cloned()
                .collect();
            if records.is_empty() {
                continue;
            }
            // Offered first: each peer is sent only what it lacks, so a
            // record costs a node one copy however many neighbours pass it on.
            let refs = records
                .iter()
                .map(|r| RecordRef {
                    owner: r.owner.clone(),
                    page: r.page,
                    sequence: r.sequence,
                })
                .collect();
            let id = self.send_counted(peer, SyncRequest::Offer(refs));
            self.sync.offers.insert(id, records);
        }
    }

    fn send_push(&mut self, peer: PeerId, records: Vec<SyncedRecord>) -> OutboundRequestId {
        self.send_counted(peer, SyncRequest::Push(records))
    }

    /// Send a push or an offer, counted against the peer's pushes in flight.
    fn send_counted(&mut self, peer: PeerId, request: SyncRequest) -> OutboundRequestId {
        let id = self.inner.sync.send_request(&peer, request);
        self.sync.pushes.insert(id, peer);
        *self.sync.pushes_to.entry(peer).or_default() += 1;
        id
    }

    /// A push of ours was answered or failed: the peer has room again, and
    /// a waiting batch goes out.
    fn on_push_done(&mut self, id: OutboundRequestId) {
        let Some(peer) = self.sync.pushes.remove(&id) else {
            return;
        };
        if let Some(count) = self.sync.pushes_to.get_mut(&peer) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                self.sync.pushes_to.remove(&peer);
            }
        }
        if std::mem::take(&mut self.sync.outbox_waits) && !self.sync.outbox.is_empty() {
            self.sync.outbox_due = Some(Instant::now());
        }
    }

    pub(super) fn on_sync_event(
        &mut self,
        event: request_response::Event<SyncRequest, SyncResponse>,
    ) {
        match event {
            request_response::Event::Message { peer, message, .. } => match message {
                request_response::Message::Request {
                    request, channel, ..
                } => self.on_sync_request(peer, request, channel),
                request_response::Message::Response {
                    request_id,
                    response,
                } => self.on_sync_response(peer, request_id, response),
            },
            request_response::Event::OutboundFailure {
                peer,
                request_id,
                error,
                ..
            } => {
                tracing::debug!(%peer, %error, "sync request failed");
                if matches!(
                    error,
                    request_response::OutboundFailure::UnsupportedProtocols
                ) {
                    // Not a node of ours (a relay, say): no neighbour.
                    self.on_sync_peer_gone(&peer);
                }
                // A connection closed under it (a duplicate the tie-break
                // closed, say): while the peer is still connected, our
                // record and a pull are sent again, once per failure.
                let closed = matches!(error, request_response::OutboundFailure::ConnectionClosed);
                if self.sync.own_pushes.remove(&request_id) && closed {
                    self.sync.pushed.remove(&peer);
                    self.push_own_record_to([peer]);
                }
                self.sync.offers.remove(&request_id);
                if self.sync.catch_up.is_some_and(|(c, _)| c == request_id) {
                    self.sync.catch_up = None;
                }
                self.on_push_done(request_id);
                if self.sync.pull.is_some_and(|(id, _)| id == request_id) {
                    self.sync.pull = None;
                    if self.sync.peers.contains(&peer) && closed {
                        self.sync.pull_queue.push_front(peer);
                    }
                    self.pull_next();
                }
            }
            request_response::Event::InboundFailure { peer, error, .. } => {
                tracing::debug!(%peer, %error, "sync request from a peer failed");
            }
            request_response::Event::ResponseSent { .. } => {}
        }
    }

    fn on_sync_request(
        &mut self,
        peer: PeerId,
        request: SyncRequest,
        channel: ResponseChannel<SyncResponse>,
    ) {
        let response = match request {
            SyncRequest::Pull(theirs) => {
                let (records, more, they_have_more) = self.answer_pull(&theirs);
                if they_have_more {
                    self.queue_pull(peer);
                }
                SyncResponse::Records { records, more }
            }
            SyncRequest::Push(records) => {
                for record in records {
                    self.take_synced(peer, &record, true);
                }
                SyncResponse::Taken
            }
            SyncRequest::Missing(filter) => self.answer_missing(&filter),
            SyncRequest::Offer(offered) => SyncResponse::Want(
                offered
                    .iter()
                    .zip(0u32..)
                    .filter(|(r, _)| self.lacks(r))
                    .map(|(_, index)| index)
                    .collect(),
            ),
        };
        if self.inner.sync.send_response(channel, response).is_err() {
            tracing::debug!(%peer, "sync answer not sent: the stream closed");
        }
    }

    fn on_sync_response(&mut self, peer: PeerId, id: OutboundRequestId, response: SyncResponse) {
        self.sync.own_pushes.remove(&id);
        let offered = self.sync.offers.remove(&id);
        self.on_push_done(id);
        let catch_up = self.sync.catch_up.is_some_and(|(c, _)| c == id);
        if catch_up {
            self.sync.catch_up = None;
        }
        let (records, more) = match response {
            SyncResponse::Records { records, more } => {
                if catch_up {
                    let every = if records.is_empty() {
                        self.sync
                            .catch_up_every
                            .max(CATCH_UP_INTERVAL / 2)
                            .saturating_mul(2)
                            .min(MAX_CATCH_UP_INTERVAL)
                    } else {
                        CATCH_UP_INTERVAL
                    };
                    self.sync.catch_up_every = every;
                    self.sync.catch_up_at = Some(Instant::now() + every);
                }
                (records, more)
            }
            SyncResponse::Want(wanted) => {
                let records: Vec<SyncedRecord> = offered
                    .map(|offered| {
                        wanted
                            .iter()
                            .filter_map(|i| offered.get(usize::try_from(*i).ok()?).cloned())
                            .collect()
                    })
                    .unwrap_or_default();
                if !records.is_empty() && self.sync.peers.contains(&peer) {
                    self.send_push(peer, records);
                }
                return;
            }
            SyncResponse::Taken => return,
        };
        for record in records {
            self.take_synced(peer, &record, false);
        }
        if self.sync.pull.is_some_and(|(pull, _)| pull == id) {
            self.sync.pull = None;
            if more {
                self.sync.pull_queue.push_front(peer);
            }
            self.pull_next();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::io::Cursor;

    #[test]
    fn a_filter_holds_what_it_was_made_of_and_rarely_anything_else() {
        let held: Vec<(Vec<u8>, u16, u64)> = (0..1000u64)
            .map(|i| (PeerId::random().to_bytes(), 0, i))
            .collect();
        let filter = RecordFilter::of(held.iter().map(|(o, p, s)| (o.as_slice(), *p, *s)), 42);
        assert_eq!(filter.bits.len(), 1000 * FILTER_BITS_PER_RECORD / 8);
        assert!(held.iter().all(|(o, p, s)| filter.contains(o, *p, *s)));
        // A newer sequence of a held record is not held.
        let newer = held
            .iter()
            .filter(|(o, p, s)| filter.contains(o, *p, s + 1_000_000))
            .count();
        assert!(newer < 50, "{newer} false positives of 1000");
        // Another salt gives other bits.
        let other = RecordFilter::of(held.iter().map(|(o, p, s)| (o.as_slice(), *p, *s)), 43);
        assert_ne!(filter.bits, other.bits);
        // An empty filter holds nothing.
        let empty = RecordFilter::of(std::iter::empty(), 1);
        assert!(!empty.contains(&held[0].0, 0, 0));
    }

    #[tokio::test]
    async fn messages_round_trip_and_oversized_ones_are_refused() {
        let request = SyncRequest::Pull(vec![RecordRef {
            owner: PeerId::random().to_bytes(),
            page: 0,
            sequence: 7,
        }]);
        let mut buffer = Cursor::new(Vec::new());
        write_message(&mut buffer, &request).await.unwrap();
        let mut reader = Cursor::new(buffer.into_inner());
        let back: SyncRequest = read_message(&mut reader).await.unwrap();
        assert_eq!(back, request);

        let mut huge = (u32::try_from(MAX_SYNC_MESSAGE_BYTES).unwrap() + 1)
            .to_be_bytes()
            .to_vec();
        huge.extend_from_slice(&[0; 16]);
        let err = read_message::<_, SyncRequest>(&mut Cursor::new(huge))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("over the"), "{err}");

        let garbage = [0, 0, 0, 3, 0xff, 0xff, 0xff];
        let err = read_message::<_, SyncRequest>(&mut Cursor::new(garbage.to_vec()))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("does not decode"), "{err}");
    }
}
