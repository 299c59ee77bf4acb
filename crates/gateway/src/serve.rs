//! The serving side of the inference protocol (`/ollamacron/infer/2.0.0`,
//! and 1.0.0 for older gateways), and forwarding to the local Ollama (the
//! only Ollama a node ever sends requests to).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::io::{ReadHalf, WriteHalf};
use futures::{AsyncReadExt, AsyncWrite, AsyncWriteExt, FutureExt, StreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use ollamacron_node_core::libp2p::{PeerId, Stream, StreamProtocol};
use ollamacron_node_core::libp2p_stream::Control;
use ollamacron_ollama::{OllamaEndpoint, OllamaRefresh};
use ollamacron_telemetry::TraceContext;
use tokio::sync::{Semaphore, mpsc};
use tracing::Instrument;

use crate::frame::{
    COALESCE_BYTES, FrameKind, InferHead, InferRequest, InferRequestHead, decode, encode_frame,
    read_frame,
};
use crate::in_flight::InFlight;

/// The inference stream protocol: a request head, the body in frames, an
/// end frame; then the answer (see [`frame`](crate::frame)).
pub const INFER_PROTOCOL: StreamProtocol = StreamProtocol::new("/ollamacron/infer/2.0.0");

/// The first version, whose request is one frame of at most 1 MiB; still
/// served for gateways that speak only it, and used to ask nodes that do
/// not speak [`INFER_PROTOCOL`].
pub const INFER_PROTOCOL_V1: StreamProtocol = StreamProtocol::new("/ollamacron/infer/1.0.0");

/// The paths a request may name: Ollama's and the OpenAI-compatible ones
/// Ollama serves. Nothing else is forwarded.
pub const FORWARDED_PATHS: &[&str] = &[
    "/api/generate",
    "/api/chat",
    "/api/embed",
    "/api/embeddings",
    "/api/show",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
];

/// Longest wait for a peer's request head, and between two frames of its
/// body.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Request body frames queued between the stream and Ollama: at most this
/// many frames of a body (each at most 1 MiB, a quarter of that from our
/// gateways) are held at once.
const BODY_QUEUE_FRAMES: usize = 4;

/// A request body on its way to Ollama.
pub type ForwardBody = BoxBody<Bytes, std::io::Error>;

/// Forwards requests to the local Ollama.
#[derive(Debug, Clone)]
pub struct LocalOllama {
    endpoint: OllamaEndpoint,
    http: Client<HttpConnector, ForwardBody>,
    first_byte_timeout: Duration,
    refresh: Option<OllamaRefresh>,
    models: Option<tokio::sync::watch::Receiver<ollamacron_ollama::OllamaState>>,
}

/// What the local Ollama answered: status, content type, and the body.
pub struct Forwarded {
    /// HTTP status.
    pub status: u16,
    /// Content type.
    pub content_type: String,
    /// The body, as it comes.
    pub body: Incoming,
}

impl LocalOllama {
    /// Forward to the Ollama at `endpoint`; the answer's head must come
    /// within `first_byte_timeout`.
    #[must_use]
    pub fn new(endpoint: OllamaEndpoint, first_byte_timeout: Duration) -> Self {
        Self {
            endpoint,
            http: ollamacron_http::http_client(),
            first_byte_timeout,
            refresh: None,
            models: None,
        }
    }

    /// Know the local Ollama's models from `state` (its watcher's), so
    /// the gateway routes to every one of them, whether or not the node's
    /// record advertises it.
    #[must_use]
    pub fn with_models(
        mut self,
        state: tokio::sync::watch::Receiver<ollamacron_ollama::OllamaState>,
    ) -> Self {
        self.models = Some(state);
        self
    }

    /// The local Ollama's model `name` (`name` = `name:latest`) as last
    /// read, with Ollama's version.
    #[must_use]
    pub fn model(&self, name: &str) -> Option<(ollamacron_ollama::LocalModel, String)> {
        match &*self.models.as_ref()?.borrow() {
            ollamacron_ollama::OllamaState::Up(snapshot) => snapshot
                .models
                .iter()
                .find(|m| ollamacron_node_core::registry::same_model(&m.name, name))
                .map(|m| (m.clone(), snapshot.version.clone())),
            _ => None,
        }
    }

    /// The local Ollama's models as last read, with its version (none
    /// while it is down or unknown, or without [`LocalOllama::with_models`]).
    #[must_use]
    pub fn models(&self) -> Option<ollamacron_ollama::OllamaSnapshot> {
        match &*self.models.as_ref()?.borrow() {
            ollamacron_ollama::OllamaState::Up(snapshot) => Some(snapshot.clone()),
            _ => None,
        }
    }

    /// After each request Ollama answers, ask `refresh`'s watcher to read
    /// Ollama again: the model is loaded now, and the record says so.
    #[must_use]
    pub fn with_refresh(mut self, refresh: OllamaRefresh) -> Self {
        self.refresh = Some(refresh);
        self
    }

    /// POST `body` (all of it at hand) to `path` on the local Ollama.
    ///
    /// # Errors
    /// As [`LocalOllama::forward`].
    pub async fn forward_bytes(&self, path: &str, body: Bytes) -> Result<Forwarded, String> {
        let length = u64::try_from(body.len()).unwrap_or(u64::MAX);
        let body = Full::new(body).map_err(|never| match never {}).boxed();
        self.forward(path, body, length).await
    }

    /// POST `body`, `body_bytes` long, to `path` on the local Ollama,
    /// streaming it as it comes.
    ///
    /// # Errors
    /// A path not in [`FORWARDED_PATHS`], Ollama unreachable, the body
    /// broke off, or no answer in time.
    pub async fn forward(
        &self,
        path: &str,
        body: ForwardBody,
        body_bytes: u64,
    ) -> Result<Forwarded, String> {
        if !FORWARDED_PATHS.contains(&path) {
            return Err(format!("{path} is not forwarded"));
        }
        let request = hyper::Request::post(self.endpoint.url(path))
            .header("content-type", "application/json")
            .header("content-length", body_bytes)
            .body(body)
            .map_err(|e| e.to_string())?;
        let response = tokio::time::timeout(self.first_byte_timeout, self.http.request(request))
            .await
            .map_err(|_| {
                format!(
                    "Ollama at {} did not answer within {:?}",
                    self.endpoint, self.first_byte_timeout
                )
            })?
            .map_err(|e| format!("Ollama at {} is unreachable: {e}", self.endpoint))?;
        if let Some(refresh) = &self.refresh {
            refresh.now();
        }
        let content_type = response
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/json")
            .to_owned();
        Ok(Forwarded {
            status: response.status().as_u16(),
            content_type,
            body: response.into_body(),
        })
    }
}

/// How many requests this node's Ollama is serving for peers right now;
/// advertised with its models so gateways prefer idle nodes.
#[derive(Debug, Clone, Default)]
pub struct InferenceLoad(Arc<std::sync::atomic::AtomicUsize>);

impl InferenceLoad {
    /// Requests in flight now.
    #[must_use]
    pub fn current(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn enter(&self) -> LoadGuard {
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        LoadGuard(self.clone())
    }
}

/// One request counted in [`InferenceLoad`] until dropped.
struct LoadGuard(InferenceLoad);

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.0.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How many peers' requests a node serves at once, and how large.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// In total.
    pub total: usize,
    /// From one peer.
    pub per_peer: usize,
    /// Largest request body taken from a peer (`gateway_max_request_bytes`).
    pub max_request_bytes: u64,
}

impl ServeLimits {
    /// The settings of `config`: `gateway_max_concurrent`,
    /// `gateway_max_concurrent_per_peer`, `gateway_max_request_bytes`.
    #[must_use]
    pub fn from_config(config: &ollamacron_node_core::config::NodeConfig) -> Self {
        Self {
            total: config.gateway_max_concurrent,
            per_peer: config.gateway_max_concurrent_per_peer,
            max_request_bytes: config.gateway_max_request_bytes.bytes(),
        }
    }
}

/// Serve inference requests from peers on `control` until it is dropped,
/// within `limits` (more are refused at once with 429, so the asking
/// gateway tries another node), on [`INFER_PROTOCOL`] and
/// [`INFER_PROTOCOL_V1`].
///
/// # Errors
/// The protocols are already being accepted on this node.
pub async fn serve_inference(
    mut control: Control,
    ollama: LocalOllama,
    limits: ServeLimits,
    load: InferenceLoad,
) -> Result<(), String> {
    let current = control
        .accept(INFER_PROTOCOL)
        .map_err(|e| e.to_string())?
        .map(|(peer, stream)| (peer, stream, Version::Two));
    let first = control
        .accept(INFER_PROTOCOL_V1)
        .map_err(|e| e.to_string())?
        .map(|(peer, stream)| (peer, stream, Version::One));
    let mut incoming = futures::stream::select(current, first);
    let slots = Arc::new(Semaphore::new(limits.total));
    let in_flight: Arc<InFlight<PeerId>> = Arc::default();
    while let Some((peer, stream, version)) = incoming.next().await {
        let ollama = ollama.clone();
        let permit = slots.clone().try_acquire_owned().ok();
        let slot = in_flight.try_start(&peer, limits.per_peer);
        let load = load.clone();
        tokio::spawn(async move {
            let (reader, mut writer) = stream.split();
            if permit.is_none() || slot.is_none() {
                tracing::debug!(%peer, "inference request refused: too many in flight");
                let _ = answer_error(&mut writer, 429, "too many requests in flight on this node")
                    .await;
            } else {
                let _busy = load.enter();
                if let Err(e) = serve_one(
                    reader,
                    &mut writer,
                    &ollama,
                    Asked {
                        by: peer,
                        version,
                        max_request_bytes: limits.max_request_bytes,
                    },
                )
                .await
                {
                    tracing::debug!(%peer, error = %e, "inference request ended with an error");
                }
            }
            // Close, so what was written reaches the asker before the
            // stream goes (dropping it would reset it).
            let _ = writer.close().await;
            drop((permit, slot));
        });
    }
    Ok(())
}

/// Which version of the protocol a stream speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    One,
    Two,
}

async fn answer_error<W: AsyncWrite + Unpin>(
    stream: &mut W,
    status: u16,
    message: &str,
) -> Result<(), String> {
    let head = InferHead {
        status,
        content_type: "application/json".to_owned(),
    };
    let body = serde_json::json!({ "error": message }).to_string();
    let mut frames = Vec::new();
    encode_head(&mut frames, &head)?;
    encode_frame(&mut frames, FrameKind::Data, body.as_bytes()).map_err(|e| e.to_string())?;
    encode_frame(&mut frames, FrameKind::End, &[]).map_err(|e| e.to_string())?;
    send_pending(stream, &mut frames).await
}

/// Append the head frame of an answer.
fn encode_head(frames: &mut Vec<u8>, head: &InferHead) -> Result<(), String> {
    let payload = serde_json::to_vec(head).map_err(|e| e.to_string())?;
    encode_frame(frames, FrameKind::Head, &payload).map_err(|e| e.to_string())
}

/// A request body arriving over a channel, as frames come off the stream.
struct ChannelBody {
    rx: mpsc::Receiver<Result<Bytes, std::io::Error>>,
    length: u64,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        self.rx
            .poll_recv(cx)
            .map(|next| next.map(|piece| piece.map(Frame::data)))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.length)
    }
}

/// Move a request body's data frames from the stream into `tx` until its
/// end frame, checking they add up to `expected` bytes. When Ollama stops
/// reading early the rest is still read off the stream (and dropped).
async fn pump_body(
    reader: &mut ReadHalf<Stream>,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    expected: u64,
) -> Result<(), String> {
    let mut received = 0u64;
    loop {
        // Once Ollama has stopped reading (it answered early) the asker
        // may stop sending too: only its going away ends the wait then.
        let frame = if tx.is_closed() {
            read_frame(reader).await
        } else {
            tokio::time::timeout(REQUEST_READ_TIMEOUT, read_frame(reader))
                .await
                .map_err(|_| format!("the request body stalled for {REQUEST_READ_TIMEOUT:?}"))?
        };
        let (kind, data) = frame.map_err(|e| format!("the request body broke off: {e}"))?;
        match kind {
            FrameKind::Data => {
                received = received.saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
                if received > expected {
                    return Err(format!(
                        "the request body is longer than the {expected} bytes announced"
                    ));
                }
                // A closed channel: Ollama answered without reading it all.
                let _ = tx.send(Ok(Bytes::from(data))).await;
            }
            FrameKind::End if received == expected => return Ok(()),
            FrameKind::End => {
                return Err(format!(
                    "the request body ended after {received} of the {expected} bytes announced"
                ));
            }
            other => return Err(format!("a {other:?} frame inside the request body")),
        }
    }
}

/// Why the reading side of an exchange stopped.
enum WatchEnd {
    /// The request body did not arrive as announced.
    BodyFailed(String),
    /// The asking node went away after its request.
    AskerGone(String),
}

impl WatchEnd {
    fn reason(&self) -> &str {
        match self {
            Self::BodyFailed(reason) | Self::AskerGone(reason) => reason,
        }
    }
}

/// Completes when the asking node goes away (or sends anything after its
/// request, which it never does): the reason.
async fn asker_gone(reader: &mut ReadHalf<Stream>) -> String {
    let mut probe = [0u8; 1];
    match reader.read(&mut probe).await {
        Ok(0) => "the asking node closed the stream".to_owned(),
        Ok(_) => "the asking node sent more after its request".to_owned(),
        Err(e) => format!("the asking node went away: {e}"),
    }
}

/// Who asks, in which version of the protocol, within which limit.
struct Asked {
    by: PeerId,
    version: Version,
    max_request_bytes: u64,
}

async fn serve_one(
    mut reader: ReadHalf<Stream>,
    writer: &mut WriteHalf<Stream>,
    ollama: &LocalOllama,
    asked: Asked,
) -> Result<(), String> {
    let Asked {
        by,
        version,
        max_request_bytes,
    } = asked;
    let (kind, payload) = tokio::time::timeout(REQUEST_READ_TIMEOUT, read_frame(&mut reader))
        .await
        .map_err(|_| "no request in time".to_owned())?
        .map_err(|e| e.to_string())?;
    let mut trace = None;
    let (path, body, body_bytes, tx) = match (version, kind) {
        (Version::Two, FrameKind::RequestHead) => {
            let head: InferRequestHead = match decode("request head", &payload) {
                Ok(h) => h,
                Err(e) => return answer_error(writer, 400, &e.to_string()).await,
            };
            if head.body_bytes > max_request_bytes {
                let message = format!(
                    "the request body of {} bytes is over this node's limit of {max_request_bytes} (gateway_max_request_bytes)",
                    head.body_bytes
                );
                return answer_error(writer, 413, &message).await;
            }
            if let Some(traceparent) = &head.traceparent {
                match TraceContext::parse(traceparent, head.tracestate.as_deref()) {
                    Ok(context) => trace = Some(context),
                    // A broken context costs the request nothing.
                    Err(e) => {
                        tracing::debug!(%by, error = %e, "ignoring the request's trace context");
                    }
                }
            }
            let (tx, rx) = mpsc::channel(BODY_QUEUE_FRAMES);
            let body = ChannelBody {
                rx,
                length: head.body_bytes,
            };
            (head.path, BoxBody::new(body), head.body_bytes, Some(tx))
        }
        (Version::One, FrameKind::Request) => {
            let request: InferRequest = match decode("request", &payload) {
                Ok(r) => r,
                Err(e) => return answer_error(writer, 400, &e.to_string()).await,
            };
            let length = u64::try_from(request.body.len()).unwrap_or(u64::MAX);
            let body = Full::new(Bytes::from(request.body))
                .map_err(|never| match never {})
                .boxed();
            (request.path, body, length, None)
        }
        (_, other) => {
            let message = format!("a request must start with its head, not a {other:?} frame");
            return answer_error(writer, 400, &message).await;
        }
    };
    // The serving side of the asker's trace (a root of its own when it
    // sent none): Ollama's first byte, then the stream.
    let span = tracing::info_span!(
        "serve.inference",
        otel.kind = "server",
        http.route = %path,
        asker = %by,
        http.status_code = tracing::field::Empty,
        first_byte_ms = tracing::field::Empty,
        bytes = tracing::field::Empty,
    );
    if let Some(trace) = &trace {
        trace.adopt(&span);
    }
    answer(
        reader,
        writer,
        ollama,
        Request {
            path,
            body,
            body_bytes,
            tx,
            span: span.clone(),
        },
    )
    .instrument(span)
    .await
}

/// A request read off a stream, for Ollama: its body arrives through
/// `tx` (version 2.0.0) or is whole already.
struct Request {
    path: String,
    body: BoxBody<Bytes, std::io::Error>,
    body_bytes: u64,
    tx: Option<mpsc::Sender<Result<Bytes, std::io::Error>>>,
    /// `serve.inference`, which the answer's status, first byte and size
    /// are recorded on.
    span: tracing::Span,
}

async fn answer(
    mut reader: ReadHalf<Stream>,
    writer: &mut WriteHalf<Stream>,
    ollama: &LocalOllama,
    request: Request,
) -> Result<(), String> {
    let Request {
        path,
        body,
        body_bytes,
        tx,
        span,
    } = request;
    let started = std::time::Instant::now();
    // One reader of the stream for the whole exchange, never cancelled
    // inside a frame: it moves the body to Ollama, then watches for the
    // asking node going away, which cancels the request to Ollama.
    let watch = async {
        if let Some(tx) = tx
            && let Err(reason) = pump_body(&mut reader, tx.clone(), body_bytes).await
        {
            let _ = tx.send(Err(std::io::Error::other(reason.clone()))).await;
            return WatchEnd::BodyFailed(reason);
        }
        WatchEnd::AskerGone(asker_gone(&mut reader).await)
    };
    tokio::pin!(watch);
    let forwarded = tokio::select! {
        forwarded = ollama
            .forward(&path, body, body_bytes)
            .instrument(tracing::info_span!("serve.ollama", http.route = %path)) => forwarded,
        end = &mut watch => return match end {
            // An answer, so the asker knows not to send it again.
            WatchEnd::BodyFailed(reason) => answer_error(writer, 400, &reason).await,
            WatchEnd::AskerGone(reason) => Err(reason),
        },
    };
    let forwarded = match forwarded {
        Ok(f) => f,
        Err(e) => return answer_error(writer, 502, &e).await,
    };
    span.record("http.status_code", forwarded.status);
    let head = InferHead {
        status: forwarded.status,
        content_type: forwarded.content_type,
    };
    let mut body = forwarded.body;
    let mut sent_bytes: u64 = 0;
    // Frames that are ready together (the head and a whole answer, or the
    // last chunk and the end) go out in one write; each is sent before
    // the body is waited on again, so tokens still leave one by one, and a
    // slow reader slows Ollama down. Dropping the body when the asker goes
    // cancels the request to Ollama, even while Ollama is still thinking.
    let mut pending = Vec::new();
    encode_head(&mut pending, &head)?;
    loop {
        let next = match body.frame().now_or_never() {
            Some(next) => next,
            None => {
                send_pending(writer, &mut pending).await?;
                tokio::select! {
                    frame = body.frame() => frame,
                    end = &mut watch => return Err(format!("{}: request cancelled", end.reason())),
                }
            }
        };
        let Some(frame) = next else {
            break;
        };
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    if sent_bytes == 0 && !data.is_empty() {
                        span.record("first_byte_ms", elapsed_ms(started));
                    }
                    sent_bytes =
                        sent_bytes.saturating_add(u64::try_from(data.len()).unwrap_or(u64::MAX));
                    for chunk in data.chunks(crate::frame::MAX_FRAME_BYTES) {
                        if pending.len() + chunk.len() > COALESCE_BYTES {
                            send_pending(writer, &mut pending).await?;
                        }
                        encode_frame(&mut pending, FrameKind::Data, chunk)
                            .map_err(|e| e.to_string())?;
                    }
                }
            }
            Err(e) => {
                let reason = format!("Ollama's answer broke off: {e}");
                let _ = encode_frame(&mut pending, FrameKind::Error, reason.as_bytes());
                let _ = send_pending(writer, &mut pending).await;
                return Err(reason);
            }
        }
    }
    encode_frame(&mut pending, FrameKind::End, &[]).map_err(|e| e.to_string())?;
    span.record("bytes", sent_bytes);
    send_pending(writer, &mut pending).await
}

/// Milliseconds since `started`, for a span's field.
fn elapsed_ms(started: std::time::Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Write and flush the gathered frames, if any.
async fn send_pending<W: AsyncWrite + Unpin>(
    writer: &mut W,
    pending: &mut Vec<u8>,
) -> Result<(), String> {
    if pending.is_empty() {
        return Ok(());
    }
    writer.write_all(pending).await.map_err(|e| e.to_string())?;
    writer.flush().await.map_err(|e| e.to_string())?;
    pending.clear();
    Ok(())
}
