//! The gateway's metrics, in the node's registry (`ollamacron_gateway_*`).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use ollamacron_node_core::BreakerState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub(crate) model: String,
    /// The serving peer (`local` for this node's Ollama), or `none`.
    pub(crate) peer: String,
    /// `ok`, `failed` (every candidate failed), `not_found`.
    pub(crate) outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ServedLabels {
    pub(crate) model: String,
    pub(crate) peer: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ModelLabel {
    pub(crate) model: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct PeerLabel {
    /// The serving peer.
    pub(crate) peer: String,
}

/// Counters and histograms of the gateway.
#[derive(Debug, Clone)]
pub(crate) struct GatewayMetrics {
    pub(crate) requests: Family<RequestLabels, Counter>,
    pub(crate) failovers: Family<ModelLabel, Counter>,
    pub(crate) first_byte: Family<ServedLabels, Histogram>,
    pub(crate) bytes: Family<ServedLabels, Counter>,
    pub(crate) chunks: Family<ServedLabels, Counter>,
    /// Requests waiting for a free node now, by model.
    pub(crate) queue_depth: Family<ModelLabel, Gauge>,
    /// How long requests waited for a node (0 when one was free).
    pub(crate) queue_wait: Histogram,
    /// Each serving node's breaker: 0 closed, 1 half open, 2 open.
    pub(crate) breaker_state: Family<PeerLabel, Gauge>,
    /// Times a node's breaker opened.
    pub(crate) breaker_trips: Family<PeerLabel, Counter>,
    /// The names of missing models counted under their own label so far.
    unserved: Arc<Mutex<HashSet<String>>>,
}

/// Most names of models no node has that get a label of their own: any
/// client can ask for any name, and each label is kept for good.
pub(crate) const MAX_UNSERVED_MODEL_LABELS: usize = 64;

/// The label of every further missing model.
pub(crate) const OTHER_UNSERVED_MODELS: &str = "(other)";

/// Longest model name a label or a span attribute holds (a name in a
/// client's body may be as long as the body); longer ones are cut.
pub(crate) const MAX_MODEL_LABEL_CHARS: usize = 200;

/// `model`, cut to [`MAX_MODEL_LABEL_CHARS`].
pub(crate) fn model_label(model: &str) -> String {
    model.chars().take(MAX_MODEL_LABEL_CHARS).collect()
}

/// Bucket of the first-byte histogram: 1 ms doubling to about 65 s.
const FIRST_BYTE_BUCKET_START_SECONDS: f64 = 0.001;
const FIRST_BYTE_BUCKETS: u16 = 17;

impl GatewayMetrics {
    pub(crate) fn new() -> Self {
        Self {
            requests: Family::default(),
            failovers: Family::default(),
            first_byte: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(
                    FIRST_BYTE_BUCKET_START_SECONDS,
                    2.0,
                    FIRST_BYTE_BUCKETS,
                ))
            }),
            bytes: Family::default(),
            chunks: Family::default(),
            queue_depth: Family::default(),
            breaker_state: Family::default(),
            breaker_trips: Family::default(),
            unserved: Arc::default(),
            queue_wait: Histogram::new(exponential_buckets(
                FIRST_BYTE_BUCKET_START_SECONDS,
                2.0,
                FIRST_BYTE_BUCKETS,
            )),
        }
    }

    /// The label a request for `model`, which no node has, is counted
    /// under: its own name for the first [`MAX_UNSERVED_MODEL_LABELS`]
    /// names, then [`OTHER_UNSERVED_MODELS`].
    pub(crate) fn unserved_label(&self, model: &str) -> String {
        let label = model_label(model);
        let mut seen = self
            .unserved
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.contains(&label) {
            return label;
        }
        if seen.len() < MAX_UNSERVED_MODEL_LABELS {
            seen.insert(label.clone());
            return label;
        }
        OTHER_UNSERVED_MODELS.to_owned()
    }

    /// Register everything in `registry` (the node's, prefixed).
    pub(crate) fn register(&self, registry: &mut Registry) {
        let gateway = registry.sub_registry_with_prefix("gateway");
        gateway.register(
            "requests",
            "Gateway requests by model, serving peer and outcome",
            self.requests.clone(),
        );
        gateway.register(
            "failovers",
            "Candidates that failed before answering, so the next was tried",
            self.failovers.clone(),
        );
        gateway.register(
            "first_byte_seconds",
            "Time from the request to the serving node's first answer",
            self.first_byte.clone(),
        );
        gateway.register(
            "streamed_bytes",
            "Bytes of answers streamed to clients, by model and serving peer",
            self.bytes.clone(),
        );
        gateway.register(
            "breaker_state",
            "Each serving node's breaker, fed by live requests: 0 closed, 1 half open (probing), 2 open (cooling down)",
            self.breaker_state.clone(),
        );
        gateway.register(
            "breaker_trips",
            "Times a serving node's breaker opened after failed requests",
            self.breaker_trips.clone(),
        );
        gateway.register(
            "queue_depth",
            "Requests waiting for a free node with their model, by model",
            self.queue_depth.clone(),
        );
        gateway.register(
            "queue_wait_seconds",
            "Time requests waited for a free node",
            self.queue_wait.clone(),
        );
        gateway.register(
            "streamed_chunks",
            "Chunks of answers streamed to clients (one token each when Ollama streams)",
            self.chunks.clone(),
        );
    }
}

/// A breaker's state as the `breaker_state` gauge shows it: 0 closed,
/// 1 half open, 2 open.
pub(crate) fn breaker_gauge(state: BreakerState) -> i64 {
    match state {
        BreakerState::Closed => 0,
        BreakerState::HalfOpen => 1,
        BreakerState::Open => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_models_get_a_bounded_number_of_labels() {
        let metrics = GatewayMetrics::new();
        for i in 0..MAX_UNSERVED_MODEL_LABELS {
            assert_eq!(metrics.unserved_label(&format!("m{i}")), format!("m{i}"));
        }
        assert_eq!(metrics.unserved_label("one-more"), OTHER_UNSERVED_MODELS);
        assert_eq!(
            metrics.unserved_label("m3"),
            "m3",
            "a name seen keeps its label"
        );
        let long = "x".repeat(10 * MAX_MODEL_LABEL_CHARS);
        assert_eq!(model_label(&long).chars().count(), MAX_MODEL_LABEL_CHARS);
    }
}
