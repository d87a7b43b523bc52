"""Frequent Directions: a streaming, mergeable sketch of ``Σ r rᵀ`` in ``O(ℓ·d)`` memory.

For moments too large to hold as ``d × d`` (a 50,257-token ``lm_head``'s Σ∇h is 20 GB in
float64) the rows are folded into a sketch ``B`` of at most ``2ℓ`` rows (Liberty 2013; Ghashami,
Liberty, Phillips & Woodruff 2016). Whenever the buffer is full it is rotated to its singular
directions and every squared singular value is lowered by ``δ``, the ``(ℓ+1)``-th largest, so
that at most ``ℓ`` rows stay. The guarantee is deterministic:

    0 ≼ Σ r rᵀ − Bᵀ B ≼ Δ·I,    Δ = Σ δ over the shrinks

so every eigenvalue of the true sum lies in ``[λ_i(BᵀB), λ_i(BᵀB) + Δ]`` (Weyl) and every one
past the sketch's rank is at most ``Δ``. With no more than ``2ℓ`` rows nothing is shrunk and
the spectrum is exact. Sketches of different processes merge by stacking and shrinking again
(the bound adds up).

Example:
    >>> sketch = FrequentDirections(dim=6, rank=2, device=torch.device("cpu"))
    >>> rows = torch.eye(6, dtype=torch.float64)[:3] * torch.tensor([[3.0], [2.0], [1.0]], dtype=torch.float64)
    >>> sketch.add_rows(rows)                       # 3 rows ≤ 2ℓ: nothing shrunk yet
    >>> values, shrinkage = sketch.eigenvalues()
    >>> values.tolist(), shrinkage
    ([9.0, 4.0, 1.0], 0.0)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["FrequentDirections", "shrink", "sketch_eigenvalues"]


def shrink(rows: Tensor, rank: int) -> tuple[Tensor, float]:
    """``(B, δ)``: ``rows`` rotated to their singular directions, the squared singular values
    lowered by ``δ`` (the ``(rank+1)``-th largest, 0 when there are no more than ``rank``),
    and only the ``rank`` largest kept.

    Through the small Gram ``rows rowsᵀ`` (``m × m``, ``m ≤ 2·rank``): ``O(m²·d)``.

    Example:
        >>> b, delta = shrink(torch.diag(torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)), 2)
        >>> [round(v, 12) for v in torch.linalg.svdvals(b).square().tolist()], delta
        ([8.0, 3.0], 1.0)
    """
    count = rows.shape[0]
    if count == 0:
        return rows, 0.0
    gram = rows @ rows.T
    values, vectors = torch.linalg.eigh((gram + gram.T) * 0.5)
    values, vectors = values.flip(0).clamp_min(0.0), vectors.flip(1)
    delta = float(values[rank]) if count > rank else 0.0
    kept = min(rank, count)
    lowered = (values[:kept] - delta).clamp_min(0.0)
    # rows of Σ'Vᵀ = diag(sqrt(λ' / λ)) Uᵀ rows (directions with λ = 0 are dropped)
    scale = torch.where(values[:kept] > 0, (lowered / values[:kept].clamp_min(1e-300)).sqrt(),
                        torch.zeros_like(lowered))
    return (scale[:, None] * vectors[:, :kept].T) @ rows, delta


def sketch_eigenvalues(rows: Tensor) -> Tensor:
    """Eigenvalues of ``rowsᵀ rows`` (descending, float64 on the CPU) through the small Gram.

    Example:
        >>> sketch_eigenvalues(torch.tensor([[3.0, 4.0]], dtype=torch.float64)).tolist()
        [25.0]
    """
    if rows.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64)
    gram = (rows @ rows.T).to(device="cpu", dtype=torch.float64)
    return torch.linalg.eigvalsh((gram + gram.T) * 0.5).flip(0).clamp_min(0.0)


class FrequentDirections:
    """A Frequent Directions sketch of ``Σ weight·r rᵀ`` with a ``2·rank``-row buffer.

    Args:
        dim: length of a row.
        rank: ``ℓ``, the rows kept after each shrink (memory ``2ℓ·dim`` float64 values).
        device: where the buffer lives (the layer's device).

    Attributes:
        rows: rows added (their count, for the mean).
        shrinkage: ``Δ``, the total of the shrinks (same units as the sum).
    """

    def __init__(self, dim: int, rank: int, device: torch.device) -> None:
        if rank < 1 or dim < 1:
            raise ValueError(f"rank and dim must be positive, got rank={rank}, dim={dim}")
        self.dim, self.rank = dim, rank
        self._device = device
        self._buffer: Tensor | None = torch.zeros(2 * rank, dim, dtype=torch.float64, device=device)
        self.filled = 0
        self.rows = 0
        self.shrinkage = 0.0

    @property
    def buffer(self) -> Tensor:
        """The ``2ℓ × dim`` rows (allocated again, zeros, on first use after :meth:`take`)."""
        if self._buffer is None:
            self._buffer = torch.zeros(2 * self.rank, self.dim, dtype=torch.float64, device=self._device)
        return self._buffer

    def allocate(self) -> None:
        """Hold the buffer now (zeros) if :meth:`take` handed the last one over."""
        self.buffer  # noqa: B018 (the property allocates)

    def take(self) -> tuple[Tensor, float, int]:
        """``(sketch rows, Δ, rows added)``, the rows in the buffer's own memory, which is
        handed over (no copy); the sketch is empty afterwards."""
        taken = (self.sketch(), self.shrinkage, self.rows)
        self._buffer = None
        self.filled = self.rows = 0
        self.shrinkage = 0.0
        return taken

    @property
    def nbytes(self) -> int:
        """Bytes the buffer holds."""
        return 2 * self.rank * self.dim * 8  # float64, whether held now or not

    def add_rows(self, rows: Tensor, weight: float = 1.0) -> None:
        """Fold ``weight ×`` the outer products of an ``(n, dim)`` matrix's rows into the sketch.

        The rows are copied into the float64 buffer a block at a time (converted and scaled
        there): no ``(n, dim)`` float64 temporary, whatever the rows' dtype."""
        self.rows += int(rows.shape[0])
        scale = math.sqrt(weight)
        start = 0
        while start < rows.shape[0]:
            if self.filled == self.buffer.shape[0]:
                self._shrink()
            take = min(self.buffer.shape[0] - self.filled, rows.shape[0] - start)
            block = self.buffer[self.filled:self.filled + take]
            block.copy_(rows[start:start + take])
            if weight != 1.0:
                block.mul_(scale)
            self.filled += take
            start += take

    def _shrink(self) -> None:
        kept, delta = shrink(self.buffer[: self.filled], self.rank)
        self.buffer.zero_()
        self.buffer[: kept.shape[0]] = kept
        self.filled = int(kept.shape[0])
        self.shrinkage += delta

    def sketch(self) -> Tensor:
        """The current sketch rows (a view; at most ``2·rank``)."""
        return self.buffer[: self.filled]

    def eigenvalues(self) -> tuple[Tensor, float]:
        """``(eigenvalues of BᵀB, Δ)``: the true sum's ``i``-th eigenvalue lies in
        ``[values[i], values[i] + Δ]``, and every one past ``len(values)`` in ``[0, Δ]``."""
        return sketch_eigenvalues(self.sketch()), self.shrinkage

    def merge(self, rows: Tensor, shrinkage: float, count: int) -> None:
        """Fold another sketch (its rows, its Δ and its row count) into this one."""
        added = self.rows
        self.add_rows(rows)
        self.rows = added + count
        self.shrinkage += shrinkage

    def reset(self) -> None:
        """Empty the sketch for the next window (the buffer is reused)."""
        if self._buffer is not None:
            self._buffer.zero_()
        self.filled = self.rows = 0
        self.shrinkage = 0.0

    def to(self, device: torch.device) -> None:
        """Move the buffer to ``device``."""
        self._device = device
        self._buffer = self._buffer.to(device) if self._buffer is not None else None


class SketchedMoment:
    """A finished sketched moment: ``M ≈ sketchᵀ sketch`` with ``0 ≼ M − sketchᵀ sketch ≼
    shrinkage·I`` (moment units: the window's mean), a ``dim × dim`` matrix never formed.

    Example:
        >>> m = SketchedMoment(torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64), 0.5, 3)
        >>> m.shape, m.dim()
        ((3, 3), 2)
    """

    def __init__(self, sketch: Tensor, shrinkage: float, dim: int) -> None:
        self.sketch, self.shrinkage, self.size = sketch, float(shrinkage), int(dim)

    @property
    def shape(self) -> tuple[int, int]:
        """The shape of the matrix it stands for."""
        return (self.size, self.size)

    def dim(self) -> int:
        """2: it stands for a matrix (as ``Tensor.dim``)."""
        return 2

    def isfinite(self) -> bool:
        """Whether the sketch holds only finite values (one sum, no copy of the sketch,
        unless that sum overflows)."""
        if not math.isfinite(self.shrinkage):
            return False
        return math.isfinite(float(self.sketch.sum())) or bool(torch.isfinite(self.sketch).all())

    def any(self) -> bool:
        """Whether the moment may be nonzero."""
        return bool(self.sketch.any()) or self.shrinkage > 0

    def cpu(self) -> SketchedMoment:
        """The same moment with its sketch on the CPU."""
        return SketchedMoment(self.sketch.cpu(), self.shrinkage, self.size)


class SketchedMomentSum:
    """A :class:`~lightning_conditioning.accumulate.SecondMomentSum` kept as a Frequent
    Directions sketch: the same ``add_rows`` / ``rows`` / ``mean`` interface, ``O(ℓ·d)``
    memory. Ready Grams (``add``) cannot be sketched; the plan never sketches layers that
    produce them.

    Example:
        >>> acc = SketchedMomentSum(3, torch.device("cpu"), rank=4)
        >>> acc.add_rows(torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]]))
        >>> moment = acc.mean()
        >>> [round(v, 12) for v in sketch_eigenvalues(moment.sketch).tolist()], moment.shrinkage
        ([2.0, 0.5], 0.0)
    """

    sum_rows = None
    diagonal = False

    def __init__(self, dim: int, device: torch.device, *, rank: int) -> None:
        self.dim = dim
        self.sketcher = FrequentDirections(dim, rank, device)
        self.resolution = 0.0
        self.gram_roundoff = 0.0

    @property
    def rows(self) -> int:
        """Rows added in this window."""
        return self.sketcher.rows

    @rows.setter
    def rows(self, value: int) -> None:
        self.sketcher.rows = int(value)

    def add_rows(self, rows: Tensor, weight: float = 1.0) -> None:
        """Fold ``weight ×`` the rows' outer products in (float64)."""
        self.gram_roundoff = max(self.gram_roundoff, 2.0**-53)
        self.sketcher.add_rows(rows, weight)

    def add(self, gram: Tensor, rows: int, row_sum: Tensor | None = None, weight: float = 1.0) -> None:
        raise RuntimeError("a sketched moment takes rows (add_rows), not ready Gram matrices")

    def add_diagonal(self, diagonal: Tensor, rows: int) -> None:
        raise RuntimeError("a sketched moment takes rows (add_rows), not diagonals")

    def note_precision(self, dtype: torch.dtype) -> None:
        """Remember that rows arrived in ``dtype``."""
        if dtype.is_floating_point:
            self.resolution = max(self.resolution, torch.finfo(dtype).eps)

    def fold(self) -> None:
        """Nothing is pending in a sketch."""

    def mean(self, *, homogeneous: bool = False) -> SketchedMoment:
        """The window's mean as a :class:`SketchedMoment`."""
        if homogeneous:
            raise RuntimeError("a sketched moment has no homogeneous coordinate")
        rows = max(self.rows, 1)
        return SketchedMoment(self.sketcher.sketch() / math.sqrt(rows),
                              self.sketcher.shrinkage / rows, self.dim)

    def allocate(self) -> None:
        """Hold the sketch's buffer now."""
        self.sketcher.allocate()

    def take_mean(self, *, homogeneous: bool = False) -> SketchedMoment:
        """:meth:`mean` in the sketch's own memory, which is handed over (no copy); the
        window is reset and its buffer allocated again when next used."""
        if homogeneous:
            raise RuntimeError("a sketched moment has no homogeneous coordinate")
        sketch, shrinkage, count = self.sketcher.take()
        rows = max(count, 1)
        self.reset()
        return SketchedMoment(sketch.div_(math.sqrt(rows)), shrinkage / rows, self.dim)

    def reset(self) -> None:
        """Empty the sketch for the next window."""
        self.sketcher.reset()
        self.resolution = self.gram_roundoff = 0.0

    def to(self, device: torch.device) -> None:
        """Move the sketch to ``device``."""
        self.sketcher.to(device)

    def buffers(self) -> list[Tensor]:
        """Nothing to sum: sketches merge (:meth:`FrequentDirections.merge`), see
        :meth:`~lightning_conditioning.capture.LayerCapture.all_reduce`."""
        return []
