//! The Ollama- and OpenAI-compatible HTTP front: each request goes to the
//! best node that has its model (this node's Ollama when it is the best),
//! streamed back as it comes, with failover before the first byte.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::BodyExt;
use ollamacron_node_core::config::NodeConfig;
use ollamacron_node_core::libp2p::PeerId;
use ollamacron_node_core::registry::{RankedService, ServiceQuery};
use ollamacron_node_core::{NodeError, NodeHandle, libp2p_stream};
use serde_json::{Value, json};

use crate::affinity::{ConversationAffinity, TurnKeys};
use crate::breaker::{BreakerState, Breakers};
use crate::frame::{
    COALESCE_BYTES, FrameKind, InferHead, InferRequest, InferRequestHead, REQUEST_CHUNK_BYTES,
    decode, encode_frame, read_frame, write_frame,
};
use crate::metrics::PeerLabel;
use crate::metrics::{GatewayMetrics, ModelLabel, RequestLabels, ServedLabels};
use crate::queue::{Choice, QueueRefusal, RequestQueue, Slot};
use crate::serve::{FORWARDED_PATHS, INFER_PROTOCOL, INFER_PROTOCOL_V1, LocalOllama};

/// How the gateway behaves.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Candidates tried for one request before giving up (failover before
    /// the first byte).
    pub max_attempts: usize,
    /// Longest wait for a serving node's first answer.
    pub first_byte_timeout: Duration,
    /// Largest request body taken (`gateway_max_request_bytes`).
    pub max_request_bytes: u64,
    /// Requests that wait at most for a free node (`gateway_queue_max`);
    /// one more is a 503.
    pub queue_max: usize,
    /// Longest a request waits for a free node (`gateway_queue_timeout`).
    pub queue_timeout: Duration,
    /// Requests this node's own Ollama takes from its gateway at once
    /// (`gateway_max_concurrent`).
    pub local_limit: usize,
}

impl GatewayConfig {
    /// The settings of `config`: `gateway_failover_attempts`,
    /// `gateway_first_byte_timeout`, `gateway_max_request_bytes`.
    #[must_use]
    pub fn from_config(config: &NodeConfig) -> Self {
        Self {
            max_attempts: usize::try_from(config.gateway_failover_attempts).unwrap_or(usize::MAX),
            first_byte_timeout: config.gateway_first_byte_timeout,
            max_request_bytes: config.gateway_max_request_bytes.bytes(),
            queue_max: usize::try_from(config.gateway_queue_max).unwrap_or(usize::MAX),
            queue_timeout: config.gateway_queue_timeout,
            local_limit: usize::try_from(config.gateway_max_concurrent).unwrap_or(usize::MAX),
        }
    }
}

/// The gateway bound to its address, behind its access rules, ready to
/// serve: what the node binary runs.
pub struct GatewayServer {
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ollamacron_http::HttpLimits,
    addr: std::net::SocketAddr,
}

impl GatewayServer {
    /// The gateway of `node` on `listener` with `config`'s settings
    /// (`gateway_*`, `http_*`); `ollama_origins` is the value of
    /// `OLLAMA_ORIGINS`, when set. Warns when it listens beyond loopback
    /// without a key.
    ///
    /// # Errors
    /// No local address, or `gateway_api_key_file` cannot be read.
    pub fn new(
        listener: tokio::net::TcpListener,
        node: NodeHandle,
        local: Option<LocalOllama>,
        config: &NodeConfig,
        ollama_origins: Option<&str>,
    ) -> Result<Self, NodeError> {
        let addr = listener
            .local_addr()
            .map_err(|source| NodeError::ApiListen {
                addr: config.gateway_listen,
                source,
            })?;
        let policy = ollamacron_node_core::gateway_access(config, addr, ollama_origins)?;
        if policy.beyond_loopback() && !policy.requires_key() {
            tracing::warn!(gateway_listen = %addr, "the gateway listens beyond loopback without a key: anyone who reaches it can use the pool; set gateway_api_keys");
        }
        Ok(Self {
            listener,
            app: policy.apply(router(node, local, GatewayConfig::from_config(config))),
            limits: ollamacron_node_core::http_limits(config),
            addr,
        })
    }

    /// Where it listens.
    #[must_use]
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// Serve until the task is dropped.
    pub async fn run(self) {
        ollamacron_http::serve(self.listener, self.app, self.limits, std::future::pending()).await;
    }
}

#[derive(Clone)]
struct Gateway {
    node: NodeHandle,
    local: Option<LocalOllama>,
    config: GatewayConfig,
    metrics: GatewayMetrics,
    /// This gateway's requests in flight per serving node, and those
    /// waiting for one.
    queue: Arc<RequestQueue>,
    /// Each serving node's breaker.
    breakers: Arc<Breakers>,
    /// Which node served which conversation.
    affinity: Arc<ConversationAffinity>,
}

/// The gateway's routes. `local` is this node's Ollama (none on a client
/// node). Serve them with [`GatewayServer`], or with
/// [`ollamacron_http::serve`] behind an [`ollamacron_http::AccessPolicy`]:
/// alone they have no limits on slow clients and no `Host`, `Origin` or
/// key checks.
pub fn router(node: NodeHandle, local: Option<LocalOllama>, config: GatewayConfig) -> Router {
    let metrics = GatewayMetrics::new();
    node.register_metrics(|registry| metrics.register(registry));
    let gateway = Gateway {
        node,
        local,
        queue: RequestQueue::new(config.queue_max),
        breakers: Arc::default(),
        affinity: Arc::default(),
        config,
        metrics,
    };
    let mut router = Router::new()
        .route(
            "/",
            get(|| async { "Ollama is running" }).head(|| async { StatusCode::OK }),
        )
        .route("/api/version", get(version))
        .route("/api/tags", get(tags))
        .route("/api/ps", get(loaded))
        .route("/v1/models", get(openai_models));
    for path in FORWARDED_PATHS {
        router = router.route(path, post(infer));
    }
    router
        .fallback(unsupported)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(gateway)
}

/// Ollama's endpoints that manage models on one machine; the mesh gateway
/// serves models and leaves managing them to each node's own Ollama.
const MODEL_MANAGEMENT_PATHS: [&str; 6] = [
    "/api/pull",
    "/api/push",
    "/api/create",
    "/api/delete",
    "/api/copy",
    "/api/blobs",
];

/// Any path the gateway does not serve: a JSON error like every other
/// answer, saying why.
async fn unsupported(uri: Uri) -> Response {
    let path = uri.path();
    if MODEL_MANAGEMENT_PATHS
        .iter()
        .any(|p| path == *p || path.starts_with(&format!("{p}/")))
    {
        return error(
            StatusCode::NOT_IMPLEMENTED,
            format!(
                "the Ollamacron gateway serves the mesh's models but does not manage them: \
                 {path} goes to a node's own Ollama (for example OLLAMA_HOST=127.0.0.1:11434 ollama pull <model>), \
                 and the mesh advertises the result within ollama_poll_interval (30 s by default)"
            ),
        );
    }
    error(
        StatusCode::NOT_FOUND,
        format!("the Ollamacron gateway has no endpoint {path}"),
    )
}

async fn method_not_allowed(method: axum::http::Method, uri: Uri) -> Response {
    error(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
}

/// Longest `/api/version` waits for the mesh's models; clients use it as
/// a quick liveness check.
const VERSION_LOOKUP_TIMEOUT: Duration = Duration::from_secs(1);

/// The oldest Ollama version among the mesh's models (any of them may
/// serve a request, so a client must not count on more; `0.0.0` while none
/// is known), and this gateway's own version beside it.
async fn version(State(gateway): State<Gateway>) -> Response {
    let models = tokio::time::timeout(VERSION_LOOKUP_TIMEOUT, gateway.models())
        .await
        .unwrap_or_default();
    let oldest = models
        .iter()
        .filter_map(|s| s.service.metadata.get("ollama_version"))
        .filter(|v| !v.is_empty())
        .min_by(|a, b| version_parts(a).cmp(&version_parts(b)))
        .cloned();
    axum::Json(json!({
        "version": oldest.unwrap_or_else(|| "0.0.0".to_owned()),
        "ollamacron": env!("CARGO_PKG_VERSION"),
    }))
    .into_response()
}

/// The numeric parts of a version such as `0.12.3` or `v0.12.3-rc1`, for
/// ordering.
fn version_parts(version: &str) -> Vec<u64> {
    version
        .trim_start_matches('v')
        .split(['.', '-', '+'])
        .map_while(|p| p.parse().ok())
        .collect()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

/// `name` and `name:latest` are the same model.
fn same_model(a: &str, b: &str) -> bool {
    let full = |n: &str| {
        if n.contains(':') {
            n.to_owned()
        } else {
            format!("{n}:latest")
        }
    };
    full(a) == full(b)
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
            .set(state.gauge());
        if (opened.is_some() || state == BreakerState::Closed)
            && let Ok(id) = peer.parse::<PeerId>()
        {
            self.node.report_breaker(id, opened);
        }
    }

    /// Every service of the mesh that is an Ollama model, best first.
    async fn models(&self) -> Vec<RankedService> {
        let mut all = Vec::new();
        for kind in ["llm", "embedding"] {
            let query = ServiceQuery {
                service_type: Some(kind.to_owned()),
                ..ServiceQuery::default()
            };
            if let Ok(found) = self.node.find_services(query).await {
                all.extend(
                    found
                        .into_iter()
                        .filter(|s| s.service.protocols.iter().any(|p| p == "ollama")),
                );
            }
        }
        all
    }
}

async fn tags(State(gateway): State<Gateway>) -> Response {
    let mut by_name: BTreeMap<String, Value> = BTreeMap::new();
    for s in gateway.models().await {
        by_name.entry(s.service.name.clone()).or_insert_with(|| {
            json!({
                "name": s.service.name, "model": s.service.name, "digest": s.service.version,
                "size": s.service.metadata.get("size_bytes").and_then(|v| v.parse::<u64>().ok()).unwrap_or(0),
                "details": {"family": s.service.tags.first().cloned().unwrap_or_default()},
            })
        });
    }
    axum::Json(json!({ "models": by_name.into_values().collect::<Vec<_>>() })).into_response()
}

/// `/api/ps`: the models loaded in memory somewhere in the mesh, each once.
async fn loaded(State(gateway): State<Gateway>) -> Response {
    let mut by_name: BTreeMap<String, Value> = BTreeMap::new();
    for s in gateway.models().await {
        if s.service
            .metadata
            .get("loaded")
            .is_some_and(|l| l == "true")
        {
            by_name.entry(s.service.name.clone()).or_insert_with(|| {
                json!({"name": s.service.name, "model": s.service.name, "digest": s.service.version})
            });
        }
    }
    axum::Json(json!({ "models": by_name.into_values().collect::<Vec<_>>() })).into_response()
}

async fn openai_models(State(gateway): State<Gateway>) -> Response {
    let mut names: Vec<String> = gateway
        .models()
        .await
        .into_iter()
        .map(|s| s.service.name)
        .collect();
    names.sort();
    names.dedup();
    let data: Vec<Value> = names
        .into_iter()
        .map(|n| json!({"id": n, "object": "model", "created": 0, "owned_by": "ollamacron"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// The one field of a request body the gateway reads; the rest (images
/// and all) is skipped without being copied.
#[derive(serde::Deserialize)]
struct ModelField<'a> {
    #[serde(borrow)]
    model: Option<std::borrow::Cow<'a, str>>,
}

/// Most bytes read and dropped from a body over the limit, so the client
/// is reading when the 413 comes (not writing into a closed socket); past
/// that the 413 is sent while it still writes.
const OVERSIZE_DRAIN_BYTES: u64 = 64 * 1024 * 1024;

/// Most memory set aside for a body before it arrives (it grows as it
/// comes): a `Content-Length` alone reserves no more.
const BODY_PREALLOCATION_BYTES: u64 = 1024 * 1024;

/// The request body, whole, or the answer that refuses it: a JSON 413
/// over `limit`, a JSON 408 when it does not arrive in time.
async fn read_body(request: axum::extract::Request, limit: u64) -> Result<Bytes, Response> {
    let too_large = |length: Option<u64>| {
        let size = length.map_or_else(String::new, |l| format!(" ({l} bytes)"));
        let mut response = error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the request body{size} is over the gateway's limit of {limit} bytes (gateway_max_request_bytes)"
            ),
        );
        response.headers_mut().insert(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
        response
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let expects_continue = request
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let mut body = request.into_body();
    if declared.is_some_and(|l| l > limit) && expects_continue {
        // The client waits for our word before sending: refuse at once.
        return Err(too_large(declared));
    }
    let capacity = declared.map_or(0, |l| l.min(limit).min(BODY_PREALLOCATION_BYTES));
    let mut collected = bytes::BytesMut::with_capacity(usize::try_from(capacity).unwrap_or(0));
    let mut over = false;
    let mut drained = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                let cause = e.into_inner();
                return Err(if over {
                    too_large(declared)
                } else if let Some(timeout) = cause.downcast_ref::<ollamacron_http::BodyTimeout>() {
                    error(StatusCode::REQUEST_TIMEOUT, timeout.to_string())
                } else {
                    error(
                        StatusCode::BAD_REQUEST,
                        "the request body could not be read: it broke off or is malformed",
                    )
                });
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let length = u64::try_from(data.len()).unwrap_or(u64::MAX);
        if over || u64::try_from(collected.len()).unwrap_or(u64::MAX) + length > limit {
            over = true;
            collected = bytes::BytesMut::new();
            drained = drained.saturating_add(length);
            if drained > OVERSIZE_DRAIN_BYTES {
                break;
            }
            continue;
        }
        collected.extend_from_slice(&data);
    }
    if over {
        return Err(too_large(declared));
    }
    Ok(collected.freeze())
}

async fn infer(State(gateway): State<Gateway>, request: axum::extract::Request) -> Response {
    let path = request.uri().path().to_owned();
    let body = match read_body(request, gateway.config.max_request_bytes).await {
        Ok(body) => body,
        Err(refusal) => return refusal,
    };
    let model = match serde_json::from_slice::<ModelField<'_>>(&body) {
        Ok(ModelField { model: Some(model) }) => model.into_owned(),
        Ok(ModelField { model: None }) => {
            return error(StatusCode::BAD_REQUEST, "the body names no \"model\"");
        }
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body is not JSON: {e}"),
            );
        }
    };
    let mut candidates: Vec<RankedService> = gateway
        .models()
        .await
        .into_iter()
        .filter(|s| same_model(&s.service.name, &model))
        .collect();
    // Nodes with the model loaded first (a cold load costs seconds), then
    // busy nodes yield to idle ones: fewer requests in flight first (ours
    // to it now, plus what it last advertised serving for others), the
    // scorer's order among equals (the sort is stable). The queue takes
    // the first of these with room, so a cold node serves once the warm
    // ones are full.
    candidates.sort_by_key(|c| {
        let cold = c.service.metadata.get("loaded").is_none_or(|l| l != "true");
        let advertised: usize = c
            .service
            .metadata
            .get("in_flight")
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
    // A later turn of a conversation goes first to the node that served
    // the earlier ones (its prompt cache), while it has room.
    let turn = TurnKeys::of(&model, &body);
    if let Some(node) = gateway.affinity.node_for(&turn)
        && let Some(at) = candidates.iter().position(|c| c.service.peer_id == node)
    {
        let earlier = candidates.remove(at);
        candidates.insert(0, earlier);
    }
    let count = |peer: &str, outcome| {
        gateway
            .metrics
            .requests
            .get_or_create(&RequestLabels {
                model: model.clone(),
                peer: peer.to_owned(),
                outcome,
            })
            .inc();
    };
    if candidates.is_empty() {
        count("none", "not_found");
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
            let _waiting = Waiting::new(&gateway.metrics.queue_depth);
            gateway
                .queue
                .acquire(choices, deadline.saturating_duration_since(Instant::now()))
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
                return queue_refusal(&gateway, refusal);
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
        let attempt = if candidate.local {
            local_attempt(&gateway, &path, body.clone()).await
        } else {
            match candidate.service.peer_id.parse::<PeerId>() {
                Ok(peer) => remote_attempt(&gateway, peer, &path, body.clone()).await,
                Err(e) => Err(Failure::from(e.to_string())),
            }
        };
        match attempt {
            Ok(response) => {
                let labels = ServedLabels {
                    model: model.clone(),
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
                return counted(response, &gateway.metrics, &labels, slot);
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
                        model: model.clone(),
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
        return queue_refusal(&gateway, QueueRefusal::TimedOut);
    }
    count("none", "failed");
    error(
        StatusCode::BAD_GATEWAY,
        format!("no node could serve '{model}': {last_failure}"),
    )
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
        .get("max_concurrent_per_peer")
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
) -> Response {
    let bytes = metrics.bytes.get_or_create(labels).clone();
    let chunks = metrics.chunks.get_or_create(labels).clone();
    let (parts, body) = response.into_parts();
    let stream = body.into_data_stream().inspect(move |chunk| {
        // Held until the body is done or dropped.
        let _slot = &slot;
        if let Ok(chunk) = chunk {
            bytes.inc_by(u64::try_from(chunk.len()).unwrap_or(u64::MAX));
            chunks.inc();
        }
    });
    Response::from_parts(parts, Body::from_stream(stream))
}

/// Statuses after which the next candidate is tried.
fn retryable(status: u16) -> bool {
    status == 404 || status == 429 || status >= 500
}

/// Why a candidate did not serve a request, and its status if it answered.
struct Failure {
    reason: String,
    status: Option<u16>,
}

impl From<String> for Failure {
    fn from(reason: String) -> Self {
        Self {
            reason,
            status: None,
        }
    }
}

async fn local_attempt(gateway: &Gateway, path: &str, body: Bytes) -> Result<Response, Failure> {
    let local = gateway
        .local
        .as_ref()
        .ok_or_else(|| Failure::from("this node has no Ollama".to_owned()))?;
    let forwarded = local.forward_bytes(path, body).await?;
    if retryable(forwarded.status) {
        return Err(Failure {
            reason: format!("the local Ollama answered {}", forwarded.status),
            status: Some(forwarded.status),
        });
    }
    let stream = forwarded
        .body
        .into_data_stream()
        .map(|chunk| chunk.map_err(std::io::Error::other));
    Ok(streamed(
        forwarded.status,
        &forwarded.content_type,
        Body::from_stream(stream),
    ))
}

/// An error as the last chunk of a streamed answer.
fn error_chunk(content_type: &str, reason: &str) -> Bytes {
    let error = json!({ "error": reason }).to_string();
    Bytes::from(if content_type.starts_with("text/event-stream") {
        format!("data: {error}\n\n")
    } else {
        format!("{error}\n")
    })
}

fn streamed(status: u16, content_type: &str, body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    if let Ok(value) = content_type.parse() {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

/// The reading half of an inference stream, after the answer's head.
type AnswerStream = futures::io::ReadHalf<ollamacron_node_core::libp2p::Stream>;

/// Why an exchange on a stream gave no answer head.
struct ExchangeError {
    reason: String,
    /// The stream ended before any answer: the serving node never took
    /// the request (see [`UNANSWERED_STREAM_RETRIES`]).
    unanswered: bool,
}

impl From<String> for ExchangeError {
    fn from(reason: String) -> Self {
        Self {
            reason,
            unanswered: false,
        }
    }
}

/// New streams to one peer tried when one ends before any answer. The
/// serving side of `libp2p-stream` hands inbound streams over a channel
/// that holds one, and drops a stream that arrives while it is full
/// (rust-libp2p#5651): under a burst of concurrent requests some streams
/// are closed unread, and a fresh one is the fix.
const UNANSWERED_STREAM_RETRIES: usize = 3;

/// Longest wait for a serving node's answer after sending the body failed
/// (it may have answered early, with 413 or 429, and closed).
const ANSWER_AFTER_SEND_FAILURE: Duration = Duration::from_secs(2);

/// Send a request on a stream of [`INFER_PROTOCOL`] and read the answer's
/// head, which may come before the whole body is sent (a refusal).
async fn exchange(
    stream: ollamacron_node_core::libp2p::Stream,
    path: &str,
    body: &Bytes,
) -> Result<(AnswerStream, InferHead), ExchangeError> {
    let (mut reader, mut writer) = futures::AsyncReadExt::split(stream);
    let head = {
        let send = async {
            let head = InferRequestHead {
                path: path.to_owned(),
                body_bytes: u64::try_from(body.len()).unwrap_or(u64::MAX),
            };
            let head = serde_json::to_vec(&head).map_err(|e| e.to_string())?;
            if body.len() <= COALESCE_BYTES {
                // A small request goes out in one write: one transport frame.
                let mut frames = Vec::with_capacity(head.len() + body.len() + 3 * 5);
                encode_frame(&mut frames, FrameKind::RequestHead, &head)
                    .and_then(|()| encode_frame(&mut frames, FrameKind::Data, body))
                    .and_then(|()| encode_frame(&mut frames, FrameKind::End, &[]))
                    .map_err(|e| e.to_string())?;
                futures::AsyncWriteExt::write_all(&mut writer, &frames)
                    .await
                    .map_err(|e| e.to_string())?;
                futures::AsyncWriteExt::flush(&mut writer)
                    .await
                    .map_err(|e| e.to_string())?;
                return Ok(());
            }
            write_frame(&mut writer, FrameKind::RequestHead, &head)
                .await
                .map_err(|e| e.to_string())?;
            for chunk in body.chunks(REQUEST_CHUNK_BYTES) {
                write_frame(&mut writer, FrameKind::Data, chunk)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            write_frame(&mut writer, FrameKind::End, &[])
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>(())
        };
        let answer = read_answer_head(&mut reader);
        tokio::pin!(send, answer);
        tokio::select! {
            head = &mut answer => head?,
            sent = &mut send => match sent {
                Ok(()) => answer.await?,
                Err(e) => match tokio::time::timeout(ANSWER_AFTER_SEND_FAILURE, answer).await {
                    Ok(Ok(head)) => head,
                    _ => {
                        return Err(ExchangeError {
                            reason: format!("sending the request failed: {e}"),
                            unanswered: true,
                        });
                    }
                },
            },
        }
    };
    Ok((reader, head))
}

/// The same on a stream of [`INFER_PROTOCOL_V1`], for nodes that speak only
/// it: the request in one frame, so only bodies that fit one.
async fn exchange_v1(
    mut stream: ollamacron_node_core::libp2p::Stream,
    path: &str,
    body: &Bytes,
) -> Result<(AnswerStream, InferHead), ExchangeError> {
    let request = InferRequest {
        path: path.to_owned(),
        body: String::from_utf8(body.to_vec())
            .map_err(|_| "the body is not UTF-8, which infer/1.0.0 needs".to_owned())?,
    };
    let request = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
    write_frame(&mut stream, FrameKind::Request, &request)
        .await
        .map_err(|e| ExchangeError {
            unanswered: matches!(e, crate::frame::FrameError::Io(_)),
            reason: format!("the node speaks only infer/1.0.0: {e}"),
        })?;
    let (mut reader, _writer) = futures::AsyncReadExt::split(stream);
    let head = read_answer_head(&mut reader).await?;
    Ok((reader, head))
}

async fn read_answer_head<R: futures::AsyncRead + Unpin>(
    reader: &mut R,
) -> Result<InferHead, ExchangeError> {
    let (kind, payload) = read_frame(reader).await.map_err(|e| ExchangeError {
        unanswered: matches!(e, crate::frame::FrameError::Io(_)),
        reason: e.to_string(),
    })?;
    if kind != FrameKind::Head {
        return Err(format!("the serving node answered with a {kind:?} frame first").into());
    }
    Ok(decode("head", &payload).map_err(|e| e.to_string())?)
}

async fn remote_attempt(
    gateway: &Gateway,
    peer: PeerId,
    path: &str,
    body: Bytes,
) -> Result<Response, Failure> {
    let mut control: libp2p_stream::Control = gateway.node.stream_control();
    let open = async {
        let mut unanswered = 0;
        loop {
            let exchanged = match control.open_stream(peer, INFER_PROTOCOL).await {
                Ok(stream) => exchange(stream, path, &body).await,
                Err(libp2p_stream::OpenStreamError::UnsupportedProtocol(_)) => {
                    match control.open_stream(peer, INFER_PROTOCOL_V1).await {
                        Ok(stream) => exchange_v1(stream, path, &body).await,
                        Err(e) => Err(e.to_string().into()),
                    }
                }
                Err(e) => Err(e.to_string().into()),
            };
            match exchanged {
                Err(e) if e.unanswered && unanswered < UNANSWERED_STREAM_RETRIES => {
                    unanswered += 1;
                    tracing::debug!(%peer, reason = %e.reason, "a stream ended unanswered; opening another");
                }
                other => return other.map_err(|e| e.reason),
            }
        }
    };
    let (stream, head) = tokio::time::timeout(gateway.config.first_byte_timeout, open)
        .await
        .map_err(|_| format!("no answer within {:?}", gateway.config.first_byte_timeout))??;
    if retryable(head.status) {
        return Err(Failure {
            reason: format!("the serving node answered {}", head.status),
            status: Some(head.status),
        });
    }
    // After the head, chunks flow to the client as they come. A break
    // after that ends the answer with an error chunk in its own format
    // (an NDJSON line, or an SSE event), then the stream.
    let content_type = head.content_type.clone();
    let chunks = futures::stream::unfold(Some(stream), move |state| {
        let content_type = content_type.clone();
        async move {
            let mut stream = state?;
            let reason = match read_frame(&mut stream).await {
                Ok((FrameKind::Data, data)) => {
                    return Some((Ok::<_, std::io::Error>(Bytes::from(data)), Some(stream)));
                }
                Ok((FrameKind::End, _)) => return None,
                Ok((FrameKind::Error, reason)) => String::from_utf8_lossy(&reason).into_owned(),
                Ok((kind, _)) => format!("unexpected {kind:?} frame"),
                Err(e) => format!("the serving node went away: {e}"),
            };
            Some((Ok(error_chunk(&content_type, &reason)), None))
        }
    });
    Ok(streamed(
        head.status,
        &head.content_type,
        Body::from_stream(chunks),
    ))
}

#[cfg(test)]
mod tests {
    use super::version_parts;

    #[test]
    fn versions_order_by_their_numbers() {
        assert!(version_parts("0.12.10") > version_parts("0.12.9"));
        assert!(version_parts("v0.13.0-rc1") > version_parts("0.12.9"));
        assert_eq!(version_parts("0.5.1"), vec![0, 5, 1]);
        assert!(version_parts("garbage").is_empty());
    }
}
