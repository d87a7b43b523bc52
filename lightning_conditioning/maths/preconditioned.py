"""The preconditioned sharpness of a layer under Adam: ``λmax(P^{-1/2} F_k P^{-1/2})``.

Adam (and AdamW) steps along ``P⁻¹ m`` with the diagonal preconditioner
``P = diag(√v̂ + ε)`` (``v̂`` the bias-corrected second-moment state). Full-batch Adam with
momentum ``β1`` is stable on a quadratic with curvature ``H`` while
``lr·λmax(P⁻¹H) < 2(1+β1)/(1−β1)`` (38 for β1 = 0.9), and the preconditioned sharpness
equilibrates at that threshold ("adaptive edge of stability": Cohen et al. 2022, "Adaptive
Gradient Methods at the Edge of Stability"). Per layer, ``H`` is approximated by the sub-FIM
``F_k ≈ Σx ⊗ Σ∇h`` (K-FAC; the Gauss-Newton curvature with the true Fisher), so the operator is

    V ↦ S ∘ (Σ∇h · (S ∘ V) · Σx),        S = P^{-1/2} = 1/√(√v̂ + ε)  (d_out × d_in)

on the layer's weight matrix ``V`` (``vec(Σ∇h V Σx) = (Σx ⊗ Σ∇h) vec(V)``). It is symmetric
positive semi-definite, so power iteration's Rayleigh quotients rise to its λmax; one step
costs ``2·d_out·d_in·(d_out + d_in)`` flops, never a ``(d_out·d_in)²`` matrix. Pure: tensors in,
numbers out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PreconditionedSharpness", "preconditioned_sharpness", "adam_stability_limit", "step_flops"]


@dataclass(frozen=True)
class PreconditionedSharpness:
    """λmax of ``P^{-1/2} (Σx ⊗ Σ∇h) P^{-1/2}``: the last Rayleigh quotient (a lower bound that
    power iteration raises), whether it changed by less than ``rtol`` over the last step, and
    the steps taken. ``upper`` is a bound that always holds: ``max(P⁻¹)·λmax(Σx)·λmax(Σ∇h)``."""

    value: float
    converged: bool
    steps: int
    upper: float


def adam_stability_limit(beta1: float) -> float:
    """``2(1+β1)/(1−β1)``: the largest ``lr·λmax(P⁻¹H)`` full-batch Adam with momentum ``β1``
    is stable at on a quadratic (heavy-ball momentum in its moving-average form).

    Example:
        >>> round(adam_stability_limit(0.9), 12)
        38.0
    """
    return 2.0 * (1.0 + beta1) / (1.0 - beta1)


def step_flops(d_out: int, d_in: int) -> float:
    """Floating-point operations of one step of the operator (two products)."""
    return 2.0 * d_out * d_in * (d_out + d_in)


def preconditioned_sharpness(
    input_moment: Tensor,
    grad_moment: Tensor,
    inverse_preconditioner: Tensor,
    *,
    steps: int = 60,
    rtol: float = 1e-9,
    seed: int = 0,
) -> PreconditionedSharpness:
    """Lanczos (full reorthogonalisation, float64, a seeded Gaussian start) on
    ``V ↦ S∘(Σ∇h (S∘V) Σx)``, ``S = √(inverse_preconditioner)``: the largest Ritz value, a lower
    bound that rises to λmax; converged when its residual ``β_k·|s_k|`` is under ``rtol``
    times it (then within that of an eigenvalue), or when the Krylov space is the whole space.
    Lanczos resolves a top eigenvalue with close neighbours (a Σ∇h near a multiple of the
    identity) where power iteration crawls.

    Args:
        input_moment: Σx, ``(d_in, d_in)``.
        grad_moment: Σ∇h, ``(d_out, d_out)``.
        inverse_preconditioner: ``P⁻¹ = 1/(√v̂ + ε)`` of the layer's weight, ``(d_out, d_in)``.

    Example (a diagonal preconditioner that is a constant c scales λmax by c):
        >>> a, g = torch.diag(torch.tensor([4.0, 1.0])), torch.diag(torch.tensor([3.0, 2.0]))
        >>> s = preconditioned_sharpness(a, g, torch.full((2, 2), 0.5))
        >>> round(s.value, 9), s.converged, s.upper
        (6.0, True, 6.0)
    """
    a, g = input_moment.to(torch.float64), grad_moment.to(torch.float64)
    d_out, d_in = g.shape[0], a.shape[0]
    if inverse_preconditioner.shape != (d_out, d_in):
        raise ValueError(
            f"the preconditioner is {tuple(inverse_preconditioner.shape)}, the moments make a ({d_out}, {d_in}) weight"
        )
    inverse = inverse_preconditioner.to(device=a.device, dtype=torch.float64)
    scale = inverse.clamp_min(0).sqrt()
    upper = (
        float(inverse.max())
        * float(torch.linalg.eigvalsh(a)[-1].clamp_min(0))
        * float(torch.linalg.eigvalsh(g)[-1].clamp_min(0))
    )
    start = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    basis = [(start / start.norm()).to(a.device)]
    alphas: list[float] = []
    betas: list[float] = []
    value, converged = 0.0, False
    for _ in range(min(steps, d_out * d_in)):
        image = scale * (g @ (scale * basis[-1]) @ a)
        alphas.append(float((image * basis[-1]).sum()))
        for vector in basis:  # full reorthogonalisation (twice is enough)
            image -= (image * vector).sum() * vector
        for vector in basis:
            image -= (image * vector).sum() * vector
        beta = float(image.norm())
        tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        ritz, vectors = torch.linalg.eigh(tridiagonal)
        value = float(ritz[-1])
        if not math.isfinite(value):
            return PreconditionedSharpness(math.nan, False, len(alphas), upper)
        converged = (
            beta * abs(float(vectors[-1, -1])) <= rtol * abs(value) or len(alphas) == d_out * d_in or beta == 0.0
        )
        if converged:
            break
        betas.append(beta)
        basis.append(image / beta)
    return PreconditionedSharpness(value=value, converged=converged, steps=len(alphas), upper=upper)
