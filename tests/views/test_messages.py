"""The package's messages reach the user: start lines seen without any logging set-up,
warnings attributed to the user's line (not the package's), whole sentences."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from helpers import TESTS, SequentialClassifier, fit, loader
from torch import nn

from lightning_conditioning import ConditioningCallback, ConditioningMonitor


def _dead_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))
    with torch.no_grad():
        net[0].bias[:24] = -100.0  # 75% dead units: the diagnosis warns at step 0
    return net


def test_plain_loop_warnings_point_at_the_users_line() -> None:
    net = _dead_net()
    monitor = ConditioningMonitor(net, every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with monitor.track(0):
            nn.functional.cross_entropy(net(torch.randn(16, 8)), torch.randint(0, 3, (16,))).backward()
    dead = [w for w in caught if "dead input units" in str(w.message)]
    assert dead and dead[0].filename == __file__
    text = str(dead[0].message)
    assert "…" not in text and text.splitlines()[1].startswith("Remedy: ") and text.splitlines()[1].endswith(".")


def test_lightning_warnings_point_at_the_users_fit_call() -> None:
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(SequentialClassifier(_dead_net()), loader(x, y, 16), [ConditioningCallback(every_n_steps=1)])
    dead = [w for w in caught if "dead input units" in str(w.message)]
    assert dead and Path(dead[0].filename).parent == TESTS  # helpers.fit's trainer.fit(...) line


def test_start_lines_reach_a_user_who_configured_no_logging(tmp_path: Path) -> None:
    script = tmp_path / "plain_loop.py"
    script.write_text(
        textwrap.dedent("""
        import torch
        from torch import nn
        from lightning_conditioning import ConditioningMonitor
        net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        monitor = ConditioningMonitor(net, every_n_steps=1, warn_diagnosis=False)
        with monitor.track(0):
            net(torch.randn(16, 4)).square().mean().backward()
    """)
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "ConditioningMonitor: analysing 2 layers" in done.stderr
    assert "memory plan" in done.stderr
    # and a user who silences the package's logger is obeyed
    silenced = script.read_text().replace(
        "import torch\n",
        "import logging, torch\nlogging.getLogger('lightning_conditioning').setLevel(logging.WARNING)\n",
        1,
    )
    script.write_text(silenced)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "analysing" not in done.stderr, done.stderr


@pytest.mark.parametrize("limit", [60, 160])
def test_short_warnings_are_whole_sentences(limit: int) -> None:
    from lightning_conditioning.views.diagnosis import Finding
    from lightning_conditioning.views.wording import short_warning

    finding = Finding(
        "rank_deficient",
        "a",
        "κ_p is not a measurement in 3 layer(s): "
        + "; ".join(f"layer{i} Σx: κ_80 = ∞ (rank 6 of 8)" for i in range(10))
        + ". More text.",
        remedy="one thing; another: a third",
    )
    text = short_warning(finding, limit=limit)
    assert text == "κ_p is not a measurement in 3 layer(s).\nRemedy: one thing; another: a third."
