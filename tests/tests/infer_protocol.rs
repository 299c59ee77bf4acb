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

/// A 2.0.0 request head for a chat of `body_bytes`.
async fn send_head(stream: &mut Stream, body_bytes: u64) {
    let head = InferRequestHead {
        path: "/api/chat".into(),
        body_bytes,
    };
    write_frame(
        stream,
        FrameKind::RequestHead,
        &serde_json::to_vec(&head).unwrap(),
    )
    .await
    .unwrap();
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
