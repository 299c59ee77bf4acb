//! `cargo xtask sim`: build the in-process simulator (`ollamacron-sim`,
//! N real node cores over in-memory links with latency) in the
//! `simulator` profile (release, optimised for speed throughout, with
//! symbols) and run it with the given arguments.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};

/// What `cargo xtask sim` was asked: the simulator's own arguments.
#[derive(Debug, Clone, clap::Args)]
#[command(disable_help_flag = true)]
pub(crate) struct SimArgs {
    /// Passed to `ollamacron-sim`: `--nodes N [--rtt MIN..MAX] [--churn
    /// PERCENT] [--json FILE]` and more (`cargo xtask sim --help` lists them).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    pub(crate) args: Vec<String>,
}

pub(crate) fn sim(args: &SimArgs) -> anyhow::Result<()> {
    let mut build = crate::cargo();
    build.args([
        "build",
        "--profile",
        "simulator",
        "--locked",
        "--package",
        "ollamacron-sim",
        "--bin",
        "ollamacron-sim",
    ]);
    if !crate::run_step("build", &mut build) {
        bail!("building ollamacron-sim failed");
    }
    let binary = crate::target_dir().join("simulator").join("ollamacron-sim");
    let started = Instant::now();
    let status = Command::new(&binary)
        .args(&args.args)
        .status()
        .with_context(|| format!("cannot run {}", binary.display()))?;
    println!(
        "==> sim: {} after {:.1}s",
        if status.success() { "ok" } else { "FAILED" },
        started.elapsed().as_secs_f64()
    );
    if !status.success() {
        bail!("the simulation failed ({status})");
    }
    Ok(())
}
