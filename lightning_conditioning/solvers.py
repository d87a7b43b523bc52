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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, Union, runtime_checkable

import torch
from torch import Tensor

from lightning_conditioning.spectra import symmetric_eigenvalues

__all__ = [
    "SolvedSpectrum", "SpectrumSolver", "DenseSolver", "DiagonalSolver", "SolverPlan", "DENSE",
    "DIAGONAL", "plan_solver",
]


@dataclass(frozen=True)
class SolvedSpectrum:
    """What a solver found.

    Attributes:
        eigenvalues: descending, float64, on the CPU; all ``d`` of them for an exact solver.
        solver: the solver's name (reported in the results).
        exact: ``True`` when every eigenvalue is computed to working precision (its rounding
            is covered by the resolution floor); approximate solvers say ``False``.
        relative_error: a bound on the relative error of the reported eigenvalues beyond the
            floor's rounding (0 for exact solvers).
        structural_zeros: how many of the eigenvalues are exact zeros known before the solve
            (rows and columns with a zero diagonal, removed from it), not computed ones.

    The analysis needs all ``d`` eigenvalues from an exact solver; approximate solvers (fewer
    eigenvalues, ``exact=False``) are rejected with a clear error until the approximate
    summaries exist.
    """

    eigenvalues: Tensor
    solver: str
    exact: bool = True
    relative_error: float = 0.0
    structural_zeros: int = 0


@runtime_checkable
class SpectrumSolver(Protocol):
    """Anything with a ``name`` that maps a symmetric PSD matrix to a :class:`SolvedSpectrum`."""

    name: str

    def __call__(self, matrix: Tensor) -> SolvedSpectrum: ...


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


#: the default solver
DENSE = DenseSolver()
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
