"""Where results go: the only package that knows what kinds of loggers exist.

Callbacks hand plain dictionaries and result objects to :func:`publish_conditioning` and
:func:`publish_weight_domination` (on global rank zero only); each logger gets the sink of
its class (:func:`sink_for`):

============================  ==============================================================
``TensorBoardLogger``         scalars, log10-eigenvalue histograms, depth-profile figure,
                              spectra file in ``log_dir``; opt-in custom-scalars layout
                              (:func:`publish_tensorboard_layout`)
``CSVLogger``                 scalars (``metrics.csv``), spectra file in ``log_dir``
``MLFlowLogger``              scalars (names sanitised), spectra + figures as artifacts
``WandbLogger``               scalars, ``wandb.Histogram`` values, figure as ``wandb.Image``
any other ``Logger``          scalars (one info message says the rest is not supported)
============================  ==============================================================
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from lightning_conditioning.analysis.results import LayerConditioning
from lightning_conditioning.sinks.base import ANNOUNCER, Publication, Sink
from lightning_conditioning.sinks.files import CSVSink, MLflowSink, mlflow_metric_name
from lightning_conditioning.sinks.tensorboard import TensorBoardSink, publish_tensorboard_layout, tensorboard_layout
from lightning_conditioning.sinks.wandb import WandbSink
from lightning_conditioning.views.spectra_file import SPECTRA_FILENAME

__all__ = [
    "ANNOUNCER",
    "SPECTRA_FILENAME",
    "CSVSink",
    "MLflowSink",
    "Publication",
    "Sink",
    "TensorBoardSink",
    "WandbSink",
    "mlflow_metric_name",
    "publish_conditioning",
    "publish_tensorboard_layout",
    "publish_weight_domination",
    "register_sink",
    "sink_for",
    "tensorboard_layout",
]

_SINKS: list[tuple[type[Logger], Callable[[Logger], Sink]]] = [
    (TensorBoardLogger, TensorBoardSink),
    (CSVLogger, CSVSink),
    (MLFlowLogger, MLflowSink),
    (WandbLogger, WandbSink),
]


def register_sink(logger_type: type[Logger], factory: Callable[[Logger], Sink]) -> None:
    """Use ``factory(logger)`` for loggers of ``logger_type`` (checked before the built-ins).

    Example::

        class MySink(Sink):
            def conditioning_extras(self, publication): ...
        register_sink(MyLogger, MySink)
    """
    _SINKS.insert(0, (logger_type, factory))


def sink_for(logger: Logger) -> Sink:
    """The sink for ``logger``, chosen by its class (first registered match, else scalars only).

    Example:
        >>> from lightning.pytorch.loggers import CSVLogger
        >>> type(sink_for(CSVLogger("unused"))).__name__
        'CSVSink'
    """
    for logger_type, factory in _SINKS:
        if isinstance(logger, logger_type):
            return factory(logger)
    return Sink(logger)


def publish_conditioning(
    loggers: Iterable[Logger], results: Mapping[str, LayerConditioning], step: int, **options: Any
) -> None:
    """Everything ConditioningCallback reports for one analysed window, to every logger.

    The callback's only entry point into the sinks (call on global rank zero): scalars from
    ``LayerConditioning.metrics``, then per logger kind whatever else it can store
    (``options``: :class:`~lightning_conditioning.views.publication.Publication`'s ``prefix``,
    ``histograms``, which also switches the spectra file, and ``figures``, the depth-profile
    figure).

    Example::

        publish_conditioning(trainer.loggers, callback.results, step=0, figures=False)
    """
    publication = Publication(results, step, **options)
    for logger in loggers:
        sink_for(logger).publish_conditioning(publication)


def publish_weight_domination(loggers: Iterable[Logger], metrics: Mapping[str, float], step: int) -> None:
    """Everything WeightDominationCallback reports for one check (call on global rank zero).

    Example::

        publish_weight_domination(trainer.loggers, {"weight_domination/dominated_layers": 0.0}, 5)
    """
    for logger in loggers:
        sink_for(logger).publish_weight_domination(metrics, step)
