"""Moments sharded by owner: each dense moment is summed to one process, not to all.

A finished window's dense sums (``d × d`` each) are what a data-parallel analysis holds most
of. All-reducing them leaves every rank with every matrix, so per-rank memory does not fall
with the number of processes. Here each layer gets an *owner* (a greedy longest-processing-time
split of the values its moments hold, ``d²`` dense and ``2ℓ·d`` sketched, the same on every rank:
memory is what sharding is for; the solves' ``d³`` follow it roughly); its dense sums are reduced to
that owner alone (one in-place ``reduce`` each), and the other ranks let go of theirs and keep
a :class:`~lightning_conditioning.maths.remote.RemoteMoment` (the exact diagonal). The owner
solves them and sends the eigenvalues back (:mod:`lightning_conditioning.analysis.assignment`),
so every rank ends with every result and each holds and solves about ``1/W`` of the matrices.
The small statistics (row counts, row sums, diagonal moments, the diagonals of the sharded
ones) travel together in one flat all-reduce, as before.

Sketched moments go the same way: every rank's sketch is reduced to the owner, which merges
them and sends back the sketch's eigenvalues and shrinkage. A layer and the layers that share
its Σx (:mod:`~lightning_conditioning.capture.shared_inputs`) have one owner. What the
reduction does not touch: each rank's own sums while a window accumulates (every rank's rows
reach every layer).

Example:
    >>> assign_layers({"a": 8.0, "b": 1.0, "c": 1.0, "d": 6.0}, 2)
    [['a'], ['d', 'b', 'c']]
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from lightning_conditioning.maths.accumulate import LayerWindow, MomentSum, SecondMomentSum
from lightning_conditioning.maths.sketch import SketchedMomentSum

__all__ = ["assign_layers", "owners_of", "merge_sketches", "sum_windows", "unpack"]

Reduce = Callable[[Tensor, str], Tensor]
#: ``reduce_to(tensor, owner)``: the sum over processes, in place in ``owner``'s tensor
ReduceTo = Callable[[Tensor, int], None]
#: ``shardable(layer, dim)``: whether a dense moment of that size may live on its owner only
#: (its solver's result is exact and complete, so the eigenvalues can travel back)
Shardable = Callable[[str, int], bool]


def assign_layers(costs: Mapping[str, float], world_size: int) -> list[list[str]]:
    """Greedy longest-processing-time assignment of layers to ``world_size`` ranks.

    Example:
        >>> assign_layers({"a": 3.0, "b": 2.0, "c": 2.0}, 2)
        [['a'], ['b', 'c']]
    """
    heap = [(0.0, rank) for rank in range(world_size)]
    shares: list[list[str]] = [[] for _ in range(world_size)]
    for name in sorted(costs, key=lambda n: -costs[n]):
        load, rank = heapq.heappop(heap)
        shares[rank].append(name)
        heapq.heappush(heap, (load + costs[name], rank))
    return shares


def unpack(flat: Tensor, buffers: list[Tensor]) -> int:
    """Copy consecutive slices of ``flat`` (a reduced flat buffer) into ``buffers``; returns
    the offset reached.

    Example:
        >>> parts = [torch.zeros(2), torch.zeros(1)]
        >>> unpack(torch.tensor([1.0, 2.0, 3.0, 4.0]), parts), parts
        (3, [tensor([1., 2.]), tensor([3.])])
    """
    offset = 0
    for buffer in buffers:
        buffer.copy_(flat[offset : offset + buffer.numel()].view_as(buffer))
        offset += buffer.numel()
    return offset


def _dense(sum_: MomentSum) -> bool:
    return isinstance(sum_, SecondMomentSum) and not sum_.diagonal


def _held(window: LayerWindow, sum_: MomentSum) -> float:
    """What an owner holds for a moment: ``d²`` values dense, ``2ℓ·d`` a sketch, ``d`` a diagonal."""
    if isinstance(sum_, SketchedMomentSum):
        return 2.0 * sum_.sketcher.rank * sum_.dim
    return float(_solved_dim(window, sum_)) ** (2 if _dense(sum_) else 1)


def _sums(name: str, window: LayerWindow, apart: set[str]) -> tuple[MomentSum, ...]:
    """The sums a reduction handles: without Σx's when another layer's stands for it."""
    return (window.grad,) if name in apart else (window.input, window.grad)


def _solved_dim(window: LayerWindow, sum_: MomentSum) -> int:
    """The size of the matrix solved: Σx with the homogeneous coordinate is one wider."""
    return sum_.dim + (1 if sum_ is window.input and window.homogeneous else 0)


def owners_of(
    windows: Mapping[str, LayerWindow],
    leaders: Mapping[str, str],
    apart: set[str],
    world_size: int,
    shardable: Shardable | None = None,
) -> dict[str, int]:
    """The owner of every layer whose dense moments may be sharded (``leaders``: a follower
    of a shared Σx and its leader, which share one owner). A group with a dense moment that
    ``shardable`` refuses is left out (all-reduced, as without owners). Balanced by the values
    held (``d²`` a dense moment, ``2ℓ·d`` a sketch).

    Example:
        >>> window = LayerWindow(4, 3, 4, torch.device("cpu"))
        >>> owners_of({"a": window, "b": LayerWindow(2, 2, 2, torch.device("cpu"))}, {}, set(), 2)
        {'a': 0, 'b': 1}
    """
    groups: dict[str, list[str]] = {}
    for name in windows:
        head = leaders.get(name, name)
        groups.setdefault(head if head in windows else name, []).append(name)
    costs: dict[str, float] = {}
    for head, members in groups.items():
        dense = [
            (name, _solved_dim(windows[name], s))
            for name in members
            for s in _sums(name, windows[name], apart)
            if _dense(s)
        ]
        if shardable is not None and not all(shardable(name, dim) for name, dim in dense):
            continue
        costs[head] = 1.0 + sum(_held(windows[name], s) for name in members for s in _sums(name, windows[name], apart))
    owners: dict[str, int] = {}
    for rank, heads in enumerate(assign_layers(costs, world_size)):
        for head in heads:
            owners.update({name: rank for name in groups[head]})
    return {name: owners[name] for name in windows if name in owners}


def merge_sketches(
    windows: Mapping[str, LayerWindow],
    apart: set[str],
    owners: Mapping[str, int],
    reduce: Reduce,
    reduce_to: ReduceTo | None,
    world_size: int,
    rank: int,
) -> None:
    """Every rank's sketches, stacked (one sum over zero-padded slots) and folded into one
    sketch per moment, on its owner only when it has one (the others hand theirs over), else on
    every rank alike; the shrinkages add up. Row counts are summed by :func:`sum_windows`."""
    for name, window in windows.items():
        for sum_ in _sums(name, window, apart):
            if not isinstance(sum_, SketchedMomentSum):
                continue
            sketcher = sum_.sketcher
            rows = sketcher.sketch()
            if rows.shape[0] > sketcher.rank:  # at most ℓ rows travel
                sketcher._shrink()
                rows = sketcher.sketch()
            slots = rows.new_zeros(world_size, sketcher.rank + 1, sketcher.dim)
            slots[rank, : rows.shape[0]] = rows
            slots[rank, sketcher.rank, 0] = sketcher.shrinkage
            owner = owners.get(name)
            if owner is None or reduce_to is None:
                slots = reduce(slots.reshape(-1), "sum").view_as(slots)
            else:
                reduce_to(slots.view(-1), owner)
                if owner != rank:
                    sum_.hand_over(owner)
                    continue
            count, shrinkage = sketcher.rows, float(slots[:, sketcher.rank, 0].sum())
            stacked = slots[:, : sketcher.rank].reshape(-1, sketcher.dim)
            sketcher.reset()
            sketcher.add_rows(stacked[stacked.abs().sum(1) > 0])  # padding rows add nothing
            sketcher.rows, sketcher.shrinkage = count, sketcher.shrinkage + shrinkage


def sum_windows(
    windows: Mapping[str, LayerWindow],
    apart: set[str],
    owners: Mapping[str, int],
    reduce: Reduce,
    reduce_to: ReduceTo | None,
    rank: int,
) -> None:
    """Sum every window over processes, in place: the dense sums of owned layers to their
    owner only (``reduce_to``, the others hand theirs over), everything else in one flat
    all-reduce with the row counts. Every rank must call it with the same windows and owners.
    Without ``reduce_to`` (or owners) every sum is all-reduced."""
    owned: list[tuple[SecondMomentSum, int]] = []
    small: list[Tensor] = []
    for name, window in windows.items():
        for sum_ in _sums(name, window, apart):
            if reduce_to is not None and name in owners and isinstance(sum_, SecondMomentSum) and _dense(sum_):
                sum_.fold()
                owned.append((sum_, owners[name]))
                small.extend([sum_.sum_rows] if sum_.sum_rows is not None else [])
            else:
                small.extend(sum_.buffers())
    diagonals = [sum_.sum_outer.diagonal().clone() for sum_, _ in owned]
    parts = small + diagonals
    counts = [count for window in windows.values() for count in window.counts()]
    device = next(iter(windows.values())).device
    flat = reduce(
        torch.cat([t.reshape(-1) for t in parts] + [torch.tensor(counts, dtype=torch.float64, device=device)]), "sum"
    )
    offset = unpack(flat, parts)
    totals, start = flat[offset:].tolist(), 0
    for window in windows.values():
        width = len(window.counts())
        window.set_counts(totals[start : start + width])
        start += width
    if reduce_to is None:
        return
    for (sum_, owner), diagonal in zip(owned, diagonals):
        reduce_to(sum_.sum_outer, owner)
        if owner == rank:  # one diagonal on every rank: the all-reduced one (same ulps everywhere)
            sum_.sum_outer.diagonal().copy_(diagonal)
        else:
            sum_.hand_over(owner, diagonal)
