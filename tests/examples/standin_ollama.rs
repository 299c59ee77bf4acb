//! Stand-in Ollamas for `cargo xtask soak`: `standin_ollama COUNT MODEL…`
//! serves COUNT stand-ins on free loopback ports, each listing the MODELs,
//! loading a model when it is used and answering like a model does (a
//! short wait before the first token, a few tokens apart), at most
//! [`PARALLEL`] at once each with the rest queued, as Ollama does. It prints
//! `ollama <addr>` for each on stdout and serves until its stdin closes
//! (the harness that started it went away). Loopback only.

#![allow(clippy::print_stdout, clippy::print_stderr)] // a measurement program

use std::sync::Arc;
use std::time::Duration;

use ollamacron_tests::ollama_standin::{Pacing, StandInOllama};
use ollamacron_tests::pool::models;
use tokio::io::AsyncReadExt;

/// Requests each stand-in serves at once (`OLLAMA_NUM_PARALLEL`).
const PARALLEL: usize = 4;
/// Before the first token of an answer.
const FIRST_TOKEN: Duration = Duration::from_millis(20);
/// Between two tokens.
const BETWEEN_TOKENS: Duration = Duration::from_millis(5);
/// Tokens per answer.
const TOKENS: usize = 10;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> std::process::ExitCode {
    let mut args = std::env::args().skip(1);
    let Some(count) = args.next().and_then(|c| c.parse::<usize>().ok()) else {
        eprintln!("usage: standin_ollama COUNT MODEL...");
        return std::process::ExitCode::from(2);
    };
    let names: Vec<String> = args.collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut stand_ins = Vec::with_capacity(count);
    for _ in 0..count {
        let mut served = models(&names);
        served.load_on_use = true;
        served.pacing = Some(Pacing {
            first_token: FIRST_TOKEN,
            between_tokens: BETWEEN_TOKENS,
            tokens: TOKENS,
        });
        served.parallel = Some(Arc::new(tokio::sync::Semaphore::new(PARALLEL)));
        let stand_in = StandInOllama::start(served).await;
        println!("ollama {}", stand_in.addr());
        stand_ins.push(stand_in);
    }
    // Serve until the harness closes our stdin (or goes away).
    let mut sink = [0u8; 64];
    let mut stdin = tokio::io::stdin();
    while matches!(stdin.read(&mut sink).await, Ok(n) if n > 0) {}
    drop(stand_ins);
    std::process::ExitCode::SUCCESS
}
