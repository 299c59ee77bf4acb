// Looks at a running node's dashboard in headless Chromium and reports
// how it behaves: how long until it first shows its peers, what each poll
// fetches and how long it takes, the peers and pages shown, the page's
// size and whether any script failed. For a large mesh:
//
//   cargo xtask mesh --nodes 100 --topology star --hold 20m &   # prints node 0's dashboard
//   PLAYWRIGHT_MODULES=target/tmp/playwright/node_modules \
//     node tests/dashboard/measure_dashboard.mjs http://127.0.0.1:PORT/ target/test-artifacts/dashboard-100 [KEY]
//
// (`cargo nextest run -p ollamacron-tests --test dashboard` installs
// playwright-core there.) It prints one JSON object and leaves
// dashboard.png and dashboard-page-2.png in the output folder.
import { createRequire } from "node:module";
import { mkdtempSync, mkdirSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";

const require = createRequire(path.resolve(process.env.PLAYWRIGHT_MODULES ?? "target/tmp/playwright/node_modules") + "/");
const { chromium } = require("playwright-core");

const [url, out, key] = process.argv.slice(2);
if (!url || !out) {
  process.stderr.write("usage: node measure_dashboard.mjs URL OUT_DIR [API_KEY]\n");
  process.exit(2);
}
const WAIT_MS = 30000;
const WATCH_MS = 10000;

// What the page shows now (one self-contained function: the page's CSP
// allows no string evaluation).
function view() {
  const text = (selector) => document.querySelector(selector)?.textContent?.trim() ?? null;
  return {
    peer_rows: document.querySelectorAll("#peer-rows tr[data-peer-id]").length,
    peer_page: text("#peer-page"),
    kinds: [...document.querySelectorAll("#peer-kinds [data-kind]")].map((c) => c.textContent),
    model_rows: document.querySelectorAll("#model-rows tr[data-model]").length,
    model_page: text("#model-page"),
    traffic_rows: document.querySelectorAll("#traffic-rows tr[data-model]").length,
    dom_nodes: document.getElementsByTagName("*").length,
    heap_bytes: performance.memory?.usedJSHeapSize ?? null,
  };
}

async function main() {
  mkdirSync(out, { recursive: true });
  const context = await chromium.launchPersistentContext(mkdtempSync(path.join(tmpdir(), "dashboard-")), {
    executablePath: "/usr/bin/chromium",
    headless: true,
    viewport: { width: 1400, height: 1000 },
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
      "--disable-background-networking", "--disable-component-update", "--disable-sync",
      "--enable-precise-memory-info",
    ],
  });
  const page = context.pages()[0] ?? (await context.newPage());
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  const polls = {};
  const started = new Map();
  page.on("request", (r) => started.set(r, Date.now()));
  page.on("requestfinished", async (r) => {
    const name = new URL(r.url()).pathname;
    const response = await r.response();
    const body = response ? await response.body().catch(() => Buffer.alloc(0)) : Buffer.alloc(0);
    const entry = (polls[name] ??= { count: 0, bytes: 0, ms: [] });
    entry.count += 1;
    entry.bytes = body.length;
    entry.ms.push(Date.now() - started.get(r));
  });
  try {
    const opened = Date.now();
    await page.goto(url);
    if (key) {
      await page.waitForSelector("#key-form", { state: "visible", timeout: WAIT_MS });
      await page.fill("#key-input", key);
      await page.click("#key-form button[type=submit]");
    }
    await page.waitForSelector("#peer-rows tr[data-peer-id]", { timeout: WAIT_MS });
    const first_paint_ms = Date.now() - opened;
    // Long tasks (over 50 ms on the main thread) while it polls.
    await page.evaluate(() => {
      window.__long_tasks = 0;
      new PerformanceObserver((list) => { window.__long_tasks += list.getEntries().length; })
        .observe({ type: "longtask", buffered: false });
    });
    await page.waitForTimeout(WATCH_MS);
    const first_page = await page.evaluate(view);
    const long_tasks = await page.evaluate(() => window.__long_tasks);
    await page.screenshot({ path: path.join(out, "dashboard.png"), fullPage: true });
    let second_page = null;
    const next = await page.$("#peer-next:not([disabled])");
    if (next) {
      await next.click();
      await page.waitForTimeout(500);
      second_page = await page.evaluate(view);
      await page.screenshot({ path: path.join(out, "dashboard-page-2.png"), fullPage: true });
    }
    const median = (ms) => [...ms].sort((a, b) => a - b)[Math.floor(ms.length / 2)];
    const fetched = Object.fromEntries(Object.entries(polls).map(([name, p]) => [name, {
      count: p.count, bytes: p.bytes, median_ms: median(p.ms),
    }]));
    process.stdout.write(JSON.stringify({
      first_paint_ms, watched_ms: WATCH_MS, long_tasks, first_page, second_page, fetched, problems,
    }, null, 2) + "\n");
  } catch (e) {
    process.stdout.write(JSON.stringify({ error: String(e && e.message || e), problems }) + "\n");
    await context.close();
    process.exit(1);
  }
  await context.close();
  process.exit(problems.length ? 1 : 0);
}

main();
