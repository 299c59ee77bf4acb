//! A pool for gateway tests and benches: nodes on loopback, each with a
//! stand-in Ollama whose models it advertises and serves to peers, and
//! gateways served as the node binary serves them.

use std::net::SocketAddr;
use std::time::Duration;

use ollamacron_gateway::{
    GatewayServer, InferenceLoad, LocalOllama, OllamaAdvertiser, ServeLimits, serve_inference,
};
use ollamacron_node_core::NodeHandle;
use ollamacron_node_core::registry::ServiceQuery;
use ollamacron_ollama::{OllamaClient, OllamaEndpoint, OllamaWatcher, WatchConfig};

use crate::ollama_standin::{StandInModels, StandInOllama, tag};
use crate::{TCP_ONLY, eventually, loopback_config, start};

/// What a pool member serves for peers unless a test says otherwise.
pub const SERVE_LIMITS: ServeLimits = ServeLimits {
    total: 8,
    per_peer: 8,
    max_request_bytes: 100 * 1024 * 1024,
};

/// How long a member's gateway waits for a serving node's first byte.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(30);

/// One node of the pool, with its stand-in Ollama.
pub struct Member {
    /// The node.
    pub node: NodeHandle,
    /// Its Ollama.
    pub ollama: StandInOllama,
    /// Watches its Ollama, as the node binary's does.
    watcher: OllamaWatcher,
}

impl Member {
    /// Its Ollama, for this node's gateway.
    ///
    /// # Panics
    /// Never: the stand-in's address is an `ip:port`.
    #[must_use]
    pub fn local(&self) -> LocalOllama {
        LocalOllama::new(endpoint(&self.ollama), FIRST_BYTE_TIMEOUT)
            .with_models(self.watcher.subscribe())
    }

    /// The first address peers can dial it at, for `bootstrap`.
    ///
    /// # Panics
    /// If the node has none.
    pub async fn bootstrap_addr(&self) -> String {
        self.node
            .dialable_addrs()
            .await
            .ok()
            .and_then(|mut a| (!a.is_empty()).then(|| a.remove(0).to_string()))
            .unwrap_or_else(|| panic!("the node has no dialable address"))
    }
}

fn endpoint(ollama: &StandInOllama) -> OllamaEndpoint {
    OllamaEndpoint::parse(&ollama.addr().to_string())
        .unwrap_or_else(|e| panic!("a stand-in address is an endpoint: {e}"))
}

/// A stand-in's `models` (digests and family made up).
#[must_use]
pub fn models(names: &[&str]) -> StandInModels {
    StandInModels {
        models: names
            .iter()
            .map(|m| tag(m, &format!("digest-{m}"), "llama"))
            .collect(),
        ..StandInModels::default()
    }
}

/// A member whose stand-in has `models`.
pub async fn member(names: &[&str], bootstrap: Option<&str>) -> Member {
    member_with(models(names), bootstrap, SERVE_LIMITS).await
}

/// A member with a stand-in serving `models`, bootstrapping from
/// `bootstrap`, serving peers within `limits`.
///
/// # Panics
/// If the node cannot start.
pub async fn member_with(
    models: StandInModels,
    bootstrap: Option<&str>,
    limits: ServeLimits,
) -> Member {
    member_with_settings(models, bootstrap, limits, &[]).await
}

/// [`member_with`] with `settings` of the node's config (`KEY`, `VALUE`).
///
/// # Panics
/// If the node cannot start.
pub async fn member_with_settings(
    models: StandInModels,
    bootstrap: Option<&str>,
    limits: ServeLimits,
    settings: &[(&str, &str)],
) -> Member {
    let ollama = StandInOllama::start(models).await;
    let list = bootstrap.map(|b| format!("[{b}]"));
    let mut overrides = settings.to_vec();
    if let Some(list) = &list {
        overrides.push(("bootstrap", list.as_str()));
    }
    let node = start(loopback_config(TCP_ONLY, &overrides))
        .await
        .unwrap_or_else(|e| panic!("cannot start a pool member: {e}"));
    let watcher = OllamaWatcher::spawn(
        OllamaClient::new(endpoint(&ollama), Duration::from_secs(2)),
        WatchConfig {
            interval: Duration::from_millis(200),
            ..WatchConfig::default()
        },
    );
    tokio::spawn(
        OllamaAdvertiser::new(node.clone())
            .with_limits(limits)
            .run(watcher.subscribe()),
    );
    tokio::spawn(serve_inference(
        node.stream_control(),
        LocalOllama::new(endpoint(&ollama), FIRST_BYTE_TIMEOUT),
        limits,
        InferenceLoad::default(),
    ));
    Member {
        node,
        ollama,
        watcher,
    }
}

/// Serve `node`'s gateway on a free loopback port the way the node binary
/// does (access rules, HTTP limits), with `overrides` of the gateway's and
/// HTTP settings (`gateway_api_keys`, `http_header_read_timeout`, …).
///
/// # Panics
/// If the overrides are invalid or no port can be bound.
pub async fn serve_gateway(
    node: &NodeHandle,
    local: Option<LocalOllama>,
    overrides: &[(&str, &str)],
) -> SocketAddr {
    let timeout = humantime::format_duration(FIRST_BYTE_TIMEOUT).to_string();
    let mut settings = vec![
        ("gateway_listen", "127.0.0.1:0"),
        ("gateway_first_byte_timeout", timeout.as_str()),
    ];
    settings.extend_from_slice(overrides);
    let config = loopback_config(TCP_ONLY, &settings);
    let listener = tokio::net::TcpListener::bind(config.gateway_listen)
        .await
        .unwrap_or_else(|e| panic!("cannot bind a gateway: {e}"));
    let server = GatewayServer::new(listener, node.clone(), local, &config, None)
        .unwrap_or_else(|e| panic!("cannot build the gateway: {e}"));
    let addr = server.local_addr();
    tokio::spawn(server.run());
    addr
}

/// Wait until `node` sees every one of `models` in the mesh.
///
/// # Panics
/// When it does not within the event timeout.
pub async fn sees(node: &NodeHandle, models: &[&str]) {
    let wanted: Vec<String> = models.iter().map(ToString::to_string).collect();
    eventually("every model in the mesh", || {
        let (node, wanted) = (node.clone(), wanted.clone());
        async move {
            let mut found = Vec::new();
            for kind in ["llm", "embedding"] {
                let query = ServiceQuery {
                    service_type: Some(kind.into()),
                    ..ServiceQuery::default()
                };
                found.extend(node.find_services(query).await.ok()?);
            }
            wanted
                .iter()
                .all(|w| found.iter().any(|s| &s.service.name == w))
                .then_some(())
        }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}"));
}
