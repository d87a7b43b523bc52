"""The functional path of the capture: layer weights used through ``F.linear`` / ``F.conv*`` /
``F.embedding`` inside another module's forward.

``nn.MultiheadAttention`` runs its projections with ``F.linear`` on its own parameters (a row
slice of the packed ``in_proj_weight`` for each of q, k and v) and on ``out_proj.weight``;
torchvision's Swin calls ``F.linear(x, self.qkv.weight, …)``. No module forward runs for those
layers, so no forward hook fires. While the capture is active, the forward of every *host* (a
module that owns such a weight, or the parent of an analysed layer) runs inside a
:class:`FunctionalCapture` ``TorchFunctionMode``: a call of one of those three functions whose
weight is an analysed layer's parameter (or a row slice of it) is handed to the capture with
its input and output; every other call passes straight through. A composite function that
would hide its inner calls from the mode (``F.multi_head_attention_forward``) runs as a
transparent copy of itself (:func:`_transparent`): the same code, so the same numbers. A call made by the layer's own
module forward is left to its forward hook (never counted twice). The mode is active only in
captured steps, so other steps pay nothing.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

__all__ = ["WeightUse", "weight_uses", "FunctionalCapture", "FUNCTIONS", "compiled"]

#: the functions whose weight argument is looked up, and the weight's position in their args
FUNCTIONS: dict[Callable[..., Any], int] = {
    F.linear: 1,
    F.embedding: 1,
    torch.conv1d: 1,
    torch.conv2d: 1,
    torch.conv3d: 1,
}


#: the kind of layer each function computes (a tied weight serves both an embedding and a
#: linear head: a call only feeds the layers of its kind)
KIND_OF: dict[Callable[..., Any], str] = {
    F.linear: "linear",
    F.embedding: "embedding",
    torch.conv1d: "conv",
    torch.conv2d: "conv",
    torch.conv3d: "conv",
}


@dataclass(frozen=True)
class WeightUse:
    """An analysed layer's share of a parameter: its output rows ``rows``, and the kind of
    call (:data:`KIND_OF`) that computes it."""

    layer: str
    rows: slice
    kind: str = "linear"


def compiled(model: nn.Module) -> bool:
    """Whether ``torch.compile`` wraps the model or a part of it (no ``TorchFunctionMode``
    then: a mode inside compiled code would recompile it).

    Example:
        >>> compiled(nn.Linear(2, 2))
        False
    """
    return any(
        type(m).__name__ == "OptimizedModule" or getattr(m, "_compiled_call_impl", None) is not None
        for m in model.modules()
    )


def layer_kind(module: nn.Module, adapter: Any) -> str:
    """``"embedding"``, ``"conv"`` or ``"linear"``: the function that computes the layer."""
    if getattr(adapter, "diagonal_input", False):
        return "embedding"
    return "conv" if isinstance(module, nn.modules.conv._ConvNd) else "linear"


def weight_uses(layers: Mapping[str, tuple[nn.Module, Any]]) -> dict[int, list[WeightUse]]:
    """``{id(parameter): [WeightUse, …]}`` for every layer whose adapter names a functional
    weight (:meth:`~lightning_conditioning.capture.adapters.LayerAdapter.functional_weight`).

    Example:
        >>> from lightning_conditioning.capture.hooks import find_layers
        >>> attention = nn.Sequential(nn.MultiheadAttention(4, 2))
        >>> uses = weight_uses(find_layers(attention))
        >>> [(u.layer, u.rows.start, u.rows.stop) for u in uses[id(attention[0].in_proj_weight)]]
        [('0.q_proj', 0, 4), ('0.k_proj', 4, 8), ('0.v_proj', 8, 12)]
    """
    uses: dict[int, list[WeightUse]] = {}
    for name, (module, adapter) in layers.items():
        found = adapter.functional_weight(module)
        if found is not None:
            parameter, rows = found
            uses.setdefault(id(parameter), []).append(WeightUse(name, rows, layer_kind(module, adapter)))
    return uses


def row_range(weight: Tensor) -> tuple[int, int, int] | None:
    """``(id of the parameter, first row, end row)`` when ``weight`` is a parameter or a
    contiguous block of its rows (``split``/``chunk``/slicing), else None.

    Example:
        >>> parameter = nn.Parameter(torch.zeros(6, 2))
        >>> first, second = parameter.split([2, 4])
        >>> row_range(second)[1:], row_range(parameter)[1:], row_range(parameter.T)
        ((2, 6), (0, 6), None)
    """
    base = weight._base if weight._base is not None else weight
    if base is weight:
        return id(weight), 0, int(weight.shape[0]) if weight.dim() else 0
    if (
        weight.dim() != base.dim()
        or weight.dim() == 0
        or weight.stride() != base.stride()
        or weight.shape[1:] != base.shape[1:]
    ):
        return None
    offset = int(weight.storage_offset()) - int(base.storage_offset())
    if offset % int(base.stride(0)):
        return None
    first = offset // int(base.stride(0))
    return id(base), first, first + int(weight.shape[0])


def _transparent(function: Callable[..., Any]) -> Callable[..., Any] | None:
    """The same Python function, run so that the functions it calls stay visible to the mode.

    A mode sees a composite function such as ``F.multi_head_attention_forward`` as one call
    and runs its body with the mode switched off, so its ``F.linear`` projections would go
    unseen. The copy has the same code and globals except ``has_torch_function`` (its own
    check for overrides), so it runs the very same operations (bit-identical results) while the
    mode stays on for what it calls. None when ``function`` is not a plain Python function.
    """
    code = getattr(function, "__code__", None)
    if code is None or "has_torch_function" not in code.co_names:
        return None
    names = dict(function.__globals__)
    names["has_torch_function"] = lambda *args, **kwargs: False
    copy = types.FunctionType(code, names, function.__name__, function.__defaults__, function.__closure__)
    copy.__kwdefaults__ = function.__kwdefaults__
    return copy


#: composite functions whose inner calls must stay visible (attention runs its projections)
_TRANSPARENT: dict[Callable[..., Any], Callable[..., Any]] = {
    function: copy for function in (F.multi_head_attention_forward,) if (copy := _transparent(function)) is not None
}


#: ``handler(function, args, kwargs, output)``: what the capture does with one matched call
CallHandler = Callable[[Callable[..., Any], tuple[Any, ...], dict[str, Any], Any], None]


class FunctionalCapture(TorchFunctionMode):
    """Hands every call of :data:`FUNCTIONS` with a known weight to ``handler`` (after running
    it unchanged); everything else runs as if the mode were not there.

    Args:
        known: ids of the parameters that analysed layers own (from :func:`weight_uses`).
        handler: called as ``handler(function, args, kwargs, output)``.

    Example:
        >>> layer = nn.Linear(3, 2)
        >>> seen = []
        >>> with FunctionalCapture({id(layer.weight)}, lambda f, a, k, out: seen.append(out.shape)):
        ...     _ = F.linear(torch.ones(5, 3), layer.weight) + F.linear(torch.ones(1, 3), torch.ones(2, 3))
        >>> seen
        [torch.Size([5, 2])]
    """

    def __init__(self, known: set[int], handler: CallHandler) -> None:
        super().__init__()
        self.known = known
        self.handler = handler

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        transparent = _TRANSPARENT.get(func)
        if transparent is not None:
            with self:  # the mode stays on inside (see _transparent)
                return transparent(*args, **kwargs)
        output = func(*args, **kwargs)
        position = FUNCTIONS.get(func)
        if position is not None:
            weight = args[position] if len(args) > position else kwargs.get("weight")
            if isinstance(weight, Tensor):
                base = weight._base if weight._base is not None else weight
                if id(base) in self.known:
                    self.handler(func, args, kwargs, output)
        return output
