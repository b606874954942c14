#!/usr/bin/env python
"""Write the report of a sweep (report.md, report.csv, report.png) and print its table.

    python scripts/sweep_report.py multirun/2024-05-01/12-00-00 [--out reports/box_weight]

Works on a sweep that is still running: runs without summary.json are listed as running.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detlab.report import format_counts, load_sweep, markdown_table, report_table, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder holding one sub-folder per run")
    parser.add_argument("--out", type=Path, default=None, help="where to write the report (default: SWEEP_DIR)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: sweep directory not found: {args.sweep_dir}", file=sys.stderr)
        return 2

    runs = load_sweep(args.sweep_dir)
    paths = write_report(args.sweep_dir, args.out, runs=runs)
    print(format_counts(runs))
    print()
    print(markdown_table(report_table(runs)) if runs else "(no run directories found yet)")
    print()
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
