"""Lanczos runs: block Lanczos for the top of a spectrum, probe Lanczos for its Gauss rules
(see :mod:`lightning_conditioning.maths.krylov`)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import torch
from torch import Tensor

from lightning_conditioning.maths.solvers import limited_threads

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

    def __init__(
        self, start: Tensor, steps: int, top: int, tolerance: float = 1e-6, check: int = 8, slack: float = 0.0
    ) -> None:
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
        return self.taken >= self.steps or self.block.shape[0] == 0 or self.converged or self.size >= self.rows.shape[0]

    def current(self) -> Tensor:
        return self.block.T

    def step(self, image: Tensor) -> None:
        start = self.size
        width = min(self.block.shape[0], self.rows.shape[0] - start)
        self.rows[start : start + width] = self.block[:width]
        self.images[start : start + width] = image.T[:width]
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
        norms = torch.stack([torch.linalg.matrix_norm(residual[: j + 1], ord=2) for j in range(top)])
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
    block = _BlockLanczos(block_start, block_steps, top, slack=slack) if block_start is not None else None
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
