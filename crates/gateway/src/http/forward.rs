//! Forwarding one request to one serving node: to this node's own Ollama
//! over HTTP, or to a peer on a stream of the inference protocol (the
//! current version, or 1.0.0 for nodes that speak only it), and streaming
//! its answer back as it comes.
//!
//! A stream that ends before any answer is retried on a fresh one (up to
//! [`UNANSWERED_STREAM_RETRIES`]); an answer whose status says another
//! node may serve ([`retryable`]) is a [`Failure`] for the caller to fail
//! over on. After the answer's head, a break ends the body with an error
//! chunk in the answer's own format.

use std::time::Duration;

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::BodyExt;
use ollamacron_node_core::libp2p::PeerId;
use ollamacron_node_core::libp2p_stream;
use ollamacron_telemetry::TraceContext;
use serde_json::json;

use super::Gateway;
use crate::frame::{
    COALESCE_BYTES, FrameKind, InferHead, InferRequest, InferRequestHead, REQUEST_CHUNK_BYTES,
    decode, encode_frame, read_frame, write_frame,
};
use crate::serve::{INFER_PROTOCOL, INFER_PROTOCOL_V1};

/// Statuses after which the next candidate is tried.
fn retryable(status: u16) -> bool {
    status == 404 || status == 429 || status >= 500
}

/// Why a candidate did not serve a request, and its status if it answered.
pub(super) struct Failure {
    /// What went wrong, for the logs and the final 502.
    pub(super) reason: String,
    /// The node's status, when it answered.
    pub(super) status: Option<u16>,
}

impl From<String> for Failure {
    fn from(reason: String) -> Self {
        Self {
            reason,
            status: None,
        }
    }
}

/// Send the request to this node's own Ollama.
pub(super) async fn local_attempt(
    gateway: &Gateway,
    path: &str,
    body: Bytes,
) -> Result<Response, Failure> {
    let local = gateway
        .local
        .as_ref()
        .ok_or_else(|| Failure::from("this node has no Ollama".to_owned()))?;
    let forwarded = local.forward_bytes(path, body).await?;
    if retryable(forwarded.status) {
        return Err(Failure {
            reason: format!("the local Ollama answered {}", forwarded.status),
            status: Some(forwarded.status),
        });
    }
    let stream = forwarded
        .body
        .into_data_stream()
        .map(|chunk| chunk.map_err(std::io::Error::other));
    Ok(streamed(
        forwarded.status,
        &forwarded.content_type,
        Body::from_stream(stream),
    ))
}

/// An error as the last chunk of a streamed answer.
fn error_chunk(content_type: &str, reason: &str) -> Bytes {
    let error = json!({ "error": reason }).to_string();
    Bytes::from(if content_type.starts_with("text/event-stream") {
        format!("data: {error}\n\n")
    } else {
        format!("{error}\n")
    })
}

fn streamed(status: u16, content_type: &str, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

/// The reading half of an inference stream, after the answer's head.
type AnswerStream = futures::io::ReadHalf<ollamacron_node_core::libp2p::Stream>;

/// Why an exchange on a stream gave no answer head.
struct ExchangeError {
    reason: String,
    /// The stream ended before any answer: the serving node never took
    /// the request (see [`UNANSWERED_STREAM_RETRIES`]).
    unanswered: bool,
}

impl From<String> for ExchangeError {
    fn from(reason: String) -> Self {
        Self {
            reason,
            unanswered: false,
        }
    }
}

/// New streams to one peer tried when one ends before any answer. The
/// serving side of `libp2p-stream` hands inbound streams over a channel
/// that holds one, and drops a stream that arrives while it is full
/// (rust-libp2p#5651): under a burst of concurrent requests some streams
/// are closed unread, and a fresh one is the fix.
const UNANSWERED_STREAM_RETRIES: usize = 3;

/// Longest wait for a serving node's answer after sending the body failed
/// (it may have answered early, with 413 or 429, and closed).
const ANSWER_AFTER_SEND_FAILURE: Duration = Duration::from_secs(2);

/// Send a request on a stream of [`INFER_PROTOCOL`] and read the answer's
/// head, which may come before the whole body is sent (a refusal).
async fn exchange(
    stream: ollamacron_node_core::libp2p::Stream,
    path: &str,
    body: &Bytes,
) -> Result<(AnswerStream, InferHead), ExchangeError> {
    let (mut reader, mut writer) = futures::AsyncReadExt::split(stream);
    let head = {
        let send = async {
            // The serving node's spans join this request's trace.
            let trace = TraceContext::current();
            let head = InferRequestHead {
                path: path.to_owned(),
                body_bytes: u64::try_from(body.len()).unwrap_or(u64::MAX),
                tracestate: trace.as_ref().and_then(|t| t.tracestate.clone()),
                traceparent: trace.map(|t| t.traceparent),
            };
            let head = serde_json::to_vec(&head).map_err(|e| e.to_string())?;
            if body.len() <= COALESCE_BYTES {
                // A small request goes out in one write: one transport frame.
                let mut frames = Vec::with_capacity(head.len() + body.len() + 3 * 5);
                encode_frame(&mut frames, FrameKind::RequestHead, &head)
                    .and_then(|()| encode_frame(&mut frames, FrameKind::Data, body))
                    .and_then(|()| encode_frame(&mut frames, FrameKind::End, &[]))
                    .map_err(|e| e.to_string())?;
                futures::AsyncWriteExt::write_all(&mut writer, &frames)
                    .await
                    .map_err(|e| e.to_string())?;
                futures::AsyncWriteExt::flush(&mut writer)
                    .await
                    .map_err(|e| e.to_string())?;
                return Ok(());
            }
            write_frame(&mut writer, FrameKind::RequestHead, &head)
                .await
                .map_err(|e| e.to_string())?;
            for chunk in body.chunks(REQUEST_CHUNK_BYTES) {
                write_frame(&mut writer, FrameKind::Data, chunk)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            write_frame(&mut writer, FrameKind::End, &[])
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        };
        let answer = read_answer_head(&mut reader);
        tokio::pin!(send, answer);
        tokio::select! {
            head = &mut answer => head?,
            sent = &mut send => match sent {
                Ok(()) => answer.await?,
                Err(e) => match tokio::time::timeout(ANSWER_AFTER_SEND_FAILURE, answer).await {
                    Ok(Ok(head)) => head,
                    _ => {
                        return Err(ExchangeError {
                            reason: format!("sending the request failed: {e}"),
                            unanswered: true,
                        });
                    }
                },
            },
        }
    };
    Ok((reader, head))
}

/// The same on a stream of [`INFER_PROTOCOL_V1`], for nodes that speak only
/// it: the request in one frame, so only bodies that fit one.
async fn exchange_v1(
    mut stream: ollamacron_node_core::libp2p::Stream,
    path: &str,
    body: &Bytes,
) -> Result<(AnswerStream, InferHead), ExchangeError> {
    let request = InferRequest {
        path: path.to_owned(),
        body: String::from_utf8(body.to_vec())
            .map_err(|_| "the body is not UTF-8, which infer/1.0.0 needs".to_owned())?,
    };
    let request = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
    write_frame(&mut stream, FrameKind::Request, &request)
        .await
        .map_err(|e| ExchangeError {
            unanswered: matches!(e, crate::frame::FrameError::Io(_)),
            reason: format!("the node speaks only infer/1.0.0: {e}"),
        })?;
    let (mut reader, _writer) = futures::AsyncReadExt::split(stream);
    let head = read_answer_head(&mut reader).await?;
    Ok((reader, head))
}

async fn read_answer_head<R: futures::AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<InferHead, ExchangeError> {
    let (kind, payload) = read_frame(reader).await.map_err(|e| ExchangeError {
        unanswered: matches!(e, crate::frame::FrameError::Io(_)),
        reason: e.to_string(),
    })?;
    if kind != FrameKind::Head {
        return Err(format!("the serving node answered with a {kind:?} frame first").into());
    }
    Ok(decode("head", &payload).map_err(|e| e.to_string())?)
}

/// Send the request to `peer` on a stream of the inference protocol
/// (within `first_byte_timeout` for the answer's head), and stream its
/// answer's body back.
pub(super) async fn remote_attempt(
    gateway: &Gateway,
    peer: PeerId,
    path: &str,
    body: Bytes,
) -> Result<Response, Failure> {
    let mut control: libp2p_stream::Control = gateway.node.stream_control();
    let open = async {
        let mut unanswered = 0;
        loop {
            let exchanged = match control.open_stream(peer, INFER_PROTOCOL).await {
                Ok(stream) => exchange(stream, path, &body).await,
                Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_)) => {
                    match control.open_stream(peer, INFER_PROTOCOL_V1).await {
                        Ok(stream) => exchange_v1(stream, path, &body).await,
                        Err(e) => Err(e.to_string().into()),
                    }
                }
                Err(e) => Err(e.to_string().into()),
            };
            match exchanged {
                Err(e) if e.unanswered && unanswered < UNANSWERED_STREAM_RETRIES => {
                    unanswered += 1;
                    tracing::debug!(%peer, reason = %e.reason, "a stream ended unanswered; opening another");
                }
                other => return other.map_err(|e| e.reason),
            }
        }
    };
    let (stream, head) = tokio::time::timeout(gateway.config.first_byte_timeout, open)
        .await
        .map_err(|_| format!("no answer within {:?}", gateway.config.first_byte_timeout))??;
    if retryable(head.status) {
        return Err(Failure {
            reason: format!("the serving node answered {}", head.status),
            status: Some(head.status),
        });
    }
    // After the head, chunks flow to the client as they come. A break
    // after that ends the answer with an error chunk in its own format
    // (an NDJSON line, or an SSE event), then the stream.
    let content_type = head.content_type.clone();
    let chunks = futures::stream::unfold(Some(stream), move |state| {
        let content_type = content_type.clone();
        async move {
            let mut stream = state?;
            let reason = match read_frame(&mut stream).await {
                Ok((FrameKind::Data, data)) => {
                    return Some((Ok::<_, std::io::Error>(Bytes::from(data)), Some(stream)));
                }
                Ok((FrameKind::End, _)) => return None,
                Ok((FrameKind::Error, reason)) => String::from_utf8_lossy(&reason).into_owned(),
                Ok((kind, _)) => format!("unexpected {kind:?} frame"),
                Err(e) => format!("the serving node went away: {e}"),
            };
            Some((Ok(error_chunk(&content_type, &reason)), None))
        }
    });
    Ok(streamed(
        head.status,
        &head.content_type,
        Body::from_stream(chunks),
    ))
}
