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

__all__ = ["MatrixStandIn", "RemoteMoment"]


class MatrixStandIn:
    """What stands for a ``size × size`` moment never formed here (a sketch, a remote moment):
    the shape and ``dim()`` a ``Tensor`` would have.

    Example:
        >>> stand_in = MatrixStandIn()
        >>> stand_in.size = 3
        >>> stand_in.shape, stand_in.dim()
        ((3, 3), 2)
    """

    size: int

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the matrix it stands for."""
        return (self.size, self.size)

    def dim(self) -> int:
        """2: it stands for a matrix (as ``Tensor.dim``)."""
        return 2


class RemoteMoment(MatrixStandIn):
    """A ``d × d`` moment held by process ``owner``: here its diagonal at most, never the matrix.

    Args:
        diagonal: the moment's exact diagonal (float64, ``d`` values: the window's mean), or
            ``None`` where the sum kept none (a sketched Σ∇h).
        owner: the rank that holds the matrix and solves it.
        size: ``d`` (needed only without a diagonal).
        kind: ``"dense"``, or ``"sketch"`` for a Frequent Directions sketch (solved as one).
        finite / nonzero: the owner's word, set when its answer arrives (``None``: judged
            from the diagonal, which every NaN/Inf or nonzero row reaches; without one,
            taken as finite and nonzero until the owner says).
    """

    def __init__(
        self,
        diagonal: Tensor | None,
        owner: int,
        *,
        size: int | None = None,
        kind: str = "dense",
        finite: bool | None = None,
        nonzero: bool | None = None,
    ) -> None:
        if diagonal is None and size is None:
            raise ValueError("a remote moment needs its diagonal or its size")
        self.diagonal, self.owner, self.kind = diagonal, int(owner), kind
        #: ``d``: the matrix is ``d × d``
        self.size = int(size) if size is not None else int(diagonal.numel())  # type: ignore[union-attr]
        self.finite, self.nonzero = finite, nonzero

    def isfinite(self) -> bool:
        """Whether the matrix holds only finite values (the owner's word when given)."""
        if self.finite is not None:
            return self.finite
        return self.diagonal is None or bool(torch.isfinite(self.diagonal).all())

    def any(self) -> bool:
        """Whether the matrix has a nonzero entry (a PSD matrix is zero iff its diagonal is)."""
        if self.nonzero is not None:
            return self.nonzero
        return self.diagonal is None or bool(self.diagonal.any())

    def cpu(self) -> RemoteMoment:
        """The same moment with its diagonal on the host."""
        return RemoteMoment(
            self.diagonal.cpu() if self.diagonal is not None else None,
            self.owner,
            size=self.size,
            kind=self.kind,
            finite=self.finite,
            nonzero=self.nonzero,
        )

    @property
    def nbytes(self) -> int:
        """Bytes held here: the diagonal only."""
        return 0 if self.diagonal is None else self.diagonal.numel() * self.diagonal.element_size()

    def __repr__(self) -> str:
        return f"RemoteMoment(size={self.size}, owner={self.owner}{', sketch' if self.kind == 'sketch' else ''})"
