//! The few Ollama endpoints we read, with bounded answers.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::{OllamaEndpoint, OllamaError};

/// Largest answer read from Ollama (a `/api/show` carries the model's
/// template and license).
pub const MAX_RESPONSE_BYTES: usize = 8 * 1024 * 1024;

/// `GET /api/version`.
#[derive(Debug, Clone, Deserialize)]
pub struct VersionResponse {
    /// Ollama's version.
    pub version: String,
}

/// `GET /api/tags` and `GET /api/ps`.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelList {
    /// The models.
    #[serde(default)]
    pub models: Vec<ListedModel>,
}

/// One model in `/api/tags` or `/api/ps`.
#[derive(Debug, Clone, Deserialize)]
pub struct ListedModel {
    /// Name with tag (`llama3:8b`).
    pub name: String,
    /// Size in bytes (on disk for tags, in memory for ps).
    #[serde(default)]
    pub size: u64,
    /// Content digest.
    #[serde(default)]
    pub digest: String,
    /// Family, size and quantization.
    #[serde(default)]
    pub details: ModelDetails,
}

/// `details` of a model.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ModelDetails {
    /// Model family (`llama`, `bert`, …).
    #[serde(default)]
    pub family: String,
    /// Parameter count as Ollama writes it (`8.0B`).
    #[serde(default)]
    pub parameter_size: String,
    /// Quantization (`Q4_0`).
    #[serde(default)]
    pub quantization_level: String,
}

/// `POST /api/show`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ShowResponse {
    /// What the model can do (`completion`, `embedding`, `vision`, `tools`, …).
    #[serde(default)]
    pub capabilities: Vec<String>,
    /// Architecture facts, e.g. `<arch>.context_length`.
    #[serde(default)]
    pub model_info: BTreeMap<String, serde_json::Value>,
}

/// A client of one Ollama server.
#[derive(Debug, Clone)]
pub struct OllamaClient {
    endpoint: OllamaEndpoint,
    http: Client<HttpConnector, Full<Bytes>>,
    timeout: Duration,
}

impl OllamaClient {
    /// A client of `endpoint` whose requests give up after `timeout`.
    #[must_use]
    pub fn new(endpoint: OllamaEndpoint, timeout: Duration) -> Self {
        Self {
            endpoint,
            http: ollamacron_http::http_client(),
            timeout,
        }
    }

    /// The server this client asks.
    #[must_use]
    pub fn endpoint(&self) -> &OllamaEndpoint {
        &self.endpoint
    }

    /// `GET /api/version`.
    ///
    /// # Errors
    /// Unreachable, an error status, a timeout, or an answer that is not
    /// the expected JSON.
    pub async fn version(&self) -> Result<VersionResponse, OllamaError> {
        self.json("GET", "/api/version", None).await
    }

    /// `GET /api/tags`: the models on disk.
    ///
    /// # Errors
    /// As [`OllamaClient::version`].
    pub async fn tags(&self) -> Result<ModelList, OllamaError> {
        self.json("GET", "/api/tags", None).await
    }

    /// `GET /api/ps`: the models loaded in memory.
    ///
    /// # Errors
    /// As [`OllamaClient::version`].
    pub async fn ps(&self) -> Result<ModelList, OllamaError> {
        self.json("GET", "/api/ps", None).await
    }

    /// `POST /api/show` for `model`.
    ///
    /// # Errors
    /// As [`OllamaClient::version`].
    pub async fn show(&self, model: &str) -> Result<ShowResponse, OllamaError> {
        let body = serde_json::json!({ "model": model }).to_string();
        self.json("POST", "/api/show", Some(body)).await
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<T, OllamaError> {
        let url = self.endpoint.url(path);
        let failed = |reason: String| OllamaError::Request {
            url: url.clone(),
            reason,
        };
        let mut request = hyper::Request::builder().method(method).uri(&url);
        if body.is_some() {
            request = request.header("content-type", "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| failed(e.to_string()))?;
        let exchange = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| failed(error_chain(&e)))?;
            let status = response.status();
            let bytes = Limited::new(response.into_body(), MAX_RESPONSE_BYTES)
                .collect()
                .await
                .map_err(|e| failed(format!("reading the answer: {e}")))?
                .to_bytes();
            Ok::<_, OllamaError>((status, bytes))
        };
        let (status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| failed(format!("no answer within {:?}", self.timeout)))??;
        if !status.is_success() {
            let detail = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_owned))
                .unwrap_or_default();
            return Err(failed(
                format!("HTTP {status} {detail}").trim_end().to_owned(),
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| failed(format!("unexpected answer: {e}")))
    }
}

/// An error with its sources, `a: b: c`.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
