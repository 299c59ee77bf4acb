//! Project automation. `cargo xtask ci` runs everything CI checks;
//! `cargo xtask mesh`, `cargo xtask sim`, `cargo xtask bench` and
//! `cargo xtask rss` measure; `cargo xtask dist` packages.

#![allow(clippy::print_stdout, clippy::print_stderr)]

mod dist;
mod fuzz;
mod mesh;
mod nat_test;
mod rss;
mod sim;
mod soak;

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
    /// Everything CI checks: fmt, clippy, tests, doc tests, the NAT test,
    /// the completions and man pages of `dist`, every fuzz target briefly,
    /// cargo-deny.
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
    /// register services, and measure convergence, lookup latency, memory,
    /// start-up, Kademlia requests per node and duplicate connections;
    /// optionally churn; `--runs N` repeats it and summarises.
    Mesh(mesh::MeshArgs),
    /// Run N real node cores in one process over in-memory links with
    /// per-link latency (release build) and measure convergence, lookups,
    /// DHT requests, idle traffic, spread of a new service and heap per
    /// node; optionally churn. Arguments go to `ollamacron-sim`
    /// (`cargo xtask sim --help` lists them).
    Sim(sim::SimArgs),
    /// Run the criterion benches (ranking, records, the DHT store, the frame
    /// codec, config loading, the reservation state machine) and summarise;
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
        /// With --gateway: run it twice, without traces and with every
        /// span recorded and exported over OTLP (as `enable_tracing` with
        /// `otlp_endpoint` does), to see what traces cost.
        #[arg(long, requires = "gateway", conflicts_with = "load")]
        traces: bool,
    },
    /// Two nodes behind their own NAT routers and a public relay, in
    /// network namespaces: AutoNAT, relaying, DCUtR over TCP and QUIC, and
    /// a service found across the NATs (needs root, iproute2, iptables).
    NatTest(nat_test::NatTestArgs),
    /// Resident memory of a lone idle node (release build, loopback only,
    /// mDNS off) beside a bare rust-libp2p Kademlia node, from `/proc`:
    /// total, anonymous, file-backed, threads, and where it sits; with
    /// `--experiments`, the node again with one thing changed at a time.
    Rss(rss::RssArgs),
    /// Fuzz every decoder of untrusted input (cargo-fuzz, installed when
    /// missing; `RUSTC_BOOTSTRAP=1` for its own build only): `--list`
    /// names the targets; a crash fails and leaves its input in
    /// `target/fuzz/artifacts/`.
    Fuzz(fuzz::FuzzArgs),
    /// N node processes with stand-in Ollamas under gateway load for M
    /// minutes while nodes are stopped and restarted in turn (release
    /// build, loopback only, mDNS off): resident memory, open file
    /// descriptors, threads and runtime tasks of the long-lived nodes over
    /// time; fails when one grows past its margin.
    Soak(soak::SoakArgs),
    /// What an operator installs, in target/dist/: the release binary,
    /// shell completions (bash, zsh, fish, elvish, PowerShell) and man
    /// pages generated from the binary's clap definitions, the systemd
    /// unit and the Grafana dashboard.
    Dist(dist::DistArgs),
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
        Task::Sim(args) => sim::sim(&args),
        Task::Bench { gateway: false, .. } => bench(),
        Task::Bench {
            gateway: true,
            load: true,
            ..
        } => gateway_bench("gateway_load_bench", false),
        Task::Bench {
            gateway: true,
            traces,
            ..
        } => gateway_bench("gateway_bench", false).and_then(|()| {
            if traces {
                gateway_bench("gateway_bench", true)
            } else {
                Ok(())
            }
        }),
        Task::Rss(args) => rss::rss(&args),
        Task::Fuzz(args) => fuzz::fuzz(&args),
        Task::Soak(args) => soak::soak(&args),
        Task::Dist(args) => dist::dist(&args),
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

/// Install the cargo subcommand `cargo <name>` (crate `cargo-<name>`) with
/// `cargo install --locked` when it is missing.
pub(crate) fn ensure_cargo_tool(name: &str) -> anyhow::Result<()> {
    if has_cargo_subcommand(name) {
        return Ok(());
    }
    let krate = format!("cargo-{name}");
    println!("==> {krate} is missing: installing it with `cargo install --locked {krate}`");
    let status = cargo()
        .args(["install", "--locked", &krate])
        .status()
        .context("cannot run cargo install")?;
    if !status.success() {
        bail!("`cargo install --locked {krate}` failed ({status})");
    }
    Ok(())
}

/// Debian packages the tests need, by a command each installs: network
/// namespaces (iproute2) for the mDNS, IPv6 and NAT tests, iptables for the
/// NAT test's routers, libfaketime for the clock-skew test, Chromium for
/// the dashboard's test, systemd-analyze for the unit file's check (each
/// fails under `CI=true` without them), zsh to parse its completions.
const DEBIAN_PACKAGES: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("iptables", "iptables"),
    ("faketime", "faketime"),
    ("chromium", "chromium"),
    ("systemd-analyze", "systemd"),
    ("zsh", "zsh"),
];

pub(crate) fn has_command(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Install the missing [`DEBIAN_PACKAGES`] with apt-get when running as
/// root on a machine that has it; else say what is missing (the tests that
/// need them say so too, and fail under `CI=true`).
fn ensure_debian_packages() -> anyhow::Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(command, _)| !has_command(command))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if !root || !has_command("apt-get") {
        println!(
            "==> missing Debian packages {}: install them (apt-get install {}) or the tests that need them are skipped",
            missing.join(", "),
            missing.join(" ")
        );
        return Ok(());
    }
    println!("==> installing {} with apt-get", missing.join(", "));
    let quiet = |args: &[&str]| -> anyhow::Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("cannot run apt-get")?;
        if !status.success() {
            bail!("`apt-get {}` failed ({status})", args.join(" "));
        }
        Ok(())
    };
    quiet(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq"];
    install.extend(&missing);
    quiet(&install)
}

/// Build example `example` of `package` with the release profile; its
/// path.
pub(crate) fn build_release_example(
    package: &str,
    example: &str,
) -> anyhow::Result<std::path::PathBuf> {
    let mut command = cargo();
    command.args([
        "build",
        "--release",
        "--locked",
        "--package",
        package,
        "--example",
        example,
    ]);
    if !run_step(example, &mut command) {
        bail!("building example {example} of {package} failed");
    }
    let program = target_dir().join("release").join("examples").join(example);
    if !program.exists() {
        bail!("no example program at {}", program.display());
    }
    Ok(program)
}

fn ensure_cargo_deny() -> anyhow::Result<()> {
    ensure_cargo_tool("deny")
}

fn ci(fail_fast: bool) -> anyhow::Result<()> {
    ensure_debian_packages()?;
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
        // The completions and man pages `dist` makes (not the release
        // binary: the tests built and ran the debug one).
        println!("==> dist: completions and man pages");
        let out = target_dir().join("dist-check");
        match dist::dist(&dist::DistArgs {
            out: Some(out.clone()),
            no_binary: true,
        })
        .and_then(|()| dist::check_generated(&out))
        {
            Ok(()) => println!("==> dist: ok"),
            Err(e) => {
                eprintln!("==> dist: FAILED: {e:#}");
                failed.push("dist");
            }
        }
    }

    if !fail_fast || failed.is_empty() {
        let fuzzed = fuzz::fuzz(&fuzz::FuzzArgs {
            list: false,
            seconds: fuzz::CI_SECONDS,
            target: None,
        });
        if let Err(e) = fuzzed {
            eprintln!("==> fuzz: FAILED: {e:#}");
            failed.push("fuzz");
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

pub(crate) fn target_dir() -> std::path::PathBuf {
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
pub(crate) fn build_node() -> anyhow::Result<std::path::PathBuf> {
    build_node_in("release", &["--release"])
}

/// Time to first token, tokens/s and added latency through the gateway
/// (release build).
fn gateway_bench(example: &str, traces: bool) -> anyhow::Result<()> {
    let mut command = cargo();
    if traces {
        println!("==> gateway bench again, with every span exported over OTLP");
        command.env("GATEWAY_BENCH_OTLP", "1");
    }
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

/// A criterion bench of the workspace that `cargo xtask bench` runs.
struct CriterionBench {
    /// Its package.
    package: &'static str,
    /// Its `[[bench]]` target.
    name: &'static str,
}

/// Every criterion bench `cargo xtask bench` runs, in this order. One
/// whose package or `[[bench]]` target is not in the workspace (not
/// written yet) is skipped with a note, not an error.
const CRITERION_BENCHES: [CriterionBench; 6] = [
    CriterionBench {
        package: "ollamacron-scoring",
        name: "rank",
    },
    CriterionBench {
        package: "ollamacron-service-registry",
        name: "records",
    },
    CriterionBench {
        package: "ollamacron-gateway",
        name: "frame_codec",
    },
    CriterionBench {
        package: "ollamacron-config",
        name: "config_load",
    },
    CriterionBench {
        package: "ollamacron-nat",
        name: "reservations",
    },
    CriterionBench {
        package: "ollamacron-discovery-dht",
        name: "dht_store",
    },
];

/// Criterion's warm-up per benchmark id, in seconds (its default is 3).
const BENCH_WARM_UP_SECS: &str = "1";
/// Criterion's measurement per benchmark id, in seconds (its default is
/// 5): with the warm-up, a few seconds an id, so the whole run stays a few
/// minutes on a 2-core machine.
const BENCH_MEASUREMENT_SECS: &str = "2";
/// Samples per benchmark id (criterion's default is 100): fewer samples
/// need fewer iterations, so a slow id (tens of ms an iteration) also
/// finishes close to the measurement time.
const BENCH_SAMPLE_SIZE: &str = "30";

/// Run the criterion benches one by one (those missing from the workspace
/// are skipped), then print each benchmark's median time, and throughput
/// where the bench declares it.
fn bench() -> anyhow::Result<()> {
    let workspace = workspace_benches()?;
    let mut ids: Vec<PrintedResult> = Vec::new();
    let mut skipped: Vec<String> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    for bench in &CRITERION_BENCHES {
        let label = format!("{}/{}", bench.package, bench.name);
        if let Some(why) = workspace.missing(bench) {
            println!("==> bench {label}: skipped: {why}");
            skipped.push(format!("{label} ({why})"));
            continue;
        }
        let mut command = cargo();
        command.args([
            "bench",
            "--locked",
            "--package",
            bench.package,
            "--bench",
            bench.name,
            "--",
            "--warm-up-time",
            BENCH_WARM_UP_SECS,
            "--measurement-time",
            BENCH_MEASUREMENT_SECS,
            "--sample-size",
            BENCH_SAMPLE_SIZE,
            "--noplot",
        ]);
        println!("==> bench: {}", describe(&command));
        match run_echoing_stdout(&mut command) {
            Ok((status, text)) => {
                ids.extend(printed_results(&text));
                if !status.success() {
                    eprintln!("==> bench {label}: FAILED ({status})");
                    failed.push(label);
                }
            }
            Err(e) => {
                eprintln!("==> bench {label}: cannot run: {e:#}");
                failed.push(label);
            }
        }
    }

    let saved = saved_estimates(&workspace.criterion_dir);
    println!("\n==> summary (median time per iteration; throughput at the median)");
    for printed in &ids {
        let (median, throughput) = match saved.get(&printed.id) {
            Some(estimate) => (
                format_nanos(estimate.median_ns),
                estimate
                    .throughput
                    .as_ref()
                    .and_then(|t| format_throughput(t, estimate.median_ns)),
            ),
            // No saved estimates (CRITERION_HOME elsewhere?): criterion's
            // printed estimate instead.
            None => (
                format!("{} (estimate)", printed.time),
                printed.throughput.clone(),
            ),
        };
        let throughput = throughput.unwrap_or_default();
        println!("{:<50} {median:>12}  {throughput}", printed.id);
    }
    for note in &skipped {
        println!("skipped: {note}");
    }
    if failed.is_empty() {
        Ok(())
    } else {
        bail!("benches failed: {}", failed.join(", "))
    }
}

/// The workspace's bench targets (by package) and where criterion saves
/// its results.
struct WorkspaceBenches {
    /// Each workspace package, with its bench targets.
    packages: std::collections::HashMap<String, Vec<String>>,
    criterion_dir: std::path::PathBuf,
}

impl WorkspaceBenches {
    /// Why `bench` cannot run here, if it cannot.
    fn missing(&self, bench: &CriterionBench) -> Option<String> {
        match self.packages.get(bench.package) {
            None => Some(format!("no package {} in the workspace", bench.package)),
            Some(targets) if !targets.iter().any(|t| t == bench.name) => Some(format!(
                "{} declares no [[bench]] named {}",
                bench.package, bench.name
            )),
            Some(_) => None,
        }
    }
}

/// The bench targets of the workspace, as `cargo metadata` sees them.
fn workspace_benches() -> anyhow::Result<WorkspaceBenches> {
    let output = cargo()
        .args(["metadata", "--no-deps", "--format-version", "1", "--locked"])
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cannot run cargo metadata")?;
    if !output.status.success() {
        bail!(
            "the workspace does not load (`cargo metadata` failed, {}): no bench can run",
            output.status
        );
    }
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("cargo metadata's output is not JSON")?;
    let mut packages = std::collections::HashMap::new();
    for package in metadata["packages"].as_array().into_iter().flatten() {
        let Some(name) = package["name"].as_str() else {
            continue;
        };
        let benches: Vec<String> = package["targets"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|t| {
                t["kind"]
                    .as_array()
                    .is_some_and(|kinds| kinds.iter().any(|k| k == "bench"))
            })
            .filter_map(|t| t["name"].as_str().map(str::to_owned))
            .collect();
        packages.insert(name.to_owned(), benches);
    }
    // Where criterion writes, as it decides: CRITERION_HOME, else the
    // target directory's `criterion`.
    let criterion_dir = std::env::var_os("CRITERION_HOME").map_or_else(
        || {
            metadata["target_directory"]
                .as_str()
                .map_or_else(target_dir, std::path::PathBuf::from)
                .join("criterion")
        },
        std::path::PathBuf::from,
    );
    Ok(WorkspaceBenches {
        packages,
        criterion_dir,
    })
}

/// Run `command`, echoing its stdout line by line as it comes (stderr
/// goes straight through); its status and the stdout.
fn run_echoing_stdout(command: &mut Command) -> anyhow::Result<(std::process::ExitStatus, String)> {
    use std::io::BufRead;
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .context("cannot start cargo bench")?;
    let mut text = String::new();
    if let Some(stdout) = child.stdout.take() {
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.context("reading cargo bench's output")?;
            println!("{line}");
            text.push_str(&line);
            text.push('\n');
        }
    }
    let status = child.wait().context("waiting for cargo bench")?;
    Ok((status, text))
}

/// A benchmark as criterion printed it: its id, the middle of its time
/// estimate (`1.2345 µs`) and of its throughput, if any.
#[derive(Debug, PartialEq)]
struct PrintedResult {
    id: String,
    time: String,
    throughput: Option<String>,
}

/// The benchmarks in criterion's output. It prints `id  time: [low
/// estimate high]` (a long id on the line before, alone), then `thrpt:
/// [...]` when the bench declares a throughput, then, against the last
/// run, a `change:` section whose own `time:`/`thrpt:` lines are
/// percentages, and outliers.
fn printed_results(text: &str) -> Vec<PrintedResult> {
    let mut results: Vec<PrintedResult> = Vec::new();
    let mut pending_id: Option<String> = None;
    // Inside the `change:` section, until the next id.
    let mut in_change = false;
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            continue;
        }
        if trimmed.starts_with("change:") {
            in_change = true;
            continue;
        }
        if let Some((before, values)) = trimmed.split_once("time:") {
            let before = before.trim();
            if in_change && before.is_empty() {
                continue;
            }
            let id = if before.is_empty() {
                pending_id.take()
            } else {
                Some(before.to_owned())
            };
            if let (Some(id), Some(time)) = (id, middle_estimate(values)) {
                results.push(PrintedResult {
                    id,
                    time,
                    throughput: None,
                });
            }
            in_change = false;
        } else if let Some((_, values)) = trimmed.split_once("thrpt:") {
            if !in_change
                && let Some(last) = results.last_mut()
                && last.throughput.is_none()
            {
                last.throughput = middle_estimate(values);
            }
        } else if !line.starts_with(char::is_whitespace)
            && !trimmed.starts_with("Found ")
            && !trimmed.starts_with("Benchmarking ")
            && !trimmed.starts_with("Warning")
        {
            // An id too long for the `time:` line, on its own.
            pending_id = Some(trimmed.to_owned());
            in_change = false;
        }
    }
    results
}

/// The middle value of `[low unit estimate unit high unit]` (none for a
/// change in percent).
fn middle_estimate(values: &str) -> Option<String> {
    let inner = values.trim().strip_prefix('[')?;
    let inner = inner.split(']').next()?;
    match inner.split_whitespace().collect::<Vec<_>>().as_slice() {
        [_, _, estimate, unit, _, _] => Some(format!("{estimate} {unit}")),
        _ => None,
    }
}

/// What criterion saved of one benchmark's last run.
#[derive(Debug)]
struct SavedEstimate {
    median_ns: f64,
    /// Its `Throughput` as criterion serialises it (`{"Bytes": 1048576}`).
    throughput: Option<serde_json::Value>,
}

/// Directories below the criterion directory searched for saved runs
/// (`<group>/<function>/<value>/new`, and one more to spare).
const CRITERION_DIR_DEPTH: usize = 5;

/// Every benchmark criterion saved under `dir`, by the id it prints:
/// `new/benchmark.json` (its id and throughput) and `new/estimates.json`
/// beside it (the median, in ns).
fn saved_estimates(dir: &std::path::Path) -> std::collections::HashMap<String, SavedEstimate> {
    let mut found = std::collections::HashMap::new();
    let mut pending = vec![(dir.to_path_buf(), 0usize)];
    while let Some((dir, depth)) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            if entry.file_name() == "new" {
                if let Some((id, estimate)) = read_saved_estimate(&path) {
                    found.insert(id, estimate);
                }
            } else if depth < CRITERION_DIR_DEPTH {
                pending.push((path, depth + 1));
            }
        }
    }
    found
}

/// One saved run in a criterion `new` directory: its printed id and its
/// estimate.
fn read_saved_estimate(new_dir: &std::path::Path) -> Option<(String, SavedEstimate)> {
    let read = |name: &str| -> Option<serde_json::Value> {
        let text = std::fs::read_to_string(new_dir.join(name)).ok()?;
        serde_json::from_str(&text).ok()
    };
    let benchmark = read("benchmark.json")?;
    let estimates = read("estimates.json")?;
    let id = benchmark["title"].as_str()?.to_owned();
    let median_ns = estimates["median"]["point_estimate"].as_f64()?;
    let throughput = Some(benchmark["throughput"].clone()).filter(|t| !t.is_null());
    Some((
        id,
        SavedEstimate {
            median_ns,
            throughput,
        },
    ))
}

const NANOS_PER_SEC: f64 = 1e9;

/// A time in nanoseconds as criterion prints one: `1.2345 µs`.
fn format_nanos(ns: f64) -> String {
    const UNITS: [&str; 4] = ["ns", "µs", "ms", "s"];
    const STEP: f64 = 1000.0;
    scaled(ns, STEP, &UNITS)
}

/// A throughput of `throughput` (criterion's serialised `Throughput`) per
/// iteration of `ns` nanoseconds, in criterion's units.
fn format_throughput(throughput: &serde_json::Value, ns: f64) -> Option<String> {
    const BINARY: f64 = 1024.0;
    const DECIMAL: f64 = 1000.0;
    const BYTES_BINARY: [&str; 5] = ["B/s", "KiB/s", "MiB/s", "GiB/s", "TiB/s"];
    const BYTES_DECIMAL: [&str; 5] = ["B/s", "KB/s", "MB/s", "GB/s", "TB/s"];
    const BITS: [&str; 5] = ["b/s", "Kb/s", "Mb/s", "Gb/s", "Tb/s"];
    const ELEMENTS: [&str; 5] = ["elem/s", "Kelem/s", "Melem/s", "Gelem/s", "Telem/s"];
    if ns <= 0.0 {
        return None;
    }
    #[allow(clippy::cast_precision_loss)] // a count per iteration, shown to 4 digits
    let per_sec = |count: &serde_json::Value| Some(count.as_u64()? as f64 * NANOS_PER_SEC / ns);
    let object = throughput.as_object()?;
    let (kind, count) = object.iter().next()?;
    Some(match kind.as_str() {
        "Bytes" => scaled(per_sec(count)?, BINARY, &BYTES_BINARY),
        "BytesDecimal" => scaled(per_sec(count)?, DECIMAL, &BYTES_DECIMAL),
        "Bits" => scaled(per_sec(count)?, DECIMAL, &BITS),
        "Elements" => scaled(per_sec(count)?, DECIMAL, &ELEMENTS),
        "ElementsAndBytes" => format!(
            "{} {}",
            scaled(per_sec(&count["elements"])?, DECIMAL, &ELEMENTS),
            scaled(per_sec(&count["bytes"])?, BINARY, &BYTES_BINARY)
        ),
        _ => return None,
    })
}

/// `value` in the largest of `units` (each `step` times the one before)
/// that keeps it at 1 or more, to 4 significant digits or so.
fn scaled(mut value: f64, step: f64, units: &[&str]) -> String {
    let mut unit = 0;
    while value >= step && unit + 1 < units.len() {
        value /= step;
        unit += 1;
    }
    let decimals = match value {
        v if v < 10.0 => 4,
        v if v < 100.0 => 3,
        v if v < 1000.0 => 2,
        _ => 1,
    };
    format!(
        "{value:.decimals$} {}",
        units.get(unit).copied().unwrap_or_default()
    )
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn criterion_output_gives_each_id_once_with_its_throughput() {
        let text = "\
rank/top10/10000        time:   [1.0000 ms 1.1000 ms 1.2000 ms]
                        change: [-1.2000% +0.3000% +2.0000%] (p = 0.50 > 0.05)
                        No change in performance detected.
Found 3 outliers among 30 measurements (10.00%)
  2 (6.67%) high mild
frame_codec/decode/1MiB_body
                        time:   [100.00 µs 110.00 µs 120.00 µs]
                        thrpt:  [8.1380 GiB/s 8.8778 GiB/s 9.7656 GiB/s]
                 change:
                        time:   [-5.0000% -1.0000% +1.0000%] (p = 0.10 > 0.05)
                        thrpt:  [-1.0000% +1.0000% +5.0000%]
                        Change within noise threshold.
config_load/validate/example_yaml
                        time:   [2.0000 µs 2.1000 µs 2.2000 µs]
";
        assert_eq!(
            printed_results(text),
            [
                PrintedResult {
                    id: "rank/top10/10000".into(),
                    time: "1.1000 ms".into(),
                    throughput: None,
                },
                PrintedResult {
                    id: "frame_codec/decode/1MiB_body".into(),
                    time: "110.00 µs".into(),
                    throughput: Some("8.8778 GiB/s".into()),
                },
                PrintedResult {
                    id: "config_load/validate/example_yaml".into(),
                    time: "2.1000 µs".into(),
                    throughput: None,
                },
            ]
        );
    }

    #[test]
    fn times_and_throughputs_print_in_criterion_units() {
        assert_eq!(format_nanos(850.0), "850.00 ns");
        assert_eq!(format_nanos(1_234.5), "1.2345 µs");
        assert_eq!(format_nanos(12_345_678.0), "12.346 ms");
        let mib = serde_json::json!({ "Bytes": 1_048_576 });
        // 1 MiB in 1 ms.
        assert_eq!(
            format_throughput(&mib, 1e6).as_deref(),
            Some("1000.0 MiB/s")
        );
        let elements = serde_json::json!({ "Elements": 10 });
        assert_eq!(
            format_throughput(&elements, 1e3).as_deref(),
            Some("10.000 Melem/s")
        );
        assert_eq!(format_throughput(&serde_json::Value::Null, 1e3), None);
    }
}
