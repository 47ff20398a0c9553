// Test harness: the real `crier` binary and real `redis-server` processes on free ports, JWTs
// minted with node:crypto, and deadline-bounded waits (never a fixed sleep to synchronise).

import { spawn, execFileSync } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { createServer, connect } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../..");
export const SECRET = "js-test-secret-js-test-secret-0123456789abcdef";
export const API_KEY = "js-test-api-key";
/** Longest any single wait may take before the test fails. */
export const WAIT = 15000;

const children = new Set();
process.on("exit", () => {
  for (const c of children) {
    try {
      c.kill("SIGKILL");
    } catch {
      /* gone */
    }
  }
});

/** The crier binary: $CRIER_BIN, else target/debug/crier (built with cargo when missing). */
export function crierBin() {
  if (process.env.CRIER_BIN) return resolve(process.env.CRIER_BIN);
  const bin = join(ROOT, "target", "debug", "crier");
  if (!existsSync(bin)) execFileSync("cargo", ["build", "-q", "-p", "crier"], { cwd: ROOT, stdio: "inherit" });
  return bin;
}

export function freePort() {
  return new Promise((res, rej) => {
    const s = createServer();
    s.once("error", rej);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
  });
}

export async function waitFor(fn, what, timeout = WAIT) {
  const deadline = Date.now() + timeout;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

function b64url(buf) {
  return Buffer.from(buf).toString("base64url");
}

/** An HS256 JWT. `exp` defaults to an hour from now. */
export function mint(claims, secret = SECRET) {
  const now = Math.floor(Date.now() / 1000);
  const body = { exp: now + 3600, ...claims };
  const head = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const payload = b64url(JSON.stringify(body));
  const sig = createHmac("sha256", secret).update(`${head}.${payload}`).digest("base64url");
  return `${head}.${payload}.${sig}`;
}

/** A crier node. `port` 0 picks a free one; restart() brings it back on the same port. */
export class Node {
  constructor(args, env) {
    this.args = args;
    this.env = env;
    this.port = 0;
    this.proc = null;
    this.stdout = "";
    this.stderr = "";
  }

  static async start({ args = [], env = {}, port = 0, base = true } = {}) {
    const n = new Node(args, env);
    n.base = base;
    n.port = port;
    await n.#spawn();
    return n;
  }

  async #spawn() {
    const args = [
      "--listen",
      `127.0.0.1:${this.port}`,
      ...(this.base ? ["--jwt-secret", SECRET, "--api-keys", API_KEY, "--shutdown-drain", "300ms"] : []),
      ...this.args,
    ];
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("CRIER_")));
    Object.assign(env, this.env);
    const proc = spawn(crierBin(), args, { env, stdio: ["ignore", "pipe", "pipe"] });
    children.add(proc);
    this.proc = proc;
    this.stdout = "";
    proc.stderr.on("data", (d) => (this.stderr += d));
    const addr = await new Promise((res, rej) => {
      const timer = setTimeout(() => rej(new Error(`crier did not listen within ${WAIT} ms\n${this.stdout}\n${this.stderr}`)), WAIT);
      proc.stdout.on("data", (d) => {
        this.stdout += d;
        const m = /crier listening on http:\/\/(\S+)/.exec(this.stdout);
        if (m) {
          clearTimeout(timer);
          res(m[1]);
        }
      });
      proc.once("exit", (code) => {
        clearTimeout(timer);
        rej(new Error(`crier exited (${code}) before listening\n${this.stdout}\n${this.stderr}`));
      });
    });
    this.port = Number(addr.split(":").pop());
    this.addr = addr;
  }

  get wsUrl() {
    return `ws://127.0.0.1:${this.port}/ws`;
  }
  url(path) {
    return `http://127.0.0.1:${this.port}${path}`;
  }

  /** SIGKILL: no drain, no goodbye; resolves once the process is gone. */
  async kill(signal = "SIGKILL") {
    const p = this.proc;
    if (!p || p.exitCode !== null || p.signalCode !== null) return;
    const gone = new Promise((r) => p.once("exit", r));
    p.kill(signal);
    await gone;
    children.delete(p);
  }

  /** Starts the same node again on the same port. */
  async restart() {
    await this.kill();
    const deadline = Date.now() + WAIT;
    for (;;) {
      try {
        await this.#spawn();
        return;
      } catch (e) {
        if (Date.now() > deadline) throw e;
        await new Promise((r) => setTimeout(r, 100));
      }
    }
  }

  async stop() {
    await this.kill();
  }

  /** REST publish; resolves the parsed JSON (throws on a non-200). */
  async publish(channel, data) {
    const r = await fetch(this.url("/api/v1/publish"), {
      method: "POST",
      headers: { Authorization: `Bearer ${API_KEY}`, "Content-Type": "application/json" },
      body: JSON.stringify({ channel, data }),
    });
    const body = await r.json();
    if (r.status !== 200) throw new Error(`publish ${r.status} ${JSON.stringify(body)}`);
    return body;
  }

  async api(method, path, body) {
    const r = await fetch(this.url(path), {
      method,
      headers: { Authorization: `Bearer ${API_KEY}`, "Content-Type": "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    return { status: r.status, body: await r.json() };
  }
}

/** A real redis-server on a free port (never 6379), no persistence, in a temp dir. */
export class Redis {
  static async start() {
    const r = new Redis();
    r.port = await freePort();
    r.dir = mkdtempSync(join(tmpdir(), "crier-js-redis-"));
    r.proc = spawn("redis-server", ["--port", String(r.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", r.dir], {
      stdio: "ignore",
    });
    children.add(r.proc);
    await waitFor(() => r.ping(), `redis-server on ${r.port}`);
    return r;
  }
  get url() {
    return `redis://127.0.0.1:${this.port}/0`;
  }
  ping() {
    return new Promise((res) => {
      const s = connect(this.port, "127.0.0.1");
      let buf = "";
      s.on("data", (d) => {
        buf += d;
        if (buf.includes("\r\n")) {
          s.destroy();
          res(buf.startsWith("+PONG"));
        }
      });
      s.on("error", () => res(false));
      s.write("PING\r\n");
    });
  }
  async stop() {
    if (this.proc.exitCode === null && this.proc.signalCode === null) {
      const gone = new Promise((r) => this.proc.once("exit", r));
      this.proc.kill("SIGKILL");
      await gone;
    }
    children.delete(this.proc);
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** Collects a subscription's messages and gaps. */
export function collector() {
  const c = { messages: [], gaps: [], errors: [] };
  c.handlers = {
    onMessage: (m) => c.messages.push(m),
    onGap: (g) => c.gaps.push(g),
    onError: (e) => c.errors.push(e),
  };
  return c;
}
