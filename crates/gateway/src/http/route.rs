//! Choosing the node that serves a request, and failing over: the nodes
//! with the model are ranked (warm before cold, then fewer requests in
//! flight, the scorer's order among equals), a later turn of a
//! conversation goes first to the node that served the earlier ones, nodes
//! whose breaker is open wait while another can serve, and the request
//! waits in the queue for the first of them with a free slot. A node that
//! fails is counted against its breaker and the next is tried, up to
//! `max_attempts`; one that answers 429 is asked again after a pause.

use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{StatusCode, header};
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use ollamacron_node_core::BreakerState;
use ollamacron_node_core::libp2p::PeerId;
use ollamacron_node_core::registry::{RankedService, ServiceQuery};
use tracing::Instrument;

use super::forward::{Failure, local_attempt, remote_attempt};
use super::{Gateway, error};
use crate::affinity::TurnKeys;
use crate::metadata::{METADATA_IN_FLIGHT, METADATA_LOADED, METADATA_MAX_CONCURRENT_PER_PEER};
use crate::metrics::{
    GatewayMetrics, ModelLabel, PeerLabel, RequestLabels, ServedLabels, breaker_gauge,
};
use crate::queue::{Choice, QueueRefusal, Slot};

/// Serve one inference request to `path` for `model` (its `body` read
/// whole): the answer of the first node that serves it, streamed; a 404
/// when no node has the model, a 503 when none was free in time, a 502
/// when every node tried failed.
pub(super) async fn route(gateway: &Gateway, path: &str, model: &str, body: Bytes) -> Response {
    let requested = Instant::now();
    let lookup = tracing::info_span!("gateway.route", candidates = tracing::field::Empty);
    let mut candidates = ranked_candidates(gateway, model)
        .instrument(lookup.clone())
        .await;
    lookup.record("candidates", candidates.len());
    drop(lookup);
    // A later turn of a conversation goes first to the node that served
    // the earlier ones (its prompt cache), while it has room.
    let turn = TurnKeys::of(model, &body);
    if let Some(node) = gateway.affinity.node_for(&turn)
        && let Some(at) = candidates.iter().position(|c| c.service.peer_id == node)
    {
        let earlier = candidates.remove(at);
        candidates.insert(0, earlier);
    }
    let count_as = |model: String, peer: &str, outcome| {
        gateway
            .metrics
            .requests
            .get_or_create(&RequestLabels {
                model,
                peer: peer.to_owned(),
                outcome,
            })
            .inc();
    };
    let count = |peer: &str, outcome| count_as(model.to_owned(), peer, outcome);
    if candidates.is_empty() {
        count_as(gateway.metrics.unserved_label(model), "none", "not_found");
        return error(StatusCode::NOT_FOUND, format!("model '{model}' not found"));
    }
    let waited_since = Instant::now();
    let deadline = waited_since + gateway.config.queue_timeout;
    let mut last_failure = String::new();
    let mut failed: Vec<String> = Vec::new();
    // Nodes that answered 429 (busy with other gateways' requests) since
    // the last pause.
    let mut busy: Vec<String> = Vec::new();
    loop {
        let open: Vec<&RankedService> = candidates
            .iter()
            .filter(|c| !failed.contains(&c.service.peer_id) && !busy.contains(&c.service.peer_id))
            .collect();
        // Nodes whose breaker is open wait while another can serve.
        let admitted: Vec<&RankedService> = open
            .iter()
            .copied()
            .filter(|c| gateway.breakers.admits(&c.service.peer_id))
            .collect();
        let fallback = admitted.is_empty();
        let choices: Vec<Choice> = if fallback { open } else { admitted }
            .into_iter()
            .map(|c| Choice {
                key: c.service.peer_id.clone(),
                limit: if c.local {
                    gateway.config.local_limit
                } else {
                    advertised_limit(c)
                },
            })
            .collect();
        if choices.is_empty() {
            if busy.is_empty() || Instant::now() >= deadline {
                break;
            }
            // Every node left is busy with others' requests: wait a
            // little, then ask them again.
            busy.clear();
            tokio::time::sleep(BUSY_RETRY_DELAY.min(deadline - Instant::now())).await;
            continue;
        }
        let slot = {
            // Counted while waiting, however the wait ends.
            let depth = gateway
                .metrics
                .queue_depth
                .get_or_create_owned(&ModelLabel {
                    model: model.to_owned(),
                });
            let _waiting = Waiting::new(&depth);
            gateway
                .queue
                .acquire(choices, deadline.saturating_duration_since(Instant::now()))
                .instrument(tracing::info_span!("gateway.queue_wait"))
                .await
        };
        gateway
            .metrics
            .queue_wait
            .observe(waited_since.elapsed().as_secs_f64());
        let slot = match slot {
            Ok(slot) => slot,
            Err(refusal) => {
                count("none", "queue_full");
                return queue_refusal(gateway, refusal);
            }
        };
        let Some(candidate) = candidates.iter().find(|c| c.service.peer_id == slot.key()) else {
            break;
        };
        if !gateway
            .breakers
            .sending(&candidate.service.peer_id, fallback)
        {
            // Its breaker opened (or another request probes it) while
            // this one waited: choose again.
            continue;
        }
        let started = Instant::now();
        let peer_label = if candidate.local {
            "local".to_owned()
        } else {
            candidate.service.peer_id.clone()
        };
        // Until the serving node's first byte; its own spans are children.
        let attempt_span = tracing::info_span!(
            "gateway.attempt",
            peer = %peer_label,
            local = candidate.local,
            outcome = tracing::field::Empty,
        );
        let attempt = async {
            if candidate.local {
                local_attempt(gateway, path, body.clone()).await
            } else {
                match candidate.service.peer_id.parse::<PeerId>() {
                    Ok(peer) => remote_attempt(gateway, peer, path, body.clone()).await,
                    Err(e) => Err(Failure::from(e.to_string())),
                }
            }
        }
        .instrument(attempt_span.clone())
        .await;
        attempt_span.record(
            "outcome",
            match &attempt {
                Ok(_) => "answered",
                Err(f) if f.status == Some(StatusCode::TOO_MANY_REQUESTS.as_u16()) => "busy",
                Err(_) => "failed",
            },
        );
        drop(attempt_span);
        match attempt {
            Ok(response) => {
                let labels = ServedLabels {
                    model: model.to_owned(),
                    peer: peer_label.clone(),
                };
                gateway
                    .metrics
                    .first_byte
                    .get_or_create(&labels)
                    .observe(started.elapsed().as_secs_f64());
                count(&peer_label, "ok");
                gateway.affinity.remember(&turn, &candidate.service.peer_id);
                if gateway.breakers.succeeded(&candidate.service.peer_id) {
                    gateway.show_breaker(&candidate.service.peer_id, BreakerState::Closed, None);
                }
                let stream = StreamSpan::new(&labels, requested);
                return counted(response, &gateway.metrics, &labels, slot, stream);
            }
            Err(Failure { reason, status }) => {
                drop(slot);
                if status == Some(StatusCode::TOO_MANY_REQUESTS.as_u16()) {
                    // Not a failure: full with other gateways' requests.
                    busy.push(candidate.service.peer_id.clone());
                    continue;
                }
                tracing::info!(%model, peer = %candidate.service.peer_id, %reason, "failing over to the next node");
                let (state, opened) = gateway.breakers.failed(&candidate.service.peer_id);
                if opened.is_some() {
                    gateway.show_breaker(&candidate.service.peer_id, state, opened);
                }
                if opened.is_some() {
                    tracing::warn!(peer = %candidate.service.peer_id, %reason, "a serving node failed requests in a row: cooling it down");
                    gateway
                        .metrics
                        .breaker_trips
                        .get_or_create(&PeerLabel {
                            peer: candidate.service.peer_id.clone(),
                        })
                        .inc();
                }
                failed.push(candidate.service.peer_id.clone());
                gateway
                    .metrics
                    .failovers
                    .get_or_create(&ModelLabel {
                        model: model.to_owned(),
                    })
                    .inc();
                last_failure = reason;
                if failed.len() >= gateway.config.max_attempts {
                    break;
                }
            }
        }
    }
    if failed.is_empty() {
        count("none", "queue_full");
        return queue_refusal(gateway, QueueRefusal::TimedOut);
    }
    count("none", "failed");
    error(
        StatusCode::BAD_GATEWAY,
        format!("no node could serve '{model}': {last_failure}"),
    )
}

/// The nodes that have `model`, in the order they are tried (before
/// conversation affinity): one exact lookup of the model. The local
/// Ollama's copy is among them whenever it has the model, advertised in
/// the node's record or not.
async fn ranked_candidates(gateway: &Gateway, model: &str) -> Vec<RankedService> {
    let query = ServiceQuery {
        model: Some(model.to_owned()),
        ..ServiceQuery::default()
    };
    let mut candidates: Vec<RankedService> = gateway
        .node
        .find_services(query.clone())
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|s| s.service.protocols.iter().any(|p| p == "ollama"))
        .collect();
    if !candidates.iter().any(|c| c.local)
        && let Some(local) = gateway.local_model(model, &query)
    {
        candidates.push(local);
    }
    // Nodes with the model loaded first (a cold load costs seconds), then
    // busy nodes yield to idle ones: fewer requests in flight first (ours
    // to it now, plus what it last advertised serving for others), the
    // scorer's order among equals (the sort is stable). The queue takes
    // the first of these with room, so a cold node serves once the warm
    // ones are full.
    candidates.sort_by_key(|c| {
        let cold = c
            .service
            .metadata
            .get(METADATA_LOADED)
            .is_none_or(|l| l != "true");
        let advertised: usize = c
            .service
            .metadata
            .get(METADATA_IN_FLIGHT)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        (
            cold,
            gateway
                .queue
                .in_flight(&c.service.peer_id)
                .saturating_add(advertised),
        )
    });
    candidates
}

impl Gateway {
    /// Show `peer`'s breaker in the metrics, and in `GET /v1/peers` when
    /// it opened (cooling down until `opened`) or closed.
    fn show_breaker(&self, peer: &str, state: BreakerState, opened: Option<Instant>) {
        self.metrics
            .breaker_state
            .get_or_create(&PeerLabel {
                peer: peer.to_owned(),
            })
            .set(breaker_gauge(state));
        if (opened.is_some() || state == BreakerState::Closed)
            && let Ok(id) = peer.parse::<PeerId>()
        {
            self.node.report_breaker(id, opened);
        }
    }
}

/// One request in the queue-depth gauge until dropped.
struct Waiting<'a>(&'a prometheus_client::metrics::gauge::Gauge);

impl<'a> Waiting<'a> {
    fn new(gauge: &'a prometheus_client::metrics::gauge::Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Pause before asking again nodes that all answered 429.
const BUSY_RETRY_DELAY: Duration = Duration::from_millis(250);

/// How many of our requests a serving node takes at once: what it
/// advertises it serves for one peer (no limit when it says nothing; its
/// 429 then tells).
fn advertised_limit(candidate: &RankedService) -> usize {
    candidate
        .service
        .metadata
        .get(METADATA_MAX_CONCURRENT_PER_PEER)
        .and_then(|v| v.parse().ok())
        .unwrap_or(usize::MAX)
}

/// Ollama's answer when its queue is full (a 503 with `Retry-After`), and
/// ours when a request waited too long.
fn queue_refusal(gateway: &Gateway, refusal: QueueRefusal) -> Response {
    let message = match refusal {
        QueueRefusal::Full => format!(
            "server busy, please try again.  maximum pending requests exceeded (gateway_queue_max = {})",
            gateway.config.queue_max
        ),
        QueueRefusal::TimedOut => format!(
            "server busy, please try again.  no node with the model was free within {:?} (gateway_queue_timeout)",
            gateway.config.queue_timeout
        ),
    };
    let mut response = error(StatusCode::SERVICE_UNAVAILABLE, message);
    response.headers_mut().insert(
        header::RETRY_AFTER,
        axum::http::HeaderValue::from_static(RETRY_AFTER_SECS),
    );
    response
}

/// What a refused client is told to wait before trying again.
const RETRY_AFTER_SECS: &str = "1";

/// The response with its body's bytes and chunks counted as they stream.
fn counted(
    response: Response,
    metrics: &GatewayMetrics,
    labels: &ServedLabels,
    slot: Slot,
    mut span: StreamSpan,
) -> Response {
    let bytes = metrics.bytes.get_or_create(labels).clone();
    let chunks = metrics.chunks.get_or_create(labels).clone();
    let (parts, body) = response.into_parts();
    let stream = body.into_data_stream().inspect(move |chunk| {
        // Held until the body is done or dropped.
        let _slot = &slot;
        if let Ok(chunk) = chunk {
            let length = u64::try_from(chunk.len()).unwrap_or(u64::MAX);
            bytes.inc_by(length);
            chunks.inc();
            span.chunk(length);
        }
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

/// The `gateway.stream` span of an answer: from its head to its last
/// chunk (or the client going away), with the time from the request to
/// the first chunk (the first token, when Ollama streams) and what
/// passed; it ends when the answer's body is dropped.
struct StreamSpan {
    span: tracing::Span,
    requested: Instant,
    chunks: u64,
    bytes: u64,
}

impl StreamSpan {
    fn new(labels: &ServedLabels, requested: Instant) -> Self {
        let span = tracing::info_span!(
            "gateway.stream",
            model = %labels.model,
            peer = %labels.peer,
            first_token_ms = tracing::field::Empty,
            chunks = tracing::field::Empty,
            bytes = tracing::field::Empty,
        );
        Self {
            span,
            requested,
            chunks: 0,
            bytes: 0,
        }
    }

    fn chunk(&mut self, length: u64) {
        if self.chunks == 0 {
            let waited = self.requested.elapsed().as_secs_f64() * MILLIS_PER_SECOND;
            self.span.record("first_token_ms", waited);
        }
        self.chunks += 1;
        self.bytes = self.bytes.saturating_add(length);
    }
}

impl Drop for StreamSpan {
    fn drop(&mut self) {
        self.span.record("chunks", self.chunks);
        self.span.record("bytes", self.bytes);
    }
}

const MILLIS_PER_SECOND: f64 = 1000.0;
