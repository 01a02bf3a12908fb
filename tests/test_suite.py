"""The suite's own rules: test modules share helpers through tests/helpers/ only (never by importing another test
module or a make_*_reference.py script), and the tiers' markers are the ones pyproject declares."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from tests import conftest

TESTS = Path(__file__).parent


def _imports(path: Path) -> list[str]:
    """The modules `path` imports, and "sys.path" where it extends the path (to import a sibling by name)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.Attribute) and ast.unparse(node) in ("sys.path.insert", "sys.path.append"):
            names.append("sys.path")
    return names


def test_test_modules_import_helpers_only_from_the_helpers_package():
    wrong = {}
    for path in sorted(TESTS.rglob("*.py")):
        if "helpers" in path.relative_to(TESTS).parts or path.name.startswith("make_"):
            continue  # the helpers themselves, and the fixture scripts (run by hand, as scripts)
        bad = [
            name
            for name in _imports(path)
            if (name.startswith("tests.") and not name.startswith("tests.helpers"))
            or name.startswith("make_")
            or name in ("variants", "sys.path")
        ]
        if bad:
            wrong[str(path.relative_to(TESTS.parent))] = bad
    assert not wrong, f"import these from tests/helpers/ instead: {wrong}"


def test_the_tier_markers_are_declared():
    declared = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    names = {line.split(":")[0] for line in declared["markers"]}
    used = set(conftest.FIXTURE_MARKS.values()) | {m for _, marks in conftest.PATH_MARKS for m in marks}
    assert used <= names and set(conftest.MARKS) <= names
