//! The node's local HTTP API on `api_listen`: status, peers, services,
//! `/metrics` and `/healthz`. Every error is JSON (`{"error": …, "field":
//! …}`) with a 4xx status naming what was wrong; nothing a client sends
//! makes it panic or answer 500 (only a registration the node cannot save
//! to its registration file does, naming the file).

use std::collections::BTreeMap;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ollamacron_service_registry::{ServiceInfo, ServiceQuery};
use serde::Serialize;
use std::net::SocketAddr;

use ollamacron_config::NodeConfig;
use ollamacron_http::{AccessPolicy, HttpLimits};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::dashboard::{self, DASHBOARD_PATHS};
use crate::error::NodeError;
use crate::metrics::MetricsEndpoint;
use crate::node::{NodeHandle, WeakNodeHandle};
use crate::state::NodeState;

const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Largest request body accepted (a service description is far smaller).
pub const MAX_BODY_BYTES: usize = 64 * 1024;
/// Longest accepted query parameter value, in bytes.
pub const MAX_QUERY_VALUE_BYTES: usize = 256;
/// Most values of one repeatable query parameter (`tag`, `capability`).
pub const MAX_QUERY_VALUES: usize = 32;
/// Largest `limit` a lookup may ask for.
pub const MAX_LOOKUP_LIMIT: usize = 10_000;

#[derive(Clone)]
struct ApiState {
    metrics: MetricsEndpoint,
    state: watch::Receiver<NodeState>,
    node: WeakNodeHandle,
}

impl ApiState {
    fn node(&self) -> Result<NodeHandle, ApiError> {
        self.node.upgrade().ok_or_else(|| ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: NodeError::NotRunning.to_string(),
            field: None,
        })
    }
}

/// A JSON error: the status, what is wrong, and the field when one is to blame.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
    field: Option<String>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl ApiError {
    fn bad_request(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            field: Some(field.into()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: &self.message,
            field: self.field.as_deref(),
        };
        (self.status, axum::Json(body)).into_response()
    }
}

impl From<NodeError> for ApiError {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::Service { message, field } => Self {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                message,
                field: field.map(str::to_owned),
            },
            NodeError::Registration(e) => Self {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                message: e.to_string(),
                field: None,
            },
            other => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: other.to_string(),
                field: None,
            },
        }
    }
}

fn router(state: ApiState) -> Router {
    Router::new()
        .route("/", get(dashboard::index))
        .route("/dashboard.js", get(dashboard::script))
        .route("/dashboard.css", get(dashboard::style))
        .route("/metrics", get(serve_metrics))
        .route("/healthz", get(serve_health))
        .route("/v1/status", get(status))
        .route("/v1/peers", get(peers))
        .route("/v1/models", get(models))
        .route("/v1/services", get(find_services).post(register_service))
        .route("/v1/services/local", get(local_services))
        .route(
            "/v1/services/{id}",
            axum::routing::delete(unregister_service),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint; the API has GET / (the dashboard), /v1/status, /v1/peers, /v1/models, /v1/services (and POST), /v1/services/local, DELETE /v1/services/{id}, /healthz and /metrics".to_owned(),
        field: None,
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: "method not allowed on this endpoint".to_owned(),
        field: None,
    }
}

async fn serve_metrics(State(api): State<ApiState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)],
        api.metrics.encode(),
    )
}

async fn serve_health(State(api): State<ApiState>) -> impl IntoResponse {
    let state = *api.state.borrow();
    let status = if state == NodeState::Running {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, format!("{state}\n"))
}

fn no_query(raw: Option<&str>) -> Result<(), ApiError> {
    match raw.and_then(|q| form_urlencoded::parse(q.as_bytes()).next()) {
        Some((name, _)) => Err(ApiError::bad_request(
            name.clone(),
            format!("unknown query parameter `{name}`; this endpoint takes none"),
        )),
        None => Ok(()),
    }
}

async fn status(
    State(api): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    no_query(raw.as_deref())?;
    Ok(axum::Json(api.node()?.status().await?))
}

async fn peers(
    State(api): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    no_query(raw.as_deref())?;
    Ok(axum::Json(api.node()?.peers().await?))
}

async fn models(
    State(api): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    no_query(raw.as_deref())?;
    Ok(axum::Json(api.node()?.models().await?))
}

async fn local_services(
    State(api): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    no_query(raw.as_deref())?;
    Ok(axum::Json(api.node()?.local_services_with_origin().await?))
}

/// `type`, `tag`…, `capability`…, `region`, `min_reliability`,
/// `max_latency` (ms) and `limit`, each checked, into a query.
fn parse_service_query(raw: Option<&str>) -> Result<ServiceQuery, ApiError> {
    let mut query = ServiceQuery::default();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for (name, value) in form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        let name = name.into_owned();
        let value = value.into_owned();
        let count = seen.entry(name.clone()).or_default();
        *count += 1;
        if value.len() > MAX_QUERY_VALUE_BYTES {
            return Err(ApiError::bad_request(
                name,
                format!(
                    "is {} bytes long; at most {MAX_QUERY_VALUE_BYTES}",
                    value.len()
                ),
            ));
        }
        let single = |count: usize, name: &str| {
            if count > 1 {
                Err(ApiError::bad_request(
                    name,
                    format!("`{name}` given more than once"),
                ))
            } else {
                Ok(())
            }
        };
        let number = |name: &str, value: &str| -> Result<f64, ApiError> {
            value
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| {
                    ApiError::bad_request(name, format!("`{value}` is not a number >= 0"))
                })
        };
        match name.as_str() {
            "type" => {
                single(*count, &name)?;
                query.service_type = Some(value);
            }
            "model" => {
                single(*count, &name)?;
                query.model = Some(value);
            }
            "tag" | "capability" => {
                if *count > MAX_QUERY_VALUES {
                    return Err(ApiError::bad_request(
                        name,
                        format!("at most {MAX_QUERY_VALUES} values"),
                    ));
                }
                if name == "tag" {
                    query.tags.push(value);
                } else {
                    query.capabilities.push(value);
                }
            }
            "region" => {
                single(*count, &name)?;
                query.region = Some(value);
            }
            "min_reliability" => {
                single(*count, &name)?;
                let r = number(&name, &value)?;
                if r > 1.0 {
                    return Err(ApiError::bad_request(name, "must be between 0 and 1"));
                }
                query.min_reliability = Some(r);
            }
            "max_latency" => {
                single(*count, &name)?;
                query.max_latency_ms = Some(number(&name, &value)?);
            }
            "limit" => {
                single(*count, &name)?;
                let limit = value
                    .parse::<usize>()
                    .ok()
                    .filter(|l| *l <= MAX_LOOKUP_LIMIT)
                    .ok_or_else(|| {
                        ApiError::bad_request(
                            "limit",
                            format!("`{value}` is not a whole number from 0 to {MAX_LOOKUP_LIMIT}"),
                        )
                    })?;
                query.limit = Some(limit);
            }
            _ => {
                return Err(ApiError::bad_request(
                    name.clone(),
                    format!(
                        "unknown query parameter `{name}`; use type, model, tag, capability, region, \
                         min_reliability, max_latency, limit"
                    ),
                ));
            }
        }
    }
    Ok(query)
}

async fn find_services(
    State(api): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> Result<impl IntoResponse, ApiError> {
    let query = parse_service_query(raw.as_deref())?;
    Ok(axum::Json(api.node()?.find_services(query).await?))
}

async fn register_service(
    State(api): State<ApiState>,
    RawQuery(raw): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    no_query(raw.as_deref())?;
    let body = body.map_err(|e| ApiError {
        status: e.status(),
        message: format!("cannot read the body: {}", e.body_text()),
        field: None,
    })?;
    let mut deserializer = serde_json::Deserializer::from_slice(&body);
    let mut service: ServiceInfo =
        serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
            let path = e.path().to_string();
            // A syntax error has no field to blame (the path is `.` or `?`).
            let field = (path != "." && path != "?").then_some(path);
            ApiError {
                status: StatusCode::BAD_REQUEST,
                message: format!("invalid service JSON: {}", e.inner()),
                field,
            }
        })?;
    if service.id.is_empty() {
        service.id.clone_from(&service.name);
    }
    if !service.peer_id.is_empty() && service.peer_id != api.node()?.peer_id().to_string() {
        return Err(ApiError::bad_request(
            "peer_id",
            "names another node; leave it out (the node fills in its own)",
        ));
    }
    let node = api.node()?;
    let id = service.id.clone();
    let existed = node.local_services().await?.iter().any(|s| s.id == id);
    node.register_service(service).await?;
    let stored = node
        .local_services()
        .await?
        .into_iter()
        .find(|s| s.id == id);
    let status = if existed {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, axum::Json(stored)).into_response())
}

async fn unregister_service(
    State(api): State<ApiState>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    if api.node()?.unregister_service(&id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("no local service with id `{id}`"),
            field: Some("id".to_owned()),
        })
    }
}

/// The timeouts and connection cap of both HTTP servers of a node (the
/// gateway and the API), from `http_*`.
#[must_use]
pub fn http_limits(config: &NodeConfig) -> HttpLimits {
    HttpLimits {
        header_read_timeout: config.http_header_read_timeout,
        body_read_timeout: config.http_body_read_timeout,
        idle_timeout: config.http_idle_timeout,
        max_connections: config.http_max_connections,
    }
}

/// Who may use the gateway listening on `listen`: `gateway_allowed_hosts`,
/// the default origins plus `gateway_allowed_origins` and `ollama_origins`
/// (the value of `OLLAMA_ORIGINS`, comma-separated, as Ollama reads it),
/// and the gateway's keys; `GET /` needs no key.
///
/// # Errors
/// `gateway_api_key_file` cannot be read or holds a line that is no key.
pub fn gateway_access(
    config: &NodeConfig,
    listen: SocketAddr,
    ollama_origins: Option<&str>,
) -> Result<AccessPolicy, NodeError> {
    let mut origins = config.gateway_allowed_origins.clone();
    origins.extend(
        ollama_origins
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|o| !o.is_empty())
            .map(str::to_owned),
    );
    let keys = config.gateway_access_keys();
    access(AccessSettings {
        name: "gateway",
        listen,
        hosts: ("gateway_allowed_hosts", &config.gateway_allowed_hosts),
        origins: ("gateway_allowed_origins (or OLLAMA_ORIGINS)", &origins),
        keys: ("gateway_api_keys", keys),
        open_paths: &["/"],
    })
}

/// Who may use the API listening on `listen`; `/healthz` and the
/// dashboard's assets (which hold no data) need no key.
fn api_access(config: &NodeConfig, listen: SocketAddr) -> Result<AccessPolicy, NodeError> {
    access(AccessSettings {
        name: "API",
        listen,
        hosts: ("api_allowed_hosts", &config.api_allowed_hosts),
        origins: ("api_allowed_origins", &config.api_allowed_origins),
        keys: ("api_keys", config.api_access_keys()),
        open_paths: &[
            "/healthz",
            DASHBOARD_PATHS[0],
            DASHBOARD_PATHS[1],
            DASHBOARD_PATHS[2],
        ],
    })
}

/// One server's access settings, each with the name it is configured by.
struct AccessSettings<'a> {
    name: &'static str,
    listen: SocketAddr,
    hosts: (&'static str, &'a [String]),
    origins: (&'static str, &'a [String]),
    keys: (
        &'static str,
        Result<Vec<String>, ollamacron_config::ValidationError>,
    ),
    open_paths: &'a [&'static str],
}

fn access(settings: AccessSettings<'_>) -> Result<AccessPolicy, NodeError> {
    let (keys_setting, keys) = settings.keys;
    let keys = keys.map_err(|e| NodeError::Config(vec![e]))?;
    Ok(AccessPolicy::new(settings.name, settings.listen)
        .with_hosts(settings.hosts.0, settings.hosts.1)
        .with_origins(settings.origins.0, settings.origins.1)
        .with_keys(keys_setting, &keys)
        .with_open_paths(settings.open_paths))
}

/// The node's HTTP API (status, peers, services, lookups, `/metrics`),
/// bound and checked, ready to serve a node. It sits on top of the
/// handle: whoever starts the node binds it (before the node starts, so a
/// client that sees the node running finds the API's port open) and
/// serves it once the node runs.
#[derive(Debug)]
pub struct ApiListener {
    listener: TcpListener,
    policy: AccessPolicy,
    limits: HttpLimits,
    local: SocketAddr,
}

impl ApiListener {
    /// Bind `api_listen` and check the API's access settings.
    ///
    /// # Errors
    /// [`NodeError::ApiListen`] when the address cannot be bound;
    /// `api_key_file` cannot be read or holds a line that is no key.
    pub async fn bind(config: &NodeConfig) -> Result<Self, NodeError> {
        let addr = config.api_listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| NodeError::ApiListen { addr, source })?;
        let local = listener
            .local_addr()
            .map_err(|source| NodeError::ApiListen { addr, source })?;
        let policy = api_access(config, local)?;
        if policy.beyond_loopback() && !policy.requires_key() {
            tracing::warn!(api_listen = %local, "the HTTP API listens beyond loopback without a key: anyone who reaches it can register services; set api_keys");
        }
        Ok(Self {
            listener,
            policy,
            limits: http_limits(config),
            local,
        })
    }

    /// The bound address.
    #[must_use]
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Serve `node`'s API until the node stops; returns the bound address,
    /// also shown by [`NodeHandle::api_addr`] from now on.
    pub fn serve(self, node: &NodeHandle) -> SocketAddr {
        let Self {
            listener,
            policy,
            limits,
            local,
        } = self;
        let state = node.state_watch();
        let mut until = state.clone();
        let app = policy.apply(router(ApiState {
            metrics: node.metrics_endpoint(),
            state,
            node: node.downgrade(),
        }));
        tokio::spawn(async move {
            let stopped = async move {
                let _ = until.wait_for(|s| s.is_terminal()).await;
            };
            ollamacron_http::serve(listener, app, limits, stopped).await;
        });
        node.set_api_addr(local);
        tracing::info!(addr = %local, "serving the HTTP API at http://{local}/v1/status (metrics at /metrics)");
        local
    }
}

/// Bind `api_listen` and serve `node`'s HTTP API until the node stops
/// ([`ApiListener::bind`], then [`ApiListener::serve`]).
///
/// # Errors
/// As [`ApiListener::bind`].
pub async fn start_api(node: &NodeHandle, config: &NodeConfig) -> Result<SocketAddr, NodeError> {
    Ok(ApiListener::bind(config).await?.serve(node))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse_and_refuse_by_name() {
        let q = parse_service_query(Some(
            "type=llm&model=llama3:8b&tag=gpu&tag=fast&capability=tools&region=eu&min_reliability=0.5&max_latency=200&limit=3",
        ))
        .unwrap();
        assert_eq!(q.service_type.as_deref(), Some("llm"));
        assert_eq!(q.model.as_deref(), Some("llama3:8b"));
        assert_eq!(q.tags, ["gpu", "fast"]);
        assert_eq!(q.capabilities, ["tools"]);
        assert_eq!(q.limit, Some(3));
        for (raw, field) in [
            ("colour=red", "colour"),
            ("limit=-1", "limit"),
            ("limit=lots", "limit"),
            ("min_reliability=2", "min_reliability"),
            ("max_latency=NaN", "max_latency"),
            ("type=a&type=b", "type"),
        ] {
            let e = parse_service_query(Some(raw)).unwrap_err();
            assert_eq!(e.field.as_deref(), Some(field), "{raw}: {e:?}");
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
        }
        let long = format!("type={}", "x".repeat(MAX_QUERY_VALUE_BYTES + 1));
        assert_eq!(
            parse_service_query(Some(&long))
                .unwrap_err()
                .field
                .as_deref(),
            Some("type")
        );
    }
}
