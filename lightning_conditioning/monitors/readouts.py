"""What every trainer's callbacks show of the monitor they drive: one definition for all.

The Lightning callbacks and the Hugging Face Trainer callbacks are shells over the same two
monitors; the numbers a user reads off them (``results``, ``findings()``, the weight-domination
verdicts and histories) are the monitor's, through these mixins, so a new trainer integration
gets them by inheriting one class. Pure: no Lightning, no transformers.

Example:
    >>> class Shell(ConditioningReadout):
    ...     monitor, options = None, ConditioningOptions(every_n_steps=10)
    >>> Shell().results, Shell().should_analyse(20)
    ({}, True)
"""

from __future__ import annotations

from typing import Any

from lightning_conditioning.analysis.options import ConditioningOptions
from lightning_conditioning.analysis.results import LayerConditioning
from lightning_conditioning.maths.domination import DominationReason, RatioHistory, WeightStatistics
from lightning_conditioning.monitors.conditioning import ConditioningMonitor
from lightning_conditioning.monitors.domination import WeightDominationMonitor
from lightning_conditioning.views.diagnosis import Finding, format_findings

__all__ = ["ConditioningReadout", "DominationReadout"]


class ConditioningReadout:
    """The conditioning analysis as a callback shows it (``monitor`` is None before training)."""

    monitor: ConditioningMonitor | None
    options: ConditioningOptions

    @property
    def results(self) -> dict[str, LayerConditioning]:
        """Every layer's latest analysis: ``{layer name: LayerConditioning}`` (empty before one;
        each result's ``step`` says which window it comes from)."""
        return self.monitor.results if self.monitor is not None else {}

    @property
    def layer_names(self) -> list[str]:
        """Qualified names of the analysed layers (once training has started)."""
        return self.monitor.layer_names if self.monitor is not None else []

    def should_analyse(self, step: int) -> bool:
        """Whether optimizer step ``step``'s batches are captured (it is in a window)."""
        return self.options.should_analyse(step)

    def findings(self, trainer: Any = None) -> list[Finding]:
        """The diagnosis of the latest analysis, with the latest weight-domination check of a
        weight-domination callback of the same trainer, if any (``trainer`` is not needed)."""
        return self.monitor.findings() if self.monitor is not None else []

    def closing_words(self, print_diagnosis: bool, trainer: Any = None) -> str | None:
        """At the end of training: the schedule's note (too few analyses) returned, and, with
        ``print_diagnosis``, the latest analysis's diagnosis printed (call it on process zero)."""
        if print_diagnosis and self.results:
            findings = self.findings(trainer)
            print(f"Conditioning diagnosis at step {max(r.step for r in self.results.values())}:")
            print(format_findings(findings) if findings else "  no findings: nothing looks wrong.")
        return self.monitor.schedule_note() if self.monitor is not None else None


class DominationReadout:
    """The weight-domination check as a callback shows it (``monitor`` is None before training)."""

    monitor: WeightDominationMonitor | None

    @property
    def results(self) -> dict[str, WeightStatistics]:
        """Latest check: ``{layer name: WeightStatistics}`` (layers with a gradient only)."""
        return self.monitor.results if self.monitor is not None else {}

    @property
    def warned_layers(self) -> list[str]:
        """Layers the callback has warned about (dominated for ``patience`` checks), sorted."""
        return self.monitor.warned_layers if self.monitor is not None else []

    @property
    def dominated(self) -> list[str]:
        """Layers the latest check finds in weight domination."""
        return self.monitor.dominated if self.monitor is not None else []

    @property
    def reasons(self) -> dict[str, tuple[DominationReason, ...]]:
        """Latest check: ``{layer: the rules that find it dominated}`` (``()``: none)."""
        return self.monitor.reasons if self.monitor is not None else {}

    @property
    def history(self) -> dict[str, RatioHistory]:
        """``{layer: RatioHistory}``: each layer's running peak ratio (checkpointed)."""
        return self.monitor.history if self.monitor is not None else {}

    @property
    def zero_layers(self) -> dict[str, str]:
        """Latest check: layers whose weight gradient or weight is exactly zero, with the status."""
        return self.monitor.zero_layers if self.monitor is not None else {}

    def domination_table(self) -> dict[str, dict[str, float]]:
        """The latest check as ``{layer: {quantity: value}}`` (read by the conditioning diagnosis)."""
        return self.monitor.domination_table() if self.monitor is not None else {}
