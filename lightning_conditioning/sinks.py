"""Where results go: the only module that knows what kinds of loggers exist.

Callbacks hand plain dictionaries and result objects here; these functions decide, per
logger, what it can store. Call them on global rank zero only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from lightning.pytorch.loggers import Logger, TensorBoardLogger

from lightning_conditioning.results import LayerConditioning

__all__ = [
    "publish_conditioning",
    "publish_weight_domination",
    "log_scalars",
    "log_spectra_histograms",
]


def publish_conditioning(
    loggers: Iterable[Logger],
    results: Mapping[str, LayerConditioning],
    step: int,
    *,
    prefix: str = "conditioning",
    histograms: bool = True,
    figures: bool = True,
) -> None:
    """Everything ConditioningCallback reports for one analysed window, to every logger.

    The callback's only entry point into the sinks (call on global rank zero): scalars from
    ``LayerConditioning.metrics``, then per logger kind whatever else it can store.
    """
    metrics: dict[str, float] = {}
    for result in results.values():
        metrics.update(result.metrics(prefix))
    log_scalars(loggers, metrics, step)
    if histograms:
        log_spectra_histograms(loggers, results, step, prefix)


def publish_weight_domination(
    loggers: Iterable[Logger], metrics: Mapping[str, float], step: int
) -> None:
    """Everything WeightDominationCallback reports for one check (call on global rank zero)."""
    log_scalars(loggers, metrics, step)


def log_scalars(loggers: Iterable[Logger], metrics: Mapping[str, float], step: int) -> None:
    """Send scalars to every logger through ``Logger.log_metrics``."""
    if not metrics:
        return
    for logger in loggers:
        logger.log_metrics(dict(metrics), step=step)


def _log10_nonzero(values: torch.Tensor) -> torch.Tensor:
    return torch.log10(values[values > 0])


def log_spectra_histograms(
    loggers: Iterable[Logger],
    results: Mapping[str, LayerConditioning],
    step: int,
    prefix: str = "conditioning",
) -> None:
    """Histograms of log10 of the nonzero eigenvalues of Σx and Σ∇h, per layer.

    Tags: ``{prefix}/{layer}/input_log10_eigenvalues`` and ``.../grad_log10_eigenvalues``.
    Only loggers that store histograms (TensorBoard) receive them.
    """
    for logger in loggers:
        if not isinstance(logger, TensorBoardLogger):
            continue
        writer = logger.experiment
        for name, result in results.items():
            for label, summary in (("input", result.input), ("grad", result.grad)):
                if summary is None or summary.rank == 0:
                    continue
                values = _log10_nonzero(summary.nonzero_eigenvalues).numpy()
                writer.add_histogram(
                    f"{prefix}/{name}/{label}_log10_eigenvalues", values, global_step=step
                )
