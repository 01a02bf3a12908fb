"""Deployment files, checked offline: Kubernetes schemas, the Compose specification, hadolint, and the
environment variables they set against what the settings class reads."""

from __future__ import annotations

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
KUBERNETES_VERSION = "1.31.0"


def _tool(name: str) -> str:
    return shutil.which(name) or str(Path(sys.executable).parent / name)


def _docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in K8S for d in yaml.safe_load_all(p.read_text()) if d]


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_manifests_validate(path):
    schema = json.loads((Path(__file__).parent / "scaledobject.schema.json").read_text())
    for doc in yaml.safe_load_all(path.read_text()):
        if doc["kind"] == "ScaledObject":  # a KEDA CRD: not in the Kubernetes schemas
            jsonschema.validate(doc, schema)
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_compose_file_follows_the_compose_specification():
    proc = subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_lint_clean(path):
    proc = subprocess.run([_tool("hadolint"), str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout


def _set_variables() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    found["docker-compose.yml"] = set(compose["x-sdxl-env"])
    for service in compose["services"].values():
        found["docker-compose.yml"].update(service.get("environment") or {})
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
