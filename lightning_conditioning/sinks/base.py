"""What every sink shares: one prepared publication, the scalar-only sink, one-time messages."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any

from lightning.pytorch.loggers import Logger

from lightning_conditioning import schema
from lightning_conditioning.results import LayerConditioning
from lightning_conditioning.views.figures import depth_profile_figure, matplotlib_available
from lightning_conditioning.views.spectra_file import spectrum_records
from lightning_conditioning.views.tables import LayerTable, conditioning_table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Announcer", "ANNOUNCER", "Publication", "Sink", "log"]

log = logging.getLogger("lightning_conditioning.sinks")


class Announcer:
    """Logs each informational message once per process (keyed by a short id).

    Example:
        >>> announcer = Announcer()
        >>> announcer.once("k", "hello"), announcer.once("k", "hello")
        (True, False)
    """

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def once(self, key: str, message: str) -> bool:
        """Log ``message`` at INFO level unless ``key`` was announced before."""
        if key in self.seen:
            return False
        self.seen.add(key)
        log.info(message)
        return True


#: the process-wide announcer used by the sinks (tests may clear ``ANNOUNCER.seen``).
ANNOUNCER = Announcer()


class Publication:
    """One analysed window, prepared once and shared by every logger's sink.

    Everything derived (scalars, layer table, spectra records, depth-profile figure) is built
    lazily, at most once, and only if some sink asks for it.

    Example::

        publication = Publication(callback.results, step=0)
        publication.metrics["conditioning/fc/input_lambda_max"]
    """

    def __init__(
        self,
        results: Mapping[str, LayerConditioning],
        step: int,
        *,
        prefix: str = "conditioning",
        histograms: bool = True,
        figures: bool = True,
    ) -> None:
        self.results = results
        self.step = int(step)
        self.prefix = prefix
        self.histograms = histograms
        self.figures = figures

    @cached_property
    def metrics(self) -> dict[str, float]:
        """Flat scalars ``{prefix}/{layer}/{quantity}`` of every layer."""
        out: dict[str, float] = {}
        for result in self.results.values():
            out.update(result.metrics(self.prefix))
        return out

    @cached_property
    def table(self) -> LayerTable:
        """``{layer: {quantity: value}}`` (with ``input_units``), module order."""
        return conditioning_table(self.results)

    @cached_property
    def records(self) -> list[dict[str, Any]]:
        """Spectra-file records of this window (see :mod:`~lightning_conditioning.views.spectra_file`)."""
        return spectrum_records(self.results, self.prefix)

    @cached_property
    def figure(self) -> Figure | None:
        """The depth-profile figure, or None when figures are off, matplotlib is missing or
        there is nothing to draw."""
        if not self.figures or not self.table:
            return None
        if not matplotlib_available():
            ANNOUNCER.once("matplotlib", "lightning_conditioning: matplotlib is not installed, "
                           "so no figures are logged (pip install matplotlib).")
            return None
        return depth_profile_figure(self.table, step=self.step)

    @cached_property
    def histogram_values(self) -> dict[str, Any]:
        """``{tag: log10 of the nonzero eigenvalues}`` of Σx and Σ∇h per layer (numpy arrays)."""
        out: dict[str, Any] = {}
        for name, result in self.results.items():
            for label, summary in (("input", result.input), ("grad", result.grad)):
                if summary is None or summary.rank == 0:
                    continue
                values = summary.nonzero_eigenvalues
                out[schema.key(self.prefix, name, schema.histogram_quantity(label))] = (
                    values[values > 0].log10().numpy())
        return out


class Sink:
    """Scalars only: the sink of any logger without a dedicated one.

    Subclasses override :meth:`conditioning_extras` (histograms, figures, spectra) and, when
    the logger restricts metric names, :meth:`metric_name`.
    """

    #: what this sink can store besides scalars (for the one-time "not supported" message)

    def __init__(self, logger: Logger) -> None:
        self.logger = logger

    def metric_name(self, key: str) -> str:
        """The name under which ``key`` is stored (identity by default)."""
        return key

    def log_scalars(self, metrics: Mapping[str, float], step: int) -> None:
        """``logger.log_metrics`` with names passed through :meth:`metric_name`."""
        if metrics:
            self.logger.log_metrics({self.metric_name(k): v for k, v in metrics.items()}, step=step)

    def publish_conditioning(self, publication: Publication) -> None:
        """Scalars, then whatever else this logger kind stores."""
        self.log_scalars(publication.metrics, publication.step)
        self.conditioning_extras(publication)

    def publish_weight_domination(self, metrics: Mapping[str, float], step: int) -> None:
        """Weight-domination scalars."""
        self.log_scalars(metrics, step)

    def conditioning_extras(self, publication: Publication) -> None:
        """Histograms / figures / spectra: none for a generic logger (said once)."""
        wanted = [w for w, on in (("histograms", publication.histograms),
                                  ("figures", publication.figures)) if on]
        if wanted:
            kind = type(self.logger).__name__
            ANNOUNCER.once(f"unsupported:{kind}", (
                f"lightning_conditioning: {kind} gets the conditioning scalars only; "
                f"{' and '.join(wanted)} are written to TensorBoard, CSV (spectra), MLflow "
                "and W&B loggers."))
