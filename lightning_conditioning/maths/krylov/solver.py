"""``LanczosSolver``: the approximate solver, and the matrix-free Gram operator
(see :mod:`lightning_conditioning.maths.krylov`)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_conditioning.maths.krylov.quantiles import SpectralQuantiles, ZeroQuantiles
from lightning_conditioning.maths.krylov.runs import MatVec, krylov_runs
from lightning_conditioning.maths.resolution import floor_rtol
from lightning_conditioning.maths.solvers import SolvedSpectrum, limited_threads


def _integer(name: str, value: object, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return value


class LanczosSolver:
    """Approximate spectrum of a large symmetric PSD matrix (module docstring): λmax and the
    ``top`` largest by block Lanczos, with certified lower and residual upper bounds; any
    quantile by stochastic Lanczos quadrature with error bars.

    The result is a :class:`~lightning_conditioning.maths.solvers.SolvedSpectrum` with
    ``exact=False``, ``bounds="residual"`` (of ``lower``/``upper``), ``dim`` the full size and
    ``quantile`` a :class:`SpectralQuantiles`: ``quantile(k)`` for any ``k``, and
    ``quantile.smallest_nonzero()`` (κ_100), ``quantile.rank()``, ``quantile.envelopes()``.
    Cost: ``steps + 2`` passes over the matrix (GEMMs with ``probes + top + 4`` columns) plus
    O(``probes·steps²·d``) reorthogonalisation; memory ``(probes + top + 4)·steps·d`` floats.
    It overtakes a dense ``eigvalsh`` from ``d ≈ 3000`` (1.4× at 4096, 3× at 8192 on one core).

    Args:
        top: how many of the largest eigenvalues to list (``eigenvalues``, ``lower``, ``upper``).
        steps: Lanczos steps per probe (CDF resolution about ``1/steps``; cost ``steps``
            products ``M @ V``).
        probes: Rademacher probes (sampling error ``∝ 1/√(probes·d)``).
        block_size: block size of the top run (default ``top + 4``).
        confidence: two-sided confidence of every quantile interval, in ``(0, 1)``.
        resamples: bootstrap resamples of the probes.
        seed: seed of the solver's own :class:`torch.Generator` (never the global RNG).
        rtol: resolution floor relative to λmax (default
            :func:`~lightning_conditioning.maths.resolution.floor_rtol` of the matrix size).
        drop_zero_diagonal: remove zero-diagonal rows/columns first (structural zeros).
        threads: intra-op CPU threads for the solve (``torch.set_num_threads``, restored
            afterwards; the setting is process-wide while the solve runs). ``None`` (default)
            leaves them alone. On a busy 2-core CPU one thread was 6× faster than two
            (``benchmarks/krylov.py``): each Lanczos step is a few dozen small parallel ops.

    Example:
        >>> matrix = torch.diag(torch.linspace(0.0, 2.0, 100, dtype=torch.float64))
        >>> solved = LanczosSolver(top=2, steps=30, probes=8)(matrix)
        >>> [round(v, 9) for v in solved.eigenvalues.tolist()], solved.structural_zeros
        ([2.0, 1.97979798], 1)
        >>> bool(solved.lower[0] <= 2.0 <= solved.upper[0]), solved.quantile(100)
        (True, (0.0, 0.0, 0.0))
    """

    name = "lanczos-slq"

    def __init__(
        self,
        *,
        top: int = 4,
        steps: int = 60,
        probes: int = 16,
        block_size: int | None = None,
        confidence: float = 0.95,
        resamples: int = 2000,
        seed: int = 0,
        rtol: float | None = None,
        drop_zero_diagonal: bool = True,
        threads: int | None = None,
    ) -> None:
        self.top = _integer("top", top, 1)
        self.steps = _integer("steps", steps, 2)
        self.probes = _integer("probes", probes, 2)
        self.block_size = _integer("block_size", top + 4 if block_size is None else block_size, 1)
        if (
            isinstance(confidence, bool)
            or not isinstance(confidence, (int, float))
            or not (0.0 < float(confidence) < 1.0)
        ):
            raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
        self.confidence = float(confidence)
        self.resamples = _integer("resamples", resamples, 100)
        self.seed = _integer("seed", seed, 0)
        if rtol is not None and not 0.0 <= rtol <= 1.0:
            raise ValueError(f"rtol must be in [0, 1], got {rtol!r}")
        self.rtol = rtol
        self.drop_zero_diagonal = drop_zero_diagonal
        self.threads = None if threads is None else _integer("threads", threads, 1)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(top={self.top}, steps={self.steps}, probes={self.probes},"
            f" confidence={self.confidence}, seed={self.seed}, threads={self.threads})"
        )

    def __call__(self, matrix: Tensor) -> SolvedSpectrum:
        """The spectrum of a dense symmetric PSD matrix (any float dtype and device; never
        copied: zero-diagonal rows/columns are skipped inside the products). A rounding-level
        asymmetry (a computed Gram) is allowed for in the bounds (a sampled bound on
        ``‖(M − Mᵀ)/2‖₂``); a larger one is solved through the symmetric part ``(M + Mᵀ)/2``,
        as ``DenseSolver`` does (two products per step)."""
        if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"expected a square matrix, got shape {tuple(matrix.shape)}")
        with limited_threads(self.threads):
            return self._solve_dense(matrix.detach())

    def _solve_dense(self, matrix: Tensor) -> SolvedSpectrum:
        if matrix.dtype != torch.float64:
            matrix = matrix.to(torch.float64)
        dim = int(matrix.shape[0])
        skew, size = _skew_bound(matrix, torch.Generator().manual_seed(self.seed))
        product: MatVec = matrix.matmul
        if skew > 1e-8 * size:
            product, skew = (lambda block: 0.5 * (matrix @ block + matrix.T @ block)), 0.0
        zeros = 0
        if self.drop_zero_diagonal:
            keep = (matrix.diagonal() != 0).nonzero().squeeze(1)
            if keep.numel() < dim:
                product, zeros = _restricted(product, keep, dim), dim - int(keep.numel())
        return self.solve_operator(
            product, dim - zeros, structural_zeros=zeros, device=matrix.device, perturbation=skew
        )

    def solve_operator(
        self,
        matvec: MatVec,
        dim: int,
        *,
        structural_zeros: int = 0,
        device: torch.device | str | None = None,
        perturbation: float = 0.0,
    ) -> SolvedSpectrum:
        """The spectrum of a symmetric PSD ``M`` given only as ``matvec(V) = M @ V`` (``V``:
        ``(dim, b)`` float64 on ``device``), followed by ``structural_zeros`` exact zeros.
        ``perturbation`` bounds ``‖M_applied − M‖₂`` (e.g. a rounding-level asymmetry); every
        bound is widened by it.

        Example:
            >>> rows = torch.randn(6, 40, dtype=torch.float64,
            ...                    generator=torch.Generator().manual_seed(0))
            >>> matvec, dim, zeros = gram_operator(rows)  # rank 6 of 40
            >>> solved = LanczosSolver(steps=10, probes=32).solve_operator(matvec, dim)
            >>> solved.size, solved.quantile(7)
            (40, (0.0, 0.0, 0.0))
        """
        with limited_threads(self.threads):
            return self._solve(matvec, dim, structural_zeros, device, perturbation)

    def _solve(
        self, matvec: MatVec, dim: int, structural_zeros: int, device: torch.device | str | None, perturbation: float
    ) -> SolvedSpectrum:
        if dim < 0 or structural_zeros < 0:
            raise ValueError(f"dim and structural_zeros must be >= 0, got {dim}, {structural_zeros}")
        size = dim + structural_zeros
        listed = min(self.top, size)
        known: dict[str, Any] = dict(exact=False, structural_zeros=structural_zeros, dim=size, bounds="residual")
        if dim == 0:
            zeros = torch.zeros(listed, dtype=torch.float64)
            return SolvedSpectrum(
                zeros, self.name, lower=zeros, upper=zeros, tail_upper=0.0, quantile=ZeroQuantiles(size), **known
            )
        generator = torch.Generator().manual_seed(self.seed)
        signs = torch.randint(0, 2, (dim, self.probes), generator=generator)
        probes = (2.0 * signs - 1.0).to(dtype=torch.float64, device=device)
        start = torch.randn(dim, min(self.block_size, dim), generator=generator, dtype=torch.float64).to(device)
        rule, top = krylov_runs(matvec, probes, self.steps, start, self.steps, self.top, slack=perturbation)
        assert top is not None
        rtol = self.rtol if self.rtol is not None else floor_rtol(dim=max(size, 1))
        quantiles = SpectralQuantiles(
            rule,
            dim,
            structural_zeros=structural_zeros,
            floor=rtol * float(top.upper[0]),
            top=top,
            confidence=self.confidence,
            resamples=self.resamples,
            generator=generator,
            slack=perturbation,
            threads=self.threads,
        )
        rows = [quantiles(k) for k in range(1, listed + 1)]
        values, lower, upper = (torch.tensor(column, dtype=torch.float64) for column in zip(*rows))
        spread = float(((upper - lower) / lower.clamp(min=1e-300)).max()) if listed else 0.0
        tail = float(upper[-1]) if listed else 0.0
        return SolvedSpectrum(
            values,
            self.name,
            relative_error=spread,
            lower=lower,
            upper=upper,
            tail_upper=tail,
            quantile=quantiles,
            **known,
        )


def _restricted(product: MatVec, keep: Tensor, dim: int) -> MatVec:
    """``V -> (M @ V')[keep]``, ``V'`` the rows ``keep`` of ``V`` embedded in ``d`` zeros: the
    product with ``M[keep][:, keep]`` without copying the matrix."""

    def matvec(block: Tensor) -> Tensor:
        full = block.new_zeros(dim, block.shape[1])
        full[keep] = block
        return product(full)[keep]

    return matvec


def _skew_bound(matrix: Tensor, generator: torch.Generator, samples: int = 4) -> tuple[float, float]:
    """A high-probability bound on ``‖(M − Mᵀ)/2‖₂`` and an estimate of ``‖M‖_F``, from
    ``samples`` Gaussian products (Hutchinson: ``E‖A g‖² = ‖A‖_F² ≥ ‖A‖₂²``; 10× the
    estimate fails with probability ~1e-5 for ``samples = 4``). Two thin products, no
    ``d × d`` temporary.

    Example:
        >>> skew, size = _skew_bound(torch.eye(3, dtype=torch.float64), torch.Generator())
        >>> skew, round(size / 3 ** 0.5, 1) > 0
        (0.0, True)
    """
    block = torch.randn(matrix.shape[0], samples, generator=generator, dtype=torch.float64)
    block = block.to(matrix.device)
    image = matrix @ block
    skew = float((image - matrix.T @ block).norm()) / 2.0
    return 10.0 * skew / math.sqrt(samples), float(image.norm()) / math.sqrt(samples)


def gram_operator(rows: Tensor, scale: float | None = None) -> tuple[MatVec, int, int]:
    """The moment ``M = scale · RᵀR`` (default ``scale = 1/n`` for ``n`` rows) as an operator
    that never forms ``M``: ``(matvec, dim, structural_zeros)``, with the all-zero columns of
    ``R`` (``M``'s zero-diagonal rows) removed. Two GEMMs of ``n·d`` per product.

    Example:
        >>> rows = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 4.0]], dtype=torch.float64)
        >>> matvec, dim, zeros = gram_operator(rows)
        >>> dim, zeros, matvec(torch.ones(2, 1, dtype=torch.float64)).flatten().tolist()
        (2, 1, [12.0, 17.0])
    """
    if rows.dim() != 2:
        raise ValueError(f"expected rows of shape (n, d), got {tuple(rows.shape)}")
    rows = rows.detach().to(torch.float64)
    factor = 1.0 / max(rows.shape[0], 1) if scale is None else float(scale)
    keep = (rows != 0).any(0).nonzero().squeeze(1)
    dim = int(rows.shape[1])
    if keep.numel() < dim:
        rows = rows[:, keep]

    def matvec(block: Tensor) -> Tensor:
        return factor * (rows.T @ (rows @ block))

    return matvec, int(keep.numel()), dim - int(keep.numel())
