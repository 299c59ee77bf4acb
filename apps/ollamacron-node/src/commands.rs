//! `status`, `peers` and `services …`: commands that ask a running node
//! through its local HTTP API and print tables (or `--json`).

use std::collections::BTreeMap;

use anyhow::Context;
use ollamacron_node_core::registry::{LocalService, RankedService, ServiceInfo, ServiceStatus};
use ollamacron_node_core::{HttpServerStatus, MeshModel, ModelNode, NodeStatus, PeerInfo};
use serde_json::Value;

use crate::cli::{OutputArgs, ServicesCommand};
use crate::client::{ApiClient, ParseError, read_json};

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
    // Cells hold what peers advertise: no escape sequence of theirs
    // reaches the operator's terminal.
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|row| row.iter().map(|cell| printable(cell)).collect())
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
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
        line(row);
    }
}

/// `text` with its control characters (ESC, CR, BEL, …) shown as `?`.
fn printable(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Items joined by commas, `-` for none.
fn list<T: AsRef<str>>(items: &[T]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items
            .iter()
            .map(AsRef::as_ref)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// `12D3KooWAbCd…wXyZ`: enough of a peer id to tell peers apart.
fn short_peer(id: &str) -> String {
    let chars: Vec<char> = id.chars().collect();
    if chars.len() > 20 {
        let head: String = chars[..12].iter().collect();
        let tail: String = chars[chars.len() - 6..].iter().collect();
        format!("{head}…{tail}")
    } else {
        id.to_owned()
    }
}

/// As the API names it.
fn service_status(status: ServiceStatus) -> &'static str {
    match status {
        ServiceStatus::Available => "available",
        ServiceStatus::Busy => "busy",
        ServiceStatus::Unavailable => "unavailable",
        ServiceStatus::Maintenance => "maintenance",
    }
}

/// `GET /v1/services`'s answer, read as the node's own type.
fn read_ranked(json: &[u8]) -> Result<Vec<RankedService>, ParseError> {
    read_json("", json, |json| serde_json::from_slice(json))
}

/// What `status` shows for the gateway or the API: its address and who
/// can reach it, or `off`.
fn server_state(server: Option<&HttpServerStatus>, setting: &str) -> String {
    match server {
        None => "off".to_owned(),
        Some(server) => {
            let who = match (server.open_to_network, server.requires_key) {
                (true, _) => {
                    format!("OPEN TO THE NETWORK: beyond loopback with no key (set {setting})")
                }
                (false, true) => "key required".to_owned(),
                (false, false) => "loopback only, no key".to_owned(),
            };
            format!("{}  {who}", server.listen)
        }
    }
}

#[allow(clippy::print_stdout)]
pub(crate) async fn status(api: &ApiClient, output: OutputArgs) -> anyhow::Result<()> {
    let answer = api.send("GET", "/v1/status", None).await?;
    if output.json {
        return print_json(&answer.json()?);
    }
    let s: NodeStatus = answer.parse("a node status", |json| serde_json::from_slice(json))?;
    let uptime = humantime::format_duration(std::time::Duration::from_secs(
        // Whole seconds are enough for a status line.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        {
            s.uptime_secs as u64
        },
    ));
    let mut rows: Vec<(String, String)> = vec![
        ("peer id".into(), s.peer_id.to_string()),
        ("state".into(), s.state.to_string()),
        ("version".into(), s.version.clone()),
        ("uptime".into(), uptime.to_string()),
        ("reachability".into(), s.reachability.to_string()),
    ];
    if !s.nat.why.is_empty() {
        rows.push(("why".into(), s.nat.why.clone()));
    }
    let addrs = |items: &[ollamacron_node_core::libp2p::Multiaddr],
                 label: &str,
                 rows: &mut Vec<(String, String)>| {
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
                a.to_string(),
            ));
        }
    };
    addrs(&s.listen_addrs, "listening", &mut rows);
    addrs(&s.external_addrs, "external", &mut rows);
    let nat = &s.nat;
    rows.push((
        "relays".into(),
        if nat.relays.is_empty() {
            "none (not reserved on any relay)".to_owned()
        } else {
            nat.relays
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        },
    ));
    rows.push((
        "relay service".into(),
        if nat.relay_service {
            format!("on, {} circuits served", nat.circuits_served)
        } else {
            "off".to_owned()
        },
    ));
    let punch = &nat.hole_punch;
    rows.push((
        "hole punching".into(),
        format!(
            "{} attempts, {} direct, {} failed",
            punch.attempts, punch.succeeded, punch.failed
        ),
    ));
    let c = &s.connections;
    rows.push((
        "connections".into(),
        format!(
            "{} peers ({} inbound, {} outbound)",
            c.peers, c.inbound, c.outbound
        ),
    ));
    if c.banned_total > 0 {
        rows.push((
            "banned".into(),
            format!(
                "{} peers now, {} since start (invalid records; see the log)",
                c.banned_now, c.banned_total
            ),
        ));
    }
    let sv = &s.services;
    rows.push((
        "services".into(),
        format!(
            "{} local, {} remote from {} nodes",
            sv.local, sv.remote, sv.nodes
        ),
    ));
    let clock = &s.clock;
    rows.push((
        "clock".into(),
        match (&clock.warning, clock.offset_ms) {
            (Some(warning), _) => format!("WARNING: {warning}"),
            (None, Some(offset_ms)) => format!(
                "in step with {} peers ({:+.1} s from their median)",
                clock.peers_sampled,
                offset_ms as f64 / 1000.0
            ),
            (None, None) => "no peer's fresh record yet to compare with".to_owned(),
        },
    ));
    if let Some(b) = &s.bandwidth {
        rows.push((
            "bandwidth".into(),
            format!(
                "max {}/s each way; streams waited {} times inbound, {} outbound",
                ollamacron_config::ByteSize::from_bytes(b.limit_bytes_per_s),
                b.inbound_waits,
                b.outbound_waits
            ),
        ));
    }
    for (i, source) in s.discovery.sources.iter().enumerate() {
        let state = match (source.enabled, source.active) {
            (true, true) => "working",
            (true, false) => "NOT WORKING",
            (false, _) => "off",
        };
        rows.push((
            if i == 0 {
                "discovery".into()
            } else {
                String::new()
            },
            format!(
                "{:<9} {:<11} {}",
                source.source.as_str(),
                state,
                source.detail
            ),
        ));
    }
    rows.push((
        "gateway".into(),
        server_state(s.http.gateway.as_ref(), "gateway_api_keys"),
    ));
    rows.push(("api".into(), server_state(s.http.api.as_ref(), "api_keys")));
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    for (k, v) in rows {
        println!("{k:<width$}  {}", printable(&v));
    }
    Ok(())
}

pub(crate) async fn peers(api: &ApiClient, output: OutputArgs) -> anyhow::Result<()> {
    let answer = api.send("GET", "/v1/peers", None).await?;
    if output.json {
        return print_json(&answer.json()?);
    }
    let peers: Vec<PeerInfo> =
        answer.parse("a list of peers", |json| serde_json::from_slice(json))?;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    let rows: Vec<Vec<String>> = peers
        .iter()
        .map(|p| {
            let ago = now_ms.saturating_sub(p.last_seen_ms) / 1000;
            let sources: Vec<&str> = p.sources.iter().map(|s| s.as_str()).collect();
            vec![
                p.peer_id.to_string(),
                p.connection.to_string(),
                p.latency_ms
                    .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1} ms")),
                list(&sources),
                format!("{ago}s ago"),
                p.addresses
                    .last()
                    .map_or_else(|| "-".to_owned(), ToString::to_string),
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

pub(crate) async fn models(api: &ApiClient, output: OutputArgs) -> anyhow::Result<()> {
    let answer = api.send("GET", "/v1/models", None).await?;
    if output.json {
        return print_json(&answer.json()?);
    }
    let models: Vec<MeshModel> =
        answer.parse("a list of models", |json| serde_json::from_slice(json))?;
    if models.is_empty() {
        #[allow(clippy::print_stdout)]
        {
            println!(
                "no models in the mesh yet (is an Ollama running beside a node? see `ollamacron-node status`)"
            );
        }
        return Ok(());
    }
    let rows: Vec<Vec<String>> = models
        .iter()
        .flat_map(|m| m.nodes.iter().map(move |n| model_row(m, n)))
        .collect();
    print_table(
        &[
            "NAME", "NODE", "STATE", "LOAD", "STATUS", "VIA", "LATENCY", "SIZE",
        ],
        &rows,
    );
    Ok(())
}

/// One row of `models`: a model on one node.
fn model_row(model: &MeshModel, node: &ModelNode) -> Vec<String> {
    let state = match node.loaded {
        Some(true) => "loaded",
        Some(false) => "cold",
        None => "-",
    };
    let load = match (node.in_flight, node.max_concurrent) {
        (Some(now), Some(max)) => format!("{now}/{max}"),
        (Some(now), None) => now.to_string(),
        (None, _) => "-".to_owned(),
    };
    let node_name = if node.local {
        format!("{} (this node)", short_peer(&node.peer_id))
    } else {
        short_peer(&node.peer_id)
    };
    vec![
        model.name.clone(),
        node_name,
        state.to_owned(),
        load,
        service_status(node.status).to_owned(),
        node.connection
            .map_or_else(|| "local".to_owned(), |c| c.to_string()),
        node.latency_ms
            .map_or_else(|| "-".to_owned(), |ms| format!("{ms:.1} ms")),
        node.size_bytes.map_or_else(|| "-".to_owned(), human_bytes),
    ]
}

/// `4.7 GB`, as `ollama ls` writes sizes (powers of 1000).
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    #[allow(clippy::cast_precision_loss)] // shown to one decimal
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

pub(crate) async fn services(api: &ApiClient, command: ServicesCommand) -> anyhow::Result<()> {
    match command {
        ServicesCommand::Find {
            service_type,
            model,
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
            if let Some(m) = model {
                add("model", m);
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
            let answer = api.send("GET", &path, None).await?;
            if output.json {
                return print_json(&answer.json()?);
            }
            let found = answer.read("a list of ranked services", read_ranked)?;
            let rows: Vec<Vec<String>> = found
                .iter()
                .map(|r| {
                    let s = &r.service;
                    vec![
                        format!("{:.3}", r.score.total),
                        s.service_type.clone(),
                        s.name.clone(),
                        s.id.clone(),
                        if r.local {
                            "(this node)".to_owned()
                        } else {
                            short_peer(&s.peer_id)
                        },
                        r.region.clone().unwrap_or_else(|| "-".to_owned()),
                        list(&s.tags),
                        list(&s.capabilities),
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
            let answer = api
                .send(
                    "POST",
                    "/v1/services",
                    Some(serde_json::to_value(&service)?),
                )
                .await?;
            // The API answers 201 for a new service, 200 for a replaced one.
            let replacing = answer.status == hyper::StatusCode::OK;
            if output.json {
                return print_json(&answer.json()?);
            }
            // The service as stored (`null` should it be gone already).
            let stored: Option<ServiceInfo> =
                answer.parse("a service", |json| serde_json::from_slice(json))?;
            #[allow(clippy::print_stdout)]
            {
                println!(
                    "{} {} ({}) on this node; peers see it within seconds",
                    if replacing { "replaced" } else { "registered" },
                    stored.as_ref().map_or("-", |s| s.id.as_str()),
                    stored.as_ref().map_or("-", |s| s.service_type.as_str())
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
            let answer = api.send("GET", "/v1/services/local", None).await?;
            if output.json {
                return print_json(&answer.json()?);
            }
            let local: Vec<LocalService> =
                answer.parse("a list of services", |json| serde_json::from_slice(json))?;
            let rows: Vec<Vec<String>> = local
                .iter()
                .map(|LocalService { service: s, origin }| {
                    vec![
                        s.id.clone(),
                        s.name.clone(),
                        s.service_type.clone(),
                        service_status(s.status).to_owned(),
                        origin.as_str().to_owned(),
                        list(&s.tags),
                        list(&s.capabilities),
                    ]
                })
                .collect();
            print_table(
                &[
                    "ID",
                    "NAME",
                    "TYPE",
                    "STATUS",
                    "FROM",
                    "TAGS",
                    "CAPABILITIES",
                ],
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

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn escape_sequences_from_peers_do_not_reach_the_terminal() {
        assert_eq!(printable("llama3\u{1b}[2J\u{7}\r:8b"), "llama3?[2J??:8b");
        assert_eq!(printable("qwen2.5:7b · ok"), "qwen2.5:7b · ok");
    }
}
