"""Which layers a selection analyses, and why it analyses none: words for the user."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any

from torch import nn

from lightning_conditioning.registry import registered_layer_types
from lightning_conditioning.capture import find_layers
from lightning_conditioning.options import ConditioningOptions

__all__ = ["selection_problem"]


def selection_problem(model: nn.Module, options: ConditioningOptions,
                      layers: Mapping[str, Any]) -> str | None:
    """Why the selection analyses nothing, or which ``include`` pattern matched no layer; in
    words that name the filter and the layers it could have matched.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
        >>> print(selection_problem(model, ConditioningOptions(include=["head"]), {}))
        ... # doctest: +NORMALIZE_WHITESPACE
        include=['head'] matched none of the 2 analysable layers (patterns match the whole
        qualified name, e.g. '*head'): 0, 2. Nothing will be analysed.
    """
    analysable = list(find_layers(model, options.layer_types, None, None, options.conv_mode))
    kinds = options.layer_types or registered_layer_types()
    kind_names = ", ".join(sorted({kind.__name__.lstrip("_") for kind in kinds}))
    if not analysable:
        return (f"{type(model).__name__} has no layer of the analysed kinds ({kind_names}). "
                "Nothing will be analysed. Other kinds need an adapter (`register_adapter`).")
    shown = ", ".join(analysable[:12]) + (f", … ({len(analysable) - 12} more)" if len(analysable) > 12 else "")
    hint = "(patterns match the whole qualified name, e.g. '*head')"
    unmatched = [p for p in options.include or ()
                 if not any(fnmatch.fnmatchcase(name, p) for name in analysable)]
    if unmatched and not layers:
        return (f"include={list(unmatched)} matched none of the {len(analysable)} analysable layers "
                f"{hint}: {shown}. Nothing will be analysed.")
    if unmatched:
        return (f"include pattern(s) {unmatched} matched none of the {len(analysable)} analysable "
                f"layers {hint}: {shown}.")
    if not layers:
        return (f"exclude={list(options.exclude or ())} removed every layer that include kept; "
                f"the analysable layers are: {shown}. Nothing will be analysed.")
    return None

