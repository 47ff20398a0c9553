// crier-client against the real crier binary (memory broker), plus a tiny fake WebSocket server
// for the behaviours a correct server never shows (replaying delivered messages, 1008, silence).

import { test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createServer } from "node:net";
import { fileURLToPath } from "node:url";
import WebSocket, { WebSocketServer } from "ws";
import { Crier, CrierError } from "../src/index.js";
import { Node, mint, waitFor, collector, freePort } from "./support.mjs";

const now = () => Math.floor(Date.now() / 1000);
const fast = { WebSocket, backoff: { base: 50, cap: 500 } };

function client(t, url, opts) {
  const c = new Crier(url, { ...fast, ...opts });
  t.after(() => c.close());
  return c;
}

async function node(t, opts) {
  const n = await Node.start(opts);
  t.after(() => n.stop());
  return n;
}

/** A WebSocket server speaking just enough crier for one scripted behaviour. */
async function fakeServer(t, onConnection) {
  const port = await freePort();
  const wss = new WebSocketServer({ port, host: "127.0.0.1", handleProtocols: (p) => (p.has("crier.v1") ? "crier.v1" : false) });
  await new Promise((r) => wss.once("listening", r));
  let n = 0;
  wss.on("connection", (ws) => {
    n++;
    const send = (f) => ws.send(JSON.stringify(f));
    send({ type: "welcome", client: `c${n}`, user: "u", node: "fake", ping_interval_ms: 25000 });
    onConnection(ws, send, n);
  });
  t.after(() => {
    for (const ws of wss.clients) ws.terminate();
    return new Promise((r) => wss.close(r));
  });
  return { url: `ws://127.0.0.1:${port}/ws`, connections: () => n, wss };
}

test("subscribe, receive, publish, presence, history, unsubscribe", async (t) => {
  const n = await node(t);
  const token = mint({ sub: "alice", channels: ["chat:*"], publish: ["chat:*"] });
  const c = client(t, n.wsUrl, { token });
  const states = [];
  c.on("state", (s) => states.push(s));
  const got = collector();
  const sub = c.subscribe("chat:lobby", got.handlers);
  const ack = await sub.ready;
  assert.equal(ack.channel, "chat:lobby");
  assert.equal(c.state, "connected");
  assert.deepEqual(states, ["connected"]);
  assert.equal(c.welcome.user, "alice");

  const r1 = await c.publish("chat:lobby", { text: "one" });
  assert.equal(r1.offset, ack.offset + 1);
  assert.equal(typeof r1.epoch, "string");
  await n.publish("chat:lobby", { text: "two" });
  await waitFor(() => got.messages.length === 2, "two messages");
  assert.deepEqual(got.messages.map((m) => m.data.text), ["one", "two"]);
  assert.deepEqual(got.messages.map((m) => m.offset), [r1.offset, r1.offset + 1]);
  assert.deepEqual(sub.position, { epoch: r1.epoch, offset: r1.offset + 1 });

  const who = await c.presence("chat:lobby");
  assert.equal(who.length, 1);
  assert.equal(who[0].user, "alice");
  assert.equal(who[0].client, c.welcome.client);

  const hist = await c.history("chat:lobby", { limit: 10 });
  assert.deepEqual(hist.map((m) => m.data.text), ["one", "two"]);
  const since = await c.history("chat:lobby", { since: { epoch: r1.epoch, offset: r1.offset } });
  assert.deepEqual(since.map((m) => m.data.text), ["two"]);

  sub.unsubscribe();
  await waitFor(async () => (await c.presence("chat:lobby")).length === 0, "presence empty after unsubscribe");
  await c.publish("chat:lobby", { text: "three" });
  // The reply to a later request proves the server has processed (and not sent) anything before it.
  await c.presence("chat:lobby");
  assert.equal(got.messages.length, 2);
  assert.equal(got.gaps.length, 0);
});

test("history larger than the connection's queue comes back whole (the client follows more/next)", async (t) => {
  const n = await node(t);
  const c = client(t, n.wsUrl, { token: mint({ sub: "carol", channels: ["big:*"] }) });
  for (let i = 0; i < 20; i++) await n.publish("big:h", String(i).padStart(5, "0") + "x".repeat(65000));
  const all = await c.history("big:h");
  assert.deepEqual(all.map((m) => m.offset), Array.from({ length: 20 }, (_, i) => i + 1));
  assert.ok(all.every((m, i) => m.data.startsWith(String(i).padStart(5, "0"))));
  const latest = await c.history("big:h", { limit: 12 });
  assert.deepEqual(latest.map((m) => m.offset), Array.from({ length: 12 }, (_, i) => i + 9));
});

test("errors reject with the contract's codes", async (t) => {
  const n = await node(t);
  const c = client(t, n.wsUrl, { token: mint({ sub: "bob", channels: ["chat:*"] }) });
  const denied = await c.publish("chat:lobby", { text: "no publish claim" }).then(
    () => null,
    (e) => e,
  );
  assert.ok(denied instanceof CrierError);
  assert.equal(denied.code, "forbidden");
  await assert.rejects(c.publish("not a channel!", 1), { code: "invalid_channel" });
  await assert.rejects(c.presence("secret:x"), { code: "forbidden" });

  const got = collector();
  const sub = c.subscribe("secret:x", got.handlers);
  await assert.rejects(sub.ready, { code: "forbidden" });
  assert.equal(got.errors[0].code, "forbidden");
  assert.throws(() => c.subscribe("chat:a") && c.subscribe("chat:a"), { code: "already_subscribed" });
  assert.equal(c.state, "connected");
});

test("publish with an idempotencyKey: a retry is acked with the first offset and delivered once", async (t) => {
  const n = await node(t);
  const c = client(t, n.wsUrl, { token: mint({ sub: "k", channels: ["chat:*"], publish: ["chat:*"] }) });
  const got = collector();
  await c.subscribe("chat:keyed", got.handlers).ready;
  const first = await c.publish("chat:keyed", "once", { idempotencyKey: "order-17" });
  const again = await c.publish("chat:keyed", "once", { idempotencyKey: "order-17" });
  assert.deepEqual(again, first);
  const last = await c.publish("chat:keyed", "last");
  assert.equal(last.offset, first.offset + 1);
  await waitFor(() => got.messages.length === 2, "two messages");
  assert.deepEqual(got.messages.map((m) => m.data), ["once", "last"]);
  await assert.rejects(c.publish("chat:keyed", 1, { idempotencyKey: "" }), { code: "bad_request" });
});

test("a request without a reply rejects with code timeout", async (t) => {
  const fake = await fakeServer(t, () => {});
  const c = client(t, fake.url, { requestTimeout: 200 });
  await assert.rejects(c.publish("chat:x", 1), { code: "timeout" });
  assert.equal(c.state, "connected");
});

test("requests made while disconnected are sent after welcome", async (t) => {
  const n = await node(t);
  const c = client(t, n.wsUrl, { token: mint({ sub: "q", channels: ["*"], publish: ["*"] }) });
  assert.equal(c.state, "connecting");
  const r = await c.publish("chat:queued", "early");
  assert.equal(r.offset, 1);
});

test("4003 (disconnected by the API) stops the client: no reconnect", async (t) => {
  const n = await node(t);
  const c = client(t, n.wsUrl, { token: mint({ sub: "carol", channels: ["*"] }) });
  const closes = [];
  c.on("close", (e) => closes.push(e));
  await waitFor(() => c.state === "connected", "connected");
  const r = await n.api("POST", "/api/v1/disconnect", { user: "carol" });
  assert.equal(r.body.disconnected, 1);
  await waitFor(() => c.state === "closed", "closed");
  assert.deepEqual(closes.map((e) => [e.code, e.reconnect]), [[4003, false]]);
  await assert.rejects(c.publish("x:y", 1), { code: "closed" });
  assert.equal(c.stats.reconnects, 0);
});

test("1008 stops the client, 1011 reconnects", async (t) => {
  for (const [code, stops] of [
    [1008, true],
    [1011, false],
  ]) {
    const fake = await fakeServer(t, (ws, send, i) => {
      if (i === 1) setTimeout(() => ws.close(code, "bye"), 20);
    });
    const c = client(t, fake.url, {});
    const closes = [];
    c.on("close", (e) => closes.push(e));
    await waitFor(() => closes.length === 1, `close ${code}`);
    assert.equal(closes[0].code, code);
    assert.equal(closes[0].reconnect, !stops);
    if (stops) {
      assert.equal(c.state, "closed");
      // An absence: give a reconnect (backoff ceiling 50 ms) ten times its chance to show up.
      await new Promise((r) => setTimeout(r, 500));
      assert.equal(fake.connections(), 1);
    } else {
      await waitFor(() => fake.connections() === 2 && c.state === "connected", "reconnected after 1011");
    }
    c.close();
  }
});

test("token expiry: getToken is called before exp and the connection continues", async (t) => {
  const n = await node(t);
  let calls = 0;
  const getToken = () => {
    calls++;
    // The first token expires in 3 s; later ones in an hour.
    return mint({ sub: "dave", channels: ["chat:*"], exp: now() + (calls === 1 ? 3 : 3600) });
  };
  const c = client(t, n.wsUrl, { getToken });
  const welcomes = [];
  c.on("welcome", (w) => welcomes.push(w));
  const got = collector();
  await c.subscribe("chat:exp", got.handlers).ready;
  const firstExp = now() + 3;
  await waitFor(() => calls >= 2, "getToken asked again before exp");
  // Past the first token's exp plus the server's up-to-1s expiry sweep, the connection lives.
  await waitFor(() => now() > firstExp + 1, "the first token's expiry", 10000);
  await n.publish("chat:exp", "after exp");
  await waitFor(() => got.messages.length === 1, "message after the first exp");
  assert.equal(welcomes.length, 1, "no reconnect");
  assert.equal(c.state, "connected");
  assert.equal(c.stats.reconnects, 0);
});

test("4001: getToken is asked on the close, the client reconnects and recovers", async (t) => {
  const n = await node(t);
  let calls = 0;
  const shortExp = now() + 2;
  // Two calls (connect, refresh) hand out the short token again, so the server closes with 4001.
  const getToken = () => {
    calls++;
    return mint({ sub: "erin", channels: ["chat:*"], exp: calls <= 2 ? shortExp : now() + 3600 });
  };
  const c = client(t, n.wsUrl, { getToken });
  const closes = [];
  c.on("close", (e) => closes.push(e.code));
  const got = collector();
  await c.subscribe("chat:4001", got.handlers).ready;
  await n.publish("chat:4001", 1);
  await waitFor(() => closes.includes(4001), "close 4001", 10000);
  await n.publish("chat:4001", 2); // may land while the client is away
  await waitFor(() => c.state === "connected" && got.messages.length === 2, "reconnected and recovered");
  await n.publish("chat:4001", 3);
  await waitFor(() => got.messages.length === 3, "live after recovery");
  assert.deepEqual(got.messages.map((m) => m.data), [1, 2, 3]);
  assert.equal(got.gaps.length, 0);
  assert.ok(calls >= 3, `getToken called ${calls} times`);
});

test("1009 (a frame over max_message_bytes): the publish rejects and the client stops (the table says stop)", async (t) => {
  const n = await node(t, { args: ["--max-message-bytes", "1024"] });
  const c = client(t, n.wsUrl, { token: mint({ sub: "big", channels: ["chat:*"], publish: ["chat:*"] }) });
  const closes = [];
  c.on("close", (e) => closes.push(e));
  const got = collector();
  await c.subscribe("chat:big", got.handlers).ready;
  const err = await c.publish("chat:big", "x".repeat(2000)).then(() => null, (e) => e);
  assert.equal(err.code, "disconnected");
  assert.equal(err.closeCode, 1009);
  assert.deepEqual(closes.map((e) => [e.code, e.reconnect]), [[1009, false]]);
  assert.equal(c.state, "closed");
  assert.equal(c.stats.reconnects, 0);
});

test("4001 without getToken stops the client", async (t) => {
  const n = await node(t);
  const c = client(t, n.wsUrl, { token: mint({ sub: "frank", channels: ["*"], exp: now() + 2 }) });
  const closes = [];
  c.on("close", (e) => closes.push(e));
  await waitFor(() => c.state === "closed", "closed after exp", 10000);
  assert.deepEqual(closes.map((e) => [e.code, e.reconnect]), [[4001, false]]);
});

test("a server replaying delivered messages does not make the client deliver them twice", async (t) => {
  const recovers = [];
  const fake = await fakeServer(t, (ws, send, i) => {
    ws.on("message", (raw) => {
      const f = JSON.parse(raw);
      if (f.type !== "subscribe") return;
      const msg = (o) => send({ type: "message", channel: f.channel, epoch: "e1", offset: o, data: `m${o}` });
      if (i === 1) {
        send({ type: "ack", id: f.id, channel: f.channel, epoch: "e1", offset: 0 });
        [1, 2, 3].forEach(msg);
        msg(2); // a duplicate inside one connection, too
        setTimeout(() => ws.close(1011, "boom"), 50);
      } else {
        recovers.push(f.recover);
        send({ type: "ack", id: f.id, channel: f.channel, epoch: "e1", offset: 5, recovered: true });
        [2, 3, 4, 5].forEach(msg); // replays 2 and 3, which the client already delivered
      }
    });
  });
  const c = client(t, fake.url, {});
  const got = collector();
  c.subscribe("chat:replay", got.handlers);
  await waitFor(() => got.messages.length >= 5, "five distinct messages");
  assert.deepEqual(recovers, [{ epoch: "e1", offset: 3 }]);
  assert.deepEqual(got.messages.map((m) => m.offset), [1, 2, 3, 4, 5]);
  assert.equal(c.stats.duplicates, 3);
  assert.equal(got.gaps.length, 0);
});

test("gap frame, recovered:false and a new epoch reach onGap", async (t) => {
  const fake = await fakeServer(t, (ws, send, i) => {
    ws.on("message", (raw) => {
      const f = JSON.parse(raw);
      if (f.type !== "subscribe") return;
      const msg = (e, o) => send({ type: "message", channel: f.channel, epoch: e, offset: o, data: o });
      if (i === 1) {
        send({ type: "ack", id: f.id, channel: f.channel, epoch: "e1", offset: 0 });
        msg("e1", 1);
        send({ type: "gap", channel: f.channel, epoch: "e1", offset: 10 });
        msg("e1", 11);
        msg("e2", 1); // the epoch changed without a word
        setTimeout(() => ws.close(1012, "restart"), 50);
      } else {
        send({ type: "ack", id: f.id, channel: f.channel, epoch: "e3", offset: 7, recovered: false });
        msg("e3", 8);
      }
    });
  });
  const c = client(t, fake.url, {});
  const got = collector();
  c.subscribe("chat:gaps", got.handlers);
  await waitFor(() => got.messages.length === 4, "four messages");
  assert.deepEqual(got.gaps.map((g) => [g.reason, g.epoch, g.offset, g.lastEpoch, g.lastOffset]), [
    ["gap", "e1", 10, "e1", 1],
    ["epoch_changed", "e2", 0, "e1", 11],
    ["recovered_false", "e3", 7, "e2", 1],
  ]);
  assert.deepEqual(got.messages.map((m) => `${m.epoch}:${m.offset}`), ["e1:1", "e1:11", "e2:1", "e3:8"]);
});

test("a silent connection is detected by the app-level ping and replaced", async (t) => {
  const pings = [];
  const fake = await fakeServer(t, (ws, send, i) => {
    ws.on("message", (raw) => {
      const f = JSON.parse(raw);
      if (f.type === "ping") {
        pings.push(i);
        if (i > 1) send({ type: "pong", id: f.id }); // the first connection never answers
      }
    });
  });
  const c = client(t, fake.url, { pingInterval: 100, pongTimeout: 200 });
  await waitFor(() => fake.connections() === 2 && c.state === "connected", "a second connection");
  await waitFor(() => pings.filter((i) => i === 2).length >= 2, "pings answered on the second");
  assert.equal(fake.connections(), 2, "answered pings keep the connection");
  assert.ok(pings.includes(1));
});

test("app-level pings against crier: answered, so a quiet connection stays up", async (t) => {
  const n = await node(t);
  let pings = 0;
  class CountingWebSocket extends WebSocket {
    send(data) {
      if (JSON.parse(data).type === "ping") pings++;
      super.send(data);
    }
  }
  const c = client(t, n.wsUrl, { token: mint({ sub: "pinger", channels: ["*"] }), WebSocket: CountingWebSocket, pingInterval: 50, pongTimeout: 300 });
  const welcomes = [];
  c.on("welcome", (w) => welcomes.push(w));
  // Unanswered, the first ping would drop the connection 300 ms later; ten pings is over 500 ms.
  await waitFor(() => pings >= 10, "ten pings");
  assert.equal(welcomes.length, 1);
  assert.equal(c.stats.reconnects, 0);
  assert.equal(c.state, "connected");
});

test("a server that accepts TCP but never answers the upgrade is abandoned after connectTimeout", async (t) => {
  const sockets = [];
  const tarpit = createServer((s) => sockets.push(s)); // holds every connection, says nothing
  await new Promise((r) => tarpit.listen(0, "127.0.0.1", r));
  t.after(() => {
    sockets.forEach((s) => s.destroy());
    return new Promise((r) => tarpit.close(r));
  });
  const c = client(t, `ws://127.0.0.1:${tarpit.address().port}/ws`, { connectTimeout: 150 });
  const closes = [];
  c.on("close", (e) => closes.push(e));
  await waitFor(() => sockets.length >= 3, "three attempts");
  assert.ok(closes.length >= 2);
  assert.deepEqual([...new Set(closes.map((e) => [e.code, e.reconnect].join()))], ["4000,true"]);
});

test("backoff: full jitter, growing ceilings (measured on the reconnect attempts)", async (t) => {
  const port = await freePort(); // nothing listens: every attempt fails at once
  const base = 20;
  const cap = 1280;
  const c = client(t, `ws://127.0.0.1:${port}/ws`, { backoff: { base, cap } });
  const attempts = [];
  const draws = [];
  c.on("state", (s) => s === "connecting" && attempts.push(performance.now()));
  c.on("reconnect", (r) => draws.push(r));
  attempts.push(performance.now());
  await waitFor(() => attempts.length >= 11, "eleven connection attempts", 30000);
  c.close();
  const gaps = attempts.slice(1, 11).map((a, i) => a - attempts[i]);
  const ceilings = gaps.map((_, i) => Math.min(cap, base * 2 ** i));
  assert.deepEqual(draws.slice(0, 10).map((d) => d.ceiling), ceilings);
  for (let i = 0; i < 10; i++) {
    assert.ok(draws[i].delay >= 0 && draws[i].delay < ceilings[i], `draw ${i} within [0, ceiling)`);
    // The measured gap is the drawn delay plus a failed connect (a few ms on loopback).
    assert.ok(gaps[i] >= draws[i].delay - 2, `gap ${i} ${gaps[i]} >= delay ${draws[i].delay}`);
    assert.ok(gaps[i] <= ceilings[i] + 250, `gap ${i} ${gaps[i]} <= ceiling ${ceilings[i]} + slack`);
  }
  const early = gaps.slice(0, 4).reduce((a, b) => a + b, 0);
  const late = gaps.slice(6).reduce((a, b) => a + b, 0);
  assert.ok(late > early, `later attempts wait longer: ${late.toFixed(0)} ms vs ${early.toFixed(0)} ms`);
  const ratios = draws.slice(0, 10).map((d) => d.delay / d.ceiling);
  const spread = Math.max(...ratios) - Math.min(...ratios);
  assert.ok(spread > 0.2, `jitter: delay/ceiling ratios spread ${spread.toFixed(2)}`);
});

test("memory broker: a restarted node has a new epoch, and the client says so through onGap", async (t) => {
  const n = await node(t);
  const c = client(t, n.wsUrl, { token: mint({ sub: "gina", channels: ["*"] }) });
  const got = collector();
  await c.subscribe("chat:mem", got.handlers).ready;
  await n.publish("chat:mem", "before");
  await waitFor(() => got.messages.length === 1, "first message");
  await n.restart();
  await waitFor(() => got.gaps.length === 1 && c.state === "connected", "gap after restart");
  assert.equal(got.gaps[0].reason, "recovered_false");
  assert.notEqual(got.gaps[0].epoch, got.messages[0].epoch);
  await n.publish("chat:mem", "after");
  await waitFor(() => got.messages.length === 2, "live after restart");
  assert.equal(got.messages[1].data, "after");
});

test("examples/node.mjs (the README's Node example) works against crier", async (t) => {
  const n = await node(t);
  const token = mint({ sub: "example", channels: ["chat:*"], publish: ["chat:*"] });
  const script = fileURLToPath(new URL("../examples/node.mjs", import.meta.url));
  const child = spawn(process.execPath, [script, n.wsUrl, "chat:example"], { env: { ...process.env, CRIER_TOKEN: token }, stdio: ["ignore", "pipe", "pipe"] });
  t.after(() => child.kill("SIGKILL"));
  let out = "";
  child.stdout.on("data", (d) => (out += d));
  child.stderr.on("data", (d) => (out += d));
  await waitFor(() => out.includes("published as #1") && out.includes("chat:example #1:") && out.includes("here now:"), `the example's output:\n${out}`);
  await n.publish("chat:example", { text: "from the API" });
  await waitFor(() => out.includes('chat:example #2: {"text":"from the API"}'), "the example prints a published message");
});

test("join/leave events and presenceStats (a --dev node: the chat namespace has join_leave)", async (t) => {
  const n = await node(t, { args: ["--dev"] });
  const alice = client(t, n.wsUrl, { token: mint({ sub: "alice", channels: ["chat:*"] }) });
  const joins = [];
  const leaves = [];
  const sub = alice.subscribe("chat:room", { onJoin: (e) => joins.push(e), onLeave: (e) => leaves.push(e) });
  await sub.ready;
  const bob = client(t, n.wsUrl, { token: mint({ sub: "bob", channels: ["chat:*"] }) });
  const own = [];
  const bobSub = bob.subscribe("chat:room", { onJoin: (e) => own.push(e) });
  await bobSub.ready;
  await waitFor(() => joins.length === 1, "alice hears bob join");
  assert.equal(joins[0].user, "bob");
  assert.equal(joins[0].channel, "chat:room");
  assert.equal(joins[0].client, bob.welcome.client);
  assert.deepEqual(await alice.presenceStats("chat:room"), { clients: 2, users: 2 });
  bob.close();
  await waitFor(() => leaves.length === 1, "alice hears bob leave");
  assert.equal(leaves[0].user, "bob");
  assert.deepEqual(own, [], "bob was not told of his own join");
  assert.deepEqual(await alice.presenceStats("chat:room"), { clients: 1, users: 1 });
  await assert.rejects(alice.presenceStats("secret:x"), { code: "forbidden" });
});
