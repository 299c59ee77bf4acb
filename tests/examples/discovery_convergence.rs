//! How long N loopback nodes take to discover each other and each other's
//! services through the DHT.
//!
//! Starts N nodes in one process, in a line (node i knows only node i-1 as
//! its bootstrap peer; mDNS off), each registering one `llm` service as soon
//! as it runs, and measures the time from the last start until every node
//! has found all N-1 others as namespace providers, and until every node's
//! lookup returns all N services; then the latency of warm lookups.
//!
//! ```text
//! cargo run --release -p ollamacron-tests --example discovery_convergence -- 8 16 32
//! ```

#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::process::ExitCode;
use std::time::{Duration, Instant};

use ollamacron_node_core::NodeHandle;
use ollamacron_node_core::registry::{ServiceInfo, ServiceQuery};
use ollamacron_tests::{TCP_ONLY, loopback_config, start};

/// How often every node is asked how many providers it knows.
const SAMPLE_INTERVAL: Duration = Duration::from_millis(10);
/// Give up on a run after this long.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// Runs per size when none is given.
const DEFAULT_SIZES: [usize; 3] = [8, 16, 32];

/// Warm lookups timed per run.
const WARM_LOOKUPS: usize = 500;

struct Run {
    nodes: usize,
    start_all: Duration,
    converged_after_last_start: Option<Duration>,
    services_after_last_start: Option<Duration>,
    warm_lookup: Option<(Duration, Duration)>,
}

fn llm_query() -> ServiceQuery {
    ServiceQuery {
        service_type: Some("llm".into()),
        ..ServiceQuery::default()
    }
}

/// p50 and p99 of `samples`.
fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| {
        let last = samples.len().saturating_sub(1);
        // Rounded index into a sorted sample: exact enough for a report.
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss
        )]
        let i = ((last as f64) * q).round() as usize;
        samples.get(i).copied().unwrap_or_default()
    };
    (at(0.50), at(0.99))
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
        let i = nodes.len();
        node.register_service(ServiceInfo {
            id: format!("svc-{i}"),
            name: format!("model-{i}"),
            service_type: "llm".into(),
            ..ServiceInfo::default()
        })
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
    // Every node asks at once, again and again, as users of each would.
    let services = tokio::time::timeout(RUN_TIMEOUT, async {
        let asks = nodes.iter().map(|node| async move {
            loop {
                let found = node
                    .find_services(llm_query())
                    .await
                    .map_err(|e| e.to_string())?;
                if found.len() >= n {
                    return Ok::<_, String>(());
                }
                tokio::time::sleep(SAMPLE_INTERVAL).await;
            }
        });
        for result in futures::future::join_all(asks).await {
            result?;
        }
        Ok::<_, String>(last_start.elapsed())
    })
    .await;
    let mut samples = Vec::with_capacity(WARM_LOOKUPS);
    if services.is_ok() {
        for _ in 0..WARM_LOOKUPS {
            let t = Instant::now();
            nodes[0]
                .find_services(llm_query())
                .await
                .map_err(|e| e.to_string())?;
            samples.push(t.elapsed());
        }
    }
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
        services_after_last_start: match services {
            Ok(result) => Some(result?),
            Err(_) => None,
        },
        warm_lookup: (!samples.is_empty()).then(|| percentiles(samples)),
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
        "{:>6}  {:>14}  {:>28}  {:>27}  {:>22}",
        "nodes",
        "start all (ms)",
        "all providers known after (ms)",
        "all services found after (ms)",
        "warm lookup p50/p99 (ms)"
    );
    let mut failed = false;
    for n in sizes {
        match run(n).await {
            Ok(r) => {
                let converged = r.converged_after_last_start.map_or_else(
                    || format!("not within {RUN_TIMEOUT:?}"),
                    |d| format!("{:.0}", d.as_secs_f64() * 1000.0),
                );
                let services = r.services_after_last_start.map_or_else(
                    || format!("not within {RUN_TIMEOUT:?}"),
                    |d| format!("{:.0}", d.as_secs_f64() * 1000.0),
                );
                let warm = r.warm_lookup.map_or_else(
                    || "-".to_owned(),
                    |(p50, p99)| {
                        format!(
                            "{:.3}/{:.3}",
                            p50.as_secs_f64() * 1000.0,
                            p99.as_secs_f64() * 1000.0
                        )
                    },
                );
                failed |=
                    r.converged_after_last_start.is_none() || r.services_after_last_start.is_none();
                println!(
                    "{:>6}  {:>14.0}  {:>28}  {:>27}  {:>22}",
                    r.nodes,
                    r.start_all.as_secs_f64() * 1000.0,
                    converged,
                    services,
                    warm
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
