"""Print the package's import graph as layers: each module of ``src/detlab`` with the package modules
it imports (function-level imports included), from the bottom layer up.

    python scripts/import_graph.py            # this checkout's src/
    python scripts/import_graph.py OTHER/src  # another checkout's

A module's layer is one above the highest module it imports, so an upward import or a cycle shows as
a module on a lower layer than what it imports (a cycle is printed as such). ``tests/test_layers.py``
asserts the rules on the same graph.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Iterator

PACKAGE = "detlab"


def module_files(src: Path) -> dict[str, Path]:
    """``detlab.x.y`` -> its file, for every module and package below ``src/detlab``."""
    files = {}
    for path in sorted((src / PACKAGE).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node of the tree except those under ``if TYPE_CHECKING:`` (imports for type hints only)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in _runtime_nodes_of(child))
            continue
        yield from _runtime_nodes_of(node)


def _runtime_nodes_of(node: ast.AST) -> Iterator[ast.AST]:
    yield node
    yield from _runtime_nodes(node)


def import_graph(src: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its file (top level or inside functions),
    the packages whose ``__init__`` such an import runs included; imports for type hints only
    (``if TYPE_CHECKING:``) are not imports at run time and are left out."""
    files = module_files(src)
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                # Importing a.b.c runs a/__init__ and a/b/__init__ first: those are imports too, except the
                # importer's own packages (already being imported when it runs).
                while target and target != name and not name.startswith(target + "."):
                    graph[name].add(target)
                    target = target.rpartition(".")[0]
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def layers(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's layer: 0 for modules importing no package module, else 1 + its imports' highest."""
    level: dict[str, int] = {}

    def depth(node: str, seen: frozenset[str]) -> int:
        if node in level:
            return level[node]
        deps = [d for d in graph[node] if d not in seen]
        level[node] = 1 + max((depth(d, seen | {node}) for d in deps), default=-1)
        return level[node]

    for node in graph:
        depth(node, frozenset())
    return level


def main(argv: list[str]) -> int:
    src = Path(argv[0]) if argv else Path(__file__).resolve().parents[1] / "src"
    graph = import_graph(src)
    for component in cycles(graph):
        print("cycle:", " <-> ".join(component))
    level = layers(graph)
    for layer in range(max(level.values()) + 1):
        print(f"layer {layer}")
        for name in sorted(n for n, v in level.items() if v == layer):
            deps = ", ".join(sorted(d.removeprefix(PACKAGE + ".") for d in graph[name]))
            print(f"  {name.removeprefix(PACKAGE + '.') or PACKAGE}" + (f"  <- {deps}" if deps else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
