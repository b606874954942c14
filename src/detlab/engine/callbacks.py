"""Hydra callbacks: the end-of-sweep tally of completed, diverged and failed runs."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

log = logging.getLogger(__name__)


def count_statuses(sweep_dir: Path) -> Counter:
    """Count run statuses from every ``summary.json`` below ``sweep_dir`` (missing: still running)."""
    counts: Counter = Counter()
    for summary_path in sorted(Path(sweep_dir).rglob("summary.json")):
        try:
            counts[json.loads(summary_path.read_text()).get("status", "unknown")] += 1
        except (OSError, json.JSONDecodeError):
            counts["unreadable"] += 1
    return counts


class SweepSummary(Callback):
    """Prints, when a multirun ends, how many runs completed, diverged, failed or stopped."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        counts = count_statuses(sweep_dir)
        total = sum(counts.values())
        parts = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("completed", "diverged", "failed", "stopped"))
        others = {k: v for k, v in counts.items() if k not in ("completed", "diverged", "failed", "stopped")}
        extra = "".join(f", {v} {k}" for k, v in others.items())
        message = f"sweep finished: {total} runs: {parts}{extra}. Report: python scripts/sweep_report.py {sweep_dir}"
        log.info(message)
        print(message, flush=True)
