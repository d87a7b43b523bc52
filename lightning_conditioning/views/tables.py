"""Flat logged keys <-> per-layer tables: the plain dictionaries the report and diagnosis use.

A *layer table* is an ordered ``{layer: {quantity: value}}`` dictionary whose quantities are
the last part of the logged keys (``input_lambda_max``, ``input_rank``, ``grad_kappa_100``,
``grad_kappa_80_lower_bound``, ``dead_input_units``, ``grad_weight_ratio``, …), optionally
with ``input_units`` (input features / channels) and ``input_dim`` / ``grad_dim`` (the sizes of
Σx and Σ∇h), known from the spectra file or from the results. Every key name comes from
:mod:`lightning_conditioning.schema`; the names it exports are re-exported here for
compatibility. Pure: no Lightning, no torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from lightning_conditioning import schema
from lightning_conditioning.schema import DOMINATION_QUANTITIES, is_conditioning_quantity, percent_text

__all__ = [
    "headline_percent",
    "LayerTable",
    "SplitMetrics",
    "DOMINATION_QUANTITIES",
    "is_conditioning_quantity",
    "split_metrics",
    "conditioning_table",
    "natural_key",
    "percent_text",
    "kappa_percents",
]

#: ``{layer: {quantity: value}}`` in module order.
LayerTable = dict[str, dict[str, float]]


def kappa_percents(table: Mapping[str, Mapping[str, float]], labels: tuple[str, ...] = schema.MOMENTS) -> list[str]:
    """The ``p`` fragments of every κ_p key of ``labels`` (measurements, lower bounds and
    infinite markers alike), sorted numerically.

    Example:
        >>> kappa_percents({"fc": {"input_kappa_100": 1.0, "grad_kappa_99_5": 2.0}})
        ['99_5', '100']
        >>> kappa_percents({"fc": {"input_kappa_100": 1.0, "grad_kappa_99_5": 2.0}}, ("input",))
        ['100']
        >>> kappa_percents({"fc": {"grad_kappa_50_lower_bound": 9e9, "fim_kappa_80_infinite": 1.0}})
        ['50', '80']
    """
    found = {
        parsed.percent
        for row in table.values()
        for quantity in row
        if (parsed := schema.parse_quantity(quantity)) is not None
        and parsed.kind == "kappa"
        and parsed.moment in labels
        and parsed.percent is not None
    }
    return sorted(found, key=lambda p: float(percent_text(p)))


@dataclass
class SplitMetrics:
    """The conditioning and weight-domination scalars of one step, as layer tables."""

    conditioning: LayerTable = field(default_factory=dict)
    domination: LayerTable = field(default_factory=dict)
    dominated_layers: float | None = None


def split_metrics(metrics: Mapping[str, float]) -> SplitMetrics:
    """Sort flat logged keys ``{prefix}/{layer}/{quantity}`` into layer tables.

    Any prefix works (also a logger prefix such as ``train-conditioning``): the quantity is the
    last part of the key and the layer the part before it (:func:`schema.split_key`). Every
    quantity :func:`schema.parse_quantity` knows goes to its table (ranks and the κ_p markers
    ``_lower_bound`` / ``_infinite`` included); other keys are ignored. Layers keep their
    first-seen order.

    Example:
        >>> split = split_metrics({"conditioning/fc/input_lambda_max": 2.0, "loss": 1.0,
        ...                        "conditioning/fc/grad_kappa_80_lower_bound": 9e9,
        ...                        "weight_domination/fc/grad_weight_ratio": 0.1,
        ...                        "weight_domination/dominated_layers": 0.0})
        >>> split.conditioning
        {'fc': {'input_lambda_max': 2.0, 'grad_kappa_80_lower_bound': 9000000000.0}}
        >>> split.domination, split.dominated_layers
        ({'fc': {'grad_weight_ratio': 0.1}}, 0.0)
    """
    out = SplitMetrics()
    for logged, value in metrics.items():
        if logged.rsplit("/", 1)[-1] == schema.DOMINATED_LAYERS and "/" in logged:
            out.dominated_layers = float(value)
            continue
        split = schema.split_key(logged)
        parsed = schema.parse_quantity(split[1]) if split is not None else None
        if split is None or parsed is None or parsed.kind == "log10":
            continue  # log10_… are TensorBoard's chart copies of quantities read here anyway
        layer, quantity = split
        target = out.domination if parsed.kind == "domination" else out.conditioning
        target.setdefault(layer, {})[quantity] = float(value)
    return out


class _HasDim(Protocol):
    @property
    def dim(self) -> int: ...


class _HasMetrics(Protocol):
    @property
    def input_units(self) -> int: ...

    @property
    def input(self) -> _HasDim | None: ...

    @property
    def grad(self) -> _HasDim | None: ...

    def metrics(self, prefix: str = ...) -> dict[str, float]: ...


def conditioning_table(results: Mapping[str, _HasMetrics]) -> LayerTable:
    """A layer table from ``ConditioningCallback.results``, with ``input_units`` and the sizes
    ``input_dim`` / ``grad_dim`` of Σx / Σ∇h (what a rank is out of).

    Layers without finite numbers (status ``no_data`` / ``nonfinite``) are left out.

    Example::

        table = conditioning_table(callback.results)
        table["fc"]["input_lambda_max"], table["fc"]["input_units"], table["fc"]["grad_dim"]
    """
    table: LayerTable = {}
    for name, result in results.items():
        row = split_metrics(result.metrics("c")).conditioning.get(name)
        if row:
            row["input_units"] = float(result.input_units)
            for moment, summary in (("input", result.input), ("grad", result.grad)):
                if summary is not None:
                    row[schema.dim_quantity(moment)] = float(summary.dim)
            table[name] = row
    return table


def natural_key(name: str) -> tuple[object, ...]:
    """Sort key that puts ``net.2`` before ``net.10`` (used when module order is unknown).

    Example:
        >>> sorted(["net.10", "net.2", "fc"], key=natural_key)
        ['fc', 'net.2', 'net.10']
    """
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part)


def ordered(names: Iterable[str], known_order: Iterable[str] = ()) -> list[str]:
    """``names`` in ``known_order`` first, then the rest in natural order.

    Example:
        >>> ordered(["b", "net.10", "net.2"], known_order=["b"])
        ['b', 'net.2', 'net.10']
    """
    names = list(dict.fromkeys(names))
    rank = {name: i for i, name in enumerate(dict.fromkeys(known_order))}
    first = sorted((n for n in names if n in rank), key=rank.__getitem__)
    rest = sorted((n for n in names if n not in rank), key=natural_key)
    return first + rest


def headline_percent(
    table: Mapping[str, Mapping[str, float]], labels: tuple[str, ...] = ("input", "grad", "fim")
) -> str | None:
    """The p of the κ_p that the report's table shows and the diagnosis quotes: the smallest
    logged (κ_50 by default: the paper's Fig. 5 reading, defined for rank-deficient layers too).

    Example:
        >>> headline_percent({"fc": {"input_kappa_100": 1.0, "grad_kappa_50_infinite": 1.0}})
        '50'
    """
    percents = kappa_percents(table, labels)
    return percents[0] if percents else None
