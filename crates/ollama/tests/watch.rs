//! The watcher against a stand-in Ollama on 127.0.0.1: models and what
//! they can do, changes, Ollama failing, vanishing and coming back.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ollamacron_ollama::{
    ModelKind, OllamaClient, OllamaEndpoint, OllamaState, OllamaWatcher, WatchConfig,
};
use serde_json::{Value, json};
use tokio::sync::watch;

/// How long a test waits for the watcher to see something.
const WAIT: Duration = Duration::from_secs(10);

#[derive(Default)]
struct StandIn {
    models: Vec<Value>,
    loaded: Vec<String>,
    failing: bool,
    show_calls: usize,
}

type Shared = Arc<Mutex<StandIn>>;

fn model(name: &str, digest: &str, family: &str) -> Value {
    json!({
        "name": name, "model": name, "size": 4_661_224_676u64, "digest": digest,
        "details": {"format": "gguf", "family": family, "parameter_size": "8.0B", "quantization_level": "Q4_0"}
    })
}

fn fail_or(state: &Shared, ok: impl FnOnce(&mut StandIn) -> Value) -> Response {
    let mut s = state.lock().unwrap();
    if s.failing {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "stand-in told to fail"})),
        )
            .into_response();
    }
    Json(ok(&mut s)).into_response()
}

async fn serve(state: Shared, addr: SocketAddr) -> tokio::task::JoinHandle<()> {
    let app = Router::new()
        .route("/api/version", get(|State(s): State<Shared>| async move { fail_or(&s, |_| json!({"version": "0.9.0"})) }))
        .route("/api/tags", get(|State(s): State<Shared>| async move { fail_or(&s, |s| json!({"models": s.models})) }))
        .route(
            "/api/ps",
            get(|State(s): State<Shared>| async move {
                fail_or(&s, |s| {
                    let loaded: Vec<Value> = s.models.iter().filter(|m| s.loaded.iter().any(|l| m["name"] == l.as_str())).cloned().collect();
                    json!({"models": loaded})
                })
            }),
        )
        .route(
            "/api/show",
            post(|State(s): State<Shared>, Json(body): Json<Value>| async move {
                fail_or(&s, |s| {
                    s.show_calls += 1;
                    let name = body["model"].as_str().unwrap_or_default();
                    if name.starts_with("nomic-embed") {
                        json!({"capabilities": ["embedding"], "model_info": {"nomic-bert.context_length": 2048}})
                    } else {
                        json!({"capabilities": ["completion", "tools", "vision"], "model_info": {"general.architecture": "llama", "llama.context_length": 8192}})
                    }
                })
            }),
        )
        .with_state(state);
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    })
}

async fn next_state(
    rx: &mut watch::Receiver<OllamaState>,
    what: &str,
    pred: impl Fn(&OllamaState) -> bool,
) -> OllamaState {
    let wait = async {
        loop {
            {
                let state = rx.borrow_and_update();
                if pred(&state) {
                    return state.clone();
                }
            }
            rx.changed().await.unwrap();
        }
    };
    tokio::time::timeout(WAIT, wait)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}; last: {:?}", *rx.borrow()))
}

fn fast() -> WatchConfig {
    WatchConfig {
        interval: Duration::from_millis(100),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_changes_failures_and_returns_are_seen() {
    let state: Shared = Arc::default();
    {
        let mut s = state.lock().unwrap();
        s.models = vec![
            model("llama3:8b", "aaa", "llama"),
            model("nomic-embed-text:latest", "bbb", "nomic-bert"),
        ];
        s.loaded = vec!["llama3:8b".into()];
    }
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let server = serve(state.clone(), addr).await;
    let client = OllamaClient::new(
        OllamaEndpoint::parse(&addr.to_string()).unwrap(),
        Duration::from_secs(2),
    );
    let watcher = OllamaWatcher::spawn(client, fast());
    let mut rx = watcher.subscribe();

    let OllamaState::Up(snapshot) =
        next_state(&mut rx, "Ollama up", |s| matches!(s, OllamaState::Up(_))).await
    else {
        unreachable!()
    };
    assert_eq!(snapshot.version, "0.9.0");
    let names: Vec<&str> = snapshot.models.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["llama3:8b", "nomic-embed-text:latest"]);
    let llama = &snapshot.models[0];
    assert_eq!(llama.kind, ModelKind::Llm);
    assert_eq!(llama.capabilities, ["completion", "tools", "vision"]);
    assert_eq!(llama.context_length, Some(8192));
    assert!(llama.loaded);
    assert_eq!(
        (
            llama.family.as_str(),
            llama.parameter_size.as_str(),
            llama.quantization.as_str()
        ),
        ("llama", "8.0B", "Q4_0")
    );
    let embed = &snapshot.models[1];
    assert_eq!(embed.kind, ModelKind::Embedding);
    assert_eq!(embed.context_length, Some(2048));
    assert!(!embed.loaded);

    // Steady state: no new publication, and /api/show is not asked again.
    let shows = state.lock().unwrap().show_calls;
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(
        !rx.has_changed().unwrap(),
        "nothing changed, nothing published"
    );
    assert_eq!(state.lock().unwrap().show_calls, shows);

    // A new model and a re-pulled one (new digest) are seen.
    {
        let mut s = state.lock().unwrap();
        s.models.push(model("mistral:7b", "ccc", "llama"));
        s.models[0] = model("llama3:8b", "aaa2", "llama");
    }
    let OllamaState::Up(snapshot) = next_state(
        &mut rx,
        "the new model",
        |s| matches!(s, OllamaState::Up(s) if s.models.len() == 3),
    )
    .await
    else {
        unreachable!()
    };
    assert_eq!(snapshot.models[0].digest, "aaa2");

    // Failing: one Down, with the models last seen.
    state.lock().unwrap().failing = true;
    let OllamaState::Down {
        reason,
        last_models,
    } = next_state(&mut rx, "Ollama failing", |s| {
        matches!(s, OllamaState::Down { .. })
    })
    .await
    else {
        unreachable!()
    };
    assert!(
        reason.contains("500") && reason.contains("stand-in told to fail"),
        "{reason}"
    );
    assert_eq!(last_models.len(), 3);
    state.lock().unwrap().failing = false;
    next_state(&mut rx, "Ollama back", |s| matches!(s, OllamaState::Up(_))).await;

    // Vanishing (nothing listens) and coming back on the same address.
    server.abort();
    let _ = server.await;
    let OllamaState::Down { reason, .. } = next_state(&mut rx, "Ollama gone", |s| {
        matches!(s, OllamaState::Down { .. })
    })
    .await
    else {
        unreachable!()
    };
    assert!(reason.contains(&addr.to_string()), "{reason}");
    let _server = serve(state.clone(), addr).await;
    let OllamaState::Up(snapshot) = next_state(&mut rx, "Ollama back again", |s| {
        matches!(s, OllamaState::Up(_))
    })
    .await
    else {
        unreachable!()
    };
    assert_eq!(snapshot.models.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_that_are_not_ollama_are_errors_not_panics() {
    let app = Router::new()
        .route("/api/version", get(|| async { "not json" }))
        .route(
            "/api/tags",
            get(|| async { Json(json!({"models": "nope"})) }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let client = OllamaClient::new(
        OllamaEndpoint::parse(&addr.to_string()).unwrap(),
        Duration::from_secs(2),
    );
    let e = client.version().await.unwrap_err().to_string();
    assert!(
        e.contains("/api/version") && e.contains("unexpected answer"),
        "{e}"
    );
    let e = client.tags().await.unwrap_err().to_string();
    assert!(e.contains("/api/tags"), "{e}");
    let e = client.ps().await.unwrap_err().to_string();
    assert!(e.contains("404"), "{e}");
}
