"""Read a finished (or running) run back, tabulate, plot and diagnose it.

Entry point: ``python -m lightning_conditioning report RUN_DIR`` (:mod:`.cli`). Modules:
:mod:`.metrics` (logged keys ↔ layer tables), :mod:`.spectra_file` (the JSONL spectra
format), :mod:`.reader` (TensorBoard / CSV runs), :mod:`.figures` (matplotlib),
:mod:`.tables` (text table), :mod:`.deficiency` (κ_p that are not measurements). Key names
come from :mod:`lightning_conditioning.schema`. Only :mod:`.metrics` and :mod:`.spectra_file` are imported
here; the rest load on use.

Example::

    from lightning_conditioning.report.reader import load_run
    from lightning_conditioning.diagnosis import diagnose, format_findings

    run = load_run("lightning_logs/version_0")
    step = run.conditioning_steps()[-1]
    print(format_findings(diagnose(run.conditioning(step), run.domination(step)[0])))
"""

from lightning_conditioning.report.metrics import LayerTable, conditioning_table, split_metrics
from lightning_conditioning.report.spectra_file import SPECTRA_FILENAME, read_spectra

__all__ = ["LayerTable", "SPECTRA_FILENAME", "conditioning_table", "read_spectra", "split_metrics"]
