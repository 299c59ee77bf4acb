//! `cargo xtask dist`: what an operator installs, in `target/dist/`: the
//! release binary, shell completions and man pages generated from the
//! binary's own clap definitions, and the deployment files (systemd unit,
//! Grafana dashboard).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::CommandFactory;
use clap_complete::Shell;

/// The binary's command line: the same file `ollamacron-node` is built
/// from (clap definitions only), so what is generated is what it parses.
#[allow(dead_code, unreachable_pub)] // only the definitions are used here
#[path = "../../apps/ollamacron-node/src/cli.rs"]
mod node_cli;

/// What `cargo xtask dist` was asked to do.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct DistArgs {
    /// Where to put it all (default: target/dist).
    #[arg(long, value_name = "DIR")]
    pub(crate) out: Option<PathBuf>,
    /// Only the completions and man pages, not the release binary (they
    /// do not need it).
    #[arg(long)]
    pub(crate) no_binary: bool,
}

/// The shells completions are made for.
const SHELLS: [Shell; 5] = [
    Shell::Bash,
    Shell::Zsh,
    Shell::Fish,
    Shell::Elvish,
    Shell::PowerShell,
];

/// The file that marks a folder as `dist`'s own, to clear next time.
const DIST_MARKER: &str = ".ollamacron-dist";

/// The deployment files copied beside the binary, from the repository.
const DEPLOY_FILES: [&str; 2] = [
    "deploy/systemd/ollamacron-node.service",
    "deploy/grafana/ollamacron-node.json",
];

pub(crate) fn dist(args: &DistArgs) -> anyhow::Result<()> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| crate::target_dir().join("dist"));
    clear(&out)?;
    let out = create(&out)?.canonicalize()?;
    std::fs::write(
        out.join(DIST_MARKER),
        b"made by cargo xtask dist; cleared by the next\n",
    )
    .with_context(|| format!("cannot write {}", out.join(DIST_MARKER).display()))?;
    let mut written = Vec::new();
    if !args.no_binary {
        let binary = crate::build_node()?;
        let bin_dir = create(&out.join("bin"))?;
        let target = bin_dir.join("ollamacron-node");
        std::fs::copy(&binary, &target)
            .with_context(|| format!("cannot copy {} to {}", binary.display(), target.display()))?;
        written.push(target);
    }
    let mut command = node_cli::Cli::command();
    let completions = create(&out.join("completions"))?;
    for shell in SHELLS {
        let path = clap_complete::generate_to(shell, &mut command, "ollamacron-node", &completions)
            .with_context(|| format!("cannot write the {shell} completions"))?;
        written.push(path);
    }
    let man = create(&out.join("man/man1"))?;
    // No page for clap's own `help` subcommands: `--help` is on every page.
    clap_mangen::generate_to(without_help_subcommands(node_cli::Cli::command()), &man)
        .context("cannot write the man pages")?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&man)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    pages.sort();
    if !pages.iter().any(|p| p.ends_with("ollamacron-node.1")) {
        bail!(
            "clap_mangen wrote no ollamacron-node.1 in {}",
            man.display()
        );
    }
    written.extend(pages);
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for file in DEPLOY_FILES {
        let from = repo.join(file);
        let to = create(&out.join(file).with_file_name(""))?.join(
            from.file_name()
                .with_context(|| format!("{file} names no file"))?,
        );
        std::fs::copy(&from, &to)
            .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
        written.push(to);
    }
    println!("==> dist: {} files in {}", written.len(), out.display());
    for path in &written {
        println!("    {}", path.strip_prefix(&out).unwrap_or(path).display());
    }
    if !args.no_binary {
        println!(
            "==> install: sudo install -m 0755 {0}/bin/ollamacron-node /usr/local/bin/ && sudo cp {0}/man/man1/*.1 /usr/local/share/man/man1/ (README: \"Install as a service\")",
            out.display()
        );
    }
    Ok(())
}

/// The generated files in `out` are what their tools read: bash and zsh
/// parse the completions (`-n`; a shell missing fails under `CI=true`),
/// the main man page is roff that refers to every subcommand's page, and
/// each of those is there.
pub(crate) fn check_generated(out: &Path) -> anyhow::Result<()> {
    let completions = out.join("completions");
    for (shell, file) in [
        ("bash", "ollamacron-node.bash"),
        ("zsh", "_ollamacron-node"),
    ] {
        if !crate::has_command(shell) {
            if crate::in_ci() {
                bail!(
                    "no {shell} to parse its completions with (cargo xtask ci installs it as root)"
                );
            }
            println!("==> dist: no {shell} here; its completions are not parsed");
            continue;
        }
        let status = std::process::Command::new(shell)
            .arg("-n")
            .arg(completions.join(file))
            .status()
            .with_context(|| format!("cannot run {shell}"))?;
        if !status.success() {
            bail!("{shell} cannot parse {file}");
        }
    }
    let man = out.join("man/man1");
    let page = std::fs::read_to_string(man.join("ollamacron-node.1"))?;
    if !page.contains("\n.TH ") {
        bail!("ollamacron-node.1 is no man page (no .TH)");
    }
    for command in node_cli::Cli::command().get_subcommands() {
        let name = command.get_name();
        if name == "help" {
            continue;
        }
        // The main page lists it (roff escapes the dash), and it has its own.
        let reference = format!("ollamacron\\-node\\-{name}(1)");
        if !page.contains(&reference) {
            bail!("ollamacron-node.1 does not refer to {reference:?}");
        }
        let own = man.join(format!("ollamacron-node-{name}.1"));
        let own_page = std::fs::read_to_string(&own)
            .with_context(|| format!("no man page for `{name}`: {}", own.display()))?;
        if !own_page.contains("\n.TH ") {
            bail!("{} is no man page (no .TH)", own.display());
        }
    }
    Ok(())
}

/// Empty `out` for a new build: only a folder an earlier `dist` made (it
/// holds [`DIST_MARKER`]), one under the target directory, or an empty
/// one, never whatever `--out` names.
fn clear(out: &Path) -> anyhow::Result<()> {
    if !out.exists() {
        return Ok(());
    }
    let in_target = match (out.canonicalize(), crate::target_dir().canonicalize()) {
        (Ok(out), Ok(target)) => out != target && out.starts_with(&target),
        _ => false,
    };
    if in_target || out.join(DIST_MARKER).is_file() {
        return std::fs::remove_dir_all(out)
            .with_context(|| format!("cannot clear {}", out.display()));
    }
    let mut entries =
        std::fs::read_dir(out).with_context(|| format!("cannot read {}", out.display()))?;
    if entries.next().is_some() {
        bail!(
            "{} is not empty and no earlier `cargo xtask dist` made it: give --out a new or empty folder",
            out.display()
        );
    }
    Ok(())
}

fn without_help_subcommands(command: clap::Command) -> clap::Command {
    command
        .disable_help_subcommand(true)
        .mut_subcommands(without_help_subcommands)
}

fn create(dir: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir.to_path_buf())
}
