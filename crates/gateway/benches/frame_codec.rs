//! The inference protocol's frame codec, as the asking node uses it to
//! send a request and the serving node to read it: a request head (JSON
//! `InferRequestHead` in one frame), a small request coalesced into one
//! write (head, body and end frames together), and a 1 MiB body cut into
//! data frames of `REQUEST_CHUNK_BYTES` (each written as header and
//! payload), each encoded and decoded. In memory: what the codec costs,
//! not the transport.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use futures::executor::block_on;
use futures::io::Cursor;
use ollamacron_gateway::frame::{
    COALESCE_BYTES, FrameKind, InferRequestHead, REQUEST_CHUNK_BYTES, decode, encode_frame,
    read_frame, write_frame,
};

/// The large body: as big as a request with an image or a long context.
const LARGE_BODY_BYTES: usize = 1024 * 1024;
/// The small body: a chat turn, sent coalesced (it fits [`COALESCE_BYTES`]).
const SMALL_BODY_BYTES: usize = 4 * 1024;
const _: () = assert!(
    SMALL_BODY_BYTES <= COALESCE_BYTES,
    "the small request is coalesced"
);
/// A frame's kind and length, in front of each payload.
const FRAME_HEADER_BYTES: usize = 5;

/// A body of `bytes` bytes of JSON-looking text.
fn body(bytes: usize) -> Vec<u8> {
    br#"{"role":"user","content":"tell me about frames"},"#
        .iter()
        .copied()
        .cycle()
        .take(bytes)
        .collect()
}

fn head(body_bytes: usize) -> InferRequestHead {
    InferRequestHead {
        path: "/api/chat".to_owned(),
        body_bytes: u64::try_from(body_bytes).unwrap(),
        traceparent: None,
        tracestate: None,
    }
}

/// The request head's frame, as the asking node builds it.
fn encode_head(frames: &mut Vec<u8>, head: &InferRequestHead) {
    let json = serde_json::to_vec(head).unwrap();
    encode_frame(frames, FrameKind::RequestHead, &json).unwrap();
}

/// A small request in one buffer (one write): head, data, end.
fn encode_coalesced(frames: &mut Vec<u8>, head: &InferRequestHead, body: &[u8]) {
    encode_head(frames, head);
    encode_frame(frames, FrameKind::Data, body).unwrap();
    encode_frame(frames, FrameKind::End, &[]).unwrap();
}

/// A large body as the asking node sends it: data frames of
/// [`REQUEST_CHUNK_BYTES`], then an end frame.
async fn write_body(sink: &mut Vec<u8>, body: &[u8]) {
    for chunk in body.chunks(REQUEST_CHUNK_BYTES) {
        write_frame(sink, FrameKind::Data, chunk).await.unwrap();
    }
    write_frame(sink, FrameKind::End, &[]).await.unwrap();
}

/// Read a request's head frame and decode it, as the serving node does.
async fn read_head(wire: &mut Cursor<&[u8]>) -> InferRequestHead {
    let (kind, payload) = read_frame(wire).await.unwrap();
    assert_eq!(kind, FrameKind::RequestHead);
    decode("request head", &payload).unwrap()
}

/// Read data frames up to the end frame, gathering the body.
async fn read_body(wire: &mut Cursor<&[u8]>, body: &mut Vec<u8>) {
    loop {
        match read_frame(wire).await.unwrap() {
            (FrameKind::Data, data) => body.extend_from_slice(&data),
            (FrameKind::End, _) => return,
            (kind, _) => panic!("unexpected {kind:?} frame"),
        }
    }
}

fn bench_frame_codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame_codec");

    let large_head = head(LARGE_BODY_BYTES);
    let mut frames = Vec::new();
    group.bench_function("encode/request_head", |b| {
        b.iter(|| {
            frames.clear();
            encode_head(&mut frames, black_box(&large_head));
            black_box(frames.len())
        });
    });
    let mut wire = Vec::new();
    encode_head(&mut wire, &large_head);
    group.bench_function("decode/request_head", |b| {
        b.iter(|| block_on(read_head(&mut Cursor::new(black_box(wire.as_slice())))));
    });

    let small = body(SMALL_BODY_BYTES);
    let small_head = head(SMALL_BODY_BYTES);
    group.throughput(Throughput::Bytes(u64::try_from(SMALL_BODY_BYTES).unwrap()));
    group.bench_function("encode/4KiB_request_coalesced", |b| {
        b.iter(|| {
            frames.clear();
            encode_coalesced(&mut frames, &small_head, black_box(&small));
            black_box(frames.len())
        });
    });
    let mut wire = Vec::new();
    encode_coalesced(&mut wire, &small_head, &small);
    let mut received = Vec::with_capacity(SMALL_BODY_BYTES);
    group.bench_function("decode/4KiB_request_coalesced", |b| {
        b.iter(|| {
            received.clear();
            block_on(async {
                let mut wire = Cursor::new(black_box(wire.as_slice()));
                black_box(read_head(&mut wire).await);
                read_body(&mut wire, &mut received).await;
            });
            black_box(received.len())
        });
    });

    let large = body(LARGE_BODY_BYTES);
    let frame_count = LARGE_BODY_BYTES.div_ceil(REQUEST_CHUNK_BYTES) + 1;
    let mut sink = Vec::with_capacity(LARGE_BODY_BYTES + frame_count * FRAME_HEADER_BYTES);
    group.throughput(Throughput::Bytes(u64::try_from(LARGE_BODY_BYTES).unwrap()));
    group.bench_function("encode/1MiB_body", |b| {
        b.iter(|| {
            sink.clear();
            block_on(write_body(&mut sink, black_box(&large)));
            black_box(sink.len())
        });
    });
    let mut wire = Vec::new();
    block_on(write_body(&mut wire, &large));
    let mut received = Vec::with_capacity(LARGE_BODY_BYTES);
    group.bench_function("decode/1MiB_body", |b| {
        b.iter(|| {
            received.clear();
            block_on(read_body(
                &mut Cursor::new(black_box(wire.as_slice())),
                &mut received,
            ));
            black_box(received.len())
        });
    });
    assert_eq!(received, large, "the body round-trips");
    group.finish();
}

criterion_group!(benches, bench_frame_codec);
criterion_main!(benches);
