"""Pure spectral maths: eigenvalues, λmax, generalized condition numbers and Kronecker spectra.

Nothing here knows about Lightning, hooks or modules: every function takes and returns plain
tensors or small dataclasses, so it can be tested against numpy/float64 references and reused
from notebooks.

Conventions (see README "Conventions"):

* Spectra are sorted in descending order and computed in float64 on the CPU.
* An eigenvalue is *nonzero* when it is larger than ``rank_rtol * λmax``; features whose
  diagonal entry is exactly zero (dead units) are removed before the solve so that they count
  as exact zeros, and the rank never exceeds the number of rows the moment was built from.
* The generalized condition number ``κ_p = λmax / λ_p`` uses ``λ_p``, the ``⌈p·r/100⌉``-th
  largest of the ``r`` nonzero eigenvalues (``r`` is the numerical rank). So ``κ_100`` is
  ``λmax / λmin_nonzero``, the paper's definition, and ``κ_p`` is never infinite.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_RANK_RTOL",
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

#: Default relative tolerance below which an eigenvalue counts as zero. The second moments are
#: formed by float32 GEMMs (accumulated in float64); the exact zeros of such a Gram matrix come
#: out as ±(1e-9 … 1e-8)·λmax, so a floor at 1e-7·λmax separates them from real eigenvalues.
#: Use ``statistics_dtype=torch.float64`` with a smaller tolerance to resolve κ beyond 1e7.
DEFAULT_RANK_RTOL = 1e-7


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


def format_percent(percent: float) -> str:
    """Key fragment for a percent: ``50 -> "50"``, ``99.5 -> "99_5"``.

    Example:
        >>> format_percent(80.0), format_percent(99.5)
        ('80', '99_5')
    """
    text = f"{percent:g}"
    return text.replace(".", "_")


@dataclass(frozen=True)
class SpectrumSummary:
    """Eigen-statistics of one symmetric positive semi-definite matrix.

    Attributes:
        eigenvalues: all eigenvalues, float64, descending (tiny negative round-off included).
        lambda_max: the largest eigenvalue.
        rank: the numerical rank ``r`` (eigenvalues above ``rtol * lambda_max``).
        kappa: ``{percent: λmax / λ_p}`` over the ``r`` nonzero eigenvalues.
        rtol: the relative tolerance that defined "nonzero".

    Example:
        >>> s = summarize_spectrum(torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64), (100,))
        >>> s.rank, s.kappa, s.nonzero_eigenvalues.tolist(), s.dim
        (2, {100: 2.0}, [2.0, 1.0], 3)
    """

    eigenvalues: Tensor
    lambda_max: float
    rank: int
    kappa: dict[float, float] = field(default_factory=dict)
    rtol: float = DEFAULT_RANK_RTOL

    @property
    def nonzero_eigenvalues(self) -> Tensor:
        """The ``rank`` largest eigenvalues (descending)."""
        return self.eigenvalues[: self.rank]

    @property
    def dim(self) -> int:
        """Size of the matrix."""
        return int(self.eigenvalues.numel())


@dataclass(frozen=True)
class KroneckerSummary:
    """λmax and κ_p of ``A ⊗ B`` obtained from the spectra of ``A`` and ``B`` alone.

    Attributes:
        lambda_max: ``λmax(A)·λmax(B)``.
        rank: ``rank(A)·rank(B)``.
        kappa: ``{percent: λmax / λ_p}`` over the nonzero products ``a_i·b_j``.

    Example:
        >>> k = summarize_kronecker(summarize_spectrum(torch.tensor([4.0, 1.0])),
        ...                         summarize_spectrum(torch.tensor([2.0, 1.0])), (50, 100))
        >>> k.lambda_max, k.rank, k.kappa
        (8.0, 4, {50: 2.0, 100: 8.0})
    """

    lambda_max: float
    rank: int
    kappa: dict[float, float] = field(default_factory=dict)


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
    matrix = (matrix + matrix.T).mul_(0.5)  # one temporary, never the caller's tensor
    if drop_zero_diagonal:
        keep = matrix.diagonal() != 0
        kept = int(keep.sum())
        if kept < dim:
            matrix = matrix[keep][:, keep]
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


def _numerical_rank(eigenvalues: Tensor, rtol: float, max_rank: int | None) -> int:
    if eigenvalues.numel() == 0 or not eigenvalues[0] > 0:
        return 0
    rank = int((eigenvalues > rtol * eigenvalues[0]).sum())
    if max_rank is not None:
        rank = min(rank, max_rank)
    return rank


def summarize_spectrum(
    eigenvalues: Tensor,
    percents: Sequence[float] = (50, 80, 100),
    *,
    rtol: float = DEFAULT_RANK_RTOL,
    max_rank: int | None = None,
) -> SpectrumSummary:
    """λmax, numerical rank and κ_p from a descending spectrum.

    Args:
        eigenvalues: descending eigenvalues (e.g. from :func:`symmetric_eigenvalues`).
        percents: the ``p`` of ``κ_p`` in percent, each in ``(0, 100]``.
        rtol: eigenvalues ``<= rtol * λmax`` count as zero.
        max_rank: an upper bound on the rank known from elsewhere (e.g. the number of rows
            the matrix was summed from).

    A zero matrix has ``rank == 0`` and ``κ_p = nan``.

    Example:
        >>> s = summarize_spectrum(torch.tensor([4.0, 2.0, 1.0, 0.0], dtype=torch.float64))
        >>> s.lambda_max, s.rank, s.kappa[100]
        (4.0, 3, 4.0)
    """
    eigenvalues = eigenvalues.detach().to(device="cpu", dtype=torch.float64)
    rank = _numerical_rank(eigenvalues, rtol, max_rank)
    lambda_max = float(eigenvalues[0]) if eigenvalues.numel() else float("nan")
    kappa: dict[float, float] = {}
    for percent in percents:
        if rank == 0:
            kappa[percent] = float("nan")
        else:
            kappa[percent] = lambda_max / float(eigenvalues[percentile_index(percent, rank)])
    return SpectrumSummary(eigenvalues, lambda_max, rank, kappa, rtol)


def kronecker_kth_largest(
    first: Tensor, second: Tensor, k: int, *, max_direct: int = 1 << 16
) -> float:
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


def summarize_kronecker(
    first: SpectrumSummary, second: SpectrumSummary, percents: Sequence[float] = (50, 80, 100)
) -> KroneckerSummary:
    """λmax, rank and κ_p of ``A ⊗ B`` from the summaries of ``A`` and ``B``.

    The eigenvalues of a Kronecker product are all products ``a_i·b_j`` (Horn & Johnson,
    Thm 4.2.12); its nonzero ones are the products of nonzero ones, so the rank is
    ``rank(A)·rank(B)`` and κ_p is taken over those ``r_A·r_B`` products. ``κ_100`` equals
    ``κ_100(A)·κ_100(B)`` (the paper's Proposition 1).

    Example:
        >>> a = summarize_spectrum(torch.tensor([2.0, 1.0], dtype=torch.float64))
        >>> b = summarize_spectrum(torch.tensor([3.0, 1.0], dtype=torch.float64))
        >>> k = summarize_kronecker(a, b)
        >>> k.lambda_max, k.rank, k.kappa[100]
        (6.0, 4, 6.0)
    """
    rank = first.rank * second.rank
    if rank == 0:
        return KroneckerSummary(float("nan"), 0, {p: float("nan") for p in percents})
    top_first, top_second = first.nonzero_eigenvalues, second.nonzero_eigenvalues
    lambda_max = float(top_first[0] * top_second[0])
    kappa = {
        p: lambda_max
        / kronecker_kth_largest(top_first, top_second, percentile_index(p, rank) + 1)
        for p in percents
    }
    return KroneckerSummary(lambda_max, rank, kappa)
