"""What README.md shows is what runs: the quick start executes as written, and the option
lists name every argument of the callbacks with its real default."""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import re
from pathlib import Path

import pytest
from helpers import REPOSITORY

from lightning_conditioning import ConditioningCallback, WeightDominationCallback

README = (REPOSITORY / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end]


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_quick_start_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (code,) = _python_blocks(_section("Quick start"))
    monkeypatch.chdir(tmp_path)  # its TensorBoard run folder lands here
    printed = io.StringIO()
    namespace: dict[str, object] = {"__name__": "readme_quick_start"}
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md#quick-start", "exec"), namespace)
    conditioning = namespace["conditioning"]
    assert isinstance(conditioning, ConditioningCallback)
    assert conditioning.layer_names == ["hidden", "fc"]  # what the comment says
    assert "['hidden', 'fc']" in printed.getvalue()
    assert conditioning.results["fc"].step == 64  # 80 steps: the last scheduled one
    assert list((tmp_path / "runs").rglob("events.out.tfevents.*"))


def _documented_signature(name: str) -> dict[str, str]:
    """``{argument: default source}`` of the ``Name(...)`` signature the README writes out."""
    match = re.search(rf"`{name}\((.*?)\)`", README, flags=re.S)
    assert match, name
    call = ast.parse(f"f({' '.join(match.group(1).split())})", mode="eval").body
    assert isinstance(call, ast.Call)
    return {keyword.arg: ast.unparse(keyword.value) for keyword in call.keywords if keyword.arg}


@pytest.mark.parametrize("callback", [ConditioningCallback, WeightDominationCallback])
def test_option_lists_name_every_argument_with_its_default(callback: type) -> None:
    documented = _documented_signature(callback.__name__)
    real = {
        name: repr(p.default)
        for name, p in inspect.signature(callback).parameters.items()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    }
    assert set(documented) == set(real), set(documented) ^ set(real)
    for name, default in documented.items():
        assert ast.literal_eval(default) == ast.literal_eval(real[name]), name


def test_layout_names_every_module_of_the_package() -> None:
    """Every folder (`` `maths/` ``), every module of a folder (`` `spectra` ``) and every module
    of the root (`` `schema.py` ``)."""
    layout = _section("Layout")
    package = REPOSITORY / "lightning_conditioning"
    names = []
    for path in sorted(package.rglob("*.py")):
        if path.name == "__init__.py":
            if path.parent != package:
                names.append(f"`{path.parent.name}/`")
        else:
            names.append(f"`{path.name}`" if path.parent == package else f"`{path.stem}`")
    missing = [name for name in names if name not in layout]
    assert not missing, missing


def test_every_dotted_path_the_docs_cite_exists() -> None:
    """``lightning_conditioning.x.y`` in README, CHANGELOG, docs and the example projects: a
    module, or a name a module holds (the CHANGELOG's history of removed names aside)."""
    import importlib

    root = REPOSITORY
    texts = [
        root / "README.md",
        *sorted((root / "docs").glob("*.md")),
        *sorted((root / "example_projects").rglob("*.py")),
    ]
    cited = {m for path in texts for m in re.findall(r"lightning_conditioning(?:\.[A-Za-z_]\w*)+", path.read_text())}
    assert cited
    missing = []
    for dotted in sorted(cited):
        parts = dotted.split(".")
        for split in range(len(parts), 0, -1):  # the longest importable module, then attributes
            try:
                found: object = importlib.import_module(".".join(parts[:split]))
            except ImportError:
                continue
            try:
                for name in parts[split:]:
                    found = getattr(found, name)
            except AttributeError:
                missing.append(dotted)
            break
        else:
            missing.append(dotted)
    assert not missing, missing


def test_every_file_path_the_docs_cite_exists() -> None:
    """``tests/…py``, ``benchmarks/…py``, ``example_projects/…`` and ``docs/…md`` cited in README, docs,
    the benchmarks' results and the example projects: a file of the repository (test ids after
    ``::`` included: the test exists in that file); a command's ``--out`` file is no citation."""
    texts = [
        REPOSITORY / "README.md",
        REPOSITORY / "benchmarks" / "RESULTS.md",
        *sorted((REPOSITORY / "docs").glob("*.md")),
        *sorted((REPOSITORY / "example_projects").rglob("*.md")),
        *sorted((REPOSITORY / "example_projects").rglob("*.py")),
    ]
    pattern = r"(?<!--out )\b((?:tests|benchmarks|example_projects|docs)/[\w/]+\.(?:py|md|json|yaml))(?:::(\w+))?"
    cited = {m for path in texts for m in re.findall(pattern, path.read_text())}
    assert len(cited) > 20
    missing = [
        f"{file}::{test}" if test else file
        for file, test in sorted(cited)
        if not (REPOSITORY / file).is_file() or (test and f"def {test}(" not in (REPOSITORY / file).read_text())
    ]
    assert not missing, missing
