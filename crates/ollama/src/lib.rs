#![doc = include_str!("../README.md")]

mod client;
mod endpoint;

use std::collections::HashMap;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use client::{
    ListedModel, MAX_RESPONSE_BYTES, ModelDetails, ModelList, OllamaClient, ShowResponse,
    VersionResponse,
};
pub use endpoint::{DEFAULT_OLLAMA_PORT, DEFAULT_OLLAMA_URL, OLLAMA_HOST_VAR, OllamaEndpoint};

/// Most models read from one Ollama (more are ignored, with a warning).
pub const MAX_MODELS: usize = 1024;

/// What went wrong talking to Ollama.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OllamaError {
    /// The configured address is not usable.
    #[error("`{value}` is not an Ollama address: {reason} (write e.g. http://127.0.0.1:11434)")]
    Endpoint {
        /// What was given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A request failed.
    #[error("{url}: {reason}")]
    Request {
        /// The URL asked.
        url: String,
        /// Why it failed.
        reason: String,
    },
}

/// Whether a model generates text or embeds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelKind {
    /// Generates text (`completion`).
    Llm,
    /// Only embeds (`embedding` without `completion`).
    Embedding,
}

impl ModelKind {
    /// The service type: `llm` or `embedding`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Llm => "llm",
            Self::Embedding => "embedding",
        }
    }
}

/// One model of the local Ollama, with what it can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalModel {
    /// Name with tag (`llama3:8b`).
    pub name: String,
    /// Content digest (changes when the model is re-pulled).
    pub digest: String,
    /// Text or embeddings.
    pub kind: ModelKind,
    /// What it can do (`completion`, `embedding`, `vision`, `tools`, …).
    pub capabilities: Vec<String>,
    /// Family (`llama`).
    pub family: String,
    /// Parameter count (`8.0B`).
    pub parameter_size: String,
    /// Quantization (`Q4_0`).
    pub quantization: String,
    /// Context window in tokens, when Ollama says.
    pub context_length: Option<u64>,
    /// Size on disk, in bytes.
    pub size_bytes: u64,
    /// Loaded in memory now.
    pub loaded: bool,
}

/// Everything read from Ollama in one pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OllamaSnapshot {
    /// Ollama's version.
    pub version: String,
    /// Its models, by name.
    pub models: Vec<LocalModel>,
}

/// What [`OllamaWatcher`] knows about the local Ollama.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OllamaState {
    /// Not asked yet.
    Unknown,
    /// Reachable, with these models.
    Up(OllamaSnapshot),
    /// Unreachable or failing; the models last seen, marked unavailable
    /// by whoever advertises them.
    Down {
        /// Why.
        reason: String,
        /// The models seen when it was last up.
        last_models: Vec<LocalModel>,
    },
}

/// The context length in `model_info` (`<architecture>.context_length`).
fn context_length(show: &ShowResponse) -> Option<u64> {
    show.model_info
        .iter()
        .find(|(k, _)| k.ends_with(".context_length"))
        .and_then(|(_, v)| v.as_u64())
}

/// Read version, models, loaded models and each model's capabilities.
/// `/api/show` is asked only for models whose digest is not in `shown`
/// (which it fills), so a steady Ollama costs three requests per pass.
///
/// # Errors
/// Any of the requests fails.
pub async fn read_snapshot(
    client: &OllamaClient,
    shown: &mut HashMap<(String, String), ShowResponse>,
) -> Result<OllamaSnapshot, OllamaError> {
    let version = client.version().await?.version;
    let mut tags = client.tags().await?.models;
    if tags.len() > MAX_MODELS {
        tracing::warn!(
            models = tags.len(),
            max = MAX_MODELS,
            "Ollama lists more models than are advertised; ignoring the rest"
        );
        tags.truncate(MAX_MODELS);
    }
    let loaded: Vec<String> = client
        .ps()
        .await?
        .models
        .into_iter()
        .map(|m| m.name)
        .collect();
    let mut models = Vec::with_capacity(tags.len());
    for tag in tags {
        let key = (tag.name.clone(), tag.digest.clone());
        let show = match shown.get(&key) {
            Some(show) => show.clone(),
            None => {
                let show = client.show(&tag.name).await?;
                shown.insert(key, show.clone());
                show
            }
        };
        let mut capabilities = show.capabilities.clone();
        if capabilities.is_empty() {
            // Ollama before 0.6 does not list capabilities: every model completes.
            capabilities.push("completion".to_owned());
        }
        capabilities.sort();
        capabilities.dedup();
        let embeds_only = capabilities.iter().any(|c| c == "embedding")
            && !capabilities.iter().any(|c| c == "completion");
        models.push(LocalModel {
            loaded: loaded.contains(&tag.name),
            kind: if embeds_only {
                ModelKind::Embedding
            } else {
                ModelKind::Llm
            },
            context_length: context_length(&show),
            capabilities,
            family: tag.details.family,
            parameter_size: tag.details.parameter_size,
            quantization: tag.details.quantization_level,
            size_bytes: tag.size,
            digest: tag.digest,
            name: tag.name,
        });
    }
    models.sort_by(|a, b| a.name.cmp(&b.name));
    // Forget capabilities of models that are gone.
    shown.retain(|(name, digest), _| {
        models
            .iter()
            .any(|m| &m.name == name && &m.digest == digest)
    });
    Ok(OllamaSnapshot { version, models })
}

/// How often and how patiently the local Ollama is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchConfig {
    /// Interval between reads while Ollama answers.
    pub interval: Duration,
    /// First retry delay after a failure (doubles per failure).
    pub backoff_initial: Duration,
    /// Longest retry delay.
    pub backoff_max: Duration,
}

impl Default for WatchConfig {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(30),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
        }
    }
}

/// Reads the local Ollama now and every interval in a task of its own, and
/// publishes its state on a `watch` channel, only when it changed. Ollama
/// going away is one warning, then retries with backoff; coming back is
/// one info line.
#[derive(Debug)]
pub struct OllamaWatcher {
    state: watch::Receiver<OllamaState>,
    refresh: OllamaRefresh,
    task: JoinHandle<()>,
}

/// Asks an [`OllamaWatcher`] to read its Ollama again soon (at most once
/// per [`MIN_REFRESH_GAP`]), e.g. after a request loaded a model.
#[derive(Debug, Clone, Default)]
pub struct OllamaRefresh(std::sync::Arc<tokio::sync::Notify>);

impl OllamaRefresh {
    /// Read again now (or at the end of the current gap).
    pub fn now(&self) {
        self.0.notify_one();
    }
}

/// Shortest time between two reads of Ollama that [`OllamaRefresh`] asks for.
pub const MIN_REFRESH_GAP: Duration = Duration::from_secs(1);

impl OllamaWatcher {
    /// Start watching (needs a tokio runtime).
    #[must_use]
    pub fn spawn(client: OllamaClient, config: WatchConfig) -> Self {
        let (tx, state) = watch::channel(OllamaState::Unknown);
        let refresh = OllamaRefresh::default();
        let task = tokio::spawn(watch_loop(client, config, tx, refresh.clone()));
        Self {
            state,
            refresh,
            task,
        }
    }

    /// A handle that makes the watcher read Ollama again soon.
    #[must_use]
    pub fn refresher(&self) -> OllamaRefresh {
        self.refresh.clone()
    }

    /// A receiver of the state; `changed()` wakes on every change.
    #[must_use]
    pub fn subscribe(&self) -> watch::Receiver<OllamaState> {
        self.state.clone()
    }
}

impl Drop for OllamaWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn watch_loop(
    client: OllamaClient,
    config: WatchConfig,
    tx: watch::Sender<OllamaState>,
    refresh: OllamaRefresh,
) {
    let mut shown = HashMap::new();
    let mut failures: u32 = 0;
    let mut last_models: Vec<LocalModel> = Vec::new();
    loop {
        let delay = match read_snapshot(&client, &mut shown).await {
            Ok(snapshot) => {
                if failures > 0 || matches!(*tx.borrow(), OllamaState::Unknown) {
                    tracing::info!(url = %client.endpoint(), version = %snapshot.version, models = snapshot.models.len(), "Ollama is up");
                }
                failures = 0;
                last_models.clone_from(&snapshot.models);
                let state = OllamaState::Up(snapshot);
                tx.send_if_modified(|current| {
                    let changed = *current != state;
                    if changed {
                        *current = state;
                    }
                    changed
                });
                config.interval
            }
            Err(e) => {
                if failures == 0 {
                    tracing::warn!(url = %client.endpoint(), error = %e, "Ollama is unreachable; its models are advertised as unavailable until it answers again");
                } else {
                    tracing::debug!(error = %e, failures, "Ollama still unreachable");
                }
                failures = failures.saturating_add(1);
                let state = OllamaState::Down {
                    reason: e.to_string(),
                    last_models: last_models.clone(),
                };
                tx.send_if_modified(|current| {
                    // The reason alone changing is not news.
                    let changed = !matches!(current, OllamaState::Down { .. });
                    if changed {
                        *current = state;
                    }
                    changed
                });
                let exponent = failures.saturating_sub(1).min(16);
                config
                    .backoff_initial
                    .saturating_mul(1 << exponent)
                    .min(config.backoff_max)
            }
        };
        if tx.is_closed() {
            return;
        }
        let next = tokio::time::Instant::now() + delay;
        tokio::time::sleep(MIN_REFRESH_GAP.min(delay)).await;
        tokio::select! {
            () = tokio::time::sleep_until(next) => {}
            () = refresh.0.notified() => {}
        }
    }
}
