"""Imports flow one way: no cycle between hwnas modules, no layer importing a layer above it.

The layers, top to bottom (docs/design.md): cli → api → search/gate → passes → estimator → targets →
verify → graph. Every import statement counts, the ones inside functions too (a function-level import
is how a cycle hides). The graph is read from the source with `ast`, so nothing is imported to check it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import hwnas

PACKAGE = Path(hwnas.__file__).parent

# Top to bottom. A module belongs to the layer of its longest listed prefix; every module must have one,
# so a new top-level module or package has to be placed here.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("hwnas.cli", "hwnas.__main__", "hwnas.report.html", "hwnas.report.junit")),
    ("api", ("hwnas.api",)),
    ("search/gate", ("hwnas.search", "hwnas.gate", "hwnas.advice")),
    ("passes", ("hwnas.passes",)),
    ("estimator", ("hwnas.estimator",)),
    ("targets", ("hwnas.targets",)),
    ("verify", ("hwnas.verify",)),
    # the bottom floor: model files, graphs, shapes, ORT sessions; JSON files; errors; the model zoo's builders; the
    # folder a search's worker processes share
    ("graph", ("hwnas.graph", "hwnas.errors", "hwnas.version", "hwnas.report", "hwnas.report.json_report",
               "hwnas.models", "hwnas.shared_folder")),
]


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str:
    """The module `name` refers to: itself, or the package that holds the attribute it names."""
    while name not in modules:
        name = name.rpartition(".")[0]
    return name


def import_graph() -> dict[str, set[str]]:
    """module -> the hwnas modules it imports anywhere in its source."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {_resolve(a.name, modules) for a in node.names if a.name.split(".")[0] == "hwnas"}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                if source.split(".")[0] != "hwnas":
                    continue
                for alias in node.names:  # `from hwnas.passes import fold_bn` imports a module
                    full = f"{source}.{alias.name}"
                    targets.add(full if full in modules else _resolve(source, modules))
        targets.discard(name)
        graph[name] = targets
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def layer_of(module: str) -> int:
    if module == "hwnas":  # the package's re-exports (imported lazily from hwnas.api) sit above everything
        return -1
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (rank, prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS in tests/test_imports.py"
    return best[0]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


def test_imports_flow_down_the_layers():
    upward = [
        f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)}: {LAYERS[layer_of(b)][0]})"
        for a, deps in sorted(import_graph().items()) for b in sorted(deps) if layer_of(b) < layer_of(a)
    ]
    assert upward == []


def test_the_checker_sees_what_it_must():
    """The walk finds function-level imports and reports a cycle, a layer slip, and an unplaced module."""
    graph = import_graph()
    assert "hwnas.graph.session" in graph["hwnas.graph.shapes"]
    assert "hwnas.passes.builtin" in graph["hwnas.passes.registry"]  # imported inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert layer_of("hwnas.graph.shapes") > layer_of("hwnas.verify.equivalence") > layer_of("hwnas.api")
    assert layer_of("hwnas.report.json_report") > layer_of("hwnas.report.html")
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("hwnas_elsewhere.x")


def test_package_reexports_the_api():
    from hwnas import api, gate
    from hwnas.estimator import profile

    for name in ("optimize", "estimate", "check", "run", "profile", "hints", "OptimizeReport", "EstimateResult",
                 "CheckResult", "RunResult", "Hint"):
        assert getattr(hwnas, name) is getattr(api, name), name
    assert hwnas.CheckItem is gate.CheckItem
    assert hwnas.ProfileReport is profile.ProfileReport  # from where it lives: `api` imports profiling on first use
    assert set(hwnas.__all__) <= set(dir(hwnas))
    assert isinstance(hwnas.__version__, str) and hwnas.__version__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        hwnas.nope  # noqa: B018
