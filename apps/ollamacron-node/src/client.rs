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
        self.send(method, path_and_query, body).await?.json()
    }

    /// Send a request; the answer as the node sent it on 2xx, else the
    /// node's error.
    pub(crate) async fn send(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<Answer> {
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
            return Ok(Answer {
                endpoint: format!("{method} {path_and_query}"),
                status,
                body: bytes,
            });
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

/// A 2xx answer of the node, as it sent it.
pub(crate) struct Answer {
    /// What was asked, e.g. `GET /v1/status`.
    endpoint: String,
    /// 201 for a new service, 200 for a replaced one, 204 for no content.
    pub(crate) status: hyper::StatusCode,
    body: Bytes,
}

impl Answer {
    /// The answer as JSON, `null` when it is empty (204).
    pub(crate) fn json(&self) -> anyhow::Result<serde_json::Value> {
        if self.body.is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_slice(&self.body).context("the node's answer is not JSON")
    }

    /// The answer as one of the API's types, named `what` in errors, read
    /// by `parse` (`|json| serde_json::from_slice(json)`); an empty answer
    /// reads as `null`.
    ///
    /// # Errors
    /// The answer is not `what`: the error names the endpoint, where in
    /// the answer, and what did not parse.
    pub(crate) fn parse<T>(
        &self,
        what: &str,
        parse: impl FnOnce(&[u8]) -> serde_json::Result<T>,
    ) -> anyhow::Result<T> {
        self.read(what, |json| read_json("", json, parse))
    }

    /// [`parse`](Self::parse) with a reader made of [`read_json`]s, for an
    /// answer whose type cannot be read in one go.
    pub(crate) fn read<T>(
        &self,
        what: &str,
        read: impl FnOnce(&[u8]) -> Result<T, ParseError>,
    ) -> anyhow::Result<T> {
        if self.body.is_empty() {
            return read(b"null").map_err(|_| {
                anyhow::anyhow!("{}: the node's answer is empty, not {what}", self.endpoint)
            });
        }
        read(&self.body)
            .with_context(|| format!("{}: the node's answer is not {what}", self.endpoint))
    }
}

/// Where in an answer (`.nat.relays[0]`; empty for the whole answer) a
/// value did not parse, and why.
#[derive(Debug, thiserror::Error)]
#[error("{}{message}", if path.is_empty() { String::new() } else { format!("at `{path}`: ") })]
pub(crate) struct ParseError {
    pub(crate) path: String,
    pub(crate) message: String,
}

/// `json`, the value at `prefix` of an answer, read by `parse`
/// (`|json| serde_json::from_slice(json)`); an error says where it is: at
/// a path when there is one, else at a line and column.
pub(crate) fn read_json<T>(
    prefix: &str,
    json: &[u8],
    parse: impl FnOnce(&[u8]) -> serde_json::Result<T>,
) -> Result<T, ParseError> {
    parse(json).map_err(|e| {
        let path = format!("{prefix}{}", path_at(json, error_offset(json, &e)));
        let mut message = e.to_string();
        if !path.is_empty() {
            // The line and column are of `json`, which may be part of the answer.
            let position = format!(" at line {} column {}", e.line(), e.column());
            if let Some(m) = message.strip_suffix(&position) {
                message = m.to_owned();
            }
        }
        ParseError { path, message }
    })
}

/// The byte offset in `json` that `error` reports (its line and column);
/// 0 when it reports none.
fn error_offset(json: &[u8], error: &serde_json::Error) -> usize {
    if error.line() == 0 {
        return 0;
    }
    let line_start = if error.line() == 1 {
        0
    } else {
        json.iter()
            .enumerate()
            .filter(|(_, b)| **b == b'\n')
            .nth(error.line() - 2)
            .map_or(json.len(), |(i, _)| i + 1)
    };
    line_start.saturating_add(error.column()).min(json.len())
}

/// The path (`.nat.relays[0]`) of the value `json` is in the middle of at
/// byte `offset`: the keys and indices of the objects and arrays open there.
fn path_at(json: &[u8], offset: usize) -> String {
    enum Open {
        /// An object, with the key being read (none before the first).
        Object(Option<String>),
        /// An array, with the index being read.
        Array(usize),
    }
    let end = offset.min(json.len());
    let mut open: Vec<Open> = Vec::new();
    // Inside an object, at the start or after a comma: a string is a key.
    let mut key_next = false;
    let mut i = 0;
    while i < end {
        match json[i] {
            b'"' => {
                let start = i;
                i += 1;
                while i < end && json[i] != b'"' {
                    i += if json[i] == b'\\' { 2 } else { 1 };
                }
                if key_next && let Some(Open::Object(key)) = open.last_mut() {
                    let raw = &json[start..(i + 1).min(end)];
                    *key = Some(serde_json::from_slice(raw).unwrap_or_else(|_| {
                        String::from_utf8_lossy(raw).trim_matches('"').to_owned()
                    }));
                }
                key_next = false;
            }
            b'{' => {
                open.push(Open::Object(None));
                key_next = true;
            }
            b'[' => open.push(Open::Array(0)),
            b'}' | b']' => {
                open.pop();
                key_next = false;
            }
            b',' => match open.last_mut() {
                Some(Open::Object(_)) => key_next = true,
                Some(Open::Array(index)) => *index += 1,
                None => {}
            },
            _ => {}
        }
        i += 1;
    }
    open.iter()
        .map(|o| match o {
            Open::Object(Some(key)) => format!(".{key}"),
            Open::Object(None) => String::new(),
            Open::Array(index) => format!("[{index}]"),
        })
        .collect()
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code

    use ollamacron_node_core::{NodeStatus, PeerInfo};

    use super::*;

    const STATUS: &str = r#"{"peer_id":"12D3KooWAf3JtkEWALnUhiyWVZFspkm78WeUM8vCWLBD72EQovKZ","state":"running","version":"0.1.0","uptime_secs":7.028628988,"listen_addrs":["/ip4/127.0.0.1/tcp/19402"],"external_addrs":[],"reachability":"unknown","nat":{"relays":[],"relay_service":false,"circuits_served":0,"hole_punch":{"attempts":0,"succeeded":0,"failed":0}},"connections":{"peers":1,"inbound":0,"outbound":1},"discovery":{"sources":[{"source":"mdns","enabled":false,"active":false,"detail":"off (enable_mdns: false)"}],"stats":[["mdns",{"peers_discovered":0,"connection_failures":0,"successful_connections":0,"peers_lost":0}],["dht",{"peers_discovered":1,"connection_failures":0,"successful_connections":0,"peers_lost":0}]],"known_peers":1,"dht_routing_table_size":1,"dht_providers":1},"services":{"local":0,"remote":1,"nodes":1},"http":{"gateway":null,"api":{"listen":"127.0.0.1:19302","beyond_loopback":false,"requires_key":false,"open_to_network":false}}}"#;

    /// Where reading `json` (STATUS with `from` replaced by `to`) as `T` fails.
    fn failure<T: std::fmt::Debug>(
        json: &str,
        parse: impl FnOnce(&[u8]) -> serde_json::Result<T>,
    ) -> ParseError {
        read_json("", json.as_bytes(), parse).unwrap_err()
    }

    fn status_with(from: &str, to: &str) -> String {
        assert!(STATUS.contains(from), "{from}");
        STATUS.replacen(from, to, 1)
    }

    #[test]
    fn the_api_status_reads_and_failures_say_where() {
        let status: NodeStatus = serde_json::from_str(STATUS).unwrap();
        assert_eq!(status.connections.outbound, 1);
        for (from, to, path, message) in [
            (
                r#""peers":1"#,
                r#""peers":"lots""#,
                ".connections.peers",
                "invalid type: string \"lots\"",
            ),
            (
                r#""relays":[]"#,
                r#""relays":["12D3KooWAf3JtkEWALnUhiyWVZFspkm78WeUM8vCWLBD72EQovKZ","nope"]"#,
                ".nat.relays[1]",
                "expected valid peer id",
            ),
            (
                r#""reachability":"unknown""#,
                r#""reachability":"sideways""#,
                ".reachability",
                "unknown variant `sideways`",
            ),
            (
                r#","failed":0"#,
                "",
                ".nat.hole_punch",
                "missing field `failed`",
            ),
            (
                r#""peers_lost":0}],["dht""#,
                r#""peers_lost":-1}],["dht""#,
                ".discovery.stats[0][1].peers_lost",
                "invalid value: integer `-1`",
            ),
            (
                r#""listen":"127.0.0.1:19302""#,
                r#""listen":"localhost""#,
                ".http.api.listen",
                "invalid socket address",
            ),
            (
                r#""enabled":false,"active":false,"detail":"off (enable_mdns: false)""#,
                r#""detail":"a \"quoted\" {detail}, [with] brackets","enabled":"yes","active":false"#,
                ".discovery.sources[0].enabled",
                "invalid type: string \"yes\"",
            ),
            (
                r#"/ip4/127.0.0.1/tcp/19402"#,
                "/ip4/127.0.0.1/tcp/nope",
                ".listen_addrs[0]",
                "invalid",
            ),
        ] {
            let e = failure(&status_with(from, to), |json| {
                serde_json::from_slice::<NodeStatus>(json)
            });
            assert_eq!(e.path, path, "{e}");
            assert!(e.message.contains(message), "{e}");
            assert!(e.to_string().starts_with(&format!("at `{path}`: ")), "{e}");
        }
        // The whole answer: no path to name.
        let e = failure(r#"{"state":"running"}"#, |json| {
            serde_json::from_slice::<NodeStatus>(json)
        });
        assert_eq!(e.path, "");
        assert!(e.to_string().starts_with("missing field `peer_id`"), "{e}");
        let e = failure("<html>", |json| serde_json::from_slice::<NodeStatus>(json));
        assert!(e.message.starts_with("expected value"), "{e}");
        // Pretty-printed over many lines, and a list.
        let pretty = serde_json::to_string_pretty(
            &serde_json::from_str::<serde_json::Value>(&status_with(
                r#""inbound":0"#,
                r#""inbound":null"#,
            ))
            .unwrap(),
        )
        .unwrap();
        let e = failure(&pretty, |json| serde_json::from_slice::<NodeStatus>(json));
        assert_eq!(e.path, ".connections.inbound", "{e}");
        let e = failure(r#"[{"peer_id":"x"}]"#, |json| {
            serde_json::from_slice::<Vec<PeerInfo>>(json)
        });
        assert_eq!(e.path, "[0].peer_id", "{e}");
    }

    #[test]
    fn paths_survive_cut_and_odd_json() {
        assert_eq!(path_at(br#"{"a":[1,{"b\"c":"#, 100), r#".a[1].b"c"#);
        assert_eq!(path_at(br#"{"a":{"b":1},"c":"#, 17), ".c");
        assert_eq!(path_at(br#"{"ab"#, 4), ".ab");
        assert_eq!(path_at(br#"["\\",["#, 7), "[1][0]");
        assert_eq!(path_at(b"", 3), "");
        assert_eq!(path_at(b"]]}}", 4), "");
    }
}
