//! Traces across the hop: two `ollamacron-node run` processes with
//! `enable_tracing` and `otlp_endpoint` export their spans to a small OTLP
//! receiver of this test's own; one request through the first node's
//! gateway, served by the second node's (stand-in) Ollama, is one trace
//! whose serving spans are children of the gateway's attempt.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use ollamacron_tests::ollama_standin::StandInOllama;
use ollamacron_tests::pool::models;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_ollamacron-node");
/// Longest wait for a log line, a model to be found or spans to arrive
/// (the nodes export every 2 s).
const TIMEOUT: Duration = Duration::from_secs(30);
const MODEL: &str = "llama3:8b";

/// One span as the receiver got it.
#[derive(Debug, Clone)]
struct ReceivedSpan {
    /// `service.instance.id` of the exporting node (its peer id).
    node: String,
    /// `service.name`.
    service: String,
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attributes: HashMap<String, String>,
}

type Received = Arc<Mutex<Vec<ReceivedSpan>>>;

fn text(value: Option<&AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn attributes(list: &[KeyValue]) -> HashMap<String, String> {
    list.iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

/// `POST /v1/traces` (OTLP/HTTP, protobuf), as a collector answers it.
async fn export(State(received): State<Received>, body: Bytes) -> (StatusCode, Vec<u8>) {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return (StatusCode::BAD_REQUEST, Vec::new());
    };
    let mut spans = Vec::new();
    for resource in request.resource_spans {
        let resource_attributes = resource
            .resource
            .map(|r| attributes(&r.attributes))
            .unwrap_or_default();
        let node = resource_attributes
            .get("service.instance.id")
            .cloned()
            .unwrap_or_default();
        let service = resource_attributes
            .get("service.name")
            .cloned()
            .unwrap_or_default();
        for scope in resource.scope_spans {
            for span in scope.spans {
                spans.push(ReceivedSpan {
                    node: node.clone(),
                    service: service.clone(),
                    name: span.name,
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent_span_id: span.parent_span_id,
                    attributes: attributes(&span.attributes),
                });
            }
        }
    }
    received.lock().unwrap().extend(spans);
    (StatusCode::OK, Vec::new())
}

/// A node process and every line of its stderr seen so far.
struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: RefCell<Vec<String>>,
}

impl Running {
    /// `run` on loopback with tracing exported to `collector`, and `extra`.
    fn start(data_dir: &Path, collector: SocketAddr, extra: &[&str]) -> Self {
        let mut child = Command::new(BIN)
            .arg("run")
            .args(extra)
            .args([
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--api-listen",
                "127.0.0.1:0",
                "--no-mdns",
                "--data-dir",
                data_dir.to_str().unwrap(),
                "--set",
                "gateway_listen=127.0.0.1:0",
                "--set",
                "enable_tracing=true",
                "--set",
                &format!("otlp_endpoint=http://{collector}"),
            ])
            .env_remove("OLLAMACRON_CONFIG")
            .env_remove("RUST_LOG")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let lines = common::stderr_lines(&mut child);
        Self {
            child,
            lines,
            seen: RefCell::default(),
        }
    }

    /// The first line (seen already or to come) containing `needle`.
    fn line(&self, needle: &str) -> String {
        if let Some(line) = self.seen.borrow().iter().find(|l| l.contains(needle)) {
            return line.clone();
        }
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.borrow_mut().push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!(
                    "no log line containing {needle:?} ({e}); seen:\n{}",
                    self.seen.borrow().join("\n")
                ),
            }
        }
    }

    /// The value of `key=` in the first line containing `needle`.
    fn field(&self, needle: &str, key: &str) -> String {
        let line = self.line(needle);
        let prefix = format!("{key}=");
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(prefix.as_str()))
            .unwrap_or_else(|| panic!("no {key} in {line:?}"))
            .to_owned()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A streamed chat through the gateway at `gateway`: its status and body.
async fn chat(gateway: &str) -> (u16, String) {
    let body = serde_json::json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "why is the sky blue?"}],
        "stream": true,
    })
    .to_string();
    let mut stream = tokio::net::TcpStream::connect(gateway).await.unwrap();
    let request = format!(
        "POST /api/chat HTTP/1.1\r\nHost: {gateway}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut answer))
        .await
        .expect("the gateway answered in time")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"));
    (status, answer)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn one_request_is_one_trace_across_the_gateway_node_and_the_serving_node() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let received: Received = Arc::default();
    let collector = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .route("/v1/traces", post(export))
            .with_state(received.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    });
    let ollama = runtime.block_on(StandInOllama::start(models(&[MODEL])));

    // B serves the model; A, which has no Ollama, routes to B.
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let ollama_url = format!("ollama_url=http://{}", ollama.addr());
    let b = Running::start(
        dir_b.path(),
        collector,
        &["--set", "dht_mode=server", "--set", &ollama_url],
    );
    let b_addr = b.field("listening", "address");
    let b_id = b_addr.rsplit('/').next().unwrap().to_owned();
    b.line("advertising the local Ollama's models");
    let a = Running::start(
        dir_a.path(),
        collector,
        &["--bootstrap", &b_addr, "--set", "enable_ollama=false"],
    );
    let a_id = a
        .field("listening", "address")
        .rsplit('/')
        .next()
        .unwrap()
        .to_owned();
    let gateway = a.field("serving the Ollama-compatible gateway", "addr");

    // Until A has found B's model (a 404 before).
    let deadline = Instant::now() + TIMEOUT;
    let answer = loop {
        let (status, answer) = runtime.block_on(chat(&gateway));
        if status == 200 {
            break answer;
        }
        assert!(
            status == 404 && Instant::now() < deadline,
            "the gateway answered {status}: {answer}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(answer.contains("\"done\":true"), "{answer}");

    // The serving node's spans of that request, and the gateway's.
    let deadline = Instant::now() + TIMEOUT;
    let trace = loop {
        let spans = received.lock().unwrap().clone();
        let served = spans
            .iter()
            .find(|s| s.name == "serve.inference" && s.node == b_id);
        if let Some(served) = served {
            let trace: Vec<ReceivedSpan> = spans
                .iter()
                .filter(|s| s.trace_id == served.trace_id)
                .cloned()
                .collect();
            let done = ["gateway.request", "gateway.attempt", "gateway.stream"]
                .iter()
                .all(|name| trace.iter().any(|s| s.name == *name));
            if done && trace.iter().any(|s| s.name == "serve.ollama") {
                break trace;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no whole trace arrived; spans: {:#?}",
            spans
                .iter()
                .map(|s| (&s.node, &s.name, hex(&s.trace_id)))
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let one = |name: &str| {
        let found: Vec<&ReceivedSpan> = trace.iter().filter(|s| s.name == name).collect();
        assert_eq!(found.len(), 1, "one {name} in the trace: {trace:#?}");
        found[0].clone()
    };
    let request = one("gateway.request");
    let route = one("gateway.route");
    let queue_wait = one("gateway.queue_wait");
    let attempt = one("gateway.attempt");
    let stream = one("gateway.stream");
    let served = one("serve.inference");
    let ollama_span = one("serve.ollama");

    // The gateway's side, from A: the request is the trace's root.
    for span in [&request, &route, &queue_wait, &attempt, &stream] {
        assert_eq!(span.node, a_id, "{span:?}");
    }
    assert!(request.parent_span_id.is_empty(), "{request:?}");
    for span in [&route, &queue_wait, &attempt, &stream] {
        assert_eq!(span.parent_span_id, request.span_id, "{span:?}");
    }
    assert_eq!(request.attributes["model"], MODEL);
    assert_eq!(request.attributes["http.status_code"], "200");
    assert_eq!(route.attributes["candidates"], "1");
    assert_eq!(attempt.attributes["peer"], b_id);
    assert_eq!(attempt.attributes["outcome"], "answered");
    assert!(
        stream.attributes["first_token_ms"].parse::<f64>().unwrap() > 0.0,
        "{stream:?}"
    );
    assert!(
        stream.attributes["chunks"].parse::<u64>().unwrap() > 1,
        "streamed token by token: {stream:?}"
    );

    // The serving side, from B, under A's attempt: the context crossed
    // the hop in the request's head.
    assert_eq!(served.node, b_id);
    assert_eq!(served.parent_span_id, attempt.span_id, "{served:?}");
    assert_eq!(served.attributes["asker"], a_id);
    assert_eq!(served.attributes["http.status_code"], "200");
    assert!(
        served.attributes.contains_key("first_byte_ms"),
        "{served:?}"
    );
    assert_eq!(ollama_span.node, b_id);
    assert_eq!(ollama_span.parent_span_id, served.span_id);

    // Only the nodes' own spans are exported, not libp2p's or hyper's.
    let spans = received.lock().unwrap().clone();
    for span in &spans {
        assert_eq!(span.service, "ollamacron-node", "{span:?}");
        let module = span
            .attributes
            .get("code.module.name")
            .or_else(|| span.attributes.get("code.namespace"))
            .unwrap_or_else(|| panic!("no module of {span:?}"));
        assert!(module.starts_with("ollamacron"), "{span:?}");
    }
    drop((a, b));
    drop(ollama);
}
