"""What every bench script shares: its command line's output flag, the environment it measured (commit, dirty
flag, versions, platform, devices), timings as median / p10 / p90 of their samples, and one result file with
fixed top-level keys.

A result file (bench/results/*.json) is always

    {"bench": "engine",                 # the script's name
     "scenario": {...},                 # what was measured: the script's arguments
     "environment": {...},              # Environment below, gathered once per run
     "method": "...",                   # how: the script's docstring
     "results": [{"figure": ..., ...}]} # one record per figure, in the order measured

and is rewritten atomically (a temporary file, then a rename) after every figure, so a run that dies keeps
what it had measured (and one that dies before its first figure leaves an earlier file at its path alone).
docs/benchmarks.md's tables are rendered from these files by bench/tables.py.

Versions come from the installed packages' metadata, never by importing them: a JAX bench must not import
torch to say which torch is installed (bench/imports.py measures what that costs). Devices are read only when
the script has imported JAX itself.

A machine whose copy of the tree has no .git (the device machine: bench/accelerator.sh) gets the commit and dirty
flag from PROVENANCE, written beside the wheels by `bench/accelerator.sh prepare` (save_provenance), and says so in
the environment's note. A run whose processes add figures one after another reopens the file with
ResultFile.resume.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
KEYS = ("bench", "scenario", "environment", "method", "results")
PACKAGES = ("jax", "jaxlib", "flax", "numpy", "torch", "diffusers", "transformers", "redis", "celery")
PROVENANCE = ROOT / ".wheels" / "provenance.json"  # the commit a tree without .git was prepared from
FROM_PROVENANCE = "commit and dirty flag from .wheels/provenance.json (`bench/accelerator.sh prepare`): no .git here"
BEFORE_HARNESS = "recorded before bench/harness.py: the commit measured is unknown; what the script wrote is kept"
BEFORE_HARNESS_WITH_COMMIT = (
    "recorded before bench/harness.py; the script then wrote the short commit kept in `recorded` (the dirty flag"
    " was not recorded)"
)


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _git_provenance() -> dict[str, Any] | None:
    """The commit and whether tracked files differ from it (results and other untracked files aside); None where
    this tree is not a checkout itself (never a checkout that happens to enclose the copy)."""
    if not (ROOT / ".git").exists():
        return None
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return None if commit is None else {"commit": commit, "dirty": None if status is None else bool(status)}


def save_provenance(path: Path = PROVENANCE) -> dict[str, Any]:
    """Keep git's answer beside a tree that travels without .git (what Environment.gather reads there)."""
    found = _git_provenance()
    if found is None:
        raise SystemExit(f"{ROOT}: not a git checkout, no provenance to save")
    write_atomically(path, found)
    return found


def _devices() -> list[str] | None:
    jax = sys.modules.get("jax")
    if jax is None:
        return None
    return [f"{d.platform}:{d.device_kind}" for d in jax.devices()]


@dataclasses.dataclass(frozen=True)
class Environment:
    commit: str | None  # git HEAD when the run started; None: not known (a result from before the harness)
    dirty: bool | None  # tracked files differed from that commit (results and other untracked files aside)
    recorded_at: str | None  # UTC, ISO 8601
    python: str | None
    packages: dict[str, str]  # installed versions of PACKAGES, from their metadata
    platform: str | None
    cpu_count: int | None
    devices: list[str] | None  # "platform:kind" per JAX device; None: the bench did not use JAX
    note: str | None = None
    recorded: dict[str, Any] | None = None  # a converted file's own environment fields, as it wrote them

    @classmethod
    def gather(cls) -> Environment:
        packages = {}
        for name in PACKAGES:
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                packages[name] = importlib.metadata.version(name)
        found, note = _git_provenance(), None
        if found is None and PROVENANCE.exists():
            found, note = json.loads(PROVENANCE.read_text()), FROM_PROVENANCE
        found = found or {}
        return cls(
            commit=found.get("commit"),
            dirty=found.get("dirty"),
            recorded_at=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            python=platform.python_version(),
            packages=packages,
            platform=platform.platform(),
            cpu_count=os.cpu_count(),
            devices=_devices(),
            note=note,
        )

    @classmethod
    def before_harness(cls, recorded: Mapping[str, Any]) -> Environment:
        note = BEFORE_HARNESS_WITH_COMMIT if recorded.get("commit") else BEFORE_HARNESS
        return cls(None, None, None, None, {}, None, None, None, note=note, recorded=dict(recorded))

    def with_devices(self) -> Environment:
        """JAX's devices once the bench has imported it (gathering never imports it)."""
        return self if self.devices is not None else dataclasses.replace(self, devices=_devices())


def percentile(samples: Sequence[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default), q in [0, 100]."""
    ordered = sorted(samples)
    if not ordered:
        raise ValueError("no samples")
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclasses.dataclass(frozen=True)
class Timing:
    samples_s: tuple[float, ...]

    @classmethod
    def of(cls, samples_s: Sequence[float]) -> Timing:
        return cls(tuple(samples_s))

    @property
    def median_s(self) -> float:
        return percentile(self.samples_s, 50)

    @property
    def p10_s(self) -> float:
        return percentile(self.samples_s, 10)

    @property
    def p90_s(self) -> float:
        return percentile(self.samples_s, 90)

    def to_json(self, digits: int = 4) -> dict[str, Any]:
        return {
            "median_s": round(self.median_s, digits),
            "p10_s": round(self.p10_s, digits),
            "p90_s": round(self.p90_s, digits),
            "samples_s": [round(s, digits) for s in self.samples_s],
        }


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def scenario_of(args: argparse.Namespace | Mapping[str, Any], output: str = "json") -> dict[str, Any]:
    """The arguments that say what was measured: everything but where the result is written."""
    items = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return {k: _plain(v) for k, v in items.items() if k != output}


def write_atomically(path: Path, document: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(document, indent=2, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class ResultFile:
    """One run's result: created when the run starts (the environment is gathered then), a record added per
    figure, the whole file rewritten atomically after each when a path was given. Nothing is written before
    the first figure, so a rerun that fails early leaves the previous result at that path as it was."""

    def __init__(self, bench: str, scenario: Mapping[str, Any], method: str | None, path: Path | None) -> None:
        self.bench, self.path = bench, path
        self.scenario = _plain(dict(scenario))
        self.method = (method or "").strip() or None
        self.environment = Environment.gather()
        self.results: list[dict[str, Any]] = []

    @classmethod
    def resume(cls, path: Path) -> ResultFile:
        """The file another process of the same run wrote, reopened to add to: its scenario, method and environment
        as they are (devices filled in if this process has imported JAX and they were not), its figures kept."""
        document = load(path)
        result = cls.__new__(cls)
        result.bench, result.path = document["bench"], Path(path)
        result.scenario, result.method = document["scenario"], document["method"]
        result.environment = Environment(**document["environment"])
        result.results = document["results"]
        return result

    def add(self, figure: str, record: Mapping[str, Any]) -> dict[str, Any]:
        entry = {"figure": figure, **_plain(dict(record))}
        self.results.append(entry)
        self.write()
        return entry

    def update(self, entry: dict[str, Any], record: Mapping[str, Any]) -> dict[str, Any]:
        """Rewrite a figure added before (`entry`, as add returned it) with `record`, and write the file: a run's
        summary kept current while it goes, so that a run that dies leaves what it had seen."""
        figure = entry["figure"]
        entry.clear()
        entry.update({"figure": figure, **_plain(dict(record))})
        self.write()
        return entry

    def document(self) -> dict[str, Any]:
        self.environment = self.environment.with_devices()
        return {
            "bench": self.bench,
            "scenario": self.scenario,
            "environment": dataclasses.asdict(self.environment),
            "method": self.method,
            "results": self.results,
        }

    def write(self) -> None:
        if self.path is not None:
            write_atomically(self.path, self.document())


def parser(description: str | None, output: Sequence[str] = ("--json",)) -> argparse.ArgumentParser:
    """A bench's argument parser with its output flag (every spelling the script has had writes to `json`)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(*output, dest="json", type=Path, default=None, help="write the result file here")
    return p


def start(bench: str, args: argparse.Namespace, method: str | None, omit: Sequence[str] = ()) -> ResultFile:
    """The run's result file, from the parsed arguments (`args.json` is where it goes, or nowhere); `omit`:
    attributes that are not the scenario (internal flags, values derived from the others)."""
    scenario = {k: v for k, v in scenario_of(args).items() if k not in omit}
    return ResultFile(bench, scenario, method, args.json)


def load(path: Path) -> dict[str, Any]:
    document = json.loads(Path(path).read_text())
    if not isinstance(document, dict) or set(document) != set(KEYS):
        raise ValueError(f"{path}: not a result file (top-level keys {KEYS})")
    return document
