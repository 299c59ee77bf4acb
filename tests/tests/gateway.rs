//! The gateway across three nodes, each with its own stand-in Ollama: a
//! request to A for a model only C has is served by C and streamed back
//! chunk by chunk over `/ollamacron/infer/2.0.0`; `/api/tags` lists every
//! model once; failover before the first byte; unknown models are 404.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::time::Duration;

use ollamacron_gateway::ServeLimits;
use ollamacron_node_core::NodeHandle;
use ollamacron_node_core::registry::{RankedService, ServiceQuery};
use ollamacron_tests::ollama_standin::TOKENS;
use ollamacron_tests::pool::{Member, member, member_with, models, sees, serve_gateway};
use ollamacron_tests::{eventually, http_request, metric_value};

async fn gateway(member: &Member) -> std::net::SocketAddr {
    serve_gateway(&member.node, Some(member.local()), &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_served_by_the_node_that_has_the_model_and_streamed_back() {
    let a = member(&[], None).await;
    let a_addr = a.node.dialable_addrs().await.unwrap().remove(0).to_string();
    let b = member(&["llama3:8b", "shared:1b"], Some(&a_addr)).await;
    let c = member(&["mistral:7b", "shared:1b"], Some(&a_addr)).await;
    sees(&a.node, &["llama3:8b", "mistral:7b", "shared:1b"]).await;
    let gw = gateway(&a).await;

    // Only C has mistral: C's Ollama serves it, token by token (NDJSON).
    let body = br#"{"model": "mistral:7b", "prompt": "Why is the sky blue?"}"#;
    let response = http_request(gw, "POST", "/api/generate", Some(body))
        .await
        .unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    let text = response.body.clone();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), TOKENS.len() + 1, "{text}");
    let streamed: String = lines
        .iter()
        .filter_map(|l| l["response"].as_str())
        .collect();
    assert_eq!(streamed, TOKENS.concat());
    assert_eq!(lines.last().unwrap()["done"], true);
    assert_eq!(lines[0]["model"], "mistral:7b");
    assert_eq!(c.ollama.models().generate_calls, 1);
    assert_eq!(b.ollama.models().generate_calls, 0);

    // Chat, not streamed; `name` and `name:latest` are the same model.
    let body = br#"{"model": "llama3:8b", "messages": [{"role": "user", "content": "hi"}], "stream": false}"#;
    let response = http_request(gw, "POST", "/api/chat", Some(body))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    assert_eq!(response.json()["message"]["content"], TOKENS.concat());
    assert_eq!(b.ollama.models().generate_calls, 1);

    // /api/tags lists each model of the mesh once.
    let tags = http_request(gw, "GET", "/api/tags", None)
        .await
        .unwrap()
        .json();
    let mut names: Vec<&str> = tags["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["llama3:8b", "mistral:7b", "shared:1b"]);

    // What clients probe first.
    let root = http_request(gw, "GET", "/", None).await.unwrap();
    assert_eq!(
        (root.status, root.body.as_str()),
        (200, "Ollama is running")
    );
    assert_eq!(
        http_request(gw, "HEAD", "/", None).await.unwrap().status,
        200
    );
    let version = http_request(gw, "GET", "/api/version", None)
        .await
        .unwrap()
        .json();
    // The mesh's Ollama version (the stand-ins say 0.9.0), not ours.
    assert_eq!(version["version"], "0.9.0", "{version}");
    assert_eq!(
        version["ollamacron"],
        env!("CARGO_PKG_VERSION"),
        "{version}"
    );
    let ps = http_request(gw, "GET", "/api/ps", None).await.unwrap();
    assert_eq!(ps.status, 200);
    assert!(ps.json()["models"].is_array());
    let models = http_request(gw, "GET", "/v1/models", None)
        .await
        .unwrap()
        .json();
    assert_eq!(models["data"].as_array().unwrap().len(), 3, "{models}");

    // Unknown model: 404 the way Ollama says it; malformed body: 400.
    let response = http_request(
        gw,
        "POST",
        "/api/generate",
        Some(br#"{"model": "nope:1b"}"#),
    )
    .await
    .unwrap();
    assert!(response.error_message(404).contains("nope:1b"));
    let response = http_request(gw, "POST", "/api/generate", Some(b"{not json"))
        .await
        .unwrap();
    let _ = response.error_message(400);

    // What the gateway does not serve is still a JSON error saying why.
    let response = http_request(gw, "POST", "/api/pull", Some(br#"{"model": "x"}"#))
        .await
        .unwrap();
    let message = response.error_message(501);
    assert!(message.contains("does not manage them"), "{message}");
    let response = http_request(gw, "GET", "/api/nope", None).await.unwrap();
    assert!(response.error_message(404).contains("/api/nope"));
    let response = http_request(gw, "GET", "/api/generate", None)
        .await
        .unwrap();
    assert!(response.error_message(405).contains("GET"));

    // C dies mid-stream: the client gets the tokens so far, then an error
    // line, and the answer ends.
    c.ollama.models().die_mid_stream = true;
    let body = br#"{"model": "mistral:7b", "prompt": "again"}"#;
    let response = http_request(gw, "POST", "/api/generate", Some(body))
        .await
        .unwrap();
    assert_eq!(response.status, 200);
    let lines: Vec<serde_json::Value> = response
        .body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3, "{}", response.body);
    assert_eq!(lines[0]["response"], TOKENS[0]);
    assert!(lines[2]["error"].is_string(), "{}", response.body);
    c.ollama.models().die_mid_stream = false;

    // A client that goes away cancels the request on the serving node,
    // even while its Ollama is still thinking.
    c.ollama.models().stall = true;
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut client = tokio::net::TcpStream::connect(gw).await.unwrap();
        let body = r#"{"model": "mistral:7b", "prompt": "think"}"#;
        let request = format!(
            "POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        client.write_all(request.as_bytes()).await.unwrap();
        // Read (headers, then the first chunk) until the first token came.
        let mut seen = Vec::new();
        let first_token = async {
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&seen).contains(TOKENS[0]) {
                let n = client.read(&mut buf).await.unwrap();
                assert!(n > 0, "the gateway closed before the first token");
                seen.extend_from_slice(&buf[..n]);
            }
        };
        tokio::time::timeout(Duration::from_secs(10), first_token)
            .await
            .unwrap();
    }
    eventually("the serving stand-in to see the request cancelled", || {
        let cancelled = c.ollama.models().cancelled;
        async move { (cancelled >= 1).then_some(()) }
    })
    .await
    .unwrap();
    c.ollama.models().stall = false;

    // Failover: whichever of B and C serves `shared` first fails before
    // the first byte; the other one answers.
    b.ollama.models().failing_inference = true;
    c.ollama.models().failing_inference = true;
    let calls = |m: &Member| m.ollama.models().generate_calls;
    let before = (calls(&b), calls(&c));
    let response = http_request(
        gw,
        "POST",
        "/api/generate",
        Some(br#"{"model": "shared:1b", "stream": false}"#),
    )
    .await
    .unwrap();
    let message = response.error_message(502);
    assert!(
        message.contains("shared:1b"),
        "both fail: a gateway error naming the model: {message}"
    );
    assert_eq!(
        (calls(&b) - before.0, calls(&c) - before.1),
        (1, 1),
        "each tried once"
    );
    c.ollama.models().failing_inference = false;
    let response = http_request(
        gw,
        "POST",
        "/api/generate",
        Some(br#"{"model": "shared:1b", "stream": false}"#),
    )
    .await
    .unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(response.json()["response"], TOKENS.concat());

    // The gateway's metrics say who served what, and the failovers.
    let metrics = a.node.metrics_text();
    let c_id = c.node.peer_id().to_string();
    let served = format!(
        "ollamacron_gateway_requests_total{{model=\"mistral:7b\",peer=\"{c_id}\",outcome=\"ok\"}}"
    );
    assert!(metrics.contains(&served), "{metrics}");
    assert!(metrics.contains("ollamacron_gateway_requests_total{model=\"nope:1b\",peer=\"none\",outcome=\"not_found\"} 1"), "{metrics}");
    assert!(
        metrics.contains("ollamacron_gateway_failovers_total{model=\"shared:1b\"}"),
        "{metrics}"
    );
    let chunks =
        format!("ollamacron_gateway_streamed_chunks_total{{model=\"mistral:7b\",peer=\"{c_id}\"}}");
    let count = metric_value(&a.node, &chunks);
    assert!(count >= 3.0, "chunks streamed one by one: {count}");
    assert!(
        metrics.contains("ollamacron_gateway_first_byte_seconds_bucket"),
        "{metrics}"
    );
}

/// The `llm` services `node` finds now (none when the lookup fails).
async fn llm_services(node: &NodeHandle) -> Vec<RankedService> {
    let query = ServiceQuery {
        service_type: Some("llm".into()),
        ..ServiceQuery::default()
    };
    node.find_services(query).await.unwrap_or_default()
}

/// Wait until the `llm` services `node` finds are `ready`.
async fn until_services(node: &NodeHandle, what: &str, ready: impl Fn(&[RankedService]) -> bool) {
    let ready = &ready;
    eventually(what, move || async move {
        ready(&llm_services(node).await).then_some(())
    })
    .await
    .unwrap();
}

/// Whether every one of `found` advertises how many requests it takes.
fn all_limited(found: &[RankedService]) -> bool {
    found
        .iter()
        .all(|s| s.service.metadata.contains_key("max_concurrent_per_peer"))
}

/// Whether `found` has `model` loaded on `peer`.
fn loaded_on(found: &[RankedService], peer: &str, model: &str) -> bool {
    found.iter().any(|s| {
        s.service.peer_id == peer
            && s.service.name == model
            && s.service.metadata.get("loaded").map(String::as_str) == Some("true")
    })
}

/// Make `serving`'s Ollama stall streamed answers and send it one through
/// `gateway`, held until aborted; once it has `calls` requests in all.
async fn hold_stalled(
    gateway: std::net::SocketAddr,
    serving: &Member,
    model: &str,
    calls: usize,
) -> tokio::task::JoinHandle<Result<ollamacron_tests::HttpResponse, String>> {
    serving.ollama.models().stall = true;
    let body = format!(r#"{{"model": "{model}", "prompt": "think"}}"#);
    let held = tokio::spawn(async move {
        http_request(gateway, "POST", "/api/generate", Some(body.as_bytes())).await
    });
    eventually("the stalled request held", || {
        let n = serving.ollama.models().generate_calls;
        async move { (n == calls).then_some(()) }
    })
    .await
    .unwrap();
    held
}

/// Limits of a serving node that takes `per_peer` requests of a gateway.
fn taking(per_peer: usize) -> ServeLimits {
    ServeLimits {
        total: 64,
        per_peer,
        ..ollamacron_tests::pool::SERVE_LIMITS
    }
}

/// A stand-in that takes `first_token` before it answers.
fn slow(names: &[&str], first_token: Duration) -> ollamacron_tests::ollama_standin::StandInModels {
    let mut stand_in = models(names);
    stand_in.pacing = Some(ollamacron_tests::ollama_standin::Pacing {
        first_token,
        between_tokens: Duration::from_millis(5),
        tokens: TOKENS.len(),
    });
    stand_in
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_three_times_the_capacity_is_queued_and_all_succeed() {
    let a = member(&[], None).await;
    let a_addr = a.bootstrap_addr().await;
    let think = Duration::from_millis(100);
    let b = member_with(slow(&["burst:1b"], think), Some(&a_addr), taking(2)).await;
    let c = member_with(slow(&["burst:1b"], think), Some(&a_addr), taking(2)).await;
    // Both advertise that they take 2 of A's requests at once.
    until_services(&a.node, "both nodes' limits advertised", |found| {
        found.len() == 2
            && found.iter().all(|s| {
                s.service
                    .metadata
                    .get("max_concurrent_per_peer")
                    .map(String::as_str)
                    == Some("2")
            })
    })
    .await;
    let gw = gateway(&a).await;
    let body = br#"{"model": "burst:1b", "prompt": "go"}"#;
    let burst: Vec<_> = (0..12)
        .map(|_| {
            tokio::spawn(async move { http_request(gw, "POST", "/api/generate", Some(body)).await })
        })
        .collect();
    for request in burst {
        let response = request.await.unwrap().unwrap();
        assert_eq!(response.status, 200, "{}", response.body);
        assert!(response.body.contains("\"done\":true"), "{}", response.body);
    }
    let served = (
        b.ollama.models().generate_calls,
        c.ollama.models().generate_calls,
    );
    assert_eq!(served.0 + served.1, 12, "{served:?}");
    assert!(
        served.0 >= 2 && served.1 >= 2,
        "both nodes served: {served:?}"
    );
    assert_eq!(
        metric_value(&a.node, "ollamacron_gateway_queue_wait_seconds_count"),
        12.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_and_a_long_wait_answer_503_with_retry_after() {
    let a = member(&[], None).await;
    let a_addr = a.bootstrap_addr().await;
    let b = member_with(models(&["one:1b"]), Some(&a_addr), taking(1)).await;
    sees(&a.node, &["one:1b"]).await;
    until_services(&a.node, "B's limit advertised", |found| {
        !found.is_empty() && all_limited(found)
    })
    .await;
    b.ollama.models().stall = true;
    let gw = serve_gateway(
        &a.node,
        None,
        &[("gateway_queue_max", "1"), ("gateway_queue_timeout", "10s")],
    )
    .await;
    let body = br#"{"model": "one:1b", "prompt": "think"}"#;
    // The first takes B's one slot and stalls; the second waits.
    let first =
        tokio::spawn(async move { http_request(gw, "POST", "/api/generate", Some(body)).await });
    eventually("the first request at B", || {
        let calls = b.ollama.models().generate_calls;
        async move { (calls == 1).then_some(()) }
    })
    .await
    .unwrap();
    let second =
        tokio::spawn(async move { http_request(gw, "POST", "/api/generate", Some(body)).await });
    eventually("the second request queued", || {
        let depth = metric_value(&a.node, "ollamacron_gateway_queue_depth");
        async move { (depth >= 1.0).then_some(()) }
    })
    .await
    .unwrap();
    let third = http_request(gw, "POST", "/api/generate", Some(body))
        .await
        .unwrap();
    let message = third.error_message(503);
    assert!(
        message.contains("maximum pending requests exceeded"),
        "{message}"
    );
    assert!(
        third
            .headers
            .to_ascii_lowercase()
            .contains("retry-after: 1"),
        "{third:?}"
    );
    assert_eq!(b.ollama.models().generate_calls, 1, "neither reached B");
    first.abort();
    second.abort();

    // A node that takes none of our requests: the wait times out.
    let c = member_with(models(&["none:1b"]), Some(&a_addr), taking(0)).await;
    sees(&a.node, &["none:1b"]).await;
    let waiting = serve_gateway(&a.node, None, &[("gateway_queue_timeout", "300ms")]).await;
    let response = http_request(
        waiting,
        "POST",
        "/api/generate",
        Some(br#"{"model": "none:1b"}"#),
    )
    .await
    .unwrap();
    assert!(
        response
            .error_message(503)
            .contains("gateway_queue_timeout")
    );
    assert_eq!(c.ollama.models().generate_calls, 0, "refused before Ollama");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_nodes_are_preferred_and_a_cold_one_serves_once_they_are_full() {
    let a = member(&[], None).await;
    let a_addr = a.bootstrap_addr().await;
    let mut warm = models(&["chat:8b"]);
    warm.loaded = vec!["chat:8b".into()];
    // The cold node sorts first by peer id half the time: only "loaded"
    // can make the choice every run.
    let b = member_with(warm, Some(&a_addr), taking(1)).await;
    let mut cold = models(&["chat:8b"]);
    cold.load_on_use = true;
    let c = member_with(cold, Some(&a_addr), taking(1)).await;
    let (b_id, c_id) = (b.node.peer_id().to_string(), c.node.peer_id().to_string());
    until_services(
        &a.node,
        "both nodes with their limits and B warm",
        |found| found.len() == 2 && all_limited(found) && loaded_on(found, &b_id, "chat:8b"),
    )
    .await;
    let gw = gateway(&a).await;
    let body = br#"{"model": "chat:8b", "prompt": "hi", "stream": false}"#;
    for _ in 0..3 {
        let response = http_request(gw, "POST", "/api/generate", Some(body))
            .await
            .unwrap();
        assert_eq!(response.status, 200, "{}", response.body);
    }
    assert_eq!(
        (
            b.ollama.models().generate_calls,
            c.ollama.models().generate_calls
        ),
        (3, 0),
        "the warm node serves while it has room"
    );
    // B full (its one slot held by a stalled request): C serves, cold.
    let held = hold_stalled(gw, &b, "chat:8b", 4).await;
    let response = http_request(gw, "POST", "/api/generate", Some(body))
        .await
        .unwrap();
    assert_eq!(response.status, 200, "{}", response.body);
    assert_eq!(
        c.ollama.models().generate_calls,
        1,
        "the cold node once the warm one is full"
    );
    // Serving loaded the model on C, and the mesh hears of it.
    until_services(&a.node, "C's model advertised as loaded", |found| {
        loaded_on(found, &c_id, "chat:8b")
    })
    .await;
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_failing_live_requests_is_cooled_down_and_probed_back() {
    let a = member(&[], None).await;
    let a_addr = a.bootstrap_addr().await;
    // B ranks first (warm) but its Ollama fails every inference while its
    // /api/tags is fine; C is cold and healthy.
    let mut warm = models(&["flaky:1b"]);
    warm.loaded = vec!["flaky:1b".into()];
    warm.failing_inference = true;
    let b = member_with(warm, Some(&a_addr), taking(8)).await;
    let c = member_with(models(&["flaky:1b"]), Some(&a_addr), taking(8)).await;
    let b_id = b.node.peer_id().to_string();
    until_services(&a.node, "B warm and C seen", |found| {
        found.len() == 2 && loaded_on(found, &b_id, "flaky:1b")
    })
    .await;
    let gw = gateway(&a).await;
    let body = br#"{"model": "flaky:1b", "prompt": "hi", "stream": false}"#;
    let ask = || async move {
        let response = http_request(gw, "POST", "/api/generate", Some(body))
            .await
            .unwrap();
        assert_eq!(response.status, 200, "{}", response.body);
    };
    for _ in 0..3 {
        ask().await;
    }
    assert_eq!(
        b.ollama.models().generate_calls,
        3,
        "tried first three times, failed"
    );
    let breaker = format!("ollamacron_gateway_breaker_state{{peer=\"{b_id}\"}}");
    assert_eq!(metric_value(&a.node, &breaker), 2.0, "open");
    let shown = |node: NodeHandle, peer: String| async move {
        node.peers()
            .await
            .unwrap()
            .into_iter()
            .find(|p| p.peer_id.to_string() == peer)
            .map(|p| p.breaker.as_str())
    };
    eventually("GET /v1/peers shows B open", || {
        let (node, peer) = (a.node.clone(), b_id.clone());
        async move { (shown(node, peer).await == Some("open")).then_some(()) }
    })
    .await
    .unwrap();
    // While it cools down, requests go straight to C.
    for _ in 0..5 {
        ask().await;
    }
    assert_eq!(
        b.ollama.models().generate_calls,
        3,
        "not tried while cooling down"
    );
    assert_eq!(c.ollama.models().generate_calls, 8);
    // B heals; after the cool-down one request probes it, and it is back.
    b.ollama.models().failing_inference = false;
    eventually("a probe to B", || {
        let tried = b.ollama.models().generate_calls > 3;
        async move {
            if tried {
                return Some(());
            }
            ask().await;
            None
        }
    })
    .await
    .unwrap();
    assert_eq!(metric_value(&a.node, &breaker), 0.0, "closed again");
    eventually("GET /v1/peers shows B closed", || {
        let (node, peer) = (a.node.clone(), b_id.clone());
        async move { (shown(node, peer).await == Some("closed")).then_some(()) }
    })
    .await
    .unwrap();
    let before = b.ollama.models().generate_calls;
    ask().await;
    assert_eq!(
        b.ollama.models().generate_calls,
        before + 1,
        "B serves again"
    );
    let trips = format!("ollamacron_gateway_breaker_trips_total{{peer=\"{b_id}\"}}");
    assert_eq!(metric_value(&a.node, &trips), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_stays_on_its_node_while_a_new_one_goes_by_load() {
    let a = member(&[], None).await;
    let a_addr = a.bootstrap_addr().await;
    let b = member_with(models(&["talk:1b"]), Some(&a_addr), taking(8)).await;
    let c = member_with(models(&["talk:1b"]), Some(&a_addr), taking(8)).await;
    until_services(&a.node, "both nodes seen", |found| found.len() == 2).await;
    let gw = gateway(&a).await;
    let turn = |messages: &[&str]| {
        let messages: Vec<_> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| serde_json::json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": m}))
            .collect();
        serde_json::json!({"model": "talk:1b", "messages": messages, "stream": false})
            .to_string()
            .into_bytes()
    };
    let calls = |m: &ollamacron_tests::pool::Member| m.ollama.models().generate_calls;
    let chat = |body: Vec<u8>| async move {
        let response = http_request(gw, "POST", "/api/chat", Some(&body))
            .await
            .unwrap();
        assert_eq!(response.status, 200, "{}", response.body);
    };
    // The first turn of the first conversation lands on one node, X.
    chat(turn(&["why is the sky blue?"])).await;
    let (x, y) = if calls(&b) == 1 { (&b, &c) } else { (&c, &b) };
    assert_eq!((calls(x), calls(y)), (1, 0));
    let first = [
        "why is the sky blue?",
        "Rayleigh scattering.",
        "and at sunset?",
        "A longer path.",
        "and on Mars?",
    ];
    // X gets busier than Y: a streamed turn of its conversation, which it
    // holds (a request of no conversation could go to either idle node).
    x.ollama.models().stall = true;
    let mut streamed: serde_json::Value = serde_json::from_slice(&turn(&first[..3])).unwrap();
    streamed["stream"] = true.into();
    let held = tokio::spawn(async move {
        http_request(
            gw,
            "POST",
            "/api/chat",
            Some(streamed.to_string().as_bytes()),
        )
        .await
    });
    eventually("X holding the streamed turn", || {
        let n = calls(x);
        async move { (n == 2).then_some(()) }
    })
    .await
    .unwrap();
    assert_eq!(
        calls(y),
        0,
        "the streamed turn went to its conversation's node"
    );
    // A new conversation goes by load, to Y; each conversation's later
    // turns stay on its node, X's although it is busier.
    chat(turn(&["what is rust?"])).await;
    assert_eq!(
        (calls(x), calls(y)),
        (2, 1),
        "a new conversation goes to the idle node"
    );
    let second = [
        "what is rust?",
        "A language.",
        "who made it?",
        "Graydon Hoare.",
        "when?",
    ];
    for turns in [3, 5] {
        chat(turn(&first[..turns])).await;
        chat(turn(&second[..turns])).await;
    }
    assert_eq!(
        (calls(x), calls(y)),
        (4, 3),
        "every later turn on its conversation's node"
    );
    held.abort();
}
