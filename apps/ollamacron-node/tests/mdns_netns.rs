//! mDNS discovery between two real `ollamacron-node` processes.
//!
//! Multicast must not leak onto the machine's real network, and on loopback
//! it is unreliable, so the test builds its own lab: two network namespaces
//! joined by a veth pair on a private 10.77.N.0/24 subnet. Both nodes run
//! inside those namespaces (`ip netns exec`), with no bootstrap peers and the
//! DHT off, so mDNS is the only way they can find each other. No node with
//! mDNS on ever runs in the root namespace.
//!
//! Creating namespaces needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN) and the
//! `ip` tool. Without them the test prints a loud SKIPPED message on stderr
//! and passes; set `MDNS_NETNS_REQUIRED=1` or `CI=true` (as CI does; root is
//! available) to turn that skip into a failure. Every failure after the first
//! namespace exists is a test failure.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point
#![allow(clippy::print_stderr)] // a skip or a namespace left behind must be seen

mod common;

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ollamacron-node");
/// Set to `1` to make "cannot create network namespaces" a failure.
const REQUIRE_VAR: &str = "MDNS_NETNS_REQUIRED";
/// Startup, discovery and connection, all together.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(30);
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// Run `ip ARGS`; the error names the command and what `ip` said.
fn ip(args: &[&str]) -> Result<(), String> {
    common::run("ip", args)
}

fn must_ip(args: &[&str]) {
    if let Err(e) = ip(args) {
        panic!("setting up the network namespaces: {e}");
    }
}

fn netns_list() -> String {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The `OLLAMACRON_*` variables of the environment the test runs in: removed
/// from the nodes' environment so a developer's settings cannot change them.
fn ollamacron_env() -> Vec<OsString> {
    std::env::vars_os()
        .map(|(name, _)| name)
        .filter(|name| name.to_string_lossy().starts_with("OLLAMACRON_"))
        .collect()
}

fn command(program: &str) -> Command {
    let mut cmd = Command::new(program);
    for name in ollamacron_env() {
        cmd.env_remove(name);
    }
    cmd.env_remove("RUST_LOG").stdin(Stdio::null());
    cmd
}

fn peer_id(data_dir: &Path) -> String {
    let out = command(BIN)
        .args(["id", "--data-dir", data_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ollamacron-node id: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(id.starts_with("12D3KooW"), "not a peer id: {id:?}");
    id
}

/// One node running inside a namespace, and every stderr line read so far.
struct Node {
    label: &'static str,
    netns: String,
    peer_id: String,
    child: Child,
    lines: mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Node {
    /// Read the lines that are already there, without waiting.
    fn drain(&mut self) {
        while let Ok(line) = self.lines.try_recv() {
            self.log.push(line);
        }
    }
}

/// The two namespaces, the veth pair and the nodes. Dropping it (also while
/// unwinding from a failed assertion) kills the nodes, then deletes the
/// namespaces, which takes the veth pair with them.
struct Lab {
    namespaces: Vec<String>,
    root_veth: Option<String>,
    nodes: Vec<Node>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
        // Only there if moving it into its namespace failed.
        if let Some(veth) = self.root_veth.take()
            && ip(&["link", "show", "dev", &veth]).is_ok()
            && let Err(e) = ip(&["link", "del", "dev", &veth])
        {
            eprintln!("mdns_netns: could not remove veth {veth}: {e}");
        }
        for ns in self.namespaces.drain(..) {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                eprintln!("mdns_netns: LEFT BEHIND network namespace {ns}: {e}");
            }
        }
    }
}

impl Lab {
    /// Build the lab, or `None` (after saying so loudly) when this machine
    /// cannot create network namespaces at all.
    fn create(ns: [&str; 2], veth: [&str; 2], subnet: u32) -> Option<Self> {
        if let Err(reason) = ip(&["netns", "add", ns[0]]) {
            assert!(
                !reason.contains("File exists"),
                "network namespace {} already exists (left behind by an earlier run?): {reason}",
                ns[0]
            );
            skip(&reason);
            return None;
        }
        let mut lab = Self {
            namespaces: vec![ns[0].to_owned()],
            root_veth: None,
            nodes: Vec::new(),
        };
        must_ip(&["netns", "add", ns[1]]);
        lab.namespaces.push(ns[1].to_owned());
        must_ip(&[
            "link", "add", veth[0], "type", "veth", "peer", "name", veth[1],
        ]);
        lab.root_veth = Some(veth[0].to_owned());
        for i in 0..2 {
            must_ip(&["link", "set", "dev", veth[i], "netns", ns[i]]);
            let addr = format!("10.77.{subnet}.{}/24", i + 1);
            must_ip(&["-n", ns[i], "addr", "add", &addr, "dev", veth[i]]);
            must_ip(&["-n", ns[i], "link", "set", "dev", "lo", "up"]);
            must_ip(&["-n", ns[i], "link", "set", "dev", veth[i], "up"]);
        }
        lab.root_veth = None;
        Some(lab)
    }

    /// Start a node in namespace `netns` and return its index.
    fn start(&mut self, label: &'static str, netns: &str, data_dir: &Path) -> usize {
        let peer_id = peer_id(data_dir);
        let mut child = command("ip")
            .args(["netns", "exec", netns, BIN, "run"])
            .args(["--listen", "/ip4/0.0.0.0/tcp/0"])
            .args(["--api-listen", "127.0.0.1:0"])
            .args(["--data-dir", data_dir.to_str().unwrap()])
            .args(["--no-dht", "--log-format", "json"])
            .args(["--log-level", "ollamacron_node_core=debug,info"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = common::stderr_lines(&mut child);
        self.nodes.push(Node {
            label,
            netns: netns.to_owned(),
            peer_id,
            child,
            lines,
            log: Vec::new(),
        });
        self.nodes.len() - 1
    }

    /// Wait until node `i` has logged a line that `matches` (earlier lines
    /// count too); on timeout or exit, fail with both nodes' logs.
    fn wait_for(
        &mut self,
        i: usize,
        what: &str,
        deadline: Instant,
        matches: impl Fn(&str) -> bool,
    ) -> String {
        if let Some(line) = self.nodes[i].log.iter().find(|l| matches(l)) {
            return line.clone();
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let problem = match self.nodes[i].lines.recv_timeout(left) {
                Ok(line) => {
                    self.nodes[i].log.push(line.clone());
                    if matches(&line) {
                        return line;
                    }
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => "timed out".to_owned(),
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.nodes[i].child.wait().unwrap();
                    format!("the node exited ({status})")
                }
            };
            let label = self.nodes[i].label;
            panic!(
                "node {label} never logged {what}: {problem}\n{}",
                self.logs()
            );
        }
    }

    fn logs(&mut self) -> String {
        let mut text = String::new();
        for node in &mut self.nodes {
            node.drain();
            text.push_str(&format!(
                "--- node {} ({}, in netns {}) stderr:\n{}\n",
                node.label,
                node.peer_id,
                node.netns,
                node.log.join("\n")
            ));
        }
        text
    }

    fn wait_exit(&mut self, i: usize) -> ExitStatus {
        let deadline = Instant::now() + EXIT_TIMEOUT;
        loop {
            if let Some(status) = self.nodes[i].child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() >= deadline {
                let label = self.nodes[i].label;
                panic!("node {label} did not exit after SIGTERM\n{}", self.logs());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn skip(reason: &str) {
    common::skip_unless_required(
        &format!(
            "SKIPPED mdns_netns: cannot create network namespaces: {reason}; \
             mDNS is NOT tested on this machine (needs root and iproute2; \
             set {REQUIRE_VAR}=1 to make this a failure)"
        ),
        REQUIRE_VAR,
    );
}

/// The inode of a network namespace: equal inodes, same namespace.
fn netns_inode(path: &str) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .ino()
}

#[test]
fn two_nodes_find_each_other_by_mdns_in_network_namespaces() {
    let pid = std::process::id();
    let subnet = pid % 250 + 1;
    let ns_a = format!("ocmdns-{pid}-a");
    let ns_b = format!("ocmdns-{pid}-b");
    // Interface names have at most 15 bytes; a pid has at most 7 digits.
    let veth_a = format!("ocm{pid}a");
    let veth_b = format!("ocm{pid}b");
    let Some(mut lab) = Lab::create([&ns_a, &ns_b], [&veth_a, &veth_b], subnet) else {
        return;
    };

    let dir_a = tempfile::tempdir().unwrap();
    let dir_b = tempfile::tempdir().unwrap();
    let a = lab.start("A", &ns_a, dir_a.path());
    let b = lab.start("B", &ns_b, dir_b.path());
    let deadline = Instant::now() + DISCOVERY_TIMEOUT;

    for (i, host) in [(a, 1), (b, 2)] {
        let id = lab.nodes[i].peer_id.clone();
        let running = lab.wait_for(i, "\"node running\"", deadline, |l| {
            l.contains("\"message\":\"node running\"")
        });
        assert!(
            running.contains(&format!("\"peer_id\":\"{id}\"")),
            "{running}"
        );
        // The veth end is up and the node listens on it.
        let on_veth = format!("\"address\":\"/ip4/10.77.{subnet}.{host}/tcp/");
        lab.wait_for(i, &format!("listening on {on_veth}"), deadline, |l| {
            l.contains("\"message\":\"listening\"") && l.contains(&on_veth)
        });
        // `ip netns exec` execs the node: the child is the node itself, in
        // the namespace the test made (never the root namespace).
        let node_pid = lab.nodes[i].child.id();
        let comm = std::fs::read_to_string(format!("/proc/{node_pid}/comm")).unwrap();
        assert_eq!(comm.trim(), "ollamacron-node", "pid {node_pid}");
        let netns = lab.nodes[i].netns.clone();
        assert_eq!(
            netns_inode(&format!("/proc/{node_pid}/ns/net")),
            netns_inode(&format!("/run/netns/{netns}")),
            "node {} runs in network namespace {netns}",
            lab.nodes[i].label
        );
        assert_ne!(
            netns_inode(&format!("/proc/{node_pid}/ns/net")),
            netns_inode("/proc/self/ns/net"),
            "a node with mDNS on must not run in the test's own network namespace"
        );
    }

    for (me, other) in [(a, b), (b, a)] {
        let other_id = lab.nodes[other].peer_id.clone();
        let peer_field = format!("\"peer\":\"{other_id}\"");
        lab.wait_for(
            me,
            &format!("\"peer discovered\" for {other_id} from mdns"),
            deadline,
            |l| {
                l.contains("\"message\":\"peer discovered\"")
                    && l.contains(&peer_field)
                    && l.contains("\"source\":\"mdns\"")
            },
        );
    }
    // Discovery leads to a connection, even though both nodes dial each
    // other in the same instant (each dial uses a fresh source port, so
    // the two dials never merge into one simultaneous-open connection).
    for (me, other) in [(a, b), (b, a)] {
        let other_id = lab.nodes[other].peer_id.clone();
        let peer_field = format!("\"peer_id\":\"{other_id}\"");
        lab.wait_for(me, &format!("a connection to {other_id}"), deadline, |l| {
            l.contains("\"message\":\"connection established\"") && l.contains(&peer_field)
        });
    }

    for i in [a, b] {
        let kill = Command::new("kill")
            .args(["-TERM", &lab.nodes[i].child.id().to_string()])
            .status()
            .unwrap();
        assert!(kill.success());
    }
    for i in [a, b] {
        let status = lab.wait_exit(i);
        if status.code() != Some(0) {
            let label = lab.nodes[i].label;
            panic!(
                "node {label} exited with {status} after SIGTERM, not 0\n{}",
                lab.logs()
            );
        }
    }

    drop(lab);
    let left = netns_list();
    assert!(
        !left.contains(&ns_a) && !left.contains(&ns_b),
        "namespaces left behind: {left}"
    );
}
