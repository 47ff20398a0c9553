// Type declarations of crier-client (src/index.js).

/** A position in a channel's stream. `epoch` changes when the channel's history is lost. */
export interface Position {
  epoch: string;
  offset: number;
}

/** A delivered message. */
export interface Message<T = unknown> {
  channel: string;
  epoch: string;
  offset: number;
  data: T;
}

/** Why messages were lost, and where the stream continues. */
export interface GapInfo {
  channel: string;
  /** "gap": the server's gap frame; "recovered_false": a resubscribe could not be recovered
   * (history too short or a new epoch); "epoch_changed" / "offset_skipped": the client saw it
   * in the messages themselves. */
  reason: "gap" | "recovered_false" | "epoch_changed" | "offset_skipped";
  /** The position the stream continues from (the next message has offset > this). */
  epoch: string;
  offset: number;
  /** The last position delivered before the loss (null if none). */
  lastEpoch: string | null;
  lastOffset: number | null;
}

export interface SubscribedInfo {
  channel: string;
  epoch: string;
  offset: number;
  /** Present when the subscribe carried `recover`. */
  recovered?: boolean;
}

export interface SubscribeOptions<T = unknown> {
  onMessage?: (msg: Message<T>) => void;
  onGap?: (info: GapInfo) => void;
  /** Every subscribe ack, the first one and the one after each reconnect. */
  onSubscribed?: (info: SubscribedInfo) => void;
  /** The server refused (forbidden, invalid_channel, too_many_subscriptions, ...) or ended
   * ("unsubscribed") the subscription; it is over. Without it the client's "error" event fires. */
  onError?: (err: CrierError) => void;
  /** A client entered the channel's presence (channels whose namespace has `join_leave`; never
   * this connection's own join). Not a message: no offset, not recovered after a reconnect. */
  onJoin?: (info: PresenceEvent) => void;
  /** A client left the channel's presence (unsubscribed, disconnected, or its node died and its
   * entry expired), once. */
  onLeave?: (info: PresenceEvent) => void;
  /** Start after this position (e.g. the last message of a `history` call, or a position the
   * app stored): the first subscribe recovers from it. */
  since?: Position;
}

export interface PresenceEvent {
  channel: string;
  client: string;
  user: string;
  node: string;
}

export interface PresenceStats {
  clients: number;
  users: number;
}

export interface PresenceClient {
  client: string;
  user: string;
  node: string;
}

export interface Welcome {
  type: "welcome";
  client: string;
  user: string;
  node: string;
  ping_interval_ms?: number;
}

/** "failed": the server refused the handshake in a way retrying cannot fix (see `failure`). */
export type State = "connecting" | "connected" | "disconnected" | "closed" | "failed";

/** What the client does after each close code crier sends (generated from crier's table). */
export type CloseAction = "stop" | "reconnect_now" | "reconnect_after_jitter" | "reconnect_with_backoff" | "refresh_token";
export const CLOSE_ACTIONS: Readonly<Record<number, CloseAction>>;

/** Why the client is "failed". `status` is the HTTP status (null in browsers, which hide it). */
export interface Failure {
  status: number | null;
  reason: string;
}

export interface CloseInfo {
  code: number;
  reason: string;
  /** false when the client stops for good (state "closed" or "failed"). */
  reconnect: boolean;
  /** The HTTP status of a refused handshake, when the client failed on it. */
  status?: number | null;
  /** ms until the next attempt, when reconnecting. */
  delay?: number;
}

export interface ReconnectInfo {
  /** 1 for the first attempt after a connection was lost. */
  attempt: number;
  /** The drawn delay in ms: uniform in [0, ceiling). */
  delay: number;
  /** min(backoff.cap, backoff.base * 2^(attempt-1)). */
  ceiling: number;
}

export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: any }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: any) => void) | null;
}

export interface CrierOptions {
  /** A JWT. Sent as the subprotocol `crier.bearer.<jwt>` (never in the URL). */
  token?: string;
  /** Returns a (new) JWT: called before the first connect when there is no `token`, before the
   * token's `exp` (then sent as a `refresh` frame), after a 4001 close, and after two failed
   * connection attempts in a row (a browser cannot see a 401). */
  getToken?: () => string | Promise<string>;
  /** WebSocket implementation; default `globalThis.WebSocket` (Node 20: pass `ws`'s). */
  WebSocket?: new (url: string, protocols?: string | string[]) => WebSocketLike;
  /** Full-jitter exponential backoff: delay = random() * min(cap, base * 2^attempt). Default
   * {base: 500, cap: 20000} ms. */
  backoff?: { base?: number; cap?: number };
  /** publish/presence/history reject with code "timeout" after this many ms. Default 10000. */
  requestTimeout?: number;
  /** A connection that has not said welcome after this many ms is dropped. Default 10000. */
  connectTimeout?: number;
  /** Send {"type":"ping"} after this many ms without hearing from the server. Default: the
   * server's ping_interval_ms (25000). */
  pingInterval?: number;
  /** Drop the connection when nothing answers a ping within this many ms. Default 10000. */
  pongTimeout?: number;
  /** Refresh the token this many ms before `exp` (at least halfway). Default 30000. */
  refreshMargin?: number;
  /** A connection that lasted this long resets the backoff. Default 5000 ms. */
  resetBackoffAfter?: number;
  /** Consecutive attempts that fail before the socket opens, with no HTTP status known (browsers
   * hide it), after which the client is "failed" with a hint. Default 10. */
  failAfter?: number;
  /** Source of randomness for the jitter, in [0, 1). Default Math.random. */
  random?: () => number;
}

/** Error codes: the server's (bad_request, unknown_type, invalid_channel, forbidden,
 * rate_limited, too_many_subscriptions, message_too_large, already_subscribed, not_subscribed,
 * token_invalid, unavailable, internal, channel_full) and the client's own: "timeout" (no reply within
 * requestTimeout), "disconnected" (the connection closed before the reply: a publish may or
 * may not have gone out), "closed" (the client is closed), "unsubscribed" (the server ended a
 * subscription), "token_unavailable" (getToken failed), "bad_frame", "bad_url", "send_failed". */
export class CrierError extends Error {
  constructor(code: string, message?: string, details?: object);
  readonly code: string;
  /** The close code, for "disconnected" and "closed". */
  readonly closeCode?: number;
  /** The channel, when the server's error named one. */
  readonly channel?: string;
}

export class Subscription {
  readonly channel: string;
  /** The last delivered position (or the subscribe ack's), null before the first ack. */
  readonly position: Position | null;
  /** Acknowledged by the server on the current connection. */
  readonly active: boolean;
  /** Resolves on the first ack; rejects when the server refuses the subscription. */
  readonly ready: Promise<SubscribedInfo>;
  /** True when the server made it (REST `subscribe`, the token's `subs` claim). */
  readonly server: boolean;
  /** Sets (merges) the handlers; for a server subscription, call it in the "subscription" event. */
  setHandlers<T = unknown>(handlers: SubscribeOptions<T>): this;
  unsubscribe(): void;
}

export class Crier {
  constructor(url: string, options?: CrierOptions);
  readonly state: State;
  /** Set when the state is "failed". */
  readonly failure: Failure | null;
  readonly welcome: Welcome | null;
  readonly stats: { duplicates: number; reconnects: number };
  on(event: "state", fn: (state: State) => void): () => void;
  on(event: "welcome", fn: (welcome: Welcome) => void): () => void;
  on(event: "close", fn: (info: CloseInfo) => void): () => void;
  on(event: "reconnect", fn: (info: ReconnectInfo) => void): () => void;
  on(event: "error", fn: (err: Error) => void): () => void;
  /** The server subscribed this connection (REST `subscribe`, the token's `subs` claim): attach
   * handlers with `sub.setHandlers(..)` in the listener; it is recovered across reconnects. */
  on(event: "subscription", fn: (sub: Subscription) => void): () => void;
  off(event: string, fn: (...args: any[]) => void): void;
  subscribe<T = unknown>(channel: string, options?: SubscribeOptions<T>): Subscription;
  /**
   * With `idempotencyKey` (1-256 bytes) a publish repeated within 5 minutes is delivered once and
   * resolves with the first offset: retry with the same key after "outcome_unknown", "timeout"
   * or "disconnected".
   */
  publish(
    channel: string,
    data: unknown,
    options?: { idempotencyKey?: string },
  ): Promise<{ channel: string; epoch: string; offset: number }>;
  presence(channel: string): Promise<PresenceClient[]>;
  /** How many clients and distinct users are in the channel's presence (no listing). */
  presenceStats(channel: string): Promise<PresenceStats>;
  history<T = unknown>(channel: string, options?: { limit?: number; since?: Position }): Promise<Message<T>[]>;
  close(): void;
}

/** The `exp` claim (seconds) of a JWT, or null. */
export function tokenExpiry(token: string | null | undefined): number | null;

export default Crier;
