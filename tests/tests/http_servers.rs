//! What a real client sends, against the gateway (served as the node binary
//! serves it) and the node's API: image-sized bodies arrive byte-identical
//! locally and one hop away, a body over the limit gets a JSON 413, slow
//! clients are closed while real requests are served, foreign `Host`s and
//! `Origin`s are refused while a trusted page's preflight passes, and keys
//! are checked.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::net::SocketAddr;

use ollamacron_gateway::ServeLimits;
use ollamacron_node_core::NodeHandle;
use ollamacron_tests::ollama_standin::ReceivedBody;
use ollamacron_tests::pool::{SERVE_LIMITS, member, member_with, models, sees, serve_gateway};
use ollamacron_tests::{
    EVENT_TIMEOUT, TCP_ONLY, http_request, http_request_with, loopback_config, start,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A chat with one image of about `size` bytes (base64 text, as clients
/// send it), not streamed.
fn image_chat(model: &str, size: usize) -> Vec<u8> {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let image: String = (0..size)
        .map(|i| char::from(alphabet[(i * 7 + i / 64) % alphabet.len()]))
        .collect();
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "what is in this picture?", "images": [image]}],
        "stream": false,
    })
    .to_string()
    .into_bytes()
}

const MIB: usize = 1024 * 1024;

/// Chat bodies `member`'s Ollama received (its advertiser posts to
/// `/api/show` too).
fn chats(member: &ollamacron_tests::pool::Member) -> usize {
    member
        .ollama
        .models()
        .bodies
        .iter()
        .filter(|b| b.path == "/api/chat")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn image_sized_bodies_arrive_byte_identical_locally_and_one_hop_away() {
    let a = member(&[], None).await;
    let b = member(&["vision:1b"], Some(&a.bootstrap_addr().await)).await;
    sees(&a.node, &["vision:1b"]).await;
    let one_hop = serve_gateway(&a.node, None, &[]).await;
    let local = serve_gateway(&b.node, Some(b.local()), &[]).await;
    for (size, gateway, how) in [
        (3 * MIB, one_hop, "one hop"),
        (3 * MIB, local, "local"),
        (30 * MIB, one_hop, "one hop"),
        (30 * MIB, local, "local"),
    ] {
        let body = image_chat("vision:1b", size);
        let response = http_request(gateway, "POST", "/api/chat", Some(&body))
            .await
            .unwrap();
        assert_eq!(
            response.status, 200,
            "{how}, {size} bytes: {}",
            response.body
        );
        assert_eq!(response.json()["done"], true, "{how}");
        let received = b.ollama.models().bodies.last().cloned();
        assert_eq!(
            received,
            Some(ReceivedBody::of("/api/chat", &body)),
            "{how}: a {size}-byte body arrives as sent"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_gets_a_json_413_naming_the_setting() {
    let a = member(&[], None).await;
    // B takes at most 1 MiB from peers.
    let small = ServeLimits {
        max_request_bytes: MIB as u64,
        ..SERVE_LIMITS
    };
    let b = member_with(
        models(&["vision:1b"]),
        Some(&a.bootstrap_addr().await),
        small,
    )
    .await;
    sees(&a.node, &["vision:1b"]).await;
    let limited = serve_gateway(&a.node, None, &[("gateway_max_request_bytes", "1MiB")]).await;

    // Over the gateway's own limit: refused before anything is routed.
    let body = image_chat("vision:1b", 2 * MIB);
    let response = http_request(limited, "POST", "/api/chat", Some(&body))
        .await
        .unwrap();
    let message = response.error_message(413);
    assert!(message.contains("gateway_max_request_bytes"), "{message}");
    assert_eq!(chats(&b), 0);

    // A client that waits for 100-continue hears no at once.
    let mut stream = tokio::net::TcpStream::connect(limited).await.unwrap();
    let head = format!(
        "POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\n\r\n",
        50 * MIB
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(EVENT_TIMEOUT, stream.read(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("gateway_max_request_bytes"), "{answer}");

    // Within the gateway's limit but over the serving node's: its 413.
    let open = serve_gateway(&a.node, None, &[]).await;
    let response = http_request(open, "POST", "/api/chat", Some(&body))
        .await
        .unwrap();
    let message = response.error_message(413);
    assert!(message.contains("this node's limit"), "{message}");
    assert_eq!(chats(&b), 0, "refused before Ollama");

    // Within both: served.
    let body = image_chat("vision:1b", MIB / 2);
    let response = http_request(limited, "POST", "/api/chat", Some(&body))
        .await
        .unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
}

/// A node with its API on a free loopback port, and `overrides`.
async fn node_with_api(overrides: &[(&str, &str)]) -> (NodeHandle, SocketAddr) {
    let mut settings = vec![("enable_metrics", "true"), ("api_listen", "127.0.0.1:0")];
    settings.extend_from_slice(overrides);
    let node = start(loopback_config(TCP_ONLY, &settings)).await.unwrap();
    let api = node.api_addr().unwrap();
    (node, api)
}

/// Open `count` connections that send half a request's headers; each must
/// be closed by `server` (with no answer) while a real request is served.
async fn half_open_connections_are_closed(server: SocketAddr, path: &str) {
    let mut slow = Vec::new();
    for _ in 0..50 {
        let mut s = tokio::net::TcpStream::connect(server).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: sl")
            .await
            .unwrap();
        slow.push(s);
    }
    let served = http_request(server, "GET", path, None).await.unwrap();
    assert_eq!(served.status, 200, "{served:?}");
    for s in &mut slow {
        let mut seen = Vec::new();
        tokio::time::timeout(EVENT_TIMEOUT, s.read_to_end(&mut seen))
            .await
            .expect("a half-open connection is closed")
            .ok();
        assert!(seen.is_empty(), "{}", String::from_utf8_lossy(&seen));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_connections_are_closed_on_the_gateway_and_the_api() {
    let fast = [("http_header_read_timeout", "500ms")];
    let (node, api) = node_with_api(&fast).await;
    let gateway = serve_gateway(&node, None, &fast).await;
    half_open_connections_are_closed(gateway, "/").await;
    half_open_connections_are_closed(api, "/healthz").await;
}

/// Both checks of a browser's request on `server`: a DNS-rebinding
/// `Host` and a foreign page's `Origin` are refused with JSON 403s; a
/// trusted page's preflight and request pass.
async fn browsers_are_checked(server: SocketAddr, path: &str, method: &str, body: &[u8]) {
    let port = server.port().to_string();
    let rebound_host = format!("evil.example:{port}");
    let response = http_request_with(server, method, path, &[("Host", &rebound_host)], Some(body))
        .await
        .unwrap();
    assert!(response.error_message(403).contains("evil.example"));
    let response = http_request_with(
        server,
        method,
        path,
        &[("Origin", "http://evil.example")],
        Some(body),
    )
    .await
    .unwrap();
    assert!(response.error_message(403).contains("origin"));

    let trusted = "http://localhost:5173";
    let preflight = http_request_with(
        server,
        "OPTIONS",
        path,
        &[
            ("Origin", trusted),
            ("Access-Control-Request-Method", method),
            (
                "Access-Control-Request-Headers",
                "content-type, authorization",
            ),
        ],
        None,
    )
    .await
    .unwrap();
    assert_eq!(preflight.status, 204, "{preflight:?}");
    let headers = preflight.headers.to_ascii_lowercase();
    assert!(
        headers.contains(&format!("access-control-allow-origin: {trusted}")),
        "{headers}"
    );
    assert!(
        headers.contains("access-control-allow-methods:"),
        "{headers}"
    );
    let response = http_request_with(server, method, path, &[("Origin", trusted)], Some(body))
        .await
        .unwrap();
    assert!(response.status < 400, "{response:?}");
    assert!(
        response
            .headers
            .to_ascii_lowercase()
            .contains(&format!("access-control-allow-origin: {trusted}")),
        "{response:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_hosts_and_origins_are_refused_on_the_gateway_and_the_api() {
    let a = member(&[], None).await;
    let b = member(&["llama3:8b"], Some(&a.bootstrap_addr().await)).await;
    sees(&a.node, &["llama3:8b"]).await;
    let gateway = serve_gateway(&a.node, None, &[]).await;
    let chat = br#"{"model": "llama3:8b", "messages": [{"role": "user", "content": "hi"}], "stream": false}"#;
    browsers_are_checked(gateway, "/api/chat", "POST", chat).await;
    // Only the trusted page's request reached an Ollama.
    assert_eq!(b.ollama.models().generate_calls, 1);

    let (node, api) = node_with_api(&[]).await;
    let service = br#"{"name": "x:1b", "type": "llm"}"#;
    browsers_are_checked(api, "/v1/services", "POST", service).await;
    let local = node.local_services().await.unwrap();
    assert_eq!(
        local.len(),
        1,
        "only the trusted page registered: {local:?}"
    );

    // An operator's own name and origin, configured.
    let gateway = serve_gateway(
        &a.node,
        None,
        &[
            ("gateway_allowed_hosts", "[pool.lan]"),
            ("gateway_allowed_origins", "[https://chat.pool.lan]"),
        ],
    )
    .await;
    let response = http_request_with(
        gateway,
        "GET",
        "/api/tags",
        &[
            ("Host", "pool.lan:11435"),
            ("Origin", "https://chat.pool.lan"),
        ],
        None,
    )
    .await
    .unwrap();
    assert_eq!(response.status, 200, "{response:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_are_required_when_configured_on_the_gateway_and_the_api() {
    let keys = [
        ("gateway_api_keys", "[gateway-key-1]"),
        ("api_keys", "[api-key-1, api-key-2]"),
    ];
    let (node, api) = node_with_api(&keys).await;
    let gateway = serve_gateway(&node, None, &keys).await;
    for (server, path, key, setting) in [
        (gateway, "/api/tags", "gateway-key-1", "gateway_api_keys"),
        (api, "/v1/status", "api-key-2", "api_keys"),
    ] {
        let missing = http_request(server, "GET", path, None).await.unwrap();
        assert!(missing.error_message(401).contains(setting));
        assert!(
            missing
                .headers
                .to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{missing:?}"
        );
        let wrong = http_request_with(
            server,
            "GET",
            path,
            &[("Authorization", "Bearer not-the-key")],
            None,
        )
        .await
        .unwrap();
        let _ = wrong.error_message(401);
        let bearer = format!("Bearer {key}");
        let right = http_request_with(server, "GET", path, &[("Authorization", &bearer)], None)
            .await
            .unwrap();
        assert_eq!(right.status, 200, "{right:?}");
    }
    // Liveness needs no key.
    assert_eq!(
        http_request(api, "GET", "/healthz", None)
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        http_request(gateway, "GET", "/", None)
            .await
            .unwrap()
            .status,
        200
    );
    // One server's key does not open the other.
    let crossed = http_request_with(
        api,
        "GET",
        "/v1/status",
        &[("Authorization", "Bearer gateway-key-1")],
        None,
    )
    .await
    .unwrap();
    let _ = crossed.error_message(401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_says_which_server_is_open_to_the_network() {
    // Nothing binds the gateway here: status reads the settings.
    let (node, api) = node_with_api(&[("gateway_listen", "0.0.0.0:11435")]).await;
    let status = http_request(api, "GET", "/v1/status", None)
        .await
        .unwrap()
        .json();
    let gateway = &status["http"]["gateway"];
    assert_eq!(gateway["beyond_loopback"], true, "{status}");
    assert_eq!(gateway["requires_key"], false, "{status}");
    assert_eq!(gateway["open_to_network"], true, "{status}");
    assert_eq!(status["http"]["api"]["open_to_network"], false, "{status}");
    node.shutdown().await.unwrap();

    let (_node, api) = node_with_api(&[
        ("gateway_listen", "0.0.0.0:11435"),
        ("gateway_api_keys", "[a-long-key]"),
    ])
    .await;
    let status = http_request(api, "GET", "/v1/status", None)
        .await
        .unwrap()
        .json();
    assert_eq!(
        status["http"]["gateway"]["open_to_network"], false,
        "{status}"
    );
    assert_eq!(status["http"]["gateway"]["requires_key"], true, "{status}");
}
