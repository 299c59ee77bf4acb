//! The local Ollama, stood in for on 127.0.0.1: what the watcher reads, and
//! the node advertising its models to the mesh, unavailable while Ollama is
//! down and back when it returns.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::time::Duration;

use ollamacron_gateway::OllamaAdvertiser;
use ollamacron_node_core::registry::{ServiceQuery, ServiceStatus};
use ollamacron_ollama::{
    ModelKind, OllamaClient, OllamaEndpoint, OllamaState, OllamaWatcher, WatchConfig,
};
use ollamacron_tests::ollama_standin::{StandInModels, StandInOllama, tag};
use ollamacron_tests::{TCP_ONLY, eventually, eventually_found, loopback_config, start};
use tokio::sync::watch;

/// How long a test waits for the watcher to see something.
const WAIT: Duration = Duration::from_secs(10);

fn fast() -> WatchConfig {
    WatchConfig {
        interval: Duration::from_millis(100),
        backoff_initial: Duration::from_millis(50),
        backoff_max: Duration::from_millis(200),
    }
}

fn watcher(ollama: &StandInOllama) -> OllamaWatcher {
    let endpoint = OllamaEndpoint::parse(&ollama.addr().to_string()).unwrap();
    OllamaWatcher::spawn(OllamaClient::new(endpoint, Duration::from_secs(2)), fast())
}

fn two_models() -> StandInModels {
    StandInModels {
        models: vec![
            tag("llama3:8b", "aaa", "llama"),
            tag("nomic-embed-text:latest", "bbb", "nomic-bert"),
        ],
        loaded: vec!["llama3:8b".into()],
        ..StandInModels::default()
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_sees_models_changes_failures_and_returns() {
    let mut ollama = StandInOllama::start(two_models()).await;
    let watcher = watcher(&ollama);
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
    let embed = &snapshot.models[1];
    assert_eq!(embed.kind, ModelKind::Embedding);
    assert_eq!(embed.context_length, Some(2048));
    assert!(!embed.loaded);

    // Steady: nothing published, and /api/show is not asked again.
    let shows = ollama.models().show_calls;
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(
        !rx.has_changed().unwrap(),
        "nothing changed, nothing published"
    );
    assert_eq!(ollama.models().show_calls, shows);

    // A new model, and a re-pulled one (new digest).
    {
        let mut m = ollama.models();
        m.models.push(tag("mistral:7b", "ccc", "llama"));
        m.models[0] = tag("llama3:8b", "aaa2", "llama");
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

    // Failing: Down, with the models last seen; then back.
    ollama.models().failing = true;
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
    ollama.models().failing = false;
    next_state(&mut rx, "Ollama back", |s| matches!(s, OllamaState::Up(_))).await;

    // Vanishing (nothing listens) and coming back on the same address.
    ollama.vanish().await;
    let OllamaState::Down { reason, .. } = next_state(&mut rx, "Ollama gone", |s| {
        matches!(s, OllamaState::Down { .. })
    })
    .await
    else {
        unreachable!()
    };
    assert!(reason.contains(&ollama.addr().to_string()), "{reason}");
    ollama.revive().await;
    next_state(
        &mut rx,
        "Ollama back again",
        |s| matches!(s, OllamaState::Up(s) if s.models.len() == 3),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_ollama_models_are_found_across_the_mesh_and_leave_while_ollama_is_down() {
    let mut ollama = StandInOllama::start(two_models()).await;
    let serving = start(loopback_config(TCP_ONLY, &[])).await.unwrap();
    let addr = serving.dialable_addrs().await.unwrap().remove(0);
    let bootstrap = format!("[{addr}]");
    let asking = start(loopback_config(
        TCP_ONLY,
        &[("bootstrap", bootstrap.as_str())],
    ))
    .await
    .unwrap();
    let watcher = watcher(&ollama);
    tokio::spawn(OllamaAdvertiser::new(serving.clone()).run(watcher.subscribe()));

    let llm = ServiceQuery {
        service_type: Some("llm".into()),
        ..ServiceQuery::default()
    };
    let found = eventually_found(&asking, &llm, "the other node to find the llm")
        .await
        .unwrap();
    let service = &found[0].service;
    assert_eq!(service.id, "ollama/llama3:8b");
    assert_eq!(service.name, "llama3:8b");
    assert_eq!(service.version, "aaa");
    assert_eq!(service.peer_id, serving.peer_id().to_string());
    assert_eq!(service.capabilities, ["completion", "tools", "vision"]);
    assert_eq!(service.tags, ["llama", "q4_0", "8.0b"]);
    assert_eq!(service.metadata["context_length"], "8192");
    assert_eq!(service.metadata["loaded"], "true");
    assert_eq!(service.status, ServiceStatus::Available);
    let embedding = ServiceQuery {
        service_type: Some("embedding".into()),
        capabilities: vec!["embedding".into()],
        ..ServiceQuery::default()
    };
    eventually("the embedding model too", || {
        let (asking, q) = (asking.clone(), embedding.clone());
        async move {
            let found = asking.find_services(q).await.ok()?;
            found
                .iter()
                .any(|s| s.service.name == "nomic-embed-text:latest")
                .then_some(())
        }
    })
    .await
    .unwrap();

    // Ollama goes away: its models stay listed locally, unavailable, and
    // leave every answer elsewhere; they come back with it.
    ollama.vanish().await;
    eventually("the models to be unavailable", || {
        let (asking, llm) = (asking.clone(), llm.clone());
        async move {
            asking
                .find_services(llm)
                .await
                .ok()
                .filter(Vec::is_empty)
                .map(|_| ())
        }
    })
    .await
    .unwrap();
    let local = serving.local_services().await.unwrap();
    assert_eq!(local.len(), 2);
    assert!(local.iter().all(|s| s.status == ServiceStatus::Unavailable));
    ollama.revive().await;
    eventually_found(&asking, &llm, "the models to return")
        .await
        .unwrap();

    // A model removed from Ollama is unregistered.
    ollama.models().models.remove(0);
    eventually("the removed model to go", || {
        let serving = serving.clone();
        async move {
            let local = serving.local_services().await.ok()?;
            (local.len() == 1 && local[0].name == "nomic-embed-text:latest").then_some(())
        }
    })
    .await
    .unwrap();
}
