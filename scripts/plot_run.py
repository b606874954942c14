"""Learning curve of one run as a PNG: losses, and val recall / precision / mIoU / AP50 by epoch.

    python scripts/plot_run.py outputs/<date>/<time> [--out curve.png] [--title "..."]

Reads the run folder (``metrics.csv``, written by train.py each epoch, and the findings in
``summary.json``) and draws what a run writes into ``plots/curves.png`` when it ends
(``detlab.analysis.learning_curves_png``), e.g. for a run still going.
Writes ``<run>/plots/curves.png`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from detlab.analysis import learning_curves_png, load_run
from detlab.errors import UserError, report_user_errors
from detlab.run_record import RunPaths
from detlab.runtime.fileio import atomic_write_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--title", default=None)
    args = parser.parse_args()
    paths = RunPaths(args.run_dir)
    run = load_run(paths.root) if paths.root.is_dir() else None
    if run is None or not run.history:
        raise UserError(f"{paths.metrics}: no epoch yet (is {paths.root} a run directory written by train.py?)")
    out = args.out or paths.plots / "curves.png"
    atomic_write_bytes(out, learning_curves_png(run.history, args.title or str(paths.root), run.findings))
    print(f"written {out}")


if __name__ == "__main__":
    with report_user_errors():  # a bad argument, config value or file: one line, exit 2
        main()
