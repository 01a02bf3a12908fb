"""The engine's modules import each other in layers: no cycle, however hidden (an import inside a function counts),
read from the source (worker/engine/code_identity.py) without importing anything."""

from __future__ import annotations

from pathlib import Path

from worker.engine import code_identity

ENGINE = Path(code_identity.__file__).parent


def _graph(root: Path, package: str) -> dict[str, set[str]]:
    folder = root.joinpath(*package.split("."))
    names = [f"{package}.{p.stem}" for p in sorted(folder.glob("*.py")) if p.stem != "__init__"]
    return {name: {m for m in code_identity.imports(name, root) if m.startswith(package + ".")} for name in names}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (its modules in order, the first repeated at the end), or None."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str] | None:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return None
        for child in sorted(graph.get(name, ())):
            found = visit(child, [*path, name])
            if found:
                return found
        done.add(name)
        return None

    for name in sorted(graph):
        found = visit(name, [])
        if found:
            return found
    return None


def test_no_module_of_the_engine_imports_itself_back():
    graph = _graph(code_identity.ROOT, "worker.engine")
    assert len(graph) > 20 and "worker.engine.executables" in graph["worker.engine.engine"]
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_loader_is_layered():
    graph = _graph(code_identity.ROOT, "worker.engine")
    # the base knows no reader; the readers and the random models know no loader on top
    assert not graph["worker.engine.model_source"] & {"worker.engine.model", "worker.engine.folder"}
    for reader in ("folder", "single_file", "tiny"):
        assert "worker.engine.model" not in graph[f"worker.engine.{reader}"], reader
    assert {"worker.engine.folder", "worker.engine.single_file", "worker.engine.tiny"} <= graph["worker.engine.model"]


def test_a_cycle_through_a_function_level_import_is_found(tmp_path):
    package = tmp_path / "worker" / "engine"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("import json\n\n\ndef f():\n    from worker.engine import b\n\n    return b\n")
    (package / "b.py").write_text("from worker.engine.c import thing\n")
    (package / "c.py").write_text("import worker.engine.a\n\nthing = 1\n")
    (package / "d.py").write_text("from worker.engine import c\n")
    graph = _graph(tmp_path, "worker.engine")
    assert graph["worker.engine.a"] == {"worker.engine.b"}
    assert _cycle(graph) == ["worker.engine.a", "worker.engine.b", "worker.engine.c", "worker.engine.a"]
    (package / "c.py").write_text("thing = 1\n")
    assert _cycle(_graph(tmp_path, "worker.engine")) is None


def test_a_cache_key_covers_every_module_its_root_imports(tmp_path):
    """code_identity.digest keys the caches: a module imported at any depth, inside a function too, is covered."""
    package = tmp_path / "worker" / "engine"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "root.py").write_text("import numpy\n\n\ndef f():\n    from worker.engine import middle\n")
    (package / "middle.py").write_text("from common.vocabulary import MAX_STEPS\nfrom worker.engine.leaf import x\n")
    (package / "leaf.py").write_text("x = 1\n")
    (package / "apart.py").write_text("x = 2\n")
    (tmp_path / "common").mkdir()
    (tmp_path / "common" / "vocabulary.py").write_text("MAX_STEPS = 150\n")
    assert code_identity.closure("worker.engine.root", root=tmp_path) == [
        "common.vocabulary",
        "worker.engine.leaf",
        "worker.engine.middle",
        "worker.engine.root",
    ]
    executables = code_identity.closure("worker.engine.executables")
    assert {"worker.engine.program", "worker.engine.arguments", "common.vocabulary"} <= set(executables)
    assert "worker.engine.engine" not in executables  # what dispatches an executable does not make it
