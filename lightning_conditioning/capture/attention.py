"""Capture of attention logits and entropy (:mod:`~lightning_conditioning.maths.attention`).

Attention modules are found by kind: ``nn.MultiheadAttention``, and every module whose class
name ends in ``Attention`` (Hugging Face's ``GPT2Attention``, ``LlamaAttention``, …, timm's
``Attention``). While the capture is active:

* inside such a module's forward, a ``TorchFunctionMode`` reads every call of
  ``F.scaled_dot_product_attention`` (its ``query``, ``key``, mask, causal flag and scale: the
  tensors the model really attends with, after rotary embeddings) and credits it to the
  innermost attention module running;
* an ``nn.MultiheadAttention`` is read from its own inputs in a forward pre-hook (its q and k
  are its input projections; ``need_weights=True``, its default, computes the softmax without
  ``scaled_dot_product_attention``): ``attn_mask`` and ``key_padding_mask`` as it takes them
  (boolean True: may *not* attend), ``is_causal`` when no mask is given. Modules with
  ``bias_k`` / ``add_zero_attn`` are not read (said in :attr:`AttentionProbe.unread`).

Attention computed another way (an explicit ``softmax(q @ kᵀ)``, as Hugging Face's ``eager``
implementation does) is not seen; :attr:`AttentionProbe.unread` names the modules that ran
without a reading. Nothing is read in a ``torch.compile``-d model. Query positions are sampled
with the probe's own generator: training stays bit-identical.

Example:
    >>> mha = nn.MultiheadAttention(8, 2, batch_first=True)
    >>> probe = AttentionProbe(nn.Sequential(mha), active=lambda: True)
    >>> probe.attach()
    >>> x = torch.randn(3, 5, 8)
    >>> _ = mha(x, x, x)
    >>> reading = probe.take()["0"]
    >>> reading.heads, int(reading.rows.sum())
    (2, 30)
    >>> probe.detach()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_conditioning.capture.functional import compiled
from lightning_conditioning.capture.selection import user_name
from lightning_conditioning.maths.attention import QUERY_SAMPLE, AttentionReading, attention_reading

__all__ = ["AttentionProbe", "attention_modules"]


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The attention modules of ``model`` by name (see the module's docstring).

    Example:
        >>> list(attention_modules(nn.Sequential(nn.Linear(2, 2), nn.MultiheadAttention(4, 2))))
        ['1']
    """
    return {
        user_name(name): module
        for name, module in model.named_modules()
        if name and (isinstance(module, nn.MultiheadAttention) or type(module).__name__.endswith("Attention"))
    }


class _SdpaMode(TorchFunctionMode):
    """Hands every ``F.scaled_dot_product_attention`` call to ``handler`` (then runs it)."""

    def __init__(self, handler: Callable[[tuple[Any, ...], dict[str, Any]], None]) -> None:
        super().__init__()
        self.handler = handler

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.handler(args, kwargs)
        return func(*args, **kwargs)


class AttentionProbe:
    """Reads every attention module of ``model`` while ``active()`` is True.

    Args:
        model: the model.
        active: whether the passes running now are captured (the monitor's capture flag).
        sample: query positions read per call.
        seed: the seed of the probe's own generator.
    """

    def __init__(
        self, model: nn.Module, active: Callable[[], bool], *, sample: int = QUERY_SAMPLE, seed: int = 0
    ) -> None:
        #: the modules read (none in a compiled model: a mode inside compiled code would
        #: recompile it)
        self.modules = {} if compiled(model) else attention_modules(model)
        self.active = active
        self.sample = sample
        self._generator = torch.Generator().manual_seed(seed)
        self._stack: list[str] = []
        self._mode: _SdpaMode | None = None
        self._handles: list[Any] = []
        #: this window's readings by module name
        self.readings: dict[str, AttentionReading] = {}
        #: modules that ran in the window without a reading (attention computed another way)
        self.unread: set[str] = set()
        self._ran: set[str] = set()

    def attach(self) -> None:
        """Register the hooks (idempotent)."""
        if self._handles:
            return
        for name, module in self.modules.items():
            self._handles.append(
                module.register_forward_pre_hook(
                    torch.compiler.disable(lambda m, a, k, name=name: self._enter(name, m, a, k)), with_kwargs=True
                )
            )
            self._handles.append(
                module.register_forward_hook(
                    torch.compiler.disable(lambda m, a, o, name=name: self._leave(name)), always_call=True
                )
            )

    def detach(self) -> None:
        """Remove the hooks (the readings are kept)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        self._stack.clear()

    def take(self) -> dict[str, AttentionReading]:
        """The window's readings (the probe starts a new window)."""
        readings, self.readings = self.readings, {}
        # a module around a read one (BERT's BertAttention around its BertSelfAttention) is no gap
        self.unread = {
            name
            for name in self._ran
            if name not in readings and not any(read.startswith(name + ".") for read in readings)
        }
        self._ran = set()
        return readings

    def _record(self, name: str, reading: AttentionReading) -> None:
        found = self.readings.get(name)
        self.readings[name] = reading if found is None or found.heads != reading.heads else found.merge(reading)

    def _enter(self, name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self.active() or torch._C._current_graph_task_id() != -1:  # (a checkpoint's recomputation)
            return
        self._ran.add(name)
        if isinstance(module, nn.MultiheadAttention):
            self._read_multihead(name, module, args, kwargs)
        if not self._stack:
            self._mode = _SdpaMode(self._on_sdpa)
            self._mode.__enter__()
        self._stack.append(name)

    def _leave(self, name: str) -> None:
        if not self._stack or self._stack[-1] != name:
            return
        self._stack.pop()
        if not self._stack and self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None

    def _on_sdpa(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        name = self._stack[-1] if self._stack else None
        if name is None or isinstance(self.modules[name], nn.MultiheadAttention):
            return  # a multi-head attention module was read from its inputs
        query = args[0] if args else kwargs.get("query")
        key = args[1] if len(args) > 1 else kwargs.get("key")
        if not isinstance(query, Tensor) or not isinstance(key, Tensor) or query.dim() < 3 or key.dim() != query.dim():
            return
        heads, key_heads = int(query.shape[-3]), int(key.shape[-3])
        if key_heads == 0 or heads % key_heads:  # no grouped-query layout F.sdpa could read either
            return
        mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
        causal = args[5] if len(args) > 5 else kwargs.get("is_causal", False)
        scale = kwargs.get("scale", args[6] if len(args) > 6 else None)
        self._record(
            name,
            attention_reading(
                query,
                key,
                attn_mask=mask,
                is_causal=bool(causal),
                scale=scale,
                sample=self.sample,
                generator=self._generator,
            ),
        )

    def _read_multihead(
        self, name: str, module: nn.MultiheadAttention, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> None:
        if module.bias_k is not None or module.add_zero_attn:
            return
        names = (
            "query",
            "key",
            "value",
            "key_padding_mask",
            "need_weights",
            "attn_mask",
            "average_attn_weights",
            "is_causal",
        )
        given = {**dict(zip(names, args)), **kwargs}
        query, key = given.get("query"), given.get("key")
        if not isinstance(query, Tensor) or not isinstance(key, Tensor):
            return
        embed, heads = module.embed_dim, module.num_heads
        batched = query.dim() == 3
        if not batched:
            query, key = query.unsqueeze(0 if module.batch_first else 1), key.unsqueeze(0 if module.batch_first else 1)
        if not module.batch_first:
            query, key = query.transpose(0, 1), key.transpose(0, 1)
        if module._qkv_same_embed_dim:
            q_weight, k_weight = module.in_proj_weight[:embed], module.in_proj_weight[embed : 2 * embed]
        else:
            q_weight, k_weight = module.q_proj_weight, module.k_proj_weight
        bias = module.in_proj_bias
        with torch.no_grad():  # matmul, not F.linear: the capture's functional path must not see these
            q = torch.matmul(query.detach(), q_weight.detach().T)
            k = torch.matmul(key.detach(), k_weight.detach().T)
            if bias is not None:
                q, k = q + bias[:embed].detach(), k + bias[embed : 2 * embed].detach()
        batch, count, keys = q.shape[0], q.shape[1], k.shape[1]
        q = q.reshape(batch, count, heads, -1).transpose(1, 2)
        k = k.reshape(batch, keys, heads, -1).transpose(1, 2)
        mask = _multihead_mask(given.get("attn_mask"), given.get("key_padding_mask"), batch, heads, count, keys)
        causal = bool(given.get("is_causal", False)) and given.get("attn_mask") is None
        self._record(
            name,
            attention_reading(q, k, attn_mask=mask, is_causal=causal, sample=self.sample, generator=self._generator),
        )


def _multihead_mask(attn_mask: Any, padding: Any, batch: int, heads: int, count: int, keys: int) -> Tensor | None:
    """``nn.MultiheadAttention``'s masks as one SDPA-style mask ``(batch, heads, count, keys)``
    (boolean True: may attend; float: added)."""
    parts: list[Tensor] = []
    for mask, shape in ((attn_mask, None), (padding, (batch, 1, 1, keys))):
        if not isinstance(mask, Tensor):
            continue
        if shape is None:  # (count, keys) or (batch·heads, count, keys)
            mask = mask.reshape(batch, heads, count, keys) if mask.dim() == 3 else mask
        else:
            mask = mask.reshape(shape)
        parts.append(~mask if mask.dtype == torch.bool else mask.to(torch.float64))
    if not parts:
        return None
    if all(p.dtype == torch.bool for p in parts):
        out = parts[0]
        for part in parts[1:]:
            out = out & part
        return out
    total = torch.zeros((), dtype=torch.float64)
    for part in parts:
        total = total + (
            torch.zeros((), dtype=torch.float64).masked_fill(~part, -float("inf")) if part.dtype == torch.bool else part
        )
    return total
