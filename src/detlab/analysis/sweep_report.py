"""The sweep report: ``report.md``, ``report.csv`` and ``report.png`` (the Figure-5 grid) of a sweep
folder. Works on a sweep that is still running. Its command is ``detlab report`` (``detlab.cli.report``;
``scripts/sweep_report.py``).

    paths = write_report("multirun/2024-05-01/12-00-00")  # report.md, report.csv, report.png
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from detlab.analysis.figures import plot_sweep_grid, save_png
from detlab.analysis.runs import RunResult, load_sweep
from detlab.analysis.tables import format_counts, report_csv, report_markdown, report_table
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
