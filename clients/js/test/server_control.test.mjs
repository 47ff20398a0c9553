// Subscriptions the server makes (REST `subscribe`, the token's `subs` claim) as the JavaScript
// client sees them, against the real crier binary: the "subscription" event, messages, recovery
// across a reconnect (the client takes the server's subscription over from its position), and
// the server's `unsubscribe`.

import { test } from "node:test";
import assert from "node:assert/strict";
import WebSocket from "ws";
import { Crier } from "../src/index.js";
import { Node, mint, waitFor, collector } from "./support.mjs";

const now = () => Math.floor(Date.now() / 1000);

test("server subscriptions surface as Subscription objects and recover across a reconnect", async (t) => {
  const n = await Node.start();
  t.after(() => n.stop());
  // "feed" is not in the token's patterns: only the `subs` claim grants it.
  const getToken = async () => mint({ sub: "srv", iat: now(), subs: ["feed"] });
  // While `open` is false, connection attempts go to a closed port: the client stays away
  // until the test lets it back, so the messages published meanwhile must be recovered.
  let open = true;
  class Gated extends WebSocket {
    constructor(url, protocols) {
      super(open ? url : url.replace(/:\d+\//, ":1/"), protocols);
    }
  }
  const c = new Crier(n.wsUrl, { WebSocket: Gated, getToken, backoff: { base: 50, cap: 200 } });
  t.after(() => c.close());
  const got = collector();
  const subs = [];
  c.on("subscription", (sub) => {
    subs.push(sub);
    if (sub.channel === "feed") sub.setHandlers(got.handlers);
  });
  await waitFor(() => subs.length === 1, "the subs claim's subscription");
  assert.equal(subs[0].channel, "feed");
  assert.equal(subs[0].server, true);
  await n.publish("feed", 1);
  await n.publish("feed", 2);
  await waitFor(() => got.messages.length === 2, "two messages");

  // The server sends the client away (reconnect); messages published meanwhile are recovered.
  const closes = [];
  c.on("close", (info) => closes.push(info));
  open = false;
  const r = await n.api("POST", "/api/v1/disconnect", { user: "srv", code: 1012 });
  assert.deepEqual([r.status, r.body], [200, { disconnected: 1 }]);
  await waitFor(() => closes.length >= 1, "the 1012 close");
  await n.publish("feed", 3);
  await n.publish("feed", 4);
  open = true;
  await waitFor(() => c.state === "connected", "the reconnect");
  await n.publish("feed", 5);
  await waitFor(() => got.messages.length >= 5, "five messages");
  assert.deepEqual(got.messages.map((m) => m.data), [1, 2, 3, 4, 5], "each once, in order");
  assert.deepEqual(got.gaps, []);
  assert.equal(closes[0].code, 1012);
  assert.equal(subs.length, 1, "the same Subscription across the reconnect");
  assert.equal(subs[0].active, true);

  // A REST subscribe and unsubscribe.
  const team = collector();
  c.on("subscription", (sub) => {
    if (sub.channel === "team:1") sub.setHandlers(team.handlers);
  });
  const s = await n.api("POST", "/api/v1/subscribe", { user: "srv", channel: "team:1" });
  assert.equal(s.status, 200);
  await waitFor(() => subs.length === 2, "the REST subscription");
  await n.publish("team:1", "hi");
  await waitFor(() => team.messages.length === 1, "a message on the REST subscription");
  const u = await n.api("POST", "/api/v1/unsubscribe", { user: "srv", channel: "team:1" });
  assert.equal(u.status, 200);
  await waitFor(() => team.errors.length === 1, "the server's unsubscribe");
  assert.equal(team.errors[0].code, "unsubscribed");
});
