//! `max_bandwidth`: one token bucket per direction shared by every stream
//! of every libp2p connection (TCP, QUIC, relayed, or a given transport).
//!
//! Each direct connection's muxer is wrapped, so the limit applies to the
//! bytes streams read and write (protocol payload, before the muxer's
//! framing and encryption; relayed connections ride in a stream of the
//! connection to their relay, counted there). Reads are held back above
//! the muxer: the muxer's window still lets a peer send that much ahead,
//! so the limit is on what reaches the node's protocols, not on what the
//! network carries in that window. A stream that finds the bucket empty waits for it to
//! refill: a long answer slows down to the limit, nothing fails. The
//! bucket holds at most [`BURST_WINDOW`] of the rate (and at least
//! [`MIN_BURST_BYTES`]), so an idle spell does not buy a long burst.

use std::io::{self, IoSlice, IoSliceMut};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{AsyncRead, AsyncWrite};
use libp2p::Transport;
use libp2p::core::muxing::{StreamMuxer, StreamMuxerBox, StreamMuxerEvent, SubstreamBox};
use libp2p::multiaddr::Protocol;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::time::{Instant, Sleep};

use crate::transport::NodeTransport;

/// How much of a second's worth of bytes the bucket holds at most.
pub(crate) const BURST_WINDOW: Duration = Duration::from_millis(100);
/// The bucket's smallest capacity, whatever the rate: a stream can always
/// move a reasonable frame at once.
pub(crate) const MIN_BURST_BYTES: u64 = 16 * 1024;
/// Fewest bytes a waiting stream waits for (a grant of one byte at a time
/// would wake it for every byte).
const MIN_GRANT_BYTES: u64 = 1024;

/// One direction's bucket.
#[derive(Debug)]
struct TokenBucket {
    bytes_per_second: f64,
    capacity: f64,
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    #[allow(clippy::cast_precision_loss)] // byte counts far below 2^52
    fn new(bytes_per_second: u64, now: Instant) -> Self {
        let capacity =
            (bytes_per_second as f64 * BURST_WINDOW.as_secs_f64()).max(MIN_BURST_BYTES as f64);
        Self {
            bytes_per_second: bytes_per_second as f64,
            capacity,
            tokens: capacity,
            refilled: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.bytes_per_second).min(self.capacity);
        self.refilled = now;
    }

    /// Up to `want` bytes now, or how long until a grant is worth waking for.
    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )] // tokens are within [0, capacity], capacity fits a usize
    fn take(&mut self, want: usize, now: Instant) -> Result<usize, Duration> {
        self.refill(now);
        let least = (want as f64)
            .min(MIN_GRANT_BYTES as f64)
            .min(self.capacity)
            .max(1.0);
        if self.tokens >= least {
            let granted = (want as f64).min(self.tokens.floor());
            self.tokens -= granted;
            return Ok(granted as usize);
        }
        Err(Duration::from_secs_f64(
            (least - self.tokens) / self.bytes_per_second,
        ))
    }

    /// Give back what a stream took and did not move.
    #[allow(clippy::cast_precision_loss)]
    fn give_back(&mut self, unused: usize) {
        self.tokens = (self.tokens + unused as f64).min(self.capacity);
    }
}

/// Which way bytes go.
#[derive(Debug, Clone, Copy)]
enum Way {
    In,
    Out,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WayLabel {
    direction: &'static str,
}

/// The limit of a node: both buckets and how often streams waited.
#[derive(Debug, Clone)]
pub(crate) struct BandwidthLimit {
    bytes_per_second: u64,
    inbound: Arc<Mutex<TokenBucket>>,
    outbound: Arc<Mutex<TokenBucket>>,
    /// Times a stream waited, inbound and outbound: the counters of
    /// `wait_family`, which `/metrics` shows.
    waits: [Counter; 2],
    wait_family: Family<WayLabel, Counter>,
}

/// How a limited node's streams fared (`GET /v1/status`'s `bandwidth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BandwidthStatus {
    /// `max_bandwidth`, in bytes per second each way.
    pub limit_bytes_per_s: u64,
    /// Times a stream waited for the inbound bucket to refill.
    pub inbound_waits: u64,
    /// Times a stream waited for the outbound bucket to refill.
    pub outbound_waits: u64,
}

impl BandwidthLimit {
    /// `bytes_per_second` each way.
    pub(crate) fn new(bytes_per_second: u64) -> Self {
        let now = Instant::now();
        let bytes_per_second = bytes_per_second.max(1);
        let wait_family = Family::<WayLabel, Counter>::default();
        let waits = ["inbound", "outbound"]
            .map(|direction| wait_family.get_or_create(&WayLabel { direction }).clone());
        Self {
            bytes_per_second,
            inbound: Arc::new(Mutex::new(TokenBucket::new(bytes_per_second, now))),
            outbound: Arc::new(Mutex::new(TokenBucket::new(bytes_per_second, now))),
            waits,
            wait_family,
        }
    }

    /// How the streams fared so far.
    pub(crate) fn status(&self) -> BandwidthStatus {
        BandwidthStatus {
            limit_bytes_per_s: self.bytes_per_second,
            inbound_waits: self.waits[0].get(),
            outbound_waits: self.waits[1].get(),
        }
    }

    /// Show the limit and the waits in `/metrics` (under `ollamacron_`).
    pub(crate) fn register(&self, registry: &mut Registry) {
        let ours = registry.sub_registry_with_prefix("ollamacron");
        let limit = Gauge::<i64, std::sync::atomic::AtomicI64>::default();
        limit.set(i64::try_from(self.bytes_per_second).unwrap_or(i64::MAX));
        ours.register(
            "bandwidth_limit_bytes_per_second",
            "max_bandwidth: bytes per second each way across every libp2p stream",
            limit,
        );
        ours.register(
            "bandwidth_waits",
            "Times a libp2p stream waited for max_bandwidth, by direction",
            self.wait_family.clone(),
        );
    }

    /// `transport` with every stream of every direct connection held to
    /// the limit. A relayed connection's bytes travel in a stream of the
    /// connection to the relay, which is held to it already: counting them
    /// twice would give relayed peers half the rate.
    pub(crate) fn limit_transport(&self, transport: NodeTransport) -> NodeTransport {
        let limit = self.clone();
        transport
            .map(move |(peer, muxer), endpoint| {
                let relayed = endpoint
                    .get_remote_address()
                    .iter()
                    .any(|p| matches!(p, Protocol::P2pCircuit));
                (peer, if relayed { muxer } else { limit.wrap(muxer) })
            })
            .boxed()
    }

    /// `muxer` with every stream held to the limit.
    fn wrap(&self, muxer: StreamMuxerBox) -> StreamMuxerBox {
        StreamMuxerBox::new(LimitedMuxer {
            inner: muxer,
            limit: self.clone(),
        })
    }

    fn bucket(&self, way: Way) -> &Mutex<TokenBucket> {
        match way {
            Way::In => &self.inbound,
            Way::Out => &self.outbound,
        }
    }

    fn take(&self, way: Way, want: usize) -> Result<usize, Duration> {
        let result = self
            .bucket(way)
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take(want, Instant::now());
        if result.is_err() {
            let index = match way {
                Way::In => 0,
                Way::Out => 1,
            };
            self.waits[index].inc();
        }
        result
    }

    fn give_back(&self, way: Way, unused: usize) {
        if unused > 0 {
            self.bucket(way)
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .give_back(unused);
        }
    }
}

/// A connection's muxer whose streams are held to the limit.
struct LimitedMuxer {
    inner: StreamMuxerBox,
    limit: BandwidthLimit,
}

impl StreamMuxer for LimitedMuxer {
    type Substream = LimitedStream;
    type Error = io::Error;

    fn poll_inbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let limit = self.limit.clone();
        Pin::new(&mut self.inner)
            .poll_inbound(cx)
            .map_ok(|s| LimitedStream::new(s, limit))
    }

    fn poll_outbound(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Self::Substream, Self::Error>> {
        let limit = self.limit.clone();
        Pin::new(&mut self.inner)
            .poll_outbound(cx)
            .map_ok(|s| LimitedStream::new(s, limit))
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }

    fn poll(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<StreamMuxerEvent, Self::Error>> {
        Pin::new(&mut self.inner).poll(cx)
    }
}

/// A stream that takes its bytes from the buckets before moving them.
pub(crate) struct LimitedStream {
    inner: SubstreamBox,
    limit: BandwidthLimit,
    read_wait: Option<Pin<Box<Sleep>>>,
    write_wait: Option<Pin<Box<Sleep>>>,
}

impl LimitedStream {
    fn new(inner: SubstreamBox, limit: BandwidthLimit) -> Self {
        Self {
            inner,
            limit,
            read_wait: None,
            write_wait: None,
        }
    }
}

/// Wait on `wait` until `take` grants bytes: the grant, or `Pending` with
/// the timer armed for when the bucket holds enough.
fn granted(
    wait: &mut Option<Pin<Box<Sleep>>>,
    cx: &mut Context<'_>,
    mut take: impl FnMut() -> Result<usize, Duration>,
) -> Poll<usize> {
    loop {
        if let Some(sleep) = wait.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            *wait = None;
        }
        match take() {
            Ok(n) => return Poll::Ready(n),
            Err(after) => *wait = Some(Box::pin(tokio::time::sleep(after))),
        }
    }
}

/// Move at most what the bucket of `way` grants of `len` bytes with
/// `move_bytes` (given the grant), and give back what it did not move;
/// `Pending`, with `wait` armed, until the bucket grants something.
fn through_bucket(
    limit: &BandwidthLimit,
    way: Way,
    wait: &mut Option<Pin<Box<Sleep>>>,
    cx: &mut Context<'_>,
    len: usize,
    move_bytes: impl FnOnce(&mut Context<'_>, usize) -> Poll<io::Result<usize>>,
) -> Poll<io::Result<usize>> {
    let Poll::Ready(grant) = granted(wait, cx, || limit.take(way, len)) else {
        return Poll::Pending;
    };
    let result = move_bytes(cx, grant);
    let used = match &result {
        Poll::Ready(Ok(n)) => *n,
        _ => 0,
    };
    limit.give_back(way, grant - used);
    result
}

impl AsyncRead for LimitedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let this = &mut *self;
        through_bucket(
            &this.limit,
            Way::In,
            &mut this.read_wait,
            cx,
            buf.len(),
            |cx, grant| Pin::new(&mut this.inner).poll_read(cx, &mut buf[..grant]),
        )
    }

    fn poll_read_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
    ) -> Poll<io::Result<usize>> {
        // One buffer at a time, each held to the limit.
        match bufs.iter_mut().find(|b| !b.is_empty()) {
            Some(buf) => self.poll_read(cx, buf),
            None => Poll::Ready(Ok(0)),
        }
    }
}

impl AsyncWrite for LimitedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Pin::new(&mut self.inner).poll_write(cx, buf);
        }
        let this = &mut *self;
        through_bucket(
            &this.limit,
            Way::Out,
            &mut this.write_wait,
            cx,
            buf.len(),
            |cx, grant| Pin::new(&mut this.inner).poll_write(cx, &buf[..grant]),
        )
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match bufs.iter().find(|b| !b.is_empty()) {
            Some(buf) => self.poll_write(cx, buf),
            None => Poll::Ready(Ok(0)),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_grants_its_burst_then_the_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(1024 * 1024, start);
        let burst = bucket.take(usize::MAX, start).unwrap();
        assert_eq!(burst, 104_857, "a tenth of a second of 1 MiB/s");
        let wait = bucket.take(4096, start).unwrap_err();
        assert!(wait <= Duration::from_millis(2), "{wait:?}");
        // A second later a second's worth is there, but never more than
        // the burst.
        let later = start + Duration::from_secs(1);
        assert_eq!(bucket.take(usize::MAX, later).unwrap(), burst);
        // What a stream took and did not move comes back.
        bucket.give_back(2000);
        assert_eq!(bucket.take(usize::MAX, later).unwrap(), 2000);
    }

    #[test]
    fn a_tiny_rate_still_moves_a_frame() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(10, start);
        assert_eq!(bucket.take(100_000, start).unwrap(), 16 * 1024);
        let wait = bucket.take(100, start).unwrap_err();
        assert_eq!(wait, Duration::from_secs(10), "100 bytes at 10 B/s");
    }
}
