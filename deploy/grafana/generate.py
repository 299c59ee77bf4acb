#!/usr/bin/env python3
"""Writes ollamacron-node.json, the Grafana dashboard of the node's /metrics
series, beside this script: python3 deploy/grafana/generate.py. A test
(tests/tests/deploy_files.rs) checks that every series it queries is one a
node exports."""

import json
import pathlib

DS = {"type": "prometheus", "uid": "${datasource}"}
I = 'instance=~"$instance"'
RATE = "[$__rate_interval]"


class Layout:
    def __init__(self):
        self.panels, self.x, self.y, self.h, self.next_id = [], 0, 0, 0, 1

    def _id(self):
        self.next_id += 1
        return self.next_id - 1

    def row(self, title):
        self.end_row()
        self.panels.append({"type": "row", "title": title, "id": self._id(), "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def end_row(self):
        if self.x:
            self.x, self.y = 0, self.y + self.h

    def panel(self, kind, title, targets, w=8, h=7, unit=None, desc=None):
        if self.x + w > 24:
            self.end_row()
        defaults = {"unit": unit} if unit else {}
        panel = {
            "type": kind, "title": title, "id": self._id(), "datasource": DS,
            "gridPos": {"h": h, "w": w, "x": self.x, "y": self.y},
            "targets": [{"refId": chr(65 + i), "expr": expr, "legendFormat": legend, "datasource": DS}
                        for i, (expr, legend) in enumerate(targets)],
            "fieldConfig": {"defaults": defaults, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom"}, "tooltip": {"mode": "multi"}}
            if kind == "timeseries" else {"reduceOptions": {"calcs": ["lastNotNull"]}, "textMode": "auto"},
        }
        if desc:
            panel["description"] = desc
        self.panels.append(panel)
        self.x, self.h = self.x + w, h


def quantile(q, series, by):
    return f"histogram_quantile({q}, sum by (le, {by}) (rate({series}_bucket{{{I}}}{RATE})))"


g = Layout()
g.row("Node")
g.panel("stat", "State", [(f"max by (state) (ollamacron_node_state{{{I}}}) == 1", "{{state}}")], w=4,
        desc="The lifecycle state: initializing, starting, running, stopping, stopped, error.")
g.panel("stat", "Reachability", [(f"max by (reachability) (ollamacron_reachability{{{I}}}) == 1", "{{reachability}}")], w=4,
        desc="public: peers dial it directly; private: only through a relay; unknown: not decided yet.")
g.panel("stat", "Up for", [(f"ollamacron_uptime_seconds{{{I}}}", "{{instance}}")], w=4, unit="s")
g.panel("stat", "Version", [(f"ollamacron_build_info{{{I}}}", "{{version}}")], w=4)
g.panel("timeseries", "Runtime tasks", [(f"ollamacron_runtime_tasks{{{I}}}", "{{instance}}")], w=8,
        desc="Tokio tasks alive: a steady climb is a leak.")
g.row("Peers and discovery")
g.panel("timeseries", "Connected and known peers", [
    (f"ollamacron_peers_connected{{{I}}}", "connected {{instance}}"),
    (f"ollamacron_known_peers{{{I}}}", "known {{instance}}"),
    (f"ollamacron_dht_routing_table_size{{{I}}}", "DHT routing table {{instance}}")])
g.panel("timeseries", "Ping round trip (p50, p95)", [
    (quantile(0.5, "libp2p_ping_rtt_seconds", "instance"), "p50 {{instance}}"),
    (quantile(0.95, "libp2p_ping_rtt_seconds", "instance"), "p95 {{instance}}")], unit="s")
g.panel("timeseries", "Dials, trims, duplicates, bans", [
    (f"sum by (instance) (rate(libp2p_swarm_dial_attempt_total{{{I}}}{RATE}))", "dials/s {{instance}}"),
    (f"rate(ollamacron_connections_trimmed_total{{{I}}}{RATE})", "trimmed/s {{instance}}"),
    (f"rate(ollamacron_duplicate_connections_closed_total{{{I}}}{RATE})", "duplicates closed/s {{instance}}"),
    (f"increase(ollamacron_peers_banned_total{{{I}}}{RATE})", "banned {{instance}}")],
    desc="Bans: peers that handed over provably invalid records.")
g.row("Services")
g.panel("timeseries", "Services known", [
    (f"ollamacron_services_local{{{I}}}", "here {{instance}}"),
    (f"ollamacron_services_remote{{{I}}}", "on peers {{instance}}")])
g.panel("timeseries", "Lookups by answer", [
    (f"sum by (answer) (rate(ollamacron_service_lookups_total{{{I}}}{RATE}))", "{{answer}}")], unit="reqps",
    desc="cache: answered from the verified cache; dht: after a DHT walk.")
g.panel("timeseries", "Records published, hole punching", [
    (f"rate(ollamacron_records_published_total{{{I}}}{RATE})", "records/s {{instance}}"),
    (f"rate(ollamacron_hole_punch_attempts_total{{{I}}}{RATE})", "hole punches/s {{instance}}")])
g.row("Gateway")
g.panel("timeseries", "Requests by model and outcome", [
    (f"sum by (model, outcome) (rate(ollamacron_gateway_requests_total{{{I}}}{RATE}))", "{{model}} {{outcome}}")],
    unit="reqps", desc="ok; failed (every candidate failed); not_found (no node has the model); queue_full.")
g.panel("timeseries", "Answered by serving node", [
    (f'sum by (peer) (rate(ollamacron_gateway_requests_total{{{I},outcome="ok"}}{RATE}))', "{{peer}}")],
    unit="reqps", desc="local: this node's own Ollama.")
g.panel("timeseries", "Failed share", [
    (f'sum(rate(ollamacron_gateway_requests_total{{{I},outcome!="ok"}}{RATE})) / sum(rate(ollamacron_gateway_requests_total{{{I}}}{RATE}))', "failed")],
    unit="percentunit")
g.panel("timeseries", "Time to first token (p50, p95)", [
    (quantile(0.5, "ollamacron_gateway_first_byte_seconds", "model"), "p50 {{model}}"),
    (quantile(0.95, "ollamacron_gateway_first_byte_seconds", "model"), "p95 {{model}}")], unit="s")
g.panel("timeseries", "Tokens streamed", [
    (f"sum by (model) (rate(ollamacron_gateway_streamed_chunks_total{{{I}}}{RATE}))", "{{model}}")],
    desc="Chunks of streamed answers: one token each when Ollama streams.")
g.panel("timeseries", "Bytes streamed", [
    (f"sum by (model) (rate(ollamacron_gateway_streamed_bytes_total{{{I}}}{RATE}))", "{{model}}")], unit="Bps")
g.panel("timeseries", "Queue depth by model", [
    (f"sum by (model) (ollamacron_gateway_queue_depth{{{I}}})", "{{model}}")],
    desc="Requests waiting for a free node with their model.")
g.panel("timeseries", "Queue wait (p95)", [
    (f"histogram_quantile(0.95, sum by (le) (rate(ollamacron_gateway_queue_wait_seconds_bucket{{{I}}}{RATE})))", "p95")], unit="s")
g.panel("timeseries", "Failovers", [
    (f"sum by (model) (rate(ollamacron_gateway_failovers_total{{{I}}}{RATE}))", "{{model}}")],
    desc="A candidate failed before answering, so the next was tried.")
g.panel("timeseries", "Breakers", [
    (f"max by (peer) (ollamacron_gateway_breaker_state{{{I}}})", "{{peer}}"),
    (f"sum by (peer) (increase(ollamacron_gateway_breaker_trips_total{{{I}}}{RATE}))", "trips {{peer}}")], w=16,
    desc="Each serving node's breaker, fed by live requests: 0 closed, 1 half open, 2 open.")
g.end_row()

dashboard = {
    "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource",
                  "pluginId": "prometheus", "pluginName": "Prometheus"}],
    "title": "Ollamacron node",
    "uid": "ollamacron-node",
    "description": "The /metrics series of ollamacron-node (its API, 127.0.0.1:11437/metrics by default): node, peers, services, gateway.",
    "tags": ["ollamacron", "ollama", "libp2p"],
    "timezone": "browser",
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "time": {"from": "now-1h", "to": "now"},
    "refresh": "30s",
    "templating": {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus", "current": {}, "hide": 0},
        {"name": "instance", "label": "Node", "type": "query", "datasource": DS,
         "query": {"query": "label_values(ollamacron_build_info, instance)", "refId": "instance"},
         "definition": "label_values(ollamacron_build_info, instance)", "includeAll": True, "multi": True,
         "allValue": ".*", "current": {}, "refresh": 2, "hide": 0, "sort": 1},
    ]},
    "annotations": {"list": []},
    "panels": g.panels,
}
out = pathlib.Path(__file__).with_name("ollamacron-node.json")
out.write_text(json.dumps(dashboard, indent=2) + "\n")
print(f"wrote {out} ({len(g.panels)} panels)")
