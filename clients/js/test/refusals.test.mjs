// Refused handshakes and the close-code table: the client stops ("failed", with the reason) on a
// refusal retrying cannot fix, asks getToken once before that, gives up after `failAfter`
// unexplained failures where the status is hidden (browsers), and takes the decision for every
// close code from CLOSE_ACTIONS (generated from the server's table).
// Run: CRIER_BIN=$PWD/target/debug/crier node --test --test-concurrency=1 clients/js/test/refusals.test.mjs

import { test } from "node:test";
import assert from "node:assert/strict";
import WebSocket, { WebSocketServer } from "ws";
import { CLOSE_ACTIONS, Crier } from "../src/index.js";
import { Node, mint, waitFor, freePort } from "./support.mjs";

const now = () => Math.floor(Date.now() / 1000);
const fast = { WebSocket, backoff: { base: 50, cap: 500 } };

function client(t, url, opts) {
  const c = new Crier(url, { ...fast, ...opts });
  c.on("error", () => {}); // collected through state and failure
  t.after(() => c.close());
  return c;
}

async function node(t, opts) {
  const n = await Node.start(opts);
  t.after(() => n.stop());
  return n;
}

test("a fixed token refused with 401 stops in state failed with the status, not retried forever", async (t) => {
  const n = await node(t);
  const expired = mint({ sub: "ann", exp: now() - 3600 });
  const closes = [];
  const c = client(t, n.wsUrl, { token: expired });
  c.on("close", (e) => closes.push(e));
  await waitFor(() => c.state === "failed", "failed");
  assert.equal(c.failure.status, 401);
  assert.match(c.failure.reason, /HTTP 401.*token/);
  assert.deepEqual(closes.map((e) => [e.reconnect, e.status]), [[false, 401]]);
  assert.equal(c.stats.reconnects, 0);
  // The node's log says which check failed, and never the token.
  await waitFor(() => n.stderr.includes("token expired"), "the refusal in the node's log");
  assert.ok(!n.stderr.includes(expired), "the token is not logged");
});

test("a refused handshake asks getToken once: a good token connects, a second refusal fails", async (t) => {
  const n = await node(t);
  let calls = 0;
  const c = client(t, n.wsUrl, {
    getToken: async () => (++calls === 1 ? mint({ sub: "bo", exp: now() - 3600 }) : mint({ sub: "bo", channels: ["*"] })),
  });
  await waitFor(() => c.state === "connected", "connected with the second token");
  assert.equal(calls, 2);

  let calls2 = 0;
  const d = client(t, n.wsUrl, {
    getToken: async () => {
      calls2++;
      return mint({ sub: "bo", exp: now() - 3600 });
    },
  });
  await waitFor(() => d.state === "failed", "failed");
  assert.equal(calls2, 2, "asked once after the refusal, not forever");
  assert.equal(d.failure.status, 401);
});

test("an Origin not in allowed_origins: 403, failed, and the reason names the setting", async (t) => {
  const n = await node(t, { args: ["--allowed-origins", "https://app.example.com"] });
  class FromLocalhost extends WebSocket {
    constructor(url, protocols) {
      super(url, protocols, { origin: "http://localhost:5173" });
    }
  }
  const c = client(t, n.wsUrl, { token: mint({ sub: "cy" }), WebSocket: FromLocalhost });
  await waitFor(() => c.state === "failed", "failed");
  assert.equal(c.failure.status, 403);
  assert.match(c.failure.reason, /allowed_origins/);
  await waitFor(() => n.stderr.includes('origin "http://localhost:5173" not in allowed_origins'), "the node's log");
});

test("where the status is hidden (a browser), failAfter failures before open end in failed with a hint", async (t) => {
  const n = await node(t);
  // A browser's WebSocket: the error event says nothing about the HTTP status.
  class Browserish extends WebSocket {
    set onerror(fn) {
      super.onerror = () => fn({ type: "error" });
    }
  }
  let attempts = 0;
  class Counting extends Browserish {
    constructor(url, protocols) {
      super(url, protocols);
      attempts++;
    }
  }
  const c = client(t, n.wsUrl, { token: "not-a-jwt", WebSocket: Counting, failAfter: 3 });
  await waitFor(() => c.state === "failed", "failed");
  assert.equal(attempts, 3);
  assert.equal(c.failure.status, null);
  assert.match(c.failure.reason, /3 connection attempts in a row.*allowed_origins.*log/);
});

test("network errors (no HTTP status, in Node) are retried, not failed", async (t) => {
  const port = await freePort(); // nothing listens: ECONNREFUSED
  const c = client(t, `ws://127.0.0.1:${port}/ws`, { token: mint({ sub: "d" }), failAfter: 2 });
  await waitFor(() => c.stats.reconnects >= 4, "several reconnects");
  assert.notEqual(c.state, "failed");
});

/** A WebSocket server that says welcome, then closes every connection with `code` once. */
async function closingServer(t, code) {
  const port = await freePort();
  const wss = new WebSocketServer({ port, host: "127.0.0.1", handleProtocols: (p) => (p.has("crier.v1") ? "crier.v1" : false) });
  await new Promise((r) => wss.once("listening", r));
  let n = 0;
  wss.on("connection", (ws) => {
    n++;
    ws.send(JSON.stringify({ type: "welcome", client: `c${n}`, user: "u", node: "fake", ping_interval_ms: 25000 }));
    if (n === 1) setTimeout(() => ws.close(code, "bye"), 20);
  });
  t.after(() => {
    for (const ws of wss.clients) ws.terminate();
    return new Promise((r) => wss.close(r));
  });
  return { url: `ws://127.0.0.1:${port}/ws`, connections: () => n };
}

test("every code of the server's table takes the table's action", async (t) => {
  assert.ok(Object.keys(CLOSE_ACTIONS).length >= 13, "the generated table is there");
  for (const [codeText, action] of Object.entries(CLOSE_ACTIONS)) {
    const code = Number(codeText);
    const s = await closingServer(t, code);
    const c = new Crier(s.url, { ...fast, token: mint({ sub: "u" }) }); // no getToken: 4001 stops
    const closes = [];
    c.on("close", (e) => closes.push(e));
    await waitFor(() => closes.length === 1, `close ${code}`);
    assert.equal(closes[0].code, code);
    const stops = action === "stop" || action === "refresh_token";
    assert.equal(closes[0].reconnect, !stops, `${code} (${action})`);
    if (stops) {
      assert.equal(c.state, "closed", `${code}`);
    } else {
      if (action === "reconnect_now") assert.equal(closes[0].delay, 0, `${code}: at once`);
      if (action === "reconnect_after_jitter") assert.ok(closes[0].delay <= 100, `${code}: within min(cap, 2 x base)`);
      await waitFor(() => s.connections() === 2 && c.state === "connected", `reconnected after ${code}`);
    }
    c.close();
  }
});
