"""docs/benchmarks.md's tables are bench/tables.py's rendering of bench/results, and every bench script writes
its results through bench/harness.py."""

from __future__ import annotations

import ast
from pathlib import Path

from bench import tables

BENCH = tables.ROOT / "bench"
# harness.py itself; seed_path.py writes no result: it is the seed's pipeline, which bench/engine.py drives in a
# child process and bench/accelerator_parts.py calls, and those two write the figures through the harness;
# sdxl_file.py writes no result either: it makes the full-size random checkpoint that bench/start.py measures
NOT_SCRIPTS = {"harness.py", "seed_path.py", "sdxl_file.py"}


def test_every_table_on_the_page_is_the_rendering_of_the_results():
    assert tables.differing(tables.DOC.read_text()) == [], "run: python bench/tables.py"


def test_every_table_rendered_is_marked_on_the_page():
    marked = {m["name"] for m in tables.MARKED.finditer(tables.DOC.read_text())}
    assert marked == set(tables.TABLES)


def test_a_figure_edited_by_hand_is_caught():
    text = tables.DOC.read_text()
    edited = text.replace(
        "| fp16 -> bf16 | resnet conv 1280x1280x3x3 | 12.82 |", "| fp16 -> bf16 | resnet conv 1280x1280x3x3 | 12.00 |"
    )
    assert edited != text
    assert tables.differing(edited) == ["convert"]
    assert tables.render(edited) == text


def _imports_harness(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "bench" and any(a.name == "harness" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.module == "bench.harness":
            return True
    return False


def test_every_bench_script_imports_the_harness():
    scripts = {p.name for p in BENCH.glob("*.py")} - NOT_SCRIPTS
    assert len(scripts) >= 15
    assert sorted(name for name in scripts if not _imports_harness(BENCH / name)) == []
