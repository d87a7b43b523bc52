"""The stability margin of each layer: ``lr·λmax(F_k)`` against the step size a quadratic allows.

The paper's reading of λmax (Sec. 2): gradient descent on a quadratic diverges along an
eigen-direction whose ``lr·λ`` exceeds 2 (2(1+β) with heavy-ball momentum β).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch  # noqa: F401  (the examples)
from torch import Tensor, nn

from lightning_conditioning.analysis.results import LayerConditioning

__all__ = ["step_size_limits", "with_stability_margin"]


def step_size_limits(
    layers: Mapping[str, tuple[nn.Module, Any]], optimizer: Any
) -> tuple[dict[str, float], dict[str, float]]:
    """``({layer: lr}, {layer: limit})`` for the layers whose weight an SGD-family optimizer
    (one with ``momentum`` and ``dampening``: plain, heavy-ball and Nesterov SGD) updates. The
    limit is 2(1+β): gradient descent with heavy-ball momentum β is stable on a quadratic iff
    ``lr·λ < 2(1+β)`` for every eigenvalue λ. Adaptive optimizers precondition the step, so
    ``lr·λmax`` of the raw curvature says nothing about them: their layers are left out.

    Example:
        >>> layer = nn.Linear(2, 2)
        >>> sgd = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.5)
        >>> step_size_limits({"fc": (layer, None)}, sgd)
        ({'fc': 0.1}, {'fc': 3.0})
        >>> step_size_limits({"fc": (layer, None)}, torch.optim.Adam(layer.parameters()))
        ({}, {})
    """
    optimizers = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
    groups = {id(p): group for opt in optimizers for group in getattr(opt, "param_groups", [])
              for p in group.get("params", [])}
    rates: dict[str, float] = {}
    limits: dict[str, float] = {}
    for name, (module, _) in layers.items():
        group = groups.get(id(getattr(module, "weight", None)))
        if group is None or "dampening" not in group or "momentum" not in group:
            continue
        lr = group.get("lr")
        if isinstance(lr, Tensor):
            lr = float(lr)
        if not isinstance(lr, (int, float)):
            continue
        rates[name] = float(lr)
        limits[name] = 2.0 * (1.0 + float(group["momentum"]))
    return rates, limits


def with_stability_margin(
    results: Mapping[str, LayerConditioning],
    learning_rates: Mapping[str, float],
    limits: Mapping[str, float],
) -> dict[str, LayerConditioning]:
    """The results with each layer's stability margin: ``lr·λmax(F_k)`` against its step-size
    limit (2 for gradient descent, 2(1+β) with heavy-ball momentum β; a quadratic diverges along
    an eigen-direction whose ``lr·λ`` exceeds it), and ``λmax(F_k) / max_j λmax(F_j)``: with the
    block-diagonal approximation the whole model's bound is set by the largest block.

    Layers without a learning rate (frozen, or an optimizer without one) are left as they are.

    Example:
        >>> from lightning_conditioning.maths.accumulate import LayerMoments
        >>> from lightning_conditioning.analysis.results import analyse_layer
        >>> eye = torch.eye(2, dtype=torch.float64)
        >>> result = analyse_layer("fc", 0, LayerMoments(4 * eye, eye, 8, 8, torch.ones(2), torch.ones(2)))
        >>> with_stability_margin({"fc": result}, {"fc": 0.25}, {"fc": 2.0})["fc"].margin
        {'lr_lambda_max': 1.0, 'stability_limit': 2.0, 'lambda_max_share': 1.0}
    """
    peaks = [r.fim.lambda_max for r in results.values()
             if r.fim is not None and math.isfinite(r.fim.lambda_max)]
    largest = max(peaks, default=math.nan)
    out: dict[str, LayerConditioning] = {}
    for name, result in results.items():
        lr, limit = learning_rates.get(name), limits.get(name)
        if result.fim is None or lr is None or limit is None or not math.isfinite(result.fim.lambda_max):
            out[name] = result
            continue
        out[name] = replace(result, margin={
            "lr_lambda_max": lr * result.fim.lambda_max,
            "stability_limit": limit,
            "lambda_max_share": result.fim.lambda_max / largest if largest > 0 else math.nan,
        })
    return out
