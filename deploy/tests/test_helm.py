"""The Helm chart (deploy/helm/crier): `helm lint`, `helm template` with the default values and
with each ci/*-values.yaml (Sentinel, Cluster, NATS), every rendered object validated against the
Kubernetes 1.30 and 1.37 schemas (kubernetes-validate, strict: unknown fields fail), and the
same consistency checks as the kustomize manifests (selectors, ports, drain-aware grace period,
every CRIER_* variable a real setting, client paths in the Ingress and the API kept out of it).
Plus the chart's refusals: a wrong combination of values, an unknown key (values.schema.json)
or a value of the wrong form fails `helm template` with a message naming the value to change.

helm comes from scripts/test-helm (HELM=path), or from PATH; without it these tests skip."""

import copy
import os
import re
import shutil
import subprocess

import jsonschema
import kubernetes_validate
import pytest
import yaml

from support import ROOT
from test_static import CLIENT_PATHS, K8S_VERSIONS, SERVICE_MONITOR_SCHEMA, by_kind, crier_routes, crier_settings, matches

CHART = os.path.join(ROOT, "deploy", "helm", "crier")
VALUES = ["default", "sentinel", "cluster", "nats"]
# The ServiceMonitor here also sets jobLabel (so the job label is `crier`, as the alerts and the
# dashboard expect).
CHART_SERVICE_MONITOR_SCHEMA = copy.deepcopy(SERVICE_MONITOR_SCHEMA)
CHART_SERVICE_MONITOR_SCHEMA["properties"]["spec"]["properties"]["jobLabel"] = {"type": "string"}
CHART_SERVICE_MONITOR_SCHEMA["properties"]["metadata"]["properties"] = {"labels": {"type": "object"}}


def helm():
    path = os.environ.get("HELM") or shutil.which("helm")
    if not path:
        pytest.skip("helm is not installed: scripts/test-helm installs it and runs these tests")
    return path


def helm_run(*args):
    return subprocess.run([helm(), *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=60)


def template(values="default", *extra):
    args = ["template", "rel", CHART, "--namespace", "realtime"]
    if values != "default":
        args += ["-f", os.path.join(CHART, "ci", f"{values}-values.yaml")]
    r = helm_run(*args, *extra)
    assert r.returncode == 0, f"helm template ({values}) failed:\n{r.stdout}"
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def refused(*set_args):
    args = ["template", "rel", CHART]
    for s in set_args:
        args += ["--set", s]
    r = helm_run(*args)
    assert r.returncode != 0, f"helm template accepted {set_args}"
    return r.stdout


@pytest.fixture(scope="module", params=VALUES)
def rendered(request):
    return request.param, template(request.param)


def test_helm_lint():
    for values in VALUES:
        args = ["lint", "--strict", CHART]
        if values != "default":
            args += ["-f", os.path.join(CHART, "ci", f"{values}-values.yaml")]
        r = helm_run(*args)
        assert r.returncode == 0, r.stdout


def test_helm_renders_and_matches_the_kubernetes_schemas(rendered):
    _, docs = rendered
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= kinds
    for version in K8S_VERSIONS:
        for d in docs:
            if d["kind"] == "ServiceMonitor":
                jsonschema.validate(d, CHART_SERVICE_MONITOR_SCHEMA)
            else:
                kubernetes_validate.validate(copy.deepcopy(d), version, strict=True)


def env_of(docs, container):
    """The CRIER_* variables the pod gets: ConfigMap, Secrets (the chart's) and env."""
    names, values = set(), {}
    for ref in container["envFrom"]:
        if "configMapRef" in ref:
            data = by_kind(docs, "ConfigMap", ref["configMapRef"]["name"])["data"]
        else:
            found = [d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == ref["secretRef"]["name"]]
            if not found:
                continue  # auth.existingSecret: created out of band
            data = found[0].get("stringData") or found[0].get("data")
        names |= set(data)
        values.update(data)
    names |= {e["name"] for e in container["env"]}
    return names, values


def test_helm_chart_is_consistent(rendered):
    which, docs = rendered
    dep = by_kind(docs, "Deployment", "rel-crier")
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    labels = spec["template"]["metadata"]["labels"]
    c = pod["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert {"limits", "requests"} <= set(c["resources"]) and "cpu" in c["resources"]["requests"]
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["enableServiceLinks"] is False
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    # Drain-aware: the grace period covers the preStop sleep, the whole drain and the node's two
    # 5 s waits after it.
    names, values = env_of(docs, c)
    drain = int(values["CRIER_SHUTDOWN_DRAIN"].rstrip("s"))
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][1])
    assert pod["terminationGracePeriodSeconds"] > pre_stop + drain + 10
    # Every variable is a real crier setting (crier warns about unknown ones and ignores them).
    assert names <= crier_settings(), names - crier_settings()
    port = int(values["CRIER_LISTEN"].rsplit(":", 1)[1])
    assert c["ports"][0]["containerPort"] == port
    # The Redis topology asked for, and only that one.
    redis_keys = names & {"CRIER_REDIS_URL", "CRIER_REDIS_SENTINEL_URLS", "CRIER_REDIS_CLUSTER_URLS", "CRIER_NATS_URL"}
    expected = {"default": {"CRIER_REDIS_URL"}, "sentinel": {"CRIER_REDIS_SENTINEL_URLS"},
                "cluster": {"CRIER_REDIS_CLUSTER_URLS"}, "nats": {"CRIER_NATS_URL"}}[which]
    assert redis_keys == expected
    if which == "nats":
        assert values["CRIER_NATS_URL"].count("nats://") == 3 and values["CRIER_NATS_REPLICAS"] == "3"
    # A Redis address may hold a password: never in the ConfigMap unless it is the internal one.
    config = by_kind(docs, "ConfigMap", "rel-crier")["data"]
    assert not any("@" in str(v) for v in config.values())
    if which == "sentinel":
        assert config["CRIER_REDIS_SENTINEL_MASTER"] == "mymaster"
    if which == "default":
        redis_svc = by_kind(docs, "Service", "rel-crier-redis")
        assert config["CRIER_REDIS_URL"] == f"redis://rel-crier-redis:{redis_svc['spec']['ports'][0]['port']}/0"
        redis_pods = by_kind(docs, "Deployment", "rel-crier-redis")["spec"]["template"]["metadata"]["labels"]
        assert matches(redis_svc["spec"]["selector"], redis_pods)
        assert not matches(spec["selector"]["matchLabels"], redis_pods)
    else:
        assert not [d for d in docs if d["metadata"]["name"] == "rel-crier-redis"]
    # Keys: a generated/given Secret, or the existing one named in the values.
    secret_names = {r["secretRef"]["name"] for r in c["envFrom"] if "secretRef" in r}
    if which == "sentinel":
        assert "crier-keys" in secret_names
    else:
        keys = by_kind(docs, "Secret", "rel-crier")["data"]
        assert "CRIER_API_KEYS" in keys
        assert ("CRIER_JWT_SECRET" in keys) == ("CRIER_JWT_PUBLIC_KEY_FILE" not in config)
    # Mounted files are where the settings say.
    mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
    for key in ("CRIER_REDIS_TLS_CA_FILE", "CRIER_JWT_PUBLIC_KEY_FILE"):
        if key in config:
            assert os.path.dirname(config[key]) in mounts
    # Selectors and ports line up.
    svc = by_kind(docs, "Service", "rel-crier")
    assert matches(svc["spec"]["selector"], labels)
    assert matches(spec["selector"]["matchLabels"], labels)
    assert svc["spec"]["ports"][0]["targetPort"] in {p["name"] for p in c["ports"]}
    # Other pods of the release (the internal Redis, the `helm test` Pod) are outside crier's
    # selectors: the Service must not send clients to them, nor the PDB count them.
    for d in docs:
        if d["kind"] == "Pod" or (d["kind"] == "Deployment" and d is not dep):
            pod_labels = d["metadata"]["labels"] if d["kind"] == "Pod" else d["spec"]["template"]["metadata"]["labels"]
            assert not matches(svc["spec"]["selector"], pod_labels), d["metadata"]["name"]
    test_pods = [d for d in docs if d["kind"] == "Pod"]
    assert len(test_pods) == 1 and test_pods[0]["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert f"http://rel-crier:{svc['spec']['ports'][0]['port']}/readyz" in test_pods[0]["spec"]["containers"][0]["command"][-1]
    pdb = by_kind(docs, "PodDisruptionBudget", "rel-crier")
    assert matches(pdb["spec"]["selector"]["matchLabels"], labels) and pdb["spec"]["maxUnavailable"] == 1
    hpas = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    if which == "cluster":
        assert spec["replicas"] == 5 and not hpas
    else:
        assert "replicas" not in spec and hpas[0]["spec"]["scaleTargetRef"]["name"] == "rel-crier"
    # Ingress: the client paths only; the REST API on its own Ingress, if at all.
    for ing in (d for d in docs if d["kind"] == "Ingress"):
        paths = ing["spec"]["rules"][0]["http"]["paths"]
        for p in paths:
            assert p["backend"]["service"]["name"] == "rel-crier"
            assert p["backend"]["service"]["port"]["name"] == svc["spec"]["ports"][0]["name"]
        routed = {p["path"] for p in paths}
        if ing["metadata"]["name"] == "rel-crier":
            assert routed == CLIENT_PATHS and routed <= crier_routes()
            ann = ing["metadata"]["annotations"]
            assert int(ann["nginx.ingress.kubernetes.io/proxy-read-timeout"]) > 35
            assert not any("affinity" in k for k in ann)
        else:
            assert routed == {"/api/v1"} and ing["metadata"]["annotations"]
            assert any(r.startswith("/api/v1/") for r in crier_routes())
    if which == "sentinel":
        sm = by_kind(docs, "ServiceMonitor", "rel-crier")
        assert matches(sm["spec"]["selector"]["matchLabels"], svc["metadata"]["labels"])
        assert svc["metadata"]["labels"][sm["spec"]["jobLabel"]] == "crier"
        assert sm["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}


def test_helm_keeps_the_kustomize_topology():
    """The chart's defaults say what k8s/base says (probes, grace, drain, resources, HPA, PDB)."""
    from test_static import kustomize
    base = kustomize("k8s/base")
    chart = template()
    kdep, cdep = by_kind(base, "Deployment", "crier"), by_kind(chart, "Deployment", "rel-crier")
    kc, cc = kdep["spec"]["template"]["spec"]["containers"][0], cdep["spec"]["template"]["spec"]["containers"][0]
    for field in ("readinessProbe", "livenessProbe", "lifecycle", "resources", "securityContext"):
        assert kc[field] == cc[field], field
    assert kdep["spec"]["strategy"] == cdep["spec"]["strategy"]
    ks, cs = kdep["spec"]["template"]["spec"], cdep["spec"]["template"]["spec"]
    assert ks["terminationGracePeriodSeconds"] == cs["terminationGracePeriodSeconds"]
    assert ks["securityContext"] == cs["securityContext"]
    kconf, cconf = by_kind(base, "ConfigMap", "crier-config")["data"], by_kind(chart, "ConfigMap", "rel-crier")["data"]
    assert {k: v for k, v in kconf.items() if k != "CRIER_REDIS_URL"} == \
        {k: v for k, v in cconf.items() if k != "CRIER_REDIS_URL"}
    khpa, chpa = by_kind(base, "HorizontalPodAutoscaler"), by_kind(chart, "HorizontalPodAutoscaler")
    assert khpa["spec"]["behavior"] == chpa["spec"]["behavior"]
    assert (khpa["spec"]["minReplicas"], khpa["spec"]["maxReplicas"]) == (chpa["spec"]["minReplicas"], chpa["spec"]["maxReplicas"])
    assert by_kind(base, "PodDisruptionBudget")["spec"]["maxUnavailable"] == \
        by_kind(chart, "PodDisruptionBudget")["spec"]["maxUnavailable"]


@pytest.mark.parametrize("set_args, message", [
    (["redis.mode=url"], "redis.mode=url needs its address: set redis.url"),
    (["redis.url=redis://r:6379", "redis.mode=internal"], "redis.url is set but redis.mode is \"internal\""),
    (["redis.mode=sentinel", "redis.sentinel.urls={redis://s:26379}"], "needs redis.sentinel.master"),
    (["redis.mode=cluster", "redis.url=redis://r:6379", "redis.cluster.urls={redis://c:6379}"], "one Redis topology at a time"),
    (["broker=nats"], "broker=nats needs its servers: set nats.urls"),
    (["broker=nats", "nats.urls={nats://n:4222}", "redis.mode=url", "redis.url=redis://r:6379"], "one broker at a time"),
    (["broker=kafka"], "broker: broker must be one of the following"),
    (["broker=nats", "nats.urls={n:4222}"], "Does not match pattern"),
    # values.schema.json: unknown keys (typos) and wrong types or forms.
    (["redis.mode=standalone"], 'redis.mode: redis.mode must be one of the following: "internal", "url"'),
    (["ingres.enabled=true"], "Additional property ingres is not allowed"),
    (["redis.mode=url", "redis.url=localhost:6379"], "redis.url: Does not match pattern"),
    (["replicaCount=three"], "replicaCount: Invalid type"),
    (["auth.jwtSecret=short"], "auth.jwtSecret must be at least 32 bytes"),
    (["settings.PING_INTERVAL=25s"], 'Property name of "PING_INTERVAL" does not match'),
    (["settings.CRIER_SHUTDOWN_DRAIN=60s"], "drain.shutdownDrainSeconds"),
    (["terminationGracePeriodSeconds=12"], "would be killed mid-drain"),
    (["ingress.enabled=true", "ingress.paths={/ws,/api/v1}"], "the REST API is server-to-server"),
])
def test_helm_refuses_wrong_values_with_a_clear_message(set_args, message):
    out = refused(*set_args)
    assert message in out, out


def test_helm_validation_catches_mistakes():
    """The validators used above do reject broken manifests."""
    dep = copy.deepcopy(by_kind(template(), "Deployment", "rel-crier"))
    dep["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGett"] = {}
    with pytest.raises(Exception, match="httpGett"):
        kubernetes_validate.validate(dep, K8S_VERSIONS[0], strict=True)
