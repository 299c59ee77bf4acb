//! Services declared in the config file, and the weights of the quality score.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One service the node advertises from its config file, so a node can
/// offer services without any code. The node fills in its peer id,
/// addresses and timestamps when it publishes it.
///
/// ```yaml
/// services:
///   - name: llama3:8b
///     type: llm
///     tags: [gpu]
///     capabilities: [completion, tools]
/// ```
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceConfig {
    /// Unique within the node; defaults to `name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Human name, e.g. a model with its tag (`llama3:8b`).
    pub name: String,
    /// Kind: `llm`, `embedding`, `classification`, `translation`, or any other.
    #[serde(rename = "type")]
    pub service_type: String,
    /// Version (for a model: its digest).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub version: String,
    /// Free text.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Port of the service on this machine, if it has one of its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Free-form key/value pairs.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
    /// Tags a query can require.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// What it can do: `completion`, `embedding`, `vision`, `tools`, …
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub capabilities: Vec<String>,
    /// Protocols it speaks (`ollama`, `openai`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub protocols: Vec<String>,
    /// `http://` URL probed for health (2xx is healthy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check_url: Option<String>,
    /// Latency to advertise, in milliseconds (observers measure their own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    /// Throughput to advertise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throughput: Option<f64>,
    /// Reliability to advertise, in [0, 1] (observers measure their own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reliability: Option<f64>,
}

impl ServiceConfig {
    /// The service id: `id`, else `name`.
    #[must_use]
    pub fn effective_id(&self) -> &str {
        self.id.as_deref().unwrap_or(&self.name)
    }
}

/// Weights of the quality score; only their ratios matter.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScoreWeightsConfig {
    /// Weight of reliability (share of good health probes).
    pub reliability: f64,
    /// Weight of latency (ping RTT).
    pub latency: f64,
    /// Weight of advertised throughput.
    pub throughput: f64,
    /// Weight of availability (age of the last good health probe).
    pub availability: f64,
}

impl Default for ScoreWeightsConfig {
    fn default() -> Self {
        Self {
            reliability: 0.4,
            latency: 0.3,
            throughput: 0.2,
            availability: 0.1,
        }
    }
}
