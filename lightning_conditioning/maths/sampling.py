"""Row sampling: a bounded number of rows per window enters a moment, with its sampling error.

Each moment of a window takes at most ``limit`` rows (the monitor's ``max_rows`` per step of the
window). A pass (one forward of a layer, or its output's gradient) of ``n`` rows that fits what
is left of the budget enters whole; a larger one adds a uniform sample of ``k`` rows (the rest
of the budget), drawn without replacement, each weighted ``n/k``: the sum stays an unbiased
estimate of the pass's ``Σ r rᵀ`` and the mean is still taken over its ``n`` rows, so a sampled
moment reads like an unsampled one. A pass that finds the budget spent (gradient accumulation:
the later micro-batches) adds nothing and is not counted in the mean: the moment is that of
the passes it holds. The Gram work of a window is bounded by ``limit·d²`` whatever the tokens
per step.

The sampling error is measured, not assumed. The sample's top direction ``v`` comes from a few
power steps on the kept rows themselves (``k·d`` work each, against the Gram's ``k·d²``), and
the delta method gives the variance of the estimate of ``vᵀ(Σ r rᵀ)v`` (the sum that λmax is
read from): ``n²(1 − k/n)·Var_i((v·r_i)²)/k``. :class:`SampleTally` adds those variances and
levels over the passes of a window (and over processes: they are sums), and
:meth:`SampleTally.relative_error` is the relative standard error of λmax the sampling leaves.
It is a standard error, not a bound: λmax of a sample sits above the full one on average
(λmax is convex), by about the error when the top eigenvalues are close.

Rows are drawn with a generator of the sampler's own, seeded once: the user's random streams
are never touched, and training stays bit-identical.

Example:
    >>> sampler = RowSampler(limit=6)
    >>> tally = SampleTally()
    >>> rows = torch.arange(24.0).reshape(8, 3)
    >>> kept, factor = sampler.sample(rows[:2], 1.0, tally)   # within the budget: every row
    >>> kept.shape, factor, tally.rows, tally.kept, tally.sampled
    (torch.Size([2, 3]), 1.0, 2, 2, False)
    >>> kept, factor = sampler.sample(rows, 1.0, tally)       # 4 of 8 rows left in the budget
    >>> kept.shape, factor, tally.rows, tally.kept, tally.counted
    (torch.Size([4, 3]), 2.0, 10, 6, 10)
    >>> kept, factor = sampler.sample(rows, 1.0, tally)       # the budget is spent
    >>> kept.shape, factor, tally.rows, tally.counted
    (torch.Size([0, 3]), 0.0, 18, 10)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RowSampler", "SampleTally", "POWER_STEPS", "DEFAULT_ROW_LIMIT", "kept_of"]

#: power steps for the sample's top direction (the error bar's, not λmax's: a rough
#: direction is enough for a standard error)
POWER_STEPS = 8
#: the default limit on rows per pass (``ConditioningOptions.max_rows``): a fine-tuning step
#: of 8 × 256 tokens keeps every row
DEFAULT_ROW_LIMIT = 2048


@dataclass
class SampleTally:
    """What row sampling did to one moment in a window (sums: they add over passes and
    processes).

    Attributes:
        rows: rows the passes had.
        kept: rows that entered the sum.
        counted: rows of the passes that entered (what the mean is taken over; passes that
            found the budget spent are not).
        variance: the estimate's variance along each sampled pass's top direction.
        level: the sum along the same directions (the scale the variance is relative to).
    """

    rows: int = 0
    kept: int = 0
    counted: int = 0
    #: (0-d tensors on the rows' device while a window runs: no host sync in a hook)
    variance: float | Tensor = 0.0
    level: float | Tensor = 0.0

    @property
    def sampled(self) -> bool:
        """Whether some rows were left out."""
        return self.kept < self.rows

    def relative_error(self) -> float:
        """The relative standard error of λmax from the sampling (0 when nothing was
        sampled; inf when the sampled direction carried nothing)."""
        if not self.sampled:
            return 0.0
        variance, level = float(self.variance), float(self.level)
        if not level > 0:
            return math.inf
        return math.sqrt(max(variance, 0.0)) / level

    def values(self) -> list[float]:
        """The five sums, for a reduction over processes."""
        return [float(self.rows), float(self.kept), float(self.counted), float(self.variance), float(self.level)]

    def set_values(self, values: list[float]) -> None:
        """Overwrite the sums (after a reduction)."""
        self.rows, self.kept, self.counted = (int(round(v)) for v in values[:3])
        self.variance, self.level = float(values[3]), float(values[4])

    def copy_from(self, other: SampleTally) -> None:
        self.set_values(other.values())

    def reset(self) -> None:
        self.rows = self.kept = self.counted = 0
        self.variance = self.level = 0.0


def kept_of(rows: int, tally: SampleTally | None) -> int:
    """The rows that entered a moment of ``rows`` rows: of those the passes counted, sampling
    left ``tally.counted − tally.kept`` out (rows added as ready Grams all entered).

    Example:
        >>> kept_of(8192, SampleTally(rows=8192, kept=2048, counted=8192)), kept_of(500, None)
        (2048, 500)
    """
    return rows - (tally.counted - tally.kept) if tally is not None else rows


class RowSampler:
    """Draws the rows of each pass that enter a moment (see the module's docstring).

    Args:
        limit: the most rows a moment takes in a window (at least 1).
        seed: the seed of the sampler's own generators (one per device).
    """

    def __init__(self, limit: int, seed: int = 0) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limit must be a positive int, got {limit!r}")
        self.limit = limit
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, device: torch.device) -> torch.Generator:
        found = self._generators.get(device)
        if found is None:
            found = torch.Generator(device=device)
            found.manual_seed(self.seed)
            self._generators[device] = found
        return found

    def sample(self, rows: Tensor, weight: float, tally: SampleTally) -> tuple[Tensor, float]:
        """``(kept rows, factor)`` of a pass: every row and 1 within what is left of the
        budget, else a uniform sample of the rest of the budget and ``n/k``, the factor on
        their outer products (and row sums); no row and 0 once the budget is spent. ``tally``
        counts them and takes the sample's error (for rows added ``weight ×``)."""
        count = int(rows.shape[0])
        budget = self.limit - tally.kept
        tally.rows += count
        if budget <= 0:
            return rows[:0], 0.0
        tally.counted += count
        if count <= budget:
            tally.kept += count
            return rows, 1.0
        chosen = torch.randperm(count, generator=self._generator(rows.device), device=rows.device)
        kept = rows.index_select(0, chosen[:budget])
        tally.kept += budget
        variance, level = _pass_error(kept, count)
        tally.variance = tally.variance + weight * weight * variance
        tally.level = tally.level + weight * level
        return kept, count / budget


def _pass_error(kept: Tensor, count: int) -> tuple[Tensor, Tensor]:
    """``(variance, level)`` of one sampled pass's estimate of ``vᵀ(Σ r rᵀ)v`` along the
    kept rows' top direction ``v`` (:data:`POWER_STEPS` power steps from the rows' mean
    square per coordinate, a start no direction of weight is orthogonal to)."""
    k = int(kept.shape[0])
    with torch.no_grad():
        rows = kept if kept.is_floating_point() else kept.to(torch.float32)
        direction, tiny = rows.square().sum(0), torch.finfo(rows.dtype).tiny
        for _ in range(POWER_STEPS):  # a zero or non-finite direction stays one (no sync)
            direction = rows.T @ (rows @ (direction / direction.norm().clamp_min(tiny)))
        along = (rows @ (direction / direction.norm().clamp_min(tiny))).to(torch.float64).square()
        spread = along.var(correction=1) if k > 1 else along.new_zeros(())
        level = along.mean() * count
        variance = spread * (count * count * (1 - k / count) / k)
    return variance, level
