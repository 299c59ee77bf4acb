//! `status`, `peers` and `services …`: commands that ask a running node
//! through its local HTTP API and print tables (or `--json`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use ollamacron_node_core::registry::ServiceInfo;
use serde_json::Value;

use crate::client::ApiClient;

/// Output format of an API command.
#[derive(Debug, Args, Clone, Copy, Default)]
pub(crate) struct OutputArgs {
    /// Print the node's JSON answer instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `services …`
#[derive(Debug, Subcommand)]
pub(crate) enum ServicesCommand {
    /// Ranked lookup of services across the mesh.
    Find {
        /// Service type (`llm`, `embedding`, …).
        #[arg(long = "type", value_name = "TYPE")]
        service_type: Option<String>,
        /// A tag the service must carry (repeatable; all required).
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// A capability the service must have (repeatable; all required).
        #[arg(long = "capability", value_name = "CAPABILITY")]
        capabilities: Vec<String>,
        /// Region of the serving node.
        #[arg(long)]
        region: Option<String>,
        /// Least measured reliability, 0 to 1.
        #[arg(long)]
        min_reliability: Option<f64>,
        /// Greatest measured latency, in milliseconds.
        #[arg(long, value_name = "MS")]
        max_latency: Option<f64>,
        /// Most results.
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Offer a service from this node (or replace the one with its id).
    Register {
        /// YAML (or JSON) file describing the service: name, type, tags, …
        #[arg(conflicts_with_all = ["name", "service_type"])]
        file: Option<PathBuf>,
        /// Service name (e.g. a model with its tag); the id defaults to it.
        #[arg(long, required_unless_present = "file")]
        name: Option<String>,
        /// Service type.
        #[arg(long = "type", value_name = "TYPE", required_unless_present = "file")]
        service_type: Option<String>,
        /// Service id (default: the name).
        #[arg(long)]
        id: Option<String>,
        /// Version.
        #[arg(long)]
        version: Option<String>,
        /// Free text.
        #[arg(long)]
        description: Option<String>,
        /// A tag (repeatable).
        #[arg(long = "tag", value_name = "TAG")]
        tags: Vec<String>,
        /// A capability (repeatable).
        #[arg(long = "capability", value_name = "CAPABILITY")]
        capabilities: Vec<String>,
        /// `http://` URL the node probes for health.
        #[arg(long)]
        health_check_url: Option<String>,
        /// KEY=VALUE metadata (repeatable).
        #[arg(long = "metadata", value_name = "KEY=VALUE")]
        metadata: Vec<String>,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Stop offering a service.
    Unregister {
        /// Its id.
        id: String,
    },
    /// The services this node offers.
    List {
        #[command(flatten)]
        output: OutputArgs,
    },
}

/// Percent-encode one query value.
fn encode(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[allow(clippy::print_stdout)]
fn print_json(value: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Rows under a header, each column as wide as its widest cell.
#[allow(clippy::print_stdout)]
fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", out.trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        line(row.clone());
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        Value::Array(items) if items.is_empty() => "-".to_owned(),
        Value::Array(items) => items.iter().map(text).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// `12D3KooWAbCd…wXyZ`: enough of a peer id to tell peers apart.
fn short_peer(v: &Value) -> String {
    let id = text(v);
    if id.len() > 20 {
        format!("{}…{}", &id[..12], &id[id.len() - 6..])
    } else {
        id
    }
}

#[allow(clippy::print_stdout)]
pub(crate) async fn status(api: &ApiClient, output: OutputArgs) -> anyhow::Result<()> {
    let s = api.call("GET", "/v1/status", None).await?;
    if output.json {
        return print_json(&s);
    }
    let uptime = s["uptime_secs"].as_f64().unwrap_or_default();
    let uptime = humantime::format_duration(std::time::Duration::from_secs(
        // Whole seconds are enough for a status line.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        {
            uptime as u64
        },
    ));
    let mut rows: Vec<(String, String)> = vec![
        ("peer id".into(), text(&s["peer_id"])),
        ("state".into(), text(&s["state"])),
        ("version".into(), text(&s["version"])),
        ("uptime".into(), uptime.to_string()),
        ("reachability".into(), text(&s["reachability"])),
    ];
    let list = |key: &str, label: &str, rows: &mut Vec<(String, String)>| {
        let items = s[key].as_array().cloned().unwrap_or_default();
        if items.is_empty() {
            rows.push((label.to_owned(), "-".to_owned()));
        }
        for (i, a) in items.iter().enumerate() {
            rows.push((
                if i == 0 {
                    label.to_owned()
                } else {
                    String::new()
                },
                text(a),
            ));
        }
    };
    list("listen_addrs", "listening", &mut rows);
    list("external_addrs", "external", &mut rows);
    let nat = &s["nat"];
    let relays = nat["relays"].as_array().cloned().unwrap_or_default();
    rows.push((
        "relays".into(),
        if relays.is_empty() {
            "none (not reserved on any relay)".to_owned()
        } else {
            relays.iter().map(text).collect::<Vec<_>>().join(", ")
        },
    ));
    rows.push((
        "relay service".into(),
        if nat["relay_service"] == true {
            format!("on, {} circuits served", nat["circuits_served"])
        } else {
            "off".to_owned()
        },
    ));
    let punch = &nat["hole_punch"];
    rows.push((
        "hole punching".into(),
        format!(
            "{} attempts, {} direct, {} failed",
            punch["attempts"], punch["succeeded"], punch["failed"]
        ),
    ));
    let c = &s["connections"];
    rows.push((
        "connections".into(),
        format!(
            "{} peers ({} inbound, {} outbound)",
            c["peers"], c["inbound"], c["outbound"]
        ),
    ));
    let sv = &s["services"];
    rows.push((
        "services".into(),
        format!(
            "{} local, {} remote from {} nodes",
            sv["local"], sv["remote"], sv["nodes"]
        ),
    ));
    for (i, source) in s["discovery"]["sources"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let state = match (source["enabled"].as_bool(), source["active"].as_bool()) {
            (Some(true), Some(true)) => "working",
            (Some(true), _) => "NOT WORKING",
            _ => "off",
        };
        rows.push((
            if i == 0 {
                "discovery".into()
            } else {
                String::new()
            },
            format!(
                "{:<9} {:<11} {}",
                text(&source["source"]),
                state,
                text(&source["detail"])
            ),
        ));
    }
    for (key, label, setting) in [
        ("gateway", "gateway", "gateway_api_keys"),
        ("api", "api", "api_keys"),
    ] {
        let server = &s["http"][key];
        let state = if server.is_null() {
            "off".to_owned()
        } else {
            let who = match (
                server["open_to_network"] == true,
                server["requires_key"] == true,
            ) {
                (true, _) => {
                    format!("OPEN TO THE NETWORK: beyond loopback with no key (set {setting})")
                }
                (false, true) => "key required".to_owned(),
                (false, false) => "loopback only, no key".to_owned(),
            };
            format!("{}  {who}", text(&server["listen"]))
        };
        rows.push((label.to_owned(), state));
    }
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("{k:<width$}  {v}");
    }
    Ok(())
}

pub(crate) async fn peers(api: &ApiClient, output: OutputArgs) -> anyhow::Result<()> {
    let peers = api.call("GET", "/v1/peers", None).await?;
    if output.json {
        return print_json(&peers);
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let rows: Vec<Vec<String>> = peers
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|p| {
            let ago = now_ms.saturating_sub(p["last_seen_ms"].as_u64().unwrap_or(now_ms)) / 1000;
            vec![
                text(&p["peer_id"]),
                text(&p["connection"]),
                p["latency_ms"]
                    .as_f64()
                    .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1} ms")),
                text(&p["sources"]),
                format!("{ago}s ago"),
                p["addresses"]
                    .as_array()
                    .and_then(|a| a.last())
                    .map_or_else(|| "-".to_owned(), text),
            ]
        })
        .collect();
    if rows.is_empty() {
        #[allow(clippy::print_stdout)]
        {
            println!("no peers known yet (see `ollamacron-node status` for discovery)");
        }
        return Ok(());
    }
    print_table(
        &[
            "PEER ID",
            "CONNECTION",
            "LATENCY",
            "SOURCES",
            "LAST SEEN",
            "ADDRESS",
        ],
        &rows,
    );
    Ok(())
}

pub(crate) async fn services(api: &ApiClient, command: ServicesCommand) -> anyhow::Result<()> {
    match command {
        ServicesCommand::Find {
            service_type,
            tags,
            capabilities,
            region,
            min_reliability,
            max_latency,
            limit,
            output,
        } => {
            let mut query: Vec<String> = Vec::new();
            let mut add = |k: &str, v: String| query.push(format!("{k}={}", encode(&v)));
            if let Some(t) = service_type {
                add("type", t);
            }
            for t in tags {
                add("tag", t);
            }
            for c in capabilities {
                add("capability", c);
            }
            if let Some(r) = region {
                add("region", r);
            }
            if let Some(r) = min_reliability {
                add("min_reliability", r.to_string());
            }
            if let Some(l) = max_latency {
                add("max_latency", l.to_string());
            }
            if let Some(l) = limit {
                add("limit", l.to_string());
            }
            let path = if query.is_empty() {
                "/v1/services".to_owned()
            } else {
                format!("/v1/services?{}", query.join("&"))
            };
            let found = api.call("GET", &path, None).await?;
            if output.json {
                return print_json(&found);
            }
            let rows: Vec<Vec<String>> = found
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|r| {
                    let s = &r["service"];
                    vec![
                        format!("{:.3}", r["score"]["total"].as_f64().unwrap_or_default()),
                        text(&s["type"]),
                        text(&s["name"]),
                        text(&s["id"]),
                        if r["local"] == true {
                            "(this node)".to_owned()
                        } else {
                            short_peer(&s["peer_id"])
                        },
                        text(&r["region"]),
                        text(&s["tags"]),
                        text(&s["capabilities"]),
                    ]
                })
                .collect();
            print_table(
                &[
                    "SCORE",
                    "TYPE",
                    "NAME",
                    "ID",
                    "PEER",
                    "REGION",
                    "TAGS",
                    "CAPABILITIES",
                ],
                &rows,
            );
            Ok(())
        }
        ServicesCommand::Register {
            file,
            name,
            service_type,
            id,
            version,
            description,
            tags,
            capabilities,
            health_check_url,
            metadata,
            output,
        } => {
            let mut service = match file {
                Some(path) => {
                    let text = std::fs::read_to_string(&path)
                        .with_context(|| format!("cannot read {}", path.display()))?;
                    serde_yaml_ng::from_str::<ServiceInfo>(&text).with_context(|| {
                        format!("{} is not a service description", path.display())
                    })?
                }
                None => ServiceInfo::default(),
            };
            if let Some(v) = name {
                service.name = v;
            }
            if let Some(v) = service_type {
                service.service_type = v;
            }
            if let Some(v) = id {
                service.id = v;
            }
            if let Some(v) = version {
                service.version = v;
            }
            if let Some(v) = description {
                service.description = v;
            }
            service.tags.extend(tags);
            service.capabilities.extend(capabilities);
            if health_check_url.is_some() {
                service.health_check_url = health_check_url;
            }
            let mut extra = BTreeMap::new();
            for item in metadata {
                let (k, v) = item
                    .split_once('=')
                    .with_context(|| format!("--metadata {item}: expected KEY=VALUE"))?;
                extra.insert(k.to_owned(), v.to_owned());
            }
            service.metadata.extend(extra);
            if service.id.is_empty() {
                service.id.clone_from(&service.name);
            }
            let (status, stored) = api
                .call_with_status(
                    "POST",
                    "/v1/services",
                    Some(serde_json::to_value(&service)?),
                )
                .await?;
            // The API answers 201 for a new service, 200 for a replaced one.
            let replacing = status == hyper::StatusCode::OK;
            if output.json {
                return print_json(&stored);
            }
            #[allow(clippy::print_stdout)]
            {
                println!(
                    "{} {} ({}) on this node; peers see it within seconds",
                    if replacing { "replaced" } else { "registered" },
                    text(&stored["id"]),
                    text(&stored["type"])
                );
            }
            Ok(())
        }
        ServicesCommand::Unregister { id } => {
            api.call(
                "DELETE",
                &format!("/v1/services/{}", encode_path(&id)),
                None,
            )
            .await?;
            #[allow(clippy::print_stdout)]
            {
                println!("unregistered {id}");
            }
            Ok(())
        }
        ServicesCommand::List { output } => {
            let local = api.call("GET", "/v1/services/local", None).await?;
            if output.json {
                return print_json(&local);
            }
            let rows: Vec<Vec<String>> = local
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(|s| {
                    vec![
                        text(&s["id"]),
                        text(&s["name"]),
                        text(&s["type"]),
                        text(&s["status"]),
                        text(&s["tags"]),
                        text(&s["capabilities"]),
                    ]
                })
                .collect();
            print_table(
                &["ID", "NAME", "TYPE", "STATUS", "TAGS", "CAPABILITIES"],
                &rows,
            );
            Ok(())
        }
    }
}

/// Percent-encode a path segment (ids may hold `:` or `/`).
fn encode_path(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
