//! `ollamacron-node`: the daemon and its command-line interface.
//!
//! ```text
//! ollamacron-node run [--config FILE] [overrides]     start a node, run until SIGINT/SIGTERM
//! ollamacron-node init [--config FILE] [--force]      write a commented default config
//! ollamacron-node init --psk FILE                     write a new network key (private network)
//! ollamacron-node id [--config FILE]                  print this node's peer id
//! ollamacron-node config check [FILE]                 validate and print the effective config
//! ollamacron-node status | peers | models [--json]    ask the running node (its local API)
//! ollamacron-node services find|register|unregister|list
//! ```

mod cli;
mod client;
mod commands;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use crate::cli::{Cli, Command, ConfigArgs, ConfigCommand, LogFormatArg};
use ollamacron_config::{ConfigError, ConfigLoader, LogFormat, NodeConfig};
use ollamacron_gateway::{
    GatewayConfig, GatewayServer, InferenceLoad, LocalOllama, OllamaAdvertiser, ServeLimits,
    serve_inference,
};
use ollamacron_node_core::http_server::OLLAMA_ORIGINS_VAR;
use ollamacron_node_core::{
    ApiListener, Node, NodeError, NodeState, RegistrationFile, load_or_create_identity,
};
use ollamacron_ollama::{OllamaClient, OllamaEndpoint, OllamaWatcher, WatchConfig};
use ollamacron_telemetry::{OtlpSettings, OtlpTraces};
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::fmt::format::FmtSpan;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Exit code for a configuration or usage error.
const EXIT_CONFIG: u8 = 2;
/// Exit code for a runtime failure.
const EXIT_FAILURE: u8 = 1;
/// How long exported spans gather before a batch is sent to `otlp_endpoint`.
const SPAN_EXPORT_INTERVAL: Duration = Duration::from_secs(2);
/// Longest one export of spans may take.
const SPAN_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Spans exported over OTLP: the node's own (every crate of ours is
/// `ollamacron_*`), not libp2p's or hyper's.
const EXPORTED_SPAN_TARGET: &str = "ollamacron";
/// Default file `init` writes when no `--config` is given.
const DEFAULT_CONFIG_FILE: &str = "ollamacron.yaml";

impl ConfigArgs {
    fn loader(&self) -> anyhow::Result<ConfigLoader> {
        let mut loader = ConfigLoader::new().process_env();
        if let Some(path) = &self.config {
            loader = loader.file(path);
        }
        let path_text = |p: &Path| p.to_string_lossy().into_owned();
        let mut pairs: Vec<(String, String)> = Vec::new();
        if !self.listen.is_empty() {
            pairs.push(("listen".into(), self.listen.join(",")));
        }
        if !self.bootstrap.is_empty() {
            pairs.push(("bootstrap".into(), self.bootstrap.join(",")));
        }
        if let Some(dir) = &self.data_dir {
            pairs.push(("data_dir".into(), path_text(dir)));
        }
        if let Some(key) = &self.private_key_path {
            pairs.push(("private_key_path".into(), path_text(key)));
        }
        if let Some(addr) = &self.api_listen {
            pairs.push(("api_listen".into(), addr.clone()));
        }
        if self.no_mdns {
            pairs.push(("enable_mdns".into(), "false".into()));
        }
        if self.no_dht {
            pairs.push(("enable_dht".into(), "false".into()));
        }
        if let Some(level) = &self.log_level {
            pairs.push(("log_level".into(), level.clone()));
        }
        if let Some(format) = self.log_format {
            let name = match format {
                LogFormatArg::Text => "text",
                LogFormatArg::Json => "json",
            };
            pairs.push(("log_format".into(), name.into()));
        }
        for item in &self.set {
            let (key, value) = item
                .split_once('=')
                .with_context(|| format!("--set {item}: expected KEY=VALUE"))?;
            pairs.push((key.trim().to_owned(), value.to_owned()));
        }
        for (key, value) in pairs {
            loader = loader.set(key, value);
        }
        Ok(loader)
    }

    fn load(&self) -> anyhow::Result<NodeConfig> {
        Ok(self.loader()?.load()?)
    }
}

/// Longest one request to the local Ollama may take.
const OLLAMA_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(&args),
        Command::Init {
            psk: Some(path), ..
        } => report(init_network_key(&path), EXIT_FAILURE),
        Command::Init { config, force, .. } => report(init(&config, force), EXIT_FAILURE),
        Command::Id(args) => report(print_id(&args), EXIT_FAILURE),
        Command::Config(ConfigCommand::Check { file, mut config }) => {
            if file.is_some() {
                config.config = file;
            }
            report(check(&config), EXIT_CONFIG)
        }
        Command::Status { config, output } => report(
            ask(&config, |api| async move {
                commands::status(&api, output).await
            }),
            EXIT_FAILURE,
        ),
        Command::Peers { config, output } => report(
            ask(
                &config,
                |api| async move { commands::peers(&api, output).await },
            ),
            EXIT_FAILURE,
        ),
        Command::Models { config, output } => report(
            ask(&config, |api| async move {
                commands::models(&api, output).await
            }),
            EXIT_FAILURE,
        ),
        Command::Services { command, config } => report(
            ask(&config, |api| async move {
                commands::services(&api, *command).await
            }),
            EXIT_FAILURE,
        ),
    }
}

/// Run an API command against the node at the configured `api_listen`.
fn ask<F, Fut>(args: &ConfigArgs, command: F) -> anyhow::Result<()>
where
    F: FnOnce(client::ApiClient) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let config = args.load()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let key = config
        .api_access_keys()
        .map_err(|e| NodeError::Config(vec![e]))?
        .into_iter()
        .next();
    runtime.block_on(command(client::ApiClient::new(config.api_listen, key)))
}

/// An error and its causes on one line, skipping causes whose text the
/// message already contains (our errors name their source in the message).
fn describe(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// A mistake in how the command was used (exit code 2).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

/// Print an error and pick the exit code: 2 when the configuration is at
/// fault, `code` otherwise.
#[allow(clippy::print_stderr)]
fn report(result: anyhow::Result<()>, code: u8) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            if e.downcast_ref::<ConfigError>().is_some() || e.downcast_ref::<UsageError>().is_some()
            {
                ExitCode::from(EXIT_CONFIG)
            } else {
                ExitCode::from(code)
            }
        }
    }
}

#[allow(clippy::print_stderr)]
fn run(args: &ConfigArgs) -> ExitCode {
    let config = match args.load() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all().thread_name("ollamacron");
    if let Some(cores) = config.max_cpu {
        runtime.worker_threads(usize::try_from(cores).unwrap_or(1));
    }
    let runtime = match runtime.build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let traces = match init_logging(&config, args.log_level.is_some(), runtime.handle()) {
        Ok(traces) => traces,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let served = runtime.block_on(async {
        let served = serve(config).await;
        if let Some(traces) = traces {
            // The exporter blocks while it sends the last spans, on the
            // runtime: wait for it off the runtime's worker threads.
            match tokio::task::spawn_blocking(move || traces.shutdown()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "the last spans were not exported"),
                Err(e) => tracing::warn!(error = %e, "the span exporter did not stop"),
            }
        }
        served
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            let config_fault = matches!(
                e.downcast_ref::<NodeError>(),
                Some(NodeError::Config(_) | NodeError::WrongIdentity { .. })
            );
            ExitCode::from(if config_fault {
                EXIT_CONFIG
            } else {
                EXIT_FAILURE
            })
        }
    }
}

async fn serve(config: NodeConfig) -> anyhow::Result<()> {
    // Listen for signals before anything starts, so one that arrives during
    // start-up still stops the node gracefully.
    let signal = shutdown_signal()?;
    tokio::pin!(signal);
    let registrations = RegistrationFile::new(config.registrations_path());
    let ollama = ollama_client(&config)?;
    let gateway_listener = if config.enable_gateway {
        let addr = config.gateway_listen;
        Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on gateway_listen {addr}"))?,
        )
    } else {
        None
    };
    let gateway_config = GatewayConfig::from_config(&config);
    let serve_limits = ServeLimits::from_config(&config);
    let gateway_settings = config.clone();
    let api = if config.enable_metrics {
        Some(ApiListener::bind(&config).await?)
    } else {
        None
    };
    let node = tokio::select! {
        node = Node::new(config).with_registration_file(registrations).start() => node?,
        signal = &mut signal => {
            tracing::info!(signal, "signal during start-up: not starting");
            return Ok(());
        }
    };
    // The API sits on top of the node, as the gateway does: bound before
    // the node starts, served once it runs.
    if let Some(api) = api {
        api.serve(&node);
    }
    tracing::info!(peer_id = %node.peer_id(), "ollamacron-node {} started", env!("CARGO_PKG_VERSION"));
    // Advertise the local Ollama's models and serve peers' requests to
    // it; all of it stops with the node.
    let load = InferenceLoad::default();
    let watched = ollama.map(|(client, config)| {
        tracing::info!(url = %client.endpoint(), "advertising the local Ollama's models");
        let endpoint = client.endpoint().clone();
        let watcher = OllamaWatcher::spawn(client, config);
        tokio::spawn(
            OllamaAdvertiser::new(node.clone())
                .with_load(load.clone())
                .with_limits(serve_limits)
                .run(watcher.subscribe()),
        );
        // Each request it serves re-reads which models are loaded.
        // Its gateway routes to every model of its Ollama, whatever the
        // record holds.
        let local = LocalOllama::new(endpoint, gateway_config.first_byte_timeout)
            .with_refresh(watcher.refresher())
            .with_models(watcher.subscribe());
        (watcher, local)
    });
    let local = watched.as_ref().map(|(_, local)| local.clone());
    if let Some(local) = local.clone() {
        let control = node.stream_control();
        tokio::spawn(async move {
            if let Err(e) = serve_inference(control, local, serve_limits, load).await {
                tracing::error!(error = %e, "cannot serve inference requests from peers");
            }
        });
    }
    if let Some(listener) = gateway_listener {
        let origins = std::env::var(OLLAMA_ORIGINS_VAR).ok();
        let gateway = GatewayServer::new(
            listener,
            node.clone(),
            local,
            &gateway_settings,
            origins.as_deref(),
        )?;
        let addr = gateway.local_addr();
        tracing::info!(%addr, "serving the Ollama-compatible gateway at http://{addr} (OLLAMA_HOST={addr})");
        tokio::spawn(gateway.run());
    }

    tokio::select! {
        signal = &mut signal => {
            tracing::info!(signal, "shutting down");
            node.shutdown().await?;
        }
        state = node.stopped() => {
            anyhow::ensure!(state == NodeState::Stopped, "the node stopped in state {state}");
        }
    }
    Ok(())
}

/// The client of the local Ollama, unless this node does not advertise one
/// (`enable_ollama: false` or `node_type: client`).
fn ollama_client(config: &NodeConfig) -> anyhow::Result<Option<(OllamaClient, WatchConfig)>> {
    if !config.enable_ollama || config.node_type == ollamacron_config::NodeType::Client {
        return Ok(None);
    }
    let env = std::env::var(ollamacron_ollama::OLLAMA_HOST_VAR).ok();
    let endpoint =
        OllamaEndpoint::resolve(config.ollama_url.as_deref(), env.as_deref()).map_err(|e| {
            let field = if config.ollama_url.is_some() {
                "ollama_url".to_owned()
            } else {
                format!(
                    "the {} environment variable",
                    ollamacron_ollama::OLLAMA_HOST_VAR
                )
            };
            NodeError::Config(vec![ollamacron_config::ValidationError {
                value: config.ollama_url.clone().or(env).unwrap_or_default(),
                rule: e.to_string(),
                field,
            }])
        })?;
    let watch = WatchConfig {
        interval: config.ollama_poll_interval,
        ..WatchConfig::default()
    };
    Ok(Some((
        OllamaClient::new(endpoint, OLLAMA_REQUEST_TIMEOUT),
        watch,
    )))
}

/// Registers the signal handlers now; the future resolves with the name of
/// the first signal.
#[cfg(unix)]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = &'static str>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    })
}

#[cfg(not(unix))]
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = &'static str>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
        "Ctrl-C"
    })
}

/// libp2p's Kademlia warns "Failed to trigger bootstrap: No known peers"
/// every time a node without peers gets a listen address — every start of a
/// first node. The node bootstraps the DHT itself once it has a peer, so
/// unless the filter says otherwise, that module only logs errors.
fn quiet_lone_node(filter: &str) -> String {
    if filter.contains("libp2p_kad") {
        filter.to_owned()
    } else {
        format!("{filter},libp2p_kad::behaviour=error")
    }
}

/// Install the logger and, with `enable_tracing` and `otlp_endpoint`, the
/// span exporter (returned, to be shut down before the runtime stops).
/// The log filter is `--log-level` when given on the command line, else
/// `RUST_LOG` when set, else `log_level` from the configuration; exported
/// spans are Ollamacron's own at `info` and above, whatever the log filter.
fn init_logging(
    config: &NodeConfig,
    level_from_cli: bool,
    runtime: &tokio::runtime::Handle,
) -> anyhow::Result<Option<OtlpTraces>> {
    let logs = if config.enable_logging {
        let rust_log = std::env::var("RUST_LOG").ok().filter(|_| !level_from_cli);
        let filter = match rust_log {
            Some(env) if !env.trim().is_empty() => EnvFilter::try_new(&env)
                .with_context(|| format!("RUST_LOG ({env}) is not a valid log filter"))?,
            _ => EnvFilter::try_new(quiet_lone_node(&config.log_level)).with_context(|| {
                format!(
                    "log_level ({}) is not a valid log filter; write e.g. `info` or `ollamacron=debug,libp2p=info`",
                    config.log_level
                )
            })?,
        };
        let spans = if config.enable_tracing {
            FmtSpan::CLOSE
        } else {
            FmtSpan::NONE
        };
        let layer = tracing_subscriber::fmt::layer()
            .with_span_events(spans)
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr);
        let layer = match config.log_format {
            LogFormat::Text => layer.with_filter(filter).boxed(),
            LogFormat::Json => layer.json().with_filter(filter).boxed(),
        };
        Some(layer)
    } else {
        None
    };
    let traces = match config.otlp_endpoint.as_deref() {
        Some(endpoint) if config.enable_tracing => {
            let settings = OtlpSettings {
                endpoint: endpoint.to_owned(),
                service_name: env!("CARGO_PKG_NAME").to_owned(),
                service_version: env!("CARGO_PKG_VERSION").to_owned(),
                instance_id: exported_instance_id(config),
                export_interval: SPAN_EXPORT_INTERVAL,
                export_timeout: SPAN_EXPORT_TIMEOUT,
            };
            Some(OtlpTraces::start(&settings, runtime.clone())?)
        }
        _ => None,
    };
    let exported = traces.as_ref().map(|traces| {
        traces
            .layer()
            .with_filter(Targets::new().with_target(EXPORTED_SPAN_TARGET, Level::INFO))
    });
    tracing_subscriber::registry()
        .with(logs)
        .with(exported)
        .try_init()
        .map_err(|e| anyhow::anyhow!("cannot install the logger: {e}"))?;
    Ok(traces)
}

/// The node's peer id, for the exported spans' `service.instance.id`: read
/// from (or written to) the identity key the node is about to load anyway.
/// None when the key is unusable; the node reports that when it starts.
fn exported_instance_id(config: &NodeConfig) -> Option<String> {
    load_or_create_identity(&config.private_key_path())
        .ok()
        .map(|(keypair, _)| keypair.public().to_peer_id().to_string())
}

#[allow(clippy::print_stdout)]
fn init(args: &ConfigArgs, force: bool) -> anyhow::Result<()> {
    let path = args
        .config
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_FILE));
    let text = ollamacron_config::default_config_yaml()?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    let mut file = match options.open(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(UsageError(format!(
                "{} already exists; pass --force to overwrite it",
                path.display()
            ))
            .into());
        }
        other => other.with_context(|| format!("cannot write {}", path.display()))?,
    };
    std::io::Write::write_all(&mut file, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("wrote {}", path.display());
    println!(
        "start the node with: ollamacron-node run --config {}",
        path.display()
    );
    Ok(())
}

#[allow(clippy::print_stdout)]
fn init_network_key(path: &std::path::Path) -> anyhow::Result<()> {
    let key = ollamacron_config::write_new_network_key(path).map_err(|e| match e {
        ollamacron_config::NetworkKeyError::Exists { .. } => UsageError(e.to_string()).into(),
        other => anyhow::Error::new(other),
    })?;
    println!(
        "wrote a new network key to {} (fingerprint {})",
        path.display(),
        key.fingerprint()
    );
    println!("copy it to every node of the network and set in each configuration:");
    println!("  require_auth: true");
    println!("  psk_path: {}", path.display());
    println!("  listen: [/ip4/0.0.0.0/tcp/11436]   # TCP only: QUIC cannot carry the key");
    Ok(())
}

#[allow(clippy::print_stdout)]
fn print_id(args: &ConfigArgs) -> anyhow::Result<()> {
    let config = args.load()?;
    let path = config.private_key_path();
    let (keypair, _) = load_or_create_identity(&path)?;
    let peer_id = keypair.public().to_peer_id();
    check_node_id(&config, &path, peer_id)?;
    println!("{peer_id}");
    Ok(())
}

#[allow(clippy::print_stdout)]
fn check(args: &ConfigArgs) -> anyhow::Result<()> {
    let config = args.load()?;
    // The log filter is only checked here, where tracing-subscriber lives.
    EnvFilter::try_new(&config.log_level)
        .with_context(|| format!("log_level ({}) is not a valid log filter", config.log_level))?;
    // Compare node_id with an existing key, without creating one.
    let key = config.private_key_path();
    if key.exists() {
        let (keypair, _) = load_or_create_identity(&key)?;
        check_node_id(&config, &key, keypair.public().to_peer_id())?;
    }
    print!("{}", config.to_yaml()?);
    println!("# data directory: {}", config.data_dir().display());
    println!("# identity key: {}", key.display());
    println!("# configuration is valid");
    Ok(())
}

/// `node_id`, when set, must be the peer id of the key.
fn check_node_id(
    config: &NodeConfig,
    key: &Path,
    peer_id: ollamacron_node_core::libp2p::PeerId,
) -> anyhow::Result<()> {
    match config.expected_peer_id() {
        Some(expected) if expected != peer_id => Err(UsageError(format!(
            "node_id is {expected}, but the key at {} belongs to peer {peer_id}",
            key.display()
        ))
        .into()),
        _ => Ok(()),
    }
}
