"""Pure spectral maths: eigenvalues, λmax, generalized condition numbers and Kronecker spectra.

Nothing here knows about Lightning, hooks or modules: every function takes and returns plain
tensors or small dataclasses, so it can be tested against numpy/float64 references and reused
from notebooks.

Conventions (see README "Conventions" and ``docs/numerics.md``):

* Spectra are sorted in descending order and computed in float64 on the CPU.
* Every spectrum has a *resolution floor* ``rtol · λmax``
  (:func:`lightning_conditioning.maths.resolution.floor_rtol`): eigenvalues above it are *resolved*
  (their count is the numerical ``rank``); those under it are zeros or too small to tell from
  rounding (*unresolved*). Exact zeros (dead units, whose rows and columns are removed before the
  solve, and the ``d − rows`` eigenvalues a moment of ``rows < d`` rows cannot have) are
  *structural* zeros.
* ``κ_p = λmax / λ_p``. With ``definition="paper"`` (the default, footnote 2 of the paper)
  ``λ_p`` is the ``⌈p·d/100⌉``-th largest of all ``d`` eigenvalues, zeros included, and
  ``κ_100`` uses the smallest nonzero (resolved) one. With ``definition="nonzero"`` ``λ_p`` is
  the ``⌈p·r/100⌉``-th largest of the ``r`` resolved ones (the package's former convention).
* A κ_p whose ``λ_p`` is not resolved is not a measurement: its status
  (:data:`KappaStatus`) is ``"infinite"`` when ``λ_p`` is a structural zero (value ``inf``) and
  ``"lower_bound"`` otherwise (value ``λmax / floor``: κ_p is at least that).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from lightning_conditioning.maths.resolution import floor_rtol
from lightning_conditioning.schema import format_percent

__all__ = [
    "KappaDefinition",
    "KappaStatus",
    "KAPPA_DEFINITIONS",
    "SpectrumSummary",
    "KroneckerSummary",
    "percentile_index",
    "format_percent",
    "symmetric_eigenvalues",
    "smaller_gram",
    "summarize_spectrum",
    "kronecker_kth_largest",
    "summarize_kronecker",
]

#: ``"paper"``: λ_p over all d eigenvalues (zeros included), κ_100 over the smallest nonzero
#: one; ``"nonzero"``: λ_p over the r resolved nonzero eigenvalues only.
KappaDefinition = Literal["paper", "nonzero"]
KAPPA_DEFINITIONS: tuple[str, ...] = ("paper", "nonzero")

#: ``"exact"``: a measurement (λ_p resolved); ``"lower_bound"``: λ_p is under the resolution
#: floor, the value is ``λmax / floor`` and κ_p is at least that; ``"infinite"``: λ_p is a
#: structural zero; ``"undefined"``: the matrix is zero (λmax = 0), the value is ``nan``.
KappaStatus = Literal["exact", "estimate", "lower_bound", "infinite", "undefined"]


def percentile_index(percent: float, count: int) -> int:
    """Zero-based index of ``λ_p``, the ``⌈p·count/100⌉``-th largest of ``count`` values.

    Example:
        >>> percentile_index(50, 10), percentile_index(80, 10), percentile_index(100, 10)
        (4, 7, 9)
    """
    if count <= 0:
        raise ValueError("count must be positive")
    # round() guards against 0.8 * 10 = 8.000000000000002 turning into 9
    position = math.ceil(round(percent * count / 100.0, 9))
    return min(max(position, 1), count) - 1


@dataclass(frozen=True)
class SpectrumSummary:
    """Eigen-statistics of one symmetric positive semi-definite matrix.

    Attributes:
        eigenvalues: all eigenvalues, float64, descending (tiny negative round-off included).
        lambda_max: the largest eigenvalue.
        rank: the numerical rank ``r``: eigenvalues above the floor ``rtol · λmax``.
        kappa: ``{percent: κ_p}``; see :attr:`kappa_status` for what each value is.
        rtol: the resolution floor relative to λmax.
        kappa_status: ``{percent: status}`` (:data:`KappaStatus`).
        structural_rank: how many eigenvalues can be nonzero at all (the dimension less the
            structural zeros: dead units, rows fewer than the dimension).
        definition: the κ_p definition (:data:`KappaDefinition`).
        solver: the name of the solver that produced the eigenvalues
            (:mod:`lightning_conditioning.maths.solvers`).
        solver_error: the solver's bound on the eigenvalues' relative error beyond the
            floor's rounding (0 for exact solvers).

    Example:
        >>> s = summarize_spectrum(torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64), (50, 100))
        >>> s.rank, s.kappa, s.kappa_status[100], s.nonzero_eigenvalues.tolist(), s.dim
        (2, {50: 2.0, 100: 2.0}, 'exact', [2.0, 1.0], 3)
    """

    eigenvalues: Tensor
    lambda_max: float
    rank: int
    kappa: dict[float, float] = field(default_factory=dict)
    rtol: float = 0.0
    kappa_status: dict[float, KappaStatus] = field(default_factory=dict)
    structural_rank: int = -1
    definition: KappaDefinition = "paper"
    solver: str = "dense-float64"
    solver_error: float = 0.0
    #: the matrix's size when ``eigenvalues`` lists only some (an approximate spectrum)
    size: int | None = None
    #: whether every eigenvalue was computed (False: estimates with error bars,
    #: :mod:`lightning_conditioning.maths.estimates`)
    exact: bool = True
    #: ``(low, high)`` holding the true λmax (approximate spectra only)
    lambda_max_bounds: tuple[float, float] | None = None
    #: ``{percent: (low, high)}`` of κ_p for the ``"estimate"`` statuses
    kappa_bounds: dict[float, tuple[float, float]] = field(default_factory=dict)
    #: per listed eigenvalue, the interval holding it (approximate spectra only)
    lower_bounds: Tensor | None = None
    upper_bounds: Tensor | None = None
    #: every eigenvalue past the listed ones is at most this (approximate spectra only)
    tail_upper: float | None = None

    @property
    def nonzero_eigenvalues(self) -> Tensor:
        """The ``rank`` largest (resolved) eigenvalues, descending."""
        return self.eigenvalues[: self.rank]

    @property
    def dim(self) -> int:
        """Size of the matrix."""
        return int(self.size) if self.size is not None else int(self.eigenvalues.numel())

    @property
    def floor(self) -> float:
        """The resolution floor ``rtol · λmax`` (absolute)."""
        return self.rtol * self.lambda_max

    @property
    def unresolved(self) -> int:
        """Eigenvalues that may be nonzero but sit under the floor."""
        return max(self.structural_rank - self.rank, 0)


@dataclass(frozen=True)
class KroneckerSummary:
    """λmax and κ_p of ``A ⊗ B`` obtained from the spectra of ``A`` and ``B`` alone.

    Attributes:
        lambda_max: ``λmax(A)·λmax(B)``.
        rank: ``rank(A)·rank(B)`` (resolved products).
        kappa: ``{percent: κ_p}`` over all ``d_A·d_B`` products (``"paper"``) or over the
            resolved ones (``"nonzero"``).
        kappa_status: ``{percent: status}`` (:data:`KappaStatus`).
        structural_rank: products that can be nonzero at all.
        definition: the κ_p definition.

    Example:
        >>> k = summarize_kronecker(summarize_spectrum(torch.tensor([4.0, 1.0])),
        ...                         summarize_spectrum(torch.tensor([2.0, 1.0])), (50, 100))
        >>> k.lambda_max, k.rank, k.kappa, k.kappa_status[50]
        (8.0, 4, {50: 2.0, 100: 8.0}, 'exact')
    """

    lambda_max: float
    rank: int
    kappa: dict[float, float] = field(default_factory=dict)
    kappa_status: dict[float, KappaStatus] = field(default_factory=dict)
    structural_rank: int = -1
    definition: KappaDefinition = "paper"
    #: False when a factor is approximate (:func:`~lightning_conditioning.maths.estimates.summarize_kronecker_bounds`)
    exact: bool = True
    lambda_max_bounds: tuple[float, float] | None = None
    kappa_bounds: dict[float, tuple[float, float]] = field(default_factory=dict)


def symmetric_eigenvalues(matrix: Tensor, *, drop_zero_diagonal: bool = True) -> Tensor:
    """Eigenvalues of a symmetric PSD matrix in float64 on the CPU, sorted descending.

    The matrix is symmetrised first (``(M + Mᵀ)/2``). With ``drop_zero_diagonal`` the rows and
    columns whose diagonal entry is exactly zero are removed before the solve (for a PSD matrix
    such a row is entirely zero) and returned as exact zeros, so that dead units never become
    round-off eigenvalues.

    Example:
        >>> symmetric_eigenvalues(torch.diag(torch.tensor([1.0, 0.0, 3.0])))
        tensor([3., 1., 0.], dtype=torch.float64)
    """
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
    matrix = matrix.detach().to(device="cpu", dtype=torch.float64)
    dim = matrix.shape[0]
    if not torch.equal(matrix, matrix.T):  # the monitor's means are symmetric already
        matrix = (matrix + matrix.T).mul_(0.5)  # one temporary, never the caller's tensor
    if drop_zero_diagonal:
        keep = matrix.diagonal() != 0
        kept = int(keep.sum())
        if kept < dim:  # one kept × kept copy (no kept × dim intermediate)
            index = keep.nonzero()[:, 0]
            matrix = matrix[index[:, None], index]
    else:
        kept = dim
    values = torch.linalg.eigvalsh(matrix) if kept else matrix.new_zeros(0)
    if kept < dim:
        values = torch.cat([values, values.new_zeros(dim - kept)])
    return torch.sort(values, descending=True).values


def smaller_gram(matrix: Tensor) -> Tensor:
    """``M Mᵀ`` or ``Mᵀ M``, whichever is smaller: both have the squared singular values of
    ``M`` as their nonzero eigenvalues, and the smaller one is cheaper to form and solve.

    Example:
        >>> smaller_gram(torch.tensor([[3.0, 0.0, 4.0]]))
        tensor([[25.]])
    """
    return matrix @ matrix.T if matrix.shape[0] <= matrix.shape[1] else matrix.T @ matrix


def _check_definition(definition: str) -> None:
    if definition not in KAPPA_DEFINITIONS:
        raise ValueError(f"definition must be one of {KAPPA_DEFINITIONS}, got {definition!r}")


def summarize_spectrum(
    eigenvalues: Tensor,
    percents: Sequence[float] = (50, 80, 100),
    *,
    rtol: float | None = None,
    max_rank: int | None = None,
    definition: KappaDefinition = "paper",
    solver: str = "dense-float64",
    solver_error: float = 0.0,
    structural_zeros: int | None = None,
) -> SpectrumSummary:
    """λmax, numerical rank and κ_p from a descending spectrum.

    Args:
        eigenvalues: descending eigenvalues (e.g. from :func:`symmetric_eigenvalues`); exact
            zeros count as structural zeros.
        percents: the ``p`` of ``κ_p`` in percent, each in ``(0, 100]``.
        rtol: the resolution floor relative to λmax (default: that of a float64 eigen-solve of
            an exactly known matrix, :func:`~lightning_conditioning.maths.resolution.floor_rtol`).
        max_rank: an upper bound on the rank known from elsewhere (e.g. the number of rows
            the matrix was summed from): eigenvalues past it are structural zeros.
        definition: ``"paper"`` or ``"nonzero"`` (module docstring).
        solver / solver_error: recorded in the summary (which solver, how accurate).
        structural_zeros: how many of the eigenvalues are known to be exact zeros (e.g. the
            dead units a solver removed before the solve). Default: every eigenvalue that is
            exactly ``0.0`` (for spectra given by hand).

    A zero matrix has ``rank == 0`` and ``κ_p = nan`` (status ``"undefined"``).

    Example:
        >>> s = summarize_spectrum(torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=torch.float64),
        ...                        (50, 80, 100))
        >>> s.lambda_max, s.rank, s.kappa, s.kappa_status[80]
        (4.0, 3, {50: 2.0, 80: inf, 100: 4.0}, 'infinite')
        >>> summarize_spectrum(s.eigenvalues, (80,), definition="nonzero").kappa
        {80: 4.0}
    """
    _check_definition(definition)
    eigenvalues = eigenvalues.detach().to(device="cpu", dtype=torch.float64)
    dim = int(eigenvalues.numel())
    if rtol is None:
        rtol = floor_rtol(dim=max(dim, 1))
    if not 0 <= rtol <= 1:
        raise ValueError(f"rtol must be in [0, 1], got {rtol}")
    zeros = int((eigenvalues == 0).sum()) if structural_zeros is None else structural_zeros
    structural = dim - zeros
    if max_rank is not None:
        structural = min(structural, max(max_rank, 0))
    lambda_max = float(eigenvalues[0]) if dim else float("nan")
    if dim == 0 or not lambda_max > 0:
        return SpectrumSummary(
            eigenvalues,
            lambda_max,
            0,
            {p: math.nan for p in percents},
            rtol,
            {p: "undefined" for p in percents},
            max(structural, 0),
            definition,
            solver,
            solver_error,
        )
    rank = min(int((eigenvalues > rtol * lambda_max).sum()), structural)
    floor = rtol * lambda_max
    if rank == 0:  # even λmax is under the floor (a floor clamped at 1): nothing is measured
        return SpectrumSummary(
            eigenvalues,
            lambda_max,
            0,
            {p: 1.0 / rtol for p in percents},
            rtol,
            {p: "lower_bound" for p in percents},
            structural,
            definition,
            solver,
            solver_error,
        )
    kappa: dict[float, float] = {}
    status: dict[float, KappaStatus] = {}
    for percent in percents:
        if definition == "nonzero":
            index = percentile_index(percent, rank)
        elif percent == 100:
            index = rank - 1  # the smallest nonzero eigenvalue
        else:
            index = percentile_index(percent, dim)
        if index < rank:
            kappa[percent], status[percent] = lambda_max / float(eigenvalues[index]), "exact"
        elif index < structural and floor > 0:
            kappa[percent], status[percent] = lambda_max / floor, "lower_bound"
        else:
            kappa[percent], status[percent] = math.inf, "infinite"
    return SpectrumSummary(
        eigenvalues, lambda_max, rank, kappa, rtol, status, structural, definition, solver, solver_error
    )


def kronecker_kth_largest(first: Tensor, second: Tensor, k: int, *, max_direct: int = 1 << 16) -> float:
    """The ``k``-th largest (1-based) of all products ``first[i] * second[j]``.

    Both inputs must be positive. Up to ``max_direct`` products, they are formed as a vector
    and selected with ``kthvalue`` (fastest for small layers). Beyond, they are never formed:
    a bisection on the threshold in log space counts the products above it with
    ``searchsorted`` (O(m·log n) per step, ~60 steps), then snaps to the exact product.
    Exact up to ties closer than float64 resolution.

    Example:
        >>> a = torch.tensor([3.0, 1.0], dtype=torch.float64)
        >>> b = torch.tensor([2.0, 0.5], dtype=torch.float64)
        >>> [kronecker_kth_largest(a, b, k) for k in range(1, 5)]
        [6.0, 2.0, 1.5, 0.5]
    """
    m, n = first.numel(), second.numel()
    if not 1 <= k <= m * n:
        raise ValueError(f"k={k} outside [1, {m * n}]")
    if not (bool((first > 0).all()) and bool((second > 0).all())):
        raise ValueError("kronecker_kth_largest needs positive values")
    if m * n <= max_direct:
        products = (first.to(torch.float64)[:, None] * second.to(torch.float64)[None, :]).flatten()
        return float(torch.kthvalue(products, m * n - k + 1).values)
    first = torch.sort(first.to(torch.float64)).values
    second = torch.sort(second.to(torch.float64)).values
    log_first, log_second = torch.log(first), torch.log(second)

    def count_at_least(threshold: float) -> int:
        # number of pairs with log_first[i] + log_second[j] >= threshold
        positions = torch.searchsorted(log_second, threshold - log_first, side="left")
        return int((n - positions).sum())

    low = float(log_first[0] + log_second[0])  # count(low) == m*n >= k
    high = float(log_first[-1] + log_second[-1])  # count(high) >= 1
    if count_at_least(high) >= k:
        return float(first[-1] * second[-1])
    # invariant: count(low) >= k > count(high)
    for _ in range(200):
        middle = 0.5 * (low + high)
        if middle in (low, high):
            break
        if count_at_least(middle) >= k:
            low = middle
        else:
            high = middle
    # low sits within a few ulps of the answer's log: snap to the nearest actual product
    # (for each i, the neighbours of low - log_first[i] in log_second)
    positions = torch.searchsorted(log_second, low - log_first, side="left")
    rows = torch.arange(m).repeat(2)
    columns = torch.cat([positions - 1, positions]).clamp(0, n - 1)
    distance = (log_first[rows] + log_second[columns] - low).abs()
    best = int(torch.argmin(distance))
    i, j = int(rows[best]), int(columns[best])
    return float(first[i] * second[j])


def _kth_product(first: Tensor, second: Tensor, k: int) -> float:
    """The ``k``-th largest product of two nonnegative vectors (0 past the positive ones)."""
    first, second = first[first > 0], second[second > 0]
    if k > first.numel() * second.numel():
        return 0.0
    return kronecker_kth_largest(first, second, k)


def _upper_envelope(summary: SpectrumSummary) -> Tensor:
    """The resolved eigenvalues, then every unresolved one at its largest possible value."""
    return torch.cat([summary.nonzero_eigenvalues, summary.eigenvalues.new_full((summary.unresolved,), summary.floor)])


def summarize_kronecker(
    first: SpectrumSummary,
    second: SpectrumSummary,
    percents: Sequence[float] = (50, 80, 100),
    *,
    definition: KappaDefinition | None = None,
) -> KroneckerSummary:
    """λmax, rank and κ_p of ``A ⊗ B`` from the summaries of ``A`` and ``B``.

    The eigenvalues of a Kronecker product are all products ``a_i·b_j`` (Horn & Johnson,
    Thm 4.2.12). Resolved products are those of two resolved eigenvalues, so the rank is
    ``rank(A)·rank(B)`` and ``κ_100 = κ_100(A)·κ_100(B)`` (the paper's Proposition 1). For
    ``p < 100`` (``"paper"`` definition, over all ``d_A·d_B`` products) an unresolved
    eigenvalue lies in ``[0, floor]``, so ``λ_p`` lies between the ``k``-th largest product
    with unresolved eigenvalues at 0 and with them at their floor: κ_p is exact when both
    agree, a lower bound otherwise, and infinite when ``λ_p`` is a product of structural zeros.

    Example:
        >>> a = summarize_spectrum(torch.tensor([2.0, 1.0], dtype=torch.float64))
        >>> b = summarize_spectrum(torch.tensor([3.0, 1.0, 0.0], dtype=torch.float64))
        >>> k = summarize_kronecker(a, b)
        >>> k.lambda_max, k.rank, k.kappa, k.kappa_status[80]
        (6.0, 4, {50: 3.0, 80: inf, 100: 6.0}, 'infinite')
    """
    definition = definition or first.definition
    _check_definition(definition)
    rank = first.rank * second.rank
    structural = first.structural_rank * second.structural_rank
    if rank == 0:  # λmax is still known when a factor is exactly zero: 0
        zero = first.lambda_max == 0 or second.lambda_max == 0
        return KroneckerSummary(
            0.0 if zero else math.nan,
            0,
            {p: math.nan for p in percents},
            {p: "undefined" for p in percents},
            structural,
            definition,
        )
    top_first, top_second = first.nonzero_eigenvalues, second.nonzero_eigenvalues
    lambda_max = float(top_first[0] * top_second[0])
    total = first.dim * second.dim
    kappa: dict[float, float] = {}
    status: dict[float, KappaStatus] = {}
    for percent in percents:
        if percent == 100 or definition == "nonzero":
            k = rank if percent == 100 else percentile_index(percent, rank) + 1
            kappa[percent] = lambda_max / kronecker_kth_largest(top_first, top_second, k)
            status[percent] = "exact"
            continue
        k = percentile_index(percent, total) + 1
        low = _kth_product(top_first, top_second, k)
        high = (
            low
            if k <= rank and not (first.unresolved or second.unresolved)
            else (_kth_product(_upper_envelope(first), _upper_envelope(second), k))
        )
        if low > 0 and low == high:
            kappa[percent], status[percent] = lambda_max / low, "exact"
        elif high > 0:
            kappa[percent], status[percent] = lambda_max / high, "lower_bound"
        else:
            kappa[percent], status[percent] = math.inf, "infinite"
    return KroneckerSummary(lambda_max, rank, kappa, status, structural, definition)
