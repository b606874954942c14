#!/usr/bin/env python
"""Write the report of a sweep (report.md, report.csv, report.png) and print its table.

    python scripts/sweep_report.py multirun/2024-05-01/12-00-00 [--out reports/box_weight]
    detlab report multirun/2024-05-01/12-00-00 [--out reports/box_weight]   # the same

Works on a sweep that is still running: runs without summary.json are listed as running.
(The command is ``detlab.cli.report.main``.)
"""

import sys

from detlab.cli.report import main

if __name__ == "__main__":
    sys.exit(main(prog="sweep_report.py"))
