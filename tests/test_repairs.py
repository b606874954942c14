"""The repairs (all off by default) and the label and gradient signals the new detectors read:
rebalancing the loss weights, rolling back a divergence with a lower learning rate, re-arming a
detector, face coverage and images without faces, dead gradients."""

import math

import pytest
import torch

from detlab.config import RebalanceConfig, ScheduleConfig
from detlab.diagnosis import DIVERGENCE, Diagnoser, DiagnosisConfig, Divergence
from detlab.engine.repair import Rollback
from detlab.schedule import StageBoundaries, build_scheduler, scale_learning_rate
from detlab.engine.step import dead_gradient_share
from detlab.loss import LossRebalancer
from detlab.model import BoxCoder, generate_anchors
from detlab.model.matching import match_anchors
from test_step import tiny_parts

CODER = BoxCoder((0.1, 0.2))


# ------------------------------------------------------------------------------- face coverage
def anchors_16():
    """Square 16-pixel anchors every 8 pixels on a 64x64 image."""
    return generate_anchors((64, 64), [8], [[16]])


def test_match_anchors_counts_the_faces_an_anchor_fits():
    anchors = anchors_16()
    fits = torch.tensor([[4.0, 4.0, 20.0, 20.0]])  # exactly an anchor (centre 12, side 16): IoU 1
    tiny = torch.tensor([[30.0, 30.0, 33.0, 33.0]])  # 3x3 px: best IoU 9/256, under 0.45
    xywh = torch.tensor([[40.0, 40.0, 16.0, 16.0]])  # x2 < x1: degenerate, never covered
    assert int(match_anchors(anchors, [fits], CODER).covered) == 1
    assert int(match_anchors(anchors, [torch.cat([fits, tiny, xywh])], CODER).covered) == 1
    assert int(match_anchors(anchors, [fits, torch.zeros(0, 4), tiny], CODER).covered) == 1
    assert int(match_anchors(anchors, [torch.zeros(0, 4)], CODER).covered) == 0


def test_step_signals_give_face_coverage_and_images_without_faces():
    parts, _ = tiny_parts()
    images = torch.randn(4, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    faces = [torch.tensor([[10.0, 10.0, 30.0, 34.0]]), torch.zeros(0, 4), torch.zeros(0, 4),
             torch.tensor([[40.0, 20.0, 30.0, 10.0]])]  # the last one is degenerate (xywh read as xyxy)
    signals = parts.step(images, faces, step=0).signals()
    assert signals["empty_image_share"] == 0.5
    assert signals["face_coverage"] == 0.5  # the 20x24 face fits a 24-pixel anchor; the degenerate one nothing


def test_dead_gradient_share_counts_frozen_and_unreached_weights():
    layer_a, layer_b = torch.nn.Linear(10, 10), torch.nn.Linear(10, 30)  # 110 and 330 weights
    layer_a(torch.randn(2, 10)).sum().backward()
    assert dead_gradient_share([*layer_a.parameters(), *layer_b.parameters()]) == pytest.approx(330 / 440)
    layer_b.weight.grad = torch.zeros_like(layer_b.weight)  # present but all zero: dead too
    assert dead_gradient_share([*layer_a.parameters(), *layer_b.parameters()]) == pytest.approx(330 / 440)
    layer_b(torch.randn(2, 10)).sum().backward()
    assert dead_gradient_share([*layer_a.parameters(), *layer_b.parameters()]) == 0.0


def test_a_frozen_backbone_leaves_most_weights_without_gradient():
    images = torch.randn(2, 3, 64, 96)
    faces = [torch.tensor([[10.0, 10.0, 30.0, 34.0]])] * 2
    parts, _ = tiny_parts()
    learning = parts.step(images, faces, step=0, sample_gradients=True)
    for p in parts.model.backbone.parameters():
        p.requires_grad_(False)
    frozen = parts.step(images, faces, step=1, sample_gradients=True)
    backbone = sum(p.numel() for p in parts.model.backbone.parameters())
    total = sum(p.numel() for p in parts.model.parameters())
    # Box-head layers of feature levels without a matched face get no gradient either.
    assert learning.grad_dead_share < 0.3 < 0.5 < backbone / total <= frozen.grad_dead_share
    assert (frozen.grad_norm_cls, frozen.grad_norm_box) == (0.0, 0.0)  # nothing shared that learns


# --------------------------------------------------------------------------------- rebalancing
def test_rebalancer_engages_outside_the_band_and_steers_to_its_middle():
    rb = LossRebalancer(RebalanceConfig(enabled=True, band=10.0, target=2.0, rate=1.0))
    rb.observe(1.0, 5.0)  # ratio 5: inside [0.1, 10], never engaged: nothing changes
    assert (rb.box_factor, rb.updates, rb.aim) == (1.0, 0, None)
    rb.observe(1.0, 100.0)  # ratio 100: engaged box-heavy, the box weight scaled by 2 / 100
    assert rb.box_factor == pytest.approx(0.02) and (rb.updates, rb.aim) == (1, 2.0)
    rb.observe(1.0, 5.0)  # engaged: a ratio of 5 (inside the band) is still steered to 2
    assert rb.box_factor == pytest.approx(0.02 * 2 / 5) and rb.updates == 2
    half = LossRebalancer(RebalanceConfig(enabled=True, band=10.0, target=2.0, rate=0.5))
    half.observe(1.0, 1e-4)  # ratio 1e-4: engaged class-heavy, aim 1/2: factor (0.5 / 1e-4) ** 0.5
    assert half.box_factor == pytest.approx(5000 ** 0.5) and half.aim == 0.5
    capped = LossRebalancer(RebalanceConfig(enabled=True, rate=1.0, max_factor=100.0))
    capped.observe(1.0, 1e-9)
    assert capped.box_factor == 100.0
    restored = LossRebalancer(RebalanceConfig(enabled=True))
    restored.load_state_dict(rb.state_dict())
    assert (restored.box_factor, restored.updates, restored.aim) == (rb.box_factor, 2, 2.0)
    off = LossRebalancer(RebalanceConfig(enabled=False))
    off.observe(1.0, 1e6)
    for bad in ((0.0, 1.0), (1.0, math.inf), (math.nan, 1.0)):
        rb.observe(*bad)
    assert off.box_factor == 1.0 and rb.updates == 2


def test_criterion_applies_the_rebalanced_box_weight_and_keeps_it_in_its_state():
    parts, cfg = tiny_parts(box_weight=100.0, rebalance=RebalanceConfig(enabled=True, rate=1.0))
    criterion = parts.criterion
    criterion.observe_grad_norms(0, 1.0, 1000.0)  # ratio 1000 -> aim 2: factor 0.002
    assert criterion.weights(0) == pytest.approx((1.0, 0.2))
    parts2, _ = tiny_parts(box_weight=100.0, rebalance=RebalanceConfig(enabled=True))
    parts2.criterion.load_state_dict(criterion.state_dict())
    assert parts2.criterion.weights(5) == pytest.approx((1.0, 0.2))
    # a training step measures the ratio on the backbone's output and feeds it in
    parts3, _ = tiny_parts(box_weight=1e4, rebalance=RebalanceConfig(enabled=True, rate=1.0, min_factor=1e-5))
    images = torch.randn(2, 3, 64, 96)
    record = parts3.step(images, [torch.tensor([[10.0, 10.0, 30.0, 34.0]])] * 2, step=0, sample_gradients=True)
    ratio = record.grad_norm_box / record.grad_norm_cls
    assert ratio > 10 and parts3.criterion.weights(1)[1] == pytest.approx(1e4 * 2 / ratio, rel=1e-6)


# ----------------------------------------------------------------------------- lr back-off
@pytest.mark.parametrize("schedule", [ScheduleConfig(warmup_steps=10), ScheduleConfig(warmup=False),
                                      ScheduleConfig(warmup_steps=10, after_warmup="multistep"),
                                      ScheduleConfig(warmup_steps=10, after_warmup="constant")])
@pytest.mark.parametrize("at", [5, 30])
def test_scale_learning_rate_scales_the_rest_of_the_schedule(schedule, at):
    def make():
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.SGD([p], lr=0.1)
        return opt, build_scheduler(opt, schedule, 100, 10)

    (ref_opt, ref_sched), (opt, sched) = make(), make()
    for step in range(100):
        if step == at:
            scale_learning_rate(opt, sched, 0.1)
            assert sched.get_last_lr()[0] == pytest.approx(0.1 * ref_sched.get_last_lr()[0])
        if step >= at:
            assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * ref_opt.param_groups[0]["lr"], rel=1e-9)
        for o, s in ((ref_opt, ref_sched), (opt, sched)):
            o.step()
            s.step()


def test_rollback_restores_the_last_good_state_with_a_lower_learning_rate():
    parts, _ = tiny_parts()
    rollback = Rollback(Divergence.Config(rollback=True, lr_backoff=0.1, max_rollbacks=1))
    assert not rollback.available  # nothing to roll back to yet
    rollback.take(1, 25, parts.model, parts.optimizer, parts.scaler)
    good = {k: v.clone() for k, v in parts.model.state_dict().items()}
    with torch.no_grad():
        for p in parts.model.parameters():
            p.fill_(1e6)
    lr = parts.optimizer.param_groups[0]["lr"]
    message = parts and rollback.restore(parts.model, parts.optimizer, parts.scheduler, parts.scaler)
    assert all(torch.equal(good[k], v) for k, v in parts.model.state_dict().items())
    assert parts.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * lr)
    assert "epoch 1 (step 25)" in message and "rollback 1 of 1" in message
    assert not rollback.available  # max_rollbacks spent
    assert not Rollback(Divergence.Config()).enabled  # off by default


def test_a_repaired_divergence_no_longer_stops_the_run_and_may_fire_again():
    diag = Diagnoser(DiagnosisConfig(), StageBoundaries(10, 70), 100, 10)
    nan = {"loss_cls": math.nan, "loss_box": 1.0, "loss_total": math.nan}
    assert [f.detector for f in diag.observe_step(3, 1, nan)] == [DIVERGENCE]
    assert diag.status.stop
    diag.rearm(DIVERGENCE)
    assert not diag.status.stop and diag.scalars()[DIVERGENCE] == 0.0
    restored = Diagnoser(DiagnosisConfig(), StageBoundaries(10, 70), 100, 10)
    restored.load_state_dict(diag.state_dict())
    assert not restored.status.stop
    assert [f.detector for f in restored.observe_step(8, 1, nan)] == [DIVERGENCE]
    assert restored.status.stop and len(restored.findings) == 2


# ------------------------------------------------------------------------ repairs in a real run
@pytest.mark.slow
def test_a_diverging_run_is_rolled_back_with_a_lower_lr_then_stops_when_the_rollbacks_are_spent(
        tiny_config, synthetic_root, tmp_path):
    import json

    from detlab.engine.trainer import train

    cfg = tiny_config(synthetic_root, "optim.name=sgd", "optim.lr=1e6", "schedule.warmup=false",
                      "diagnosis.divergence.rollback=true", "diagnosis.divergence.max_rollbacks=1",
                      "diagnosis.divergence.lr_backoff=0.1", "train.epochs=2")
    summary = train(cfg, tmp_path / "run")
    repairs = summary["repairs"]
    assert len(repairs) == 1 and repairs[0]["repair"] == "rollback"
    assert "rolled back to the weights of epoch 0 (step 0)" in repairs[0]["message"]
    assert "rollback 1 of 1" in repairs[0]["message"]
    # lr 1e5 still diverges: the second divergence finds no rollback left and ends the run
    assert summary["status"] == "diverged"
    assert [f["detector"] for f in summary["findings"]].count("divergence") == 2
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["repairs"] == repairs


@pytest.mark.slow
def test_a_non_finite_validation_loss_is_rolled_back_too(tiny_config, synthetic_root, tmp_path, monkeypatch):
    from detlab.diagnosis import Diagnoser, Finding
    from detlab.engine.trainer import train

    observe_epoch = Diagnoser.observe_epoch

    def overflowing_first_epoch(self, epoch, step, signals):
        if epoch == 1 and not self.fired("divergence"):  # as if the weights had overflowed under AMP
            finding = Finding("divergence", "early", step, epoch, "validation loss is not finite",
                              {"val_loss_total": math.inf})
            self.findings.append(finding)
            self._refresh_status()
            return [finding]
        return observe_epoch(self, epoch, step, signals)

    monkeypatch.setattr(Diagnoser, "observe_epoch", overflowing_first_epoch)
    cfg = tiny_config(synthetic_root, "diagnosis.divergence.rollback=true", "train.epochs=2")
    summary = train(cfg, tmp_path / "run")
    assert summary["status"] == "completed" and summary["epochs"] == 2
    assert [(r["repair"], r["epoch"]) for r in summary["repairs"]] == [("rollback", 1)]
    without = train(tiny_config(synthetic_root, "train.epochs=2"), tmp_path / "off")
    assert without["status"] == "diverged" and without["repairs"] == []
