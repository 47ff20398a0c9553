// crier-client against two real crier nodes sharing a real redis-server: a node is killed and
// restarted on the same port while a publisher on the other node keeps going; the subscriber
// reconnects, recovers, and delivers every acknowledged message exactly once, in order.

import { test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { Crier } from "../src/index.js";
import { Node, Redis, mint, waitFor, collector } from "./support.mjs";

const nodeArgs = ["--user-rate", "1000", "--user-burst", "1000", "--history-size", "5000"];

test("node killed and restarted: every acknowledged message exactly once, in order", async (t) => {
  const redis = await Redis.start();
  t.after(() => redis.stop());
  const env = { CRIER_REDIS_URL: redis.url };
  const n1 = await Node.start({ args: [...nodeArgs, "--node-id", "js-n1"], env });
  t.after(() => n1.stop());
  const n2 = await Node.start({ args: [...nodeArgs, "--node-id", "js-n2"], env });
  t.after(() => n2.stop());

  const opts = { WebSocket, backoff: { base: 100, cap: 1000 } };
  const sub = new Crier(n1.wsUrl, { ...opts, token: mint({ sub: "reader", channels: ["room:*"] }) });
  t.after(() => sub.close());
  const pub = new Crier(n2.wsUrl, { ...opts, token: mint({ sub: "writer", channels: ["room:*"], publish: ["room:*"] }) });
  t.after(() => pub.close());
  const closes = [];
  sub.on("close", (e) => closes.push(e.code));
  const welcomes = [];
  sub.on("welcome", (w) => welcomes.push(w.node));

  const got = collector();
  const s = sub.subscribe("room:restart", got.handlers);
  await s.ready;

  const acked = [];
  let stop = false;
  let publishErrors = 0;
  const publisher = (async () => {
    for (let i = 0; !stop; i++) {
      try {
        const r = await pub.publish("room:restart", { i });
        acked.push({ i, offset: r.offset, epoch: r.epoch });
      } catch {
        publishErrors++; // not acknowledged: not promised
      }
      await new Promise((r) => setTimeout(r, 5)); // a steady stream, not a flood
    }
  })();

  await waitFor(() => got.messages.length >= 30, "30 messages before the kill");
  await n1.kill();
  const atKill = acked.length;
  await waitFor(() => sub.state !== "connected", "the subscriber noticed");
  await waitFor(() => acked.length >= atKill + 30, "30 more acknowledged while the node is down");
  await n1.restart();
  const restartedAt = performance.now();
  const atRestart = acked.length;
  await waitFor(() => sub.state === "connected", "reconnected to the restarted node");
  const reconnectMs = performance.now() - restartedAt;
  await waitFor(() => acked.length >= atRestart + 30, "30 more after the restart");
  stop = true;
  await publisher;

  const last = acked[acked.length - 1];
  await waitFor(() => got.messages.length >= acked.length && sub.stats && s.position?.offset === last.offset, "every acknowledged message delivered");
  assert.equal(publishErrors, 0);
  assert.ok(atRestart - atKill >= 30, "messages were published while the node was down");
  assert.equal(got.gaps.length, 0, JSON.stringify(got.gaps));
  assert.deepEqual(
    got.messages.map((m) => m.data.i),
    acked.map((a) => a.i),
    "exactly the acknowledged messages, once each, in publish order",
  );
  assert.deepEqual(got.messages.map((m) => m.offset), acked.map((a) => a.offset));
  assert.ok(closes.length >= 1);
  assert.deepEqual([...new Set(welcomes)], ["js-n1"]);
  assert.ok(welcomes.length >= 2, "a second welcome from the restarted node");
  t.diagnostic(
    `acknowledged ${acked.length} (${atRestart - atKill} while the node was down), delivered ${got.messages.length}, ` +
      `duplicates dropped ${sub.stats.duplicates}, reconnect attempts ${sub.stats.reconnects}, connected ${reconnectMs.toFixed(0)} ms after the node listened again`,
  );
});
