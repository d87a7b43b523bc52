"""Flat logged keys <-> per-layer tables: the plain dictionaries the report and diagnosis use.

A *layer table* is an ordered ``{layer: {quantity: value}}`` dictionary whose quantities are
the last part of the logged keys (``input_lambda_max``, ``grad_kappa_100``,
``dead_input_units``, ``grad_weight_ratio``, …), optionally with ``input_units`` (the size of
Σx, known from the spectra file or from the results). Pure: no Lightning, no torch.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
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

#: per-layer quantities logged by WeightDominationCallback.
DOMINATION_QUANTITIES = frozenset({
    "grad_weight_ratio", "weight_spectral_norm", "grad_spectral_norm", "grad_weight_ratio_fro",
    "update_weight_ratio", "imbalance", "relative_imbalance",
})
_CONDITIONING = re.compile(r"^(?:(?:input|grad|fim)_(?:lambda_max|kappa_[0-9_]+)|(?:dead|full)_input_units)$")


def percent_text(fragment: str) -> str:
    """The percent a key fragment stands for (the inverse of ``spectra.format_percent``).

    Example:
        >>> percent_text("99_5"), percent_text("50")
        ('99.5', '50')
    """
    return fragment.replace("_", ".")


def kappa_percents(
    table: Mapping[str, Mapping[str, float]], labels: tuple[str, ...] = ("input", "grad", "fim")
) -> list[str]:
    """The ``p`` fragments of every ``{label}_kappa_{p}`` key, sorted numerically.

    Example:
        >>> kappa_percents({"fc": {"input_kappa_100": 1.0, "grad_kappa_99_5": 2.0}})
        ['99_5', '100']
        >>> kappa_percents({"fc": {"input_kappa_100": 1.0, "grad_kappa_99_5": 2.0}}, ("input",))
        ['100']
    """
    pattern = re.compile(rf"^(?:{'|'.join(map(re.escape, labels))})_kappa_([0-9_]+)$")
    found = {m.group(1) for row in table.values() for k in row if (m := pattern.match(k))}
    return sorted(found, key=lambda p: float(percent_text(p)))


def is_conditioning_quantity(quantity: str) -> bool:
    """Whether ``quantity`` is one of ConditioningCallback's per-layer scalars.

    Example:
        >>> is_conditioning_quantity("grad_kappa_99_5"), is_conditioning_quantity("loss")
        (True, False)
    """
    return _CONDITIONING.match(quantity) is not None


@dataclass
class SplitMetrics:
    """The conditioning and weight-domination scalars of one step, as layer tables."""

    conditioning: LayerTable = field(default_factory=dict)
    domination: LayerTable = field(default_factory=dict)
    dominated_layers: float | None = None


def split_metrics(metrics: Mapping[str, float]) -> SplitMetrics:
    """Sort flat logged keys ``{prefix}/{layer}/{quantity}`` into layer tables.

    Any prefix works (also a logger prefix such as ``train-conditioning``): the quantity is the
    last part of the key and the layer the part before it (module names never hold ``/``).
    Other keys are ignored. Layers keep their first-seen order.

    Example:
        >>> split = split_metrics({"conditioning/fc/input_lambda_max": 2.0, "loss": 1.0,
        ...                        "weight_domination/fc/grad_weight_ratio": 0.1,
        ...                        "weight_domination/dominated_layers": 0.0})
        >>> split.conditioning, split.domination, split.dominated_layers
        ({'fc': {'input_lambda_max': 2.0}}, {'fc': {'grad_weight_ratio': 0.1}}, 0.0)
    """
    out = SplitMetrics()
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) >= 2 and parts[-1] == "dominated_layers":
            out.dominated_layers = float(value)
            continue
        if len(parts) < 3:
            continue
        layer, quantity = parts[-2], parts[-1]
        if is_conditioning_quantity(quantity):
            out.conditioning.setdefault(layer, {})[quantity] = float(value)
        elif quantity in DOMINATION_QUANTITIES:
            out.domination.setdefault(layer, {})[quantity] = float(value)
    return out


class _HasMetrics(Protocol):
    @property
    def input_units(self) -> int: ...

    def metrics(self, prefix: str = ...) -> dict[str, float]: ...


def conditioning_table(results: Mapping[str, _HasMetrics]) -> LayerTable:
    """A layer table from ``ConditioningCallback.results`` (``input_units`` included).

    Layers without finite numbers (status ``no_data`` / ``nonfinite``) are left out.

    Example::

        table = conditioning_table(callback.results)
        table["fc"]["input_lambda_max"], table["fc"]["input_units"]
    """
    table: LayerTable = {}
    for name, result in results.items():
        row = split_metrics(result.metrics("c")).conditioning.get(name)
        if row:
            row["input_units"] = float(result.input_units)
            table[name] = row
    return table


def natural_key(name: str) -> tuple[object, ...]:
    """Sort key that puts ``net.2`` before ``net.10`` (used when module order is unknown).

    Example:
        >>> sorted(["net.10", "net.2", "fc"], key=natural_key)
        ['fc', 'net.2', 'net.10']
    """
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", name) if part)


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
