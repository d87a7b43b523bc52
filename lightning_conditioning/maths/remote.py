"""A finished dense moment whose matrix another process holds: its owner.

Under data parallelism a window's dense sums are reduced to one owner per layer (not
all-reduced to every rank, see :mod:`lightning_conditioning.distributed.owners`), so each
process holds and eigen-solves about ``1/W`` of the dense moments. The other processes keep a
:class:`RemoteMoment` in the matrix's place: its size, its owner and its exact diagonal (``d``
values, summed over processes with the other small statistics), which is all a summary needs
besides the eigenvalues that the owner sends back (finite and zero checks read the diagonal:
a second moment is a sum of ``r rᵀ``, so a NaN/Inf in any row, or a nonzero row, shows there).

Example:
    >>> import torch
    >>> moment = RemoteMoment(torch.tensor([2.0, 0.5], dtype=torch.float64), owner=1)
    >>> moment.shape, moment.dim(), moment.isfinite(), moment.any()
    ((2, 2), 2, True, True)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["RemoteMoment"]


class RemoteMoment:
    """A ``d × d`` moment held by process ``owner``: its diagonal here, never the matrix.

    Args:
        diagonal: the moment's exact diagonal (float64, ``d`` values: the window's mean).
        owner: the rank that holds the matrix and solves it.
        finite: set by the owner's answer when it found the matrix non-finite (``None``:
            judged from the diagonal, which every NaN/Inf row reaches).
    """

    def __init__(self, diagonal: Tensor, owner: int, finite: bool | None = None) -> None:
        self.diagonal, self.owner, self.finite = diagonal, int(owner), finite

    @property
    def size(self) -> int:
        """``d``: the matrix is ``d × d``."""
        return int(self.diagonal.numel())

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the matrix it stands for."""
        return (self.size, self.size)

    def dim(self) -> int:
        """2: it stands for a matrix (as ``Tensor.dim``)."""
        return 2

    def isfinite(self) -> bool:
        """Whether the matrix holds only finite values (the owner's word when given)."""
        if self.finite is not None:
            return self.finite
        return bool(torch.isfinite(self.diagonal).all())

    def any(self) -> bool:
        """Whether the matrix has a nonzero entry (a PSD matrix is zero iff its diagonal is)."""
        return bool(self.diagonal.any())

    def cpu(self) -> RemoteMoment:
        """The same moment with its diagonal on the host."""
        return RemoteMoment(self.diagonal.cpu(), self.owner, self.finite)

    @property
    def nbytes(self) -> int:
        """Bytes held here: the diagonal only."""
        return self.diagonal.numel() * self.diagonal.element_size()

    def __repr__(self) -> str:
        return f"RemoteMoment(size={self.size}, owner={self.owner})"
