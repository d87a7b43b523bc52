"""LightningCLI configuration and opt-in auto-registration through the entry point."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest

from lightning_conditioning import ConditioningCallback, WeightDominationCallback
from lightning_conditioning.callbacks.auto import ENV_AUTO, ENV_EVERY_N_STEPS, AutoConditioningCallback

pytest.importorskip("jsonargparse")
from helpers import REPOSITORY

from example_projects.cli.main import main  # noqa: E402

CONFIG = REPOSITORY / "example_projects" / "cli" / "config.yaml"
QUIET = [
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.enable_checkpointing=false",
]


def test_yaml_config_sets_both_callbacks(tmp_path: Path) -> None:
    cli = main(
        ["fit", "--config", str(CONFIG), "--trainer.max_steps=3", f"--trainer.default_root_dir={tmp_path}", *QUIET]
    )
    conditioning = [c for c in cli.trainer.callbacks if isinstance(c, ConditioningCallback)]
    domination = [c for c in cli.trainer.callbacks if isinstance(c, WeightDominationCallback)]
    assert len(conditioning) == 1 and len(domination) == 1
    callback = conditioning[0]
    assert (callback.every_n_steps, callback.conv_mode, callback.fisher) == (20, "patch", "true")
    assert callback.kappa_percents == (50, 90, 100) and callback.probe_batches == 2
    assert domination[0].threshold == 1e-5 and domination[0].patience == 2
    assert cli.trainer.global_step == 3
    assert "net.0" not in callback.results and callback.results["net.3"].status == "ok"


def test_callback_from_the_command_line(tmp_path: Path) -> None:
    cli = main(
        [
            "fit",
            "--trainer.max_steps=2",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
            "--trainer.callbacks+=lightning_conditioning.ConditioningCallback",
            "--trainer.callbacks.every_n_steps=1",
            "--trainer.callbacks.kappa_percents=[25, 100]",
        ]
    )
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, ConditioningCallback)]
    assert callback.every_n_steps == 1 and callback.kappa_percents == (25, 100)
    assert callback.results["net.6"].fim is not None


@pytest.mark.parametrize("option, value", [("conv_mode", "im2col"), ("fisher", "exact"), ("every_n_steps", "often")])
def test_wrong_option_value_fails_validation(tmp_path: Path, capsys, option: str, value: str) -> None:
    with pytest.raises(SystemExit) as raised:
        main(
            [
                "fit",
                "--trainer.max_steps=1",
                f"--trainer.default_root_dir={tmp_path}",
                *QUIET,
                "--trainer.callbacks+=lightning_conditioning.ConditioningCallback",
                f"--trainer.callbacks.{option}={value}",
            ]
        )
    assert raised.value.code != 0
    error = capsys.readouterr().err
    assert option in error and value in error, error


def _trainer() -> pl.Trainer:
    return pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)


def test_entry_point_is_off_by_default(monkeypatch) -> None:
    monkeypatch.delenv(ENV_AUTO, raising=False)
    assert not [c for c in _trainer().callbacks if isinstance(c, ConditioningCallback)]


def test_entry_point_enabled_adds_exactly_one(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv(ENV_AUTO, "1")
    monkeypatch.setenv(ENV_EVERY_N_STEPS, "7")
    auto = [c for c in _trainer().callbacks if isinstance(c, ConditioningCallback)]
    assert len(auto) == 1 and isinstance(auto[0], AutoConditioningCallback)
    assert auto[0].every_n_steps == 7
    # the user's own callback wins; the automatic one steps aside at setup
    cli = main(
        [
            "fit",
            "--trainer.max_steps=1",
            f"--trainer.default_root_dir={tmp_path}",
            *QUIET,
            "--trainer.callbacks+=lightning_conditioning.ConditioningCallback",
            "--trainer.callbacks.every_n_steps=1",
        ]
    )
    remaining = [c for c in cli.trainer.callbacks if isinstance(c, ConditioningCallback)]
    assert len(remaining) == 1 and type(remaining[0]) is ConditioningCallback
    assert remaining[0].results


def test_entry_point_rejects_a_bad_schedule(monkeypatch) -> None:
    monkeypatch.setenv(ENV_AUTO, "true")
    monkeypatch.setenv(ENV_EVERY_N_STEPS, "often")
    with pytest.raises(ValueError, match=ENV_EVERY_N_STEPS):
        _trainer()
