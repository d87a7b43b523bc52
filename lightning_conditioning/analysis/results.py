"""Per-layer results of one analysed window: plain dataclasses, built from the moments.

Pure: no Lightning, no hooks. :func:`analyse_layer` turns the finished window of one layer
(:class:`~lightning_conditioning.maths.accumulate.LayerMoments`) into a :class:`LayerConditioning`,
which knows how to name its scalars (:meth:`LayerConditioning.metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_conditioning import schema
from lightning_conditioning.maths.estimates import summarize_kronecker_bounds, summarize_solved
from lightning_conditioning.maths.features import outlier_feature
from lightning_conditioning.maths.moments import LayerMoments
from lightning_conditioning.maths.remote import RemoteMoment
from lightning_conditioning.maths.resolution import floor_rtol
from lightning_conditioning.maths.sampling import kept_of
from lightning_conditioning.maths.sketch import SketchedMoment
from lightning_conditioning.maths.solvers import (
    DIAGONAL,
    SKETCH,
    SolvedSpectrum,
    SolverPlan,
    SpectrumSolver,
    plan_solver,
)
from lightning_conditioning.maths.spectra import (
    KappaDefinition,
    KroneckerSummary,
    SpectrumSummary,
    summarize_kronecker,
    summarize_spectrum,
)

__all__ = ["LayerStatus", "LayerConditioning", "layer_status", "layer_note", "solve_layer", "analyse_layer"]

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
        dead_input_units: input units (features / channels) never > 0 in the window (``None``
            for an embedding: its units are table rows, see ``unused_rows``).
        full_input_units: input units > 0 on every row of the window (``None`` for an
            embedding).
        input_units: number of input units (an embedding's table rows: tokens, positions).
        input_rows / grad_rows: rows each second moment was averaged over.

    Example:
        >>> from lightning_conditioning.maths.accumulate import LayerMoments
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
    #: an embedding's table rows (tokens, positions) not looked up in the window: what the
    #: batches did not use, not a fault of the layer (``None`` for other layers)
    unused_rows: int | None = None
    #: outlier features: the largest mean square of an input feature over the median one,
    #: ``max_i Σx_ii / median_i Σx_ii`` (None: an embedding, no Σx, or a median of 0), and the
    #: feature ``i`` (:mod:`lightning_conditioning.maths.features`)
    input_outlier_ratio: float | None = None
    input_outlier_feature: int | None = None
    #: row sampling (``max_rows``; :mod:`lightning_conditioning.maths.sampling`): ``{moment:
    #: (rows kept, relative standard error of its λmax)}`` for the moments whose passes were
    #: sampled ("fim": the two errors' root sum of squares); empty when every row entered
    sampling: Mapping[str, tuple[int, float]] = field(default_factory=dict)
    #: ``{"lr_lambda_max": …, "stability_limit": …, "lambda_max_share": …}`` once the learning
    #: rate is known (:func:`lightning_conditioning.analysis.margin.with_stability_margin`), else empty
    margin: Mapping[str, float] = field(default_factory=dict)
    #: why some numbers are missing or zero (no data, no gradient, NaN/Inf, exactly zero
    #: statistics), in words; None when everything was measured (:func:`layer_note`)
    note: str | None = None
    #: one expert of a fused expert module: ``(module, expert, experts)`` (its rows are the
    #: tokens routed to it; :mod:`lightning_conditioning.analysis.routing`), else None
    expert: tuple[str, int, int] | None = None
    #: an expert's rows routed to it in the window (every one, however many row sampling
    #: kept), else None
    routed_rows: int | None = None

    def metrics(self, prefix: str = "conditioning") -> dict[str, float]:
        """The logged scalars, ``{prefix}/{name}/{quantity}`` (names: :mod:`..schema`).

        Empty unless the layer has finite numbers. A κ_p that is not a measurement is logged
        under its marker key (``…_lower_bound`` / ``…_infinite``) instead of the plain one.
        """
        if self.status in ("nonfinite", "no_data"):
            return {}
        out: dict[str, float] = {}
        for moment, summary in (("input", self.input), ("grad", self.grad), ("fim", self.fim)):
            if summary is not None:
                out.update(schema.summary_quantities(moment, summary))
        if self.dead_input_units is not None and self.full_input_units is not None:
            out["dead_input_units"] = float(self.dead_input_units)
            out["full_input_units"] = float(self.full_input_units)
        if self.unused_rows is not None:
            out["unused_rows"] = float(self.unused_rows)
        if self.input_outlier_ratio is not None and self.input_outlier_feature is not None:
            out["input_outlier_ratio"] = self.input_outlier_ratio
            out["input_outlier_feature"] = float(self.input_outlier_feature)
        for moment, (kept, error) in self.sampling.items():
            if moment != "fim":
                out[schema.sampling_quantity(moment, "kept_rows")] = float(kept)
            if math.isfinite(error):
                out[schema.sampling_quantity(moment, "sampling_error")] = error
        out.update({k: v for k, v in self.margin.items() if math.isfinite(v)})
        return {schema.key(prefix, self.name, quantity): value for quantity, value in out.items()}


def solver_for(plan: SolverPlan | None, name: str, matrix: Any) -> SpectrumSolver:
    """The solver of one moment: diagonal and sketched moments have their own (exact, and
    certified); dense ones follow the plan.

    Example:
        >>> solver_for(None, "emb", torch.ones(3)).name, solver_for(None, "fc", torch.eye(3)).name
        ('diagonal', 'dense-float64')
    """
    if isinstance(matrix, SketchedMoment) or (isinstance(matrix, RemoteMoment) and matrix.kind == "sketch"):
        return SKETCH
    if matrix.dim() == 1:
        return DIAGONAL
    return plan_solver(plan, name, int(matrix.shape[0]))


def moment_is_finite(matrix: Any) -> bool:
    """Whether a moment holds only finite values, without a ``d²`` temporary: a second moment
    is a sum of ``r rᵀ``, so a NaN/Inf in any row shows on the diagonal, and finite diagonals
    bound every entry (``|m_ij| ≤ (m_ii + m_jj)/2``); one sum (a reduction, no copy) catches
    what rounding past that bound could still hide."""
    if isinstance(matrix, (SketchedMoment, RemoteMoment)):
        return matrix.isfinite()
    if matrix.dim() == 2:
        if not bool(torch.isfinite(matrix.diagonal()).all()):
            return False
        if math.isfinite(float(matrix.sum())):
            return True
    return bool(torch.isfinite(matrix).all())


def _nonzero(matrix: Any) -> bool:
    """Whether a moment has a nonzero entry: a PSD matrix is zero iff its diagonal is."""
    if isinstance(matrix, (SketchedMoment, RemoteMoment)) or matrix.dim() != 2:
        return bool(matrix.any())
    return bool(matrix.diagonal().any())


def layer_status(moments: LayerMoments) -> LayerStatus:
    """What can be computed from a finished window (the same on every process).

    Example:
        >>> from lightning_conditioning.maths.accumulate import LayerMoments
        >>> layer_status(LayerMoments(None, None, 0, 0, torch.zeros(3), torch.zeros(3)))
        'no_data'
    """
    if moments.input_second_moment is None:
        return "no_data"
    matrices = [m for m in (moments.input_second_moment, moments.grad_second_moment) if m is not None]
    if not all(moment_is_finite(m) for m in matrices):
        return "nonfinite"
    return "ok" if moments.grad_second_moment is not None else "no_grad"


_NOTES = {
    "no_data": "its forward hooks never fired in the analysed step (not called, or its weight "
    "used in a way the capture cannot see); nothing is logged",
    "no_grad": "inputs seen but no output gradient arrived (a frozen or detached path after it); Σx only",
    "zero_grad": "Σ∇h is exactly zero: no gradient reached its output (a zero-initialised "
    "layer or scale after it blocks it); λmax(Σ∇h) = λmax(F) = 0 are logged, κ of "
    "Σ∇h and F is undefined",
    "shared_lookup": "its lookups are shared by the batch's examples (indices of leading dimension "
    "1, e.g. position ids broadcast over the batch), so the gradient at its output "
    "is a sum over the examples, not per-example; Σx only",
    "dead_expert": "a dead expert: the router sent it no token in the analysed window, so it has "
    "no rows and no gradient (not a numerical failure); nothing is logged",
    "zero_input": "Σx is exactly zero (every input is 0); λmax(Σx) = λmax(F) = 0 are logged, κ is undefined",
}


#: the note of an embedding looked up once for the whole batch (its Σ∇h is left out)
SHARED_LOOKUP_NOTE = _NOTES["shared_lookup"]
#: the note of an expert the router never chose in the window (said, not warned)
DEAD_EXPERT_NOTE = _NOTES["dead_expert"]


def layer_note(status: LayerStatus, moments: LayerMoments) -> str | None:
    """Why a layer's numbers are missing or zero, in words (None: nothing to say).

    Example:
        >>> from lightning_conditioning.maths.accumulate import LayerMoments
        >>> eye = torch.eye(2, dtype=torch.float64)
        >>> layer_note("ok", LayerMoments(eye, 0 * eye, 4, 4, torch.ones(2), torch.ones(2)))[:27]
        'Σ∇h is exactly zero: no gra'
        >>> layer_note("nonfinite", LayerMoments(eye, eye * math.nan, 4, 4, torch.ones(2), torch.ones(2)))
        'Σ∇h holds NaN/Inf (a diverged step, or float16 overflow in the rows); nothing is logged'
    """
    if moments.shared_input_lost:
        return (
            f"it read the same input tensor as {moments.shared_input or 'another layer'} until a "
            "call one of them took alone, within the window, so its Σx cannot be told apart from "
            "that layer's; nothing is logged this window (it keeps a Σx of its own from now on)"
        )
    if status == "no_grad" and moments.shared_lookup:
        return _NOTES["shared_lookup"]
    if status == "no_data" and moments.expert is not None:
        return _NOTES["dead_expert"]
    if status in ("no_data", "no_grad"):
        return _NOTES[status]
    pairs = (("Σx", moments.input_second_moment), ("Σ∇h", moments.grad_second_moment))
    if status == "nonfinite":
        bad = [label for label, m in pairs if m is not None and not moment_is_finite(m)]
        return (
            f"{' and '.join(bad)} hold{'s' if len(bad) == 1 else ''} NaN/Inf (a diverged step, "
            "or float16 overflow in the rows); nothing is logged"
        )
    if moments.grad_second_moment is not None and not _nonzero(moments.grad_second_moment):
        return _NOTES["zero_grad"]
    if moments.input_second_moment is not None and not _nonzero(moments.input_second_moment):
        return _NOTES["zero_input"]
    return None


def _labels(status: LayerStatus) -> tuple[str, ...]:
    return ("input", "grad") if status == "ok" else ("input",) if status == "no_grad" else ()


def solve_layer(
    name: str, moments: LayerMoments, solver: SolverPlan | None = None, solved: dict[int, SolvedSpectrum] | None = None
) -> dict[str, SolvedSpectrum]:
    """The eigen-solves of one layer's window: ``{"input": …, "grad": …}`` for the moments
    that exist (none for ``no_data`` / ``nonfinite`` windows). The expensive half of
    :func:`analyse_layer`, the part a distributed run shares out. ``solved`` (by ``id`` of the
    matrix) lets layers that share one matrix (``LayerMoments.shared_input``) solve it once.

    Example:
        >>> from lightning_conditioning.maths.accumulate import LayerMoments
        >>> eye = torch.eye(2, dtype=torch.float64)
        >>> solved = solve_layer("fc", LayerMoments(eye, None, 4, 0, torch.ones(2), torch.ones(2)))
        >>> list(solved), solved["input"].eigenvalues.tolist()
        (['input'], [1.0, 1.0])
    """
    if layer_status(moments) in ("no_data", "nonfinite"):
        return {}
    out: dict[str, SolvedSpectrum] = {}
    for label, matrix in (("input", moments.input_second_moment), ("grad", moments.grad_second_moment)):
        if matrix is None:
            continue
        if solved is not None and id(matrix) in solved:  # one matrix of several layers
            out[label] = solved[id(matrix)]
            continue
        out[label] = solver_for(solver, name, matrix)(matrix)
        if solved is not None:
            solved[id(matrix)] = out[label]
    return out


def analyse_layer(
    name: str,
    step: int,
    moments: LayerMoments,
    *,
    percents: Sequence[float] = (50, 80, 100),
    rank_rtol: float | None = None,
    kappa_definition: KappaDefinition = "paper",
    solver: SolverPlan | None = None,
    solved: Mapping[str, SolvedSpectrum] | None = None,
) -> LayerConditioning:
    """Eigen-analysis of one layer's finished window (float64, CPU).

    Each moment's resolution floor is derived from how it was computed
    (:func:`~lightning_conditioning.maths.resolution.floor_rtol`: the Gram dtype, the rows' dtype,
    the rows summed and the dimension); ``rank_rtol`` can only raise it. The rank is also
    bounded by the row count. The eigenvalues come from ``solver`` (default: dense float64,
    :mod:`lightning_conditioning.maths.solvers`), or from ``solved`` when they were computed
    elsewhere (:func:`solve_layer`, e.g. on another process).

    Example:
        >>> from lightning_conditioning.maths.accumulate import LayerMoments
        >>> moments = LayerMoments(None, None, 0, 0, torch.zeros(3), torch.zeros(3))
        >>> analyse_layer("fc", 0, moments).status
        'no_data'
    """
    units = int(moments.unit_max.numel())
    empty = dict(input=None, grad=None, fim=None, dead_input_units=None, full_input_units=None)
    routed = None  # an expert's routed (token, slot) rows: all of them, also when a sample was kept
    if moments.expert is not None:
        sampled = moments.input_sampling
        routed = moments.input_rows if sampled is None else max(moments.input_rows, sampled.rows)
    common = dict(name=name, step=step, input_units=units, expert=moments.expert, routed_rows=routed)
    common.update(input_rows=moments.input_rows, grad_rows=moments.grad_rows)
    # solved spectra already say what exists (solve_layer checked finiteness once): no second
    # pass over the matrices unless nothing was solved
    status: LayerStatus = layer_status(moments) if not solved else "ok" if "grad" in solved else "no_grad"
    common["note"] = layer_note(status, moments)
    if status in ("no_data", "nonfinite"):
        return LayerConditioning(status=status, **common, **empty)  # type: ignore[arg-type]
    if solved is None or any(label not in solved for label in _labels(status)):
        # solved elsewhere but lost on the way (never expected): solve here rather than fail
        solved = {**solve_layer(name, moments, solver), **(solved or {})}

    def summary(label: str, rows: int, row_eps: float, roundoff: float) -> SpectrumSummary:
        spectrum = solved[label]
        matrix = moments.input_second_moment if label == "input" else moments.grad_second_moment
        assert matrix is not None
        dim = int(matrix.shape[0])
        rtol = floor_rtol(gram_roundoff=roundoff, rows=rows, dim=max(dim, 1), row_eps=row_eps)
        if rank_rtol is not None:
            rtol = max(rtol, rank_rtol)
        if not spectrum.complete:  # estimates with error bars (lightning_conditioning.maths.estimates)
            if spectrum.size != dim:
                raise ValueError(
                    f"solver {spectrum.solver!r} solved a {spectrum.size}-dim "
                    f"moment for {name}'s {dim}-dim {label} moment"
                )
            return summarize_solved(spectrum, percents, rtol=rtol, max_rank=rows, definition=kappa_definition)
        return summarize_spectrum(
            spectrum.eigenvalues,
            percents,
            rtol=rtol,
            max_rank=rows,
            definition=kappa_definition,
            solver=spectrum.solver,
            solver_error=spectrum.relative_error,
            structural_zeros=spectrum.structural_zeros,
        )

    input_summary = summary(
        "input",
        kept_of(moments.input_rows, moments.input_sampling),
        moments.input_resolution,
        moments.input_gram_roundoff,
    )
    grad_summary = fim = None
    if status == "ok":
        grad_summary = summary(
            "grad",
            kept_of(moments.grad_rows, moments.grad_sampling),
            moments.grad_resolution,
            moments.grad_gram_roundoff,
        )
        fim = (
            summarize_kronecker(input_summary, grad_summary, percents)
            if input_summary.exact and grad_summary.exact
            else summarize_kronecker_bounds(input_summary, grad_summary, percents)
        )
    return LayerConditioning(
        status=status,
        input=input_summary,
        grad=grad_summary,
        fim=fim,
        **_unit_counts(moments),
        **_outliers(moments),
        sampling=_sampling(moments, with_grad=status == "ok"),
        **common,  # type: ignore[arg-type]
    )


def _sampling(moments: LayerMoments, with_grad: bool) -> dict[str, tuple[int, float]]:
    """``{moment: (rows kept, relative error of λmax)}`` of the sampled moments."""
    found: dict[str, tuple[int, float]] = {}
    for moment, rows, tally in (
        ("input", moments.input_rows, moments.input_sampling),
        ("grad", moments.grad_rows, moments.grad_sampling),
    ):
        if tally is not None and (moment == "input" or with_grad):
            found[moment] = (kept_of(rows, tally), tally.relative_error())
    if found and with_grad and moments.input_second_moment is not None:
        errors = [found[m][1] if m in found else 0.0 for m in ("input", "grad")]
        found["fim"] = (0, math.hypot(*errors))
    return found


def _outliers(moments: LayerMoments) -> dict[str, Any]:
    """The outlier-feature reading of Σx's diagonal (dense, or the exact diagonal a sketch
    keeps); none for an embedding (its diagonal is token frequencies) or without a diagonal."""
    matrix = moments.input_second_moment
    diagonal = (
        matrix.diagonal
        if isinstance(matrix, (SketchedMoment, RemoteMoment))
        else matrix.diagonal()
        if isinstance(matrix, Tensor) and matrix.dim() == 2
        else None
    )
    if diagonal is None or diagonal.numel() < 2:
        return {}
    if moments.input_homogeneous:  # the constant 1 of the rows is no feature
        diagonal = diagonal[:-1]
    found = outlier_feature(diagonal)
    return dict(input_outlier_ratio=found.ratio, input_outlier_feature=found.feature if found.ratio else None)


def _unit_counts(moments: LayerMoments) -> dict[str, Any]:
    """Dead and always-active input units; for an embedding, its unused table rows instead (a
    token or position the window's batches did not hold is not a dead unit)."""
    if moments.lookup_table:
        return dict(dead_input_units=None, full_input_units=None, unused_rows=moments.dead_units)
    return dict(dead_input_units=moments.dead_units, full_input_units=moments.full_units, unused_rows=None)
