"""Plain-text per-layer table of one step.

A κ_p that is not a measurement is printed as what it is (:func:`schema.kappa_reading`): a
lower bound as ``≥1.2e+06`` (λ_p under the resolution floor), a structural zero λ_p as ``∞``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from lightning_conditioning import schema
from lightning_conditioning.views.tables import LayerTable, headline_percent, percent_text

__all__ = ["format_layer_table", "kappa_cell"]

_MATRICES = (("input", "Σx"), ("grad", "Σ∇h"), ("fim", "F"))
#: matrices whose numerical rank gets a column (the sub-FIM's is the product of theirs)
_RANKED = ("input", "grad")


def _number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3g}"


def kappa_cell(row: Mapping[str, float], moment: str, percent: str | None) -> str:
    """κ_p of ``moment`` as printed: the number, ``≥`` a lower bound, ``∞``, or ``-``.

    Example:
        >>> row = {"input_kappa_80": 40.0, "grad_kappa_80_lower_bound": 1.23e6,
        ...        "fim_kappa_80_infinite": 1.0}
        >>> [kappa_cell(row, m, "80") for m in ("input", "grad", "fim")], kappa_cell(row, "input", "50")
        (['40', '≥1.23e+06', '∞'], '-')
    """
    reading = schema.kappa_reading(row, moment, percent) if percent else None
    if reading is None:
        return "-"
    value, status = reading
    if status == "infinite":
        return "∞"
    return {"lower_bound": "≥", "estimate": "≈"}.get(status, "") + _number(value)


def _rank(row: Mapping[str, float], moment: str) -> str:
    """``rank/size`` when the size is known, else the rank, or ``-``."""
    rank = row.get(schema.rank_quantity(moment))
    if rank is None:
        return "-"
    size = row.get(schema.dim_quantity(moment))
    return f"{rank:.0f}/{size:.0f}" if size else f"{rank:.0f}"


def _units(row: Mapping[str, float], key: str) -> str:
    if key not in row:
        return "-"
    count = row[key]
    units = row.get("input_units")
    return f"{count:.0f}/{units:.0f}" if units else f"{count:.0f}"


def _header(kappa: str, with_domination: bool) -> list[str]:
    header = ["#", "layer"]
    for moment, label in _MATRICES:
        header += [f"λmax({label})", f"{kappa}({label})"]
        if moment in _RANKED:
            header.append(f"rank({label})")
    header += ["dead", "full", "outlier"]
    return header + (["∇W/W", "ΔW/W"] if with_domination else [])


def format_layer_table(conditioning: LayerTable, domination: LayerTable | None = None) -> str:
    """One row per layer: λmax and κ (the p the diagnosis quotes, :func:`headline_percent`) of
    Σx, Σ∇h and the sub-FIM, the
    numerical ranks of Σx and Σ∇h (``rank/size`` when the size is known), dead and full
    units, the outlier-feature ratio of Σx (``max_i Σx_ii / median_i Σx_ii``), and the
    weight-domination ratios when given. κ cells: see :func:`kappa_cell`.

    Example:
        >>> print(format_layer_table({"fc": {"input_lambda_max": 2.0, "input_kappa_100": 40.0,
        ...                                  "input_rank": 7.0, "input_dim": 8.0,
        ...                                  "grad_kappa_100_lower_bound": 3e9,
        ...                                  "dead_input_units": 1.0, "input_units": 8.0,
        ...                                  "input_outlier_ratio": 3.5}}))
        #  layer  λmax(Σx)  κ100(Σx)  rank(Σx)  λmax(Σ∇h)  κ100(Σ∇h)  rank(Σ∇h)  λmax(F)  κ100(F)  dead  full  outlier
        1  fc     2         40        7/8       -          ≥3e+09     -          -        -        1/8   -     3.5
    """
    domination = domination or {}
    p = headline_percent(conditioning)
    with_domination = bool(domination)
    rows = [_header(f"κ{percent_text(p)}" if p else "κ", with_domination)]
    for index, (name, row) in enumerate(conditioning.items(), start=1):
        cells = [str(index), name]
        for moment, _ in _MATRICES:
            cells += [_number(row.get(schema.lambda_max_quantity(moment))), kappa_cell(row, moment, p)]
            if moment in _RANKED:
                cells.append(_rank(row, moment))
        if "unused_rows" in row:  # an embedding: table rows the window did not look up
            cells += [_units(row, "unused_rows") + " unused", "-"]
        else:
            cells += [_units(row, "dead_input_units"), _units(row, "full_input_units")]
        cells.append(_number(row.get("input_outlier_ratio")))
        if with_domination:
            dom = domination.get(name, {})
            cells += [_number(dom.get("grad_weight_ratio")), _number(dom.get("update_weight_ratio"))]
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)
