"""ConditioningCallback runs the diagnosis: one warning per rule, an opt-in printout."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from helpers import SequentialClassifier, fit, loader
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_conditioning import ConditioningCallback


def plain_deep(depth: int = 20, width: int = 32) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    features = 16
    for _ in range(depth - 1):
        linear = nn.Linear(features, width, bias=False)
        nn.init.normal_(linear.weight, std=0.5 / math.sqrt(features))  # small: vanishing
        layers += [linear, nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, 4, bias=False))
    return nn.Sequential(*layers)


def _data():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(128, 16, generator=generator), torch.randint(0, 4, (128,), generator=generator)


def test_vanishing_is_warned_once_and_printed(capsys) -> None:
    x, y = _data()
    callback = ConditioningCallback(every_n_steps=1, print_diagnosis=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, _ = fit(SequentialClassifier(plain_deep(), lr=0.0), loader(x, y, 32), [callback], max_steps=3)
    vanishing = [str(w.message) for w in record if "exponentially" in str(w.message)]
    rules = {r.rule for r in callback.findings(trainer)}
    assert {"vanishing_forward", "vanishing_backward"} <= rules
    # one warning per rule although three analysed steps fire it
    assert len(vanishing) == len([r for r in rules if r.startswith("vanishing")]), vanishing
    printed = capsys.readouterr().out
    assert "Conditioning diagnosis at step 2" in printed and "vanishing_forward" in printed


def test_healthy_net_stays_quiet(capsys) -> None:
    x, y = _data()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    callback = ConditioningCallback(every_n_steps=1, print_diagnosis=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer, _ = fit(SequentialClassifier(net), loader(x, y, 32), [callback], max_steps=2)
    assert callback.findings(trainer) == []
    assert not [w for w in record if "ConditioningCallback: step" in str(w.message)]
    assert "no findings" in capsys.readouterr().out


def test_tensorboard_layout_is_opt_in(tmp_path: Path) -> None:
    x, y = _data()

    def layout_tags(flag: bool, name: str) -> dict:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
        logger = TensorBoardLogger(tmp_path, name=name)
        trainer = pl.Trainer(
            max_steps=1,
            logger=logger,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
            callbacks=[ConditioningCallback(every_n_steps=1, tensorboard_layout=flag)],
        )
        trainer.fit(SequentialClassifier(net), loader(x, y, 32))
        logger.experiment.flush()
        events = EventAccumulator(logger.log_dir)
        events.Reload()
        try:
            return events.PluginTagToContent("custom_scalars")
        except KeyError:  # no such plugin data in the run
            return {}

    assert layout_tags(True, "with")
    assert not layout_tags(False, "without")
