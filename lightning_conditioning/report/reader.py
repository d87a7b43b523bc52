"""Read a run back: TensorBoard event files or a CSV run, plus the spectra file.

Everything read is data (protobuf event records, CSV, JSON); nothing is unpickled. A run that
is still being written is read up to its last complete record. Problems become a
:class:`RunError` with a one-line message.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightning_conditioning import schema
from lightning_conditioning.views.spectra_file import SPECTRA_FILENAME, SpectraFormatError, read_spectra
from lightning_conditioning.views.tables import LayerTable, ordered, split_metrics

__all__ = ["RunError", "RunData", "find_run", "load_run"]

RunKind = Literal["tensorboard", "csv"]
_EVENTS = "events.out.tfevents."


class RunError(Exception):
    """A run directory that cannot be reported on (message: one line, for the user)."""


@dataclass
class RunData:
    """What a run holds: flat scalars per step, spectra records per step, layer order.

    Attributes:
        path: the run directory read.
        kind: ``"tensorboard"`` or ``"csv"``.
        scalars: ``{step: {logged key: value}}``.
        spectra: ``{step: {layer: spectra-file record}}`` (empty without a spectra file).
        layer_order: module order when known (spectra file, or first-seen TensorBoard tags).
    """

    path: Path
    kind: RunKind
    scalars: dict[int, dict[str, float]] = field(default_factory=dict)
    spectra: dict[int, dict[str, dict[str, Any]]] = field(default_factory=dict)
    layer_order: list[str] = field(default_factory=list)

    def conditioning_steps(self) -> list[int]:
        """Steps with conditioning scalars, ascending."""
        return sorted(s for s, m in self.scalars.items() if split_metrics(m).conditioning)

    def conditioning(self, step: int) -> LayerTable:
        """The conditioning layer table of ``step`` in module order, ``input_units`` and the
        sizes ``input_dim`` / ``grad_dim`` added from the spectra file when it has this step."""
        table = split_metrics(self.scalars.get(step, {})).conditioning
        records = self.spectra.get(step, {})
        for layer, row in table.items():
            record = records.get(layer, {})
            units = record.get("input_units")
            if isinstance(units, int) and units > 0:
                row["input_units"] = float(units)
            for moment in ("input", "grad"):
                eigenvalues = record.get(f"{moment}_eigenvalues")
                if isinstance(eigenvalues, list) and eigenvalues:
                    row[schema.dim_quantity(moment)] = float(len(eigenvalues))
        return {name: table[name] for name in ordered(table, self.layer_order)}

    def domination(self, step: int) -> tuple[LayerTable, float | None]:
        """The latest weight-domination table at or before ``step`` and its
        ``dominated_layers`` (empty, None when the run has none)."""
        for candidate in sorted((s for s in self.scalars if s <= step), reverse=True):
            split = split_metrics(self.scalars[candidate])
            if split.domination:
                names = ordered(split.domination, self.layer_order)
                return {n: split.domination[n] for n in names}, split.dominated_layers
        return {}, None

    def history(self) -> dict[int, LayerTable]:
        """``{step: conditioning table}`` over every conditioning step."""
        return {step: self.conditioning(step) for step in self.conditioning_steps()}

    def domination_history(self) -> dict[int, LayerTable]:
        """``{step: weight-domination table}`` over every step that has one."""
        out = {}
        for step in sorted(self.scalars):
            table = split_metrics(self.scalars[step]).domination
            if table:
                out[step] = {n: table[n] for n in ordered(table, self.layer_order)}
        return out


def _kind_of(folder: Path) -> RunKind | None:
    if any(p.name.startswith(_EVENTS) and p.is_file() for p in folder.iterdir()):
        return "tensorboard"
    if (folder / "metrics.csv").is_file():
        return "csv"
    return None


def find_run(path: str | Path, max_depth: int = 3) -> tuple[Path, RunKind]:
    """The run directory at or below ``path`` (one TensorBoard or CSV run) and its kind.

    Example::

        find_run("lightning_logs/version_0")   # -> (Path(...), "tensorboard")
    """
    root = Path(path)
    if not root.exists():
        raise RunError(f"{root}: no such directory")
    if not root.is_dir():
        raise RunError(f"{root}: not a directory (pass the run's log directory)")
    found: list[tuple[Path, RunKind]] = []
    level = [root]
    for _ in range(max_depth + 1):
        for folder in level:
            kind = _kind_of(folder)
            if kind is not None:
                found.append((folder, kind))
        if found:
            break
        level = sorted(p for folder in level for p in folder.iterdir() if p.is_dir())
    if not found:
        what = "is empty" if not any(root.iterdir()) else "holds no run"
        raise RunError(
            f"{root} {what}: no TensorBoard event file ({_EVENTS}*) or metrics.csv "
            "found; pass the log_dir of a TensorBoardLogger or CSVLogger run"
        )
    if len(found) > 1:
        names = ", ".join(str(p) for p, _ in found[:5])
        raise RunError(f"{root} holds {len(found)} runs; pass one of: {names}")
    return found[0]


def _read_tensorboard(folder: Path, data: RunData) -> None:
    logging.getLogger("tensorboard").setLevel(logging.ERROR)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    guidance = {"scalars": 0, "histograms": 1, "images": 1, "tensors": 1, "audio": 1, "compressedHistograms": 1}
    events = EventAccumulator(str(folder), size_guidance=guidance)
    try:
        events.Reload()
    except Exception as error:  # corrupt files: TensorBoard's reader raises various errors
        raise RunError(f"{folder}: cannot read the TensorBoard event files ({error})") from None
    tags = events.Tags().get("scalars", [])
    for tag in tags:
        for event in events.Scalars(tag):
            data.scalars.setdefault(int(event.step), {})[tag] = float(event.value)
    first_seen = split_metrics({tag: 0.0 for tag in tags})
    data.layer_order = list(first_seen.conditioning) + [
        n for n in first_seen.domination if n not in first_seen.conditioning
    ]


def _complete_lines(text: str) -> str:
    """Drop an unfinished last line (no newline yet)."""
    return text[: text.rfind("\n") + 1] if not text.endswith("\n") else text


def _read_csv(folder: Path, data: RunData) -> None:
    path = folder / "metrics.csv"
    try:
        text = _complete_lines(path.read_text(encoding="utf-8", errors="replace"))
    except OSError as error:
        raise RunError(f"{path}: cannot be read ({error.strerror})") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        raise RunError(
            f"{path} is empty (has the logger flushed yet? CSVLogger writes every "
            "flush_logs_every_n_steps steps and at the end)"
        )
    header = rows[0]
    if "step" not in header:
        raise RunError(f"{path}: no 'step' column: not a Lightning CSVLogger metrics file")
    step_index = header.index("step")
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            if number == len(rows):
                break  # a row being written
            raise RunError(f"{path}:{number}: {len(row)} fields, the header has {len(header)}")
        try:
            step = int(float(row[step_index]))
        except ValueError:
            continue
        values = data.scalars.setdefault(step, {})
        for key, cell in zip(header, row):
            if cell and key != "step":
                try:
                    value = float(cell)
                except ValueError:
                    continue
                if not math.isnan(value):
                    values[key] = value


def _read_spectra(folder: Path, data: RunData) -> None:
    path = folder / SPECTRA_FILENAME
    if not path.is_file():
        return
    try:
        records = read_spectra(path)
    except SpectraFormatError as error:
        raise RunError(str(error)) from None
    except OSError as error:
        raise RunError(f"{path}: cannot be read ({error.strerror})") from None
    for record in records:
        data.spectra.setdefault(record["step"], {})[record["layer"]] = record
    order = list(dict.fromkeys(r["layer"] for r in records))
    data.layer_order = order + [n for n in data.layer_order if n not in order]


def load_run(path: str | Path) -> RunData:
    """Find and read the run at or below ``path``.

    Raises :class:`RunError` (one-line message) for a missing, empty, foreign or unreadable
    run, or one without conditioning scalars.

    Example::

        run = load_run("logs/csv/version_0")
        table = run.conditioning(run.conditioning_steps()[-1])
    """
    folder, kind = find_run(path)
    data = RunData(path=folder, kind=kind)
    if kind == "tensorboard":
        _read_tensorboard(folder, data)
    else:
        _read_csv(folder, data)
    _read_spectra(folder, data)
    if not data.conditioning_steps():
        raise RunError(
            f"{folder}: no conditioning scalars (*/input_lambda_max, …) in this {kind} "
            "run: not written by ConditioningCallback, unreadable, or nothing logged yet"
        )
    return data
