"""Windowed sums of outer products: the only state the analysis keeps between hooks.

Sums (never averages) and row counts, so that micro-batches, gradient accumulation and DDP
ranks compose by plain addition; the mean is taken once, when a window is finished.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_conditioning.maths.moments import LayerMoments, held_bytes, moments_to_cpu
from lightning_conditioning.maths.remote import RemoteMoment
from lightning_conditioning.maths.resolution import unit_roundoff
from lightning_conditioning.maths.sampling import RowSampler, SampleTally
from lightning_conditioning.maths.sketch import BLOCK_ROWS, SketchedMomentSum

__all__ = [
    "PENDING_ADDS",
    "symmetrize_",
    "SecondMomentSum",
    "MomentSum",
    "LayerWindow",
    "LayerMoments",
    "moments_to_cpu",
    "held_bytes",
]


#: float32 additions summed in the pending buffer before it is folded into float64
PENDING_ADDS = 16


def _tf32_roundoff(dtype: torch.dtype, target: Tensor) -> float:
    """The rounding of float32 GEMMs on CUDA when TF32 (or bf16) matmuls are allowed
    (``torch.set_float32_matmul_precision("high" / "medium")``), else 0."""
    if target.device.type != "cuda" or torch.float32 not in (dtype, target.dtype):
        return 0.0
    precision = torch.get_float32_matmul_precision()
    if precision == "medium":
        return unit_roundoff("bfloat16")
    if precision == "high" or torch.backends.cuda.matmul.allow_tf32:
        return 2.0**-11  # TF32: 10 explicit mantissa bits
    return 0.0


def symmetrize_(matrix: Tensor, block: int = 256) -> Tensor:
    """``matrix ← (matrix + matrixᵀ)/2`` in place, a block of rows at a time (no ``d²``
    temporary), bit-identical to the out-of-place expression: an entry already averaged is
    averaged with itself, which changes nothing.

    Example:
        >>> symmetrize_(torch.tensor([[1.0, 2.0], [4.0, 3.0]]))
        tensor([[1., 3.],
                [3., 3.]])
    """
    dim = matrix.shape[0]
    for start in range(0, dim, block):
        stop = min(start + block, dim)
        average = (matrix[start:stop] + matrix[:, start:stop].T).mul_(0.5)
        matrix[start:stop] = average
        matrix[:, start:stop] = average.T
    return matrix


class SecondMomentSum:
    """Running ``Σ_rows r rᵀ`` (float64), ``Σ_rows r`` and the row count of one window.

    float32 contributions are first summed in a float32 *pending* buffer (with ``addmm_``
    straight from the rows, or a same-dtype ``add_``) and folded into the float64 sum every
    :data:`PENDING_ADDS` additions and whenever the sum is read (:meth:`mean`,
    :meth:`buffers`). Adding a float32 Gram to a float64 tensor would first materialise a
    float64 copy of it: one more ``d²`` pass per step, measured 1.58 → 1.00 ms for a 784²
    Gram of 256 rows (``benchmarks/kernels.py``), at an error of a few float32 ulps, the
    order of the float32 GEMM's own rounding. float64 contributions go straight to the sum.
    The pending buffer (``dim² × 4`` bytes) exists only while a window is open.

    Args:
        dim: length of a row.
        device: where the sums live (the layer's device: no host transfer in the hot path).
        track_row_sum: also keep ``Σ_rows r`` (needed for the homogeneous coordinate).
        diagonal: the moment is known to be diagonal (one-hot rows: an embedding's token
            counts): only its ``dim`` diagonal entries are kept (:meth:`add_diagonal`), and
            :meth:`mean` returns them as a vector, never a ``dim × dim`` matrix.

    Example:
        >>> acc = SecondMomentSum(2, torch.device("cpu"))
        >>> rows = torch.tensor([[1.0, 0.0], [1.0, 2.0]])
        >>> acc.add_rows(rows)
        >>> acc.mean()
        tensor([[1., 1.],
                [1., 2.]], dtype=torch.float64)
    """

    def __init__(
        self,
        dim: int,
        device: torch.device,
        *,
        track_row_sum: bool = False,
        diagonal: bool = False,
        sampler: RowSampler | None = None,
    ) -> None:
        if diagonal and track_row_sum:
            raise ValueError("a diagonal moment has no homogeneous coordinate (track_row_sum)")
        self.dim = dim
        self.diagonal = diagonal
        self._shape = (dim,) if diagonal else (dim, dim)
        self._device = device
        self._sum_outer: Tensor | None = torch.zeros(self._shape, dtype=torch.float64, device=device)
        self.sum_rows = torch.zeros(dim, dtype=torch.float64, device=device) if track_row_sum else None
        self.rows = 0
        #: machine epsilon of the least precise tensor added in this window (0 before any)
        self.resolution = 0.0
        #: unit roundoff of the least precise dtype a Gram of this window was summed in
        self.gram_roundoff = 0.0
        self._pending: Tensor | None = None  # float32 sum not yet folded (allocated lazily)
        self._pending_adds = 0
        #: ``(owner, Σ r_i² over every process)`` once the sum went to its owner (another rank)
        self._remote: tuple[int, Tensor] | None = None
        #: draws at most its limit of the rows of each :meth:`add_rows` (None: every row)
        self.sampler = sampler
        #: what the sampler did in this window (:mod:`~lightning_conditioning.maths.sampling`)
        self.tally = SampleTally()

    @property
    def sum_outer(self) -> Tensor:
        """``Σ r rᵀ`` of the window (float64; pending float32 sums not folded). Allocated
        again (zeros) on first use after :meth:`take_mean` handed the last one over."""
        if self._sum_outer is None:
            self._sum_outer = torch.zeros(self._shape, dtype=torch.float64, device=self._device)
        return self._sum_outer

    @property
    def allocated(self) -> bool:
        """Whether the float64 sum is held now (not after :meth:`take_mean`, until next used)."""
        return self._sum_outer is not None

    def _target(self, dtype: torch.dtype) -> Tensor:
        """Where a contribution of ``dtype`` is summed: float64 direct, others pending.

        Also remembers the coarsest rounding the sums have seen (:attr:`gram_roundoff`).
        """
        if dtype == torch.float64:
            target = self.sum_outer
        else:
            if self._pending is None:
                self._pending = torch.zeros_like(self.sum_outer, dtype=torch.float32)
            target = self._pending
        self.gram_roundoff = max(
            self.gram_roundoff, unit_roundoff(dtype), unit_roundoff(target.dtype), _tf32_roundoff(dtype, target)
        )
        return target

    def _added_to(self, target: Tensor) -> None:
        """Count an addition to the pending sum; fold it every :data:`PENDING_ADDS` additions."""
        if target is self._pending:
            self._pending_adds += 1
            if self._pending_adds >= PENDING_ADDS:
                self.fold()

    def add(self, gram: Tensor, rows: int, row_sum: Tensor | None = None, weight: float = 1.0) -> None:
        """Add ``weight * gram`` (a ``dim × dim`` sum of outer products over ``rows`` rows).

        ``row_sum`` (``Σ r`` of the same rows) is added unweighted: only unweighted inputs
        track it.
        """
        target = self._target(gram.dtype)
        target.add_(gram, alpha=weight)
        self._added_to(target)
        if self.sum_rows is not None and row_sum is not None:
            self.sum_rows.add_(row_sum)
        self.rows += rows

    def add_diagonal(self, diagonal: Tensor, rows: int) -> None:
        """Add the diagonal of a Gram of ``rows`` rows (a diagonal moment only), e.g. the token
        counts of one-hot rows. Exact: counts are integers in float64.

        Example:
            >>> counts = SecondMomentSum(3, torch.device("cpu"), diagonal=True)
            >>> counts.add_diagonal(torch.tensor([2.0, 0.0, 1.0]), rows=3)
            >>> counts.mean()
            tensor([0.6667, 0.0000, 0.3333], dtype=torch.float64)
        """
        if not self.diagonal:
            raise RuntimeError("add_diagonal needs a diagonal moment (diagonal=True)")
        self.sum_outer.add_(diagonal.to(self.sum_outer.dtype))
        self.rows += rows

    def add_rows(self, rows: Tensor, weight: float = 1.0) -> None:
        """Add ``weight * rowsᵀ rows`` of an ``(n, dim)`` matrix in one fused GEMM (with a
        :attr:`sampler`, of a uniform sample of the rows, scaled to stand for all ``n``).

        Tracks ``Σ r`` (unweighted) when the sum was created with ``track_row_sum``.
        """
        count = int(rows.shape[0])
        factor = 1.0
        if self.sampler is not None:
            counted = self.tally.counted
            rows, factor = self.sampler.sample(rows, weight, self.tally)
            count = self.tally.counted - counted
            if count == 0:
                return
        target = self._target(rows.dtype)
        rows = rows.to(target.dtype)
        target.addmm_(rows.T, rows, alpha=weight * factor)
        self._added_to(target)
        if self.sum_rows is not None:
            self.sum_rows.add_(rows.sum(0), alpha=factor)
        self.rows += count

    def copy_from(self, other: SecondMomentSum) -> None:
        """Become a copy of ``other``'s window so far (a dense sum of the same shape).

        Example:
            >>> first, second = SecondMomentSum(2, torch.device("cpu")), SecondMomentSum(2, torch.device("cpu"))
            >>> first.add_rows(torch.tensor([[1.0, 2.0]]))
            >>> second.copy_from(first)
            >>> second.rows, second.mean().tolist()
            (1, [[1.0, 2.0], [2.0, 4.0]])
        """
        other.fold()
        self.fold()
        self.sum_outer.copy_(other.sum_outer)
        if self.sum_rows is not None and other.sum_rows is not None:
            self.sum_rows.copy_(other.sum_rows)
        self.rows = other.rows
        self.tally.copy_from(other.tally)
        self.resolution = max(self.resolution, other.resolution)
        self.gram_roundoff = max(self.gram_roundoff, other.gram_roundoff)

    def fold(self) -> None:
        """Fold the float32 pending sum into the float64 sum (no-op when nothing is pending)."""
        if self._pending is not None and self._pending_adds:
            self.sum_outer.add_(self._pending)
            self._pending.zero_()
        self._pending_adds = 0

    def note_precision(self, dtype: torch.dtype) -> None:
        """Remember that rows arrived in ``dtype`` (sets the rank tolerance floor)."""
        if dtype.is_floating_point:
            self.resolution = max(self.resolution, torch.finfo(dtype).eps)

    def hand_over(self, owner: int, diagonal: Tensor) -> None:
        """The window's sum went to process ``owner`` (``diagonal``: the summed ``Σ r_i²``):
        let go of it here; :meth:`mean` gives a :class:`RemoteMoment` until the next window.

        Example:
            >>> acc = SecondMomentSum(2, torch.device("cpu"))
            >>> acc.add_rows(torch.tensor([[1.0, 2.0]]))
            >>> acc.hand_over(1, acc.sum_outer.diagonal().clone())
            >>> acc.allocated, acc.take_mean()
            (False, RemoteMoment(size=2, owner=1))
        """
        self._sum_outer, self._pending, self._pending_adds = None, None, 0
        self._remote = (int(owner), diagonal.to(torch.float64))

    def _remote_mean(self, homogeneous: bool) -> RemoteMoment:
        assert self._remote is not None
        owner, diagonal = self._remote
        if homogeneous:
            diagonal = torch.cat([diagonal, diagonal.new_tensor([float(self.rows)])])
        return RemoteMoment(diagonal / max(self.rows, 1), owner)

    def mean(self, *, homogeneous: bool = False) -> Tensor | RemoteMoment:
        """``Σ r rᵀ / rows`` (its diagonal, a vector, for a diagonal moment); with
        ``homogeneous`` the ``[r; 1]`` second moment (dim + 1). A :class:`RemoteMoment`
        when the sum went to another process (:meth:`hand_over`)."""
        if self._remote is not None:
            return self._remote_mean(homogeneous)
        self.fold()
        rows = max(self.rows, 1)
        if not homogeneous:
            return self.sum_outer / rows
        if self.sum_rows is None:
            raise RuntimeError("homogeneous mean needs track_row_sum=True")
        dim = self.dim
        out = self.sum_outer.new_empty(dim + 1, dim + 1)
        out[:dim, :dim] = self.sum_outer
        out[:dim, dim] = self.sum_rows
        out[dim, :dim] = self.sum_rows
        out[dim, dim] = self.rows
        return out / rows

    def allocate(self) -> None:
        """Hold the float64 sum now (zeros) if :meth:`take_mean` handed the last one over."""
        self.sum_outer  # noqa: B018 (the property allocates)

    def release(self) -> None:
        """Let go of the float64 sum (allocated again, zeros, when next used)."""
        self._sum_outer = None
        self.reset()

    def take_mean(self, *, homogeneous: bool = False) -> Tensor | RemoteMoment:
        """:meth:`mean`, computed in the sum's own memory, which is handed over: no second
        ``d²`` copy exists while the mean is analysed. The window is reset; its sum is
        allocated again when next used.

        Example:
            >>> acc = SecondMomentSum(2, torch.device("cpu"))
            >>> acc.add_rows(torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
            >>> acc.take_mean()
            tensor([[1., 1.],
                    [1., 2.]], dtype=torch.float64)
            >>> acc.allocated, acc.rows
            (False, 0)
        """
        if self._remote is not None:
            mean: Tensor | RemoteMoment = self._remote_mean(homogeneous)
        elif homogeneous:
            mean = self.mean(homogeneous=True)  # a new (d+1)² tensor
        else:
            self.fold()
            mean = self.sum_outer.div_(max(self.rows, 1))
            if not self.diagonal:
                symmetrize_(mean)
        self._sum_outer = None
        self.reset()
        return mean

    def reset(self) -> None:
        """Zero the sums for the next window (the float64 buffers are reused; the float32
        pending buffer is released, so that it costs no memory between windows)."""
        if self._sum_outer is not None:
            self._sum_outer.zero_()
        self._pending = None
        self._pending_adds = 0
        self._remote = None
        if self.sum_rows is not None:
            self.sum_rows.zero_()
        self.rows = 0
        self.tally.reset()
        self.resolution = 0.0
        self.gram_roundoff = 0.0

    def to(self, device: torch.device) -> None:
        """Move the sums to ``device`` (e.g. when the model moved after the hooks were set)."""
        self.fold()
        self._device = device
        self._sum_outer = self._sum_outer.to(device) if self._sum_outer is not None else None
        self.sum_rows = self.sum_rows.to(device) if self.sum_rows is not None else None
        self._pending = None

    def buffers(self) -> list[Tensor]:
        """The tensors a distributed reduction must sum (pending sums folded first)."""
        self.fold()
        return [t for t in (self.sum_outer, self.sum_rows) if t is not None]


#: what a layer's window keeps per moment: a dense (or diagonal) sum, or a sketch
MomentSum = SecondMomentSum | SketchedMomentSum
#: a sketch's shape: its rows ℓ, or ``(ℓ, block rows)``
#: (:class:`~lightning_conditioning.maths.sketch.FrequentDirections`)
SketchShape = int | tuple[int, int]


def _sampled(tally: SampleTally) -> SampleTally | None:
    """A copy of a tally that left rows out (None when every row entered)."""
    if not tally.sampled:
        return None
    found = SampleTally()
    found.copy_from(tally)
    return found


def _sketched(
    dim: int,
    device: torch.device,
    shape: SketchShape,
    *,
    track_diagonal: bool = False,
    sampler: RowSampler | None = None,
) -> SketchedMomentSum:
    rank, block = (shape, BLOCK_ROWS) if isinstance(shape, int) else shape
    return SketchedMomentSum(dim, device, rank=rank, block_rows=block, track_diagonal=track_diagonal, sampler=sampler)


class LayerWindow:
    """All state of one layer for the current window: Σx, Σ∇h and per-unit extremes.

    Dead / full units are read off the per-unit maximum / minimum (two cheap reductions,
    cheaper than counting positive rows, and exact: a unit is dead iff its maximum is <= 0).

    Example:
        >>> window = LayerWindow(input_dim=3, grad_dim=2, units=3, device=torch.device("cpu"))
        >>> window.add_units(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([-1.0, -2.0, 0.5]))
        >>> moments = window.moments()
        >>> moments.dead_units, moments.full_units
        (1, 1)
    """

    def __init__(
        self,
        input_dim: int,
        grad_dim: int,
        units: int,
        device: torch.device,
        *,
        homogeneous: bool = False,
        diagonal_input: bool = False,
        input_sketch: SketchShape | None = None,
        grad_sketch: SketchShape | None = None,
        sampler: RowSampler | None = None,
    ) -> None:
        self.homogeneous = homogeneous and input_sketch is None
        self.input: MomentSum = (
            _sketched(input_dim, device, input_sketch, track_diagonal=True, sampler=sampler)
            if input_sketch
            else SecondMomentSum(
                input_dim, device, track_row_sum=self.homogeneous, diagonal=diagonal_input, sampler=sampler
            )
        )
        self.grad: MomentSum = (
            _sketched(grad_dim, device, grad_sketch, sampler=sampler)
            if grad_sketch
            else SecondMomentSum(grad_dim, device, sampler=sampler)
        )
        self.unit_max = torch.full((units,), -math.inf, dtype=torch.float64, device=device)
        self.unit_min = torch.full((units,), math.inf, dtype=torch.float64, device=device)
        #: the largest leading dimension of the lookup indices in the window (0: none seen):
        #: 1 for a table looked up once for the whole batch (see ``LayerMoments.shared_lookup``)
        self.lookup_leading = 0

    @property
    def device(self) -> torch.device:
        """Where the window's sums live."""
        return self.unit_max.device

    def to(self, device: torch.device) -> None:
        """Move every sum of the window to ``device`` (contents kept)."""
        self.input.to(device)
        self.grad.to(device)
        self.unit_max = self.unit_max.to(device)
        self.unit_min = self.unit_min.to(device)

    def add_units(self, unit_max: Tensor, unit_min: Tensor) -> None:
        """Fold in the per-unit maximum and minimum of new rows."""
        torch.maximum(self.unit_max, unit_max, out=self.unit_max)
        torch.minimum(self.unit_min, unit_min, out=self.unit_min)

    def reset(self) -> None:
        """Start a new window."""
        self.input.reset()
        self.grad.reset()
        self.unit_max.fill_(-math.inf)
        self.unit_min.fill_(math.inf)
        self.lookup_leading = 0

    def allocate(self, *, with_input: bool = True) -> None:
        """Hold every sum of the window now (the ones handed over by ``moments(take=True)``
        are allocated again, zeros): allocated between steps, not among a step's activations,
        where long-lived sums would fragment the heap. ``with_input=False`` leaves Σx's sum to
        be allocated when first used (a layer that shares another's Σx never uses it)."""
        if with_input:
            self.input.allocate()
        self.grad.allocate()

    def shares_rows_with(self, other: LayerWindow) -> bool:
        """Whether the same input rows make the same Σx sum here and in ``other``: two dense,
        non-diagonal sums of one width, both with or both without the homogeneous coordinate,
        or two sketches of one shape (a sketch is a deterministic function of its rows)."""
        mine, theirs = self.input, other.input
        if isinstance(mine, SketchedMomentSum) and isinstance(theirs, SketchedMomentSum):
            ours, their = mine.sketcher, theirs.sketcher
            return (ours.dim, ours.rank, ours.block_rows) == (their.dim, their.rank, their.block_rows)
        return (
            isinstance(mine, SecondMomentSum)
            and isinstance(theirs, SecondMomentSum)
            and not mine.diagonal
            and not theirs.diagonal
            and mine.dim == theirs.dim
            and self.homogeneous == other.homogeneous
        )

    def reads_rows_like(self, other: LayerWindow) -> bool:
        """Whether one input tensor gives the same Σx here and in ``other``, however each
        keeps it (dense or sketched): one width, neither diagonal, and both with or both
        without the homogeneous coordinate."""
        mine, theirs = self.input, other.input
        return (
            mine.dim == theirs.dim
            and not mine.diagonal
            and not theirs.diagonal
            and self.homogeneous == other.homogeneous
        )

    def copy_input_from(self, other: LayerWindow) -> None:
        """Take ``other``'s Σx sum so far (see :meth:`shares_rows_with`)."""
        if isinstance(self.input, SketchedMomentSum) and isinstance(other.input, SketchedMomentSum):
            self.input.copy_from(other.input)
        else:
            assert isinstance(self.input, SecondMomentSum) and isinstance(other.input, SecondMomentSum)
            self.input.copy_from(other.input)

    def counts(self) -> list[float]:
        """The counts a distributed reduction must sum (rows, and what sampling did)."""
        return [float(self.input.rows), float(self.grad.rows), *self.input.tally.values(), *self.grad.tally.values()]

    def set_counts(self, counts: list[float]) -> None:
        """Overwrite the counts (after a distributed reduction)."""
        self.input.rows, self.grad.rows = int(round(counts[0])), int(round(counts[1]))
        self.input.tally.set_values(list(counts[2:7]))
        self.grad.tally.set_values(list(counts[7:12]))

    #: the values :meth:`precisions` lists, each the coarsest over processes after a reduction
    PRECISIONS = 5

    def precisions(self) -> list[float]:
        """What a distributed reduction takes the maximum of: the precisions the rows and Grams
        had (the coarsest sets every process's floor) and whether a lookup was shared."""
        x, g = self.input, self.grad
        return [x.resolution, x.gram_roundoff, g.resolution, g.gram_roundoff, self.lookup_leading]

    def set_precisions(self, values: list[float]) -> None:
        """Overwrite what :meth:`precisions` lists (after a distributed reduction)."""
        x, g = self.input, self.grad
        x.resolution, x.gram_roundoff, g.resolution, g.gram_roundoff, leading = values
        self.lookup_leading = int(leading)

    def moments(self, *, take: bool = False) -> LayerMoments:
        """Means of the window (float64, on the window's device; see :func:`moments_to_cpu`).
        With ``take``, the means are computed in the sums' own memory, which is handed over
        (no ``d²`` copy), and the window is reset.

        Example:
            >>> window = LayerWindow(2, 1, 2, torch.device("cpu"))
            >>> window.input.add_rows(torch.tensor([[1.0, 2.0]]))
            >>> window.moments(take=True).input_second_moment
            tensor([[1., 2.],
                    [2., 4.]], dtype=torch.float64)
            >>> window.input.rows
            0
        """
        moments = LayerMoments(
            input_second_moment=None,
            grad_second_moment=None,
            input_rows=self.input.rows,
            grad_rows=self.grad.rows,
            unit_max=self.unit_max.clone(),
            unit_min=self.unit_min.clone(),
            input_resolution=self.input.resolution,
            grad_resolution=self.grad.resolution,
            input_gram_roundoff=self.input.gram_roundoff,
            grad_gram_roundoff=self.grad.gram_roundoff,
            input_homogeneous=self.homogeneous,
            input_sampling=_sampled(self.input.tally),
            grad_sampling=_sampled(self.grad.tally),
        )
        if self.input.rows > 0:
            moments.input_second_moment = (
                self.input.take_mean(homogeneous=self.homogeneous)
                if take
                else self.input.mean(homogeneous=self.homogeneous)
            )
        if self.grad.rows > 0:
            moments.grad_second_moment = self.grad.take_mean() if take else self.grad.mean()
        if take:
            self.reset()
        return moments
