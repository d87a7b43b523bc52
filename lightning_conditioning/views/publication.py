"""One analysed window prepared for publication, whatever publishes it: Lightning loggers
(:mod:`lightning_conditioning.sinks`), the Hugging Face Trainer's reporters
(:mod:`lightning_conditioning.integrations.huggingface`) or a plain ``SummaryWriter``. Pure:
no Lightning, no TensorBoard; each shell only maps these onto its own writer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_conditioning import schema
from lightning_conditioning.analysis.attention import attention_metrics
from lightning_conditioning.analysis.results import LayerConditioning
from lightning_conditioning.analysis.routing import routing_metrics, routing_readings
from lightning_conditioning.maths.attention import AttentionReading
from lightning_conditioning.views.figures import depth_profile_figure, experts_figure, matplotlib_available
from lightning_conditioning.views.spectra_file import SPECTRA_FILENAME, append_records, spectrum_records
from lightning_conditioning.views.tables import LayerTable, conditioning_table

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["Announcer", "ANNOUNCER", "Publication", "log"]

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
        attention: Mapping[str, AttentionReading] | None = None,
    ) -> None:
        self.results = results
        #: the window's attention readings by module (:mod:`~lightning_conditioning.analysis.attention`)
        self.attention = attention or {}
        self.step = int(step)
        self.prefix = prefix
        self.histograms = histograms
        self.figures = figures

    @cached_property
    def metrics(self) -> dict[str, float]:
        """Flat scalars ``{prefix}/{layer}/{quantity}`` of every layer (and attention and
        expert module)."""
        out: dict[str, float] = {}
        for result in self.results.values():
            out.update(result.metrics(self.prefix))
        out.update(attention_metrics(self.attention, self.prefix))
        out.update(routing_metrics(self.results, self.prefix))
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
            ANNOUNCER.once(
                "matplotlib",
                "lightning_conditioning: matplotlib is not installed, "
                "so no figures are logged (pip install matplotlib).",
            )
            return None
        return depth_profile_figure(self.table, step=self.step)

    @cached_property
    def tagged_figures(self) -> dict[str, Figure]:
        """Every figure of the window by its tag: the depth profile (``{prefix}/depth_profile``)
        and, per mixture-of-experts module, the spread over its experts
        (``{prefix}/{module}/experts``); empty when figures are off or cannot be drawn."""
        if self.figure is None:
            return {}
        out = {f"{self.prefix}/depth_profile": self.figure}
        for module, readings in routing_readings(self.results).items():
            out[f"{self.prefix}/{module}/experts"] = experts_figure(self.table, readings, module, step=self.step)
        return out

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
                    values[values > 0].log10().numpy()
                )
        return out

    def write_to(self, writer: Any, folder: str | Path | None, tag: Callable[[str], str] = str) -> None:
        """What TensorBoard stores besides the scalars, to ``writer`` (a ``SummaryWriter`` or
        anything with its ``add_histogram`` / ``add_figure``): with histograms on, the log10
        eigenvalue histograms (named ``tag(key)``, e.g. as a trainer prefixes its scalars) and
        the spectra file in ``folder`` (the run's event folder, read by the report); the
        depth-profile figure when figures are on. The one path of the Lightning TensorBoard
        sink, the Hugging Face Trainer's TensorBoard integration and a plain writer.

        Example:
            >>> import tempfile, torch
            >>> from lightning_conditioning.analysis.results import analyse_layer
            >>> from lightning_conditioning.maths.accumulate import LayerMoments
            >>> m = LayerMoments(torch.eye(3, dtype=torch.float64), None, 3, 0, torch.ones(3), torch.ones(3))
            >>> class Writer:
            ...     def add_histogram(self, tag, values, global_step): print(tag, len(values))
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     Publication({"fc": analyse_layer("fc", 0, m)}, 0, figures=False).write_to(Writer(), folder)
            ...     (Path(folder) / SPECTRA_FILENAME).is_file()
            conditioning/fc/input_log10_eigenvalues 3
            True
        """
        if self.histograms:
            for key, values in self.histogram_values.items():
                writer.add_histogram(tag(key), values, global_step=self.step)
            if folder is not None:
                append_records(Path(folder) / SPECTRA_FILENAME, self.records)
        for name, figure in self.tagged_figures.items():
            writer.add_figure(tag(name), figure, global_step=self.step, close=False)
