"""Spread the eigen-analysis of layers over processes (plain ``torch.distributed``).

The second moments are summed over ranks first (see
:meth:`~lightning_conditioning.capture.LayerCapture.all_reduce`), so every rank holds the same
moments; each rank then analyses only its share of the layers (balanced by the O(d³) cost of
the two eigen-solves) and the results are gathered, so a 4-process job does about a quarter
of the eigen work per process and every rank ends with all results.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping

import torch.distributed as dist

from lightning_conditioning.accumulate import LayerMoments
from lightning_conditioning.results import LayerConditioning

__all__ = ["assign_layers", "analyse_layers", "estimated_seconds"]

#: float64 ``eigvalsh`` of a 2304² matrix took ~0.75 s on the 2-core CPU this was developed on
_SECONDS_PER_CUBE = 0.75 / 2304.0**3


def assign_layers(costs: Mapping[str, float], world_size: int) -> list[list[str]]:
    """Greedy longest-processing-time assignment of layers to ``world_size`` ranks.

    Example:
        >>> assign_layers({"a": 8.0, "b": 1.0, "c": 1.0, "d": 6.0}, 2)
        [['a'], ['d', 'b', 'c']]
    """
    heap = [(0.0, rank) for rank in range(world_size)]
    shares: list[list[str]] = [[] for _ in range(world_size)]
    for name in sorted(costs, key=lambda n: -costs[n]):
        load, rank = heapq.heappop(heap)
        shares[rank].append(name)
        heapq.heappush(heap, (load + costs[name], rank))
    return shares


def _cost(moments: LayerMoments) -> float:
    total = 0.0
    for matrix in (moments.input_second_moment, moments.grad_second_moment):
        if matrix is not None:
            total += float(matrix.shape[0]) ** 3
    return total + 1.0


def estimated_seconds(moments: Mapping[str, LayerMoments], world_size: int = 1) -> float:
    """A rough wall-time estimate of the eigen-analysis per rank (O(d³) per moment).

    Example:
        >>> import torch
        >>> m = LayerMoments(torch.eye(2304), torch.eye(2304), 1, 1, torch.zeros(1), torch.zeros(1))
        >>> round(estimated_seconds({"fc": m}), 2)
        1.5
    """
    return sum(_cost(m) for m in moments.values()) * _SECONDS_PER_CUBE / max(world_size, 1)


def analyse_layers(
    moments: Mapping[str, LayerMoments],
    analyse: Callable[[str, LayerMoments], LayerConditioning],
) -> dict[str, LayerConditioning]:
    """``{name: analyse(name, moments)}``, the work shared over the default process group
    when one is initialised (every rank must call it with the same moments), in input order.

    Example:
        >>> analyse_layers({}, lambda name, m: None)
        {}
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return {name: analyse(name, m) for name, m in moments.items()}
    world_size, rank = dist.get_world_size(), dist.get_rank()
    share = assign_layers({name: _cost(m) for name, m in moments.items()}, world_size)[rank]
    mine = {name: analyse(name, moments[name]) for name in share}
    gathered: list[dict[str, LayerConditioning] | None] = [None] * world_size
    dist.all_gather_object(gathered, mine)
    merged: dict[str, LayerConditioning] = {}
    for part in gathered:
        merged.update(part or {})
    return {name: merged[name] for name in moments}
