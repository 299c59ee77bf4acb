//! `cargo xtask fuzz`: the cargo-fuzz targets of `fuzz/` (one per decoder
//! of untrusted input), built once and each run for a while from its seed
//! corpus (`fuzz/seeds/<target>`) and past findings
//! (`fuzz/regressions/<target>`). A crash fails the run and leaves its
//! input in `target/fuzz/artifacts/<target>/`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};

use crate::{cargo, ensure_cargo_tool, target_dir};

/// `cargo xtask fuzz`'s arguments.
#[derive(Debug, clap::Args)]
pub(crate) struct FuzzArgs {
    /// Print the targets, one a line, and stop.
    #[arg(long)]
    pub(crate) list: bool,
    /// How long each target runs, in seconds.
    #[arg(long, default_value_t = 60)]
    pub(crate) seconds: u64,
    /// Run this target only (default: every one).
    pub(crate) target: Option<String>,
}

/// Seconds each target runs in `cargo xtask ci`.
pub(crate) const CI_SECONDS: u64 = 12;

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("fuzz")
}

/// The targets, from `fuzz/Cargo.toml`'s `[[bin]]` names.
pub(crate) fn targets() -> anyhow::Result<Vec<String>> {
    let manifest = fuzz_dir().join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("cannot read {}", manifest.display()))?;
    let mut in_bin = false;
    let mut names = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin && let Some(value) = line.strip_prefix("name") {
            let name = value
                .trim_start()
                .trim_start_matches('=')
                .trim()
                .trim_matches('"');
            names.push(name.to_owned());
        }
    }
    if names.is_empty() {
        bail!("{} names no [[bin]] target", manifest.display());
    }
    Ok(names)
}

/// The host's target triple (where cargo-fuzz puts its binaries).
fn host_triple() -> anyhow::Result<String> {
    let out = Command::new("rustc")
        .arg("-vV")
        .output()
        .context("cannot run rustc -vV")?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_owned))
        .context("rustc -vV names no host")
}

/// Build every target (release, debug assertions on, no sanitizer: the
/// code under test is safe Rust, and a panic or an overflow is what we
/// look for). `RUSTC_BOOTSTRAP=1` lets cargo-fuzz's nightly flags through
/// on this stable toolchain, for this build only; its own target
/// directory keeps those flags away from the workspace's builds.
fn build(build_dir: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut command = cargo();
    command
        .args(["fuzz", "build", "--fuzz-dir"])
        .arg(fuzz_dir())
        .args(["--sanitizer", "none", "--debug-assertions"])
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_DIR", build_dir);
    println!("==> fuzz: building the targets");
    let status = command.status().context("cannot run cargo fuzz build")?;
    if !status.success() {
        bail!("cargo fuzz build failed ({status})");
    }
    println!("==> fuzz: built in {:.0}s", started.elapsed().as_secs_f64());
    Ok(())
}

/// `cargo xtask fuzz`.
pub(crate) fn fuzz(args: &FuzzArgs) -> anyhow::Result<()> {
    let all = targets()?;
    if args.list {
        for target in &all {
            println!("{target}");
        }
        return Ok(());
    }
    let chosen: Vec<String> = match &args.target {
        Some(t) if all.contains(t) => vec![t.clone()],
        Some(t) => bail!("no fuzz target `{t}`; `cargo xtask fuzz --list` names them"),
        None => all,
    };
    ensure_cargo_tool("fuzz")?;
    let build_dir = target_dir().join("fuzz-build");
    build(&build_dir)?;
    let binaries = build_dir.join(host_triple()?).join("release");
    let mut crashed = Vec::new();
    for target in &chosen {
        let corpus = target_dir().join("fuzz").join("corpus").join(target);
        let artifacts = target_dir().join("fuzz").join("artifacts").join(target);
        std::fs::create_dir_all(&corpus)
            .and_then(|()| std::fs::create_dir_all(&artifacts))
            .with_context(|| format!("cannot create {}", corpus.display()))?;
        let mut command = Command::new(binaries.join(target));
        command
            .arg(format!("-max_total_time={}", args.seconds))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            .arg("-print_final_stats=1")
            .arg(&corpus);
        for inputs in ["seeds", "regressions"] {
            let dir = fuzz_dir().join(inputs).join(target);
            if dir.is_dir() {
                command.arg(dir);
            }
        }
        println!("==> fuzz {target}: {} s", args.seconds);
        let output = command
            .output()
            .with_context(|| format!("cannot run the fuzz target {target}"))?;
        let log = String::from_utf8_lossy(&output.stderr);
        let runs = log
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .map_or_else(|| "?".to_owned(), |n| n.trim().to_owned());
        if output.status.success() {
            println!("==> fuzz {target}: ok, {runs} inputs");
        } else {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            eprintln!(
                "==> fuzz {target}: CRASHED ({}); the input is in {}",
                output.status,
                artifacts.display()
            );
            crashed.push(target.clone());
        }
    }
    if crashed.is_empty() {
        Ok(())
    } else {
        bail!("fuzz targets crashed: {}", crashed.join(", "))
    }
}
