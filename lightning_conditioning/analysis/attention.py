"""Attention readings of a window: summed over processes, named by the schema.

The readings come from :class:`~lightning_conditioning.capture.attention.AttentionProbe`; each
process reads its own examples, so the per-head maxima are reduced with ``max`` and the
entropy sums and row counts with ``sum`` (the same as one process reading every example).

Example:
    >>> from lightning_conditioning.maths.attention import AttentionReading
    >>> reading = AttentionReading(torch.tensor([3.0, 9.0]), torch.tensor([2.0, 0.5]),
    ...                            torch.tensor([2.2, 2.2]), torch.tensor([1.0, 1.0]))
    >>> quantities = attention_quantities(reading)
    >>> quantities["attention_logit_max"], quantities["attention_entropy_min"], quantities["attention_logit_max_h1"]
    (9.0, 0.5, 9.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from lightning_conditioning import schema
from lightning_conditioning.capture.attention import AttentionProbe
from lightning_conditioning.distributed.collectives import Collectives
from lightning_conditioning.maths.attention import AttentionReading

__all__ = ["attention_quantities", "attention_metrics", "reduce_readings", "AttentionWindows"]


def attention_quantities(reading: AttentionReading) -> dict[str, float]:
    """``{quantity: value}`` of one attention module (names: :mod:`..schema`); heads without
    rows are left out."""
    out: dict[str, float] = {}
    entropies = reading.entropy
    seen = [h for h in range(reading.heads) if float(reading.rows[h]) > 0]
    for head in seen:
        out[schema.attention_head_quantity("logit_max", head)] = float(reading.logit_max[head])
        out[schema.attention_head_quantity("entropy", head)] = float(entropies[head])
    if seen:
        out["attention_logit_max"] = max(float(reading.logit_max[h]) for h in seen)
        out["attention_entropy_min"] = min(float(entropies[h]) for h in seen)
        out["attention_entropy_uniform"] = reading.uniform_entropy
    return {k: v for k, v in out.items() if math.isfinite(v)}


def attention_metrics(readings: Mapping[str, AttentionReading], prefix: str) -> dict[str, float]:
    """The logged scalars ``{prefix}/{module}/{quantity}`` of every attention module."""
    return {
        schema.key(prefix, name, quantity): value
        for name, reading in readings.items()
        for quantity, value in attention_quantities(reading).items()
    }


def reduce_readings(readings: dict[str, AttentionReading], collectives: Collectives) -> dict[str, AttentionReading]:
    """Every process's readings summed (max for the logit maxima). Every process must hold
    the same modules with the same heads (one model, one control flow). Without several
    processes: ``readings`` as they are."""
    if not collectives.distributed or not readings:
        return readings
    names = sorted(readings)
    mine = [readings[name] for name in names]
    maxima = collectives.all_reduce(torch.cat([r.logit_max for r in mine]), "max")
    sums = collectives.all_reduce(torch.cat([torch.cat([r.entropy_sum, r.uniform_sum, r.rows]) for r in mine]), "sum")
    out: dict[str, AttentionReading] = {}
    start = 0
    for name, reading in zip(names, mine):
        count = reading.heads
        block = sums[3 * start : 3 * (start + count)].reshape(3, count)
        out[name] = AttentionReading(maxima[start : start + count], block[0], block[1], block[2])
        start += count
    return out


class AttentionWindows:
    """The attention readings of a monitor's windows: taken when a window is gathered,
    summed over processes, and published with the window's results.

    Args:
        model: the model (its attention modules: :func:`~lightning_conditioning.capture.attention.attention_modules`).
        active: whether the passes running now are captured.
    """

    def __init__(self, model: nn.Module, active: Callable[[], bool]) -> None:
        self.probe = AttentionProbe(model, active)
        if self.probe.modules:
            self.probe.attach()
        #: gathered readings by the step of their window, until that window is published (a
        #: background analysis publishes a window after the next one was gathered)
        self._pending: dict[int, dict[str, AttentionReading]] = {}
        #: the readings of the window whose results were published last, by module
        self.results: dict[str, AttentionReading] = {}
        self._said: set[str] = set()

    def gather(self, step: int, collectives: Collectives) -> str | None:
        """Take the readings of the window finished at ``step`` (summed over processes) until
        :meth:`publish` of that step; the first time attention modules ran without a reading,
        a sentence saying so."""
        self._pending[step] = reduce_readings(self.probe.take(), collectives)
        unread = sorted(self.probe.unread - self._said)
        if not unread:
            return None
        self._said.update(unread)
        return (
            f"attention modules ran without an attention reading (their attention is not "
            f"computed by F.scaled_dot_product_attention, e.g. Hugging Face's eager "
            f"implementation): {', '.join(unread[:6])}{' …' if len(unread) > 6 else ''}"
        )

    def publish(self, step: int) -> None:
        """The readings gathered at ``step`` become :attr:`results` (earlier ones still pending
        are dropped: their window was never published)."""
        self.results = self._pending.pop(step, {})
        self._pending = {later: readings for later, readings in self._pending.items() if later > step}

    def discard(self) -> None:
        """Drop the open window's readings."""
        self.probe.take()

    def table(self) -> dict[str, dict[str, float]]:
        """``{module: {quantity: value}}`` of :attr:`results` (for the diagnosis)."""
        return {
            name: quantities for name, reading in self.results.items() if (quantities := attention_quantities(reading))
        }

    def close(self) -> None:
        """Remove the hooks (the results stay readable)."""
        self.probe.detach()
