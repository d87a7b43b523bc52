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

Rows that do not fit the buffer are shrunk together with it *in one block* (up to
:data:`BLOCK_ROWS` rows at a time, through the block's ``m × m`` Gram), not ``ℓ`` rows at a
time: a 2,048-token step is one Gram GEMM and one eigen-solve, not 2,048/ℓ small ones in the
backward pass. The eigenvalues of a block shrunk before anything was lost (``Δ = 0`` so far)
are the exact nonzero spectrum of every row added up to then; while no row follows, the sketch
keeps them (:attr:`FrequentDirections.exact_eigenvalues`) and the moment is exact, whatever
``ℓ``: a 50,257-token head's Σ∇h over 2,048 rows is exact in ``O(ℓ·d + m²)`` memory.

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

from lightning_conditioning.maths.remote import MatrixStandIn, RemoteMoment
from lightning_conditioning.maths.sampling import RowSampler, SampleTally

__all__ = ["FrequentDirections", "shrink", "shrink_gram", "sketch_eigenvalues", "BLOCK_ROWS", "COLUMN_BLOCK_BYTES"]

#: the most rows shrunk in one block (its ``m × m`` float64 Gram: 32 MiB at 2,048): an add of
#: up to this many rows (minus those already in the buffer) keeps the window exact
BLOCK_ROWS = 2048
#: bytes of one column block of rows converted to float64 at a time
COLUMN_BLOCK_BYTES = 1 << 23


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
    if rows.shape[0] == 0:
        return rows, 0.0
    _, combination, delta = shrink_gram(rows @ rows.T, rank)
    return combination @ rows, delta


def shrink_gram(gram: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """``(eigenvalues, combination, δ)`` of a shrink from the ``m × m`` Gram of ``m`` rows:
    the Gram's eigenvalues (descending, clamped at 0), the ``(kept, m)`` matrix whose product
    with the rows gives the shrunk rows ``diag(sqrt(λ' / λ)) Uᵀ rows`` (directions with λ = 0
    dropped), and ``δ``, the ``(rank+1)``-th largest eigenvalue (0 when there are no more).

    Example:
        >>> values, combination, delta = shrink_gram(torch.diag(torch.tensor([9.0, 4.0, 1.0])), 2)
        >>> values.tolist(), combination.shape, delta
        ([9.0, 4.0, 1.0], torch.Size([2, 3]), 1.0)
    """
    count = gram.shape[0]
    values, vectors = torch.linalg.eigh((gram + gram.T) * 0.5)
    values, vectors = values.flip(0).clamp_min(0.0), vectors.flip(1)
    delta = float(values[rank]) if count > rank else 0.0
    kept = min(rank, count)
    lowered = (values[:kept] - delta).clamp_min(0.0)
    factor = torch.where(
        values[:kept] > 0, (lowered / values[:kept].clamp_min(1e-300)).sqrt(), torch.zeros_like(lowered)
    )
    return values, factor[:, None] * vectors[:, :kept].T, delta


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
        block_rows: the most rows shrunk in one block (its Gram is ``block_rows²`` float64);
            at most ``dim`` (at least ``2·rank``).

    Attributes:
        rows: rows added (their count, for the mean).
        shrinkage: ``Δ``, the total of the shrinks (same units as the sum).
    """

    def __init__(self, dim: int, rank: int, device: torch.device, *, block_rows: int = BLOCK_ROWS) -> None:
        if rank < 1 or dim < 1:
            raise ValueError(f"rank and dim must be positive, got rank={rank}, dim={dim}")
        self.dim, self.rank = dim, rank
        # a block of more rows than the dimension costs an m³ solve for a rank-d Gram
        self.block_rows = max(min(int(block_rows), dim), 2 * rank)
        #: the exact eigenvalues (descending) of every row added so far, when the last add was
        #: shrunk in one block before anything was lost; None otherwise (see :meth:`eigenvalues`)
        self.exact_eigenvalues: Tensor | None = None
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
        self.exact_eigenvalues = None
        return taken

    def copy_from(self, other: FrequentDirections) -> None:
        """Become a copy of ``other`` (a sketch of the same shape)."""
        self.buffer.copy_(other.buffer)
        self.filled, self.rows, self.shrinkage = other.filled, other.rows, other.shrinkage
        found = other.exact_eigenvalues
        self.exact_eigenvalues = found.clone() if found is not None else None

    @property
    def nbytes(self) -> int:
        """Bytes the buffer holds."""
        return 2 * self.rank * self.dim * 8  # float64, whether held now or not

    def add_rows(self, rows: Tensor, weight: float = 1.0) -> None:
        """Fold ``weight ×`` the outer products of an ``(n, dim)`` matrix's rows into the sketch.

        Rows that fit the buffer are copied into it (converted and scaled there: no ``(n, dim)``
        float64 temporary, whatever the rows' dtype). Rows that do not are shrunk together with
        the buffer, :data:`BLOCK_ROWS` at a time (:meth:`_shrink_with`)."""
        count = int(rows.shape[0])
        if count == 0:
            return
        self.rows += count
        self.exact_eigenvalues = None  # new rows: a spectrum known before no longer holds
        scale = math.sqrt(weight)
        if self.filled + count <= self.buffer.shape[0]:
            block = self.buffer[self.filled : self.filled + count]
            block.copy_(rows)
            if weight != 1.0:
                block.mul_(scale)
            self.filled += count
            return
        start = 0
        while start < count:
            step = max(self.block_rows - self.filled, 1)
            self._shrink_with(rows[start : start + step], scale)
            start += step

    def _shrink_with(self, rows: Tensor, scale: float) -> None:
        """Shrink the buffer and ``scale ×`` ``rows`` together, in one block: the ``m × m``
        Gram of the stacked rows (float64, a column block of ``rows`` converted at a time), its
        eigen-solve, and the ``ℓ`` new rows. When nothing was shrunk before, the block's
        eigenvalues are the exact spectrum of every row so far (kept until a row follows)."""
        kept_rows = self.buffer[: self.filled]
        stacked = self.filled + int(rows.shape[0])
        gram = kept_rows.new_zeros(stacked, stacked)
        width = max(1, COLUMN_BLOCK_BYTES // (8 * max(stacked, 1)))
        for start in range(0, self.dim, width):
            part = self._stack(kept_rows, rows, scale, start, width)
            gram.addmm_(part, part.T)
        values, combination, delta = shrink_gram(gram, self.rank)  # combination: (kept, stacked)
        exact = values.cpu() if self.shrinkage == 0 else None
        kept = combination.shape[0]
        new_rows = kept_rows.new_empty(kept, self.dim)
        for start in range(0, self.dim, width):
            new_rows[:, start : start + width] = combination @ self._stack(kept_rows, rows, scale, start, width)
        self.buffer.zero_()
        self.buffer[:kept] = new_rows
        self.filled = kept
        self.shrinkage += delta
        self.exact_eigenvalues = exact

    @staticmethod
    def _stack(kept_rows: Tensor, rows: Tensor, scale: float, start: int, width: int) -> Tensor:
        """Columns ``start:start + width`` of the buffer's rows above ``scale ×`` the new rows,
        a new float64 tensor (the caller's rows are never written)."""
        part = torch.cat([kept_rows[:, start : start + width], rows[:, start : start + width].to(kept_rows.dtype)])
        if scale != 1.0:
            part[kept_rows.shape[0] :].mul_(scale)
        return part

    def _shrink(self) -> None:
        """Shrink the buffer alone to ``ℓ`` rows (before a merge sends it)."""
        exact = self.exact_eigenvalues
        self._shrink_with(self.buffer[:0], 1.0)
        self.exact_eigenvalues = exact if exact is not None else self.exact_eigenvalues

    def sketch(self) -> Tensor:
        """The current sketch rows (a view; at most ``2·rank``)."""
        return self.buffer[: self.filled]

    def eigenvalues(self) -> tuple[Tensor, float]:
        """``(eigenvalues, Δ)``: the true sum's ``i``-th eigenvalue lies in
        ``[values[i], values[i] + Δ]``, and every one past ``len(values)`` in ``[0, Δ]``; the
        exact nonzero spectrum and ``Δ = 0`` when it is known (:attr:`exact_eigenvalues`)."""
        if self.exact_eigenvalues is not None:
            return self.exact_eigenvalues.clone(), 0.0
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
        self.exact_eigenvalues = None

    def to(self, device: torch.device) -> None:
        """Move the buffer to ``device``."""
        self._device = device
        self._buffer = self._buffer.to(device) if self._buffer is not None else None


class SketchedMoment(MatrixStandIn):
    """A finished sketched moment: ``M ≈ sketchᵀ sketch`` with ``0 ≼ M − sketchᵀ sketch ≼
    shrinkage·I`` (moment units: the window's mean), a ``dim × dim`` matrix never formed.
    ``eigenvalues``, when given, is ``M``'s exact nonzero spectrum (descending, float64: the
    window's rows were shrunk in one block before anything was lost); the sketch and its
    shrinkage then serve only merges.

    Example:
        >>> m = SketchedMoment(torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64), 0.5, 3)
        >>> m.shape, m.dim(), m.exact
        ((3, 3), 2, False)
    """

    def __init__(
        self,
        sketch: Tensor,
        shrinkage: float,
        dim: int,
        eigenvalues: Tensor | None = None,
        diagonal: Tensor | None = None,
    ) -> None:
        self.sketch, self.shrinkage, self.size = sketch, float(shrinkage), int(dim)
        self.eigenvalues = eigenvalues
        #: ``M``'s exact diagonal (float64), when the sum tracked it (``track_diagonal``)
        self.diagonal = diagonal

    @property
    def exact(self) -> bool:
        """Whether the moment's spectrum is known exactly (``eigenvalues``, or nothing shrunk)."""
        return self.eigenvalues is not None or self.shrinkage == 0

    def isfinite(self) -> bool:
        """Whether the sketch holds only finite values (one sum, no copy of the sketch,
        unless that sum overflows)."""
        if not math.isfinite(self.shrinkage):
            return False
        if self.eigenvalues is not None and not bool(torch.isfinite(self.eigenvalues).all()):
            return False
        return math.isfinite(float(self.sketch.sum())) or bool(torch.isfinite(self.sketch).all())

    def any(self) -> bool:
        """Whether the moment may be nonzero."""
        if self.eigenvalues is not None:
            return bool(self.eigenvalues.any())
        return bool(self.sketch.any()) or self.shrinkage > 0

    def cpu(self) -> SketchedMoment:
        """The same moment with its sketch on the CPU."""
        return SketchedMoment(
            self.sketch.cpu(),
            self.shrinkage,
            self.size,
            self.eigenvalues,
            self.diagonal.cpu() if self.diagonal is not None else None,
        )


#: rows converted to float64 at once for a sketch's exact diagonal
DIAGONAL_ROWS = 1024


class SketchedMomentSum:
    """A :class:`~lightning_conditioning.maths.accumulate.SecondMomentSum` kept as a Frequent
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

    def __init__(
        self,
        dim: int,
        device: torch.device,
        *,
        rank: int,
        block_rows: int = BLOCK_ROWS,
        track_diagonal: bool = False,
        sampler: RowSampler | None = None,
    ) -> None:
        self.dim = dim
        #: draws at most its limit of the rows of each :meth:`add_rows` (None: every row)
        self.sampler = sampler
        #: what the sampler did in this window (:mod:`~lightning_conditioning.maths.sampling`)
        self.tally = SampleTally()
        self.sketcher = FrequentDirections(dim, rank, device, block_rows=block_rows)
        self.resolution = 0.0
        self.gram_roundoff = 0.0
        #: ``Σ weight·r_i²`` per coordinate (float64), exact: the diagonal the sketch blurs
        self.diagonal_sum = torch.zeros(dim, dtype=torch.float64, device=device) if track_diagonal else None
        #: the process the merged sketch went to, when another (see :meth:`hand_over`)
        self.owner: int | None = None

    @property
    def rows(self) -> int:
        """Rows added in this window."""
        return self.sketcher.rows

    @rows.setter
    def rows(self, value: int) -> None:
        self.sketcher.rows = int(value)

    def add_rows(self, rows: Tensor, weight: float = 1.0) -> None:
        """Fold ``weight ×`` the rows' outer products in (float64; with a :attr:`sampler`, of a
        uniform sample of the rows, scaled to stand for all of them)."""
        self.gram_roundoff = max(self.gram_roundoff, 2.0**-53)
        count = int(rows.shape[0])
        if self.sampler is not None:
            counted = self.tally.counted
            rows, factor = self.sampler.sample(rows, weight, self.tally)
            count, weight = self.tally.counted - counted, weight * factor
            if count == 0:
                return
        added = self.sketcher.rows
        self.sketcher.add_rows(rows, weight)
        self.sketcher.rows = added + count
        if self.diagonal_sum is not None:  # in float64, DIAGONAL_ROWS rows at a time (no n × d copy)
            for start in range(0, int(rows.shape[0]), DIAGONAL_ROWS):
                block = rows[start : start + DIAGONAL_ROWS].to(torch.float64)  # may be rows themselves
                self.diagonal_sum.add_(block.square().sum(0), alpha=weight)

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

    def hand_over(self, owner: int) -> None:
        """The window's sketch went to process ``owner`` (merged there): let go of it here,
        keeping the row count; :meth:`mean` gives a ``RemoteMoment`` until the next window."""
        rows = self.sketcher.rows
        self.sketcher.take()
        self.sketcher.rows, self.owner = rows, int(owner)

    def _remote(self) -> RemoteMoment:
        assert self.owner is not None
        return RemoteMoment(self._diagonal(max(self.rows, 1)), self.owner, size=self.dim, kind="sketch")

    def mean(self, *, homogeneous: bool = False) -> SketchedMoment | RemoteMoment:
        """The window's mean as a :class:`SketchedMoment` (a ``RemoteMoment`` when the
        sketch went to another process)."""
        if homogeneous:
            raise RuntimeError("a sketched moment has no homogeneous coordinate")
        if self.owner is not None:
            return self._remote()
        rows = max(self.rows, 1)
        exact = self.sketcher.exact_eigenvalues
        return SketchedMoment(
            self.sketcher.sketch() / math.sqrt(rows),
            self.sketcher.shrinkage / rows,
            self.dim,
            exact / rows if exact is not None else None,
            self._diagonal(rows),
        )

    def _diagonal(self, rows: int) -> Tensor | None:
        return self.diagonal_sum / rows if self.diagonal_sum is not None else None

    def allocate(self) -> None:
        """Hold the sketch's buffer now."""
        self.sketcher.allocate()

    def copy_from(self, other: SketchedMomentSum) -> None:
        """Become a copy of ``other``'s window so far (a sketch of the same shape)."""
        self.sketcher.copy_from(other.sketcher)
        if self.diagonal_sum is not None and other.diagonal_sum is not None:
            self.diagonal_sum.copy_(other.diagonal_sum)
        self.tally.copy_from(other.tally)
        self.resolution = max(self.resolution, other.resolution)
        self.gram_roundoff = max(self.gram_roundoff, other.gram_roundoff)

    def release(self) -> None:
        """Let go of the sketch's buffer (allocated again, zeros, when next used)."""
        self.sketcher.take()
        self.reset()

    def take_mean(self, *, homogeneous: bool = False) -> SketchedMoment | RemoteMoment:
        """:meth:`mean` in the sketch's own memory, which is handed over (no copy); the
        window is reset and its buffer allocated again when next used."""
        if homogeneous:
            raise RuntimeError("a sketched moment has no homogeneous coordinate")
        if self.owner is not None:
            remote = self._remote()
            self.reset()
            return remote
        exact = self.sketcher.exact_eigenvalues
        sketch, shrinkage, count = self.sketcher.take()
        rows = max(count, 1)
        diagonal = self._diagonal(rows)
        self.reset()
        return SketchedMoment(
            sketch.div_(math.sqrt(rows)),
            shrinkage / rows,
            self.dim,
            exact / rows if exact is not None else None,
            diagonal,
        )

    def reset(self) -> None:
        """Empty the sketch for the next window."""
        self.sketcher.reset()
        self.tally.reset()
        self.owner = None
        self.resolution = self.gram_roundoff = 0.0
        if self.diagonal_sum is not None:
            self.diagonal_sum.zero_()

    def to(self, device: torch.device) -> None:
        """Move the sketch to ``device``."""
        self.sketcher.to(device)
        if self.diagonal_sum is not None:
            self.diagonal_sum = self.diagonal_sum.to(device)

    def buffers(self) -> list[Tensor]:
        """What a distributed reduction sums: the tracked diagonal. The sketches themselves
        merge (:meth:`FrequentDirections.merge`), see
        :meth:`~lightning_conditioning.capture.hooks.LayerCapture.all_reduce`."""
        return [self.diagonal_sum] if self.diagonal_sum is not None else []
