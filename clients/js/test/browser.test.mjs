// Headless Chromium (Debian's /usr/bin/chromium, driven by playwright-core) against the real
// crier binary: the --dev demo page sends and receives and survives a node restart with
// recovery (Redis-backed node restarted on the same port); two pages of the WebRTC example open
// a data channel on loopback and talk peer to peer; a page whose Origin is not allowed ends in
// "failed" with a hint (the browser hides the 403). Screenshots go to target/browser/.

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { Node, Redis, ROOT, SECRET, freePort, mint, waitFor } from "./support.mjs";

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SHOTS = join(ROOT, "target", "browser");
const PAGE_WAIT = 15000;

async function browser(t) {
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} missing: apt-get install chromium (scripts/test does)`);
  mkdirSync(SHOTS, { recursive: true });
  const profile = mkdtempSync(join(tmpdir(), "crier-chromium-"));
  const ctx = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1000, height: 760 },
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-background-networking",
      "--disable-quic",
      "--no-first-run",
      "--disable-component-update",
      "--disable-sync",
      // WebRTC between two pages of one machine: host candidates, no mDNS names.
      "--allow-loopback-in-peer-connection",
      "--disable-features=WebRtcHideLocalIpsWithMdns",
    ],
  });
  t.after(async () => {
    await ctx.close();
    rmSync(profile, { recursive: true, force: true });
  });
  return ctx;
}

async function open(ctx, url) {
  const page = await ctx.newPage();
  const problems = [];
  page.on("pageerror", (e) => problems.push(`pageerror: ${e.message}`));
  // The browser's own note on a refused reconnect (the node is down) is expected; anything else is not.
  page.on("console", (m) => m.type() === "error" && !/^WebSocket connection to .* failed/.test(m.text()) && problems.push(`console: ${m.text()}`));
  page.problems = problems;
  await page.goto(url);
  return page;
}

const texts = (page, sel) => page.$$eval(sel, (els) => els.map((e) => e.textContent));

async function metric(node, name) {
  const body = await (await fetch(node.url("/metrics"))).text();
  const line = body.split("\n").find((l) => l.startsWith(name));
  return line ? Number(line.split(" ").pop()) : 0;
}

test("demo page: chat, presence, and a node restart on Redis loses and repeats nothing", { timeout: 120000 }, async (t) => {
  const redis = await Redis.start();
  t.after(() => redis.stop());
  const env = { CRIER_REDIS_URL: redis.url };
  // A fixed --jwt-secret: the page's embedded dev token stays valid across the restart.
  const n1 = await Node.start({ args: ["--dev", "--node-id", "demo-1"], env });
  t.after(() => n1.stop());
  const n2 = await Node.start({ args: ["--dev", "--node-id", "demo-2"], env });
  t.after(() => n2.stop());

  const js = await fetch(n1.url("/crier.js"));
  assert.equal(js.status, 200);
  assert.match(js.headers.get("content-type"), /^text\/javascript/);

  const ctx = await browser(t);
  const page = await open(ctx, n1.url("/?nick=tester"));
  await page.waitForSelector("#state.connected", { timeout: PAGE_WAIT });
  await page.waitForSelector("#messages li.join", { timeout: PAGE_WAIT });
  await page.waitForFunction(() => document.querySelector("#who li.me")?.textContent.includes("tester"), null, { timeout: PAGE_WAIT });

  await page.fill("#text", "hello from the browser");
  await page.click("#send-btn");
  await page.waitForFunction(() => document.querySelectorAll("#messages li.msg:not(.join)").length >= 1, null, { timeout: PAGE_WAIT });
  await n2.publish("chat:lobby", { nick: "node-2", text: "hello from node 2" });
  await page.waitForFunction(() => document.querySelectorAll("#messages li.msg:not(.join)").length >= 2, null, { timeout: PAGE_WAIT });
  assert.deepEqual(await texts(page, "#messages li.msg:not(.join) .nick"), ["tester: ", "node-2: "]);

  await n1.kill();
  await page.waitForFunction(() => document.querySelector("#state").textContent !== "connected", null, { timeout: PAGE_WAIT });
  const down = [];
  for (let i = 1; i <= 5; i++) down.push((await n2.publish("chat:lobby", { nick: "node-2", text: `while down ${i}` })).offset);
  await page.fill("#text", "typed while offline");
  await page.click("#send-btn"); // queued by the client until it is connected again
  assert.equal(await page.textContent("#outbox"), "sending: typed while offline");
  await page.screenshot({ path: join(SHOTS, "demo-node-down.png") });
  await n1.restart();
  await page.waitForSelector("#state.connected", { timeout: PAGE_WAIT });
  await page.waitForFunction(() => [...document.querySelectorAll("#messages li.msg")].some((li) => li.textContent.includes("typed while offline")), null, {
    timeout: PAGE_WAIT,
  });
  await n2.publish("chat:lobby", { nick: "node-2", text: "after the restart" });
  await page.waitForFunction(() => [...document.querySelectorAll("#messages li.msg")].some((li) => li.textContent.includes("after the restart")), null, {
    timeout: PAGE_WAIT,
  });
  await page.waitForFunction(() => document.querySelector("#outbox").children.length === 0, null, { timeout: PAGE_WAIT });
  await page.screenshot({ path: join(SHOTS, "demo-after-restart.png") });

  const shown = await page.$$eval("#messages li.msg", (els) => els.map((e) => ({ offset: Number(e.dataset.offset), text: e.textContent })));
  const offsets = shown.map((m) => m.offset);
  assert.deepEqual(offsets, [...offsets].sort((a, b) => a - b), "in order");
  assert.equal(new Set(offsets).size, offsets.length, "each message once");
  assert.deepEqual(offsets, Array.from({ length: offsets.length }, (_, i) => offsets[0] + i), "no hole");
  for (let i = 1; i <= 5; i++) assert.equal(shown.filter((m) => m.text.endsWith(`while down ${i}`)).length, 1);
  assert.ok(down.every((o) => offsets.includes(o)), "every message acknowledged while the node was down is shown");
  assert.equal(await page.$$eval("#messages li.gap", (els) => els.length), 0, "no gap notice: it was recovered");
  assert.deepEqual(page.problems, []);
});

test("demo page: 'who is here' follows join/leave events (no presence polling)", { timeout: 60000 }, async (t) => {
  const n = await Node.start({ args: ["--dev", "--node-id", "demo-who"] });
  t.after(() => n.stop());
  const ctx = await browser(t);
  const ann = await open(ctx, n.url("/?nick=ann"));
  await ann.waitForFunction(() => document.querySelector("#who li.me")?.textContent.includes("ann"), null, { timeout: PAGE_WAIT });
  const ben = await open(ctx, n.url("/?nick=ben"));
  await ben.waitForSelector("#state.connected", { timeout: PAGE_WAIT });
  // Ben's join reaches Ann's list as a join event (the page reads presence only when it subscribes).
  await ann.waitForFunction(() => document.querySelectorAll("#who li").length === 2, null, { timeout: PAGE_WAIT });
  await ann.waitForFunction(() => document.querySelector("#who").textContent.includes("ben"), null, { timeout: PAGE_WAIT });
  await ann.screenshot({ path: join(SHOTS, "demo-who-joined.png") });
  await ben.close();
  await ann.waitForFunction(() => document.querySelectorAll("#who li").length === 1, null, { timeout: PAGE_WAIT });
  const stats = await ann.evaluate(() => window.crier.presenceStats("chat:lobby"));
  assert.deepEqual(stats, { clients: 1, users: 1 }, "the served client has presenceStats");
  assert.deepEqual(ann.problems, []);
});

test("demo page on the memory broker: a restart is shown honestly as a gap", { timeout: 60000 }, async (t) => {
  const n = await Node.start({ args: ["--dev", "--node-id", "demo-mem"] });
  t.after(() => n.stop());
  const ctx = await browser(t);
  const page = await open(ctx, n.url("/?nick=mem"));
  await page.waitForSelector("#messages li.join", { timeout: PAGE_WAIT });
  await n.restart();
  await page.waitForSelector("#messages li.gap", { timeout: PAGE_WAIT });
  await page.waitForSelector("#state.connected", { timeout: PAGE_WAIT });
  await page.fill("#text", "after a restart without history");
  await page.click("#send-btn");
  await page.waitForFunction(() => [...document.querySelectorAll("#messages li.msg")].some((li) => li.textContent.includes("without history")), null, {
    timeout: PAGE_WAIT,
  });
  assert.match(await page.textContent("#messages li.gap"), /history was lost/);
  await page.screenshot({ path: join(SHOTS, "demo-memory-gap.png") });
});

test("WebRTC example: two pages signal through crier and talk over an RTCDataChannel", { timeout: 90000 }, async (t) => {
  const webPort = await freePort();
  const origin = `http://127.0.0.1:${webPort}`;
  const n = await Node.start({ args: ["--allowed-origins", origin, "--node-id", "rtc"] });
  t.after(() => n.stop());
  const web = spawn(process.execPath, [join(ROOT, "examples/webrtc-signalling/server.mjs")], {
    env: { ...process.env, PORT: String(webPort), CRIER_URL: n.url(""), CRIER_JWT_SECRET: SECRET },
    stdio: ["ignore", "pipe", "inherit"],
  });
  t.after(() => web.kill("SIGKILL"));
  let out = "";
  web.stdout.on("data", (d) => (out += d));
  await waitFor(() => out.includes("webrtc-signalling example on"), "the example server");

  const ctx = await browser(t);
  const alice = await open(ctx, `${origin}/?me=alice&peer=bob`);
  await alice.waitForSelector("#crier-state.ok", { timeout: PAGE_WAIT });
  const bob = await open(ctx, `${origin}/?me=bob&peer=alice`);
  for (const p of [alice, bob]) await p.waitForSelector("#dc-state.ok", { timeout: 30000 });

  const signalled = await metric(n, 'crier_messages_published_total{source="client"}');
  assert.ok(signalled >= 4, `hello, offer, answer, candidates went through crier (${signalled})`);
  await alice.fill("#text", "hi bob, peer to peer");
  await alice.click("#send-btn");
  await bob.waitForFunction(() => document.querySelector("#chat")?.textContent.includes("hi bob, peer to peer"), null, { timeout: PAGE_WAIT });
  await bob.fill("#text", "hi alice");
  await bob.click("#send-btn");
  await alice.waitForFunction(() => document.querySelector("#chat")?.textContent.includes("alice: hi alice") === false && document.querySelector("#chat")?.textContent.includes("bob: hi alice"), null, {
    timeout: PAGE_WAIT,
  });
  assert.equal(await metric(n, 'crier_messages_published_total{source="client"}'), signalled, "the chat itself did not go through crier");
  await alice.screenshot({ path: join(SHOTS, "webrtc-alice.png") });
  await bob.screenshot({ path: join(SHOTS, "webrtc-bob.png") });
  assert.deepEqual([...alice.problems, ...bob.problems], []);
});

test("a browser whose page Origin is not allowed: the client ends failed with a hint, the node logs the origin", { timeout: 60000 }, async (t) => {
  // The page is served by crier itself (http://127.0.0.1:PORT), which allowed_origins does not list.
  const n = await Node.start({ args: ["--allowed-origins", "https://app.example.com"] });
  t.after(() => n.stop());
  const ctx = await browser(t);
  const page = await open(ctx, n.url("/crier.js"));
  const token = mint({ sub: "browser", channels: ["*"] });
  const failure = await page.evaluate(
    async ({ url, token }) => {
      const { Crier } = await import("/crier.js");
      const c = new Crier(url, { token, failAfter: 3, backoff: { base: 20, cap: 100 } });
      c.on("error", () => {});
      for (let i = 0; i < 500 && c.state !== "failed"; i++) await new Promise((r) => setTimeout(r, 20));
      return { state: c.state, failure: c.failure };
    },
    { url: n.wsUrl, token },
  );
  assert.equal(failure.state, "failed");
  assert.equal(failure.failure.status, null, "a browser hides the status");
  assert.match(failure.failure.reason, /3 connection attempts in a row.*allowed_origins/);
  const origin = new URL(n.url("/")).origin;
  await waitFor(() => n.stderr.includes(`origin "${origin}" not in allowed_origins`), "the node's log names the origin");
});
