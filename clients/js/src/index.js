// crier-client: the JavaScript client of crier (https://example.invalid/crier), for browsers and
// Node >= 20. One ES module, no dependencies. The API is crier's client API (docs/protocol.md,
// *Client libraries*); see README.md for the decisions this file makes where the contract is
// silent.
//
// What it does for the application:
// - connects on construction and takes every close decision from the server's close-code table
//   (CLOSE_ACTIONS below, generated from crier's CLOSE_CODES): stop, refresh the token, reconnect
//   now, after a jittered delay or with full-jitter exponential backoff (codes not in the table);
// - a refused handshake (HTTP 401/403, seen in Node) asks getToken once, else the client stops
//   in state "failed" with the reason; where the status is hidden (browsers), `failAfter`
//   consecutive failures before the socket opens end in "failed" with a hint;
// - remembers, per subscription, the position (epoch, offset) of the last message it delivered,
//   and resubscribes with `recover` from it, dropping anything at or below it: the app sees each
//   message once, in order, across reconnects, or is told through onGap;
// - refreshes the token before `exp` (the `refresh` frame) and after a 4001 close;
// - sends `{"type":"ping"}` when it has heard nothing for a while and drops a silent connection;
// - turns publish/presence/history into promises that reject with a CrierError whose `.code` is
//   the server's error code (or one of the client's own: timeout, disconnected, closed);
// - surfaces subscriptions the server makes (REST `subscribe`, the token's `subs` claim) as
//   Subscription objects (the "subscription" event) and recovers them after a reconnect from
//   the last position delivered (a `subscribe` with `recover` takes the server's one over).

/** What to do after each close code crier sends; codes not listed reconnect with backoff. */
// generated from CLOSE_CODES (crates/crier-protocol/src/codes.rs, `js_close_actions`); the test
// crates/crier/tests/client_js.rs fails when this block and the table differ.
export const CLOSE_ACTIONS = Object.freeze({
  1000: "stop", // normal
  1001: "reconnect_now", // going_away
  1002: "stop", // protocol_error
  1007: "stop", // invalid_payload
  1008: "stop", // policy
  1009: "stop", // too_big
  1011: "reconnect_with_backoff", // internal
  1012: "reconnect_after_jitter", // restart
  4001: "refresh_token", // token_expired
  4003: "stop", // disconnected
  4008: "reconnect_with_backoff", // rate_limited
  4009: "reconnect_with_backoff", // slow_consumer
  4010: "reconnect_with_backoff", // heartbeat_timeout
});
// end generated
/** Close code the client reports for a refused handshake (the socket never opened). */
const ABNORMAL = 1006;
/** Error codes of a subscribe that are worth retrying on the same connection. */
const TRANSIENT_CODES = new Set(["rate_limited", "unavailable", "internal"]);
/** Longest delay setTimeout accepts. */
const MAX_TIMER = 2 ** 31 - 1;
/** Client-side close code for a connection the client gives up on (no welcome, no pong). */
const CLIENT_ABORT = 4000;

const DEFAULTS = {
  backoff: { base: 500, cap: 20000 },
  requestTimeout: 10000,
  connectTimeout: 10000,
  pingInterval: null, // null: the server's ping_interval_ms from welcome (25 s by default)
  pongTimeout: 10000,
  refreshMargin: 30000,
  resetBackoffAfter: 5000,
  failAfter: 10, // consecutive failures before open with no HTTP status known (browsers) -> "failed"
};

/** An error reported by crier (`code` is the contract's error code) or by the client itself. */
export class CrierError extends Error {
  constructor(code, message, details) {
    super(message || code);
    this.name = "CrierError";
    this.code = code;
    if (details) Object.assign(this, details);
  }
}

/** The `exp` claim of a JWT, in seconds, or null when it cannot be read. */
export function tokenExpiry(token) {
  if (typeof token !== "string") return null;
  const part = token.split(".")[1];
  if (!part) return null;
  try {
    const b64 = part.replace(/-/g, "+").replace(/_/g, "/").padEnd(Math.ceil(part.length / 4) * 4, "=");
    const claims = JSON.parse(atob(b64));
    return typeof claims.exp === "number" ? claims.exp : null;
  } catch {
    return null;
  }
}

const internals = new WeakMap();

/** One channel subscription. Created by `crier.subscribe`; survives reconnects. */
export class Subscription {
  constructor(rec) {
    internals.set(this, rec);
    this.channel = rec.channel;
  }
  /** The position of the last message delivered (or the subscribe ack's), or null before it. */
  get position() {
    const rec = internals.get(this);
    return rec.epoch === null ? null : { epoch: rec.epoch, offset: rec.offset };
  }
  /** True while the server has acknowledged this subscription on the current connection. */
  get active() {
    return internals.get(this).active;
  }
  /** Resolves with the first subscribe ack ({channel, epoch, offset, recovered?}); rejects
   * with the CrierError when the server refuses the subscription. Created lazily so that an
   * unobserved refusal does not become an unhandled rejection. */
  get ready() {
    const rec = internals.get(this);
    if (!rec.ready) {
      rec.ready = new Promise((resolve, reject) => {
        if (rec.firstAck) resolve(rec.firstAck);
        else if (rec.error) reject(rec.error);
        else rec.waiters.push({ resolve, reject });
      });
    }
    return rec.ready;
  }
  /** True when the server made this subscription (REST `subscribe`, the token's `subs`). */
  get server() {
    return internals.get(this).server;
  }
  /** Sets (merges) the handlers {onMessage, onGap, onSubscribed, onError}: for subscriptions
   * the server made, call it from the "subscription" event, before any message arrives. */
  setHandlers(handlers) {
    Object.assign(internals.get(this).handlers, handlers);
    return this;
  }
  /** Stops the subscription: no more messages, the server is told when connected. */
  unsubscribe() {
    const rec = internals.get(this);
    rec.crier._unsubscribe(rec);
  }
}

export class Crier {
  #url;
  #opts;
  #WS;
  #token;
  #listeners = new Map();
  #state = "connecting";
  #closed = false;
  #ws = null;
  #gen = 0;
  #welcome = null;
  #welcomed = false;
  #connectedAt = 0;
  #attempt = 0;
  #failedBeforeWelcome = 0;
  #refreshedAfterRefusal = false;
  #unexplainedFailures = 0;
  #failure = null;
  #nextId = 1;
  #pending = new Map(); // id -> request
  #subAcks = new Map(); // subscribe id -> rec
  #ignoreIds = new Set(); // unsubscribe ids whose replies nobody waits for
  #subs = new Map(); // channel -> rec
  #timers = { reconnect: null, connect: null, tick: null, refresh: null };
  #lastHeard = 0;
  #pingSentAt = null;
  #pingInterval = 25000;
  #stats = { duplicates: 0, reconnects: 0 };

  /**
   * @param {string} url  the WebSocket endpoint, e.g. "wss://rt.example.com/ws"
   * @param {object} [options]  see index.d.ts (token, getToken, WebSocket, backoff, ...)
   */
  constructor(url, options = {}) {
    this.#url = url;
    this.#opts = { ...DEFAULTS, ...options, backoff: { ...DEFAULTS.backoff, ...(options.backoff || {}) } };
    this.#WS = options.WebSocket || globalThis.WebSocket;
    if (typeof this.#WS !== "function") {
      throw new TypeError("crier-client: no WebSocket implementation (in Node 20 pass { WebSocket } from the `ws` package)");
    }
    this.#token = options.token || null;
    this.#random = options.random || Math.random;
    this.#open();
  }

  #random;

  /** "connecting" | "connected" | "disconnected" | "closed" | "failed" */
  get state() {
    return this.#state;
  }

  /** Why the client is "failed": { status, reason } (status null where the browser hides it). */
  get failure() {
    return this.#failure;
  }
  /** The last `welcome` frame ({client, user, node, ping_interval_ms}), or null. */
  get welcome() {
    return this.#welcome;
  }
  /** Counters: duplicates dropped (messages at or below a delivered position), reconnects. */
  get stats() {
    return { ...this.#stats };
  }

  /** Adds a listener; returns a function that removes it. Events: state, welcome, close,
   * reconnect, error (see index.d.ts). */
  on(event, fn) {
    if (!this.#listeners.has(event)) this.#listeners.set(event, new Set());
    this.#listeners.get(event).add(fn);
    return () => this.off(event, fn);
  }
  off(event, fn) {
    this.#listeners.get(event)?.delete(fn);
  }

  /**
   * Subscribes to a channel. handlers: {onMessage, onGap, onSubscribed, onError, onJoin, onLeave,
   * since}. onJoin/onLeave get {channel, client, user, node} on channels whose namespace has
   * join_leave (never for this connection's own join).
   */
  subscribe(channel, handlers = {}) {
    if (this.#closed) throw new CrierError("closed", "the client is closed");
    if (this.#subs.has(channel)) throw new CrierError("already_subscribed", `already subscribed to ${channel}`);
    const rec = this.#newRec(channel, handlers);
    const sub = new Subscription(rec);
    this.#subs.set(channel, rec);
    if (this.#welcomed) this.#sendSubscribe(rec);
    return sub;
  }

  #newRec(channel, handlers) {
    const since = handlers.since;
    return {
      crier: this,
      channel,
      handlers,
      epoch: since ? since.epoch : null,
      offset: since ? since.offset : null,
      active: false,
      server: false,
      pendingId: null,
      retries: 0,
      retryTimer: null,
      firstAck: null,
      error: null,
      ready: null,
      waiters: [],
    };
  }

  /**
   * Publishes `data` to `channel`; resolves {channel, epoch, offset}. Needs a `publish` claim.
   * `idempotencyKey` (1-256 bytes, optional): a publish repeated with the same key on the same
   * channel within 5 minutes is delivered once and resolves with the first one's offset. After a
   * rejection with code `outcome_unknown`, `timeout` or `disconnected` the message may have been
   * published: retry with the same key.
   */
  publish(channel, data, { idempotencyKey } = {}) {
    const frame = { type: "publish", channel, data };
    if (idempotencyKey !== undefined && idempotencyKey !== null) frame.idempotency_key = idempotencyKey;
    return this.#request(frame, (f) => ({ channel: f.channel, epoch: f.epoch, offset: f.offset }));
  }
  /** The clients subscribed to `channel`, on every node: [{client, user, node}]. */
  presence(channel) {
    return this.#request({ type: "presence", channel }, (f) => f.clients || []);
  }
  /** How many clients and distinct users are in `channel`'s presence: {clients, users}. */
  presenceStats(channel) {
    return this.#request({ type: "presence_stats", channel }, (f) => ({ clients: f.clients, users: f.users }));
  }
  /**
   * The channel's history: the latest `limit` messages, or those after `since`, oldest first.
   * crier caps one reply by the connection's queue size and marks it `more` with the position to
   * go on from (`next`); the pages are followed up to the first reply's position.
   */
  async history(channel, { limit, since } = {}) {
    const out = [];
    let position = since ? { epoch: since.epoch, offset: since.offset } : undefined;
    let left = limit;
    let top;
    for (;;) {
      const frame = { type: "history", channel };
      if (left !== undefined) frame.limit = left;
      if (position) frame.since = position;
      const page = await this.#request(frame, (f) => f);
      top ??= { epoch: page.epoch, offset: page.offset };
      const messages = page.messages || [];
      // Later pages may carry messages published since the first reply: not asked for.
      for (const m of messages) if (m.epoch !== top.epoch || m.offset <= top.offset) out.push(toMessage(m));
      if (left !== undefined) left -= messages.length;
      const next = page.more && page.next;
      if (!next || messages.length === 0 || (left !== undefined && left <= 0)) return out;
      if (next.epoch === top.epoch && next.offset >= top.offset) return out;
      position = { epoch: next.epoch, offset: next.offset };
    }
  }

  /** Closes the connection for good (code 1000); pending requests reject with code "closed". */
  close() {
    if (this.#closed) return;
    const ws = this.#ws;
    this.#detach();
    if (ws) {
      try {
        ws.close(1000, "client closed");
      } catch {
        /* already closing */
      }
    }
    this.#finish(1000, "client closed", true);
  }

  // ---- connection -------------------------------------------------------------------------

  async #open() {
    const gen = ++this.#gen;
    this.#setState("connecting");
    let token;
    try {
      token = await this.#tokenForConnect();
    } catch (e) {
      if (gen !== this.#gen || this.#closed) return;
      this.#emit("error", asError(e, "token_unavailable"));
      this.#failedBeforeWelcome++;
      this.#scheduleReconnect(CLIENT_ABORT, "getToken failed");
      return;
    }
    if (gen !== this.#gen || this.#closed) return;
    const protocols = token ? ["crier.v1", "crier.bearer." + token] : ["crier.v1"];
    let ws;
    try {
      ws = new this.#WS(this.#url, protocols);
    } catch (e) {
      // A URL the WebSocket constructor refuses will never work: stop.
      this.#emit("error", asError(e, "bad_url"));
      this.#finish(1008, String(e && e.message), false);
      return;
    }
    this.#ws = ws;
    this.#welcomed = false;
    this.#timers.connect = setTimeout(() => this.#abandon("no welcome within connectTimeout"), this.#opts.connectTimeout);
    let opened = false;
    let failure = null; // what the error event said before the socket opened
    ws.onopen = () => {
      opened = true;
      this.#unexplainedFailures = 0;
      if (this.#ws === ws) this.#heard();
    };
    ws.onmessage = (ev) => {
      if (this.#ws === ws) this.#onData(ev.data);
    };
    // A close event follows. Node's `ws` says "Unexpected server response: 401" for a refused
    // handshake; browsers say nothing.
    ws.onerror = (ev) => {
      if (!opened) failure = String((ev && (ev.message || (ev.error && ev.error.message))) || "");
    };
    ws.onclose = (ev) => {
      if (this.#ws !== ws) return;
      this.#detach();
      if (!opened && failure !== null && this.#onRefused(failure)) return;
      this.#onClose(ev.code, ev.reason || "");
    };
  }

  async #tokenForConnect() {
    const getToken = this.#opts.getToken;
    if (!getToken) return this.#token;
    const exp = tokenExpiry(this.#token);
    const stale = !this.#token || (exp !== null && exp * 1000 - Date.now() < 1000) || this.#failedBeforeWelcome >= 2;
    if (stale) {
      const t = await getToken();
      if (typeof t !== "string" || !t) throw new CrierError("token_unavailable", "getToken returned no token");
      this.#token = t;
    }
    return this.#token;
  }

  /** Forgets the current socket (its events are ignored from now on) and stops its timers. */
  #detach() {
    const ws = this.#ws;
    this.#ws = null;
    // No-ops rather than null: an EventEmitter-based implementation (`ws`) throws on an "error"
    // event nobody listens to, e.g. when a connection still opening is abandoned.
    if (ws) ws.onopen = ws.onmessage = ws.onclose = ws.onerror = noop;
    for (const k of ["connect", "tick", "refresh"]) {
      clearTimeout(this.#timers[k]);
      clearInterval(this.#timers[k]);
      this.#timers[k] = null;
    }
  }

  /** Gives up on a connection that went silent or never said welcome, and reconnects. */
  #abandon(reason) {
    const ws = this.#ws;
    if (!ws) return;
    this.#detach();
    try {
      ws.close(CLIENT_ABORT, reason);
    } catch {
      /* not open yet */
    }
    this.#onClose(CLIENT_ABORT, reason);
  }

  /** A connection that failed before it opened. Returns true when it decided (failed or asked
   * for a new token and reconnects); false: an ordinary reconnect with backoff. */
  #onRefused(message) {
    const m = /Unexpected server response: (\d{3})/.exec(message);
    const status = m ? Number(m[1]) : null;
    if (status === 401 || status === 403) {
      const what = status === 401 ? "the token is missing, invalid or expired" : "the page's Origin is not in allowed_origins";
      if (this.#opts.getToken && !this.#refreshedAfterRefusal) {
        this.#refreshedAfterRefusal = true;
        this.#token = null; // ask getToken for a new one
        this.#onClose(ABNORMAL, `handshake refused with HTTP ${status}: ${what}`);
        return true;
      }
      this.#fail(status, `handshake refused with HTTP ${status}: ${what} (the crier node's log says which check failed)`);
      return true;
    }
    if (status === 400 || status === 426) {
      this.#fail(status, `handshake refused with HTTP ${status}: not a WebSocket upgrade crier accepts`);
      return true;
    }
    // A browser: the status is hidden. A bounded number of failures in a row, then give up;
    // attempts while the browser knows it is offline do not count.
    const offline = globalThis.navigator && globalThis.navigator.onLine === false;
    if (status === null && !message && !offline) {
      if (++this.#unexplainedFailures >= this.#opts.failAfter) {
        this.#fail(
          null,
          `${this.#unexplainedFailures} connection attempts in a row failed before the socket opened: the server ` +
            "refused the handshake (a bad or expired token, or this page's Origin not in allowed_origins) or cannot " +
            "be reached; the browser hides the HTTP status: the crier node's log says which check failed",
        );
        return true;
      }
    }
    return false;
  }

  #fail(status, reason) {
    this.#failure = { status, reason };
    this.#emit("error", new CrierError("handshake_refused", reason, { status }));
    this.#finish(ABNORMAL, reason, false, "failed", status);
  }

  #onClose(code, reason) {
    const wasWelcomed = this.#welcomed;
    this.#welcomed = false;
    for (const [id, req] of this.#pending) {
      if (!req.sent) continue;
      this.#pending.delete(id);
      clearTimeout(req.timer);
      req.reject(new CrierError("disconnected", `connection closed (${code}) before the reply`, { closeCode: code }));
    }
    this.#subAcks.clear();
    this.#ignoreIds.clear();
    for (const rec of this.#subs.values()) {
      rec.active = false;
      rec.pendingId = null;
      clearTimeout(rec.retryTimer);
    }
    if (this.#closed) return;
    const action = CLOSE_ACTIONS[code] || "reconnect_with_backoff";
    if (action === "stop" || (action === "refresh_token" && !this.#opts.getToken)) {
      this.#finish(code, reason, false);
      return;
    }
    if (action === "refresh_token") this.#token = null; // ask getToken for a new one
    if (wasWelcomed) {
      this.#failedBeforeWelcome = 0;
      this.#refreshedAfterRefusal = false;
      if (Date.now() - this.#connectedAt >= this.#opts.resetBackoffAfter) this.#attempt = 0;
    } else {
      this.#failedBeforeWelcome++;
    }
    this.#scheduleReconnect(code, reason, action);
  }

  #scheduleReconnect(code, reason, action = "reconnect_with_backoff") {
    const { base, cap } = this.#opts.backoff;
    let ceiling;
    if (action === "reconnect_now") {
      ceiling = 0;
    } else if (action === "reconnect_after_jitter") {
      // A draining or rebalancing node (which already spreads its closes over time): break up
      // what still comes at once, over [0, min(cap, 2 x base)] (0-1 s by default).
      ceiling = Math.min(cap, base * 2);
    } else {
      ceiling = Math.min(cap, base * 2 ** this.#attempt);
      this.#attempt++;
    }
    const delay = Math.floor(this.#random() * ceiling);
    this.#stats.reconnects++;
    this.#setState("disconnected");
    this.#emit("close", { code, reason, reconnect: true, delay });
    this.#emit("reconnect", { attempt: this.#attempt, delay, ceiling });
    clearTimeout(this.#timers.reconnect);
    this.#timers.reconnect = setTimeout(() => this.#open(), delay);
  }

  #finish(code, reason, byClient, state = "closed", status = undefined) {
    this.#closed = true;
    this.#gen++;
    for (const k of Object.keys(this.#timers)) {
      clearTimeout(this.#timers[k]);
      clearInterval(this.#timers[k]);
      this.#timers[k] = null;
    }
    for (const rec of this.#subs.values()) clearTimeout(rec.retryTimer);
    for (const req of this.#pending.values()) {
      clearTimeout(req.timer);
      req.reject(new CrierError("closed", byClient ? "the client was closed" : `closed by the server (${code} ${reason})`, { closeCode: code }));
    }
    this.#pending.clear();
    this.#setState(state);
    this.#emit("close", status === undefined ? { code, reason, reconnect: false } : { code, reason, reconnect: false, status });
  }

  #setState(s) {
    if (this.#state === s) return;
    this.#state = s;
    this.#emit("state", s);
  }

  #emit(event, arg) {
    const set = this.#listeners.get(event);
    if (!set || set.size === 0) {
      if (event === "error" && typeof console !== "undefined") console.error("crier-client:", arg);
      return;
    }
    for (const fn of [...set]) {
      try {
        fn(arg);
      } catch (e) {
        if (event !== "error") this.#emit("error", e);
      }
    }
  }

  #heard() {
    this.#lastHeard = Date.now();
    this.#pingSentAt = null;
  }

  #send(frame) {
    const ws = this.#ws;
    if (!ws) return false;
    try {
      ws.send(JSON.stringify(frame));
      return true;
    } catch (e) {
      this.#emit("error", asError(e, "send_failed"));
      return false;
    }
  }

  // ---- frames ---------------------------------------------------------------------------

  #onData(raw) {
    this.#heard();
    let text = raw;
    if (typeof raw !== "string") {
      try {
        text = new TextDecoder().decode(raw);
      } catch {
        return;
      }
    }
    let f;
    try {
      f = JSON.parse(text);
    } catch {
      this.#emit("error", new CrierError("bad_frame", "unparsable frame from the server"));
      return;
    }
    if (!f || typeof f !== "object") return;
    switch (f.type) {
      case "welcome":
        return this.#onWelcome(f);
      case "message":
        return this.#onMessage(f);
      case "gap":
        return this.#onGapFrame(f);
      case "join":
      case "leave":
        return this.#onPresenceEvent(f);
      case "unsubscribed":
        return this.#onUnsubscribed(f);
      case "subscribed":
        return this.#onServerSubscribed(f);
      case "error":
        return this.#onError(f);
      case "ack":
      case "pong":
      case "presence":
      case "presence_stats":
      case "history":
        return this.#onReply(f);
      default:
        return; // unknown frames are ignored (forward compatibility)
    }
  }

  #onWelcome(f) {
    clearTimeout(this.#timers.connect);
    this.#timers.connect = null;
    this.#welcome = f;
    this.#welcomed = true;
    this.#connectedAt = Date.now();
    this.#failedBeforeWelcome = 0;
    this.#pingInterval = this.#opts.pingInterval ?? (f.ping_interval_ms > 0 ? f.ping_interval_ms : 25000);
    const tick = Math.max(20, Math.min(1000, Math.min(this.#pingInterval, this.#opts.pongTimeout) / 4));
    this.#timers.tick = setInterval(() => this.#onTick(), tick);
    this.#scheduleRefresh();
    this.#setState("connected");
    this.#emit("welcome", f);
    for (const rec of this.#subs.values()) {
      // A server subscription without a position waits for the server to make it again.
      if (!rec.server || rec.epoch !== null) this.#sendSubscribe(rec);
    }
    for (const [, req] of this.#pending) {
      if (!req.sent && this.#send(req.frame)) req.sent = true;
    }
  }

  #onTick() {
    const now = Date.now();
    if (this.#pingSentAt === null) {
      if (now - this.#lastHeard >= this.#pingInterval) {
        this.#pingSentAt = now;
        this.#send({ type: "ping" });
      }
    } else if (now - this.#pingSentAt >= this.#opts.pongTimeout) {
      this.#abandon("no reply to ping within pongTimeout");
    }
  }

  #sendSubscribe(rec) {
    const id = this.#nextId++;
    const frame = { type: "subscribe", id, channel: rec.channel };
    if (rec.epoch !== null) frame.recover = { epoch: rec.epoch, offset: rec.offset };
    rec.pendingId = id;
    this.#subAcks.set(id, rec);
    this.#send(frame);
  }

  #onSubscribeAck(rec, f) {
    rec.pendingId = null;
    rec.active = true;
    rec.retries = 0;
    if (rec.epoch === null) {
      rec.epoch = f.epoch;
      rec.offset = f.offset;
    } else if (f.recovered === false || f.epoch !== rec.epoch) {
      this.#gap(rec, "recovered_false", f.epoch, f.offset);
    }
    const info = { channel: rec.channel, epoch: f.epoch, offset: f.offset };
    if (f.recovered !== undefined) info.recovered = f.recovered;
    if (!rec.firstAck) {
      rec.firstAck = info;
      for (const w of rec.waiters.splice(0)) w.resolve(info);
    }
    this.#call(rec, "onSubscribed", info);
  }

  #onMessage(f) {
    const rec = this.#subs.get(f.channel);
    // Before its ack a subscription has no messages: anything earlier belongs to a previous one.
    if (!rec || rec.pendingId !== null) return;
    if (rec.epoch !== null && f.epoch !== rec.epoch) {
      this.#gap(rec, "epoch_changed", f.epoch, f.offset - 1);
    } else if (rec.offset !== null && f.offset <= rec.offset) {
      this.#stats.duplicates++;
      return;
    } else if (rec.offset !== null && f.offset > rec.offset + 1) {
      this.#gap(rec, "offset_skipped", f.epoch, f.offset - 1);
    }
    rec.epoch = f.epoch;
    rec.offset = f.offset;
    this.#call(rec, "onMessage", toMessage(f));
  }

  #onPresenceEvent(f) {
    const rec = this.#subs.get(f.channel);
    if (!rec) return;
    const info = { channel: f.channel, client: f.client, user: f.user, node: f.node };
    this.#call(rec, f.type === "join" ? "onJoin" : "onLeave", info);
  }

  #onGapFrame(f) {
    const rec = this.#subs.get(f.channel);
    if (!rec || rec.pendingId !== null) return;
    this.#gap(rec, "gap", f.epoch, f.offset);
  }

  /** Tells the app that messages were lost, and moves the position past the loss. */
  #gap(rec, reason, epoch, offset) {
    const info = { channel: rec.channel, reason, epoch, offset, lastEpoch: rec.epoch, lastOffset: rec.offset };
    rec.epoch = epoch;
    rec.offset = offset;
    this.#call(rec, "onGap", info);
  }

  /** The server subscribed this connection (`{"type":"subscribed",...,"server":true}`). */
  #onServerSubscribed(f) {
    if (typeof f.channel !== "string") return;
    let rec = this.#subs.get(f.channel);
    if (!rec) {
      rec = this.#newRec(f.channel, {});
      rec.server = true;
      // Recovered by the server: the missed messages (at or below `offset`) follow.
      if (f.recovered === true) rec.epoch = f.epoch;
      this.#subs.set(f.channel, rec);
      this.#emit("subscription", new Subscription(rec));
      if (this.#subs.get(f.channel) === rec) this.#onSubscribeAck(rec, f);
      return;
    }
    rec.server = true;
    // The client's own subscribe is in flight: its ack (or error) decides.
    if (rec.pendingId !== null) return;
    if (rec.epoch !== null && (f.epoch !== rec.epoch || f.offset > rec.offset)) {
      // Messages after our position: take the subscription over, recovering from it.
      this.#sendSubscribe(rec);
      return;
    }
    this.#onSubscribeAck(rec, f);
  }

  #onUnsubscribed(f) {
    const rec = this.#subs.get(f.channel);
    if (!rec) return;
    this.#subs.delete(f.channel);
    rec.active = false;
    this.#subError(rec, new CrierError("unsubscribed", f.reason || "the server ended the subscription", { channel: f.channel }));
  }

  #onError(f) {
    const err = new CrierError(f.code || "internal", f.message, f.channel ? { channel: f.channel } : undefined);
    if (f.id !== undefined && f.id !== null) {
      const req = this.#pending.get(f.id);
      if (req) {
        this.#pending.delete(f.id);
        clearTimeout(req.timer);
        req.reject(err);
        return;
      }
      const rec = this.#subAcks.get(f.id);
      if (rec) {
        this.#subAcks.delete(f.id);
        rec.pendingId = null;
        this.#onSubscribeError(rec, err);
        return;
      }
      if (this.#ignoreIds.delete(f.id)) return;
    }
    this.#emit("error", err);
  }

  #onSubscribeError(rec, err) {
    if (this.#subs.get(rec.channel) !== rec) return;
    if (rec.server && err.code === "forbidden") {
      // Not (yet) subscribed by the server on this connection: wait for its `subscribed`.
      rec.active = false;
      return;
    }
    if (err.code === "already_subscribed") {
      rec.active = true;
      return;
    }
    if (TRANSIENT_CODES.has(err.code)) {
      const { base, cap } = this.#opts.backoff;
      const delay = Math.floor(this.#random() * Math.min(cap, base * 2 ** rec.retries++));
      rec.retryTimer = setTimeout(() => {
        if (this.#welcomed && this.#subs.get(rec.channel) === rec && rec.pendingId === null && !rec.active) this.#sendSubscribe(rec);
      }, delay);
      return;
    }
    this.#subs.delete(rec.channel);
    this.#subError(rec, err);
  }

  #subError(rec, err) {
    rec.error = err;
    for (const w of rec.waiters.splice(0)) w.reject(err);
    if (rec.handlers.onError) this.#call(rec, "onError", err);
    else this.#emit("error", err);
  }

  #onReply(f) {
    if (f.id === undefined || f.id === null) return;
    const rec = this.#subAcks.get(f.id);
    if (rec) {
      this.#subAcks.delete(f.id);
      if (this.#subs.get(rec.channel) === rec) this.#onSubscribeAck(rec, f);
      return;
    }
    if (this.#ignoreIds.delete(f.id)) return;
    const req = this.#pending.get(f.id);
    if (!req) return;
    this.#pending.delete(f.id);
    clearTimeout(req.timer);
    try {
      req.resolve(req.map(f));
    } catch (e) {
      req.reject(e);
    }
  }

  #call(rec, name, arg) {
    const fn = rec.handlers[name];
    if (typeof fn !== "function") return;
    try {
      fn(arg);
    } catch (e) {
      this.#emit("error", e);
    }
  }

  _unsubscribe(rec) {
    if (this.#subs.get(rec.channel) !== rec) return;
    this.#subs.delete(rec.channel);
    clearTimeout(rec.retryTimer);
    if (rec.pendingId !== null) this.#subAcks.delete(rec.pendingId);
    const wasOnServer = rec.active || rec.pendingId !== null;
    rec.active = false;
    rec.pendingId = null;
    if (wasOnServer && this.#welcomed) {
      const id = this.#nextId++;
      this.#ignoreIds.add(id);
      this.#send({ type: "unsubscribe", id, channel: rec.channel });
    }
  }

  // ---- requests ---------------------------------------------------------------------------

  #request(frame, map) {
    if (this.#closed) return Promise.reject(new CrierError("closed", "the client is closed"));
    return new Promise((resolve, reject) => {
      const id = this.#nextId++;
      frame.id = id;
      const req = { frame, map, resolve, reject, sent: false, timer: null };
      req.timer = setTimeout(() => {
        if (this.#pending.get(id) !== req) return;
        this.#pending.delete(id);
        reject(new CrierError("timeout", `no reply to ${frame.type} within ${this.#opts.requestTimeout} ms`));
      }, this.#opts.requestTimeout);
      this.#pending.set(id, req);
      if (this.#welcomed && this.#send(frame)) req.sent = true;
    });
  }

  // ---- token refresh ------------------------------------------------------------------------

  #scheduleRefresh() {
    clearTimeout(this.#timers.refresh);
    this.#timers.refresh = null;
    if (!this.#opts.getToken) return;
    const exp = tokenExpiry(this.#token);
    if (exp === null) return;
    const remaining = exp * 1000 - Date.now();
    const delay = Math.min(MAX_TIMER, Math.max(0, remaining - this.#opts.refreshMargin, remaining / 2));
    this.#timers.refresh = setTimeout(() => this.#refresh(exp), delay);
  }

  async #refresh(oldExp) {
    const gen = this.#gen;
    let token;
    try {
      token = await this.#opts.getToken();
    } catch (e) {
      if (gen === this.#gen) this.#emit("error", asError(e, "token_unavailable"));
      return; // the server closes with 4001 at exp; the reconnect asks getToken again
    }
    if (gen !== this.#gen || !this.#welcomed || typeof token !== "string" || !token) return;
    this.#token = token;
    try {
      await this.#request({ type: "refresh", token }, () => null);
    } catch (e) {
      if (gen === this.#gen && e.code !== "disconnected" && e.code !== "closed") this.#emit("error", e);
      return;
    }
    const exp = tokenExpiry(token);
    // Only a later token is worth scheduling again; otherwise the 4001 close will ask anew.
    if (gen === this.#gen && exp !== null && exp > oldExp) this.#scheduleRefresh();
  }
}

function noop() {}

function toMessage(f) {
  return { channel: f.channel, epoch: f.epoch, offset: f.offset, data: f.data };
}

function asError(e, code) {
  if (e instanceof CrierError) return e;
  return new CrierError(code, e && e.message ? e.message : String(e), { cause: e });
}

export default Crier;
