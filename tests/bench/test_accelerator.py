"""bench/accelerator.sh: its worst case fits the device run's 420 s, and its dry run (the same script on the CPU at
the tiny size, in the same order, with the same keys) measures every part, so the script never reaches the
accelerator broken."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

from bench import harness

ROOT = Path(__file__).resolve().parents[2]


def accelerator():
    """bench/accelerator.py as a module (its top level imports the standard library only)."""
    if "bench_accelerator" not in sys.modules:
        spec = importlib.util.spec_from_file_location("bench_accelerator", ROOT / "bench" / "accelerator.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # before it runs: its dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["bench_accelerator"]


def test_the_worst_case_budget_adds_up_to_at_most_420_s():
    acc = accelerator()
    shell = re.search(r"^TOTAL_S=(\d+)", (ROOT / "bench" / "accelerator.sh").read_text(), re.M)
    assert acc.TOTAL_S == int(shell.group(1)) == 420
    assert sum(acc.BUDGET_S.values()) <= acc.TOTAL_S
    assert acc.BUDGET_S[next(k for k in acc.BUDGET_S if "(e)" in k)] + acc.MARGIN_S == acc.TORCH_S


def test_the_dry_run_measures_every_part_in_order(tmp_path: Path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(
        [str(ROOT / "bench" / "accelerator.sh"), "--dry-run"], env=env, capture_output=True, text=True, timeout=1200
    )
    logs = "".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("*.log")))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
    results = harness.load(tmp_path / "results.json")  # the harness' fixed keys
    acc = accelerator()
    figures = [r for r in results["results"] if "part" in r]
    own = {r["figure"]: r for r in results["results"] if "part" not in r}
    assert results["bench"] == "accelerator" and results["scenario"]["dry_run"] is True
    env = results["environment"]
    assert env["commit"] == subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    assert env["devices"] == ["cpu:cpu"]  # the JAX process' (the orchestrator never imports JAX)
    assert own["flops"]["gflop"]["advance"] > 0 and own["flops"]["from"] == "accelerator-flops-tiny-64.json"
    assert set(own) == {"setup", "flops", "jax", "stage 2", "jax process", "torch", "processes"}
    assert own["processes"]["ends"]["jax"] == own["processes"]["ends"]["torch"] == "ended", logs
    assert all(tuple(f)[1:] == acc.FIGURE_KEYS for f in figures)
    assert [f["part"] for f in figures] == ["a", "b", "b", "c", "d", "e", "f"], logs
    measured = {f["part"]: f for f in figures if f["skipped"] is None}
    assert set(measured) >= set("abcde"), [f["skipped"] for f in figures] + [logs]
    assert all(f["s_per_image"] > 0 and f["fraction_of_bf16_peak"] > 0 for f in measured.values())
    assert measured["a"]["batch"] == acc.DRY_PLAN.batch and measured["c"]["guided"] is False
    assert measured["d"]["max_pixel_difference"] > 0  # FP8 against (a) on the same seeds: rounding moves pixels
    assert figures[-1]["skipped"] or figures[-1]["s_per_image"] > 0  # (f): the seed's Flax path where importable


def test_the_dry_run_with_no_time_left_writes_every_part_skipped_with_its_reason(tmp_path: Path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "DRY_RUN_BUDGET_S": "1"}
    proc = subprocess.run(
        [str(ROOT / "bench" / "accelerator.sh"), "--dry-run"], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    figures = [r for r in harness.load(tmp_path / "results.json")["results"] if "part" in r]
    assert [f["part"] for f in figures] == ["a", "b", "b", "c", "d", "e", "f"]  # (b) at two batch sizes
    assert all(f["skipped"].endswith("left") or "not started" in f["skipped"] for f in figures), figures
