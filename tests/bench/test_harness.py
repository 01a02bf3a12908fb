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


def test_a_figure_updated_in_place_is_rewritten_where_it_was(tmp_path):
    path = tmp_path / "x.json"
    result = harness.ResultFile("x", {}, "how", path)
    summary = result.add("summary", {"finished": False, "events": 1})
    result.add("event", {"at_s": 3})
    result.update(summary, {"finished": True, "events": 2})
    assert harness.load(path)["results"] == [
        {"figure": "summary", "finished": True, "events": 2},
        {"figure": "event", "at_s": 3},
    ]


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


def test_a_result_file_is_resumed_by_another_process_which_adds_after_the_first(tmp_path):
    path = tmp_path / "results.json"
    harness.ResultFile("x", {"rounds": 1}, "how", path).add("setup", {"folder": "f"})
    before = harness.load(path)
    code = "import sys; from bench import harness; harness.ResultFile.resume(sys.argv[1]).add('(a)', {'s': 1.5})"
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=ROOT, check=True, timeout=60)
    doc = harness.load(path)
    assert [r["figure"] for r in doc["results"]] == ["setup", "(a)"]
    assert {k: doc[k] for k in ("bench", "scenario", "method", "environment")} == {
        k: before[k] for k in ("bench", "scenario", "method", "environment")
    }
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_tree_without_git_takes_its_commit_from_the_saved_provenance(tmp_path):
    """The device machine gets the tree without .git: `bench/accelerator.sh prepare` saved the commit beside it."""
    saved = harness.save_provenance(tmp_path / "here" / "provenance.json")
    assert saved["commit"] == subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    copy = tmp_path / "copy"  # outside any git checkout
    (copy / "bench").mkdir(parents=True)
    (copy / "bench" / "harness.py").write_text((ROOT / "bench" / "harness.py").read_text())
    code = "from bench import harness; e = harness.Environment.gather(); print(e.commit, e.dirty, e.note is not None)"
    gather = lambda: subprocess.check_output([sys.executable, "-c", code], cwd=copy, text=True).split()  # noqa: E731
    assert gather() == ["None", "None", "False"]  # nothing invented
    (copy / ".wheels").mkdir()
    (copy / ".wheels" / "provenance.json").write_text((tmp_path / "here" / "provenance.json").read_text())
    assert gather() == [saved["commit"], str(saved["dirty"]), "True"]
