"""κ_p that are not measurements, per layer and matrix: the evidence of rank deficiency.

A κ_p logged under a marker key (:data:`lightning_conditioning.schema.KAPPA_MARKERS`) says its
``λ_p`` was not resolved: under the resolution floor (``_lower_bound``: κ_p is at least the
value) or exactly zero (``_infinite``: a structural zero: dead units, fewer analysed rows
than dimensions). Either way the matrix is (numerically) rank-deficient: with the paper's
definition at least ``100 − p`` % of its eigenvalues are lost. This module finds them in a
layer table and words them; :mod:`lightning_conditioning.views.diagnosis` turns them into a finding.
Pure: no Lightning, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from lightning_conditioning import schema
from lightning_conditioning.views.tables import kappa_percents, percent_text

__all__ = ["REMEDY", "remedy", "Unresolved", "unresolved_kappas", "describe"]


def remedy(statistics_float64: bool | None = None) -> str:
    """What to do about κ_p that are not measurements (the diagnosis' remedy). Float64
    statistics are suggested only where they were not in use (``None``: not known, e.g. a
    report read from logs).

    Example:
        >>> "statistics_dtype" in remedy(True), "statistics_dtype='float64'` lowers" in remedy(False)
        (False, True)
    """
    if statistics_float64:
        arithmetic = (
            "the spectrum spans more decades than float64 statistics resolve: "
            "`kappa_definition='nonzero'` measures κ_p over the resolved eigenvalues"
        )
    else:
        known = (
            ""
            if statistics_float64 is False
            else (
                " if the statistics were float32 (`statistics_dtype='auto'` is float64 but on GPUs "
                "whose float64 is slow)"
            )
        )
        arithmetic = (
            "the spectrum spans more decades than the arithmetic resolves: "
            f"`statistics_dtype='float64'` lowers the floor{known}, "
            "`kappa_definition='nonzero'` measures κ_p over the resolved eigenvalues"
        )
    return (
        "∞ from fewer analysed rows than dimensions: analyse more rows (a larger batch, "
        "`window_steps`, `probe_batches`); from dead units: see dead_units; a ≥ bound: "
        f"{arithmetic}; normalisation (BatchNorm, LayerNorm) improves the conditioning"
    )


#: the remedy when the statistics' precision is not known
REMEDY = remedy(None)


@dataclass(frozen=True)
class Unresolved:
    """The κ_p of one layer's matrix that are not measurements.

    Attributes:
        layer: the layer.
        moment: ``"input"`` (Σx), ``"grad"`` (Σ∇h) or ``"fim"`` (the sub-FIM).
        readings: ``((percent fragment, value, status), …)`` in increasing p; ``value`` is the
            lower bound, or ``inf`` for status ``"infinite"``.
        rank: the numerical rank, when logged.
        dim: the size of the matrix, when known (``{moment}_dim`` of the table).
        dead: dead input units (Σx only), when logged.
        unused: an embedding's table rows not looked up in the window (Σx only), when logged.
    """

    layer: str
    moment: str
    readings: tuple[tuple[str, float, str], ...]
    rank: float | None = None
    dim: float | None = None
    dead: float | None = None
    unused: float | None = None

    @property
    def infinite(self) -> bool:
        """Whether some ``λ_p`` is a structural zero."""
        return any(status == "infinite" for _, _, status in self.readings)


def _softmax_only(row: Mapping[str, float]) -> bool:
    """Whether the last layer's Σ∇h lost at most the one direction softmax takes (or its size
    is unknown, so that cannot be told apart)."""
    rank, dim = row.get(schema.rank_quantity("grad")), row.get(schema.dim_quantity("grad"))
    return rank is None or dim is None or dim - rank <= 1


def _non_measurements(row: Mapping[str, float], moment: str) -> tuple[tuple[str, float, str], ...]:
    """``(p, value, status)`` of each κ_p of ``moment`` in ``row`` that is not exact."""
    out = []
    for percent in kappa_percents({"row": row}, (moment,)):
        reading = schema.kappa_reading(row, moment, percent)
        if reading is not None and reading[1] not in schema.KAPPA_VALUES:
            out.append((percent, *reading))
    return tuple(out)


def unresolved_kappas(table: Mapping[str, Mapping[str, float]], last_layer: str | None = None) -> list[Unresolved]:
    """Every (layer, matrix) whose κ_p are not all measurements, in module then matrix order.

    The last layer's (``last_layer``, default the table's last) Σ∇h and sub-FIM are skipped
    when Σ∇h misses at most one direction: cross-entropy gradients with respect to the logits
    sum to zero, so that rank loss is expected, not a problem.

    Example:
        >>> table = {"a": {"input_kappa_80_infinite": 1.0, "input_rank": 6.0, "input_dim": 8.0,
        ...                "dead_input_units": 2.0, "grad_kappa_80": 5.0},
        ...          "out": {"grad_kappa_80_lower_bound": 1e12, "grad_rank": 9.0, "grad_dim": 10.0}}
        >>> [(u.layer, u.moment, u.readings, u.rank) for u in unresolved_kappas(table)]
        [('a', 'input', (('80', inf, 'infinite'),), 6.0)]
    """
    names = list(table)
    last = last_layer if last_layer is not None else (names[-1] if names else None)
    found: list[Unresolved] = []
    for name, row in table.items():
        for moment in schema.MOMENTS:
            if name == last and moment in ("grad", "fim") and _softmax_only(row):
                continue
            readings = _non_measurements(row, moment)
            if readings:
                found.append(
                    Unresolved(
                        name,
                        moment,
                        readings,
                        row.get(schema.rank_quantity(moment)),
                        row.get(schema.dim_quantity(moment)),
                        row.get("dead_input_units") if moment == "input" else None,
                        row.get("unused_rows") if moment == "input" else None,
                    )
                )
    return found


def _reading_text(percent: str, value: float, status: str) -> str:
    kappa = f"κ_{percent_text(percent)}"
    return f"{kappa} = ∞" if status == "infinite" else f"{kappa} ≥ {value:.3g}"


def describe(item: Unresolved) -> str:
    """One item in words: the readings, the rank (of the size when known) and the likely cause.

    Example:
        >>> describe(Unresolved("a", "input", (("80", float("inf"), "infinite"),), 6.0, 8.0, 2.0))
        'a Σx: κ_80 = ∞ (rank 6 of 8; 2 dead input units)'
        >>> describe(Unresolved("b", "grad", (("50", 3e11, "lower_bound"),), 3.0))
        'b Σ∇h: κ_50 ≥ 3e+11 (rank 3; λ_p under the resolution floor)'
    """
    readings = ", ".join(_reading_text(*reading) for reading in item.readings)
    notes = []
    if item.rank is not None:
        notes.append(f"rank {item.rank:.0f}" + (f" of {item.dim:.0f}" if item.dim else ""))
    if item.dead:
        notes.append(f"{item.dead:.0f} dead input units")
    elif item.unused:
        notes.append(f"{item.unused:.0f} table rows (tokens, positions) not in the window's batches")
    elif item.moment == "fim":
        notes.append(
            "a factor has a zero eigenvalue" if item.infinite else "products of Σx and Σ∇h eigenvalues under the floor"
        )
    elif item.infinite:
        notes.append("λ_p = 0: fewer analysed rows than dimensions, or dead units")
    else:
        notes.append("λ_p under the resolution floor")
    return f"{item.layer} {schema.MOMENT_SYMBOLS[item.moment]}: {readings} ({'; '.join(notes)})"
