"""The published rule-based baselines of the diagnosis benchmark (benchmarks/diagnosis/baselines.py)
on synthetic traces with known answers: which rule fires, at which step, and whether the alarm lies
past the recorded steps of a run that diverged (extrapolated)."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pytest

from benchmarks.diagnosis.baselines import _NAN_STEP_KEYS, BASELINES, replay_all

SPE, N_EPOCHS = 250, 8  # synthetic runs: 8 epochs of 250 steps (SageMaker saves the losses at 0, 500, 1000, 1500)
TOTAL = SPE * N_EPOCHS


def synthetic(train: Sequence[float], val: Sequence[float], ap50: Sequence[float],
              step_loss: Optional[Callable[[int, int], float]] = None,
              stop_at: Optional[int] = None) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A run whose step losses are the epoch's train loss (or ``step_loss(step, epoch)``), recorded up
    to ``stop_at`` (a non-finite loss there ends it, as detlab does: no row for that epoch)."""
    steps, epochs = [], []
    for e in range(1, N_EPOCHS + 1):
        for s in range((e - 1) * SPE, e * SPE):
            if stop_at is not None and s > stop_at:
                return steps, epochs
            loss = step_loss(s, e) if step_loss else train[e - 1]
            rec = {"step": s, "epoch": e, "loss_total": loss, "loss_cls": 0.7 * loss, "loss_box": 0.3 * loss,
                   "lr": 0.01}
            if math.isfinite(loss):
                rec["grad_norm"] = 1.0 + 0.1 * loss
            if s % 50 == 0 and math.isfinite(loss):
                rec.update(grad_norm_cls=0.8, grad_norm_box=0.5)
            steps.append(rec)
            if stop_at is not None and s == stop_at:
                return steps, epochs
        epochs.append({"epoch": float(e), "step": float(e * SPE), "train/loss_total": train[e - 1],
                       "train/loss_cls": 0.7 * train[e - 1], "train/loss_box": 0.3 * train[e - 1],
                       "val/loss_total": val[e - 1], "val/loss_cls": 0.7 * val[e - 1],
                       "val/loss_box": 0.3 * val[e - 1], "val/ap50": ap50[e - 1], "val/recall": ap50[e - 1],
                       "val/precision": 0.8, "val/miou": 0.6, "val/fp": 10.0, "val/pred_per_image": 2.0})
    return steps, epochs


FALLING = [2.0 * 0.8 ** k + 0.2 for k in range(N_EPOCHS)]
RISING_AP = [0.30 + 0.08 * k for k in range(N_EPOCHS)]  # 0.30 .. 0.86


def _blowing_up(s: int, e: int) -> float:  # x1.2 per step from step 1000 (epoch 5), inf from step 1130
    return math.inf if s >= 1130 else FALLING[e - 1] * 1.2 ** max(0, s - 1000)


TRACES = {
    "healthy": synthetic(FALLING, [1.05 * v for v in FALLING], RISING_AP),
    "flat": synthetic([0.7] * N_EPOCHS, [0.75] * N_EPOCHS, [0.2] * N_EPOCHS),
    "slow_rise": synthetic([0.7 * 1.01 ** k for k in range(N_EPOCHS)], [0.75 * 0.95 ** k for k in range(N_EPOCHS)],
                           RISING_AP),
    # the loss explodes in epoch 5 (not a check epoch of AUTOTRAINER) and turns inf at step 1130
    "exploding": synthetic(FALLING, [1.05 * v for v in FALLING], RISING_AP, stop_at=1130, step_loss=_blowing_up),
    # a NaN loss at step 900, in epoch 4 (a check epoch of AUTOTRAINER)
    "nan_epoch4": synthetic(FALLING, [1.05 * v for v in FALLING], RISING_AP, stop_at=900,
                            step_loss=lambda s, e: math.nan if s >= 900 else FALLING[e - 1]),
    "finite_blowup": synthetic(FALLING, [1.05 * v for v in FALLING[:3]] + [2e5] * 5, RISING_AP),
    # the val loss follows train for 3 epochs, then rises while train keeps falling
    "overfit": synthetic(FALLING, [FALLING[0] * 1.02, FALLING[1] * 1.03, FALLING[2] * 1.05, 1.7, 1.8, 1.9, 2.0, 2.1],
                         RISING_AP),
    "oscillating": synthetic(FALLING, [1.05 * v for v in FALLING], [0.75, 0.85, 0.72, 0.86, 0.71, 0.87, 0.73, 0.88]),
}

# (trace, baseline, kwargs, expected (rule, step, extrapolated) or None)
CHECKS = [
    ("healthy", "sagemaker_loss_not_decreasing", {}, None),
    ("healthy", "sagemaker_overfit", {}, None),
    ("healthy", "lightning_early_stopping", {}, None),
    ("healthy", "autotrainer", {}, None),
    ("flat", "sagemaker_loss_not_decreasing", {}, ("loss_not_decreasing", 500, False)),
    ("flat", "autotrainer", {}, ("slow_convergence", 1000, False)),
    ("flat", "lightning_early_stopping", {}, ("patience", 1000, False)),
    ("slow_rise", "sagemaker_loss_not_decreasing", {}, None),
    ("slow_rise", "sagemaker_loss_not_decreasing", {"increase_threshold_percent": None},
     ("loss_not_decreasing", 500, False)),
    ("exploding", "lightning_early_stopping", {}, ("check_finite", 1250, True)),
    ("exploding", "autotrainer", {}, ("exploding_gradient", 1750, True)),
    ("exploding", "sagemaker_loss_not_decreasing", {}, ("loss_not_decreasing", 1500, True)),
    ("exploding", "sagemaker_overfit", {}, None),
    ("exploding", "lightning_early_stopping", {"extrapolate": False}, None),
    ("exploding", "autotrainer", {"extrapolate": False}, None),
    ("nan_epoch4", "autotrainer", {}, ("exploding_gradient", 1000, True)),
    ("nan_epoch4", "lightning_early_stopping", {}, ("check_finite", 1000, True)),
    ("finite_blowup", "autotrainer", {}, ("exploding_gradient", 1000, False)),
    ("finite_blowup", "lightning_early_stopping", {}, ("divergence_threshold", 1000, False)),
    ("overfit", "sagemaker_overfit", {}, ("overfit", 1000, False)),
    ("overfit", "lightning_early_stopping", {}, ("patience", 1500, False)),
    ("overfit", "autotrainer", {}, None),
    ("overfit", "sagemaker_loss_not_decreasing", {}, None),
    ("oscillating", "autotrainer", {}, ("oscillating_loss", 1000, False)),
]


@pytest.mark.parametrize("trace,baseline,kwargs,expected", CHECKS,
                         ids=[f"{t}-{b}{''.join(f'-{k}={v}' for k, v in kw.items())}" for t, b, kw, _ in CHECKS])
def test_baseline_rule_on_a_synthetic_trace(trace, baseline, kwargs, expected):
    steps, epochs = TRACES[trace]
    alarm = BASELINES[baseline](steps, epochs, TOTAL, **kwargs)
    assert (None if alarm is None else (alarm.rule, alarm.step, alarm.extrapolated)) == expected


def _junk_record() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    rng = np.random.default_rng(0)
    junk = [math.nan, math.inf, -math.inf, None, "NaN", 0.0, -1.0, 1e308]
    steps = [{"step": s, "epoch": 1 + s // 10, **{k: junk[int(rng.integers(len(junk)))] for k in _NAN_STEP_KEYS
                                                  if rng.random() < 0.8}} for s in range(60)]
    epochs = [{"epoch": e, "step": 10 * e, **{k: junk[int(rng.integers(len(junk)))]
                                             for k in ("train/loss_total", "val/loss_total", "val/ap50")
                                             if rng.random() < 0.8}} for e in range(1, 7)]
    return steps, epochs


JUNK_STEPS, JUNK_EPOCHS = _junk_record()


@pytest.mark.parametrize("steps,epochs,total", [
    (JUNK_STEPS, JUNK_EPOCHS, 60), ([], [], 0), (JUNK_STEPS, [], 100),
    ([*JUNK_STEPS, {"step": 60, "epoch": 7, "loss_total": math.nan}], JUNK_EPOCHS, 90),
], ids=["junk", "empty", "no_epochs", "junk_nan_last"])
@pytest.mark.parametrize("extrapolate", [True, False])
def test_every_baseline_runs_on_garbage_without_raising(steps, epochs, total, extrapolate):
    alarms = replay_all(steps, epochs, total, extrapolate=extrapolate)
    assert set(alarms) == set(BASELINES)
