"""The stability margin of each layer: ``lr·λmax(F_k)`` against the step size a quadratic allows.

The paper's reading of λmax (Sec. 2): gradient descent on a quadratic diverges along an
eigen-direction whose ``lr·λ`` exceeds 2 (2(1+β) with heavy-ball momentum β). Under Adam and
AdamW the step is preconditioned: ``lr·λmax(P⁻¹F_k)`` against ``2(1+β1)/(1−β1)``
(:mod:`lightning_conditioning.maths.preconditioned`), with ``P`` read off the optimizer's state.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch  # noqa: F401  (the examples)
from torch import Tensor, nn

from lightning_conditioning.analysis.results import LayerConditioning
from lightning_conditioning.distributed.collectives import Collectives
from lightning_conditioning.maths.accumulate import LayerMoments
from lightning_conditioning.maths.preconditioned import adam_stability_limit, preconditioned_sharpness, step_flops

__all__ = [
    "step_size_limits",
    "with_stability_margin",
    "AdamLayer",
    "adam_layers",
    "with_adam_margin",
    "Margins",
    "ADAM_FLOPS",
]

#: the most flops the Lanczos runs of one analysis may take on a CPU (about half a second of
#: one core: every layer up to about 256 wide); an accelerator's budget is 1000× that. Layers
#: past it get no Adam margin (the monitor says which, once)
ADAM_FLOPS = 4e9
#: fewest power steps a layer must be able to take within what is left of the budget
_MIN_STEPS = 10


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
    groups = {
        id(p): group
        for opt in optimizers
        for group in getattr(opt, "param_groups", [])
        for p in group.get("params", [])
    }
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
    results: Mapping[str, LayerConditioning], learning_rates: Mapping[str, float], limits: Mapping[str, float]
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
    peaks = [r.fim.lambda_max for r in results.values() if r.fim is not None and math.isfinite(r.fim.lambda_max)]
    largest = max(peaks, default=math.nan)
    out: dict[str, LayerConditioning] = {}
    for name, result in results.items():
        lr, limit = learning_rates.get(name), limits.get(name)
        if result.fim is None or lr is None or limit is None or not math.isfinite(result.fim.lambda_max):
            out[name] = result
            continue
        out[name] = replace(
            result,
            margin={
                "lr_lambda_max": lr * result.fim.lambda_max,
                "stability_limit": limit,
                "lambda_max_share": result.fim.lambda_max / largest if largest > 0 else math.nan,
            },
        )
    return out


@dataclass(frozen=True)
class AdamLayer:
    """What the Adam margin of one layer needs from the optimizer, taken when the window
    finished: its learning rate, ``β1``, and ``P⁻¹ = 1/(√v̂ + ε)`` of its weight laid out as
    ``(d_out, d_in)`` and of its bias (None without one)."""

    lr: float
    beta1: float
    inverse_preconditioner: Tensor
    bias_inverse: Tensor | None = None

    def for_input(self, input_dim: int) -> Tensor | None:
        """``P⁻¹`` matching a Σx of ``input_dim`` (the bias as a last column when Σx carries
        it); None when they do not match."""
        weight = self.inverse_preconditioner
        if input_dim == weight.shape[1]:
            return weight
        if input_dim == weight.shape[1] + 1 and self.bias_inverse is not None:
            return torch.cat([weight, self.bias_inverse.reshape(-1, 1)], dim=1)
        return None


def _flops(d_out: int, d_in: int, accelerated: bool) -> float:
    """One Lanczos step's flops, counted against the budget (an accelerator's at 1/1000)."""
    return step_flops(d_out, d_in) * (1e-3 if accelerated else 1.0)


def _adam_group(group: Mapping[str, Any], state: Mapping[str, Any]) -> bool:
    """An Adam-family state with a plain tensor (an FSDP2 ``DTensor`` shard would need a
    collective to be read whole: such layers get no Adam margin)."""
    second = state.get("exp_avg_sq")
    return (
        "betas" in group
        and "eps" in group
        and isinstance(second, Tensor)
        and type(second).__name__ != "DTensor"
        and "step" in state
        and not group.get("amsgrad", False)
    )


def _inverse(group: Mapping[str, Any], state: Mapping[str, Any]) -> Tensor:
    step = float(state["step"])
    second = state["exp_avg_sq"].detach().to(torch.float32) / (1.0 - float(group["betas"][1]) ** step)
    return 1.0 / (second.sqrt() + float(group["eps"]))


def adam_layers(
    layers: Mapping[str, tuple[nn.Module, Any]],
    optimizer: Any,
    budget: float | None = None,
    over_budget: list[str] | None = None,
) -> dict[str, AdamLayer]:
    """The :class:`AdamLayer` of every ``nn.Linear`` (and Hugging Face ``Conv1D``) whose weight an
    Adam-family optimizer (``betas``, ``eps`` and an ``exp_avg_sq`` state: Adam, AdamW; not
    AMSGrad) has stepped at least once, and whose Lanczos run can fit the flops ``budget``
    (default :data:`ADAM_FLOPS`): the others' preconditioners are neither computed nor copied
    (their names are added to ``over_budget``).

    Example:
        >>> layer = nn.Linear(3, 2)
        >>> adam = torch.optim.Adam(layer.parameters(), lr=0.1)
        >>> layer(torch.ones(1, 3)).sum().backward(); adam.step()
        >>> state = adam_layers({"fc": (layer, None)}, adam)["fc"]
        >>> state.lr, state.beta1, tuple(state.inverse_preconditioner.shape), tuple(state.for_input(4).shape)
        (0.1, 0.9, (2, 3), (2, 4))
    """
    optimizers = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
    found: dict[int, tuple[Mapping[str, Any], Mapping[str, Any]]] = {}
    for opt in optimizers:
        for group in getattr(opt, "param_groups", []):
            for p in group.get("params", []):
                found[id(p)] = (group, getattr(opt, "state", {}).get(p, {}))
    out: dict[str, AdamLayer] = {}
    for name, (module, _) in layers.items():
        weight = getattr(module, "weight", None)
        transposed = type(module).__name__ == "Conv1D"
        if not isinstance(weight, Tensor) or weight.dim() != 2 or not (isinstance(module, nn.Linear) or transposed):
            continue
        group, state = found.get(id(weight), ({}, {}))
        if not _adam_group(group, state) or not isinstance(group.get("lr"), (int, float)):
            continue
        if _MIN_STEPS * _flops(weight.shape[0], weight.shape[1], weight.is_cuda) > (budget or ADAM_FLOPS):
            if over_budget is not None:
                over_budget.append(name)
            continue
        inverse = _inverse(group, state)
        bias_group, bias_state = found.get(id(getattr(module, "bias", None)), ({}, {}))
        bias = _inverse(bias_group, bias_state) if _adam_group(bias_group, bias_state) else None
        out[name] = AdamLayer(
            float(group["lr"]), float(group["betas"][0]), (inverse.T if transposed else inverse).clone(), bias
        )
    return out


def with_adam_margin(
    results: Mapping[str, LayerConditioning],
    moments: Mapping[str, LayerMoments],
    adam: Mapping[str, AdamLayer],
    collectives: Collectives | None = None,
    *,
    budget: float | None = None,
) -> tuple[dict[str, LayerConditioning], list[str]]:
    """The results with the Adam margin of every layer in ``adam`` whose two moments are dense
    here: ``lr·λmax(P⁻¹F_k)`` (power iteration,
    :func:`~lightning_conditioning.maths.preconditioned.preconditioned_sharpness`), the limit
    ``2(1+β1)/(1−β1)``, the layer's share of the largest such sharpness, and
    ``margin_preconditioned = 1``. Under DDP the process that holds a layer's moments computes
    it and one all-reduce shares the values (every rank calls this with the same layers).
    Also returns the layers left without one (moments sketched or elsewhere, over the flops
    ``budget``, or not converged), for a note.
    """
    group = collectives or Collectives.local()
    names = sorted(adam)
    values = torch.full((len(names),), -1.0, dtype=torch.float64)
    left = budget if budget is not None else ADAM_FLOPS
    for i, name in enumerate(names):
        window = moments.get(name)
        a = None if window is None else window.input_second_moment
        g = None if window is None else window.grad_second_moment
        if not (isinstance(a, Tensor) and isinstance(g, Tensor) and a.dim() == g.dim() == 2):
            continue
        cost = _flops(g.shape[0], a.shape[0], a.is_cuda)
        inverse = adam[name].for_input(a.shape[0])
        if _MIN_STEPS * cost > left or inverse is None or inverse.shape[0] != g.shape[0]:
            continue
        steps = int(min(60, left // cost, 2**28 // (8 * inverse.numel())))  # its Krylov basis: ≤ 256 MiB
        sharpness = preconditioned_sharpness(a, g, inverse, steps=steps)
        left -= sharpness.steps * cost
        if sharpness.converged and math.isfinite(sharpness.value):
            values[i] = sharpness.value
    if group.distributed and names:
        values = group.all_reduce(values, "max")
    sharp = {name: float(values[i]) for i, name in enumerate(names) if values[i] >= 0}
    largest = max(sharp.values(), default=math.nan)
    out = dict(results)
    for name, value in sharp.items():
        if name in out:
            state = adam[name]
            out[name] = replace(
                out[name],
                margin={
                    "lr_lambda_max": state.lr * value,
                    "stability_limit": adam_stability_limit(state.beta1),
                    "lambda_max_share": value / largest if largest > 0 else math.nan,
                    "margin_preconditioned": 1.0,
                },
            )
    return out, [name for name in names if name not in sharp]


@dataclass(frozen=True)
class Margins:
    """What the stability margins need from the optimizer, read when a window finishes (in
    the training thread; the analysis may run later, in a worker): SGD-family learning rates
    and limits (:func:`step_size_limits`), Adam-family preconditioners (:func:`adam_layers`)."""

    rates: Mapping[str, float]
    limits: Mapping[str, float]
    adam: Mapping[str, AdamLayer]
    #: Adam layers whose Lanczos run cannot fit the budget (no preconditioner read)
    over_budget: tuple[str, ...] = ()

    @classmethod
    def read(cls, layers: Mapping[str, tuple[nn.Module, Any]], optimizer: Any) -> Margins | None:
        """None without an optimizer."""
        if optimizer is None:
            return None
        over: list[str] = []
        adam = adam_layers(layers, optimizer, over_budget=over)
        return cls(*step_size_limits(layers, optimizer), adam, tuple(over))

    def apply(
        self,
        results: Mapping[str, LayerConditioning],
        moments: Mapping[str, LayerMoments],
        collectives: Collectives | None = None,
    ) -> tuple[dict[str, LayerConditioning], list[str]]:
        """The results with their margins (before the moments are released); the Adam layers
        left without one."""
        out = with_stability_margin(results, self.rates, self.limits)
        missing: list[str] = []
        if self.adam:
            out, missing = with_adam_margin(out, moments, self.adam, collectives)
        return out, [*self.over_budget, *missing]
