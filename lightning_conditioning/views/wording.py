"""Findings in words: the full diagnosis text, the short warnings, and the words for weight
domination that the diagnosis and :class:`~lightning_conditioning.WeightDominationMonitor`
share. Pure: no torch; every number shown is finite (NaN and unknown quantities are left out).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "Finding",
    "format_findings",
    "short_warning",
    "listing",
    "times",
    "domination_evidence",
    "domination_reason_text",
    "domination_warning",
    "zero_layers_text",
    "REMEDY_LAST_BN",
]

REMEDY_LAST_BN = (
    "put one BatchNorm before the last linear layer: `lightning_conditioning.models.add_last_bn(model)` (paper, Sec. 5)"
)


@dataclass(frozen=True)
class Finding:
    """One rule that fired, with the numbers behind it.

    Attributes:
        rule: rule identifier (see the module docstring).
        layer: the layer where the problem starts / is worst (None when not located).
        layers: every layer involved, in module order.
        message: one-sentence explanation with the key numbers.
        evidence: the numbers (keys name the quantity and, in brackets, the layer).
        remedy: what the paper suggests.
        severity: ``"warning"`` or ``"info"``.
    """

    rule: str
    layer: str | None
    message: str
    evidence: dict[str, float] = field(default_factory=dict)
    layers: tuple[str, ...] = ()
    remedy: str = ""
    severity: Literal["warning", "info"] = "warning"

    def __str__(self) -> str:
        where = f" at {self.layer}" if self.layer else ""
        return f"[{self.severity}] {self.rule}{where}: {self.message}"


def _headline(text: str, limit: int) -> str:
    """``text``'s first sentence, whole; when it is longer than ``limit``, its headline (what
    comes before the first colon, the list after it left to the findings), also whole."""
    first = re.split(r"\.\s+(?=[A-Z](?!\.))", text, maxsplit=1)[0].rstrip(".")
    if len(first) > limit and ": " in first:
        first = first.split(": ", 1)[0]
    return first + "."


def short_warning(finding: Finding, limit: int = 160) -> str:
    """A warning that reads at a glance, in whole sentences: the finding's first sentence (its
    headline when that is longer than ``limit`` characters) and the whole remedy on a line of
    its own; the full text stays in the findings.

    Example:
        >>> print(short_warning(Finding("dead_units", "l1", "2 layers have dead units: l1, l2. "
        ...                             "A dead unit passes no signal", remedy="check the init")))
        2 layers have dead units: l1, l2.
        Remedy: check the init.
        >>> print(short_warning(Finding("x", "l1", "3 layers are odd: " + ", ".join(["layer"] * 40))))
        3 layers are odd.
    """
    text = _headline(finding.message, limit)
    return text + (f"\nRemedy: {finding.remedy.rstrip('.')}." if finding.remedy else "")


def format_findings(findings: Sequence[Finding], *, evidence: bool = True) -> str:
    """Human-readable text: one numbered paragraph per finding (or a line saying none fired).

    Example:
        >>> print(format_findings([]))
        No findings: no rule fired.
        >>> print(format_findings([Finding("dead_units", "fc", "half dead", {"x": 0.5})]))
        1 finding:
        1. [warning] dead_units at fc: half dead
           evidence: x=0.5
    """
    if not findings:
        return "No findings: no rule fired."
    lines = [f"{len(findings)} finding{'s' if len(findings) > 1 else ''}:"]
    for i, finding in enumerate(findings, 1):
        lines.append(f"{i}. {finding}")
        if evidence and finding.evidence:
            items = [f"{k}={v:.4g}" for k, v in finding.evidence.items() if not math.isnan(v)]
            more = f", … ({len(items) - 10} more)" if len(items) > 10 else ""
            lines.append("   evidence: " + ", ".join(items[:10]) + more)
        if finding.remedy:
            lines.append(f"   remedy: {finding.remedy}")
    return "\n".join(lines)


def listing(parts: Sequence[str], limit: int = 5) -> str:
    """At most ``limit`` items, then how many more.

    Example:
        >>> listing(["a", "b", "c"], limit=2)
        'a; b; … and 1 more'
    """
    shown = "; ".join(parts[:limit])
    return shown + (f"; … and {len(parts) - limit} more" if len(parts) > limit else "")


def times(factor: float) -> str:
    """A factor for people: ``17,490×``, ``3.2×``, ``1.2e+09×``.

    Example:
        >>> times(17489.6), times(3.21), times(1.2e9)
        ('17,490×', '3.2×', '1.2e+09×')
    """
    if factor >= 1e7:
        return f"{factor:.2g}×"
    if factor >= 100:
        return f"{float(f'{factor:.4g}'):,.0f}×"
    return f"{factor:.2g}×"


def _finite(row: Mapping[str, float], key: str) -> float | None:
    value = row.get(key)
    return value if value is not None and math.isfinite(value) else None


def domination_evidence(row: Mapping[str, float]) -> str:
    """The finite numbers of one layer's weight-domination row, in words (a quantity that is
    missing, NaN or not yet known, such as the update of a pending check, is left out).

    Example:
        >>> domination_evidence({"grad_weight_ratio": 6.8e-4, "grad_weight_ratio_peak": 21.5,
        ...                      "grad_weight_ratio_peak_step": 0, "grad_weight_ratio_fall": 17489.6,
        ...                      "loss_fall": 1.8, "update_weight_ratio": float("nan")}).split(" (")
        ... # doctest: +NORMALIZE_WHITESPACE
        ['σmax(∇W)/σmax(W) = 0.00068, 17,490× below its own peak 21.5 at step 0 net of the loss',
         'the ratio fell 31,620×, the loss 1.8×)']
        >>> domination_evidence({"update_weight_ratio": 0.0})
        'σmax(ΔW)/σmax(W) = 0'
    """
    parts = []
    ratio = _finite(row, "grad_weight_ratio")
    if ratio is not None:
        text = f"σmax(∇W)/σmax(W) = {ratio:.3g}"
        fall, peak = _finite(row, "grad_weight_ratio_fall"), _finite(row, "grad_weight_ratio_peak")
        if fall is not None and peak is not None and fall >= 2:
            text += f", {times(fall)} below its own peak {peak:.3g}"
            step = _finite(row, "grad_weight_ratio_peak_step")
            text += f" at step {step:.0f}" if step is not None else ""
            loss_fall = _finite(row, "loss_fall")
            if loss_fall is not None and ratio > 0:
                text += f" net of the loss (the ratio fell {times(peak / ratio)}, the loss {times(loss_fall)})"
        parts.append(text)
    update = _finite(row, "update_weight_ratio")
    if update is not None:
        parts.append(f"σmax(ΔW)/σmax(W) = {update:.3g}")
    return ", ".join(parts) if parts else "no finite ratio"


def domination_reason_text(
    reasons: Sequence[str],
    row: Mapping[str, float],
    threshold: float,
    update_threshold: float,
    fall_factor: float | None = None,
) -> str:
    """Why a layer counts as dominated (``reasons`` from
    :func:`lightning_conditioning.maths.domination.domination_reasons`), with its numbers.

    Example:
        >>> domination_reason_text(["fallen", "below_threshold"], {"grad_weight_ratio": 3e-5,
        ...     "grad_weight_ratio_peak": 0.1, "grad_weight_ratio_fall": 3333.3}, 1e-4, 0.0, 1000).split("; ")
        ... # doctest: +NORMALIZE_WHITESPACE
        ['σmax(∇W)/σmax(W) = 3e-05, 3,333× below its own peak 0.1',
         'it has stayed at least 1000× below its own peak and below 0.0001']
        >>> domination_reason_text(["not_updated"], {"update_weight_ratio": 0.0}, 1e-4, 0.0).split(" (")
        ... # doctest: +NORMALIZE_WHITESPACE
        ['its optimizer update σmax(ΔW)/σmax(W) = 0 has stayed at or below 0',
         'is it left out of the optimizer, or at learning rate 0?)']
    """
    texts = []
    rules = []
    if "fallen" in reasons:
        rules.append(
            f"at least {fall_factor:g}× below its own peak" if fall_factor is not None else "far below its own peak"
        )
    if "below_threshold" in reasons:
        rules.append(f"below {threshold:g}")
    if rules:
        ratio_row = {k: v for k, v in row.items() if k != "update_weight_ratio"}
        texts.append(f"{domination_evidence(ratio_row)}; it has stayed {' and '.join(rules)}")
    if "not_updated" in reasons:
        update = _finite(row, "update_weight_ratio")
        shown = f" = {update:.3g}" if update is not None else ""
        texts.append(
            f"its optimizer update σmax(ΔW)/σmax(W){shown} has stayed at or below "
            f"{update_threshold:g} (is it left out of the optimizer, or at learning rate 0?)"
        )
    return "; ".join(texts)


def domination_warning(who: str, layer: str, step: int, checks: int, reason: str, last_linear: bool) -> str:
    """The one warning about a layer dominated for ``checks`` consecutive checks.

    Example:
        >>> domination_warning("Monitor", "fc", 40, 3, "its ratio has stayed below 0.0001", True)[:62]
        "Monitor: layer 'fc' is in weight domination at step 40: its ra"
    """
    message = (
        f"{who}: layer '{layer}' is in weight domination at step {step}: {reason} for "
        f"{checks} consecutive checks. Its update is feeble next to its weight, so the layer "
        "barely learns and the loss can sit on a false plateau (Huang et al. 2020, "
        "Definition 1)."
    )
    if last_linear:
        message += (
            " This is the final linear layer: the paper's remedy is one BatchNorm "
            "before it, `lightning_conditioning.models.add_last_bn(model)`."
        )
    return message


def zero_layers_text(zero_gradient: Sequence[str], zero_weight: Sequence[str]) -> str:
    """Layers whose weight gradient or weight is exactly zero, named with the likely reason
    (the reason first: a short warning keeps the first ~160 characters).

    Example:
        >>> print(zero_layers_text(["layer1.0.conv2"], []))  # doctest: +ELLIPSIS
        1 layer has an exactly zero weight gradient, likely from a zero-initialised scale after it ...
    """
    sentences = []
    if zero_gradient:
        one = len(zero_gradient) == 1
        it = "it" if one else "them"
        sentences.append(
            f"{len(zero_gradient)} layer{'' if one else 's'} {'has' if one else 'have'} an exactly "
            f"zero weight gradient, likely from a zero-initialised scale after {it} (a residual "
            f"block's last BatchNorm γ, a head): {listing(list(zero_gradient))}. Nothing reaches "
            f"{'its' if one else 'their'} output: timm's ResNets (zero_init_last) and "
            "torchvision's (zero_init_residual) start each block's last BatchNorm γ at 0, some "
            f"recipes start the head at 0; or every unit after {it} is dead. Not weight "
            f"domination: {'it learns' if one else 'they learn'} once that scale moves"
        )
    if zero_weight:
        one = len(zero_weight) == 1
        sentences.append(
            f"{len(zero_weight)} layer{'' if one else 's'} {'has' if one else 'have'} an exactly "
            f"zero weight, zero-initialised (a head, as some recipes do): {listing(list(zero_weight))}. "
            "σmax(∇W)/σmax(W) is undefined until an optimizer step moves it; not weight domination"
        )
    return ". ".join(sentences) + "." if sentences else ""


def layer_notes(
    who: str, step: int, notes: Mapping[str, str | None], noted: set[str], benign: Collection[str] = ()
) -> tuple[list[str], str | None]:
    r"""Each layer's reason for missing or zero numbers (``notes``: layer → reason or None), said
    once per layer and reason: a sentence per ``benign`` reason (what the model does, not a
    fault) and one warning for the rest. ``noted`` holds ``"layer\nreason"`` of what was said,
    and grows.

    Example:
        >>> noted = set()
        >>> said, warning = layer_notes("M", 3, {"a": "no rows", "b": None, "c": "tied"}, noted, benign=["tied"])
        >>> said
        ['M: c: tied.']
        >>> print(warning)
        M: step 3: some layers have no numbers or zero statistics (said once per layer):
          a: no rows.
        >>> layer_notes("M", 4, {"a": "no rows"}, noted)
        ([], None)
    """
    fresh: dict[str, list[str]] = {}
    for name, note in notes.items():
        if note and f"{name}\n{note}" not in noted:
            noted.add(f"{name}\n{note}")
            fresh.setdefault(note, []).append(name)
    said = [f"{who}: {listing(names)}: {note}." for note in benign if (names := fresh.pop(note, None))]
    if not fresh:
        return said, None
    lines = "\n".join(f"  {listing(names)}: {note}." for note, names in fresh.items())
    return said, f"{who}: step {step}: some layers have no numbers or zero statistics (said once per layer):\n{lines}"
