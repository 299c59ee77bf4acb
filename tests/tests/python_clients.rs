//! The official `ollama` and `openai` Python clients, unchanged, against the
//! gateway of a two-node mesh (`tests/python/clients.py`): chat and
//! generate, streamed and not, list, embed, and an unknown model.
//!
//! The clients are installed from PyPI into a virtualenv under the target
//! directory the first time. Without python3 (with venv) or PyPI the test
//! skips with a loud message; under `CI=true` that is a failure.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ollamacron_gateway::{
    GatewayConfig, InferenceLoad, LocalOllama, OllamaAdvertiser, ServeLimits, router,
    serve_inference,
};
use ollamacron_node_core::registry::ServiceQuery;
use ollamacron_ollama::{OllamaClient, OllamaEndpoint, OllamaWatcher, WatchConfig};
use ollamacron_tests::ollama_standin::{StandInModels, StandInOllama, tag};
use ollamacron_tests::{TCP_ONLY, eventually_found, loopback_config, start};

const LIMITS: ServeLimits = ServeLimits {
    total: 8,
    per_peer: 8,
};

/// The client versions the test installs.
const PACKAGES: [&str; 2] = ["ollama==0.6.3", "openai==3.57.0"];

/// The virtualenv with the clients, created once; `Err` says why not.
fn clients_venv() -> Result<PathBuf, String> {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-clients-venv");
    let python = venv.join("bin/python");
    let stamp = venv.join(PACKAGES.join("+"));
    if stamp.exists() {
        return Ok(python);
    }
    let run = |program: &Path, args: &[&str]| -> Result<(), String> {
        let out = Command::new(program)
            .args(args)
            .output()
            .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "`{} {}` failed: {}",
                program.display(),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    let venv_arg = venv.to_string_lossy().into_owned();
    run(Path::new("python3"), &["-m", "venv", "--clear", &venv_arg])?;
    let mut pip = vec![
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ];
    pip.extend(PACKAGES);
    run(&python, &pip)?;
    std::fs::write(&stamp, b"").map_err(|e| e.to_string())?;
    Ok(python)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_clients_work_against_the_gateway() {
    let python = match tokio::task::spawn_blocking(clients_venv).await.unwrap() {
        Ok(python) => python,
        Err(reason) => {
            let message = format!(
                "SKIPPED python_clients: cannot install the ollama and openai clients: {reason}"
            );
            let ci = std::env::var("CI").is_ok_and(|v| v == "true");
            assert!(!ci, "{message} (CI=true requires it)");
            eprintln!("\n{}\n{message}\n{}\n", "!".repeat(78), "!".repeat(78));
            return;
        }
    };

    // B serves the models from its stand-in Ollama; A only routes.
    let ollama = StandInOllama::start(StandInModels {
        models: vec![
            tag("llama3:8b", "aaa", "llama"),
            tag("nomic-embed-text:latest", "bbb", "nomic-bert"),
        ],
        ..StandInModels::default()
    })
    .await;
    let a = start(loopback_config(TCP_ONLY, &[])).await.unwrap();
    let bootstrap = format!("[{}]", a.dialable_addrs().await.unwrap().remove(0));
    let b = start(loopback_config(
        TCP_ONLY,
        &[("bootstrap", bootstrap.as_str())],
    ))
    .await
    .unwrap();
    let endpoint = OllamaEndpoint::parse(&ollama.addr().to_string()).unwrap();
    let watcher = OllamaWatcher::spawn(
        OllamaClient::new(endpoint.clone(), Duration::from_secs(2)),
        WatchConfig::default(),
    );
    tokio::spawn(OllamaAdvertiser::new(b.clone()).run(watcher.subscribe()));
    tokio::spawn(serve_inference(
        b.stream_control(),
        LocalOllama::new(endpoint, Duration::from_secs(10)),
        LIMITS,
        InferenceLoad::default(),
    ));
    for kind in ["llm", "embedding"] {
        let query = ServiceQuery {
            service_type: Some(kind.to_owned()),
            ..ServiceQuery::default()
        };
        eventually_found(&a, &query, "A to see B's models")
            .await
            .unwrap();
    }
    let app = router(
        a.clone(),
        None,
        GatewayConfig {
            max_attempts: 3,
            first_byte_timeout: Duration::from_secs(10),
        },
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/clients.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .env("GATEWAY", &gateway)
        .env("NO_PROXY", "*")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}
