"""Spectral quantiles with error bars from the Lanczos runs
(see :mod:`lightning_conditioning.maths.krylov`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_conditioning.maths.krylov.runs import (
    UNIT_ROUNDOFF,
    GaussQuadrature,
    TopRitz,
    _calibrated_tail,
    _threaded,
)


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
        >>> from lightning_conditioning.maths.krylov import LanczosSolver, krylov_runs
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
            raise ValueError(
                f"need dim >= 1, structural_zeros >= 0, >= 2 probes and confidence"
                f" in (0, 1), got {dim}, {structural_zeros}, {probes}, {confidence}"
            )
        self.dim, self.structural_zeros, self.floor, self.top = dim, structural_zeros, floor, top
        self.confidence, self.threads = confidence, threads
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
        self._suffix = rule.residual[:, None] * squares.flip(1).cumsum(1).flip(1).sqrt() + self.rounding
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
        self.grid = torch.unique(
            torch.cat(
                [
                    valid.clamp(min=0.0),
                    torch.cat(beside).clamp(min=0.0, max=positive),
                    torch.tensor([0.0, floor, ceiling], dtype=torch.float64),
                    torch.logspace(math.log10(bottom), math.log10(positive), grid_points, dtype=torch.float64),
                    torch.linspace(0.0, positive, grid_points, dtype=torch.float64),
                ]
            )
        )
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
        self._residual_high = float(torch.where(proven, nodes + single, torch.full_like(nodes, math.inf)).min())

    # ------------------------------------------------------------------ the CDF
    def probe_bounds(self, x: float) -> tuple[Tensor, Tensor, Tensor]:
        """Per probe: a lower and an upper bound of the probe's spectral CDF ``μ_z((−∞, x])``
        (deterministic, module docstring) and its Gauss rule's CDF; each of shape ``(P,)``.

        Example:
            >>> from lightning_conditioning.maths.krylov import LanczosSolver, krylov_runs
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
            >>> from lightning_conditioning.maths.krylov import LanczosSolver, krylov_runs
            >>> matrix = torch.diag(torch.linspace(1.0, 2.0, 64, dtype=torch.float64))
            >>> estimate, low, high = LanczosSolver(steps=10)(matrix).quantile.cdf_bounds(1.5)
            >>> low <= 0.5 <= high
            True
        """
        index = int(torch.searchsorted(self.grid, torch.tensor(x, dtype=torch.float64), right=True)) - 1
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
            >>> from lightning_conditioning.maths.krylov import LanczosSolver, krylov_runs
            >>> matrix = torch.diag(torch.linspace(1.0, 2.0, 64, dtype=torch.float64))
            >>> quantiles = LanczosSolver(steps=20, probes=4, resamples=200)(matrix).quantile
            >>> estimates, lows, highs = quantiles.envelopes()
            >>> (lows[31].item(), highs[31].item()) == quantiles(32)[1:]
            True
        """
        n, grid = self.dim, self.grid
        count = int(grid.numel())
        low_band, high_band = torch.empty(count, dtype=torch.float64), torch.empty(count, dtype=torch.float64)
        for start in range(0, count, 256):
            lower, upper, _ = self._probe_bounds_at(grid[start : start + 256])
            low_band[start : start + 256] = (self._counts @ lower).kthvalue(self._rank_low + 1, dim=0).values
            high_band[start : start + 256] = (self._counts @ upper).kthvalue(self._rank_high + 1, dim=0).values
        ks = torch.arange(1, n + 1, dtype=torch.float64)
        index = torch.searchsorted(low_band, (n - ks + 1e-6) / n)
        highs = torch.where(
            index < count, grid[index.clamp(max=count - 1)], torch.tensor(self.ceiling, dtype=torch.float64)
        )
        index = torch.searchsorted(high_band, (n - ks + 1 - 1e-6) / n)
        lows = torch.where(index > 0, grid[(index - 1).clamp(min=0)], torch.zeros_like(ks))
        certified = torch.full((n,), -math.inf, dtype=torch.float64)
        largest = min(n, int(self._largest.numel()))
        certified[:largest] = self._largest[:largest] - self.rounding
        lows = torch.maximum(lows, certified).clamp(min=0.0)
        certified = torch.full((n,), math.inf, dtype=torch.float64)
        smallest = min(n, int(self._smallest.numel()))  # λ_{n−j+1} ≤ j-th smallest node
        certified[n - smallest :] = (self._smallest[:smallest] + self.rounding).flip(0)
        highs = torch.maximum(torch.minimum(highs, certified).clamp(max=self.ceiling), lows)
        estimates = self._smooth_quantiles((n - ks + 0.5) / n)
        top = self.top
        if top is not None and top.upper.numel():
            listed = min(n, int(top.upper.numel()))
            lows[:listed] = torch.maximum(top.lower[:listed].clamp(min=0.0), lows[:listed])
            highs[:listed] = torch.maximum(torch.minimum(top.upper[:listed], certified[:listed]), lows[:listed])
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
            >>> from lightning_conditioning.maths.krylov import LanczosSolver, krylov_runs
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
        value = torch.where(inside, y0 + (y1 - y0) * share, (above > 0).to(torch.float64))
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
            >>> from lightning_conditioning.maths.krylov import LanczosSolver, krylov_runs
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
            >>> from lightning_conditioning.maths.krylov import LanczosSolver, krylov_runs
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
