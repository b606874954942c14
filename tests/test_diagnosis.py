"""Diagnosis: synthetic signal traces that must (and must not) trigger each detector; interventions."""

from __future__ import annotations

import io
import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from detlab.config import AdaptiveWeightsConfig, Config, ConfigError, DiagnosisConfig, validate
from detlab.diagnosis import (
    DETECTORS,
    Diagnoser,
    Finding,
    LossWeightSchedule,
    is_finite_loss,
    loss_term_grad_norms,
)

ROOT = Path(__file__).resolve().parents[1]

# Default geometry: 10 epochs of 100 steps, early stage = epoch 1, late stage from step 700 (epoch 8).
TOTAL, SPE, EARLY_END, LATE_START = 1000, 100, 100, 700

StepFn = Callable[[int], dict]
EpochFn = Callable[[int], dict]


def make(total: int = TOTAL, spe: int = SPE, early_end: int = EARLY_END, late_start: int = LATE_START,
         **overrides) -> Diagnoser:
    return Diagnoser(replace(DiagnosisConfig(), **overrides), total, spe, early_end, late_start)


def healthy_step(total: int = TOTAL) -> StepFn:
    """Losses fall smoothly (with a little deterministic jitter); steady grad norms, ratio 2."""
    tau = total / 5

    def fn(s: int) -> dict:
        jitter = 1.0 + 0.02 * math.sin(1.7 * s)
        cls = (3.0 * math.exp(-s / tau) + 0.6) * jitter
        box = (2.0 * math.exp(-s / tau) + 0.4) * jitter
        sig = {"loss_cls": cls, "loss_box": box, "loss_total": cls + box, "lr": 0.01, "num_pos": 40.0,
               "grad_norm": 4.0 + math.sin(0.3 * s)}
        if s % 50 == 0:
            sig.update(grad_norm_cls=1.0 + 0.1 * math.sin(s), grad_norm_box=2.0)
        return sig

    return fn


def healthy_epoch(e: int) -> dict:
    """Train and val losses fall, mIoU / recall rise, predictions steady, FPs fall."""
    return {
        "train/loss_cls": 1.0 + 2.0 * math.exp(-e / 2), "train/loss_box": 0.5 + math.exp(-e / 2),
        "train/loss_total": 1.5 + 3.0 * math.exp(-e / 2),
        "val/loss_cls": 1.2 + 2.0 * math.exp(-e / 2), "val/loss_box": 0.6 + math.exp(-e / 2),
        "val/loss_total": 1.8 + 3.0 * math.exp(-e / 2),
        "val/miou": 0.5 - 0.4 * math.exp(-e / 3), "val/tp": 100 - 80 * math.exp(-e / 3),
        "val/fp": 20 + 30 * math.exp(-e / 3), "val/fn": 20 + 80 * math.exp(-e / 3),
        "val/recall": 0.8 - 0.7 * math.exp(-e / 3), "val/precision": 0.8 - 0.5 * math.exp(-e / 3),
        "val/pred_per_image": 3.0, "val/pred_mean_size": 40.0, "val/pred_large_share": 0.1,
        "val/fp_small_share": 0.3, "val/mean_score": 0.7,
    }


def run(diag: Diagnoser, step_fn: StepFn, epoch_fn: Optional[EpochFn], epochs: int, spe: int = SPE,
        first_epoch: int = 1) -> list[Finding]:
    """The training loop's call pattern: every step, then each epoch's end (step = steps done)."""
    new: list[Finding] = []
    for epoch in range(first_epoch, first_epoch + epochs):
        for s in range((epoch - 1) * spe, epoch * spe):
            new += diag.observe_step(s, epoch, step_fn(s))
        if epoch_fn is not None:
            new += diag.observe_epoch(epoch, epoch * spe, epoch_fn(epoch))
    return new


def only(findings: list[Finding], detector: str) -> Finding:
    assert [f.detector for f in findings] == [detector], [f.console_line() for f in findings]
    return findings[0]


# --------------------------------------------------------------------------------- healthy run
@pytest.mark.parametrize("total,spe,early_end,late_start", [(1000, 100, 100, 700), (42, 7, 7, 29)])
def test_healthy_trace_triggers_nothing(total, spe, early_end, late_start):
    diag = make(total, spe, early_end, late_start, early_stopping_patience=3)
    findings = run(diag, healthy_step(total), healthy_epoch, total // spe, spe)
    assert findings == [] and diag.findings == []
    assert diag.scalars() == dict.fromkeys(DETECTORS, 0.0)
    assert diag.should_stop() == (False, "")


# ---------------------------------------------------------------------------------- avoidance
def avoidance_step(s: int) -> dict:
    # loss_cls falls linearly from 4.0 (the model learns to call everything background)
    cls = 4.0 - 0.02 * s if s < 150 else 1.0
    return {"loss_cls": cls, "loss_box": 2.0, "loss_total": cls + 2.0, "lr": 0.01, "grad_norm": 3.0}


def avoidance_epoch(e: int) -> dict:
    return {**healthy_epoch(e), "val/pred_per_image": 0.02, "val/recall": 0.0, "val/tp": 0.0, "val/miou": 0.0}


def test_avoidance_fires_once_in_early_stage_with_evidence():
    diag = make()
    finding = only(run(diag, avoidance_step, avoidance_epoch, 1), "avoidance")
    assert (finding.stage, finding.epoch, finding.step) == ("early", 1, 100)
    ev = finding.evidence
    # loss window = min(50, 100 // 2) = 50: first = mean(4 - 0.02 s, s < 50) = 3.51; last 50 steps 2.51
    assert ev["loss_cls_first"] == pytest.approx(3.51)
    assert ev["loss_cls_now"] == pytest.approx(2.51)
    assert ev["loss_cls_drop"] == pytest.approx(1.0 / 3.51)
    assert ev["pred_per_image"] == pytest.approx(0.02) and ev["recall"] == 0.0 and ev["mean_score"] == 0.7
    assert "neg_pos_ratio" in finding.remedy
    # still in the trap: no second finding, the scalar stays on; recovered: the scalar clears
    assert run(diag, avoidance_step, avoidance_epoch, 1, first_epoch=2) == []
    assert diag.scalars()["avoidance"] == 1.0
    assert run(diag, avoidance_step, healthy_epoch, 1, first_epoch=3) == []
    assert diag.scalars()["avoidance"] == 0.0 and len(diag.findings) == 1


@pytest.mark.parametrize("change", [{"val/recall": 0.3}, {"val/pred_per_image": 2.0}])
def test_avoidance_needs_few_predictions_and_no_recall(change):
    diag = make()
    assert run(diag, avoidance_step, lambda e: {**avoidance_epoch(e), **change}, 3) == []


def test_avoidance_needs_falling_class_loss():
    def flat_cls(s: int) -> dict:
        return {"loss_cls": 2.0, "loss_box": 1.0, "loss_total": 3.0 * (1 - s / 400), "grad_norm": 3.0}

    findings = run(make(), flat_cls, avoidance_epoch, 1)
    assert "avoidance" not in [f.detector for f in findings]


# ------------------------------------------------------------------------------------- stuck
def stuck_step(s: int) -> dict:
    total = 5.0 if s < 50 else 4.9  # 2% below the first window: under the 5% margin
    return {"loss_cls": total - 1.0, "loss_box": 1.0, "loss_total": total, "lr": 0.001, "grad_norm": 2.0}


def test_stuck_fires_at_end_of_early_stage():
    diag = make(stuck_min_fraction=0.0)  # the check spans the early stage alone
    findings = run(diag, stuck_step, None, 1)
    finding = only(findings, "stuck")
    assert (finding.stage, finding.step, finding.epoch) == ("early", 99, 1)
    ev = finding.evidence
    assert ev["loss_first_window"] == pytest.approx(5.0) and ev["loss_last_window"] == pytest.approx(4.9)
    assert ev["relative_drop"] == pytest.approx(0.02) and ev["window_steps"] == 50 and ev["lr"] == 0.001
    assert "warm-up" in finding.remedy
    assert diag.should_stop() == (False, "")  # stop_on_stuck is off by default


def test_stuck_stops_the_run_when_switched_on():
    diag = make(stop_on_stuck=True, stuck_min_fraction=0.0)
    run(diag, stuck_step, None, 1)
    stop, reason = diag.should_stop()
    assert stop and reason.startswith("stuck at step 99") and "diverg" not in reason


def test_stuck_spans_at_least_the_min_fraction_of_training():
    # A slow warm-up (2% drop in the early stage) followed by a real fall is not stuck: with the
    # default 20% of 1000 steps the check runs at step 199, over 100-step windows.
    def slow_start(s: int) -> dict:
        return {**stuck_step(s), "loss_total": 5.0 if s < 100 else 4.9 if s < 150 else 4.0}

    assert run(make(), slow_start, None, 2) == []
    finding = only(run(make(), lambda s: {**stuck_step(s), "loss_total": 5.0 if s < 100 else 4.9}, None, 2), "stuck")
    assert (finding.step, finding.epoch, finding.stage) == (199, 2, "mid")
    assert finding.evidence["window_steps"] == 50 and finding.evidence["relative_drop"] == pytest.approx(0.02)


def test_stuck_not_fired_when_loss_falls_enough():
    diag = make(stuck_min_fraction=0.0)
    assert run(diag, lambda s: {**stuck_step(s), "loss_total": 5.0 if s < 50 else 4.7}, None, 2) == []


# --------------------------------------------------------------------------------- imbalance
def grad_step(g_cls: float, g_box: float) -> StepFn:
    def fn(s: int) -> dict:
        sig = healthy_step()(s)
        if "grad_norm_cls" in sig:
            sig.update(grad_norm_cls=g_cls, grad_norm_box=g_box)
        return sig

    return fn


def test_wants_grad_norms_every_n_steps_and_never_when_disabled():
    diag = make(grad_norm_every=50)
    assert [diag.wants_grad_norms(s) for s in (0, 1, 49, 50, 100)] == [True, False, False, True, True]
    assert not any(make(enabled=False).wants_grad_norms(s) for s in range(0, 200, 50))


def test_imbalance_box_dominates():
    diag = make()
    finding = only(run(diag, grad_step(0.1, 5.0), None, 2), "loss_imbalance")
    # samples at steps 0, 50, 100; the third (imbalance_min_samples) decides
    assert (finding.step, finding.epoch, finding.stage) == (100, 2, "mid")
    assert finding.evidence["ratio_box_to_cls"] == pytest.approx(50.0)
    assert finding.evidence["box_dominates"] == 1.0 and finding.evidence["samples"] == 3
    assert "raise loss.class_weight" in finding.remedy
    assert diag.scalars()["loss_imbalance"] == 1.0


def test_imbalance_class_dominates_with_zero_box_weight():
    diag = make()
    finding = only(run(diag, grad_step(2.0, 0.0), None, 2), "loss_imbalance")
    assert finding.evidence["ratio_box_to_cls"] == 0.0 and finding.evidence["box_dominates"] == 0.0
    assert "raise loss.box_weight" in finding.remedy


def test_imbalance_uses_median_so_one_outlier_does_not_fire():
    ratios = iter([1.0, 50.0, 1.0, 1.0, 60.0, 1.0])
    diag = make()

    def fn(s: int) -> dict:
        sig = healthy_step()(s)
        if "grad_norm_cls" in sig:
            sig.update(grad_norm_cls=1.0, grad_norm_box=next(ratios))
        return sig

    assert run(diag, fn, None, 3) == []


def test_imbalance_skips_samples_while_adaptive_weights_ramp():
    cfg = replace(DiagnosisConfig(), adaptive_weights=AdaptiveWeightsConfig(enabled=True, ramp_end_fraction=0.5))
    diag = Diagnoser(cfg, TOTAL, SPE, EARLY_END, LATE_START)
    findings = run(diag, grad_step(0.1, 5.0), None, 7)
    assert only(findings, "loss_imbalance").step == 600  # samples 500, 550, 600


# -------------------------------------------------------------------------------- large boxes
def large_epoch(e: int) -> dict:
    return {**healthy_epoch(e), "val/pred_large_share": 0.8, "val/precision": 0.05, "val/pred_per_image": 12.0,
            "val/pred_mean_size": 180.0}


def test_random_large_boxes_early():
    diag = make()
    finding = only(run(diag, healthy_step(), large_epoch, 1), "random_large_boxes")
    assert (finding.stage, finding.epoch, finding.step) == ("early", 1, 100)
    assert finding.evidence == {"pred_large_share": 0.8, "precision": 0.05, "pred_per_image": 12.0,
                                "pred_mean_size": 180.0}


def test_random_large_boxes_not_after_early_stage_nor_with_good_precision():
    diag = make()
    assert run(diag, healthy_step(), lambda e: healthy_epoch(e) if e < 3 else large_epoch(e), 4) == []
    diag = make()
    assert run(diag, healthy_step(), lambda e: {**large_epoch(e), "val/precision": 0.6}, 2) == []


# ---------------------------------------------------------------------------- small FP burst
FPS = {1: 25.0, 2: 20.0, 3: 30.0, 4: 45.0, 5: 70.0, 6: 90.0}
CLS_FLAT = {1: 1.5, 2: 1.00, 3: 0.99, 4: 0.99, 5: 0.98, 6: 0.98}


def small_fp_epoch(e: int, cls: Optional[dict] = None, small_share: float = 0.7) -> dict:
    return {**healthy_epoch(e), "val/fp": FPS[e], "val/fp_small_share": small_share,
            "train/loss_cls": (cls or CLS_FLAT)[e]}


def test_small_fp_explosion_mid_stage():
    diag = make()
    finding = only(run(diag, healthy_step(), small_fp_epoch, 5), "small_fp_explosion")
    assert (finding.stage, finding.epoch, finding.step) == ("mid", 5, 500)
    ev = finding.evidence
    assert (ev["fp_start"], ev["fp_now"]) == (20.0, 70.0) and ev["fp_growth"] == pytest.approx(2.5)
    assert ev["fp_small_share"] == 0.7 and ev["loss_cls_drop"] == pytest.approx(0.02)
    assert "score_threshold" in finding.remedy and "neg_pos_ratio" in finding.remedy


@pytest.mark.parametrize("kwargs", [
    {"cls": {1: 1.5, 2: 1.0, 3: 0.9, 4: 0.85, 5: 0.8, 6: 0.75}},  # loss_cls still falling: learning
    {"small_share": 0.2},  # the extra FPs are not small
])
def test_small_fp_explosion_needs_small_fps_and_stagnant_cls(kwargs):
    diag = make()
    assert run(diag, healthy_step(), lambda e: small_fp_epoch(e, **kwargs), 6) == []


# ------------------------------------------------------------------------------- overfitting
VAL_U = {1: 3.0, 2: 2.5, 3: 2.2, 4: 2.0, 5: 1.9, 6: 1.85, 7: 1.9, 8: 1.95, 9: 2.05, 10: 2.1}


def overfit_epoch(e: int) -> dict:
    return {**healthy_epoch(e), "val/loss_total": VAL_U[e]}


def test_overfitting_late_val_loss_rises_while_train_falls():
    diag = make()
    finding = only(run(diag, healthy_step(), overfit_epoch, 10), "overfitting")
    assert (finding.stage, finding.epoch, finding.step) == ("late", 9, 900)
    ev = finding.evidence
    assert (ev["val_loss_start"], ev["val_loss_now"]) == (1.85, 2.05) and ev["epochs"] == 3
    assert ev["train_loss_now"] < ev["train_loss_start"]
    assert "early stopping" in finding.remedy.lower() and "augment" in finding.remedy


def test_overfitting_by_falling_miou():
    miou = {1: 0.1, 2: 0.2, 3: 0.3, 4: 0.35, 5: 0.34, 6: 0.32, 7: 0.30, 8: 0.30}
    diag = make()
    finding = only(run(diag, healthy_step(), lambda e: {**healthy_epoch(e), "val/miou": miou[e]}, 8), "overfitting")
    assert (finding.epoch, finding.stage) == (7, "mid")
    assert finding.evidence["val_miou_start"] == 0.35 and finding.evidence["val_miou_now"] == 0.30
    assert finding.evidence["best_val_miou"] == 0.35 and finding.evidence["best_val_miou_epoch"] == 4


def test_no_overfitting_when_train_loss_rises_too_or_val_is_noisy():
    diag = make()
    rising_train = lambda e: {**overfit_epoch(e), "train/loss_total": 1.0 + 0.1 * e}  # noqa: E731
    assert run(diag, healthy_step(), rising_train, 10) == []
    noisy = {1: 3.0, 2: 2.5, 3: 2.6, 4: 2.4, 5: 2.5, 6: 2.3, 7: 2.4, 8: 2.35, 9: 2.4, 10: 2.3}
    diag = make()
    assert run(diag, healthy_step(), lambda e: {**healthy_epoch(e), "val/loss_total": noisy[e]}, 10) == []


# -------------------------------------------------------------------------------- divergence
def test_divergence_on_non_finite_loss_stops_the_run():
    diag = make()
    fn = lambda s: {**healthy_step()(s), "loss_total": math.nan} if s == 37 else healthy_step()(s)  # noqa: E731
    finding = only(run(diag, fn, None, 1), "divergence")
    assert (finding.step, finding.epoch, finding.stage) == (37, 1, "early")
    assert math.isnan(finding.evidence["loss_total"])
    stop, reason = diag.should_stop()
    assert stop and reason.startswith("diverged at step 37")
    diag = make(stop_on_diverged=False)
    run(diag, fn, None, 1)
    assert diag.fired("divergence") and diag.should_stop() == (False, "")


def spike(steps: set, value: float) -> StepFn:
    return lambda s: {**healthy_step()(s), "grad_norm": value if s in steps else 1.0}


def test_divergence_on_exploding_grad_norm():
    diag = make()
    finding = only(run(diag, spike({300, 301, 302}, 100.0), None, 4), "divergence")
    assert (finding.step, finding.stage) == (302, "mid")
    ev = finding.evidence
    assert ev["grad_norm"] == 100.0 and ev["grad_norm_median"] == 1.0 and ev["factor"] == 100.0 and ev["steps"] == 3


def test_single_grad_spike_and_amp_overflows_are_not_divergence():
    assert run(make(), spike({300}, 100.0), None, 4) == []
    assert run(make(), spike({5, 6, 7, 120, 121}, math.inf), None, 2) == []


def test_divergence_on_persistent_non_finite_grad_norm():
    finding = only(run(make(), spike(set(range(200, 400)), math.inf), None, 3), "divergence")
    assert finding.step == 219 and finding.evidence["steps"] == 20


def test_divergence_on_non_finite_val_loss():
    diag = make()
    finding = only(run(diag, healthy_step(), lambda e: {**healthy_epoch(e), "val/loss_total": math.inf}, 1),
                   "divergence")
    assert (finding.epoch, finding.step) == (1, 100) and diag.should_stop()[0]


def test_is_finite_loss():
    assert is_finite_loss(1.0) and is_finite_loss(torch.tensor(2.0))
    assert not any(map(is_finite_loss, [math.nan, math.inf, None, torch.tensor([1.0, math.nan])]))


# --------------------------------------------------------------------------- early stopping
def test_early_stopping_patience_on_miou():
    diag = make(early_stopping_patience=2)
    miou = [0.1, 0.3, 0.3, 0.29]
    stops = []
    for epoch, value in enumerate(miou, start=1):
        diag.observe_epoch(epoch, epoch * SPE, {**healthy_epoch(epoch), "val/miou": value})
        stops.append(diag.should_stop()[0])
    assert stops == [False, False, False, True]
    assert diag.should_stop()[1] == "early stopping: val/miou has not improved for 2 epochs (best 0.3 at epoch 2)"
    assert diag.best_metric == (0.3, 2)


def test_early_stopping_on_val_loss_lower_is_better_and_independent_of_detectors():
    diag = make(enabled=False, early_stopping_patience=1, early_stopping_metric="loss_total")
    diag.observe_epoch(1, 100, {"val/loss_total": 2.0})
    diag.observe_epoch(2, 200, {"val/loss_total": 1.5})
    assert diag.should_stop() == (False, "")
    diag.observe_epoch(3, 300, {"val/loss_total": 1.6})
    assert diag.should_stop()[0] and diag.best_metric == (1.5, 2)
    assert diag.scalars() == {} and diag.observe_step(0, 1, {"loss_total": math.nan}) == []


def test_divergence_takes_precedence_over_early_stopping():
    diag = make(early_stopping_patience=1)
    diag.observe_epoch(1, 100, {**healthy_epoch(1), "val/miou": 0.5})
    diag.observe_epoch(2, 200, {**healthy_epoch(2), "val/miou": 0.4, "val/loss_total": math.nan})
    assert diag.should_stop()[1].startswith("diverged")


# --------------------------------------------------------------------------- resume, output
def test_state_dict_round_trip_resumes_detection():
    whole = make()
    expected = run(whole, healthy_step(), small_fp_epoch, 6)
    first = make()
    run(first, healthy_step(), small_fp_epoch, 3)
    buffer = io.BytesIO()
    torch.save({"diagnoser": first.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)["diagnoser"]
    resumed = make()
    resumed.load_state_dict(state)
    resumed.load_state_dict({})  # an older checkpoint without diagnoser state changes nothing
    got = run(resumed, healthy_step(), small_fp_epoch, 3, first_epoch=4)
    assert [f.to_dict() for f in got] == [f.to_dict() for f in expected]


def test_finding_output_formats():
    finding = Finding("loss_imbalance", "mid", 100, 2, "box dominates", {"ratio_box_to_cls": 50.0, "samples": 3},
                      "raise loss.class_weight")
    data = finding.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert Finding.from_dict(data) == finding
    line = finding.console_line()
    assert "\n" not in line
    assert line == ("[diagnosis] loss_imbalance (mid stage, epoch 2, step 100): box dominates "
                    "[ratio_box_to_cls=50, samples=3] -> remedy: raise loss.class_weight")


# ----------------------------------------------------------------------- adaptive weights
def adaptive(**kwargs) -> DiagnosisConfig:
    return replace(DiagnosisConfig(), adaptive_weights=AdaptiveWeightsConfig(**kwargs))


def test_loss_weight_schedule_constant_when_off():
    schedule = LossWeightSchedule(DiagnosisConfig(), 1.0, 0.05, 1000)
    assert {schedule.weights(s) for s in (0, 250, 999)} == {(1.0, 0.05)}


def test_loss_weight_schedule_linear_ramp():
    cfg = adaptive(enabled=True, start_box_factor=0.1, ramp_start_fraction=0.1, ramp_end_fraction=0.5)
    schedule = LossWeightSchedule(cfg, 1.0, 2.0, 1000)
    expected = {0: 0.2, 100: 0.2, 300: 1.1, 499: 2.0 * (0.1 + 0.9 * 399 / 400), 500: 2.0, 999: 2.0}
    for step, box in expected.items():
        assert schedule.weights(step) == pytest.approx((1.0, box)), step


def test_loss_weight_schedule_cosine_and_class_emphasis():
    aw = AdaptiveWeightsConfig(enabled=True, start_box_factor=0.0, start_class_factor=2.0, ramp_start_fraction=0.0,
                               ramp_end_fraction=0.4, shape="cosine")
    schedule = LossWeightSchedule(aw, 1.0, 1.0, 1000)  # the sub-config alone works too
    c = 0.5 * (1 - math.cos(math.pi * 0.25))  # step 100 of a 400-step ramp
    assert schedule.weights(0) == (2.0, 0.0)
    assert schedule.weights(100) == pytest.approx((2.0 - c, c))
    assert schedule.weights(400) == (1.0, 1.0)


# ----------------------------------------------------------------------- gradient norms
def test_loss_term_grad_norms_against_hand_computed_values():
    shared = nn.Linear(2, 2)
    cls_head, box_head = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        shared.weight.copy_(torch.eye(2))
        shared.bias.zero_()
        cls_head.weight.copy_(torch.tensor([[1.0, 1.0]]))
        box_head.weight.copy_(torch.tensor([[0.0, 2.0]]))
    x = torch.tensor([[1.0, 2.0]])
    h = shared(x)  # [1, 2] = (1, 2)
    loss_cls = 0.5 * cls_head(h).pow(2).sum()  # weight 0.5, y = 3
    loss_box = 4.0 * box_head(h).sum()  # weight 4, y = 4
    g_cls, g_box = loss_term_grad_norms(loss_cls, loss_box, shared.parameters())
    # d(0.5 y^2)/dW = y * a x^T = 3 [[1, 2], [1, 2]], d/db = 3 a = (3, 3): |g|^2 = 9 * 10 + 18 = 108
    assert g_cls == pytest.approx(math.sqrt(108.0))
    # d(4 y)/dW = 4 b x^T = [[0, 0], [8, 16]], d/db = 4 b = (0, 8): |g|^2 = 64 + 256 + 64 = 384
    assert g_box == pytest.approx(math.sqrt(384.0))
    assert all(p.grad is None for p in shared.parameters())  # .grad untouched, graph retained:
    (loss_cls + loss_box).backward()
    assert shared.weight.grad is not None
    # a zero-weighted term, a scaled call (AMP) and a term independent of the shared parameters
    h = shared(x)
    g_cls, g_box = loss_term_grad_norms(0.0 * cls_head(h).sum(), 4.0 * box_head(h).sum(), list(shared.parameters()),
                                        scale=1024.0)
    assert g_cls == 0.0 and g_box == pytest.approx(math.sqrt(384.0))
    detached = cls_head(h.detach()).sum()
    assert loss_term_grad_norms(detached, detached * 0, shared.parameters()) == (0.0, 0.0)


# ---------------------------------------------------------------------------------- config
def test_yaml_matches_schema_defaults():
    yaml = OmegaConf.load(ROOT / "configs" / "diagnosis" / "default.yaml")
    merged = OmegaConf.merge(OmegaConf.structured(DiagnosisConfig), yaml)  # unknown keys would raise
    assert OmegaConf.to_object(merged) == DiagnosisConfig()
    assert set(yaml.keys()) == set(OmegaConf.structured(DiagnosisConfig).keys())


@pytest.mark.parametrize("change", [
    {"early_stopping_metric": "bogus"}, {"imbalance_ratio": 0.5}, {"early_stopping_patience": 0},
    {"imbalance_min_samples": 9}, {"large_box_share": 1.5}, {"fp_rise_epochs": 0},
    {"adaptive_weights": AdaptiveWeightsConfig(ramp_start_fraction=0.6, ramp_end_fraction=0.5)},
    {"adaptive_weights": AdaptiveWeightsConfig(shape="step")},
])
def test_validate_rejects_bad_diagnosis_values(change):
    validate(Config())
    with pytest.raises(ConfigError, match="diagnosis"):
        validate(replace(Config(), diagnosis=replace(DiagnosisConfig(), **change)))
