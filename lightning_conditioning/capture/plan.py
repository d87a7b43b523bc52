"""The plan: before anything is allocated, how each moment of each layer is kept.

A dense moment is a ``d × d`` float64 sum (``8·d²`` bytes, plus a float32 pending buffer of
``4·d²`` while a window is open when the Grams are float32): exact, but a 50,257-token
``lm_head``'s Σ∇h would take 20 GB. The plan gives every moment one method, within a memory
budget:

- ``"dense"``: the exact ``d × d`` sum (the smallest moments first, while the budget lasts);
- ``"diagonal"``: an embedding's Σx (token frequencies), ``8·d`` bytes, always;
- ``"sketch"``: a Frequent Directions sketch of ``2ℓ × d`` float64 values
  (:mod:`lightning_conditioning.maths.sketch`): exact while a window's rows arrive in one block of at
  most :data:`~lightning_conditioning.maths.sketch.BLOCK_ROWS` (a step of a few thousand tokens),
  certified error bars beyond; every built-in layer kind, conv layers included, hands its rows
  to a sketch;
- ``"skipped"``: not even a minimal sketch fits (or a custom adapter hands over only ready
  Grams): the layer is not analysed, and the plan says so.

The budget covers everything the analysis holds at its peak: the sums (which become the means
when a window is finished: no copy), plus the working copies of the largest dense eigen-solve
(:data:`SOLVE_COPIES` ``d × d`` float64 copies: the symmetrised matrix and LAPACK's own), the
plan's :attr:`~AnalysisPlan.workspace`, or, when larger, what one block of a sketch needs
while it is shrunk (:func:`block_workspace`). A background analysis still running when the next
window opens would hold a second set of sums: the monitor then waits for it unless the budget
has room for both.

The default budget (``memory_budget="auto"``) is set from the memory there is, not from the
model alone: a fifth of the training state (parameters, gradients and two Adam states: 0.8× the
parameter bytes), at least :data:`AUTO_FLOOR` (512 MiB: every moment of EfficientNet-B0,
DenseNet-121, RegNet-Y-400MF or a ViT-tiny is dense in it), and at most a quarter of the memory
the device has free when the plan is made.

Example:
    >>> from torch import nn
    >>> from lightning_conditioning.capture.hooks import find_layers
    >>> model = nn.Sequential(nn.Linear(65536, 10))
    >>> plan = plan_analysis(find_layers(model), budget=64 << 20)
    >>> [(m.moment, m.method, m.rank, m.block) for m in plan.moments]
    [('input', 'sketch', 23, 1024), ('grad', 'dense', None, None)]
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lightning_conditioning.maths.sketch import BLOCK_ROWS, COLUMN_BLOCK_BYTES

__all__ = [
    "MomentPlan",
    "AnalysisPlan",
    "plan_analysis",
    "memory_budget",
    "SKETCH_RANK",
    "MIN_SKETCH_RANK",
    "SOLVE_COPIES",
    "AUTO_FLOOR",
    "BLOCK_WORKSPACE",
    "block_workspace",
]

Method = Literal["dense", "diagonal", "sketch", "skipped"]
#: rows a sketch keeps (ℓ) when the budget allows; its buffer holds 2ℓ rows
SKETCH_RANK = 256
#: the fewest rows a sketch may keep before the moment is skipped instead
MIN_SKETCH_RANK = 16
#: ``d × d`` float64 copies a dense eigen-solve makes (the symmetrised matrix, LAPACK's input)
SOLVE_COPIES = 2
_MIB = 1 << 20
#: the least budget ``"auto"`` gives (unless a quarter of the free memory is less)
AUTO_FLOOR = 512 * _MIB
#: share of the training state (parameters, gradients, two Adam states) ``"auto"`` gives
AUTO_SHARE = 0.2
#: the most bytes a sketch's block shrink allocates (:func:`block_workspace` of a wide moment)
BLOCK_WORKSPACE = 3 * 8 * BLOCK_ROWS * BLOCK_ROWS + 2 * COLUMN_BLOCK_BYTES


def block_workspace(dim: int, rows: int = BLOCK_ROWS) -> int:
    """Bytes a block shrink of a ``dim``-wide sketch allocates when it takes ``rows`` rows at
    a time: the block's Gram, its symmetrised copy and LAPACK's (three ``m²`` float64,
    ``m = min(rows, dim)``), and two float64 column blocks of the rows (at most 32 MiB each).

    Example:
        >>> block_workspace(50257) == BLOCK_WORKSPACE, block_workspace(12)
        (True, 5760)
    """
    rows = min(rows, dim)
    return 3 * 8 * rows * rows + 2 * min(COLUMN_BLOCK_BYTES, 8 * rows * dim)


@dataclass(frozen=True)
class MomentPlan:
    """How one moment of one layer is kept."""

    layer: str
    moment: Literal["input", "grad"]
    dim: int
    method: Method
    nbytes: int
    rank: int | None = None
    reason: str = ""
    #: a sketch's block: the most rows shrunk at once (a window of no more rows is exact)
    block: int | None = None


@dataclass(frozen=True)
class AnalysisPlan:
    """Every moment's :class:`MomentPlan`, and the budget they were fitted into."""

    moments: tuple[MomentPlan, ...]
    budget: int
    #: bytes an analysis allocates on top of the sums (the largest dense solve's copies)
    workspace: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes the planned sums hold on their devices."""
        return sum(m.nbytes for m in self.moments)

    @property
    def peak_nbytes(self) -> int:
        """Bytes held while an analysis runs: the sums (become the means) and the workspace."""
        return self.nbytes + self.workspace

    @property
    def overlap_fits(self) -> bool:
        """Whether a second window's sums fit in the budget beside an analysis in flight."""
        return self.nbytes + self.peak_nbytes <= self.budget

    def of(self, layer: str, moment: str) -> MomentPlan | None:
        """The plan of ``layer``'s ``moment`` (``"input"`` / ``"grad"``)."""
        return next((m for m in self.moments if m.layer == layer and m.moment == moment), None)

    @property
    def skipped_layers(self) -> list[str]:
        """Layers with a skipped moment (not analysed)."""
        return list(dict.fromkeys(m.layer for m in self.moments if m.method == "skipped"))

    def summary(self) -> str:
        """One line: how many moments are kept how, the bytes, the budget."""
        counts: dict[str, int] = {}
        for m in self.moments:
            counts[m.method] = counts.get(m.method, 0) + 1
        kinds = ", ".join(f"{n} {method}" for method, n in counts.items())
        return (
            f"{kinds} moments in {self.nbytes / _MIB:.1f} MiB, "
            f"{self.peak_nbytes / _MIB:.1f} MiB while solving (budget {self.budget / _MIB:.0f} MiB)"
        )

    def details(self) -> list[str]:
        """One line per moment that is not dense (sketched or skipped), largest first."""
        rows = sorted((m for m in self.moments if m.method in ("sketch", "skipped")), key=lambda m: -m.dim)
        return [
            f"{m.layer} {'Σx' if m.moment == 'input' else 'Σ∇h'} ({m.dim}²): {m.method}"
            + (
                f" ℓ={m.rank}, exact up to {m.block} rows a step, {m.nbytes / _MIB:.1f} MiB"
                if m.method == "sketch"
                else ""
            )
            + (f": {m.reason}" if m.reason else "")
            for m in rows
        ]

    def announcements(self, who: str) -> tuple[list[str], str | None]:
        """What to tell the user at the start: the lines to say (the memory held; the moments
        not kept dense, named) and the warning when layers are skipped (None: none).

        Example:
            >>> plan_analysis({}, 1 << 20).announcements("Monitor")[1] is None
            True
        """
        details = self.details()
        lines = [f"{who}: memory plan: {self.summary()}."]
        if details:
            more = f"\n  … and {len(details) - 12} more" if len(details) > 12 else ""
            lines.append(
                f"{who}: moments too large to keep dense (error bars in the results):\n  "
                + "\n  ".join(details[:12])
                + more
            )
        warning = None
        if self.skipped_layers:
            warning = (
                f"{who}: layers {self.skipped_layers} are not analysed: they do not fit the "
                f"memory budget ({self.budget / _MIB:.0f} MiB); see `monitor.plan` and the "
                "`memory_budget` option."
            )
        return lines, warning


def _dense_bytes(dim: int, pending: bool) -> int:
    return (8 + (4 if pending else 0)) * dim * dim


def _sketch_bytes(dim: int, rank: int) -> int:
    return 16 * rank * dim


def _solve_bytes(dim: int) -> int:
    return 8 * SOLVE_COPIES * dim * dim


def _largest_block(dim: int, room: int) -> int:
    """The most rows (a power of two times ``2·MIN_SKETCH_RANK``, at most :data:`BLOCK_ROWS`)
    whose block shrink of a ``dim``-wide sketch fits in ``room`` bytes; 0 when none does."""
    rows = 2 * MIN_SKETCH_RANK
    if block_workspace(dim, rows) > room:
        return 0
    while rows * 2 <= BLOCK_ROWS and block_workspace(dim, rows * 2) <= room:
        rows *= 2
    return BLOCK_ROWS if block_workspace(dim, BLOCK_ROWS) <= room else rows


def plan_analysis(
    layers: Mapping[str, tuple[nn.Module, Any]],
    budget: int,
    *,
    sketch_rank: int = SKETCH_RANK,
    float32_grams: bool = False,
) -> AnalysisPlan:
    """Fit every moment of ``layers`` (``{name: (module, adapter)}``) into ``budget`` bytes.

    Dense first, smallest moments first (each with the working copies of its solve, when it
    is the largest dense one so far); the moments that do not fit share what is left as
    sketches of one ``ℓ`` (``sketch_rank``, fewer when the budget is short, never under
    :data:`MIN_SKETCH_RANK`: the largest are skipped until it is reached).
    """
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}")
    entries: list[tuple[str, Literal["input", "grad"], int, nn.Module, Any]] = []
    for name, (module, adapter) in layers.items():
        input_dim, grad_dim, _ = adapter.dims(module)
        entries.append((name, "input", input_dim, module, adapter))
        entries.append((name, "grad", grad_dim, module, adapter))
    planned: dict[tuple[str, str], MomentPlan] = {}
    left = budget
    workspace = 0  # the largest dense solve's copies so far
    rest = []
    committed = 0  # minimal sketch bytes of the moments sent to ``rest`` so far
    ordered_entries = sorted(entries, key=lambda e: e[2])
    # every sketchable moment keeps room for a sketch of MIN_SKETCH_RANK rows: covering every
    # layer comes before making more moments dense (GPT-2's 50,257-token head)
    reserve = [0] * (len(ordered_entries) + 1)
    widest = [0] * (len(ordered_entries) + 1)  # the widest sketchable moment from here on
    for index in range(len(ordered_entries) - 1, -1, -1):
        _, moment, dim, module, adapter = ordered_entries[index]
        sketchable = adapter.sketchable(module, moment) and not (moment == "input" and adapter.diagonal_input)
        reserve[index] = reserve[index + 1] + (_sketch_bytes(dim, MIN_SKETCH_RANK) if sketchable else 0)
        widest[index] = max(widest[index + 1], dim if sketchable else 0)
    widest_sketched = 0
    # a sketch's full block (a step of BLOCK_ROWS rows exact) is kept before more moments go
    # dense, when it takes at most a quarter of the budget; else the smallest block
    block_rows = BLOCK_ROWS if block_workspace(widest[0] or 1) <= budget // 4 else 2 * MIN_SKETCH_RANK
    for position, (name, moment, dim, module, adapter) in enumerate(ordered_entries):
        if moment == "input" and adapter.diagonal_input:
            planned[(name, moment)] = MomentPlan(name, moment, dim, "diagonal", 8 * dim)
            left -= 8 * dim
            continue
        dense = _dense_bytes(dim, float32_grams)
        grown = max(_solve_bytes(dim) - workspace, 0)
        # room kept for the minimal sketches of the larger moments and of those already
        # sketched, and for a block shrink beyond the solve copies when any may be sketched
        later = reserve[position + 1] + committed
        wide = max(widest[position + 1], widest_sketched)
        block = max(block_workspace(wide, block_rows) - workspace - grown, 0) if wide else 0
        if dense + grown + block <= left - later:  # smallest first
            planned[(name, moment)] = MomentPlan(name, moment, dim, "dense", dense)
            left -= dense + grown
            workspace += grown
        elif adapter.sketchable(module, moment):
            rest.append((name, moment, dim))
            committed += _sketch_bytes(dim, MIN_SKETCH_RANK)
            widest_sketched = max(widest_sketched, dim)
        else:
            planned[(name, moment)] = MomentPlan(
                name,
                moment,
                dim,
                "skipped",
                0,
                reason=f"a dense {dim}² sum needs {dense / _MIB:.0f} MiB and this layer kind's "
                "adapter hands over ready Grams only (its `sketchable` is False)",
            )
    # the rest share what is left: rows shrunk in blocks as large as fit (up to BLOCK_ROWS:
    # a step of that many rows stays exact) beside sketches of MIN_SKETCH_RANK rows, then one
    # ℓ for all; the largest are skipped while not even the smallest block and ℓ fit
    rest.sort(key=lambda e: e[2])
    block = 0
    while rest:
        largest, dims = rest[-1][2], sum(dim for *_, dim in rest)
        room = left - 16 * MIN_SKETCH_RANK * dims
        block = _largest_block(largest, room + workspace)
        if block:
            grown = max(block_workspace(largest, block) - workspace, 0)
            rank = min(sketch_rank, max(left - grown, 0) // (16 * dims), block // 2)
            workspace += grown
            break
        name, moment, dim = rest.pop()
        planned[(name, moment)] = MomentPlan(
            name,
            moment,
            dim,
            "skipped",
            0,
            reason=f"the budget left no room for a sketch of {MIN_SKETCH_RANK} rows "
            f"({_sketch_bytes(dim, MIN_SKETCH_RANK) / _MIB:.1f} MiB) and its block "
            f"workspace; raise memory_budget",
        )
    for name, moment, dim in rest:
        planned[(name, moment)] = MomentPlan(
            name, moment, dim, "sketch", _sketch_bytes(dim, rank), rank=rank, block=min(block, dim)
        )
    ordered = tuple(planned[(name, moment)] for name, moment, *_ in entries)
    return AnalysisPlan(ordered, budget, workspace)


def _free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` (CUDA: the driver's count; CPU: the machine's available pages)."""
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "cpu" and hasattr(os, "sysconf"):
        try:
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            return None
    return None


def memory_budget(model: nn.Module, option: int | str = "auto") -> int:
    """The bytes the analysis may hold: ``option`` itself when it is a number of bytes; with
    ``"auto"``, a fifth of the training state (:data:`AUTO_SHARE` of parameters, gradients and
    two Adam states), at least :data:`AUTO_FLOOR`, at most a quarter of what the model's device
    has free now.

    Example:
        >>> memory_budget(nn.Linear(2, 2), 1 << 30)
        1073741824
        >>> 0 < memory_budget(nn.Linear(2, 2)) <= AUTO_FLOOR
        True
    """
    if not isinstance(option, str):
        return int(option)
    parameters = {id(p): p for p in model.parameters()}
    own = sum(p.numel() * p.element_size() for p in parameters.values())
    budget = max(AUTO_FLOOR, int(AUTO_SHARE * 4 * own))
    device = next(iter(parameters.values())).device if parameters else torch.device("cpu")
    free = _free_memory(device)
    return min(budget, free // 4) if free else budget
