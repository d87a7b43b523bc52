"""The repository's own tools: ``scripts/logged_scalars.py`` names every difference between two
runs' scalars (a missing key, a changed value) and takes NaN for NaN."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from types import ModuleType

from helpers import REPOSITORY


def _logged_scalars() -> ModuleType:
    spec = importlib.util.spec_from_file_location("logged_scalars", REPOSITORY / "scripts" / "logged_scalars.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_names_every_difference_and_takes_nan_for_nan(tmp_path: Path) -> None:
    tool = _logged_scalars()
    before = {"fit": {"0/a": 1.0, "0/b": math.nan, "0/c": 2.0, "0/gone": 3.0}}
    after = {"fit": {"0/a": 1.0, "0/b": math.nan, "0/c": 2.5, "0/new": 4.0}}
    assert tool.differences(before, before) == []
    assert tool.differences(before, after) == [
        "fit: 0/gone only before",
        "fit: 0/new only after",
        "fit: 0/c: 2.0 → 2.5",
    ]
    (tmp_path / "a.json").write_text(json.dumps(before))
    (tmp_path / "b.json").write_text(json.dumps(after))
    assert tool.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "a.json")]) == 0
    assert tool.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
