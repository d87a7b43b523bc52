"""How captured rows enter the sums: with autocast off, in the statistics dtype.

Example:
    >>> rows = torch.ones(2, 3, dtype=torch.float16)
    >>> with without_autocast(rows.device):
    ...     in_dtype(rows, torch.float32, None).dtype
    torch.float32
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from lightning_conditioning.maths.sketch import SketchedMomentSum

__all__ = ["without_autocast", "in_dtype"]


def without_autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """Autocast off on ``device`` (where autocast exists): out-of-place GEMMs would run in
    bf16/fp16 under it, and the Grams keep their dtype."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def in_dtype(rows: Tensor, dtype: torch.dtype, target: Any) -> Tensor:
    """``rows`` in the statistics dtype, except for a sketch, which converts them block by
    block into its own float64 buffer (no ``(n, d)`` float64 copy of, e.g., a 50,257-token
    head's output gradient)."""
    return rows if isinstance(target, SketchedMomentSum) else rows.to(dtype)
