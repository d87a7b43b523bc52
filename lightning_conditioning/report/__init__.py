"""Read a finished (or running) run back, tabulate, plot and diagnose it.

Entry point: ``python -m lightning_conditioning report RUN_DIR`` (:mod:`.cli`). Modules:
:mod:`.reader` (TensorBoard / CSV runs) and :mod:`.tables` (the text table). What the report
shares with the live run (layer tables, the spectra file, figures, the diagnosis) lives one
layer down, in :mod:`lightning_conditioning.views`; key names come from
:mod:`lightning_conditioning.schema`. The report reads; it never imports a callback.

Example::

    from lightning_conditioning.report.reader import load_run
    from lightning_conditioning.views.diagnosis import diagnose, format_findings

    run = load_run("lightning_logs/version_0")
    step = run.conditioning_steps()[-1]
    print(format_findings(diagnose(run.conditioning(step), run.domination(step)[0])))
"""

from lightning_conditioning.views.spectra_file import SPECTRA_FILENAME, read_spectra
from lightning_conditioning.views.tables import LayerTable, conditioning_table, split_metrics

__all__ = ["LayerTable", "SPECTRA_FILENAME", "conditioning_table", "read_spectra", "split_metrics"]
