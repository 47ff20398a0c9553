"""Helpers for the deploy tests: the local topology (deploy/local/*), HS256 tokens, REST calls,
WebSocket clients (a reconnecting one that recovers, and a raw one that can refuse to read or
to answer pings), and Prometheus queries. Every wait is bounded by a deadline."""

import base64
import hashlib
import hmac
import http.client as httpclient
import json
import os
import random
import shlex
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
LOCAL = os.path.join(ROOT, "deploy", "local")

# Loopback only: never through a proxy from the environment.
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def eventually(check, timeout, what, interval=0.1):
    """Polls check() until it returns a truthy value (returned) or the deadline passes."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - reported if the deadline passes
            last = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}" + (f" (last error: {last!r})" if last else ""))
        time.sleep(interval)


def http(method, url, body=None, headers=None, timeout=15):
    """(status, parsed JSON body or text)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with _opener.open(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def handshake(url, token, source="127.0.0.1", headers=None, timeout=15):
    """A WebSocket handshake request from a chosen loopback address: (status, JSON body).
    Meant for rejected handshakes (a valid one would switch protocols)."""
    u = urllib.parse.urlparse(url)
    conn = httpclient.HTTPConnection(u.hostname, u.port, timeout=timeout, source_address=(source, 0))
    h = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
         "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Authorization": "Bearer " + token}
    h.update(headers or {})
    try:
        conn.request("GET", u.path or "/", headers=h)
        r = conn.getresponse()
        body = r.read()
    finally:
        conn.close()
    try:
        return r.status, json.loads(body)
    except ValueError:
        return r.status, body.decode(errors="replace")


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def mint_token(secret, sub, channels=("*",), publish=(), ttl=3600):
    header = {"alg": "HS256", "typ": "JWT"}
    now = int(time.time())
    claims = {"sub": sub, "iat": now, "exp": now + ttl, "channels": list(channels), "publish": list(publish)}
    signing = b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    sig = hmac.new(secret.encode(), signing.encode(), hashlib.sha256).digest()
    return signing + "." + b64url(sig)


class Topology:
    """deploy/local/up in a state directory of its own; down() stops exactly what it started."""

    def __init__(self, state_dir, broker, crier_bin, crier_env):
        self.dir = state_dir
        self.env = dict(os.environ)
        for k in list(self.env):
            if k.startswith("CRIER_"):
                del self.env[k]
        self.env.update(crier_env)
        self.env.update(DEPLOY_LOCAL_DIR=state_dir, DEPLOY_LOCAL_BROKER=broker, DEPLOY_CRIER_BIN=crier_bin)
        self.vars = {}

    def run(self, *args, timeout=90, env=None):
        """deploy/local/<args>; `env` replaces the topology's environment (self.env) when given."""
        return subprocess.run([os.path.join(LOCAL, args[0]), *args[1:]], env=self.env if env is None else env,
                              timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def up(self):
        r = self.run("up")
        if r.returncode != 0:
            raise AssertionError(f"deploy/local/up failed:\n{r.stdout}")
        out = self.run("env").stdout
        for line in out.splitlines():
            if line.startswith("export "):
                k, _, v = line[len("export "):].partition("=")
                self.vars[k] = shlex.split(v)[0] if v else ""
        return r.stdout

    def down(self):
        return self.run("down")

    def __getitem__(self, key):
        return self.vars["DEPLOY_LOCAL_" + key]

    def node_url(self, name):
        return self[f"{name.upper()}_URL"]

    def pid(self, name):
        with open(os.path.join(self.dir, "pids", name)) as f:
            return int(f.read())

    def exit_status(self, name):
        path = os.path.join(self.dir, "pids", name + ".exit")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return int(f.read())

    def log(self, name):
        with open(os.path.join(self.dir, name + ".log"), errors="replace") as f:
            return f.read()

    def prom(self, expr):
        status, body = http("GET", self["PROMETHEUS_URL"] + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        if status != 200 or body.get("status") != "success":
            raise AssertionError(f"Prometheus rejected {expr!r}: {status} {body}")
        return body["data"]["result"]

    def label_values(self, label, match):
        url = f"{self['PROMETHEUS_URL']}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": match})
        status, body = http("GET", url)
        assert status == 200, (status, body)
        return body["data"]

    def publish(self, channel, data, url=None, idempotency_key=None, attempts=1):
        """Publishes through the load balancer (or url); retries with the same idempotency key."""
        body = {"channel": channel, "data": data}
        if idempotency_key:
            body["idempotency_key"] = idempotency_key
        last = None
        for _ in range(attempts):
            try:
                status, resp = http("POST", (url or self["URL"]) + "/api/v1/publish", body,
                                    {"Authorization": "Bearer " + self["API_KEY"]})
                if status == 200:
                    return resp
                last = (status, resp)
            except OSError as e:
                last = e
            time.sleep(0.05)
        raise AssertionError(f"publish to {channel} failed: {last}")

    def metric(self, node, name):
        """The sum of a metric's samples in one node's /metrics."""
        status, text = http("GET", self.node_url(node) + "/metrics")
        assert status == 200
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total


class Client:
    """A WebSocket client like the ones users write: it keeps the last epoch/offset per channel
    and, when the server closes with a reconnect code (1001, 1011, 1012, 4009, 4010), reconnects
    after a jittered delay and subscribes again with `recover`."""

    RECONNECT = {1001, 1011, 1012, 4009, 4010}

    def __init__(self, ws_url, token, name="client"):
        self.url, self.token, self.name = ws_url, token, name
        self.cond = threading.Condition()
        self.frames = []  # every frame received, in order
        self.nodes = []  # the node of each connection (from `welcome`)
        self.closes = []  # close codes received
        self.positions = {}  # channel -> (epoch, offset) of the last message or fresh ack
        self.messages = {}  # channel -> offsets received, in order
        self.acks = []  # subscribe acks
        self.errors = []
        self.subscribed = set()
        self.next_id = 1
        self.stopping = False
        self.failure = None
        self.ws = self._connect(deadline=time.monotonic() + 15)
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def _connect(self, deadline):
        while True:
            try:
                ws = connect(self.url, additional_headers={"Authorization": "Bearer " + self.token},
                             subprotocols=["crier.v1"], proxy=None, open_timeout=10, compression=None,
                             max_size=2**24, legacy=True)
                welcome = json.loads(ws.recv(timeout=10))
                assert welcome["type"] == "welcome", welcome
                with self.cond:
                    self.frames.append(welcome)
                    self.nodes.append(welcome["node"])
                    self.cond.notify_all()
                return ws
            except (OSError, InvalidStatus, TimeoutError, ConnectionClosed):
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.1 + random.random() * 0.2)

    def _run(self):
        try:
            while not self.stopping:
                try:
                    raw = self.ws.recv(timeout=0.2)
                except TimeoutError:
                    continue
                except ConnectionClosed as e:
                    code = e.rcvd.code if e.rcvd else None
                    with self.cond:
                        self.closes.append(code)
                        self.cond.notify_all()
                    if self.stopping or code not in self.RECONNECT:
                        return
                    # 1012 (draining): reconnect after a jittered delay, as the contract asks
                    time.sleep((0.2 + random.random() * 0.3) if code == 1012 else random.random() * 0.1)
                    self.ws = self._connect(deadline=time.monotonic() + 20)
                    for channel in sorted(self.subscribed):
                        self._subscribe(channel, recover=True)
                    continue
                self._on_frame(json.loads(raw))
        except Exception as e:  # noqa: BLE001 - surfaced by check()
            self.failure = e
            with self.cond:
                self.cond.notify_all()

    def _on_frame(self, f):
        with self.cond:
            self.frames.append(f)
            t = f.get("type")
            if t == "message":
                ch = f["channel"]
                self.positions[ch] = (f["epoch"], f["offset"])
                self.messages.setdefault(ch, []).append(f["offset"])
            elif t == "ack" and "epoch" in f:  # a subscribe ack
                self.acks.append(f)
                if not f.get("recovered", False):
                    # fresh subscription, or recovery failed: start from the current position
                    self.positions[f["channel"]] = (f["epoch"], f["offset"])
            elif t == "error":
                self.errors.append(f)
            self.cond.notify_all()

    def replayed(self, channel):
        """Offsets replayed by recovering subscribes: messages after a `recovered: true` ack up to
        the offset that ack reported."""
        out, limit = [], None
        for f in self.frames:
            if f.get("type") == "ack" and f.get("channel") == channel and "recovered" in f:
                limit = f["offset"] if f["recovered"] else None
            elif f.get("type") == "message" and f["channel"] == channel and limit is not None:
                if f["offset"] <= limit:
                    out.append(f["offset"])
                else:
                    limit = None
        return out

    def send(self, frame):
        if "id" not in frame:
            with self.cond:
                frame = dict(frame, id=self.next_id)
                self.next_id += 1
        self.ws.send(json.dumps(frame))
        return frame["id"]

    def _subscribe(self, channel, recover=False):
        frame = {"type": "subscribe", "channel": channel}
        if recover and channel in self.positions:
            epoch, offset = self.positions[channel]
            frame["recover"] = {"epoch": epoch, "offset": offset}
        return self.send(frame)

    def subscribe(self, channel, timeout=15):
        fid = self._subscribe(channel)
        ack = self.wait(lambda: next((f for f in self.frames if f.get("id") == fid and f["type"] in ("ack", "error")), None),
                        timeout, f"{self.name}: subscribe ack for {channel}")
        assert ack["type"] == "ack", ack
        self.subscribed.add(channel)
        return ack

    def wait(self, predicate, timeout, what):
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                if self.failure:
                    raise AssertionError(f"{self.name} failed: {self.failure!r}")
                result = predicate()
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
                self.cond.wait(min(left, 0.2))

    @property
    def node(self):
        return self.nodes[-1]

    def close(self):
        self.stopping = True
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001
            pass
        self.thread.join(timeout=5)


class RawClient:
    """A minimal WebSocket client on a plain socket, for clients that misbehave: one that never
    reads (a slow consumer) or never answers pings (a dead peer)."""

    def __init__(self, url, token, rcvbuf=None, timeout=15):
        u = urllib.parse.urlparse(url)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout)
        self.sock.connect((u.hostname, u.port))
        key = base64.b64encode(os.urandom(16)).decode()
        req = (f"GET {u.path or '/'} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nAuthorization: Bearer {token}\r\n\r\n")
        self.sock.sendall(req.encode())
        self.buf = b""
        while b"\r\n\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise AssertionError("connection closed during the handshake")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        assert b" 101 " in status, head.decode(errors="replace")

    def _read(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_frame(self):
        """(opcode, payload) of the next frame."""
        b0, b1 = self._read(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", self._read(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", self._read(8))[0]
        return b0 & 0x0F, self._read(n)

    def read_json(self):
        while True:
            op, payload = self.read_frame()
            if op == 1:
                return json.loads(payload)

    def send_json(self, obj):
        payload = json.dumps(obj).encode()
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack("!H", n))
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))

    def wait_close(self, timeout):
        """Reads (without answering pings) until the server's close frame; its code, or None at EOF."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.1, deadline - time.monotonic()))
            try:
                op, payload = self.read_frame()
            except (EOFError, ConnectionResetError):
                return None
            except socket.timeout:
                break
            if op == 8:
                return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None
        raise AssertionError(f"no close within {timeout}s")

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass
