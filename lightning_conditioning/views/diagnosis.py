"""Rules from Huang et al. (ECCV 2020) that turn per-layer numbers into findings.

Pure: plain dictionaries in, :class:`Finding` objects out; no Lightning, no torch. The input
is a *layer table* ``{layer: {quantity: value}}`` in module order, with the quantities named
as the logged keys end (``input_lambda_max``, ``grad_kappa_100``, ``dead_input_units``, …,
plus ``input_units`` / ``input_dim`` / ``grad_dim`` when known), and optionally the
weight-domination table (``grad_weight_ratio``, ``update_weight_ratio``, …). Build tables with
:func:`lightning_conditioning.views.tables.split_metrics` (flat logged keys) or
:func:`~lightning_conditioning.views.tables.conditioning_table` (``callback.results``).

The rules (defaults in :class:`~lightning_conditioning.views.thresholds.Thresholds`):

``vanishing_forward`` / ``exploding_forward`` (Fig. 3, claim 1)
    Least-squares fit of log10 λmax(Σx) against layer index over ≥ ``min_layers`` layers;
    fires when the slope is beyond ±``slope`` decades per layer *and* the fitted change over
    the fitted layers is at least ``total_decades``. It starts at the first layer whose value
    is ``onset_factor``× below (above) the first layer's.
``vanishing_backward`` / ``exploding_backward``
    The same for λmax(Σ∇h) along the backward pass (last layer first), against the last
    layer's value.
``dead_units`` (App. C.3)
    A layer (not the first: its inputs are the data) whose input units are more than
    ``dead_fraction`` dead (never > 0 over the analysed rows). Needs ``input_units``.
``ill_conditioned`` (Fig. 5)
    κ_p of Σx or Σ∇h of one layer ≥ ``kappa_outlier``× the median over the other layers
    (≥ 3 of them), with p the *smallest* percent logged (κ_50 by default): κ_100 depends on
    the smallest nonzero eigenvalue, which is noisy on one batch (it varies by 100× between
    healthy layers), while κ_50 is stable. Only measured κ_p count (lower bounds and
    infinities are ``rank_deficient``'s).
``rank_deficient``
    κ_p of Σx, Σ∇h or the sub-FIM is not a measurement (keys ``…_lower_bound`` /
    ``…_infinite``, :mod:`lightning_conditioning.schema`): ``λ_p`` is under the resolution
    floor or exactly zero, so at least ``100 − p`` % of the spectrum is lost. Not reported: the
    one direction the softmax takes from the last layer's Σ∇h (cross-entropy gradients with
    respect to the logits sum to zero), and the sub-FIM's loss that follows from it.
``outlier_features`` (beyond the paper: Sun et al. 2024, "Massive activations in large language
    models"; Dettmers et al. 2022, LLM.int8)
    One input feature's mean square ≥ ``outlier_ratio``× the median feature's (its RMS ≥ 10×
    at the default 100), ``max_i Σx_ii / median_i Σx_ii`` (:mod:`lightning_conditioning.maths.features`),
    in a layer of at least ``outlier_min_features`` input features (when known):
    that feature then dominates Σx, λmax(Σx) and κ_p describe it alone, and a step along it
    moves the layer's output far more than along the others. Not for embeddings (their Σx
    diagonal is token frequencies).
``step_size`` (Sec. 2, linear models: training diverges when lr ≥ 2/λmax)
    ``lr·λmax(F_k)`` of a layer ≥ its ``stability_limit`` (2 for gradient descent, 2(1+β) with
    heavy-ball momentum β; logged when the learning rate of an SGD-family optimizer is known).
    Under Adam / AdamW: ``lr·λmax(P⁻¹F_k)`` ≥ ``2(1+β1)/(1−β1)`` (the adaptive edge of
    stability; :mod:`lightning_conditioning.maths.preconditioned`).
``last_layer_input`` (Figs. 6, 7, claim 5)
    λmax(Σx) of the last layer's input ≥ ``last_input_factor``× the median over the other
    layers: the residual sums piling up in deep ResNets; remedy ``add_last_bn``.
``weight_domination`` (Definition 1, Fig. 4)
    A row that carries the checker's verdict ``dominated`` (what
    :meth:`~lightning_conditioning.WeightDominationMonitor.domination_table` writes: it judged
    the layer against its own history, with its own options) is taken as judged. Other rows
    (tables read back from logged scalars, which have no history): σmax(∇W)/σmax(W) <
    ``grad_weight_ratio``, or an applied update σmax(ΔW)/σmax(W) ≤ ``update_weight_ratio`` (a
    layer the optimizer does not move). Never for a layer whose weight or gradient is exactly
    zero. Only finite numbers are quoted (a pending check has no update ratio yet).
``exactly_zero`` (info)
    Layers whose weight gradient (σmax(∇W) = 0) or weight (σmax(W) = 0) is exactly zero, named
    with the likely reason: a zero-initialised scale (BatchNorm γ, head) after them, or a
    zero-initialised head itself. Not weight domination.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_conditioning import schema
from lightning_conditioning.views.deficiency import describe, remedy, unresolved_kappas
from lightning_conditioning.views.tables import headline_percent
from lightning_conditioning.views.thresholds import Thresholds
from lightning_conditioning.views.wording import (
    REMEDY_LAST_BN,
    Finding,
    domination_evidence,
    format_findings,
    listing,
    short_warning,
    zero_layers_text,
)

__all__ = ["Finding", "Thresholds", "diagnose", "format_findings", "short_warning"]

Table = Mapping[str, Mapping[str, float]]
_REMEDY_INIT = (
    "use He (Kaiming) initialisation or normalise the layers (BatchNorm), which "
    "keeps λmax constant across depth (paper, Fig. 3)"
)
_REMEDY_EXPLODING = (
    "scale the initial weights down (He: variance 2/fan_in for ReLU) or normalise the layers (BatchNorm)"
)
_REMEDY_LAST_BN = REMEDY_LAST_BN


def _positive(row: Mapping[str, float] | None, key: str) -> float | None:
    value = (row or {}).get(key)
    return value if value is not None and math.isfinite(value) and value > 0 else None


def _slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def _depth_trend(table: Table, key: str, backward: bool, th: Thresholds) -> list[Finding]:
    names = list(table)
    order = list(reversed(names)) if backward else names
    points = [(i, name, v) for i, name in enumerate(order) if (v := _positive(table[name], key))]
    if len(points) < max(th.min_layers, 2):
        return []
    slope = _slope([p[0] for p in points], [math.log10(p[2]) for p in points])
    decades = abs(slope) * (points[-1][0] - points[0][0])
    if abs(slope) < th.slope or decades < th.total_decades:
        return []
    vanishing = slope < 0
    first_name, first = points[0][1], points[0][2]
    onset = next(
        (p for p in points[1:] if (p[2] < first / th.onset_factor if vanishing else p[2] > first * th.onset_factor)),
        None,
    )
    quantity = "λmax(Σ∇h)" if backward else "λmax(Σx)"
    pass_name = "backward pass (from the last layer towards the first)" if backward else "forward pass"
    kind = "vanishing" if vanishing else "exploding"
    evidence = {
        "slope_decades_per_layer": slope,
        "factor_per_layer": 10.0**slope,
        "layers_fitted": float(len(points)),
        f"{key}[{first_name}]": first,
        f"{key}[{points[-1][1]}]": points[-1][2],
    }
    where = ""
    if onset is not None:
        evidence[f"{key}[{onset[1]}]"] = onset[2]
        where = (
            f"; it is first {th.onset_factor:g}× {'below' if vanishing else 'above'} "
            f"{first_name}'s at {onset[1]} (layer {names.index(onset[1]) + 1} of {len(names)})"
        )
    message = (
        f"{quantity} {'decays' if vanishing else 'grows'} exponentially along the "
        f"{pass_name}: {slope:+.2f} decades per layer (×{10.0**slope:.3g} per layer) over "
        f"{len(points)} layers, from {first:.3g} at {first_name} to {points[-1][2]:.3g} at "
        f"{points[-1][1]}{where}"
    )
    return [
        Finding(
            rule=f"{kind}_{'backward' if backward else 'forward'}",
            layer=onset[1] if onset is not None else first_name,
            message=message,
            evidence=evidence,
            layers=tuple(p[1] for p in points),
            remedy=_REMEDY_INIT if vanishing else _REMEDY_EXPLODING,
        )
    ]


def _dead_units(table: Table, th: Thresholds) -> list[Finding]:
    hits: list[tuple[str, float, float]] = []
    for name in list(table)[1:]:
        row = table[name]
        units, dead = row.get("input_units"), row.get("dead_input_units")
        if units and dead is not None and units > 0 and dead / units > th.dead_fraction:
            hits.append((name, dead, units))
    listed = _listing([f"{n} ({d:.0f}/{u:.0f} = {d / u:.0%})" for n, d, u in hits])
    return _over_layers(
        "dead_units",
        hits,
        f"{len(hits)} layer(s) have more than {th.dead_fraction:.0%} dead input units (never > 0 "
        f"on the analysed batch): {listed}. After a ReLU a dead unit passes no signal forward and "
        "no gradient backward, and plain nets gain more of them with depth; for inputs that take "
        "both signs (attention outputs, residual streams) it only means the unit stayed ≤ 0",
        {f"dead_fraction[{n}]": d / u for n, d, u in hits},
        "check the initialisation, learning rate and biases of the layer before; BatchNorm nets "
        "have almost no dead units (paper, App. C.3)",
    )


def _over_layers(
    rule: str, hits: Sequence[tuple[Any, ...]], message: str, evidence: dict[str, float], remedy: str
) -> list[Finding]:
    """One finding naming every layer of ``hits`` (tuples led by the layer's name); none
    without hits."""
    if not hits:
        return []
    return [
        Finding(
            rule=rule,
            layer=hits[0][0],
            layers=tuple(h[0] for h in hits),
            message=message,
            evidence=evidence,
            remedy=remedy,
        )
    ]


def _attention_logits(table: Table, th: Thresholds) -> list[Finding]:
    hits = [
        (name, row["attention_logit_max"])
        for name, row in table.items()
        if row.get("attention_logit_max", 0.0) >= th.attention_logit
    ]
    listed = listing([f"{n} (max |q·k|/√d = {v:.3g})" for n, v in hits])
    return _over_layers(
        "attention_logit_growth",
        hits,
        f"{len(hits)} attention module(s) reach logits of at least {th.attention_logit:g}: {listed}. "
        "Growing attention logits saturate the softmax and come before loss spikes and divergence "
        "(Wortsman et al. 2023)",
        {f"attention_logit_max[{n}]": v for n, v in hits},
        "normalise queries and keys (QK-layernorm), lower the learning rate of the q/k projections, "
        "or add weight decay to them",
    )


def _attention_entropy(table: Table, th: Thresholds) -> list[Finding]:
    hits = [
        (name, row["attention_entropy_min"], row["attention_entropy_uniform"])
        for name, row in table.items()
        if "attention_entropy_min" in row
        and row.get("attention_entropy_uniform", 0.0) > 0
        and row["attention_entropy_min"] < th.attention_entropy_share * row["attention_entropy_uniform"]
    ]
    listed = listing([f"{n} ({h:.3g} nats against {u:.3g} uniform)" for n, h, u in hits])
    return _over_layers(
        "attention_entropy_collapse",
        hits,
        f"{len(hits)} attention module(s) have a head whose attention entropy is under "
        f"{th.attention_entropy_share:.0%} of uniform attention's: {listed}. A head that looks at one "
        "key only passes little signal and gradient; entropy collapse comes before training "
        "instability (Zhai et al. 2023)",
        {f"attention_entropy_min[{n}]": h for n, h, _ in hits},
        "check the attention logits (attention_logit_max); normalising queries and keys, a lower "
        "learning rate or a longer warm-up keep the entropy up",
    )


def _outlier_features(table: Table, th: Thresholds) -> list[Finding]:
    hits = [
        (name, row["input_outlier_ratio"], int(row.get("input_outlier_feature", -1)))
        for name, row in table.items()
        if row.get("input_outlier_ratio", 0.0) >= th.outlier_ratio
        and row.get("input_units", th.outlier_min_features) >= th.outlier_min_features
    ]
    listed = listing([f"{n} (feature {i}: {r:.3g}× the median mean square)" for n, r, i in hits])
    return _over_layers(
        "outlier_features",
        hits,
        f"{len(hits)} layer(s) read an input feature whose mean square is at least "
        f"{th.outlier_ratio:g}× the median feature's: {listed}. That feature dominates Σx: "
        "λmax(Σx) and κ_p describe it alone, and in transformers such massive activations come "
        "before loss spikes and break low-precision arithmetic",
        {f"input_outlier_ratio[{n}]": r for n, r, _ in hits},
        "normalise the inputs of the first layer (a feature on its own scale); in a transformer, "
        "watch the feature over training and check the layers that write it (normalisation "
        "before them, weight decay, a lower learning rate)",
    )


def _step_size(table: Table) -> list[Finding]:
    hits = [
        (name, row["lr_lambda_max"], row["stability_limit"])
        for name, row in table.items()
        if "lr_lambda_max" in row and "stability_limit" in row and row["lr_lambda_max"] >= row["stability_limit"]
    ]
    if not hits:
        return []
    worst = max(hits, key=lambda h: h[1] / h[2])
    adam = bool(table[worst[0]].get("margin_preconditioned"))
    curvature = "P⁻¹F" if adam else "F"
    listed = _listing([f"{n} (lr·λmax = {m:.3g} ≥ {lim:g})" for n, m, lim in hits])
    reading = (
        "Adam's preconditioned sharpness λmax(P⁻¹F_k), P = diag(√v̂ + ε), is past the "
        "threshold 2(1+β1)/(1−β1) at which full-batch Adam turns unstable and oscillates "
        "(the adaptive edge of stability, Cohen et al. 2022; K-FAC λmax)"
        if adam
        else "Along the top eigen-direction of their sub-FIM, gradient descent with this learning "
        "rate overshoots and grows (the paper's lr < 2/λmax reading; K-FAC λmax, an "
        "approximation of the layer's curvature)"
    )
    return [
        Finding(
            rule="step_size",
            layer=worst[0],
            layers=tuple(h[0] for h in hits),
            message=f"{len(hits)} layer(s) take steps past the stability limit of a quadratic: {listed}. {reading}",
            evidence={f"lr_lambda_max[{n}]": m for n, m, _ in hits},
            remedy=(
                f"lower the learning rate below {worst[2]:g}/λmax({curvature}) of {worst[0]} (a factor "
                f"{worst[1] / worst[2]:.2g} or more), warm it up, or normalise the layer's input"
                + (" (a larger Adam ε caps P⁻¹ at 1/ε)" if adam else "")
            ),
        )
    ]


def _measured_kappa(row: Mapping[str, float], moment: str, percent: str) -> float | None:
    """κ_p when it is a positive measurement; None for a lower bound, ∞ or nothing."""
    reading = schema.kappa_reading(row, moment, percent)
    if reading is None or reading[1] not in schema.KAPPA_VALUES:
        return None
    return reading[0] if math.isfinite(reading[0]) and reading[0] > 0 else None


def _smallest_percent(table: Table, label: str) -> str | None:
    return headline_percent(table, (label,))


def _kappa_outliers(table: Table, th: Thresholds) -> list[Finding]:
    findings: list[Finding] = []
    names = list(table)
    for label, matrix in (("input", "Σx"), ("grad", "Σ∇h")):
        percent = _smallest_percent(table, label)
        if percent is None:
            continue
        key = schema.kappa_quantity(label, percent)
        values = {n: v for n in names if (v := _measured_kappa(table[n], label, percent))}
        hits = []
        for name, value in values.items():
            others = [v for n, v in values.items() if n != name]
            if len(others) >= 3 and value >= th.kappa_outlier * statistics.median(others):
                hits.append((name, value, statistics.median(others)))
        if not hits:
            continue
        listed = _listing([f"{n} κ = {v:.3g} ({v / m:.0f}× the median {m:.3g} of the others)" for n, v, m in hits])
        remedy = (
            "normalisation (BatchNorm; LayerNorm in transformers) improves the conditioning "
            "of Σx and Σ∇h (paper, Fig. 5)"
        )
        if label == "input" and hits[0][0] == names[0]:
            remedy += "; the first layer's input is the data itself: standardise or whiten it"
        findings.append(
            Finding(
                rule="ill_conditioned",
                layer=hits[0][0],
                layers=tuple(h[0] for h in hits),
                message=f"{key} of {matrix} is an outlier: {listed}",
                evidence={**{f"{key}[{n}]": v for n, v, _ in hits}, **{f"median_others[{n}]": m for n, _, m in hits}},
                remedy=remedy,
            )
        )
    return findings


def _rank_deficient(table: Table, last_layer: str | None, statistics_float64: bool | None) -> list[Finding]:
    items = unresolved_kappas(table, last_layer)
    if not items:
        return []
    layers = tuple(dict.fromkeys(item.layer for item in items))
    evidence: dict[str, float] = {}
    for item in items:
        for percent, value, status in item.readings:
            evidence[f"{schema.kappa_quantity(item.moment, percent, status)}[{item.layer}]"] = value
        if item.rank is not None:
            evidence[f"{schema.rank_quantity(item.moment)}[{item.layer}]"] = item.rank
    return [
        Finding(
            rule="rank_deficient",
            layer=layers[0],
            layers=layers,
            evidence=evidence,
            message=(
                f"κ_p is not a measurement in {len(layers)} layer(s): "
                + _listing([describe(item) for item in items])
                + ". Its λ_p is under the resolution floor (≥: κ_p is at least that) or exactly "
                "zero (∞): the matrix is rank-deficient, at least (100 − p)% of its eigenvalues "
                "are lost, and the layer learns (almost) nothing along those directions"
            ),
            remedy=remedy(statistics_float64),
        )
    ]


def _zero_status(row: Mapping[str, float]) -> str | None:
    """``"zero_weight"`` / ``"zero_gradient"`` when the row's weight or weight gradient is
    exactly zero (as :func:`lightning_conditioning.maths.domination.weight_status` says), else None."""
    if row.get("weight_spectral_norm") == 0 or row.get("weight_fro") == 0:
        return "zero_weight"
    if row.get("grad_spectral_norm") == 0 or row.get("grad_weight_ratio") == 0:
        return "zero_gradient"
    return None


def _dominated(th: Thresholds, row: Mapping[str, float]) -> bool:
    if _zero_status(row) is not None:
        return False
    if "dominated" in row:  # the checker's verdict, with the layer's history
        return bool(row["dominated"])
    ratio, update = row.get("grad_weight_ratio"), row.get("update_weight_ratio")
    return (ratio is not None and ratio < th.grad_weight_ratio) or (
        update is not None and update <= th.update_weight_ratio
    )


def _large_last_input(table: Table, last: str | None, th: Thresholds) -> tuple[str, float, float] | None:
    """(last layer, its λmax(Σx), median λmax(Σx) of the other layers) when its λmax(Σx) is at
    least ``last_input_factor`` × that median (the large-last-input rule fires), else None."""
    names = list(table)
    last = last or (names[-1] if names else None)
    value = _positive(table.get(last), "input_lambda_max") if last else None
    others = [v for n in names if n != last and (v := _positive(table[n], "input_lambda_max"))]
    if last is None or value is None or len(others) < 3:
        return None
    median = statistics.median(others)
    return (last, value, median) if value >= th.last_input_factor * median else None


def _last_layer(last_input: tuple[str, float, float] | None, domination: Table, th: Thresholds) -> list[Finding]:
    if last_input is None:
        return []
    last, value, median = last_input
    dominated = last in domination and _dominated(th, domination[last])
    return [
        Finding(
            rule="last_layer_input",
            layer=last,
            layers=(last,),
            severity="warning" if dominated else "info",
            message=(
                f"the input of the last layer has λmax(Σx) = {value:.3g}, {value / median:.0f}× "
                f"the median {median:.3g} of the other layers"
                + (", and the layer is in weight domination" if dominated else "")
                + ". In deep residual nets the sums of ReLU outputs pile up there; its weight "
                "grows and the layer can fall into weight domination (loss stuck near ln C)"
            ),
            evidence={
                f"input_lambda_max[{last}]": value,
                "median_input_lambda_max_others": median,
                "ratio": value / median,
            },
            remedy=_REMEDY_LAST_BN,
        )
    ]


def _listing(parts: Sequence[str], limit: int = 5) -> str:
    """At most ``limit`` items, then how many more."""
    return listing(parts, limit)


def _weight_domination(
    domination: Table, last_input: tuple[str, float, float] | None, dominated_layers: float | None, th: Thresholds
) -> list[Finding]:
    hits = [n for n, row in domination.items() if _dominated(th, row)]
    if not hits:
        return []
    evidence: dict[str, float] = {}
    for name in hits:
        for key in ("grad_weight_ratio", "update_weight_ratio", "grad_weight_ratio_fall"):
            value = domination[name].get(key)
            if value is not None and math.isfinite(value):
                evidence[f"{key}[{name}]"] = value
    if dominated_layers is not None and math.isfinite(dominated_layers):
        evidence["dominated_layers"] = dominated_layers
    judged = all("dominated" in domination[n] for n in hits)
    criterion = (
        "by the weight-domination check: a ratio fallen by orders of magnitude from its "
        "own peak or below its threshold, or a weight the optimizer does not move"
        if judged
        else f"ratio < {th.grad_weight_ratio:g} or update ratio ≤ {th.update_weight_ratio:g}"
    )
    remedy = (
        "a layer the optimizer does not move (left out of it, learning rate 0) or whose "
        "gradient is feeble next to its weight barely learns: check the optimizer's "
        "parameter groups, weight decay and the growth of the weight norm"
    )
    if last_input is not None and last_input[0] in hits:
        remedy += (
            "; the last layer's input has a large λmax(Σx) "
            f"({last_input[1] / last_input[2]:.0f}× the median): " + _REMEDY_LAST_BN
        )
    return [
        Finding(
            rule="weight_domination",
            layer=hits[0],
            layers=tuple(hits),
            evidence=evidence,
            message=(
                f"{len(hits)} layer(s) in weight domination ({criterion}): "
                + _listing([f"{n} ({domination_evidence(domination[n])})" for n in hits])
            ),
            remedy=remedy,
        )
    ]


def _exactly_zero(domination: Table) -> list[Finding]:
    statuses = {name: status for name, row in domination.items() if (status := _zero_status(row))}
    if not statuses:
        return []
    zero_gradient = [n for n, s in statuses.items() if s == "zero_gradient"]
    zero_weight = [n for n, s in statuses.items() if s == "zero_weight"]
    return [
        Finding(
            rule="exactly_zero",
            layer=next(iter(statuses)),
            layers=tuple(statuses),
            severity="info",
            message=zero_layers_text(zero_gradient, zero_weight),
            evidence={
                f"{'weight' if s == 'zero_weight' else 'grad'}_spectral_norm[{n}]": 0.0 for n, s in statuses.items()
            },
            remedy=(
                "nothing, when the zero initialisation is deliberate (timm's and torchvision's "
                "zero_init_residual, a zero-initialised head); otherwise check what follows the "
                "layer (dead units, a scale stuck at 0)"
            ),
        )
    ]


def diagnose(
    conditioning: Table,
    domination: Table | None = None,
    *,
    dominated_layers: float | None = None,
    last_layer: str | None = None,
    thresholds: Thresholds = Thresholds(),
    statistics_float64: bool | None = None,
) -> list[Finding]:
    """Apply every rule to one step's layer tables; an empty list means nothing fired.

    Args:
        conditioning: ``{layer: {quantity: value}}`` in module order (ConditioningCallback).
        domination: the same for WeightDominationCallback's per-layer quantities.
        dominated_layers: the logged ``weight_domination/dominated_layers`` (evidence only).
        last_layer: the final linear layer (default: the last layer of each table).
        thresholds: see :class:`Thresholds`.
        statistics_float64: whether the statistics were float64 (None: not known); remedies
            suggest float64 only where it was not in use.

    Example:
        >>> table = {f"l{i}": {"input_lambda_max": 10.0 ** -i} for i in range(6)}
        >>> [(f.rule, f.layer) for f in diagnose(table)]
        [('vanishing_forward', 'l2')]
        >>> diagnose({f"l{i}": {"input_lambda_max": 1.0} for i in range(6)})
        []
    """
    domination = domination or {}
    th = thresholds
    findings: list[Finding] = []
    findings += _depth_trend(conditioning, "input_lambda_max", backward=False, th=th)
    findings += _depth_trend(conditioning, "grad_lambda_max", backward=True, th=th)
    findings += _dead_units(conditioning, th)
    findings += _outlier_features(conditioning, th)
    findings += _attention_logits(conditioning, th)
    findings += _attention_entropy(conditioning, th)
    findings += _kappa_outliers(conditioning, th)
    findings += _rank_deficient(conditioning, last_layer, statistics_float64)
    findings += _step_size(conditioning)
    last_input = _large_last_input(conditioning, last_layer, th)
    findings += _last_layer(last_input, domination, th)
    findings += _weight_domination(domination, last_input, dominated_layers, th)
    findings += _exactly_zero(domination)
    return findings
