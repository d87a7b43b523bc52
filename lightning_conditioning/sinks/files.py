"""CSV and MLflow: scalars plus the spectra file (in ``log_dir`` / as run artifacts)."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger

from lightning_conditioning.sinks.base import ANNOUNCER, Publication, Sink
from lightning_conditioning.views.figures import save_png
from lightning_conditioning.views.spectra_file import SPECTRA_FILENAME, append_records

__all__ = ["CSVSink", "MLflowSink", "mlflow_metric_name"]


class CSVSink(Sink):
    """Scalars (``metrics.csv``) and, with histograms on, the full spectra in
    ``{logger.log_dir}/conditioning_spectra.jsonl``. Figures: rendered by the report command."""

    def conditioning_extras(self, publication: Publication) -> None:
        logger = self.logger
        assert isinstance(logger, CSVLogger)
        if publication.histograms:
            # logger.log_dir, never trainer.log_dir (a collective; we run on rank zero only)
            append_records(Path(logger.log_dir) / SPECTRA_FILENAME, publication.records)
        if publication.figures:
            ANNOUNCER.once(
                "figures:CSVLogger",
                (
                    "lightning_conditioning: CSVLogger stores no figures; render them with "
                    f"`python -m lightning_conditioning report {logger.log_dir}`."
                ),
            )


_MLFLOW_BAD = re.compile(r"[^a-zA-Z0-9_/. -]")


def mlflow_metric_name(key: str) -> str:
    """``key`` with every character MLflow rejects (outside ``[a-zA-Z0-9_/. -]``) made ``_``.

    Example:
        >>> mlflow_metric_name("conditioning/blocks[0]:κ/input_lambda_max")
        'conditioning/blocks_0___/input_lambda_max'
    """
    return _MLFLOW_BAD.sub("_", key)


class MLflowSink(Sink):
    """Scalars with MLflow-safe names; spectra (one JSONL file per step, artifact folder
    ``conditioning_spectra/``) and depth-profile PNGs (``conditioning_figures/``) as artifacts."""

    def metric_name(self, key: str) -> str:
        return mlflow_metric_name(key)

    def conditioning_extras(self, publication: Publication) -> None:
        logger = self.logger
        client, run_id = logger.experiment, logger.run_id  # type: ignore[attr-defined]
        with tempfile.TemporaryDirectory(prefix="lightning_conditioning_") as folder:
            stem = f"step_{publication.step:08d}"
            if publication.histograms:
                path = append_records(Path(folder) / f"{stem}.jsonl", publication.records)
                client.log_artifact(run_id, str(path), artifact_path="conditioning_spectra")
            for tag, figure in publication.tagged_figures.items():  # depth_profile_…, <module>_experts_…
                name = tag[len(publication.prefix) + 1 :].replace("/", "_")
                path = save_png(figure, Path(folder) / f"{name}_{stem}.png")
                client.log_artifact(run_id, str(path), artifact_path="conditioning_figures")
