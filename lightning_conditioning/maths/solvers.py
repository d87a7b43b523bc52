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
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from lightning_conditioning.maths.sketch import sketch_eigenvalues
from lightning_conditioning.maths.spectra import symmetric_eigenvalues

__all__ = [
    "Quantile",
    "SolvedSpectrum",
    "SpectrumSolver",
    "DenseSolver",
    "DiagonalSolver",
    "SolverPlan",
    "DENSE",
    "DIAGONAL",
    "SketchSolver",
    "SKETCH",
    "plan_solver",
    "shareable",
    "limited_threads",
    "SingularValue",
    "largest_singular_value",
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
    and returned as exact zeros (:func:`~lightning_conditioning.maths.spectra.symmetric_eigenvalues`).

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
        return SolvedSpectrum(torch.sort(values, descending=True).values, self.name, structural_zeros=zeros)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class SketchSolver:
    """The spectrum of a Frequent Directions sketch
    (:class:`~lightning_conditioning.maths.sketch.SketchedMoment`) with certified intervals: the
    ``i``-th largest eigenvalue of the moment lies in ``[λ_i(BᵀB), λ_i(BᵀB) + Δ]`` and every one
    past the sketch in ``[0, Δ]``; exact while the window's rows fit the sketch (``Δ = 0``) or
    were shrunk in one block (the block's exact spectrum, ``SketchedMoment.eigenvalues``).

    Example:
        >>> from lightning_conditioning.maths.sketch import SketchedMoment
        >>> sketch = SketchedMoment(torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64), 0.5, 3)
        >>> solved = SketchSolver()(sketch)
        >>> solved.eigenvalues.tolist(), solved.upper.tolist(), solved.tail_upper, solved.size
        ([4.0], [4.5], 0.5, 3)
        >>> SketchSolver()(SketchedMoment(sketch.sketch, 0.0, 3)).eigenvalues.tolist()  # exact
        [4.0, 0.0, 0.0]
    """

    name = "frequent-directions"

    def __call__(self, matrix: Any) -> SolvedSpectrum:
        exact = getattr(matrix, "eigenvalues", None)
        values = exact.to(torch.float64) if exact is not None else sketch_eigenvalues(matrix.sketch)
        return self.spectrum(values, 0.0 if exact is not None else float(matrix.shrinkage), matrix.size)

    def spectrum(self, values: Tensor, delta: float, size: int) -> SolvedSpectrum:
        """The solved spectrum of a ``size``-dim moment from its sketch's eigenvalues
        ``values`` (descending) and shrinkage ``Δ`` (what an owner process sends back).

        Example:
            >>> SketchSolver().spectrum(torch.tensor([4.0], dtype=torch.float64), 0.5, 3).upper.tolist()
            [4.5]
        """
        if delta == 0:  # nothing lost: the rows' spectrum, the rest exact zeros
            kept = values[:size]
            zeros = size - int(kept.numel())
            return SolvedSpectrum(torch.cat([kept, kept.new_zeros(zeros)]), self.name, structural_zeros=zeros)
        return SolvedSpectrum(
            values,
            self.name,
            exact=False,
            lower=values.clone(),
            upper=values + delta,
            dim=size,
            tail_upper=delta,
            bounds="certified",
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


#: the default solver
DENSE = DenseSolver()
#: the solver of every sketched moment
SKETCH = SketchSolver()
#: the solver of every diagonal moment (whatever the plan: it is exact and costs O(d log d))
DIAGONAL = DiagonalSolver()

#: a solver for every layer, or a plan choosing one per layer: ``plan(layer_name, dim)``
SolverPlan = SpectrumSolver | Callable[[str, int], SpectrumSolver]


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


@dataclass(frozen=True)
class SingularValue:
    """σmax of a matrix with an interval: ``lower ≤ σmax ≤ upper``.

    ``method`` is ``"exact"`` (float64 eigen-solve of the smaller Gram: the interval is the
    value) or ``"lanczos"`` (the Ritz value of Lanczos on the smaller Gram is a lower bound;
    the upper end adds its residual, which bounds the distance to an eigenvalue: a residual
    bound, certain unless the random start missed the top direction, and the rounding of the
    matrix's dtype). ``steps``: matrix products taken (pairs, for Lanczos).
    """

    value: float
    lower: float
    upper: float
    method: str
    steps: int = 0

    @property
    def relative_width(self) -> float:
        """``(upper - lower) / value`` (0 for a zero matrix)."""
        return (self.upper - self.lower) / self.value if self.value > 0 else 0.0


#: a matrix whose smaller side is at most this is solved exactly (float64 Gram, eigvalsh)
EXACT_SIDE = 256


def _exact_singular_value(matrix: Tensor) -> float:
    """σmax through the smaller Gram in float64 (converted a block of rows at a time)."""
    rows, cols = matrix.shape
    wide = rows < cols  # the Gram of the rows (rows × rows) is the smaller one
    side = rows if wide else cols
    gram = torch.zeros(side, side, dtype=torch.float64, device=matrix.device)
    block = max(1, (1 << 24) // max(side, 1))
    source = matrix.T if wide else matrix  # rows of ``source`` are summed as outer products
    for start in range(0, source.shape[0], block):
        part = source[start : start + block].to(torch.float64)
        gram.addmm_(part.T, part)
    values = torch.linalg.eigvalsh((gram + gram.T) * 0.5)
    return float(values[-1].clamp_min(0.0).sqrt())


#: Lanczos steps before the exact float64 solve takes over. A step costs two products with the
#: matrix (``4·m·n`` flops); the exact solve a float64 Gram and ``eigvalsh`` (``m·n·side +
#: side³``): for a 4096 × 11008 weight ~2,000 steps' worth. Llama-7B's MLP weights at init
#: (a Marchenko-Pastur edge, no gap) need 66 steps for 1e-4: at 64 steps they fell to the exact
#: solve, 20 s each on one thread, against 2 s for 66 steps.
LANCZOS_STEPS = 256


def largest_singular_value(
    matrix: Tensor,
    *,
    rtol: float = 1e-4,
    max_steps: int = LANCZOS_STEPS,
    exact_side: int = EXACT_SIDE,
    threads: int | None = 1,
) -> SingularValue:
    """σmax of ``matrix`` (2-D; higher dimensions are read as ``rows × rest``) with a bound.

    Small matrices (smaller side ≤ ``exact_side``) are solved exactly in float64. Larger ones
    run Lanczos with full reorthogonalisation on the smaller Gram (``MᵀM`` or ``MMᵀ``, never
    formed: two matrix-vector products a step) in the matrix's own dtype (float32 for half
    precisions), on its own device, from a fixed seed (no global random state is touched),
    until the interval is within ``rtol`` of the value; a run that does not get there within
    ``max_steps`` is solved exactly. Everything runs on ``threads`` intra-op threads
    (:func:`limited_threads`). Non-finite entries give ``nan``.

    Example:
        >>> found = largest_singular_value(torch.diag(torch.tensor([3.0, -4.0])))
        >>> found.value, found.method
        (4.0, 'exact')
        >>> wide = torch.linspace(-1.0, 1.0, 600 * 400).reshape(600, 400)
        >>> found = largest_singular_value(wide)
        >>> found.method, found.lower <= float(torch.linalg.matrix_norm(wide.double(), 2)) <= found.upper
        ('lanczos', True)
    """
    matrix = matrix.detach()
    if matrix.dim() != 2:
        matrix = matrix.reshape(matrix.shape[0], -1) if matrix.dim() > 2 else matrix.reshape(1, -1)
    if matrix.numel() == 0:
        return SingularValue(0.0, 0.0, 0.0, "exact")
    with limited_threads(threads):
        if not bool(torch.isfinite(matrix).all()):
            nan = float("nan")
            return SingularValue(nan, nan, nan, "exact")
        if min(matrix.shape) <= exact_side:
            value = _exact_singular_value(matrix)
            return SingularValue(value, value, value, "exact")
        found = _lanczos_singular_value(matrix, rtol, max_steps)
        if found is None or found.relative_width > rtol:
            value = _exact_singular_value(matrix)
            return SingularValue(value, value, value, "exact")
        return found


def _lanczos_singular_value(matrix: Tensor, rtol: float, max_steps: int) -> SingularValue | None:
    work = matrix if matrix.dtype in (torch.float32, torch.float64) else matrix.float()
    rows, cols = work.shape
    tall = rows >= cols
    size = cols if tall else rows

    def gram_times(vector: Tensor) -> Tensor:
        return work.T @ (work @ vector) if tall else work @ (work.T @ vector)

    generator = torch.Generator(device=work.device).manual_seed(0)
    start = torch.randn(size, generator=generator, device=work.device, dtype=work.dtype)
    basis = [start / torch.linalg.vector_norm(start)]
    alphas: list[float] = []
    betas: list[float] = []
    roundoff = torch.finfo(work.dtype).eps * 8
    steps = min(max_steps, size)
    for step in range(steps):
        image = gram_times(basis[-1])
        alphas.append(float(basis[-1] @ image))
        stacked = torch.stack(basis)
        for _ in range(2):  # full reorthogonalisation, twice is enough
            image = image - stacked.T @ (stacked @ image)
        beta = float(torch.linalg.vector_norm(image))
        tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        values, vectors = torch.linalg.eigh(tridiagonal)
        ritz = max(float(values[-1]), 0.0)
        residual = beta * abs(float(vectors[-1, -1]))
        slack = roundoff * ritz
        if ritz == 0.0:
            return SingularValue(0.0, 0.0, 0.0, "lanczos", step + 1) if beta == 0.0 else None
        lower, upper = (max(ritz - slack, 0.0)) ** 0.5, (ritz + residual + slack) ** 0.5
        if (upper - lower) <= rtol * ritz**0.5 or beta <= roundoff * ritz:
            return SingularValue(ritz**0.5, lower, upper, "lanczos", step + 1)
        betas.append(beta)
        basis.append(image / beta)
    return None
