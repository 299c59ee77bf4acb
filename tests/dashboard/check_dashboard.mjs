// Drives a node's dashboard in headless Chromium for tests/tests/dashboard.rs.
//
// node check_dashboard.mjs CONFIG_JSON
//
// CONFIG_JSON: {"url", "key", "chromium", "user_data_dir", "screenshots",
// "self", "peers": [id…], "models": {name: [peer id…]}, "gone": id}.
//
// It opens the page, gives the API key at the form, waits until the page
// shows this node, every peer connected directly, every model with its
// nodes and some gateway traffic, prints {"shown": …} and takes a
// screenshot; then waits for a line "left" on stdin and for the page to
// show `gone` as not connected, in the peers and the models, prints
// {"updated": …} and takes another. Any failure prints {"error": …} with
// what the page showed, and exits 1.
import { createRequire } from "node:module";
import { createInterface } from "node:readline";
import path from "node:path";

const require = createRequire(process.env.PLAYWRIGHT_MODULES + "/");
const { chromium } = require("playwright-core");

const WAIT_MS = 30000;
const config = JSON.parse(process.argv[2]);

const say = (value) => process.stdout.write(JSON.stringify(value) + "\n");

function waitForLine(expected) {
  return new Promise((resolve, reject) => {
    const lines = createInterface({ input: process.stdin });
    lines.on("line", (line) => {
      if (line.trim() === expected) {
        resolve(); // before close(), which says "close" at once
        lines.close();
      }
    });
    lines.on("close", () => reject(new Error(`stdin closed before "${expected}"`)));
  });
}

// Whether the page shows what `phase` expects ("mesh": every node, model
// and some traffic; "left": `gone` not connected and its models gone):
// what the page shows when it does, else null. One self-contained
// function, as the page evaluates it (the page's CSP allows no string
// evaluation, and each function goes over alone).
function pageCheck({ phase, expected }) {
  const rows = (selector) => [...document.querySelectorAll(selector)];
  const shown = (id) => getComputedStyle(document.getElementById(id)).display !== "none";
  const view = {
    self: document.querySelector("[data-field=peer-id]")?.textContent ?? null,
    key_form: shown("key-form"),
    dashboard: shown("dashboard"),
    peers: rows("#peer-rows tr[data-peer-id]").map((r) => ({ id: r.dataset.peerId, connection: r.dataset.connection })),
    kinds: rows("#peer-kinds [data-kind]").map((c) => c.textContent),
    models: rows("#model-rows tr[data-model]").map((r) => ({
      name: r.dataset.model,
      nodes: [...r.querySelectorAll("[data-peer-id]")].map((c) => ({ id: c.dataset.peerId, loaded: c.dataset.loaded, connection: c.dataset.connection, text: c.textContent })),
    })),
    sources: rows("#sources tbody tr").map((r) => ({ source: r.dataset.source, working: r.dataset.working })),
    traffic: rows("#traffic-rows tr[data-model]").map((r) => ({ model: r.dataset.model, peer: r.dataset.peerId, cells: [...r.cells].map((c) => c.textContent) })),
    banner: shown("banner") ? document.getElementById("banner").textContent : null,
  };
  if (phase === "any") return view;
  const peer = (id) => view.peers.find((p) => p.id === id);
  let ok;
  if (phase === "mesh") {
    ok = view.dashboard && !view.key_form
      && view.self === expected.self
      && expected.peers.every((id) => peer(id)?.connection === "direct")
      && Object.entries(expected.models).every(([name, ids]) => {
        const model = view.models.find((m) => m.name === name);
        return model && ids.every((id) => model.nodes.some((n) => n.id === id));
      })
      && view.traffic.length > 0
      && view.sources.length > 0;
  } else {
    // Its records stay until they expire (a stopped node does not
    // withdraw them), shown as not connected.
    const gone = peer(expected.gone);
    ok = (!gone || gone.connection === "none")
      && view.models.every((m) => m.nodes.every((n) => n.id !== expected.gone || n.connection === "none"))
      && expected.peers.filter((id) => id !== expected.gone).every((id) => peer(id)?.connection === "direct");
  }
  return ok ? view : null;
}

async function main() {
  const context = await chromium.launchPersistentContext(config.user_data_dir, {
    executablePath: config.chromium,
    headless: true,
    viewport: { width: 1400, height: 1000 },
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
    ],
  });
  const page = context.pages()[0] ?? (await context.newPage());
  // Uncaught script errors fail the check; console errors (the 401 of
  // the first poll, before the key, is one) are only reported.
  const problems = [];
  const console_errors = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => { if (m.type() === "error") console_errors.push(m.text()); });
  try {
    await page.goto(config.url);
    // The API wants a key: the page asks for it.
    await page.waitForSelector("#key-form", { state: "visible", timeout: WAIT_MS });
    await page.fill("#key-input", config.key);
    await page.click("#key-form button[type=submit]");
    const shown = await page.waitForFunction(pageCheck, { phase: "mesh", expected: config }, { timeout: WAIT_MS, polling: 200 });
    const seen = await shown.jsonValue();
    const first = path.join(config.screenshots, "dashboard.png");
    await page.screenshot({ path: first, fullPage: true });
    say({ shown: seen, screenshot: first, problems, console_errors });

    await waitForLine("left");
    const updated = await page.waitForFunction(pageCheck, { phase: "left", expected: config }, { timeout: WAIT_MS, polling: 200 });
    const after = await updated.jsonValue();
    const second = path.join(config.screenshots, "dashboard-after-leave.png");
    await page.screenshot({ path: second, fullPage: true });
    say({ updated: after, screenshot: second, problems, console_errors });
  } catch (e) {
    let view = null;
    try { view = await page.evaluate(pageCheck, { phase: "any", expected: config }); } catch (_) { /* the page is gone */ }
    say({ error: String(e && e.message || e), view, problems, console_errors });
    await context.close();
    process.exit(1);
  }
  await context.close();
  process.exit(problems.length ? 1 : 0);
}

main();
