"""Views of results shared by the live run and the report: pure readers, no Lightning.

* :mod:`.tables`: logged keys and results ↔ ``{layer: {quantity: value}}`` layer tables;
* :mod:`.spectra_file`: the JSONL spectra format (written by the sinks, read by the report);
* :mod:`.figures`: the paper's figures from layer tables (matplotlib, imported on use);
* :mod:`.diagnosis` and :mod:`.deficiency`: the paper's rules in words.

They sit above the maths and the capture and below the monitor, the callbacks, the sinks and
the report (``tests/repository/test_architecture.py`` checks the import graph).
"""
