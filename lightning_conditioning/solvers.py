"""The spectrum-solver seam: every eigen-solve of the package goes through a solver.

A :class:`SpectrumSolver` takes a symmetric PSD matrix and returns a :class:`SolvedSpectrum`:
the eigenvalues it could find (descending, float64, CPU), which solver produced them, and how
accurate they are. The dense float64 CPU solver (:class:`DenseSolver`, ``eigvalsh``) is the first
implementation and the default; approximate solvers for huge layers (Lanczos λmax with bounds,
sketches) plug in through the ``solver`` option of the monitor and the callback, as a solver
or as a plan ``plan(layer_name, dim) -> solver`` chosen per layer.

Example:
    >>> solved = DenseSolver()(torch.diag(torch.tensor([1.0, 0.0, 3.0])))
    >>> solved.eigenvalues.tolist(), solved.solver, solved.exact
    ([3.0, 1.0, 0.0], 'dense-float64', True)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol, Union, runtime_checkable

import torch
from torch import Tensor

from lightning_conditioning.sketch import sketch_eigenvalues
from lightning_conditioning.spectra import symmetric_eigenvalues

__all__ = [
    "Quantile",
    "SolvedSpectrum", "SpectrumSolver", "DenseSolver", "DiagonalSolver", "SolverPlan", "DENSE",
    "DIAGONAL", "SketchSolver", "SKETCH", "plan_solver", "shareable", "limited_threads",
]


#: ``quantile(k) -> (estimate, low, high)`` of the k-th largest eigenvalue (1-based): an
#: estimate and its error bar, for indices beyond the eigenvalues a solver lists
Quantile = Callable[[int], tuple[float, float, float]]


@dataclass(frozen=True)
class SolvedSpectrum:
    """What a solver found.

    Attributes:
        eigenvalues: descending, float64, on the CPU; all ``d`` of them for an exact solver,
            the ``k`` largest (estimates) for an approximate one.
        solver: the solver's name (reported in the results).
        exact: ``True`` when every eigenvalue is computed to working precision (its rounding
            is covered by the resolution floor); approximate solvers say ``False``.
        relative_error: a bound on the relative error of the reported eigenvalues beyond the
            floor's rounding (0 for exact solvers).
        structural_zeros: how many of the eigenvalues are exact zeros known before the solve
            (rows and columns with a zero diagonal, removed from it), not computed ones.
        lower / upper: for an approximate solver, per listed eigenvalue, an interval holding
            the true ``k``-th largest eigenvalue (certified, e.g. Frequent Directions or a
            Lanczos Ritz value, or a residual-based bound: ``bounds`` says which).
        dim: the moment's size when ``eigenvalues`` lists fewer than all of them.
        tail_upper: every eigenvalue beyond those listed is at most this (None: unknown).
        quantile: an estimate with its error bar of the ``k``-th largest eigenvalue for any
            ``k`` (e.g. stochastic Lanczos quadrature with bootstrap intervals), or None.
        bounds: ``"certified"`` (the intervals hold by construction) or ``"residual"`` /
            ``"statistical"`` (they hold under the method's assumptions).

    Example:
        >>> partial = SolvedSpectrum(torch.tensor([4.0, 2.0], dtype=torch.float64), "sketch",
        ...                          exact=False, lower=torch.tensor([4.0, 2.0]),
        ...                          upper=torch.tensor([4.5, 2.5]), dim=10, tail_upper=2.5)
        >>> partial.size, partial.complete
        (10, False)
    """

    eigenvalues: Tensor
    solver: str
    exact: bool = True
    relative_error: float = 0.0
    structural_zeros: int = 0
    lower: Tensor | None = None
    upper: Tensor | None = None
    dim: int | None = None
    tail_upper: float | None = None
    quantile: Quantile | None = None
    bounds: str = "certified"

    @property
    def size(self) -> int:
        """The moment's dimension ``d``."""
        return int(self.dim) if self.dim is not None else int(self.eigenvalues.numel())

    @property
    def complete(self) -> bool:
        """Whether all ``d`` eigenvalues are computed exactly (the dense case)."""
        return self.exact and int(self.eigenvalues.numel()) == self.size


@contextmanager
def limited_threads(threads: int | None = 1) -> Iterator[None]:
    """``threads`` intra-op threads in the calling thread for the block, the caller's own
    setting restored after (``torch.set_num_threads`` is per thread in PyTorch's OpenMP
    backend); ``None``: no change. The analysis solves with one thread: measured on 2 cores,
    float64 ``eigvalsh`` of 192² took 0.9 ms with one thread against 2.5 ms with two, 768² 34
    against 25 ms; with one core busy elsewhere (a DataLoader worker), two threads took 11 ms,
    108 ms and 902 ms (2304²) against 1.0, 33 and 424 ms: an OpenMP team spinning on a busy
    core stalls every small solve.

    Example:
        >>> before = torch.get_num_threads()
        >>> with limited_threads(1):
        ...     torch.get_num_threads()
        1
        >>> torch.get_num_threads() == before
        True
    """
    previous = torch.get_num_threads()
    if threads is None:
        yield
        return
    if previous != threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)


@runtime_checkable
class SpectrumSolver(Protocol):
    """Anything with a ``name`` that maps a symmetric PSD matrix to a :class:`SolvedSpectrum`."""

    name: str

    def __call__(self, matrix: Any) -> SolvedSpectrum: ...


class DenseSolver:
    """All eigenvalues by ``torch.linalg.eigvalsh`` in float64 on the CPU (exact).

    Rows and columns with an exactly zero diagonal (dead units) are removed before the solve
    and returned as exact zeros (:func:`~lightning_conditioning.spectra.symmetric_eigenvalues`).

    Args:
        drop_zero_diagonal: remove zero-diagonal rows/columns first (default ``True``).
    """

    name = "dense-float64"

    def __init__(self, *, drop_zero_diagonal: bool = True) -> None:
        self.drop_zero_diagonal = drop_zero_diagonal

    def __call__(self, matrix: Tensor) -> SolvedSpectrum:
        values = symmetric_eigenvalues(matrix, drop_zero_diagonal=self.drop_zero_diagonal)
        zeros = int((matrix.diagonal() == 0).sum()) if self.drop_zero_diagonal else 0
        return SolvedSpectrum(values, self.name, structural_zeros=zeros)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(drop_zero_diagonal={self.drop_zero_diagonal})"


class DiagonalSolver:
    """The eigenvalues of a diagonal matrix given as the vector of its diagonal (exact; an
    embedding's input moment: token frequencies). Zero entries are structural zeros.

    Example:
        >>> solved = DiagonalSolver()(torch.tensor([0.25, 0.0, 0.75], dtype=torch.float64))
        >>> solved.eigenvalues.tolist(), solved.structural_zeros
        ([0.75, 0.25, 0.0], 1)
    """

    name = "diagonal"

    def __call__(self, matrix: Tensor) -> SolvedSpectrum:
        if matrix.dim() != 1:
            raise ValueError(f"expected the diagonal as a vector, got shape {tuple(matrix.shape)}")
        values = matrix.detach().to(device="cpu", dtype=torch.float64)
        zeros = int((values == 0).sum())
        return SolvedSpectrum(torch.sort(values, descending=True).values, self.name,
                              structural_zeros=zeros)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SketchSolver:
    """The spectrum of a Frequent Directions sketch
    (:class:`~lightning_conditioning.sketch.SketchedMoment`) with certified intervals: the
    ``i``-th largest eigenvalue of the moment lies in ``[λ_i(BᵀB), λ_i(BᵀB) + Δ]`` and every one
    past the sketch in ``[0, Δ]``; exact (``Δ = 0``) while the window's rows fit the sketch.

    Example:
        >>> from lightning_conditioning.sketch import SketchedMoment
        >>> sketch = SketchedMoment(torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64), 0.5, 3)
        >>> solved = SketchSolver()(sketch)
        >>> solved.eigenvalues.tolist(), solved.upper.tolist(), solved.tail_upper, solved.size
        ([4.0], [4.5], 0.5, 3)
        >>> SketchSolver()(SketchedMoment(sketch.sketch, 0.0, 3)).eigenvalues.tolist()  # exact
        [4.0, 0.0, 0.0]
    """

    name = "frequent-directions"

    def __call__(self, matrix: Any) -> SolvedSpectrum:
        values = sketch_eigenvalues(matrix.sketch)
        delta = float(matrix.shrinkage)
        if delta == 0:  # nothing shrunk: the rows' span is the sketch's, the rest exact zeros
            kept = values[: matrix.size]
            zeros = matrix.size - int(kept.numel())
            return SolvedSpectrum(torch.cat([kept, kept.new_zeros(zeros)]), self.name,
                                  structural_zeros=zeros)
        return SolvedSpectrum(values, self.name, exact=False, lower=values.clone(),
                              upper=values + delta, dim=matrix.size, tail_upper=delta,
                              bounds="certified")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: the default solver
DENSE = DenseSolver()
#: the solver of every sketched moment
SKETCH = SketchSolver()
#: the solver of every diagonal moment (whatever the plan: it is exact and costs O(d log d))
DIAGONAL = DiagonalSolver()

#: a solver for every layer, or a plan choosing one per layer: ``plan(layer_name, dim)``
SolverPlan = Union[SpectrumSolver, Callable[[str, int], SpectrumSolver]]


def plan_solver(plan: SolverPlan | None, layer: str, dim: int) -> SpectrumSolver:
    """The solver for one moment of ``layer`` of size ``dim`` (``None``: :data:`DENSE`).

    Example:
        >>> plan_solver(None, "fc", 10) is DENSE
        True
        >>> big = DenseSolver(drop_zero_diagonal=False)
        >>> plan_solver(lambda layer, dim: big if dim > 4 else DENSE, "fc", 10) is big
        True
    """
    if plan is None:
        return DENSE
    if isinstance(plan, SpectrumSolver):
        return plan
    chosen = plan(layer, dim)
    if not isinstance(chosen, SpectrumSolver):
        raise TypeError(f"the solver plan returned {chosen!r} for {layer!r}, not a solver")
    return chosen


def largest_eigenvalue(matrix: Tensor, solver: SpectrumSolver = DENSE) -> float:
    """λmax of a symmetric PSD matrix through ``solver`` (0 for an empty matrix).

    Example:
        >>> largest_eigenvalue(torch.tensor([[2.0, 0.0], [0.0, 5.0]]))
        5.0
    """
    if matrix.numel() == 0:
        return 0.0
    return float(solver(matrix.to(torch.float64)).eigenvalues[0])


def shareable(solver: SpectrumSolver) -> bool:
    """Whether a solver's result is complete and exact, so that a distributed run can share
    the solves out and sum the eigenvalues back (approximate spectra are solved on every rank).

    Example:
        >>> shareable(DENSE), shareable(SKETCH)
        (True, False)
    """
    return isinstance(solver, (DenseSolver, DiagonalSolver))
