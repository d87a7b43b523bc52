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

__all__ = ["ReduceFn", "Collectives", "auto_collectives"]

#: ``reduce(tensor, op) -> tensor`` with ``op`` in ``"sum"``, ``"max"``: the reduced tensor,
#: the same on every process
ReduceFn = Callable[[Tensor, str], Tensor]


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

        nccl = dist.get_backend(group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        return cls(reduce, dist.get_world_size(group), dist.get_rank(group), device)

    @classmethod
    def fabric(cls, fabric: Any) -> Collectives:
        """A Lightning ``Fabric``: ``fabric.all_reduce(tensor, reduce_op=op)``.

        Example::

            monitor = ConditioningMonitor(model, collectives=Collectives.fabric(fabric))
        """
        return cls(
            lambda tensor, op: fabric.all_reduce(tensor, reduce_op=op),
            int(fabric.world_size),
            int(fabric.global_rank),
            fabric.device,
        )

    @classmethod
    def strategy(cls, strategy: Any) -> Collectives:
        """A Lightning ``Strategy`` (``trainer.strategy``): ``strategy.reduce``."""
        return cls(
            lambda tensor, op: strategy.reduce(tensor, reduce_op=op),
            int(strategy.world_size),
            int(strategy.global_rank),
            strategy.root_device,
        )


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

