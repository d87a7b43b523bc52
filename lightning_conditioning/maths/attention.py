"""Attention logits and entropy per head, from the q and k an attention actually uses.

Attention-logit growth (Wortsman et al. 2023) and attention-entropy collapse (Zhai et al. 2023)
come before loss spikes in transformer training. :func:`attention_reading` takes the query and
key tensors a scaled-dot-product attention is called with (after rotary embeddings, heads
split: ``(batch, heads, queries, d)``), its mask and scale, and for a sample of query positions
computes in float64, per head:

* the largest ``|q·k|·scale`` over the keys each query may attend to (the logits before any
  additive mask), and
* the softmax entropy of each sampled query's attention (with the mask), summed, beside the
  entropy of uniform attention over the same allowed keys (``log`` of their count), so that a
  collapse reads against what the mask allows.

Masks follow ``torch.nn.functional.scaled_dot_product_attention``: a boolean ``attn_mask`` is
True where a query may attend, a float one is added to the logits (``-inf``, or below half the
dtype's lowest value as Hugging Face writes masks: may not);
``is_causal`` allows keys up to the query's position (top-left aligned). Query rows that may
attend to nothing are left out.

Example:
    >>> q = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])       # one example, one head, 2 queries
    >>> reading = attention_reading(q, q, is_causal=True, scale=1.0)
    >>> reading.logit_max.tolist(), [round(v, 4) for v in reading.entropy.tolist()]
    ([1.0], [0.2911])
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["AttentionReading", "attention_reading", "QUERY_SAMPLE"]

#: query positions sampled per call (every position when there are fewer)
QUERY_SAMPLE = 32


@dataclass
class AttentionReading:
    """Per-head sums of one attention's calls in a window (float64, on the CPU).

    Attributes:
        logit_max: ``(heads,)`` the largest ``|q·k|·scale`` seen (``-inf`` before any).
        entropy_sum: ``(heads,)`` the sampled query rows' softmax entropies, summed (nats).
        uniform_sum: ``(heads,)`` ``log`` of the rows' allowed key counts, summed.
        rows: ``(heads,)`` the query rows summed (examples × sampled positions).
    """

    logit_max: Tensor
    entropy_sum: Tensor
    uniform_sum: Tensor
    rows: Tensor

    @property
    def heads(self) -> int:
        return int(self.logit_max.numel())

    @property
    def entropy(self) -> Tensor:
        """Mean softmax entropy per head (nats; NaN for a head without rows)."""
        return self.entropy_sum / self.rows

    @property
    def uniform_entropy(self) -> float:
        """The mean entropy uniform attention over the same allowed keys would have."""
        rows = float(self.rows.sum())
        return float(self.uniform_sum.sum()) / rows if rows else math.nan

    def merge(self, other: AttentionReading) -> AttentionReading:
        """Both readings together (the same heads)."""
        return AttentionReading(
            torch.maximum(self.logit_max, other.logit_max),
            self.entropy_sum + other.entropy_sum,
            self.uniform_sum + other.uniform_sum,
            self.rows + other.rows,
        )


def _allowed_and_bias(
    attn_mask: Tensor | None, is_causal: bool, queries: int, keys: int, device: torch.device
) -> tuple[Tensor | None, Tensor | None]:
    """``(allowed, bias)`` broadcastable to ``(..., queries, keys)``: a boolean mask of the
    allowed keys and an additive float bias (None: all allowed / none)."""
    allowed: Tensor | None = None
    bias: Tensor | None = None
    if is_causal:
        allowed = torch.ones(queries, keys, dtype=torch.bool, device=device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = attn_mask if allowed is None else allowed & attn_mask
        else:  # -inf, or the dtype's lowest value (as Hugging Face masks), marks "may not"
            bias = attn_mask.to(torch.float64)
            finite = bias > torch.finfo(attn_mask.dtype).min / 2
            allowed = finite if allowed is None else allowed & finite
            bias = torch.where(finite, bias, torch.zeros((), dtype=torch.float64, device=bias.device))
    return allowed, bias


def attention_reading(
    query: Tensor,
    key: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    sample: int = QUERY_SAMPLE,
    generator: torch.Generator | None = None,
) -> AttentionReading:
    """The per-head reading of one attention call (see the module's docstring).

    Args:
        query: ``(..., heads, queries, d)``.
        key: ``(..., key_heads, keys, d)``; fewer key heads than query heads (grouped-query
            attention) are repeated, as ``enable_gqa`` does.
        attn_mask / is_causal / scale: as ``F.scaled_dot_product_attention`` takes them
            (``scale`` None: ``1/√d``).
        sample: the query positions read (uniform without replacement, the same for every
            example and head); every position when there are no more.
        generator: draws the positions (the caller's own: never the global one).
    """
    with torch.no_grad():
        q, k = query.detach(), key.detach()
        if q.dim() == 3:  # (heads, queries, d): unbatched
            q, k = q.unsqueeze(0), k.unsqueeze(0)
            attn_mask = attn_mask.unsqueeze(0) if attn_mask is not None and attn_mask.dim() == 3 else attn_mask
        heads, count, keys, dim = q.shape[-3], q.shape[-2], k.shape[-2], q.shape[-1]
        factor = 1.0 / math.sqrt(dim) if scale is None else float(scale)
        allowed, bias = _allowed_and_bias(attn_mask, is_causal, count, keys, q.device)
        if count > sample:  # the sampled queries only are converted and multiplied
            chosen = torch.randperm(count, generator=generator, device="cpu")[:sample].sort().values.to(q.device)
            q = q[..., chosen, :]
            if allowed is not None:
                allowed = allowed.expand(*allowed.shape[:-2], count, keys)[..., chosen, :]
            if bias is not None:
                bias = bias.expand(*bias.shape[:-2], count, keys)[..., chosen, :]
        q = q.to(torch.float64) * factor
        k = k.to(torch.float64)
        if k.shape[-3] != heads:
            k = k.repeat_interleave(heads // k.shape[-3], dim=-3)
        logits = q @ k.transpose(-1, -2)  # (..., heads, sampled, keys), scaled
        if allowed is None:
            allowed = torch.ones((), dtype=torch.bool, device=q.device)
        allowed = allowed.expand_as(logits)
        magnitude = torch.where(allowed, logits.abs(), 0.0)
        scores = torch.where(allowed, logits if bias is None else logits + bias, -math.inf)
        open_rows = allowed.any(-1)  # (..., heads, sampled)
        if not bool(open_rows.all()):  # a row that may attend to nothing: no NaN from it
            scores = scores.masked_fill(~open_rows.unsqueeze(-1), 0.0)
        p = torch.softmax(scores, dim=-1)
        entropy = -torch.special.xlogy(p, p).sum(-1)  # (..., heads, sampled); 0·log 0 = 0
        uniform = allowed.sum(-1).clamp_min(1).to(torch.float64).log()
        head_dim = logits.dim() - 3
        reduce_dims = [d for d in range(logits.dim() - 1) if d != head_dim]
        rows = open_rows.to(torch.float64)
        flat_max = magnitude.movedim(head_dim, 0).reshape(heads, -1).amax(dim=1)
        flat_max = torch.where(rows.sum(dim=reduce_dims) > 0, flat_max, -math.inf)
        return AttentionReading(
            logit_max=flat_max.cpu(),
            entropy_sum=(entropy * rows).sum(dim=reduce_dims).cpu(),
            uniform_sum=(uniform * rows).sum(dim=reduce_dims).cpu(),
            rows=rows.sum(dim=reduce_dims).cpu(),
        )
