"""The plan: before anything is allocated, how each moment of each layer is kept.

A dense moment is a ``d × d`` float64 sum (``8·d²`` bytes, plus a float32 pending buffer of
``4·d²`` while a window is open when the Grams are float32): exact, but a 50,257-token
``lm_head``'s Σ∇h would take 20 GB. The plan gives every moment one method, within a memory
budget:

- ``"dense"``: the exact ``d × d`` sum (the smallest moments first, while the budget lasts);
- ``"diagonal"``: an embedding's Σx (token frequencies), ``8·d`` bytes, always;
- ``"sketch"``: a Frequent Directions sketch of ``2ℓ × d`` float64 values
  (:mod:`lightning_conditioning.sketch`), with certified error bars, for moments whose rows
  the adapter hands over one by one;
- ``"skipped"``: neither fits (or the adapter only produces ready Grams): the layer is not
  analysed, and the plan says so.

The budget covers everything the analysis holds at its peak: the sums (which become the means
when a window is finished: no copy), plus the working copies of the largest dense eigen-solve
(:data:`SOLVE_COPIES` ``d × d`` float64 copies: the symmetrised matrix and LAPACK's own), the
plan's :attr:`~AnalysisPlan.workspace`. A background analysis still running when the next
window opens would hold a second set of sums: the monitor then waits for it unless the budget
has room for both.

The default budget (``memory_budget="auto"``) is three quarters of the model's parameter memory
(a quarter of parameters + two Adam states; 19% with the gradients too), at least 64 MiB, and
at most a quarter of the memory the device has free.

Example:
    >>> from torch import nn
    >>> from lightning_conditioning.capture import find_layers
    >>> model = nn.Sequential(nn.Linear(65536, 10))
    >>> plan = plan_analysis(find_layers(model), budget=64 << 20)
    >>> [(m.moment, m.method, m.rank) for m in plan.moments]
    [('input', 'sketch', 63), ('grad', 'dense', None)]
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["MomentPlan", "AnalysisPlan", "plan_analysis", "memory_budget", "SKETCH_RANK",
           "MIN_SKETCH_RANK", "SOLVE_COPIES"]

Method = Literal["dense", "diagonal", "sketch", "skipped"]
#: rows a sketch keeps (ℓ) when the budget allows; its buffer holds 2ℓ rows
SKETCH_RANK = 256
#: the fewest rows a sketch may keep before the moment is skipped instead
MIN_SKETCH_RANK = 16
#: ``d × d`` float64 copies a dense eigen-solve makes (the symmetrised matrix, LAPACK's input)
SOLVE_COPIES = 2
_MIB = 1 << 20


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
        return (f"{kinds} moments in {self.nbytes / _MIB:.1f} MiB, "
                f"{self.peak_nbytes / _MIB:.1f} MiB while solving (budget {self.budget / _MIB:.0f} MiB)")

    def details(self) -> list[str]:
        """One line per moment that is not dense (sketched or skipped), largest first."""
        rows = sorted((m for m in self.moments if m.method in ("sketch", "skipped")),
                      key=lambda m: -m.dim)
        return [f"{m.layer} {'Σx' if m.moment == 'input' else 'Σ∇h'} ({m.dim}²): {m.method}"
                + (f" ℓ={m.rank}, {m.nbytes / _MIB:.1f} MiB" if m.method == "sketch" else "")
                + (f": {m.reason}" if m.reason else "") for m in rows]


def _dense_bytes(dim: int, pending: bool) -> int:
    return (8 + (4 if pending else 0)) * dim * dim


def _sketch_bytes(dim: int, rank: int) -> int:
    return 16 * rank * dim


def _solve_bytes(dim: int) -> int:
    return 8 * SOLVE_COPIES * dim * dim


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
    ordered_entries = sorted(entries, key=lambda e: e[2])
    # every sketchable moment keeps room for a sketch of MIN_SKETCH_RANK rows: covering every
    # layer comes before making more moments dense (GPT-2's 50,257-token head)
    reserve = [0] * (len(ordered_entries) + 1)
    for index in range(len(ordered_entries) - 1, -1, -1):
        _, moment, dim, module, adapter = ordered_entries[index]
        sketchable = adapter.sketchable(module, moment) and not (
            moment == "input" and adapter.diagonal_input)
        reserve[index] = reserve[index + 1] + (_sketch_bytes(dim, MIN_SKETCH_RANK) if sketchable else 0)
    for position, (name, moment, dim, module, adapter) in enumerate(ordered_entries):
        if moment == "input" and adapter.diagonal_input:
            planned[(name, moment)] = MomentPlan(name, moment, dim, "diagonal", 8 * dim)
            left -= 8 * dim
            continue
        dense = _dense_bytes(dim, float32_grams)
        grown = max(_solve_bytes(dim) - workspace, 0)
        if dense + grown <= left - reserve[position + 1]:  # smallest first, larger ones' sketches kept
            planned[(name, moment)] = MomentPlan(name, moment, dim, "dense", dense)
            left -= dense + grown
            workspace += grown
        elif adapter.sketchable(module, moment):
            rest.append((name, moment, dim))
        else:
            planned[(name, moment)] = MomentPlan(
                name, moment, dim, "skipped", 0,
                reason=f"a dense {dim}² sum needs {dense / _MIB:.0f} MiB and this layer kind "
                       "hands over ready Grams, which cannot be sketched")
    # the rest share what is left: one ℓ for all, the largest skipped until ℓ is usable
    rest.sort(key=lambda e: e[2])
    while rest:
        rank = min(sketch_rank, max(left, 0) // (16 * sum(dim for *_, dim in rest)))
        if rank >= MIN_SKETCH_RANK:
            break
        name, moment, dim = rest.pop()
        planned[(name, moment)] = MomentPlan(
            name, moment, dim, "skipped", 0,
            reason=f"the budget left no room for a sketch of {MIN_SKETCH_RANK} rows "
                   f"({_sketch_bytes(dim, MIN_SKETCH_RANK) / _MIB:.1f} MiB); raise memory_budget")
    for name, moment, dim in rest:
        planned[(name, moment)] = MomentPlan(name, moment, dim, "sketch", _sketch_bytes(dim, rank),
                                             rank=rank)
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
    ``"auto"``, three quarters of the model's parameter bytes (a quarter of parameters + two
    Adam states), at least 64 MiB, at most a quarter of what the model's device has free.

    Example:
        >>> memory_budget(nn.Linear(2, 2), 1 << 30)
        1073741824
        >>> memory_budget(nn.Linear(2, 2)) >= 64 << 20 or memory_budget(nn.Linear(2, 2)) > 0
        True
    """
    if not isinstance(option, str):
        return int(option)
    parameters = {id(p): p for p in model.parameters()}
    own = sum(p.numel() * p.element_size() for p in parameters.values())
    budget = max(64 * _MIB, own * 3 // 4)
    device = next(iter(parameters.values())).device if parameters else torch.device("cpu")
    free = _free_memory(device)
    return min(budget, free // 4) if free else budget
