"""The house drawn from its imports: layers, each importing only from layers below, no cycle.

The graph is read from the source (every ``import`` / ``from … import``, also those inside
functions), so a lazy import counts as a dependency too.
"""

from __future__ import annotations

import ast
import fnmatch
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = "lightning_conditioning"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

#: bottom first; a module may import from its own layer and the layers below it only
LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["__about__", "schema", "resolution", "notify"]),
    ("maths", ["spectra", "sketch", "solvers", "krylov", "krylov.*", "estimates", "precision", "accumulate",
               "domination",
               "collectives", "shards"]),
    ("capture", ["adapters", "sequence_adapters", "registry", "functional_capture", "capture", "plan", "turns",
                 "conventions", "shared_inputs",
                 "batches", "passes", "options", "analysis", "results", "distributed", "exact", "margin", "selection"]),
    ("views", ["views", "views.*"]),
    ("monitor", ["monitor", "domination_monitor", "readouts"]),
    ("models", ["models", "models.*"]),
    ("shells", ["sinks", "sinks.*", "callbacks", "callbacks.*", "integrations", "integrations.*", "auto"]),
    ("report", ["report", "report.*", "__main__"]),
    ("package", [""]),
]
#: layers that must not import Lightning or TensorBoard (the core)
CORE = {"base", "maths", "capture", "views", "monitor", "models"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _layer(module: str) -> int:
    for index, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return index
    raise AssertionError(f"{PACKAGE}.{module} is in no layer: add it to LAYERS")


def _imports(path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(package modules imported, top-level external packages imported)."""
    internal, external = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from pkg import submodule`` depends on the submodule, not on pkg's __init__
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}".removeprefix(
                f"{PACKAGE}.") in modules else node.module for a in node.names]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                internal.add(name.removeprefix(PACKAGE).removeprefix("."))
            else:
                external.add(name.split(".")[0])
    return internal, external


GRAPH = {name: _imports(path, _modules()) for name, path in _modules().items()}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down_the_layers(module: str) -> None:
    here = _layer(module)
    for target in GRAPH[module][0]:
        if target == module:
            continue
        assert _layer(target) <= here, (
            f"{module} ({LAYERS[here][0]}) imports {target} ({LAYERS[_layer(target)][0]})")


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if LAYERS[_layer(m)][0] in CORE))
def test_core_imports_neither_lightning_nor_tensorboard(module: str) -> None:
    external = GRAPH[module][1]
    assert not external & {"lightning", "pytorch_lightning", "tensorboard", "lightning_utilities"}


def test_no_cycle_between_modules_or_packages() -> None:
    def cycle(edges: dict[str, set[str]]) -> list[str] | None:
        state: dict[str, int] = {}
        stack: list[str] = []

        def visit(node: str) -> list[str] | None:
            state[node] = 1
            stack.append(node)
            for nxt in sorted(edges.get(node, ())):
                if state.get(nxt) == 1:
                    return stack[stack.index(nxt):] + [nxt]
                if nxt not in state and (found := visit(nxt)):
                    return found
            state[node] = 2
            stack.pop()
            return None

        for start in sorted(edges):
            if start not in state and (found := visit(start)):
                return found
        return None

    modules = {m: {t for t in targets if t != m} for m, (targets, _) in GRAPH.items()}
    assert cycle(modules) is None, cycle(modules)
    packages: dict[str, set[str]] = defaultdict(set)
    for module, targets in modules.items():
        for target in targets:
            source_pkg, target_pkg = module.split(".")[0], target.split(".")[0]
            if source_pkg != target_pkg and module:
                packages[source_pkg].add(target_pkg)
    packages.pop("", None)
    assert cycle(packages) is None, cycle(packages)
