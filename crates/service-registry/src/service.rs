//! What a node offers (`ServiceInfo`) and what a client asks for (`ServiceQuery`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Whether a service takes requests now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ServiceStatus {
    /// Serving.
    #[default]
    Available,
    /// Serving, but at capacity.
    Busy,
    /// Not serving (its backend is down).
    Unavailable,
    /// Deliberately out of rotation.
    Maintenance,
}

/// One service a node offers: a model, an embedding endpoint, … Times are
/// Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceInfo {
    /// Unique within its node.
    pub id: String,
    /// Human name, e.g. the model with its tag (`llama3:8b`).
    pub name: String,
    /// Kind: `llm`, `embedding`, `classification`, `translation`, or any other.
    #[serde(rename = "type")]
    pub service_type: String,
    /// Version (for a model: its digest).
    pub version: String,
    /// Free text.
    pub description: String,
    /// Base58 peer id of the node serving it.
    pub peer_id: String,
    /// Multiaddrs the node can be reached at.
    pub addresses: Vec<String>,
    /// Port of the service on its node, if it has one of its own.
    pub port: Option<u16>,
    /// Free-form key/value pairs (context length, quantization, …).
    pub metadata: BTreeMap<String, String>,
    /// Tags (all must match a query's tags).
    pub tags: Vec<String>,
    /// Whether it takes requests.
    pub status: ServiceStatus,
    /// URL the serving node probes for health.
    pub health_check_url: Option<String>,
    /// When that probe last succeeded.
    pub last_health_check: Option<u64>,
    /// What it can do: `completion`, `embedding`, `vision`, `tools`, …
    pub capabilities: Vec<String>,
    /// Protocols it speaks (`ollama`, `openai`).
    pub protocols: Vec<String>,
    /// Latency it advertises, in milliseconds (the observer measures its own).
    pub latency_ms: Option<f64>,
    /// Throughput it advertises (capped when scored).
    pub throughput: Option<f64>,
    /// Reliability it advertises, in [0, 1] (the observer measures its own).
    pub reliability: Option<f64>,
    /// When it was first registered.
    pub registered_at: u64,
    /// When it last changed.
    pub updated_at: u64,
    /// When it lapses unless refreshed.
    pub expires_at: u64,
}

/// A model name with its tag: `llama3` is `llama3:latest`, as Ollama
/// names it; a name whose last path segment has a tag keeps it
/// (`registry.local:5000/team/llama3` is `…/llama3:latest`).
#[must_use]
pub fn model_with_tag(name: &str) -> std::borrow::Cow<'_, str> {
    let last_segment = name.rsplit('/').next().unwrap_or(name);
    if last_segment.contains(':') {
        std::borrow::Cow::Borrowed(name)
    } else {
        std::borrow::Cow::Owned(format!("{name}:latest"))
    }
}

/// Whether two model names are one model (`name` = `name:latest`).
#[must_use]
pub fn same_model(a: &str, b: &str) -> bool {
    model_with_tag(a) == model_with_tag(b)
}

/// A request for services: every set field must match.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServiceQuery {
    /// Service type, exactly.
    #[serde(rename = "type")]
    pub service_type: Option<String>,
    /// The model the service serves: its `name`, where `name` and
    /// `name:latest` are one model (see [`model_with_tag`]).
    pub model: Option<String>,
    /// Tags the service must all carry.
    pub tags: Vec<String>,
    /// Capabilities the service must all have.
    pub capabilities: Vec<String>,
    /// Least acceptable reliability.
    pub min_reliability: Option<f64>,
    /// Greatest acceptable latency, in milliseconds.
    pub max_latency_ms: Option<f64>,
    /// Region of the serving node, exactly.
    pub region: Option<String>,
    /// Most results (`None`: all).
    pub limit: Option<usize>,
}

impl ServiceQuery {
    /// Whether `service`, served from a node in `region`, passes the
    /// query's type, tag, capability and region filters. Reliability and
    /// latency are checked on the observer's figures by
    /// [`ServiceQuery::accepts_quality`].
    #[must_use]
    pub fn matches(&self, service: &ServiceInfo, region: Option<&str>) -> bool {
        let type_ok = self
            .service_type
            .as_ref()
            .is_none_or(|t| *t == service.service_type);
        let model_ok = self
            .model
            .as_deref()
            .is_none_or(|m| same_model(m, &service.name));
        let tags_ok = self.tags.iter().all(|t| service.tags.contains(t));
        let caps_ok = self
            .capabilities
            .iter()
            .all(|c| service.capabilities.contains(c));
        let region_ok = self.region.as_deref().is_none_or(|r| region == Some(r));
        type_ok && model_ok && tags_ok && caps_ok && region_ok
    }

    /// Whether a reliability in [0, 1] and a latency in milliseconds (as
    /// measured, or advertised when unmeasured) meet the query's bounds.
    /// An unknown value fails a bound that is set.
    #[must_use]
    pub fn accepts_quality(&self, reliability: Option<f64>, latency_ms: Option<f64>) -> bool {
        self.accepts_reliability(reliability) && self.accepts_latency(latency_ms)
    }

    /// Whether `reliability` meets `min_reliability` (unknown fails a bound).
    #[must_use]
    pub fn accepts_reliability(&self, reliability: Option<f64>) -> bool {
        self.min_reliability
            .is_none_or(|min| reliability.is_some_and(|r| r >= min))
    }

    /// Whether `latency_ms` meets `max_latency_ms` (unknown fails a bound).
    #[must_use]
    pub fn accepts_latency(&self, latency_ms: Option<f64>) -> bool {
        self.max_latency_ms
            .is_none_or(|max| latency_ms.is_some_and(|l| l <= max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn llm(tags: &[&str], caps: &[&str]) -> ServiceInfo {
        ServiceInfo {
            id: "a".into(),
            service_type: "llm".into(),
            tags: tags.iter().map(ToString::to_string).collect(),
            capabilities: caps.iter().map(ToString::to_string).collect(),
            ..ServiceInfo::default()
        }
    }

    #[test]
    fn every_set_field_must_match() {
        let service = llm(&["gpu", "fast"], &["completion", "tools"]);
        let all = ServiceQuery::default();
        assert!(all.matches(&service, None));
        let q = ServiceQuery {
            service_type: Some("llm".into()),
            tags: vec!["gpu".into()],
            capabilities: vec!["tools".into()],
            region: Some("eu".into()),
            ..ServiceQuery::default()
        };
        assert!(q.matches(&service, Some("eu")));
        assert!(!q.matches(&service, Some("us")));
        assert!(!q.matches(&service, None));
        let wrong_type = ServiceQuery {
            service_type: Some("embedding".into()),
            ..ServiceQuery::default()
        };
        assert!(!wrong_type.matches(&service, None));
        let missing_tag = ServiceQuery {
            tags: vec!["gpu".into(), "cheap".into()],
            ..ServiceQuery::default()
        };
        assert!(!missing_tag.matches(&service, None));
    }

    #[test]
    fn a_model_query_matches_the_name_with_or_without_latest() {
        let named = |name: &str| ServiceInfo {
            name: name.into(),
            ..ServiceInfo::default()
        };
        let q = ServiceQuery {
            model: Some("llama3".into()),
            ..ServiceQuery::default()
        };
        assert!(q.matches(&named("llama3"), None));
        assert!(q.matches(&named("llama3:latest"), None));
        assert!(!q.matches(&named("llama3:8b"), None));
        assert!(!q.matches(&named("llama3.1"), None));
        assert_eq!(model_with_tag("llama3:8b"), "llama3:8b");
        assert_eq!(
            model_with_tag("registry.local:5000/team/llama3"),
            "registry.local:5000/team/llama3:latest"
        );
        assert!(same_model("hf.co/x/y:Q4", "hf.co/x/y:Q4"));
    }

    #[test]
    fn quality_bounds_fail_on_unknown_values() {
        let q = ServiceQuery {
            min_reliability: Some(0.9),
            max_latency_ms: Some(200.0),
            ..ServiceQuery::default()
        };
        assert!(q.accepts_quality(Some(0.95), Some(150.0)));
        assert!(!q.accepts_quality(Some(0.5), Some(150.0)));
        assert!(!q.accepts_quality(Some(0.95), Some(250.0)));
        assert!(!q.accepts_quality(None, Some(150.0)));
        assert!(ServiceQuery::default().accepts_quality(None, None));
    }

    #[test]
    fn service_json_uses_the_spec_names() {
        let json = serde_json::to_value(llm(&["gpu"], &[])).unwrap();
        assert_eq!(json["type"], "llm");
        assert_eq!(json["tags"][0], "gpu");
        let back: ServiceInfo = serde_json::from_value(json).unwrap();
        assert_eq!(back, llm(&["gpu"], &[]));
        let unknown = serde_json::json!({"id": "x", "typo_field": 1});
        assert!(serde_json::from_value::<ServiceInfo>(unknown).is_err());
    }
}
