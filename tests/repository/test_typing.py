"""The package type-checks with mypy and the tree lints clean with ruff (configuration of both in
pyproject.toml)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPOSITORY

ROOT = REPOSITORY


@pytest.mark.skipif(
    shutil.which("mypy") is None and not any((Path(p) / "mypy").exists() for p in sys.path),
    reason="mypy is a test extra",
)
@pytest.mark.slow
def test_mypy_is_clean(mypy_run: subprocess.Popen[str] | None) -> None:
    """mypy over the package (started at collection by ``conftest.py``, beside the other tests)."""
    if mypy_run is None:
        mypy_run = subprocess.Popen(
            [sys.executable, "-m", "mypy"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    try:
        stdout, stderr = mypy_run.communicate(timeout=600)
    finally:
        mypy_run.kill()
    assert mypy_run.returncode == 0, stdout[-5000:] + stderr[-2000:]
    assert "Success" in stdout


def test_version_in_one_place() -> None:
    import lightning_conditioning
    from lightning_conditioning.__about__ import __version__

    assert lightning_conditioning.__version__ == __version__
    result = subprocess.run(
        [sys.executable, "-m", "lightning_conditioning", "--version"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and __version__ in result.stdout
    assert (ROOT / "lightning_conditioning" / "py.typed").exists()


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="ruff is a test extra")
@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]], ids=["lint", "format"])
def test_ruff_is_clean(command: list[str]) -> None:
    """The lint (import order and the docstring subset included) and the format configured in
    pyproject.toml ([tool.ruff]) hold over the whole tree."""
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
