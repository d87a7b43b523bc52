"""Weight domination (Huang et al. 2020, Definition 1) and layer imbalance: pure maths.

A layer is in *weight domination* when σmax(∂L/∂W) ≪ σmax(W): its gradient is feeble next
to its weight, so it barely learns and the loss can look like a local minimum. Conv weights
are read as ``C_out × (C_in/groups · ∏k)`` matrices.

Layer imbalance (Ginsburg 2020, "On regularization of gradient descent, layer imbalance and
flat minima"): for consecutive weight layers, ``D = |‖W_{k+1}‖_F² − ‖W_k‖_F²|``. Gradient
flow conserves it for linear/ReLU nets (positively homogeneous layers), weight decay drives it
to 0, SGD noise slowly. It is not meaningful across a BatchNorm: the weights before a BN are
scale-invariant, so their norm is free.

Weight domination is a learning-dynamics phenomenon: a layer *falls* into it (the paper's
ResNet-110, whose last layer's ratio fell 30,000× from step 0 while the loss sat at ln 10).
The rules (:func:`domination_reasons`, options in :class:`DominationRules`) therefore judge a
layer's ratio against its own history (:class:`RatioHistory`: its running peak, bounded memory)
as well as against an absolute threshold, and never call a layer dominated whose weight or
gradient is exactly zero (:data:`WeightStatus`: a zero-initialised scale or head, not a feeble
gradient).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_conditioning.maths.solvers import largest_singular_value

__all__ = [
    "as_matrix",
    "spectral_norm",
    "frobenius_norm",
    "WeightStatus",
    "weight_status",
    "WeightStatistics",
    "weight_statistics",
    "statistics_from_norms",
    "imbalance",
    "is_dominated",
    "RatioHistory",
    "record_ratio",
    "ratio_fall",
    "DominationRules",
    "DominationReason",
    "domination_reasons",
    "THRESHOLD_MIN_FALL",
    "LEARNING_UPDATE",
]

#: what a layer's norms allow: ``"ok"`` (both positive and finite), ``"zero_gradient"``
#: (∂L/∂W exactly 0: nothing reaches the layer's output, e.g. a zero-initialised BatchNorm γ
#: or head after it), ``"zero_weight"`` (W exactly 0: the ratio is undefined, e.g. a
#: zero-initialised head) or ``"nonfinite"`` (NaN/Inf in W or ∂L/∂W: a diverged step)
WeightStatus = Literal["ok", "zero_gradient", "zero_weight", "nonfinite"]
#: why a layer counts as dominated: its ratio ``"fallen"`` from its own peak, ``"below_threshold"``
#: (and fallen at least :data:`THRESHOLD_MIN_FALL`×), or the optimizer step left it ``"not_updated"``
DominationReason = Literal["fallen", "below_threshold", "not_updated"]
#: the absolute threshold counts only for a ratio at least this far below its own peak
THRESHOLD_MIN_FALL = 10.0
#: an applied update σmax(ΔW)/σmax(W) at least this large means the layer is learning: the
#: gradient-ratio rules do not count (measured: AdamW moves q/k projections whose gradient
#: ratio is 1e-5..1e-4 by 2-7% per step, example_projects/tiny_lm)
LEARNING_UPDATE = 1e-3


def as_matrix(weight: Tensor) -> Tensor:
    """A Linear/Conv weight as a 2-D ``out × rest`` matrix.

    Example:
        >>> as_matrix(torch.zeros(8, 3, 3, 3)).shape
        torch.Size([8, 27])
    """
    return weight.reshape(weight.shape[0], -1) if weight.dim() != 2 else weight


def spectral_norm(matrix: Tensor) -> float:
    """Largest singular value to a relative 1e-4, with a bound
    (:func:`~lightning_conditioning.maths.solvers.largest_singular_value`): exact (float64 Gram) for
    matrices whose smaller side is at most 256, else Lanczos on the smaller Gram in the
    matrix's own dtype and device, on one intra-op thread. A 50,257 × 768 embedding takes about
    40 Lanczos steps (measured 1.7 s here, 3·10⁻⁷ off the float64 value) instead of a float64
    copy and a dense solve.

    Non-finite entries give ``nan`` (a diverged step is reported, not raised on).

    Example:
        >>> spectral_norm(torch.diag(torch.tensor([3.0, -4.0])))
        4.0
    """
    return largest_singular_value(as_matrix(matrix.detach())).value


def frobenius_norm(matrix: Tensor) -> float:
    """Frobenius norm, summed in float64 a block of rows at a time (no float64 copy of the
    matrix).

    Example:
        >>> frobenius_norm(torch.tensor([[3.0, 4.0]]))
        5.0
    """
    flat = matrix.detach().reshape(-1)
    block = 1 << 22
    total = sum(
        float(flat[start : start + block].to(torch.float64).square().sum()) for start in range(0, flat.numel(), block)
    )
    return math.sqrt(total)


@dataclass(frozen=True)
class WeightStatistics:
    """Norms of one layer's weight and weight gradient at one optimizer step.

    Attributes:
        weight_spectral_norm: σmax(W).
        grad_spectral_norm: σmax(∂L/∂W).
        grad_weight_ratio: σmax(∂L/∂W) / σmax(W) (Definition 1's ratio).
        weight_fro / grad_fro: Frobenius norms.
        grad_weight_ratio_fro: ‖∂L/∂W‖_F / ‖W‖_F.
        update_spectral_norm: σmax(ΔW) of the optimizer step just applied (None until known).
        update_weight_ratio: σmax(ΔW) / σmax(W before the step) (None until known).
        status: :data:`WeightStatus`; only ``"ok"`` layers can be in weight domination.

    Example:
        >>> stats = weight_statistics(2 * torch.eye(3), torch.eye(3)).with_update(torch.eye(3))
        >>> stats.grad_weight_ratio, stats.update_weight_ratio, stats.status
        (0.5, 0.5, 'ok')
    """

    weight_spectral_norm: float
    grad_spectral_norm: float
    grad_weight_ratio: float
    weight_fro: float
    grad_fro: float
    grad_weight_ratio_fro: float
    update_spectral_norm: float | None = None
    update_weight_ratio: float | None = None
    status: WeightStatus = "ok"

    def with_update(self, update: Tensor) -> WeightStatistics:
        """A copy with the applied update ΔW filled in."""
        return self.with_update_norm(spectral_norm(update))

    def with_update_norm(self, norm: float) -> WeightStatistics:
        """A copy with σmax(ΔW) of the applied update filled in."""
        return replace(self, update_spectral_norm=norm, update_weight_ratio=_ratio(norm, self.weight_spectral_norm))


def _ratio(numerator: float, denominator: float) -> float:
    if denominator == 0:
        return math.inf if numerator > 0 else math.nan
    return numerator / denominator


def weight_status(weight_norm: float, grad_norm: float) -> WeightStatus:
    """The :data:`WeightStatus` of a layer from σmax(W) and σmax(∂L/∂W).

    Example:
        >>> weight_status(1.0, 0.0), weight_status(0.0, 2.0), weight_status(1.0, math.nan)
        ('zero_gradient', 'zero_weight', 'nonfinite')
    """
    if not (math.isfinite(weight_norm) and math.isfinite(grad_norm)):
        return "nonfinite"
    if weight_norm == 0:
        return "zero_weight"
    return "zero_gradient" if grad_norm == 0 else "ok"


def weight_statistics(weight: Tensor, grad: Tensor) -> WeightStatistics:
    """Spectral and Frobenius norms of ``weight`` and ``grad``, their ratios and the status.

    Example:
        >>> stats = weight_statistics(torch.eye(2) * 10, torch.eye(2) * 1e-3)
        >>> round(stats.grad_weight_ratio, 6), round(stats.grad_weight_ratio_fro, 6)
        (0.0001, 0.0001)
        >>> weight_statistics(torch.eye(2), torch.zeros(2, 2)).status
        'zero_gradient'
    """
    return statistics_from_norms(
        spectral_norm(weight), spectral_norm(grad), frobenius_norm(weight), frobenius_norm(grad)
    )


def statistics_from_norms(weight_norm: float, grad_norm: float, weight_fro: float, grad_fro: float) -> WeightStatistics:
    """:class:`WeightStatistics` from the four norms (e.g. reduced over shards,
    :mod:`lightning_conditioning.distributed.shards`).

    Example:
        >>> statistics_from_norms(2.0, 1.0, 3.0, 1.5).grad_weight_ratio_fro
        0.5
    """
    return WeightStatistics(
        weight_spectral_norm=weight_norm,
        grad_spectral_norm=grad_norm,
        grad_weight_ratio=_ratio(grad_norm, weight_norm),
        weight_fro=weight_fro,
        grad_fro=grad_fro,
        grad_weight_ratio_fro=_ratio(grad_fro, weight_fro),
        status=weight_status(weight_norm, grad_norm),
    )


def imbalance(previous_fro: float, current_fro: float) -> tuple[float, float]:
    """``(|‖W_k‖² − ‖W_{k-1}‖²|, that / (‖W_k‖² + ‖W_{k-1}‖²))`` from two Frobenius norms.

    Example:
        >>> imbalance(1.0, 2.0)
        (3.0, 0.6)
    """
    previous_sq, current_sq = previous_fro**2, current_fro**2
    absolute = abs(current_sq - previous_sq)
    total = current_sq + previous_sq
    return absolute, (absolute / total if total > 0 else 0.0)


def is_dominated(stats: WeightStatistics, threshold: float, update_threshold: float = 0.0) -> bool:
    """The history-free rules: Definition 1's ratio below ``threshold``, or an applied update
    ratio at or below ``update_threshold`` (by default: a weight the optimizer step left
    unchanged). A layer whose weight or gradient is exactly zero, or not finite, is never
    dominated. :func:`domination_reasons` adds the layer's own history (what the monitors use).

    Example:
        >>> is_dominated(weight_statistics(torch.eye(2) * 10, torch.eye(2) * 1e-6), 1e-4)
        True
        >>> is_dominated(weight_statistics(torch.eye(2), torch.zeros(2, 2)), 1e-4)  # zero ∇W
        False
    """
    if stats.status != "ok":
        return False
    if stats.grad_weight_ratio < threshold:
        return True
    return stats.update_weight_ratio is not None and stats.update_weight_ratio <= update_threshold


def _usable_loss(loss: float | None) -> float | None:
    return loss if loss is not None and math.isfinite(loss) and loss > 0 else None


@dataclass(frozen=True)
class RatioHistory:
    """What a layer's σmax(∇W)/σmax(W) has been, in bounded memory: its running peak.

    The peak is the check with the largest ratio per unit of training loss (``ratio / loss``,
    or the ratio alone when no loss is known), so that a ratio that falls because the loss
    falls (a converging run) does not count as a fall (:func:`ratio_fall`).

    Attributes:
        peak_ratio: σmax(∇W)/σmax(W) at the peak.
        peak_step: the optimizer step of the peak.
        peak_loss: the training loss at the peak (None when not given).
        checks: how many checks with an ``"ok"`` status the layer has had.

    Example:
        >>> history = record_ratio(None, 2.0, step=0, loss=2.3)
        >>> history = record_ratio(history, 5.0, step=10, loss=2.3)
        >>> history.peak_ratio, history.peak_step, history.checks
        (5.0, 10, 2)
        >>> RatioHistory.from_state(history.state()) == history
        True
    """

    peak_ratio: float
    peak_step: int
    peak_loss: float | None = None
    checks: int = 1

    def state(self) -> dict[str, Any]:
        """Plain values for a checkpoint."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RatioHistory:
        """Inverse of :meth:`state`."""
        loss = state.get("peak_loss")
        return cls(
            peak_ratio=float(state["peak_ratio"]),
            peak_step=int(state["peak_step"]),
            peak_loss=float(loss) if loss is not None else None,
            checks=int(state.get("checks", 1)),
        )


def _per_loss(ratio: float, loss: float | None, other_loss: float | None) -> float:
    """``ratio / loss`` when both losses of a comparison are known, else the ratio."""
    return ratio / loss if loss is not None and other_loss is not None else ratio


def record_ratio(history: RatioHistory | None, ratio: float, step: int, loss: float | None = None) -> RatioHistory:
    """``history`` with one more check of ratio ``ratio`` (finite, > 0) at ``step``; ``loss``
    is the training loss of that step (ignored unless finite and > 0).

    Example:
        >>> history = record_ratio(record_ratio(None, 1.0, 0, loss=2.0), 0.5, 5, loss=0.5)
        >>> history.peak_step  # 0.5 per 0.5 of loss beats 1.0 per 2.0 of loss
        5
    """
    if not (math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"ratio must be finite and > 0, got {ratio!r}")
    loss = _usable_loss(loss)
    if history is None:
        return RatioHistory(ratio, step, loss)
    checks = history.checks + 1
    if _per_loss(ratio, loss, history.peak_loss) > _per_loss(history.peak_ratio, history.peak_loss, loss):
        return RatioHistory(ratio, step, loss, checks)
    return replace(history, checks=checks)


def ratio_fall(history: RatioHistory, ratio: float, loss: float | None = None) -> float:
    """How many times ``ratio`` lies below the peak of ``history``, net of the loss: the
    ratio's fall divided by the loss's fall since the peak (when both losses are known).
    A layer in a converging run loses ratio with its loss (its gradient shrinks with it) and
    keeps a net fall near 1; a dominated layer loses ratio while the loss stays.

    Example:
        >>> resnet110_fc = RatioHistory(peak_ratio=21.5, peak_step=0, peak_loss=4.14)
        >>> f"{ratio_fall(resnet110_fc, 6.8e-4):.3g}"             # the ratio alone
        '3.16e+04'
        >>> f"{ratio_fall(resnet110_fc, 6.8e-4, loss=2.29):.3g}"  # the loss fell only 1.8×
        '1.75e+04'
        >>> f"{ratio_fall(resnet110_fc, 2e-4, loss=2e-5):.3g}"    # fell with a vanishing loss
        '0.519'
    """
    fall = history.peak_ratio / ratio
    loss = _usable_loss(loss)
    if loss is not None and history.peak_loss is not None:
        fall *= loss / history.peak_loss
    return fall


@dataclass(frozen=True)
class DominationRules:
    """The options of :func:`domination_reasons`.

    Attributes:
        threshold: a ratio below this counts, once it is at least
            :data:`THRESHOLD_MIN_FALL`× below the layer's own peak.
        update_threshold: an applied update ratio σmax(ΔW)/σmax(W) at or below this counts.
        fall_factor: a ratio this many times below the layer's own peak (net of the loss,
            :func:`ratio_fall`) counts; None turns the history rule off.

    Example:
        >>> DominationRules(fall_factor=None).threshold
        0.0001
    """

    threshold: float = 1e-4
    update_threshold: float = 0.0
    fall_factor: float | None = 1000.0


def domination_reasons(
    stats: WeightStatistics,
    history: RatioHistory | None,
    rules: DominationRules = DominationRules(),
    loss: float | None = None,
) -> tuple[DominationReason, ...]:
    """Which rules find the layer in weight domination at this check (empty: none).

    ``history`` must already include this check (:func:`record_ratio`). The rules:

    * ``"fallen"``: the ratio is ``fall_factor``× or more below the layer's own peak, net of
      the loss (:func:`ratio_fall`);
    * ``"below_threshold"``: the ratio is below ``threshold`` *and* at least
      :data:`THRESHOLD_MIN_FALL`× below its own peak: a ratio that has been small since the
      layer's first check (a LayerScale at 1e-6 after it, a zero-initialised γ that starts to
      grow) is how the layer starts, not a fall into domination;
    * ``"not_updated"``: the optimizer step moved the weight by at most ``update_threshold``
      relative to it (the paper's Fig. 4: a layer left out of the optimizer).

    A layer whose status is not ``"ok"`` (exactly zero weight or gradient, NaN/Inf) is never
    dominated.

    Example:
        >>> stats = weight_statistics(torch.eye(2), torch.eye(2) * 1e-6)  # ratio 1e-6
        >>> domination_reasons(stats, record_ratio(None, 1e-6, step=0))  # its first check
        ()
        >>> history = record_ratio(record_ratio(None, 0.1, 0), 1e-6, step=100)
        >>> domination_reasons(stats, history)
        ('fallen', 'below_threshold')
    """
    if stats.status != "ok":
        return ()
    reasons: list[DominationReason] = []
    ratio = stats.grad_weight_ratio
    update = stats.update_weight_ratio
    fall = ratio_fall(history, ratio, loss) if history is not None else 1.0
    # a weight the step visibly moved is learning, whatever its gradient ratio (adaptive
    # optimizers such as AdamW rescale tiny gradients into full-size steps)
    learning = update is not None and update >= LEARNING_UPDATE
    if rules.fall_factor is not None and fall >= rules.fall_factor and not learning:
        reasons.append("fallen")
    if ratio < rules.threshold and fall >= THRESHOLD_MIN_FALL and not learning:
        reasons.append("below_threshold")
    if update is not None and update <= rules.update_threshold:
        reasons.append("not_updated")
    return tuple(reasons)
