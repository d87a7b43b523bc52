"""A callback that keeps, per step, what Figs. 6-9 plot about the last linear layer."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch

from example_projects.cifar_resnet.model import negative_bn_beta_fraction
from lightning_conditioning import ConditioningCallback, WeightDominationCallback

CONDITIONING_KEYS: tuple[str, ...] = (
    "input_lambda_max",
    "grad_lambda_max",
    "fim_lambda_max",
    "input_kappa_100",
    "dead_input_units",
)
DOMINATION_KEYS: tuple[str, ...] = (
    "grad_weight_ratio",
    "weight_spectral_norm",
    "weight_fro",
    "grad_spectral_norm",
    "update_weight_ratio",
)


class FiniteWeightDomination(WeightDominationCallback):
    """:class:`WeightDominationCallback` that skips a check when a gradient is not finite.

    A diverging run (e.g. PreResNetv1-110 at lr 0.1) produces NaN/Inf gradients. The package
    reports NaN statistics for such a step; this example skips the whole check instead, so its
    history holds only finite checks, and remembers the step of the last one (``last_step``).
    """

    last_step: int | None = None  # the optimizer step of the latest completed check

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if trainer.global_step % self.every_n_steps == 0 and all(bool(torch.isfinite(g).all()) for g in grads):
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
            self.last_step = trainer.global_step


class LastLayerHistory(pl.Callback):
    """Training loss/error per step, and the last linear layer's analysis per analysed step.

    Must come *after* the two analysis callbacks in ``Trainer(callbacks=[...])`` so that their
    ``results`` for the current step are ready in ``on_train_batch_end``.

    Attributes:
        loss / error: training loss and error of every step (this rank's batch).
        analyses: ``{step: {quantity: value}}`` with :data:`CONDITIONING_KEYS`,
            :data:`DOMINATION_KEYS` and ``negative_bn_beta_fraction``.
        val_error: ``[(epoch, error)]`` after each validation epoch.
    """

    def __init__(self, conditioning: ConditioningCallback, domination: FiniteWeightDomination, layer: str) -> None:
        self.conditioning = conditioning
        self.domination = domination
        self.layer = layer
        self.loss: list[float] = []
        self.error: list[float] = []
        self.analyses: dict[int, dict[str, float]] = {}
        self.val_error: list[tuple[int, float]] = []

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        self.loss.append(float(loss) if loss is not None else math.nan)
        error = trainer.callback_metrics.get("train_error_step", trainer.callback_metrics.get("train_error"))
        self.error.append(float(error) if error is not None else math.nan)
        conditioning = self.conditioning.results.get(self.layer)
        step = trainer.global_step - 1  # the step whose optimizer update just ran
        if conditioning is None or conditioning.step != step or step in self.analyses:
            return
        metrics = {k.rsplit("/", 1)[1]: v for k, v in conditioning.metrics().items()}
        entry = {key: float(metrics.get(key, math.nan)) for key in CONDITIONING_KEYS}
        fresh = self.domination.last_step == step
        stats = self.domination.results.get(self.layer) if fresh else None
        for key in DOMINATION_KEYS:
            value = getattr(stats, key, None) if stats is not None else None
            entry[key] = float(value) if value is not None else math.nan
        entry["negative_bn_beta_fraction"] = negative_bn_beta_fraction(pl_module)
        self.analyses[step] = entry

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        error = trainer.callback_metrics.get("val_error")
        if error is not None:
            self.val_error.append((trainer.current_epoch, float(error)))

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready history."""
        return {
            "loss": self.loss,
            "error": self.error,
            "val_error": self.val_error,
            "analyses": {str(step): values for step, values in sorted(self.analyses.items())},
        }
