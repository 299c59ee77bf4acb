//! The HTTP contract: `openapi/api.yaml` (the node's API) and
//! `openapi/gateway.yaml` (the Ollama-compatible gateway), OpenAPI 3.1.
//! Every route of the two routers is documented and every documented
//! operation is served (not the fallback), and schemathesis (from PyPI,
//! into a virtualenv the test creates) fuzzes both servers of a node with a
//! stand-in Ollama: no 5xx, every status code, content type, header and
//! body as documented. Without python3 or PyPI the schemathesis test skips
//! with a loud message; under `CI=true` that is a failure.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ollamacron_gateway::FORWARDED_PATHS;
use ollamacron_tests::pool::{
    Member, SERVE_LIMITS, member_with_settings, models, sees, serve_gateway,
};
use serde_json::Value;

/// The schemathesis release the test installs.
const SCHEMATHESIS: &str = "schemathesis==4.32.5";
/// Examples generated per operation and phase.
const EXAMPLES: &str = "50";

fn document_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../openapi")
        .join(format!("{name}.yaml"))
}

fn document(name: &str) -> Value {
    let text = std::fs::read_to_string(document_path(name)).unwrap();
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{name}.yaml: {e}"))
}

/// Every (METHOD, path) the document describes.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    assert_eq!(doc["openapi"], "3.1.0");
    let methods = ["get", "head", "post", "put", "patch", "delete"];
    doc["paths"]
        .as_object()
        .unwrap()
        .iter()
        .flat_map(|(path, item)| {
            methods
                .iter()
                .filter(|m| item.get(**m).is_some())
                .map(|m| (m.to_uppercase(), path.clone()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// A node serving `llama3:8b` from a stand-in Ollama, with its API and
/// gateway on free ports.
async fn node_with_both_servers() -> (Member, SocketAddr, SocketAddr) {
    let member = member_with_settings(
        models(&["llama3:8b"]),
        None,
        SERVE_LIMITS,
        &[("enable_metrics", "true"), ("api_listen", "127.0.0.1:0")],
    )
    .await;
    sees(&member.node, &["llama3:8b"]).await;
    let api = member.node.api_addr().unwrap();
    let gateway = serve_gateway(&member.node, Some(member.local()), &[]).await;
    (member, api, gateway)
}

/// Whether `METHOD path` reached a route of the server at `addr` (not the
/// router's fallback for an unknown path or method).
async fn is_routed(addr: SocketAddr, method: &str, path: &str) -> bool {
    let path = path.replace("{id}", "no-such-service");
    let body = (method == "POST").then_some(&b"{}"[..]);
    let answer = ollamacron_tests::http_request(addr, method, &path, body)
        .await
        .unwrap();
    let fallback = answer.status == 405
        || (answer.status == 404
            && (answer.body.contains("no such endpoint")
                || answer.body.contains("has no endpoint")));
    !fallback
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documents_name_every_route_and_each_one_is_served() {
    let api_doc = operations(&document("api"));
    let gateway_doc = operations(&document("gateway"));
    // Every route the gateway's router is built from is documented.
    let mut gateway_routes: BTreeSet<(String, String)> = FORWARDED_PATHS
        .iter()
        .map(|p| ("POST".to_owned(), (*p).to_owned()))
        .collect();
    for path in ["/", "/api/version", "/api/tags", "/api/ps", "/v1/models"] {
        gateway_routes.insert(("GET".to_owned(), path.to_owned()));
    }
    gateway_routes.insert(("HEAD".to_owned(), "/".to_owned()));
    assert_eq!(
        gateway_doc, gateway_routes,
        "gateway.yaml and the router differ"
    );

    let (member, api, gateway) = node_with_both_servers().await;
    for (method, path) in &api_doc {
        assert!(
            is_routed(api, method, path).await,
            "{method} {path} is documented but not served by the API"
        );
    }
    for (method, path) in &gateway_doc {
        assert!(
            is_routed(gateway, method, path).await,
            "{method} {path} is documented but not served by the gateway"
        );
    }
    // The check can tell: what neither documents nor serves is the fallback.
    assert!(!is_routed(api, "GET", "/v1/nothing").await);
    assert!(!is_routed(api, "PUT", "/v1/status").await);
    assert!(!is_routed(gateway, "GET", "/api/nothing").await);
    // Everything the API's fallback message names is documented.
    for (method, path) in [
        ("GET", "/"),
        ("GET", "/dashboard.js"),
        ("GET", "/dashboard.css"),
        ("GET", "/v1/status"),
        ("GET", "/v1/peers"),
        ("GET", "/v1/models"),
        ("GET", "/v1/services"),
        ("POST", "/v1/services"),
        ("GET", "/v1/services/local"),
        ("DELETE", "/v1/services/{id}"),
        ("GET", "/healthz"),
        ("GET", "/metrics"),
    ] {
        assert!(
            api_doc.contains(&(method.to_owned(), path.to_owned())),
            "{method} {path} is served but not in api.yaml"
        );
    }
    assert_eq!(
        api_doc.len(),
        12,
        "api.yaml has an operation the router lacks: {api_doc:?}"
    );
    member.node.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_error_and_every_answer_as_documented() {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("schemathesis-venv");
    let python = match tokio::task::spawn_blocking(move || {
        ollamacron_tests::python::venv(&dir, &[SCHEMATHESIS])
    })
    .await
    .unwrap()
    {
        Ok(python) => python,
        Err(reason) => {
            ollamacron_tests::python::skip_without(&format!(
                "SKIPPED schemathesis: cannot install {SCHEMATHESIS}: {reason}"
            ));
            return;
        }
    };
    let schemathesis = python.with_file_name("schemathesis");
    let (member, api, gateway) = node_with_both_servers().await;
    let work = tempfile::tempdir().unwrap();
    for (name, addr) in [("api", api), ("gateway", gateway)] {
        // Input validation is stricter than a schema can say (byte limits,
        // not characters): the two checks of it are left out; every check
        // of the answers runs.
        let out = tokio::process::Command::new(&schemathesis)
            .arg("run")
            .arg(document_path(name))
            .args(["--url", &format!("http://{addr}")])
            .args(["--checks", "all"])
            .args([
                "--exclude-checks",
                "negative_data_rejection,positive_data_acceptance",
            ])
            .args(["--max-examples", EXAMPLES])
            .arg("--generation-deterministic")
            .args(["--request-timeout", "30"])
            .current_dir(work.path())
            .env("NO_PROXY", "*")
            .env("NO_COLOR", "1")
            .output()
            .await
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "schemathesis against the {name} found failures:\n{report}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(report.contains("passed"), "{report}");
    }
    member.node.shutdown().await.unwrap();
}
