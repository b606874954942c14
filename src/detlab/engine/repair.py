"""The divergence repair (``diagnosis.divergence.rollback``, off by default): roll back and back off.

``Rollback`` keeps an in-memory copy of the last good state (model, optimiser, gradient scaler),
taken when training starts and at every epoch end with finite weights and no divergence. When the
diagnosis finds a divergence, ``restore`` puts that state back and multiplies the learning rate by
``lr_backoff`` for the rest of the run (``scale_learning_rate``); the step counter, the schedule's
position and the data order go on. After ``max_rollbacks`` repairs a divergence ends the run as
without the repair. The copies live on the model's device: a few MB for the default models.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch

from detlab.diagnosis import Divergence
from detlab.schedule import scale_learning_rate


@dataclass
class Snapshot:
    epoch: int  # epochs completed when it was taken
    step: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scaler: dict[str, Any]


class Rollback:
    def __init__(self, cfg: Divergence.Config) -> None:
        self.enabled = bool(cfg.rollback)
        self.lr_backoff = float(cfg.lr_backoff)
        self.max_rollbacks = int(cfg.max_rollbacks)
        self.rollbacks = 0
        self.snapshot: Optional[Snapshot] = None

    @property
    def available(self) -> bool:
        return self.enabled and self.snapshot is not None and self.rollbacks < self.max_rollbacks

    def take(self, epoch: int, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler) -> None:
        """Remember the current state as the last good one (only when the repair is on)."""
        if not self.enabled:
            return
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if not all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point()):
            return
        self.snapshot = Snapshot(epoch, step, weights, copy.deepcopy(optimizer.state_dict()),
                                 copy.deepcopy(scaler.state_dict()))

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler) -> str:
        """Put the last good state back and back the learning rate off; returns what was done."""
        assert self.snapshot is not None
        snap = self.snapshot
        rates = [group["lr"] for group in optimizer.param_groups]
        model.load_state_dict(snap.model)
        optimizer.load_state_dict(copy.deepcopy(snap.optimizer))
        for group, lr in zip(optimizer.param_groups, rates):  # the schedule's position is today's
            group["lr"] = lr
        scaler.load_state_dict(copy.deepcopy(snap.scaler))
        scale_learning_rate(optimizer, scheduler, self.lr_backoff)
        self.rollbacks += 1
        return (f"rolled back to the weights of epoch {snap.epoch} (step {snap.step}) and multiplied the learning "
                f"rate by {self.lr_backoff:g} (now {optimizer.param_groups[0]['lr']:.3g}); rollback "
                f"{self.rollbacks} of {self.max_rollbacks}")

    def state_dict(self) -> dict[str, int]:
        return {"rollbacks": self.rollbacks}

    def snapshot_state(self) -> Optional[dict[str, Any]]:
        """The last good state as plain types (a checkpoint written mid-epoch holds it: the epoch-end
        snapshot a resumed session would otherwise retake at a different point); None when off."""
        if not self.enabled or self.snapshot is None:
            return None
        snap = self.snapshot
        return {"epoch": snap.epoch, "step": snap.step, "model": snap.model, "optimizer": snap.optimizer,
                "scaler": snap.scaler}

    def load_snapshot(self, state: Optional[dict[str, Any]], device: torch.device) -> None:
        if not self.enabled or state is None:
            return
        model = {k: v.to(device) for k, v in state["model"].items()}
        self.snapshot = Snapshot(int(state["epoch"]), int(state["step"]), model, state["optimizer"], state["scaler"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rollbacks = int((state or {}).get("rollbacks", 0))
