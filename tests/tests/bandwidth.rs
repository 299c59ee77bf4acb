//! `max_bandwidth` across the hop: a 5 MB answer from a peer's Ollama,
//! through the gateway of another node, with and without the limit on the
//! serving node, in one run. The limit slows it down; nothing fails.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::time::{Duration, Instant};

use ollamacron_tests::http_request;
use ollamacron_tests::pool::{
    SERVE_LIMITS, member, member_with_settings, models, sees, serve_gateway,
};

/// The answer's size.
const ANSWER_BYTES: usize = 5_000_000;

/// How long a gateway takes to bring a 5 MB answer from a peer whose
/// node runs with `settings`; and that peer's status afterwards.
async fn fetch_through_a_peer(settings: &[(&str, &str)]) -> (Duration, serde_json::Value) {
    let gateway_node = member(&[], None).await;
    let addr = gateway_node.bootstrap_addr().await;
    let server =
        member_with_settings(models(&["big:1b"]), Some(&addr), SERVE_LIMITS, settings).await;
    server.ollama.models().answer_bytes = Some(ANSWER_BYTES);
    sees(&gateway_node.node, &["big:1b"]).await;
    let gw = serve_gateway(&gateway_node.node, Some(gateway_node.local()), &[]).await;
    let body = br#"{"model": "big:1b", "prompt": "a long answer", "stream": false}"#;
    let started = Instant::now();
    let response = http_request(gw, "POST", "/api/generate", Some(body))
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(
        response.status,
        200,
        "{}",
        &response.body[..response.body.len().min(500)]
    );
    let answer = response.json();
    assert_eq!(
        answer["response"].as_str().map(str::len),
        Some(ANSWER_BYTES),
        "the whole answer arrives"
    );
    assert_eq!(
        server.ollama.models().generate_calls,
        1,
        "served by the peer"
    );
    let status = serde_json::to_value(server.node.status().await.unwrap()).unwrap();
    (took, status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_bandwidth_slows_a_long_answer_from_a_peer_and_nothing_fails() {
    let (free, free_status) = fetch_through_a_peer(&[]).await;
    assert!(
        free_status["bandwidth"].is_null(),
        "{}",
        free_status["bandwidth"]
    );
    let (limited, status) = fetch_through_a_peer(&[("max_bandwidth", "1MiB")]).await;
    eprintln!("5 MB one hop away: {free:?} unlimited, {limited:?} with max_bandwidth 1MiB");
    // 5 MB at 1 MiB/s is 4.8 s, less a burst of a tenth of a second.
    assert!(
        limited >= Duration::from_secs(3),
        "limited: {limited:?} (unlimited: {free:?})"
    );
    assert!(
        limited >= free * 3,
        "limited: {limited:?}, unlimited: {free:?}"
    );
    assert_eq!(status["bandwidth"]["limit_bytes_per_s"], 1024 * 1024);
    assert!(
        status["bandwidth"]["outbound_waits"].as_u64().unwrap() > 0,
        "{}",
        status["bandwidth"]
    );
}
