"""The architecture is the folders: each subpackage of ``lightning_conditioning`` is a layer, and a
module imports only from its own layer and the layers below it, with no cycle.

The layers are read off the file tree (a module's layer is its top folder; the package root's
own modules are the base), and their order is :data:`FOLDERS`, bottom first. The graph is read
from the source (every ``import`` / ``from … import``, also those inside functions), so a lazy
import counts as a dependency too.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest
from helpers import REPOSITORY

PACKAGE = "lightning_conditioning"
ROOT = REPOSITORY / PACKAGE

#: the folders, bottom first; folders on one line are peers (one layer). Below them all: the
#: package root's own modules (names, wording, the version); above them all: the package's
#: ``__init__`` (its lazy names) and ``__main__``.
FOLDERS: list[tuple[str, ...]] = [
    ("maths",),  # spectra, solvers, sketches, sums: functions of tensors
    ("distributed",),  # collectives, sharded weights
    ("capture",),  # hooks, adapters, the plan, the extra passes
    ("analysis",),  # a finished window: options, results, eigen work over ranks
    ("views",),  # tables, figures, diagnosis: results in words and pictures
    ("monitors",),  # the framework-free monitors
    ("models",),  # LastBN, CIFAR ResNets
    ("sinks",),  # loggers: TensorBoard, W&B, files
    ("callbacks", "integrations"),  # the shells: Lightning, Hugging Face
    ("report",),  # the command-line report
]
#: layers that must import neither Lightning nor TensorBoard (the core every trainer shares)
CORE = {"", "maths", "distributed", "capture", "analysis", "views", "monitors", "models"}
#: most modules the package root may hold (its ``__init__`` and ``__main__`` included)
ROOT_MODULES = 8


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _folder(module: str) -> str:
    """The top folder of a module ("" for the root's own modules)."""
    return module.split(".")[0] if "." in module or (ROOT / module).is_dir() else ""


def _layer(module: str) -> int:
    if module in ("", "__main__"):
        return len(FOLDERS) + 1
    folder = _folder(module)
    if not folder:
        return 0
    for index, peers in enumerate(FOLDERS, start=1):
        if folder in peers:
            return index
    raise AssertionError(f"{PACKAGE}/{folder}/ is in no layer: place it in FOLDERS")


def _imports(path: Path, modules: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(package modules imported, top-level external packages imported)."""
    internal, external = set(), set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # ``from pkg import submodule`` depends on the submodule, not on pkg's __init__
            names = [
                f"{node.module}.{a.name}"
                if f"{node.module}.{a.name}".removeprefix(f"{PACKAGE}.") in modules
                else node.module
                for a in node.names
            ]
        else:
            continue
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                internal.add(name.removeprefix(PACKAGE).removeprefix("."))
            else:
                external.add(name.split(".")[0])
    return internal, external


MODULES = _modules()
GRAPH = {name: _imports(path, MODULES) for name, path in MODULES.items()}


def _name(layer: int) -> str:
    return "root" if layer == 0 else "package" if layer > len(FOLDERS) else "/".join(FOLDERS[layer - 1])


def test_every_folder_is_a_placed_layer_and_the_root_is_small() -> None:
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    placed = {folder for peers in FOLDERS for folder in peers}
    assert folders == placed, f"unplaced: {sorted(folders - placed)}, missing: {sorted(placed - folders)}"
    own = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(own) <= ROOT_MODULES, own


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_go_down_the_layers(module: str) -> None:
    here = _layer(module)
    for target in GRAPH[module][0]:
        if target == module:
            continue
        assert _layer(target) <= here, f"{module} ({_name(here)}) imports {target} ({_name(_layer(target))})"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _folder(m) in CORE and m not in ("", "__main__")))
def test_core_imports_neither_lightning_nor_tensorboard(module: str) -> None:
    external = GRAPH[module][1]
    assert not external & {"lightning", "pytorch_lightning", "tensorboard", "lightning_utilities"}


def test_no_cycle_between_modules_or_folders() -> None:
    def cycle(edges: dict[str, set[str]]) -> list[str] | None:
        state: dict[str, int] = {}
        stack: list[str] = []

        def visit(node: str) -> list[str] | None:
            state[node] = 1
            stack.append(node)
            for nxt in sorted(edges.get(node, ())):
                if state.get(nxt) == 1:
                    return stack[stack.index(nxt) :] + [nxt]
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
    folders: dict[str, set[str]] = defaultdict(set)
    for module, targets in modules.items():
        for target in targets:
            source, destination = _folder(module), _folder(target)
            if source and destination and source != destination:
                folders[source].add(destination)
    assert cycle(folders) is None, cycle(folders)


#: test folders that stand for no package folder: whole runs, checks on the tree, subprocess scripts
TEST_ONLY_FOLDERS = {"end_to_end", "repository", "scripts"}


def test_the_tests_mirror_the_package() -> None:
    """One test folder per package folder and no other (``TEST_ONLY_FOLDERS`` aside), every test
    module inside one, and no two with one name (pytest imports them by their base names)."""
    tests = REPOSITORY / "tests"
    package_folders = {folder for layer in FOLDERS for folder in layer}
    test_folders = {p.name for p in tests.iterdir() if p.is_dir() and not p.name.startswith((".", "__"))}
    assert test_folders - TEST_ONLY_FOLDERS == package_folders
    assert not sorted(tests.glob("test_*.py")), "a test module at the tests' root: place it in its layer's folder"
    names = [path.name for path in tests.rglob("test_*.py")]
    assert len(names) == len(set(names)) and len(names) > 40
