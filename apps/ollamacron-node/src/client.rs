//! The CLI's side of the local HTTP API: requests to a running node, and
//! errors that say what to do when there is none.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;

/// Longest a CLI request to the local node may take (a lookup answers
/// within the node's `lookup_timeout`, 5 s by default).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A running node's API at `api_listen`.
pub(crate) struct ApiClient {
    addr: SocketAddr,
    /// Sent as `Authorization: Bearer <key>` (the first of `api_keys`).
    key: Option<String>,
    client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

/// The API answered with an error.
#[derive(Debug, thiserror::Error)]
#[error("the node refused: {message}{}", field.as_ref().map(|f| format!(" (field `{f}`)")).unwrap_or_default())]
pub(crate) struct ApiRefusal {
    pub(crate) message: String,
    pub(crate) field: Option<String>,
}

impl ApiClient {
    pub(crate) fn new(addr: SocketAddr, key: Option<String>) -> Self {
        Self {
            addr,
            key,
            client: ollamacron_node_core::http_server::http_client(),
        }
    }

    /// Send a request; the JSON answer on 2xx (`null` for 204), else the
    /// node's error.
    pub(crate) async fn call(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        self.call_with_status(method, path_and_query, body)
            .await
            .map(|(_, json)| json)
    }

    /// [`call`](Self::call), with the status of a 2xx answer (201 for a
    /// new service, 200 for a replaced one).
    pub(crate) async fn call_with_status(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<(hyper::StatusCode, serde_json::Value)> {
        let url = format!("http://{}{path_and_query}", self.addr);
        let mut request = hyper::Request::builder()
            .method(method)
            .uri(&url)
            .header("accept", "application/json");
        if let Some(key) = &self.key {
            request = request.header("authorization", format!("Bearer {key}"));
        }
        let body = match body {
            Some(json) => {
                request = request.header("content-type", "application/json");
                Full::new(Bytes::from(json.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let request = request.body(body).context("cannot build the request")?;
        let response = tokio::time::timeout(REQUEST_TIMEOUT, self.client.request(request))
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "the node at http://{} did not answer within {}s",
                    self.addr,
                    REQUEST_TIMEOUT.as_secs()
                )
            })?
            .map_err(|e| {
                anyhow::anyhow!(
                    "no node is running at http://{} (api_listen): {}; start one with \
                     `ollamacron-node run`, or point --api-listen or --config at the running \
                     node's API",
                    self.addr,
                    connect_reason(&e)
                )
            })?;
        let status = response.status();
        let bytes = response
            .into_body()
            .collect()
            .await
            .context("the node's answer was cut off")?
            .to_bytes();
        if status.is_success() {
            if bytes.is_empty() {
                return Ok((status, serde_json::Value::Null));
            }
            let json = serde_json::from_slice(&bytes).context("the node's answer is not JSON")?;
            return Ok((status, json));
        }
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        Err(ApiRefusal {
            message: body["error"]
                .as_str()
                .map_or_else(|| format!("HTTP {status}"), str::to_owned),
            field: body["field"].as_str().map(str::to_owned),
        }
        .into())
    }
}

fn connect_reason(e: &hyper_util::client::legacy::Error) -> String {
    let mut source: Option<&dyn std::error::Error> = std::error::Error::source(e);
    let mut last = e.to_string();
    while let Some(s) = source {
        last = s.to_string();
        source = s.source();
    }
    last
}
