"""Norms of weights whose rows are spread over processes (FSDP2's ``DTensor`` shards).

FSDP2 (``fully_shard``, Lightning's ``ModelParallelStrategy``) keeps each parameter and its
gradient as a ``DTensor`` sharded along dimension 0: every rank holds a block of rows. The
spectral norm of a matrix is the square root of λmax of its column Gram, and a column Gram
is the *sum* of the blocks' own Grams, ``MᵀM = Σ_r M_rᵀ M_r``; the Frobenius norm is its
trace. So the weight-domination norms need one sum over ranks of ``n × n`` Grams (``n`` the
columns), never a whole weight on one rank. Wider matrices (``n`` above
:data:`GRAM_COLUMNS`) use a distributed power iteration instead: ``Σ_r M_rᵀ (M_r v)`` is one
sum of an ``n``-vector per iteration.

Example:
    >>> import torch
    >>> blocks = [torch.tensor([[3.0, 0.0]]), torch.tensor([[0.0, 4.0]])]  # two ranks' rows
    >>> sum_over = lambda t, op: t  # one process holding both blocks below
    >>> whole = torch.cat(blocks)
    >>> block_norms([whole], sum_over)
    [(4.0, 5.0)]
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["GRAM_COLUMNS", "is_sharded", "local_rows", "block_norms"]

#: matrices with more columns than this use the power iteration (their Gram would be large)
GRAM_COLUMNS = 4096
_POWER_STEPS = 300
_POWER_RTOL = 1e-12

Reduce = Callable[[Tensor, str], Tensor]


def _dtensor_types() -> tuple[type, type] | None:
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch without the public DTensor module
        return None
    return DTensor, Shard


def is_sharded(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` sharded along dimension 0 (FSDP2's layout).

    Example:
        >>> is_sharded(torch.zeros(2, 2))
        False
    """
    types = _dtensor_types()
    if types is None or not isinstance(tensor, types[0]):
        return False
    placements = tensor.placements  # type: ignore[attr-defined]
    return len(placements) == 1 and isinstance(placements[0], types[1]) and placements[0].dim == 0  # type: ignore[attr-defined]


def local_rows(tensor: Tensor, rows: slice | int) -> tuple[Tensor, bool]:
    """``(block, sharded)``: the rows ``rows`` of a (global) weight that this process holds.

    For a sharded ``DTensor`` the block is the part of ``rows`` inside this rank's shard
    (possibly empty); a replicated ``DTensor`` or a plain tensor gives all of ``rows``.

    Example:
        >>> block, sharded = local_rows(torch.arange(6.0).reshape(3, 2), slice(1, 3))
        >>> block.tolist(), sharded
        ([[2.0, 3.0], [4.0, 5.0]], False)
    """
    types = _dtensor_types()
    if types is None or not isinstance(tensor, types[0]):
        return tensor[rows], False
    local = tensor.to_local()  # type: ignore[attr-defined]
    if not is_sharded(tensor):
        return local[rows], False
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)  # type: ignore[attr-defined]
    first = int(offset[0])
    if isinstance(rows, int):  # (the monitor checks no expert of a sharded fused weight)
        raise ValueError("an expert's matrix of a sharded fused weight spans shards: no local rows")
    start, stop = max(rows.start, first), min(rows.stop, first + local.shape[0])
    return (local[start - first : stop - first] if stop > start else local[:0]), True


def _matrix(block: Tensor) -> Tensor:
    block = block.detach().to(torch.float64)
    return block.reshape(block.shape[0], -1) if block.dim() != 2 else block


def _power(blocks: list[Tensor], reduce: Reduce) -> list[float]:
    """λmax of ``Σ_r M_rᵀ M_r`` for each wide matrix, by one shared power iteration."""
    generator = torch.Generator().manual_seed(0)  # the same start vector on every rank
    vectors = [torch.randn(b.shape[1], generator=generator, dtype=torch.float64).to(b.device) for b in blocks]
    vectors = [v / v.norm() for v in vectors]
    values = [0.0] * len(blocks)
    for _ in range(_POWER_STEPS):
        products = reduce(torch.cat([b.T @ (b @ v) for b, v in zip(blocks, vectors)]), "sum")
        parts = products.split([b.shape[1] for b in blocks])
        new = [float(v @ p) for v, p in zip(vectors, parts)]
        vectors = [p / p.norm() if p.norm() > 0 else v for p, v in zip(parts, vectors)]
        converged = all(abs(a - b) <= _POWER_RTOL * max(abs(a), 1e-300) for a, b in zip(new, values))
        values = new
        if converged:
            break
    return values


def block_norms(blocks: list[Tensor], reduce: Reduce) -> list[tuple[float, float]]:
    """``(σmax, ‖·‖_F)`` of matrices whose rows are spread over processes: ``blocks`` are this
    rank's rows of each (conv kernels flattened to ``out × rest``), ``reduce(tensor, "sum")``
    sums over the ranks (every rank must call it with the same matrices). Non-finite blocks
    give ``nan`` norms."""
    matrices = [_matrix(b) for b in blocks]
    narrow = [i for i, m in enumerate(matrices) if m.shape[1] <= GRAM_COLUMNS]
    wide = [i for i, m in enumerate(matrices) if m.shape[1] > GRAM_COLUMNS]
    out: list[tuple[float, float]] = [(math.nan, math.nan)] * len(matrices)
    if narrow:
        grams = [matrices[i].T @ matrices[i] for i in narrow]
        flat = reduce(torch.cat([g.reshape(-1) for g in grams]), "sum").cpu()
        for i, part in zip(narrow, flat.split([g.numel() for g in grams])):
            gram = part.view(matrices[i].shape[1], -1)
            if not bool(torch.isfinite(gram).all()):
                continue
            top = float(torch.linalg.eigvalsh((gram + gram.T) * 0.5)[-1]) if gram.numel() else 0.0
            out[i] = (math.sqrt(max(top, 0.0)), math.sqrt(max(float(gram.trace()), 0.0)))
    if wide:
        squares = reduce(torch.stack([matrices[i].square().sum() for i in wide]), "sum").cpu()
        tops = _power([matrices[i] for i in wide], reduce)
        for i, top, square in zip(wide, tops, squares.tolist()):
            if math.isfinite(square):
                out[i] = (math.sqrt(max(top, 0.0)), math.sqrt(max(square, 0.0)))
    return out
