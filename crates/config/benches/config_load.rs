//! Loading a node's configuration: the YAML file parsed and merged over
//! the defaults into a `NodeConfig` (`ConfigLoader::load_unvalidated`),
//! the whole load with validation (`ConfigLoader::load`), and
//! `NodeConfig::validate` alone, for the documented example file and for
//! a small file that declares a few services.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use ollamacron_config::ConfigLoader;

/// The example configuration of the docs: every key, with its comment.
const EXAMPLE_YAML: &str = include_str!("../../../docs/ollamacron.example.yaml");

/// A small, typical file: a few settings and three declared services.
const SERVICES_YAML: &str = r#"
listen:
  - /ip4/0.0.0.0/tcp/11436
  - /ip4/0.0.0.0/udp/11436/quic-v1
bootstrap_min_connections: 1
region: eu-west
tags: [gpu, lab]
enable_ollama: false
gateway_failover_attempts: 2
gateway_first_byte_timeout: 20s
services:
  - name: llama3:8b
    type: llm
    version: 365c0bd3c000
    tags: [gpu, q4_0]
    capabilities: [completion, tools]
    protocols: [ollama, openai]
    metadata: {context_length: "8192"}
  - name: nomic-embed-text
    type: embedding
    capabilities: [embedding]
    protocols: [ollama]
  - id: translate-de
    name: opus-mt-en-de
    type: translation
    port: 8080
    health_check_url: http://127.0.0.1:8080/health
    latency_ms: 40
    reliability: 0.99
"#;

fn bench_config_load(c: &mut Criterion) {
    let mut group = c.benchmark_group("config_load");
    for (label, yaml) in [
        ("example_yaml", EXAMPLE_YAML),
        ("3_services_yaml", SERVICES_YAML),
    ] {
        let loader = ConfigLoader::new().yaml_str("bench.yaml", yaml);
        let config = loader.load().expect("the bench config is valid");
        group.bench_function(format!("parse/{label}"), |b| {
            b.iter(|| black_box(&loader).load_unvalidated().unwrap());
        });
        group.bench_function(format!("load/{label}"), |b| {
            b.iter(|| black_box(&loader).load().unwrap());
        });
        group.bench_function(format!("validate/{label}"), |b| {
            b.iter(|| black_box(&config).validate().unwrap());
        });
    }
    group.finish();
}

criterion_group!(benches, bench_config_load);
criterion_main!(benches);
