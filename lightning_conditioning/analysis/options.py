"""The options of the conditioning analysis, validated once for every shell (monitor, callback).

Example:
    >>> options = ConditioningOptions(every_n_steps=10, kappa_percents=(50, 99.5))
    >>> options.kappa_percents, options.statistics_dtype
    ((50, 99.5), 'auto')
    >>> ConditioningOptions(kappa_definition="median")
    Traceback (most recent call last):
    ...
    ValueError: kappa_definition must be one of ('paper', 'nonzero'), got 'median'
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

from torch import nn

from lightning_conditioning.capture.conventions import LOSS_REDUCTIONS, LossReduction
from lightning_conditioning.capture.selection import checked_layer_types
from lightning_conditioning.maths.precision import STATISTICS_DTYPES
from lightning_conditioning.maths.sampling import DEFAULT_ROW_LIMIT
from lightning_conditioning.maths.solvers import SolverPlan
from lightning_conditioning.maths.spectra import KAPPA_DEFINITIONS, KappaDefinition

__all__ = ["ConditioningOptions", "EARLY_STEPS", "REGULAR_PERIOD", "check_one_per_prefix"]

#: the default schedule's early analyses (powers of two, and step 0: the initialisation)
EARLY_STEPS = frozenset({0, 1, 2, 4, 8, 16, 32, 64})
#: the default schedule's regular period after them
REGULAR_PERIOD = 100


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class ConditioningOptions:
    """What to analyse, when and how (see :class:`~lightning_conditioning.ConditioningMonitor`).

    Every value is checked on construction; a bad one raises ``TypeError``/``ValueError``
    naming the argument and the value given.
    """

    every_n_steps: int | None = None
    kappa_percents: Sequence[float] = (50, 80, 100)
    conv_mode: Literal["channel", "patch"] = "channel"
    layer_types: Sequence[type[nn.Module]] | None = None
    include: Sequence[str] | None = None
    exclude: Sequence[str] | None = None
    loss_reduction: LossReduction = "auto"
    include_bias: bool = False
    rank_rtol: float | None = None
    statistics_dtype: Literal["auto", "float32", "float64"] = "auto"
    kappa_definition: KappaDefinition = "paper"
    window_steps: int = 1
    solver: SolverPlan | None = None
    warn_diagnosis: bool = True
    memory_budget: int | Literal["auto"] = "auto"
    analysis: Literal["auto", "sync", "background"] = "auto"
    step_overhead: float | None = 0.35
    max_rows: int | None = DEFAULT_ROW_LIMIT

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        if self.every_n_steps is not None and not _is_int(self.every_n_steps):
            raise TypeError(f"every_n_steps must be an int or None, got {self.every_n_steps!r}")
        if self.every_n_steps is not None and self.every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {self.every_n_steps}")
        percents = tuple(float(p) for p in self.kappa_percents)
        if not percents or not all(0 < p <= 100 and math.isfinite(p) for p in percents):
            raise ValueError(
                f"kappa_percents must be a non-empty list of percents in (0, 100], got {list(self.kappa_percents)}"
            )
        if max(percents) <= 1 and min(percents) < 1:
            # [0.5, 0.8, 1.0] is κ_0.5, κ_0.8, κ_1 (ratios to the top 1% of the spectrum), never
            # what was meant: fractions for percents
            raise ValueError(
                f"kappa_percents are percents of the spectrum (50 for κ_50, 100 for κ_100), got "
                f"{list(self.kappa_percents)}: fractions? Use {[_as_percent(p) for p in percents]}. "
                "(Percents at most 1 are taken as meant when the list also has one above 1.)"
            )
        set_(self, "kappa_percents", tuple(int(p) if p.is_integer() else p for p in percents))
        if self.conv_mode not in ("channel", "patch"):
            raise ValueError(f"conv_mode must be 'channel' or 'patch', got {self.conv_mode!r}")
        if self.loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {self.loss_reduction!r}")
        if self.statistics_dtype not in STATISTICS_DTYPES:
            raise ValueError(f"statistics_dtype must be one of {STATISTICS_DTYPES}, got {self.statistics_dtype!r}")
        rtol = self.rank_rtol
        if rtol is not None and (isinstance(rtol, bool) or not isinstance(rtol, (int, float)) or not 0 <= rtol < 1):
            raise ValueError(f"rank_rtol must be None or a number in [0, 1), got {rtol!r}")
        set_(self, "rank_rtol", None if rtol is None else float(rtol))
        if self.kappa_definition not in KAPPA_DEFINITIONS:
            raise ValueError(f"kappa_definition must be one of {KAPPA_DEFINITIONS}, got {self.kappa_definition!r}")
        period = self.every_n_steps if self.every_n_steps is not None else 1
        if not _is_int(self.window_steps) or not 1 <= self.window_steps <= period:
            raise ValueError(
                f"window_steps must be an int in [1, every_n_steps={self.every_n_steps}], "
                f"got {self.window_steps!r}"
                + ("; windows need a regular schedule: set every_n_steps" if self.every_n_steps is None else "")
            )
        budget = self.memory_budget
        if budget != "auto" and (not _is_int(budget) or budget <= 0):
            raise ValueError(f"memory_budget must be 'auto' or a positive number of bytes, got {budget!r}")
        if self.analysis not in ("auto", "sync", "background"):
            raise ValueError(f"analysis must be 'auto', 'sync' or 'background', got {self.analysis!r}")
        overhead = self.step_overhead
        if overhead is not None and (
            isinstance(overhead, bool) or not isinstance(overhead, (int, float)) or not 0 < overhead < math.inf
        ):
            raise ValueError(
                f"step_overhead must be None or a positive number (a share of a plain step, e.g. 0.5), got {overhead!r}"
            )
        rows = self.max_rows
        if rows is not None and (not _is_int(rows) or rows < 1):
            raise ValueError(
                f"max_rows must be None or a positive int (rows of one pass kept in a moment, e.g. 2048), got {rows!r}"
            )
        if self.solver is not None and not callable(self.solver):
            raise TypeError(f"solver must be a solver or a plan (a callable), got {self.solver!r}")
        if self.layer_types is not None:
            set_(self, "layer_types", checked_layer_types(self.layer_types))
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, str):
                    raise TypeError(f"{name} must be a list of glob patterns, got the string {value!r}")
                set_(self, name, tuple(value))

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The option names (the keyword arguments the monitor and the callback share)."""
        return tuple(f.name for f in fields(cls))

    def as_kwargs(self) -> dict[str, Any]:
        """``{name: value}`` of every option (to hand them on by name)."""
        return {name: getattr(self, name) for name in self.names()}

    def should_analyse(self, step: int) -> bool:
        """Whether optimizer step ``step``'s batches are captured (it is in a window).

        ``every_n_steps=None`` (the default) analyses often early, when the dynamics change
        fastest, and regularly later: steps 0, 1, 2, 4, …, 64 (:data:`EARLY_STEPS`), then every
        :data:`REGULAR_PERIOD` (100, 200, …), so a 100-step run gets 8 analyses and a
        100,000-step run about a thousand.

        Example:
            >>> [ConditioningOptions(every_n_steps=4, window_steps=2).should_analyse(s) for s in range(6)]
            [True, True, False, False, True, True]
            >>> [s for s in range(301) if ConditioningOptions().should_analyse(s)]
            [0, 1, 2, 4, 8, 16, 32, 64, 100, 200, 300]
        """
        if self.every_n_steps is None:
            return step in EARLY_STEPS or step % REGULAR_PERIOD == 0
        return step % self.every_n_steps < self.window_steps

    def window_start(self, step: int) -> int:
        """The first step of the window that ``step`` belongs to."""
        if self.every_n_steps is None:
            return step
        return step - step % self.every_n_steps


def _as_percent(fraction: float) -> float | int:
    value = round(fraction * 100, 6)
    return int(value) if float(value).is_integer() else value


def check_one_per_prefix(callback: Any, callbacks: Any, family: type) -> None:
    """Raise when another ``family`` callback in ``callbacks`` (a Lightning or Hugging Face
    Trainer's) logs under ``callback``'s prefix: its keys and its checkpointed state would
    collide with this one's. A callback whose class sets ``yields_to_others`` (the entry
    point's automatic one) is not counted: it steps aside.

    Example:
        >>> class Probe:
        ...     prefix = "conditioning"
        >>> check_one_per_prefix(Probe(), [Probe()], Probe)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: 2 Probes in this Trainer log under prefix='conditioning': ... Probe(..., prefix='conditioning_2').
    """
    others = [
        other
        for other in callbacks
        if other is not callback
        and isinstance(other, family)
        and not getattr(other, "yields_to_others", False)
        and getattr(other, "prefix", None) == callback.prefix
    ]
    if others:
        name = family.__name__
        raise ValueError(
            f"{len(others) + 1} {name}s in this Trainer log under prefix={callback.prefix!r}: their "
            f"logged keys and checkpointed states would collide. Give each its own prefix=, e.g. "
            f"{name}(..., prefix={callback.prefix + '_2'!r})."
        )
