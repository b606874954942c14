"""The published rule-based baselines of the diagnosis benchmark (benchmarks/diagnosis/baselines.py)
on synthetic traces with known answers: which rule fires, at which step, and whether the alarm lies
past the recorded steps of a run that diverged (extrapolated); at the tools' defaults and at the
settings the benchmark scales to its runs (``scaled_settings``), AUTOTRAINER's gradient rules on the
recorded gradient signals, and torchvision's non-finite-loss check."""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pytest

from benchmarks.diagnosis.baselines import _NAN_STEP_KEYS, BASELINES, replay_all, scaled_settings

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
    # above AUTOTRAINER's satisfied accuracy (0.7) from epoch 1, still rising by 0.02 an epoch
    "converged": synthetic(FALLING, [1.05 * v for v in FALLING], [0.72 + 0.02 * k for k in range(N_EPOCHS)]),
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
    ("converged", "autotrainer", {}, None),
    # torchvision's reference: the first non-finite step loss, nothing extrapolated
    ("healthy", "torchvision_nonfinite_loss", {}, None),
    ("flat", "torchvision_nonfinite_loss", {}, None),
    ("nan_epoch4", "torchvision_nonfinite_loss", {}, ("nonfinite_loss", 900, False)),
    ("exploding", "torchvision_nonfinite_loss", {}, ("nonfinite_loss", 1130, False)),
    ("finite_blowup", "torchvision_nonfinite_loss", {}, None),  # a huge but finite val loss: not its business
]


@pytest.mark.parametrize("trace,baseline,kwargs,expected", CHECKS,
                         ids=[f"{t}-{b}{''.join(f'-{k}={v}' for k, v in kw.items())}" for t, b, kw, _ in CHECKS])
def test_baseline_rule_on_a_synthetic_trace(trace, baseline, kwargs, expected):
    steps, epochs = TRACES[trace]
    alarm = BASELINES[baseline](steps, epochs, TOTAL, **kwargs)
    assert (None if alarm is None else (alarm.rule, alarm.step, alarm.extrapolated)) == expected


def with_gradients(trace: tuple[list, list], at_epoch: Optional[int] = None, **values: float) -> tuple[list, list]:
    """The trace with AUTOTRAINER's recorded gradient signals (``values``) on its sampled steps (those with
    ``grad_norm_cls``), from epoch ``at_epoch`` on (all when None)."""
    steps, epochs = trace
    out = [{**s, **values} if "grad_norm_cls" in s and (at_epoch is None or s["epoch"] >= at_epoch) else s
           for s in steps]
    return out, epochs


# AUTOTRAINER's gradient rules (checks at epochs 1, 4, 7; 8 planned epochs: judged from 2.4 on, so from the
# epoch-4 check at step 1000). They are reported only while "not converged" (max AP50 < Theta 0.7) or
# "slow convergence" holds, ahead of slow convergence.
GRADIENT_CHECKS = [
    ("flat", {"grad_zero_share": 0.8}, ("dying_relu", 1000)),
    ("flat", {"grad_dead_share": 0.8}, ("dying_relu", 1000)),  # a record without grad_zero_share
    ("flat", {"grad_zero_share": 0.69}, ("slow_convergence", 1000)),  # under gamma = 0.7
    ("flat", {"grad_norm_first_layer": 100.0, "grad_norm_last_layer": 1.0}, ("exploding_gradient", 1000)),
    ("flat", {"grad_norm_first_layer": 1e-6, "grad_norm_last_layer": 1.0}, ("vanishing_gradient", 1000)),
    ("flat", {"grad_norm_first_layer": 1e-6, "grad_norm_last_layer": 1e-4}, ("slow_convergence", 1000)),  # ratio 1e-2
    ("flat", {"grad_norm_first_layer": 0.0, "grad_norm_last_layer": 0.0}, ("slow_convergence", 1000)),  # 0/0 never compares
    # converged (AP50 >= Theta, rising): the gradient symptoms are not reported; not yet converged at the
    # epoch-4 check (healthy: AP50 0.30 .. 0.54 by then): they are
    ("converged", {"grad_zero_share": 0.9, "grad_norm_first_layer": 100.0, "grad_norm_last_layer": 1.0}, None),
    ("healthy", {"grad_zero_share": 0.9}, ("dying_relu", 1000)),
    ("healthy", {}, None),
    # a non-finite gradient is reported at any check, before the judgment point: epoch 1's, step 250
    ("healthy", {"grad_norm_first_layer": math.nan, "grad_norm_last_layer": 1.0}, ("exploding_gradient", 250)),
]


@pytest.mark.parametrize("trace,values,expected", GRADIENT_CHECKS,
                         ids=[f"{t}-{'-'.join(f'{k}={v}' for k, v in vals.items())}" for t, vals, _ in GRADIENT_CHECKS])
def test_autotrainer_gradient_rules_on_recorded_gradient_signals(trace, values, expected):
    steps, epochs = with_gradients(TRACES[trace], **values)
    alarm = BASELINES["autotrainer"](steps, epochs, TOTAL)
    assert (None if alarm is None else (alarm.rule, alarm.step)) == expected


def test_autotrainer_gradient_symptoms_are_sticky_from_the_sample_before_the_check():
    """A dead-gradient sample in epoch 2 only (no check there) still counts at the epoch-4 check: the
    features are counted at each check from the last sample at or before it, and kept."""
    steps, epochs = TRACES["flat"]
    steps = [{**s, "grad_zero_share": 0.9 if s["epoch"] == 1 and s["step"] == 200 else 0.0}
             if "grad_norm_cls" in s else s for s in steps]
    assert (BASELINES["autotrainer"](steps, epochs, TOTAL).rule) == "dying_relu"  # counted at the epoch-1 check
    steps = [{**s, "grad_zero_share": 0.9 if s["epoch"] == 2 else 0.0} if "grad_norm_cls" in s else s
             for s in TRACES["flat"][0]]
    assert BASELINES["autotrainer"](steps, epochs, TOTAL).rule == "slow_convergence"  # epoch 2's samples: no check


# ------------------------------------------------------------------ scaled to the benchmark's runs
def short_run(n_epochs: int, spe: int, step_loss: Callable[[int], float], val: Sequence[float],
              ap50: Sequence[float]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A run of ``n_epochs`` x ``spe`` steps with per-step losses ``step_loss(step)``."""
    steps = [{"step": s, "epoch": s // spe + 1, "loss_total": step_loss(s), "lr": 0.01, "grad_norm": 1.0}
             for s in range(n_epochs * spe)]
    epochs = [{"epoch": e, "step": e * spe, "train/loss_total": step_loss(e * spe - 1), "val/loss_total": val[e - 1],
               "val/ap50": ap50[e - 1]} for e in range(1, n_epochs + 1)]
    return steps, epochs


@pytest.mark.parametrize("total,interval,num_steps", [(375, 19, 10), (100, 5, 5), (2000, 100, 10), (500, 25, 10)])
def test_sagemaker_saves_every_twentieth_of_the_run(total, interval, num_steps):
    settings = scaled_settings(total)
    assert settings["sagemaker_loss_not_decreasing"] == {"save_interval": interval, "num_steps": num_steps}
    # the others keep their tools' defaults: patience 3 validations, AUTOTRAINER's 3-epoch period, every step
    assert settings["lightning_early_stopping"] == settings["autotrainer"] == settings["torchvision_nonfinite_loss"] == {}


def test_sagemaker_at_its_default_interval_sees_step_0_only_of_a_375_step_run():
    flat = short_run(15, 25, lambda s: 0.7, [0.75] * 15, [0.2] * 15)
    fn = BASELINES["sagemaker_loss_not_decreasing"]
    assert fn(*flat, 375) is None  # saved: step 0 alone, nothing to compare
    alarm = fn(*flat, 375, **scaled_settings(375)["sagemaker_loss_not_decreasing"])
    assert (alarm.rule, alarm.step) == ("loss_not_decreasing", 19)  # saves 0, 19, ...: 19 vs 0, flat
    falling = short_run(15, 25, lambda s: 2.0 * 0.99 ** s, [1.0] * 15, [0.2] * 15)  # -17% every 19 steps
    assert fn(*falling, 375, **scaled_settings(375)["sagemaker_loss_not_decreasing"]) is None
    # a noisy healthy loss: the single-batch loss of step 152 is 10% above step 133's (> 5%): the rule fires
    noisy = short_run(15, 25, lambda s: 2.0 * 0.995 ** s * (1.3 if s == 152 else 1.0), [1.0] * 15, [0.2] * 15)
    alarm = fn(*noisy, 375, **scaled_settings(375)["sagemaker_loss_not_decreasing"])
    assert (alarm.rule, alarm.step) == ("loss_not_decreasing", 152)


def test_lightning_counts_its_patience_in_validations():
    """6 validations (the spec's shortest runs): best at the 2nd, no improvement at the 3rd, 4th and 5th:
    stopped at the 5th validation, step 5 x 25, at the defaults and at the scaled settings alike."""
    run = short_run(6, 25, lambda s: 1.0, [1.0, 0.9, 0.95, 0.96, 0.97, 0.98], [0.1] * 6)
    fn = BASELINES["lightning_early_stopping"]
    for kwargs in ({}, scaled_settings(150)["lightning_early_stopping"]):
        alarm = fn(*run, 150, **kwargs)
        assert (alarm.rule, alarm.step) == ("patience", 125)
    three = short_run(3, 25, lambda s: 1.0, [1.0, 1.0, 1.0], [0.1] * 3)
    assert fn(*three, 75) is None  # 3 validations: patience 3 can never run out


@pytest.mark.parametrize("n_epochs,expected_step", [(3, 25), (6, 100), (15, 175), (20, 175), (40, 325)])
def test_autotrainer_judges_slow_convergence_at_its_own_period(n_epochs, expected_step):
    """Checks at epochs 1, 4, 7, ...; judged once the history holds 30% of the planned epochs. A 3-epoch run
    is judged at epoch 1 on one point (whose largest rise is 0: "slow convergence" by construction), which
    is why the spec's runs have at least 6 epochs: then the first judged check has 4 points or more."""
    flat = short_run(n_epochs, 25, lambda s: 0.7, [0.75] * n_epochs, [0.2] * n_epochs)
    alarm = BASELINES["autotrainer"](*flat, n_epochs * 25)
    assert (alarm.rule, alarm.step) == ("slow_convergence", expected_step)


def test_replay_all_scaled_uses_the_scaled_settings():
    flat = short_run(15, 25, lambda s: 0.7, [0.75] * 15, [0.2] * 15)
    assert replay_all(*flat, 375)["sagemaker_loss_not_decreasing"] is None
    assert replay_all(*flat, 375, scaled=True)["sagemaker_loss_not_decreasing"].step == 19


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
