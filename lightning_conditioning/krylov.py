"""Approximate spectra of large symmetric PSD moments by Krylov methods, with error bars.

For moments too large for a dense ``eigvalsh`` (O(d³)), :class:`LanczosSolver` runs two Krylov
computations that share one product ``M @ V`` per step (a GEMM with a thin block ``V``), so the
matrix is read ``steps`` times in all (O(steps·d²)); both are matrix-free
(:meth:`LanczosSolver.solve_operator`, :func:`gram_operator`) and seeded by the solver's own
:class:`torch.Generator`, never the global one.

* **Block Lanczos for the top** (λmax and the ``top`` largest, block ``top + 4`` so repeated
  eigenvalues are found). A Ritz value ``θ_j`` of ``M`` on any subspace is a *certified*
  lower bound of the ``j``-th largest eigenvalue (Cauchy interlacing). The upper bound is
  ``θ_j + ‖R_j‖₂``, ``R_j = M Y_j − Y_j Θ_j`` the explicitly computed residual of the ``j``
  leading Ritz pairs: by Kahan's theorem ``j`` eigenvalues lie within ``‖R_j‖₂`` of
  ``θ_1..θ_j``; that they are the ``j`` *largest* holds unless the random start block missed an
  eigenvector (exponentially unlikely, Kuczyński-Woźniakowski). ``bounds="residual"``.
* **Stochastic Lanczos quadrature (SLQ) for any quantile.** With ``F(x) = #{λ ≤ x}/d``, the
  ``k``-th largest eigenvalue is where ``F`` passes ``(d − k)/d``. A Rademacher probe ``z`` has
  the spectral measure ``μ_z = Σ_i (u_iᵀz)²/d · δ_{λ_i}`` whose mean over probes is exactly
  ``F``; ``steps`` Lanczos steps from ``z`` (full reorthogonalisation) give its Gauss rule
  (nodes ``θ_j``, weights ``w_j``, ``W_j = w_1 + … + w_j``). Per probe, ``μ_z((−∞, x])`` is
  bracketed **deterministically** by the best of

  - the Chebyshev-Markov-Stieltjes inequalities (any measure with the rule's moments):
    ``W_{j−1} ≤ F_z(x) ≤ W_{j+1}`` for ``θ_j ≤ x < θ_{j+1}``;
  - Davis-Kahan and, as ``M`` is PSD, Markov bounds on how much of the Ritz vectors of the
    nodes ``≤ θ_j < x`` leaks above ``x``: ``F_z(x) ≥ (√W_j − min(ρ_j/(x − θ_j), √(θ_j/x)))²``
    (``ρ_j`` their residual norm), and the mirror image above ``x``. These are sharp where
    Ritz values converged: outliers, clusters and the atom of exact zeros.

  The bracket's ends are averaged over the probes and bootstrapped over them (seeded), at the
  percentile at which the bootstrap is as wide as a Student-t interval of the requested
  ``confidence`` (the plain percentile bootstrap under-covers with 8-32 probes). A quantile's
  ``(low, high)`` is where the monotone bands cross the integer count ``d − k``; clamped by
  the certified ``λ_k ≥ θ_k`` and ``λ_{d−j+1} ≤`` the ``j``-th smallest node of any probe.
  The estimate inside is where the probes' rule CDFs, interpolated through the middle of
  each jump, reach ``(d − k + ½)/d``. ``bounds`` of these intervals: ``"statistical"``.

**What an interval means.** ``low ≤ λ_k ≤ high`` fails with probability at most about
``1 − confidence``, and in practice much less: the deterministic bracket is conservative, so
only at an atom's edge (a rank boundary, a cluster) does the sampling error decide. Measured
(``python benchmarks/krylov.py``, 40 trials × 7 spectra at d = 1024): every κ_p held the dense
value in ≥ 39/40 trials; next to atoms 97-98% (one side at a time can fail there: 200 trials
at a cluster edge missed 2-3.5% per side, nominal 2.5%).

**Resolution.** SLQ resolves ``F`` to about one node's weight (``~1/steps``) and, at the bottom
of a spectrum, eigenvalues only down to about ``λmax/steps²`` (a polynomial of degree
``steps`` cannot separate smaller ones). A κ_p whose ``λ_p`` lies deeper gets ``(0, high]``:
``λmax/high`` is then a lower bound of κ_p, never a wrong value.

**Exact zeros.** Rows/columns with an exactly zero diagonal are skipped (structural zeros, as
:class:`~lightning_conditioning.solvers.DenseSolver` does) and reported as the last
eigenvalues. Rank deficiency puts an atom of mass ``(d − rank)/d`` at 0 into ``F``: Lanczos
converges a node to it (a Ritz value at rounding level) and the Markov bound certifies that
its weight lies under the resolution floor ``rtol·λmax``; the atom's probe-to-probe variation
(``≈ √(2f(1 − f)/d)`` for a mass ``f``) is what the bootstrap covers. ``quantile(k)`` is
``(0.0, 0.0, 0.0)`` when the upper end lies under the floor (an exact zero, or too small to
resolve, what a dense eigenvalue under the floor means in ``docs/numerics.md``); next to the
rank boundary, or when the nonzero spectrum reaches too close to 0 for the atom to converge,
it is ``(0, high]``.

**κ_100** (the smallest nonzero eigenvalue): :meth:`SpectralQuantiles.smallest_nonzero`. Its
``high`` is certified by the residual theorem (a Ritz pair with ``θ − ρ > floor`` proves an
eigenvalue in ``(floor, θ + ρ]``) and typically within 0.1-10% of the truth; ``low`` is 0
unless the whole spectrum is resolved (clusters), so ``λmax/high`` is a lower bound of κ_100.

Example:
    >>> matrix = torch.diag(torch.linspace(1.0, 2.0, 200, dtype=torch.float64))
    >>> solved = LanczosSolver(top=1, steps=20, probes=8)(matrix)
    >>> round(float(solved.eigenvalues[0]), 4), solved.bounds
    (2.0, 'residual')
    >>> bool(solved.lower[0] <= 2.0 <= solved.upper[0])
    True
    >>> estimate, low, high = solved.quantile(100)  # the 100th largest: 1.5025…
    >>> low <= 1.0 + 100 / 199 <= high
    True
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
from torch import Tensor

from lightning_conditioning.resolution import floor_rtol
from lightning_conditioning.solvers import SolvedSpectrum, limited_threads

__all__ = [
    "MatVec",
    "GaussQuadrature",
    "TopRitz",
    "SpectralQuantiles",
    "ZeroQuantiles",
    "LanczosSolver",
    "krylov_runs",
    "gram_operator",
    "student_t_quantile",
]

#: ``matvec(V) -> M @ V`` for a block ``V`` of shape ``(d, b)`` (float64)
MatVec = Callable[[Tensor], Tensor]

#: unit roundoff of float64
UNIT_ROUNDOFF = 2.0**-53


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _threaded(method: _Method) -> _Method:
    """Run a method of an object with a ``threads`` attribute under :func:`limited_threads`."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        with limited_threads(self.threads):
            return method(self, *args, **kwargs)

    return cast(_Method, wrapper)




# ----------------------------------------------------------------------------- statistics


def _student_t_cdf(t: float, dof: int) -> float:
    """``P(T ≤ t)`` of Student's t with an integer ``dof`` (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(abs(t) / math.sqrt(dof))
    cos2, term, total = math.cos(theta) ** 2, 1.0, 0.0
    if dof % 2:  # odd: (2/π)(θ + sin θ cos θ (1 + 2/3 cos² θ + …))
        if dof > 1:
            total = term = 1.0
            for j in range(3, dof, 2):
                term *= cos2 * (j - 1) / j
                total += term
            total *= math.sin(theta) * math.cos(theta)
        central = 2.0 / math.pi * (theta + total)
    else:  # even: sin θ (1 + 1/2 cos² θ + 1·3/(2·4) cos⁴ θ + …)
        total = term = 1.0
        for j in range(2, dof, 2):
            term *= cos2 * (j - 1) / j
            total += term
        central = math.sin(theta) * total
    return 0.5 + math.copysign(central / 2.0, t)


def student_t_quantile(probability: float, dof: int) -> float:
    """The ``probability`` quantile of Student's t distribution with ``dof`` degrees of freedom.

    Example:
        >>> round(student_t_quantile(0.975, 1), 4), round(student_t_quantile(0.975, 10), 4)
        (12.7062, 2.2281)
    """
    if not 0.0 < probability < 1.0 or dof < 1:
        raise ValueError(f"need probability in (0, 1) and dof >= 1, got {probability}, {dof}")
    low, high = -1e8, 1e8
    for _ in range(200):
        middle = 0.5 * (low + high)
        if _student_t_cdf(middle, dof) < probability:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def _calibrated_tail(confidence: float, samples: int) -> float:
    """The one-sided tail level at which a percentile bootstrap of a mean over ``samples``
    draws is as wide as the two-sided Student-t interval of ``confidence``."""
    t = student_t_quantile(0.5 + confidence / 2.0, samples - 1)
    z = t * math.sqrt(samples / (samples - 1))  # bootstrap sd is √((n−1)/n) of s/√n
    return 0.5 * math.erfc(z / math.sqrt(2.0))


# ----------------------------------------------------------------------------- Lanczos runs


@dataclass(frozen=True)
class GaussQuadrature:
    """Per-probe Gauss quadrature of the spectral measure of a symmetric matrix.

    Attributes:
        nodes: ``(probes, m)`` Ritz values, ascending per probe; ``+inf`` pads a probe whose
            Krylov space became invariant before ``m`` steps (its rule is then exact).
        weights: ``(probes, m)`` quadrature weights, each row sums to 1 (0 on padding).
        residual: ``(probes,)`` ``β_m``, the norm of the last Lanczos vector's residual (0 for
            an invariant Krylov space): Ritz pair ``j`` has residual ``β_m·|s_{m,j}|``.
        last: ``(probes, m)`` ``s_{m,j}``, the last components of the eigenvectors of ``T``.

    Example:
        >>> matrix = torch.diag(torch.tensor([1.0, 2.0, 2.0, 3.0], dtype=torch.float64))
        >>> rule = krylov_runs(matrix.matmul, torch.ones(4, 1, dtype=torch.float64), 4)[0]
        >>> [round(x, 9) for x in rule.nodes[0].tolist()]  # invariant after 3 steps
        [1.0, 2.0, 3.0, inf]
        >>> [round(w, 9) for w in rule.weights[0].tolist()], float(rule.residual[0]) < 1e-12
        ([0.25, 0.5, 0.25, 0.0], True)
    """

    nodes: Tensor
    weights: Tensor
    residual: Tensor
    last: Tensor

    @property
    def probes(self) -> int:
        """Number of probes."""
        return int(self.nodes.shape[0])


@dataclass(frozen=True)
class TopRitz:
    """The Ritz values of a block Krylov space, with bounds for the leading ones.

    Attributes:
        values: all Ritz values, descending (``values[j] ≤ λ_{j+1}``, up to rounding).
        lower: ``(top,)`` certified lower bounds of ``λ_1..λ_top`` (``values`` less rounding).
        upper: ``(top,)`` residual upper bounds ``values[j] + ‖R_{1..j+1}‖₂`` (plus rounding).

    Example:
        >>> matrix = torch.diag(torch.tensor([3.0, 3.0, 1.0, 0.5], dtype=torch.float64))
        >>> start = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator())
        >>> ritz = krylov_runs(matrix.matmul, torch.ones(4, 2, dtype=torch.float64), 2,
        ...                    start, 2, top=2)[1]
        >>> [round(v, 9) for v in ritz.values.tolist()]  # the repeated 3 is found twice
        [3.0, 3.0, 1.0, 0.5]
    """

    values: Tensor
    lower: Tensor
    upper: Tensor


class _ProbeLanczos:
    """Lanczos from each column of a block of probes, advanced together, with full
    reorthogonalisation (the three-term step, then classical Gram-Schmidt against the whole
    basis, repeated once when it cancelled much: Daniel-Gragg-Kaufman-Stewart)."""

    def __init__(self, start: Tensor, steps: int) -> None:
        dim, probes = start.shape
        self.steps = steps
        self.basis = start.new_empty(probes, steps + 1, dim)  # row j written before read
        self.basis[:, 0] = (start / start.norm(dim=0)).T
        self.alpha = start.new_zeros(probes, steps)
        self.beta = start.new_zeros(probes, steps)
        self.length = torch.full((probes,), steps, dtype=torch.long)
        self.active = torch.ones(probes, dtype=torch.bool, device=start.device)
        self.scale = start.new_zeros(probes)
        self.dim = dim
        self.j = 0

    @property
    def done(self) -> bool:
        return self.j >= self.steps or not bool(self.active.any())

    def current(self) -> Tensor:
        return self.basis[:, self.j].T

    def step(self, image: Tensor) -> None:
        j, basis = self.j, self.basis
        w = image.T.contiguous()
        q = basis[:, j]
        alpha = (w * q).sum(1)
        w = w - alpha[:, None] * q
        if j:
            w = w - self.beta[:, j - 1, None] * basis[:, j - 1]
        previous = basis[:, : j + 1]
        before = w.norm(dim=1)
        for _ in range(2):
            coefficients = torch.bmm(previous, w.unsqueeze(2))
            w = w - torch.bmm(previous.transpose(1, 2), coefficients).squeeze(2)
            alpha = alpha + coefficients[:, j, 0]
            norm = w.norm(dim=1)
            if not bool((norm < 0.7 * before).any()):
                break
            before = norm
        self.alpha[:, j] = alpha
        self.beta[:, j] = torch.where(self.active, norm, torch.zeros_like(norm))  # kept as
        # the residual of a run that ends here (its Krylov space is invariant to rounding)
        self.scale = torch.maximum(self.scale, alpha.abs() + norm)
        ended = self.active & (norm <= 1e3 * self.dim * UNIT_ROUNDOFF * self.scale)
        if bool(ended.any()):
            self.length[ended.cpu()] = j + 1
            self.active = self.active & ~ended
        safe = torch.where(self.active, norm, torch.ones_like(norm))
        basis[:, j + 1] = torch.where(self.active[:, None], w / safe[:, None], 0.0)
        self.j += 1

    def quadrature(self) -> GaussQuadrature:
        """Nodes, weights and residual data of each probe's tridiagonal ``T``."""
        alpha, beta, length = self.alpha.cpu(), self.beta.cpu(), self.length
        probes, steps = alpha.shape
        nodes = torch.full((probes, steps), math.inf, dtype=torch.float64)
        weights = torch.zeros(probes, steps, dtype=torch.float64)
        last = torch.zeros(probes, steps, dtype=torch.float64)
        residual = torch.zeros(probes, dtype=torch.float64)
        for n in torch.unique(length).tolist():
            rows = (length == n).nonzero().squeeze(1)
            t = torch.diag_embed(alpha[rows, :n])
            if n > 1:
                off = beta[rows, : n - 1]
                t = t + torch.diag_embed(off, 1) + torch.diag_embed(off, -1)
            theta, vectors = torch.linalg.eigh(t)
            nodes[rows, :n] = theta
            weights[rows, :n] = vectors[:, 0, :] ** 2
            last[rows, :n] = vectors[:, -1, :]
            residual[rows] = beta[rows, n - 1]
        return GaussQuadrature(nodes, weights, residual, last)


class _BlockLanczos:
    """Block Krylov basis ``[S, MS, M²S, …]`` orthonormalised with full reorthogonalisation
    (twice), deflating directions that vanish; it keeps ``M U`` and ``Uᵀ M U`` for
    Rayleigh-Ritz and stops early once the ``top`` leading Ritz values are resolved to
    ``tolerance`` (relative), checked after ``check``, ``2·check``, ``4·check``… steps."""

    def __init__(self, start: Tensor, steps: int, top: int, tolerance: float = 1e-6,
                 check: int = 8, slack: float = 0.0) -> None:
        dim, width = start.shape
        self.dim, self.steps, self.top = dim, steps, top
        self.tolerance, self.check, self.slack = tolerance, check, slack
        capacity = min(steps * width, dim)
        self.rows = start.new_empty(capacity, dim)  # the basis, one vector per row
        self.images = start.new_empty(capacity, dim)  # M times each
        self.projected = start.new_empty(capacity, capacity)  # Uᵀ M U (filled as it grows)
        self.size = 0
        self.taken = 0
        self.block = torch.linalg.qr(start)[0].T.contiguous()  # (b, d)
        self.scale = 0.0
        self.converged = False
        self.next_check = check

    @property
    def done(self) -> bool:
        return (self.taken >= self.steps or self.block.shape[0] == 0 or self.converged
                or self.size >= self.rows.shape[0])

    def current(self) -> Tensor:
        return self.block.T

    def step(self, image: Tensor) -> None:
        start = self.size
        width = min(self.block.shape[0], self.rows.shape[0] - start)
        self.rows[start:start + width] = self.block[:width]
        self.images[start:start + width] = image.T[:width]
        self.size = end = start + width
        self.taken += 1
        self.scale = max(self.scale, float(image.norm()))
        basis = self.rows[:end]
        w = self.images[start:end]
        coefficients = w @ basis.T  # (width, end): new rows of Uᵀ M U
        self.projected[start:end, :end] = coefficients
        self.projected[:end, start:end] = coefficients.T
        if self.done:
            return
        if self.taken >= self.next_check and end >= self.top:
            self.next_check *= 2
            ritz = self.ritz(self.top)
            spread = (ritz.upper - ritz.lower) / ritz.lower.abs().clamp(min=1e-300)
            if bool((spread <= self.tolerance).all()):
                self.converged = True
                return
        w = w - coefficients @ basis
        w = w - (w @ basis.T) @ basis
        q, r = torch.linalg.qr(w.T)
        keep = r.diagonal().abs() > 1e3 * self.dim * UNIT_ROUNDOFF * self.scale
        self.block = q[:, keep].T.contiguous()

    def ritz(self, top: int) -> TopRitz:
        """Rayleigh-Ritz on the basis; residual bounds of the ``top`` leading Ritz values."""
        size = self.size
        basis, images = self.rows[:size], self.images[:size]
        projected = self.projected[:size, :size]
        theta, vectors = torch.linalg.eigh((projected + projected.T) / 2)
        theta, vectors = theta.flip(0), vectors.flip(1)
        top = min(top, int(theta.numel()))
        ritz = vectors[:, :top]
        residual = ritz.T @ images - (ritz * theta[:top]).T @ basis  # (top, d)
        norms = torch.stack([torch.linalg.matrix_norm(residual[: j + 1], ord=2)
                             for j in range(top)])
        rounding = self.dim * UNIT_ROUNDOFF * max(float(theta[0].abs()), self.scale) + self.slack
        values = theta.cpu()
        return TopRitz(values, values[:top] - rounding, values[:top] + norms.cpu() + rounding)


def krylov_runs(
    matvec: MatVec,
    probes: Tensor,
    steps: int,
    block_start: Tensor | None = None,
    block_steps: int = 0,
    top: int = 1,
    slack: float = 0.0,
) -> tuple[GaussQuadrature, TopRitz | None]:
    """Lanczos from every probe (``steps`` steps) and, optionally, block Lanczos from
    ``block_start`` (``block_steps`` steps), sharing one ``matvec`` per step.

    Args:
        matvec: ``V -> M @ V`` for ``V`` of shape ``(d, b)``; ``M`` symmetric.
        probes: ``(d, P)`` start vectors of the per-probe runs (normalised here).
        steps: Lanczos steps per probe (at most ``d``; fewer where a Krylov space is invariant).
        block_start: ``(d, b)`` start block of the block run (None: no block run).
        block_steps: its steps.
        top: the block run stops early once its ``top`` leading Ritz values are resolved to
            1e-6 (relative); ``max(top, b)`` of them get residual bounds.
        slack: added to both ends of those bounds (a bound on ``‖M_applied − M‖₂``).

    Example:
        >>> matrix = torch.diag(torch.tensor([5.0, 4.0, 1.0, 0.5, 0.0], dtype=torch.float64))
        >>> start = torch.eye(5, 2, dtype=torch.float64) + 0.1
        >>> rule, ritz = krylov_runs(lambda v: matrix @ v, torch.ones(5, 2, dtype=torch.float64),
        ...                          3, start, 3, top=2)
        >>> rule.nodes.shape, [round(v, 9) for v in ritz.values[:2].tolist()]
        (torch.Size([2, 3]), [5.0, 4.0])
    """
    dim = probes.shape[0]
    runs = _ProbeLanczos(probes, min(steps, dim))
    block = (_BlockLanczos(block_start, block_steps, top, slack=slack)
             if block_start is not None else None)
    while not runs.done or (block is not None and not block.done):
        parts = []
        if not runs.done:
            parts.append(runs.current())
        if block is not None and not block.done:
            parts.append(block.current())
        images = matvec(torch.cat(parts, dim=1) if len(parts) > 1 else parts[0].contiguous())
        if not runs.done:
            width = runs.current().shape[1]
            runs.step(images[:, :width])
            images = images[:, width:]
        if block is not None and not block.done and images.shape[1]:
            block.step(images)
    ritz = None
    if block is not None and block.size:
        ritz = block.ritz(max(top, block_start.shape[1] if block_start is not None else 0))
    return runs.quadrature(), ritz


# ----------------------------------------------------------------------------- SLQ quantiles


class SpectralQuantiles:
    """``quantile(k) -> (estimate, low, high)`` of the ``k``-th largest eigenvalue (1-based,
    of all ``d`` eigenvalues, structural zeros included) from stochastic Lanczos quadrature
    (module docstring), plus :meth:`rank`, :meth:`smallest_nonzero` and :meth:`cdf_bounds`.

    Args:
        rule: the probes' Gauss quadratures (:func:`krylov_runs`).
        dim: the size of the solved matrix (structural zeros excluded).
        structural_zeros: exact zeros removed before the solve (the ``d − dim`` last ones).
        floor: the absolute resolution floor: upper ends under it are reported as 0.
        top: the block run's leading Ritz values (they answer ``k ≤ len(top.upper)``).
        confidence: two-sided confidence of every interval.
        resamples: bootstrap resamples over the probes.
        generator: the bootstrap's random source.
        grid_points: log- and linearly spaced candidate points (besides the nodes).
        slack: a bound on ``‖M_applied − M‖₂``, added to the rounding allowance.
        threads: intra-op threads for the queries (:class:`LanczosSolver`'s ``threads``).

    Example:
        >>> matrix = torch.diag(torch.linspace(1.0, 2.0, 64, dtype=torch.float64))
        >>> quantiles = LanczosSolver(steps=20, probes=8)(matrix).quantile
        >>> estimate, low, high = quantiles(32)  # the 32nd largest of 64 is 1 + 32/63
        >>> low <= 1.0 + 32 / 63 <= high <= 1.2 * low
        True
    """

    def __init__(
        self,
        rule: GaussQuadrature,
        dim: int,
        *,
        structural_zeros: int = 0,
        floor: float = 0.0,
        top: TopRitz | None = None,
        confidence: float = 0.95,
        resamples: int = 2000,
        generator: torch.Generator | None = None,
        grid_points: int = 512,
        slack: float = 0.0,
        threads: int | None = None,
    ) -> None:
        nodes, weights = rule.nodes, rule.weights
        probes, steps = nodes.shape
        if dim < 1 or structural_zeros < 0 or probes < 2 or not 0.0 < confidence < 1.0:
            raise ValueError(f"need dim >= 1, structural_zeros >= 0, >= 2 probes and confidence"
                             f" in (0, 1), got {dim}, {structural_zeros}, {probes}, {confidence}")
        self.dim = dim
        self.structural_zeros = structural_zeros
        self.threads = threads
        self.floor = floor
        self.top = top
        self.confidence = confidence
        finite = torch.isfinite(nodes)
        valid = nodes[finite]
        # an upper bound of λmax (residual type): the block run's, else the probes' top nodes'
        tops = torch.where(finite, nodes, torch.full_like(nodes, -math.inf)).amax(1)
        ceiling = float((tops + rule.residual * rule.last[:, -1].abs()).max()) if probes else 0.0
        ceiling = max(ceiling, float(valid.max()) if valid.numel() else 0.0)
        if top is not None and top.upper.numel():
            ceiling = max(ceiling, float(top.upper[0]))
        self.ceiling = ceiling
        self.rounding = dim * UNIT_ROUNDOFF * max(ceiling, 0.0) + slack
        # per-probe data of the envelopes
        self._nodes = nodes.contiguous()
        self._finite = finite
        self._safe_nodes = torch.where(finite, nodes, torch.zeros_like(nodes))
        cumulative = torch.cat([weights.new_zeros(probes, 1), weights.cumsum(1)], 1)
        self._cumulative = cumulative.clamp(max=1.0)
        squares = torch.where(finite, rule.last**2, torch.zeros_like(nodes))
        self._prefix = rule.residual[:, None] * squares.cumsum(1).sqrt() + self.rounding
        self._suffix = (rule.residual[:, None] * squares.flip(1).cumsum(1).flip(1).sqrt()
                        + self.rounding)
        self._root_below = self._cumulative[:, 1:].sqrt()
        self._middle = self._cumulative[:, 1:] - 0.5 * weights
        self._markov_below = (self._safe_nodes + self.rounding).clamp(min=0)
        self._markov_above = (ceiling - self._safe_nodes + self.rounding).clamp(min=0)
        self._root_above = (1.0 - self._cumulative[:, :-1]).clamp(min=0).sqrt()
        # the candidate points: every node, 0, the floor, log- and linearly spaced points
        positive = max(ceiling, 1e-300)
        bottom = min(max(floor, positive * 1e-16), positive)
        # and points at 10 to 10⁶ residuals beside each node, where the residual bounds
        # of converged nodes (atoms, outliers) bite
        # (only closer than half the distance to a neighbouring node: elsewhere the
        # Chebyshev-Markov-Stieltjes bounds are the better ones)
        spacing = torch.full_like(nodes, math.inf)
        if steps > 1:
            gaps = (nodes[:, 1:] - nodes[:, :-1]).nan_to_num(nan=math.inf)
            spacing[:, 1:] = gaps
            spacing[:, :-1] = torch.minimum(spacing[:, :-1], gaps)
        beside = [valid.new_zeros(0)]
        for factor in (1e1, 1e2, 1e3, 1e4, 1e6):
            for offset in (-factor * self._suffix, factor * self._prefix):
                beside.append((nodes + offset)[finite & (offset.abs() < 0.5 * spacing)])
        self.grid = torch.unique(torch.cat([
            valid.clamp(min=0.0),
            torch.cat(beside).clamp(min=0.0, max=positive),
            torch.tensor([0.0, floor, ceiling], dtype=torch.float64),
            torch.logspace(math.log10(bottom), math.log10(positive), grid_points,
                           dtype=torch.float64),
            torch.linspace(0.0, positive, grid_points, dtype=torch.float64),
        ]))
        picks = torch.randint(probes, (resamples, probes), generator=generator)
        counts = torch.zeros(resamples, probes, dtype=torch.float64)
        counts.scatter_add_(1, picks, torch.ones(resamples, probes, dtype=torch.float64))
        self._counts = counts / probes
        tail = _calibrated_tail(confidence, probes)
        self._rank_low = max(int(math.floor(tail * (resamples - 1))), 0)
        self._rank_high = min(int(math.ceil((1.0 - tail) * (resamples - 1))), resamples - 1)
        self._cache: dict[int, tuple[float, float, float]] = {}
        self._smooth: Tensor | None = None
        # certified Ritz bounds: λ_k ≥ k-th largest node; λ_{d−j+1} ≤ j-th smallest node
        descending = torch.where(finite, nodes, torch.full_like(nodes, -math.inf))
        self._largest = descending.sort(dim=1, descending=True).values.amax(0)
        self._smallest = nodes.amin(0)
        # residual theorem: an eigenvalue lies within ρ_j of each Ritz value θ_j
        single = rule.residual[:, None] * rule.last.abs() + self.rounding
        proven = finite & (nodes - single > floor)
        self._residual_high = float(torch.where(proven, nodes + single,
                                                torch.full_like(nodes, math.inf)).min())

    # ------------------------------------------------------------------ the CDF
    def probe_bounds(self, x: float) -> tuple[Tensor, Tensor, Tensor]:
        """Per probe: a lower and an upper bound of the probe's spectral CDF ``μ_z((−∞, x])``
        (deterministic, module docstring) and its Gauss rule's CDF; each of shape ``(P,)``.

        Example:
            >>> matrix = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
            >>> rule = krylov_runs(matrix.matmul, torch.ones(4, 2, dtype=torch.float64), 4)[0]
            >>> lower, upper, gauss = SpectralQuantiles(rule, 4).probe_bounds(2.5)
            >>> [round(v, 6) for v in (lower[0].item(), gauss[0].item(), upper[0].item())]
            [0.5, 0.5, 0.5]
        """
        lower, upper, rule = self._probe_bounds_at(torch.tensor([x], dtype=torch.float64))
        return lower[:, 0], upper[:, 0], rule[:, 0]

    def _probe_bounds_at(self, points: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`probe_bounds` at several points at once: shapes ``(P, len(points))``."""
        nodes, finite = self._nodes, self._finite[:, :, None]
        probes, steps = nodes.shape
        at = points.reshape(1, -1).expand(probes, -1).contiguous()
        below = torch.searchsorted(nodes, at, right=True)  # nodes ≤ x, per probe and point
        rule = self._cumulative.gather(1, below)
        lower = self._cumulative.gather(1, (below - 1).clamp(min=0))
        upper = self._cumulative.gather(1, (below + 1).clamp(max=steps))
        x = points[None, None, :]
        gap = x - self._safe_nodes[:, :, None]  # (P, m, points)
        # below: the span of the Ritz vectors of the nodes ≤ θ_j < x leaks at most
        # min(‖R‖/(x − θ_j), √(θ_j/x)) of its norm above x (Davis-Kahan; Markov, M is PSD)
        leak = self._prefix[:, :, None] / gap.clamp(min=1e-300)
        markov = (self._markov_below[:, :, None] / x.clamp(min=1e-300)).sqrt()
        leak = torch.where(x > 0, torch.minimum(leak, markov), leak)
        bound = (self._root_below[:, :, None] - leak).clamp(min=0) ** 2
        bound = torch.where(finite & (gap > 0), bound, torch.zeros_like(bound)).amax(1)
        lower = torch.maximum(lower, bound)
        # above: the nodes ≥ θ_j > x leak at most min(‖R‖/(θ_j − x), √((λ⁺ − θ_j)/(λ⁺ − x)))
        leak = self._suffix[:, :, None] / (-gap).clamp(min=1e-300)
        room = (self.ceiling - x).clamp(min=1e-300)
        markov = (self._markov_above[:, :, None] / room).sqrt()
        leak = torch.where(x < self.ceiling, torch.minimum(leak, markov), leak)
        bound = (self._root_above[:, :, None] - leak).clamp(min=0) ** 2
        bound = torch.where(finite & (gap < 0), bound, torch.zeros_like(bound)).amax(1)
        upper = torch.minimum(upper, 1.0 - bound)
        return lower, upper, rule

    def _bands(self, index: int) -> tuple[float, float, float]:
        """(lower band, upper band, mean Gauss-rule CDF) at ``grid[index]``."""
        cached = self._cache.get(index)
        if cached is None:
            lower, upper, rule = self.probe_bounds(float(self.grid[index]))
            low_band = float((self._counts @ lower).kthvalue(self._rank_low + 1).values)
            high_band = float((self._counts @ upper).kthvalue(self._rank_high + 1).values)
            cached = self._cache[index] = (low_band, high_band, float(rule.mean()))
        return cached

    def _first(self, which: int, target: float) -> int:
        """The first grid index whose band ``which`` (0 low, 1 high, 2 rule) is ≥ target
        (``len(grid)`` if none); the bands are nondecreasing."""
        lo, hi = 0, int(self.grid.numel())
        while lo < hi:
            middle = (lo + hi) // 2
            if self._bands(middle)[which] >= target:
                hi = middle
            else:
                lo = middle + 1
        return lo

    @_threaded
    def cdf_bounds(self, x: float) -> tuple[float, float, float]:
        """``(estimate, low, high)`` of ``F(x)``, the fraction of the solved matrix's
        eigenvalues ``≤ x``, at the grid point at or below ``x``.

        Example:
            >>> matrix = torch.diag(torch.linspace(1.0, 2.0, 64, dtype=torch.float64))
            >>> estimate, low, high = LanczosSolver(steps=10)(matrix).quantile.cdf_bounds(1.5)
            >>> low <= 0.5 <= high
            True
        """
        index = int(torch.searchsorted(self.grid, torch.tensor(x, dtype=torch.float64),
                                       right=True)) - 1
        if index < 0:
            return 0.0, 0.0, self._bands(0)[1]
        low, high, rule = self._bands(index)
        return min(max(rule, low), high), low, high

    # ------------------------------------------------------------------ queries
    @_threaded
    def __call__(self, k: int) -> tuple[float, float, float]:
        size = self.dim + self.structural_zeros
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= size:
            raise ValueError(f"k must be an integer in [1, {size}], got {k!r}")
        if k > self.dim:
            return 0.0, 0.0, 0.0
        top = self.top
        if top is not None and k <= top.upper.numel():  # the block run's residual bounds
            low = max(float(top.lower[k - 1]), self._certified_low(k), 0.0)
            high = max(min(float(top.upper[k - 1]), self._certified_high(k)), low)
            if high <= self.floor:
                return 0.0, 0.0, 0.0
            return min(max(float(top.values[k - 1]), low), high), low, high
        n, grid = self.dim, self.grid
        # counts are integers: F(x) > (n − k)/n means at least n − k + 1 eigenvalues ≤ x
        # (λ_k ≤ x); F(x) < (n − k + 1)/n means at most n − k (λ_k > x)
        index = self._first(0, (n - k + 1e-6) / n)
        high = float(grid[index]) if index < grid.numel() else self.ceiling
        index = self._first(1, (n - k + 1 - 1e-6) / n)
        low = float(grid[index - 1]) if index > 0 else 0.0
        low = max(low, self._certified_low(k), 0.0)
        high = max(min(high, self._certified_high(k), self.ceiling), low)
        if high <= self.floor:
            return 0.0, 0.0, 0.0
        if low <= self.floor:
            low = 0.0
        estimate = min(max(self._smooth_quantile((n - k + 0.5) / n), low), high)
        return (estimate if estimate > self.floor else 0.0), low, high

    @_threaded
    def envelopes(self) -> tuple[Tensor, Tensor, Tensor]:
        """``quantile(k)`` for every ``k`` at once: ``(estimates, lows, highs)``, each of all
        ``d`` eigenvalues (structural zeros included), descending, float64. For the
        Kronecker sub-FIM: the ``k``-th largest product of two factors lies between the
        ``k``-th largest products of their ``lows`` and of their ``highs``. Each interval
        holds at the stated confidence on its own (the bands are pointwise, not simultaneous).

        Example:
            >>> matrix = torch.diag(torch.linspace(1.0, 2.0, 64, dtype=torch.float64))
            >>> quantiles = LanczosSolver(steps=20, probes=4, resamples=200)(matrix).quantile
            >>> estimates, lows, highs = quantiles.envelopes()
            >>> (lows[31].item(), highs[31].item()) == quantiles(32)[1:]
            True
        """
        n, grid = self.dim, self.grid
        count = int(grid.numel())
        low_band, high_band = torch.empty(count, dtype=torch.float64), torch.empty(
            count, dtype=torch.float64)
        for start in range(0, count, 256):
            lower, upper, _ = self._probe_bounds_at(grid[start:start + 256])
            low_band[start:start + 256] = (self._counts @ lower).kthvalue(
                self._rank_low + 1, dim=0).values
            high_band[start:start + 256] = (self._counts @ upper).kthvalue(
                self._rank_high + 1, dim=0).values
        ks = torch.arange(1, n + 1, dtype=torch.float64)
        index = torch.searchsorted(low_band, (n - ks + 1e-6) / n)
        highs = torch.where(index < count, grid[index.clamp(max=count - 1)],
                            torch.tensor(self.ceiling, dtype=torch.float64))
        index = torch.searchsorted(high_band, (n - ks + 1 - 1e-6) / n)
        lows = torch.where(index > 0, grid[(index - 1).clamp(min=0)], torch.zeros_like(ks))
        certified = torch.full((n,), -math.inf, dtype=torch.float64)
        largest = min(n, int(self._largest.numel()))
        certified[:largest] = self._largest[:largest] - self.rounding
        lows = torch.maximum(lows, certified).clamp(min=0.0)
        certified = torch.full((n,), math.inf, dtype=torch.float64)
        smallest = min(n, int(self._smallest.numel()))  # λ_{n−j+1} ≤ j-th smallest node
        certified[n - smallest:] = (self._smallest[:smallest] + self.rounding).flip(0)
        highs = torch.maximum(torch.minimum(highs, certified).clamp(max=self.ceiling), lows)
        estimates = self._smooth_quantiles((n - ks + 0.5) / n)
        top = self.top
        if top is not None and top.upper.numel():
            listed = min(n, int(top.upper.numel()))
            lows[:listed] = torch.maximum(top.lower[:listed].clamp(min=0.0), lows[:listed])
            highs[:listed] = torch.maximum(
                torch.minimum(top.upper[:listed], certified[:listed]), lows[:listed])
            estimates[:listed] = top.values[:listed]
        lows = torch.where(lows <= self.floor, torch.zeros_like(lows), lows)
        estimates = torch.minimum(torch.maximum(estimates, lows), highs)
        estimates = torch.where(estimates <= self.floor, torch.zeros_like(estimates), estimates)
        zero = highs <= self.floor
        lows, highs = torch.where(zero, 0.0, lows), torch.where(zero, 0.0, highs)
        estimates = torch.where(zero, 0.0, estimates)
        pad = torch.zeros(self.structural_zeros, dtype=torch.float64)
        return (torch.cat([estimates, pad]), torch.cat([lows, pad]), torch.cat([highs, pad]))

    def smooth_cdf(self, x: Tensor) -> Tensor:
        """The point estimate of ``F`` at the points ``x``: per probe, the Gauss rule's CDF
        interpolated linearly between its nodes through the middle of each jump
        (``W_j − w_j/2`` at ``θ_j``), averaged over probes. On continuous spectra its quantiles
        are 3-5× closer to the dense ones than the step CDF's; atoms are restored by clamping
        the estimate into ``(low, high)``.

        Example:
            >>> matrix = torch.diag(torch.linspace(1.0, 2.0, 64, dtype=torch.float64))
            >>> quantiles = LanczosSolver(steps=20)(matrix).quantile
            >>> [round(v, 1) for v in quantiles.smooth_cdf(torch.tensor([0.5, 1.5, 2.5])).tolist()]
            [0.0, 0.5, 1.0]
        """
        nodes = self._nodes
        probes, steps = nodes.shape
        at = x.to(torch.float64).reshape(1, -1).expand(probes, -1).contiguous()
        above = torch.searchsorted(nodes, at)  # nodes < x, per probe and point
        right = above.clamp(max=steps - 1)
        left = (above - 1).clamp(min=0)
        x0, x1 = self._safe_nodes.gather(1, left), nodes.gather(1, right)
        y0, y1 = self._middle.gather(1, left), self._middle.gather(1, right)
        inside = (above > 0) & (above < steps) & torch.isfinite(x1)
        share = ((at - x0) / (x1 - x0).clamp(min=1e-300)).clamp(0.0, 1.0)
        value = torch.where(inside, y0 + (y1 - y0) * share,
                            (above > 0).to(torch.float64))
        return value.mean(0)

    def _smooth_quantile(self, target: float) -> float:
        """Where :meth:`smooth_cdf` reaches ``target`` (linear between grid points)."""
        return float(self._smooth_quantiles(torch.tensor([target], dtype=torch.float64))[0])

    def _smooth_quantiles(self, targets: Tensor) -> Tensor:
        if self._smooth is None:
            self._smooth = self.smooth_cdf(self.grid)
        grid, smooth, count = self.grid, self._smooth, int(self.grid.numel())
        index = torch.searchsorted(smooth, targets)
        right = index.clamp(max=count - 1)
        left = (index - 1).clamp(min=0)
        x0, x1, y0, y1 = grid[left], grid[right], smooth[left], smooth[right]
        share = ((targets - y0) / (y1 - y0).clamp(min=1e-300)).clamp(0.0, 1.0)
        value = torch.where(y1 > y0, x0 + (x1 - x0) * share, x1)
        value = torch.where(index == 0, grid[0], value)
        return torch.where(index >= count, torch.tensor(self.ceiling, dtype=torch.float64), value)

    def _certified_low(self, k: int) -> float:
        value = -math.inf
        if k <= self._largest.numel():
            value = float(self._largest[k - 1]) - self.rounding
        return value

    def _certified_high(self, k: int) -> float:
        j = self.dim - k + 1
        if j <= self._smallest.numel():
            return float(self._smallest[j - 1]) + self.rounding
        return math.inf

    @_threaded
    def rank(self) -> tuple[int, int, int]:
        """``(estimate, low, high)`` of the number of eigenvalues above the floor (structural
        zeros excluded, they never count).

        Example:
            >>> rows = torch.randn(30, 120, dtype=torch.float64,
            ...                    generator=torch.Generator().manual_seed(0))
            >>> estimate, low, high = LanczosSolver(steps=20)(rows.T @ rows).quantile.rank()
            >>> low <= 30 <= high
            True
        """
        estimate, low, high = self.cdf_bounds(self.floor)
        n = self.dim
        rank_low = max(math.ceil(n * (1.0 - high) - 1e-9), 0)
        rank_high = min(math.floor(n * (1.0 - low) + 1e-9), n)
        middle = round(n * (1.0 - estimate))
        return min(max(middle, rank_low), rank_high), rank_low, rank_high

    @_threaded
    def smallest_nonzero(self) -> tuple[float, float, float]:
        """``(estimate, low, high)`` of the smallest eigenvalue above the floor (κ_100's).

        ``high`` is the smaller of a certified bound (a Ritz pair ``(θ, ρ)`` with
        ``θ − ρ > floor`` proves an eigenvalue in ``(floor, θ + ρ]``: the residual theorem)
        and the SLQ upper end of the ``r``-th largest eigenvalue, ``r`` the rank's lower
        confidence bound. ``low`` is the SLQ lower end at the rank's upper bound, or 0 when
        that is under the floor (usual: then ``λmax/high`` is a lower bound of κ_100).

        Example:
            >>> matrix = torch.diag(torch.linspace(1.0, 2.0, 64, dtype=torch.float64))
            >>> solver = LanczosSolver(steps=20, probes=4, resamples=200)
            >>> estimate, low, high = solver(matrix).quantile.smallest_nonzero()
            >>> low <= 1.0 <= high < 1.01
            True
        """
        middle, rank_low, rank_high = self.rank()
        if rank_high == 0:
            return 0.0, 0.0, 0.0
        high = min(self._residual_high, self.ceiling)
        if rank_low >= 1:
            high = min(high, self(rank_low)[2])
        low = self(rank_high)[1]
        high = max(high, low)
        estimate = min(max(self(max(middle, 1))[0], low), high)
        return (estimate if estimate > self.floor else high), low, high


class ZeroQuantiles:
    """The quantiles of a matrix whose eigenvalues are all structural zeros (every diagonal
    entry zero): the interface of :class:`SpectralQuantiles`, every answer exact.

    Example:
        >>> ZeroQuantiles(3)(2), ZeroQuantiles(3).rank(), ZeroQuantiles(3).envelopes()[2].tolist()
        ((0.0, 0.0, 0.0), (0, 0, 0), [0.0, 0.0, 0.0])
    """

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, k: int) -> tuple[float, float, float]:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.size:
            raise ValueError(f"k must be an integer in [1, {self.size}], got {k!r}")
        return 0.0, 0.0, 0.0

    def rank(self) -> tuple[int, int, int]:
        """No eigenvalue is above the floor."""
        return 0, 0, 0

    def smallest_nonzero(self) -> tuple[float, float, float]:
        """There is none: ``(0, 0, 0)``."""
        return 0.0, 0.0, 0.0

    def cdf_bounds(self, x: float) -> tuple[float, float, float]:
        """``F(x)`` is 1 from 0 on."""
        value = 1.0 if x >= 0 else 0.0
        return value, value, value

    def envelopes(self) -> tuple[Tensor, Tensor, Tensor]:
        """All zeros."""
        zeros = torch.zeros(self.size, dtype=torch.float64)
        return zeros, zeros, zeros


# ----------------------------------------------------------------------------- the solver


def _integer(name: str, value: object, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    return value


class LanczosSolver:
    """Approximate spectrum of a large symmetric PSD matrix (module docstring): λmax and the
    ``top`` largest by block Lanczos, with certified lower and residual upper bounds; any
    quantile by stochastic Lanczos quadrature with error bars.

    The result is a :class:`~lightning_conditioning.solvers.SolvedSpectrum` with
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
            :func:`~lightning_conditioning.resolution.floor_rtol` of the matrix size).
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
        self.block_size = _integer("block_size", top + 4 if block_size is None else block_size,
                                   1)
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not (
                0.0 < float(confidence) < 1.0):
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
        return (f"{type(self).__name__}(top={self.top}, steps={self.steps}, probes={self.probes},"
                f" confidence={self.confidence}, seed={self.seed}, threads={self.threads})")

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
        return self.solve_operator(product, dim - zeros, structural_zeros=zeros,
                                   device=matrix.device, perturbation=skew)

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

    def _solve(self, matvec: MatVec, dim: int, structural_zeros: int,
               device: torch.device | str | None, perturbation: float) -> SolvedSpectrum:
        if dim < 0 or structural_zeros < 0:
            raise ValueError(f"dim and structural_zeros must be >= 0, got {dim}, "
                             f"{structural_zeros}")
        size = dim + structural_zeros
        listed = min(self.top, size)
        if dim == 0:
            zeros = torch.zeros(listed, dtype=torch.float64)
            return SolvedSpectrum(zeros, self.name, exact=False, structural_zeros=structural_zeros,
                                  lower=zeros, upper=zeros, dim=size, tail_upper=0.0,
                                  quantile=ZeroQuantiles(size), bounds="residual")
        generator = torch.Generator().manual_seed(self.seed)
        signs = torch.randint(0, 2, (dim, self.probes), generator=generator)
        probes = (2.0 * signs - 1.0).to(dtype=torch.float64, device=device)
        start = torch.randn(dim, min(self.block_size, dim), generator=generator,
                            dtype=torch.float64).to(device)
        rule, top = krylov_runs(matvec, probes, self.steps, start, self.steps, self.top,
                                slack=perturbation)
        assert top is not None
        rtol = self.rtol if self.rtol is not None else floor_rtol(dim=max(size, 1))
        quantiles = SpectralQuantiles(
            rule, dim, structural_zeros=structural_zeros, floor=rtol * float(top.upper[0]),
            top=top, confidence=self.confidence, resamples=self.resamples, generator=generator,
            slack=perturbation, threads=self.threads,
        )
        rows = [quantiles(k) for k in range(1, listed + 1)]
        values, lower, upper = (torch.tensor(column, dtype=torch.float64) for column in zip(*rows))
        spread = float(((upper - lower) / lower.clamp(min=1e-300)).max()) if listed else 0.0
        return SolvedSpectrum(
            values, self.name, exact=False, relative_error=spread,
            structural_zeros=structural_zeros, lower=lower, upper=upper, dim=size,
            tail_upper=float(upper[-1]) if listed else 0.0, quantile=quantiles,
            bounds="residual",
        )


def _restricted(product: MatVec, keep: Tensor, dim: int) -> MatVec:
    """``V -> (M @ V')[keep]``, ``V'`` the rows ``keep`` of ``V`` embedded in ``d`` zeros: the
    product with ``M[keep][:, keep]`` without copying the matrix."""

    def matvec(block: Tensor) -> Tensor:
        full = block.new_zeros(dim, block.shape[1])
        full[keep] = block
        return product(full)[keep]

    return matvec


def _skew_bound(matrix: Tensor, generator: torch.Generator, samples: int = 4
                ) -> tuple[float, float]:
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
