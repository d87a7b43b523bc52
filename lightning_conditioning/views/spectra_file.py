"""The spectra file: full eigenvalue spectra of every analysed (step, layer), as JSON lines.

``conditioning_spectra.jsonl`` in the logger's ``log_dir`` (TensorBoard and CSV runs; MLflow
gets one file per step as an artifact). Data only (JSON), appendable, and readable while the
run is still writing it: a last line without its newline is ignored.

Line 1 is the header ``{"format": "lightning-conditioning/spectra", "version": 1}``; every
further line is one record::

    {"step": 0, "layer": "net.0", "prefix": "conditioning", "status": "ok",
     "input_units": 12, "input_rows": 64, "grad_rows": 64,
     "dead_input_units": 0, "full_input_units": 3, "rank_rtol": 2.4e-12,
     "input_rank": 12, "input_floor_rtol": 2.4e-12, "input_structural_rank": 12,
     "grad_rank": 15, "grad_floor_rtol": 4.2e-12, "grad_structural_rank": 16,
     "input_eigenvalues": [3.2, 1.1, ...], "grad_eigenvalues": [...]}

Per matrix: ``{m}_rank`` (eigenvalues above the floor), ``{m}_floor_rtol`` (that resolution
floor relative to λmax) and ``{m}_structural_rank`` (eigenvalues that can be nonzero at all:
the size less dead units and the zeros of fewer rows than dimensions); ``rank_rtol`` (the
input's floor) is kept for readers of the first files, which had one floor per record.

Eigenvalues are the full spectra (descending, tiny negative round-off included) rounded to 9
significant digits (the eigenvalues above each moment's floor are accurate to ~3 digits or better); ``null``
when missing (status ``no_grad`` / ``no_data`` / ``nonfinite``). Size: about 15 bytes per
eigenvalue, i.e. ``(d_in + d_out) × 15`` bytes per layer per analysed step.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lightning_conditioning import schema

__all__ = [
    "SPECTRA_FILENAME",
    "SPECTRA_FORMAT",
    "SPECTRA_VERSION",
    "SpectraFormatError",
    "spectrum_records",
    "append_records",
    "read_spectra",
]

SPECTRA_FILENAME = "conditioning_spectra.jsonl"
SPECTRA_FORMAT = "lightning-conditioning/spectra"
SPECTRA_VERSION = 1
_HEADER = {"format": SPECTRA_FORMAT, "version": SPECTRA_VERSION}


class SpectraFormatError(ValueError):
    """The file is not a spectra file, or a complete line of it is malformed."""


def _rounded(values: Any) -> list[float] | None:
    if values is None:
        return None
    return [float(f"{float(v):.9g}") for v in values.tolist()]


def _moment_fields(moment: str, summary: Any) -> dict[str, Any]:
    """Rank, floor, structural rank and eigenvalues of one moment (``None`` when missing)."""
    present = summary is not None
    return {
        schema.rank_quantity(moment): int(summary.rank) if present else None,
        schema.record_field(moment, "floor_rtol"): float(summary.rtol) if present else None,
        schema.record_field(moment, "structural_rank"): int(summary.structural_rank) if present else None,
        schema.record_field(moment, "eigenvalues"): _rounded(summary.eigenvalues) if present else None,
    }


def spectrum_records(results: Mapping[str, Any], prefix: str = "conditioning") -> list[dict[str, Any]]:
    """One JSON-ready record per layer of ``ConditioningCallback.results`` (module order).

    Example:
        >>> import torch
        >>> from lightning_conditioning.maths.accumulate import LayerMoments
        >>> from lightning_conditioning.analysis.results import analyse_layer
        >>> eye = torch.eye(2, dtype=torch.float64)
        >>> result = analyse_layer("fc", 0, LayerMoments(eye, 4 * eye, 8, 8,
        ...                        torch.tensor([3.0, 0.0]), torch.zeros(2)))
        >>> record = spectrum_records({"fc": result})[0]
        >>> record["layer"], record["input_eigenvalues"], record["dead_input_units"]
        ('fc', [1.0, 1.0], 1)
        >>> record["input_rank"], record["grad_structural_rank"], record["rank_rtol"] == record["input_floor_rtol"] > 0
        (2, 2, True)
    """
    records = []
    for name, result in results.items():
        ok = result.status in ("ok", "no_grad")
        summaries = {"input": result.input if ok else None, "grad": result.grad if ok else None}
        record: dict[str, Any] = {
            "step": int(result.step),
            "layer": name,
            "prefix": prefix,
            "status": result.status,
            "input_units": int(result.input_units),
            "input_rows": int(result.input_rows),
            "grad_rows": int(result.grad_rows),
            "dead_input_units": result.dead_input_units if ok else None,
            "full_input_units": result.full_input_units if ok else None,
            "unused_rows": result.unused_rows if ok else None,
        }
        record["rank_rtol"] = summaries["input"].rtol if summaries["input"] is not None else None
        for label, summary in summaries.items():
            record.update(_moment_fields(label, summary))
        records.append(record)
    return records


def append_records(path: str | Path, records: Iterable[Mapping[str, Any]]) -> Path:
    """Append records to the spectra file at ``path`` (header first when the file is new).

    Each line is written whole, so a reader never sees half a record except at the very end.

    Example::

        append_records(Path(logger.log_dir) / SPECTRA_FILENAME, spectrum_records(results))
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [] if path.exists() and path.stat().st_size > 0 else [json.dumps(_HEADER)]
    lines += [json.dumps(record, allow_nan=False, separators=(",", ":")) for record in records]
    with path.open("a", encoding="utf-8") as handle:
        handle.write("".join(line + "\n" for line in lines))
    return path


def _check_record(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, dict) or not isinstance(record.get("layer"), str):
        raise SpectraFormatError(f"{where}: not a spectra record")
    if not isinstance(record.get("step"), int) or isinstance(record.get("step"), bool):
        raise SpectraFormatError(f"{where}: 'step' is not an integer")
    for label in ("input", "grad"):
        values = record.get(f"{label}_eigenvalues")
        if values is not None and not (
            isinstance(values, list) and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
        ):
            raise SpectraFormatError(f"{where}: '{label}_eigenvalues' is not a list of numbers")
    return record


def read_spectra(path: str | Path) -> list[dict[str, Any]]:
    """All complete records of a spectra file, in file order.

    A last line without its newline (the run is still writing it) is ignored. Raises
    :class:`SpectraFormatError` for a file that is not a spectra file or holds a malformed
    complete line, and :class:`OSError` when it cannot be read.

    Example:
        >>> import tempfile, os
        >>> folder = tempfile.mkdtemp()
        >>> path = append_records(os.path.join(folder, SPECTRA_FILENAME),
        ...                       [{"step": 0, "layer": "fc", "input_eigenvalues": [2.0]}])
        >>> with open(path, "a") as f:
        ...     _ = f.write('{"step": 1, "lay')           # a record being written
        >>> [(r["step"], r["layer"]) for r in read_spectra(path)]
        [(0, 'fc')]
    """
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    complete = text.split("\n")[:-1]  # the part after the last newline is unfinished
    if not complete:
        return []
    try:
        header = json.loads(complete[0])
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != SPECTRA_FORMAT:
        raise SpectraFormatError(f"{path}: not a {SPECTRA_FORMAT} file (bad first line)")
    if header.get("version") != SPECTRA_VERSION:
        raise SpectraFormatError(f"{path}: unsupported spectra file version {header.get('version')!r}")
    records = []
    for number, line in enumerate(complete[1:], start=2):
        if not line.strip() or line.startswith('{"format"'):
            continue  # blank line, or the header of an appended run
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise SpectraFormatError(f"{path}:{number}: invalid JSON ({error.msg})") from None
        records.append(_check_record(record, f"{path}:{number}"))
    return records
