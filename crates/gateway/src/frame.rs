//! Frames of the inference protocol: `kind: u8`, `length: u32` (big
//! endian), `length` bytes.
//!
//! `/ollamacron/infer/2.0.0`: the asking node sends a request head (JSON
//! [`InferRequestHead`]: the HTTP path and the body's length), the body in
//! data frames of at most [`REQUEST_CHUNK_BYTES`], and an end frame; the
//! serving node answers with a head (JSON [`InferHead`]: status, content
//! type), data chunks, and an end or error frame.
//!
//! `/ollamacron/infer/1.0.0` (still served) has one request frame (JSON
//! [`InferRequest`], the body inside it) instead of the head, data and end.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use serde::{Deserialize, Serialize};

/// Largest frame payload: a piece of a request body or of an answer.
pub const MAX_FRAME_BYTES: usize = 1024 * 1024;

/// The size of the data frames an asking node cuts a request body into.
pub const REQUEST_CHUNK_BYTES: usize = 256 * 1024;

/// Payloads up to this size go out with their frame header in one write
/// (one transport frame) rather than two; also the size up to which
/// several frames are gathered into one write.
pub const COALESCE_BYTES: usize = 64 * 1024;

/// A frame's kind and length.
const FRAME_HEADER_BYTES: usize = 5;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// The whole request of version 1.0.0: JSON [`InferRequest`].
    Request = 1,
    /// The answer's status and content type: JSON [`InferHead`].
    Head = 2,
    /// A chunk of the answer's body.
    Data = 3,
    /// The answer is complete.
    End = 4,
    /// The answer broke off: a UTF-8 reason.
    Error = 5,
    /// The start of a request of version 2.0.0: JSON [`InferRequestHead`];
    /// its body follows in data frames, closed by an end frame.
    RequestHead = 6,
}

impl FrameKind {
    fn from_byte(byte: u8) -> Option<Self> {
        Some(match byte {
            1 => Self::Request,
            2 => Self::Head,
            3 => Self::Data,
            4 => Self::End,
            5 => Self::Error,
            6 => Self::RequestHead,
            _ => return None,
        })
    }
}

/// The start of a request (version 2.0.0): where it goes and how long its
/// body is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InferRequestHead {
    /// The HTTP path (`/api/chat`, `/v1/chat/completions`, …).
    pub path: String,
    /// The body's length in bytes, which its data frames add up to.
    pub body_bytes: u64,
    /// The W3C `traceparent` of the asking node's span, when it records
    /// traces: the serving node's spans join its trace. Left out when
    /// there is none; nodes that predate it ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// The W3C `tracestate` that goes with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

/// A whole request of version 1.0.0, forwarded to the serving node's
/// Ollama.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InferRequest {
    /// The HTTP path (`/api/chat`, `/v1/chat/completions`, …).
    pub path: String,
    /// The JSON body as the client sent it.
    pub body: String,
}

/// The head of an answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InferHead {
    /// HTTP status from the serving Ollama.
    pub status: u16,
    /// Its content type (`application/json`, `application/x-ndjson`,
    /// `text/event-stream`).
    pub content_type: String,
}

/// A frame that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed or ended inside a frame.
    #[error("reading a frame: {0}")]
    Io(#[from] std::io::Error),
    /// A frame kind this version does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A frame over [`MAX_FRAME_BYTES`].
    #[error("a frame of {0} bytes is over the limit of {MAX_FRAME_BYTES}")]
    TooLarge(usize),
    /// A request or head that is not the expected JSON.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// Which frame.
        what: &'static str,
        /// The decoder's complaint.
        reason: String,
    },
}

/// Write one frame.
///
/// # Errors
/// The payload is over [`MAX_FRAME_BYTES`] or the stream failed.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    io: &mut W,
    kind: FrameKind,
    payload: &[u8],
) -> Result<(), FrameError> {
    if payload.len() <= COALESCE_BYTES {
        let mut frame = Vec::with_capacity(FRAME_HEADER_BYTES + payload.len());
        encode_frame(&mut frame, kind, payload)?;
        io.write_all(&frame).await?;
    } else {
        io.write_all(&frame_header(kind, payload.len())?).await?;
        io.write_all(payload).await?;
    }
    io.flush().await?;
    Ok(())
}

/// Append one frame to `buf`, to go out with others in one write.
///
/// # Errors
/// The payload is over [`MAX_FRAME_BYTES`].
pub fn encode_frame(buf: &mut Vec<u8>, kind: FrameKind, payload: &[u8]) -> Result<(), FrameError> {
    buf.extend_from_slice(&frame_header(kind, payload.len())?);
    buf.extend_from_slice(payload);
    Ok(())
}

/// The kind and length in front of a payload of `length` bytes.
fn frame_header(kind: FrameKind, length: usize) -> Result<[u8; FRAME_HEADER_BYTES], FrameError> {
    let wire = u32::try_from(length)
        .ok()
        .filter(|_| length <= MAX_FRAME_BYTES)
        .ok_or(FrameError::TooLarge(length))?;
    let mut header = [0u8; FRAME_HEADER_BYTES];
    header[0] = kind as u8;
    header[1..].copy_from_slice(&wire.to_be_bytes());
    Ok(header)
}

/// Read one frame; the length is checked before anything is allocated.
///
/// # Errors
/// The stream failed or ended, an unknown kind, or a frame over the limit.
pub async fn read_frame<R: AsyncRead + Unpin>(
    io: &mut R,
) -> Result<(FrameKind, Vec<u8>), FrameError> {
    let mut header = [0u8; FRAME_HEADER_BYTES];
    io.read_exact(&mut header).await?;
    let kind = FrameKind::from_byte(header[0]).ok_or(FrameError::UnknownKind(header[0]))?;
    let length = usize::try_from(u32::from_be_bytes([
        header[1], header[2], header[3], header[4],
    ]))
    .unwrap_or(usize::MAX);
    if length > MAX_FRAME_BYTES {
        return Err(FrameError::TooLarge(length));
    }
    let mut payload = vec![0u8; length];
    io.read_exact(&mut payload).await?;
    Ok((kind, payload))
}

/// Decode a JSON frame payload.
///
/// # Errors
/// It is not the expected JSON.
pub fn decode<T: serde::de::DeserializeOwned>(
    what: &'static str,
    payload: &[u8],
) -> Result<T, FrameError> {
    serde_json::from_slice(payload).map_err(|e| FrameError::Malformed {
        what,
        reason: e.to_string(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use futures::io::Cursor;
    use proptest::prelude::*;

    #[test]
    fn frames_round_trip() {
        futures::executor::block_on(async {
            let mut buf = Cursor::new(Vec::new());
            write_frame(&mut buf, FrameKind::Data, b"hello")
                .await
                .unwrap();
            write_frame(&mut buf, FrameKind::End, b"").await.unwrap();
            let mut gathered = Vec::new();
            encode_frame(&mut gathered, FrameKind::Head, b"{}").unwrap();
            futures::AsyncWriteExt::write_all(&mut buf, &gathered)
                .await
                .unwrap();
            buf.set_position(0);
            assert_eq!(
                read_frame(&mut buf).await.unwrap(),
                (FrameKind::Data, b"hello".to_vec())
            );
            assert_eq!(
                read_frame(&mut buf).await.unwrap(),
                (FrameKind::End, Vec::new())
            );
            assert_eq!(
                read_frame(&mut buf).await.unwrap(),
                (FrameKind::Head, b"{}".to_vec())
            );
            assert!(matches!(read_frame(&mut buf).await, Err(FrameError::Io(_))));
        });
    }

    #[test]
    fn a_request_head_carries_a_trace_context_only_when_there_is_one() {
        // As a node before traces sent it, and as one that traces does.
        let old: InferRequestHead =
            decode("request head", br#"{"path":"/api/chat","body_bytes":7}"#).unwrap();
        assert_eq!(old.traceparent, None);
        let traced = InferRequestHead {
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            tracestate: None,
            ..old.clone()
        };
        let json = serde_json::to_string(&traced).unwrap();
        assert_eq!(
            json,
            r#"{"path":"/api/chat","body_bytes":7,"traceparent":"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}"#
        );
        assert_eq!(
            serde_json::to_string(&old).unwrap(),
            r#"{"path":"/api/chat","body_bytes":7}"#,
            "nothing new on the wire without a trace"
        );
        let back: InferRequestHead = decode("request head", json.as_bytes()).unwrap();
        assert_eq!(back, traced);
    }

    #[test]
    fn oversized_and_unknown_frames_are_refused_before_allocating() {
        futures::executor::block_on(async {
            let mut huge = vec![FrameKind::Data as u8];
            huge.extend_from_slice(&u32::MAX.to_be_bytes());
            assert!(matches!(
                read_frame(&mut Cursor::new(huge)).await,
                Err(FrameError::TooLarge(_))
            ));
            let unknown = vec![9u8, 0, 0, 0, 0];
            assert!(matches!(
                read_frame(&mut Cursor::new(unknown)).await,
                Err(FrameError::UnknownKind(9))
            ));
            let too_big = vec![0u8; MAX_FRAME_BYTES + 1];
            let mut sink = Cursor::new(Vec::new());
            assert!(matches!(
                write_frame(&mut sink, FrameKind::Data, &too_big).await,
                Err(FrameError::TooLarge(_))
            ));
        });
    }

    proptest! {
        #[test]
        fn any_bytes_decode_to_a_frame_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            futures::executor::block_on(async {
                let _ = read_frame(&mut Cursor::new(bytes.clone())).await;
                let _ = decode::<InferRequest>("request", &bytes);
                let _ = decode::<InferHead>("head", &bytes);
                let _ = decode::<InferRequestHead>("request head", &bytes);
            });
        }
    }
}
