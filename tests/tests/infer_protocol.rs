//! `/ollamacron/infer/2.0.0` and 1.0.0 spoken by hand to a serving node: a
//! 1.0.0 request is still answered, a 2.0.0 body shorter than announced or
//! over the node's limit gets an error answer (so the asker never resends
//! it), and a body in many frames reaches Ollama whole.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use futures::{AsyncReadExt, AsyncWriteExt};
use ollamacron_gateway::frame::{
    FrameKind, InferHead, InferRequest, InferRequestHead, decode, read_frame, write_frame,
};
use ollamacron_gateway::{INFER_PROTOCOL, INFER_PROTOCOL_V1, ServeLimits};
use ollamacron_node_core::libp2p::Stream;
use ollamacron_tests::EVENT_TIMEOUT;
use ollamacron_tests::ollama_standin::ReceivedBody;
use ollamacron_tests::pool::{Member, SERVE_LIMITS, member, member_with, models, sees};

const CHAT: &str =
    r#"{"model": "llama3:8b", "messages": [{"role": "user", "content": "hi"}], "stream": false}"#;

/// The answer on `stream`: its head and its body.
async fn answer(stream: &mut Stream) -> (InferHead, String) {
    let read = async {
        let (kind, head) = read_frame(stream).await.unwrap();
        assert_eq!(kind, FrameKind::Head);
        let head: InferHead = decode("head", &head).unwrap();
        let mut body = Vec::new();
        loop {
            match read_frame(stream).await.unwrap() {
                (FrameKind::Data, data) => body.extend(data),
                (FrameKind::End, _) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        (head, String::from_utf8(body).unwrap())
    };
    tokio::time::timeout(EVENT_TIMEOUT, read).await.unwrap()
}

/// The 2.0.0 request head of [`CHAT`], with no trace context.
fn chat_head() -> InferRequestHead {
    InferRequestHead {
        path: "/api/chat".into(),
        body_bytes: CHAT.len() as u64,
        traceparent: None,
        tracestate: None,
    }
}

/// Write `head` on `stream`.
async fn write_head(stream: &mut Stream, head: &InferRequestHead) {
    write_frame(
        stream,
        FrameKind::RequestHead,
        &serde_json::to_vec(head).unwrap(),
    )
    .await
    .unwrap();
}

/// A 2.0.0 request head for a chat of `body_bytes`.
async fn send_head(stream: &mut Stream, body_bytes: u64) {
    let head = InferRequestHead {
        body_bytes,
        ..chat_head()
    };
    write_head(stream, &head).await;
}

async fn pair(limits: ServeLimits) -> (Member, Member) {
    let a = member(&[], None).await;
    let b = member_with(
        models(&["llama3:8b"]),
        Some(&a.bootstrap_addr().await),
        limits,
    )
    .await;
    sees(&a.node, &["llama3:8b"]).await;
    (a, b)
}

async fn open(
    from: &Member,
    to: &Member,
    protocol: ollamacron_node_core::libp2p::StreamProtocol,
) -> Stream {
    from.node
        .stream_control()
        .open_stream(to.node.peer_id(), protocol)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_versions_are_served_and_bad_bodies_get_an_answer() {
    let (a, b) = pair(ServeLimits {
        max_request_bytes: 1024 * 1024,
        ..SERVE_LIMITS
    })
    .await;

    // 1.0.0: the whole request in one frame.
    let mut v1 = open(&a, &b, INFER_PROTOCOL_V1).await;
    let request = InferRequest {
        path: "/api/chat".into(),
        body: CHAT.into(),
    };
    write_frame(
        &mut v1,
        FrameKind::Request,
        &serde_json::to_vec(&request).unwrap(),
    )
    .await
    .unwrap();
    let (head, body) = answer(&mut v1).await;
    assert_eq!(head.status, 200, "{body}");
    assert!(body.contains("\"done\":true"), "{body}");

    // 2.0.0: the body in one-byte frames arrives whole.
    let mut v2 = open(&a, &b, INFER_PROTOCOL).await;
    send_head(&mut v2, CHAT.len() as u64).await;
    for byte in CHAT.as_bytes().chunks(1) {
        write_frame(&mut v2, FrameKind::Data, byte).await.unwrap();
    }
    write_frame(&mut v2, FrameKind::End, &[]).await.unwrap();
    let (head, body) = answer(&mut v2).await;
    assert_eq!(head.status, 200, "{body}");
    let received = b.ollama.models().bodies.last().cloned();
    assert_eq!(
        received,
        Some(ReceivedBody::of("/api/chat", CHAT.as_bytes()))
    );

    // A trace context that is no context (or far too long) costs the
    // request nothing: it is served, the context ignored.
    for (traceparent, tracestate) in [
        ("not-a-traceparent".to_owned(), None),
        ("00-".repeat(10_000), Some("k=v".repeat(10_000))),
        (
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
            Some("\u{1b}[2J=\n".repeat(1_000)),
        ),
    ] {
        let head = InferRequestHead {
            traceparent: Some(traceparent),
            tracestate,
            ..chat_head()
        };
        let (answered, body) = chat(&a, &b, &head).await;
        assert_eq!(answered.status, 200, "{body}");
    }

    // A body that ends short of what its head announced: a 400 answer.
    let mut short = open(&a, &b, INFER_PROTOCOL).await;
    send_head(&mut short, CHAT.len() as u64 + 10).await;
    write_frame(&mut short, FrameKind::Data, CHAT.as_bytes())
        .await
        .unwrap();
    write_frame(&mut short, FrameKind::End, &[]).await.unwrap();
    let (head, body) = answer(&mut short).await;
    assert_eq!(head.status, 400, "{body}");
    assert!(body.contains("bytes announced"), "{body}");

    // Over the node's limit: 413 before any of the body is sent.
    let mut large = open(&a, &b, INFER_PROTOCOL).await;
    send_head(&mut large, 2 * 1024 * 1024).await;
    let (head, body) = answer(&mut large).await;
    assert_eq!(head.status, 413, "{body}");
    assert!(body.contains("gateway_max_request_bytes"), "{body}");
    let _ = large.close().await;

    // A first frame that is no request head: 400.
    let mut wrong = open(&a, &b, INFER_PROTOCOL).await;
    write_frame(&mut wrong, FrameKind::Data, b"hello")
        .await
        .unwrap();
    let (head, _) = answer(&mut wrong).await;
    assert_eq!(head.status, 400);
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(EVENT_TIMEOUT, wrong.read_to_end(&mut rest)).await;
}

/// A full chat over 2.0.0 on a new stream from `from` to `to`: its status.
async fn chat_status(from: &Member, to: &Member) -> u16 {
    chat(from, to, &chat_head()).await.0.status
}

/// [`CHAT`] over 2.0.0 under `head` on a new stream from `from` to `to`:
/// the answer.
async fn chat(from: &Member, to: &Member, head: &InferRequestHead) -> (InferHead, String) {
    let mut stream = open(from, to, INFER_PROTOCOL).await;
    write_head(&mut stream, head).await;
    write_frame(&mut stream, FrameKind::Data, CHAT.as_bytes())
        .await
        .unwrap();
    write_frame(&mut stream, FrameKind::End, &[]).await.unwrap();
    answer(&mut stream).await
}

/// Hostile load on the inference protocol: a peer opening streams in a
/// loop and holding them (a head, then no body) gets its per-peer share
/// and a 429 for every stream beyond it, at once; frames that claim more
/// than the frame limit, or end before their length, get an answer or a
/// closed stream, never an allocation of what they claim; and meanwhile
/// another peer is served. Counts, not times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_in_a_loop_and_bad_frames_leave_the_node_serving_others() {
    const PER_PEER: usize = 4;
    const STREAMS: usize = 100;
    const HELD_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
    let serving = member_with(
        models(&["llama3:8b"]),
        None,
        ServeLimits {
            total: 16,
            per_peer: PER_PEER,
            max_request_bytes: 1024 * 1024,
        },
    )
    .await;
    let addr = serving.bootstrap_addr().await;
    let hostile = member(&[], Some(&addr)).await;
    let honest = member(&[], Some(&addr)).await;
    sees(&hostile.node, &["llama3:8b"]).await;
    sees(&honest.node, &["llama3:8b"]).await;

    let head = serde_json::to_vec(&chat_head()).unwrap();
    // A burst of streams; should a connection close under some of them
    // (a duplicate the tie-break closed after the head was written),
    // again, once the hostile peer's slots are back.
    let mut attempts = 0;
    let (held, refused) = loop {
        let mut streams = Vec::new();
        while streams.len() < STREAMS {
            let mut stream = open(&hostile, &serving, INFER_PROTOCOL).await;
            // A stream on a duplicate connection the tie-break just closed
            // fails at once; open another.
            if write_frame(&mut stream, FrameKind::RequestHead, &head)
                .await
                .is_ok()
            {
                streams.push(stream);
            }
        }
        // A refused stream is answered at once; a held one waits for its
        // body (for up to the node's 10 s request read timeout, twice this).
        let first_frames = futures::future::join_all(streams.into_iter().map(|mut stream| async {
            let first = tokio::time::timeout(HELD_WAIT, read_frame(&mut stream)).await;
            (first, stream)
        }))
        .await;
        let mut held = Vec::new();
        let mut refused = 0;
        let mut lost = Vec::new();
        for (first, stream) in first_frames {
            match first {
                Ok(Ok((FrameKind::Head, head))) => {
                    let head: InferHead = decode("head", &head).unwrap();
                    assert_eq!(head.status, 429);
                    refused += 1;
                }
                Ok(Ok(other)) => panic!("unexpected {other:?}"),
                Ok(Err(e)) => lost.push(e.to_string()),
                Err(_) => held.push(stream),
            }
        }
        if lost.is_empty() {
            break (held, refused);
        }
        attempts += 1;
        assert!(
            attempts < 3,
            "streams closed unanswered in every burst: {lost:?}"
        );
        drop(held);
        tokio::time::timeout(EVENT_TIMEOUT, async {
            while chat_status(&hostile, &serving).await == 429 {
                tokio::time::sleep(ollamacron_tests::POLL_INTERVAL).await;
            }
        })
        .await
        .expect("the hostile peer's slots never came back");
    };
    assert_eq!(held.len(), PER_PEER, "the hostile peer's share is held");
    assert_eq!(refused, STREAMS - PER_PEER);
    // The other peer is served while the hostile one holds its share.
    assert_eq!(chat_status(&honest, &serving).await, 200);

    // A frame claiming 4 GiB: refused by its header, nothing allocated.
    let mut huge = open(&honest, &serving, INFER_PROTOCOL).await;
    huge.write_all(&[6, 0xFF, 0xFF, 0xFF, 0xFF]).await.unwrap();
    huge.flush().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(EVENT_TIMEOUT, huge.read_to_end(&mut rest))
        .await
        .expect("the node hangs on an oversized frame")
        .ok();
    // A frame that ends before its length: the node gives up on it.
    let mut truncated = open(&honest, &serving, INFER_PROTOCOL).await;
    truncated.write_all(&[6, 0, 0, 0, 100]).await.unwrap();
    truncated.write_all(b"{\"path\"").await.unwrap();
    truncated.close().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(EVENT_TIMEOUT, truncated.read_to_end(&mut rest))
        .await
        .expect("the node hangs on a truncated frame")
        .ok();
    // Still serving: the honest peer, and the hostile one once it lets go.
    assert_eq!(chat_status(&honest, &serving).await, 200);
    drop(held);
    let status = tokio::time::timeout(EVENT_TIMEOUT, async {
        loop {
            let status = chat_status(&hostile, &serving).await;
            if status != 429 {
                break status;
            }
            tokio::time::sleep(ollamacron_tests::POLL_INTERVAL).await;
        }
    })
    .await
    .expect("the hostile peer's slots never came back");
    assert_eq!(status, 200);
}
