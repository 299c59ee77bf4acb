//! `cargo xtask mesh`: start N real node processes on 127.0.0.1 and measure
//! them — convergence of service lookups, lookup latency, memory per node,
//! start-to-Running, the Kademlia requests each node sent, duplicate
//! connections, and (with `--churn`) how fast dead nodes leave answers;
//! `--runs` repeats it all with fresh processes.

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

/// How the nodes learn of each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Topology {
    /// Node i bootstraps from node i-1.
    Chain,
    /// Every node bootstraps from node 0.
    Star,
}

/// What `cargo xtask mesh` was asked to do.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct MeshArgs {
    /// Number of node processes.
    #[arg(long, default_value_t = 8)]
    pub(crate) nodes: usize,
    /// Services each node registers (type `llm`).
    #[arg(long, default_value_t = 1)]
    pub(crate) services_per_node: usize,
    /// Turn gossipsub on (`enable_pubsub`).
    #[arg(long)]
    pub(crate) pubsub: bool,
    /// Bootstrap layout.
    #[arg(long, value_enum, default_value_t = Topology::Chain)]
    pub(crate) topology: Topology,
    /// After convergence, kill this percentage of the nodes and measure how
    /// long until no lookup returns a service of a dead node.
    #[arg(long, value_name = "PERCENT")]
    pub(crate) churn: Option<u8>,
    /// Record lifetime given to every node (`record_ttl`); churn runs
    /// default to 15s so that they end in reasonable time.
    #[arg(long, value_name = "DURATION")]
    pub(crate) record_ttl: Option<String>,
    /// Any other config field for every node, as `KEY=VALUE` (repeatable;
    /// passed to `ollamacron-node run --set`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub(crate) settings: Vec<String>,
    /// Warm lookups timed after convergence.
    #[arg(long, default_value_t = 500)]
    pub(crate) lookups: usize,
    /// Give up (and tear everything down) after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub(crate) timeout_secs: u64,
    /// Where to write the JSON report (default: target/mesh/mesh-N[-pubsub][-churn].json).
    #[arg(long)]
    pub(crate) json: Option<PathBuf>,
    /// Use this `ollamacron-node` binary instead of building the release one
    /// (for example a build with symbols, to profile, or an older build to
    /// compare with: figures its status lacks show as "n/a", null in JSON).
    #[arg(long)]
    pub(crate) binary: Option<PathBuf>,
    /// After measuring, keep the mesh up this long (`10m`, `1h`) and print
    /// the first node's dashboard address, to look at a mesh of this size
    /// in a browser; SIGINT (Ctrl-C) or SIGTERM ends it sooner and tears it down.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub(crate) hold: Option<Duration>,
    /// Run the whole mesh this many times, each with fresh processes and
    /// data directories, and summarise ("converged <= 1 s in K of N runs").
    /// The JSON holds every run in `runs` and the totals in `summary`; with
    /// one run its figures are also at the top level, as before this option.
    /// With several, the default file name ends in `-runsN` and MESH_LOG
    /// logs go to target/mesh/logs/run-<k>/.
    #[arg(long, default_value_t = 1)]
    pub(crate) runs: usize,
}

/// How often lookups poll while waiting for convergence.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Longest one HTTP request to a node may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the nodes idle before their memory is read.
const IDLE_BEFORE_RSS: Duration = Duration::from_secs(2);

/// One node process and what it told us.
pub(crate) struct MeshNode {
    pub(crate) child: Child,
    pub(crate) api: SocketAddr,
    /// Its gateway's address, when its settings turn the gateway on.
    pub(crate) gateway: Option<SocketAddr>,
    pub(crate) peer_id: String,
    started_in: Duration,
}

/// Every node process; dropping it kills them all and removes their data.
struct Mesh {
    nodes: Vec<MeshNode>,
    root: PathBuf,
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// One HTTP/1.1 request (`Connection: close`): the status and the JSON body.
pub(crate) fn http(
    api: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<(u16, Value)> {
    let payload = body.map(Value::to_string);
    let (status, body) = http_text(api, method, path, payload.as_deref())?;
    let json = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&body).with_context(|| format!("a non-JSON answer from {api}"))?
    };
    Ok((status, json))
}

/// One HTTP/1.1 request (`Connection: close`) with a JSON `body`: the
/// status and the body as text (whole; a streamed answer's every line).
pub(crate) fn http_text(
    api: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> anyhow::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&api, HTTP_TIMEOUT)
        .with_context(|| format!("cannot reach {api}"))?;
    stream.set_read_timeout(Some(HTTP_TIMEOUT))?;
    let payload = body.unwrap_or_default();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n");
    if body.is_some() {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            payload.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(payload);
    stream.write_all(request.as_bytes())?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("not an HTTP answer from {api}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in the answer from {api}"))?;
    Ok((status, body.to_owned()))
}

/// Peer ids of the `llm` services a node's lookup returns.
fn lookup(api: SocketAddr) -> anyhow::Result<Vec<String>> {
    let (status, body) = http(api, "GET", "/v1/services?type=llm", None)?;
    if status != 200 {
        bail!("lookup at {api} answered {status}: {body}");
    }
    Ok(body
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|r| r["service"]["peer_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default())
}

/// Resident memory of a process, in bytes (Linux `/proc`).
pub(crate) fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// CPU time a process has used (user + system), from `/proc` (Linux).
fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    // Linux reports in clock ticks of 1/100 s.
    Some(Duration::from_millis(ticks * 10))
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    // Index of the q-quantile in a sorted sample; exact enough for a report.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = (((sorted.len() - 1) as f64) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Refuse `--set` of a field the harness sets itself (before anything is
/// built or started).
pub(crate) fn check_settings(args: &MeshArgs) -> anyhow::Result<()> {
    for setting in &args.settings {
        let Some((key, _)) = setting.split_once('=') else {
            bail!("--set {setting}: expected KEY=VALUE");
        };
        if let Some(why) = reserved_setting(key) {
            bail!("--set {setting}: {why}");
        }
    }
    Ok(())
}

/// Why the harness keeps `key` to itself, if it does.
fn reserved_setting(key: &str) -> Option<&'static str> {
    match key.replace('-', "_").as_str() {
        "listen" | "bootstrap" | "api_listen" | "enable_api" | "data_dir" => {
            Some("the harness sets the addresses and directories of every node")
        }
        "log_level" | "log_format" | "enable_logging" => {
            Some("the harness reads each node's text log (use MESH_LOG=<filter> for more of it)")
        }
        "enable_mdns" => Some("mDNS stays off: the mesh runs on this machine's loopback only"),
        "enable_ollama" | "enable_gateway" | "gateway_listen" => {
            Some("the mesh measures discovery and lookups, not Ollama or the gateway")
        }
        "record_ttl" | "record_refresh_interval" => Some("use --record-ttl"),
        "enable_pubsub" => Some("use --pubsub"),
        _ => None,
    }
}

/// Start one node; wait until it logs "node running" (and, when
/// `settings` turn the gateway on, its gateway's address).
pub(crate) fn start_node(
    binary: &Path,
    root: &Path,
    log_dir: &Path,
    index: usize,
    bootstrap: Option<&str>,
    settings: &[String],
    deadline: Instant,
) -> anyhow::Result<(MeshNode, String)> {
    let dir = root.join(format!("node-{index}"));
    std::fs::create_dir_all(&dir)?;
    // MESH_LOG=<filter> keeps each node's log, at that level, in
    // `log_dir`/node-<index>.log.
    // The harness reads the node's own info lines (its addresses and
    // Running), so those stay on whatever the filter says elsewhere.
    let log_level = std::env::var("MESH_LOG").map_or_else(
        |_| "info".to_owned(),
        |filter| format!("ollamacron_node_core=info,{filter}"),
    );
    let mut log_file = match std::env::var_os("MESH_LOG") {
        Some(_) => {
            std::fs::create_dir_all(log_dir)?;
            Some(std::fs::File::create(
                log_dir.join(format!("node-{index}.log")),
            )?)
        }
        None => None,
    };
    let mut command = Command::new(binary);
    command
        .args(["run", "--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"])
        .arg("--data-dir")
        .arg(&dir)
        // The node picks its API port and logs it: no race for a port
        // picked here and released before the node binds it.
        .args(["--api-listen", "127.0.0.1:0", "--log-level", &log_level])
        // The mesh measures discovery and lookups, not the local Ollama.
        .args([
            "--set",
            "enable_ollama=false",
            "--set",
            "enable_gateway=false",
        ])
        .env_remove("OLLAMACRON_CONFIG")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(addr) = bootstrap {
        command.args(["--bootstrap", addr]);
    }
    for s in settings {
        command.args(["--set", s]);
    }
    let spawned = Instant::now();
    let mut child = command.spawn().context("cannot start ollamacron-node")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let (tx, lines) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(file) = log_file.as_mut() {
                let _ = writeln!(file, "{line}");
            }
            if tx.send(line).is_err() {
                // Nobody listens any more; keep draining so the node never blocks.
                continue;
            }
        }
    });
    let wants_gateway = settings.iter().any(|s| s == "enable_gateway=true");
    let mut addr = None;
    let mut api: Option<SocketAddr> = None;
    let mut gateway: Option<SocketAddr> = None;
    let mut started_in = None;
    let mut log = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = lines.recv_timeout(left) else {
            let _ = child.kill();
            bail!(
                "node {index} did not reach Running; its log:\n{}",
                log.join("\n")
            );
        };
        if line.contains("serving the Ollama-compatible gateway") && gateway.is_none() {
            gateway = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .and_then(|a| a.parse::<SocketAddr>().ok());
        }
        if line.contains("serving the HTTP API") && api.is_none() {
            api = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .and_then(|a| a.parse::<SocketAddr>().ok());
        }
        if line.contains("listening") && addr.is_none() {
            addr = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("address="))
                .map(str::to_owned);
        }
        if line.contains("node running") {
            started_in = Some(spawned.elapsed());
        }
        // The API's line may come just before or just after Running.
        if let (Some(started_in), Some(addr), Some(api)) = (started_in, addr.clone(), api)
            && (gateway.is_some() || !wants_gateway)
        {
            let peer_id = addr.rsplit('/').next().unwrap_or_default().to_owned();
            // Keep reading in the background so the pipe never fills.
            std::thread::spawn(move || for _ in lines {});
            return Ok((
                MeshNode {
                    child,
                    api,
                    gateway,
                    peer_id,
                    started_in,
                },
                addr,
            ));
        }
        log.push(line);
    }
}

/// What one node's `GET /v1/status` says that the report sums up. A field
/// an older binary does not have is `None` (shown as "n/a").
#[derive(Debug, Clone, Copy, Default)]
struct NodeFigures {
    dht_requests_sent: Option<u64>,
    peers: u64,
    inbound: u64,
    outbound: u64,
    duplicates_closed: Option<u64>,
    established_total: Option<u64>,
}

impl NodeFigures {
    fn of(status: &Value) -> Self {
        let connections = &status["connections"];
        let count = |v: &Value| v.as_u64().unwrap_or(0);
        Self {
            dht_requests_sent: status["discovery"]["dht_requests_sent"].as_u64(),
            peers: count(&connections["peers"]),
            inbound: count(&connections["inbound"]),
            outbound: count(&connections["outbound"]),
            duplicates_closed: connections["duplicates_closed"].as_u64(),
            established_total: connections["established_total"].as_u64(),
        }
    }

    fn read(api: SocketAddr) -> anyhow::Result<Self> {
        let (status, body) = http(api, "GET", "/v1/status", None)?;
        if status != 200 {
            bail!("status at {api} answered {status}: {body}");
        }
        Ok(Self::of(&body))
    }
}

/// Mean and max over the nodes of their Kademlia requests sent; `None`
/// when the binary does not report them.
fn requests_per_node(figures: &[NodeFigures]) -> Option<(f64, u64)> {
    let sent: Vec<u64> = figures
        .iter()
        .map(|f| f.dht_requests_sent)
        .collect::<Option<_>>()?;
    let max = sent.iter().copied().max()?;
    // A mean for display.
    #[allow(clippy::cast_precision_loss)]
    let mean = sent.iter().sum::<u64>() as f64 / sent.len() as f64;
    Some((mean, max))
}

/// Duplicate connections over the mesh at one moment.
#[derive(Debug, Clone, Copy)]
struct Duplicates {
    /// Open connections, summed over the nodes (each counted at both ends).
    open: u64,
    /// Connected peers, summed over the nodes.
    peers: u64,
    /// Duplicate connections the nodes closed (absent in older binaries).
    closed: Option<u64>,
    /// Connections the nodes established since start (the same).
    established: Option<u64>,
}

impl Duplicates {
    fn of(figures: &[NodeFigures]) -> Self {
        // Missing on a node counts 0; missing on all is "not reported".
        let sum = |get: fn(&NodeFigures) -> Option<u64>| {
            figures
                .iter()
                .any(|f| get(f).is_some())
                .then(|| figures.iter().filter_map(get).sum())
        };
        Self {
            open: figures.iter().map(|f| f.inbound + f.outbound).sum(),
            peers: figures.iter().map(|f| f.peers).sum(),
            closed: sum(|f| f.duplicates_closed),
            established: sum(|f| f.established_total),
        }
    }

    /// (inbound + outbound − peers) / (inbound + outbound), over all nodes.
    fn ratio(&self) -> f64 {
        if self.open == 0 {
            return 0.0;
        }
        // A ratio for display.
        #[allow(clippy::cast_precision_loss)]
        let r = self.open.saturating_sub(self.peers) as f64 / self.open as f64;
        r
    }

    fn json(&self) -> Value {
        json!({
            "ratio": self.ratio(),
            "connections": self.open,
            "peers": self.peers,
            "duplicates_closed": self.closed,
            "established_total": self.established,
        })
    }
}

/// What one run of the mesh measured.
struct RunResult {
    convergence: Duration,
    per_node: Vec<Duration>,
    cpu_at_convergence: Duration,
    /// Warm lookup latencies, sorted.
    samples: Vec<Duration>,
    /// Resident memory per node, sorted.
    rss: Vec<u64>,
    /// Start-to-Running per node, sorted.
    starts: Vec<Duration>,
    churn: Option<(usize, Duration)>,
    /// Each node's status when its lookup first returned every service.
    at_convergence: Vec<NodeFigures>,
    /// Each node's status after the warm lookups.
    after_lookups: Vec<NodeFigures>,
}

fn mib(bytes: u64) -> f64 {
    // Bytes to MiB for display.
    #[allow(clippy::cast_precision_loss)]
    let v = bytes as f64 / (1024.0 * 1024.0);
    v
}

fn requests_json(figures: &[NodeFigures]) -> Value {
    requests_per_node(figures).map_or(Value::Null, |(mean, max)| json!({"mean": mean, "max": max}))
}

fn requests_text(figures: &[NodeFigures]) -> String {
    requests_per_node(figures).map_or_else(
        || "n/a".to_owned(),
        |(mean, max)| format!("{mean:.1}/{max}"),
    )
}

fn option_text(value: Option<u64>) -> String {
    value.map_or_else(|| "n/a".to_owned(), |v| v.to_string())
}

impl RunResult {
    fn json(&self) -> Value {
        json!({
            "convergence_ms": ms(self.convergence),
            "convergence_per_node_ms": self.per_node.iter().map(|d| ms(*d)).collect::<Vec<_>>(),
            "cpu_ms_all_nodes_at_convergence": ms(self.cpu_at_convergence),
            "lookup_ms": {
                "p50": ms(percentile(&self.samples, 0.50)),
                "p99": ms(percentile(&self.samples, 0.99)),
                "count": self.samples.len(),
            },
            "rss_mib": {
                "min": self.rss.first().copied().map(mib),
                "median": self.rss.get(self.rss.len() / 2).copied().map(mib),
                "max": self.rss.last().copied().map(mib),
            },
            "start_to_running_ms": {
                "p50": ms(percentile(&self.starts, 0.50)),
                "max": ms(self.starts.last().copied().unwrap_or_default()),
            },
            "churn": self.churn.map(|(killed, after)| json!({"killed": killed, "gone_after_ms": ms(after)})),
            "kad_requests_per_node": requests_json(&self.at_convergence),
            "kad_requests_per_node_after_lookups": requests_json(&self.after_lookups),
            "duplicate_connections": Duplicates::of(&self.at_convergence).json(),
            "duplicate_connections_after_lookups": Duplicates::of(&self.after_lookups).json(),
        })
    }
}

/// Runs converged within this count as good in the summary.
const CONVERGED_WITHIN: Duration = Duration::from_secs(1);

pub(crate) fn mesh(binary: &Path, args: &MeshArgs) -> anyhow::Result<()> {
    if args.nodes < 2 {
        bail!("--nodes must be at least 2");
    }
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    if args.churn.is_some_and(|p| p == 0 || p >= 100) {
        bail!("--churn must be a percentage from 1 to 99");
    }
    check_settings(args)?;
    let mut settings = args.settings.clone();
    if args.pubsub {
        settings.push("enable_pubsub=true".to_owned());
    }
    let ttl = args
        .record_ttl
        .clone()
        .or_else(|| args.churn.map(|_| "15s".to_owned()));
    if let Some(ttl) = &ttl {
        settings.push(format!("record_ttl={ttl}"));
        let ttl_d = humantime::parse_duration(ttl).context("--record-ttl")?;
        let refresh = (ttl_d / 3).max(Duration::from_secs(1));
        settings.push(format!(
            "record_refresh_interval={}",
            humantime::format_duration(refresh)
        ));
    }

    let mut runs = Vec::with_capacity(args.runs);
    for run in 0..args.runs {
        if args.runs > 1 {
            eprintln!("mesh run {} of {}", run + 1, args.runs);
        }
        let result = run_mesh(binary, args, &settings, run)
            .with_context(|| format!("run {} of {}", run + 1, args.runs))?;
        runs.push(result);
    }

    print_table(args, &runs, ttl.as_deref());
    let summary = summary(&runs);
    println!("{}", summary_line(&summary, runs.len()));

    let mut report = json!({
        "nodes": args.nodes,
        "services_per_node": args.services_per_node,
        "pubsub": args.pubsub,
        "settings": args.settings,
        "topology": format!("{:?}", args.topology).to_lowercase(),
        "record_ttl": ttl,
        "binary": binary.display().to_string(),
    });
    let run_reports: Vec<Value> = runs.iter().map(RunResult::json).collect();
    if let ([only], Some(top)) = (run_reports.as_slice(), report.as_object_mut())
        && let Some(fields) = only.as_object()
    {
        // One run: its fields stay at the top level, as they always were.
        top.extend(fields.clone());
    }
    report["runs"] = Value::Array(run_reports);
    report["summary"] = summary;

    let path = args.json.clone().unwrap_or_else(|| {
        let mut name = format!("mesh-{}", args.nodes);
        if args.pubsub {
            name.push_str("-pubsub");
        }
        if args.churn.is_some() {
            name.push_str("-churn");
        }
        if args.runs > 1 {
            name.push_str(&format!("-runs{}", args.runs));
        }
        PathBuf::from("target/mesh").join(format!("{name}.json"))
    });
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("wrote {}", path.display());
    Ok(())
}

/// The summary over every run: how many converged within
/// [`CONVERGED_WITHIN`], the spread of convergence and lookups, requests
/// per node and duplicates.
fn summary(runs: &[RunResult]) -> Value {
    let mut convergence: Vec<Duration> = runs.iter().map(|r| r.convergence).collect();
    convergence.sort();
    let within = convergence
        .iter()
        .filter(|c| **c <= CONVERGED_WITHIN)
        .count();
    let mut p50: Vec<Duration> = runs.iter().map(|r| percentile(&r.samples, 0.50)).collect();
    p50.sort();
    let p99_max = runs
        .iter()
        .map(|r| percentile(&r.samples, 0.99))
        .max()
        .unwrap_or_default();
    let requests = |pick: fn(&RunResult) -> &[NodeFigures]| -> Value {
        let per_run: Option<Vec<(f64, u64)>> =
            runs.iter().map(|r| requests_per_node(pick(r))).collect();
        per_run.map_or(Value::Null, |v| {
            // A mean of the runs' means (the runs have as many nodes).
            #[allow(clippy::cast_precision_loss)]
            let mean = v.iter().map(|(m, _)| m).sum::<f64>() / v.len() as f64;
            json!({"mean": mean, "max": v.iter().map(|(_, m)| *m).max()})
        })
    };
    let duplicates: Vec<Duplicates> = runs
        .iter()
        .map(|r| Duplicates::of(&r.at_convergence))
        .collect();
    let sum = |get: fn(&Duplicates) -> Option<u64>| -> Option<u64> {
        duplicates.iter().map(get).sum::<Option<u64>>()
    };
    #[allow(clippy::cast_precision_loss)]
    let mean_ratio =
        duplicates.iter().map(Duplicates::ratio).sum::<f64>() / duplicates.len().max(1) as f64;
    json!({
        "runs": runs.len(),
        "converged_within_ms": ms(CONVERGED_WITHIN),
        "converged_within_count": within,
        "convergence_ms": {
            "min": convergence.first().copied().map(ms),
            "median": convergence.get(convergence.len() / 2).copied().map(ms),
            "max": convergence.last().copied().map(ms),
        },
        "lookup_p50_ms_median": p50.get(p50.len() / 2).copied().map(ms),
        "lookup_p99_ms_max": ms(p99_max),
        "kad_requests_per_node": requests(|r| &r.at_convergence),
        "kad_requests_per_node_after_lookups": requests(|r| &r.after_lookups),
        "duplicate_connections_ratio_mean": mean_ratio,
        "duplicates_closed": sum(|d| d.closed),
        "established_total": sum(|d| d.established),
    })
}

fn summary_line(summary: &Value, runs: usize) -> String {
    let within = summary["converged_within_count"].as_u64().unwrap_or(0);
    let max_s = summary["convergence_ms"]["max"].as_f64().unwrap_or(0.0) / 1000.0;
    let requests = match &summary["kad_requests_per_node"] {
        Value::Null => "n/a".to_owned(),
        r => format!(
            "{:.1} mean, {} max",
            r["mean"].as_f64().unwrap_or(0.0),
            r["max"]
        ),
    };
    format!(
        "converged <= {:.0} s in {within} of {runs} runs; max {max_s:.2} s; kad requests per node at convergence {requests}; duplicate connections at convergence {:.1}% (mean of runs)",
        CONVERGED_WITHIN.as_secs_f64(),
        summary["duplicate_connections_ratio_mean"]
            .as_f64()
            .unwrap_or(0.0)
            * 100.0
    )
}

fn print_table(args: &MeshArgs, runs: &[RunResult], ttl: Option<&str>) {
    println!();
    println!(
        "{} nodes, pubsub {}, {:?} topology, {} service(s) per node",
        args.nodes,
        if args.pubsub { "on" } else { "off" },
        args.topology,
        args.services_per_node
    );
    println!(
        "{:>3} {:>11} {:>15} {:>17} {:>12} {:>14} {:>14} {:>19} {:>17} {:>11}",
        "run",
        "convergence",
        "lookup p50/p99",
        "RSS min/med/max",
        "start p50/max",
        "kad req/node",
        "after lookups",
        "duplicates at conv",
        "closed/established",
        "dups after"
    );
    println!(
        "{:>3} {:>11} {:>15} {:>17} {:>12} {:>14} {:>14} {:>19} {:>17} {:>11}",
        "",
        "(ms)",
        "(ms)",
        "(MiB)",
        "(ms)",
        "mean/max",
        "mean/max",
        "(conns−peers)/conns",
        "",
        "lookups"
    );
    for (i, r) in runs.iter().enumerate() {
        let duplicates = Duplicates::of(&r.at_convergence);
        let after = Duplicates::of(&r.after_lookups);
        println!(
            "{:>3} {:>11.0} {:>15} {:>17} {:>12} {:>14} {:>14} {:>19} {:>17} {:>11}",
            i + 1,
            ms(r.convergence),
            format!(
                "{:.2}/{:.2}",
                ms(percentile(&r.samples, 0.50)),
                ms(percentile(&r.samples, 0.99))
            ),
            format!(
                "{:.1}/{:.1}/{:.1}",
                r.rss.first().copied().map_or(0.0, mib),
                r.rss.get(r.rss.len() / 2).copied().map_or(0.0, mib),
                r.rss.last().copied().map_or(0.0, mib)
            ),
            format!(
                "{:.0}/{:.0}",
                ms(percentile(&r.starts, 0.50)),
                ms(r.starts.last().copied().unwrap_or_default())
            ),
            requests_text(&r.at_convergence),
            requests_text(&r.after_lookups),
            format!(
                "{:.1}% ({}/{})",
                duplicates.ratio() * 100.0,
                duplicates.open.saturating_sub(duplicates.peers),
                duplicates.open
            ),
            match (duplicates.closed, duplicates.established) {
                (None, None) => "n/a".to_owned(),
                (closed, established) =>
                    format!("{}/{}", option_text(closed), option_text(established)),
            },
            format!("{:.1}%", after.ratio() * 100.0),
        );
        if let Some((killed, after)) = r.churn {
            println!(
                "    churn: killed {killed} of {} nodes; their services left every answer after {:.1} s (record_ttl {})",
                args.nodes,
                after.as_secs_f64(),
                ttl.unwrap_or("5m")
            );
        }
    }
}

/// One whole mesh: fresh processes and data directories, killed when it
/// returns (or fails).
fn run_mesh(
    binary: &Path,
    args: &MeshArgs,
    settings: &[String],
    run: usize,
) -> anyhow::Result<RunResult> {
    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let root = std::env::temp_dir().join(format!("ollamacron-mesh-{}-{run}", std::process::id()));
    let mut mesh = Mesh {
        nodes: Vec::new(),
        root: root.clone(),
    };
    // One run keeps its logs where they always were; several, one
    // directory each.
    let log_dir = {
        let logs = crate::target_dir().join("mesh").join("logs");
        if args.runs > 1 {
            logs.join(format!("run-{}", run + 1))
        } else {
            logs
        }
    };

    // Start the nodes one after another, each registering its services at once.
    let mut first_addr = None;
    let mut prev_addr: Option<String> = None;
    for i in 0..args.nodes {
        let bootstrap = match args.topology {
            Topology::Chain => prev_addr.clone(),
            Topology::Star => first_addr.clone(),
        };
        let (node, addr) = start_node(
            binary,
            &root,
            &log_dir,
            i,
            bootstrap.as_deref(),
            settings,
            deadline,
        )?;
        for k in 0..args.services_per_node {
            let service = json!({
                "name": format!("model-{i}-{k}"),
                "type": "llm",
                "tags": [if i % 2 == 0 { "even" } else { "odd" }],
                "capabilities": ["completion"],
            });
            let (status, body) = http(node.api, "POST", "/v1/services", Some(&service))?;
            if status != 201 {
                bail!("registering on node {i} answered {status}: {body}");
            }
        }
        first_addr.get_or_insert_with(|| addr.clone());
        prev_addr = Some(addr);
        mesh.nodes.push(node);
    }
    let last_start = Instant::now();
    let expected = args.nodes * args.services_per_node;

    // Convergence: every node's lookup returns every service; right then
    // the poller reads that node's status.
    let peer_ids: Vec<&str> = mesh.nodes.iter().map(|n| n.peer_id.as_str()).collect();
    let peer_ids = &peer_ids;
    let converged: Vec<anyhow::Result<(Duration, NodeFigures)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = mesh
            .nodes
            .iter()
            .enumerate()
            .map(|(index, node)| {
                let api = node.api;
                scope.spawn(move || -> anyhow::Result<(Duration, NodeFigures)> {
                    let trace = std::env::var_os("MESH_TRACE").is_some();
                    loop {
                        if trace {
                            let found = lookup(api)?;
                            let missing: Vec<usize> = peer_ids
                                .iter()
                                .enumerate()
                                .filter(|(_, id)| !found.iter().any(|f| f == *id))
                                .map(|(i, _)| i)
                                .collect();
                            let (_, status) = http(api, "GET", "/v1/status", None)?;
                            eprintln!(
                                "{:>6.0} ms node {index}: {} services, {} peers, {} remote from {} nodes, routing {}, missing nodes {missing:?}",
                                ms(last_start.elapsed()),
                                found.len(),
                                status["connections"]["peers"],
                                status["services"]["remote"],
                                status["services"]["nodes"],
                                status["discovery"]["dht_routing_table_size"]
                            );
                        }
                        if lookup(api)?.len() >= expected {
                            let at = last_start.elapsed();
                            return Ok((at, NodeFigures::read(api)?));
                        }
                        if Instant::now() > deadline {
                            bail!("node at {api} never saw all {expected} services");
                        }
                        std::thread::sleep(POLL_INTERVAL);
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a poller panicked")))
            })
            .collect()
    });
    let mut per_node = Vec::new();
    let mut at_convergence = Vec::new();
    for c in converged {
        let (at, figures) = c?;
        per_node.push(at);
        at_convergence.push(figures);
    }
    let convergence = per_node.iter().max().copied().unwrap_or_default();
    let cpu_at_convergence: Duration = mesh
        .nodes
        .iter()
        .filter_map(|n| cpu_time(n.child.id()))
        .sum();

    // Warm lookups, round robin over the nodes.
    let mut samples = Vec::with_capacity(args.lookups);
    for i in 0..args.lookups {
        let api = mesh.nodes[i % mesh.nodes.len()].api;
        let t = Instant::now();
        let found = lookup(api)?;
        samples.push(t.elapsed());
        if found.len() < expected {
            bail!(
                "a warm lookup at {api} returned {} of {expected}",
                found.len()
            );
        }
    }
    samples.sort();
    let after_lookups = mesh
        .nodes
        .iter()
        .map(|n| NodeFigures::read(n.api))
        .collect::<anyhow::Result<Vec<_>>>()?;

    std::thread::sleep(IDLE_BEFORE_RSS);
    let mut rss: Vec<u64> = mesh
        .nodes
        .iter()
        .filter_map(|n| rss_bytes(n.child.id()))
        .collect();
    rss.sort_unstable();
    let mut starts: Vec<Duration> = mesh.nodes.iter().map(|n| n.started_in).collect();
    starts.sort();

    // Churn: kill some nodes, wait until no survivor lists their services.
    let churn = match args.churn {
        None => None,
        Some(percent) => {
            let kill = (args.nodes * usize::from(percent))
                .div_ceil(100)
                .min(args.nodes - 1);
            let dead: HashSet<String> = mesh.nodes[args.nodes - kill..]
                .iter()
                .map(|n| n.peer_id.clone())
                .collect();
            for node in &mut mesh.nodes[args.nodes - kill..] {
                let _ = node.child.kill();
                let _ = node.child.wait();
            }
            let killed_at = Instant::now();
            let survivors: Vec<SocketAddr> = mesh.nodes[..args.nodes - kill]
                .iter()
                .map(|n| n.api)
                .collect();
            loop {
                let mut clean = true;
                for api in &survivors {
                    if lookup(*api)?.iter().any(|p| dead.contains(p)) {
                        clean = false;
                        break;
                    }
                }
                if clean {
                    break Some((kill, killed_at.elapsed()));
                }
                if Instant::now() > deadline {
                    bail!("services of killed nodes were still listed at the timeout");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    };
    if let Some(hold) = args.hold {
        let (first, last) = (mesh.nodes[0].api, mesh.nodes[mesh.nodes.len() - 1].api);
        println!(
            "==> holding {} nodes for {}: dashboard at http://{first}/ (the last node's at http://{last}/)",
            mesh.nodes.len(),
            humantime::format_duration(hold)
        );
        held_until_signal(hold)?;
    }
    drop(mesh);
    Ok(RunResult {
        convergence,
        per_node,
        cpu_at_convergence,
        samples,
        rss,
        starts,
        churn,
        at_convergence,
        after_lookups,
    })
}

/// Wait `hold`, or less when SIGINT or SIGTERM comes (the caller then
/// tears the mesh down: a mesh held in the background and killed leaves
/// no node behind).
fn held_until_signal(hold: Duration) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            () = tokio::time::sleep(hold) => {}
            _ = tokio::signal::ctrl_c() => println!("==> interrupted: stopping the mesh"),
            _ = term.recv() => println!("==> terminated: stopping the mesh"),
        }
        Ok(())
    })
}
