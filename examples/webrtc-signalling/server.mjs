// The WebRTC signalling example's web server: serves the page and mints the crier tokens.
// Node >= 20, no dependencies. It never sees a signalling message: those go through crier.
//
//   CRIER_JWT_SECRET=<the secret crier was started with> node server.mjs
//
// Environment: PORT (default 8090), HOST (default 127.0.0.1), CRIER_URL (crier's HTTP base,
// default http://127.0.0.1:8080), CRIER_JWT_SECRET (required, the HS256 secret crier verifies).
//
// Demo only: /token hands a token to anyone who asks for any name. A real application mints
// the token after authenticating the user (session cookie, OAuth, ...), with the user's own id.

import { createServer } from "node:http";
import { createHmac } from "node:crypto";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const PORT = Number(process.env.PORT ?? 8090);
const HOST = process.env.HOST ?? "127.0.0.1";
const CRIER_URL = (process.env.CRIER_URL ?? "http://127.0.0.1:8080").replace(/\/$/, "");
const SECRET = process.env.CRIER_JWT_SECRET;
const TOKEN_TTL = Number(process.env.TOKEN_TTL_SECONDS ?? 3600);
if (!SECRET) {
  console.error("CRIER_JWT_SECRET is required (the secret crier was started with: crier --jwt-secret ...)");
  process.exit(2);
}

const NAME = /^[A-Za-z0-9_-]{1,32}$/;

/** HS256 JWT: sub = the user; may publish only to the peer's personal channel. Subscribing to
 * the user's own `user:<sub>` needs no claim (crier always allows it). */
function mint(user, peer) {
  const b64 = (v) => Buffer.from(JSON.stringify(v)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  const head = b64({ alg: "HS256", typ: "JWT" });
  const body = b64({ sub: user, iat: now, exp: now + TOKEN_TTL, publish: [`user:${peer}`] });
  const sig = createHmac("sha256", SECRET).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${sig}`;
}

function send(res, status, type, body) {
  res.writeHead(status, { "Content-Type": type, "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff" });
  res.end(body);
}

const page = () => readFileSync(join(here, "index.html"), "utf8");

const server = createServer((req, res) => {
  const url = new URL(req.url, `http://${req.headers.host ?? "localhost"}`);
  if (req.method !== "GET") return send(res, 405, "text/plain", "method not allowed");
  switch (url.pathname) {
    case "/":
    case "/index.html":
      return send(res, 200, "text/html; charset=utf-8", page());
    case "/config":
      return send(res, 200, "application/json", JSON.stringify({ crier: CRIER_URL, ws: CRIER_URL.replace(/^http/, "ws") + "/ws" }));
    case "/token": {
      const user = url.searchParams.get("user") ?? "";
      const peer = url.searchParams.get("peer") ?? "";
      if (!NAME.test(user) || !NAME.test(peer)) return send(res, 400, "application/json", JSON.stringify({ error: "user and peer: 1-32 of A-Z a-z 0-9 _ -" }));
      return send(res, 200, "application/json", JSON.stringify({ token: mint(user, peer) }));
    }
    default:
      return send(res, 404, "text/plain", "not found");
  }
});

server.listen(PORT, HOST, () => {
  const { port } = server.address();
  console.log(`webrtc-signalling example on http://${HOST}:${port}/ (crier at ${CRIER_URL})`);
  console.log(`  open http://${HOST}:${port}/?me=alice&peer=bob  and  http://${HOST}:${port}/?me=bob&peer=alice`);
});
