//! `cargo xtask bench --gateway --load`: 200 concurrent streamed requests
//! through one gateway over four serving nodes whose stand-in Ollamas each
//! serve at most `PARALLEL` at once (queueing the rest, as Ollama does),
//! paced like a model; the total time against the ideal bound set by the
//! nodes' capacity, then the same with one of the four failing every
//! request (against the ideal of the three healthy ones). Loopback only.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::cast_precision_loss
)] // a measurement program

use std::sync::Arc;
use std::time::{Duration, Instant};

use ollamacron_node_core::registry::ServiceQuery;
use ollamacron_tests::ollama_standin::Pacing;
use ollamacron_tests::pool::{SERVE_LIMITS, member, member_with, models, serve_gateway};
use ollamacron_tests::{eventually, http_request};

const MODEL: &str = "load:1b";
const NODES: usize = 4;
const PARALLEL: usize = 4;
const REQUESTS: usize = 200;
const FIRST_TOKEN: Duration = Duration::from_millis(100);
const BETWEEN_TOKENS: Duration = Duration::from_millis(10);
const TOKENS: usize = 50;

/// One streamed request through `gateway`: whether it was a whole 200.
async fn ask(gateway: std::net::SocketAddr) -> Result<(), String> {
    let body = format!(r#"{{"model": "{MODEL}", "prompt": "go"}}"#);
    let response = http_request(gateway, "POST", "/api/generate", Some(body.as_bytes())).await?;
    if response.status != 200
        || response.body.contains("\"error\"")
        || !response.body.contains("\"done\":true")
    {
        return Err(format!(
            "{} {}",
            response.status,
            response.body.lines().next().unwrap_or_default()
        ));
    }
    Ok(())
}

/// `REQUESTS` at once: the time until the last finished, and the failures.
async fn burst(gateway: std::net::SocketAddr) -> (Duration, Vec<String>) {
    let started = Instant::now();
    let tasks: Vec<_> = (0..REQUESTS).map(|_| tokio::spawn(ask(gateway))).collect();
    let mut failures = Vec::new();
    for task in tasks {
        if let Err(e) = task.await.unwrap() {
            failures.push(e);
        }
    }
    (started.elapsed(), failures)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let client = member(&[], None).await;
    let bootstrap = client.bootstrap_addr().await;
    let mut serving = Vec::new();
    for _ in 0..NODES {
        let mut stand_in = models(&[MODEL]);
        stand_in.pacing = Some(Pacing {
            first_token: FIRST_TOKEN,
            between_tokens: BETWEEN_TOKENS,
            tokens: TOKENS,
        });
        stand_in.parallel = Some(Arc::new(tokio::sync::Semaphore::new(PARALLEL)));
        serving.push(member_with(stand_in, Some(&bootstrap), SERVE_LIMITS).await);
    }
    eventually("the client to see every serving node", || {
        let node = client.node.clone();
        async move {
            let query = ServiceQuery {
                service_type: Some("llm".into()),
                ..ServiceQuery::default()
            };
            let found = node.find_services(query).await.ok()?;
            (found.len() == NODES
                && found
                    .iter()
                    .all(|s| s.service.metadata.contains_key("max_concurrent_per_peer")))
            .then_some(())
        }
    })
    .await
    .unwrap();
    let gateway = serve_gateway(&client.node, None, &[]).await;

    // One request alone: what each of the ideal's rounds takes.
    let mut alone = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        ask(gateway).await.unwrap();
        alone.push(started.elapsed());
    }
    alone.sort();
    let one = alone[alone.len() / 2];

    let mut ok = true;
    println!(
        "{REQUESTS} concurrent streamed requests, {NODES} serving nodes each serving {PARALLEL} at once ({} ms to the first token, {TOKENS} tokens {} ms apart; one request alone {:.0} ms)",
        FIRST_TOKEN.as_millis(),
        BETWEEN_TOKENS.as_millis(),
        one.as_secs_f64() * 1000.0
    );
    println!();
    println!("| case | total | ideal (capacity-bound) | ratio | failed |");
    println!("|---|---:|---:|---:|---:|");
    for (case, healthy) in [
        ("4 healthy nodes", NODES),
        ("1 of 4 failing every request", NODES - 1),
    ] {
        if healthy < NODES {
            serving[0].ollama.models().failing_inference = true;
        }
        let (total, failures) = burst(gateway).await;
        let rounds = REQUESTS.div_ceil(healthy * PARALLEL);
        let ideal = one * u32::try_from(rounds).unwrap();
        let ratio = total.as_secs_f64() / ideal.as_secs_f64();
        println!(
            "| {case} | {:.2} s | {:.2} s ({rounds} rounds of {PARALLEL}x{healthy}) | {ratio:.3}x{} | {} |",
            total.as_secs_f64(),
            ideal.as_secs_f64(),
            if ratio <= 1.15 { "" } else { " ✗" },
            failures.len()
        );
        if let Some(first) = failures.first() {
            eprintln!("{case}: {} failed; the first: {first}", failures.len());
            ok = false;
        }
    }
    println!();
    println!("goal: <= 1.15x the ideal, 0 failed");
    if !ok {
        std::process::exit(1);
    }
}
