"""The routing load of mixture-of-experts modules, read off their experts' results.

Each expert's layers count the rows routed to it (:mod:`~lightning_conditioning.capture.experts`;
all of them, also where row sampling kept fewer):
one row per (token, slot) pair that chose it, so with top-``k`` routing a token counts once for
each of its ``k`` experts, and the shares of a module's experts sum to 1. They are summed over
processes with the moments, so a distributed run reads the same loads as one process. Logged
per expert module (names: :mod:`~lightning_conditioning.schema`):

* ``load_share_e{e}``: the share of the module's routed slots that went to expert ``e``;
* ``load_imbalance``: the largest share times the number of experts (1: perfectly balanced,
  ``E``: one expert takes everything);
* ``load_entropy``: the entropy of the shares over its largest value, ``log E`` (1: balanced,
  0: one expert takes everything);
* ``dead_experts``: experts that received no token in the window.

A module is read only when the window holds every one of its experts (layers that take turns
through windows: :mod:`~lightning_conditioning.capture.turns`).

Example:
    >>> from types import SimpleNamespace
    >>> results = {f"moe.experts.gate_up_proj.{e}": SimpleNamespace(expert=("moe.experts", e, 3), routed_rows=rows)
    ...            for e, rows in enumerate([6, 2, 0])}
    >>> readings = routing_readings(results)["moe.experts"]
    >>> readings["load_share_e0"], readings["load_imbalance"], readings["dead_experts"]
    (0.75, 2.25, 1.0)
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from lightning_conditioning import schema

__all__ = ["routing_readings", "routing_metrics"]


def routing_readings(results: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """``{expert module: {quantity: value}}`` from the results of its experts' layers (each with
    ``expert = (module, expert, experts)`` and ``routed_rows``)."""
    rows: dict[str, dict[int, int]] = {}
    counts: dict[str, int] = {}
    for result in results.values():
        slot = getattr(result, "expert", None)
        if slot is None:
            continue
        module, expert, experts = slot
        counts[module] = experts
        seen = rows.setdefault(module, {})
        seen[expert] = max(seen.get(expert, 0), int(result.routed_rows or 0))
    out: dict[str, dict[str, float]] = {}
    for module, seen in rows.items():
        experts = counts[module]
        total = sum(seen.values())
        if len(seen) < experts or total == 0:
            continue  # not every expert in this window, or nothing routed at all
        shares = [seen[e] / total for e in range(experts)]
        readings = {schema.expert_quantity("load_share", e): share for e, share in enumerate(shares)}
        readings["load_imbalance"] = max(shares) * experts
        readings["load_entropy"] = (
            -sum(p * math.log(p) for p in shares if p > 0) / math.log(experts) if experts > 1 else 1.0
        )
        readings["dead_experts"] = float(sum(1 for e in range(experts) if seen[e] == 0))
        out[module] = readings
    return out


def routing_metrics(results: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The logged scalars ``{prefix}/{expert module}/{quantity}`` of :func:`routing_readings`."""
    return {
        schema.key(prefix, module, quantity): value
        for module, readings in routing_readings(results).items()
        for quantity, value in readings.items()
    }
