// Headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core) against the real
// crier binary on a real redis-server:
// - an EventSource on another origin (CORS) loses its stream when its node is stopped (drain:
//   `event: close` 1012), reconnects by itself with Last-Event-ID once the node is back on the
//   same port, and has every message exactly once, in order — including those published through
//   the other node while it was away;
// - Chromium's own WebSocket offers permessage-deflate, crier (websocket_compression on) accepts
//   it, and large messages arrive intact both ways.
// Every wait is bounded; processes are killed when the test ends.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:http";
import { createServer as netServer } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const CRIER = process.env.CRIER_BIN || join(ROOT, "target", "debug", "crier");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SECRET = "browser-test-secret-browser-test-secret-0123";
const API_KEY = "browser-test-key";
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
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
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
  child.on("exit", () => children.delete(child));
  const exited = new Promise((r) => child.on("exit", (c) => r((code = c))));
  const started = waitFor(() => {
    if (code !== undefined) throw new Error(`${cmd} exited with ${code}: ${out.slice(-500)}`);
    return ready(out);
  }, `${cmd} to start`);
  return { child, exited, output: () => out, ready: started };
}

async function redis() {
  const port = await freePort();
  const dir = mkdtempSync(join(tmpdir(), "crier-browser-redis-"));
  const p = run("redis-server", ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir], (o) =>
    o.includes("Ready to accept connections"),
  );
  await p.ready;
  return { url: `redis://127.0.0.1:${port}/0`, stop: () => (p.child.kill("SIGKILL"), rmSync(dir, { recursive: true, force: true })) };
}

async function crier(port, name, extra) {
  const args = ["--listen", `127.0.0.1:${port}`, "--node-id", name, "--jwt-secret", SECRET, "--api-keys", API_KEY, "--shutdown-drain", "300ms", ...extra];
  const p = run(CRIER, args, (o) => o.includes("crier listening on http://"));
  await p.ready;
  return { ...p, url: (path) => `http://127.0.0.1:${port}${path}`, port };
}

function token(sub, channels, publish = []) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, channels, publish, iat: now, exp: now + 3600 })}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

async function publish(node, channel, data) {
  const r = await fetch(node.url("/api/v1/publish"), {
    method: "POST",
    headers: { authorization: `Bearer ${API_KEY}`, "content-type": "application/json" },
    body: JSON.stringify({ channel, data }),
  });
  const body = await r.text();
  assert.equal(r.status, 200, body);
  return JSON.parse(body);
}

/** A page origin of its own (so the EventSource and WebSocket are cross-origin, as in production). */
async function pageServer(t) {
  const server = createServer((req, res) => {
    res.writeHead(200, { "content-type": "text/html" });
    res.end("<!doctype html><title>crier transports</title><p>test page</p>");
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  t.after(() => server.close());
  return `http://127.0.0.1:${server.address().port}`;
}

async function browser(t) {
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} missing: apt-get install chromium (scripts/test does)`);
  const profile = mkdtempSync(join(tmpdir(), "crier-chromium-"));
  const ctx = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run", "--disable-component-update", "--disable-sync"],
  });
  t.after(async () => {
    await ctx.close();
    rmSync(profile, { recursive: true, force: true });
  });
  return ctx;
}

test("EventSource resumes across a node restart on Redis with nothing lost or repeated", { timeout: 120000 }, async (t) => {
  const r = await redis();
  t.after(() => r.stop());
  const origin = await pageServer(t);
  const common = ["--redis-url", r.url, "--allowed-origins", origin];
  const portA = await freePort();
  let a = await crier(portA, "node-a", common);
  const b = await crier(await freePort(), "node-b", common);
  t.after(() => {
    a.child.kill("SIGKILL");
    b.child.kill("SIGKILL");
  });

  const ctx = await browser(t);
  const page = await ctx.newPage();
  await page.goto(origin);
  const url = a.url(`/sse?channel=feed&token=${token("browser", ["feed"])}`);
  await page.evaluate((url) => {
    window.got = [];
    window.welcomes = [];
    window.closes = [];
    window.subscribed = [];
    const es = new EventSource(url);
    es.addEventListener("welcome", (e) => window.welcomes.push(JSON.parse(e.data).node));
    es.addEventListener("subscribed", (e) => window.subscribed.push(JSON.parse(e.data)));
    es.addEventListener("message", (e) => window.got.push({ offset: JSON.parse(e.data).offset, data: JSON.parse(e.data).data, id: e.lastEventId }));
    es.addEventListener("close", (e) => window.closes.push(JSON.parse(e.data).code));
    window.es = es;
  }, url);
  await waitFor(() => page.evaluate(() => window.subscribed.length === 1), "the stream is subscribed");
  for (let i = 1; i <= 5; i++) await publish(b, "feed", i);
  await waitFor(() => page.evaluate(() => window.got.length === 5), "5 messages before the restart");

  // Stop node A (drain: event close 1012), publish through B while it is away, start A again.
  a.child.kill("SIGTERM");
  assert.equal(await a.exited, 0, a.output().slice(-1000));
  assert.deepEqual(await page.evaluate(() => window.closes), [1012]);
  for (let i = 6; i <= 10; i++) await publish(b, "feed", i);
  a = await crier(portA, "node-a", common);
  await waitFor(() => page.evaluate(() => window.welcomes.length === 2), "the EventSource reconnects by itself");
  await waitFor(() => page.evaluate(() => window.got.length === 10), "the missed messages are recovered");
  await publish(b, "feed", 11);
  await waitFor(() => page.evaluate(() => window.got.length === 11), "then live ones");

  const got = await page.evaluate(() => window.got);
  assert.deepEqual(got.map((m) => m.data), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], "every message once, in order");
  assert.deepEqual(got.map((m) => m.offset), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
  assert.ok(got.every((m) => m.id.length > 0), "every message event has an id");
  const subscribed = await page.evaluate(() => window.subscribed);
  assert.equal(subscribed[1].recovered, true, "the second stream resumed with recovery");
  assert.deepEqual(await page.evaluate(() => window.welcomes), ["node-a", "node-a"]);
});

test("Chromium's WebSocket negotiates permessage-deflate and large messages arrive intact", { timeout: 60000 }, async (t) => {
  const origin = await pageServer(t);
  const node = await crier(await freePort(), "deflate", ["--allowed-origins", origin, "--websocket-compression"]);
  t.after(() => node.child.kill("SIGKILL"));
  const ctx = await browser(t);
  const page = await ctx.newPage();
  await page.goto(origin);
  const wsUrl = `ws://127.0.0.1:${node.port}/ws`;
  const tok = token("browser", ["feed"], ["feed"]);
  const ext = await page.evaluate(
    ([wsUrl, tok]) =>
      new Promise((res, rej) => {
        window.frames_ = [];
        const ws = new WebSocket(wsUrl, ["crier.v1", `crier.bearer.${tok}`]);
        ws.onmessage = (e) => window.frames_.push(JSON.parse(e.data));
        ws.onerror = () => rej(new Error("websocket error"));
        ws.onopen = () => {
          ws.send(JSON.stringify({ type: "subscribe", id: 1, channel: "feed" }));
          res(ws.extensions);
        };
        window.ws = ws;
      }),
    [wsUrl, tok],
  );
  assert.equal(ext, "permessage-deflate; server_no_context_takeover; client_no_context_takeover");
  await waitFor(() => page.evaluate(() => window.frames_.some((f) => f.type === "ack" && f.id === 1)), "subscribed");
  const big = (i) => ({ seq: i, text: "lorem ipsum dolor sit amet ".repeat(40), list: Array.from({ length: 20 }, (_, k) => k * i) });
  for (let i = 0; i < 20; i++) await publish(node, "feed", big(i));
  // A large publish from the browser (Chromium compresses it).
  await page.evaluate((data) => window.ws.send(JSON.stringify({ type: "publish", id: 2, channel: "feed", data })), big(99));
  await waitFor(() => page.evaluate(() => window.frames_.filter((f) => f.type === "message").length === 21), "21 messages");
  const frames = await page.evaluate(() => window.frames_);
  const messages = frames.filter((f) => f.type === "message");
  assert.deepEqual(messages.map((m) => m.offset), Array.from({ length: 21 }, (_, k) => k + 1));
  messages.slice(0, 20).forEach((m, i) => assert.deepEqual(m.data, big(i)));
  assert.deepEqual(messages[20].data, big(99));
  assert.ok(frames.some((f) => f.type === "ack" && f.id === 2 && f.offset === 21), JSON.stringify(frames.filter((f) => f.type !== "message")));
});
