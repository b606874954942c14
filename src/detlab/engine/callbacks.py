"""Hydra callbacks: the end-of-sweep tally of completed, diverged and failed runs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


class SweepSummary(Callback):
    """Prints, when a multirun ends, how many runs completed, diverged, failed or stopped."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from detlab.report import format_counts, load_sweep

        sweep_dir = Path(config.hydra.sweep.dir)
        message = (f"sweep finished: {format_counts(load_sweep(sweep_dir))}. "
                   f"Report: python scripts/sweep_report.py {sweep_dir}")
        log.info(message)
        print(message, flush=True)
