"""bench/control.py at the tiny preset, end to end in a child process: every variant timed, the batches ran the
programs their rows ask for, and XLA's count of the controlled advance is the ControlNets counted alone."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from bench import harness

ROOT = harness.ROOT
VARIANTS = {"bare_plain", "plain", "controlnet_1", "controlnet_2", "ip_adapter", "mixed"}


def test_the_tiny_run_times_every_variant_and_counts_their_flops(tmp_path: Path):
    out = tmp_path / "control.json"
    args = ["--preset", "tiny", "--size", "64x64", "--steps", "1", "--rounds", "1", "--json", str(out)]
    proc = subprocess.run(
        [sys.executable, "bench/control.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = harness.load(out)
    assert doc["bench"] == "control" and doc["scenario"]["preset"] == "tiny"
    (r,) = doc["results"]
    assert set(r["timing"]) == VARIANTS and all(len(t["samples_s"]) == 1 for t in r["timing"].values())
    assert r["vs_plain"]["plain"] == 1.0 and all(v > 0 for v in r["s_per_image"].values())
    # the first run and one round: ControlNets in controlnet_1, controlnet_2 and mixed; the IP-Adapter in ip_adapter
    # and mixed; every served batch guided
    assert r["served_batches_ran"] == {"control": 3 * 2, "ip_adapter": 2 * 2, "advance": 5 * 2}
    assert all(r["all_finite"].values())
    flop = r["flop_vs_plain"]
    assert flop["bare_plain"] == flop["plain"] == 1.0
    assert 1 < flop["controlnet_1"] < flop["controlnet_2"] and flop["ip_adapter"] > 1
    assert flop["mixed"] == pytest.approx(flop["controlnet_1"] + flop["ip_adapter"] - 1)
    assert r["controlled_advance_over_counted_controlnets"] == pytest.approx(1.0, rel=1e-3)
