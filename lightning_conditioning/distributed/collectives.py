"""Collectives as callables: how a monitor sums its statistics over processes.

The analysis needs one operation, ``reduce(tensor, op)`` with ``op`` in ``"sum"`` / ``"max"``,
plus the world size and this process' rank. :class:`Collectives` carries them, so Lightning
strategies, Lightning Fabric and plain ``torch.distributed`` all plug into the same core.

Example:
    >>> Collectives.local().world_size
    1
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["ReduceFn", "ReduceToFn", "Collectives", "auto_collectives"]

#: ``reduce(tensor, op) -> tensor`` with ``op`` in ``"sum"``, ``"max"``: the reduced tensor,
#: the same on every process
ReduceFn = Callable[[Tensor, str], Tensor]
#: ``reduce_to_owner(tensor, owner)``: the sum over processes, in place in ``owner``'s tensor
ReduceToFn = Callable[[Tensor, int], None]


def _identity(tensor: Tensor, op: str) -> Tensor:
    return tensor


@dataclass(frozen=True)
class Collectives:
    """``reduce``, ``world_size`` and ``rank`` of one process group, and the ``device`` its
    backend communicates from (NCCL takes CUDA tensors only; ``None``: any).

    Example:
        >>> group = Collectives(lambda tensor, op: tensor * 2, world_size=2, rank=1)
        >>> group.all_reduce(torch.ones(1), "sum"), group.distributed
        (tensor([2.]), True)
    """

    reduce: ReduceFn = _identity
    world_size: int = 1
    rank: int = 0
    device: torch.device | None = None
    #: ``reduce_to_owner(tensor, owner)``: the sum over processes, in place in ``owner``'s
    #: tensor only (others' are left undefined); ``None``: not available, moments are
    #: all-reduced to every process (see :mod:`~lightning_conditioning.distributed.owners`)
    reduce_to_owner: ReduceToFn | None = None

    @property
    def distributed(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1

    def all_reduce(self, tensor: Tensor, op: str) -> Tensor:
        """``reduce(tensor, op)`` from :attr:`device` (the tensor is copied there when it lives
        elsewhere), returned on the tensor's own device. The tensor may be reduced in place:
        pass a temporary (the package's flat buffers are; no extra copy of them is made)."""
        if self.device is None or tensor.device == self.device:
            return self.reduce(tensor, op)
        return self.reduce(tensor.to(self.device), op).to(tensor.device)

    def mean(self, value: float) -> float:
        """The mean of ``value`` over processes (one scalar all-reduce; ``value`` alone without
        several processes)."""
        if not self.distributed:
            return value
        return float(self.all_reduce(torch.tensor([value], dtype=torch.float64), "sum")[0]) / self.world_size

    @property
    def shards_by_owner(self) -> bool:
        """Whether dense moments can be summed to one owner each (several processes, and a
        ``reduce_to_owner``)."""
        return self.distributed and self.reduce_to_owner is not None

    def reduce_to(self, tensor: Tensor, owner: int) -> None:
        """Sum ``tensor`` over processes into ``owner``'s ``tensor``, in place (from
        :attr:`device`; the other processes' tensors are left undefined). Without
        :attr:`reduce_to_owner` an all-reduce stands in.

        Example:
            >>> total = torch.ones(2)
            >>> Collectives(lambda tensor, op: tensor * 2, world_size=2).reduce_to(total, 0)
            >>> total
            tensor([2., 2.])
        """
        if self.reduce_to_owner is None:
            tensor.copy_(self.all_reduce(tensor.clone(), "sum"))
        elif self.device is None or tensor.device == self.device:
            self.reduce_to_owner(tensor, owner)
        else:
            moved = tensor.to(self.device)
            self.reduce_to_owner(moved, owner)
            if self.rank == owner:
                tensor.copy_(moved)

    @classmethod
    def local(cls) -> Collectives:
        """One process: reductions are the identity."""
        return cls()

    @classmethod
    def torch_distributed(cls, group: Any = None) -> Collectives:
        """The initialised default process group of ``torch.distributed`` (or ``group``).

        ``all_reduce`` is in place on a copy, so the caller's tensor is never changed.
        """
        import torch.distributed as dist

        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}

        def reduce(tensor: Tensor, op: str) -> Tensor:
            dist.all_reduce(tensor, op=ops[op], group=group)
            return tensor

        def reduce_to_owner(tensor: Tensor, owner: int) -> None:
            dst = owner if group is None else dist.get_global_rank(group, owner)
            dist.reduce(tensor, dst=dst, op=dist.ReduceOp.SUM, group=group)

        nccl = dist.get_backend(group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        return cls(reduce, dist.get_world_size(group), dist.get_rank(group), device, reduce_to_owner)

    @classmethod
    def fabric(cls, fabric: Any) -> Collectives:
        """A Lightning ``Fabric``: ``fabric.all_reduce(tensor, reduce_op=op)``.

        Example::

            monitor = ConditioningMonitor(model, collectives=Collectives.fabric(fabric))
        """
        return cls._launched(lambda tensor, op: fabric.all_reduce(tensor, reduce_op=op), fabric, fabric.device)

    @classmethod
    def strategy(cls, strategy: Any) -> Collectives:
        """A Lightning ``Strategy`` (``trainer.strategy``): ``strategy.reduce``."""
        return cls._launched(lambda tensor, op: strategy.reduce(tensor, reduce_op=op), strategy, strategy.root_device)

    @classmethod
    def _launched(cls, reduce: ReduceFn, launcher: Any, device: torch.device) -> Collectives:
        """A launcher's collectives (its ``world_size`` and ``global_rank``), with
        ``torch.distributed``'s reduce to one rank when the default group is the launcher's own."""
        world_size, rank = int(launcher.world_size), int(launcher.global_rank)
        return cls(reduce, world_size, rank, device, _default_group_reduce_to(world_size, rank))


def _default_group_reduce_to(world_size: int, rank: int) -> ReduceToFn | None:
    """``torch.distributed.reduce`` on the default group when it is the launcher's own (the
    same world size and rank: Lightning's DDP and FSDP2 strategies, Fabric), else None."""
    import torch.distributed as dist

    if world_size < 2 or not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_world_size() != world_size or dist.get_rank() != rank:
        return None

    def reduce_to_owner(tensor: Tensor, owner: int) -> None:
        dist.reduce(tensor, dst=owner, op=dist.ReduceOp.SUM)

    return reduce_to_owner


def auto_collectives() -> Collectives:
    """``torch.distributed``'s default group when one is initialised with several processes,
    else :meth:`Collectives.local`.

    Example:
        >>> auto_collectives().distributed
        False
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return Collectives.torch_distributed()
    return Collectives.local()
