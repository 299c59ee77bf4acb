//! Layering, error messages and validation rules of `NodeConfig`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

use std::time::Duration;

use ollamacron_config::{
    ByteSize, ConfigError, ConfigLoader, LogFormat, NodeConfig, NodeType, Origin, Reachability,
    default_config_yaml, field_docs,
};
use proptest::prelude::*;

const PEER: &str = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA";

fn load_yaml(yaml: &str) -> Result<NodeConfig, ConfigError> {
    ConfigLoader::new().yaml_str("test.yaml", yaml).load()
}

fn rule_errors(yaml: &str) -> Vec<String> {
    match load_yaml(yaml) {
        Err(ConfigError::Invalid(errors)) => errors.iter().map(ToString::to_string).collect(),
        other => panic!("expected validation errors for {yaml:?}, got {other:?}"),
    }
}

fn value_error(yaml: &str) -> String {
    match load_yaml(yaml) {
        Err(e @ ConfigError::InvalidValue { .. }) => e.to_string(),
        other => panic!("expected an invalid value for {yaml:?}, got {other:?}"),
    }
}

#[test]
fn no_layers_gives_the_defaults_and_they_are_valid() {
    let config = ConfigLoader::new().load().unwrap();
    assert_eq!(config, NodeConfig::default());
    assert!(config.enable_mdns && config.enable_dht);
    assert_eq!(
        config.listen.len(),
        4,
        "TCP and QUIC, on IPv4 and IPv6, by default"
    );
    assert!(config.api_listen.ip().is_loopback());
}

#[test]
fn precedence_is_defaults_file_env_override() {
    let yaml = "conn_mgr_low: 10\nconn_mgr_high: 20\nregion: from-file\ntags: [a, b]\n";
    let env = [
        ("OLLAMACRON_CONN_MGR_HIGH", "30"),
        ("OLLAMACRON_REGION", "from-env"),
        ("OLLAMACRON_TAGS", "x, y ,z"),
        ("UNRELATED", "ignored"),
        ("OLLAMACRON_CONFIG", "/reserved/for/the/cli.yaml"),
    ];
    let config = ConfigLoader::new()
        .set("region", "from-cli")
        .env(env)
        .yaml_str("test.yaml", yaml)
        .load()
        .unwrap();
    assert_eq!(config.conn_mgr_low, 10, "file beats default");
    assert_eq!(config.conn_mgr_high, 30, "env beats file");
    assert_eq!(
        config.region.as_deref(),
        Some("from-cli"),
        "override beats env"
    );
    assert_eq!(
        config.tags,
        ["x", "y", "z"],
        "env lists are comma-separated"
    );
    assert_eq!(config.conn_mgr_grace, NodeConfig::default().conn_mgr_grace);
}

#[test]
fn overrides_accept_dashes_and_typed_scalars() {
    let config = ConfigLoader::new()
        .set("enable-mdns", "false")
        .set("conn_mgr_grace", "2m")
        .set("max_memory", "512MiB")
        .set("region", "1234")
        .set("force_reachability", "private")
        .set("node_type", "relay")
        .set("log_format", "json")
        .load()
        .unwrap();
    assert!(!config.enable_mdns);
    assert_eq!(config.conn_mgr_grace, Duration::from_secs(120));
    assert_eq!(config.max_memory, Some(ByteSize::from_mib(512)));
    assert_eq!(config.region.as_deref(), Some("1234"));
    assert_eq!(config.force_reachability, Some(Reachability::Private));
    assert_eq!(config.node_type, NodeType::Relay);
    assert_eq!(config.log_format, LogFormat::Json);
}

#[test]
fn empty_env_value_unsets_an_optional_field() {
    let config = ConfigLoader::new()
        .yaml_str("t.yaml", "region: eu\n")
        .env([("OLLAMACRON_REGION", "")])
        .load()
        .unwrap();
    assert_eq!(config.region, None);
}

#[test]
fn unknown_file_key_names_it_and_the_closest_known_one() {
    let err = load_yaml("enable_mnds: false\n").unwrap_err().to_string();
    assert!(err.contains("`enable_mnds`"), "{err}");
    assert!(err.contains("did you mean `enable_mdns`"), "{err}");
    assert!(err.contains("test.yaml"), "{err}");

    let err = load_yaml("completely_unrelated_thing: 1\n")
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("completely_unrelated_thing") && !err.contains("did you mean"),
        "{err}"
    );
}

#[test]
fn unknown_env_and_override_keys_are_errors_too() {
    let err = ConfigLoader::new()
        .env([("OLLAMACRON_CONN_MGR_HIHG", "5")])
        .load()
        .unwrap_err()
        .to_string();
    assert!(err.contains("OLLAMACRON_CONN_MGR_HIHG"), "{err}");
    assert!(
        err.contains("did you mean `OLLAMACRON_CONN_MGR_HIGH`"),
        "{err}"
    );

    let err = ConfigLoader::new()
        .set("listn", "/ip4/127.0.0.1/tcp/0")
        .load()
        .unwrap_err()
        .to_string();
    assert!(err.contains("`listn`") && err.contains("`listen`"), "{err}");
}

#[test]
fn bad_values_name_field_value_and_origin() {
    let err = value_error("listen: [/ip4/127.0.0.1/tcp/0, not-an-addr]\n");
    assert!(err.starts_with("listen"), "{err}");
    assert!(err.contains("`not-an-addr` is not a multiaddr"), "{err}");
    assert!(err.contains("config file test.yaml"), "{err}");

    let err = value_error("conn_mgr_grace: soon\n");
    assert!(
        err.contains("conn_mgr_grace") && err.contains("`soon` is not a duration"),
        "{err}"
    );

    let err = value_error("max_memory: 12 parsecs\n");
    assert!(
        err.contains("max_memory") && err.contains("unknown unit"),
        "{err}"
    );

    let err = value_error("conn_mgr_low: -3\n");
    assert!(err.contains("conn_mgr_low"), "{err}");

    let err = value_error("force_reachability: sometimes\n");
    assert!(
        err.contains("force_reachability") && err.contains("public"),
        "{err}"
    );

    let err = ConfigLoader::new()
        .env([("OLLAMACRON_ENABLE_DHT", "maybe")])
        .load()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("enable_dht") && err.contains("OLLAMACRON_ENABLE_DHT"),
        "{err}"
    );
}

#[test]
fn malformed_yaml_and_non_mappings_are_named() {
    let err = load_yaml("listen: [unclosed\n").unwrap_err().to_string();
    assert!(err.contains("test.yaml is not valid YAML"), "{err}");
    let err = load_yaml("- just\n- a list\n").unwrap_err().to_string();
    assert!(
        err.contains("must be a mapping") && err.contains("a list"),
        "{err}"
    );
    assert_eq!(
        load_yaml("").unwrap(),
        NodeConfig::default(),
        "empty file is fine"
    );
}

#[test]
fn missing_file_is_a_read_error_with_the_path() {
    let err = ConfigLoader::new()
        .file("/nonexistent/ollamacron.yaml")
        .load()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("cannot read config file /nonexistent/ollamacron.yaml"),
        "{err}"
    );
}

#[test]
fn oversized_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.yaml");
    std::fs::write(&path, "#".repeat(2 * 1024 * 1024)).unwrap();
    let err = ConfigLoader::new().file(&path).load().unwrap_err();
    assert!(matches!(err, ConfigError::TooLarge { .. }), "{err}");
}

#[test]
fn rule_conn_mgr_low_not_above_high() {
    let errors = rule_errors("conn_mgr_low: 900\nconn_mgr_high: 400\n");
    assert_eq!(
        errors,
        ["conn_mgr_low (900) must be <= conn_mgr_high (400)"]
    );
    let errors = rule_errors("conn_mgr_low: 0\nconn_mgr_high: 0\n");
    assert_eq!(errors, ["conn_mgr_high (0) must be at least 1"]);
}

#[test]
fn rule_some_tcp_security() {
    let errors = rule_errors("enable_tls: false\nenable_noise: false\n");
    assert_eq!(errors.len(), 1);
    assert!(
        errors[0].contains("enable_noise") && errors[0].contains("enable_tls"),
        "{errors:?}"
    );
    load_yaml("enable_tls: false\n").unwrap();
    load_yaml("enable_noise: false\n").unwrap();
}

#[test]
fn rule_bootstrap_and_relays_need_peer_ids() {
    let yaml = format!(
        "bootstrap:\n  - /ip4/192.0.2.1/tcp/11436\n  - /ip4/192.0.2.2/tcp/11436/p2p/{PEER}\n  - /p2p/{PEER}\nrelay_nodes: [/dns4/relay.example/udp/1/quic-v1]\n"
    );
    let errors = rule_errors(&yaml);
    assert_eq!(errors.len(), 3, "{errors:?}");
    assert!(
        errors[0]
            .starts_with("bootstrap[0] (/ip4/192.0.2.1/tcp/11436) must end with /p2p/<peer id>"),
        "{errors:?}"
    );
    assert!(
        errors[1].starts_with("bootstrap[2]") && errors[1].contains("must start with"),
        "{errors:?}"
    );
    assert!(errors[2].starts_with("relay_nodes[0]"), "{errors:?}");
}

#[test]
fn rule_listen_addresses_are_transports_we_serve() {
    let errors = rule_errors(
        "listen: [/ip4/0.0.0.0/udp/1, /dns4/example.com/tcp/1, /ip4/0.0.0.0/tcp/1/ws, /ip4/0.0.0.0/tcp/1/p2p/12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA]\n",
    );
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert!(
        errors[0].starts_with("listen[0] (/ip4/0.0.0.0/udp/1) is not a transport"),
        "{errors:?}"
    );
    assert!(
        errors[1].starts_with("listen[1]") && errors[1].contains("/ip4 or /ip6"),
        "{errors:?}"
    );
    assert!(
        errors[2].contains("enable_websocket is false"),
        "{errors:?}"
    );
    assert!(errors[3].starts_with("listen[3]"), "{errors:?}");
    load_yaml("enable_websocket: true\nlisten: [/ip4/0.0.0.0/tcp/1/ws, /ip6/::1/udp/0/quic-v1]\n")
        .unwrap();
}

#[test]
fn rule_node_id_is_a_peer_id() {
    let errors = rule_errors("node_id: bob\n");
    assert!(
        errors[0].starts_with("node_id (bob) is not a peer id"),
        "{errors:?}"
    );
    let config = load_yaml(&format!("node_id: {PEER}\n")).unwrap();
    assert_eq!(config.expected_peer_id().unwrap().to_string(), PEER);
}

#[test]
fn rule_require_auth_needs_a_readable_key_and_no_quic() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.key");
    let errors = rule_errors(&format!(
        "require_auth: true\npsk_path: {}\nlisten: [/ip4/0.0.0.0/tcp/0]\n",
        missing.display()
    ));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with(&format!("psk_path ({})", missing.display()))
            && errors[0].contains("init --psk"),
        "{errors:?}"
    );

    let key = dir.path().join("swarm.key");
    ollamacron_config::write_new_network_key(&key).unwrap();
    let errors = rule_errors(&format!(
        "require_auth: true\npsk_path: {}\nlisten: [/ip4/0.0.0.0/tcp/0, /ip4/0.0.0.0/udp/0/quic-v1]\nbootstrap: [/ip4/192.0.2.1/udp/1/quic-v1/p2p/{PEER}]\n",
        key.display()
    ));
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].starts_with("listen[1] (/ip4/0.0.0.0/udp/0/quic-v1) is QUIC"),
        "{errors:?}"
    );
    assert!(errors[1].starts_with("bootstrap[0]"), "{errors:?}");

    let config = load_yaml(&format!(
        "require_auth: true\npsk_path: {}\nlisten: [/ip4/0.0.0.0/tcp/0]\n",
        key.display()
    ))
    .unwrap();
    assert_eq!(config.psk_path(), key);
}

#[test]
fn rule_allowed_peers_are_peer_ids_and_include_bootstrap_peers() {
    let other = "12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo";
    let errors = rule_errors(&format!(
        "allowed_peers: [bob, {other}]\nbootstrap: [/ip4/192.0.2.1/tcp/1/p2p/{PEER}]\n"
    ));
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].starts_with("allowed_peers[0] (bob) is not a peer id"),
        "{errors:?}"
    );
    assert!(
        errors[1].starts_with("bootstrap[0]")
            && errors[1].contains(&format!("add {PEER} to allowed_peers")),
        "{errors:?}"
    );
    let config = load_yaml(&format!(
        "allowed_peers: [{PEER}]\nbootstrap: [/ip4/192.0.2.1/tcp/1/p2p/{PEER}]\n"
    ))
    .unwrap();
    assert_eq!(config.allowed_peer_ids().len(), 1);
}

#[test]
fn rule_relay_limits() {
    let errors = rule_errors(
        "relay_max_reservations: 0\nrelay_max_circuits_per_peer: 0\nrelay_max_circuit_bytes: 1KiB\nrelay_max_circuit_duration: 10ms\n",
    );
    assert_eq!(
        errors,
        [
            "relay_max_circuit_duration (10ms) must be at least 1s",
            "relay_max_reservations (0) must be at least 1",
            "relay_max_circuits_per_peer (0) must be at least 1",
            "relay_max_circuit_bytes (1KiB) must be at least 16KiB",
        ]
    );
}

#[test]
fn rule_resource_limits() {
    let errors = rule_errors("max_memory: 1MiB\nmax_cpu: 0\nmax_bandwidth: 0\n");
    assert_eq!(
        errors,
        [
            "max_memory (1MiB) must be at least 32MiB, or unset for no limit",
            "max_cpu (0) must be between 1 and 1024 cores, or unset for all cores",
            "max_bandwidth (0B) must be more than 0 bytes per second, or unset for no limit",
        ]
    );
}

#[test]
fn rule_labels() {
    let long = "x".repeat(65);
    let many: Vec<String> = (0..33).map(|i| format!("t{i}")).collect();
    let yaml = format!("region: {long}\ntags: [{}]\n", many.join(", "));
    let errors = rule_errors(&yaml);
    assert!(
        errors[0].starts_with("region (xxx") && errors[0].contains("1 to 64 bytes"),
        "{errors:?}"
    );
    assert!(
        errors[1].starts_with("tags (33 tags) must hold at most 32"),
        "{errors:?}"
    );
    let errors = rule_errors("tags: [ok, \"\", \"bad\\u0007\"]\n");
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].starts_with("tags[1]") && errors[1].starts_with("tags[2]"),
        "{errors:?}"
    );
}

#[test]
fn rule_durations() {
    let errors = rule_errors(
        "ping_interval: 10ms\nidle_connection_timeout: 0s\nshutdown_timeout: 1h\nlog_level: \" \"\n",
    );
    assert_eq!(errors.len(), 4, "{errors:?}");
    assert!(
        errors[0].starts_with("ping_interval (10ms) must be at least 1s"),
        "{errors:?}"
    );
    assert!(
        errors[1].starts_with("idle_connection_timeout"),
        "{errors:?}"
    );
    assert!(
        errors[2].starts_with("shutdown_timeout (1h) must be at most 10m"),
        "{errors:?}"
    );
    assert!(errors[3].starts_with("log_level"), "{errors:?}");
}

#[test]
fn all_broken_rules_are_reported_at_once() {
    let errors = rule_errors("conn_mgr_low: 9\nconn_mgr_high: 3\nnode_id: x\nmax_cpu: 0\n");
    assert_eq!(errors.len(), 3, "{errors:?}");
}

#[test]
fn generated_default_file_round_trips_and_documents_every_field() {
    let text = default_config_yaml().unwrap();
    assert_eq!(load_yaml(&text).unwrap(), NodeConfig::default());

    let defaults = serde_yaml_ng_keys(&NodeConfig::default());
    let documented: Vec<String> = field_docs().map(|(k, _)| k.to_owned()).collect();
    assert_eq!(
        documented, defaults,
        "every field documented, in declaration order"
    );
    for key in &defaults {
        assert!(
            text.contains(&format!("{key}:")),
            "{key} missing from the file"
        );
    }
}

#[test]
fn a_full_config_serialises_and_reloads_unchanged() {
    let config = NodeConfig {
        node_id: Some(PEER.to_owned()),
        region: Some("eu-west".to_owned()),
        tags: vec!["gpu".to_owned()],
        max_memory: Some(ByteSize::from_mib(256)),
        max_cpu: Some(2),
        force_reachability: Some(Reachability::Public),
        conn_mgr_grace: Duration::from_millis(1500),
        bootstrap: vec![format!("/ip4/192.0.2.1/tcp/1/p2p/{PEER}").parse().unwrap()],
        ..NodeConfig::default()
    };
    let yaml = config.to_yaml().unwrap();
    assert_eq!(load_yaml(&yaml).unwrap(), config);
}

#[test]
fn committed_example_matches_the_generator() {
    let committed = include_str!("../../../docs/ollamacron.example.yaml");
    assert_eq!(
        committed,
        default_config_yaml().unwrap(),
        "docs/ollamacron.example.yaml is stale: regenerate it with \
         `cargo run -p ollamacron-node -- init --config docs/ollamacron.example.yaml --force`"
    );
}

#[test]
fn paths_derive_from_data_dir() {
    let config = load_yaml("data_dir: /srv/oc\n").unwrap();
    assert_eq!(
        config.private_key_path(),
        std::path::Path::new("/srv/oc/identity.key")
    );
    let config = load_yaml("data_dir: /srv/oc\nprivate_key_path: /k\n").unwrap();
    assert_eq!(config.private_key_path(), std::path::Path::new("/k"));
}

#[test]
fn origin_is_reported_for_overrides() {
    let err = ConfigLoader::new()
        .set("conn_mgr_low", "many")
        .load()
        .unwrap_err();
    match err {
        ConfigError::InvalidValue { field, origin, .. } => {
            assert_eq!(field, "conn_mgr_low");
            assert_eq!(origin, Origin::Override("conn_mgr_low".to_owned()));
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn type_errors_are_worded_for_people() {
    let message = |loader: ConfigLoader| loader.load().unwrap_err().to_string();
    let m = message(ConfigLoader::new().set("api_listen", "localhost"));
    assert!(
        m.contains("\"localhost\" is not an IP address and port") && m.contains("127.0.0.1:11437"),
        "{m}"
    );
    let m = message(ConfigLoader::new().set("conn_mgr_low", "many"));
    assert!(
        m.contains("expected a whole number") && m.contains("\"many\""),
        "{m}"
    );
    let m = message(ConfigLoader::new().set("enable_dht", "maybe"));
    assert!(m.contains("expected true or false"), "{m}");
    let m = load_yaml("bootstrap: {a: 1}\n").unwrap_err().to_string();
    assert!(m.contains("a list") && !m.contains("sequence"), "{m}");
    let m = load_yaml("conn_mgr_low: [1]\n").unwrap_err().to_string();
    assert!(m.contains("found a list"), "{m}");
    let m = load_yaml("conn_mgr_low: -1\n").unwrap_err().to_string();
    assert!(
        m.contains("expected a whole number") && !m.contains("u32"),
        "{m}"
    );
    // The example is the field's own default.
    let m = message(ConfigLoader::new().set("gateway_listen", "localhost"));
    assert!(m.contains("127.0.0.1:11435"), "{m}");
}

#[test]
fn a_single_value_is_a_list_of_one() {
    let config = load_yaml("listen: /ip4/127.0.0.1/tcp/4001\n").unwrap();
    assert_eq!(config.listen.len(), 1);
    assert_eq!(config.listen[0].to_string(), "/ip4/127.0.0.1/tcp/4001");
    let config = load_yaml("tags: gpu, fast\n").unwrap();
    assert_eq!(config.tags, vec!["gpu".to_owned(), "fast".to_owned()]);
    let config = load_yaml("bootstrap: \"\"\n").unwrap();
    assert!(config.bootstrap.is_empty());
    // A service is a mapping: text there is refused as such.
    let m = load_yaml("services: llama3\n").unwrap_err().to_string();
    assert!(
        m.contains("services") && m.contains("expected a list"),
        "{m}"
    );
}

/// The top-level keys of a config serialised as YAML, in order.
fn serde_yaml_ng_keys(config: &NodeConfig) -> Vec<String> {
    config
        .to_yaml()
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with([' ', '-']) && l.contains(':'))
        .map(|l| l.split(':').next().unwrap().to_owned())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn parsing_arbitrary_text_never_panics(text in ".{0,300}") {
        let _ = load_yaml(&text);
    }

    #[test]
    fn parsing_yaml_like_text_never_panics(
        key in prop::sample::select(vec!["listen", "conn_mgr_low", "max_memory", "tags", "node_id", "conn_mgr_grace", "bootstrap", "api_listen", "x"]),
        value in "[ -~]{0,60}",
    ) {
        let _ = load_yaml(&format!("{key}: {value}\n"));
        let _ = ConfigLoader::new().set(key, value.clone()).load();
        let _ = ConfigLoader::new().env([(format!("OLLAMACRON_{}", key.to_uppercase()), value)]).load();
    }
}

#[test]
fn rule_discovery_settings() {
    let errors = rule_errors(
        "bootstrap_min_connections: 6\nbootstrap_max_connections: 5\nbootstrap_backoff_initial: 2m\nbootstrap_backoff_max: 1m\ndht_discovery_interval: 1ms\ndht_max_records: 0\ndht_max_value_size: 10MiB\n",
    );
    assert_eq!(
        errors,
        [
            "bootstrap_min_connections (6) must be <= bootstrap_max_connections (5)",
            "bootstrap_backoff_max (1m) must be >= bootstrap_backoff_initial (2m)",
            "dht_discovery_interval (1ms) must be at least 100ms",
            "dht_max_records (0) must be at least 1",
            "dht_max_value_size (10MiB) must be between 1KiB and 1MiB",
        ]
    );
    let errors = rule_errors("bootstrap_min_connections: 0\nbootstrap_max_connections: 0\n");
    assert_eq!(errors, ["bootstrap_max_connections (0) must be at least 1"]);
    let config = load_yaml("dht_mode: client\n").unwrap();
    assert_eq!(config.dht_mode, ollamacron_config::DhtMode::Client);
}

#[test]
fn env_text_keeps_its_spelling_unless_canonical() {
    let config = ConfigLoader::new()
        .env([
            ("OLLAMACRON_REGION", "007"),
            ("OLLAMACRON_DATA_DIR", "~"),
            ("OLLAMACRON_NODE_TYPE", "client"),
            ("OLLAMACRON_CONN_MGR_LOW", "7"),
        ])
        .load()
        .unwrap();
    assert_eq!(config.region.as_deref(), Some("007"));
    assert_eq!(config.data_dir.as_deref(), Some(std::path::Path::new("~")));
    assert_eq!(config.conn_mgr_low, 7);
    let err = ConfigLoader::new()
        .set("conn_mgr_low", "010")
        .load()
        .unwrap_err();
    assert!(err.to_string().contains("conn_mgr_low"), "{err}");
}

#[test]
fn durations_have_an_upper_bound() {
    let errors = rule_errors("ping_interval: 300000000000y\n");
    assert!(
        errors[0].starts_with("ping_interval") && errors[0].contains("at most 30days"),
        "{errors:?}"
    );
}

#[test]
fn peer_addresses_need_a_transport() {
    let errors = rule_errors(&format!("bootstrap: [/ip4/192.0.2.1/p2p/{PEER}]\n"));
    assert!(errors[0].contains("names no transport"), "{errors:?}");
    load_yaml(&format!("bootstrap: [/dnsaddr/bootstrap.example/p2p/{PEER}, /dns4/a.example/udp/1/quic-v1/p2p/{PEER}]\n")).unwrap();
}

#[test]
fn services_load_with_defaults_and_each_broken_rule_is_named() {
    let config = load_yaml(
        "services:\n  - name: llama3:8b\n    type: llm\n    tags: [gpu]\n    metadata: {ctx: \"8192\"}\n",
    )
    .unwrap();
    assert_eq!(config.services[0].effective_id(), "llama3:8b");
    assert_eq!(config.services[0].metadata["ctx"], "8192");

    let errors = rule_errors(
        "max_string_length: 64\nmax_list_items: 2\nservices:\n\
         - {name: a, type: llm}\n\
         - {name: a, type: \"\"}\n\
         - {name: \"\", type: llm, id: c}\n\
         - {name: d, type: llm, tags: [x, y, z], health_check_url: \"https://d\", reliability: 1.5, latency_ms: -1}\n\
         - {name: e, type: llm, description: \"LONG\"}\n"
            .replace("LONG", &"x".repeat(65))
            .as_str(),
    );
    let has = |prefix: &str, words: &str| {
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with(prefix) && e.contains(words)),
            "no {prefix:?} with {words:?} in {errors:?}"
        );
    };
    has("services[1].type", "must not be empty");
    has("services[1].id", "must be unique");
    has("services[2].name", "must not be empty");
    has("services[3].tags", "at most max_list_items (2)");
    has("services[3].health_check_url", "http://");
    has("services[3].reliability", "between 0 and 1");
    has("services[3].latency_ms", ">= 0");
    has("services[4].description", "max_string_length (64)");

    let error = value_error("services:\n  - {name: a, type: llm, colour: red}\n");
    assert!(
        error.contains("services[0].colour") && error.contains("unknown field"),
        "{error}"
    );
}

#[test]
fn rule_record_lifetimes_limits_and_weights() {
    let errors = rule_errors(
        "record_ttl: 5s\nrecord_refresh_interval: 10s\nmax_record_size: 2MiB\nmax_string_length: 8\n\
         score_weights: {reliability: 0, latency: 0, throughput: 0, availability: 0}\n",
    );
    let joined = errors.join("\n");
    for needle in [
        "record_ttl (5s) must be between 10s and 1h",
        "record_refresh_interval (10s) must be shorter than record_ttl",
        "max_record_size (2MiB) must be between 1KiB and dht_max_value_size",
        "max_string_length (8) must be between 64",
        "score_weights (all 0)",
    ] {
        assert!(joined.contains(needle), "no {needle:?} in {errors:?}");
    }
    let errors = rule_errors("score_weights: {reliability: -1}\n");
    assert!(
        errors[0].starts_with("score_weights.reliability (-1)"),
        "{errors:?}"
    );
}

#[test]
fn structured_fields_take_yaml_flow_syntax_from_env_and_overrides() {
    let config = ConfigLoader::new()
        .env([(
            "OLLAMACRON_SERVICES",
            "[{name: llama3, type: llm, tags: [gpu]}]",
        )])
        .set("score_weights", "{reliability: 0, latency: 1}")
        .load()
        .unwrap();
    assert_eq!(config.services[0].tags, ["gpu"]);
    assert_eq!(config.score_weights.latency, 1.0);
    assert_eq!(
        config.score_weights.throughput, 0.2,
        "unset weights keep their default"
    );
    let error = ConfigLoader::new()
        .set("score_weights", "{latncy: 1}")
        .load()
        .unwrap_err()
        .to_string();
    assert!(error.contains("latncy"), "{error}");
}

#[test]
fn rule_relay_nodes_are_relays_own_addresses() {
    let errors = rule_errors(&format!(
        "relay_nodes: [/ip4/192.0.2.1/tcp/1/p2p/{PEER}/p2p-circuit/p2p/{PEER}]\n"
    ));
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with("relay_nodes[0]") && errors[0].contains("not a relayed one"),
        "{errors:?}"
    );
    load_yaml(&format!("relay_nodes: [/ip4/192.0.2.1/tcp/1/p2p/{PEER}]\n")).unwrap();
}

#[test]
fn otlp_endpoint_is_an_http_url_and_needs_enable_tracing() {
    let config = load_yaml("enable_tracing: true\notlp_endpoint: http://127.0.0.1:4318\n").unwrap();
    assert_eq!(
        config.otlp_endpoint.as_deref(),
        Some("http://127.0.0.1:4318")
    );
    for good in [
        "http://[::1]:4318/v1/traces",
        "http://[::1]",
        "http://[::1]/",
        "http://collector",
        "http://collector:4318/otlp",
    ] {
        let yaml = format!("enable_tracing: true\notlp_endpoint: \"{good}\"\n");
        assert!(load_yaml(&yaml).is_ok(), "{good}: {:?}", rule_errors(&yaml));
    }
    assert_eq!(load_yaml("").unwrap().otlp_endpoint, None);
    for (value, words) in [
        ("https://collector:4318", "no TLS client"),
        ("collector:4318", "must be an http:// URL"),
        ("http://", "must name a host"),
        ("http://c:port", "no valid port"),
        ("http://c:0", "no valid port"),
        ("http://[::1]:abc", "no valid port"),
        ("http://[::1]x", "no valid port"),
        ("http://[::1", "unclosed ["),
        ("http://[zz]:4318", "no valid IPv6 address"),
        ("http://:4318", "must name a host"),
        ("http://c:4318/?x=1", "query"),
    ] {
        let errors = rule_errors(&format!(
            "enable_tracing: true\notlp_endpoint: \"{value}\"\n"
        ));
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("otlp_endpoint") && e.contains(words)),
            "{value}: no {words:?} in {errors:?}"
        );
    }
    let errors = rule_errors("otlp_endpoint: http://127.0.0.1:4318\n");
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("otlp_endpoint") && e.contains("enable_tracing is false")),
        "{errors:?}"
    );
}
