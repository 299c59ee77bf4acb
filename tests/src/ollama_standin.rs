//! A stand-in Ollama on 127.0.0.1 for tests: `/api/version`, `/api/tags`,
//! `/api/ps` and `/api/show` from a model list the test controls, with
//! switches to fail (HTTP 500) and to vanish (stop listening) and come back.
//!
//! Inference answers the [`TOKENS`]; a chat whose messages carry images is
//! answered with [`images_seen`] instead (so a test can tell the bytes
//! arrived unchanged), and a chat offering `tools` with a call of the first
//! one, arguments [`TOOL_ARGUMENTS`].

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

/// What the stand-in serves; change it through [`StandInOllama::models`].
#[derive(Debug, Default)]
pub struct StandInModels {
    /// `/api/tags` entries (see [`tag`]).
    pub models: Vec<Value>,
    /// Names of the models `/api/ps` lists as loaded.
    pub loaded: Vec<String>,
    /// Answer every request with HTTP 500.
    pub failing: bool,
    /// How many `/api/show` requests arrived.
    pub show_calls: usize,
    /// How many `/api/generate` and `/api/chat` requests arrived.
    pub generate_calls: usize,
    /// Answer `/api/generate` and `/api/chat` with HTTP 500 (the rest works).
    pub failing_inference: bool,
    /// Break streamed answers off after two tokens (the connection drops).
    pub die_mid_stream: bool,
    /// Send one token of a streamed answer, then nothing (a model thinking).
    pub stall: bool,
    /// Pacing of answers, for measurements: the delay before the first
    /// token (or before a whole answer or an `/api/embed` answer), the
    /// delay between tokens, and how many tokens (the
    /// [`TOKENS`] over and over). `None`: [`TOKEN_INTERVAL`] and [`TOKENS`].
    pub pacing: Option<Pacing>,
    /// Streamed answers whose client went away before the end.
    pub cancelled: usize,
    /// Every POST body that arrived, in order.
    pub bodies: Vec<ReceivedBody>,
    /// A model asked for on `/api/generate` or `/api/chat` is then listed
    /// as loaded, as Ollama loads it.
    pub load_on_use: bool,
    /// A non-streamed answer's text is this many bytes (`x` over and over)
    /// instead of [`TOKENS`], for measuring long answers.
    pub answer_bytes: Option<usize>,
    /// Serve at most this many `/api/generate` and `/api/chat` requests at
    /// once; more wait (Ollama's `OLLAMA_NUM_PARALLEL` and its queue).
    pub parallel: Option<Arc<tokio::sync::Semaphore>>,
}

/// A request body as the stand-in received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceivedBody {
    /// The path it was posted to.
    pub path: String,
    /// Its length in bytes.
    pub length: usize,
    /// Its SHA-256, hex.
    pub sha256: String,
}

impl ReceivedBody {
    /// What `body` posted to `path` is recorded as.
    #[must_use]
    pub fn of(path: &str, body: &[u8]) -> Self {
        use sha2::Digest;
        Self {
            path: path.to_owned(),
            length: body.len(),
            sha256: hex(&sha2::Sha256::digest(body)),
        }
    }
}

/// `bytes` in lower-case hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The arguments of every tool call the stand-in answers with.
pub const TOOL_ARGUMENTS: &str = r#"{"city": "Paris"}"#;

/// The answer to a chat whose messages carry `images` (each exactly as
/// received: Ollama's base64 strings, OpenAI's `image_url` URLs): how many,
/// and the SHA-256 (hex) of their concatenation.
#[must_use]
pub fn images_seen<S: AsRef<str>>(images: &[S]) -> String {
    use sha2::Digest;
    let mut digest = sha2::Sha256::new();
    for image in images {
        digest.update(image.as_ref().as_bytes());
    }
    format!(
        "images: {}, sha256 {}",
        images.len(),
        hex(&digest.finalize())
    )
}

/// The images a chat request's messages carry: Ollama's `images` (base64
/// strings) and OpenAI's content parts of type `image_url` (their `url`).
fn images_of(body: &Value) -> Vec<&str> {
    let mut images = Vec::new();
    for message in body["messages"].as_array().into_iter().flatten() {
        images.extend(
            message["images"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str),
        );
        images.extend(
            message["content"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|part| part["type"] == "image_url")
                .filter_map(|part| part["image_url"]["url"].as_str()),
        );
    }
    images
}

/// What an inference request is answered with.
enum Answer {
    /// The [`TOKENS`].
    Tokens,
    /// A text (naming the images seen), streamed in a few pieces.
    Text(String),
    /// A call of the tool of this name, with [`TOOL_ARGUMENTS`].
    ToolCall(String),
}

impl Answer {
    /// The answer to a request with `body`: a chat (`chat`) may get a tool
    /// call or the images it carries named, anything else the [`TOKENS`].
    fn to(body: &Value, chat: bool) -> Self {
        if !chat {
            return Self::Tokens;
        }
        if let Some(tool) = body["tools"].as_array().and_then(|t| t.first()) {
            let name = tool["function"]["name"].as_str().unwrap_or_default();
            return Self::ToolCall(name.to_owned());
        }
        let images = images_of(body);
        if images.is_empty() {
            Self::Tokens
        } else {
            Self::Text(images_seen(&images))
        }
    }
}

/// [`TOOL_ARGUMENTS`] as a JSON object (Ollama's shape).
fn tool_arguments() -> Value {
    serde_json::from_str(TOOL_ARGUMENTS).unwrap_or_default()
}

/// Record each POST body, whole, before its handler sees it (bodies of any
/// size are taken, as Ollama takes them).
async fn record_body(
    State(s): State<Shared>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if request.method() != axum::http::Method::POST {
        return next.run(request).await;
    }
    let (parts, body) = request.into_parts();
    let Ok(bytes) = axum::body::to_bytes(body, usize::MAX).await else {
        return (StatusCode::BAD_REQUEST, "the body broke off").into_response();
    };
    s.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .bodies
        .push(ReceivedBody::of(parts.uri.path(), &bytes));
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}

/// How a stand-in paces a streamed answer.
#[derive(Debug, Clone, Copy)]
pub struct Pacing {
    /// Before the first token (prompt processing).
    pub first_token: std::time::Duration,
    /// Between two tokens.
    pub between_tokens: std::time::Duration,
    /// Tokens per answer.
    pub tokens: usize,
}

/// Counts a streamed answer as cancelled when it is dropped unfinished
/// (a finished answer takes the state out first).
struct CancelWatch {
    state: Option<Shared>,
}

impl Drop for CancelWatch {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .cancelled += 1;
        }
    }
}

/// Time between two streamed tokens.
pub const TOKEN_INTERVAL: std::time::Duration = std::time::Duration::from_millis(5);

/// The tokens every streamed answer is made of, in order.
pub const TOKENS: [&str; 5] = ["The", " sky", " is", " blue", "."];

/// A `/api/tags` entry.
#[must_use]
pub fn tag(name: &str, digest: &str, family: &str) -> Value {
    json!({
        "name": name, "model": name, "size": 4_661_224_676u64, "digest": digest,
        "details": {"format": "gguf", "family": family, "parameter_size": "8.0B", "quantization_level": "Q4_0"}
    })
}

type Shared = Arc<Mutex<StandInModels>>;

/// A running stand-in Ollama.
#[derive(Debug)]
pub struct StandInOllama {
    state: Shared,
    addr: SocketAddr,
    server: Option<JoinHandle<()>>,
}

impl StandInOllama {
    /// Serve `models` on a free loopback port.
    ///
    /// # Panics
    /// If no port can be bound.
    pub async fn start(models: StandInModels) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("cannot bind the stand-in Ollama: {e}"));
        let addr = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("no local address: {e}"));
        let state: Shared = Arc::new(Mutex::new(models));
        let server = Some(spawn(listener, state.clone()));
        Self {
            state,
            addr,
            server,
        }
    }

    /// Its address (`ollama_url` / `OLLAMA_HOST`).
    #[must_use]
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The models and switches, to change.
    ///
    /// # Panics
    /// If a handler panicked while holding them.
    pub fn models(&self) -> MutexGuard<'_, StandInModels> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stop listening (connections are refused) until [`StandInOllama::revive`].
    pub async fn vanish(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
            let _ = server.await;
        }
    }

    /// Listen again on the same address.
    ///
    /// # Panics
    /// If the address cannot be bound again.
    pub async fn revive(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .unwrap_or_else(|e| panic!("cannot bind {} again: {e}", self.addr));
        self.server = Some(spawn(listener, self.state.clone()));
    }
}

impl Drop for StandInOllama {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

fn fail_or(state: &Shared, ok: impl FnOnce(&mut StandInModels) -> Value) -> Response {
    let mut s = state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if s.failing {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "stand-in told to fail"})),
        )
            .into_response();
    }
    Json(ok(&mut s)).into_response()
}

async fn version(State(s): State<Shared>) -> Response {
    fail_or(&s, |_| json!({"version": "0.9.0"}))
}

async fn tags(State(s): State<Shared>) -> Response {
    fail_or(&s, |s| json!({"models": s.models}))
}

async fn ps(State(s): State<Shared>) -> Response {
    fail_or(&s, |s| {
        let loaded: Vec<Value> = s
            .models
            .iter()
            .filter(|m| s.loaded.iter().any(|l| m["name"] == l.as_str()))
            .cloned()
            .collect();
        json!({ "models": loaded })
    })
}

async fn show(State(s): State<Shared>, Json(body): Json<Value>) -> Response {
    fail_or(&s, |s| {
        s.show_calls += 1;
        let name = body["model"].as_str().unwrap_or_default();
        if name.starts_with("nomic-embed") {
            json!({"capabilities": ["embedding"], "model_info": {"nomic-bert.context_length": 2048}})
        } else {
            json!({"capabilities": ["completion", "tools", "vision"], "model_info": {"general.architecture": "llama", "llama.context_length": 8192}})
        }
    })
}

/// `/api/generate` and `/api/chat`: the [`TOKENS`] one NDJSON line each
/// (or one JSON object with `"stream": false`), naming the model asked for.
async fn generate(
    State(s): State<Shared>,
    uri: axum::http::Uri,
    Json(body): Json<Value>,
) -> Response {
    let (failing, die, stall, pacing, answer_bytes) = {
        let mut m = s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        m.generate_calls += 1;
        if let Some(name) = body["model"].as_str()
            && m.load_on_use
            && !m.loaded.iter().any(|l| l == name)
        {
            m.loaded.push(name.to_owned());
        }
        (
            m.failing || m.failing_inference,
            m.die_mid_stream,
            m.stall,
            m.pacing,
            m.answer_bytes,
        )
    };
    if failing {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "stand-in told to fail"})),
        )
            .into_response();
    }
    let parallel = s
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .parallel
        .clone();
    // Held until the answer is complete (or dropped).
    let permit = match parallel {
        Some(slots) => slots.acquire_owned().await.ok(),
        None => None,
    };
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let chat = uri.path() == "/api/chat";
    let answer = Answer::to(&body, chat);
    let piece = |text: &str, done: bool| {
        if chat {
            json!({"model": model, "message": {"role": "assistant", "content": text}, "done": done})
        } else {
            json!({"model": model, "response": text, "done": done})
        }
    };
    let tool_call = |name: &str, done: bool| {
        let mut call = json!({"model": model, "message": {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": name, "arguments": tool_arguments()}}]}, "done": done});
        if done {
            call["done_reason"] = json!("stop");
        }
        call
    };
    if body["stream"] == false {
        if let Some(p) = pacing.filter(|p| !p.first_token.is_zero()) {
            tokio::time::sleep(p.first_token).await;
        }
        return Json(match &answer {
            Answer::Tokens => match answer_bytes {
                Some(n) => piece(&"x".repeat(n), true),
                None => piece(&TOKENS.concat(), true),
            },
            Answer::Text(text) => piece(text, true),
            Answer::ToolCall(name) => tool_call(name, true),
        })
        .into_response();
    }
    let mut pieces: Vec<Value> = match &answer {
        Answer::Tokens => {
            let count = pacing.map_or(TOKENS.len(), |p| p.tokens);
            TOKENS
                .iter()
                .cycle()
                .take(count)
                .map(|t| piece(t, false))
                .collect()
        }
        Answer::Text(text) => text.split_inclusive(' ').map(|t| piece(t, false)).collect(),
        Answer::ToolCall(name) => vec![tool_call(name, false)],
    };
    let mut last = piece("", true);
    if matches!(answer, Answer::ToolCall(_)) {
        last["done_reason"] = json!("stop");
    }
    pieces.push(last);
    let mut lines: Vec<Result<String, std::io::Error>> =
        pieces.iter().map(|p| Ok(format!("{p}\n"))).collect();
    if die {
        lines.truncate(2);
        lines.push(Err(std::io::Error::other("stand-in died mid-stream")));
    }
    if stall {
        lines.truncate(1);
    }
    // One token at a time, as a model produces them; a stalled answer then
    // waits forever, and an answer dropped before its end counts as
    // cancelled.
    let watch = CancelWatch { state: Some(s) };
    let (first, between) = pacing.map_or((TOKEN_INTERVAL, TOKEN_INTERVAL), |p| {
        (p.first_token, p.between_tokens)
    });
    let stream = futures::stream::unfold(
        (lines.into_iter(), (watch, permit), stall, first),
        move |(mut lines, (mut watch, permit), stall, delay)| async move {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            match lines.next() {
                Some(line) => Some((line, (lines, (watch, permit), stall, between))),
                None if stall => futures::future::pending().await,
                None => {
                    watch.state.take();
                    None
                }
            }
        },
    );
    let mut response = Response::new(axum::body::Body::from_stream(stream));
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/x-ndjson"),
    );
    response
}

/// The embedding every input gets.
pub const EMBEDDING: [f32; 3] = [0.25, 0.5, 0.75];

/// `None` when the request may be answered, else the refusal.
fn inference_refused(s: &Shared) -> Option<Response> {
    let mut m = s.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    m.generate_calls += 1;
    (m.failing || m.failing_inference).then(|| {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "stand-in told to fail"})),
        )
            .into_response()
    })
}

/// `/api/embed` (`{"embeddings": [[…]]}`, one per input) and the legacy
/// `/api/embeddings` (`{"embedding": […]}`).
async fn embed(State(s): State<Shared>, uri: axum::http::Uri, Json(body): Json<Value>) -> Response {
    if let Some(refused) = inference_refused(&s) {
        return refused;
    }
    let think = s
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .pacing
        .map(|p| p.first_token);
    if let Some(think) = think.filter(|t| !t.is_zero()) {
        tokio::time::sleep(think).await;
    }
    if uri.path() == "/api/embeddings" {
        return Json(json!({ "embedding": EMBEDDING })).into_response();
    }
    let inputs = body["input"].as_array().map_or(1, Vec::len);
    Json(json!({"model": body["model"], "embeddings": vec![EMBEDDING; inputs]})).into_response()
}

/// OpenAI's `/v1/chat/completions` and `/v1/completions`, streamed as SSE
/// (ending with `data: [DONE]`) or whole.
async fn openai(
    State(s): State<Shared>,
    uri: axum::http::Uri,
    Json(body): Json<Value>,
) -> Response {
    if let Some(refused) = inference_refused(&s) {
        return refused;
    }
    let model = body["model"].as_str().unwrap_or_default().to_owned();
    let chat = uri.path() == "/v1/chat/completions";
    let answer = Answer::to(&body, chat);
    let (object, chunk_object) = if chat {
        ("chat.completion", "chat.completion.chunk")
    } else {
        ("text_completion", "text_completion")
    };
    let choice = |text: &str, finish: Option<&str>, streaming: bool| {
        if chat && streaming {
            json!({"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": finish})
        } else if chat {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": text, "finish_reason": finish, "logprobs": null})
        }
    };
    let tool_calls = |name: &str, streaming: bool| {
        let mut call = json!({"id": "call_1", "type": "function", "function": {"name": name, "arguments": TOOL_ARGUMENTS}});
        if streaming {
            call["index"] = json!(0);
        }
        json!([call])
    };
    let usage = json!({"prompt_tokens": 3, "completion_tokens": TOKENS.len(), "total_tokens": 3 + TOKENS.len()});
    if body["stream"] != true {
        let choice = match &answer {
            Answer::Tokens => choice(&TOKENS.concat(), Some("stop"), false),
            Answer::Text(text) => choice(text, Some("stop"), false),
            Answer::ToolCall(name) => json!({
                "index": 0, "finish_reason": "tool_calls",
                "message": {"role": "assistant", "content": null, "tool_calls": tool_calls(name, false)},
            }),
        };
        return Json(json!({
            "id": "standin-1", "object": object, "created": 0, "model": model,
            "choices": [choice], "usage": usage,
        }))
        .into_response();
    }
    let (mut choices, finish): (Vec<Value>, _) = match &answer {
        Answer::Tokens => (
            TOKENS.iter().map(|t| choice(t, None, true)).collect(),
            choice("", Some("stop"), true),
        ),
        Answer::Text(text) => (
            text.split_inclusive(' ')
                .map(|t| choice(t, None, true))
                .collect(),
            choice("", Some("stop"), true),
        ),
        Answer::ToolCall(name) => (
            vec![json!({
                "index": 0, "finish_reason": null,
                "delta": {"role": "assistant", "content": null, "tool_calls": tool_calls(name, true)},
            })],
            json!({"index": 0, "delta": {}, "finish_reason": "tool_calls"}),
        ),
    };
    choices.push(finish);
    let mut events: Vec<Result<String, std::io::Error>> = choices
        .into_iter()
        .map(|c| {
            let chunk = json!({"id": "standin-1", "object": chunk_object, "created": 0, "model": model, "choices": [c]});
            Ok(format!("data: {chunk}\n\n"))
        })
        .collect();
    events.push(Ok("data: [DONE]\n\n".to_owned()));
    let mut response = Response::new(axum::body::Body::from_stream(futures::stream::iter(events)));
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("text/event-stream"),
    );
    response
}

/// OpenAI's `/v1/embeddings`.
async fn openai_embeddings(State(s): State<Shared>, Json(body): Json<Value>) -> Response {
    if let Some(refused) = inference_refused(&s) {
        return refused;
    }
    let inputs = body["input"].as_array().map_or(1, Vec::len);
    let data: Vec<Value> = (0..inputs)
        .map(|i| json!({"object": "embedding", "index": i, "embedding": EMBEDDING}))
        .collect();
    Json(json!({"object": "list", "data": data, "model": body["model"], "usage": {"prompt_tokens": 1, "total_tokens": 1}})).into_response()
}

fn spawn(listener: tokio::net::TcpListener, state: Shared) -> JoinHandle<()> {
    let app = Router::new()
        .route("/api/embed", post(embed))
        .route("/api/embeddings", post(embed))
        .route("/v1/chat/completions", post(openai))
        .route("/v1/completions", post(openai))
        .route("/v1/embeddings", post(openai_embeddings))
        .route("/api/generate", post(generate))
        .route("/api/chat", post(generate))
        .route("/api/version", get(version))
        .route("/api/tags", get(tags))
        .route("/api/ps", get(ps))
        .route("/api/show", post(show))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            record_body,
        ))
        .with_state(state);
    // Ollama (Go's net/http) sets TCP_NODELAY on every connection, so
    // its streamed lines leave as they are written.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    })
}
