"""Row sampling: a bounded number of rows per pass enters a moment, with its sampling error.

A pass of ``n`` rows (tokens, pixels) larger than the limit ``k`` adds a uniform sample of
``k`` of them, drawn without replacement, each weighted ``n/k``: the sum stays an unbiased
estimate of the pass's full ``Σ r rᵀ`` and the mean is still taken over ``n`` rows, so a
sampled moment reads like an unsampled one. The cost of the Gram falls from ``n·d²`` to
``k·d²`` whatever the tokens per step.

The sampling error is measured, not assumed. The sample's top direction ``v`` comes from a few
power steps on the kept rows themselves (``k·d`` work each, against the Gram's ``k·d²``), and
the delta method gives the variance of the estimate of ``vᵀ(Σ r rᵀ)v`` (the sum that λmax is
read from): ``n²(1 − k/n)·Var_i((v·r_i)²)/k``. :class:`SampleTally` adds those variances and
levels over the passes of a window (and over processes: they are sums), and
:meth:`SampleTally.relative_error` is the relative standard error of λmax the sampling leaves.

Rows are drawn with a generator of the sampler's own, seeded once: the user's random streams
are never touched, and training stays bit-identical.

Example:
    >>> sampler = RowSampler(limit=4)
    >>> tally = SampleTally()
    >>> rows = torch.arange(24.0).reshape(8, 3)
    >>> kept, factor = sampler.sample(rows, 1.0, tally)
    >>> kept.shape, factor, tally.rows, tally.kept
    (torch.Size([4, 3]), 2.0, 8, 4)
    >>> kept, factor = sampler.sample(rows[:3], 1.0, tally)   # within the limit: every row
    >>> kept.shape, factor, tally.rows, tally.kept, tally.sampled
    (torch.Size([3, 3]), 1.0, 11, 7, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["RowSampler", "SampleTally", "POWER_STEPS", "DEFAULT_ROW_LIMIT"]

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
        rows: rows the passes had (what the mean is taken over).
        kept: rows that entered the sum.
        variance: the estimate's variance along each sampled pass's top direction.
        level: the sum along the same directions (the scale the variance is relative to).
    """

    rows: int = 0
    kept: int = 0
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
        """The four sums, for a reduction over processes."""
        return [float(self.rows), float(self.kept), float(self.variance), float(self.level)]

    def set_values(self, values: list[float]) -> None:
        """Overwrite the sums (after a reduction)."""
        self.rows, self.kept = int(round(values[0])), int(round(values[1]))
        self.variance, self.level = float(values[2]), float(values[3])

    def copy_from(self, other: SampleTally) -> None:
        self.set_values(other.values())

    def reset(self) -> None:
        self.rows = self.kept = 0
        self.variance = self.level = 0.0


class RowSampler:
    """Draws at most ``limit`` rows of a pass (see the module's docstring).

    Args:
        limit: the most rows a pass adds to a moment (at least 1).
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
        """``(kept rows, factor)``: every row and 1 within the limit, else a uniform sample of
        ``limit`` rows and ``n/limit``, the factor on their outer products (and row sums).
        ``tally`` counts both and takes the sample's error (for rows added ``weight ×``)."""
        count = int(rows.shape[0])
        tally.rows += count
        if count <= self.limit:
            tally.kept += count
            return rows, 1.0
        chosen = torch.randperm(count, generator=self._generator(rows.device), device=rows.device)
        kept = rows.index_select(0, chosen[: self.limit])
        factor = count / self.limit
        tally.kept += self.limit
        variance, level = _pass_error(kept, count)
        tally.variance = tally.variance + weight * weight * variance
        tally.level = tally.level + weight * level
        return kept, factor


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
