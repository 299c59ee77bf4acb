//! The command line of `ollamacron-node`, as clap definitions only (clap
//! and std, nothing of the node): the binary parses it, and `cargo xtask
//! dist` builds the shell completions and the man page from the same
//! definitions (it includes this file).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "ollamacron-node",
    version,
    about = "A peer-to-peer node that pools machines running Ollama"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Start the node and run until SIGINT or SIGTERM.
    Run(ConfigArgs),
    /// Write a commented default configuration file, or (with `--psk`) a
    /// new network key for a private network.
    Init {
        #[command(flatten)]
        config: ConfigArgs,
        /// Overwrite an existing configuration file.
        #[arg(long)]
        force: bool,
        /// Write a new random network key (pre-shared key, mode 0600) to
        /// FILE instead of a configuration. Never overwrites a key.
        #[arg(long, value_name = "FILE", conflicts_with = "force")]
        psk: Option<PathBuf>,
    },
    /// Print this node's peer id (creating its key if there is none yet).
    Id(ConfigArgs),
    /// Inspect configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Show the running node's state, addresses, connections and discovery.
    Status {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// List the peers the running node knows.
    Peers {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Every model of the mesh: the nodes serving it, loaded or cold,
    /// their load and how this node reaches them (`ollama ps` for the
    /// whole pool).
    Models {
        #[command(flatten)]
        config: ConfigArgs,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Find, register, unregister and list services on the running node.
    Services {
        #[command(subcommand)]
        command: Box<ServicesCommand>,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Validate the configuration and print the effective result.
    Check {
        /// The file to check (same as --config).
        file: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

/// Where the configuration comes from; shared by every subcommand so that
/// `id --config f.yaml` names the node `run --config f.yaml` starts.
#[derive(Debug, Args, Clone, Default)]
pub(crate) struct ConfigArgs {
    /// YAML configuration file.
    #[arg(long, short = 'c', env = "OLLAMACRON_CONFIG", global = true)]
    pub(crate) config: Option<PathBuf>,
    /// Listen address (repeatable; replaces the configured list).
    #[arg(long, value_name = "MULTIADDR", global = true)]
    pub(crate) listen: Vec<String>,
    /// Bootstrap peer address ending in /p2p/<peer id> (repeatable).
    #[arg(long, value_name = "MULTIADDR", global = true)]
    pub(crate) bootstrap: Vec<String>,
    /// Directory for the identity key and state.
    #[arg(long, value_name = "DIR", global = true)]
    pub(crate) data_dir: Option<PathBuf>,
    /// Identity key file.
    #[arg(long, value_name = "FILE", global = true)]
    pub(crate) private_key_path: Option<PathBuf>,
    /// Address of the local HTTP API (metrics).
    #[arg(long, value_name = "ADDR", global = true)]
    pub(crate) api_listen: Option<String>,
    /// Turn mDNS discovery off.
    #[arg(long, global = true)]
    pub(crate) no_mdns: bool,
    /// Turn the DHT off.
    #[arg(long, global = true)]
    pub(crate) no_dht: bool,
    /// Log filter in RUST_LOG syntax.
    #[arg(long, value_name = "FILTER", global = true)]
    pub(crate) log_level: Option<String>,
    /// Log format.
    #[arg(long, value_enum, global = true)]
    pub(crate) log_format: Option<LogFormatArg>,
    /// Set any config field: KEY=VALUE (repeatable; lists comma-separated).
    #[arg(long = "set", value_name = "KEY=VALUE", global = true)]
    pub(crate) set: Vec<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum LogFormatArg {
    Text,
    Json,
}

/// Output format of an API command.
#[derive(Debug, Args, Clone, Copy, Default)]
pub(crate) struct OutputArgs {
    /// Print the node's JSON answer instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `services …`
#[derive(Debug, Subcommand)]
pub(crate) enum ServicesCommand {
    /// Ranked lookup of services across the mesh.
    Find {
        /// Service type (`llm`, `embedding`, …).
        #[arg(long = "type", value_name = "TYPE")]
        service_type: Option<String>,
        /// The model it serves (`llama3:8b`; `llama3` is `llama3:latest`):
        /// one exact lookup of the model's key.
        #[arg(long, value_name = "MODEL")]
        model: Option<String>,
        /// A tag the service must carry (repeatable; all required).
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// A capability the service must have (repeatable; all required).
        #[arg(long = "capability", value_name = "CAPABILITY")]
        capabilities: Vec<String>,
        /// Region of the serving node.
        #[arg(long)]
        region: Option<String>,
        /// Least measured reliability, 0 to 1.
        #[arg(long)]
        min_reliability: Option<f64>,
        /// Greatest measured latency, in milliseconds.
        #[arg(long, value_name = "MS")]
        max_latency: Option<f64>,
        /// Most results.
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Offer a service from this node (or replace the one with its id).
    Register {
        /// YAML (or JSON) file describing the service: name, type, tags, …
        #[arg(conflicts_with_all = ["name", "service_type"])]
        file: Option<PathBuf>,
        /// Service name (e.g. a model with its tag); the id defaults to it.
        #[arg(long, required_unless_present = "file")]
        name: Option<String>,
        /// Service type.
        #[arg(long = "type", value_name = "TYPE", required_unless_present = "file")]
        service_type: Option<String>,
        /// Service id (default: the name).
        #[arg(long)]
        id: Option<String>,
        /// Version.
        #[arg(long)]
        version: Option<String>,
        /// Free text.
        #[arg(long)]
        description: Option<String>,
        /// A tag (repeatable).
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// A capability (repeatable).
        #[arg(long = "capability", value_name = "CAPABILITY")]
        capabilities: Vec<String>,
        /// `http://` URL the node probes for health.
        #[arg(long)]
        health_check_url: Option<String>,
        /// KEY=VALUE metadata (repeatable).
        #[arg(long = "metadata", value_name = "KEY=VALUE")]
        metadata: Vec<String>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Stop offering a service.
    Unregister {
        /// Its id.
        id: String,
    },
    /// The services this node offers, and where each came from (`config`,
    /// `api`: registered through the API or this CLI and kept in the data
    /// directory across restarts, `ollama`: found on the local Ollama).
    List {
        #[command(flatten)]
        output: OutputArgs,
    },
}
