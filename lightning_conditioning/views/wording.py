"""Findings in words: the full diagnosis text and the short warnings."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["Finding", "format_findings", "short_warning"]


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


def _clip(text: str, limit: int) -> str:
    """``text`` up to its first sentence end, cut at a clause boundary before ``limit``."""
    first = re.split(r"\.\s+(?=[A-Z](?!\.))", text, maxsplit=1)[0].rstrip(".")
    if len(first) <= limit:
        return first + "."
    cut = max(first.rfind(sep, 0, limit) for sep in ("; ", ", ", ": "))
    return (first[:cut] if cut > limit // 3 else first[:limit]).rstrip(" ;,:") + " …"


def short_warning(finding: Finding, limit: int = 160) -> str:
    """A warning that reads at a glance: the finding's first sentence and its remedy on a line
    of its own, each cut to about ``limit`` characters; the full text stays in the findings.

    Example:
        >>> print(short_warning(Finding("dead_units", "l1", "2 layers have dead units: l1, l2. "
        ...                             "A dead unit passes no signal", remedy="check the init")))
        2 layers have dead units: l1, l2.
        Remedy: check the init.
    """
    text = _clip(finding.message, limit)
    return text + (f"\nRemedy: {_clip(finding.remedy, limit)}" if finding.remedy else "")


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
            items = [f"{k}={v:.4g}" for k, v in finding.evidence.items()]
            more = f", … ({len(items) - 10} more)" if len(items) > 10 else ""
            lines.append("   evidence: " + ", ".join(items[:10]) + more)
        if finding.remedy:
            lines.append(f"   remedy: {finding.remedy}")
    return "\n".join(lines)
