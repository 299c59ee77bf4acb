//! `cargo xtask bench --gateway`: what the gateway costs, measured in one
//! run against a stand-in Ollama three ways: straight to the stand-in,
//! through the gateway of the node that has the models (local), and through
//! the gateway of another node (one hop over `/ollamacron/infer/2.0.0`).
//! Loopback only; the pool is built and the gateways served as the node
//! binary serves them (`ollamacron_tests::pool`).
//!
//! 1. Time to first token and tokens per second of streamed
//!    `/api/generate`: the stand-in paces its answers like a model,
//!    `FIRST_TOKEN` before the first token, then one token every
//!    `BETWEEN_TOKENS`; fresh connection per request.
//! 2. The latency the gateway adds: total time of streamed `/api/generate`
//!    (no pacing delay), non-streamed `/api/generate` and `/api/embed`, at
//!    concurrency 1 and `CONCURRENT`, each task on one keep-alive HTTP/1.1
//!    connection making its requests one after another; p50 and p99 per
//!    path, and each gateway's p50 minus the direct p50. Every request must
//!    be answered 200, whole: the run fails, after the tables, if one is not.

#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)] // a measurement program

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ollamacron_gateway::ServeLimits;
use ollamacron_tests::ollama_standin::Pacing;
use ollamacron_tests::pool::{SERVE_LIMITS, member, member_with, models, sees, serve_gateway};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const MODEL: &str = "bench:1b";
const EMBEDDING_MODEL: &str = "nomic-embed-text:latest";

// Time to first token and tokens/s.
const FIRST_TOKEN: Duration = Duration::from_millis(100);
const BETWEEN_TOKENS: Duration = Duration::from_millis(10);
const TOKENS: usize = 50;
const RUNS: usize = 20;

// Added latency.
/// Tokens of a streamed answer in the latency runs, sent without delay.
const LATENCY_TOKENS: usize = 5;
/// How long the stand-in thinks before answering in the last latency runs,
/// as a small model would.
const MODEL_THINK: Duration = Duration::from_millis(20);
/// Requests per path at concurrency 1 (streamed ones are slower: half).
const SEQUENTIAL: usize = 400;
/// Tasks at once in the concurrent runs.
const CONCURRENT: usize = 64;
/// Requests per task and path in the concurrent runs.
const PER_TASK: usize = 40;
/// Untimed requests on each fresh connection before the timed ones.
const WARM_UP: usize = 3;
/// The timed requests of a path come in this many rounds, the paths taking
/// turns, so drift hits all alike.
const ROUNDS: usize = 2;

/// One streamed request on a fresh connection: (time to the first token,
/// tokens per second after it).
async fn first_token(addr: SocketAddr) -> (Duration, f64) {
    let body = format!(r#"{{"model": "{MODEL}", "prompt": "go"}}"#);
    let request = format!(
        "POST /api/generate HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
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
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
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

/// A kind of request whose latency is measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `/api/generate`, streamed (NDJSON, chunked).
    Streamed,
    /// `/api/generate` with `"stream": false`.
    Whole,
    /// `/api/embed`.
    Embed,
}

impl Kind {
    const ALL: [Self; 3] = [Self::Streamed, Self::Whole, Self::Embed];

    /// Requests per path at concurrency 1.
    fn sequential(self) -> usize {
        if self == Self::Streamed {
            SEQUENTIAL / 2
        } else {
            SEQUENTIAL
        }
    }

    fn name(self) -> String {
        match self {
            Self::Streamed => format!("generate, streamed ({LATENCY_TOKENS} tokens)"),
            Self::Whole => "generate, stream: false".to_owned(),
            Self::Embed => "embed".to_owned(),
        }
    }

    /// The whole request, head and body, for a server at `addr`.
    fn request(self, addr: SocketAddr) -> Vec<u8> {
        let (path, body) = match self {
            Self::Streamed => (
                "/api/generate",
                format!(r#"{{"model": "{MODEL}", "prompt": "Why is the sky blue?"}}"#),
            ),
            Self::Whole => (
                "/api/generate",
                format!(
                    r#"{{"model": "{MODEL}", "prompt": "Why is the sky blue?", "stream": false}}"#
                ),
            ),
            Self::Embed => (
                "/api/embed",
                format!(r#"{{"model": "{EMBEDDING_MODEL}", "input": "Why is the sky blue?"}}"#),
            ),
        };
        format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    }

    /// Whether `body` (of a 200) is a whole, successful answer of this
    /// kind; an error chunk (a stream broken after its head) is not.
    fn check(self, body: &str) -> Result<(), String> {
        let whole = !body.contains("\"error\"")
            && match self {
                Self::Streamed => {
                    body.matches("\"done\":false").count() == LATENCY_TOKENS
                        && body.contains("\"done\":true")
                }
                Self::Whole => {
                    body.contains("\"done\":true")
                        && body.contains("\"response\":\"The sky is blue.\"")
                }
                Self::Embed => body.contains("\"embeddings\""),
            };
        if whole {
            Ok(())
        } else {
            Err(format!("200 with {body}"))
        }
    }
}

/// An HTTP/1.1 client on one keep-alive connection: a request, then its
/// whole answer (`Content-Length` or chunked), then the next.
struct Connection {
    stream: BufReader<TcpStream>,
    line: String,
    body: Vec<u8>,
}

impl Connection {
    async fn open(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            stream: BufReader::new(stream),
            line: String::new(),
            body: Vec::new(),
        }
    }

    async fn read_line(&mut self) -> &str {
        self.line.clear();
        let n = self.stream.read_line(&mut self.line).await.unwrap();
        assert!(n > 0, "the server closed the connection");
        self.line.trim_end()
    }

    /// Send `request`, read the whole answer; its body if the status is
    /// 200, else the status and body. Panics when the connection does not
    /// stay open.
    async fn exchange(&mut self, request: &[u8]) -> Result<&str, String> {
        self.stream.get_mut().write_all(request).await.unwrap();
        let status_line = self.read_line().await.to_owned();
        let (mut length, mut chunked) = (None, false);
        loop {
            let line = self.read_line().await;
            if line.is_empty() {
                break;
            }
            let Some((name, value)) = line.split_once(':') else {
                panic!("not a header: {line:?}");
            };
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            match name.as_str() {
                "content-length" => length = Some(value.parse::<usize>().unwrap()),
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "connection" => assert!(
                    !value.eq_ignore_ascii_case("close"),
                    "the server closes the connection"
                ),
                _ => {}
            }
        }
        self.body.clear();
        if chunked {
            loop {
                let size = self.read_line().await;
                let size = size.split(';').next().unwrap_or_default();
                let size = usize::from_str_radix(size, 16).unwrap();
                if size == 0 {
                    while !self.read_line().await.is_empty() {} // trailers
                    break;
                }
                let start = self.body.len();
                self.body.resize(start + size + 2, 0);
                self.stream
                    .read_exact(&mut self.body[start..])
                    .await
                    .unwrap();
                assert_eq!(&self.body[start + size..], b"\r\n", "a chunk's end");
                self.body.truncate(start + size);
            }
        } else {
            let length = length.expect("a Content-Length or a chunked body");
            self.body.resize(length, 0);
            self.stream.read_exact(&mut self.body).await.unwrap();
        }
        let body = std::str::from_utf8(&self.body).unwrap();
        if status_line.starts_with("HTTP/1.1 200 ") {
            Ok(body)
        } else {
            Err(format!("{status_line}: {body}"))
        }
    }

    /// One request of `kind`: `Ok` when answered 200, whole and right.
    async fn ask(&mut self, kind: Kind, request: &[u8]) -> Result<(), String> {
        self.exchange(request)
            .await
            .and_then(|body| kind.check(body))
    }
}

/// A random pause of 0–1 ms before a streamed request (outside the timing),
/// so requests do not lock onto the 1 ms timer tick the stand-in's token
/// delays round up to (which would hide or inflate what a gateway adds).
/// Slept on a blocking thread: microsecond resolution, no spinning.
async fn jitter(state: &mut u64) {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    let pause = Duration::from_micros(*state % 1000);
    tokio::task::spawn_blocking(move || std::thread::sleep(pause))
        .await
        .unwrap();
}

/// What a batch of requests to one path came to.
#[derive(Default)]
struct Outcome {
    /// Each successful timed request's time, ms.
    times: Vec<f64>,
    /// Requests, warm-up ones too.
    requests: usize,
    /// What the requests not answered 200 (whole and right) got.
    failures: Vec<String>,
}

impl Outcome {
    fn merge(&mut self, other: Self) {
        self.times.extend(other.times);
        self.requests += other.requests;
        self.failures.extend(other.failures);
    }
}

/// `tasks` tasks, each on its own connection to `addr`, warm it up, wait
/// for the others, then make `per_task` requests of `kind` one after
/// another.
async fn batch(addr: SocketAddr, kind: Kind, tasks: usize, per_task: usize) -> Outcome {
    let request: Arc<[u8]> = kind.request(addr).into();
    let start = Arc::new(tokio::sync::Barrier::new(tasks));
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let (request, start) = (request.clone(), start.clone());
            tokio::spawn(async move {
                let mut connection = Connection::open(addr).await;
                let mut outcome = Outcome {
                    times: Vec::with_capacity(per_task),
                    requests: WARM_UP + per_task,
                    failures: Vec::new(),
                };
                for _ in 0..WARM_UP {
                    if let Err(e) = connection.ask(kind, &request).await {
                        outcome.failures.push(e);
                    }
                }
                start.wait().await;
                let mut random = 0x9E37_79B9_7F4A_7C15_u64 ^ (task as u64 + 1);
                for _ in 0..per_task {
                    if kind == Kind::Streamed {
                        jitter(&mut random).await;
                    }
                    let started = Instant::now();
                    let answer = connection.ask(kind, &request).await;
                    let elapsed = started.elapsed().as_secs_f64() * 1000.0;
                    match answer {
                        Ok(()) => outcome.times.push(elapsed),
                        Err(e) => outcome.failures.push(e),
                    }
                }
                outcome
            })
        })
        .collect();
    let mut outcome = Outcome::default();
    for handle in handles {
        outcome.merge(handle.await.unwrap());
    }
    outcome
}

/// The `per_mille`th quantile of `sorted` (nearest rank).
fn quantile(sorted: &[f64], per_mille: usize) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (sorted.len() * per_mille).div_ceil(1000);
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// (p50, p99) of `times`.
fn p50_p99(mut times: Vec<f64>) -> (f64, f64) {
    times.sort_by(f64::total_cmp);
    (quantile(&times, 500), quantile(&times, 990))
}

/// Set (to anything): record every span as the node does with
/// `enable_tracing` and `otlp_endpoint`, exported to a collector stand-in
/// on loopback, so the run shows what traces cost (`cargo xtask bench
/// --gateway --traces` runs it without and with).
const TRACES_VAR: &str = "GATEWAY_BENCH_OTLP";

/// Spans exported to the collector stand-in, and their batches.
#[derive(Default)]
struct Exported {
    batches: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
}

/// A collector stand-in that takes every batch, and the node's span
/// exporter and layer pointed at it, installed as the global subscriber.
async fn export_traces() -> (ollamacron_telemetry::OtlpTraces, Arc<Exported>) {
    use std::sync::atomic::Ordering;
    use tracing_subscriber::Layer;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let exported = Arc::new(Exported::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector = listener.local_addr().unwrap();
    let counted = exported.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| async move {
            counted.batches.fetch_add(1, Ordering::Relaxed);
            counted
                .bytes
                .fetch_add(body.len() as u64, Ordering::Relaxed);
            ""
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    let traces = ollamacron_telemetry::OtlpTraces::start(
        &ollamacron_telemetry::OtlpSettings {
            endpoint: format!("http://{collector}"),
            service_name: "gateway-bench".into(),
            service_version: env!("CARGO_PKG_VERSION").into(),
            instance_id: None,
            export_interval: Duration::from_secs(2),
            export_timeout: Duration::from_secs(10),
        },
        tokio::runtime::Handle::current(),
    )
    .unwrap();
    let filter =
        tracing_subscriber::filter::Targets::new().with_target("ollamacron", tracing::Level::INFO);
    tracing_subscriber::registry()
        .with(traces.layer().with_filter(filter))
        .init();
    (traces, exported)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let began = Instant::now();
    let traces = if std::env::var_os(TRACES_VAR).is_some() {
        println!(
            "spans recorded and exported over OTLP to a collector stand-in ({TRACES_VAR} set)"
        );
        Some(export_traces().await)
    } else {
        println!("no spans recorded ({TRACES_VAR} not set)");
        None
    };
    let mut stand_in = models(&[MODEL, EMBEDDING_MODEL]);
    stand_in.pacing = Some(Pacing {
        first_token: FIRST_TOKEN,
        between_tokens: BETWEEN_TOKENS,
        tokens: TOKENS,
    });
    // Room for every concurrent request from the other node: latency is
    // measured, not refusals.
    let limits = ServeLimits {
        total: 256,
        per_peer: 256,
        ..SERVE_LIMITS
    };
    let serving = member_with(stand_in, None, limits).await;
    let asking = member(&[], Some(&serving.bootstrap_addr().await)).await;
    sees(&serving.node, &[MODEL, EMBEDDING_MODEL]).await;
    sees(&asking.node, &[MODEL, EMBEDDING_MODEL]).await;
    // The same room on the local path: its gateway would otherwise queue
    // past gateway_max_concurrent (32) and measure the queue.
    let local_gateway = serve_gateway(
        &serving.node,
        Some(serving.local()),
        &[("gateway_max_concurrent", "256")],
    )
    .await;
    let hop_gateway = serve_gateway(&asking.node, None, &[]).await;
    let paths = [
        ("direct to the stand-in", serving.ollama.addr()),
        ("gateway, local", local_gateway),
        ("gateway, one hop", hop_gateway),
    ];
    eprintln!("pool ready after {:.1} s", began.elapsed().as_secs_f64());

    // 1. Time to first token and tokens/s. Warm every path, then
    // interleave the runs so drift hits all alike.
    for (_, addr) in paths {
        first_token(addr).await;
    }
    let mut results: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); paths.len()];
    for _ in 0..RUNS {
        for (i, (_, addr)) in paths.iter().enumerate() {
            let (first, rate) = first_token(*addr).await;
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
    eprintln!(
        "first tokens measured after {:.1} s",
        began.elapsed().as_secs_f64()
    );

    // 2. Added latency: answers come without delay (the machine's cores
    // are then the limit at 64 at once), then after MODEL_THINK, as from
    // a fast model (the cores are not).
    let mut rows = Vec::new();
    let mut goals_met = (0, 0);
    let mut failures = Vec::new();
    for kind in Kind::ALL {
        for (tasks, per_task, think) in [
            (1, kind.sequential(), Duration::ZERO),
            (CONCURRENT, PER_TASK, Duration::ZERO),
            (CONCURRENT, PER_TASK, MODEL_THINK),
        ] {
            serving.ollama.models().pacing = Some(Pacing {
                first_token: think,
                between_tokens: Duration::ZERO,
                tokens: LATENCY_TOKENS,
            });
            let tasks_label = if think.is_zero() {
                tasks.to_string()
            } else {
                format!("{tasks}, model answers after {} ms", think.as_millis())
            };
            eprintln!("{}, concurrency {tasks_label}", kind.name());
            let mut outcomes: Vec<Outcome> = paths.iter().map(|_| Outcome::default()).collect();
            for _ in 0..ROUNDS {
                for (i, (_, addr)) in paths.iter().enumerate() {
                    outcomes[i].merge(batch(*addr, kind, tasks, per_task / ROUNDS).await);
                }
            }
            let direct = p50_p99(outcomes[0].times.clone()).0;
            let mut cells = Vec::new();
            for (i, outcome) in outcomes.into_iter().enumerate() {
                let (p50, p99) = p50_p99(outcome.times);
                let mut cell = format!("{p50:.2} / {p99:.2}");
                let goal = [None, Some(1.0), Some(3.0)][i];
                let met = outcome.failures.is_empty() && goal.is_none_or(|g| p50 - direct <= g);
                if let Some(goal) = goal {
                    let added = p50 - direct;
                    let mark = if added <= goal { "" } else { " ✗" };
                    cell.push_str(&format!(" ({added:+.2}{mark})"));
                    if i == 1 {
                        goals_met.0 += usize::from(met);
                    } else {
                        goals_met.1 += usize::from(met);
                    }
                }
                if let Some(first) = outcome.failures.first() {
                    cell.push_str(&format!(
                        " [{} of {} not 200]",
                        outcome.failures.len(),
                        outcome.requests
                    ));
                    failures.push(format!(
                        "{}, concurrency {tasks}, {}: {} of {} requests not answered 200 in full; the first: {first}",
                        kind.name(),
                        paths[i].0,
                        outcome.failures.len(),
                        outcome.requests
                    ));
                }
                cells.push(cell);
            }
            rows.push(format!(
                "| {} | {tasks_label} | {} |",
                kind.name(),
                cells.join(" | ")
            ));
        }
    }
    println!();
    println!(
        "added latency, ms (p50 / p99 per request, requests not answered 200 left out; \
         added = gateway p50 - direct p50); each task on one keep-alive connection, \
         {SEQUENTIAL} requests per path at concurrency 1 ({} streamed), \
         {CONCURRENT} tasks x {PER_TASK} at {CONCURRENT}",
        Kind::Streamed.sequential()
    );
    println!();
    println!(
        "| request | concurrency | direct p50 / p99 | local p50 / p99 (+added) | one hop p50 / p99 (+added) |"
    );
    println!("|---|---:|---:|---:|---:|");
    for row in &rows {
        println!("{row}");
    }
    println!();
    println!(
        "goals (added p50 <= 1 ms local, <= 3 ms one hop, every request 200): local {}/{}, one hop {}/{} rows met",
        goals_met.0,
        rows.len(),
        goals_met.1,
        rows.len()
    );
    if let Some((traces, exported)) = traces {
        let shutdown = tokio::task::spawn_blocking(move || traces.shutdown()).await;
        println!(
            "exported {} batches of spans, {} KiB in all ({shutdown:?})",
            exported.batches.load(std::sync::atomic::Ordering::Relaxed),
            exported.bytes.load(std::sync::atomic::Ordering::Relaxed) / 1024
        );
    }
    eprintln!("done after {:.1} s", began.elapsed().as_secs_f64());
    if !failures.is_empty() {
        for failure in &failures {
            eprintln!("{failure}");
        }
        eprintln!("not every request was answered 200");
        std::process::exit(1);
    }
}
