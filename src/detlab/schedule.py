"""Learning-rate schedule (per optimiser step) and the early / mid / late stage boundaries."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import (
    ConstantLR,
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    MultiStepLR,
    SequentialLR,
)

from detlab.config import ScheduleConfig, StageConfig


def warmup_steps(cfg: ScheduleConfig, steps_per_epoch: int) -> int:
    """Number of optimiser steps of linear warm-up (0 when warm-up is off)."""
    if not cfg.warmup:
        return 0
    if cfg.warmup_steps is not None:
        return int(cfg.warmup_steps)
    return int(round(cfg.warmup_epochs * steps_per_epoch))


def _after_warmup(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps: int) -> LRScheduler:
    steps = max(steps, 1)
    if cfg.after_warmup == "constant":
        return ConstantLR(optimizer, factor=1.0, total_iters=0)
    if cfg.after_warmup == "multistep":
        # Milestones are fractions of the post-warm-up steps, so they scale with the run length.
        milestones = sorted({max(1, int(round(f * steps))) for f in cfg.milestones})
        return MultiStepLR(optimizer, milestones=milestones, gamma=cfg.gamma)
    if cfg.after_warmup == "cosine":
        base_lr = optimizer.param_groups[0]["lr"]
        return CosineAnnealingLR(optimizer, T_max=steps, eta_min=base_lr * cfg.min_lr_factor)
    raise ValueError(f"unknown schedule.after_warmup: {cfg.after_warmup!r}")


def warmup_end(cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> int:
    """The first step at the learning rate the warm-up ramps to (0 without a warm-up): the warm-up's
    steps, clamped to the run as ``build_scheduler`` clamps them."""
    return min(warmup_steps(cfg, steps_per_epoch), max(total_steps - 1, 0))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int
) -> LRScheduler:
    """Linear warm-up from ``lr * warmup_start_factor`` to ``lr``, then constant, multistep or cosine.

    Stepped once per optimiser step. Built from ``torch.optim.lr_scheduler`` parts so its state
    dict round-trips through checkpoints.
    """
    n_warm = warmup_end(cfg, total_steps, steps_per_epoch)
    main = _after_warmup(optimizer, cfg, total_steps - n_warm)
    if n_warm == 0:
        return main
    # LinearLR reaches factor 1.0 after total_iters steps; SequentialLR hands over at n_warm.
    warm = LinearLR(optimizer, start_factor=cfg.warmup_start_factor, end_factor=1.0, total_iters=n_warm)
    return SequentialLR(optimizer, schedulers=[warm, main], milestones=[n_warm])


def planned_learning_rates(cfg: ScheduleConfig, lr: float, total_steps: int, steps_per_epoch: int) -> list[float]:
    """The learning rate of each of a run's ``total_steps`` optimiser steps, then the one after its
    last step: ``build_scheduler``'s schedule, built and stepped on an optimiser of its own (one
    scalar parameter), so the run's optimiser and scheduler are left as they are."""
    parameter = torch.nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.SGD([parameter], lr=lr)
    scheduler = build_scheduler(optimizer, cfg, total_steps, steps_per_epoch)
    rates = []
    for _ in range(total_steps):
        rates.append(float(optimizer.param_groups[0]["lr"]))
        optimizer.step()  # no gradient: changes nothing, and keeps the scheduler's order check quiet
        scheduler.step()
    rates.append(float(optimizer.param_groups[0]["lr"]))
    return rates


def expected_final_lr(cfg: ScheduleConfig, lr: float) -> tuple[float, str]:
    """Where the schedule should end (the rate after the last step), and why in words."""
    if cfg.after_warmup == "cosine":
        return lr * cfg.min_lr_factor, f"cosine ends at optim.lr x schedule.min_lr_factor ({cfg.min_lr_factor:g})"
    if cfg.after_warmup == "multistep":
        count = len(cfg.milestones)
        return lr * cfg.gamma ** count, (f"multistep ends at optim.lr x schedule.gamma ({cfg.gamma:g}) to the power of its "
                                         f"{count} milestones")
    return lr, "constant ends at optim.lr"


@dataclass(frozen=True)
class StageBoundaries:
    """Steps ``[0, early_end)`` are early, ``[early_end, late_start)`` mid, ``[late_start, total)`` late.
    ``warmup_end``: the first step after the learning-rate warm-up (0: none), which the diagnosis reads
    (a warm-up's low rate is not judged as a stall)."""

    early_end: int
    late_start: int
    warmup_end: int = 0

    def stage(self, step: int) -> str:
        if step < self.early_end:
            return "early"
        if step < self.late_start:
            return "mid"
        return "late"


def stage_boundaries(
    stages: StageConfig, schedule: ScheduleConfig, total_steps: int, steps_per_epoch: int
) -> StageBoundaries:
    """By default the early stage is the warm-up (10% of the steps without one); late is the last 30%.
    The warm-up's end comes with them."""
    if stages.early_end_fraction is not None:
        early_end = int(round(stages.early_end_fraction * total_steps))
    else:
        early_end = warmup_steps(schedule, steps_per_epoch) or int(round(0.1 * total_steps))
    late_start = int(round(stages.late_start_fraction * total_steps))
    early_end = max(1, min(early_end, late_start))
    return StageBoundaries(early_end=early_end, late_start=max(early_end, late_start),
                           warmup_end=warmup_end(schedule, total_steps, steps_per_epoch))
