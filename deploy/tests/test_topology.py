"""The deploy/ topology, run for real by deploy/local/up: Redis, three crier nodes, nginx
(deploy/nginx.conf) and Prometheus (deploy/prometheus.yml, deploy/alerts.yml), on loopback.

Clients connect through nginx and spread over the nodes; a REST publish through nginx reaches
them; a node stopped with SIGTERM drains and its clients reconnect through nginx to the others
and recover without gap or duplicate; Redis restarts and the cluster resumes; Prometheus scrapes
every node and every query of the Grafana dashboard returns data; last, every node is restarted
in turn (SIGTERM, drain, a new process on the same port, ready before the next) under connected
clients, who all come back through nginx with every message once.

The tests run in file order and share one topology (pytest -x stops at the first failure).
DEPLOY_TEST_BROKER=memory runs the nodes on their memory brokers (no cluster): the cross-node
tests are then skipped."""

import json
import os
import re
import sys
import threading
import time

import pytest

from support import ROOT, Client, RawClient, Topology, eventually, handshake, http, mint_token

BROKER = os.environ.get("DEPLOY_TEST_BROKER", "redis")
NODES = ("node1", "node2", "node3")
DASHBOARD = os.path.join(ROOT, "grafana", "dashboards", "crier.json")
# What Grafana puts in $__rate_interval with the provisioned 15s scrape interval (4 × 15s).
RATE_INTERVAL = "1m"

cluster_only = pytest.mark.skipif(BROKER != "redis", reason="needs the Redis broker (DEPLOY_TEST_BROKER=memory)")

# crier settings of the test nodes: short heartbeats and drain so the test runs in seconds, a
# small outbound queue so a slow consumer is dropped quickly. deploy/local/up adds
# CRIER_TRUSTED_PROXIES=127.0.0.1 (nginx).
CRIER_ENV = {
    # Handshakes per client IP and node: a burst of 40, then 1 per second (see the XFF test).
    "CRIER_HANDSHAKE_RATE": "1",
    "CRIER_HANDSHAKE_BURST": "40",
    "CRIER_PING_INTERVAL": "2s",
    "CRIER_PONG_TIMEOUT": "1s",
    "CRIER_SHUTDOWN_DRAIN": "2s",
    "CRIER_CLIENT_QUEUE_MAX_BYTES": "65536",
}

S = {}  # state shared by the tests, in order


@pytest.fixture(scope="module")
def topo(request):
    state = os.environ.get("DEPLOY_TEST_DIR", os.path.join(ROOT, "target", "deploy-test"))
    os.makedirs(state, exist_ok=True)
    t = Topology(state, BROKER, os.environ["DEPLOY_CRIER_BIN"], CRIER_ENV)
    t.down()  # leftovers of an interrupted earlier run in this state directory, if any
    try:
        t.up()
        yield t
    finally:
        for c in S.get("clients", []):
            c.close()
        r = t.down()
        print(r.stdout)
        if request.session.testsfailed:
            # What the components said, for the failure report (not captured by pytest).
            for name in ("node1", "node2", "node3", "nginx", "redis", "prometheus"):
                try:
                    tail = "".join(t.log(name).splitlines(keepends=True)[-15:])
                except OSError:
                    continue
                print(f"--- last lines of {state}/{name}.log\n{tail}", file=sys.__stderr__)


def token(topo, sub, **kw):
    return mint_token(topo["JWT_SECRET"], sub, **kw)


def test_nodes_ready_behind_nginx(topo):
    for n in NODES:
        assert http("GET", topo.node_url(n) + "/readyz")[0] == 200
    assert http("GET", topo["URL"] + "/healthz")[0] == 200
    assert http("GET", topo["URL"] + "/readyz")[0] == 200
    # Prometheus scrapes each node directly; the balancer does not expose /metrics.
    assert http("GET", topo["URL"] + "/metrics")[0] == 404


def test_prometheus_scrapes_all_three_nodes(topo):
    def three_up():
        r = topo.prom('up{job="crier"} == 1')
        return len(r) == 3 and r

    result = eventually(three_up, 20, "up == 1 for three crier targets")
    want = {topo.node_url(n).removeprefix("http://") for n in NODES}
    assert {s["metric"]["instance"] for s in result} == want


def test_clients_through_nginx_land_on_every_node(topo):
    clients = [Client(topo["WS_URL"], token(topo, f"user{i}", channels=["news:*"]), f"client{i}") for i in range(6)]
    S["clients"] = clients
    nodes = [c.node for c in clients]
    # least_conn spreads long-lived connections: two per node.
    assert set(nodes) == set(NODES), nodes
    assert all(nodes.count(n) == 2 for n in NODES), nodes


def test_publish_through_nginx_reaches_clients(topo):
    clients = S["clients"]
    for c in clients:
        c.subscribe("news:lobby")
    if BROKER == "redis":
        resp = topo.publish("news:lobby", {"text": "hello"})
        for c in clients:
            c.wait(lambda c=c: resp["offset"] in c.messages.get("news:lobby", []), 15, f"{c.name} gets the message")
    else:
        # Memory brokers: a publish reaches the clients of the node nginx sent it to. Publish
        # until every node got one, which also shows REST calls are spread.
        def every_client_got_one():
            before = sum(len(c.messages.get("news:lobby", [])) for c in clients)
            topo.publish("news:lobby", {"text": "hello"})
            # wait for this publish to arrive somewhere, then look at everyone
            eventually(lambda: sum(len(c.messages.get("news:lobby", [])) for c in clients) > before, 15, "delivery")
            return all(c.messages.get("news:lobby") for c in clients)

        eventually(every_client_got_one, 20, "a message on every node", interval=0)


def test_sse_streams_through_nginx_unbuffered(topo):
    """GET /sse through nginx: each event arrives as crier writes it (deploy/nginx.conf turns
    buffering off for /sse; a buffered proxy would hold these few small events back)."""
    import http.client as httpclient
    import urllib.parse as up

    u = up.urlparse(topo["URL"])
    conn = httpclient.HTTPConnection(u.hostname, u.port, timeout=15)
    conn.request("GET", "/sse?channel=news:sse", headers={
        "Authorization": "Bearer " + token(topo, "sse-user", channels=["news:*"]),
        "Accept": "text/event-stream"})
    r = conn.getresponse()
    try:
        assert r.status == 200, r.status
        assert r.getheader("Content-Type", "").startswith("text/event-stream")
        events = []

        def read_event():
            fields = {}
            while True:
                line = r.fp.readline().decode()
                if line in ("\n", ""):
                    if fields or line == "":
                        return fields
                    continue
                name, _, value = line.rstrip("\n").partition(": ")
                fields[name] = fields.get(name, "") + value

        deadline = time.monotonic() + 15
        while not any(e.get("event") == "subscribed" for e in events):
            assert time.monotonic() < deadline, events
            events.append(read_event())
        # Nothing more is written until this publish: only an unbuffered proxy passes it on now.
        resp = topo.publish("news:sse", {"text": "through nginx"}) if BROKER == "redis" else None
        if resp is None:
            # Memory brokers: publish on the node that serves the stream.
            node = json.loads(events[0]["data"])["node"]
            resp = topo.publish("news:sse", {"text": "through nginx"}, url=topo.node_url(node))
        while True:
            e = read_event()
            assert e, "the stream ended"
            if e.get("event") == "message":
                m = json.loads(e["data"])
                assert m["offset"] == resp["offset"] and m["data"] == {"text": "through nginx"}, m
                assert e.get("id"), e
                break
    finally:
        conn.close()


def test_handshake_limit_is_per_client_ip_behind_nginx(topo):
    """nginx passes X-Forwarded-For and crier trusts it from nginx: one client address (here
    127.0.0.3) exhausting its handshake budget does not limit another (127.0.0.4), and a
    forged X-Forwarded-For does not get a client a fresh budget."""
    bad = mint_token("y" * 40, "nobody")
    url = topo["WS_URL"].replace("ws://", "http://")
    statuses = []
    # Exhaust 127.0.0.3's burst on every node: three 429s in a row (least_conn takes turns).
    while statuses[-3:] != [429, 429, 429]:
        assert len(statuses) < 400, f"no rate limit after {len(statuses)} handshakes"
        status, body = handshake(url, bad, source="127.0.0.3")
        assert (status, body["error"]) in ((401, "token_invalid"), (429, "rate_limited")), (status, body)
        statuses.append(status)
    forged = [handshake(url, bad, source="127.0.0.3", headers={"X-Forwarded-For": f"10.9.8.{i}"})[0] for i in range(5)]
    other = handshake(url, bad, source="127.0.0.4")
    assert other[0] == 401 and other[1]["error"] == "token_invalid", other
    # Had the forged header counted, each would have had a fresh budget (401). A token may come
    # back meanwhile (1/s per node, more if the machine is slow): most must still be refused.
    assert forged.count(429) >= 3, forged


@cluster_only
def test_sigterm_node_clients_reconnect_through_nginx_and_recover(topo):
    clients = S["clients"]
    victim = clients[0].node
    moved = [c for c in clients if c.node == victim]
    stayed = [c for c in clients if c.node != victim]
    for c in clients:
        c.subscribe("news:recovery")

    published, stop = [], threading.Event()

    def publisher():
        i = 0
        while not stop.is_set() and i < 200:
            r = topo.publish("news:recovery", {"seq": i}, idempotency_key=f"recovery-{i}", attempts=50)
            published.append(r["offset"])
            i += 1
            time.sleep(0.05)

    pub = threading.Thread(target=publisher, daemon=True)
    pub.start()
    eventually(lambda: len(published) >= 5, 10, "publishing before the stop")
    os.kill(topo.pid(victim), 15)  # SIGTERM: drain
    # Every client of the stopped node is closed with 1012 and reconnects through nginx elsewhere.
    for c in moved:
        c.wait(lambda c=c: c.closes and len(c.nodes) >= 2, 15, f"{c.name} reconnects")
        assert c.closes == [1012], c.closes
        assert c.node != victim, c.nodes
    eventually(lambda: topo.exit_status(victim) is not None, 15, f"{victim} exits")
    assert topo.exit_status(victim) == 0, topo.log(victim)[-2000:]
    # Keep publishing a little after the reconnects, then stop.
    n = len(published)
    eventually(lambda: len(published) >= n + 10, 10, "publishing after the reconnects")
    stop.set()
    pub.join(timeout=30)
    assert not pub.is_alive()

    for c in moved:
        def recovery_acks(c=c):
            return [a for a in c.acks if a["channel"] == "news:recovery" and "recovered" in a]

        acks = c.wait(recovery_acks, 10, f"{c.name}: the ack of its recovering subscribe")
        assert all(a["recovered"] for a in acks), acks
    for c in clients:
        c.wait(lambda c=c: c.messages.get("news:recovery", [])[-1:] == published[-1:], 10, f"{c.name} has every message")
        got = c.messages["news:recovery"]
        assert got == sorted(set(got)), f"{c.name}: duplicates or disorder"
        assert got == list(range(got[0], got[-1] + 1)), f"{c.name}: gap in {got}"
        assert set(published) <= set(got), f"{c.name}: missing {sorted(set(published) - set(got))}"
    for c in stayed:
        assert c.closes == [] and len(c.nodes) == 1, (c.name, c.closes, c.nodes)
    # The moved clients were away while messages were published (they wait 0.2-0.5s before
    # reconnecting; one message every 50ms): those came from the recovery, not the live stream.
    for c in moved:
        assert c.replayed("news:recovery"), f"{c.name}: nothing was replayed"
    print(f"published {len(published)} messages; replayed by recovery: "
          + ", ".join(f"{c.name} {len(c.replayed('news:recovery'))}" for c in moved))

    # Prometheus sees the node down, and the CrierNodeDown alert (for: 1m) is pending.
    instance = topo.node_url(victim).removeprefix("http://")
    eventually(lambda: topo.prom(f'up{{job="crier", instance="{instance}"}} == 0'), 15, "up == 0 for the stopped node")
    eventually(lambda: topo.prom(f'ALERTS{{alertname="CrierNodeDown", instance="{instance}"}}'), 15,
               "CrierNodeDown pending")
    S["restart"] = victim


@cluster_only
def test_stopped_node_starts_again_and_takes_clients(topo, tmp_path):
    victim = S["restart"]
    # As a person would, in a new shell: without the DEPLOY_CRIER_BIN `up` was given, and with no
    # binary under the default target directory. `start` runs the binary `up` used.
    env = {k: v for k, v in topo.env.items() if k != "DEPLOY_CRIER_BIN"}
    env["CARGO_TARGET_DIR"] = str(tmp_path)
    r = topo.run("start", victim, env=env)
    assert r.returncode == 0, r.stdout
    with open(os.path.join(topo.dir, "pids", victim + ".exe")) as f:
        assert f.read().strip() == os.path.realpath(topo.env["DEPLOY_CRIER_BIN"])
    eventually(lambda: len(topo.prom('up{job="crier"} == 1')) == 3, 20, "three nodes up again")
    # The restarted node has no connections, so least_conn sends new clients there.
    def lands_on_victim():
        c = Client(topo["WS_URL"], token(topo, "late", channels=["news:*"]), "late")
        if c.node == victim:
            S["clients"].append(c)
            return True
        c.close()
        return False

    eventually(lands_on_victim, 15, f"a new client on the restarted {victim}", interval=0.5)


def test_misbehaving_clients_are_counted(topo):
    """Drives the counters the dashboard plots that normal clients do not: recoveries, client
    errors, the per-user rate limit, heartbeat timeouts and slow consumers."""
    # Recovery (through nginx with Redis; with memory brokers, against one node).
    base = topo["WS_URL"] if BROKER == "redis" else topo.node_url("node1").replace("http", "ws") + "/ws"
    rest = None if BROKER == "redis" else topo.node_url("node1")
    tok = token(topo, "recoverer", channels=["news:*"])
    c = Client(base, tok, "recoverer")
    c.subscribe("news:replay")
    for i in range(3):
        topo.publish("news:replay", {"i": i}, url=rest)
    c.wait(lambda: len(c.messages.get("news:replay", [])) == 3, 15, "three messages")
    epoch, offset = c.positions["news:replay"]
    c.close()
    missed = [topo.publish("news:replay", {"i": i}, url=rest)["offset"] for i in range(3, 5)]
    r = Client(base, tok, "recoverer-again")
    r.positions["news:replay"] = (epoch, offset)
    fid = r._subscribe("news:replay", recover=True)
    ack = r.wait(lambda: next((f for f in r.frames if f.get("id") == fid), None), 15, "recover ack")
    assert ack.get("recovered") is True, ack
    r.wait(lambda: r.messages.get("news:replay") == missed, 15, "the missed messages")

    # Client errors and the per-user rate limit: 60 frames at once (burst 40).
    r.send({"type": "no-such-type"})
    for _ in range(60):
        r.send({"type": "ping"})
    r.wait(lambda: any(e["code"] == "unknown_type" for e in r.errors), 15, "unknown_type error")
    r.wait(lambda: any(e["code"] == "rate_limited" for e in r.errors), 15, "rate_limited error")
    r.close()

    # A peer that never answers pings is closed with 4010 after ping_interval + pong_timeout.
    dead = RawClient(topo["WS_URL"], token(topo, "dead"))
    assert dead.read_json()["type"] == "welcome"
    assert dead.wait_close(15) == 4010
    dead.close()

    # A client that stops reading is dropped as a slow consumer once its node has queued more
    # than client_queue_max_bytes for it (after the socket buffers on the way are full).
    slow = RawClient(topo["WS_URL"], token(topo, "slow", channels=["bulk:*"]), rcvbuf=4096)
    node = slow.read_json()["node"]
    slow.send_json({"type": "subscribe", "id": 1, "channel": "bulk:firehose"})
    assert slow.read_json()["type"] == "ack"
    before = topo.metric(node, "crier_slow_consumers_total")
    blob = "x" * 50_000
    deadline = time.monotonic() + 60
    sent = 0
    while topo.metric(node, "crier_slow_consumers_total") == before:
        assert time.monotonic() < deadline and sent < 1000, f"no slow-consumer drop after {sent} messages"
        for _ in range(10):
            topo.publish("bulk:firehose", blob, url=topo.node_url(node))
            sent += 1
    slow.close()


@cluster_only
def test_redis_restart_nodes_turn_unready_then_resume(topo):
    live = [n for n in NODES if http("GET", topo.node_url(n) + "/healthz")[0] == 200]
    assert topo.run("stop", "redis").returncode == 0
    for n in live:
        eventually(lambda n=n: http("GET", topo.node_url(n) + "/readyz")[0] == 503, 15, f"{n} unready without Redis")
    eventually(lambda: topo.prom('ALERTS{alertname="CrierBrokerDown"}'), 15, "CrierBrokerDown pending")
    r = topo.run("start", "redis")
    assert r.returncode == 0, r.stdout
    for n in live:
        eventually(lambda n=n: http("GET", topo.node_url(n) + "/readyz")[0] == 200, 30, f"{n} ready again")
    eventually(lambda: len(topo.prom('crier_broker_up{job="crier"} == 1')) == 3, 15, "crier_broker_up back to 1")
    # Publishing through nginx reaches clients on every node again.
    clients = [c for c in S["clients"] if not c.stopping and "news:lobby" in c.subscribed]
    assert len(clients) == 6
    resp = topo.publish("news:lobby", {"text": "after redis restart"})
    for c in clients:
        c.wait(lambda c=c: any(f.get("type") == "message" and f.get("data") == {"text": "after redis restart"}
                               for f in c.frames), 10, f"{c.name} gets a message after the Redis restart")
    assert resp["offset"] >= 1


def dashboard_queries():
    with open(DASHBOARD) as f:
        dash = json.load(f)
    found = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                found.append((p["title"], t["refId"], t["expr"]))
            walk(p.get("panels", []))

    walk(dash["panels"])
    return dash["templating"]["list"], found


def substitute(expr, values):
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("${__rate_interval}", RATE_INTERVAL)
    for name, value in values.items():
        expr = expr.replace("${" + name + "}", value)
        expr = re.sub(r"\$" + name + r"\b", lambda _m: value, expr)
    assert "$" not in expr, f"unsubstituted variable in {expr}"
    return expr


def test_every_dashboard_query_returns_data(topo):
    variables, queries = dashboard_queries()
    assert len(queries) >= 15
    # Resolve the variables as Grafana does: label_values(selector, label) through Prometheus'
    # label API; "All" becomes allValue (or an alternation of every value).
    values = {}
    for v in variables:
        if v["type"] != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", q)
        assert m, q
        selector = substitute(m.group(1), values)
        got = eventually(lambda: topo.label_values(m.group(2), selector), 10, f"values of ${v['name']}")
        if v.get("includeAll"):
            values[v["name"]] = v.get("allValue") or "(" + "|".join(re.escape(x) for x in got) + ")"
        else:
            assert "crier" in got, got
            values[v["name"]] = "crier"

    expected_missing = set()
    if BROKER != "redis":
        # The memory broker never reconnects, so the counter has no series.
        expected_missing = {"Broker reconnects"}

    def all_have_data():
        missing = []
        for title, ref, expr in queries:
            if title in expected_missing:
                continue
            result = topo.prom(substitute(expr, values))
            if not result or all(s["value"][1] == "NaN" for s in result):
                missing.append(f"{title}/{ref}: {substitute(expr, values)}")
        S["missing"] = missing
        return not missing

    try:
        eventually(all_have_data, 20, "data for every dashboard query", interval=1)
    except AssertionError:
        raise AssertionError("dashboard queries without data:\n  " + "\n  ".join(S["missing"])) from None
    if expected_missing:
        print(f"not checked with the {BROKER} broker: {sorted(expected_missing)}")


ROLLING_CLIENTS = 30


@cluster_only
def test_rolling_restart_of_every_node_under_connected_clients(topo):
    """A rolling restart as Kubernetes does it, through the shipped deploy/nginx.conf: each node
    in turn gets SIGTERM, drains (1012 to its clients), exits, and a new process on the same
    port must be ready before the next node stops — while clients are connected and messages
    are published on a shared channel and on each client's private one. Every client comes back
    through nginx, and has every message once and in order. (With `max_fails=1` in the upstream
    block, nginx counted each draining node's 503s as failures and, once every node had
    drained, answered `502 no live upstreams` for long after: most clients were stranded.)"""
    clients = [Client(topo["WS_URL"], token(topo, f"roller{i}", channels=["news:*", f"private:roller{i}"]),
                      f"roller{i}") for i in range(ROLLING_CLIENTS)]
    S.setdefault("clients", []).extend(clients)
    for i, c in enumerate(clients):
        c.subscribe("news:rolling")
        c.subscribe(f"private:roller{i}")
    assert {c.node for c in clients} == set(NODES), [c.node for c in clients]

    shared, private, stop = [], {i: [] for i in range(ROLLING_CLIENTS)}, threading.Event()

    def publisher():
        # Through nginx, retried with the same idempotency key (as a backend should): a publish
        # that reached a node before the error is not published twice.
        i = 0
        while not stop.is_set():
            r = topo.publish("news:rolling", {"seq": i}, idempotency_key=f"rolling-{i}", attempts=100)
            shared.append(r["offset"])
            k = i % ROLLING_CLIENTS
            r = topo.publish(f"private:roller{k}", {"seq": i}, idempotency_key=f"rolling-p-{i}", attempts=100)
            private[k].append(r["offset"])
            i += 1
            time.sleep(0.02)

    pub = threading.Thread(target=publisher, daemon=True)
    pub.start()
    try:
        eventually(lambda: len(shared) >= 10, 15, "publishing before the restarts")
        for n in NODES:
            on_node = [c for c in clients if c.node == n]
            before = len(shared)
            r = topo.run("stop", n)  # SIGTERM, drain, exit
            assert r.returncode == 0 and topo.exit_status(n) == 0, r.stdout
            for c in on_node:
                c.wait(lambda c=c: c.node != n, 20, f"{c.name} back on another node after {n} stopped")
            r = topo.run("start", n)  # the same port; returns once /readyz answers 200
            assert r.returncode == 0, r.stdout
            eventually(lambda before=before: len(shared) >= before + 10, 20, f"publishing while {n} restarts")
        # Every client is connected through nginx, to a node that is running now.
        for c in clients:
            c.wait(lambda c=c: not c.failure and c.closes and c.ws.state.name == "OPEN", 20,
                   f"{c.name} connected at the end")
    finally:
        stop.set()
        pub.join(timeout=60)
    assert not pub.is_alive()

    def has_all(got, want):
        return got[-1:] == want[-1:] if want else True

    for i, c in enumerate(clients):
        for channel, want in (("news:rolling", shared), (f"private:roller{i}", private[i])):
            c.wait(lambda c=c, ch=channel, w=want: has_all(c.messages.get(ch, []), w), 20,
                   f"{c.name} has every message of {channel}")
            got = c.messages.get(channel, [])
            assert got == sorted(set(got)), f"{c.name}: duplicates or disorder on {channel}"
            assert set(want) <= set(got), f"{c.name}: missing {sorted(set(want) - set(got))} on {channel}"
            assert not got or got == list(range(got[0], got[-1] + 1)), f"{c.name}: gap on {channel}: {got}"
    moved = sum(len(c.nodes) - 1 for c in clients)
    assert moved >= ROLLING_CLIENTS, f"every client was moved at least once ({moved} moves)"
    print(f"rolling restart: {len(shared)} shared and {sum(map(len, private.values()))} private messages, "
          f"{moved} reconnections, nodes at the end: " + ", ".join(f"{n} {sum(c.node == n for c in clients)}" for n in NODES))
