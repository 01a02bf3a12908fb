"""Deployment files, checked offline: Kubernetes schemas, the Compose specification, hadolint, and the
environment variables they set against what the settings class reads. tests/infra/test_compose.py brings the
compose stack up for real."""

from __future__ import annotations

import importlib.resources
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from common.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S = sorted((ROOT / "infra" / "k8s").glob("*.yaml"))
DOCKERFILES = sorted((ROOT / "infra" / "docker").glob("*.Dockerfile"))
COMPOSE = ROOT / "docker-compose.yml"
NO_REGISTRY = ROOT / "docker-compose.no-registry.yml"
STANDINS = ROOT / "infra" / "docker" / "standins.Dockerfile"
PROMETHEUS_CONFIGS = ("prometheus.yml", "prometheus-host-network.yml")  # the second: the no-registry file's
KUBERNETES_VERSION = "1.31.0"
KEDA_KINDS = {"ScaledObject": "scaledobject.schema.json", "TriggerAuthentication": "triggerauthentication.schema.json"}


def _tool(name: str) -> str:
    return shutil.which(name) or str(Path(sys.executable).parent / name)


def _docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in K8S for d in yaml.safe_load_all(p.read_text()) if d]


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_manifests_validate(path):
    for doc in yaml.safe_load_all(path.read_text()):
        if doc["kind"] in KEDA_KINDS:  # KEDA's CRDs: not in the Kubernetes schemas
            jsonschema.validate(doc, json.loads((Path(__file__).parent / KEDA_KINDS[doc["kind"]]).read_text()))
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def _compose(path: Path) -> dict:
    """A Compose file as Compose reads it: its merge tags (`!reset []`: drop the base file's value) load as
    their plain values, which is what the specification's schema describes."""

    class Loader(yaml.SafeLoader):
        pass

    def plain(loader: yaml.SafeLoader, node: yaml.Node) -> object:
        if isinstance(node, yaml.SequenceNode):
            return loader.construct_sequence(node, deep=True)
        if isinstance(node, yaml.MappingNode):
            return loader.construct_mapping(node, deep=True)
        return loader.construct_scalar(node)

    for tag in ("!reset", "!override"):
        Loader.add_constructor(tag, plain)
    return yaml.load(path.read_text(), Loader=Loader)  # a SafeLoader with two tags added


@pytest.mark.parametrize("path", [COMPOSE, NO_REGISTRY], ids=lambda p: p.name)
def test_compose_files_follow_the_compose_specification(path):
    # the schema check-jsonschema carries (its command line cannot read the override's `!reset`)
    schema_file = importlib.resources.files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    jsonschema.validate(_compose(path), json.loads(schema_file.read_text()))


def test_every_registry_image_is_a_variable_and_every_base_image_default_is_one():
    compose = _compose(COMPOSE)
    for name, service in compose["services"].items():
        assert re.fullmatch(r"\$\{[A-Z0-9_]+_IMAGE:-[^}]+\}", service["image"]), (name, service["image"])
    defaults = {re.search(r"^ARG BASE_IMAGE=(\S+)$", p.read_text(), flags=re.M).group(1) for p in DOCKERFILES}
    for service in compose["services"].values():
        if "build" in service:
            defaults.add(re.fullmatch(r"\$\{BASE_IMAGE:-([^}]+)\}", service["build"]["args"]["BASE_IMAGE"]).group(1))
    assert len(defaults) == 1, defaults
    for path in DOCKERFILES:  # every stage starts from the build argument
        assert set(re.findall(r"^FROM (\S+)", path.read_text(), flags=re.M)) == {"${BASE_IMAGE}"}, path.name


def test_the_no_registry_file_builds_every_service_it_runs_on_the_host_network():
    base, override = _compose(COMPOSE)["services"], _compose(NO_REGISTRY)["services"]
    assert set(override) <= set(base), set(override) - set(base)  # a misspelt name would add a service
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", STANDINS.read_text(), flags=re.M))
    for name, service in base.items():
        if service.get("profiles") or override[name].get("profiles"):
            continue  # worker-tpu (profile tpu) and grafana (no stand-in: profile grafana)
        merged = {**service, **override[name]}
        assert merged["network_mode"] == "host" and merged.get("ports", []) == [], name
        assert "build" in merged or merged.get("pull_policy") == "never", f"{name} would pull {merged['image']}"
        if merged["image"].startswith("sdxl-standin-") and "build" in override[name]:
            assert override[name]["build"]["target"] in targets, name


def test_the_stand_ins_pins_are_the_constraints():
    pinned = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", (ROOT / "constraints.txt").read_text(), flags=re.M))
    found = re.findall(r"\b([a-z0-9_-]+)(?:\[[a-z,]+\])?==([0-9][^\s\"]*)", STANDINS.read_text())
    assert found, "no pinned package in the stand-ins"
    for name, version in found:
        if name in pinned:
            assert version == pinned[name], f"{name}=={version} in {STANDINS.name}, {pinned[name]} in constraints.txt"


def test_both_prometheus_configurations_scrape_the_same_jobs():
    configs = [yaml.safe_load((ROOT / "infra" / "prometheus" / name).read_text()) for name in PROMETHEUS_CONFIGS]
    jobs = [[job["job_name"] for job in config["scrape_configs"]] for config in configs]
    assert jobs[0] == jobs[1], jobs


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_lint_clean(path):
    proc = subprocess.run([_tool("hadolint"), str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout


def _set_variables() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (COMPOSE, NO_REGISTRY):
        compose = _compose(path)
        found[path.name] = set(compose.get("x-sdxl-env", {}))
        for service in compose["services"].values():
            found[path.name].update(service.get("environment") or {})
    for path, doc in _docs():
        if doc["kind"] == "ConfigMap":
            found.setdefault(path.name, set()).update(doc["data"])
        for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            found.setdefault(path.name, set()).update(e["name"] for e in container.get("env", []))
    for path in DOCKERFILES:
        for line in re.findall(r"^ENV (.+(?:\\\n.+)*)", path.read_text(), flags=re.M):
            found.setdefault(path.name, set()).update(re.findall(r"(\w+)=", line))
    return {k: {v for v in vs if v.startswith("SDXL_")} for k, vs in found.items()}


def test_every_variable_the_files_set_is_a_setting():
    read = {f"SDXL_{name.upper()}" for name in Settings.model_fields} | {"SDXL_TINY_DIR"}  # tiny.default_dir
    for where, names in _set_variables().items():
        assert names <= read, f"{where} sets {sorted(names - read)}, which no settings class reads"


def test_autoscalers_point_at_real_deployments_and_queues():
    deployments = {d["metadata"]["name"]: d for _, d in _docs() if d["kind"] == "Deployment"}
    for _, doc in _docs():
        if doc["kind"] != "ScaledObject":
            continue
        target = deployments[doc["spec"]["scaleTargetRef"]["name"]]
        container = target["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"] if e.get("value") is not None}
        consumed = Settings(**{k.removeprefix("SDXL_").lower(): v for k, v in env.items()}).worker_queues
        assert doc["spec"]["triggers"][0]["metadata"]["listName"] in consumed
        # a worker must be allowed to finish its batch on scale-in
        assert target["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 300


def _secret_env(container: dict) -> dict[str, tuple[str, str]]:
    """A container's variables read from Secrets: name -> (secret, key)."""
    return {
        e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


def _containers(kind: str) -> list[tuple[str, dict]]:
    return [
        (d["metadata"]["name"], c)
        for _, d in _docs()
        if d["kind"] == kind
        for c in d["spec"]["template"]["spec"]["containers"]
    ]


def test_redis_requires_a_password_from_a_secret_and_every_client_sends_it():
    (_, redis_container), *others = _containers("StatefulSet")
    assert not others
    args = redis_container["args"]
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert _secret_env(redis_container)["REDIS_PASSWORD"] == ("sdxl-redis", "password")
    for _, doc in _docs():
        assert doc["kind"] != "ConfigMap" or "SDXL_REDIS_URL" not in doc["data"]  # no URL without the password
    deployments = _containers("Deployment")
    assert {name for name, _ in deployments} >= {"api", "worker-v5e-4", "worker-v5e-8", "worker-v5e-4-bulk"}
    for name, container in deployments:
        env = [e["name"] for e in container["env"]]
        url = next(e["value"] for e in container["env"] if e["name"] == "SDXL_REDIS_URL")
        assert url.startswith("redis://:$(REDIS_PASSWORD)@redis."), (name, url)
        # Kubernetes expands $(VAR) only from variables defined before it
        assert env.index("REDIS_PASSWORD") < env.index("SDXL_REDIS_URL"), name
        assert _secret_env(container)["REDIS_PASSWORD"] == ("sdxl-redis", "password"), name
    auth = {d["metadata"]["name"]: d for _, d in _docs() if d["kind"] == "TriggerAuthentication"}
    for _, doc in _docs():
        if doc["kind"] == "ScaledObject":
            ref = auth[doc["spec"]["triggers"][0]["authenticationRef"]["name"]]
            assert {"parameter": "password", "name": "sdxl-redis", "key": "password"} in ref["spec"]["secretTargetRef"]


def test_the_api_is_reached_only_through_a_tls_ingress_and_its_metrics_need_a_key():
    ingresses = [d for _, d in _docs() if d["kind"] == "Ingress"]
    assert len(ingresses) == 1
    ingress = ingresses[0]
    assert (
        ingress["spec"]["tls"][0]["secretName"]
        and ingress["metadata"]["annotations"]["kubernetes.io/ingress.allow-http"] == "false"
    )
    hosts = {h for t in ingress["spec"]["tls"] for h in t["hosts"]}
    assert {r["host"] for r in ingress["spec"]["rules"]} <= hosts  # no rule served without its certificate
    for _, doc in _docs():
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", doc["metadata"]["name"]
    (_, api), *_ = [(n, c) for n, c in _containers("Deployment") if n == "api"]
    assert _secret_env(api)["SDXL_METRICS_KEY"] == ("sdxl-metrics", "key")


def test_network_policies_deny_by_default_and_let_only_the_services_reach_redis():
    policies = {d["metadata"]["name"]: d["spec"] for _, d in _docs() if d["kind"] == "NetworkPolicy"}
    deny = [p for p in policies.values() if p["podSelector"] == {} and not p.get("ingress")]
    assert deny and "Ingress" in deny[0]["policyTypes"]
    redis_policy = [p for p in policies.values() if p["podSelector"].get("matchLabels") == {"app": "redis"}]
    assert len(redis_policy) == 1
    (rule,) = redis_policy[0]["ingress"]
    pods = [f["podSelector"]["matchLabels"]["app"] for f in rule["from"] if "podSelector" in f]
    assert sorted(pods) == ["api", "worker"] and rule["ports"] == [{"port": 6379, "protocol": "TCP"}]
    labelled = {d["spec"]["template"]["metadata"]["labels"]["app"] for _, d in _docs() if d["kind"] == "Deployment"}
    assert labelled == {"api", "worker"}  # the labels the policies select are the pods'


def test_compose_publishes_its_consoles_on_the_loopback_only():
    """Flower, Prometheus, Grafana and MinIO have no login worth the name here: reachable from this machine only."""
    services = _compose(COMPOSE)["services"]
    for name in ("flower", "prometheus", "grafana", "s3"):
        for port in services[name]["ports"]:
            assert str(port).startswith("127.0.0.1:"), (name, port)


@pytest.mark.parametrize("path", [COMPOSE, NO_REGISTRY], ids=lambda p: p.name)
def test_compose_redis_asks_for_a_password_and_every_client_sends_it(path):
    compose = _compose(path)
    command = compose["services"]["redis"]["command"]
    password = command[command.index("--requirepass") + 1]
    assert password == "${REDIS_PASSWORD:-sdxl-local-redis}"  # from the environment; the default for local use
    urls = [compose.get("x-sdxl-env", {}).get("SDXL_REDIS_URL")]
    urls += [(s.get("environment") or {}).get("SDXL_REDIS_URL") for s in compose["services"].values()]
    urls += [a.removeprefix("--broker=") for a in compose["services"]["flower"]["command"] if a.startswith("--broker=")]
    urls = [u for u in urls if u]
    assert urls and all(u.startswith(f"redis://:{password}@redis:") for u in urls), urls
    assert password in " ".join(compose["services"]["redis"]["healthcheck"]["test"])
