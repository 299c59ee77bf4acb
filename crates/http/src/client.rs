//! The HTTP client every part of the node uses (to Ollama, health probes,
//! the CLI to its node): `TCP_NODELAY` on, so a request written as headers
//! and then a body leaves at once.

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// A pooled HTTP/1 client over plain TCP with `TCP_NODELAY`.
#[must_use]
pub fn http_client<B>() -> Client<HttpConnector, B>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
{
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new()).build(connector)
}
