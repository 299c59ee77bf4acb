//! The dashboard at the API's root, in headless Chromium: a three-node
//! mesh with stand-in Ollamas, the API behind a key. The page asks for the
//! key, then shows this node, both peers connected directly, every model
//! with the nodes serving it and the gateway's traffic; when a node leaves
//! it shows it not connected, in the peers and beside its models. The screenshots stay in
//! `target/test-artifacts/dashboard/`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use ollamacron_tests::browser::{CHROMIUM, playwright};
use ollamacron_tests::pool::{
    SERVE_LIMITS, member, member_with_settings, models, sees, serve_gateway,
};
use ollamacron_tests::python::skip_without;
use ollamacron_tests::{http_request, http_request_with};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const API_KEY: &str = "dashboard-test-key";
/// How long the page may take to show what the API has.
const PAGE_TIMEOUT: Duration = Duration::from_secs(60);

fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-artifacts/dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn next_report(
    lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
) -> Value {
    let line = tokio::time::timeout(PAGE_TIMEOUT + Duration::from_secs(30), lines.next_line())
        .await
        .expect("the browser script said nothing in time")
        .unwrap()
        .expect("the browser script ended without a report");
    let report: Value = serde_json::from_str(&line).unwrap();
    assert!(
        report.get("error").is_none(),
        "the page did not show it: {report:#}"
    );
    report
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_mesh_and_follows_a_node_leaving() {
    let modules = match playwright(&Path::new(env!("CARGO_TARGET_TMPDIR")).join("playwright")) {
        Ok(modules) => modules,
        Err(why) => {
            skip_without(&format!(
                "the dashboard test needs Chromium and playwright-core: {why}"
            ));
            return;
        }
    };
    let keys = format!("[{API_KEY}]");
    let a = member_with_settings(
        models(&["llama3:8b"]),
        None,
        SERVE_LIMITS,
        &[
            ("enable_metrics", "true"),
            ("api_listen", "127.0.0.1:0"),
            ("api_keys", &keys),
            ("dht_mode", "server"),
        ],
    )
    .await;
    let a_addr = a.bootstrap_addr().await;
    let b = member(&["llama3:8b", "nomic-embed-text"], Some(&a_addr)).await;
    let c = member(&["qwen2.5:0.5b"], Some(&a_addr)).await;
    sees(&a.node, &["llama3:8b", "nomic-embed-text", "qwen2.5:0.5b"]).await;
    let api = a.node.api_addr().unwrap();
    // The data is behind the key; the page is not.
    assert_eq!(
        http_request(api, "GET", "/v1/models", None)
            .await
            .unwrap()
            .status,
        401
    );
    let page = http_request(api, "GET", "/", None).await.unwrap();
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("<script src=\"/dashboard.js\""),
        "{}",
        page.body
    );
    let auth = format!("Bearer {API_KEY}");
    let listed = http_request_with(api, "GET", "/v1/models", &[("authorization", &auth)], None)
        .await
        .unwrap();
    assert_eq!(listed.status, 200, "{}", listed.body);

    // Some traffic through A's gateway.
    let gw = serve_gateway(&a.node, Some(a.local()), &[]).await;
    for model in ["llama3:8b", "qwen2.5:0.5b"] {
        let body = format!(r#"{{"model": "{model}", "prompt": "hi", "stream": false}}"#);
        let answer = http_request(gw, "POST", "/api/generate", Some(body.as_bytes()))
            .await
            .unwrap();
        assert_eq!(answer.status, 200, "{model}: {}", answer.body);
    }

    let (a_id, b_id, c_id) = (
        a.node.peer_id().to_string(),
        b.node.peer_id().to_string(),
        c.node.peer_id().to_string(),
    );
    let screenshots = artifacts();
    let user_data = tempfile::tempdir().unwrap();
    let config = json!({
        "url": format!("http://{api}/"),
        "key": API_KEY,
        "chromium": CHROMIUM,
        "user_data_dir": user_data.path(),
        "screenshots": screenshots,
        "self": a_id,
        "peers": [b_id, c_id],
        "models": {
            "llama3:8b": [a_id, b_id],
            "nomic-embed-text:latest": [b_id],
            "qwen2.5:0.5b": [c_id],
        },
        "gone": c_id,
    });
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboard/check_dashboard.mjs");
    let mut browser = tokio::process::Command::new("node")
        .arg(&script)
        .arg(config.to_string())
        .env("PLAYWRIGHT_MODULES", &modules)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(browser.stdout.take().unwrap()).lines();
    let mut stdin = browser.stdin.take().unwrap();

    let shown = next_report(&mut lines).await;
    let view = &shown["shown"];
    assert_eq!(view["self"], a_id.as_str());
    assert_eq!(view["key_form"], false, "{view:#}");
    let kinds: Vec<&str> = view["kinds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"direct: 2"), "{kinds:?}");
    let llama = view["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "llama3:8b")
        .unwrap();
    assert!(
        llama["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["text"].as_str().unwrap().contains("this node")),
        "{llama:#}"
    );
    let traffic: Vec<(&str, &str)> = view["traffic"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["model"].as_str().unwrap(), t["peer"].as_str().unwrap()))
        .collect();
    // A or B served llama3 (both have it); only C has qwen.
    assert!(
        traffic
            .iter()
            .any(|(model, peer)| *model == "llama3:8b" && (*peer == "local" || *peer == b_id)),
        "{traffic:?}"
    );
    assert!(
        traffic.contains(&("qwen2.5:0.5b", c_id.as_str())),
        "{traffic:?}"
    );
    assert!(Path::new(shown["screenshot"].as_str().unwrap()).exists());

    // C leaves: the page follows without a reload.
    c.node.shutdown().await.unwrap();
    stdin.write_all(b"left\n").await.unwrap();
    let updated = next_report(&mut lines).await;
    let peers = updated["updated"]["peers"].as_array().unwrap();
    assert!(
        peers
            .iter()
            .any(|p| p["id"] == b_id.as_str() && p["connection"] == "direct"),
        "{peers:?}"
    );
    assert!(Path::new(updated["screenshot"].as_str().unwrap()).exists());
    let status = tokio::time::timeout(Duration::from_secs(30), browser.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.success(),
        "the browser script failed (page errors?): {updated:#}"
    );
    drop(b);
}
