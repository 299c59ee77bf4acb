//! The local HTTP API of real nodes on 127.0.0.1: every endpoint, and every
//! kind of bad input answered with a 4xx JSON error naming what was wrong.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::net::SocketAddr;

use ollamacron_node_core::{MAX_BODY_BYTES, NodeHandle};
use ollamacron_tests::{HttpResponse, TCP_ONLY, eventually, http_request, loopback_config, start};
use serde_json::{Value, json};

async fn api_node(extra: &[(&str, &str)]) -> (NodeHandle, SocketAddr) {
    let mut settings = vec![("enable_metrics", "true"), ("api_listen", "127.0.0.1:0")];
    settings.extend_from_slice(extra);
    let node = start(loopback_config(TCP_ONLY, &settings)).await.unwrap();
    let api = node.api_addr().unwrap();
    (node, api)
}

async fn get(api: SocketAddr, path: &str) -> HttpResponse {
    http_request(api, "GET", path, None).await.unwrap()
}

async fn post(api: SocketAddr, path: &str, body: &[u8]) -> HttpResponse {
    http_request(api, "POST", path, Some(body)).await.unwrap()
}

/// A 4xx JSON error with `status`, naming `field` when given.
fn assert_error(response: &HttpResponse, status: u16, field: Option<&str>) -> String {
    let message = response.error_message(status);
    if let Some(field) = field {
        let body = response.json();
        assert_eq!(body["field"], field, "{body}");
    }
    message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_peers_describe_the_node_and_its_peers() {
    let (a, api) = api_node(&[("region", "eu")]).await;
    let b = start(loopback_config(TCP_ONLY, &[])).await.unwrap();
    b.dial(a.dialable_addrs().await.unwrap().remove(0))
        .await
        .unwrap();

    // b's dial returns when b sees the connection; a may see it a moment later.
    let s = eventually("a to count b's connection", || async {
        let status = get(api, "/v1/status").await;
        assert_eq!(status.status, 200, "{status:?}");
        let s = status.json();
        (s["connections"]["peers"] == 1).then_some(s)
    })
    .await
    .unwrap();
    assert_eq!(s["peer_id"], a.peer_id().to_string());
    assert_eq!(s["state"], "running");
    assert_eq!(s["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(s["reachability"], "unknown");
    assert!(s["uptime_secs"].as_f64().unwrap() >= 0.0);
    assert!(
        s["listen_addrs"][0]
            .as_str()
            .unwrap()
            .starts_with("/ip4/127.0.0.1/tcp/")
    );
    assert!(s["external_addrs"].is_array());
    assert_eq!(s["connections"]["peers"], 1);
    let open = s["connections"]["inbound"].as_u64().unwrap()
        + s["connections"]["outbound"].as_u64().unwrap();
    assert!(open >= 1, "{s}");
    let sources: Vec<&str> = s["discovery"]["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["source"].as_str().unwrap())
        .collect();
    assert_eq!(sources, ["mdns", "dht", "bootstrap", "identify"]);
    assert_eq!(s["services"]["local"], 0);

    let b_id = b.peer_id().to_string();
    let peer = eventually("b with a latency in /v1/peers", || async {
        let peers = get(api, "/v1/peers").await.json();
        peers
            .as_array()?
            .iter()
            .find(|p| p["peer_id"] == b_id.as_str() && p["latency_ms"].is_number())
            .cloned()
    })
    .await
    .unwrap();
    assert_eq!(peer["connected"], true);
    assert!(
        peer["sources"]
            .as_array()
            .unwrap()
            .contains(&json!("identify"))
    );
    assert!(peer["last_seen_ms"].as_u64().unwrap() > 0);
    assert!(
        peer["agent_version"]
            .as_str()
            .unwrap()
            .starts_with("ollamacron-node/")
    );

    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_are_registered_listed_found_with_scores_and_deleted() {
    let (a, api_a) = api_node(&[]).await;
    let (b, api_b) = api_node(&[(
        "bootstrap",
        &a.dialable_addrs().await.unwrap()[0].to_string(),
    )])
    .await;

    let service = json!({
        "name": "llama3:8b", "type": "llm", "tags": ["gpu"],
        "capabilities": ["completion", "tools"], "metadata": {"context_length": "8192"}
    });
    let created = post(api_a, "/v1/services", service.to_string().as_bytes()).await;
    assert_eq!(created.status, 201, "{created:?}");
    let stored = created.json();
    assert_eq!(stored["id"], "llama3:8b", "id defaults to the name");
    assert_eq!(stored["peer_id"], a.peer_id().to_string());
    let replaced = post(api_a, "/v1/services", service.to_string().as_bytes()).await;
    assert_eq!(
        replaced.status, 200,
        "the same id again replaces: {replaced:?}"
    );

    let local = get(api_a, "/v1/services/local").await.json();
    assert_eq!(local.as_array().unwrap().len(), 1);

    // b finds it through the DHT, with the score and its parts.
    let found = eventually("b to find a's service", || async {
        let found = get(
            api_b,
            "/v1/services?type=llm&tag=gpu&capability=tools&limit=5",
        )
        .await;
        assert_eq!(found.status, 200, "{found:?}");
        let list = found.json();
        (list.as_array()?.len() == 1).then_some(list)
    })
    .await
    .unwrap();
    let entry = &found[0];
    assert_eq!(entry["service"]["name"], "llama3:8b");
    assert_eq!(entry["local"], false);
    for part in [
        "total",
        "reliability",
        "latency",
        "throughput",
        "availability",
    ] {
        let v = entry["score"][part].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&v), "{part}: {v}");
    }
    let none = get(api_b, "/v1/services?type=llm&tag=cpu").await.json();
    assert_eq!(none, json!([]));

    let deleted = http_request(api_a, "DELETE", "/v1/services/llama3:8b", None)
        .await
        .unwrap();
    assert_eq!(deleted.status, 204, "{deleted:?}");
    let again = http_request(api_a, "DELETE", "/v1/services/llama3:8b", None)
        .await
        .unwrap();
    assert_error(&again, 404, Some("id"));
    eventually("the withdrawal to reach b", || async {
        let list = get(api_b, "/v1/services?type=llm").await.json();
        (list == json!([])).then_some(())
    })
    .await
    .unwrap();

    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_json_error_naming_what_was_wrong() {
    let (node, api) = api_node(&[]).await;

    // Bodies.
    let malformed = post(api, "/v1/services", b"{\"name\": \"a\", ").await;
    assert!(assert_error(&malformed, 400, None).contains("invalid service JSON"));
    let not_json = post(api, "/v1/services", b"{bad").await;
    assert_error(&not_json, 400, None);
    assert!(not_json.json().get("field").is_none(), "{not_json:?}");
    let wrong_type = post(
        api,
        "/v1/services",
        br#"{"name": "a", "type": "llm", "tags": "gpu"}"#,
    )
    .await;
    assert_error(&wrong_type, 400, Some("tags"));
    let not_a_number = post(
        api,
        "/v1/services",
        br#"{"name": "a", "type": "llm", "port": "x"}"#,
    )
    .await;
    assert_error(&not_a_number, 400, Some("port"));
    let unknown = post(
        api,
        "/v1/services",
        br#"{"name": "a", "type": "llm", "colour": 1}"#,
    )
    .await;
    assert!(assert_error(&unknown, 400, None).contains("colour"));
    let no_type = post(api, "/v1/services", br#"{"name": "a"}"#).await;
    assert_error(&no_type, 422, Some("type"));
    let no_id = post(api, "/v1/services", br#"{"type": "llm"}"#).await;
    assert_error(&no_id, 422, Some("id"));
    let long_tag = json!({"name": "a", "type": "llm", "tags": ["t".repeat(300)]});
    let long = post(api, "/v1/services", long_tag.to_string().as_bytes()).await;
    assert!(assert_error(&long, 422, Some("tags")).contains("300 bytes"));
    let other_peer = post(
        api,
        "/v1/services",
        br#"{"name": "a", "type": "llm", "peer_id": "12D3KooWAnother"}"#,
    )
    .await;
    assert_error(&other_peer, 400, Some("peer_id"));
    let huge = vec![b' '; MAX_BODY_BYTES + 1];
    let too_big = post(api, "/v1/services", &huge).await;
    assert_error(&too_big, 413, None);

    // Queries.
    for (path, field) in [
        ("/v1/services?colour=red", "colour"),
        ("/v1/services?limit=-3", "limit"),
        ("/v1/services?limit=many", "limit"),
        ("/v1/services?min_reliability=1.5", "min_reliability"),
        ("/v1/services?max_latency=fast", "max_latency"),
        ("/v1/services?type=a&type=b", "type"),
        ("/v1/status?verbose=1", "verbose"),
        ("/v1/peers?all=yes", "all"),
    ] {
        assert_error(&get(api, path).await, 400, Some(field));
    }
    let long_query = format!("/v1/services?region={}", "r".repeat(300));
    assert_error(&get(api, &long_query).await, 400, Some("region"));

    // Routes and methods.
    assert_error(&get(api, "/v1/nothing").await, 404, None);
    let wrong_method = http_request(api, "PUT", "/v1/status", None).await.unwrap();
    assert_error(&wrong_method, 405, None);

    // Nothing was registered by any of it, and the node is fine.
    assert_eq!(get(api, "/v1/services/local").await.json(), json!([]));
    assert_eq!(get(api, "/healthz").await.status, 200);
    let metrics = get(api, "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert!(metrics.body.contains("ollamacron_node_state"));
    let _: Value = get(api, "/v1/status").await.json();
    node.shutdown().await.unwrap();
}
