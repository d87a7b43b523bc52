"""Turns: which layers an analysed step captures, so that its cost stays bounded.

Analysing every layer of a real model in one step costs several plain steps: GPT-2 small at
2,048 tokens a step on a 2-core CPU took 4.9× a plain step (float64 Grams and block shrinks in
the backward pass, a ``d³`` eigen-solve per moment after it). With ``step_overhead`` (default
0.35), an analysed step captures only the next layers, in the model's order, whose estimated
cost fits in that share of a plain step (the model leaves out the hooks' own time and the
summaries: measured, GPT-2 small's analysed steps took 1.2-1.5× a plain one); every layer is
still analysed exactly, every few analysed steps, and each result says at which step
(``LayerConditioning.step``). A model whose
whole analysis fits (the budget is at least :data:`MIN_TURN_SECONDS` of modelled work, so every
small or mid-size model) analyses every layer at every analysed step, as without turns.

The cost of a layer is a model in seconds of this kind of CPU (:func:`moment_seconds`:
float64 Gram GEMMs per row, ``d³`` eigen-solves, a sketch's block Grams), scaled by what the
monitor measures: :class:`TurnTaker` keeps the period of the steps it does not capture (a
plain step) and of the analysed ones (their extra time), and corrects the model by their ratio,
so a GPU (fast steps, eigen-solves on the CPU) gets smaller turns from its own measurements.

Example:
    >>> from lightning_conditioning.capture.plan import MomentPlan
    >>> moments = [MomentPlan(f"l{i}", "input", 8192, "dense", 0) for i in range(4)]
    >>> taker = TurnTaker(moments, train_parameters=10**6, share=0.5)
    >>> [sorted(taker.next_turn()) for _ in range(3)]
    [['l0'], ['l1'], ['l2']]
    >>> TurnTaker(moments, train_parameters=10**6, share=None).next_turn() is None
    True
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from lightning_conditioning.capture.plan import MomentPlan

__all__ = ["TurnTaker", "moment_seconds", "MIN_TURN_SECONDS", "ROWS_GUESS"]

#: seconds per ``d²·row`` of a float64 Gram GEMM (measured here: 3072², 2,048 rows, 0.63 s)
GRAM_SECONDS = 3.5e-11
#: seconds per ``d³`` of a float64 ``eigvalsh`` on one thread (measured: 3072², 2.6 s)
CUBE_SECONDS = 9e-11
#: seconds per ``m²·d`` of a sketch's block Gram (measured: 2,048 rows × 50,257, 9.5 s)
BLOCK_SECONDS = 4.5e-11
#: seconds per training FLOP (6 · parameters · rows) of a float32 step on this CPU (GPT-2
#: small, 2,048 tokens: 21 s); only until a plain step is measured
TRAIN_SECONDS = 1.4e-11
#: an analysed step may always add this much modelled work: small and mid-size models (ResNets,
#: EfficientNet-B0, DenseNet-121, ConvNeXt-tiny (5.3 s at 32² images, batch 4), ViT-tiny)
#: analyse every layer every time once their rows are known; turns start where one analysis
#: takes longer (GPT-2 small at 2,048 tokens: 63 s)
MIN_TURN_SECONDS = 6.0
#: the most the measurements may scale the model, either way
MAX_SCALE = 20.0
#: the scale before any measurement: the model leaves out the hooks' own time, the summaries
#: and a first window's one-time costs (measured on GPT-2 small, 2,048 tokens, step 0: the
#: first analysed step's extra was 2.16× and 2.06× the model's in two runs of
#: ``benchmarks/real_tokens.py``, later ones 1.4×; at 1.5 the first step took 1.55× a plain one)
FIRST_SCALE = 2.0
#: rows per step assumed before any step was seen (a fine-tuning step of 8 × 256 tokens)
ROWS_GUESS = 2048


def moment_seconds(moment: MomentPlan, rows: int) -> float:
    """Estimated seconds to capture ``rows`` rows of ``moment`` and solve it.

    Example:
        >>> from lightning_conditioning.capture.plan import MomentPlan
        >>> round(moment_seconds(MomentPlan("fc", "grad", 3072, "dense", 0), 2048), 1)
        3.3
    """
    d = moment.dim
    if moment.method == "dense":
        return GRAM_SECONDS * d * d * rows + CUBE_SECONDS * d**3
    if moment.method == "sketch":
        block = max(min(moment.block or rows, rows, d), 1)
        blocks = math.ceil(rows / block)
        return blocks * (BLOCK_SECONDS * block * block * d + CUBE_SECONDS * block**3)
    return 1e-9 * d  # diagonal (sorting d values) or skipped


class TurnTaker:
    """Chooses the layers of each analysed window (None: all of them).

    Args:
        moments: the plan's moments (:attr:`~lightning_conditioning.capture.plan.AnalysisPlan.moments`),
            in the model's layer order.
        train_parameters: trainable parameters of the model (for the modelled step time).
        share: the extra time an analysed step may take, as a share of a plain step
            (``step_overhead``); None: every layer in every window.
    """

    def __init__(self, moments: Sequence[MomentPlan], train_parameters: int, share: float | None) -> None:
        self.share = share
        self._moments: dict[str, list[MomentPlan]] = {}
        for moment in moments:
            if moment.method != "skipped":
                self._moments.setdefault(moment.layer, []).append(moment)
        self.layers = list(self._moments)
        self.train_parameters = max(int(train_parameters), 1)
        #: rows each layer's window kept last time (per step, after row sampling); ROWS_GUESS before
        self.rows: dict[str, int] = {}
        #: rows each layer's window had last time (per step, before row sampling)
        self.seen: dict[str, int] = {}
        #: measured seconds over modelled seconds of the analysed work (:data:`FIRST_SCALE`
        #: until measured)
        self.scale = FIRST_SCALE
        self.position = 0
        self._plain: list[float] = []
        self._turn: tuple[str, ...] | None = None
        self._predicted = 0.0

    def layer_seconds(self, layer: str) -> float:
        """Modelled seconds of one layer's analysis at its last rows per step (a layer not
        seen yet: the median of the others', :data:`ROWS_GUESS` before any)."""
        rows = self.rows.get(layer)
        if rows is None:
            rows = int(statistics.median(self.rows.values())) if self.rows else ROWS_GUESS
        return sum(moment_seconds(m, rows) for m in self._moments[layer])

    def plain_seconds(self) -> float:
        """A plain step's seconds: the median of the measured ones, else the model's at the
        median layer's rows per step (before sampling). Not the largest: a ViT's patch
        embedding or a ResNet's first convolution reads a row per pixel, 50-250× a typical
        layer's, and the model then took a plain step for 49 minutes, so that one window held
        every layer (6× a plain step)."""
        if self._plain:
            return statistics.median(self._plain)
        rows = statistics.median(self.seen.values()) if self.seen else ROWS_GUESS
        return TRAIN_SECONDS * 6 * self.train_parameters * rows

    def capacity(self) -> float:
        """Modelled seconds an analysed step may take: the share of a plain step, corrected by
        the measured scale. (:data:`MIN_TURN_SECONDS` is no floor of it: it decides only
        whether a whole analysis is small enough to run every time, :meth:`fits_anywhere`.
        As a floor it let GPT-2 small at 512 tokens a step take 47 of 51 layers in one
        window, 2.47× a plain step.)"""
        assert self.share is not None
        return self.share * self.plain_seconds() * self.kept_share() / self.scale

    def kept_share(self) -> float:
        """The share of the rows that row sampling kept (1 before any window): the capacity is
        a share of a plain step *at the rows analysed*, so that an analysed step's extra time
        stops growing with the tokens per step once they pass the sampling limit."""
        seen = sum(self.seen.values())
        return min(1.0, sum(self.rows[name] for name in self.seen) / seen) if seen else 1.0

    def fits_anywhere(self) -> bool:
        """Whether every layer fits in any capacity this taker can have (the floor): a
        decision the same on every rank, whatever each measured."""
        return sum(self.layer_seconds(name) for name in self.layers) <= MIN_TURN_SECONDS

    def next_turn(self, capacity: float | None = None) -> frozenset[str] | None:
        """The layers of the next window: the next ones in order while their modelled cost
        fits ``capacity`` (default :meth:`capacity`; at least one layer), or None when every
        layer fits (the order then stays where it is)."""
        if self.share is None or not self.layers:
            self._turn = None
            return None
        budget = self.capacity() if capacity is None else capacity
        costs = [self.layer_seconds(name) for name in self.layers]
        if sum(costs) <= budget or (capacity is None and self.fits_anywhere()):
            self._turn, self._predicted = None, sum(costs)
            return None
        count = len(self.layers)
        chosen: list[str] = []
        spent = 0.0
        for offset in range(count):
            index = (self.position + offset) % count
            if chosen and spent + costs[index] > budget:
                break
            chosen.append(self.layers[index])
            spent += costs[index]
        self.position = (self.position + len(chosen)) % count
        self._turn, self._predicted = tuple(chosen), spent
        return frozenset(chosen)

    def observe_rows(self, rows: Mapping[str, int], steps: int = 1, kept: Mapping[str, int] | None = None) -> None:
        """The rows per step each layer's finished window held (after any reduction), and of
        them the ones ``kept`` by row sampling (default: all): the cost model follows the kept
        rows, and :meth:`capacity` the share of a plain step at them."""
        for name, count in rows.items():
            if name in self._moments and count > 0:
                self.seen[name] = max(1, count // max(steps, 1))
                taken = count if kept is None else min(kept.get(name, count), count)
                self.rows[name] = max(1, taken // max(steps, 1))

    def observe_plain(self, seconds: float) -> None:
        """The period of a step that was not captured (the last 16 are kept)."""
        if seconds > 0 and math.isfinite(seconds):
            self._plain = [*self._plain[-15:], seconds]

    def observe_analysed(self, seconds: float) -> None:
        """The period of an analysed step: its extra over a plain one, against the model's
        prediction for its turn, corrects the model (geometric mean with the old scale,
        within [1/:data:`MAX_SCALE`, :data:`MAX_SCALE`])."""
        # the turn's model at the rows its window really held (observe_rows came first): the
        # prediction was made before, at the rows of an earlier window or ROWS_GUESS
        predicted = sum(self.layer_seconds(name) for name in (self._turn or self.layers))
        if not self._plain or predicted <= 0 or not math.isfinite(seconds):
            return
        extra = max(seconds - statistics.median(self._plain), 0.05 * predicted)
        observed = min(max(extra / predicted, 1 / MAX_SCALE), MAX_SCALE)
        self.scale = math.sqrt(self.scale * observed)

    def state_dict(self) -> dict[str, Any]:
        """The position in the order, the measured scale and rows (plain values)."""
        return {"position": self.position, "scale": self.scale, "rows": dict(self.rows), "seen": dict(self.seen)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.position = int(state.get("position", 0)) % max(len(self.layers), 1)
        self.scale = float(state.get("scale", FIRST_SCALE))
        self.rows = {k: int(v) for k, v in state.get("rows", {}).items() if k in self._moments}
        self.seen = {k: int(v) for k, v in state.get("seen", self.rows).items() if k in self._moments}


def parameter_count(parameters: Iterable[Any]) -> int:
    """Trainable parameters, a shared one once."""
    seen = {id(p): p for p in parameters if getattr(p, "requires_grad", False)}
    return sum(int(p.numel()) for p in seen.values())
