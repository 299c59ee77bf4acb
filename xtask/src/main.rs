//! Project automation. `cargo xtask ci` runs everything CI checks;
//! `cargo xtask mesh` and `cargo xtask bench` measure.

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod mesh;
mod nat_test;

use std::process::{Command, ExitCode};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Ollamacron project automation")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Everything CI checks: fmt, clippy, tests, doc tests, cargo-deny.
    Ci {
        /// Stop at the first failing step instead of running them all.
        #[arg(long)]
        fail_fast: bool,
    },
    /// Time how long N loopback nodes in a line take to find every other
    /// node through the DHT (release build, mDNS off).
    Convergence {
        /// Node counts to measure.
        #[arg(default_values_t = [8usize, 16, 32])]
        nodes: Vec<usize>,
    },
    /// Start N node processes on 127.0.0.1 (release build, mDNS off),
    /// register services, and measure convergence, lookup latency, memory
    /// and start-up; optionally churn.
    Mesh(mesh::MeshArgs),
    /// Run the criterion benches (scoring, records, ranking) and summarise;
    /// `--gateway` measures the gateway instead (time to first token and
    /// tokens/s, and the latency it adds to streamed, non-streamed and
    /// embedding requests at 1 and 64 at once: direct, local, one hop).
    Bench {
        /// Measure the gateway against a stand-in Ollama instead.
        #[arg(long)]
        gateway: bool,
        /// With --gateway: 200 concurrent requests over four serving nodes
        /// against the capacity-bound ideal, healthy and with one failing.
        #[arg(long, requires = "gateway")]
        load: bool,
    },
    /// Two nodes behind their own NAT routers and a public relay, in
    /// network namespaces: AutoNAT, relaying, DCUtR over TCP and QUIC, and
    /// a service found across the NATs (needs root, iproute2, iptables).
    NatTest(nat_test::NatTestArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Task::Ci { fail_fast } => ci(fail_fast),
        Task::Convergence { nodes } => convergence(&nodes),
        Task::Mesh(args) => match &args.binary {
            Some(binary) => mesh::mesh(binary, &args),
            None => mesh::check_settings(&args)
                .and_then(|()| build_node())
                .and_then(|binary| mesh::mesh(&binary, &args)),
        },
        Task::Bench { gateway: false, .. } => bench(),
        Task::Bench {
            gateway: true,
            load,
        } => gateway_bench(if load {
            "gateway_load_bench"
        } else {
            "gateway_bench"
        }),
        Task::NatTest(args) => match &args.binary {
            Some(binary) => nat_test::nat_test(binary, &args),
            None => build_debug_node().and_then(|binary| nat_test::nat_test(&binary, &args)),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Whether this runs in CI (`CI=true`, as `.ci/run` is started there).
pub(crate) fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    if in_ci() {
        // A CI run builds once from a fresh clone: incremental state would
        // only cost time and disk (and every build must agree on it, or
        // the workspace is compiled twice).
        command.env("CARGO_INCREMENTAL", "0");
    }
    command
}

/// One CI step: a name and the command that performs it.
struct Step {
    name: &'static str,
    command: Command,
}

fn step(name: &'static str, args: &[&str]) -> Step {
    let mut command = cargo();
    command.args(args);
    Step { name, command }
}

fn has_cargo_subcommand(name: &str) -> bool {
    cargo()
        .args([name, "--version"])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn ensure_cargo_deny() -> anyhow::Result<()> {
    if has_cargo_subcommand("deny") {
        return Ok(());
    }
    println!("==> cargo-deny is missing: installing it with `cargo install --locked cargo-deny`");
    let status = cargo()
        .args(["install", "--locked", "cargo-deny"])
        .status()
        .context("cannot run cargo install")?;
    if !status.success() {
        bail!("`cargo install --locked cargo-deny` failed ({status})");
    }
    Ok(())
}

fn ci(fail_fast: bool) -> anyhow::Result<()> {
    let mut steps = vec![
        step("fmt", &["fmt", "--all", "--", "--check"]),
        step(
            "clippy",
            &[
                "clippy",
                "--workspace",
                "--all-targets",
                "--locked",
                "--",
                "-D",
                "warnings",
            ],
        ),
    ];
    if has_cargo_subcommand("nextest") {
        steps.push(step(
            "tests",
            &[
                "nextest",
                "run",
                "--workspace",
                "--locked",
                "--profile",
                "ci",
            ],
        ));
    } else {
        println!("==> cargo-nextest not found: running the tests with `cargo test`");
        steps.push(step(
            "tests",
            &["test", "--workspace", "--all-targets", "--locked"],
        ));
    }
    steps.push(step(
        "doc tests",
        &["test", "--workspace", "--doc", "--locked"],
    ));

    let mut failed: Vec<&str> = Vec::new();
    let started = Instant::now();
    for Step { name, mut command } in steps {
        if run_step(name, &mut command) {
            continue;
        }
        failed.push(name);
        if fail_fast {
            break;
        }
    }

    if !fail_fast || failed.is_empty() {
        println!("==> nat-test: cargo xtask nat-test");
        let nat_started = Instant::now();
        // The tests step built `ollamacron-node` for the CLI tests (same
        // profile, same features); building it again with `cargo build`
        // would unify features differently and recompile part of libp2p.
        let built = target_dir().join("debug").join("ollamacron-node");
        let binary = if failed.contains(&"tests") || !built.exists() {
            build_debug_node()
        } else {
            Ok(built)
        };
        let nat = binary
            .and_then(|binary| nat_test::nat_test(&binary, &nat_test::NatTestArgs::default()));
        match nat {
            Ok(()) => println!(
                "==> nat-test: ok ({:.1}s)",
                nat_started.elapsed().as_secs_f64()
            ),
            Err(e) => {
                eprintln!("==> nat-test: FAILED: {e:#}");
                failed.push("nat-test");
            }
        }
    }

    if !fail_fast || failed.is_empty() {
        match ensure_cargo_deny() {
            Ok(()) => {
                println!(
                    "==> note: `cargo deny check advisories` is skipped: this machine cannot fetch the advisory database"
                );
                let mut deny = cargo();
                deny.args(["deny", "check", "bans", "licenses", "sources"]);
                if !run_step("cargo-deny", &mut deny) {
                    failed.push("cargo-deny");
                }
            }
            Err(e) => {
                eprintln!("==> cargo-deny: {e:#}");
                failed.push("cargo-deny");
            }
        }
    }

    let elapsed = started.elapsed().as_secs();
    if failed.is_empty() {
        println!("==> ci passed in {elapsed}s");
        Ok(())
    } else {
        bail!(
            "ci failed in {elapsed}s; failing steps: {}",
            failed.join(", ")
        )
    }
}

fn convergence(nodes: &[usize]) -> anyhow::Result<()> {
    let mut command = cargo();
    command.args([
        "run",
        "--release",
        "--locked",
        "--package",
        "ollamacron-tests",
        "--example",
        "discovery_convergence",
        "--",
    ]);
    command.args(nodes.iter().map(ToString::to_string));
    if run_step("convergence", &mut command) {
        Ok(())
    } else {
        bail!("the convergence measurement failed")
    }
}

/// Build the debug binary (the one the tests use); its path.
fn build_debug_node() -> anyhow::Result<std::path::PathBuf> {
    build_node_in("debug", &[])
}

/// Build `ollamacron-node` with `profile_args`; the binary in
/// `target/<profile_dir>`.
fn build_node_in(profile_dir: &str, profile_args: &[&str]) -> anyhow::Result<std::path::PathBuf> {
    let mut command = cargo();
    command.arg("build").args(profile_args);
    command.args(["--locked", "--package", "ollamacron-node"]);
    if !run_step("build", &mut command) {
        bail!("building ollamacron-node failed");
    }
    let binary = target_dir().join(profile_dir).join("ollamacron-node");
    if !binary.exists() {
        bail!("no binary at {}", binary.display());
    }
    Ok(binary)
}

fn target_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .or_else(|| std::env::var_os("CARGO_BUILD_TARGET_DIR"))
        .map_or_else(
            || {
                std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("..")
                    .join("target")
            },
            std::path::PathBuf::from,
        )
}

/// Build the release binary; its path.
fn build_node() -> anyhow::Result<std::path::PathBuf> {
    build_node_in("release", &["--release"])
}

/// Time to first token, tokens/s and added latency through the gateway
/// (release build).
fn gateway_bench(example: &str) -> anyhow::Result<()> {
    let mut command = cargo();
    command.args([
        "run",
        "--release",
        "--locked",
        "--package",
        "ollamacron-tests",
        "--example",
        example,
    ]);
    if run_step("gateway bench", &mut command) {
        Ok(())
    } else {
        bail!("the gateway measurement failed")
    }
}

/// Run the benches, then print each benchmark's median time.
fn bench() -> anyhow::Result<()> {
    let mut command = cargo();
    command.args([
        "bench",
        "--locked",
        "--package",
        "ollamacron-scoring",
        "--package",
        "ollamacron-service-registry",
    ]);
    println!("==> bench: {}", describe(&command));
    let output = command
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run cargo bench")?;
    let text = String::from_utf8_lossy(&output.stdout);
    print!("{text}");
    if !output.status.success() {
        bail!("cargo bench failed ({})", output.status);
    }
    // Criterion prints `name  time: [low median high]`, the name sometimes
    // on the line before.
    println!("\n==> summary (median time per iteration)");
    let mut name = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some((before, times)) = trimmed.split_once("time:") {
            if !before.trim().is_empty() {
                name = before.trim().to_owned();
            }
            let parts: Vec<&str> = times
                .trim()
                .trim_matches(['[', ']'])
                .split_whitespace()
                .collect();
            if let [_, _, median, unit, ..] = parts.as_slice() {
                println!("{name:<50} {median} {unit}");
            }
        } else if !trimmed.is_empty()
            && !trimmed.starts_with("Benchmarking")
            && !trimmed.contains(':')
            && !trimmed.starts_with("Found")
        {
            name = trimmed.to_owned();
        }
    }
    Ok(())
}

fn run_step(name: &str, command: &mut Command) -> bool {
    println!("==> {name}: {}", describe(command));
    let started = Instant::now();
    let ok = match command.status() {
        Ok(status) => status.success(),
        Err(e) => {
            eprintln!("==> {name}: cannot run: {e}");
            false
        }
    };
    let verdict = if ok { "ok" } else { "FAILED" };
    println!(
        "==> {name}: {verdict} ({:.1}s)",
        started.elapsed().as_secs_f64()
    );
    ok
}

fn describe(command: &Command) -> String {
    let args: Vec<String> = command
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    format!("cargo {}", args.join(" "))
}
