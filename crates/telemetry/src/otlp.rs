//! Export of `tracing` spans over OTLP/HTTP (protobuf): OpenTelemetry's
//! SDK batches the spans on a thread of its own and sends each batch with
//! hyper on the node's tokio runtime.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use opentelemetry::KeyValue;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider, Tracer};
use tracing_subscriber::registry::LookupSpan;

/// The path of the trace signal under an OTLP/HTTP endpoint.
pub const OTLP_TRACES_PATH: &str = "/v1/traces";

/// Most bytes of a collector's answer read (it is a short status).
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// Where and how spans are exported.
#[derive(Debug, Clone)]
pub struct OtlpSettings {
    /// The collector's OTLP/HTTP endpoint, `http://host:port` (spans go
    /// to its [`OTLP_TRACES_PATH`]) or the full URL ending in it.
    pub endpoint: String,
    /// `service.name` of the exported spans' resource.
    pub service_name: String,
    /// `service.version` of it.
    pub service_version: String,
    /// `service.instance.id` of it: which node (its peer id), when known.
    pub instance_id: Option<String>,
    /// How long spans gather before a batch is sent.
    pub export_interval: Duration,
    /// Longest one export may take (connect, send, answer).
    pub export_timeout: Duration,
}

/// Why spans cannot be exported.
#[derive(Debug, thiserror::Error)]
pub enum OtlpError {
    /// The endpoint is no `http://host:port` URL.
    #[error("otlp_endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// As configured.
        endpoint: String,
        /// What is wrong.
        reason: String,
    },
    /// The exporter refused its settings.
    #[error("cannot build the OTLP exporter: {0}")]
    Exporter(#[source] opentelemetry_otlp::ExporterBuildError),
    /// The last spans were not sent when exporting stopped.
    #[error("the last spans were not exported: {0}")]
    Shutdown(#[source] opentelemetry_sdk::error::OTelSdkError),
}

/// The URL spans are posted to: `endpoint` with [`OTLP_TRACES_PATH`]
/// appended unless it ends in it.
///
/// # Errors
/// Not an `http://` URL with a host (no TLS client is built in: run a
/// collector or agent on the node's machine or network).
pub fn traces_url(endpoint: &str) -> Result<String, OtlpError> {
    let bad = |reason: &str| OtlpError::Endpoint {
        endpoint: endpoint.to_owned(),
        reason: reason.to_owned(),
    };
    let uri: hyper::Uri = endpoint
        .parse()
        .map_err(|e| bad(&format!("not a URL ({e})")))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(bad(
                "https is not supported; export to a collector over http:// (on this machine or a trusted network)",
            ));
        }
        _ => return Err(bad("write it as http://host:port")),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(bad("it names no host"));
    }
    if uri.query().is_some() {
        return Err(bad("it may not have a query"));
    }
    let base = endpoint.trim_end_matches('/');
    Ok(if base.ends_with(OTLP_TRACES_PATH) {
        base.to_owned()
    } else {
        format!("{base}{OTLP_TRACES_PATH}")
    })
}

/// The OpenTelemetry side of the node's traces: install [`OtlpTraces::layer`]
/// in the `tracing` subscriber, and call [`OtlpTraces::shutdown`] before
/// the runtime stops, so the last spans are sent.
#[derive(Debug)]
pub struct OtlpTraces {
    provider: SdkTracerProvider,
}

impl OtlpTraces {
    /// Export to `settings.endpoint`, sending on `runtime`.
    ///
    /// # Errors
    /// The endpoint is not an `http://` URL, or the exporter refuses it.
    pub fn start(
        settings: &OtlpSettings,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, OtlpError> {
        let url = traces_url(&settings.endpoint)?;
        let client = RuntimeClient {
            client: Client::builder(TokioExecutor::new()).build_http(),
            runtime,
            timeout: settings.export_timeout,
            health: Arc::new(ExportHealth::new(url.clone())),
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(client)
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(url)
            .with_timeout(settings.export_timeout)
            .build()
            .map_err(OtlpError::Exporter)?;
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_scheduled_delay(settings.export_interval)
                    .build(),
            )
            .build();
        let mut resource = Resource::builder_empty()
            .with_service_name(settings.service_name.clone())
            .with_attribute(KeyValue::new(
                "service.version",
                settings.service_version.clone(),
            ));
        if let Some(instance) = &settings.instance_id {
            resource =
                resource.with_attribute(KeyValue::new("service.instance.id", instance.clone()));
        }
        let resource = resource.build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(resource)
            .build();
        Ok(Self { provider })
    }

    /// The `tracing` layer that records spans for export.
    #[must_use]
    pub fn layer<S>(&self) -> tracing_opentelemetry::OpenTelemetryLayer<S, Tracer>
    where
        S: tracing::Subscriber + for<'span> LookupSpan<'span>,
    {
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("ollamacron"))
            .with_tracked_inactivity(false)
    }

    /// Send what is left and stop exporting. It blocks until the last
    /// batch is sent (or its timeout passes): call it outside the
    /// runtime's worker threads (`spawn_blocking`), while the runtime runs.
    ///
    /// # Errors
    /// The last export failed or the exporter was already shut down.
    pub fn shutdown(&self) -> Result<(), OtlpError> {
        self.provider.shutdown().map_err(OtlpError::Shutdown)
    }
}

/// hyper on a tokio runtime, for an exporter that runs on a thread of its
/// own: each request is a task on the runtime, awaited from wherever.
#[derive(Debug)]
struct RuntimeClient {
    client: Client<HttpConnector, Full<Bytes>>,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
    health: Arc<ExportHealth>,
}

/// Whether exports reach the collector, so a collector that is down is
/// said once (and its return once), not at every batch. OpenTelemetry's
/// SDK drops a batch it cannot send without a word of its own.
#[derive(Debug)]
struct ExportHealth {
    url: String,
    failing: AtomicBool,
}

/// What one export changed.
#[derive(Debug, PartialEq, Eq)]
enum ExportChange {
    /// Exports began to fail.
    Failing,
    /// They reach the collector again.
    Recovered,
    /// As before.
    Same,
}

impl ExportHealth {
    fn new(url: String) -> Self {
        Self {
            url,
            failing: AtomicBool::new(false),
        }
    }

    fn record(&self, failed: bool) -> ExportChange {
        match (self.failing.swap(failed, Ordering::Relaxed), failed) {
            (false, true) => ExportChange::Failing,
            (true, false) => ExportChange::Recovered,
            _ => ExportChange::Same,
        }
    }

    /// Log what `answer` changed.
    fn report(&self, answer: &Answer) {
        let failure = match answer {
            Ok(response) if response.status().is_success() => None,
            Ok(response) => Some(format!("the collector answered {}", response.status())),
            Err(e) => Some(e.to_string()),
        };
        match (self.record(failure.is_some()), failure) {
            (ExportChange::Failing, Some(reason)) => tracing::warn!(
                url = %self.url,
                %reason,
                "cannot export spans (otlp_endpoint); they are dropped until the collector answers"
            ),
            (ExportChange::Recovered, _) => {
                tracing::info!(url = %self.url, "exporting spans again");
            }
            (_, Some(reason)) => {
                tracing::debug!(url = %self.url, %reason, "a batch of spans was dropped");
            }
            _ => {}
        }
    }
}

type Answer = Result<Response<Bytes>, HttpError>;

impl HttpClient for RuntimeClient {
    fn send_bytes<'life0, 'async_trait>(
        &'life0 self,
        request: Request<Bytes>,
    ) -> Pin<Box<dyn Future<Output = Answer> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        let client = self.client.clone();
        let timeout = self.timeout;
        let health = self.health.clone();
        let task = self.runtime.spawn(async move {
            let exchange = async {
                let (parts, body) = request.into_parts();
                let response = client
                    .request(Request::from_parts(parts, Full::new(body)))
                    .await?;
                let (parts, body) = response.into_parts();
                let body = Limited::new(body, MAX_RESPONSE_BYTES)
                    .collect()
                    .await?
                    .to_bytes();
                Ok::<_, HttpError>(Response::from_parts(parts, body))
            };
            let answer = match tokio::time::timeout(timeout, exchange).await {
                Ok(answer) => answer,
                Err(_) => Err(format!("no answer from the collector within {timeout:?}").into()),
            };
            health.report(&answer);
            answer
        });
        Box::pin(async move { task.await.map_err(HttpError::from)? })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_collector_is_reported_once_and_its_return_once() {
        let health = ExportHealth::new("http://127.0.0.1:4318/v1/traces".into());
        assert_eq!(health.record(false), ExportChange::Same);
        assert_eq!(health.record(true), ExportChange::Failing);
        assert_eq!(health.record(true), ExportChange::Same);
        assert_eq!(health.record(false), ExportChange::Recovered);
        assert_eq!(health.record(false), ExportChange::Same);
    }

    #[test]
    fn endpoints_are_http_urls_and_get_the_traces_path() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318").unwrap(),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/").unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://collector:4318/v1/traces").unwrap(),
            "http://collector:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://gw/otlp").unwrap(),
            "http://gw/otlp/v1/traces"
        );
        // IPv6, as the configuration accepts it.
        assert_eq!(
            traces_url("http://[::1]:4318").unwrap(),
            "http://[::1]:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://[::1]").unwrap(),
            "http://[::1]/v1/traces"
        );
        for (bad, says) in [
            ("https://collector:4318", "https is not supported"),
            ("collector:4318", "write it as http://host:port"),
            ("grpc://collector:4317", "write it as http://host:port"),
            ("http://", "not a URL"),
            ("http://c:4318/?a=b", "query"),
            ("", "not a URL"),
        ] {
            let e = traces_url(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
    }
}
