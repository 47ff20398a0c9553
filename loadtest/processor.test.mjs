// The artillery processor without artillery: the WebSocket URL it builds from each form of
// LOADTEST_WS_TARGETS, and the handshake it prepares (URL + subprotocols with a minted token)
// accepted by a real crier node (101), for a target given with and without the `/ws` path.
// Run: node --test loadtest/ (scripts/test runs it; CRIER_BIN or target/debug/crier).

import { test, after } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { request } from "node:http";
import { Node, SECRET } from "../clients/js/test/support.mjs";
import processor from "./processor.js";

const { wsUrl, connectWithToken } = processor;

test("wsUrl appends /ws to a node's address, never a second one", () => {
  const cases = [
    ["ws://127.0.0.1:8080", "ws://127.0.0.1:8080/ws"],
    ["ws://127.0.0.1:8080/", "ws://127.0.0.1:8080/ws"],
    ["ws://127.0.0.1:8080/ws", "ws://127.0.0.1:8080/ws"],
    ["ws://127.0.0.1:8080/ws/", "ws://127.0.0.1:8080/ws"],
    [" wss://rt.example.com/ws ", "wss://rt.example.com/ws"],
    ["wss://example.com/realtime", "wss://example.com/realtime/ws"],
    ["wss://example.com/realtime/ws", "wss://example.com/realtime/ws"],
  ];
  for (const [target, want] of cases) assert.equal(wsUrl(target), want, target);
});

function prepare(targets) {
  process.env.LOADTEST_WS_TARGETS = targets;
  process.env.LOADTEST_JWT_SECRET = SECRET;
  const wsArgs = { target: "ws://unused.invalid" };
  const context = { vars: {} };
  return new Promise((res, rej) => connectWithToken(wsArgs, context, (err) => (err ? rej(err) : res(wsArgs))));
}

/** A WebSocket handshake to `url` with `protocols`: resolves to the status (101 on success). */
function handshake(url, protocols) {
  const u = new URL(url.replace(/^ws/, "http"));
  return new Promise((res, rej) => {
    const req = request({
      host: u.hostname, port: u.port, path: u.pathname, timeout: 10_000,
      headers: {
        Connection: "Upgrade", Upgrade: "websocket", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": randomBytes(16).toString("base64"), "Sec-WebSocket-Protocol": protocols.join(", "),
      },
    });
    req.on("upgrade", (r, socket) => {
      socket.destroy();
      res({ status: r.statusCode, protocol: r.headers["sec-websocket-protocol"] });
    });
    req.on("response", (r) => {
      r.resume();
      res({ status: r.statusCode });
    });
    req.on("timeout", () => req.destroy(new Error("handshake timed out")));
    req.on("error", rej);
    req.end();
  });
}

test("the prepared handshake is accepted by crier, with or without /ws in LOADTEST_WS_TARGETS", async () => {
  const node = await Node.start();
  after(() => node.stop());
  const addr = `ws://127.0.0.1:${node.port}`;
  for (const targets of [addr, `${addr}/`, `${addr}/ws`, `${addr}/ws,${addr}`]) {
    const wsArgs = await prepare(targets);
    assert.equal(wsArgs.target, `${addr}/ws`, targets);
    assert.equal(wsArgs.subprotocols[0], "crier.v1");
    assert.match(wsArgs.subprotocols[1], /^crier\.bearer\./);
    const r = await handshake(wsArgs.target, wsArgs.subprotocols);
    assert.deepEqual(r, { status: 101, protocol: "crier.v1" }, `${targets} -> ${wsArgs.target}`);
  }
});
