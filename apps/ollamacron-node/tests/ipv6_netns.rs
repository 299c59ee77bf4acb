//! A host without IPv6: the node, with the default (dual-stack) `listen`,
//! starts on IPv4 only and says so in one log line.
//!
//! The test makes such a host: a network namespace of its own with IPv6
//! turned off (`disable_ipv6` on every interface), loopback up, and runs
//! a real `ollamacron-node` inside it with mDNS off. Creating the namespace
//! needs root and `ip`; without them the test prints a SKIPPED banner and
//! passes, except under `CI=true` or `IPV6_NETNS_REQUIRED=1`, where that is
//! a failure.

#![cfg(target_os = "linux")]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point
#![allow(clippy::print_stderr)] // a skip must be seen

mod common;

use std::process::{Command, Stdio};
use std::sync::mpsc::RecvTimeoutError;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_ollamacron-node");
/// Set to `1` to make "cannot create network namespaces" a failure.
const REQUIRE_VAR: &str = "IPV6_NETNS_REQUIRED";
/// From spawn to "node running" and a moment after, for the log line.
const START_TIMEOUT: Duration = Duration::from_secs(30);

use common::run;

/// The namespace, deleted when dropped (also while unwinding).
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "delete", &self.0]) {
            eprintln!("could not delete network namespace {}: {e}", self.0);
        }
    }
}

fn skip(reason: &str) {
    common::skip_unless_required(
        &format!(
            "SKIPPED ipv6_netns: cannot create a network namespace: {reason}; \
             starting on a host without IPv6 is NOT tested on this machine \
             (needs root and iproute2; set {REQUIRE_VAR}=1 to make this a failure)"
        ),
        REQUIRE_VAR,
    );
}

#[test]
fn a_host_without_ipv6_listens_on_ipv4_and_says_so_once() {
    let name = format!("ocr-noip6-{}", std::process::id());
    if let Err(reason) = run("ip", &["netns", "add", &name]) {
        skip(&reason);
        return;
    }
    let netns = Netns(name);
    let exec = |args: &[&str]| {
        let mut all = vec!["netns", "exec", netns.0.as_str()];
        all.extend_from_slice(args);
        run("ip", &all).unwrap_or_else(|e| panic!("setting up the namespace: {e}"));
    };
    exec(&["sysctl", "-q", "-w", "net.ipv6.conf.all.disable_ipv6=1"]);
    exec(&["sysctl", "-q", "-w", "net.ipv6.conf.default.disable_ipv6=1"]);
    exec(&["sysctl", "-q", "-w", "net.ipv6.conf.lo.disable_ipv6=1"]);
    exec(&["ip", "link", "set", "lo", "up"]);

    let data = tempfile::tempdir().unwrap();
    // The default `listen` (IPv4 and IPv6, fixed port): nothing else
    // listens in the test's own namespace.
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &netns.0, BIN, "run", "--data-dir"])
        .arg(data.path())
        .args([
            "--set",
            "enable_mdns=false",
            "--set",
            "enable_gateway=false",
            "--set",
            "enable_ollama=false",
            "--set",
            "api_listen=127.0.0.1:0",
            "--set",
            "log_format=json",
        ])
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("OLLAMACRON_") {
            cmd.env_remove(name);
        }
    }
    let mut child = cmd.spawn().unwrap();
    let lines = common::stderr_lines(&mut child);
    let deadline = Instant::now() + START_TIMEOUT;
    let mut log = Vec::new();
    let running = loop {
        match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(line) => {
                let done = line.contains("\"message\":\"node running\"");
                log.push(line);
                if done {
                    break true;
                }
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break false,
        }
    };
    // Whatever else start-up logs arrives within a moment of Running.
    while let Ok(line) = lines.recv_timeout(Duration::from_millis(500)) {
        log.push(line);
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = log.join("\n");
    assert!(running, "the node did not reach Running:\n{text}");
    let no_ipv6: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("this host has no IPv6"))
        .collect();
    assert_eq!(no_ipv6.len(), 1, "one line says so:\n{text}");
    assert!(
        no_ipv6[0].contains("/ip6/::/tcp/") && no_ipv6[0].contains("quic-v1"),
        "it names what it left out: {}",
        no_ipv6[0]
    );
    let listening: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("\"message\":\"listening\""))
        .collect();
    assert!(
        listening.iter().any(|l| l.contains("/ip4/127.0.0.1/tcp/"))
            && listening.iter().all(|l| !l.contains("/ip6/")),
        "IPv4 listeners only:\n{text}"
    );
    assert!(
        !text.contains("\"level\":\"ERROR\""),
        "no error on the way:\n{text}"
    );
}
