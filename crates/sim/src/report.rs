//! The figures: a table on stdout and a JSON file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};

use crate::args::Args;
use crate::plan::PlannedNode;

/// Mean and largest of the nodes' `dht_requests_sent`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KadRequests {
    pub(crate) mean: f64,
    pub(crate) max: u64,
}

impl KadRequests {
    pub(crate) fn of(counts: impl Iterator<Item = u64>) -> Option<Self> {
        let counts: Vec<u64> = counts.collect();
        let max = *counts.iter().max()?;
        Some(Self {
            mean: counts.iter().sum::<u64>() as f64 / counts.len() as f64,
            max,
        })
    }

    fn json(this: Option<Self>) -> Value {
        this.map_or(Value::Null, |k| json!({ "mean": k.mean, "max": k.max }))
    }
}

/// How the churn phase went.
#[derive(Debug, Clone)]
pub(crate) struct Churn {
    pub(crate) percent: u32,
    pub(crate) crashed: usize,
    pub(crate) record_ttl_s: f64,
    pub(crate) record_refresh_s: f64,
    /// Crash to the first moment no survivor's lookup returned a departed
    /// node's service.
    pub(crate) departed_gone_s: Option<f64>,
    pub(crate) failure: Option<String>,
}

/// Every figure of one run.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) nodes: usize,
    pub(crate) seed: u64,
    pub(crate) rtt_ms: (u128, u128),
    /// The `--set` overrides, `KEY=VALUE`.
    pub(crate) overrides: Vec<String>,
    pub(crate) services_total: usize,
    pub(crate) single_holder_models: usize,
    pub(crate) started_s: Option<f64>,
    pub(crate) converged_s: Option<f64>,
    pub(crate) converged_nodes: usize,
    pub(crate) min_services_seen: usize,
    pub(crate) mean_services_seen: f64,
    pub(crate) model_lookups_found: Option<usize>,
    /// Of those, found by the exact DHT query of the model key alone.
    pub(crate) dht_model_lookups_found: Option<usize>,
    pub(crate) model_lookups_total: Option<usize>,
    pub(crate) hops_p50: Option<u32>,
    pub(crate) hops_max: Option<u32>,
    pub(crate) kad_requests_at_convergence: Option<KadRequests>,
    pub(crate) kad_requests_at_end: Option<KadRequests>,
    pub(crate) connections_per_node: Option<f64>,
    pub(crate) idle: Option<Idle>,
    pub(crate) new_service_visible_p99_s: Option<f64>,
    pub(crate) heap_bytes_per_node: Option<f64>,
    pub(crate) heap_bytes_per_node_at_end: Option<f64>,
    pub(crate) rss_at_convergence_bytes: Option<u64>,
    pub(crate) peak_rss_bytes: Option<u64>,
    pub(crate) cpu_s: Option<f64>,
    pub(crate) tasks_at_convergence: Option<usize>,
    /// Median and longest status round trip (ms) at convergence / at the end.
    pub(crate) status_answer_ms_at_convergence: Option<(f64, f64)>,
    pub(crate) status_answer_ms_at_end: Option<(f64, f64)>,
    /// Nodes with a model key no announcement reached a peer with, when
    /// the lookups start.
    pub(crate) nodes_with_unannounced_keys: Option<usize>,
    pub(crate) load_avg_at_convergence: Option<f64>,
    pub(crate) load_avg_at_end: Option<f64>,
    pub(crate) record_ttl_s: f64,
    pub(crate) churn: Option<Churn>,
    pub(crate) wall_s: f64,
    pub(crate) failures: Vec<String>,
}

/// What the nodes did while idle, per node and second.
#[derive(Debug, Clone)]
pub(crate) struct Idle {
    /// Bytes on the wire.
    pub(crate) bytes_per_node_per_s: f64,
    /// CPU time of the process, in milliseconds (unknown off Linux).
    pub(crate) cpu_ms_per_node_per_s: Option<f64>,
    /// Kademlia requests sent.
    pub(crate) kad_requests_per_node_per_s: f64,
}

impl Report {
    pub(crate) fn new(args: &Args, planned: &[PlannedNode]) -> Self {
        let mut holders = std::collections::HashMap::<&str, usize>::new();
        for p in planned {
            for s in &p.services {
                *holders.entry(s.name.as_str()).or_default() += 1;
            }
        }
        Self {
            nodes: args.nodes,
            seed: args.seed,
            rtt_ms: (args.rtt.start().as_millis(), args.rtt.end().as_millis()),
            overrides: args
                .overrides
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
            single_holder_models: holders.values().filter(|&&c| c == 1).count(),
            record_ttl_s: planned
                .first()
                .map_or(0.0, |p| p.config.record_ttl.as_secs_f64()),
            ..Self::default()
        }
    }

    pub(crate) fn set_hops(&mut self, hops: &[u32]) {
        let mut hops = hops.to_vec();
        hops.sort_unstable();
        self.hops_p50 = hops.get(hops.len() / 2).copied();
        self.hops_max = hops.last().copied();
    }

    pub(crate) fn finish(&mut self, wall: Duration) {
        self.wall_s = wall.as_secs_f64();
        self.peak_rss_bytes = proc_status_kib("VmHWM:").map(|k| k * 1024);
        self.cpu_s = cpu_seconds();
    }

    pub(crate) fn json(&self) -> Value {
        json!({
            "nodes": self.nodes,
            "seed": self.seed,
            "rtt_ms": [self.rtt_ms.0, self.rtt_ms.1],
            "overrides": self.overrides,
            "services_total": self.services_total,
            "single_holder_models": self.single_holder_models,
            "record_ttl_s": self.record_ttl_s,
            "started_s": self.started_s,
            "converged_s": self.converged_s,
            "converged_nodes": self.converged_nodes,
            "min_services_seen": self.min_services_seen,
            "mean_services_seen": self.mean_services_seen,
            "model_lookups_found": self.model_lookups_found,
            "dht_model_lookups_found": self.dht_model_lookups_found,
            "model_lookups_total": self.model_lookups_total,
            "hops_p50": self.hops_p50,
            "hops_max": self.hops_max,
            "kad_requests_per_node": {
                "at_convergence": KadRequests::json(self.kad_requests_at_convergence),
                "at_end": KadRequests::json(self.kad_requests_at_end),
            },
            "connections_per_node": self.connections_per_node,
            "idle_bytes_per_node_per_s": self.idle.as_ref().map(|i| i.bytes_per_node_per_s),
            "idle_cpu_ms_per_node_per_s": self.idle.as_ref().and_then(|i| i.cpu_ms_per_node_per_s),
            "idle_kad_requests_per_node_per_s": self.idle.as_ref().map(|i| i.kad_requests_per_node_per_s),
            "new_service_visible_p99_s": self.new_service_visible_p99_s,
            "heap_bytes_per_node": self.heap_bytes_per_node,
            "heap_bytes_per_node_at_end": self.heap_bytes_per_node_at_end,
            "rss_at_convergence_bytes": self.rss_at_convergence_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "cpu_s": self.cpu_s,
            "tasks_at_convergence": self.tasks_at_convergence,
            "status_answer_ms": {
                "at_convergence": self.status_answer_ms_at_convergence.map(|(p50, max)| json!({ "p50": p50, "max": max })),
                "at_end": self.status_answer_ms_at_end.map(|(p50, max)| json!({ "p50": p50, "max": max })),
            },
            "nodes_with_unannounced_keys": self.nodes_with_unannounced_keys,
            "load_avg_1m": [self.load_avg_at_convergence, self.load_avg_at_end],
            "churn": self.churn.as_ref().map(|c| json!({
                "percent": c.percent,
                "crashed": c.crashed,
                "record_ttl_s": c.record_ttl_s,
                "record_refresh_s": c.record_refresh_s,
                "departed_gone_s": c.departed_gone_s,
            })),
            "wall_s": self.wall_s,
            "failures": self.failures,
        })
    }

    /// Write the JSON report to `path` (creating its directory); the path.
    pub(crate) fn write_json(&self, path: &Path) -> anyhow::Result<PathBuf> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let text =
            serde_json::to_string_pretty(&self.json()).context("cannot encode the report")?;
        std::fs::write(path, text + "\n")
            .with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path.to_path_buf())
    }

    /// The table, on stdout.
    pub(crate) fn print(&self) {
        let secs = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |s| format!("{s:.1} s"));
        let kad = |k: Option<KadRequests>| {
            k.map_or_else(
                || "-".to_owned(),
                |k| format!("mean {:.0}, max {}", k.mean, k.max),
            )
        };
        let bytes = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), human_bytes);
        let count = |v: Option<usize>| v.map_or_else(|| "-".to_owned(), |c| c.to_string());
        let answer = |v: Option<(f64, f64)>| {
            v.map_or_else(
                || "-".to_owned(),
                |(p50, max)| format!("{p50:.0} / {max:.0} ms"),
            )
        };
        let hops = |v: Option<u32>| {
            v.map_or_else(|| "null (not reported yet)".to_owned(), |h| h.to_string())
        };
        let mut rows: Vec<(&str, String)> = vec![
            ("nodes", self.nodes.to_string()),
            ("rtt", format!("{}..{} ms", self.rtt_ms.0, self.rtt_ms.1)),
            (
                "config overrides",
                if self.overrides.is_empty() {
                    "none".to_owned()
                } else {
                    self.overrides.join(" ")
                },
            ),
            (
                "services",
                format!(
                    "{} ({} single-holder models)",
                    self.services_total, self.single_holder_models
                ),
            ),
            ("record ttl", format!("{:.0} s", self.record_ttl_s)),
            ("all started", secs(self.started_s)),
            (
                "converged",
                match self.converged_s {
                    Some(s) => format!("{s:.1} s"),
                    None => format!(
                        "no: {} of {} nodes saw every service; the least saw {}, the mean {:.0}",
                        self.converged_nodes,
                        self.nodes,
                        self.min_services_seen,
                        self.mean_services_seen
                    ),
                },
            ),
            (
                "model lookups found",
                format!(
                    "{} of {}",
                    count(self.model_lookups_found),
                    count(self.model_lookups_total)
                ),
            ),
            (
                "  by the model key in the DHT alone",
                format!(
                    "{} of {}",
                    count(self.dht_model_lookups_found),
                    count(self.model_lookups_total)
                ),
            ),
            (
                "hops p50 / max (requests to the first provider)",
                format!("{} / {}", hops(self.hops_p50), hops(self.hops_max)),
            ),
            (
                "kad requests/node at convergence",
                kad(self.kad_requests_at_convergence),
            ),
            ("kad requests/node at end", kad(self.kad_requests_at_end)),
            (
                "connected peers/node",
                self.connections_per_node
                    .map_or_else(|| "-".to_owned(), |c| format!("{c:.1}")),
            ),
            (
                "idle traffic/node",
                self.idle.as_ref().map_or_else(
                    || "-".to_owned(),
                    |i| format!("{}/s", human_bytes(i.bytes_per_node_per_s)),
                ),
            ),
            (
                "idle cpu/node, kad requests/node",
                self.idle.as_ref().map_or_else(
                    || "-".to_owned(),
                    |i| {
                        format!(
                            "{} ms/s, {:.2}/s",
                            i.cpu_ms_per_node_per_s
                                .map_or_else(|| "-".to_owned(), |c| format!("{c:.2}")),
                            i.kad_requests_per_node_per_s
                        )
                    },
                ),
            ),
            (
                "new service at 99% of nodes",
                secs(self.new_service_visible_p99_s),
            ),
            ("heap/node at convergence", bytes(self.heap_bytes_per_node)),
            ("heap/node at end", bytes(self.heap_bytes_per_node_at_end)),
            (
                "rss at convergence",
                bytes(self.rss_at_convergence_bytes.map(|b| b as f64)),
            ),
            ("peak rss", bytes(self.peak_rss_bytes.map(|b| b as f64))),
            ("tasks at convergence", count(self.tasks_at_convergence)),
            (
                "status answer p50 / max at convergence, end",
                format!(
                    "{}, {}",
                    answer(self.status_answer_ms_at_convergence),
                    answer(self.status_answer_ms_at_end)
                ),
            ),
            (
                "nodes with an unannounced model key",
                count(self.nodes_with_unannounced_keys),
            ),
            ("cpu", secs(self.cpu_s)),
            (
                "load average (1 min) at convergence / end",
                format!(
                    "{} / {}",
                    self.load_avg_at_convergence
                        .map_or_else(|| "-".to_owned(), |l| format!("{l:.1}")),
                    self.load_avg_at_end
                        .map_or_else(|| "-".to_owned(), |l| format!("{l:.1}"))
                ),
            ),
        ];
        if let Some(c) = &self.churn {
            rows.push((
                "churn",
                format!(
                    "{}% ({} nodes crashed), record_ttl {:.0} s, refresh {:.0} s",
                    c.percent, c.crashed, c.record_ttl_s, c.record_refresh_s
                ),
            ));
            rows.push(("departed services gone", secs(c.departed_gone_s)));
        }
        rows.push(("wall", format!("{:.1} s", self.wall_s)));
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        println!();
        for (k, v) in rows {
            println!("{k:<width$}  {v}");
        }
    }
}

fn human_bytes(b: f64) -> String {
    const KIB: f64 = 1024.0;
    if b >= KIB * KIB * KIB {
        format!("{:.2} GiB", b / (KIB * KIB * KIB))
    } else if b >= KIB * KIB {
        format!("{:.1} MiB", b / (KIB * KIB))
    } else if b >= KIB {
        format!("{:.1} KiB", b / KIB)
    } else {
        format!("{b:.0} B")
    }
}

/// A `kB` line of `/proc/self/status` (Linux), in KiB.
fn proc_status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The resident set right now (Linux).
pub(crate) fn rss_bytes() -> Option<u64> {
    proc_status_kib("VmRSS:").map(|k| k * 1024)
}

/// The machine's 1-minute load average (Linux): the simulation shares
/// the cores with whatever else runs.
pub(crate) fn load_avg() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// User plus system CPU time of this process so far (Linux; assumes the
/// usual 100 ticks a second).
pub(crate) fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which is in parentheses).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}
