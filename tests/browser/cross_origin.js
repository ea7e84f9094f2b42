// A page on another origin uses the relay from a real browser: headless Chromium (Debian's
// `chromium`, driven by playwright-core) loads a page from a small static server of this
// script, and the page opens the README's WebSocket and EventSource, then publishes with a
// cross-origin `fetch` (JSON and an Idempotency-Key header: a preflight first) and with a
// cross-site simple request (`no-cors`, text/plain: no preflight). Whether each worked is
// printed as one JSON line on stdout; tests/browser.rs decides what should have worked.
//
// Usage: node cross_origin.js RELAY_URL PAGE_PORT CHROMIUM_PATH [TOKEN]
//   RELAY_URL     http://127.0.0.1:<port> of a running relay
//   PAGE_PORT     port for the page's server on 127.0.0.1 (its origin: http://127.0.0.1:PORT)
//   CHROMIUM_PATH the browser binary (/usr/bin/chromium)
//   TOKEN         an access token (authentication on): the WebSocket offers the subprotocol
//                 pair `bearer, bearer.<token>`, the EventSource sends the `pulsar_token`
//                 cookie (set by the page for the relay's host) with `withCredentials`, the
//                 publish carries `Authorization: Bearer`, as docs/auth.md shows
// playwright-core is found through NODE_PATH. Everything is bounded in time: the page gives
// up after 15 s, the script after 60 s.

"use strict";

const http = require("http");
const { chromium } = require("playwright-core");

const [relay, pagePort, chromiumPath, token] = process.argv.slice(2);
if (!relay || !pagePort || !chromiumPath) {
  console.error("usage: node cross_origin.js RELAY_URL PAGE_PORT CHROMIUM_PATH");
  process.exit(2);
}

// Runs in the page. Resolves with what worked; never rejects.
async function pageTest([relay, token]) {
  const topic = "browser";
  const wait = (ms) => new Promise((r) => setTimeout(r, ms));
  const withTimeout = (promise, ms, fallback) =>
    Promise.race([promise, wait(ms).then(() => fallback)]);
  const result = {
    ws_subscribed: false,
    ws_error: null,
    ws_payload: null,
    es_open: false,
    es_error: null,
    es_payload: null,
    publish_status: null,
    publish_error: null,
    no_cors_sent: null,
  };

  // The README's WebSocket snippet: subscribe, then log each message's payload.
  let wsMessage;
  const wsGotMessage = new Promise((r) => (wsMessage = r));
  const wsReady = new Promise((resolve) => {
    let ws;
    try {
      const url = relay.replace(/^http/, "ws") + "/ws";
      ws = token ? new WebSocket(url, ["bearer", `bearer.${token}`]) : new WebSocket(url);
    } catch (e) {
      result.ws_error = String(e);
      return resolve();
    }
    ws.onopen = () =>
      ws.send(JSON.stringify({ type: "subscribe", topics: [topic], offset: "last" }));
    ws.onmessage = (e) => {
      const m = JSON.parse(e.data);
      if (m.type === "subscribed") {
        result.ws_subscribed = true;
        resolve();
      }
      if (m.type === "message") {
        result.ws_payload = m.payload;
        wsMessage();
      }
    };
    ws.onerror = () => {
      result.ws_error = result.ws_error || "error event";
      resolve();
    };
    ws.onclose = (e) => {
      result.ws_error = result.ws_error || `closed ${e.code}`;
      resolve();
    };
  });

  // The README's EventSource snippet.
  let esMessage;
  const esGotMessage = new Promise((r) => (esMessage = r));
  const esReady = new Promise((resolve) => {
    if (token) {
      // Cookies ignore ports: set on this page's host, it goes to the relay's too.
      document.cookie = `pulsar_token=${token}; path=/; SameSite=Strict`;
    }
    const es = new EventSource(relay + "/api/v1/events?topics=" + topic,
                               token ? { withCredentials: true } : undefined);
    es.addEventListener("open", () => {
      result.es_open = true;
      resolve();
    });
    es.addEventListener("message", (e) => {
      result.es_payload = JSON.parse(e.data).payload;
      esMessage();
    });
    es.addEventListener("error", () => {
      // A refused stream is CLOSED (no retry); a network blip would be CONNECTING.
      result.es_error = es.readyState === EventSource.CLOSED ? "closed" : "error";
      es.close();
      resolve();
    });
  });

  await withTimeout(Promise.all([wsReady, esReady]), 15000, null);

  // A cross-origin publish: JSON and Idempotency-Key make the browser send a preflight.
  try {
    const response = await fetch(relay + "/api/v1/messages", {
      method: "POST",
      headers: Object.assign(
        { "Content-Type": "application/json", "Idempotency-Key": "browser-1" },
        token ? { Authorization: `Bearer ${token}` } : {},
      ),
      body: JSON.stringify({ topic, payload: { from: "browser" } }),
    });
    result.publish_status = response.status;
  } catch (e) {
    result.publish_error = String(e);
  }

  // A cross-site simple request: no preflight, the answer is opaque to the page; only the
  // relay can refuse it.
  try {
    await fetch(relay + "/api/v1/messages", {
      method: "POST",
      mode: "no-cors",
      headers: { "Content-Type": "text/plain" },
      body: JSON.stringify({ topic: topic + "-no-cors", payload: 1 }),
    });
    result.no_cors_sent = true;
  } catch (e) {
    result.no_cors_sent = String(e);
  }

  if (result.publish_status === 201) {
    const got = [];
    if (result.ws_subscribed) got.push(wsGotMessage);
    if (result.es_open) got.push(esGotMessage);
    await withTimeout(Promise.all(got), 15000, null);
  }
  return result;
}

const page = `<!doctype html><html><head><title>cross-origin page</title></head>
<body><p>A page that uses the relay from another origin.</p></body></html>`;

async function main() {
  const server = http.createServer((req, res) => {
    res.writeHead(200, { "Content-Type": "text/html; charset=utf-8" });
    res.end(page);
  });
  await new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(Number(pagePort), "127.0.0.1", resolve);
  });
  const browser = await chromium.launch({
    executablePath: chromiumPath,
    headless: true,
    // Root in a container: Chromium's sandbox needs user namespaces it may not get there.
    args: ["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"],
  });
  try {
    const tab = await browser.newPage();
    const console_lines = [];
    tab.on("console", (m) => console_lines.push(`${m.type()}: ${m.text()}`));
    await tab.goto(`http://127.0.0.1:${pagePort}/`);
    const result = await tab.evaluate(pageTest, [relay, token || null]);
    result.page_origin = await tab.evaluate(() => window.location.origin);
    result.browser_version = browser.version();
    result.console = console_lines;
    process.stdout.write(JSON.stringify(result) + "\n");
  } finally {
    await browser.close();
    server.close();
  }
}

const deadline = setTimeout(() => {
  console.error("cross_origin.js: no result within 60 s");
  process.exit(3);
}, 60000);
main().then(
  () => clearTimeout(deadline),
  (e) => {
    console.error(`cross_origin.js: ${e && e.stack ? e.stack : e}`);
    process.exit(1);
  },
);
