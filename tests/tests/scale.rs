//! What makes a large pool work: a node with 500 models is seen whole
//! (its record in pages) by a peer and by its own gateway; a model held by
//! one node among many of its type is found by its exact model key; and
//! records spread by record sync alone, without a DHT.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use ollamacron_node_core::NodeHandle;
use ollamacron_node_core::registry::{ServiceInfo, ServiceQuery};
use ollamacron_tests::pool::{SERVE_LIMITS, member, member_with_settings, models, serve_gateway};
use ollamacron_tests::{TCP_ONLY, eventually, http_request, loopback_config, start};

const MODELS: usize = 500;

fn model_names() -> Vec<String> {
    (0..MODELS)
        .map(|i| format!("model-{i:03}:latest"))
        .collect()
}

/// The names of the models `node` finds served by `peer`.
async fn models_of(node: &NodeHandle, peer: &str) -> Vec<String> {
    let query = ServiceQuery {
        service_type: Some("llm".into()),
        ..ServiceQuery::default()
    };
    let mut names: Vec<String> = node
        .find_services(query)
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|s| s.service.peer_id == peer)
        .map(|s| s.service.name)
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_500_models_is_seen_whole_by_a_peer_and_by_its_own_gateway() {
    let names = model_names();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let big = member(&refs, None).await;
    let big_addr = big.bootstrap_addr().await;
    let peer = member(&[], Some(&big_addr)).await;
    let big_id = big.node.peer_id().to_string();

    // Its own record holds every model (in pages), and the peer sees them all.
    let local = eventually("the big node advertising all its models", || {
        let node = big.node.clone();
        async move {
            let local = node.local_services().await.ok()?;
            (local.len() == MODELS).then_some(local)
        }
    })
    .await
    .unwrap();
    assert!(local.iter().all(|s| s.name.starts_with("model-")));
    let seen = eventually("the peer seeing all 500 models", || {
        let (node, id) = (peer.node.clone(), big_id.clone());
        async move {
            let seen = models_of(&node, &id).await;
            (seen.len() == MODELS).then_some(seen)
        }
    })
    .await
    .unwrap();
    assert_eq!(seen, names);
    // Whole: what the peer holds of a model is what the big node advertises.
    let last = names.last().unwrap();
    let query = ServiceQuery {
        model: Some(last.clone()),
        ..ServiceQuery::default()
    };
    let theirs = peer.node.find_services(query.clone()).await.unwrap();
    let ours: Vec<&ServiceInfo> = local.iter().filter(|s| s.name == *last).collect();
    assert_eq!(theirs.len(), 1);
    assert_eq!(ours.len(), 1);
    assert_eq!(theirs[0].service.version, ours[0].version);
    assert_eq!(theirs[0].service.capabilities, ours[0].capabilities);
    assert!(
        !theirs[0].service.addresses.is_empty(),
        "addresses filled in"
    );

    // Its own gateway lists and routes every model; so does the peer's.
    let own = serve_gateway(&big.node, Some(big.local()), &[]).await;
    let tags = http_request(own, "GET", "/api/tags", None).await.unwrap();
    assert_eq!(tags.json()["models"].as_array().unwrap().len(), MODELS);
    let body = format!(r#"{{"model": "{last}", "prompt": "hi", "stream": false}}"#);
    let answer = http_request(own, "POST", "/api/generate", Some(body.as_bytes()))
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    let through_peer = serve_gateway(&peer.node, Some(peer.local()), &[]).await;
    let answer = http_request(through_peer, "POST", "/api/generate", Some(body.as_bytes()))
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(big.ollama.models().generate_calls, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn its_own_gateway_routes_to_every_model_of_its_ollama_even_beyond_its_record() {
    // A record of at most 16 pages of 4 services: 64 of the 500 models.
    let names = model_names();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let node = member_with_settings(
        models(&refs),
        None,
        SERVE_LIMITS,
        &[("max_services_per_record", "4")],
    )
    .await;
    eventually("the node advertising what its record holds", || {
        let node = node.node.clone();
        async move { (node.local_services().await.ok()?.len() == 64).then_some(()) }
    })
    .await
    .unwrap();
    let gateway = serve_gateway(&node.node, Some(node.local()), &[]).await;
    // The last model is not in the record; the gateway serves it anyway.
    let last = names.last().unwrap();
    let advertised = node.node.local_services().await.unwrap();
    assert!(!advertised.iter().any(|s| s.name == *last));
    let body = format!(r#"{{"model": "{last}", "prompt": "hi", "stream": false}}"#);
    let answer = http_request(gateway, "POST", "/api/generate", Some(body.as_bytes()))
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(node.ollama.models().generate_calls, 1);
    let tags = http_request(gateway, "GET", "/api/tags", None)
        .await
        .unwrap();
    assert_eq!(tags.json()["models"].as_array().unwrap().len(), MODELS);
}

fn llm(name: &str) -> ServiceInfo {
    ServiceInfo {
        id: name.to_owned(),
        name: name.to_owned(),
        service_type: "llm".into(),
        capabilities: vec!["completion".into()],
        protocols: vec!["ollama".into()],
        ..ServiceInfo::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_on_one_node_among_many_of_its_type_is_found_by_its_model_key() {
    const NODES: usize = 6;
    let overrides = [("dht_announce_delay", "0s")];
    let mut nodes: Vec<NodeHandle> = Vec::new();
    for i in 0..NODES {
        let mut list = overrides.to_vec();
        let bootstrap = match nodes.first() {
            Some(first) => Some(format!(
                "[{}]",
                first.dialable_addrs().await.unwrap().remove(0)
            )),
            None => None,
        };
        if let Some(b) = &bootstrap {
            list.push(("bootstrap", b.as_str()));
        }
        let node = start(loopback_config(TCP_ONLY, &list)).await.unwrap();
        // Every node serves the common model; only the last one the rare one.
        node.register_service(llm("common:1b")).await.unwrap();
        if i == NODES - 1 {
            node.register_service(llm("rare")).await.unwrap();
        }
        nodes.push(node);
    }
    let holder = nodes[NODES - 1].peer_id();

    // One exact query of the model key finds its one holder, with or
    // without the `:latest` tag, from a node that does not hold it.
    for asked in ["rare", "rare:latest"] {
        let answer = eventually("the rare model's provider in the DHT", || {
            let node = nodes[0].clone();
            async move {
                let answer = node.find_model_providers(asked).await.ok()?;
                answer.providers.contains(&holder).then_some(answer)
            }
        })
        .await
        .unwrap();
        assert_eq!(answer.providers, vec![holder], "{asked}");
        // Zero when this node holds the provider record itself.
        let first = answer.requests_to_first.expect("found by a step");
        assert!(first <= answer.requests, "{answer:?}");
    }
    // The common model has every node as provider; an unknown one none.
    let common = eventually("every provider of the common model", || {
        let node = nodes[1].clone();
        async move {
            let answer = node.find_model_providers("common:1b").await.ok()?;
            (answer.providers.len() == NODES).then_some(answer)
        }
    })
    .await
    .unwrap();
    assert_eq!(common.providers.len(), NODES);
    let none = nodes[0].find_model_providers("missing:7b").await.unwrap();
    assert!(none.providers.is_empty());

    // The ranked answer to a model query is the holder's service only.
    let query = ServiceQuery {
        model: Some("rare:latest".into()),
        ..ServiceQuery::default()
    };
    let found = nodes[2].find_services(query).await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].service.peer_id, holder.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_spread_by_record_sync_alone_without_a_dht() {
    // A chain a - b - c: c never connects to a, and there is no DHT.
    let overrides = [("enable_dht", "false")];
    let a = start(loopback_config(TCP_ONLY, &overrides)).await.unwrap();
    a.register_service(llm("from-a")).await.unwrap();
    let chain = |node: &NodeHandle| {
        let node = node.clone();
        async move { format!("[{}]", node.dialable_addrs().await.unwrap().remove(0)) }
    };
    let a_addr = chain(&a).await;
    let b = start(loopback_config(
        TCP_ONLY,
        &[overrides[0], ("bootstrap", a_addr.as_str())],
    ))
    .await
    .unwrap();
    let b_addr = chain(&b).await;
    let c = start(loopback_config(
        TCP_ONLY,
        &[overrides[0], ("bootstrap", b_addr.as_str())],
    ))
    .await
    .unwrap();
    let a_id = a.peer_id().to_string();
    eventually("c seeing a's service through b", || {
        let (c, a_id) = (c.clone(), a_id.clone());
        async move { (models_of(&c, &a_id).await == ["from-a"]).then_some(()) }
    })
    .await
    .unwrap();
    // c's own record reaches a the same way.
    c.register_service(llm("from-c")).await.unwrap();
    let c_id = c.peer_id().to_string();
    eventually("a seeing c's service through b", || {
        let (a, c_id) = (a.clone(), c_id.clone());
        async move { (models_of(&a, &c_id).await == ["from-c"]).then_some(()) }
    })
    .await
    .unwrap();
    // A change travels too: a's second service, then its removal.
    a.register_service(llm("from-a-2")).await.unwrap();
    eventually("c seeing a's second service", || {
        let (c, a_id) = (c.clone(), a_id.clone());
        async move { (models_of(&c, &a_id).await == ["from-a", "from-a-2"]).then_some(()) }
    })
    .await
    .unwrap();
    assert!(a.unregister_service("from-a").await.unwrap());
    eventually("c seeing a's service removed", || {
        let (c, a_id) = (c.clone(), a_id.clone());
        async move { (models_of(&c, &a_id).await == ["from-a-2"]).then_some(()) }
    })
    .await
    .unwrap();
}
