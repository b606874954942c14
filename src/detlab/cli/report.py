"""``detlab report SWEEP_DIR [--out DIR]``: write the report of a sweep (report.md, report.csv,
report.png) and print its table (``python scripts/sweep_report.py ...`` runs the same).

Works on a sweep that is still running: runs without summary.json are listed as running. The work is
done by ``detlab.analysis`` (``load_sweep``, ``write_report``).

Examples:
    detlab report multirun/2024-05-01/12-00-00
    detlab report multirun/2024-05-01/12-00-00 --out reports/box_weight
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detlab.analysis.runs import load_sweep
from detlab.analysis.sweep_report import write_report
from detlab.analysis.tables import format_counts, markdown_table, report_table
from detlab.errors import EXIT_USER_ERROR


def main(argv: list[str] | None = None, prog: str = "detlab report") -> int:
    """``detlab report SWEEP_DIR [--out DIR]`` (``argv``: the arguments after ``report``; default: this
    process's): write the report and print its table. Returns the exit status (2: no such folder)."""
    parser = argparse.ArgumentParser(prog=prog,
                                     description="Write the report of a sweep (report.md, report.csv, report.png) "
                                                 "and print its table. Works on a sweep that is still running.")
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder holding one sub-folder per run")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: SWEEP_DIR)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2, argparse's message printed)
        return stop.code if isinstance(stop.code, int) else EXIT_USER_ERROR
    if not args.sweep_dir.is_dir():
        print(f"error: sweep directory not found: {args.sweep_dir}", file=sys.stderr)
        return EXIT_USER_ERROR

    runs = load_sweep(args.sweep_dir)
    paths = write_report(args.sweep_dir, args.out, runs=runs)
    print(format_counts(runs))
    print()
    print(markdown_table(report_table(runs)) if runs else "(no run directories found yet)")
    print()
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0
