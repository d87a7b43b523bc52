"""Summaries of spectra known only in part: λmax and κ_p with error bars.

An approximate solver (a Frequent Directions sketch, Lanczos with stochastic quadrature) lists
the ``k`` largest eigenvalues with an interval each, bounds the rest (``tail_upper``) and may
estimate any quantile with an error bar (:class:`~lightning_conditioning.maths.solvers.SolvedSpectrum`).
From those, every κ_p = λmax / λ_p becomes one of:

- ``"estimate"``: both ends of ``λ_p``'s interval are resolved (above the floor); the value is
  ``λmax / λ_p`` at the point estimates, ``kappa_bounds[p]`` its interval
  ``[λmax_low / λ_p,high, λmax_high / λ_p,low]``;
- ``"lower_bound"``: only an upper bound of ``λ_p`` is resolved: κ_p is at least
  ``λmax_low / max(λ_p,high, floor)``;
- ``"infinite"``: ``λ_p`` is a structural zero (past the rows the moment was summed from, or
  certified to be 0).

λmax carries its interval in ``lambda_max_bounds``; the rank is not measured (``rank`` counts
the listed eigenvalues whose lower end clears the floor: a lower bound).

Example:
    >>> from lightning_conditioning.maths.solvers import SolvedSpectrum
    >>> solved = SolvedSpectrum(torch.tensor([4.0, 2.0], dtype=torch.float64), "sketch", exact=False,
    ...                         lower=torch.tensor([4.0, 2.0], dtype=torch.float64),
    ...                         upper=torch.tensor([4.1, 2.1], dtype=torch.float64),
    ...                         dim=4, tail_upper=0.1)
    >>> s = summarize_solved(solved, (50, 100), rtol=1e-3)
    >>> s.lambda_max, s.lambda_max_bounds, s.kappa_status[50], s.kappa_status[100]
    (4.0, (4.0, 4.1), 'estimate', 'lower_bound')
    >>> [round(v, 3) for v in s.kappa_bounds[50]]
    [1.905, 2.05]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_conditioning.maths.solvers import SolvedSpectrum
from lightning_conditioning.maths.spectra import (
    KappaDefinition,
    KappaStatus,
    KroneckerSummary,
    SpectrumSummary,
    kronecker_kth_largest,
    percentile_index,
)

__all__ = ["summarize_solved", "summarize_kronecker_bounds", "eigenvalue_bounds"]


def eigenvalue_bounds(solved: SolvedSpectrum, index: int) -> tuple[float, float, float]:
    """``(estimate, low, high)`` of the ``index``-th largest eigenvalue (0-based).

    Listed eigenvalues use their interval; beyond them the solver's quantile estimate when it
    has one, else ``[0, tail_upper]`` with no estimate (``nan``).

    Example:
        >>> solved = SolvedSpectrum(torch.tensor([3.0]), "s", exact=False, lower=torch.tensor([3.0]),
        ...                         upper=torch.tensor([3.5]), dim=5, tail_upper=0.5)
        >>> eigenvalue_bounds(solved, 0), eigenvalue_bounds(solved, 3)
        ((3.0, 3.0, 3.5), (nan, 0.0, 0.5))
    """
    listed = int(solved.eigenvalues.numel())
    if index < listed:
        estimate = float(solved.eigenvalues[index])
        low = float(solved.lower[index]) if solved.lower is not None else estimate
        high = float(solved.upper[index]) if solved.upper is not None else estimate
        return estimate, low, high
    if solved.quantile is not None:
        return solved.quantile(index + 1)
    tail = solved.tail_upper if solved.tail_upper is not None else math.inf
    if listed:  # eigenvalues are sorted: never above the last listed one's upper end
        tail = min(tail, float(solved.upper[-1]) if solved.upper is not None else math.inf)
    return math.nan, 0.0, tail


def summarize_solved(
    solved: SolvedSpectrum,
    percents: Sequence[float] = (50, 80, 100),
    *,
    rtol: float,
    max_rank: int | None = None,
    definition: KappaDefinition = "paper",
) -> SpectrumSummary:
    """A :class:`~lightning_conditioning.maths.spectra.SpectrumSummary` of a partial spectrum, with
    ``lambda_max_bounds`` and ``kappa_bounds`` (module docstring). With ``definition=
    "nonzero"`` the percentiles are taken over the structural rank (the rows or ``d``).
    """
    dim = solved.size
    structural = dim - solved.structural_zeros
    if max_rank is not None:
        structural = min(structural, max(max_rank, 0))
    estimate, low, high = eigenvalue_bounds(solved, 0) if dim else (math.nan, 0.0, 0.0)
    common: dict[str, Any] = dict(
        size=dim,
        exact=False,
        solver=solved.solver,
        definition=definition,
        rtol=rtol,
        structural_rank=max(structural, 0),
        lambda_max_bounds=(low, high),
        lower_bounds=solved.lower,
        upper_bounds=solved.upper,
        tail_upper=solved.tail_upper,
    )
    if not high > 0:
        return SpectrumSummary(
            solved.eigenvalues,
            0.0 if high == 0 else math.nan,
            0,
            {p: math.nan for p in percents},
            kappa_status={p: "undefined" for p in percents},
            **common,
        )
    floor = rtol * estimate
    lows = solved.lower if solved.lower is not None else solved.eigenvalues
    rank = min(int((lows > floor).sum()), structural)
    kappa: dict[float, float] = {}
    status: dict[float, KappaStatus] = {}
    bounds: dict[float, tuple[float, float]] = {}
    for percent in percents:
        count = structural if definition == "nonzero" else dim
        index = structural - 1 if percent == 100 else percentile_index(percent, max(count, 1))
        if index >= structural:
            kappa[percent], status[percent] = math.inf, "infinite"
            continue
        smallest = getattr(solved.quantile, "smallest_nonzero", None)
        if percent == 100 and callable(smallest):  # SLQ: the smallest nonzero eigenvalue's bar
            value, p_low, p_high = smallest()
        else:
            value, p_low, p_high = eigenvalue_bounds(solved, index)
        if percent == 100 and index >= int(solved.eigenvalues.numel()) and solved.quantile is None:
            p_high = max(p_high, 0.0)  # the smallest nonzero one: only bounded from above
        if p_high <= 0 and (solved.tail_upper == 0 or index >= structural):
            kappa[percent], status[percent] = math.inf, "infinite"
        elif p_low > floor and math.isfinite(value) and value > 0:
            kappa[percent], status[percent] = estimate / value, "estimate"
            bounds[percent] = (low / p_high, high / p_low)
        else:
            kappa[percent], status[percent] = low / max(p_high, floor), "lower_bound"
    return SpectrumSummary(
        solved.eigenvalues, estimate, rank, kappa, kappa_status=status, kappa_bounds=bounds, **common
    )


def _bound_arrays(summary: SpectrumSummary) -> tuple[Tensor, Tensor]:
    """Per-eigenvalue lower and upper bounds of all ``d`` eigenvalues of a summary (exact
    summaries: the resolved eigenvalues, the unresolved ones in ``[0, floor]``)."""
    dim = summary.dim
    if summary.exact:
        values = summary.eigenvalues[: summary.rank].clamp_min(0)
        pad = dim - values.numel()
        upper = torch.cat(
            [
                values,
                values.new_full((summary.unresolved,), summary.floor),
                values.new_zeros(max(pad - summary.unresolved, 0)),
            ]
        )
        return torch.cat([values, values.new_zeros(pad)]), upper
    listed = summary.eigenvalues.clamp_min(0)
    low = summary.lower_bounds if summary.lower_bounds is not None else listed
    up = summary.upper_bounds if summary.upper_bounds is not None else listed
    tail = summary.tail_upper if summary.tail_upper is not None else float(up[-1]) if up.numel() else 0.0
    pad = dim - listed.numel()
    return (
        torch.cat([low, low.new_zeros(pad)]),
        torch.cat([up, up.new_full((pad,), min(tail, float(up[-1]) if up.numel() else tail))]),
    )


def _kth(first: Tensor, second: Tensor, k: int) -> float:
    """The ``k``-th largest product of two nonnegative vectors (0 past the positive ones)."""
    a, b = first[first > 0], second[second > 0]
    if k > a.numel() * b.numel():
        return 0.0
    return kronecker_kth_largest(a, b, k)


def summarize_kronecker_bounds(
    first: SpectrumSummary, second: SpectrumSummary, percents: Sequence[float] = (50, 80, 100)
) -> KroneckerSummary:
    """λmax and κ_p of ``A ⊗ B`` when a factor is known only in part: every product of the
    two spectra lies between the products of their lower and of their upper bounds, and so
    does every order statistic. κ_p is an ``"estimate"`` with its interval when both ends are
    positive, else a lower bound.

    Example:
        >>> from lightning_conditioning.maths.spectra import summarize_spectrum
        >>> from lightning_conditioning.maths.solvers import SolvedSpectrum
        >>> exact = summarize_spectrum(torch.tensor([2.0, 1.0], dtype=torch.float64))
        >>> part = summarize_solved(SolvedSpectrum(torch.tensor([4.0], dtype=torch.float64), "s",
        ...     exact=False, lower=torch.tensor([4.0], dtype=torch.float64),
        ...     upper=torch.tensor([4.4], dtype=torch.float64), dim=2,
        ...     tail_upper=0.0), (50,), rtol=1e-6)
        >>> k = summarize_kronecker_bounds(exact, part, (50,))
        >>> k.lambda_max, k.lambda_max_bounds, k.kappa_status[50]
        (8.0, (8.0, 8.8), 'estimate')
    """
    definition = first.definition
    (low_a, high_a), (low_b, high_b) = _bound_arrays(first), _bound_arrays(second)
    lambda_low, lambda_high = float(low_a.max() * low_b.max()), float(high_a.max() * high_b.max())
    estimate = first.lambda_max * second.lambda_max
    structural = first.structural_rank * second.structural_rank
    total = first.dim * second.dim
    kappa: dict[float, float] = {}
    status: dict[float, KappaStatus] = {}
    bounds: dict[float, tuple[float, float]] = {}
    if not lambda_high > 0:
        return KroneckerSummary(
            estimate,
            0,
            {p: math.nan for p in percents},
            {p: "undefined" for p in percents},
            structural,
            definition,
            exact=False,
            lambda_max_bounds=(lambda_low, lambda_high),
        )
    for percent in percents:
        k = structural if percent == 100 else percentile_index(percent, total) + 1
        if k > structural:
            kappa[percent], status[percent] = math.inf, "infinite"
            continue
        upper_k, lower_k = _kth(high_a, high_b, k), _kth(low_a, low_b, k)
        if upper_k <= 0:
            kappa[percent], status[percent] = math.inf, "infinite"
        elif lower_k > 0 and percent != 100:
            middle = math.sqrt(lower_k * upper_k)  # the product of two interval estimates
            kappa[percent], status[percent] = estimate / middle, "estimate"
            bounds[percent] = (lambda_low / upper_k, lambda_high / lower_k)
        else:
            kappa[percent], status[percent] = lambda_low / upper_k, "lower_bound"
    rank = int(((low_a > first.floor).sum() * (low_b > second.floor).sum()).item())
    return KroneckerSummary(
        estimate,
        rank,
        kappa,
        status,
        structural,
        definition,
        exact=False,
        lambda_max_bounds=(lambda_low, lambda_high),
        kappa_bounds=bounds,
    )
