"""The names of everything the package logs: built here, parsed here, nowhere else.

Every logged scalar is ``{prefix}/{layer}/{quantity}`` (``{prefix}/dominated_layers`` for the
one per-run domination count). Results build their keys with :func:`summary_quantities` and
:func:`key`; the TensorBoard layout, the report and the diagnosis read them back with
:func:`parse_quantity`, so a new quantity added here reaches all of them. Pure strings: this
module imports nothing from the package (it sits at the bottom of the import graph).

Conditioning quantities, for each moment ``{m}`` in ``input`` (Σx), ``grad`` (Σ∇h), ``fim``
(the sub-FIM Σx ⊗ Σ∇h):

* ``{m}_lambda_max``; ``{m}_rank``: the numerical rank (eigenvalues above the resolution floor).
* ``{m}_kappa_{p}``: κ_p, a measurement (``λ_p`` resolved).
* ``{m}_kappa_{p}_lower_bound``: logged *instead* when ``λ_p`` is under the resolution floor:
  κ_p is at least the value.
* ``{m}_kappa_{p}_infinite``: logged *instead* (value 1) when ``λ_p`` is a structural zero.
* ``{m}_kappa_{p}_estimate``: logged *instead* for an approximate spectrum (a sketch, Lanczos):
  an estimate, with its error bar ``{m}_kappa_{p}_estimate_low`` / ``_high``; λmax of an
  approximate spectrum comes with ``{m}_lambda_max_low`` / ``_high``, and its rank is not
  logged (not measured).
* ``dead_input_units`` / ``full_input_units``; for an embedding ``unused_rows`` instead (table
  rows, tokens or positions, not looked up in the window).
* ``input_outlier_ratio`` / ``input_outlier_feature``: the largest mean square of an input
  feature over the median one (``max_i Σx_ii / median_i Σx_ii``) and which feature it is.
* ``{m}_kept_rows`` / ``{m}_sampling_error`` (``input``, ``grad``; ``fim`` the error only):
  logged only when row sampling (``max_rows``) left rows of the window's passes out: the rows
  that entered the moment, and the relative standard error of its λmax from the sampling
  (measured on the sample; the sub-FIM's is the root sum of squares of the two).
* ``attention_logit_max`` / ``attention_entropy_min`` / ``attention_entropy_uniform`` of an
  attention module (its own name, not a layer's), and per head ``attention_logit_max_h{h}`` /
  ``attention_entropy_h{h}``: the largest ``|q·k|·scale`` and the mean softmax entropy (nats)
  over sampled query positions, and the entropy of uniform attention under the same masks.
* ``load_share_e{e}`` / ``load_imbalance`` / ``dead_experts`` of a mixture-of-experts module
  (its own name): the share of the routed (token, slot) pairs that expert ``e`` received, the
  largest share times the number of experts, and the experts that received none.
* ``lr_lambda_max``, ``stability_limit``, ``lambda_max_share``: the stability margin (when the
  learning rate is known). Under Adam / AdamW (``margin_preconditioned`` = 1 beside them) they
  are ``lr·λmax(P⁻¹F_k)`` with Adam's preconditioner ``P = diag(√v̂ + ε)``, its limit
  ``2(1+β1)/(1−β1)`` (38 for β1 = 0.9) and the layer's share of the largest such sharpness.
* ``log10_{q}``: the decimal logarithm of λmax and measured κ_p (TensorBoard only, for its
  charts, which have no log axis).

Example:
    >>> key("conditioning", "fc", kappa_quantity("grad", 80, "lower_bound"))
    'conditioning/fc/grad_kappa_80_lower_bound'
    >>> parse_quantity("grad_kappa_80_lower_bound")
    Quantity(name='grad_kappa_80_lower_bound', kind='kappa', moment='grad', percent='80', status='lower_bound')
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

__all__ = [
    "MOMENTS",
    "MOMENT_SYMBOLS",
    "UNIT_QUANTITIES",
    "FEATURE_QUANTITIES",
    "SAMPLING_QUANTITIES",
    "sampling_quantity",
    "ATTENTION_QUANTITIES",
    "attention_head_quantity",
    "ROUTING_QUANTITIES",
    "expert_quantity",
    "MARGIN_QUANTITIES",
    "DOMINATION_QUANTITIES",
    "DOMINATED_LAYERS",
    "KAPPA_MARKERS",
    "KAPPA_VALUES",
    "BOUND_SUFFIXES",
    "Quantity",
    "QuantityGroup",
    "GROUPS",
    "key",
    "split_key",
    "format_percent",
    "percent_text",
    "lambda_max_quantity",
    "rank_quantity",
    "dim_quantity",
    "log10_quantity",
    "log10_scalars",
    "histogram_quantity",
    "record_field",
    "kappa_quantity",
    "parse_quantity",
    "is_conditioning_quantity",
    "kappa_reading",
    "summary_quantities",
]

#: the three matrices of the analysis, in display order
MOMENTS: tuple[str, ...] = ("input", "grad", "fim")
#: how each matrix is written for people
MOMENT_SYMBOLS: dict[str, str] = {"input": "Σx", "grad": "Σ∇h", "fim": "sub-FIM"}
#: per-unit counts: dead / always-active input units; an embedding's unused table rows
UNIT_QUANTITIES: tuple[str, ...] = ("dead_input_units", "full_input_units", "unused_rows")
#: outlier features of Σx: ``max_i Σx_ii / median_i Σx_ii`` and the feature ``i``
FEATURE_QUANTITIES: tuple[str, ...] = ("input_outlier_ratio", "input_outlier_feature")
#: row sampling of a moment: the rows kept and the relative standard error of λmax
SAMPLING_QUANTITIES: tuple[str, ...] = (
    "input_kept_rows",
    "grad_kept_rows",
    "input_sampling_error",
    "grad_sampling_error",
    "fim_sampling_error",
)
#: an attention module's reading: the largest |q·k|·scale over its heads, the smallest head
#: mean softmax entropy (nats), and the entropy of uniform attention under the same masks
ATTENTION_QUANTITIES: tuple[str, ...] = ("attention_logit_max", "attention_entropy_min", "attention_entropy_uniform")
#: a mixture-of-experts module's routing load: the largest expert share times the number of
#: experts (1: balanced), the entropy of the shares over its largest value log E (1: balanced,
#: 0: one expert takes all), and the experts that received no token in the window
ROUTING_QUANTITIES: tuple[str, ...] = ("load_imbalance", "load_entropy", "dead_experts")
#: the stability margin of a layer (logged when the learning rate is known): ``lr·λmax(F_k)``,
#: the step-size limit it is compared with (2, or 2(1+β) with momentum β), and the layer's
#: share ``λmax(F_k) / max_j λmax(F_j)`` of the whole model's bound
MARGIN_QUANTITIES: tuple[str, ...] = ("lr_lambda_max", "stability_limit", "lambda_max_share", "margin_preconditioned")
#: per-layer quantities of the weight-domination check
DOMINATION_QUANTITIES = frozenset(
    {
        "grad_weight_ratio",
        "weight_spectral_norm",
        "grad_spectral_norm",
        "grad_weight_ratio_fro",
        "update_weight_ratio",
        "imbalance",
        "relative_imbalance",
        # the layer against its own history: its peak ratio, the fall from it (net of the loss)
        # and the verdict (1 dominated, 0 not)
        "grad_weight_ratio_peak",
        "grad_weight_ratio_fall",
        "dominated",
    }
)
#: the per-run count of layers in weight domination: ``{prefix}/dominated_layers``
DOMINATED_LAYERS = "dominated_layers"


@dataclass(frozen=True)
class QuantityGroup:
    """Quantities logged together, declared once: their names, what they are (the ``kind`` of
    :class:`Quantity`) and their dashboard section. :func:`parse_quantity`, the TensorBoard
    layout (:mod:`lightning_conditioning.sinks.tensorboard`) and the tables
    (:mod:`lightning_conditioning.views.tables`) read these declarations: a new group of
    quantities is one entry of :data:`GROUPS` (and the code that computes them).

    Attributes:
        kind: what the quantities are (``"units"``, ``"attention"``, ``"routing"``, …).
        names: the quantity names.
        section: the dashboard section, after ``"{prefix}: "`` (None: not charted with the
            conditioning quantities, e.g. weight domination, which has its own prefix).
        indexed: a regular expression of further names, one per head or expert
            (``load_share_e[0-9]+``), charted together.
        indexed_title: the title of that chart.
        moment: the moment the quantities describe; ``"prefix"``: the first part of the name.
    """

    kind: str
    names: tuple[str, ...]
    section: str | None
    indexed: str | None = None
    indexed_title: str = ""
    moment: str | None = None

    def holds(self, name: str) -> bool:
        """Whether ``name`` is one of this group's quantities."""
        return name in self.names or (self.indexed is not None and re.fullmatch(self.indexed, name) is not None)

    def moment_of(self, name: str) -> str | None:
        return name.split("_", 1)[0] if self.moment == "prefix" else self.moment


#: every group of quantities beside the spectra's own (λmax, rank, κ_p: one per moment), in
#: dashboard order
GROUPS: tuple[QuantityGroup, ...] = (
    QuantityGroup("units", UNIT_QUANTITIES, "units per layer"),
    QuantityGroup(
        "features",
        FEATURE_QUANTITIES,
        "outlier features per layer (max / median mean square of Σx's features)",
        moment="input",
    ),
    QuantityGroup(
        "attention",
        ATTENTION_QUANTITIES,
        "attention per module (max |q·k|/√d, smallest head entropy, uniform entropy)",
        indexed=r"attention_(logit_max|entropy)_h[0-9]+",
        indexed_title="per head",
    ),
    QuantityGroup(
        "routing",
        ROUTING_QUANTITIES,
        "routing load per expert module (largest share × experts, dead experts; shares per expert)",
        indexed=r"load_share_e[0-9]+",
        indexed_title="load share per expert",
    ),
    QuantityGroup(
        "sampling", SAMPLING_QUANTITIES, "row sampling per layer (only when max_rows left rows out)", moment="prefix"
    ),
    QuantityGroup("margin", MARGIN_QUANTITIES, "stability margin per layer"),
    QuantityGroup("domination", tuple(sorted(DOMINATION_QUANTITIES)), None),
)
#: key suffix of a κ_p that is not a measurement, by status
KAPPA_MARKERS: dict[str, str] = {
    "exact": "",
    "estimate": "_estimate",
    "lower_bound": "_lower_bound",
    "infinite": "_infinite",
}
#: κ_p statuses that are values (a measurement, or an estimate with its error bar)
KAPPA_VALUES: frozenset[str] = frozenset({"exact", "estimate"})
#: suffixes of an approximate quantity's error bar: ``{q}_low`` / ``{q}_high``
BOUND_SUFFIXES: tuple[str, ...] = ("_low", "_high")

_KAPPA = re.compile(r"^(input|grad|fim)_kappa_([0-9_]+?)(_estimate|_lower_bound|_infinite)?$")
_SCALAR = re.compile(r"^(input|grad|fim)_(lambda_max|rank)$")
_BOUND = re.compile(r"^(.+)_(low|high)$")

QuantityKind = Literal[
    "lambda_max",
    "rank",
    "kappa",
    "units",
    "features",
    "margin",
    "log10",
    "domination",
    "bound",
    "sampling",
    "attention",
    "routing",
]


@dataclass(frozen=True)
class Quantity:
    """A parsed quantity name (the last part of a logged key)."""

    name: str
    kind: QuantityKind
    moment: str | None = None
    percent: str | None = None
    status: str = "exact"


def key(prefix: str, layer: str, quantity: str) -> str:
    """The logged key ``{prefix}/{layer}/{quantity}``.

    Example:
        >>> key("conditioning", "net.0", "input_lambda_max")
        'conditioning/net.0/input_lambda_max'
    """
    return f"{prefix}/{layer}/{quantity}"


def split_key(logged: str) -> tuple[str, str] | None:
    """``(layer, quantity)`` of a per-layer key under any prefix, or ``None``.

    Module names never hold ``/``, so the layer is the part before the last one.

    Example:
        >>> split_key("train-conditioning/net.0/input_rank"), split_key("loss")
        (('net.0', 'input_rank'), None)
    """
    parts = logged.split("/")
    return (parts[-2], parts[-1]) if len(parts) >= 3 else None


def format_percent(percent: float) -> str:
    """Key fragment for a percent: ``50 -> "50"``, ``99.5 -> "99_5"``.

    Example:
        >>> format_percent(80.0), format_percent(99.5)
        ('80', '99_5')
    """
    return f"{percent:g}".replace(".", "_")


def percent_text(fragment: str) -> str:
    """The percent a key fragment stands for (the inverse of :func:`format_percent`).

    Example:
        >>> percent_text("99_5"), percent_text("50")
        ('99.5', '50')
    """
    return fragment.replace("_", ".")


def lambda_max_quantity(moment: str) -> str:
    """``{moment}_lambda_max``."""
    return f"{moment}_lambda_max"


def rank_quantity(moment: str) -> str:
    """``{moment}_rank``."""
    return f"{moment}_rank"


def dim_quantity(moment: str) -> str:
    """``{moment}_dim``: the size of a moment's matrix, in layer tables only (never logged).

    Example:
        >>> dim_quantity("grad")
        'grad_dim'
    """
    return f"{moment}_dim"


#: prefix of a quantity's decimal logarithm (TensorBoard charts of λmax and κ_p read on a
#: linear axis: its custom scalars have no log-axis setting)
LOG10_PREFIX = "log10_"


def log10_quantity(name: str) -> str:
    """``log10_{name}``: the decimal logarithm of a quantity, for dashboards without log axes.

    Example:
        >>> log10_quantity("input_lambda_max")
        'log10_input_lambda_max'
    """
    return LOG10_PREFIX + name


def log10_scalars(metrics: Mapping[str, float]) -> dict[str, float]:
    """``log10`` of every positive, finite λmax and measured κ_p in ``{prefix}/{layer}/{q}``
    keys, under ``{prefix}/{layer}/log10_{q}``.

    Example:
        >>> log10_scalars({"c/fc/input_lambda_max": 1e-3, "c/fc/input_kappa_50": 100.0,
        ...                "c/fc/input_kappa_80_lower_bound": 1e9, "c/fc/input_rank": 4.0})
        {'c/fc/log10_input_lambda_max': -3.0, 'c/fc/log10_input_kappa_50': 2.0}
    """
    out: dict[str, float] = {}
    for logged, value in metrics.items():
        parts = split_key(logged)
        if parts is None or not (math.isfinite(value) and value > 0):
            continue
        parsed = parse_quantity(parts[1])
        if parsed is None or not (
            parsed.kind == "lambda_max" or (parsed.kind == "kappa" and parsed.status in KAPPA_VALUES)
        ):
            continue
        out[logged.rsplit("/", 1)[0] + "/" + log10_quantity(parts[1])] = math.log10(value)
    return out


def histogram_quantity(moment: str) -> str:
    """``{moment}_log10_eigenvalues``: the tag of a moment's eigenvalue histogram (not a scalar).

    Example:
        >>> key("conditioning", "fc", histogram_quantity("grad"))
        'conditioning/fc/grad_log10_eigenvalues'
    """
    return f"{moment}_log10_eigenvalues"


#: per-moment fields of a spectra-file record beside ``{m}_rank``
RECORD_FIELDS: tuple[str, ...] = ("floor_rtol", "structural_rank", "eigenvalues")


def record_field(moment: str, name: str) -> str:
    """A per-moment field of a spectra-file record: ``{moment}_{name}``.

    Example:
        >>> record_field("input", "floor_rtol")
        'input_floor_rtol'
    """
    if name not in RECORD_FIELDS:
        raise ValueError(f"unknown record field {name!r}: expected one of {RECORD_FIELDS}")
    return f"{moment}_{name}"


def kappa_quantity(moment: str, percent: float | str, status: str = "exact") -> str:
    """``{moment}_kappa_{p}`` with the marker of a non-measurement.

    Example:
        >>> kappa_quantity("fim", 99.5), kappa_quantity("input", "50", "infinite")
        ('fim_kappa_99_5', 'input_kappa_50_infinite')
    """
    fragment = percent if isinstance(percent, str) else format_percent(percent)
    return f"{moment}_kappa_{fragment}{KAPPA_MARKERS[status]}"


def parse_quantity(name: str) -> Quantity | None:
    """What a quantity name means, or ``None`` for names this package does not log.

    Example:
        >>> parse_quantity("fim_rank").kind, parse_quantity("loss") is None
        ('rank', True)
    """
    if (
        (match := _BOUND.match(name))
        and (base := parse_quantity(match.group(1)))
        and (base.kind == "lambda_max" or (base.kind == "kappa" and base.status == "estimate"))
    ):
        return Quantity(name, "bound", base.moment, base.percent, match.group(2))
    if match := _KAPPA.match(name):
        marker = match.group(3) or ""
        status = next(s for s, suffix in KAPPA_MARKERS.items() if suffix == marker)
        return Quantity(name, "kappa", match.group(1), match.group(2), status)
    if match := _SCALAR.match(name):
        return Quantity(name, match.group(2), match.group(1))  # type: ignore[arg-type]
    if name.startswith(LOG10_PREFIX) and (base := parse_quantity(name[len(LOG10_PREFIX) :])):
        return Quantity(name, "log10", base.moment, base.percent, base.status)
    for group in GROUPS:
        if group.holds(name):
            return Quantity(name, group.kind, group.moment_of(name))  # type: ignore[arg-type]
    return None


def attention_head_quantity(what: Literal["logit_max", "entropy"], head: int) -> str:
    """The name of one head's attention quantity.

    Example:
        >>> attention_head_quantity("entropy", 3), parse_quantity("attention_entropy_h3").kind
        ('attention_entropy_h3', 'attention')
    """
    return f"attention_{what}_h{int(head)}"


def expert_quantity(what: Literal["load_share"], expert: int) -> str:
    """The name of one expert's routing quantity.

    Example:
        >>> expert_quantity("load_share", 3), parse_quantity("load_share_e3").kind
        ('load_share_e3', 'routing')
    """
    return f"{what}_e{int(expert)}"


def sampling_quantity(moment: str, what: Literal["kept_rows", "sampling_error"]) -> str:
    """The name of a moment's row-sampling quantity.

    Example:
        >>> sampling_quantity("grad", "sampling_error"), parse_quantity("grad_kept_rows").kind
        ('grad_sampling_error', 'sampling')
    """
    name = f"{moment}_{what}"
    if name not in SAMPLING_QUANTITIES:
        raise ValueError(f"no sampling quantity {name!r}; known: {SAMPLING_QUANTITIES}")
    return name


def is_conditioning_quantity(name: str) -> bool:
    """Whether ``name`` is one of the conditioning analysis' per-layer scalars.

    Example:
        >>> is_conditioning_quantity("grad_kappa_99_5"), is_conditioning_quantity("loss")
        (True, False)
    """
    parsed = parse_quantity(name)
    return parsed is not None and parsed.kind != "domination"


def kappa_reading(row: Mapping[str, float], moment: str, percent: str) -> tuple[float, str] | None:
    """``(value, status)`` of κ_p in a layer's ``{quantity: value}`` row, whichever key holds it.

    Example:
        >>> kappa_reading({"grad_kappa_80_lower_bound": 1e6}, "grad", "80")
        (1000000.0, 'lower_bound')
        >>> kappa_reading({"grad_kappa_80_infinite": 1.0}, "grad", "80")
        (inf, 'infinite')
    """
    for status in KAPPA_MARKERS:
        value = row.get(kappa_quantity(moment, percent, status))
        if value is not None:
            return (math.inf if status == "infinite" else float(value)), status
    return None


class _Summary(Protocol):
    @property
    def lambda_max(self) -> float: ...
    @property
    def rank(self) -> int: ...
    @property
    def kappa(self) -> Mapping[float, float]: ...
    @property
    def kappa_status(self) -> Mapping[float, Any]: ...


def summary_quantities(moment: str, summary: _Summary) -> dict[str, float]:
    """The scalars of one moment's summary: λmax, rank and each κ_p under its marker key.

    Non-finite λmax and ``"undefined"`` κ_p (a zero matrix) are left out.

    Example:
        >>> from types import SimpleNamespace
        >>> s = SimpleNamespace(lambda_max=2.0, rank=1, kappa={50: math.inf},
        ...                     kappa_status={50: "infinite"})
        >>> summary_quantities("input", s)
        {'input_lambda_max': 2.0, 'input_rank': 1.0, 'input_kappa_50_infinite': 1.0}
    """
    out: dict[str, float] = {}
    if math.isfinite(summary.lambda_max):
        out[lambda_max_quantity(moment)] = summary.lambda_max
    bounds = getattr(summary, "lambda_max_bounds", None)
    if bounds is not None and all(math.isfinite(b) for b in bounds):  # an approximate λmax
        for suffix, value in zip(BOUND_SUFFIXES, bounds):
            out[lambda_max_quantity(moment) + suffix] = float(value)
    if getattr(summary, "exact", True):  # an approximate spectrum's rank is not measured
        out[rank_quantity(moment)] = float(summary.rank)
    kappa_bounds = getattr(summary, "kappa_bounds", {})
    for percent, value in summary.kappa.items():
        status = summary.kappa_status.get(percent, "exact")
        if status == "infinite":
            out[kappa_quantity(moment, percent, status)] = 1.0
        elif status in KAPPA_MARKERS and math.isfinite(value):
            out[kappa_quantity(moment, percent, status)] = value
            if status == "estimate" and percent in kappa_bounds:
                for suffix, bound in zip(BOUND_SUFFIXES, kappa_bounds[percent]):
                    if math.isfinite(bound):
                        out[kappa_quantity(moment, percent, status) + suffix] = float(bound)
    return out
