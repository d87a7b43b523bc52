"""``WeightDominationCallback``: is any layer's gradient feeble next to its weight?"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from lightning_conditioning.analysis.options import check_one_per_prefix
from lightning_conditioning.callbacks.support import loss_scale, prefix_state_key, rank_zero_warn, unsupported
from lightning_conditioning.distributed.collectives import Collectives
from lightning_conditioning.maths.domination import WeightStatistics, is_dominated
from lightning_conditioning.monitors.domination import DominationOptions, WeightDominationMonitor
from lightning_conditioning.monitors.readouts import DominationReadout
from lightning_conditioning.sinks import publish_weight_domination

__all__ = ["WeightDominationCallback"]


class WeightDominationCallback(DominationReadout, Callback):
    r"""Log σmax(∇W)/σmax(W) per layer and warn about layers in weight domination.

    A thin Lightning shell over :class:`~lightning_conditioning.WeightDominationMonitor`.

    At every ``every_n_steps``-th optimizer step, in ``on_before_optimizer_step`` (after the
    backward of the last accumulated micro-batch, after AMP unscaling and after DDP averaged
    the gradients), for the weight of every Linear/Conv layer (conv weights read as
    ``out × rest``) it logs, at ``step = trainer.global_step``:

    * ``{prefix}/{layer}/grad_weight_ratio``: σmax(∂L/∂W) / σmax(W), Definition 1's ratio;
    * ``{prefix}/{layer}/weight_spectral_norm`` and ``grad_spectral_norm``: σmax(W),
      σmax(∂L/∂W) (exact, float64);
    * ``{prefix}/{layer}/grad_weight_ratio_fro``: ‖∂L/∂W‖_F / ‖W‖_F;
    * ``{prefix}/{layer}/update_weight_ratio``: σmax(ΔW) / σmax(W) of the optimizer update
      actually applied at that step (the weight is snapshotted on checked steps only);
    * ``{prefix}/dominated_layers``: how many layers are dominated (see below);
    * ``{prefix}/{layer}/imbalance`` and ``relative_imbalance`` (``log_imbalance``):
      |‖W_k‖_F² − ‖W_{k−1}‖_F²| against the previous selected layer in module order, and
      that divided by ‖W_k‖_F² + ‖W_{k−1}‖_F². Not meaningful across a BatchNorm (weights
      before a BN are scale-invariant).

    Weight domination is something a layer *falls into* while it trains (the paper's
    ResNet-110: the last layer's ratio fell 30,000× from step 0 while the loss sat at ln 10),
    so each layer's ratio is judged against its own history, kept in bounded memory (its
    running peak, checkpointed). A layer is *dominated* at a check when

    * ``"fallen"``: its ratio is ``fall_factor``× (default 1000) or more below its own peak,
      net of the training loss (the ratio's fall divided by the loss's fall since the peak: a
      ratio that falls because the loss falls, in a run converging to a small loss, does not
      count; measured on MNIST MLPs trained to a loss of 1e-4, healthy layers' ratios fell
      up to 4.8e4×, net of the loss at most 4×);
    * ``"below_threshold"``: its ratio is below ``threshold`` *and* at least 10× below its own
      peak: a ratio that has been small since the layer's first check (the Linear before a
      LayerScale at 1e-6, a conv before a BatchNorm whose γ starts at 0 and grows) is how the
      layer starts, not domination;
    * ``"not_updated"``: the optimizer step moved its weight by at most ``update_threshold``
      relative to it (by default: not at all). This catches the paper's Fig. 4 set-up, a layer
      left out of the optimizer: ``zero_grad`` never clears such a layer's ``.grad``, so its
      stale, accumulating gradient looks large while the layer learns nothing.

    A layer whose gradient is exactly zero (status ``"zero_gradient"``: a zero-initialised
    BatchNorm γ or head after it, dead units) or whose weight is exactly zero
    (``"zero_weight"``: a zero-initialised head) is never dominated; it is named once, in an
    info message with the likely reason, and has ``results[layer].status`` saying so. A layer
    dominated for ``patience`` consecutive checks gets one warning naming it and the rule
    (and, for the model's final linear layer, the paper's remedy
    :func:`~lightning_conditioning.models.add_last_bn`). Frozen layers (``requires_grad`` off)
    and layers without a gradient at that step are skipped. The training loss of a checked
    step is read in ``on_before_backward`` (summed over accumulated micro-batches, unscaled
    from AMP) and averaged over the DDP ranks, so every rank keeps the same history.

    Args:
        every_n_steps: check optimizer steps ``0, n, 2n, …``.
        threshold: a gradient ratio below this counts (once 10× below the layer's own peak).
        update_threshold: an applied update ratio at or below this counts as well.
        patience: consecutive dominated checks before the warning.
        layer_types: module types to check (default Linear and ConvNd).
        include / exclude: glob patterns of qualified layer names.
        log_imbalance: also log the layer imbalance.
        prefix: first part of every logged key.
        fall_factor: a ratio this many times below the layer's own peak (net of the loss)
            counts; None turns the history rule off.

    Example::

        trainer = Trainer(callbacks=[WeightDominationCallback(every_n_steps=50, threshold=1e-4)])
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        threshold: float = 1e-4,
        update_threshold: float = 0.0,
        patience: int = 3,
        layer_types: Sequence[type[nn.Module]] | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        log_imbalance: bool = True,
        prefix: str = "weight_domination",
        fall_factor: float | None = 1000.0,
    ) -> None:
        given = locals()  # the check's options by name, validated once
        #: the check's options (:class:`~lightning_conditioning.monitors.domination.DominationOptions`)
        self.options = DominationOptions(**{name: given[name] for name in DominationOptions.names()})
        for name, value in self.options.as_kwargs().items():
            setattr(self, name, value)
        self.prefix = prefix
        self.monitor: WeightDominationMonitor | None = None
        self._restored: dict[str, Any] = {}
        self._loss_step: int | None = None  # the checked step whose loss is being summed
        self._loss_sum = 0.0
        self._set_up = False

    @property
    def state_key(self) -> str:
        # one state per prefix, whatever the options (see prefix_state_key)
        return prefix_state_key(self, self._set_up)

    def is_dominated(self, stats: WeightStatistics) -> bool:
        """Whether ``stats`` alone count as weight domination: the history-free rules
        (:func:`~lightning_conditioning.maths.domination.is_dominated`); :attr:`dominated` also
        judges each layer against its own history."""
        return is_dominated(stats, self.options.threshold, self.options.update_threshold)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        check_one_per_prefix(self, getattr(trainer, "callbacks", ()), WeightDominationCallback)
        self._set_up = True
        if stage == "fit" and self.monitor is not None:  # a second fit: keep what was learned
            self._restored = self.monitor.state_dict()
            self.monitor = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        problem = unsupported("weight domination", trainer.strategy)
        if problem:  # never silently empty, never a wrong number: step aside, and say why
            rank_zero_warn(f"{type(self).__name__} does nothing in this run: {problem}")
            return
        # after configure_model: FSDP2 has replaced the parameters by sharded DTensors
        self.monitor = WeightDominationMonitor(
            pl_module,
            prefix=self.prefix,
            warn=rank_zero_warn,
            info=rank_zero_info,
            collectives=Collectives.strategy(trainer.strategy),
            optimizer=list(trainer.optimizers) or None,
            **self.options.as_kwargs(),
        )
        self.monitor.load_state_dict(self._restored)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        step = trainer.global_step
        if self.monitor is None or not self.monitor.is_due(step):
            return  # one host read per backward of a checked step only
        if self._loss_step != step:
            self._loss_step, self._loss_sum = step, 0.0
        # Lightning divides the loss by the accumulated micro-batches (their sum is the mean);
        # a GradScaler has multiplied it by its scale
        self._loss_sum += float(loss.detach()) / loss_scale(trainer)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        step = trainer.global_step
        if self.monitor is not None and self.monitor.is_due(step):
            self.monitor.before_optimizer_step(step, loss=self._step_loss(trainer, pl_module, step))

    def _step_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int) -> float | None:
        """The training loss of checked step ``step``, the mean over DDP ranks (every rank
        calls this at the same steps: one scalar all-reduce per check)."""
        loss = self._loss_sum if self._loss_step == step else None
        if trainer.world_size > 1:
            value = torch.tensor(math.nan if loss is None else loss, device=pl_module.device)
            loss = float(trainer.strategy.reduce(value, reduce_op="mean"))
        return loss

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        monitor = self.monitor
        if monitor is None or monitor.pending_step is None or trainer.global_step == monitor.pending_step:
            return  # no check pending, or its optimizer step has not run yet
        step = monitor.pending_step
        metrics = monitor.after_optimizer_step()
        if trainer.is_global_zero:
            publish_weight_domination(trainer.loggers, metrics, step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is not None:
            self.monitor.cancel()

    def state_dict(self) -> dict[str, Any]:
        return self.monitor.state_dict() if self.monitor is not None else dict(self._restored)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = dict(state_dict)
        if self.monitor is not None:
            self.monitor.load_state_dict(state_dict)
