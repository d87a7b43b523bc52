"""Weights & Biases: scalars, ``wandb.Histogram`` values and the figure as an image, in one row."""

from __future__ import annotations

from typing import Any

from lightning_conditioning.sinks.base import Publication, Sink

__all__ = ["WandbSink"]


class WandbSink(Sink):
    """One ``log_metrics`` call per analysis: the scalars, a ``wandb.Histogram`` of log10
    eigenvalues per layer and matrix (same tags as TensorBoard's), and the depth profile as a
    ``wandb.Image`` under ``{prefix}/depth_profile``."""

    def publish_conditioning(self, publication: Publication) -> None:
        import wandb

        row: dict[str, Any] = dict(publication.metrics)
        if publication.histograms:
            for tag, values in publication.histogram_values.items():
                row[tag] = wandb.Histogram(values)
        for tag, figure in publication.tagged_figures.items():
            row[tag] = wandb.Image(figure)
        if row:
            self.logger.log_metrics(row, step=publication.step)
