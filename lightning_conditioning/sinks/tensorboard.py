"""TensorBoard: scalars, eigenvalue histograms, depth-profile figures, spectra file, layout."""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger

from lightning_conditioning import schema
from lightning_conditioning.sinks.base import Publication, Sink

__all__ = ["TensorBoardSink", "tensorboard_layout", "publish_tensorboard_layout"]

#: writers that already hold a custom-scalars layout (TensorBoard shows one per run)
_WITH_LAYOUT: weakref.WeakSet[Any] = weakref.WeakSet()


class TensorBoardSink(Sink):
    """Scalars, with the decimal logarithms of λmax and κ_p beside them (the custom-scalars
    charts have no log axis: the layout charts those); histograms of log10 eigenvalues
    (``{prefix}/{layer}/{input,grad}_log10_eigenvalues``);
    the depth-profile figure (``{prefix}/depth_profile``, images tab) and one per mixture-of-experts
    module (``{prefix}/{module}/experts``); and, with histograms on,
    the spectra file ``conditioning_spectra.jsonl`` in ``logger.log_dir`` for the report."""

    def publish_conditioning(self, publication: Publication) -> None:
        metrics = publication.metrics
        self.log_scalars({**metrics, **schema.log10_scalars(metrics)}, publication.step)
        self.conditioning_extras(publication)

    def conditioning_extras(self, publication: Publication) -> None:
        logger = self.logger
        assert isinstance(logger, TensorBoardLogger)
        publication.write_to(logger.experiment, logger.log_dir)


def _chart(pattern_prefix: str, *quantities: str) -> list[Any]:
    """A multiline chart of every layer's ``{prefix}/{layer}/{quantity}`` for each quantity."""
    return ["Multiline", [f"{re.escape(pattern_prefix)}/[^/]+/{re.escape(q)}$" for q in quantities]]


def _group_charts(p: str, group: schema.QuantityGroup) -> dict[str, list[Any]]:
    """One chart per quantity of a declared group, and one of its indexed quantities (per head,
    per expert) together."""
    charts = {quantity.replace("_", " "): _chart(p, quantity) for quantity in group.names}
    if group.indexed is not None:
        charts[group.indexed_title] = ["Multiline", [f"{re.escape(p)}/[^/]+/{group.indexed}$"]]
    return charts


def _conditioning_sections(p: str, percents: Sequence[float]) -> dict[str, dict[str, list[Any]]]:
    """What to read first first: λmax, κ_p; then ranks, the κ_p that are not measurements; then
    every declared group (:data:`..schema.GROUPS`: units, features, attention, routing,
    sampling, the stability margin)."""
    moments = [(m, schema.MOMENT_SYMBOLS[m]) for m in schema.MOMENTS]
    return {
        f"{p}: log10 λmax per layer": {
            f"{label} log10 λmax": _chart(p, schema.log10_quantity(schema.lambda_max_quantity(m)))
            for m, label in moments
        },
        f"{p}: log10 κ_p per layer": {
            f"{label} log10 κ_{percent:g}%": _chart(p, schema.log10_quantity(schema.kappa_quantity(m, percent)))
            for m, label in moments
            for percent in percents
        },
        f"{p}: rank per layer": {f"{label} rank": _chart(p, schema.rank_quantity(m)) for m, label in moments},
        f"{p}: κ_p lower bounds per layer (λ_p under the resolution floor)": {
            f"{label} κ_{percent:g}% ≥": _chart(p, schema.kappa_quantity(m, percent, "lower_bound"))
            for m, label in moments
            for percent in percents
        },
        f"{p}: log10 κ_p estimates per layer (approximate spectra; error bars: …_low / …_high)": {
            f"{label} log10 κ_{percent:g}% ≈": _chart(
                p, schema.log10_quantity(schema.kappa_quantity(m, percent, "estimate"))
            )
            for m, label in moments
            for percent in percents
        },
        f"{p}: κ_p infinite per layer (1 = λ_p is a structural zero)": {
            f"{label} κ_p = ∞": _chart(p, *(schema.kappa_quantity(m, percent, "infinite") for percent in percents))
            for m, label in moments
        },
        **{f"{p}: {group.section}": _group_charts(p, group) for group in schema.GROUPS if group.section},
    }


def tensorboard_layout(
    *,
    conditioning_prefix: str | None = "conditioning",
    domination_prefix: str | None = "weight_domination",
    kappa_percents: Sequence[float] = (50, 80, 100),
) -> dict[str, dict[str, list[Any]]]:
    """A custom-scalars layout: one chart per quantity with every layer as one line.

    Charts match tags by regular expression, so the layout needs no layer names and can be
    written before training; every quantity name comes from :mod:`lightning_conditioning.schema`.
    Sections: log10 λmax and log10 κ_p (charts have no log axis), dead and full units, then the
    numerical rank of Σx / Σ∇h / sub-FIM; the κ_p that are lower bounds
    (``…_lower_bound``) and infinite (``…_infinite``); dead and full units; and (with
    ``domination_prefix``) the weight-domination ratios.

    Example:
        >>> layout = tensorboard_layout(kappa_percents=(100,))
        >>> layout["conditioning: log10 λmax per layer"]["Σx log10 λmax"]
        ['Multiline', ['conditioning/[^/]+/log10_input_lambda_max$']]
        >>> layout["conditioning: rank per layer"]["Σ∇h rank"]
        ['Multiline', ['conditioning/[^/]+/grad_rank$']]
    """
    layout: dict[str, dict[str, list[Any]]] = {}
    if conditioning_prefix is not None:
        layout.update(_conditioning_sections(conditioning_prefix, kappa_percents))
    if domination_prefix is not None:
        d = domination_prefix
        layout[f"{d} per layer"] = {
            "σmax(∇W)/σmax(W)": _chart(d, "grad_weight_ratio"),
            "σmax(ΔW)/σmax(W)": _chart(d, "update_weight_ratio"),
            "‖∇W‖F/‖W‖F": _chart(d, "grad_weight_ratio_fro"),
            "dominated layers": ["Multiline", [f"{re.escape(d)}/{schema.DOMINATED_LAYERS}$"]],
        }
    return layout


def publish_tensorboard_layout(loggers: Iterable[Logger], layout: dict[str, dict[str, list[Any]]] | None = None) -> int:
    """Write ``layout`` (default :func:`tensorboard_layout`) to every TensorBoard logger whose
    run has no custom-scalars layout yet (from this process, or already in its event files:
    a user's own layout is never overwritten); returns how many got it. Call on global rank
    zero, e.g. in ``on_fit_start``.

    Example::

        publish_tensorboard_layout(trainer.loggers, tensorboard_layout(kappa_percents=(50, 100)))
    """
    layout = layout if layout is not None else tensorboard_layout()
    written = 0
    for logger in loggers:
        if not isinstance(logger, TensorBoardLogger):
            continue
        writer = logger.experiment
        if writer in _WITH_LAYOUT or _has_layout(Path(writer.log_dir)):
            continue
        writer.add_custom_scalars(layout)
        _WITH_LAYOUT.add(writer)
        written += 1
    return written


#: the tag under which TensorBoard stores a custom-scalars layout
_LAYOUT_TAG = b"custom_scalars__config__"


def _has_layout(log_dir: Path) -> bool:
    """Whether the run's event files already hold a custom-scalars layout (someone else's)."""
    for event_file in log_dir.glob("events.out.tfevents.*"):
        try:
            if _LAYOUT_TAG in event_file.read_bytes():
                return True
        except OSError:
            continue
    return False
