"""Mixture-of-experts layers: every expert of a fused expert module, and the router.

Hugging Face ``transformers`` keeps a mixture's experts as fused 3-D parameters (Mixtral's
``MixtralExperts``: ``gate_up_proj`` of shape ``(E, 2·d_ff, d)`` and ``down_proj`` of shape
``(E, d, d_ff)``; likewise Qwen-MoE, OLMoE, DeepSeek-V3, gpt-oss with its transposed, biased
layout), and runs them through one of several kernels chosen by
``config._experts_implementation``: a per-expert loop over views of the weight (``"eager"``),
``torch.bmm`` on gathered weights (``"batched_mm"``) or a grouped GEMM (``"grouped_mm"``, the
default). Rather than trace each kernel, the capture reads the module where every kernel
agrees: its call ``experts(hidden_states, top_k_index, top_k_weights)`` and the gradient at its
output. For expert ``e`` and the token slots routed to it:

* Σx of ``gate_up_proj.e``: the hidden states of its tokens (unweighted: the routing weight
  multiplies the expert's output, not its input);
* Σ∇h of ``down_proj.e``: ``w_{t,e} · ∂L/∂y_t`` (the routing weight times the gradient at the
  block's output: the gradient at the expert's own output);
* Σx of ``down_proj.e`` and Σ∇h of ``gate_up_proj.e``: from one recomputation, in the backward
  pass, of the expert's gated activation on its tokens (the module's own ``_apply_gate``,
  differentiated by autograd), so any gating, bias or layout is honoured.

Each ``(projection, expert)`` is a layer of its own (``<module>.gate_up_proj.3``), with the same
summaries as any layer; memory and the plan count E experts as E layers. Training is untouched:
the recomputation runs on detached copies, on analysed steps only. A router (a module holding an
``(E, d)`` weight it applies with ``F.linear``) is a linear layer over the hidden state, captured
through the functional path (:mod:`~lightning_conditioning.capture.functional`).
``nn.ModuleList`` experts (older models) are ``nn.Linear`` layers already.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_conditioning.capture.expert_adapters import ExpertLayout, ExpertProjectionAdapter
from lightning_conditioning.capture.rows import in_dtype, without_autocast

__all__ = ["ExpertsCapture", "CaptureState"]


class CaptureState(Protocol):
    """What the experts share with their :class:`~lightning_conditioning.capture.hooks.LayerCapture`."""

    late_gradients: int

    @property
    def layers(self) -> Mapping[str, tuple[nn.Module, Any]]: ...
    @property
    def windows(self) -> Mapping[str, Any]: ...
    @property
    def turn(self) -> frozenset[str] | None: ...
    @property
    def active(self) -> bool: ...
    @property
    def grad_multiplier(self) -> float: ...
    @property
    def generation(self) -> int: ...
    def dtype_for(self, tensor: Tensor) -> torch.dtype: ...
    def routed_examples(self, tokens: int) -> int: ...


def _call_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any, Any]:
    """``(hidden_states, top_k_index, top_k_weights)`` of an expert module's call."""
    names = (("hidden_states",), ("top_k_index", "router_indices"), ("top_k_weights", "routing_weights"))
    found = list(args[:3]) + [None] * (3 - min(len(args), 3))
    for position, aliases in enumerate(names):
        if found[position] is None:
            found[position] = next((kwargs[a] for a in aliases if a in kwargs), None)
    return found[0], found[1], found[2]


def _project(module: nn.Module, layout: ExpertLayout, name: str, expert: int, rows: Tensor) -> Tensor:
    """``rows`` through one expert's projection (with its bias), in the weights' dtype."""
    weight = getattr(module, name)[expert].detach()
    rows = rows.to(weight.dtype)
    out = rows @ weight if layout.transposed else F.linear(rows, weight)
    if layout.bias and (bias := getattr(module, f"{name}_bias", None)) is not None:
        out = out + bias[expert].detach()
    return out


class ExpertsCapture:
    """The hooks of the fused expert modules a :class:`~lightning_conditioning.capture.hooks.LayerCapture`
    analyses: each expert's rows are added to its layers' windows (see the module docstring).

    Args:
        capture: the capture whose windows, turn, scale and state the experts share.
    """

    def __init__(self, capture: CaptureState) -> None:
        self.capture = capture
        #: ``{id(module): (module, layout, {(projection, expert): layer name})}``
        self.modules: dict[int, tuple[nn.Module, ExpertLayout, dict[tuple[str, int], str]]] = {}
        #: ``{layer: (expert module, expert, experts)}`` of every expert layer
        self.slots: dict[str, tuple[str, int, int]] = {}
        for name, (module, adapter) in capture.layers.items():
            if isinstance(adapter, ExpertProjectionAdapter):
                entry = self.modules.setdefault(id(module), (module, adapter.layout, {}))
                entry[2][(adapter.parameter, adapter.expert)] = name
                owner = name[: -len(f".{adapter.parameter}.{adapter.expert}")]
                self.slots[name] = (owner, adapter.expert, adapter.layout.experts)

    def attach(self) -> list[RemovableHandle]:
        """Register one forward hook per expert module; returns the handles."""
        return [
            module.register_forward_hook(
                torch.compiler.disable(functools.partial(self._forward, key)), with_kwargs=True
            )
            for key, (module, _, _) in self.modules.items()
        ]

    def _wanted(self, layers: dict[tuple[str, int], str]) -> dict[tuple[str, int], str]:
        turn = self.capture.turn
        return layers if turn is None else {k: v for k, v in layers.items() if v in turn}

    def _forward(self, key: int, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        capture = self.capture
        if not capture.active or torch._C._current_graph_task_id() != -1:
            return
        hidden, index, weights = _call_arguments(args, kwargs)
        if not all(isinstance(t, Tensor) for t in (hidden, index, weights, output)):
            return
        _, layout, layers = self.modules[key]
        layers = self._wanted(layers)
        if not layers:
            return
        for name in layers.values():  # the model moved after attach(): follow it
            if capture.windows[name].device != hidden.device:
                capture.windows[name].to(hidden.device)
        hidden = hidden.detach().reshape(-1, hidden.shape[-1])
        index = index.detach().reshape(hidden.shape[0], -1)
        routes = [
            (found[0], found[1])  # (tokens, slots) routed to each expert
            for found in (torch.where(index == e) for e in range(layout.experts))
        ]
        first = layout.projections[0]
        with torch.no_grad(), without_autocast(hidden.device):
            for e, (tokens, _) in enumerate(routes):
                found = layers.get((first, e))
                if found is None or tokens.numel() == 0:
                    continue
                name = found
                window = capture.windows[name]
                rows = in_dtype(hidden[tokens], capture.dtype_for(hidden), window.input)
                adapter = capture.layers[name][1]
                window.add_units(*(u.to(torch.float64) for u in adapter.accumulate_input(module, rows, window.input)))
                window.input.note_precision(hidden.dtype)
        if output.requires_grad:
            scale = capture.routed_examples(int(hidden.shape[0]))
            output.register_hook(
                functools.partial(
                    self._backward,
                    module,
                    layout,
                    layers,
                    hidden,
                    weights.detach().reshape(index.shape),
                    routes,
                    scale,
                    capture.generation,
                )
            )

    def _backward(
        self,
        module: nn.Module,
        layout: ExpertLayout,
        layers: dict[tuple[str, int], str],
        hidden: Tensor,
        weights: Tensor,
        routes: list[tuple[Tensor, Tensor]],
        scale: int,
        generation: int,
        grad: Tensor,
    ) -> None:
        capture = self.capture
        if generation != capture.generation:
            capture.late_gradients += 1
            return
        first, second = layout.projections
        factor = float(scale * capture.grad_multiplier) ** 2
        grad = grad.detach().reshape(-1, grad.shape[-1])
        with without_autocast(grad.device):
            for e, (tokens, slots) in enumerate(routes):
                if tokens.numel() == 0 or not ({(first, e), (second, e)} & layers.keys()):
                    continue
                with torch.enable_grad():
                    pre = _project(module, layout, first, e, hidden[tokens]).detach().requires_grad_()
                    gated = module._apply_gate(pre) if layout.gate else module.act_fn(pre)  # type: ignore[operator]
                out_grad = (grad[tokens] * weights[tokens, slots, None].to(grad.dtype)).to(gated.dtype)
                if layout.post_norm:  # the gradient at the expert's output, before its norm
                    with torch.enable_grad():
                        out = _project(module, layout, second, e, gated.detach()).detach().requires_grad_()
                        (out_grad,) = torch.autograd.grad(module.post_expert_norm(out), out, out_grad)  # type: ignore[operator]
                if (name := layers.get((second, e))) is not None:
                    self._add(name, module, gated.detach(), out_grad, factor, in_dtype)
                if (name := layers.get((first, e))) is not None:
                    down = getattr(module, second)[e].detach()
                    inner = out_grad @ (down.T if layout.transposed else down)
                    (pre_grad,) = torch.autograd.grad(gated, pre, inner)
                    window = capture.windows[name]
                    with torch.no_grad():
                        capture.layers[name][1].accumulate_grad(
                            module, in_dtype(pre_grad, capture.dtype_for(pre_grad), window.grad), window.grad, factor
                        )
                    window.grad.note_precision(pre_grad.dtype)

    def _add(
        self, name: str, module: nn.Module, inputs: Tensor, out_grad: Tensor, factor: float, in_dtype: Any
    ) -> None:
        """The second projection's input rows and output-gradient rows (both known in backward)."""
        capture = self.capture
        window = capture.windows[name]
        adapter = capture.layers[name][1]
        with torch.no_grad():
            rows = in_dtype(inputs, capture.dtype_for(inputs), window.input)
            window.add_units(*(u.to(torch.float64) for u in adapter.accumulate_input(module, rows, window.input)))
            window.input.note_precision(inputs.dtype)
            adapter.accumulate_grad(
                module, in_dtype(out_grad, capture.dtype_for(out_grad), window.grad), window.grad, factor
            )
            window.grad.note_precision(out_grad.dtype)
