"""Per-layer results of one analysed window: plain dataclasses, built from the moments.

Pure: no Lightning, no hooks. :func:`analyse_layer` turns the finished window of one layer
(:class:`~lightning_conditioning.accumulate.LayerMoments`) into a :class:`LayerConditioning`,
which knows how to name its scalars (:meth:`LayerConditioning.metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from lightning_conditioning.accumulate import LayerMoments
from lightning_conditioning.spectra import (
    DEFAULT_RANK_RTOL,
    KroneckerSummary,
    SpectrumSummary,
    format_percent,
    summarize_kronecker,
    summarize_spectrum,
    symmetric_eigenvalues,
)

__all__ = ["LayerStatus", "LayerConditioning", "analyse_layer"]

#: ``"ok"``: everything computed; ``"no_grad"``: inputs seen but no output gradient arrived
#: (Σ∇h and the sub-FIM are missing); ``"no_data"``: the layer never ran in the window;
#: ``"nonfinite"``: the statistics hold NaN/Inf, nothing is computed or logged.
LayerStatus = Literal["ok", "no_grad", "no_data", "nonfinite"]


@dataclass(frozen=True)
class LayerConditioning:
    """Conditioning of one layer over one analysed window.

    Attributes:
        name: qualified module name in the LightningModule.
        step: the optimizer step (``trainer.global_step``) whose batches were analysed.
        status: see :data:`LayerStatus`.
        input: spectrum summary of Σx (full spectrum in ``input.eigenvalues``).
        grad: spectrum summary of Σ∇h.
        fim: λmax, rank and κ_p of the sub-FIM ``Σx ⊗ Σ∇h``.
        dead_input_units: input units (features / channels) never > 0 in the window.
        full_input_units: input units > 0 on every row of the window.
        input_units: number of input units.
        input_rows / grad_rows: rows each second moment was averaged over.

    Example:
        >>> from lightning_conditioning.accumulate import LayerMoments
        >>> eye = torch.eye(2, dtype=torch.float64)
        >>> moments = LayerMoments(eye, 4 * eye, 8, 8, torch.tensor([3.0, 0.0]), torch.zeros(2))
        >>> result = analyse_layer("fc", 0, moments, percents=(100,))
        >>> result.metrics()["conditioning/fc/fim_lambda_max"], result.dead_input_units
        (4.0, 1)
    """

    name: str
    step: int
    status: LayerStatus
    input: SpectrumSummary | None
    grad: SpectrumSummary | None
    fim: KroneckerSummary | None
    dead_input_units: int | None
    full_input_units: int | None
    input_units: int
    input_rows: int
    grad_rows: int

    def metrics(self, prefix: str = "conditioning") -> dict[str, float]:
        """The logged scalars, ``{prefix}/{name}/{quantity}``; empty unless finite numbers."""
        if self.status in ("nonfinite", "no_data"):
            return {}
        base = f"{prefix}/{self.name}"
        out: dict[str, float] = {}
        for label, summary in (("input", self.input), ("grad", self.grad), ("fim", self.fim)):
            if summary is None:
                continue
            out[f"{base}/{label}_lambda_max"] = summary.lambda_max
            for percent, value in summary.kappa.items():
                out[f"{base}/{label}_kappa_{format_percent(percent)}"] = value
        if self.dead_input_units is not None and self.full_input_units is not None:
            out[f"{base}/dead_input_units"] = float(self.dead_input_units)
            out[f"{base}/full_input_units"] = float(self.full_input_units)
        return {key: value for key, value in out.items() if math.isfinite(value)}


def analyse_layer(
    name: str,
    step: int,
    moments: LayerMoments,
    *,
    percents: Sequence[float] = (50, 80, 100),
    rank_rtol: float = DEFAULT_RANK_RTOL,
) -> LayerConditioning:
    """Eigen-analysis of one layer's finished window (float64, CPU).

    The rank of each moment is bounded by its row count, and its tolerance is
    ``max(rank_rtol, resolution)``: with bfloat16 / float16 activations (AMP) eigenvalues
    below 2⁻⁷ / 2⁻¹⁰ of λmax are rounding noise and count as zero.

    Example:
        >>> from lightning_conditioning.accumulate import LayerMoments
        >>> moments = LayerMoments(None, None, 0, 0, torch.zeros(3), torch.zeros(3))
        >>> analyse_layer("fc", 0, moments).status
        'no_data'
    """
    units = int(moments.unit_max.numel())
    empty = dict(input=None, grad=None, fim=None, dead_input_units=None, full_input_units=None)
    common = dict(
        name=name,
        step=step,
        input_units=units,
        input_rows=moments.input_rows,
        grad_rows=moments.grad_rows,
    )
    if moments.input_second_moment is None:
        return LayerConditioning(status="no_data", **common, **empty)  # type: ignore[arg-type]
    matrices = [m for m in (moments.input_second_moment, moments.grad_second_moment) if m is not None]
    if not all(bool(torch.isfinite(m).all()) for m in matrices):
        return LayerConditioning(status="nonfinite", **common, **empty)  # type: ignore[arg-type]

    def summary(matrix: torch.Tensor, rows: int, resolution: float) -> SpectrumSummary:
        # eigenvalues below the captured tensors' own precision are rounding noise
        rtol = max(rank_rtol, resolution)
        return summarize_spectrum(symmetric_eigenvalues(matrix), percents, rtol=rtol, max_rank=rows)

    input_summary = summary(
        moments.input_second_moment, moments.input_rows, moments.input_resolution
    )
    grad_summary = fim = None
    if moments.grad_second_moment is not None:
        grad_summary = summary(
            moments.grad_second_moment, moments.grad_rows, moments.grad_resolution
        )
        fim = summarize_kronecker(input_summary, grad_summary, percents)
    return LayerConditioning(
        status="ok" if grad_summary is not None else "no_grad",
        input=input_summary,
        grad=grad_summary,
        fim=fim,
        dead_input_units=moments.dead_units,
        full_input_units=moments.full_units,
        **common,  # type: ignore[arg-type]
    )
