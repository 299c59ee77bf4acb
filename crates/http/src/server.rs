//! The accept loop: one task per connection, each watched by a clock that
//! closes it when its client is too slow sending a request's headers or
//! stays idle between requests, and a cap on how many are open at once.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;

/// How an HTTP server treats slow, idle and numerous clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// A request's headers must arrive within this long of their first
    /// byte (of the connection's opening, for its first request).
    pub header_read_timeout: Duration,
    /// A request's whole body must arrive within this long of its headers.
    pub body_read_timeout: Duration,
    /// A keep-alive connection with no request in progress is closed after
    /// this long, and so is one whose client has not read any of its
    /// answer for this long.
    pub idle_timeout: Duration,
    /// Connections open at once; one more is answered 503 and closed.
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(120),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
        }
    }
}

/// Pause after a failed `accept` (out of file descriptors, say) before the
/// next, so the loop does not spin while the condition lasts.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

/// Most bytes of a refused connection's request read before closing it.
const REFUSAL_DRAIN_BYTES: usize = 64 * 1024;

/// Longest the 503 to a connection over the cap may take to write.
const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Serve `app` on `listener` within `limits` until `shutdown` completes;
/// then stop accepting and let open connections finish their requests.
///
/// Every accepted socket gets `TCP_NODELAY`: an answer written as headers
/// and then a body must not wait for the client's delayed ACK (about 40 ms
/// on Linux) before its second write leaves.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: impl Future<Output = ()> + Send,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (stopping_tx, stopping) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (tcp, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "cannot accept an HTTP connection");
                tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                continue;
            }
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!(%peer, max_connections = limits.max_connections, "refusing an HTTP connection: too many open");
            tokio::spawn(refuse(tcp, limits.max_connections));
            continue;
        };
        let (app, stopping) = (app.clone(), stopping.clone());
        tokio::spawn(async move {
            serve_connection(tcp, app, limits, stopping).await;
            drop(slot);
        });
    }
    let _ = stopping_tx.send(true);
}

/// Answer a connection over the cap with a JSON 503 and close it.
async fn refuse(mut tcp: TcpStream, max_connections: usize) {
    let body = serde_json::json!({
        "error": format!("this server has {max_connections} connections open, its limit (http_max_connections); retry later")
    })
    .to_string();
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
        tcp.write_all(answer.as_bytes()).await?;
        tcp.shutdown().await?;
        // Read what the client sent (a little, briefly) before closing, so
        // the close is no reset that could destroy the answer in flight.
        let mut sink = [0u8; 4096];
        let mut drained = 0;
        while drained < REFUSAL_DRAIN_BYTES {
            match tcp.read(&mut sink).await? {
                0 => break,
                n => drained += n,
            }
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}

async fn serve_connection(
    tcp: TcpStream,
    app: Router,
    limits: HttpLimits,
    mut stopping: watch::Receiver<bool>,
) {
    let clock = Arc::new(ConnectionClock::new());
    let io = TokioIo::new(ClockedIo {
        inner: tcp,
        clock: clock.clone(),
    });
    let requests = clock.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let busy = requests.request_started();
        let request =
            request.map(|body| Body::new(DeadlineBody::new(body, limits.body_read_timeout)));
        let answer = tower_service::Service::call(&mut app.clone(), request);
        async move {
            let response = answer
                .await
                .unwrap_or_else(|never: Infallible| match never {});
            Ok::<_, Infallible>(response.map(|body| Body::new(BusyBody { body, _busy: busy })))
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service);
    tokio::pin!(connection);
    let expired = clock.expired(limits);
    tokio::pin!(expired);
    let stop = async {
        while !*stopping.borrow_and_update() {
            if stopping.changed().await.is_err() {
                break;
            }
        }
    };
    tokio::select! {
        result = connection.as_mut() => return log_end(result),
        why = &mut expired => return log_expired(why),
        () = stop => {}
    }
    // The server is stopping: finish the request in progress, then close.
    connection.as_mut().graceful_shutdown();
    tokio::select! {
        result = connection.as_mut() => log_end(result),
        why = &mut expired => log_expired(why),
    }
}

fn log_end(result: Result<(), hyper::Error>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}

fn log_expired(why: &'static str) {
    tracing::debug!(reason = why, "closing an HTTP connection");
}

/// Where a connection is between requests.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// No request in progress and no byte of the next one yet, since then.
    Idle(Instant),
    /// The first bytes of a request's headers arrived then.
    Head(Instant),
    /// This many requests are being answered (their bodies read, their
    /// answers streamed): no timeout of the clock applies.
    Busy(usize),
}

/// The phase of one connection, moved by its reads and its requests, and
/// watched by [`ConnectionClock::expired`].
#[derive(Debug)]
struct ConnectionClock {
    phase: Mutex<Phase>,
    /// Since when a write has waited for the client to read, if one does.
    write_stalled: Mutex<Option<Instant>>,
    /// Whether `write_stalled` is set (read without the lock on every write).
    stalled: AtomicBool,
    changed: Notify,
}

impl ConnectionClock {
    /// A connection just accepted: its first request's headers are due
    /// within the header timeout, whether or not a byte has come yet.
    fn new() -> Self {
        Self {
            phase: Mutex::new(Phase::Head(Instant::now())),
            write_stalled: Mutex::new(None),
            stalled: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    /// A write could not proceed (the client is not reading) or did.
    fn write_polled(&self, progressed: bool) {
        if progressed != self.stalled.load(Ordering::Relaxed) {
            return;
        }
        let mut since = self
            .write_stalled
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *since = if progressed {
            None
        } else {
            since.or(Some(Instant::now()))
        };
        self.stalled.store(since.is_some(), Ordering::Relaxed);
        drop(since);
        self.changed.notify_one();
    }

    fn update(&self, change: impl FnOnce(Phase) -> Phase) {
        let mut phase = self.phase.lock().unwrap_or_else(PoisonError::into_inner);
        *phase = change(*phase);
        drop(phase);
        self.changed.notify_one();
    }

    /// Bytes arrived: an idle connection starts a request's headers.
    fn bytes_read(&self) {
        let idle = matches!(
            *self.phase.lock().unwrap_or_else(PoisonError::into_inner),
            Phase::Idle(_)
        );
        if idle {
            self.update(|p| match p {
                Phase::Idle(_) => Phase::Head(Instant::now()),
                other => other,
            });
        }
    }

    /// A request's headers are complete; busy until the guard is dropped
    /// with the answer's body.
    fn request_started(self: &Arc<Self>) -> BusyGuard {
        self.update(|p| match p {
            Phase::Busy(n) => Phase::Busy(n.saturating_add(1)),
            Phase::Idle(_) | Phase::Head(_) => Phase::Busy(1),
        });
        BusyGuard(self.clone())
    }

    /// When the connection is due to close, and why (`None` while busy).
    fn deadline(&self, limits: HttpLimits) -> Option<(Instant, &'static str)> {
        match *self.phase.lock().unwrap_or_else(PoisonError::into_inner) {
            Phase::Idle(since) => Some((since + limits.idle_timeout, "idle (http_idle_timeout)")),
            Phase::Head(since) => Some((
                since + limits.header_read_timeout,
                "request headers too slow (http_header_read_timeout)",
            )),
            Phase::Busy(_) => self
                .write_stalled
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .map(|since| {
                    (
                        since + limits.idle_timeout,
                        "the client stopped reading its answer (http_idle_timeout)",
                    )
                }),
        }
    }

    /// Completes when the connection has been idle, or sending headers,
    /// for longer than `limits` allow; the reason.
    async fn expired(&self, limits: HttpLimits) -> &'static str {
        loop {
            match self.deadline(limits) {
                None => self.changed.notified().await,
                Some((deadline, why)) => {
                    tokio::select! {
                        () = self.changed.notified() => {}
                        () = tokio::time::sleep_until(deadline) => {
                            if self.deadline(limits).is_some_and(|(d, _)| d <= Instant::now()) {
                                return why;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// One request being answered; dropped with its answer's body.
#[derive(Debug)]
struct BusyGuard(Arc<ConnectionClock>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.update(|p| match p {
            Phase::Busy(n) if n > 1 => Phase::Busy(n - 1),
            _ => Phase::Idle(Instant::now()),
        });
    }
}

/// The socket, telling the clock when bytes arrive.
struct ClockedIo {
    inner: TcpStream,
    clock: Arc<ConnectionClock>,
}

impl AsyncRead for ClockedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.clock.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for ClockedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.clock.write_polled(polled.is_ready());
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.clock.write_polled(polled.is_ready());
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// An answer's body, holding its request's [`BusyGuard`].
struct BusyBody {
    body: Body,
    _busy: BusyGuard,
}

impl hyper::body::Body for BusyBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A request body that must arrive whole before a deadline.
pub(crate) struct DeadlineBody<B> {
    body: B,
    timeout: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl<B> DeadlineBody<B> {
    /// `body`, which must end within `timeout` from now.
    pub(crate) fn new(body: B, timeout: Duration) -> Self {
        Self {
            body,
            timeout,
            deadline: Box::pin(tokio::time::sleep(timeout)),
        }
    }
}

/// A request body that did not arrive in time.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within {timeout:?} (http_body_read_timeout)")]
pub struct BodyTimeout {
    /// The limit.
    pub timeout: Duration,
}

impl<B> hyper::body::Body for DeadlineBody<B>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.body).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(Some(Err(Box::new(BodyTimeout {
                timeout: self.timeout,
            }))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
