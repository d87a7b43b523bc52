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
:class:`~lightning_conditioning.maths.solvers.DenseSolver` does) and reported as the last
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

import torch  # noqa: F401  (the example)

from lightning_conditioning.maths.krylov.quantiles import SpectralQuantiles, ZeroQuantiles
from lightning_conditioning.maths.krylov.runs import (
    UNIT_ROUNDOFF,
    GaussQuadrature,
    MatVec,
    TopRitz,
    krylov_runs,
    student_t_quantile,
)
from lightning_conditioning.maths.krylov.solver import LanczosSolver, gram_operator

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
    "UNIT_ROUNDOFF",
]
