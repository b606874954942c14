"""The one owner of "best": which epoch is the best so far (``best.pt``, ``summary.json``) and when
training stops for lack of improvement (``early_stopping.*``, like Lightning's ``EarlyStopping``)."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from detlab.config import EarlyStoppingConfig


def resolve_mode(monitor: str, mode: str = "auto") -> str:
    """``max`` or ``min``; ``auto`` is ``min`` for a loss (``val/loss_total``), ``max`` for a metric."""
    if mode != "auto":
        return mode
    return "min" if monitor.rsplit("/", 1)[-1].startswith("loss") else "max"


class EarlyStopping:
    """``update(epoch, row)`` after each validation: True when ``row[monitor]`` is a new best.

    An epoch improves when it beats the best by more than ``min_delta`` (a non-finite value never
    does); ``should_stop`` once ``patience`` epochs in a row did not (never with ``patience`` null).
    A row without the monitored key changes nothing.
    """

    def __init__(self, cfg: EarlyStoppingConfig) -> None:
        self.monitor = cfg.monitor
        self.mode = resolve_mode(cfg.monitor, cfg.mode)
        self.patience = cfg.patience
        self.min_delta = float(cfg.min_delta)
        self.best: Optional[float] = None
        self.best_epoch = 0
        self.bad_epochs = 0

    def is_better(self, value: float, than: Optional[float]) -> bool:
        if not math.isfinite(value):
            return False
        if than is None:
            return True
        return value > than + self.min_delta if self.mode == "max" else value < than - self.min_delta

    def update(self, epoch: int, row: Mapping[str, Any]) -> bool:
        if self.monitor not in row:
            return False
        value = float(row[self.monitor])
        if self.is_better(value, self.best):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def message(self) -> str:
        best = "none" if self.best is None else f"{self.best:.4g} at epoch {self.best_epoch}"
        return f"early stopping: {self.monitor} has not improved for {self.bad_epochs} epochs (best {best})"

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best = state.get("best")
        self.best_epoch = int(state.get("best_epoch", 0))
        self.bad_epochs = int(state.get("bad_epochs", 0))
