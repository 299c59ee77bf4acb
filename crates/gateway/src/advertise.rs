//! The local Ollama's models as services of the node.

use std::collections::BTreeMap;

use ollamacron_node_core::registry::{ServiceInfo, ServiceStatus};
use ollamacron_node_core::{NodeError, NodeHandle};
use ollamacron_ollama::{LocalModel, OllamaState};
use tokio::sync::watch;

use crate::metadata::{
    METADATA_CONTEXT_LENGTH, METADATA_IN_FLIGHT, METADATA_LOADED, METADATA_MAX_CONCURRENT,
    METADATA_MAX_CONCURRENT_PER_PEER, METADATA_SIZE_BYTES,
};
use crate::serve::{InferenceLoad, ServeLimits};

/// Every service made from an Ollama model has an id `ollama/<model>`, so
/// it never collides with a configured service.
pub const SERVICE_ID_PREFIX: &str = "ollama/";

/// The service for one model: type `llm` or `embedding`, name the model
/// with its tag, version its digest, its capabilities, tags from family,
/// quantization and parameter size, and metadata (context length, loaded,
/// size, Ollama's version).
#[must_use]
pub fn model_service(
    model: &LocalModel,
    status: ServiceStatus,
    ollama_version: &str,
) -> ServiceInfo {
    let mut tags: Vec<String> = [&model.family, &model.quantization, &model.parameter_size]
        .into_iter()
        .filter(|t| !t.is_empty())
        .map(|t| t.to_lowercase())
        .collect();
    tags.dedup();
    let mut metadata = BTreeMap::new();
    if let Some(context) = model.context_length {
        metadata.insert(METADATA_CONTEXT_LENGTH.to_owned(), context.to_string());
    }
    metadata.insert(METADATA_LOADED.to_owned(), model.loaded.to_string());
    metadata.insert(METADATA_SIZE_BYTES.to_owned(), model.size_bytes.to_string());
    if !ollama_version.is_empty() {
        metadata.insert("ollama_version".to_owned(), ollama_version.to_owned());
    }
    if let Ok(cpus) = std::thread::available_parallelism() {
        metadata.insert("cpu_count".to_owned(), cpus.to_string());
    }
    if let Some(memory) = memory_bytes() {
        metadata.insert("memory_bytes".to_owned(), memory.to_string());
    }
    ServiceInfo {
        id: format!("{SERVICE_ID_PREFIX}{}", model.name),
        name: model.name.clone(),
        service_type: model.kind.as_str().to_owned(),
        version: model.digest.clone(),
        description: format!("Ollama model {}", model.name),
        metadata,
        tags,
        status,
        capabilities: model.capabilities.clone(),
        protocols: vec!["ollama".to_owned(), "openai".to_owned()],
        ..ServiceInfo::default()
    }
}

/// This machine's memory (`MemTotal` of `/proc/meminfo`), where known.
fn memory_bytes() -> Option<u64> {
    const KIB: u64 = 1024;
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(KIB)
}

/// Keeps the node's `ollama/…` services equal to what the local Ollama
/// has: new models are registered, changed ones replaced, removed ones
/// unregistered, and while Ollama is down its last models stay advertised
/// as unavailable.
#[derive(Debug)]
pub struct OllamaAdvertiser {
    node: NodeHandle,
    advertised: BTreeMap<String, ServiceInfo>,
    load: Option<InferenceLoad>,
    limits: Option<ServeLimits>,
}

/// Models named in the warning about models left out of the record.
const MODELS_NAMED_IN_A_WARNING: usize = 5;

/// How often the advertised load is brought up to date (only when it
/// changed: each update re-signs and re-publishes the record).
pub const LOAD_REFRESH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

impl OllamaAdvertiser {
    /// An advertiser for `node` that has advertised nothing yet.
    #[must_use]
    pub fn new(node: NodeHandle) -> Self {
        Self {
            node,
            advertised: BTreeMap::new(),
            load: None,
            limits: None,
        }
    }

    /// Also advertise `load` (requests in flight for peers) as each
    /// service's [`METADATA_IN_FLIGHT`] metadata, refreshed every
    /// [`LOAD_REFRESH_INTERVAL`] when it changed.
    #[must_use]
    pub fn with_load(mut self, load: InferenceLoad) -> Self {
        self.load = Some(load);
        self
    }

    /// Also advertise how many requests this node serves for peers at
    /// once ([`METADATA_MAX_CONCURRENT`], [`METADATA_MAX_CONCURRENT_PER_PEER`]), so gateways
    /// queue instead of sending what it would refuse.
    #[must_use]
    pub fn with_limits(mut self, limits: ServeLimits) -> Self {
        self.limits = Some(limits);
        self
    }

    /// The services advertised now, by id.
    #[must_use]
    pub fn advertised(&self) -> &BTreeMap<String, ServiceInfo> {
        &self.advertised
    }

    /// Bring the node's services in line with `state`: the services that
    /// changed and those that went away, as one signed record. A model the
    /// node refuses (it would break the record limits) is logged and left
    /// out; the others are advertised.
    ///
    /// # Errors
    /// [`NodeError::NotRunning`] once the node has stopped.
    pub async fn apply(&mut self, state: &OllamaState) -> Result<(), NodeError> {
        let wanted: BTreeMap<String, ServiceInfo> = match state {
            OllamaState::Unknown => return Ok(()),
            OllamaState::Up(snapshot) => snapshot
                .models
                .iter()
                .map(|m| model_service(m, ServiceStatus::Available, &snapshot.version))
                .map(|mut s| {
                    if let Some(load) = &self.load {
                        s.metadata
                            .insert(METADATA_IN_FLIGHT.to_owned(), load.current().to_string());
                    }
                    if let Some(limits) = &self.limits {
                        s.metadata
                            .insert(METADATA_MAX_CONCURRENT.to_owned(), limits.total.to_string());
                        s.metadata.insert(
                            METADATA_MAX_CONCURRENT_PER_PEER.to_owned(),
                            limits.per_peer.to_string(),
                        );
                    }
                    (s.id.clone(), s)
                })
                .collect(),
            OllamaState::Down { last_models, .. } => {
                let version = self
                    .advertised
                    .values()
                    .find_map(|s| s.metadata.get("ollama_version").cloned())
                    .unwrap_or_default();
                last_models
                    .iter()
                    .map(|m| model_service(m, ServiceStatus::Unavailable, &version))
                    .map(|s| (s.id.clone(), s))
                    .collect()
            }
        };
        let gone: Vec<String> = self
            .advertised
            .keys()
            .filter(|id| !wanted.contains_key(*id))
            .cloned()
            .collect();
        let changed: Vec<ServiceInfo> = wanted
            .into_values()
            .filter(|service| self.advertised.get(&service.id) != Some(service))
            .collect();
        if gone.is_empty() && changed.is_empty() {
            return Ok(());
        }
        // One signed record for every model that changed, not one each.
        let refused = self
            .node
            .update_services(changed.clone(), gone.clone())
            .await?;
        for id in &gone {
            self.advertised.remove(id);
        }
        let mut not_advertised = Vec::new();
        for service in changed {
            match refused.iter().find(|(id, _)| *id == service.id) {
                // One model that does not fit the record limits must not
                // keep the others from being advertised.
                Some((_, e)) => not_advertised.push((service.name, e)),
                None => {
                    self.advertised.insert(service.id.clone(), service);
                }
            }
        }
        // One line for all of them, naming the first few and the reason.
        if let Some((_, first_error)) = not_advertised.first() {
            let field = match first_error {
                NodeError::Service { field, .. } => *field,
                _ => None,
            };
            let names: Vec<&str> = not_advertised
                .iter()
                .take(MODELS_NAMED_IN_A_WARNING)
                .map(|(name, _)| name.as_str())
                .collect();
            tracing::warn!(
                count = not_advertised.len(),
                models = %names.join(", "),
                error = %first_error,
                field = ?field,
                "cannot advertise some Ollama models in the node record (this node's gateway still serves them)"
            );
        }
        Ok(())
    }

    /// Follow `state` (and the load) until the node stops or the watcher
    /// goes away.
    pub async fn run(mut self, mut state: watch::Receiver<OllamaState>) {
        let mut refresh = tokio::time::interval(LOAD_REFRESH_INTERVAL);
        refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let current = state.borrow_and_update().clone();
            match self.apply(&current).await {
                Ok(()) => {}
                Err(NodeError::NotRunning) => return,
                Err(e) => tracing::warn!(error = %e, "cannot update the Ollama models' services"),
            }
            tokio::select! {
                changed = state.changed() => {
                    if changed.is_err() {
                        return;
                    }
                }
                // `apply` re-registers only services whose load changed.
                _ = refresh.tick(), if self.load.is_some() => {}
            }
        }
    }
}
