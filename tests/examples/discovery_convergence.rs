//! How long N loopback nodes take to discover each other through the DHT.
//!
//! Starts N nodes in one process, in a line (node i knows only node i-1 as
//! its bootstrap peer; mDNS off), and measures the time from the last start
//! until every node has found all N-1 others as namespace providers.
//!
//! ```text
//! cargo run --release -p ollamacron-tests --example discovery_convergence -- 8 16 32
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;
use std::time::{Duration, Instant};

use ollamacron_node_core::NodeHandle;
use ollamacron_tests::{TCP_ONLY, loopback_config, start};

/// How often every node is asked how many providers it knows.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(10);
/// Give up on a run after this long.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// Runs per size when none is given.
const DEFAULT_SIZES: [usize; 3] = [8, 16, 32];

struct Run {
    nodes: usize,
    start_all: Duration,
    converged_after_last_start: Option<Duration>,
}

async fn run(n: usize) -> Result<Run, String> {
    let began = Instant::now();
    let mut nodes: Vec<NodeHandle> = Vec::new();
    for _ in 0..n {
        let bootstrap = match nodes.last() {
            Some(prev) => prev.dialable_addrs().await.map_err(|e| e.to_string())?[0].to_string(),
            None => String::new(),
        };
        let node = start(loopback_config(
            TCP_ONLY,
            &[("bootstrap", bootstrap.as_str())],
        ))
        .await
        .map_err(|e| e.to_string())?;
        nodes.push(node);
    }
    let last_start = Instant::now();
    let start_all = last_start - began;
    let converged = tokio::time::timeout(RUN_TIMEOUT, async {
        loop {
            let mut done = true;
            for node in &nodes {
                let status = node.discovery().await.map_err(|e| e.to_string())?;
                if status.dht_providers < n - 1 {
                    done = false;
                    break;
                }
            }
            if done {
                return Ok::<_, String>(last_start.elapsed());
            }
            tokio::time::sleep(SAMPLE_INTERVAL).await;
        }
    })
    .await;
    for node in &nodes {
        let _ = node.shutdown().await;
    }
    Ok(Run {
        nodes: n,
        start_all,
        converged_after_last_start: match converged {
            Ok(result) => Some(result?),
            Err(_) => None,
        },
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut sizes: Vec<usize> = Vec::new();
    for arg in std::env::args().skip(1) {
        match arg.parse() {
            Ok(n) if n >= 2 => sizes.push(n),
            _ => {
                eprintln!("`{arg}` is not a node count of at least 2");
                return ExitCode::from(2);
            }
        }
    }
    if sizes.is_empty() {
        sizes.extend(DEFAULT_SIZES);
    }
    println!(
        "{:>6}  {:>14}  {:>28}",
        "nodes", "start all (ms)", "all providers known after (ms)"
    );
    let mut failed = false;
    for n in sizes {
        match run(n).await {
            Ok(r) => {
                let converged = r.converged_after_last_start.map_or_else(
                    || format!("not within {RUN_TIMEOUT:?}"),
                    |d| format!("{:.0}", d.as_secs_f64() * 1000.0),
                );
                failed |= r.converged_after_last_start.is_none();
                println!(
                    "{:>6}  {:>14.0}  {:>28}",
                    r.nodes,
                    r.start_all.as_secs_f64() * 1000.0,
                    converged
                );
            }
            Err(e) => {
                eprintln!("{n} nodes: {e}");
                failed = true;
            }
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
