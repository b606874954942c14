"""The sweep report: ``report.md``, ``report.csv`` and ``report.png`` (the Figure-5 grid) of a sweep
folder, and its command (``scripts/sweep_report.py``). Works on a sweep that is still running.

    paths = write_report("multirun/2024-05-01/12-00-00")  # report.md, report.csv, report.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from detlab.analysis.figures import plot_sweep_grid, save_png
from detlab.analysis.runs import RunResult, load_sweep
from detlab.analysis.tables import format_counts, markdown_table, report_csv, report_markdown, report_table
from detlab.runtime.fileio import atomic_write_text


def write_report(sweep_dir: Path | str, out_dir: Path | str | None = None,
                 runs: Optional[Sequence[RunResult]] = None) -> dict[str, Path]:
    """Write report.md, report.csv and report.png (default: into the sweep folder).

    ``runs``: already loaded with ``load_sweep(sweep_dir)`` (saves reading the sweep twice).
    Returns ``{"md": path, "csv": path, "png": path}``. Works on a partial sweep.
    """
    sweep_dir = Path(sweep_dir)
    out_dir = Path(out_dir) if out_dir is not None else sweep_dir
    runs = load_sweep(sweep_dir) if runs is None else list(runs)
    paths = {"md": out_dir / "report.md", "csv": out_dir / "report.csv", "png": out_dir / "report.png"}
    atomic_write_text(paths["md"], report_markdown(sweep_dir, runs, figure_name=paths["png"].name))
    atomic_write_text(paths["csv"], report_csv(report_table(runs)))
    save_png(plot_sweep_grid(runs, title=f"{sweep_dir.name or sweep_dir}: {format_counts(runs)}"), paths["png"])
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python scripts/sweep_report.py SWEEP_DIR [--out DIR]``: write the report and print its table."""
    parser = argparse.ArgumentParser(prog="sweep_report.py",
                                     description="Write the report of a sweep (report.md, report.csv, report.png) "
                                                 "and print its table. Works on a sweep that is still running.")
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
