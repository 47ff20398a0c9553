"""Checks of the deployment files with the real tools that can run here: promtool (config,
rules, rule unit tests), nginx -t, docker-compose config, hadolint, kubectl kustomize and the
Kubernetes schemas (kubernetes-validate). Plus consistency between the files and the code:
every CRIER_* variable is a real setting, every metric a real metric, every selector matches."""

import copy
import json
import os
import re
import shutil
import subprocess
import tempfile

import jsonschema
import kubernetes_validate
import pytest
import yaml

from support import ROOT

DEPLOY = os.path.join(ROOT, "deploy")
K8S = os.path.join(ROOT, "k8s")
DASHBOARD = os.path.join(ROOT, "grafana", "dashboards", "crier.json")
# Validated against the oldest Kubernetes version we document and the newest schema bundled.
K8S_VERSIONS = ("1.30.0", "1.37.0")


def run(*cmd, cwd=ROOT, env=None):
    r = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout}"
    return r.stdout


def read(*path):
    with open(os.path.join(ROOT, *path)) as f:
        return f.read()


def crier_settings():
    """The CRIER_* variables crier accepts, from the generated settings table."""
    names = set(re.findall(r"`(CRIER_[A-Z0-9_]+)`", read("docs", "configuration.md")))
    assert "CRIER_REDIS_URL" in names and len(names) > 20
    return names | {"CRIER_CONFIG"}


def crier_metrics():
    """Every metric name crier exports (crates/crier/src/metrics.rs), with histogram series."""
    names = set(re.findall(r'pub const [A-Z_]+: &str = "(crier_[a-z_]+)"', read("crates", "crier", "src", "metrics.rs")))
    assert "crier_broadcast_latency_seconds" in names
    for h in ("crier_broadcast_latency_seconds",):
        names |= {h + "_bucket", h + "_sum", h + "_count"}
    return names


def crier_routes():
    """The paths crier routes (crates/crier/src/http.rs)."""
    routes = set(re.findall(r'\.route\("([^"]+)"', read("crates", "crier", "src", "http.rs")))
    assert {"/ws", "/sse", "/crier.js", "/api/v1/publish"} <= routes
    return routes


# The Ingress routes what browsers and apps use, and nothing of the REST API or /metrics.
CLIENT_PATHS = {"/ws", "/sse", "/crier.js"}


# The standard process collector's series that crier exports next to its own (the names every
# Prometheus client library uses), plotted per node on the dashboard.
PROCESS_METRICS = {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds", "process_max_fds"}


def process_metrics():
    """The process_* metrics crier exports, as docs/protocol.md lists them."""
    return set(re.findall(r"`(process_[a-z_]+)`", read("docs", "protocol.md")))


def metric_names(expr):
    return set(re.findall(r"\b((?:crier|process)_[a-z_]+)\b", expr))


# --- Prometheus -----------------------------------------------------------------------------

def test_promtool_checks_config_and_rules():
    run("promtool", "check", "config", "deploy/prometheus.yml")
    run("promtool", "check", "rules", "deploy/alerts.yml")


def test_promtool_rule_unit_tests():
    out = run("promtool", "test", "rules", "alerts.test.yml", cwd=DEPLOY)
    assert "SUCCESS" in out


def test_alerts_cover_the_issue_and_use_real_metrics():
    rules = yaml.safe_load(read("deploy", "alerts.yml"))["groups"][0]["rules"]
    names = {r["alert"] for r in rules}
    assert {"CrierNodeDown", "CrierBrokerDown", "CrierHandshakeFailuresHigh", "CrierSlowConsumerDrops",
            "CrierBroadcastLatencyHigh"} <= names
    known = crier_metrics()
    for r in rules:
        assert metric_names(r["expr"]) <= known, r["alert"]
        assert r["labels"]["severity"] in ("warning", "critical")
        anchor = r["annotations"]["runbook"].split("#")[1]
        assert f"### {r['alert']}" in read("docs", "operations.md"), f"docs/operations.md lacks {anchor}"
    tested = set(re.findall(r"alertname: (\w+)", read("deploy", "alerts.test.yml")))
    assert names <= tested, f"alerts without a unit test: {names - tested}"


# --- nginx ----------------------------------------------------------------------------------

def test_nginx_config_is_accepted_by_nginx():
    with tempfile.TemporaryDirectory() as d:
        os.makedirs(os.path.join(d, "tmp"))
        conf = os.path.join(d, "nginx.conf")
        run("python3", "deploy/local/render.py", "nginx", "deploy/nginx.conf", conf, "--listen", "127.0.0.1:1",
            "--upstreams", "127.0.0.1:2,127.0.0.1:3,127.0.0.1:4", "--prefix", d)
        run(shutil.which("nginx") or "/usr/sbin/nginx", "-t", "-q", "-p", d + "/", "-e", os.path.join(d, "error.log"), "-c", conf)


def test_nginx_config_websocket_timeouts_and_no_stickiness():
    conf = read("deploy", "nginx.conf")
    assert "proxy_set_header Upgrade $http_upgrade;" in conf
    assert "proxy_set_header Connection $connection_upgrade;" in conf
    assert "proxy_http_version 1.1;" in conf
    assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in conf
    ws = conf[conf.index("location = /ws"):]
    ws = ws[:ws.index("}")]
    ping = 25 + 10  # ping_interval + pong_timeout defaults
    for d in ("proxy_read_timeout", "proxy_send_timeout"):
        secs = int(re.search(rf"{d} (\d+)s;", ws).group(1))
        assert secs > ping, f"{d} {secs}s must exceed ping_interval + pong_timeout"
    directives = re.sub(r"#.*", "", conf)
    for sticky in ("ip_hash", "sticky", "hash $"):
        assert sticky not in directives
    # Tokens may travel in ?token=: the access log must not contain the query string.
    fmt = conf[conf.index("log_format"):conf.index(";", conf.index("log_format"))]
    for leaky in ("$request ", '$request"', "$request_uri", "$args", "$query_string", "$http_authorization"):
        assert leaky not in fmt


def test_nginx_config_never_marks_a_draining_node_failed():
    """A draining node answers handshakes 503: nginx must pass them to another node, and must not
    count them as failures (max_fails > 0 marks every node failed in a rolling restart, and a
    WebSocket probe never clears the mark: `502 no live upstreams`; test_topology's rolling
    restart shows it end to end)."""
    conf = re.sub(r"#.*", "", read("deploy", "nginx.conf"))
    upstream = conf[conf.index("upstream crier"):]
    upstream = upstream[:upstream.index("}")]
    servers = re.findall(r"^\s*server (\S+)(.*);$", upstream, re.M)
    assert len(servers) == 3, servers
    for addr, params in servers:
        assert re.search(r"\bmax_fails=0\b", params), f"{addr}: max_fails must be 0, got {params!r}"
    server = conf[conf.index("server {"):conf.index("location")]
    retry = re.search(r"proxy_next_upstream ([^;]*);", server).group(1).split()
    assert {"error", "timeout", "http_503"} <= set(retry), retry
    tries = int(re.search(r"proxy_next_upstream_tries (\d+);", server).group(1))
    assert tries >= len(servers), "one handshake must be able to reach every node"
    ws = conf[conf.index("location = /ws"):]
    assert "proxy_next_upstream " not in ws[:ws.index("}")], "/ws must keep the server-level retries"


# --- docker ---------------------------------------------------------------------------------

def compose():
    return yaml.safe_load(read("deploy", "docker-compose.yml"))


def test_docker_compose_config_is_valid():
    if not shutil.which("docker-compose"):
        pytest.skip("docker-compose not installed (scripts/test-deploy installs it)")
    env = dict(os.environ, CRIER_JWT_SECRET="x" * 40, CRIER_API_KEYS="k")
    run("docker-compose", "-f", "deploy/docker-compose.yml", "config", "-q", env=env)


def test_docker_compose_topology():
    c = compose()
    services = c["services"]
    nodes = sorted(s for s in services if re.fullmatch(r"crier\d+", s))
    assert nodes == ["crier1", "crier2", "crier3"]
    settings = crier_settings()
    for n in nodes:
        env = services[n]["environment"]
        assert env["CRIER_REDIS_URL"].startswith("redis://redis:")
        assert env["CRIER_NODE_ID"] == n
        assert set(env) <= settings, set(env) - settings
        drain = int(env["CRIER_SHUTDOWN_DRAIN"].rstrip("s"))
        # The drain, then up to 5 s for open requests and 5 s for sessions to end (server.rs).
        assert int(services[n]["stop_grace_period"].rstrip("s")) > drain + 10
    for s in ("redis", "nginx", "prometheus", "grafana"):
        assert s in services
    # crier trusts X-Forwarded-For from nginx's fixed address, and only from it.
    nginx_ip = services["nginx"]["networks"]["crier"]["ipv4_address"]
    assert all(services[n]["environment"]["CRIER_TRUSTED_PROXIES"] == nginx_ip for n in nodes)
    # nginx balances over exactly those nodes; Prometheus scrapes each of them.
    nginx = read("deploy", "nginx.conf")
    assert sorted(re.findall(r"server (crier\d+):8080", nginx)) == nodes
    prom = yaml.safe_load(read("deploy", "prometheus.yml"))
    targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(t.split(":")[0] for t in targets) == nodes
    # Grafana gets the provisioning and the dashboard where the provider looks for it.
    mounts = services["grafana"]["volumes"]
    provider = yaml.safe_load(read("grafana", "provisioning", "dashboards", "crier.yml"))
    path = provider["providers"][0]["options"]["path"]
    assert f"../grafana/dashboards:{path}:ro" in mounts
    assert "../grafana/provisioning:/etc/grafana/provisioning:ro" in mounts
    ds = yaml.safe_load(read("grafana", "provisioning", "datasources", "prometheus.yml"))["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"


def test_dockerfile():
    text = read("Dockerfile")
    if shutil.which("hadolint"):
        run("hadolint", "Dockerfile")
    assert len(re.findall(r"^FROM ", text, re.M)) == 2, "multi-stage build"
    assert "cargo build --release --locked -p crier" in text
    user = re.search(r"^USER (\S+)", text, re.M).group(1)
    assert not user.startswith("0") and user != "root"
    assert re.search(r"^STOPSIGNAL SIGTERM$", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", text, re.M)
    ignore = read(".dockerignore")
    assert "**/target" in ignore and ".git" in ignore


def docker_ignored(rel, patterns):
    """Whether the build context leaves out `rel` (Docker's rules, simplified: the last matching
    pattern wins, `!` re-includes, a pattern matching a parent directory covers what is below,
    `**` spans directories, `*` and `?` do not)."""

    def regex(pat):
        out, i = "", 0
        while i < len(pat):
            if pat.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pat[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pat[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pat[i]), i + 1
        return out

    ignored = False
    parts = rel.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pat in patterns:
        neg = pat.startswith("!")
        body = (pat[1:] if neg else pat).strip("/")
        if any(re.fullmatch(regex(body), p) for p in prefixes):
            ignored = not neg
    return ignored


def test_docker_context_holds_every_embedded_file():
    """`include_str!`/`include_bytes!` in the gateway's sources must survive .dockerignore, or the
    image build fails (docs/openapi.json and clients/js are embedded)."""
    patterns = [l.strip() for l in read(".dockerignore").splitlines() if l.strip() and not l.startswith("#")]
    embedded = []
    for crate in ("crier", "crier-core", "crier-protocol", "crier-redis"):
        src = os.path.join(ROOT, "crates", crate, "src")
        for dirpath, _, files in os.walk(src):
            for name in files:
                if not name.endswith(".rs"):
                    continue
                path = os.path.join(dirpath, name)
                with open(path) as f:
                    for m in re.finditer(r'include_(?:str|bytes)!\("([^"]+)"\)', f.read()):
                        target = os.path.normpath(os.path.join(dirpath, m.group(1)))
                        embedded.append(os.path.relpath(target, ROOT))
    assert embedded, "expected embedded files (demo page, /crier.js, OpenAPI)"
    for rel in embedded:
        assert os.path.exists(os.path.join(ROOT, rel)), rel
        assert not docker_ignored(rel, patterns), f"{rel} is embedded but .dockerignore leaves it out"
    for left_out in ("docs/cluster.md", "target/release/crier", "clients/js/node_modules/ws/index.js", "README.md"):
        assert docker_ignored(left_out, patterns), f"the rules above should leave out {left_out}"


# --- Grafana --------------------------------------------------------------------------------

def dashboard():
    with open(DASHBOARD) as f:
        return json.load(f)


def all_panels(panels):
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))


def test_dashboard_structure():
    d = dashboard()
    panels = list(all_panels(d["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert rows == ["Overview", "Handshakes", "Messages", "Drops and limits", "Broker and recovery", "Resources"]
    # No two panels overlap on the 24-column grid.
    cells = {}
    for p in panels:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert {"job", "instance"} <= set(variables)
    known = crier_metrics() | process_metrics() | {"up"}
    assert PROCESS_METRICS <= process_metrics()
    for p in panels:
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}"
            expr = t["expr"]
            assert 'job=~"$job"' in expr and 'instance=~"$instance"' in expr, expr
            assert metric_names(expr) <= known, expr
            if "rate(" in expr:
                assert "[$__rate_interval]" in expr, expr
    latency = [p for p in panels if p["title"] == "Broadcast latency"][0]
    exprs = [t["expr"] for t in latency["targets"]]
    for q in ("0.5", "0.95", "0.99"):
        assert any(e.startswith(f"histogram_quantile({q}, sum by (le) (rate(crier_broadcast_latency_seconds_bucket{{") for e in exprs)
    plotted = set().union(*(metric_names(t["expr"]) for p in panels for t in p.get("targets", [])))
    contract = {"crier_connections", "crier_handshakes_total", "crier_subscriptions", "crier_channels",
                "crier_messages_published_total", "crier_messages_delivered_total",
                "crier_broadcast_latency_seconds_bucket", "crier_rate_limited_total", "crier_slow_consumers_total",
                "crier_heartbeat_timeouts_total", "crier_client_errors_total", "crier_broker_up",
                "crier_broker_reconnects_total", "crier_recoveries_total"} | PROCESS_METRICS
    assert contract <= plotted, contract - plotted
    # Memory and CPU per node: by instance, CPU as a rate.
    for title in ("Memory (RSS) by node", "CPU by node", "Open files by node"):
        (panel,) = [p for p in panels if p["title"] == title]
        assert all(t["expr"].startswith("sum by (instance) (") for t in panel["targets"]), title
    (cpu,) = [p for p in panels if p["title"] == "CPU by node"]
    assert "rate(process_cpu_seconds_total{" in cpu["targets"][0]["expr"]


# --- Kubernetes -----------------------------------------------------------------------------

SERVICE_MONITOR_SCHEMA = {
    # The fields of monitoring.coreos.com/v1 ServiceMonitor used here (the CRD's own schema is
    # not bundled with kubernetes-validate).
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "properties": {"matchLabels": {"type": "object"}},
                             "additionalProperties": False},
                "namespaceSelector": {"type": "object"},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["port"], "additionalProperties": False,
                    "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                                   "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                   "scrapeTimeout": {"type": "string"}, "scheme": {"enum": ["http", "https"]}}}},
            },
        },
    },
}


def kustomize(path):
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed to render k8s/"
    return [d for d in yaml.safe_load_all(run(kubectl, "kustomize", path)) if d]


@pytest.fixture(scope="module")
def overlay():
    return kustomize("k8s/overlays/example")


def by_kind(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert found, f"no {kind} {name or ''}"
    return found[0]


@pytest.mark.parametrize("path", ["k8s/base", "k8s/overlays/example"])
def test_k8s_renders_and_matches_the_kubernetes_schemas(path):
    docs = kustomize(path)
    for version in K8S_VERSIONS:
        for d in docs:
            if d["kind"] == "ServiceMonitor":
                jsonschema.validate(d, SERVICE_MONITOR_SCHEMA)
            else:
                kubernetes_validate.validate(copy.deepcopy(d), version, strict=True)


def matches(selector, labels):
    return selector and all(labels.get(k) == v for k, v in selector.items())


def test_k8s_overlay_is_consistent(overlay):
    docs = overlay
    dep = by_kind(docs, "Deployment", "crier")
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    c = pod["containers"][0]
    assert spec["replicas"] == 3
    assert c["image"] == "registry.example.com/crier:0.1.0"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"limits", "requests"} <= set(c["resources"])
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and pod["securityContext"]["runAsNonRoot"] is True
    assert pod["affinity"]["podAntiAffinity"]
    # terminationGracePeriodSeconds covers the preStop sleep, the whole drain and the node's two
    # 5 s waits after it (open requests, sessions ending; server.rs).
    config = by_kind(docs, "ConfigMap", "crier-config")["data"]
    drain = int(config["CRIER_SHUTDOWN_DRAIN"].rstrip("s"))
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain + 10
    # Every CRIER_* variable given to the pod is a real setting (crier refuses unknown ones).
    secret = by_kind(docs, "Secret", "crier-secrets")
    settings = crier_settings()
    given = set(config) | set(secret["stringData"]) | {e["name"] for e in c["env"]}
    assert given <= settings, given - settings
    assert {"CRIER_JWT_SECRET", "CRIER_API_KEYS", "CRIER_REDIS_URL"} <= set(secret["stringData"])
    refs = {r.get("configMapRef", r.get("secretRef"))["name"] for r in c["envFrom"]}
    assert refs == {"crier-config", "crier-secrets"}
    # Selectors and ports line up.
    svc = by_kind(docs, "Service", "crier")
    assert matches(svc["spec"]["selector"], labels)
    assert matches(spec["selector"]["matchLabels"], labels)
    port_names = {p["name"] for p in c["ports"]}
    assert all(p["targetPort"] in port_names for p in svc["spec"]["ports"])
    ing = by_kind(docs, "Ingress", "crier")
    paths = ing["spec"]["rules"][0]["http"]["paths"]
    for p in paths:
        backend = p["backend"]["service"]
        assert backend["name"] == "crier" and backend["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}
    routed = {p["path"] for p in paths}
    assert routed == CLIENT_PATHS and routed <= crier_routes(), routed
    ann = ing["metadata"]["annotations"]
    assert int(ann["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > 35
    assert int(ann["nginx.ingress.kubernetes.io/proxy-send-timeout"]) > 35
    assert not any("affinity" in k for k in ann)
    hpa = by_kind(docs, "HorizontalPodAutoscaler", "crier")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "crier" and hpa["spec"]["minReplicas"] >= 3
    pdb = by_kind(docs, "PodDisruptionBudget", "crier")
    assert matches(pdb["spec"]["selector"]["matchLabels"], labels)
    sm = by_kind(docs, "ServiceMonitor", "crier")
    assert matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
    assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    # The example Redis is what the Secret's CRIER_REDIS_URL points at.
    redis_svc = by_kind(docs, "Service", "redis")
    host_port = re.match(r"redis://([^:/]+):(\d+)", secret["stringData"]["CRIER_REDIS_URL"]).groups()
    assert host_port == ("redis", str(redis_svc["spec"]["ports"][0]["port"]))
    assert not matches(svc["spec"]["selector"], by_kind(docs, "Deployment", "redis")["spec"]["template"]["metadata"]["labels"])
    assert all(d["metadata"].get("namespace") == "crier-example" for d in docs if d["kind"] != "Namespace")


def test_k8s_validation_catches_mistakes(overlay):
    """The validators used above do reject broken manifests."""
    dep = copy.deepcopy(by_kind(overlay, "Deployment", "crier"))
    dep["spec"]["replicass"] = 3
    with pytest.raises(Exception, match="replicass"):
        kubernetes_validate.validate(dep, K8S_VERSIONS[0], strict=True)
    sm = copy.deepcopy(by_kind(overlay, "ServiceMonitor", "crier"))
    sm["spec"]["endpoints"][0]["intervall"] = "15s"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(sm, SERVICE_MONITOR_SCHEMA)
