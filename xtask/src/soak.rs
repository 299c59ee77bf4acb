//! `cargo xtask soak --minutes M`: N node processes on 127.0.0.1 (release
//! build, mDNS off), each with a stand-in Ollama, under gateway load for M
//! minutes while the other nodes are stopped and restarted in turn (SIGTERM
//! and SIGKILL alternately, on the same data directory). The gateway node
//! and the bootstrap node live the whole run; their resident memory, open
//! file descriptors, threads and runtime tasks are sampled over time, and
//! the run fails when a late figure has grown past an early one by more
//! than a margin, or when more than a small share of requests failed.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::mesh::{MeshNode, http, http_text, rss_bytes, start_node};

/// What `cargo xtask soak` was asked to do.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct SoakArgs {
    /// How long the load and the churn last.
    #[arg(long, default_value_t = 5.0)]
    pub(crate) minutes: f64,
    /// Node processes (at least 3): node 0 serves the gateway, node 1 is
    /// everyone's bootstrap peer, the others are restarted in turn.
    #[arg(long, default_value_t = 5)]
    pub(crate) nodes: usize,
    /// Clients sending requests to the gateway back to back.
    #[arg(long, default_value_t = 8)]
    pub(crate) clients: usize,
    /// Seconds between two restarts of a node.
    #[arg(long, value_name = "SECONDS", default_value_t = 20)]
    pub(crate) churn_secs: u64,
    /// Seconds between two samples (default: 1/30 of the run, at least 10).
    #[arg(long, value_name = "SECONDS")]
    pub(crate) sample_secs: Option<u64>,
    /// Where to write the JSON report (default: target/soak/soak-<M>min.json).
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Use this `ollamacron-node` binary instead of building the release one.
    #[arg(long)]
    pub(crate) binary: Option<PathBuf>,
}

/// Models every stand-in lists; clients ask for each in turn.
const MODELS: [&str; 2] = ["soak:1b", "soak-chat:1b"];
/// Longest wait for a node to stop after SIGTERM before it is killed.
const GRACEFUL_STOP: Duration = Duration::from_secs(15);
/// Longest wait for the mesh to form, or a node to start.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the harness checks whether a stopped node has exited.
const EXIT_POLL: Duration = Duration::from_millis(50);
/// Failure messages kept for the report.
const KEPT_FAILURES: usize = 8;
/// Largest share of requests that may fail (a node killed mid-answer
/// takes the answers it was streaming with it).
const MAX_FAILED_SHARE: f64 = 0.02;

/// How much a late figure may exceed an early one: `absolute` or
/// `relative` of the early one, whichever is larger.
#[derive(Debug, Clone, Copy)]
struct GrowthLimit {
    absolute: f64,
    relative: f64,
}

impl GrowthLimit {
    fn allows(self, early: f64, late: f64) -> bool {
        late - early <= self.absolute.max(early * self.relative)
    }
}

/// What is watched on the long-lived nodes, and how much each may grow.
const WATCHED: [(&str, GrowthLimit); 4] = [
    (
        "rss_mib",
        GrowthLimit {
            absolute: 4.0,
            relative: 0.10,
        },
    ),
    (
        "open_fds",
        GrowthLimit {
            absolute: 8.0,
            relative: 0.0,
        },
    ),
    (
        "threads",
        GrowthLimit {
            absolute: 2.0,
            relative: 0.0,
        },
    ),
    (
        "runtime_tasks",
        GrowthLimit {
            absolute: 16.0,
            relative: 0.10,
        },
    ),
];

/// The request counts the clients share.
#[derive(Debug, Default)]
struct Traffic {
    ok: u64,
    failed: u64,
    failures: VecDeque<String>,
}

/// The stand-in Ollamas' process and every node; dropping it kills them
/// all and removes their data.
struct Soak {
    stand_ins: Child,
    nodes: Vec<MeshNode>,
    root: PathBuf,
}

impl Drop for Soak {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
        let _ = self.stand_ins.kill();
        let _ = self.stand_ins.wait();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Build the stand-in Ollamas' program (release).
fn build_stand_ins() -> anyhow::Result<PathBuf> {
    crate::build_release_example("ollamacron-tests", "standin_ollama")
}

/// Start `count` stand-in Ollamas in one process: it and their addresses.
fn start_stand_ins(program: &Path, count: usize) -> anyhow::Result<(Child, Vec<SocketAddr>)> {
    use std::io::BufRead;
    let mut child = Command::new(program)
        .arg(count.to_string())
        .args(MODELS)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("cannot start {}", program.display()))?;
    let stdout = child.stdout.take().context("no stdout")?;
    let mut addrs = Vec::with_capacity(count);
    for line in std::io::BufReader::new(stdout).lines().take(count) {
        let line = line?;
        let addr = line
            .strip_prefix("ollama ")
            .and_then(|a| a.parse().ok())
            .with_context(|| format!("the stand-in program printed {line:?}"))?;
        addrs.push(addr);
    }
    if addrs.len() != count {
        let _ = child.kill();
        bail!(
            "the stand-in program started {} of {count} Ollamas",
            addrs.len()
        );
    }
    Ok((child, addrs))
}

/// The `--set` settings of node `index`, served by the stand-in at `ollama`.
fn node_settings(index: usize, ollama: SocketAddr) -> Vec<String> {
    let mut settings = vec![
        "enable_ollama=true".to_owned(),
        format!("ollama_url=http://{ollama}"),
    ];
    if index == 0 {
        settings.push("enable_gateway=true".to_owned());
        settings.push("gateway_listen=127.0.0.1:0".to_owned());
    }
    settings
}

/// One request of client `client`'s `n`th turn: a non-streamed generate, a
/// streamed chat, a streamed generate or the model list, in turn.
fn one_request(gateway: SocketAddr, client: usize, n: u64) -> Result<(), String> {
    let model = MODELS[(client + usize::try_from(n % 2).unwrap_or(0)) % MODELS.len()];
    let (path, body) = match n % 4 {
        0 => (
            "/api/generate",
            Some(json!({"model": model, "prompt": "soak", "stream": false})),
        ),
        1 => (
            "/api/chat",
            Some(json!({"model": model, "messages": [{"role": "user", "content": "soak"}]})),
        ),
        2 => (
            "/api/generate",
            Some(json!({"model": model, "prompt": "soak"})),
        ),
        _ => ("/api/tags", None),
    };
    let method = if body.is_some() { "POST" } else { "GET" };
    let payload = body.map(|b| b.to_string());
    let (status, text) = http_text(gateway, method, path, payload.as_deref())
        .map_err(|e| format!("{path}: {e:#}"))?;
    let whole = match path {
        "/api/tags" => text.contains(MODELS[0]),
        _ => text.contains("\"done\":true") && !text.contains("\"error\""),
    };
    if status == 200 && whole {
        Ok(())
    } else if status == 200 {
        Err(format!(
            "{path} {model}: 200, but the answer ended before its end ({} bytes)",
            text.len()
        ))
    } else {
        Err(format!(
            "{path} {model}: {status} {}",
            text.lines().last().unwrap_or_default()
        ))
    }
}

/// Clients sending requests to `gateway` until `stop`.
fn start_clients(
    count: usize,
    gateway: SocketAddr,
    traffic: &Arc<Mutex<Traffic>>,
    stop: &Arc<AtomicBool>,
) -> Vec<std::thread::JoinHandle<()>> {
    (0..count)
        .map(|client| {
            let traffic = traffic.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let result = one_request(gateway, client, n);
                    n += 1;
                    let mut traffic = traffic
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    match result {
                        Ok(()) => traffic.ok += 1,
                        Err(e) => {
                            traffic.failed += 1;
                            if traffic.failures.len() == KEPT_FAILURES {
                                traffic.failures.pop_front();
                            }
                            traffic.failures.push_back(e);
                        }
                    }
                }
            })
        })
        .collect()
}

/// Distinct nodes whose `llm` services node `api`'s lookup returns.
fn nodes_found(api: SocketAddr) -> usize {
    let Ok((200, body)) = http(api, "GET", "/v1/services?type=llm", None) else {
        return 0;
    };
    let peers: std::collections::HashSet<&str> = body
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["service"]["peer_id"].as_str())
        .collect();
    peers.len()
}

/// Open file descriptors of a process (`/proc/<pid>/fd`, Linux).
fn open_fds(pid: u32) -> Option<u64> {
    let entries = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    u64::try_from(entries.count()).ok()
}

/// Threads of a process (`/proc/<pid>/status`, Linux).
fn threads(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))?
        .trim()
        .parse()
        .ok()
}

/// The node's `ollamacron_runtime_tasks` gauge, from its `/metrics`.
fn runtime_tasks(api: SocketAddr) -> Option<u64> {
    let (status, text) = http_text(api, "GET", "/metrics", None).ok()?;
    if status != 200 {
        return None;
    }
    text.lines()
        .find_map(|l| l.strip_prefix("ollamacron_runtime_tasks "))?
        .trim()
        .parse()
        .ok()
}

/// Peers the node is connected to, from its `/v1/status`.
fn peers_connected(api: SocketAddr) -> Option<u64> {
    let (status, body) = http(api, "GET", "/v1/status", None).ok()?;
    (status == 200)
        .then(|| body["connections"]["peers"].as_u64())
        .flatten()
}

/// One sample of a long-lived node.
fn sample(node: &MeshNode) -> Value {
    let pid = node.child.id();
    #[allow(clippy::cast_precision_loss)] // MiB for a report
    let rss_mib = rss_bytes(pid).map(|b| b as f64 / (1024.0 * 1024.0));
    json!({
        "rss_mib": rss_mib,
        "open_fds": open_fds(pid),
        "threads": threads(pid),
        "runtime_tasks": runtime_tasks(node.api),
        "peers": peers_connected(node.api),
    })
}

/// Stop node `node`: SIGTERM (and wait for it to exit, killing it after
/// [`GRACEFUL_STOP`]) when `graceful`, else SIGKILL.
fn stop_node(node: &mut MeshNode, graceful: bool) -> anyhow::Result<()> {
    if !graceful {
        node.child.kill()?;
        node.child.wait()?;
        return Ok(());
    }
    let status = Command::new("kill")
        .args(["-TERM", &node.child.id().to_string()])
        .status()
        .context("cannot run kill")?;
    if !status.success() {
        bail!("kill -TERM {} failed", node.child.id());
    }
    let deadline = Instant::now() + GRACEFUL_STOP;
    while Instant::now() < deadline {
        if node.child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(EXIT_POLL);
    }
    node.child.kill()?;
    node.child.wait()?;
    bail!(
        "node {} did not stop within {GRACEFUL_STOP:?} of SIGTERM",
        node.peer_id
    )
}

/// The median of `values`, if any.
fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    Some(values[values.len() / 2])
}

/// For each long-lived node and watched figure: the median of the early
/// and of the late samples (the first quarter after the first sample, and
/// the last quarter), and whether the growth stays within its limit.
fn growth(samples: &[Value], long_lived: &[&str]) -> Vec<Value> {
    // The first sample is taken while the mesh warms up.
    let steady = samples.get(1..).unwrap_or_default();
    let quarter = (steady.len() / 4).max(1);
    let early = steady.get(..quarter).unwrap_or_default();
    let late = steady
        .get(steady.len().saturating_sub(quarter)..)
        .unwrap_or_default();
    let mut rows = Vec::new();
    for name in long_lived {
        for (figure, limit) in WATCHED {
            let values = |samples: &[Value]| {
                samples
                    .iter()
                    .filter_map(|s| s["nodes"][name][figure].as_f64())
                    .collect::<Vec<_>>()
            };
            let (Some(e), Some(l)) = (median(values(early)), median(values(late))) else {
                continue;
            };
            rows.push(json!({
                "node": name,
                "figure": figure,
                "early": e,
                "late": l,
                "ok": limit.allows(e, l),
                "limit": format!("+max({}, {:.0}%)", limit.absolute, limit.relative * 100.0),
            }));
        }
    }
    rows
}

/// Run the soak.
pub(crate) fn soak(args: &SoakArgs) -> anyhow::Result<()> {
    if args.nodes < 3 {
        bail!(
            "--nodes {}: at least 3 (a gateway node, a bootstrap node, one to restart)",
            args.nodes
        );
    }
    if !(args.minutes > 0.0 && args.minutes.is_finite()) {
        bail!("--minutes {}: a positive number", args.minutes);
    }
    if args.clients == 0 || args.churn_secs == 0 {
        bail!("--clients and --churn-secs: at least 1");
    }
    let binary = match &args.binary {
        Some(binary) => binary.clone(),
        None => crate::build_node()?,
    };
    let program = build_stand_ins()?;
    let run_for = Duration::from_secs_f64(args.minutes * 60.0);
    let sample_every = Duration::from_secs(
        args.sample_secs
            .unwrap_or_else(|| (run_for.as_secs() / 30).max(10)),
    );
    let churn_every = Duration::from_secs(args.churn_secs);
    let root = crate::target_dir()
        .join("soak")
        .join(format!("run-{}", std::process::id()));
    let log_dir = root.join("logs");
    let (stand_ins, ollamas) = start_stand_ins(&program, args.nodes)?;
    let mut soak = Soak {
        stand_ins,
        nodes: Vec::new(),
        root: root.clone(),
    };

    // Node 1 first: everyone's bootstrap peer.
    let deadline = Instant::now() + START_TIMEOUT;
    let (bootstrap_node, bootstrap) = start_node(
        &binary,
        &root,
        &log_dir,
        1,
        None,
        &node_settings(1, ollamas[1]),
        deadline,
    )?;
    let mut nodes: Vec<Option<MeshNode>> = (0..args.nodes).map(|_| None).collect();
    nodes[1] = Some(bootstrap_node);
    for index in (0..args.nodes).filter(|&i| i != 1) {
        let (node, _) = start_node(
            &binary,
            &root,
            &log_dir,
            index,
            Some(&bootstrap),
            &node_settings(index, ollamas[index]),
            deadline,
        )?;
        nodes[index] = Some(node);
    }
    soak.nodes = nodes.into_iter().flatten().collect();
    let gateway = soak.nodes[0]
        .gateway
        .context("node 0 did not say where its gateway listens")?;
    let gateway_api = soak.nodes[0].api;
    while nodes_found(gateway_api) < args.nodes {
        if Instant::now() > deadline {
            bail!(
                "the gateway node found {} of {} nodes' models within {START_TIMEOUT:?}",
                nodes_found(gateway_api),
                args.nodes
            );
        }
        std::thread::sleep(EXIT_POLL);
    }
    println!(
        "soak: {} nodes (node 0 the gateway at {gateway}, node 1 the bootstrap peer, nodes 2..{} restarted in turn every {}s), {} clients, {:.1} min",
        args.nodes,
        args.nodes - 1,
        args.churn_secs,
        args.clients,
        args.minutes
    );
    println!();
    println!(
        "| t | requests ok | failed | req/s | restarts | node 0 RSS MiB | fds | threads | tasks | peers | node 1 RSS MiB | fds | threads | tasks | peers |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");

    let traffic = Arc::new(Mutex::new(Traffic::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let clients = start_clients(args.clients, gateway, &traffic, &stop);
    let started = Instant::now();
    let end = started + run_for;
    let mut next_sample = started;
    let mut next_churn = started + churn_every;
    let mut restarts = 0usize;
    let mut samples = Vec::new();
    let mut last_ok = 0u64;
    let mut last_sample_at = started;
    let churned = args.nodes - 2;
    let outcome: anyhow::Result<()> = (|| {
        loop {
            let now = Instant::now();
            if now >= next_sample {
                let (ok, failed) = {
                    let t = traffic
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    (t.ok, t.failed)
                };
                let gateway_node = sample(&soak.nodes[0]);
                let bootstrap_node = sample(&soak.nodes[1]);
                #[allow(clippy::cast_precision_loss)]
                let per_second = (ok - last_ok) as f64
                    / now.duration_since(last_sample_at).as_secs_f64().max(1e-3);
                last_ok = ok;
                last_sample_at = now;
                let cell = |v: &Value, f: &str| match v[f].as_f64() {
                    Some(x) if f == "rss_mib" => format!("{x:.1}"),
                    Some(x) => format!("{x:.0}"),
                    None => "n/a".to_owned(),
                };
                let cells = |v: &Value| {
                    ["rss_mib", "open_fds", "threads", "runtime_tasks", "peers"]
                        .map(|f| cell(v, f))
                        .join(" | ")
                };
                println!(
                    "| {:.0} s | {ok} | {failed} | {per_second:.0} | {restarts} | {} | {} |",
                    now.duration_since(started).as_secs_f64(),
                    cells(&gateway_node),
                    cells(&bootstrap_node)
                );
                samples.push(json!({
                    "t_secs": now.duration_since(started).as_secs_f64(),
                    "requests_ok": ok,
                    "requests_failed": failed,
                    "restarts": restarts,
                    "nodes": {"gateway": gateway_node, "bootstrap": bootstrap_node},
                }));
                if now >= end {
                    return Ok(());
                }
                next_sample = (next_sample + sample_every).min(end);
            }
            if now >= next_churn && now < end {
                let index = 2 + restarts % churned;
                let graceful = restarts.is_multiple_of(2);
                stop_node(&mut soak.nodes[index], graceful)
                    .with_context(|| format!("stopping node {index}"))?;
                let (node, _) = start_node(
                    &binary,
                    &root,
                    &log_dir,
                    index,
                    Some(&bootstrap),
                    &node_settings(index, ollamas[index]),
                    Instant::now() + START_TIMEOUT,
                )
                .with_context(|| format!("restarting node {index}"))?;
                soak.nodes[index] = node;
                restarts += 1;
                next_churn += churn_every;
            }
            let wake = next_sample.min(if next_churn < end { next_churn } else { end });
            std::thread::sleep(wake.saturating_duration_since(Instant::now()));
        }
    })();
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        let _ = client.join();
    }
    outcome?;

    let traffic = traffic
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let rows = growth(&samples, &["gateway", "bootstrap"]);
    println!();
    println!("| node | figure | early (median) | late (median) | allowed growth | verdict |");
    println!("|---|---|---:|---:|---|---|");
    for row in &rows {
        println!(
            "| {} | {} | {:.1} | {:.1} | {} | {} |",
            row["node"].as_str().unwrap_or_default(),
            row["figure"].as_str().unwrap_or_default(),
            row["early"].as_f64().unwrap_or_default(),
            row["late"].as_f64().unwrap_or_default(),
            row["limit"].as_str().unwrap_or_default(),
            if row["ok"] == true { "ok" } else { "GREW" }
        );
    }
    let total = traffic.ok + traffic.failed;
    #[allow(clippy::cast_precision_loss)]
    let failed_share = if total == 0 {
        1.0
    } else {
        traffic.failed as f64 / total as f64
    };
    println!();
    println!(
        "{total} requests, {} failed ({:.3}%), {restarts} restarts",
        traffic.failed,
        failed_share * 100.0
    );
    for failure in &traffic.failures {
        println!("  failed: {failure}");
    }
    let report = json!({
        "minutes": args.minutes,
        "nodes": args.nodes,
        "clients": args.clients,
        "churn_secs": args.churn_secs,
        "restarts": restarts,
        "requests_ok": traffic.ok,
        "requests_failed": traffic.failed,
        "failures": traffic.failures,
        "samples": samples,
        "growth": rows,
    });
    let json_path = args.json.clone().unwrap_or_else(|| {
        crate::target_dir()
            .join("soak")
            .join(format!("soak-{}min.json", args.minutes))
    });
    if let Some(parent) = json_path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("cannot write {}", json_path.display()))?;
    println!("report: {}", json_path.display());
    let grew: Vec<String> = rows
        .iter()
        .filter(|r| r["ok"] != true)
        .map(|r| format!("{} {}", r["node"], r["figure"]))
        .collect();
    if !grew.is_empty() {
        bail!("grew past its margin: {}", grew.join(", "));
    }
    if total == 0 || failed_share > MAX_FAILED_SHARE {
        bail!(
            "{} of {total} requests failed (at most {:.0}% may)",
            traffic.failed,
            MAX_FAILED_SHARE * 100.0
        );
    }
    Ok(())
}
