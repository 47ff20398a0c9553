// The admin page (`GET /admin`, setting `admin`) in headless Chromium (Debian's /usr/bin/chromium,
// driven by playwright-core) against two real crier nodes sharing a real redis-server:
// sign-in with the API key (a wrong key refused), the nodes (version, uptime, connections by
// transport, memory), the channels (top by subscribers, search by prefix), one channel
// (presence, presence_stats, recent history, publish, delete history), one user (connections,
// disconnect, invalidate tokens), sign-out;
// the key is never in a URL, a cookie or storage; a page of another origin cannot use the REST
// API (the browser's preflight fails, and a request with its Origin is refused 403).
// Screenshots go to target/browser/admin-*.png. Every wait is bounded.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:http";
import { createServer as netServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const CRIER = process.env.CRIER_BIN || join(ROOT, "target", "debug", "crier");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SHOTS = join(ROOT, "target", "browser");
const SECRET = "admin-test-secret-admin-test-secret-0123456";
const API_KEY = "admin-test-key";
const WAIT = 20000;

const children = new Set();
process.on("exit", () => children.forEach((c) => c.kill("SIGKILL")));

function freePort() {
  return new Promise((res, rej) => {
    const s = netServer();
    s.once("error", rej);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
  });
}

async function waitFor(fn, what, timeout = WAIT) {
  const deadline = Date.now() + timeout;
  let last;
  for (;;) {
    try {
      const v = await fn();
      if (v) return v;
      last = v;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what} (last: ${last})`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

function run(cmd, args, ready) {
  // crier reads CRIER_* variables as settings (and refuses unknown ones, such as CRIER_BIN).
  const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("CRIER_")));
  const child = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"], env });
  children.add(child);
  let out = "";
  let code;
  child.stdout.on("data", (d) => (out += d));
  child.stderr.on("data", (d) => (out += d));
  child.on("exit", (c) => {
    code = c;
    children.delete(child);
  });
  const started = waitFor(() => {
    if (code !== undefined) throw new Error(`${cmd} exited with ${code}: ${out.slice(-500)}`);
    return ready(out);
  }, `${cmd} to start`);
  return { child, output: () => out, ready: started };
}

async function redis() {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), "crier-admin-redis-"));
  const p = run("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir], (o) =>
    o.includes("Ready to accept connections"),
  );
  await p.ready;
  return { url: `redis://127.0.0.1:${port}/0`, stop: () => (p.child.kill("SIGKILL"), rmSync(dir, { recursive: true, force: true })) };
}

async function crier(name, extra) {
  const port = await freePort();
  const args = ["--listen", `127.0.0.1:${port}`, "--node-id", name, "--jwt-secret", SECRET, "--api-keys", API_KEY, "--shutdown-drain", "300ms", ...extra];
  const p = run(CRIER, args, (o) => o.includes("crier listening on http://"));
  await p.ready;
  return { ...p, url: (path) => `http://127.0.0.1:${port}${path}`, port };
}

/** A token for `sub`, issued `age` seconds ago. */
function token(sub, channels, age = 0) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, channels, iat: now - age, exp: now + 3600 })}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

async function api(node, method, path, body, headers = {}) {
  const r = await fetch(node.url(path), {
    method,
    headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json", ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  return { status: r.status, body: await r.json() };
}

/** An SSE subscriber (no Origin: a server-side client); `events` collects the data lines. */
async function sse(t, node, user, channels, age = 0) {
  const q = channels.map((c) => `channel=${encodeURIComponent(c)}`).join("&");
  const ac = new AbortController();
  const r = await fetch(node.url(`/sse?${q}`), { headers: { authorization: `Bearer ${token(user, ["*"], age)}` }, signal: ac.signal });
  assert.equal(r.status, 200);
  const s = { events: [], closed: false };
  (async () => {
    const dec = new TextDecoder();
    let buf = "";
    try {
      for await (const chunk of r.body) {
        buf += dec.decode(chunk, { stream: true });
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).replace(/^ /, ""));
          if (data.length) s.events.push(JSON.parse(data.join("\n")));
        }
      }
    } catch {
      // aborted
    }
    s.closed = true;
  })();
  t.after(() => ac.abort());
  // Subscribed to every channel (an `ack` each) before anything is published.
  await waitFor(() => s.events.filter((e) => e.type === "ack").length === channels.length, `${user}'s subscriptions`);
  return s;
}

async function browser(t) {
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} missing: apt-get install chromium (scripts/test does)`);
  mkdirSync(SHOTS, { recursive: true });
  const profile = mkdtempSync(join(tmpdir(), "crier-chromium-"));
  const ctx = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1100, height: 800 },
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run", "--disable-component-update", "--disable-sync"],
  });
  t.after(async () => {
    await ctx.close();
    rmSync(profile, { recursive: true, force: true });
  });
  return ctx;
}

const texts = (page, sel) => page.$$eval(sel, (els) => els.map((e) => e.textContent.trim()));
const rows = (page, table) => page.$$eval(`#${table} tbody tr`, (trs) => trs.map((tr) => [...tr.children].map((td) => td.textContent.trim())));

test("admin page: nodes, channels, a channel, a user, over two nodes on Redis", { timeout: 180000 }, async (t) => {
  const r = await redis();
  t.after(() => r.stop());
  const common = ["--redis-url", r.url, "--presence-ttl", "2s", "--admin"];
  const a = await crier("admin-a", common);
  t.after(() => a.child.kill("SIGKILL"));
  const b = await crier("admin-b", common);
  t.after(() => b.child.kill("SIGKILL"));
  const off = await crier("admin-off", []);
  t.after(() => off.child.kill("SIGKILL"));
  assert.equal((await fetch(off.url("/admin"))).status, 404, "off by default");

  // Activity: three SSE subscribers over the two nodes.
  const alice = await sse(t, a, "alice", ["chat:lobby", "chat:dev"]);
  const bob = await sse(t, b, "bob", ["chat:lobby"]);
  const carol = await sse(t, b, "carol", ["news"]);
  await api(a, "POST", "/api/v1/publish", { channel: "chat:lobby", data: { text: "hello from the API" } });
  await waitFor(() => bob.events.some((e) => e.type === "message"), "bob receives the first message");

  const ctx = await browser(t);
  const page = await ctx.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(`pageerror: ${e.message}`));
  // The browser logs every non-2xx fetch: the wrong key's 401 and the 404s of routes this node
  // may lack are expected; anything else is not.
  page.on("console", (m) => m.type() === "error" && !/status of (401|404)/.test(m.text()) && problems.push(`console: ${m.text()}`));
  page.on("dialog", (d) => d.accept());
  await page.goto(a.url("/admin"));
  await page.waitForSelector("body[data-ready='1']");
  await page.screenshot({ path: join(SHOTS, "admin-signin.png") });

  // A wrong key is refused; the right one signs in.
  await page.fill("#api-key", "not-the-key");
  await page.click("#signin-form button[type=submit]");
  await page.waitForSelector("#signin-msg .msg.error");
  assert.match((await texts(page, "#signin-msg"))[0], /refused/);
  await page.fill("#api-key", API_KEY);
  await page.click("#signin-form button[type=submit]");
  await page.waitForSelector("#views:not([hidden])");
  assert.equal(await page.inputValue("#api-key"), "", "the key does not stay in the form");

  // Nodes: both, with version, uptime, connections by transport, memory.
  const nodes = await waitFor(async () => {
    await page.click("#nodes-refresh");
    const got = await rows(page, "nodes-table");
    const byName = Object.fromEntries(got.map((r) => [r[0], r]));
    return byName["admin-a"] && byName["admin-b"] && byName["admin-a"][5] === "1" && byName["admin-b"][5] === "2" ? byName : null;
  }, "both nodes with their SSE counts");
  for (const n of Object.values(nodes)) {
    assert.match(n[1], /^\d+\.\d+\.\d+/, "version");
    assert.match(n[2], /\d+[smhd]/, "uptime");
    assert.match(n[6], /MiB|KiB|GiB/, "memory");
  }
  await page.screenshot({ path: join(SHOTS, "admin-nodes.png") });

  // Channels: cluster-wide, top by subscribers; search by prefix.
  await page.click("#nav button[data-view=channels]");
  const channels = await waitFor(async () => {
    await page.click("#channels-form button[type=submit]");
    const got = await rows(page, "channels-table");
    return got.length === 3 ? got : null;
  }, "three channels listed");
  assert.deepEqual(channels, [["chat:lobby", "2"], ["chat:dev", "1"], ["news", "1"]], "top by subscribers, then by name");
  await page.fill("#channels-prefix", "chat:d");
  await page.click("#channels-form button[type=submit]");
  await waitFor(async () => JSON.stringify(await rows(page, "channels-table")) === JSON.stringify([["chat:dev", "1"]]), "search by prefix");
  await page.screenshot({ path: join(SHOTS, "admin-channels.png") });
  await page.fill("#channels-prefix", "");
  await page.click("#channels-form button[type=submit]");
  await waitFor(async () => (await rows(page, "channels-table")).length === 3, "all three again");

  // One channel: presence (both nodes), history, publish from the page.
  await page.click("#channels-table a.link >> text=chat:lobby");
  await page.waitForSelector("#channel-body:not([hidden])");
  const presence = await waitFor(async () => {
    const got = await rows(page, "presence-table");
    return got.length === 2 ? got : (await page.click("#channel-form button[type=submit]"), null);
  }, "two presence entries");
  assert.deepEqual(presence.map((p) => p[1]).sort(), ["alice", "bob"]);
  assert.deepEqual(presence.map((p) => p[2]).sort(), ["admin-a", "admin-b"]);
  await waitFor(async () => (await rows(page, "history-table")).some((h) => h[1].includes("hello from the API")), "the history shows the message");
  // presence_stats: the counts, cluster-wide.
  await waitFor(async () => (await page.textContent("#channel-stats")).includes("2 client(s)"), "presence_stats");
  await page.fill("#publish-data", '{"text":"hello from the admin page"}');
  await page.click("#publish-form button[type=submit]");
  await waitFor(async () => (await texts(page, "#publish-msg")).join(" ").includes("Published at offset 2"), "published");
  for (const [who, s] of [["alice", alice], ["bob", bob]]) {
    await waitFor(() => s.events.some((e) => e.type === "message" && e.data && e.data.text === "hello from the admin page"), `${who} receives the page's message`);
  }
  await waitFor(async () => (await rows(page, "history-table"))[0]?.[1].includes("hello from the admin page"), "newest first in the history");
  await page.screenshot({ path: join(SHOTS, "admin-channel.png") });

  // Delete the channel's history from the page: the history is empty, a new epoch begins.
  const before = (await api(a, "GET", "/api/v1/channels/chat:lobby/history")).body.epoch;
  await page.click("#history-delete");
  await waitFor(async () => (await texts(page, "#publish-msg")).join(" ").includes("History deleted"), "history deleted");
  const after = (await api(a, "GET", "/api/v1/channels/chat:lobby/history")).body;
  assert.deepEqual(after.messages, []);
  assert.notEqual(after.epoch, before);

  // One user: connections (cluster-wide: carol is on the other node), then disconnect.
  await page.click("#nav button[data-view=user]");
  await page.fill("#user-name", "carol");
  await page.click("#user-form button[type=submit]");
  const carolRows = await waitFor(async () => {
    const got = await rows(page, "connections-table");
    return got.length === 1 ? got : null;
  }, "carol's connection");
  assert.ok(carolRows[0].includes("admin-b") && carolRows[0].some((c) => c.includes("news")), `carol's row: ${carolRows[0]}`);
  await page.screenshot({ path: join(SHOTS, "admin-user.png") });
  await page.click("#user-disconnect");
  await waitFor(async () => {
    const m = (await texts(page, "#user-action-msg")).join(" ");
    if (!m.includes("Disconnected 1 connection(s).")) throw new Error(`the page says: ${m}`);
    return true;
  }, "carol disconnected, counted on the other node");
  await waitFor(() => carol.events.some((e) => e.type === "close" || e.code === 4003) || carol.closed, "carol's stream ends");
  await waitFor(async () => {
    const l = (await api(a, "GET", "/api/v1/channels?prefix=news")).body.channels;
    return l.length === 0;
  }, "news leaves the listing once its only subscriber is gone");

  // Invalidate a user's tokens from the page: the live connection (a token issued a minute ago)
  // is closed, and that token is refused at the next handshake, on any node.
  const dave = await sse(t, b, "dave", ["chat:dev"], 60);
  await page.fill("#user-name", "dave");
  await page.click("#user-form button[type=submit]");
  await waitFor(async () => (await rows(page, "connections-table")).length === 1, "dave's connection");
  await page.click("#user-invalidate");
  await waitFor(async () => {
    const m = (await texts(page, "#user-action-msg")).join(" ");
    if (!m.includes("Tokens invalidated; 1 connection(s) closed.")) throw new Error(`the page says: ${m}`);
    return true;
  }, "dave's tokens invalidated");
  await waitFor(() => dave.closed, "dave's stream ends");
  for (const node of [a, b]) {
    const again = await fetch(node.url("/sse?channel=chat:dev"), { headers: { authorization: `Bearer ${token("dave", ["*"], 60)}` } });
    assert.equal(again.status, 401);
    assert.equal((await again.json()).error, "token_revoked");
  }

  // The key lives in memory only: not in the URL, cookies or storage.
  assert.equal(page.url(), a.url("/admin"));
  const stored = await page.evaluate(() => [document.cookie, localStorage.length, sessionStorage.length]);
  assert.deepEqual(stored, ["", 0, 0]);
  const cookies = await ctx.cookies();
  assert.deepEqual(cookies, []);

  // Sign out: the sign-in form is back and API views are hidden.
  await page.click("#signout");
  await page.waitForSelector("#signin:not([hidden])");
  assert.equal(await page.isHidden("#views"), true);
  assert.deepEqual(problems, [], "no page errors");
});

test("a page of another origin cannot use the REST API, even with the key", { timeout: 60000 }, async (t) => {
  const node = await crier("admin-x", ["--admin"]);
  t.after(() => node.child.kill("SIGKILL"));
  const other = createServer((req, res) => {
    res.writeHead(200, { "content-type": "text/html" });
    res.end("<!doctype html><title>elsewhere</title><p>another origin</p>");
  });
  await new Promise((res) => other.listen(0, "127.0.0.1", res));
  t.after(() => other.close());
  const origin = `http://127.0.0.1:${other.address().port}`;

  // What the node answers a request carrying that Origin (no browser needed to see it).
  const refused = await api(node, "GET", "/api/v1/info", undefined, { origin });
  assert.equal(refused.status, 403);
  assert.equal(refused.body.error, "forbidden");

  const ctx = await browser(t);
  const page = await ctx.newPage();
  await page.goto(origin);
  const outcome = await page.evaluate(
    async ([url, key]) => {
      const tries = {};
      try {
        const r = await fetch(`${url}/api/v1/info`, { headers: { Authorization: `Bearer ${key}` } });
        tries.withKey = `status ${r.status}`;
      } catch (e) {
        tries.withKey = `failed: ${e.name}`;
      }
      try {
        const r = await fetch(`${url}/api/v1/publish`, { method: "POST", mode: "no-cors", body: "{}" });
        tries.simple = `opaque ${r.type}`;
      } catch (e) {
        tries.simple = `failed: ${e.name}`;
      }
      return tries;
    },
    [node.url(""), API_KEY],
  );
  assert.equal(outcome.withKey, "failed: TypeError", "the browser blocks it (no CORS from the REST API)");
  await page.screenshot({ path: join(SHOTS, "admin-cross-origin.png") });
  // The opaque no-cors POST reached the node and was refused there: counted as a refusal.
  const metrics = await (await fetch(node.url("/metrics"))).text();
  assert.match(metrics, /crier_refusals_total\{[^}]*reason="cross_origin"[^}]*\} [1-9]/);
});
