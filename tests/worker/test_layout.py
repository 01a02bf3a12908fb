"""The size rule for worker/, read from the source's syntax tree: no class over 300 lines anywhere in worker/
(worker/engine/ included), and no function or method of the device loop (worker/device_loop.py, worker/loop/)
over 60. A class or a method past these is doing several things: split it into parts with typed hand-offs."""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

WORKER = Path(__file__).resolve().parents[2] / "worker"
MAX_CLASS_LINES = 300
MAX_LOOP_FUNCTION_LINES = 60
LOOP = [WORKER / "device_loop.py", *sorted((WORKER / "loop").rglob("*.py"))]


def too_long(source: str, kinds: tuple[type[ast.AST], ...], limit: int) -> dict[str, int]:
    """Every definition of `kinds` in the source longer than `limit` lines (its body included), by qualified name."""
    found: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            name = prefix
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}{child.name}"
                lines = child.end_lineno - child.lineno + 1  # type: ignore[operator]
                if isinstance(child, kinds) and lines > limit:
                    found[name] = lines
                name += "."
            visit(child, name)

    visit(ast.parse(source), "")
    return found


def over(paths: list[Path], kinds: tuple[type[ast.AST], ...], limit: int) -> dict[str, int]:
    found = {}
    for path in paths:
        for name, lines in too_long(path.read_text(), kinds, limit).items():
            found[f"{path.relative_to(WORKER.parent)}:{name}"] = lines
    return found


def test_no_class_in_worker_is_over_300_lines():
    assert over(sorted(WORKER.rglob("*.py")), (ast.ClassDef,), MAX_CLASS_LINES) == {}


def test_no_function_of_the_device_loop_is_over_60_lines():
    assert len(LOOP) > 5  # the stages are where this test looks for them
    assert over(LOOP, (ast.FunctionDef, ast.AsyncFunctionDef), MAX_LOOP_FUNCTION_LINES) == {}


def test_the_checks_catch_what_they_name():
    body = "\n".join(f"        x{i} = {i}" for i in range(60))
    source = textwrap.dedent(
        """
        class Big:
            def long(self):
        {body}

            async def short(self):
                return 1


        def fine():
            return 2
        """
    ).format(body=body)
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    assert too_long(source, functions, 60) == {"Big.long": 61}
    assert too_long(source, functions, 61) == {}
    assert too_long(source, (ast.ClassDef,), 64) == {"Big": 65}
    assert too_long(source, (ast.ClassDef,), 65) == {}
