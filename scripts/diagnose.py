"""``python scripts/diagnose.py RUN_DIR_OR_FILE [--set key=value ...] [--today] [--json]``: the same as
``detlab diagnose`` (``detlab.cli.diagnose``): the failure diagnosis of a finished run, or of a CSV or
TensorBoard file of losses and metrics from any training."""

from __future__ import annotations

import sys

from detlab.cli.diagnose import main

if __name__ == "__main__":
    sys.exit(main(prog="diagnose.py"))
