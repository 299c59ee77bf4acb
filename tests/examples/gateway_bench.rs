//! `cargo xtask bench --gateway`: time to first token and tokens per second
//! of streamed `/api/generate` answers from a stand-in Ollama, measured in
//! one run three ways: straight to the stand-in, through the gateway of the
//! node that has the model (local), and through the gateway of another node
//! (one hop over `/ollamacron/infer/1.0.0`). Loopback only.
//!
//! The stand-in paces its answers like a model: `FIRST_TOKEN` before the
//! first token, then one token every `BETWEEN_TOKENS`.

#![allow(
    clippy::print_stdout,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)] // a measurement program

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ollamacron_gateway::{
    GatewayConfig, InferenceLoad, LocalOllama, OllamaAdvertiser, ServeLimits, router,
    serve_inference,
};
use ollamacron_node_core::registry::ServiceQuery;
use ollamacron_ollama::{OllamaClient, OllamaEndpoint, OllamaWatcher, WatchConfig};
use ollamacron_tests::ollama_standin::{Pacing, StandInModels, StandInOllama, tag};
use ollamacron_tests::{TCP_ONLY, eventually_found, loopback_config, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const FIRST_TOKEN: Duration = Duration::from_millis(100);
const BETWEEN_TOKENS: Duration = Duration::from_millis(10);
const TOKENS: usize = 50;
const RUNS: usize = 20;

/// One streamed request: (time to the first token, tokens per second after it).
async fn measure(addr: SocketAddr) -> (Duration, f64) {
    let body = r#"{"model": "bench:1b", "prompt": "go"}"#;
    let request = format!(
        "POST /api/generate HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let started = Instant::now();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    let mut first = None;
    let mut buf = [0u8; 8192];
    loop {
        let n = stream.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        if first.is_none() && String::from_utf8_lossy(&seen).contains("\"response\"") {
            first = Some(started.elapsed());
        }
    }
    let total = started.elapsed();
    let text = String::from_utf8_lossy(&seen);
    let tokens = text.matches("\"done\":false").count();
    assert_eq!(tokens, TOKENS, "every token arrived: {text}");
    let first = first.expect("a first token");
    let rate = (tokens.saturating_sub(1)) as f64 / (total - first).as_secs_f64();
    (first, rate)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

async fn gateway_on(
    node: &ollamacron_node_core::NodeHandle,
    local: Option<LocalOllama>,
) -> SocketAddr {
    let app = router(
        node.clone(),
        local,
        GatewayConfig {
            max_attempts: 3,
            first_byte_timeout: Duration::from_secs(30),
            max_request_bytes: 100 * 1024 * 1024,
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let standin = StandInOllama::start(StandInModels {
        models: vec![tag("bench:1b", "bench", "llama")],
        pacing: Some(Pacing {
            first_token: FIRST_TOKEN,
            between_tokens: BETWEEN_TOKENS,
            tokens: TOKENS,
        }),
        ..StandInModels::default()
    })
    .await;
    let endpoint = OllamaEndpoint::parse(&standin.addr().to_string()).unwrap();
    let serving = start(loopback_config(TCP_ONLY, &[])).await.unwrap();
    let bootstrap = format!("[{}]", serving.dialable_addrs().await.unwrap().remove(0));
    let asking = start(loopback_config(
        TCP_ONLY,
        &[("bootstrap", bootstrap.as_str())],
    ))
    .await
    .unwrap();
    let watcher = OllamaWatcher::spawn(
        OllamaClient::new(endpoint.clone(), Duration::from_secs(2)),
        WatchConfig::default(),
    );
    tokio::spawn(OllamaAdvertiser::new(serving.clone()).run(watcher.subscribe()));
    let local = LocalOllama::new(endpoint, Duration::from_secs(30));
    tokio::spawn(serve_inference(
        serving.stream_control(),
        local.clone(),
        ServeLimits {
            total: 8,
            per_peer: 8,
            max_request_bytes: 100 * 1024 * 1024,
        },
        InferenceLoad::default(),
    ));
    let query = ServiceQuery {
        service_type: Some("llm".into()),
        ..ServiceQuery::default()
    };
    eventually_found(&asking, &query, "the asking node to see the model")
        .await
        .unwrap();
    let local_gateway = gateway_on(&serving, Some(local)).await;
    let hop_gateway = gateway_on(&asking, None).await;

    let paths = [
        ("direct to the stand-in", standin.addr()),
        ("gateway, local", local_gateway),
        ("gateway, one hop", hop_gateway),
    ];
    // Warm every path, then interleave the runs so drift hits all alike.
    for (_, addr) in paths {
        measure(addr).await;
    }
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); paths.len()];
    for _ in 0..RUNS {
        for (i, (_, addr)) in paths.iter().enumerate() {
            let (first, rate) = measure(*addr).await;
            results[i].0.push(first.as_secs_f64() * 1000.0);
            results[i].1.push(rate);
        }
    }
    println!(
        "stand-in: first token after {} ms, then {TOKENS} tokens {} ms apart; {RUNS} runs per path (medians)",
        FIRST_TOKEN.as_millis(),
        BETWEEN_TOKENS.as_millis()
    );
    let (direct_first, direct_rate) = (median(results[0].0.clone()), median(results[0].1.clone()));
    println!(
        "{:<24} {:>12} {:>10} {:>14} {:>10}",
        "path", "first token", "ratio", "tokens/s", "ratio"
    );
    for (i, (name, _)) in paths.iter().enumerate() {
        let first = median(results[i].0.clone());
        let rate = median(results[i].1.clone());
        println!(
            "{name:<24} {first:>9.2} ms {:>9.3}x {rate:>14.1} {:>9.3}x",
            first / direct_first,
            rate / direct_rate
        );
    }
}
