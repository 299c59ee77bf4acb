//! How far each peer's clock is from ours, learned from the signed records
//! it issues, so that its records are judged by its clock and a node whose
//! clock is minutes off stays a member of the mesh.
//!
//! A record issued at `issued_at` (the author's clock) that arrives at `t`
//! (ours) gives the sample `issued_at - t`: the author's offset minus the
//! record's age, so never more than the true offset, whoever passed the
//! record on (only its author can sign it). A peer's estimated offset is
//! its largest sample within [`CLOCK_WINDOW`].
//!
//! A sample is *fresh* when its record came straight from its author (a
//! put, a sync or a gossip message from the owner: at most one refresh
//! interval old; a third node could replay old records of a node that left,
//! newer than those we saw, to pass them off as records of a slow clock);
//! while none of a peer's samples is fresh (every record of it came through
//! a third node and may be old), its records are judged by no slower a
//! clock than the mesh's median, so that an old record is not taken for
//! one of a slow clock. A sample is *precise* when a newer sequence comes
//! straight from its author: a node pushes each record to its connected
//! peers as it signs it, so that one is moments old.
//!
//! This node's own offset from the mesh is minus the median offset of the
//! peers with a precise sample (one refresh interval after they connect);
//! beyond [`CLOCK_WARNING_OFFSET`] it is logged and shown in `status`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use libp2p::PeerId;
use ollamacron_service_registry::NodeRecord;
use serde::{Deserialize, Serialize};

/// How long a clock sample counts (two halves: a sample is forgotten after
/// one to two halves). Longer than a record refresh interval, so a steady
/// peer always has a fresh sample.
pub(crate) const CLOCK_WINDOW: Duration = Duration::from_secs(10 * 60);
/// How far this node's clock may be from its peers' before it says so, in
/// its log and `status`; and a peer's from ours before we log it.
pub const CLOCK_WARNING_OFFSET: Duration = Duration::from_secs(30);
/// How often a clock that stays off is logged again.
const CLOCK_WARNING_REPEAT: Duration = Duration::from_secs(10 * 60);

/// What one half of the window holds: the largest sample, and whether any
/// sample was fresh or precise.
#[derive(Debug, Clone, Copy, Default)]
struct Samples {
    largest_ms: Option<i64>,
    fresh: bool,
    precise: bool,
}

impl Samples {
    fn add(&mut self, sample_ms: i64, fresh: bool, precise: bool) {
        self.largest_ms = Some(self.largest_ms.map_or(sample_ms, |m| m.max(sample_ms)));
        self.fresh |= fresh;
        self.precise |= precise;
    }
}

/// What we learned of one peer's clock.
#[derive(Debug, Clone)]
struct PeerClock {
    current: Samples,
    previous: Samples,
    /// When `current` began.
    current_since: Instant,
    /// The newest sequence of its records seen, and when.
    newest: (u64, Instant),
    /// Whether its offset beyond [`CLOCK_WARNING_OFFSET`] was logged.
    logged_off: bool,
}

impl PeerClock {
    fn new(sequence: u64, now: Instant) -> Self {
        Self {
            current: Samples::default(),
            previous: Samples::default(),
            current_since: now,
            newest: (sequence, now),
            logged_off: false,
        }
    }

    /// Move to a new half window when the current one is over.
    fn rotate(&mut self, now: Instant) {
        let half = CLOCK_WINDOW / 2;
        let age = now.saturating_duration_since(self.current_since);
        if age >= CLOCK_WINDOW {
            self.previous = Samples::default();
            self.current = Samples::default();
            self.current_since = now;
        } else if age >= half {
            self.previous = self.current;
            self.current = Samples::default();
            self.current_since = now;
        }
    }

    /// Its largest sample within the window: never more than its offset.
    fn largest_ms(&self) -> Option<i64> {
        max(self.current.largest_ms, self.previous.largest_ms)
    }

    fn fresh(&self) -> bool {
        self.current.fresh || self.previous.fresh
    }

    fn precise(&self) -> bool {
        self.current.precise || self.previous.precise
    }
}

fn max(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// How a record reached us.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Delivery {
    /// Pushed by its author (a put or a gossip message from the owner).
    Pushed,
    /// From its author when asked (a sync, a DHT get): its current record,
    /// which may have been signed a while ago.
    Synced,
    /// Through a third node.
    Passed,
}

/// The clock part of [`NodeStatus`](crate::NodeStatus): how far this
/// node's clock is from its peers'.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ClockStatus {
    /// This node's clock minus the median of its peers' (milliseconds;
    /// negative: ours is behind), from the records they issued; `None`
    /// before any peer's fresh record arrived.
    pub offset_ms: Option<i64>,
    /// Peers whose fresh records the estimate is made of.
    pub peers_sampled: usize,
    /// What is wrong, when the offset is beyond [`CLOCK_WARNING_OFFSET`].
    pub warning: Option<String>,
}

/// Every peer's clock offset, bounded to `max_peers` peers (the one seen
/// longest ago makes room).
#[derive(Debug)]
pub(super) struct PeerClocks {
    peers: HashMap<PeerId, PeerClock>,
    max_peers: usize,
    /// When our own clock was last logged as off, and by how much.
    warned: Option<(Instant, i64)>,
}

impl PeerClocks {
    pub(super) fn new(max_peers: usize) -> Self {
        Self {
            peers: HashMap::new(),
            max_peers: max_peers.max(1),
            warned: None,
        }
    }

    /// A record of `owner` whose signature checked arrived at `received_ms`
    /// (our clock), how it came as `delivery`: learn from it, and say by
    /// which offset (the author's clock minus ours) to judge it.
    pub(super) fn observe(
        &mut self,
        owner: PeerId,
        record: &NodeRecord,
        received_ms: u64,
        delivery: Delivery,
    ) -> i64 {
        let direct = delivery != Delivery::Passed;
        let now = Instant::now();
        let sample_ms = signed_difference(record.issued_at, received_ms);
        if !self.peers.contains_key(&owner) && self.peers.len() >= self.max_peers {
            let oldest = self
                .peers
                .iter()
                .min_by_key(|(_, c)| c.newest.1)
                .map(|(p, _)| *p);
            if let Some(oldest) = oldest {
                self.peers.remove(&oldest);
            }
        }
        let known = self.peers.contains_key(&owner);
        let clock = self
            .peers
            .entry(owner)
            .or_insert_with(|| PeerClock::new(record.sequence, now));
        clock.rotate(now);
        let (newest, seen_at) = clock.newest;
        let newer_sequence = known
            && record.sequence > newest
            && now.saturating_duration_since(seen_at) < CLOCK_WINDOW;
        if record.sequence >= newest {
            clock.newest = (record.sequence, now);
        }
        // A newer record pushed by its author was pushed as it was signed:
        // its sample is the offset to within a round trip.
        let precise = delivery == Delivery::Pushed && newer_sequence;
        // Only the author hands its records over moments after it signed
        // them: a third node may replay old ones, newer than those we saw.
        clock.current.add(sample_ms, direct, precise);
        let offset_ms = self.offset_of(&owner).unwrap_or(sample_ms);
        self.log_peer(owner, offset_ms);
        offset_ms
    }

    /// `now_ms` (our clock) by `peer`'s clock, as estimated: unmoved for a
    /// peer never seen; at most [`MAX_CLOCK_OFFSET`] away.
    ///
    /// [`MAX_CLOCK_OFFSET`]: ollamacron_service_registry::MAX_CLOCK_OFFSET
    pub(super) fn author_now(&self, peer: &PeerId, now_ms: u64) -> u64 {
        let offset_ms = self.offset_of(peer).unwrap_or(0);
        now_ms.saturating_add_signed(ollamacron_service_registry::clamp_clock_offset(offset_ms))
    }

    /// The offset `peer`'s records are judged by: its largest sample, and
    /// while none is fresh (every record of it came through a third node,
    /// and may be old) at least the mesh's median.
    fn offset_of(&self, peer: &PeerId) -> Option<i64> {
        let clock = self.peers.get(peer)?;
        let largest = clock.largest_ms()?;
        Some(if clock.fresh() {
            largest
        } else {
            largest.max(self.median_of(Some(peer)).0.unwrap_or(0))
        })
    }

    /// The median offset of every peer with a precise sample but `except`
    /// (of an even number, the middle one nearer ours), and how many peers
    /// it is made of.
    fn median_of(&self, except: Option<&PeerId>) -> (Option<i64>, usize) {
        let mut offsets: Vec<i64> = self
            .peers
            .iter()
            .filter(|(p, c)| Some(*p) != except && c.precise())
            .filter_map(|(_, c)| c.largest_ms())
            .collect();
        if offsets.is_empty() {
            return (None, 0);
        }
        offsets.sort_unstable();
        let middle = offsets.len() / 2;
        let median = if offsets.len().is_multiple_of(2) {
            // Of the two middle ones the one nearer our clock: with two
            // peers that disagree, neither says ours is off.
            let (low, high) = (offsets[middle - 1], offsets[middle]);
            if low.unsigned_abs() <= high.unsigned_abs() {
                low
            } else {
                high
            }
        } else {
            offsets[middle]
        };
        (Some(median), offsets.len())
    }

    /// Forget samples older than the window, and peers left with none.
    pub(super) fn expire(&mut self) {
        let now = Instant::now();
        self.peers.retain(|_, c| {
            c.rotate(now);
            c.largest_ms().is_some()
        });
        self.log_own();
    }

    /// How far our clock is from the mesh's.
    pub(super) fn status(&self) -> ClockStatus {
        let (median, peers_sampled) = self.median_of(None);
        let offset_ms = median.map(i64::saturating_neg);
        ClockStatus {
            offset_ms,
            peers_sampled,
            warning: offset_ms.and_then(|o| off_by(o).then(|| own_warning(o, peers_sampled))),
        }
    }

    /// Log a peer's clock the first time it is seen beyond the threshold.
    fn log_peer(&mut self, peer: PeerId, offset_ms: i64) {
        let off = off_by(offset_ms);
        let Some(clock) = self.peers.get_mut(&peer) else {
            return;
        };
        if off && !clock.logged_off {
            tracing::info!(%peer, offset_secs = offset_ms / 1000, "this peer's clock is {} {} ours; its records are judged by its clock", describe(offset_ms), if offset_ms > 0 { "ahead of" } else { "behind" });
        }
        clock.logged_off = off;
        self.log_own();
    }

    /// Warn when our own clock is off from the mesh's: when it first is,
    /// when it moved by another threshold, and every
    /// [`CLOCK_WARNING_REPEAT`] while it stays off.
    fn log_own(&mut self) {
        let status = self.status();
        let Some(offset_ms) = status.offset_ms.filter(|o| off_by(*o)) else {
            if self.warned.take().is_some() {
                tracing::info!(
                    peers = status.peers_sampled,
                    "this node's clock agrees with its peers' again"
                );
            }
            return;
        };
        let threshold_ms = i64::try_from(CLOCK_WARNING_OFFSET.as_millis()).unwrap_or(i64::MAX);
        let due = self.warned.is_none_or(|(at, was)| {
            at.elapsed() >= CLOCK_WARNING_REPEAT || (offset_ms - was).abs() >= threshold_ms
        });
        if due {
            tracing::warn!(
                offset_secs = offset_ms / 1000,
                peers = status.peers_sampled,
                "{}",
                own_warning(offset_ms, status.peers_sampled)
            );
            self.warned = Some((Instant::now(), offset_ms));
        }
    }
}

/// `a - b` in milliseconds, saturating.
fn signed_difference(a: u64, b: u64) -> i64 {
    if a >= b {
        i64::try_from(a - b).unwrap_or(i64::MAX)
    } else {
        i64::try_from(b - a).map_or(i64::MIN, i64::saturating_neg)
    }
}

/// Whether `offset_ms` is beyond [`CLOCK_WARNING_OFFSET`].
fn off_by(offset_ms: i64) -> bool {
    u128::from(offset_ms.unsigned_abs()) > CLOCK_WARNING_OFFSET.as_millis()
}

/// `offset_ms` for people: "612 s".
fn describe(offset_ms: i64) -> String {
    format!("{} s", offset_ms.unsigned_abs() / 1000)
}

fn own_warning(offset_ms: i64, peers: usize) -> String {
    format!(
        "this node's clock is {} {} the median of {peers} peers' clocks (from the records they sign); check its time sync (NTP): peers judge its records by its clock, within {} s",
        describe(offset_ms),
        if offset_ms > 0 { "ahead of" } else { "behind" },
        ollamacron_service_registry::MAX_CLOCK_OFFSET.as_secs()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(sequence: u64, issued_at: u64) -> NodeRecord {
        NodeRecord {
            sequence,
            issued_at,
            expires_at: issued_at + 300_000,
            ..NodeRecord::default()
        }
    }

    const NOW: u64 = 1_700_000_000_000;
    const TEN_MINUTES_MS: i64 = 600_000;

    /// Two records of `peer` straight from it, the second one newer and
    /// `offset_ms` ahead of our clock as it arrives: a precise sample.
    fn precise(clocks: &mut PeerClocks, peer: PeerId, offset_ms: i64) -> i64 {
        let issued = NOW.saturating_add_signed(offset_ms);
        clocks.observe(peer, &record(1, issued - 60_000), NOW, Delivery::Pushed);
        clocks.observe(peer, &record(2, issued), NOW, Delivery::Pushed)
    }

    #[test]
    fn a_fresh_record_gives_its_authors_offset() {
        let mut clocks = PeerClocks::new(16);
        let slow = PeerId::random();
        // 10 minutes slow, straight from its author.
        let offset = clocks.observe(slow, &record(1, NOW - 600_000), NOW, Delivery::Pushed);
        assert_eq!(offset, -TEN_MINUTES_MS);
        // Fresh but not precise (it may have been signed a while ago): our
        // own clock is not judged by it.
        assert_eq!(clocks.status(), ClockStatus::default());
    }

    #[test]
    fn an_old_record_from_a_third_node_is_judged_by_the_meshs_clock() {
        let mut clocks = PeerClocks::new(16);
        // Two peers in step with us.
        for _ in 0..2 {
            precise(&mut clocks, PeerId::random(), -5);
        }
        // A record issued 10 minutes ago, passed on: old, not slow.
        let old = PeerId::random();
        let offset = clocks.observe(old, &record(1, NOW - 600_000), NOW, Delivery::Passed);
        assert!(offset.abs() < 10, "judged by the mesh's clock: {offset}");
        // Its next sequence, replayed by a third node: still judged by the
        // mesh's clock (it may be as old, from a node that left).
        let offset = clocks.observe(
            old,
            &record(2, NOW - 590_000),
            NOW + 10_000,
            Delivery::Passed,
        );
        assert!(offset.abs() < 10, "a replay is no fresh sample: {offset}");
        // Straight from its author, it is: its clock is slow after all.
        let offset = clocks.observe(
            old,
            &record(3, NOW - 580_000),
            NOW + 20_000,
            Delivery::Pushed,
        );
        assert_eq!(offset, -600_000);
    }

    #[test]
    fn a_replayed_old_record_does_not_lower_the_offset() {
        let mut clocks = PeerClocks::new(16);
        let peer = PeerId::random();
        precise(&mut clocks, peer, 0);
        // Its older record again, long after: the largest sample holds.
        let offset = clocks.observe(
            peer,
            &record(1, NOW - 200_000),
            NOW + 100_000,
            Delivery::Pushed,
        );
        assert_eq!(offset, 0);
    }

    #[test]
    fn our_own_offset_is_minus_the_median_and_warned_beyond_the_threshold() {
        let mut clocks = PeerClocks::new(16);
        assert_eq!(clocks.status(), ClockStatus::default());
        // Three peers all 10 minutes ahead: our clock is 10 minutes behind.
        for _ in 0..3 {
            precise(&mut clocks, PeerId::random(), TEN_MINUTES_MS);
        }
        let status = clocks.status();
        assert_eq!(status.offset_ms, Some(-TEN_MINUTES_MS));
        assert_eq!(status.peers_sampled, 3);
        assert!(
            status
                .warning
                .as_deref()
                .is_some_and(|w| w.contains("600 s behind")),
            "{status:?}"
        );
        // Two peers that disagree: neither says our clock is off.
        let mut clocks = PeerClocks::new(16);
        precise(&mut clocks, PeerId::random(), 0);
        precise(&mut clocks, PeerId::random(), -TEN_MINUTES_MS);
        assert_eq!(clocks.status().offset_ms, Some(0));
        // One skewed peer among three in step: our clock is fine.
        let mut clocks = PeerClocks::new(16);
        for _ in 0..3 {
            precise(&mut clocks, PeerId::random(), 0);
        }
        precise(&mut clocks, PeerId::random(), TEN_MINUTES_MS);
        assert_eq!(clocks.status().warning, None);
    }

    #[test]
    fn peers_are_bounded() {
        let mut clocks = PeerClocks::new(4);
        for _ in 0..100 {
            clocks.observe(PeerId::random(), &record(1, NOW), NOW, Delivery::Pushed);
        }
        assert_eq!(clocks.peers.len(), 4);
    }
}
