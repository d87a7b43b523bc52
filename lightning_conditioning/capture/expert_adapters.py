"""Adapters of mixture-of-experts layers: the experts of a fused expert module, and routers.

The layer kinds :class:`FusedExperts` and :class:`Router` are structural: ``isinstance`` tests
what ``transformers`` gives every such module (any family: Mixtral, Qwen-MoE, OLMoE,
DeepSeek-V3, gpt-oss), so that no model library is imported here. How their rows are captured:
:mod:`lightning_conditioning.capture.experts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch  # noqa: F401  (the examples)
from torch import Tensor, nn

from lightning_conditioning.capture.adapters import LayerAdapter, LinearAdapter

__all__ = [
    "ExpertLayout",
    "expert_layout",
    "router_weight",
    "FusedExperts",
    "Router",
    "FusedExpertsAdapter",
    "ExpertProjectionAdapter",
    "RouterAdapter",
]


@dataclass(frozen=True)
class ExpertLayout:
    """How a fused expert module stores its weights (the attributes ``transformers`` sets).

    Attributes:
        experts: the number of experts ``E``.
        projections: the 3-D parameters, first applied first (``gate_up_proj``/``up_proj``,
            then ``down_proj``).
        transposed: weights stored ``(E, in, out)`` (gpt-oss) rather than ``(E, out, in)``.
        bias: each projection adds ``<projection>_bias[e]``.
        gate: the first projection feeds ``_apply_gate`` (else ``act_fn``).
        post_norm: each expert's output passes ``post_expert_norm`` before the routing weight.
    """

    experts: int
    projections: tuple[str, str]
    transposed: bool = False
    bias: bool = False
    gate: bool = True
    post_norm: bool = False


def expert_layout(module: nn.Module) -> ExpertLayout | None:
    """The layout of a fused expert module, or None for any other module.

    Recognised by what ``transformers``' ``use_experts_implementation`` gives every such class
    (``num_experts``, ``has_gate``, ``is_transposed``) and two 3-D parameters of ``E`` experts.

    Example:
        >>> class Experts(nn.Module):  # the shape of transformers' MixtralExperts
        ...     num_experts, has_gate, is_transposed, has_bias = 4, True, False, False
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.gate_up_proj = nn.Parameter(torch.zeros(4, 6, 2))
        ...         self.down_proj = nn.Parameter(torch.zeros(4, 2, 3))
        >>> layout = expert_layout(Experts())
        >>> layout.experts, layout.projections, layout.transposed
        (4, ('gate_up_proj', 'down_proj'), False)
        >>> expert_layout(nn.Linear(2, 2)) is None
        True
    """
    experts = getattr(module, "num_experts", None)
    if not isinstance(experts, int) or not hasattr(module, "is_transposed") or not hasattr(module, "has_gate"):
        return None
    gate = bool(module.has_gate)
    projections = ("gate_up_proj" if gate else "up_proj", "down_proj")
    for name in projections:
        weight = getattr(module, name, None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 3 or weight.shape[0] != experts:
            return None
    return ExpertLayout(
        experts,
        projections,
        bool(module.is_transposed),
        bool(getattr(module, "has_bias", False)),
        gate,
        bool(getattr(module, "has_post_expert_norm", False)),
    )


def router_weight(module: nn.Module) -> nn.Parameter | None:
    """The ``(E, d)`` weight of a top-k router (a module with ``num_experts``, ``top_k`` and
    that weight, which is not an ``nn.Linear``), or None.

    Example:
        >>> class Router(nn.Module):
        ...     num_experts, top_k = 4, 2
        ...     def __init__(self):
        ...         super().__init__(); self.weight = nn.Parameter(torch.zeros(4, 8))
        >>> tuple(router_weight(Router()).shape), router_weight(nn.Linear(8, 4))
        ((4, 8), None)
    """
    weight = getattr(module, "weight", None)
    experts = getattr(module, "num_experts", None)
    if (
        isinstance(module, nn.Linear)
        or not isinstance(weight, nn.Parameter)
        or weight.dim() != 2
        or not hasattr(module, "top_k")
        or weight.shape[0] != experts
    ):
        return None
    return weight


class _Structural(type):
    """A type whose ``isinstance`` is a test of a module's structure (for the registry)."""

    def __instancecheck__(cls, instance: Any) -> bool:
        test = cls.__dict__.get("matches")
        return isinstance(instance, nn.Module) and test is not None and test(instance)


class FusedExperts(nn.Module, metaclass=_Structural):
    """The layer kind of every fused expert module (:func:`expert_layout`): ``isinstance`` tests
    the structure, so ``layer_types=[FusedExperts]`` selects the experts of any family."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return expert_layout(module) is not None


class Router(nn.Module, metaclass=_Structural):
    """The layer kind of every top-k router (:func:`router_weight`)."""

    @staticmethod
    def matches(module: nn.Module) -> bool:
        return router_weight(module) is not None


class ExpertProjectionAdapter(LinearAdapter):
    """One expert's share of one fused projection: ``weight[expert]``, a linear layer whose rows
    are the tokens routed to the expert (filled by :class:`ExpertsCapture`).

    Example:
        >>> weight = nn.Parameter(torch.zeros(4, 6, 2))
        >>> holder = nn.Module(); holder.gate_up_proj = weight
        >>> ExpertProjectionAdapter("gate_up_proj", 3, ExpertLayout(4, ("gate_up_proj", "down_proj"))).dims(holder)
        (2, 6, 2)
    """

    module_hook = False  # fed by the expert module's own hook
    rows_are_last_dimension = False  # never shares a Σx

    def __init__(self, parameter: str, expert: int, layout: ExpertLayout) -> None:
        self.parameter, self.expert, self.layout = parameter, expert, layout

    def weight(self, module: nn.Module) -> Tensor:
        """The expert's matrix, ``(out, in)`` (transposed layouts are turned)."""
        weight = getattr(module, self.parameter)[self.expert]
        return weight.T if self.layout.transposed else weight

    def dims(self, module: nn.Module) -> tuple[int, int, int]:
        out_dim, in_dim = self.weight(module).shape
        return int(in_dim), int(out_dim), int(in_dim)

    def has_bias(self, module: nn.Module) -> bool:
        return self.layout.bias and getattr(module, f"{self.parameter}_bias", None) is not None

    def functional_weight(self, module: nn.Module) -> tuple[Tensor, slice] | None:
        return None

    def weight_of(self, module: nn.Module) -> tuple[Tensor, Any] | None:
        return getattr(module, self.parameter), self.expert

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.parameter!r}, expert={self.expert})"


class FusedExpertsAdapter(LayerAdapter):
    """A fused expert module as ``2·E`` layers, ``<projection>.<expert>``.

    Example:
        >>> class Experts(nn.Module):
        ...     num_experts, has_gate, is_transposed = 2, True, False
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.gate_up_proj = nn.Parameter(torch.zeros(2, 6, 4))
        ...         self.down_proj = nn.Parameter(torch.zeros(2, 4, 3))
        >>> list(FusedExpertsAdapter().sublayers(Experts()))
        ['gate_up_proj.0', 'down_proj.0', 'gate_up_proj.1', 'down_proj.1']
    """

    module_hook = False

    def sublayers(self, module: nn.Module) -> dict[str, LayerAdapter] | None:
        layout = expert_layout(module)
        assert layout is not None
        return {
            f"{name}.{e}": ExpertProjectionAdapter(name, e, layout)
            for e in range(layout.experts)
            for name in layout.projections
        }

    def dims(self, module: nn.Module) -> tuple[int, int, int]:
        raise TypeError("a fused expert module is analysed through its experts (sublayers)")

    def functional_weight(self, module: nn.Module) -> tuple[Tensor, slice] | None:
        return None

    def weight_of(self, module: nn.Module) -> tuple[Tensor, slice] | None:
        return None


class RouterAdapter(LinearAdapter):
    """A top-k router: ``F.linear(hidden, weight[, bias])`` over every token, seen through the
    functional path (its forward returns a tuple, so no forward hook could read it).

    Example:
        >>> class Router(nn.Module):
        ...     num_experts, top_k = 4, 2
        ...     def __init__(self):
        ...         super().__init__(); self.weight = nn.Parameter(torch.zeros(4, 8))
        >>> RouterAdapter().dims(Router())
        (8, 4, 8)
    """

    module_hook = False
    rows_are_last_dimension = False
    #: its rows are the flattened tokens: the examples of a batch-mean loss come from the model
    routed = True

    def dims(self, module: nn.Module) -> tuple[int, int, int]:
        weight = router_weight(module)
        assert weight is not None
        return int(weight.shape[1]), int(weight.shape[0]), int(weight.shape[1])
