"""Session set-up: mypy (``tests/repository/test_typing.py``), when selected, starts at collection in a
process of its own, at a lower priority, and its test collects the result: ~40 s of one core
that the rest of the suite would otherwise wait for."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

MYPY_TEST = "test_mypy_is_clean"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any(item.name == MYPY_TEST for item in items) and not hasattr(config, "_mypy_run"):
        config._mypy_run = subprocess.Popen(  # type: ignore[attr-defined]
            [sys.executable, "-m", "mypy"],
            cwd=Path(__file__).parents[1],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: os.nice(10),
        )


@pytest.fixture
def mypy_run(request: pytest.FixtureRequest) -> subprocess.Popen[str] | None:
    """The mypy process started at collection (None when it was not started)."""
    return getattr(request.config, "_mypy_run", None)
