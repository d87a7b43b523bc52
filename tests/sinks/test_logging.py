"""What a TensorBoard run actually contains, read back with TensorBoard's own reader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import SequentialClassifier, loader, seeded
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

from lightning_conditioning import ConditioningCallback


def test_tensorboard_scalars_and_histograms(tmp_path: Path) -> None:
    x, y = torch.randn(64, 12), torch.randint(0, 5, (64,))
    net = seeded(lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 5)))
    callback = ConditioningCallback(every_n_steps=2)
    trainer = Trainer(
        max_steps=3,
        callbacks=[callback],
        logger=TensorBoardLogger(tmp_path, name="run"),
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(SequentialClassifier(net), loader(x, y, 16))
    trainer.logger.experiment.flush()
    events = EventAccumulator(str(Path(trainer.log_dir)), size_guidance={"histograms": 0})
    events.Reload()
    tags = events.Tags()
    for layer in ("net.0", "net.2"):
        for key in ("input_lambda_max", "grad_kappa_100", "fim_kappa_50", "dead_input_units"):
            tag = f"conditioning/{layer}/{key}"
            assert tag in tags["scalars"], tag
            assert [e.step for e in events.Scalars(tag)] == [0, 2]
        for label in ("input", "grad"):
            tag = f"conditioning/{layer}/{label}_log10_eigenvalues"
            assert tag in tags["histograms"], tag
            histograms = events.Histograms(tag)
            assert [h.step for h in histograms] == [0, 2]
    # the last logged value is the one the callback holds
    last = events.Scalars("conditioning/net.2/fim_lambda_max")[-1].value
    fim = callback.results["net.2"].fim
    assert fim is not None and last == pytest.approx(fim.lambda_max, rel=1e-6)
    # the histogram holds the nonzero eigenvalues: 16 for Σx, 4 (rank-deficient logits) for Σ∇h
    assert events.Histograms("conditioning/net.2/grad_log10_eigenvalues")[-1].histogram_value.num == 4
    assert events.Histograms("conditioning/net.2/input_log10_eigenvalues")[-1].histogram_value.num == 16
