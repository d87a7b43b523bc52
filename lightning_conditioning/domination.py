"""Weight domination (Huang et al. 2020, Definition 1) and layer imbalance: pure maths.

A layer is in *weight domination* when σmax(∂L/∂W) ≪ σmax(W): its gradient is feeble next
to its weight, so it barely learns and the loss can look like a local minimum. Conv weights
are read as ``C_out × (C_in/groups · ∏k)`` matrices.

Layer imbalance (Ginsburg 2020, "On regularization of gradient descent, layer imbalance and
flat minima"): for consecutive weight layers, ``D = |‖W_{k+1}‖_F² − ‖W_k‖_F²|``. Gradient
flow conserves it for linear/ReLU nets (positively homogeneous layers), weight decay drives it
to 0, SGD noise slowly. It is not meaningful across a BatchNorm: the weights before a BN are
scale-invariant, so their norm is free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lightning_conditioning.solvers import largest_eigenvalue
from lightning_conditioning.spectra import smaller_gram

__all__ = [
    "as_matrix", "spectral_norm", "frobenius_norm", "WeightStatistics", "weight_statistics",
    "imbalance", "is_dominated",
]


def as_matrix(weight: Tensor) -> Tensor:
    """A Linear/Conv weight as a 2-D ``out × rest`` matrix.

    Example:
        >>> as_matrix(torch.zeros(8, 3, 3, 3)).shape
        torch.Size([8, 27])
    """
    return weight.reshape(weight.shape[0], -1) if weight.dim() != 2 else weight


def spectral_norm(matrix: Tensor) -> float:
    """Largest singular value, exact: √λmax of the smaller Gram ``M Mᵀ`` or ``Mᵀ M`` (float64,
    CPU). Measured 2-9× faster than an SVD (``matrix_norm(ord=2)``) on ResNet/MLP weights,
    equal to it to ~1e-15 relative.

    Non-finite entries give ``nan`` (a diverged step is reported, not raised on).

    Example:
        >>> spectral_norm(torch.diag(torch.tensor([3.0, -4.0])))
        4.0
    """
    matrix = as_matrix(matrix.detach()).to(device="cpu", dtype=torch.float64)
    if matrix.numel() == 0:
        return 0.0
    if not bool(torch.isfinite(matrix).all()):
        return math.nan  # a diverged step: report NaN (never logged), never raise
    return math.sqrt(max(largest_eigenvalue(smaller_gram(matrix)), 0.0))


def frobenius_norm(matrix: Tensor) -> float:
    """Frobenius norm in float64.

    Example:
        >>> frobenius_norm(torch.tensor([[3.0, 4.0]]))
        5.0
    """
    return float(torch.linalg.vector_norm(matrix.detach().to(torch.float64)))


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

    Example:
        >>> stats = weight_statistics(2 * torch.eye(3), torch.eye(3)).with_update(torch.eye(3))
        >>> stats.grad_weight_ratio, stats.update_weight_ratio
        (0.5, 0.5)
    """

    weight_spectral_norm: float
    grad_spectral_norm: float
    grad_weight_ratio: float
    weight_fro: float
    grad_fro: float
    grad_weight_ratio_fro: float
    update_spectral_norm: float | None = None
    update_weight_ratio: float | None = None

    def with_update(self, update: Tensor) -> WeightStatistics:
        """A copy with the applied update ΔW filled in."""
        norm = spectral_norm(update)
        return replace(
            self,
            update_spectral_norm=norm,
            update_weight_ratio=_ratio(norm, self.weight_spectral_norm),
        )


def _ratio(numerator: float, denominator: float) -> float:
    if denominator == 0:
        return math.inf if numerator > 0 else math.nan
    return numerator / denominator


def weight_statistics(weight: Tensor, grad: Tensor) -> WeightStatistics:
    """Spectral and Frobenius norms of ``weight`` and ``grad`` and their ratios.

    Example:
        >>> stats = weight_statistics(torch.eye(2) * 10, torch.eye(2) * 1e-3)
        >>> round(stats.grad_weight_ratio, 6), round(stats.grad_weight_ratio_fro, 6)
        (0.0001, 0.0001)
    """
    weight_norm, grad_norm = spectral_norm(weight), spectral_norm(grad)
    weight_fro, grad_fro = frobenius_norm(weight), frobenius_norm(grad)
    return WeightStatistics(
        weight_spectral_norm=weight_norm,
        grad_spectral_norm=grad_norm,
        grad_weight_ratio=_ratio(grad_norm, weight_norm),
        weight_fro=weight_fro,
        grad_fro=grad_fro,
        grad_weight_ratio_fro=_ratio(grad_fro, weight_fro),
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
    """Definition 1's ratio below ``threshold``, or an applied update ratio at or below
    ``update_threshold`` (by default: a weight the optimizer step left unchanged).

    Example:
        >>> is_dominated(weight_statistics(torch.eye(2) * 10, torch.eye(2) * 1e-6), 1e-4)
        True
    """
    if stats.grad_weight_ratio < threshold:
        return True
    return stats.update_weight_ratio is not None and stats.update_weight_ratio <= update_threshold
