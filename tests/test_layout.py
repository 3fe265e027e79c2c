"""The package's layering, read from its source: no import cycle, no import hidden in a function, layers point down.

The layers (see ``docs/architecture.md``), from the bottom: ``utilities`` (pure helpers), ``_sync`` (the sync
protocol), the metric core (``_fast``, ``_base``, ``ema``, ``wrapper``, ``_functions``), the integrations, and the
public faces. A module may import only from its own layer or the layers below it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ema_metrics"

CORE = {f"ema_metrics.{n}" for n in ("_fast", "_base", "ema", "wrapper", "_functions")}
FACES = {f"ema_metrics.{n}" for n in ("__init__", "lightning", "pytorch_lightning", "transformers", "trl")}
LAYERS = [
    ("utilities", lambda m: m.startswith("ema_metrics.utilities")),
    ("sync", lambda m: m == "ema_metrics._sync" or m.startswith("ema_metrics._sync.")),
    ("core", lambda m: m in CORE),
    ("integrations", lambda m: m.startswith("ema_metrics.integrations")),
    ("faces", lambda m: m in FACES),
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 2 else ".".join(parts)


def _layer(module: str) -> int:
    if module == "ema_metrics":
        module = "ema_metrics.__init__"
    for i, (_, member) in enumerate(LAYERS):
        if member(module):
            return i
    raise AssertionError(f"{module} belongs to no layer; add it to LAYERS and to docs/architecture.md")


def _imports(path: Path) -> tuple[set[str], list[str]]:
    """The ``ema_metrics`` modules imported at module level, and the ones imported inside a function or class."""
    tree = ast.parse(path.read_text())
    top: set[str] = set()
    nested: list[str] = []
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}

    def targets(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import):
            return [a.name for a in node.names if a.name.startswith("ema_metrics")]
        if node.module is None or not node.module.startswith("ema_metrics"):
            return []
        # `from ema_metrics.x import y` imports the module ema_metrics.x.y when there is one
        return [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names]

    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            top.update(targets(node))
        elif isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks count as module level
            for child in ast.walk(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    top.update(targets(child))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for child in ast.walk(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    nested.extend(targets(child))
    return top, nested


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p)[0] for p in sorted(PACKAGE.rglob("*.py"))}


def test_no_module_imports_the_package_inside_a_function() -> None:
    hidden = {_module_name(p): _imports(p)[1] for p in sorted(PACKAGE.rglob("*.py"))}
    assert {m: n for m, n in hidden.items() if n} == {}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle of ``graph`` (module -> imported modules), each as the path that closes it."""
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == "ema_metrics":  # the package's __init__ re-exports; nothing below imports it back
                continue
            if nxt in path:
                cycles.append([*path[path.index(nxt) :], nxt])
            else:
                visit(nxt, [*path, nxt])

    for start in graph:
        visit(start, [start])
    return cycles


def _upward(graph: dict[str, set[str]], module: str) -> list[str]:
    """The modules ``module`` imports from a layer above its own."""
    return sorted(t for t in graph[module] if _layer(t) > _layer(module))


def test_no_import_cycle() -> None:
    assert _cycles(_graph()) == []


@pytest.mark.parametrize("module", sorted(_graph()))
def test_a_module_imports_only_its_layer_and_the_layers_below(module: str) -> None:
    assert _upward(_graph(), module) == [], f"{module} (layer {LAYERS[_layer(module)][0]}) imports from above"


def test_the_checks_find_what_they_look_for() -> None:
    """A planted cycle and a planted upward import are found, so the checks above can fail."""
    planted = {"ema_metrics._sync": {"ema_metrics._base"}, "ema_metrics._base": {"ema_metrics._sync"}}
    assert _cycles(planted) == [
        ["ema_metrics._sync", "ema_metrics._base", "ema_metrics._sync"],
        ["ema_metrics._base", "ema_metrics._sync", "ema_metrics._base"],
    ]
    assert _upward(planted, "ema_metrics._sync") == ["ema_metrics._base"]
    assert _upward(planted, "ema_metrics._base") == []


def test_sync_settings_are_set_where_the_protocols_read_them() -> None:
    # Setting INLINE on the package would only add an attribute that no protocol reads: a silent no-op. Settings
    # live in (and are set on) `_sync.collectives`.
    root = PACKAGE.parents[1]
    stale = re.compile(r"\b_sync\.(INLINE|FORCE_COLLECTIVES)\s*=")
    offenders = [
        f"{path.relative_to(root)}:{n}"
        for folder in ("src", "tests", "benchmarks", "examples")
        for path in (root / folder).rglob("*.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if stale.search(line)
    ]
    assert offenders == [], "set ema_metrics._sync.collectives.INLINE (or FORCE_COLLECTIVES) instead"
