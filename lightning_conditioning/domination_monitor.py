"""``WeightDominationMonitor``: σmax(∇W)/σmax(W) per layer for any training loop.

The core of :class:`~lightning_conditioning.WeightDominationCallback` (a thin Lightning shell
over it); imports neither Lightning nor TensorBoard.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from lightning_conditioning import schema
from lightning_conditioning.capture import checked_layer_types, last_linear_name, select_layers
from lightning_conditioning.domination import (
    WeightStatistics, frobenius_norm, imbalance, is_dominated, weight_statistics,
)

__all__ = ["WeightDominationMonitor"]


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=3)


class WeightDominationMonitor:
    r"""Definition 1 of the paper, checked every ``every_n_steps`` optimizer steps.

    Call :meth:`before_optimizer_step` after the backward (and after AMP unscaling and the DDP
    gradient average), then :meth:`after_optimizer_step` once the optimizer has stepped: it
    returns the scalars (``{prefix}/{layer}/grad_weight_ratio`` …, names from
    :mod:`~lightning_conditioning.schema`) and warns once per layer dominated for ``patience``
    checks. See :class:`~lightning_conditioning.WeightDominationCallback` for the options.

    Example:
        >>> import torch
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> monitor = WeightDominationMonitor(model, every_n_steps=1)
        >>> model(torch.randn(16, 4)).square().mean().backward()
        >>> monitor.before_optimizer_step(0)
        True
        >>> optimizer.step()
        >>> metrics = monitor.after_optimizer_step()
        >>> sorted(monitor.results), "weight_domination/dominated_layers" in metrics
        (['0', '2'], True)
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        every_n_steps: int = 100,
        threshold: float = 1e-4,
        update_threshold: float = 0.0,
        patience: int = 3,
        layer_types: Sequence[type[nn.Module]] | None = None,
        include: Sequence[str] | None = None,
        exclude: Sequence[str] | None = None,
        log_imbalance: bool = True,
        prefix: str = "weight_domination",
        warn: Callable[[str], None] | None = None,
    ) -> None:
        check_options(every_n_steps, threshold, update_threshold, patience)
        self.every_n_steps, self.threshold = every_n_steps, float(threshold)
        self.update_threshold, self.patience = float(update_threshold), patience
        self.log_imbalance, self.prefix = log_imbalance, prefix
        self._warn = warn or _warn
        layers = select_layers(model, checked_layer_types(layer_types), include, exclude)
        self._weights: dict[str, nn.Parameter] = {
            name: weight
            for name, weight in ((n, getattr(m, "weight", None)) for n, m in layers.items())
            if isinstance(weight, nn.Parameter)
        }
        if not self._weights:
            self._warn(f"{type(self).__name__}: no layer with a weight matched; nothing to check.")
        self.last_linear = last_linear_name(model)
        self._results: dict[str, WeightStatistics] = {}
        self._snapshot: dict[str, Tensor] = {}
        self._pending_step: int | None = None
        self._last_checked_step: int | None = None
        self._below: dict[str, int] = {}
        self._warned: set[str] = set()

    @property
    def results(self) -> dict[str, WeightStatistics]:
        """Latest check: ``{layer name: WeightStatistics}`` (layers with a gradient only)."""
        return dict(self._results)

    @property
    def pending_step(self) -> int | None:
        """The step checked before its optimizer step, waiting for :meth:`after_optimizer_step`."""
        return self._pending_step

    @property
    def warned_layers(self) -> list[str]:
        """Layers warned about (dominated for ``patience`` checks), sorted."""
        return sorted(self._warned)

    @property
    def dominated(self) -> list[str]:
        """Layers whose latest check counts as dominated (:meth:`is_dominated`)."""
        return [name for name, stats in self._results.items() if self.is_dominated(stats)]

    def is_dominated(self, stats: WeightStatistics) -> bool:
        """Whether ``stats`` count as weight domination (:func:`~lightning_conditioning.domination.is_dominated`)."""
        return is_dominated(stats, self.threshold, self.update_threshold)

    def domination_table(self) -> dict[str, dict[str, float]]:
        """The latest check as ``{layer: {quantity: value}}`` (for the diagnosis)."""
        return {name: {k: v for k, v in dataclasses.asdict(stats).items() if v is not None}
                for name, stats in self._results.items()}

    def before_optimizer_step(self, step: int) -> bool:
        """Check step ``step`` if it is scheduled (once, however many optimizers): the norms
        of every weight and gradient, and a snapshot of the weight. Returns whether it did."""
        if step % self.every_n_steps or step == self._last_checked_step:
            return False
        self._last_checked_step = self._pending_step = step
        self._results, self._snapshot = {}, {}
        for name, weight in self._weights.items():
            if not weight.requires_grad or weight.grad is None:
                continue  # frozen, or no gradient at this step
            self._results[name] = weight_statistics(weight, weight.grad)
            self._snapshot[name] = weight.detach().clone()
        return True

    def after_optimizer_step(self) -> dict[str, float]:
        """Complete the pending check with the update actually applied; returns the finite
        scalars to log (empty when no check is pending)."""
        step, self._pending_step = self._pending_step, None
        if step is None:
            return {}
        for name, before in self._snapshot.items():
            self._results[name] = self._results[name].with_update(self._weights[name].detach() - before)
        self._snapshot = {}
        self._update_warnings(step)
        return {k: v for k, v in self.metrics().items() if math.isfinite(v)}

    def cancel(self) -> None:
        """Drop a pending check (e.g. training ended before its optimizer step)."""
        self._pending_step, self._snapshot = None, {}

    def metrics(self) -> dict[str, float]:
        """The scalars of the latest check, ``{prefix}/{layer}/{quantity}``."""
        metrics: dict[str, float] = {}
        previous_fro: float | None = None
        for name, weight in self._weights.items():
            if self.log_imbalance:
                current_fro = frobenius_norm(weight)
                if previous_fro is not None:
                    absolute, relative = imbalance(previous_fro, current_fro)
                    metrics[schema.key(self.prefix, name, "imbalance")] = absolute
                    metrics[schema.key(self.prefix, name, "relative_imbalance")] = relative
                previous_fro = current_fro
            stats = self._results.get(name)
            if stats is None:
                continue
            for quantity in ("grad_weight_ratio", "weight_spectral_norm", "grad_spectral_norm",
                             "grad_weight_ratio_fro", "update_weight_ratio"):
                value = getattr(stats, quantity)
                if value is not None:
                    metrics[schema.key(self.prefix, name, quantity)] = value
        metrics[f"{self.prefix}/{schema.DOMINATED_LAYERS}"] = float(len(self.dominated))
        return metrics

    def _update_warnings(self, step: int) -> None:
        dominated = set(self.dominated)
        for name, stats in self._results.items():
            self._below[name] = self._below.get(name, 0) + 1 if name in dominated else 0
            if self._below[name] < self.patience or name in self._warned:
                continue
            self._warned.add(name)
            if stats.grad_weight_ratio < self.threshold:
                evidence = (f"σmax(∇W)/σmax(W) = {stats.grad_weight_ratio:.3g} has stayed below "
                            f"{self.threshold:g}")
            else:
                evidence = (f"its optimizer update σmax(ΔW)/σmax(W) = {stats.update_weight_ratio:.3g} "
                            f"has stayed at or below {self.update_threshold:g} (is it left out of the "
                            "optimizer, or at learning rate 0?)")
            message = (f"{type(self).__name__}: layer '{name}' is in weight domination at step {step}: "
                       f"{evidence} for {self._below[name]} consecutive checks. Its update is feeble "
                       "next to its weight, so the layer barely learns and the loss can sit on a "
                       "false plateau (Huang et al. 2020, Definition 1).")
            if name == self.last_linear:
                message += (" This is the final linear layer: the paper's remedy is one BatchNorm "
                            "before it, `lightning_conditioning.models.add_last_bn(model)`.")
            self._warn(message)

    def state_dict(self) -> dict[str, Any]:
        """The warning state a resumed run needs."""
        return {"below": dict(self._below), "warned": sorted(self._warned),
                "last_checked_step": self._last_checked_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self._below = dict(state.get("below", {}))
        self._warned = set(state.get("warned", []))
        self._last_checked_step = state.get("last_checked_step")


def check_options(every_n_steps: Any, threshold: Any, update_threshold: Any, patience: Any) -> None:
    """Raise a clear error for a bad weight-domination option."""
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ValueError(f"every_n_steps must be an int >= 1, got {every_n_steps!r}")
    if not (isinstance(threshold, (int, float)) and threshold > 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a positive finite number, got {threshold!r}")
    if not (isinstance(update_threshold, (int, float)) and 0 <= update_threshold < math.inf):
        raise ValueError(f"update_threshold must be a finite number >= 0, got {update_threshold!r}")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise ValueError(f"patience must be an int >= 1, got {patience!r}")
