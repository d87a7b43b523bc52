"""Standalone 2-process DDP run (``strategy="ddp"`` re-launches this script for rank 1).

python tests/scripts/ddp_standalone.py OUT_DIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ddp_common import run  # noqa: E402

if __name__ == "__main__":
    run(Path(sys.argv[1]), strategy="ddp", devices=2)
