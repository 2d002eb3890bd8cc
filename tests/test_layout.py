"""The import graph of the project's packages: no circles (top-level or lazy imports alike) and no
arrow from a library package back to the trainer. Layers, bottom up: data, quant, hybrid, records
(libraries) < train_gpt.py (the trainer) < bench (tools that drive the trainer)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data", "quant", "hybrid", "records", "bench")


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for path in [ROOT / "train_gpt.py"] + [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]:
        name = str(path.relative_to(ROOT))[:-3].replace("/", ".")
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):  # lazy imports count too
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            deps |= {n for n in names if n.split(".")[0] in PACKAGES + ("train_gpt",)}
        graph[name] = deps - {name}
    return graph


def test_no_import_circles():
    graph = import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node, path):
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep in graph and not state.get(dep):
                visit(dep, path + [dep])
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node, [node])
    assert not cycles, cycles


def test_libraries_never_import_the_trainer_or_the_tools():
    graph = import_graph()
    back = [f"{m} -> {d}" for m, deps in graph.items() for d in deps
            if m.split(".")[0] in ("data", "quant", "hybrid", "records") and (d == "train_gpt" or d.startswith("bench"))]
    assert not back, back


def test_the_graph_is_read():  # the checks above would pass vacuously on an empty graph
    graph = import_graph()
    assert "hybrid.layers" in graph["hybrid.model"] and "train_gpt" in graph["bench.size"]


def test_hybrid_layers_kernels_below_models_below_training():
    """Inside hybrid/: kernels/ import nothing of the project but each other (each stands beside its
    reference), the models (hybrid/*.py) never import the training pieces, which sit on top."""
    graph = import_graph()
    assert "hybrid.training.ttt" in graph and "hybrid.kernels.wkv7" in graph  # the subpackages are read
    wrong = [f"{m} -> {d}" for m, deps in graph.items() for d in deps
             if (m.startswith("hybrid.kernels.") and not d.startswith("hybrid.kernels."))
             or (m.startswith("hybrid.") and m.count(".") == 1 and d.startswith("hybrid.training."))]
    assert not wrong, wrong
