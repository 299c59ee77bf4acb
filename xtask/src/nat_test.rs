//! `cargo xtask nat-test`: two nodes, each behind its own NAT router, and a
//! public relay, all real `ollamacron-node` processes in network namespaces
//! this test creates (and always removes).
//!
//! ```text
//!            203.0.113.0/24 ("internet": a bridge in namespace <p>i)
//!    relay .1          router A .2                 router B .3
//!                      MASQUERADE, inbound only    MASQUERADE, inbound only
//!                      RELATED/ESTABLISHED         RELATED/ESTABLISHED
//!                      10.0.1.1 ── node A .2       10.0.2.1 ── node B .2
//! ```
//!
//! It shows, for TCP and for QUIC: (1) each NATed node detects itself
//! private (AutoNAT), (2) they connect through the relay, (3) DCUtR turns
//! that into a direct connection, and (4) a service registered on B is
//! found from A and B is dialled. Namespaces are named after this process
//! (`ocn<pid>…`), and ones left by a process that no longer runs are
//! removed first.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

/// Port every node listens on (each namespace has its own ports).
const P2P_PORT: u16 = 4001;
/// The local API of every node, inside its own namespace.
const API: &str = "127.0.0.1:11437";
/// How often the test asks a node for its state.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Prefix of every namespace this test creates.
const NS_PREFIX: &str = "ocn";
/// Set `NAT_TEST_KEEP=1` to keep the logs and configs of passing runs too.
/// Lines of each node's log printed when a scenario fails
/// (`NAT_TEST_LOG_LINES` overrides).
static LOG_TAIL_LINES: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
    std::env::var("NAT_TEST_LOG_LINES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60)
});
/// Name of the service B offers.
const SERVICE_NAME: &str = "nat-test-model";

impl Default for NatTestArgs {
    fn default() -> Self {
        Self {
            runs: 1,
            transport: None,
            timeout: Duration::from_secs(90),
            binary: None,
            settings: NodeSettings::Both,
        }
    }
}

/// Which settings the NATed nodes run with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum NodeSettings {
    /// Every default (AutoNAT on global addresses only, `dial_timeout`
    /// 30 s): the documentation addresses of the lab are not global, so
    /// reachability stays unknown, and the nodes must still reserve, find
    /// each other and go direct.
    Defaults,
    /// `autonat_only_global_ips: false` (the lab's addresses count as
    /// global), every other setting default: both nodes detect they are
    /// private first.
    Tuned,
    /// Both, one after the other.
    Both,
}

/// Options of `cargo xtask nat-test`.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct NatTestArgs {
    /// How many times to run each transport's scenario.
    #[arg(long, default_value_t = 1)]
    pub(crate) runs: usize,
    /// Only this transport (default: both).
    #[arg(long, value_parser = ["tcp", "quic"])]
    pub(crate) transport: Option<String>,
    /// Longest one scenario may take.
    #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
    pub(crate) timeout: Duration,
    /// Use this `ollamacron-node` instead of building the debug one.
    #[arg(long)]
    pub(crate) binary: Option<PathBuf>,
    /// The NATed nodes' settings.
    #[arg(long, value_enum, default_value_t = NodeSettings::Both)]
    pub(crate) settings: NodeSettings,
}

/// Why the test cannot run here (not a failure unless CI requires it).
fn namespaces_unavailable() -> Option<String> {
    let probe = format!("{NS_PREFIX}probe{}", std::process::id());
    match run("ip", &["netns", "add", &probe]) {
        Ok(()) => {
            let _ = run("ip", &["netns", "del", &probe]);
        }
        Err(e) => {
            return Some(format!(
                "cannot create a network namespace ({e}); needs root and iproute2"
            ));
        }
    }
    if Command::new("iptables").arg("--version").output().is_err() {
        return Some("iptables is not installed (Debian: apt-get install iptables)".to_owned());
    }
    None
}

pub(crate) fn nat_test(binary: &Path, args: &NatTestArgs) -> anyhow::Result<()> {
    if let Some(reason) = namespaces_unavailable() {
        let bar = "!".repeat(78);
        let message =
            format!("SKIPPED nat-test: {reason}. NAT traversal is NOT tested on this machine.");
        if crate::in_ci() {
            bail!("{message} (CI=true requires it)");
        }
        eprintln!("\n{bar}\n{message}\n{bar}\n");
        return Ok(());
    }
    remove_stale_namespaces();
    let transports: Vec<&str> = match args.transport.as_deref() {
        Some(t) => vec![t],
        None => vec!["tcp", "quic"],
    };
    let mut summary = String::new();
    let mut failures = 0usize;
    let variants: Vec<bool> = match args.settings {
        NodeSettings::Defaults => vec![true],
        NodeSettings::Tuned => vec![false],
        NodeSettings::Both => vec![false, true],
    };
    for (transport, defaults) in transports
        .iter()
        .flat_map(|t| variants.iter().map(move |d| (t, *d)))
    {
        let label = if defaults { "defaults" } else { "tuned" };
        let mut direct_times = Vec::new();
        for run_index in 0..args.runs {
            println!(
                "==> nat-test {transport} ({label} settings) run {}/{}",
                run_index + 1,
                args.runs
            );
            match Scenario::run(binary, transport, defaults, args.timeout) {
                Ok(report) => {
                    println!("    {report}");
                    direct_times.push(report.direct);
                }
                Err(e) => {
                    failures += 1;
                    eprintln!("    FAILED: {e:#}");
                }
            }
        }
        let mut sorted = direct_times.clone();
        sorted.sort();
        let median = sorted.get(sorted.len() / 2).copied();
        let _ = writeln!(
            summary,
            "{transport} ({label} settings): {} of {} runs reached a direct connection{}",
            direct_times.len(),
            args.runs,
            median.map_or(String::new(), |m| format!(
                "; start to direct: median {:.2}s, min {:.2}s, max {:.2}s",
                m.as_secs_f64(),
                sorted.first().map_or(0.0, Duration::as_secs_f64),
                sorted.last().map_or(0.0, Duration::as_secs_f64),
            ))
        );
    }
    println!("==> nat-test summary\n{summary}");
    if failures > 0 {
        bail!("{failures} nat-test run(s) failed");
    }
    Ok(())
}

/// Timings of one scenario, from the start of the two NATed nodes.
struct Report {
    /// When both detected they are private (with tuned settings; with the
    /// defaults AutoNAT does not decide in the lab).
    private: Option<Duration>,
    reserved: Duration,
    found: Duration,
    direct: Duration,
    attempts: u64,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}, reserved on the relay after {:.2}s, B's service found by A after {:.2}s, direct A<->B after {:.2}s ({} hole-punch attempts)",
            self.private.map_or_else(
                || "reachability left unknown".to_owned(),
                |p| format!("both private after {:.2}s", p.as_secs_f64())
            ),
            self.reserved.as_secs_f64(),
            self.found.as_secs_f64(),
            self.direct.as_secs_f64(),
            self.attempts
        )
    }
}

/// The namespaces, the node processes and their files; all removed on drop.
struct Scenario {
    binary: PathBuf,
    prefix: String,
    namespaces: Vec<String>,
    nodes: Vec<(String, Child, PathBuf)>,
    dir: PathBuf,
    passed: bool,
}

impl Drop for Scenario {
    fn drop(&mut self) {
        for (_, child, _) in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in self.namespaces.iter().rev() {
            if let Err(e) = run("ip", &["netns", "del", ns]) {
                eprintln!("nat-test: LEFT BEHIND network namespace {ns}: {e}");
            }
        }
        if self.passed && std::env::var_os("NAT_TEST_KEEP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("nat-test: logs and configs kept in {}", self.dir.display());
        }
    }
}

impl Scenario {
    fn run(
        binary: &Path,
        transport: &str,
        defaults: bool,
        timeout: Duration,
    ) -> anyhow::Result<Report> {
        let prefix = format!("{NS_PREFIX}{}", std::process::id());
        let dir = std::env::temp_dir().join(format!(
            "ollamacron-nat-test-{}-{transport}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut scenario = Self {
            binary: binary.to_owned(),
            prefix,
            namespaces: Vec::new(),
            nodes: Vec::new(),
            dir,
            passed: false,
        };
        let result = scenario
            .build_network()
            .and_then(|()| scenario.exercise(transport, defaults, timeout));
        match &result {
            Ok(_) => scenario.passed = true,
            Err(_) => scenario.print_logs(),
        }
        result
    }

    fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn add_ns(&mut self, name: &str) -> anyhow::Result<String> {
        let ns = self.ns(name);
        run("ip", &["netns", "add", &ns])?;
        self.namespaces.push(ns.clone());
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Build the topology of the module docs.
    fn build_network(&mut self) -> anyhow::Result<()> {
        let inet = self.add_ns("i")?;
        run("ip", &["-n", &inet, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", &inet, "link", "set", "br0", "up"])?;
        // The relay, straight on the internet.
        let relay = self.add_ns("r")?;
        plug(&relay, "eth0", &inet, "r", "203.0.113.1/24")?;
        // Two home routers, each with one node behind it.
        for (router, node, wan, lan_net) in [
            ("ga", "a", "203.0.113.2/24", "10.0.1"),
            ("gb", "b", "203.0.113.3/24", "10.0.2"),
        ] {
            let router = self.add_ns(router)?;
            let node = self.add_ns(node)?;
            let port_name = format!("p{}", &router[router.len() - 1..]);
            plug(&router, "wan", &inet, &port_name, wan)?;
            run(
                "ip",
                &[
                    "-n", &router, "link", "add", "lan", "type", "veth", "peer", "name", "eth0",
                    "netns", &node,
                ],
            )?;
            run(
                "ip",
                &[
                    "-n",
                    &router,
                    "addr",
                    "add",
                    &format!("{lan_net}.1/24"),
                    "dev",
                    "lan",
                ],
            )?;
            run("ip", &["-n", &router, "link", "set", "lan", "up"])?;
            run(
                "ip",
                &[
                    "-n",
                    &node,
                    "addr",
                    "add",
                    &format!("{lan_net}.2/24"),
                    "dev",
                    "eth0",
                ],
            )?;
            run("ip", &["-n", &node, "link", "set", "eth0", "up"])?;
            run(
                "ip",
                &[
                    "-n",
                    &node,
                    "route",
                    "add",
                    "default",
                    "via",
                    &format!("{lan_net}.1"),
                ],
            )?;
            in_ns(&router, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
            for rule in [
                "-t nat -A POSTROUTING -o wan -j MASQUERADE",
                "-A FORWARD -i wan -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                "-A FORWARD -i wan -j DROP",
                // Unsolicited packets to the router itself are dropped too:
                // otherwise a punch packet arriving first would create a
                // conntrack entry that takes the port.
                "-A INPUT -i wan -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
                "-A INPUT -i wan -j DROP",
            ] {
                let args: Vec<&str> = rule.split(' ').collect();
                in_ns(&router, "iptables", &args)?;
            }
        }
        Ok(())
    }

    /// Write a config and start `ollamacron-node run` in namespace `ns`.
    fn start(&mut self, label: &str, ns: &str, yaml: &str) -> anyhow::Result<()> {
        let config = self.dir.join(format!("{label}.yaml"));
        std::fs::write(&config, yaml)?;
        let log = self.dir.join(format!("{label}.log"));
        let stderr = std::fs::File::create(&log)?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", ns])
            .arg(&self.binary)
            .args(["run", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdout(Stdio::null())
            .stderr(stderr);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("OLLAMACRON_") {
                command.env_remove(key);
            }
        }
        let child = command
            .spawn()
            .with_context(|| format!("cannot start {label}"))?;
        self.nodes.push((label.to_owned(), child, log));
        Ok(())
    }

    /// Ask the node in `ns` through its CLI (its API on the namespace's loopback).
    fn cli(&self, ns: &str, args: &[&str]) -> anyhow::Result<Value> {
        let out = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(&self.binary)
            .args(args)
            .args(["--api-listen", API, "--json"])
            .output()?;
        if !out.status.success() {
            bail!(
                "`ollamacron-node {}` in {ns}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn peer_id(&self, label: &str) -> anyhow::Result<String> {
        let out = Command::new(&self.binary)
            .args(["id", "--data-dir"])
            .arg(self.dir.join(label))
            .output()?;
        if !out.status.success() {
            bail!(
                "cannot create {label}'s identity: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }

    fn exercise(
        &mut self,
        transport: &str,
        defaults: bool,
        timeout: Duration,
    ) -> anyhow::Result<Report> {
        let deadline = Instant::now() + timeout;
        let listen = |ip: &str| match transport {
            "quic" => format!("/ip4/{ip}/udp/{P2P_PORT}/quic-v1"),
            _ => format!("/ip4/{ip}/tcp/{P2P_PORT}"),
        };
        let dir = self.dir.clone();
        // `NAT_TEST_LOG=<filter>` gives the nodes another log filter.
        let log_level = std::env::var("NAT_TEST_LOG")
            .unwrap_or_else(|_| "info,ollamacron_nat=debug".to_owned());
        // The relay always runs tuned: it is the AutoNAT server of the
        // lab, and its dial-backs go to documentation addresses.
        let common = |label: &str, tuned: bool| {
            format!(
                "data_dir: {}\nenable_mdns: false\nenable_ollama: false\nenable_gateway: false\napi_listen: {API}\n{}\
                 ping_interval: 2s\nlog_level: \"{log_level}\"\n",
                dir.join(label).display(),
                if tuned {
                    "autonat_only_global_ips: false\n"
                } else {
                    ""
                }
            )
        };
        // The relay: a known public server (its operator says so), serving
        // both transports.
        let relay_id = self.peer_id("relay")?;
        let relay_ns = self.ns("r");
        let relay_yaml = format!(
            "{}node_type: relay\nforce_reachability: public\nlisten: [/ip4/0.0.0.0/tcp/{P2P_PORT}, /ip4/0.0.0.0/udp/{P2P_PORT}/quic-v1]\n",
            common("relay", true)
        );
        self.start("relay", &relay_ns, &relay_yaml)?;
        self.wait(deadline, "the relay to run", || {
            Ok(self
                .cli(&relay_ns, &["status"])
                .ok()
                .filter(|s| s["state"] == "running")
                .map(|_| ()))
        })?;
        let relay_addr = format!("{}/p2p/{relay_id}", listen("203.0.113.1"));

        // The two NATed nodes detect their reachability themselves.
        let started = Instant::now();
        let mut ids = Vec::new();
        for label in ["a", "b"] {
            ids.push(self.peer_id(label)?);
            let yaml = format!(
                "{}listen: [{}]\nbootstrap: [{relay_addr}]\nrelay_nodes: [{relay_addr}]\n",
                common(label, !defaults),
                listen("0.0.0.0")
            );
            let ns = self.ns(label);
            self.start(label, &ns, &yaml)?;
        }
        let (a_ns, b_ns) = (self.ns("a"), self.ns("b"));
        let (a_id, b_id) = (ids[0].clone(), ids[1].clone());
        self.wait(deadline, "B to run", || {
            Ok(self
                .cli(&b_ns, &["status"])
                .ok()
                .filter(|s| s["state"] == "running")
                .map(|_| ()))
        })?;
        let registered = self.cli(
            &b_ns,
            &[
                "services",
                "register",
                "--name",
                SERVICE_NAME,
                "--type",
                "llm",
            ],
        );
        registered.context("registering B's service")?;

        // (1) Both detect they are private (with the defaults AutoNAT
        // does not decide on the lab's documentation addresses: the rest
        // must work while reachability is unknown).
        let private = if defaults {
            None
        } else {
            self.wait(deadline, "A and B to detect they are private", || {
                let a = self.cli(&a_ns, &["status"])?;
                let b = self.cli(&b_ns, &["status"])?;
                Ok(
                    (a["reachability"] == "private" && b["reachability"] == "private")
                        .then_some(()),
                )
            })?;
            Some(started.elapsed())
        };
        // Kademlia follows: client mode while private.
        for (label, ns) in [("A", &a_ns), ("B", &b_ns)]
            .into_iter()
            .filter(|_| !defaults)
        {
            let status = self.cli(ns, &["status"])?;
            let client = status["discovery"]["sources"].as_array().is_some_and(|s| {
                s.iter().any(|s| {
                    s["source"] == "dht"
                        && s["detail"]
                            .as_str()
                            .is_some_and(|d| d.starts_with("client mode"))
                })
            });
            if !client {
                bail!(
                    "{label} is private but its DHT is not in client mode: {}",
                    status["discovery"]
                );
            }
        }
        // ... and reserve a slot on the relay.
        self.wait(
            deadline,
            "A and B to hold a reservation on the relay",
            || {
                let holds = |s: &Value| {
                    s["nat"]["relays"]
                        .as_array()
                        .is_some_and(|r| r.iter().any(|p| *p == Value::String(relay_id.clone())))
                };
                Ok(
                    (holds(&self.cli(&a_ns, &["status"])?)
                        && holds(&self.cli(&b_ns, &["status"])?))
                    .then_some(()),
                )
            },
        )?;
        let reserved = started.elapsed();

        // (4) A finds B's service (through the relay's DHT) and dials B.
        self.wait(deadline, "A to find B's service", || {
            let found = self.cli(&a_ns, &["services", "find", "--type", "llm"])?;
            Ok(found
                .as_array()
                .is_some_and(|list| {
                    list.iter().any(|s| {
                        s["service"]["name"] == SERVICE_NAME
                            && s["service"]["peer_id"] == Value::String(b_id.clone())
                    })
                })
                .then_some(()))
        })?;
        let found = started.elapsed();

        // (2) + (3) The connection went through the relay, then DCUtR made
        // it direct.
        let attempts = self.wait(deadline, "a direct connection between A and B", || {
            let peers = self.cli(&a_ns, &["peers"])?;
            let direct = peers.as_array().is_some_and(|list| {
                list.iter().any(|p| {
                    p["peer_id"] == Value::String(b_id.clone()) && p["connection"] == "direct"
                })
            });
            if !direct {
                return Ok(None);
            }
            let a = self.cli(&a_ns, &["status"])?;
            let b = self.cli(&b_ns, &["status"])?;
            let count = |s: &Value, k: &str| s["nat"]["hole_punch"][k].as_u64().unwrap_or(0);
            Ok(Some((
                count(&a, "attempts") + count(&b, "attempts"),
                count(&a, "succeeded") + count(&b, "succeeded"),
            )))
        })?;
        let direct = started.elapsed();
        let (attempts, succeeded) = attempts;
        if attempts == 0 {
            bail!(
                "A and B are directly connected but never had a relayed connection: the NAT let a direct dial through"
            );
        }
        if succeeded == 0 {
            bail!("A and B are directly connected but no hole punch succeeded");
        }
        let relay_status = self.cli(&relay_ns, &["status"])?;
        if relay_status["nat"]["circuits_served"].as_u64().unwrap_or(0) == 0 {
            bail!("the relay served no circuit");
        }
        // B sees A directly as well.
        let b_peers = self.cli(&b_ns, &["peers"])?;
        if !b_peers.as_array().is_some_and(|l| {
            l.iter()
                .any(|p| p["peer_id"] == Value::String(a_id.clone()) && p["connection"] == "direct")
        }) {
            bail!("B does not see its connection to A as direct: {b_peers}");
        }
        Ok(Report {
            private,
            reserved,
            found,
            direct,
            attempts,
        })
    }

    /// Poll `check` until it yields a value or `deadline` passes.
    fn wait<T>(
        &self,
        deadline: Instant,
        what: &str,
        mut check: impl FnMut() -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<T> {
        let mut last_error = None;
        loop {
            match check() {
                Ok(Some(v)) => return Ok(v),
                Ok(None) => {}
                Err(e) => last_error = Some(e),
            }
            if Instant::now() >= deadline {
                let detail = last_error.map_or(String::new(), |e| format!(" (last error: {e:#})"));
                bail!("timed out waiting for {what}{detail}");
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }

    fn print_logs(&self) {
        for (label, _, log) in &self.nodes {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(*LOG_TAIL_LINES).collect();
            eprintln!(
                "--- {label} (last {} lines of {}):",
                tail.len(),
                log.display()
            );
            for line in tail.iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// A veth from `ns` (named `inside`, with `addr`) to the bridge in `inet`.
fn plug(ns: &str, inside: &str, inet: &str, port: &str, addr: &str) -> anyhow::Result<()> {
    run(
        "ip",
        &[
            "-n", ns, "link", "add", inside, "type", "veth", "peer", "name", port, "netns", inet,
        ],
    )?;
    run("ip", &["-n", inet, "link", "set", port, "master", "br0"])?;
    run("ip", &["-n", inet, "link", "set", port, "up"])?;
    run("ip", &["-n", ns, "addr", "add", addr, "dev", inside])?;
    run("ip", &["-n", ns, "link", "set", inside, "up"])?;
    Ok(())
}

fn in_ns(ns: &str, program: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["netns", "exec", ns, program];
    all.extend_from_slice(args);
    run("ip", &all)
}

fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("cannot run {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Remove namespaces a killed earlier run left (their pid no longer runs).
fn remove_stale_namespaces() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let Ok(pid) = digits.parse::<u32>() else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            match run("ip", &["netns", "del", name]) {
                Ok(()) => eprintln!("nat-test: removed {name}, left by an earlier run"),
                Err(e) => eprintln!("nat-test: cannot remove stale namespace {name}: {e}"),
            }
        }
    }
}
