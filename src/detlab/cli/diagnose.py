"""``detlab diagnose RUN_DIR_OR_FILE``: the failure diagnosis of a finished run, or of any training's
curves, as a report a person reads (or JSON).

    detlab diagnose outputs/2024-05-01/12-00-00            # a run folder: its own config and thresholds
    detlab diagnose outputs/.../12-00-00 --today           # ... judged with today's thresholds
    detlab diagnose results.csv                            # a CSV of losses and metrics (Ultralytics' too)
    detlab diagnose runs/exp1/events.out.tfevents.123      # TensorBoard events (a file or a folder)
    detlab diagnose run.csv --set diagnosis.stuck.min_drop=0.05 stages.early_end_fraction=0.2
    detlab diagnose run.csv --json

Which columns and tags are read, and how: ``detlab.diagnosis.offline``. Exit status: 0 when the
report was made (whatever it found), 2 with one line on stderr when the source or an override is
wrong (a missing path, an unreadable CSV, no recognised column).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from detlab.errors import EXIT_USER_ERROR, UserError, debug_requested, one_line


def build_parser(prog: str = "detlab diagnose") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Re-read a finished run's recorded signals (or a CSV / TensorBoard file of losses and metrics "
                    "from any training) and report the training failures they show.")
    parser.add_argument("source", metavar="RUN_DIR_OR_FILE", type=Path,
                        help="a run folder, a CSV file with a header, or a TensorBoard event file or folder")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                        help="config overrides, e.g. diagnosis.stuck.min_drop=0.05 stages.early_end_fraction=0.2")
    parser.add_argument("--today", action="store_true",
                        help="judge a run folder with today's thresholds (configs/diagnosis/default.yaml) "
                             "instead of those in its config.yaml")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def main(argv: Optional[list[str]] = None, prog: str = "detlab diagnose") -> int:
    try:
        args = build_parser(prog).parse_args(argv)
    except SystemExit as stop:  # --help (0) or a usage error (2, argparse's message printed)
        return stop.code if isinstance(stop.code, int) else EXIT_USER_ERROR
    from detlab.diagnosis.offline import diagnose_path, format_report, report_json  # after --help: slow imports

    try:
        report = diagnose_path(args.source, args.overrides, today=args.today)
    except (UserError, OSError) as error:
        if debug_requested() or not (isinstance(error, UserError) or getattr(error, "filename", None)):
            raise
        print(one_line(error), file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    print(report_json(report) if args.json else format_report(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
