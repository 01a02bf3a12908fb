"""The API image's install, made without Docker: the files infra/docker/api.Dockerfile copies, installed with
the base dependencies only (no extras, constraints.txt's versions) into a fresh venv, import the API app and
every module of api/ and common/. The shared test venv has every extra, so no other test would see a module the
API imports but the base dependencies leave out (the API image once died at start on `import numpy`)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "infra" / "docker" / "api.Dockerfile"

# Run inside the fresh venv, away from the repository: every module must come from the installed package.
IMPORT_EVERYTHING = """
import importlib, json, pkgutil, sys
import api, common
from api.main import app
assert app.routes, "the app has no routes"
names = [m.name for pkg in (api, common) for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names, "loaded": sorted(sys.modules), "api_file": api.__file__}))
"""


def _copied_paths() -> list[str]:
    """The sources of the Dockerfile's COPY lines, as given (relative to the build context)."""
    paths: list[str] = []
    for line in re.findall(r"^COPY (?!--from)(.+)$", DOCKERFILE.read_text(), flags=re.M):
        *sources, _destination = line.split()
        paths += [s for s in sources if not s.startswith("--")]
    return paths


def test_the_api_image_install_imports_the_app_and_every_module(tmp_path):
    src = tmp_path / "src"
    for rel in _copied_paths():
        target = src / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if (ROOT / rel).is_dir():
            shutil.copytree(ROOT / rel, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(ROOT / rel, target)
    assert (src / "pyproject.toml").exists() and (src / "api" / "main.py").exists(), _copied_paths()

    venv = tmp_path / "venv"
    # no pip of its own in the venv (ensurepip costs seconds): the test venv's pip installs into it
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    install = subprocess.run(
        [*pip, "install", "--quiet", "-c", str(src / "constraints.txt"), str(src)],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    # the base install carries no extra: had it JAX or torch, a missing base dependency could hide behind them
    listed = subprocess.run([*pip, "list", "--format=freeze"], capture_output=True, text=True, check=True, env=env)
    names = {line.split("==")[0].lower() for line in listed.stdout.split()}
    assert not {"jax", "jaxlib", "flax", "torch"} & names, sorted(names)

    run = subprocess.run(
        [str(python), "-c", IMPORT_EVERYTHING], capture_output=True, text=True, check=False, env=env, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-4000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert str(venv) in report["api_file"], report["api_file"]  # the installed package, not the checkout
    assert {"api.main", "api.routes.jobs", "common.storage", "common.inputs"} <= set(report["modules"])
    assert not {"jax", "torch", "worker.engine"} & set(report["loaded"])  # the API never loads the engine
