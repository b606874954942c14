"""Layers point down: runtime helpers below the maths, the maths below the engine, the engine below the
entry points (``detlab.cli``, the ``detlab`` command, on top); no cycles, function-level imports
included (scripts/import_graph.py prints the graph)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts import import_graph

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"

# The runtime layer (device, torchrun, checkpoint I/O, atomic files, the run record) imports only itself
# (and the standard library, torch, ...): not even the config, which aggregates the plug-ins' schemas.
RUNTIME = ("detlab.runtime", "detlab.run_record", "detlab.errors")
RUNTIME_MAY_IMPORT = (*RUNTIME, "detlab")
# The entry points: the top layer, which may import the engine and which nothing in the package imports.
ENTRY_POINTS = ("detlab.cli",)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph.import_graph(SRC)


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_no_import_cycles(graph):
    assert import_graph.cycles(graph) == []


def test_only_the_engine_and_entry_points_import_the_engine(graph):
    upward = sorted((m, d) for m, deps in graph.items() for d in deps
                    if _in(d, ("detlab.engine",)) and not _in(m, ("detlab.engine", *ENTRY_POINTS)))
    assert upward == []


def test_nothing_imports_the_entry_points(graph):
    upward = sorted((m, d) for m, deps in graph.items() for d in deps
                    if _in(d, ENTRY_POINTS) and not _in(m, ENTRY_POINTS))
    assert upward == []


def test_runtime_imports_nothing_above_it(graph):
    upward = sorted((m, d) for m, deps in graph.items() if _in(m, RUNTIME) for d in deps
                    if not _in(d, RUNTIME_MAY_IMPORT))
    assert upward == []


def test_the_package_imports_no_script_benchmark_or_test():
    offenders = []
    for path in (SRC / "detlab").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            words = line.split()
            if words[:1] in (["import"], ["from"]) and len(words) > 1 and words[1].split(".")[0] in (
                    "scripts", "benchmarks", "tests", "conftest"):
                offenders.append(f"{path.relative_to(REPO)}:{number}")
    assert offenders == []


def test_the_graph_sees_function_level_imports_and_package_inits(tmp_path):
    # A known answer for the parser itself: a.b imports c inside a function, c imports a.b's package.
    package = tmp_path / "detlab"
    (package / "a").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "a" / "__init__.py").write_text("")
    (package / "a" / "b.py").write_text("def f():\n    from detlab import c\n")
    (package / "c.py").write_text("import detlab.a.b\n")
    graph = import_graph.import_graph(tmp_path)
    assert graph["detlab.a.b"] == {"detlab.c"} and graph["detlab.c"] == {"detlab.a.b", "detlab.a"}
    assert import_graph.cycles(graph) == [["detlab.a.b", "detlab.c"]]


def test_type_checking_imports_are_not_run_time_imports(tmp_path):
    package = tmp_path / "detlab"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from detlab import b\n"
                                  "else:\n    import detlab.c\n")
    (package / "b.py").write_text("import detlab.a\n")
    (package / "c.py").write_text("")
    graph = import_graph.import_graph(tmp_path)
    assert graph["detlab.a"] == {"detlab.c"} and import_graph.cycles(graph) == []
