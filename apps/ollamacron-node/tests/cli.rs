//! The `ollamacron-node` binary as a user runs it.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failing loudly is the point

mod common;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_ollamacron-node");
const LINE_TIMEOUT: Duration = Duration::from_secs(30);

fn node(args: &[&str], data_dir: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("OLLAMACRON_CONFIG")
        .env("XDG_DATA_HOME", data_dir)
        .output()
        .unwrap()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn id_is_stable_and_follows_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.yaml");
    let data = dir.path().join("data");
    std::fs::write(&config, format!("data_dir: {}\n", data.display())).unwrap();
    let cfg = config.to_str().unwrap();

    let first = node(&["id", "--config", cfg], dir.path());
    assert!(first.status.success(), "{}", text(&first.stderr));
    let id = text(&first.stdout).trim().to_owned();
    assert!(id.starts_with("12D3KooW"), "{id}");
    assert!(data.join("identity.key").exists());

    let second = node(&["id", "--config", cfg], dir.path());
    assert_eq!(text(&second.stdout).trim(), id);

    // The same node through the environment variable and through a flag.
    let via_env = Command::new(BIN)
        .args(["id"])
        .env("OLLAMACRON_CONFIG", cfg)
        .output()
        .unwrap();
    assert_eq!(text(&via_env.stdout).trim(), id);
    let via_flag = node(&["id", "--data-dir", data.to_str().unwrap()], dir.path());
    assert_eq!(text(&via_flag.stdout).trim(), id);
}

#[test]
fn init_writes_a_valid_file_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ollamacron.yaml");
    let p = path.to_str().unwrap();

    let out = node(&["init", "--config", p], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    let written = std::fs::read_to_string(&path).unwrap();
    assert!(written.contains("# Find peers on the local network with mDNS."));

    let again = node(&["init", "--config", p], dir.path());
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("already exists; pass --force"),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(std::fs::read_to_string(&path).unwrap(), written);

    assert!(
        node(&["init", "--config", p, "--force"], dir.path())
            .status
            .success()
    );

    let check = node(&["config", "check", p], dir.path());
    assert!(check.status.success(), "{}", text(&check.stderr));
    assert!(text(&check.stdout).contains("conn_mgr_high: 400"));
    assert!(text(&check.stdout).contains("configuration is valid"));
}

#[test]
fn config_check_names_what_is_wrong_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "conn_mgr_low: 900\nconn_mgr_high: 400\n").unwrap();
    let out = node(&["config", "check", path.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("conn_mgr_low (900) must be <= conn_mgr_high (400)"),
        "{}",
        text(&out.stderr)
    );

    std::fs::write(&path, "enable_mnds: true\n").unwrap();
    let out = node(&["config", "check", path.to_str().unwrap()], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("did you mean `enable_mdns`"),
        "{}",
        text(&out.stderr)
    );

    let out = node(&["config", "check", "--set", "max_cpu=lots"], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("max_cpu"),
        "{}",
        text(&out.stderr)
    );

    let out = node(&["config", "check", "--set", "log_level=[["], dir.path());
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("log_level"),
        "{}",
        text(&out.stderr)
    );

    let out = node(&["run", "--set", "conn_mgr_high=0"], dir.path());
    assert_eq!(
        out.status.code(),
        Some(2),
        "run refuses a bad config before starting"
    );
}

struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Running {
    fn wait_for_line(&self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + LINE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(e) => panic!("no log line containing {needle:?}: {e}"),
            }
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `run` on loopback (no mDNS, API on a free port unless `extra` names
/// one), with `extra` arguments.
fn spawn_run(data_dir: &Path, extra: &[&str]) -> Running {
    spawn_run_with_env(data_dir, extra, &[])
}

/// [`spawn_run`] with `env` added to the node's environment.
fn spawn_run_with_env(data_dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Running {
    let api: &[&str] = if extra.contains(&"--api-listen") {
        &[]
    } else {
        &["--api-listen", "127.0.0.1:0"]
    };
    let mut child = Command::new(BIN)
        .arg("run")
        .args(extra)
        .args(api)
        .args([
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--no-mdns",
            "--data-dir",
            data_dir.to_str().unwrap(),
        ])
        // An Ollama on the test machine must not add services to the tests',
        // and nodes running side by side each take a free gateway port.
        .args([
            "--set",
            "enable_ollama=false",
            "--set",
            "gateway_listen=127.0.0.1:0",
        ])
        .env_remove("OLLAMACRON_CONFIG")
        .env_remove("RUST_LOG")
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let lines = common::stderr_lines(&mut child);
    Running { child, lines }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + LINE_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "node did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(unix)]
#[test]
fn run_logs_its_addresses_and_exits_0_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let id = text(
        &node(
            &["id", "--data-dir", dir.path().to_str().unwrap()],
            dir.path(),
        )
        .stdout,
    )
    .trim()
    .to_owned();

    let mut running = spawn_run(dir.path(), &[]);
    let listening = running.wait_for_line("listening");
    assert!(
        listening.contains("/ip4/127.0.0.1/tcp/") && listening.contains(&format!("/p2p/{id}")),
        "{listening}"
    );
    assert!(
        !listening.contains('\u{1b}'),
        "no colour codes when not on a terminal"
    );
    running.wait_for_line("node running");

    let kill = Command::new("kill")
        .args(["-TERM", &running.child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    running.wait_for_line("node stopped");
    let status = wait_exit(&mut running.child);
    assert_eq!(status.code(), Some(0));
}

/// `run --config` with a `services:` list advertises them with no code: a
/// node started in this test finds them through the DHT.
#[test]
fn run_with_a_services_list_advertises_them() {
    use ollamacron_node_core::libp2p::identity::Keypair;
    use ollamacron_node_core::registry::ServiceQuery;

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("node.yaml");
    std::fs::write(
        &config,
        "region: lab\n\
         services:\n  \
           - name: llama3:8b\n    type: llm\n    tags: [gpu]\n    capabilities: [completion, tools]\n  \
           - name: nomic-embed-text\n    type: embedding\n    capabilities: [embedding]\n",
    )
    .unwrap();
    let running = spawn_run(dir.path(), &["--config", config.to_str().unwrap()]);
    let listening = running.wait_for_line("listening");
    let addr = listening
        .split_whitespace()
        .find_map(|w| w.strip_prefix("address="))
        .unwrap_or_else(|| panic!("no address in {listening:?}"))
        .to_owned();
    let advertising = running.wait_for_line("advertising services");
    assert!(advertising.contains("llama3:8b"), "{advertising}");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut config = ollamacron_config::ConfigLoader::new()
            .set("listen", "/ip4/127.0.0.1/tcp/0")
            .set("enable_mdns", "false")
            .set("enable_metrics", "false")
            .set("bootstrap", addr.as_str())
            .load()
            .unwrap();
        config.shutdown_timeout = Duration::from_secs(2);
        let asker = ollamacron_node_core::Node::new(config)
            .with_keypair(Keypair::generate_ed25519())
            .start()
            .await
            .unwrap();
        let query = ServiceQuery {
            service_type: Some("llm".into()),
            region: Some("lab".into()),
            ..ServiceQuery::default()
        };
        let deadline = std::time::Instant::now() + LINE_TIMEOUT;
        let found = loop {
            let found = asker.find_services(query.clone()).await.unwrap();
            if !found.is_empty() || std::time::Instant::now() > deadline {
                break found;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].service.name, "llama3:8b");
        assert_eq!(found[0].service.tags, ["gpu"]);
        assert!(listening.contains(&found[0].service.peer_id), "{listening}");
        asker.shutdown().await.unwrap();
    });
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `/p2p` address a `run` logged in its "listening" line.
fn listening_addr(running: &Running) -> String {
    let line = running.wait_for_line("listening");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("address="))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned()
}

/// Two nodes on loopback, B bootstrapped from A, each with its API on a
/// port of its own, both running.
struct TwoNodes {
    dir_a: tempfile::TempDir,
    dir_b: tempfile::TempDir,
    api_a: String,
    api_b: String,
    /// A's `/p2p` address.
    a_addr: String,
    running: (Running, Running),
}

fn two_nodes() -> TwoNodes {
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (api_a, api_b) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let a = spawn_run(dir_a.path(), &["--api-listen", &api_a]);
    let a_addr = listening_addr(&a);
    a.wait_for_line("node running");
    let b = spawn_run(
        dir_b.path(),
        &["--api-listen", &api_b, "--bootstrap", &a_addr],
    );
    b.wait_for_line("node running");
    TwoNodes {
        dir_a,
        dir_b,
        api_a,
        api_b,
        a_addr,
        running: (a, b),
    }
}

#[test]
fn a_service_registered_through_the_cli_is_found_from_another_node() {
    let TwoNodes {
        dir_a,
        dir_b,
        api_a,
        api_b,
        a_addr,
        running: _running,
    } = two_nodes();

    let register = || {
        node(
            &[
                "services",
                "register",
                "--api-listen",
                &api_a,
                "--name",
                "llama3:8b",
                "--type",
                "llm",
                "--tag",
                "gpu",
                "--capability",
                "tools",
            ],
            dir_a.path(),
        )
    };
    let out = register();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("registered llama3:8b"),
        "{}",
        text(&out.stdout)
    );
    // The same name again replaces it, and says so.
    let again = register();
    assert!(again.status.success(), "{}", text(&again.stderr));
    assert!(
        text(&again.stdout).contains("replaced llama3:8b"),
        "{}",
        text(&again.stdout)
    );
    let listed = node(&["services", "list", "--api-listen", &api_a], dir_a.path());
    assert!(
        text(&listed.stdout).contains("llama3:8b"),
        "{}",
        text(&listed.stdout)
    );

    let deadline = std::time::Instant::now() + LINE_TIMEOUT;
    let found = loop {
        let out = node(
            &[
                "services",
                "find",
                "--type",
                "llm",
                "--tag",
                "gpu",
                "--json",
                "--api-listen",
                &api_b,
            ],
            dir_b.path(),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let found = text(&out.stdout);
        if found.contains("llama3:8b") || std::time::Instant::now() > deadline {
            break found;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let json: Vec<serde_json::Value> = serde_json::from_str(&found).unwrap();
    assert_eq!(json.len(), 1, "{found}");
    assert_eq!(json[0]["service"]["name"], "llama3:8b");
    assert!(a_addr.ends_with(json[0]["service"]["peer_id"].as_str().unwrap()));
    assert!(json[0]["score"]["total"].is_number());
    // By model, with or without the `:latest` tag.
    for (model, count) in [("llama3:8b", 1), ("llama3", 0)] {
        let out = node(
            &[
                "services",
                "find",
                "--model",
                model,
                "--json",
                "--api-listen",
                &api_b,
            ],
            dir_b.path(),
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
        let json: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(json.len(), count, "{model}: {}", text(&out.stdout));
    }

    let status = node(&["status", "--json", "--api-listen", &api_b], dir_b.path());
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(status["state"], "running");
    let peers = node(&["peers", "--api-listen", &api_b], dir_b.path());
    assert!(
        text(&peers.stdout).starts_with("PEER ID"),
        "{}",
        text(&peers.stdout)
    );

    let unregister = || {
        node(
            &[
                "services",
                "unregister",
                "llama3:8b",
                "--api-listen",
                &api_a,
            ],
            dir_a.path(),
        )
    };
    let gone = unregister();
    assert!(gone.status.success(), "{}", text(&gone.stderr));
    let again = unregister();
    assert_eq!(again.status.code(), Some(1));
    assert!(
        text(&again.stderr).contains("no local service with id `llama3:8b`"),
        "{}",
        text(&again.stderr)
    );
}

#[test]
fn models_lists_every_model_of_the_mesh_with_the_nodes_serving_it() {
    let TwoNodes {
        dir_a,
        dir_b,
        api_a,
        api_b,
        a_addr,
        running: _running,
    } = two_nodes();
    let lone = node(&["models", "--api-listen", &api_b], dir_b.path());
    assert!(lone.status.success(), "{}", text(&lone.stderr));
    assert!(
        text(&lone.stdout).starts_with("no models in the mesh yet"),
        "{}",
        text(&lone.stdout)
    );

    // A warm model on A, the same model cold on B, and an embedding model
    // on B; a service that is no model is left out.
    let register = |api: &str, dir: &Path, yaml: &str| {
        let file = dir.join("service.yaml");
        std::fs::write(&file, yaml).unwrap();
        let out = node(
            &[
                "services",
                "register",
                file.to_str().unwrap(),
                "--api-listen",
                api,
            ],
            dir,
        );
        assert!(out.status.success(), "{}", text(&out.stderr));
    };
    register(
        &api_a,
        dir_a.path(),
        "name: llama3:8b\ntype: llm\nversion: sha256-aa\nmetadata: {loaded: 'true', in_flight: '3', max_concurrent: '8', size_bytes: '4661224676'}\n",
    );
    register(
        &api_b,
        dir_b.path(),
        "name: llama3:8b\ntype: llm\nmetadata: {loaded: 'false', in_flight: '0', max_concurrent: '4'}\n",
    );
    register(
        &api_b,
        dir_b.path(),
        "name: nomic-embed-text\ntype: embedding\n",
    );
    register(
        &api_b,
        dir_b.path(),
        "name: a-translator\ntype: translation\n",
    );

    let a_id = a_addr.rsplit('/').next().unwrap().to_owned();
    let deadline = std::time::Instant::now() + LINE_TIMEOUT;
    let models = loop {
        let out = node(&["models", "--json", "--api-listen", &api_b], dir_b.path());
        assert!(out.status.success(), "{}", text(&out.stderr));
        let models: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let llama_nodes = models
            .iter()
            .find(|m| m["name"] == "llama3:8b")
            .map_or(0, |m| m["nodes"].as_array().unwrap().len());
        if llama_nodes == 2 || std::time::Instant::now() > deadline {
            break models;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let names: Vec<&str> = models.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["llama3:8b", "nomic-embed-text:latest"],
        "{models:?}"
    );
    let llama = &models[0];
    assert_eq!(llama["type"], "llm");
    assert_eq!(llama["loaded_on"], 1);
    assert_eq!(llama["in_flight"], 3);
    // The warm node first: A, reached directly; then B itself, cold.
    assert_eq!(llama["nodes"][0]["peer_id"], a_id.as_str());
    assert_eq!(llama["nodes"][0]["loaded"], true);
    assert_eq!(llama["nodes"][0]["connection"], "direct");
    assert_eq!(llama["nodes"][0]["max_concurrent"], 8);
    assert_eq!(llama["nodes"][1]["local"], true);
    assert_eq!(llama["nodes"][1]["loaded"], false);
    assert!(llama["nodes"][1]["connection"].is_null());
    assert_eq!(models[1]["type"], "embedding");

    let table = node(&["models", "--api-listen", &api_b], dir_b.path());
    assert!(table.status.success(), "{}", text(&table.stderr));
    let table = text(&table.stdout);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("NAME"), "{table}");
    assert_eq!(
        lines.len(),
        4,
        "a header and one row per model and node: {table}"
    );
    let warm = lines[1];
    for cell in [
        "llama3:8b",
        &a_id[..12],
        "loaded",
        "3/8",
        "available",
        "direct",
        "4.7 GB",
    ] {
        assert!(warm.contains(cell), "{cell:?} not in {warm:?}\n{table}");
    }
    for cell in ["llama3:8b", "(this node)", "cold", "0/4", "local"] {
        assert!(
            lines[2].contains(cell),
            "{cell:?} not in {:?}\n{table}",
            lines[2]
        );
    }
    assert!(lines[3].starts_with("nomic-embed-text:latest"), "{table}");
}

#[test]
fn with_api_keys_the_cli_sends_the_configured_key_and_others_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("api.keys");
    std::fs::write(&keys, "# the team's key\nteam-key-0123\n").unwrap();
    let key_file = format!("api_key_file={}", keys.display());
    let api = format!("127.0.0.1:{}", free_port());
    let running = spawn_run(dir.path(), &["--api-listen", &api, "--set", &key_file]);
    running.wait_for_line("node running");
    let status = node(
        &["status", "--api-listen", &api, "--set", &key_file],
        dir.path(),
    );
    assert!(status.status.success(), "{}", text(&status.stderr));
    let out = text(&status.stdout);
    assert!(out.contains("key required"), "{out}");
    let refused = node(&["status", "--api-listen", &api], dir.path());
    assert_eq!(refused.status.code(), Some(1));
    let err = text(&refused.stderr);
    assert!(
        err.contains("requires an API key") && err.contains("api_keys"),
        "{err}"
    );
}

#[test]
fn api_commands_say_clearly_when_no_node_is_running() {
    let dir = tempfile::tempdir().unwrap();
    let api = format!("127.0.0.1:{}", free_port());
    for args in [
        vec!["status", "--api-listen", &api],
        vec!["peers", "--api-listen", &api],
        vec!["services", "find", "--type", "llm", "--api-listen", &api],
    ] {
        let out = node(&args, dir.path());
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = text(&out.stderr);
        assert!(
            err.contains(&format!("no node is running at http://{api}"))
                && err.contains("ollamacron-node run"),
            "{err}"
        );
    }
}

#[test]
fn init_psk_writes_a_private_key_and_a_node_without_it_is_refused_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("swarm.key");
    let k = key.to_str().unwrap();
    let out = node(&["init", "--psk", k], dir.path());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("require_auth: true"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let again = node(&["init", "--psk", k], dir.path());
    assert_eq!(again.status.code(), Some(2), "never overwrites a key");
    assert!(text(&again.stderr).contains("already exists"));

    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let psk = format!("psk_path={k}");
    let a = spawn_run(dir_a.path(), &["--set", "require_auth=true", "--set", &psk]);
    a.wait_for_line("private network");
    let a_addr = listening_addr(&a);
    a.wait_for_line("node running");
    // A node without the key gives up on its own after its dial timeout.
    let b = spawn_run(
        dir_b.path(),
        &["--bootstrap", &a_addr, "--set", "dial_timeout=2s"],
    );
    b.wait_for_line("node running");
    let refusal = a.wait_for_line("refused a connection");
    assert!(refusal.contains("network key"), "{refusal}");
}

#[test]
fn a_bad_ollama_address_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    // `run` on loopback with `ollama_url` or OLLAMA_HOST set: its stderr,
    // once it has exited with the configuration-error code.
    let refused = |ollama_url: Option<&str>, ollama_host: Option<&str>| {
        let mut command = Command::new(BIN);
        command
            .args([
                "run",
                "--no-mdns",
                "--listen",
                "/ip4/127.0.0.1/tcp/0",
                "--api-listen",
                "127.0.0.1:0",
                "--set",
                "enable_gateway=false",
            ])
            .arg("--data-dir")
            .arg(dir.path())
            .env_remove("OLLAMACRON_CONFIG")
            .env_remove("OLLAMA_HOST");
        if let Some(url) = ollama_url {
            command.args(["--set", &format!("ollama_url={url}")]);
        }
        if let Some(host) = ollama_host {
            command.env("OLLAMA_HOST", host);
        }
        let out = command.output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        text(&out.stderr)
    };
    let err = refused(Some("https://gpu-box:11434"), None);
    assert!(
        err.contains("ollama_url") && err.contains("only http://"),
        "{err}"
    );
    let err = refused(None, Some("gpu-box:99999"));
    assert!(err.contains("OLLAMA_HOST"), "{err}");
}

/// `services list --json` of the node at `api`: each service's id and
/// origin.
fn listed_with_origin(api: &str, dir: &Path) -> Vec<(String, String)> {
    let out = node(&["services", "list", "--json", "--api-listen", api], dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut listed: Vec<(String, String)> = json
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_owned(),
                s["origin"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    listed.sort();
    listed
}

fn register_through_the_cli(api: &str, name: &str, dir: &Path) {
    let out = node(
        &[
            "services",
            "register",
            "--api-listen",
            api,
            "--name",
            name,
            "--type",
            "llm",
        ],
        dir,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
}

#[cfg(unix)]
#[test]
fn registered_services_survive_a_graceful_restart_and_a_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("ollamacron.yaml");
    std::fs::write(
        &config,
        "services:\n  - name: from-config:1b\n    type: llm\n",
    )
    .unwrap();
    let start = || {
        let api = format!("127.0.0.1:{}", free_port());
        let running = spawn_run(
            dir.path(),
            &["--api-listen", &api, "--config", config.to_str().unwrap()],
        );
        running.wait_for_line("node running");
        (running, api)
    };
    let (mut running, api) = start();
    register_through_the_cli(&api, "llama3:8b", dir.path());
    register_through_the_cli(&api, "gone:1b", dir.path());
    let out = node(
        &["services", "unregister", "gone:1b", "--api-listen", &api],
        dir.path(),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = node(&["services", "list", "--api-listen", &api], dir.path());
    let table = text(&table.stdout);
    assert!(table.contains("FROM"), "{table}");

    // A graceful stop, then a start: the registration is back, the
    // unregistered service is not, and the configured one is from config.
    let term = Command::new("kill")
        .args(["-TERM", &running.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert_eq!(wait_exit(&mut running.child).code(), Some(0));
    drop(running);
    let (running, api) = start();
    let expected = vec![
        ("from-config:1b".to_owned(), "config".to_owned()),
        ("llama3:8b".to_owned(), "api".to_owned()),
    ];
    assert_eq!(listed_with_origin(&api, dir.path()), expected);

    // Registered, then killed at once with SIGKILL: still there after.
    register_through_the_cli(&api, "phi3:mini", dir.path());
    drop(running); // kill -9
    let (_running, api) = start();
    let mut expected = expected;
    expected.push(("phi3:mini".to_owned(), "api".to_owned()));
    assert_eq!(listed_with_origin(&api, dir.path()), expected);
    // And offered: the node's own lookup by model finds it.
    let found = node(
        &[
            "services",
            "find",
            "--model",
            "phi3:mini",
            "--json",
            "--api-listen",
            &api,
        ],
        dir.path(),
    );
    let found: Vec<serde_json::Value> = serde_json::from_slice(&found.stdout).unwrap();
    assert_eq!(found.len(), 1, "{found:?}");
}

#[test]
fn a_corrupt_registration_file_stops_the_start_and_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("services.json");
    std::fs::write(&file, b"{\"format\": 1, \"services\": [").unwrap();
    let out = Command::new(BIN)
        .args([
            "run",
            "--no-mdns",
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--api-listen",
            "127.0.0.1:0",
            "--set",
            "enable_gateway=false",
            "--set",
            "enable_ollama=false",
        ])
        .arg("--data-dir")
        .arg(dir.path())
        .env_remove("OLLAMACRON_CONFIG")
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&file.display().to_string()) && stderr.contains("unreadable"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read(&file).unwrap(),
        b"{\"format\": 1, \"services\": [",
        "the file is left for its owner to fix"
    );
}

/// Debian's libfaketime (package `faketime`), preloaded into a node to move
/// its wall clock; the thread-safe build, as the node is multi-threaded.
fn libfaketime() -> Option<std::path::PathBuf> {
    let name = "faketime/libfaketimeMT.so.1";
    let mut dirs = vec![std::path::PathBuf::from("/usr/lib")];
    if let Ok(entries) = std::fs::read_dir("/usr/lib") {
        dirs.extend(entries.filter_map(Result::ok).map(|e| e.path()));
    }
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

/// The names of every `llm` service the node at `api` finds.
fn found_names(api: &str, dir: &Path) -> Vec<String> {
    let out = node(
        &[
            "services",
            "find",
            "--type",
            "llm",
            "--json",
            "--api-listen",
            api,
        ],
        dir,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let json: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut names: Vec<String> = json
        .iter()
        .map(|f| f["service"]["name"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

/// A mesh of five `run` processes, one with its clock 10 minutes slow and
/// one 10 minutes fast (libfaketime; monotonic time untouched): every node
/// finds every node's service, the skewed nodes say in their log and
/// `status` how far off their clocks are, the others say they are in step.
#[cfg(unix)]
#[test]
fn nodes_with_clocks_ten_minutes_off_stay_in_the_mesh_and_say_so() {
    let Some(faketime) = libfaketime() else {
        common::skip_unless_required(
            "SKIPPED the clock-skew test: libfaketime is not installed (Debian: apt-get install faketime; `cargo xtask ci` installs it when run as root)",
            "OLLAMACRON_REQUIRE_FAKETIME",
        );
        return;
    };
    let faketime = faketime.to_str().unwrap();
    // name, FAKETIME (none: the real clock)
    let nodes = [
        ("a", None),
        ("b", None),
        ("c", None),
        ("slow", Some("-10m")),
        ("fast", Some("+10m")),
    ];
    let mut bootstrap: Option<String> = None;
    let mut running = Vec::new();
    for (name, skew) in nodes {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("ollamacron.yaml");
        std::fs::write(
            &config,
            format!("services:\n  - name: clock-{name}:1b\n    type: llm\n"),
        )
        .unwrap();
        let api = format!("127.0.0.1:{}", free_port());
        // Re-signed every 2 s: a peer's clock is known to within moments
        // once it pushed a newer record (one refresh interval).
        let mut args = vec![
            "--api-listen",
            api.as_str(),
            "--config",
            config.to_str().unwrap(),
            "--set",
            "record_refresh_interval=2s",
        ];
        if let Some(first) = &bootstrap {
            args.extend(["--bootstrap", first.as_str()]);
        }
        let env: Vec<(&str, &str)> = match skew {
            Some(skew) => vec![
                ("LD_PRELOAD", faketime),
                ("FAKETIME", skew),
                ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ],
            None => Vec::new(),
        };
        let node = spawn_run_with_env(dir.path(), &args, &env);
        let addr = listening_addr(&node);
        node.wait_for_line("node running");
        bootstrap.get_or_insert(addr);
        running.push((name, skew, node, api, dir));
    }

    let mut all: Vec<String> = nodes.iter().map(|(n, _)| format!("clock-{n}:1b")).collect();
    all.sort();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for (name, _, _, api, dir) in &running {
        loop {
            let found = found_names(api, dir.path());
            if found == all {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name} finds only {found:?} of {all:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    let ten_minutes_ms = 600_000_i64;
    let tolerance_ms = 10_000_i64;
    for (name, skew, node, api, dir) in &running {
        // Once it has a fresh record of each of its four peers.
        let status = loop {
            let status = node_status(api, dir.path());
            if status["clock"]["peers_sampled"].as_u64() == Some(4) {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name} has fresh records of fewer than 4 peers: {}",
                status["clock"]
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let clock = &status["clock"];
        let offset = clock["offset_ms"]
            .as_i64()
            .unwrap_or_else(|| panic!("{name}: no clock offset in {clock}"));
        let expected = match skew {
            Some("-10m") => -ten_minutes_ms,
            Some(_) => ten_minutes_ms,
            None => 0,
        };
        assert!(
            (offset - expected).abs() <= tolerance_ms,
            "{name}: offset {offset} ms, expected about {expected}: {clock}"
        );
        match skew {
            Some(_) => {
                let warning = clock["warning"].as_str().unwrap_or_default();
                let side = if expected < 0 { "behind" } else { "ahead of" };
                assert!(
                    warning.contains(side) && warning.contains("NTP"),
                    "{name}: {clock}"
                );
                let logged = node.wait_for_line("this node's clock is");
                assert!(logged.contains(side), "{name}: {logged}");
                // And `status` says so for people.
                let table = node_text(&["status", "--api-listen", api], dir.path());
                assert!(table.contains("WARNING"), "{name}: {table}");
            }
            None => {
                assert!(clock["warning"].is_null(), "{name}: {clock}");
            }
        }
    }
    // A node in step names the skewed peers in its log, once each.
    let (_, _, first, _, _) = &running[0];
    first.wait_for_line("this peer's clock is");
}

fn node_status(api: &str, dir: &Path) -> serde_json::Value {
    let out = node(&["status", "--json", "--api-listen", api], dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn node_text(args: &[&str], dir: &Path) -> String {
    let out = node(args, dir);
    assert!(out.status.success(), "{}", text(&out.stderr));
    text(&out.stdout)
}
