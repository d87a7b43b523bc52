"""``python -m lightning_conditioning`` (also the ``lightning-conditioning`` console script).

Example::

    python -m lightning_conditioning --version
    python -m lightning_conditioning report lightning_logs/version_0 --step 100 --out figures
"""

from lightning_conditioning.report.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
