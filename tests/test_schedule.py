import math

import pytest
import torch

from detlab.config import ScheduleConfig, StageConfig
from detlab.schedule import build_scheduler, stage_boundaries, warmup_steps


def _lrs(cfg: ScheduleConfig, total: int, steps_per_epoch: int = 10, lr: float = 0.1) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    sched = build_scheduler(opt, cfg, total, steps_per_epoch)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_linear_warmup_then_constant():
    cfg = ScheduleConfig(warmup=True, warmup_steps=4, warmup_start_factor=0.2, after_warmup="constant")
    lrs = _lrs(cfg, total=8)
    # LinearLR: factor goes 0.2 -> 1.0 in 4 steps: 0.2, 0.4, 0.6, 0.8, then 1.0.
    assert lrs == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1, 0.1, 0.1, 0.1])


def test_warmup_epochs_convert_to_steps():
    assert warmup_steps(ScheduleConfig(warmup=True, warmup_epochs=1.5), steps_per_epoch=10) == 15
    assert warmup_steps(ScheduleConfig(warmup=False, warmup_epochs=1.5), steps_per_epoch=10) == 0


def test_cosine_after_warmup_reaches_floor():
    cfg = ScheduleConfig(warmup=True, warmup_steps=2, warmup_start_factor=0.5, after_warmup="cosine",
                         min_lr_factor=0.0)
    lrs = _lrs(cfg, total=6)
    # warm-up 0.05, 0.075; cosine over 4 steps: 0.1 * (1 + cos(pi * k / 4)) / 2, k = 0..3
    expected = [0.05, 0.075] + [0.1 * (1 + math.cos(math.pi * k / 4)) / 2 for k in range(4)]
    assert lrs == pytest.approx(expected)


def test_multistep_without_warmup():
    cfg = ScheduleConfig(warmup=False, after_warmup="multistep", milestones=[0.5, 0.75], gamma=0.1)
    lrs = _lrs(cfg, total=8)
    assert lrs == pytest.approx([0.1] * 4 + [0.01] * 2 + [0.001] * 2)


def test_stage_boundaries_default_to_warmup_and_last_30_percent():
    sched = ScheduleConfig(warmup=True, warmup_epochs=1)
    bounds = stage_boundaries(StageConfig(), sched, total_steps=100, steps_per_epoch=5)
    assert (bounds.early_end, bounds.late_start) == (5, 70)
    assert [bounds.stage(s) for s in (0, 4, 5, 69, 70, 99)] == ["early", "early", "mid", "mid", "late", "late"]
    no_warmup = stage_boundaries(StageConfig(), ScheduleConfig(warmup=False), 100, 5)
    assert no_warmup.early_end == 10
    explicit = stage_boundaries(StageConfig(early_end_fraction=0.2, late_start_fraction=0.5), sched, 100, 5)
    assert (explicit.early_end, explicit.late_start) == (20, 50)
