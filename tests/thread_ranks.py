"""Ranks as threads of one process: a barrier-based sum stands in for the collectives, so the
whole gather → solve → summarise path of several ranks runs inside one test."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch

from lightning_conditioning.distributed.collectives import Collectives


class ThreadWorld:
    """``size`` ranks as threads: ``reduce`` and ``reduce_to`` sum the ranks' tensors."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=60)
        self.slots: list[torch.Tensor | None] = [None] * size
        self.reduced_to: list[int] = []  # owners, as rank 0 saw them

    def _gathered(self, rank: int, tensor: torch.Tensor) -> torch.Tensor:
        self.slots[rank] = tensor.clone()
        self.barrier.wait()
        stacked = torch.stack([s for s in self.slots if s is not None])
        self.barrier.wait()
        return stacked

    def collectives(self, rank: int, owners: bool = True) -> Collectives:
        def reduce(tensor: torch.Tensor, op: str) -> torch.Tensor:
            stacked = self._gathered(rank, tensor)
            return tensor.copy_(stacked.sum(0) if op == "sum" else stacked.max(0).values)

        def reduce_to(tensor: torch.Tensor, owner: int) -> None:
            stacked = self._gathered(rank, tensor)
            if rank == 0:
                self.reduced_to.append(owner)
            if rank == owner:
                tensor.copy_(stacked.sum(0))
            else:
                tensor.fill_(math.nan)  # what a non-owner holds afterwards is undefined

        return Collectives(reduce, self.size, rank, None, reduce_to if owners else None)


def in_threads(world: ThreadWorld, work: Callable[[int], object]) -> list[object]:
    """Run ``work(rank)`` in one thread per rank of ``world``; the first error is re-raised here."""
    out: list[object] = [None] * world.size
    errors: list[BaseException] = []

    def target(rank: int) -> None:
        try:
            out[rank] = work(rank)
        except BaseException as error:  # noqa: BLE001 (re-raised in the test's thread)
            errors.append(error)
            world.barrier.abort()

    threads = [threading.Thread(target=target, args=(rank,)) for rank in range(world.size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return out
