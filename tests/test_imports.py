"""The import map of `pipeline/`: no module imports itself back, and DeepSpeed stays inside `distributed/`.

The map is read from the source with `ast`, not by importing. Module-level and function-level imports
both count (a function-level import is a dependency that happens later, not a different one). Two kinds of
block are left out, each because it never runs as part of the module it sits in:
``if TYPE_CHECKING:`` (annotations only) and ``if __name__ == "__main__":`` (runs in the module
``__main__``, a separate module object, when the file is started as a script). An import of
``pipeline.a.b`` is an edge to ``pipeline.a.b`` only, not to the package ``pipeline.a`` whose
``__init__`` runs first: that is the package initialising itself, not one file depending on another.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "pipeline"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _skipped(test: ast.expr) -> bool:
    """``if TYPE_CHECKING:`` and ``if __name__ == "__main__":``."""
    if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
        return True
    if isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING":
        return True
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators))


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node outside the skipped blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _skipped(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _imported_names(node, module: str, is_package: bool) -> list[str]:
    """Absolute dotted names an import node brings in (``from a import b`` gives ``a.b`` and ``a``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        parts = module.split(".")
        anchor = parts if is_package else parts[:-1]
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def import_graph() -> dict[str, set[str]]:
    """pipeline module -> the pipeline modules it imports (module names resolved to existing files)."""
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        edges = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            candidates = _imported_names(node, name, path.name == "__init__.py")
            if isinstance(node, ast.ImportFrom):
                # `from a import b`: b is a module if a file says so, else a name defined in a.
                base, names = candidates[-1], candidates[:-1]
                hits = [n for n in names if n in files]
                edges.update(hits if len(hits) == len(names) else hits + [base])
            else:
                edges.update(candidates)
        graph[name] = {e for e in edges if e in files and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_map_reads_function_level_and_relative_imports():
    graph = import_graph()
    assert "pipeline.models.factory" in graph["pipeline.models"]  # package __init__
    assert "pipeline.config" in graph["pipeline.models.factory"]
    assert graph["pipeline.config"].isdisjoint({m for m in graph if m.startswith("pipeline.models")})


def test_the_cycle_finder_finds_a_cycle_through_three_modules():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_pipeline_module_imports_itself_back():
    found = cycles(import_graph())
    assert found == [], "import cycles in pipeline/: " + "; ".join(" <-> ".join(c) for c in found)


def test_deepspeed_is_imported_only_inside_pipeline_distributed():
    outside = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if (PACKAGE / "distributed") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):  # every import, even skipped blocks
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(n == "deepspeed" or n.startswith("deepspeed.") for n in names):
                outside.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert outside == [], "deepspeed imported outside pipeline/distributed/: " + ", ".join(outside)
