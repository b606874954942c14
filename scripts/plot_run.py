"""Learning curve of one run as a PNG: losses, and val recall / precision / mIoU / AP50 by epoch.

    python scripts/plot_run.py outputs/<date>/<time> [--out curve.png] [--title "..."]

Reads the run's ``metrics.csv`` (written by train.py each epoch) and draws what a run writes into
``plots/curves.png`` when it ends (``detlab.engine.pictures.curves_png``), e.g. for a run still going.
Writes ``<run>/plots/curves.png`` unless ``--out`` says otherwise.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from detlab.engine.pictures import curves_png
from detlab.errors import UserError, report_user_errors
from detlab.runtime.fileio import atomic_write_bytes
from detlab.report import read_metrics_csv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--title", default=None)
    args = parser.parse_args()
    rows = read_metrics_csv(args.run_dir / "metrics.csv")
    if not rows:
        raise UserError(f"{args.run_dir / 'metrics.csv'}: no epoch yet (is {args.run_dir} a run directory "
                        f"written by train.py?)")
    out = args.out or args.run_dir / "plots" / "curves.png"
    atomic_write_bytes(out, curves_png(rows, args.title or str(args.run_dir)))
    print(f"written {out}")


if __name__ == "__main__":
    with report_user_errors():  # a bad argument, config value or file: one line, exit 2
        main()
