//! The Ollama- and OpenAI-compatible HTTP front: each request goes to the
//! best node that has its model (this node's Ollama when it is the best),
//! streamed back as it comes, with failover before the first byte.
//!
//! This module holds the routes and their handlers: the server and its
//! settings, the mesh's model listings, and reading an inference request
//! (its body, its model). Which node serves it is chosen in [`route`]
//! (ranking, affinity, breakers, the queue, failover), and the request is
//! sent there and its answer streamed back by [`forward`].

mod forward;
mod route;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use http_body_util::BodyExt;
use ollamacron_node_core::config::NodeConfig;
use ollamacron_node_core::registry::{RankedService, ServiceQuery};
use ollamacron_node_core::{NodeError, NodeHandle};
use serde_json::{Value, json};

use crate::affinity::ConversationAffinity;
use crate::breaker::Breakers;
use crate::metadata::{METADATA_LOADED, METADATA_SIZE_BYTES};
use crate::metrics::GatewayMetrics;
use crate::queue::RequestQueue;
use crate::serve::{FORWARDED_PATHS, LocalOllama};

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
            max_attempts: config.gateway_failover_attempts,
            first_byte_timeout: config.gateway_first_byte_timeout,
            max_request_bytes: config.gateway_max_request_bytes.bytes(),
            queue_max: config.gateway_queue_max,
            queue_timeout: config.gateway_queue_timeout,
            local_limit: config.gateway_max_concurrent,
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

impl Gateway {
    /// The local Ollama's `model` as a candidate of `query`, scored as a
    /// local service is (this node's record may not hold it: the gateway
    /// routes to everything its own Ollama has).
    fn local_model(&self, model: &str, query: &ServiceQuery) -> Option<RankedService> {
        let (found, version) = self.local.as_ref()?.model(model)?;
        let mut service = crate::advertise::model_service(
            &found,
            ollamacron_node_core::registry::ServiceStatus::Available,
            &version,
        );
        service.peer_id = self.node.peer_id().to_string();
        let candidate = ollamacron_node_core::registry::Candidate {
            service,
            region: None,
            inputs: ollamacron_node_core::registry::QualityInputs {
                measured_rtt: Some(Duration::ZERO),
                since_last_good_check: Some(Duration::ZERO),
                ..ollamacron_node_core::registry::QualityInputs::default()
            },
            local: true,
        };
        let query = ServiceQuery {
            region: None,
            ..query.clone()
        };
        ollamacron_node_core::registry::rank_services(
            vec![candidate],
            &query,
            &ollamacron_node_core::registry::ScoreWeights::default(),
        )
        .into_iter()
        .next()
    }

    /// Every service of the mesh that is an Ollama model, best first, and
    /// every model of the local Ollama.
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
        let local_names: Vec<String> = self
            .local
            .as_ref()
            .and_then(LocalOllama::models)
            .map(|snapshot| snapshot.models.into_iter().map(|m| m.name).collect())
            .unwrap_or_default();
        for name in local_names {
            let advertised = all.iter().any(|s| {
                s.local && ollamacron_node_core::registry::same_model(&s.service.name, &name)
            });
            if !advertised && let Some(local) = self.local_model(&name, &ServiceQuery::default()) {
                all.push(local);
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
                "size": s.service.metadata.get(METADATA_SIZE_BYTES).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0),
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
            .get(METADATA_LOADED)
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
    let model = match requested_model(&body) {
        Ok(model) => model,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    // One trace a request (exported with `otlp_endpoint`): routing, the
    // queue, each node tried and the stream, on this node and the serving
    // one.
    let span = tracing::info_span!(
        "gateway.request",
        otel.kind = "server",
        http.route = %path,
        model = %crate::metrics::model_label(&model),
        node = %gateway.node.peer_id(),
        http.status_code = tracing::field::Empty,
    );
    let response =
        tracing::Instrument::instrument(route::route(&gateway, &path, &model, body), span.clone())
            .await;
    span.record("http.status_code", response.status().as_u16());
    response
}

/// The model an Ollama or OpenAI request body names (its `model` field;
/// the rest of the body is skipped, not copied), or what is wrong with
/// the body, as the gateway's 400 answer says it.
///
/// # Errors
/// The body is not a JSON object, or names no model.
pub fn requested_model(body: &[u8]) -> Result<String, String> {
    match serde_json::from_slice::<ModelField<'_>>(body) {
        Ok(ModelField { model: Some(model) }) => Ok(model.into_owned()),
        Ok(ModelField { model: None }) => Err("the body names no \"model\"".to_owned()),
        Err(e) => Err(format!("the body is not JSON: {e}")),
    }
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
