"""Hydra callbacks: the end-of-sweep tally of completed, diverged and failed runs, and the report."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SweepSummary(Callback):
    """When a multirun ends: writes the sweep report (report.md, report.csv, report.png in the sweep
    folder) and prints how many runs completed, diverged, failed or stopped."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from detlab.analysis import format_counts, load_sweep, write_report

        sweep_dir = Path(config.hydra.sweep.dir)
        runs = load_sweep(sweep_dir)
        try:
            report = f"Report: {write_report(sweep_dir, runs=runs)['md']}"
        except Exception as error:  # the runs are done and recorded: a report that can't be drawn must not fail the sweep
            log.warning("sweep report not written: %s: %s", type(error).__name__, error)
            report = f"Report: detlab report {sweep_dir}"
        message = f"sweep finished: {format_counts(runs)}. {report}"
        log.info(message)
        print(message, flush=True)
