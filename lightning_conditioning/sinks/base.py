"""What every sink shares: the scalar-only sink; the prepared publication and the one-time
messages come from :mod:`lightning_conditioning.views.publication` (framework-free)."""

from __future__ import annotations

from collections.abc import Mapping

from lightning.pytorch.loggers import Logger

from lightning_conditioning.views.publication import ANNOUNCER, Announcer, Publication, log

__all__ = ["Announcer", "ANNOUNCER", "Publication", "Sink", "log"]


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
        wanted = [w for w, on in (("histograms", publication.histograms), ("figures", publication.figures)) if on]
        if wanted:
            kind = type(self.logger).__name__
            ANNOUNCER.once(
                f"unsupported:{kind}",
                (
                    f"lightning_conditioning: {kind} gets the conditioning scalars only; "
                    f"{' and '.join(wanted)} are written to TensorBoard, CSV (spectra), MLflow "
                    "and W&B loggers."
                ),
            )
