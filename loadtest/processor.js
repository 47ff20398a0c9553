// Artillery processor for crier's load tests: HS256 JWTs made with Node's crypto (no extra
// dependency), a subscriber step that subscribes and times every message, and a publisher hook
// that stamps each REST publish with its send time.
//
// Environment (set by ./run, or by you):
//   LOADTEST_JWT_SECRET   the nodes' HS256 secret
//   LOADTEST_WS_TARGETS   comma list of the nodes, ws://host:port or the full ws://host:port/ws
//                         (wss:// too, and a path prefix behind a proxy: wss://host/rt/ws);
//                         each subscriber picks the next one
//   LOADTEST_CHANNEL      channel to subscribe/publish to (default chat:lobby)
'use strict';

const crypto = require('crypto');

function b64url(input) {
  return Buffer.from(input).toString('base64').replace(/=+$/, '').replace(/\+/g, '-').replace(/\//g, '_');
}

// A token the way a backend would mint it: sub, iat, exp, channels, publish.
function mintHs256(secret, sub, channels, publish, ttlSeconds) {
  const now = Math.floor(Date.now() / 1000);
  const header = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const payload = b64url(JSON.stringify({ sub, iat: now, exp: now + ttlSeconds, channels, publish }));
  const signature = b64url(crypto.createHmac('sha256', secret).update(`${header}.${payload}`).digest());
  return `${header}.${payload}.${signature}`;
}

const channel = () => process.env.LOADTEST_CHANNEL || 'chat:lobby';
let nextTarget = 0;

// The WebSocket URL of a target: `/ws` is appended to a node's address, unless it is there
// already (a target given as the full endpoint must not become .../ws/ws, a 404).
function wsUrl(target) {
  const base = target.trim().replace(/\/+$/, '');
  return /\/ws$/.test(base) ? base : `${base}/ws`;
}

function wsTargets() {
  return (process.env.LOADTEST_WS_TARGETS || '').split(',').map((t) => t.trim()).filter(Boolean);
}

// `connect: { function: connectWithToken }`: picks a node, and puts a fresh token for a new user
// in the subprotocol list, as a browser does (`crier.v1, crier.bearer.<jwt>`).
function connectWithToken(wsArgs, context, done) {
  const secret = process.env.LOADTEST_JWT_SECRET;
  if (!secret) return done(new Error('LOADTEST_JWT_SECRET is not set'));
  const targets = wsTargets();
  const base = targets.length ? targets[nextTarget++ % targets.length] : wsArgs.target;
  const user = `artillery-${process.pid}-${crypto.randomBytes(6).toString('hex')}`;
  const token = mintHs256(secret, user, ['chat:*'], [], 3600);
  wsArgs.target = wsUrl(base);
  wsArgs.subprotocols = ['crier.v1', `crier.bearer.${token}`];
  context.vars.user = user;
  return done();
}

// Subscribes, resolves once the ack is in, then keeps counting `message` frames (and their
// publish → receive time) for as long as the scenario thinks.
function subscribeAndListen(context, ee, done) {
  const ws = context.ws;
  let settled = false;
  const settle = (err) => {
    if (!settled) {
      settled = true;
      done(err);
    }
  };
  ws.on('message', (raw) => {
    let frame;
    try {
      frame = JSON.parse(raw.toString());
    } catch (e) {
      ee.emit('counter', 'crier.bad_frames', 1);
      return;
    }
    if (frame.type === 'message') {
      ee.emit('counter', 'crier.messages_received', 1);
      const ts = frame.data && Number(frame.data.ts);
      if (ts) ee.emit('histogram', 'crier.publish_to_receive_ms', Date.now() - ts);
    } else if (frame.type === 'ack' && frame.id === 1) {
      ee.emit('counter', 'crier.subscribed', 1);
      settle();
    } else if (frame.type === 'error') {
      ee.emit('counter', `crier.error.${frame.code}`, 1);
      if (frame.id === 1) settle(new Error(`subscribe refused: ${frame.code}`));
    }
  });
  ws.on('close', (code) => {
    if (code !== 1000 && code !== 1005) ee.emit('counter', `crier.closed.${code}`, 1);
  });
  ws.send(JSON.stringify({ type: 'subscribe', id: 1, channel: channel() }));
}

// `beforeRequest` of the publisher: the message carries its send time.
function stampMessage(requestParams, context, ee, next) {
  requestParams.json = { channel: channel(), data: { ts: Date.now(), from: 'artillery' } };
  return next();
}

module.exports = { mintHs256, wsUrl, connectWithToken, subscribeAndListen, stampMessage };
