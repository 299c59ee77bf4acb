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
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("cannot clear {}", out.display()))?;
    }
    let out = create(&out)?.canonicalize()?;
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
    println!(
        "==> install: sudo install -m 0755 {0}/bin/ollamacron-node /usr/local/bin/ && sudo cp {0}/man/man1/*.1 /usr/local/share/man/man1/ (README: \"Install as a service\")",
        out.display()
    );
    Ok(())
}

/// The generated files in `out` are what their tools read: bash and zsh
/// parse the completions (`-n`), `man` renders the main page, and it names
/// every subcommand.
pub(crate) fn check_generated(out: &Path) -> anyhow::Result<()> {
    let completions = out.join("completions");
    for (shell, file) in [
        ("bash", "ollamacron-node.bash"),
        ("zsh", "_ollamacron-node"),
    ] {
        if !crate::has_command(shell) {
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
    let page = std::fs::read_to_string(out.join("man/man1/ollamacron-node.1"))?;
    for command in node_cli::Cli::command().get_subcommands() {
        let name = command.get_name();
        if !page.contains(name) {
            bail!("the man page does not name the `{name}` subcommand");
        }
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
