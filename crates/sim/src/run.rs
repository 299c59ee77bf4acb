//! The simulation's phases: start, convergence, idle traffic, model
//! lookups, a new service spreading, and churn. Every wait is bounded by
//! its own limit and by the run's deadline; a wait that runs out is named
//! in the report's failures and the run goes on where that makes sense.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use futures::StreamExt;
use futures::future::join_all;
use ollamacron_node_core::registry::{ServiceInfo, ServiceQuery};
use ollamacron_node_core::{Node, NodeError, NodeEvent, NodeHandle};
use ollamacron_sim::{SimConfig, SimNetwork};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::{IteratorRandom, SliceRandom};
use tokio::sync::{Notify, broadcast, watch};
use tokio::time::Instant;

use crate::args::{Args, MIN_SINGLE_HOLDERS};
use crate::plan::{self, PlannedNode, SERVICE_TYPE, model_service, own_model};
use crate::report::{Churn, Idle, KadRequests, Report, cpu_seconds};

/// Settling time after convergence before idle traffic is measured.
const IDLE_SETTLE: Duration = Duration::from_secs(10);
/// The idle traffic window.
const IDLE_WINDOW: Duration = Duration::from_secs(20);
/// Share of the nodes that must see the new service, in percent.
const SPREAD_PERCENT: usize = 99;
/// Longest each kind of model lookup (ranked, DHT key) may take in all.
const LOOKUP_PHASE_LIMIT: Duration = Duration::from_secs(120);
/// Model lookups in flight at once.
const LOOKUP_CONCURRENCY: usize = 64;
/// How often progress is printed while waiting.
const PROGRESS_EVERY: Duration = Duration::from_secs(10);
/// Longest the nodes get to stop at the end.
const SHUTDOWN_LIMIT: Duration = Duration::from_secs(15);
/// The tag only the new service carries.
const NEW_SERVICE_TAG: &str = "sim-new";

/// A running node of the simulation.
struct SimNode {
    index: usize,
    /// The peer id as services name it.
    peer_id: String,
    handle: NodeHandle,
    alive: bool,
}

/// The run's start, its deadline, and its abort (the memory watchdog's).
struct Clock {
    started: Instant,
    deadline: Instant,
    /// Why the run was cut short, once it is.
    abort: watch::Sender<Option<String>>,
    /// The phase running now, for the abort's message.
    phase: Mutex<&'static str>,
}

impl Clock {
    /// `limit` from now, but never past the deadline.
    fn bound(&self, limit: Duration) -> Instant {
        (Instant::now() + limit).min(self.deadline)
    }

    /// Past the deadline, or aborted: no further phase starts.
    fn past_deadline(&self) -> bool {
        Instant::now() >= self.deadline || self.abort.borrow().is_some()
    }

    fn aborted(&self) -> Option<String> {
        self.abort.borrow().clone()
    }

    fn enter(&self, phase: &'static str) {
        *lock(&self.phase) = phase;
    }

    /// Sleep for `d`; `false` (at once, or when aborted) if that would go
    /// past the deadline or the run is aborted.
    async fn sleep(&self, d: Duration) -> bool {
        let until = Instant::now() + d;
        if until > self.deadline {
            return false;
        }
        let mut abort = self.abort.subscribe();
        tokio::select! {
            () = tokio::time::sleep_until(until) => true,
            _ = abort.wait_for(Option::is_some) => false,
        }
    }

    /// `fut`, unless `limit` (bounded by the deadline) passes or the run is
    /// aborted first.
    async fn run<T>(&self, limit: Duration, fut: impl Future<Output = T>) -> Option<T> {
        let mut abort = self.abort.subscribe();
        tokio::select! {
            out = fut => Some(out),
            () = tokio::time::sleep_until(self.bound(limit)) => None,
            _ = abort.wait_for(Option::is_some) => None,
        }
    }
}

/// Cut the run short (naming the phase and the figures) once the resident
/// set passes `limit` bytes: better a report than the kernel's OOM killer.
fn watch_memory(clock: &Arc<Clock>, limit: u64) {
    let clock = Arc::clone(clock);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let Some(rss) = crate::report::rss_bytes() else {
                return;
            };
            if rss >= limit {
                let phase = *lock(&clock.phase);
                let reason = format!(
                    "memory: the resident set reached {:.2} GiB (the --max-rss-gib limit) during {phase}, {:.0} s in; heap {:.2} GiB, {} tasks",
                    rss as f64 / GIB,
                    clock.started.elapsed().as_secs_f64(),
                    crate::heap_bytes() as f64 / GIB,
                    tokio::runtime::Handle::current()
                        .metrics()
                        .num_alive_tasks()
                );
                eprintln!("{reason}: stopping the measurements");
                clock.abort.send_replace(Some(reason));
                return;
            }
        }
    });
}

const GIB: f64 = 1024.0 * 1024.0 * 1024.0;

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn llm_query() -> ServiceQuery {
    ServiceQuery {
        service_type: Some(SERVICE_TYPE.to_owned()),
        ..ServiceQuery::default()
    }
}

/// Whether `node`'s ranked lookup of `model` (`ServiceQuery::model`, what
/// the gateway asks) lists `holder`.
async fn ranked_finds(node: &NodeHandle, model: &str, holder: &str) -> Result<bool, NodeError> {
    let query = ServiceQuery {
        model: Some(model.to_owned()),
        ..ServiceQuery::default()
    };
    let found = node.find_services(query).await?;
    Ok(found.iter().any(|s| s.service.peer_id == holder))
}

/// What one exact DHT query of `model`'s key from `node` (bypassing the
/// cache) found: whether it lists `holder`, and the requests it sent
/// before its first provider (a bound on its hops: each hop is at least
/// one request).
async fn dht_finds(
    node: &NodeHandle,
    model: &str,
    holder: &str,
) -> Result<(bool, Option<u32>), NodeError> {
    let dht = node.find_model_providers(model).await?;
    let found = dht.providers.iter().any(|p| p.to_string() == holder);
    Ok((found, dht.requests_to_first.filter(|_| found)))
}

pub(crate) async fn run(args: &Args) -> anyhow::Result<Report> {
    let clock = Arc::new(Clock {
        started: Instant::now(),
        deadline: Instant::now() + Duration::from_secs(args.deadline),
        abort: watch::channel(None).0,
        phase: Mutex::new("start"),
    });
    watch_memory(&clock, args.max_rss_bytes());
    let net = SimNetwork::new(SimConfig {
        nodes: args.nodes,
        rtt: args.rtt.clone(),
        seed: args.seed,
        base_port: 1,
    });
    let base = args.base_config()?;
    let planned = plan::plan(&net, &base, args.seed, args.churn.is_some());
    let mut report = Report::new(args, &planned);
    let mut rng = StdRng::seed_from_u64(args.seed ^ 0x5eed);
    if args.nodes < MIN_SINGLE_HOLDERS {
        eprintln!(
            "note: {} nodes hold {} single-holder models (the figures are meant for at least {MIN_SINGLE_HOLDERS})",
            args.nodes, args.nodes
        );
    }
    if let Some(p) = args.churn {
        eprintln!(
            "churn {p}%: nodes run with record_ttl {} and record_refresh_interval {}",
            humanize(plan::CHURN_RECORD_TTL),
            humanize(plan::CHURN_RECORD_REFRESH)
        );
    }
    let expected = Expected(
        planned
            .iter()
            .map(|p| {
                let ids = p.services.iter().map(|s| s.id.clone()).collect();
                (p.peer.to_string(), ids)
            })
            .collect(),
    );

    // Start.
    eprintln!(
        "starting {} nodes in waves of {} ({} services, RTT {}..{} ms)",
        args.nodes,
        args.wave,
        expected.len(),
        args.rtt.start().as_millis(),
        args.rtt.end().as_millis()
    );
    let mut nodes = start_nodes(&net, planned, args, &clock).await?;
    report.started_s = Some(clock.started.elapsed().as_secs_f64());
    eprintln!(
        "all nodes running after {:.1} s; waiting for convergence",
        clock.started.elapsed().as_secs_f64()
    );

    // Convergence.
    clock.enter("convergence");
    let convergence = converge(&nodes, &expected, args, &clock).await;
    report.converged_s = convergence.converged_s;
    report.converged_nodes = convergence.complete;
    report.min_services_seen = convergence.min_seen;
    report.mean_services_seen = convergence.mean_seen;
    report.services_total = expected.len();
    if let Some(failure) = convergence.failure {
        report.failures.push(failure);
        // Why the least node lags: what it is connected to.
        if let Some(node) = nodes.get(convergence.least_node)
            && let Ok(status) = node.handle.status().await
        {
            let detail = format!(
                "the least node ({}) had {} connected peers ({} in, {} out) and held {} services of {} nodes",
                node.index,
                status.connections.peers,
                status.connections.inbound,
                status.connections.outbound,
                status.services.local + status.services.remote,
                status.services.nodes
            );
            eprintln!("{detail}");
            report.failures.push(detail);
            if let Ok(peers) = node.handle.connected_peers().await {
                let by_id: HashMap<String, &SimNode> =
                    nodes.iter().map(|n| (n.peer_id.clone(), n)).collect();
                for p in peers {
                    let held = match by_id.get(&p.peer_id.to_string()) {
                        Some(n) => n
                            .handle
                            .status()
                            .await
                            .map(|s| {
                                format!(
                                    "node {} holding {}",
                                    n.index,
                                    s.services.local + s.services.remote
                                )
                            })
                            .unwrap_or_default(),
                        None => "unknown".to_owned(),
                    };
                    eprintln!(
                        "  peer {held}: {:?} for {:.0} s, identified {}, rtt {:?}",
                        p.direction,
                        p.connected_for.as_secs_f64(),
                        p.protocol_version.is_some(),
                        p.rtt
                    );
                }
            }
        }
    }
    report.heap_bytes_per_node = Some(crate::heap_bytes() as f64 / nodes.len() as f64);
    report.rss_at_convergence_bytes = crate::report::rss_bytes();
    report.tasks_at_convergence = Some(
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks(),
    );
    let status = statuses(&nodes).await;
    report.kad_requests_at_convergence = KadRequests::of(status.iter().map(|s| s.kad_requests));
    report.connections_per_node = Some(mean(status.iter().map(|s| s.peers as f64)));
    report.status_answer_ms_at_convergence = answer_ms(&status);
    report.load_avg_at_convergence = crate::report::load_avg();
    eprintln!(
        "{}; heap {:.0} KiB per node",
        match report.converged_s {
            Some(s) => format!("converged after {s:.1} s"),
            None => "not converged".to_owned(),
        },
        report.heap_bytes_per_node.unwrap_or(0.0) / 1024.0
    );

    // Idle traffic.
    if !clock.past_deadline() {
        clock.enter("idle traffic");
        eprintln!(
            "idle: {} s to settle, then a {} s window",
            IDLE_SETTLE.as_secs(),
            IDLE_WINDOW.as_secs()
        );
        report.idle = idle_traffic(&net, &nodes, &clock).await;
        if report.idle.is_none() && clock.aborted().is_none() {
            report
                .failures
                .push("idle traffic: the run's deadline came before the window ended".to_owned());
        }
    }

    // Model lookups.
    if !clock.past_deadline() {
        clock.enter("model lookups");
        eprintln!("looking up {} single-holder models", nodes.len());
        let asks = lookup_pairs(&nodes, &mut rng);
        report.nodes_with_unannounced_keys = Some(
            statuses(&nodes)
                .await
                .iter()
                .filter(|s| s.unannounced_keys > 0)
                .count(),
        );
        report.model_lookups_total = Some(asks.len());
        // The ranked lookups (what the gateway asks), then, apart so that
        // slow walks cannot hide the ranked figure, the exact key queries.
        let ranked = Mutex::new(0);
        let ranked_run = model_lookups(&asks, |asker, holder| {
            let ranked = &ranked;
            async move {
                let model = own_model(holder.index);
                if let Ok(true) = ranked_finds(&asker.handle, &model, &holder.peer_id).await {
                    *lock(ranked) += 1;
                }
            }
        });
        let done = clock.run(LOOKUP_PHASE_LIMIT, ranked_run).await.is_some();
        report.model_lookups_found = Some(*lock(&ranked));
        if !done {
            report.failures.push(format!(
                "model lookups: not all answered within {} s",
                LOOKUP_PHASE_LIMIT.as_secs()
            ));
        }
        let dht: Mutex<(usize, usize, Vec<u32>)> = Mutex::new((0, 0, Vec::new()));
        let dht_run = model_lookups(&asks, |asker, holder| {
            let dht = &dht;
            async move {
                let model = own_model(holder.index);
                let outcome = dht_finds(&asker.handle, &model, &holder.peer_id).await;
                let mut dht = lock(dht);
                dht.0 += 1;
                if let Ok((true, hops)) = outcome {
                    dht.1 += 1;
                    dht.2.extend(hops);
                }
            }
        });
        let done = clock.run(LOOKUP_PHASE_LIMIT, dht_run).await.is_some();
        let (answered, found, hops) = std::mem::take(&mut *lock(&dht));
        report.dht_model_lookups_found = Some(found);
        report.set_hops(&hops);
        if !done {
            report.failures.push(format!(
                "DHT key lookups: {answered} of {} answered within {} s",
                asks.len(),
                LOOKUP_PHASE_LIMIT.as_secs()
            ));
        }
    }

    // A new service.
    if !clock.past_deadline() {
        clock.enter("new service spread");
        eprintln!("registering a new service on a random node");
        match spread(&nodes, args, &clock, &mut rng).await {
            Ok(p99) => report.new_service_visible_p99_s = Some(p99),
            Err(e) => report.failures.push(format!("new service: {e}")),
        }
    }

    // Churn.
    if let Some(percent) = args.churn
        && !clock.past_deadline()
    {
        clock.enter("churn");
        let churn = churn(&net, &mut nodes, percent, args, &clock, &mut rng).await;
        if let Some(failure) = &churn.failure {
            report.failures.push(failure.clone());
        }
        report.churn = Some(churn);
    }

    clock.enter("the end");
    let status = statuses(&nodes).await;
    report.load_avg_at_end = crate::report::load_avg();
    report.kad_requests_at_end = KadRequests::of(status.iter().map(|s| s.kad_requests));
    report.status_answer_ms_at_end = answer_ms(&status);
    report.heap_bytes_per_node_at_end =
        Some(crate::heap_bytes() as f64 / nodes.iter().filter(|n| n.alive).count().max(1) as f64);
    if let Some(reason) = clock.aborted() {
        report.failures.push(reason);
    } else if clock.past_deadline() {
        report.failures.push(format!(
            "the run's deadline ({} s) came before every phase ran",
            args.deadline
        ));
    }
    report.finish(clock.started.elapsed());
    eprintln!("stopping the nodes");
    let stops = join_all(
        nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| n.handle.shutdown()),
    );
    let _ = tokio::time::timeout(SHUTDOWN_LIMIT, stops).await;
    Ok(report)
}

fn humanize(d: Duration) -> String {
    format!("{} s", d.as_secs())
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, count) = values.fold((0.0, 0usize), |(s, c), v| (s + v, c + 1));
    if count == 0 { 0.0 } else { sum / count as f64 }
}

/// Start every node, `--wave` at a time, each with its services.
async fn start_nodes(
    net: &SimNetwork,
    planned: Vec<PlannedNode>,
    args: &Args,
    clock: &Clock,
) -> anyhow::Result<Vec<SimNode>> {
    let mut nodes = Vec::with_capacity(planned.len());
    let mut planned = planned.into_iter().enumerate().peekable();
    while planned.peek().is_some() {
        let wave: Vec<(usize, PlannedNode)> = planned.by_ref().take(args.wave).collect();
        let starts = wave.into_iter().map(|(index, p)| async move {
            let transport = net
                .transport(index, &p.key)
                .with_context(|| format!("node {index}: no Noise key"))?;
            let handle = Node::new(p.config)
                .with_transport(transport)
                .with_keypair(p.key)
                .start()
                .await
                .with_context(|| format!("node {index} did not start"))?;
            let refused = handle
                .update_services(p.services, Vec::new())
                .await
                .with_context(|| format!("node {index} stopped while registering"))?;
            if let Some((id, e)) = refused.into_iter().next() {
                anyhow::bail!("node {index} refused its service {id}: {e}");
            }
            Ok(SimNode {
                index,
                peer_id: p.peer.to_string(),
                handle,
                alive: true,
            })
        });
        let started = clock
            .run(Duration::from_secs(120), join_all(starts))
            .await
            .context("a start wave did not finish within 120 s (or the run was cut short)")?;
        for node in started {
            nodes.push(node?);
        }
        if planned.peek().is_some() {
            tokio::time::sleep(Duration::from_millis(args.wave_gap_ms)).await;
        }
    }
    Ok(nodes)
}

/// Every service of the mesh: service ids by peer id.
struct Expected(HashMap<String, HashSet<String>>);

impl Expected {
    fn len(&self) -> usize {
        self.0.values().map(HashSet::len).sum()
    }

    fn contains(&self, peer: &str, id: &str) -> bool {
        self.0.get(peer).is_some_and(|ids| ids.contains(id))
    }
}

/// How convergence went.
struct Convergence {
    converged_s: Option<f64>,
    /// Nodes whose lookup returned every service.
    complete: usize,
    /// The fewest services any node's lookup returned, at its best.
    min_seen: usize,
    /// The node that saw them.
    least_node: usize,
    /// The mean of each node's best.
    mean_seen: f64,
    failure: Option<String>,
}

/// Each node's best lookup so far, and when any node last saw more.
struct Progress {
    best: Vec<usize>,
    complete: usize,
    last_gain: Instant,
}

/// Ask every node how many services it holds every `--poll-ms` until each
/// holds, and its ranked lookup returns, every service of the mesh (or the
/// wait runs out or stalls).
async fn converge(
    nodes: &[SimNode],
    expected: &Expected,
    args: &Args,
    clock: &Clock,
) -> Convergence {
    let total = expected.len();
    let progress = Mutex::new(Progress {
        best: vec![0; nodes.len()],
        complete: 0,
        last_gain: Instant::now(),
    });
    let poll = args.poll();
    let loops = nodes.iter().enumerate().map(|(i, node)| {
        let progress = &progress;
        async move {
            loop {
                // The count of services the node holds is cheap to ask for
                // (a ranked answer of every service of the mesh, from every
                // node every poll, would cost more than the mesh itself);
                // once it reaches the total, one ranked lookup checks that
                // they are the expected ones.
                let Ok(status) = node.handle.status().await else {
                    return;
                };
                let mut seen = (status.services.local + status.services.remote).min(total);
                if seen == total {
                    let Ok(found) = node.handle.find_services(llm_query()).await else {
                        return;
                    };
                    seen = found
                        .iter()
                        .filter(|s| expected.contains(&s.service.peer_id, &s.service.id))
                        .count();
                }
                {
                    let mut p = lock(progress);
                    if seen > p.best[i] {
                        p.best[i] = seen;
                        p.last_gain = Instant::now();
                    }
                    if seen == total {
                        p.complete += 1;
                        return;
                    }
                }
                tokio::time::sleep(poll).await;
            }
        }
    });
    let stop_at = clock.bound(Duration::from_secs(args.converge_timeout));
    let stall = Duration::from_secs(args.stall);
    let watchdog = async {
        let mut next_print = Instant::now() + PROGRESS_EVERY;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let p = lock(&progress);
            let now = Instant::now();
            let (least_node, least) = least(&p.best);
            let what = format!(
                "{} of {} nodes saw all {total} services; the least (node {least_node}) saw {least}, the mean {:.0}",
                p.complete,
                nodes.len(),
                mean(p.best.iter().map(|&b| b as f64)),
            );
            if let Some(reason) = clock.aborted() {
                return format!("convergence: cut short at {what}: {reason}");
            }
            if now >= next_print {
                eprintln!(
                    "  converging, {:.0} s: {what}",
                    clock.started.elapsed().as_secs_f64()
                );
                next_print = now + PROGRESS_EVERY;
            }
            if now >= stop_at {
                return format!(
                    "convergence: not reached after {:.0} s: {what}",
                    clock.started.elapsed().as_secs_f64()
                );
            }
            if now - p.last_gain >= stall {
                return format!(
                    "convergence: stalled (no node's lookup gained a service for {} s) at {:.0} s: {what}",
                    stall.as_secs(),
                    clock.started.elapsed().as_secs_f64()
                );
            }
        }
    };
    let failure = tokio::select! {
        _ = join_all(loops) => None,
        failure = watchdog => Some(failure),
    };
    let p = lock(&progress);
    Convergence {
        converged_s: failure
            .is_none()
            .then(|| clock.started.elapsed().as_secs_f64()),
        complete: p.complete,
        min_seen: least(&p.best).1,
        least_node: least(&p.best).0,
        mean_seen: mean(p.best.iter().map(|&b| b as f64)),
        failure,
    }
}

/// The node that saw the fewest services (the first of them), and how
/// many it saw.
fn least(best: &[usize]) -> (usize, usize) {
    best.iter()
        .copied()
        .enumerate()
        .min_by_key(|(_, seen)| *seen)
        .unwrap_or((0, 0))
}

/// What one node's status said, and how long the node took to answer.
struct Sample {
    kad_requests: u64,
    peers: usize,
    /// Model keys whose last DHT announcement reached no peer.
    unannounced_keys: usize,
    /// The status request's round trip through the node's task: how far
    /// behind the machine is (every node shares its two cores).
    answer: Duration,
}

/// Every live node's [`Sample`], asked all at once.
async fn statuses(nodes: &[SimNode]) -> Vec<Sample> {
    join_all(nodes.iter().filter(|n| n.alive).map(|n| async {
        let asked = Instant::now();
        let status = n.handle.status().await.ok()?;
        Some(Sample {
            kad_requests: status.discovery.dht_requests_sent,
            peers: status.connections.peers,
            unannounced_keys: status.discovery.dht_unannounced_keys,
            answer: asked.elapsed(),
        })
    }))
    .await
    .into_iter()
    .flatten()
    .collect()
}

/// The median and the longest of the samples' answer times, in ms.
fn answer_ms(samples: &[Sample]) -> Option<(f64, f64)> {
    let mut ms: Vec<f64> = samples
        .iter()
        .map(|s| s.answer.as_secs_f64() * 1000.0)
        .collect();
    ms.sort_by(f64::total_cmp);
    Some((*ms.get(ms.len() / 2)?, *ms.last()?))
}

/// What the nodes do while idle, per node and second over the idle window
/// (after settling): bytes on the wire, CPU (of the whole process, so the
/// runtime's own threads are in it), Kademlia requests sent.
async fn idle_traffic(net: &SimNetwork, nodes: &[SimNode], clock: &Clock) -> Option<Idle> {
    let total = || -> u64 {
        nodes
            .iter()
            .filter(|n| n.alive)
            .map(|n| net.traffic(n.index).total())
            .sum()
    };
    let kad = || async {
        statuses(nodes)
            .await
            .iter()
            .map(|s| s.kad_requests)
            .sum::<u64>()
    };
    if Instant::now() + IDLE_SETTLE + IDLE_WINDOW > clock.deadline {
        return None;
    }
    if !clock.sleep(IDLE_SETTLE).await {
        return None;
    }
    // Bytes, CPU and the window's length are read together; the Kademlia
    // counts (which take a status round of every node) just outside them.
    let kad_before = kad().await;
    let before = total();
    let cpu_before = cpu_seconds();
    let from = Instant::now();
    if !clock.sleep(IDLE_WINDOW).await {
        return None;
    }
    let bytes = total().saturating_sub(before);
    let cpu = cpu_seconds()
        .zip(cpu_before)
        .map(|(after, before)| after - before);
    let seconds = from.elapsed().as_secs_f64();
    let kad_requests = kad().await.saturating_sub(kad_before);
    let alive = nodes.iter().filter(|n| n.alive).count().max(1) as f64;
    Some(Idle {
        bytes_per_node_per_s: bytes as f64 / alive / seconds,
        cpu_ms_per_node_per_s: cpu.map(|c| c * 1000.0 / alive / seconds),
        kad_requests_per_node_per_s: kad_requests as f64 / alive / seconds,
    })
}

/// Each node that holds a single-holder model with a random other node to
/// ask for it.
fn lookup_pairs<'a>(nodes: &'a [SimNode], rng: &mut StdRng) -> Vec<(&'a SimNode, &'a SimNode)> {
    let alive: Vec<&SimNode> = nodes.iter().filter(|n| n.alive).collect();
    alive
        .iter()
        .map(|holder| {
            let asker = alive
                .iter()
                .filter(|n| n.index != holder.index)
                .choose(rng)
                .copied()
                .unwrap_or(holder);
            (asker, *holder)
        })
        .collect()
}

/// Run `ask(asker, holder)` for every pair, [`LOOKUP_CONCURRENCY`] at a
/// time; `ask` records its own outcome (so a cut-short run keeps what
/// finished).
async fn model_lookups<'a, F, Fut>(asks: &[(&'a SimNode, &'a SimNode)], ask: F)
where
    F: Fn(&'a SimNode, &'a SimNode) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    futures::stream::iter(asks.iter().map(|(asker, holder)| ask(asker, holder)))
        .buffer_unordered(LOOKUP_CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
}

/// Register a new service on a random node; the time until 99% of the
/// nodes hold it (each node's own `ServiceAdded` event for it).
async fn spread(
    nodes: &[SimNode],
    args: &Args,
    clock: &Clock,
    rng: &mut StdRng,
) -> anyhow::Result<f64> {
    let alive: Vec<&SimNode> = nodes.iter().filter(|n| n.alive).collect();
    let origin = alive.choose(rng).context("no node is alive")?;
    let service = ServiceInfo {
        tags: vec![NEW_SERVICE_TAG.to_owned()],
        ..model_service("model-new:latest")
    };
    let id = service.id.clone();
    let receivers: Vec<_> = alive.iter().map(|n| n.handle.subscribe()).collect();
    origin
        .handle
        .register_service(service)
        .await
        .context("the origin refused the new service")?;
    let registered = Instant::now();
    let needed = (alive.len() * SPREAD_PERCENT).div_ceil(100);
    let seen: Mutex<Vec<f64>> = Mutex::new(Vec::new());
    let enough = Notify::new();
    // Each node's own event: the service is in its verified cache, where
    // a lookup (the gateway's) finds it. Watching the events, not polling
    // lookups, keeps the probe from loading the mesh it measures: a lookup
    // that finds nothing in the cache walks the DHT.
    let loops = receivers.into_iter().map(|mut events| {
        let (id, seen, enough) = (&id, &seen, &enough);
        async move {
            loop {
                match events.recv().await {
                    Ok(NodeEvent::ServiceAdded {
                        peer_id,
                        service_id,
                        ..
                    }) if peer_id.to_string() == origin.peer_id && service_id == *id => {
                        let mut seen = lock(seen);
                        seen.push(registered.elapsed().as_secs_f64());
                        if seen.len() >= needed {
                            enough.notify_one();
                        }
                        return;
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        }
    });
    let waits = async {
        tokio::select! {
            _ = join_all(loops) => {}
            () = enough.notified() => {}
        }
    };
    clock
        .run(Duration::from_secs(args.spread_timeout), waits)
        .await;
    let mut seen = lock(&seen).clone();
    seen.sort_by(f64::total_cmp);
    match seen.get(needed.saturating_sub(1)) {
        Some(p99) if seen.len() >= needed => Ok(*p99),
        _ => anyhow::bail!(
            "{} of {} nodes saw it after {:.0} s ({needed} needed)",
            seen.len(),
            alive.len(),
            registered.elapsed().as_secs_f64()
        ),
    }
}

/// Crash `percent` of the nodes at once; the time until no survivor's
/// lookup returns any of their services.
async fn churn(
    net: &SimNetwork,
    nodes: &mut [SimNode],
    percent: u32,
    args: &Args,
    clock: &Clock,
    rng: &mut StdRng,
) -> Churn {
    let count = (nodes.len() * percent as usize).div_ceil(100);
    let mut victims: Vec<usize> = (0..nodes.len()).collect();
    victims.shuffle(rng);
    victims.truncate(count);
    let departed: HashSet<String> = victims.iter().map(|&i| nodes[i].peer_id.clone()).collect();
    eprintln!(
        "churn: crashing {count} nodes (record_ttl {})",
        humanize(plan::CHURN_RECORD_TTL)
    );
    let crashed_at = Instant::now();
    for &i in &victims {
        net.crash(nodes[i].index);
        nodes[i].alive = false;
        // Stop its task: with every link cut nothing it says gets out.
        let handle = nodes[i].handle.clone();
        tokio::spawn(async move {
            let _ = handle.shutdown().await;
        });
    }
    let survivors: Vec<&SimNode> = nodes.iter().filter(|n| n.alive).collect();
    let limit = clock.bound(plan::CHURN_RECORD_TTL * 2 + Duration::from_secs(60));
    let limit_left = || limit.saturating_duration_since(Instant::now());
    let mut dirty = survivors.len();
    let mut next_print = Instant::now() + PROGRESS_EVERY;
    let mut gone_s = None;
    while Instant::now() < limit {
        let round = join_all(
            survivors
                .iter()
                .map(|n| n.handle.find_services(llm_query())),
        );
        let Some(answers) = clock.run(limit_left(), round).await else {
            break;
        };
        dirty = answers
            .iter()
            .filter(|a| match a {
                Ok(found) => found.iter().any(|s| departed.contains(&s.service.peer_id)),
                Err(_) => false,
            })
            .count();
        if dirty == 0 {
            gone_s = Some(crashed_at.elapsed().as_secs_f64());
            break;
        }
        if Instant::now() >= next_print {
            eprintln!(
                "  churn, {:.0} s after the crash: {dirty} of {} survivors still return a departed node's service",
                crashed_at.elapsed().as_secs_f64(),
                survivors.len()
            );
            next_print = Instant::now() + PROGRESS_EVERY;
        }
        if !clock.sleep(args.poll()).await {
            break;
        }
    }
    Churn {
        percent,
        crashed: count,
        record_ttl_s: plan::CHURN_RECORD_TTL.as_secs_f64(),
        record_refresh_s: plan::CHURN_RECORD_REFRESH.as_secs_f64(),
        departed_gone_s: gone_s,
        failure: gone_s.is_none().then(|| {
            format!(
                "churn: {dirty} of {} survivors still returned a departed node's service {:.0} s after the crash",
                survivors.len(),
                crashed_at.elapsed().as_secs_f64()
            )
        }),
    }
}
