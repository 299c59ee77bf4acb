//! The serving side of `/ollamacron/infer/1.0.0`, and forwarding to the
//! local Ollama (the only Ollama a node ever sends requests to).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use ollamacron_node_core::libp2p::{PeerId, StreamProtocol};
use ollamacron_node_core::libp2p_stream::Control;
use ollamacron_ollama::OllamaEndpoint;
use tokio::sync::Semaphore;

use crate::frame::{FrameKind, InferHead, InferRequest, decode, read_frame, write_frame};
use crate::in_flight::InFlight;

/// The inference stream protocol.
pub const INFER_PROTOCOL: StreamProtocol = StreamProtocol::new("/ollamacron/infer/1.0.0");

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

/// Longest wait for a peer's request frame.
const REQUEST_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Forwards requests to the local Ollama.
#[derive(Debug, Clone)]
pub struct LocalOllama {
    endpoint: OllamaEndpoint,
    http: Client<HttpConnector, Full<Bytes>>,
    first_byte_timeout: Duration,
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
            http: Client::builder(TokioExecutor::new()).build_http(),
            first_byte_timeout,
        }
    }

    /// POST `body` to `path` on the local Ollama.
    ///
    /// # Errors
    /// A path not in [`FORWARDED_PATHS`], Ollama unreachable, or no answer
    /// in time.
    pub async fn forward(&self, path: &str, body: String) -> Result<Forwarded, String> {
        if !FORWARDED_PATHS.contains(&path) {
            return Err(format!("{path} is not forwarded"));
        }
        let request = hyper::Request::post(self.endpoint.url(path))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
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

/// How many peers' requests a node serves at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// In total.
    pub total: usize,
    /// From one peer.
    pub per_peer: usize,
}

/// Serve inference requests from peers on `control` until it is dropped,
/// within `limits` (more are refused at once with 429, so the asking
/// gateway tries another node).
///
/// # Errors
/// The protocol is already being accepted on this node.
pub async fn serve_inference(
    mut control: Control,
    ollama: LocalOllama,
    limits: ServeLimits,
    load: InferenceLoad,
) -> Result<(), String> {
    let mut incoming = control.accept(INFER_PROTOCOL).map_err(|e| e.to_string())?;
    let slots = Arc::new(Semaphore::new(limits.total));
    let in_flight: Arc<InFlight<PeerId>> = Arc::default();
    while let Some((peer, stream)) = incoming.next().await {
        let ollama = ollama.clone();
        let permit = slots.clone().try_acquire_owned().ok();
        let slot = in_flight.try_start(&peer, limits.per_peer);
        let load = load.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            if permit.is_none() || slot.is_none() {
                tracing::debug!(%peer, "inference request refused: too many in flight");
                let _ = answer_error(&mut stream, 429, "too many requests in flight on this node")
                    .await;
            } else {
                let _busy = load.enter();
                if let Err(e) = serve_one(&mut stream, &ollama).await {
                    tracing::debug!(%peer, error = %e, "inference request ended with an error");
                }
            }
            // Close, so what was written reaches the asker before the
            // stream goes (dropping it would reset it).
            let _ = futures::AsyncWriteExt::close(&mut stream).await;
            drop((permit, slot));
        });
    }
    Ok(())
}

async fn answer_error(
    stream: &mut ollamacron_node_core::libp2p::Stream,
    status: u16,
    message: &str,
) -> Result<(), String> {
    let head = InferHead {
        status,
        content_type: "application/json".to_owned(),
    };
    let body = serde_json::json!({ "error": message }).to_string();
    write_head(stream, &head).await?;
    write_frame(stream, FrameKind::Data, body.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    write_frame(stream, FrameKind::End, &[])
        .await
        .map_err(|e| e.to_string())
}

/// Write the head frame of an answer.
async fn write_head(
    stream: &mut ollamacron_node_core::libp2p::Stream,
    head: &InferHead,
) -> Result<(), String> {
    let payload = serde_json::to_vec(head).map_err(|e| e.to_string())?;
    write_frame(stream, FrameKind::Head, &payload)
        .await
        .map_err(|e| e.to_string())
}

async fn serve_one(
    stream: &mut ollamacron_node_core::libp2p::Stream,
    ollama: &LocalOllama,
) -> Result<(), String> {
    let (kind, payload) = tokio::time::timeout(REQUEST_READ_TIMEOUT, read_frame(stream))
        .await
        .map_err(|_| "no request in time".to_owned())?
        .map_err(|e| e.to_string())?;
    if kind != FrameKind::Request {
        return answer_error(stream, 400, "the first frame must be a request").await;
    }
    let request: InferRequest = match decode("request", &payload) {
        Ok(r) => r,
        Err(e) => return answer_error(stream, 400, &e.to_string()).await,
    };
    let forwarded = match ollama.forward(&request.path, request.body).await {
        Ok(f) => f,
        Err(e) => return answer_error(stream, 502, &e).await,
    };
    let head = InferHead {
        status: forwarded.status,
        content_type: forwarded.content_type,
    };
    write_head(stream, &head).await?;
    let mut body = forwarded.body;
    // Each chunk is written before the next is read: a slow reader slows
    // Ollama down. The asking node writes nothing after its request, so a
    // read that returns means it went away: dropping the body then cancels
    // the request to Ollama, even while Ollama is still thinking.
    let mut probe = [0u8; 1];
    loop {
        let next = tokio::select! {
            frame = body.frame() => frame,
            _ = futures::AsyncReadExt::read(stream, &mut probe) => {
                return Err("the asking node went away: request cancelled".to_owned());
            }
        };
        let Some(frame) = next else {
            break;
        };
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    for chunk in data.chunks(crate::frame::MAX_FRAME_BYTES) {
                        write_frame(stream, FrameKind::Data, chunk)
                            .await
                            .map_err(|e| e.to_string())?;
                    }
                }
            }
            Err(e) => {
                let reason = format!("Ollama's answer broke off: {e}");
                let _ = write_frame(stream, FrameKind::Error, reason.as_bytes()).await;
                return Err(reason);
            }
        }
    }
    write_frame(stream, FrameKind::End, &[])
        .await
        .map_err(|e| e.to_string())
}
