//! The Grafana dashboard in `deploy/grafana` queries only series a node
//! exports: a gateway node whose peers answer, fail over and trip a
//! breaker shows every family the dashboard names in its `/metrics`, so a
//! renamed metric fails here instead of leaving a panel empty.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::collections::BTreeSet;

use ollamacron_node_core::registry::ServiceQuery;
use ollamacron_tests::http_request;
use ollamacron_tests::pool::{SERVE_LIMITS, member, member_with, models, serve_gateway};
use ollamacron_tests::{eventually, metric_value};
use serde_json::Value;

const DASHBOARD: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/grafana/ollamacron-node.json"
);

/// Every `expr` of the dashboard's panels.
fn queries(dashboard: &Value) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![dashboard];
    while let Some(value) = stack.pop() {
        match value {
            Value::Object(map) => {
                if let Some(Value::String(expr)) = map.get("expr") {
                    found.push(expr.clone());
                }
                stack.extend(map.values());
            }
            Value::Array(items) => stack.extend(items),
            _ => {}
        }
    }
    found
}

/// The metric names in a PromQL expression: words of ours or libp2p's.
fn series(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|w| w.starts_with("ollamacron_") || w.starts_with("libp2p_"))
        .map(str::to_owned)
        .collect()
}

/// The sample names a family of `/metrics` (`# TYPE name kind`) gives.
fn sample_names(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("#") || words.next() != Some("TYPE") {
            continue;
        }
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            "info" => &["_info"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_only_series_a_node_exports() {
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(DASHBOARD).unwrap()).unwrap();
    assert_eq!(dashboard["uid"], "ollamacron-node");
    let wanted: BTreeSet<String> = queries(&dashboard).iter().flat_map(|q| series(q)).collect();
    assert!(wanted.len() > 20, "{wanted:?}");

    // A gateway with two serving peers: B warm but failing every request,
    // C healthy; a missing model too. Answers, failovers, a tripped breaker.
    let a = member(&[], None).await;
    let a_addr = a.bootstrap_addr().await;
    let mut warm = models(&["flaky:1b"]);
    warm.loaded = vec!["flaky:1b".into()];
    warm.failing_inference = true;
    let b = member_with(warm, Some(&a_addr), SERVE_LIMITS).await;
    let c = member_with(models(&["flaky:1b"]), Some(&a_addr), SERVE_LIMITS).await;
    eventually("both of flaky:1b's nodes seen", || {
        let node = a.node.clone();
        async move {
            let query = ServiceQuery {
                model: Some("flaky:1b".into()),
                ..ServiceQuery::default()
            };
            (node.find_services(query).await.ok()?.len() == 2).then_some(())
        }
    })
    .await
    .unwrap();
    let gw = serve_gateway(&a.node, Some(a.local()), &[]).await;
    let b_id = b.node.peer_id().to_string();
    let breaker = format!("ollamacron_gateway_breaker_state{{peer=\"{b_id}\"}}");
    eventually("B's breaker open after failed requests", || {
        let (node, breaker) = (a.node.clone(), breaker.clone());
        async move {
            let body = br#"{"model": "flaky:1b", "prompt": "hi", "stream": false}"#;
            let answer = http_request(gw, "POST", "/api/generate", Some(body))
                .await
                .ok()?;
            assert_eq!(answer.status, 200, "C answers: {}", answer.body);
            (metric_value(&node, &breaker) == 2.0).then_some(())
        }
    })
    .await
    .unwrap();
    let missing = http_request(
        gw,
        "POST",
        "/api/generate",
        Some(br#"{"model": "none:1b"}"#),
    )
    .await
    .unwrap();
    assert_eq!(missing.status, 404);

    let exported = sample_names(&a.node.metrics_text());
    let missing: Vec<&String> = wanted.iter().filter(|s| !exported.contains(*s)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries series the node does not export: {missing:?}\nexported: {exported:?}"
    );
    drop((b, c));
}
