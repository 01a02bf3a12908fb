"""bench/harness.py: percentiles, the result file's fixed keys written per figure, the environment gathered
without importing torch or JAX, and one cheap bench run end to end."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from bench import harness

ROOT = harness.ROOT


@pytest.mark.parametrize("n", [1, 2, 5, 10])
def test_timing_matches_numpys_percentiles(n):
    samples = list(np.random.default_rng(n).uniform(1, 2, n))
    t = harness.Timing.of(samples)
    assert (t.median_s, t.p10_s, t.p90_s) == pytest.approx(tuple(np.percentile(samples, [50, 10, 90])))


def test_a_result_file_has_the_fixed_keys_and_every_figure_so_far(tmp_path):
    path = tmp_path / "out" / "x.json"
    result = harness.ResultFile("x", {"rounds": 3, "where": tmp_path}, "how", path)
    assert not path.exists()  # nothing before the first figure: a failed rerun leaves the last result alone
    result.add("first", {"median_s": 1.0})
    assert [r["figure"] for r in harness.load(path)["results"]] == ["first"]  # a run that dies keeps it
    result.add("second", {"median_s": 2.0})
    doc = harness.load(path)
    assert list(doc) == list(harness.KEYS)
    assert [r["figure"] for r in doc["results"]] == ["first", "second"]
    assert doc["scenario"] == {"rounds": 3, "where": str(tmp_path)}
    assert (
        doc["environment"]["commit"]
        == subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    )
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temporary file left


def test_gathering_the_environment_imports_neither_torch_nor_jax():
    code = (
        "from bench import harness; e = harness.Environment.gather(); import sys;"
        " print(sorted(set(sys.modules) & {'torch', 'jax'}), e.packages.get('numpy'))"
    )
    out = subprocess.check_output([sys.executable, "-c", code], cwd=ROOT, text=True).split(maxsplit=1)
    assert out[0] == "[]" and out[1].strip() == np.__version__


def test_every_stored_result_has_the_fixed_keys_and_no_invented_commit():
    for path in sorted(harness.RESULTS.glob("*.json")):
        env = harness.load(path)["environment"]
        assert env["commit"] or env["note"], path  # from before the harness: null, with a note saying so


def test_a_bench_run_writes_its_result_through_the_harness(tmp_path):
    out = tmp_path / "images.json"
    args = ["--rounds", "1", "--size", "64", "--json", str(out)]
    subprocess.run([sys.executable, "bench/images.py", *args], cwd=ROOT, check=True, capture_output=True, timeout=120)
    doc = harness.load(out)
    assert doc["bench"] == "images" and doc["scenario"] == {"rounds": 1, "size": 64}
    assert len(doc["results"]) == 6 and all(r["timing"]["samples_s"] for r in doc["results"])
    assert doc["environment"]["commit"] and doc["environment"]["packages"]["numpy"] == np.__version__
