//! Helpers for the workspace's multi-node integration tests: loopback node
//! configurations, starting nodes, and waiting for events with a deadline.

// A test-support crate: panicking on a broken test setup is the right failure.
#![allow(clippy::panic)]

pub mod browser;
pub mod kad_peer;
pub mod ollama_standin;
pub mod pool;
pub mod probe;
pub mod python;

use std::time::Duration;

use ollamacron_config::{ConfigLoader, NodeConfig};
use ollamacron_node_core::libp2p::identity::Keypair;
use ollamacron_node_core::{Node, NodeError, NodeEvent, NodeHandle};
use tokio::sync::broadcast;

/// How long a test waits for something that should happen at once on loopback.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

/// Listen on TCP only, on an OS-chosen loopback port.
pub const TCP_ONLY: &str = "/ip4/127.0.0.1/tcp/0";
/// Listen on QUIC only, on an OS-chosen loopback port.
pub const QUIC_ONLY: &str = "/ip4/127.0.0.1/udp/0/quic-v1";

/// A configuration for a test node: loopback only, mDNS off, no HTTP API,
/// plus any `key=value` overrides.
///
/// # Panics
/// If the overrides do not make a valid configuration.
#[must_use]
pub fn loopback_config(listen: &str, overrides: &[(&str, &str)]) -> NodeConfig {
    let mut loader = ConfigLoader::new()
        .set("listen", listen)
        .set("enable_mdns", "false")
        .set("enable_metrics", "false")
        .set("shutdown_timeout", "5s");
    for (key, value) in overrides {
        loader = loader.set(*key, *value);
    }
    match loader.load() {
        Ok(config) => config,
        Err(e) => panic!("test configuration is invalid: {e}"),
    }
}

/// Start a node with a fresh in-memory identity.
///
/// # Errors
/// Whatever `Node::start` returns.
pub async fn start(config: NodeConfig) -> Result<NodeHandle, NodeError> {
    let api = config.enable_metrics.then(|| config.clone());
    let node = Node::new(config)
        .with_keypair(Keypair::generate_ed25519())
        .start()
        .await?;
    // The API sits on top of the node, started by whoever starts it (as
    // the binary does).
    if let Some(config) = api
        && let Err(e) = ollamacron_node_core::start_api(&node, &config).await
    {
        let _ = node.shutdown().await;
        return Err(e);
    }
    Ok(node)
}

/// Wait for the first event matching `pred`, for at most [`EVENT_TIMEOUT`].
///
/// # Errors
/// A description of what was awaited when the deadline passes or the bus closes.
pub async fn wait_for_event<T>(
    events: &mut broadcast::Receiver<NodeEvent>,
    what: &str,
    mut pred: impl FnMut(&NodeEvent) -> Option<T>,
) -> Result<T, String> {
    let wait = async {
        loop {
            match events.recv().await {
                Ok(event) => {
                    if let Some(found) = pred(&event) {
                        return Ok(found);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(format!("event bus closed while waiting for {what}"));
                }
            }
        }
    };
    tokio::time::timeout(EVENT_TIMEOUT, wait)
        .await
        .map_err(|_| format!("timed out after {EVENT_TIMEOUT:?} waiting for {what}"))?
}

/// How often `eventually` re-checks its condition.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Re-check `check` every [`POLL_INTERVAL`] until it returns `Some`, for at
/// most [`EVENT_TIMEOUT`].
///
/// # Errors
/// A description of what was awaited when the deadline passes.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    eventually_within(EVENT_TIMEOUT, what, check).await
}

/// [`eventually`] with another deadline.
///
/// # Errors
/// A description of what was awaited when the deadline passes.
pub async fn eventually_within<T, F, Fut>(
    timeout: Duration,
    what: &str,
    mut check: F,
) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let poll = async {
        loop {
            if let Some(v) = check().await {
                return v;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    };
    tokio::time::timeout(timeout, poll)
        .await
        .map_err(|_| format!("timed out after {timeout:?} waiting for {what}"))
}

/// Wait until `node`'s lookup of `query` finds something, for at most
/// [`EVENT_TIMEOUT`]; what it found.
///
/// # Errors
/// A description of what was awaited when the deadline passes.
pub async fn eventually_found(
    node: &NodeHandle,
    query: &ollamacron_service_registry::ServiceQuery,
    what: &str,
) -> Result<Vec<ollamacron_service_registry::RankedService>, String> {
    eventually(what, || {
        let (node, query) = (node.clone(), query.clone());
        async move {
            node.find_services(query)
                .await
                .ok()
                .filter(|found| !found.is_empty())
        }
    })
    .await
}

/// The value of the first line of `node`'s metrics that starts with
/// `prefix` (a name with its labels), or 0 when there is none yet.
#[must_use]
pub fn metric_value(node: &NodeHandle, prefix: &str) -> f64 {
    node.metrics_text()
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// The body of a `Transfer-Encoding: chunked` response, joined.
fn dechunk(mut rest: &str) -> Result<String, String> {
    let mut body = String::new();
    loop {
        let (size, after) = rest
            .split_once("\r\n")
            .ok_or_else(|| format!("a chunk without a size line: {rest:?}"))?;
        let size = usize::from_str_radix(size.trim(), 16)
            .map_err(|e| format!("bad chunk size {size:?}: {e}"))?;
        if size == 0 {
            return Ok(body);
        }
        let chunk = after
            .get(..size)
            .ok_or_else(|| format!("a chunk cut short: {after:?}"))?;
        body.push_str(chunk);
        rest = after
            .get(size..)
            .and_then(|r| r.strip_prefix("\r\n"))
            .ok_or_else(|| "a chunk without its line end".to_owned())?;
    }
}

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// The header lines, as sent.
    pub headers: String,
    /// The body.
    pub body: String,
}

impl HttpResponse {
    /// The body as JSON.
    ///
    /// # Panics
    /// If it is not JSON.
    #[must_use]
    pub fn json(&self) -> serde_json::Value {
        match serde_json::from_str(&self.body) {
            Ok(v) => v,
            Err(e) => panic!("not JSON ({e}): {self:?}"),
        }
    }

    /// The message of a JSON error answer (`{"error": "…"}`), after checking
    /// it came with `status` and a JSON content type.
    ///
    /// # Panics
    /// If the status, the content type or the error is not what an error
    /// answer has.
    #[must_use]
    pub fn error_message(&self, status: u16) -> String {
        assert_eq!(self.status, status, "{self:?}");
        assert!(
            self.headers
                .to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{self:?}"
        );
        let body = self.json();
        let message = body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error in {body}"));
        assert!(!message.is_empty(), "{body}");
        message.to_owned()
    }
}

/// One HTTP/1.1 request to `addr` (`Connection: close`), with an optional
/// JSON body, answered within [`EVENT_TIMEOUT`].
///
/// # Errors
/// When the connection fails or the answer is not HTTP.
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<HttpResponse, String> {
    http_request_with(addr, method, path, &[], body).await
}

/// [`http_request`] with more header lines (`Host` among them replaces
/// the address).
///
/// # Errors
/// When the connection fails or the answer is not HTTP.
pub async fn http_request_with(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<HttpResponse, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
        let mut request = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
        if !headers
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("host"))
        {
            request.push_str(&format!("Host: {addr}\r\n"));
        }
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        if let Some(body) = body {
            request.push_str(&format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            ));
        }
        request.push_str("\r\n");
        let mut bytes = request.into_bytes();
        bytes.extend_from_slice(body.unwrap_or_default());
        stream.write_all(&bytes).await.map_err(|e| e.to_string())?;
        let mut response = Vec::new();
        stream
            .read_to_end(&mut response)
            .await
            .map_err(|e| e.to_string())?;
        let response = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = response
            .split_once("\r\n\r\n")
            .ok_or_else(|| format!("not an HTTP response: {response:?}"))?;
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status in {head:?}"))?;
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        let body = if chunked {
            dechunk(body)?
        } else {
            body.to_owned()
        };
        Ok(HttpResponse {
            status,
            headers: head.to_owned(),
            body,
        })
    };
    tokio::time::timeout(EVENT_TIMEOUT, exchange)
        .await
        .map_err(|_| format!("no answer from {addr} within {EVENT_TIMEOUT:?}"))?
}
