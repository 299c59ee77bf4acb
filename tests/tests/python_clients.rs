//! The official `ollama` and `openai` Python clients, unchanged, against the
//! gateway of a two-node mesh (`tests/python/clients.py`): chat and
//! generate, streamed and not, list, embed, an unknown model, chats with a
//! 3 MiB image (which must reach the serving Ollama byte for byte) and tool
//! calls.
//!
//! The clients are installed from PyPI into a virtualenv under the target
//! directory the first time. Without python3 (with venv) or PyPI the test
//! skips with a loud message; under `CI=true` that is a failure.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};

use ollamacron_tests::ollama_standin::{StandInModels, tag};
use ollamacron_tests::pool::{SERVE_LIMITS, member, member_with, sees, serve_gateway};

/// The client versions the test installs.
const PACKAGES: [&str; 2] = ["ollama==0.6.3", "openai==3.57.0"];

/// The virtualenv with the clients, created once; `Err` says why not.
fn clients_venv() -> Result<PathBuf, String> {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("python-clients-venv");
    ollamacron_tests::python::venv(&dir, &PACKAGES)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_clients_work_against_the_gateway() {
    let python = match tokio::task::spawn_blocking(clients_venv).await.unwrap() {
        Ok(python) => python,
        Err(reason) => {
            ollamacron_tests::python::skip_without(&format!(
                "SKIPPED python_clients: cannot install the ollama and openai clients: {reason}"
            ));
            return;
        }
    };

    // B serves the models from its stand-in Ollama; A only routes.
    let a = member(&[], None).await;
    let a_addr = a.bootstrap_addr().await;
    let b = member_with(
        StandInModels {
            models: vec![
                tag("llama3:8b", "aaa", "llama"),
                tag("nomic-embed-text:latest", "bbb", "nomic-bert"),
            ],
            ..StandInModels::default()
        },
        Some(&a_addr),
        SERVE_LIMITS,
    )
    .await;
    sees(&a.node, &["llama3:8b", "nomic-embed-text:latest"]).await;
    let gateway = format!("http://{}", serve_gateway(&a.node, None, &[]).await);

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

    // The 3 MiB image (4 MiB in base64) reached B's Ollama whole: twice on
    // each chat endpoint (streamed and not).
    let big = |path: &str| {
        b.ollama
            .models()
            .bodies
            .iter()
            .filter(|body| body.path == path && body.length > 4 * 1024 * 1024)
            .count()
    };
    assert_eq!(big("/api/chat"), 2, "image chats at /api/chat");
    assert_eq!(
        big("/v1/chat/completions"),
        2,
        "image chats at /v1/chat/completions"
    );
}
