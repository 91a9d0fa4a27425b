"""The package's imports point down the layers of DESIGN.md and never run in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import REPO

PACKAGES = ("datamodules", "genart_lightning")

FORBIDDEN = {
    "datamodules": ("genart_lightning",),
    "genart_lightning.nn": ("genart_lightning.models", "genart_lightning.run", "genart_lightning.commands",
                            "genart_lightning.callbacks", "genart_lightning.metrics", "genart_lightning.shapes",
                            "genart_lightning.sweeps", "genart_lightning.diffusion"),
    "genart_lightning.diffusion": ("genart_lightning.models", "genart_lightning.run", "genart_lightning.commands",
                                   "genart_lightning.callbacks", "genart_lightning.metrics", "genart_lightning.shapes",
                                   "genart_lightning.sweeps", "genart_lightning.nn"),
    "genart_lightning.metrics": ("genart_lightning.models", "genart_lightning.run", "genart_lightning.commands",
                                 "genart_lightning.callbacks", "genart_lightning.shapes", "genart_lightning.sweeps"),
    "genart_lightning.shapes": ("genart_lightning.models", "genart_lightning.run", "genart_lightning.commands",
                                "genart_lightning.callbacks", "genart_lightning.sweeps", "genart_lightning.digits"),
    "genart_lightning.digits": ("genart_lightning.models", "genart_lightning.run", "genart_lightning.commands",
                                "genart_lightning.callbacks", "genart_lightning.sweeps", "genart_lightning.shapes"),
    "genart_lightning.models": ("genart_lightning.run", "genart_lightning.commands", "genart_lightning.callbacks",
                                "genart_lightning.sweeps", "genart_lightning.shapes", "genart_lightning.digits"),
    "genart_lightning.callbacks": ("genart_lightning.commands", "genart_lightning.sweeps"),
    "genart_lightning.run": ("genart_lightning.commands", "genart_lightning.sweeps"),
    "genart_lightning.sweeps": ("genart_lightning.commands", "genart_lightning.run", "genart_lightning.callbacks",
                                "genart_lightning.models"),
}
"""Package -> packages it must not import (at module level or inside functions)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path) -> set[str]:
    """Every project module a file imports, wherever the import statement stands."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for package in PACKAGES for p in (REPO / package).rglob("*.py")]
    modules = {module_name(p): p for p in files}
    return {name: {m for m in project_imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_imports_point_down_the_layers():
    graph = import_graph()
    upward = []
    for module, imports in graph.items():
        for package, banned in FORBIDDEN.items():
            if module == package or module.startswith(package + "."):
                upward += [f"{module} -> {m}" for m in imports if any(m == b or m.startswith(b + ".") for b in banned)]
    assert not upward, "imports that run up the layers:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*path[path.index(nxt):], nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layer_test_sees_an_upward_import(tmp_path):
    """The walker finds imports inside functions too (the heavy imports of commands sit there)."""
    sample = tmp_path / "m.py"
    sample.write_text("def f():\n    from genart_lightning.callbacks.sample_grid import SampleGrid\n")
    assert "genart_lightning.callbacks.sample_grid" in project_imports(sample)
