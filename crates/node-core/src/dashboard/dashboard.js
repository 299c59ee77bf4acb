// The node's dashboard: polls the node's own API (/v1/status, /v1/peers,
// /v1/models, /metrics) and draws it. Every value from the network goes
// into the page as text, never as markup.
"use strict";

const POLL_INTERVAL_MS = 2000;
const POLL_INTERVAL_LARGE_MS = 5000;
const LARGE_MESH_PEERS = 300;
const PEERS_PER_PAGE = 50;
const MODELS_PER_PAGE = 25;
const NODES_SHOWN_PER_MODEL = 12;
const KEY_STORAGE = "ollamacron-api-key";

const view = {
  key: sessionStorage.getItem(KEY_STORAGE),
  peers: [],
  peerPage: 0,
  models: [],
  traffic: null,
  modelPage: 0,
  lastMetrics: null,
  lastMetricsAt: 0,
  timer: null,
};

class NeedsKey extends Error {}

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null) continue;
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) {
    if (child === undefined || child === null) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function replace(parent, children) {
  parent.replaceChildren(...children);
}

function shortPeer(id) {
  return id.length > 20 ? `${id.slice(0, 12)}…${id.slice(-6)}` : id;
}

function duration(secs) {
  const s = Math.floor(secs);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function ms(value) {
  if (value === null || value === undefined) return "–";
  return value < 10 ? `${value.toFixed(2)} ms` : `${value.toFixed(0)} ms`;
}

function ago(unixMs) {
  return `${duration(Math.max(0, Date.now() - unixMs) / 1000)} ago`;
}

function badge(text, tone) {
  return el("span", { class: `badge ${tone || ""}` }, text);
}

async function api(path) {
  const headers = { Accept: path === "/metrics" ? "text/plain" : "application/json" };
  if (view.key) headers.Authorization = `Bearer ${view.key}`;
  const answer = await fetch(path, { headers, cache: "no-store" });
  if (answer.status === 401) {
    let reason = "";
    try { reason = (await answer.json()).error; } catch (_) { /* not JSON */ }
    throw new NeedsKey(reason);
  }
  if (!answer.ok) {
    let reason = `${answer.status}`;
    try { reason = `${answer.status}: ${(await answer.json()).error}`; } catch (_) { /* not JSON */ }
    throw new Error(`${path} answered ${reason}`);
  }
  return path === "/metrics" ? answer.text() : answer.json();
}

// --- OpenMetrics text -------------------------------------------------

function parseLabels(text) {
  const labels = {};
  const pattern = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;
  let m;
  while ((m = pattern.exec(text)) !== null) {
    labels[m[1]] = m[2].replace(/\\n/g, "\n").replace(/\\"/g, "\"").replace(/\\\\/g, "\\");
  }
  return labels;
}

function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    samples.push({ name: m[1], labels: m[2] ? parseLabels(m[2]) : {}, value: Number(m[3]) });
  }
  return samples;
}

function gatewayTraffic(samples) {
  const rows = new Map();
  const row = (model, peer) => {
    const key = `${model}\u0000${peer}`;
    if (!rows.has(key)) rows.set(key, { model, peer, ok: 0, failed: 0, buckets: [], sum: 0, count: 0 });
    return rows.get(key);
  };
  const queued = new Map();
  let failovers = 0;
  let notFound = 0;
  for (const s of samples) {
    const { model, peer, outcome, le } = s.labels;
    switch (s.name) {
      case "ollamacron_gateway_requests_total":
        if (outcome === "not_found") notFound += s.value;
        else if (outcome === "ok") row(model, peer).ok += s.value;
        else row(model, peer).failed += s.value;
        break;
      case "ollamacron_gateway_first_byte_seconds_bucket":
        row(model, peer).buckets.push({ le: le === "+Inf" ? Infinity : Number(le), count: s.value });
        break;
      case "ollamacron_gateway_first_byte_seconds_sum":
        row(model, peer).sum = s.value;
        break;
      case "ollamacron_gateway_first_byte_seconds_count":
        row(model, peer).count = s.value;
        break;
      case "ollamacron_gateway_queue_depth": {
        // Labelled as the client named the model; the mesh's names have tags.
        const name = modelWithTag(model);
        queued.set(name, (queued.get(name) || 0) + s.value);
        break;
      }
      case "ollamacron_gateway_failovers_total":
        failovers += s.value;
        break;
      default:
    }
  }
  return { rows: [...rows.values()], queued, failovers, notFound };
}

/// The bucket bound at or under which half the first tokens came.
function medianSeconds(row) {
  if (row.count === 0) return null;
  const buckets = [...row.buckets].sort((a, b) => a.le - b.le);
  for (const b of buckets) {
    if (b.count >= row.count / 2) return b.le;
  }
  return null;
}

// --- Drawing ----------------------------------------------------------

function drawNode(status) {
  $("node-name").textContent = status.peer_id;
  const state = $("node-state");
  state.textContent = status.state;
  state.className = `badge ${status.state === "running" ? "ok" : "warn"}`;
  const reach = status.reachability;
  const facts = [
    ["Peer ID", el("span", { class: "mono", "data-field": "peer-id" }, status.peer_id)],
    ["State", status.state],
    ["Version", status.version],
    ["Up for", duration(status.uptime_secs)],
    ["Reachability", el("span", {}, badge(reach, reach === "public" ? "ok" : reach === "private" ? "warn" : ""), " ", status.nat.why || "")],
    ["Relays", status.nat.relays.length ? status.nat.relays.map((r) => el("span", { class: "chip mono" }, shortPeer(r))) : "none (not needed or none reserved)"],
    ["Relay service", status.nat.relay_service ? `serving (${status.nat.circuits_served} circuits)` : "off"],
    ["Hole punching", `${status.nat.hole_punch.succeeded} ok, ${status.nat.hole_punch.failed} failed of ${status.nat.hole_punch.attempts}`],
    ["Listening on", status.listen_addrs.map((a) => el("div", { class: "mono" }, a))],
    ["Reachable at", status.external_addrs.length ? status.external_addrs.map((a) => el("div", { class: "mono" }, a)) : "no confirmed external address"],
    ["Connections", `${status.connections.peers} peers (${status.connections.inbound} in, ${status.connections.outbound} out), ${status.connections.banned_now || 0} banned`],
    ["Services", `${status.services.local} here, ${status.services.remote} on ${status.services.nodes} other nodes`],
    ["Clock", status.clock.warning ? badge(status.clock.warning, "bad") : status.clock.offset_ms === null ? "no peer sampled yet" : `${status.clock.offset_ms} ms from ${status.clock.peers_sampled} peers`],
  ];
  replace($("node-facts"), facts.flatMap(([name, value]) => [el("dt", {}, name), el("dd", {}, ...[].concat(value))]));

  const stats = new Map((status.discovery.stats || []).map(([source, s]) => [source, s]));
  replace($("sources").tBodies[0], status.discovery.sources.map((s) => {
    const counts = stats.get(s.source) || { peers_discovered: 0, successful_connections: 0, connection_failures: 0 };
    const working = !s.enabled ? badge("off", "") : s.active ? badge("working", "ok") : badge("not working", "bad");
    return el("tr", { "data-source": s.source, "data-working": String(s.enabled && s.active) },
      el("td", {}, s.source), el("td", {}, s.enabled ? "yes" : "no"), el("td", {}, working),
      el("td", {}, counts.peers_discovered), el("td", {}, `${counts.successful_connections} / ${counts.connection_failures}`),
      el("td", { class: "muted" }, s.detail));
  }));
}

const CONNECTION_ORDER = { direct: 0, relayed: 1, none: 2 };

/// The page `view[pageKey]` of `items`, `perPage` at a time, with its
/// counter and buttons (`prefix`-page, -prev, -next) brought up to date.
function pageOf(items, perPage, pageKey, prefix) {
  const pages = Math.max(1, Math.ceil(items.length / perPage));
  view[pageKey] = Math.min(view[pageKey], pages - 1);
  const first = view[pageKey] * perPage;
  const page = items.slice(first, first + perPage);
  $(`${prefix}-page`).textContent = items.length ? `${first + 1}–${first + page.length} of ${items.length}` : "none";
  $(`${prefix}-prev`).disabled = view[pageKey] === 0;
  $(`${prefix}-next`).disabled = view[pageKey] >= pages - 1;
  return page;
}

function drawPeers() {
  const filter = $("peer-filter").value.trim().toLowerCase();
  const kind = $("peer-kind").value;
  const all = view.peers;
  const counts = { direct: 0, relayed: 0, none: 0 };
  for (const p of all) counts[p.connection] = (counts[p.connection] || 0) + 1;
  $("peer-count").textContent = `${all.length} known`;
  replace($("peer-kinds"), Object.entries(counts).map(([k, n]) =>
    el("span", { class: "chip", "data-kind": k }, `${k === "none" ? "not connected" : k}: ${n}`)));

  const shown = all.filter((p) => (!kind || p.connection === kind) && (!filter ||
    p.peer_id.toLowerCase().includes(filter) ||
    (p.agent_version || "").toLowerCase().includes(filter) ||
    p.addresses.some((a) => a.toLowerCase().includes(filter)) ||
    p.sources.some((s) => s.includes(filter))));
  shown.sort((a, b) => (CONNECTION_ORDER[a.connection] - CONNECTION_ORDER[b.connection]) || a.peer_id.localeCompare(b.peer_id));
  const page = pageOf(shown, PEERS_PER_PAGE, "peerPage", "peer");
  const tone = { direct: "ok", relayed: "warn", none: "" };
  const breakerTone = { closed: "ok", half_open: "warn", open: "bad" };
  replace($("peer-rows"), page.map((p) => el("tr", { "data-peer-id": p.peer_id, "data-connection": p.connection },
    el("td", { class: "peer", title: p.peer_id }, p.peer_id),
    el("td", {}, badge(p.connection === "none" ? "not connected" : p.connection, tone[p.connection])),
    el("td", {}, ms(p.latency_ms)),
    el("td", {}, p.sources.join(", ") || "–"),
    el("td", {}, badge(p.breaker.replace("_", " "), breakerTone[p.breaker])),
    el("td", {}, p.failures),
    el("td", { class: "muted" }, p.agent_version || "–"),
    el("td", { class: "muted" }, p.connected ? "connected" : ago(p.last_seen_ms)))));
}

function drawModels() {
  const models = view.models;
  const traffic = view.traffic;
  const nodes = models.reduce((n, m) => n + m.nodes.length, 0);
  $("model-count").textContent = `${models.length} models on ${nodes} nodes`;
  const filter = $("model-filter").value.trim().toLowerCase();
  const shown = models.filter((m) => !filter || m.name.toLowerCase().includes(filter) ||
    m.nodes.some((n) => n.peer_id.toLowerCase().includes(filter)));
  const page = pageOf(shown, MODELS_PER_PAGE, "modelPage", "model");
  if (page.length === 0) {
    const why = models.length ? "No model matches the filter." : "No models in the mesh yet.";
    replace($("model-rows"), [el("tr", {}, el("td", { colspan: 6, class: "muted" }, why))]);
    return;
  }
  replace($("model-rows"), page.map((m) => {
    const nodes = m.nodes.slice(0, NODES_SHOWN_PER_MODEL).map((n) => {
      const warmth = n.loaded === true ? "loaded" : n.loaded === false ? "cold" : "loaded: unknown";
      let load = "";
      if (n.in_flight !== null && n.max_concurrent !== null) load = ` ${n.in_flight}/${n.max_concurrent}`;
      else if (n.in_flight !== null) load = ` ${n.in_flight} in flight`;
      else if (n.max_concurrent !== null) load = ` up to ${n.max_concurrent}`;
      const via = n.local ? "this node" : n.connection === "none" ? "not connected" : n.connection;
      const connection = n.local ? "local" : n.connection;
      return el("span", { class: `chip ${n.loaded ? "ok" : ""} ${connection === "none" ? "gone" : ""}`, "data-peer-id": n.peer_id, "data-loaded": String(n.loaded), "data-connection": connection, title: n.peer_id },
        `${shortPeer(n.peer_id)} · ${warmth}${load} · ${via}`);
    });
    if (m.nodes.length > NODES_SHOWN_PER_MODEL) nodes.push(el("span", { class: "muted" }, `and ${m.nodes.length - NODES_SHOWN_PER_MODEL} more`));
    return el("tr", { "data-model": m.name },
      el("td", {}, m.name), el("td", {}, m.type),
      el("td", {}, `${m.loaded_on} of ${m.nodes.length}`), el("td", {}, m.in_flight),
      el("td", {}, traffic.queued.get(m.name) || 0), el("td", {}, ...nodes));
  }));
}

// `llama3` is `llama3:latest`, as Ollama names it (service-registry's
// model_with_tag): a tag in the last path segment stays.
function modelWithTag(name) {
  const last = name.split("/").pop();
  return last.includes(":") ? name : `${name}:latest`;
}

function drawTraffic(traffic, now) {
  const before = view.lastMetrics;
  const seconds = (now - view.lastMetricsAt) / 1000;
  const rate = (row) => {
    if (!before || seconds <= 0) return "–";
    const old = before.rows.find((r) => r.model === row.model && r.peer === row.peer);
    const delta = row.ok + row.failed - (old ? old.ok + old.failed : 0);
    return (Math.max(0, delta) / seconds).toFixed(1);
  };
  const total = traffic.rows.reduce((n, r) => n + r.ok + r.failed, 0);
  const failed = traffic.rows.reduce((n, r) => n + r.failed, 0);
  const queued = [...traffic.queued.values()].reduce((a, b) => a + b, 0);
  replace($("traffic-facts"), [
    el("dt", {}, "Requests"), el("dd", { "data-field": "requests" }, `${total} answered or failed, ${failed} failed, ${traffic.notFound} for models no node has`),
    el("dt", {}, "Failovers"), el("dd", {}, `${traffic.failovers} (a node failed, the next was tried)`),
    el("dt", {}, "Queued now"), el("dd", {}, queued),
  ]);
  const rows = traffic.rows.filter((r) => r.ok + r.failed > 0 || r.count > 0)
    .sort((a, b) => a.model.localeCompare(b.model) || a.peer.localeCompare(b.peer));
  if (rows.length === 0) {
    replace($("traffic-rows"), [el("tr", {}, el("td", { colspan: 7, class: "muted" }, "No gateway requests yet."))]);
    return;
  }
  replace($("traffic-rows"), rows.map((r) => {
    const median = medianSeconds(r);
    return el("tr", { "data-model": r.model, "data-peer-id": r.peer },
      el("td", {}, r.model),
      el("td", { class: "peer", title: r.peer }, r.peer === "local" ? "this node" : r.peer === "none" ? "no node" : shortPeer(r.peer)),
      el("td", {}, r.ok), el("td", {}, r.failed ? badge(String(r.failed), "bad") : "0"), el("td", {}, rate(r)),
      el("td", {}, median === null ? "–" : median === Infinity ? "> 65 s" : `≤ ${ms(median * 1000)}`),
      el("td", {}, r.count ? ms((r.sum / r.count) * 1000) : "–"));
  }));
}

function showBanner(text) {
  const banner = $("banner");
  banner.textContent = text;
  banner.hidden = !text;
}

async function poll() {
  clearTimeout(view.timer);
  let interval = POLL_INTERVAL_MS;
  try {
    const [status, peers, models, metrics] = await Promise.all([
      api("/v1/status"), api("/v1/peers"), api("/v1/models"), api("/metrics"),
    ]);
    const now = Date.now();
    const traffic = gatewayTraffic(parseMetrics(metrics));
    $("key-form").hidden = true;
    $("dashboard").hidden = false;
    view.peers = peers;
    view.models = models;
    view.traffic = traffic;
    drawNode(status);
    drawPeers();
    drawModels();
    drawTraffic(traffic, now);
    view.lastMetrics = traffic;
    view.lastMetricsAt = now;
    showBanner("");
    $("updated").textContent = `updated ${new Date(now).toLocaleTimeString()}`;
    document.body.dataset.updated = String(now);
    if (peers.length > LARGE_MESH_PEERS) interval = POLL_INTERVAL_LARGE_MS;
  } catch (e) {
    if (e instanceof NeedsKey) {
      $("dashboard").hidden = true;
      $("key-form").hidden = false;
      $("key-reason").textContent = e.message;
      return; // until a key is given
    }
    showBanner(`The node does not answer (${e.message}); trying again every ${POLL_INTERVAL_MS / 1000} s.`);
  }
  view.timer = setTimeout(poll, interval);
}

function start() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    view.key = $("key-input").value.trim();
    sessionStorage.setItem(KEY_STORAGE, view.key);
    poll();
  });
  $("peer-filter").addEventListener("input", () => { view.peerPage = 0; drawPeers(); });
  $("peer-kind").addEventListener("change", () => { view.peerPage = 0; drawPeers(); });
  $("peer-prev").addEventListener("click", () => { view.peerPage = Math.max(0, view.peerPage - 1); drawPeers(); });
  $("peer-next").addEventListener("click", () => { view.peerPage += 1; drawPeers(); });
  $("model-filter").addEventListener("input", () => { view.modelPage = 0; drawModels(); });
  $("model-prev").addEventListener("click", () => { view.modelPage = Math.max(0, view.modelPage - 1); drawModels(); });
  $("model-next").addEventListener("click", () => { view.modelPage += 1; drawModels(); });
  poll();
}

start();
