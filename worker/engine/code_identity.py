"""What a cache's contents depend on in this repository's code, as a digest of source files.

Three caches keep what code made between starts: the serialized executables (executables.py), the parameter
shapes (model.py) and the converted weights (weight_cache.py). Each names the modules that make its contents
(`digest("worker.engine.executables")`); the modules those import from this repository, at any depth and
function-level imports included, are found by reading their import statements, so a module added below a
root is covered without anyone listing it. A changed source misses the cache, which is the safe side.

The same reading gives the import graph that tests/worker/engine/test_imports.py checks for cycles.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("worker", "common")  # this repository's top-level packages; other imports are libraries


def module_file(name: str, root: Path = ROOT) -> Path | None:
    """The source file of module `name` under `root`, or None when it is not one of this repository's."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    for path in (root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")):
        if path.is_file():
            return path
    return None


# CPython 3.11's ast.parse is not safe from two threads at once ("SystemError: AST constructor recursion depth
# mismatch"): the weights' reader (weight_cache.identity) and the programs' compile (executables.file_name) both
# digest the code at start, on their own threads
_PARSING = threading.Lock()


def imports(name: str, root: Path = ROOT) -> set[str]:
    """The repository modules that module `name` imports anywhere in its body: `from a.b import c` counts as
    a.b.c when c is a module, else as a.b. Packages' empty __init__ files are left out."""
    path = module_file(name, root)
    if path is None:
        return set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    with _PARSING:
        tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                child = f"{base}.{alias.name}"
                found.add(child if module_file(child, root) is not None else base)
    return {m for m in found if m != name and (f := module_file(m, root)) is not None and f.name != "__init__.py"}


def closure(*names: str, root: Path = ROOT) -> list[str]:
    """`names` and every repository module they import, directly or not, sorted."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in seen and module_file(name, root) is not None:
            seen.add(name)
            todo.extend(imports(name, root))
    return sorted(seen)


@functools.cache
def digest(*names: str) -> str:
    """sha256 over the sources of closure(*names), each with its module name: read once per process."""
    h = hashlib.sha256()
    for name in closure(*names):
        path = module_file(name)
        assert path is not None
        h.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()
