"""Plain-text per-layer table of one step."""

from __future__ import annotations

import math
from collections.abc import Mapping

from lightning_conditioning.report.metrics import LayerTable, kappa_percents, percent_text

__all__ = ["format_layer_table"]


def _number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.3g}"


def _units(row: Mapping[str, float], key: str) -> str:
    if key not in row:
        return "-"
    count = row[key]
    units = row.get("input_units")
    return f"{count:.0f}/{units:.0f}" if units else f"{count:.0f}"


def format_layer_table(conditioning: LayerTable, domination: LayerTable | None = None) -> str:
    """One row per layer: λmax and κ (largest p logged) of Σx, Σ∇h and the sub-FIM, dead and
    full units, and the weight-domination ratios when given.

    Example:
        >>> print(format_layer_table({"fc": {"input_lambda_max": 2.0, "input_kappa_100": 40.0,
        ...                                  "dead_input_units": 1.0, "input_units": 8.0}}))
        #  layer  λmax(Σx)  κ100(Σx)  λmax(Σ∇h)  κ100(Σ∇h)  λmax(F)  κ100(F)  dead  full
        1  fc     2         40        -          -          -        -        1/8   -
    """
    domination = domination or {}
    percents = kappa_percents(conditioning)
    p = percents[-1] if percents else None
    kappa = f"κ{percent_text(p)}" if p else "κ"
    header = ["#", "layer"]
    for label in ("Σx", "Σ∇h", "F"):
        header += [f"λmax({label})", f"{kappa}({label})"]
    header += ["dead", "full"]
    with_domination = bool(domination)
    if with_domination:
        header += ["∇W/W", "ΔW/W"]
    rows = [header]
    for index, (name, row) in enumerate(conditioning.items(), start=1):
        cells = [str(index), name]
        for label in ("input", "grad", "fim"):
            cells.append(_number(row.get(f"{label}_lambda_max")))
            cells.append(_number(row.get(f"{label}_kappa_{p}")) if p else "-")
        cells += [_units(row, "dead_input_units"), _units(row, "full_input_units")]
        if with_domination:
            dom = domination.get(name, {})
            cells += [_number(dom.get("grad_weight_ratio")), _number(dom.get("update_weight_ratio"))]
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)
