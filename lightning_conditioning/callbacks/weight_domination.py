"""``WeightDominationCallback``: is any layer's gradient feeble next to its weight?"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_conditioning.capture import checked_layer_types, select_layers
from lightning_conditioning.domination import WeightStatistics, frobenius_norm, imbalance, weight_statistics
from lightning_conditioning.models.last_bn import last_linear_name
from lightning_conditioning.sinks import publish_weight_domination

__all__ = ["WeightDominationCallback"]


class WeightDominationCallback(Callback):
    r"""Log σmax(∇W)/σmax(W) per layer and warn about layers in weight domination.

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

    A layer is *dominated* at a check when its gradient ratio is below ``threshold``, or when
    the optimizer step moved its weight by at most ``update_threshold`` relative to it (by
    default: not at all). The second rule catches the paper's Fig. 4 set-up, a layer whose
    updates are blocked by leaving it out of the optimizer: ``zero_grad`` never clears such a
    layer's ``.grad``, so its stale, accumulating gradient looks large while the layer learns
    nothing. A layer dominated for ``patience`` consecutive checks gets one warning naming it
    (and, for the model's final linear layer, the paper's remedy
    :func:`~lightning_conditioning.models.add_last_bn`). Frozen layers (``requires_grad`` off)
    and layers without a gradient at that step are skipped.

    Args:
        every_n_steps: check optimizer steps ``0, n, 2n, …``.
        threshold: a gradient ratio below this counts as weight domination.
        update_threshold: an applied update ratio at or below this counts as well.
        patience: consecutive checks below ``threshold`` before the warning.
        layer_types: module types to check (default Linear and ConvNd).
        include / exclude: glob patterns of qualified layer names.
        log_imbalance: also log the layer imbalance.
        prefix: first part of every logged key.

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
    ) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
            raise ValueError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
        if not (isinstance(threshold, (int, float)) and threshold > 0 and math.isfinite(threshold)):
            raise ValueError(f"threshold must be a positive finite number, got {threshold!r}")
        if not (isinstance(update_threshold, (int, float)) and 0 <= update_threshold < math.inf):
            raise ValueError(f"update_threshold must be a finite number >= 0, got {update_threshold!r}")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be an int >= 1, got {patience!r}")
        selected_types = checked_layer_types(layer_types)
        self.every_n_steps = every_n_steps
        self.threshold = float(threshold)
        self.update_threshold = float(update_threshold)
        self.patience = patience
        self.layer_types = selected_types
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude) if exclude is not None else None
        self.log_imbalance = log_imbalance
        self.prefix = prefix
        self._weights: dict[str, nn.Parameter] = {}
        self._last_linear: str | None = None
        self._last_checked_step: int | None = None
        self._results: dict[str, WeightStatistics] = {}
        self._snapshot: dict[str, Tensor] = {}
        self._pending_step: int | None = None
        self._below: dict[str, int] = {}
        self._warned: set[str] = set()

    @property
    def results(self) -> dict[str, WeightStatistics]:
        """Latest check: ``{layer name: WeightStatistics}`` (layers with a gradient only)."""
        return dict(self._results)

    @property
    def warned_layers(self) -> list[str]:
        """Layers the callback has warned about (dominated for ``patience`` checks), sorted."""
        return sorted(self._warned)

    @property
    def dominated(self) -> list[str]:
        """Layers whose latest ratio is below the threshold."""
        return [name for name, stats in self._results.items() if self.is_dominated(stats)]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        layers = select_layers(pl_module, self.layer_types, self.include, self.exclude)
        self._weights = {
            name: weight
            for name, weight in ((n, getattr(m, "weight", None)) for n, m in layers.items())
            if isinstance(weight, nn.Parameter)
        }
        if not self._weights:
            rank_zero_warn(f"{type(self).__name__}: no layer with a weight matched; nothing to check.")
        self._last_linear = last_linear_name(pl_module)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any
    ) -> None:
        step = trainer.global_step
        if step % self.every_n_steps or step == self._last_checked_step:
            return
        self._last_checked_step = step  # several optimizers: check once per step
        self._pending_step = step
        self._results, self._snapshot = {}, {}
        for name, weight in self._weights.items():
            if not weight.requires_grad or weight.grad is None:
                continue  # frozen, or no gradient at this step
            self._results[name] = weight_statistics(weight, weight.grad)
            self._snapshot[name] = weight.detach().clone()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = self._pending_step
        if step is None or trainer.global_step == step:
            return  # no check pending, or its optimizer step has not run yet
        self._pending_step = None
        for name, before in self._snapshot.items():
            after = self._weights[name].detach()
            self._results[name] = self._results[name].with_update(after - before)
        self._snapshot = {}
        metrics = self._metrics()
        self._update_warnings(step)
        if trainer.is_global_zero:
            publish_weight_domination(
                trainer.loggers, {k: v for k, v in metrics.items() if math.isfinite(v)}, step
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._pending_step, self._snapshot = None, {}

    def is_dominated(self, stats: WeightStatistics) -> bool:
        """Definition 1's ratio below ``threshold``, or an applied update ratio at or below
        ``update_threshold`` (by default: a weight the optimizer step left unchanged)."""
        if stats.grad_weight_ratio < self.threshold:
            return True
        return stats.update_weight_ratio is not None and (
            stats.update_weight_ratio <= self.update_threshold
        )

    def _metrics(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        previous_fro: float | None = None
        for name, weight in self._weights.items():
            base = f"{self.prefix}/{name}"
            if self.log_imbalance:
                current_fro = frobenius_norm(weight)
                if previous_fro is not None:
                    absolute, relative = imbalance(previous_fro, current_fro)
                    metrics[f"{base}/imbalance"] = absolute
                    metrics[f"{base}/relative_imbalance"] = relative
                previous_fro = current_fro
            stats = self._results.get(name)
            if stats is None:
                continue
            metrics[f"{base}/grad_weight_ratio"] = stats.grad_weight_ratio
            metrics[f"{base}/weight_spectral_norm"] = stats.weight_spectral_norm
            metrics[f"{base}/grad_spectral_norm"] = stats.grad_spectral_norm
            metrics[f"{base}/grad_weight_ratio_fro"] = stats.grad_weight_ratio_fro
            if stats.update_weight_ratio is not None:
                metrics[f"{base}/update_weight_ratio"] = stats.update_weight_ratio
        metrics[f"{self.prefix}/dominated_layers"] = float(len(self.dominated))
        return metrics

    def _update_warnings(self, step: int) -> None:
        dominated = set(self.dominated)
        for name, stats in self._results.items():
            self._below[name] = self._below.get(name, 0) + 1 if name in dominated else 0
            if self._below[name] < self.patience or name in self._warned:
                continue
            self._warned.add(name)
            if stats.grad_weight_ratio < self.threshold:
                evidence = (
                    f"σmax(∇W)/σmax(W) = {stats.grad_weight_ratio:.3g} has stayed below "
                    f"{self.threshold:g}"
                )
            else:
                evidence = (
                    f"its optimizer update σmax(ΔW)/σmax(W) = {stats.update_weight_ratio:.3g} "
                    f"has stayed at or below {self.update_threshold:g} (is it left out of the "
                    "optimizer, or at learning rate 0?)"
                )
            message = (
                f"{type(self).__name__}: layer '{name}' is in weight domination at step {step}: "
                f"{evidence} for {self._below[name]} consecutive checks. Its update is feeble "
                "next to its weight, so the layer barely learns and the loss can sit on a "
                "false plateau (Huang et al. 2020, Definition 1)."
            )
            if name == self._last_linear:
                message += (
                    " This is the final linear layer: the paper's remedy is one BatchNorm "
                    "before it, `lightning_conditioning.models.add_last_bn(model)`."
                )
            rank_zero_warn(message)

    def state_dict(self) -> dict[str, Any]:
        return {
            "below": dict(self._below),
            "warned": sorted(self._warned),
            "last_checked_step": self._last_checked_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._below = dict(state_dict.get("below", {}))
        self._warned = set(state_dict.get("warned", []))
        self._last_checked_step = state_dict.get("last_checked_step")
