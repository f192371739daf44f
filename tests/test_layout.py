"""The package's layout rules: module size, and the import graph's direction (configs at the bottom, registries
above them, the pipeline on top, the CLI above it; data never reads evaluation; no cycle).

The graph is read from the source (every ``import`` statement, at module level or inside a function, as
import-linter does), so an import hidden in a function to dodge a cycle still counts.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "clip_rl_trl"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _graph() -> dict[str, set[str]]:
    modules = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import submodule` is an import of the submodule, not of the package's __init__
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            else:
                continue
            edges.update(t for t in targets if t in modules and t != name)
    return graph


def _reaches(graph: dict[str, set[str]], start: str, goal: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node == goal:
            return True
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    return False


def test_no_module_is_over_600_lines() -> None:
    sizes = {_module(p): len(p.read_text("utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {m: n for m, n in sizes.items() if n > 600} == {}


def test_the_import_graph_has_no_cycle() -> None:
    graph = {m: e for m, e in _graph().items() if m != "clip_rl_trl"}  # the root only re-exports
    cycles = sorted(m for m in graph for n in graph[m] if _reaches(graph, n, m))
    assert cycles == []


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("clip_rl_trl.data", "clip_rl_trl.evaluation"),
        ("clip_rl_trl.configs", "clip_rl_trl.pipeline"),
        ("clip_rl_trl.configs", "clip_rl_trl.rewards.registry"),
        ("clip_rl_trl.configs", "clip_rl_trl.models.families"),
        ("clip_rl_trl.rewards.registry", "clip_rl_trl.rewards.callables"),
        ("clip_rl_trl.pipeline", "clip_rl_trl.cli"),
        ("clip_rl_trl.trainer.trainer", "clip_rl_trl.pipeline"),
    ],
)
def test_lower_rooms_never_import_upper_ones(lower: str, upper: str) -> None:
    graph = _graph()
    sources = [m for m in graph if m == lower or m.startswith(lower + ".")]
    assert sources, lower
    assert [m for m in sources if _reaches(graph, m, upper)] == []


def test_nothing_imports_a_demo_module() -> None:
    assert not (PACKAGE / "demo.py").exists() and not (PACKAGE / "recipe.py").exists()
    assert not any("demo" in m for m in _graph())
