"""The criterion: hand-computed terms, hard negative mining, matching inside, weights and their schedule."""

import math

import pytest
import torch

from detlab.config import AdaptiveWeightsConfig, Config, LossConfig
from detlab.loss import (
    LossWeightSchedule,
    MultiBoxLoss,
    box_regression_loss,
    build_criterion,
    classification_loss,
    mine_negatives,
    multibox_terms,
)
from detlab.model import BoxCoder, build_model


def _tiny():
    # One image, 4 anchors: anchor 0 is a face, 1..3 background.
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])
    labels = torch.tensor([[1, 0, 0, 0]])
    bbox = torch.tensor([[[0.5, -2.0, 0.0, 1.5], [9.0, 9, 9, 9], [9.0, 9, 9, 9], [9.0, 9, 9, 9]]])
    targets = torch.zeros(1, 4, 4)
    return logits, bbox, labels, targets


def terms(cfg, logits, bbox, labels, targets):
    """The unweighted terms for already matched labels/targets, as a dict."""
    loss_cls, loss_box, num_pos, num_neg = multibox_terms(logits, bbox, labels, targets, cfg)
    return {"loss_cls": loss_cls, "loss_box": loss_box, "num_pos": num_pos, "num_neg": num_neg}


CE = [math.log(2.0), math.log(1 + math.exp(-2)), math.log(1 + math.exp(1)), math.log(1 + math.exp(-1))]


def test_hand_computed_cross_entropy_and_huber():
    logits, bbox, labels, targets = _tiny()
    cfg = LossConfig(class_weight=1.0, box_weight=1.0, box_loss="huber", huber_delta=1.0, neg_pos_ratio=1.0, min_negatives=1)
    out = terms(cfg, logits, bbox, labels, targets)
    # 1 positive -> keep the 1 hardest negative: anchor 2 (CE log(1 + e) = 1.3133).
    assert out["loss_cls"].item() == pytest.approx(CE[0] + CE[2], rel=1e-6)
    # Huber(delta 1) of (0.5, -2, 0, 1.5): 0.125 + 1.5 + 0 + 1.0; background rows (9s) are ignored.
    assert out["loss_box"].item() == pytest.approx(2.625, rel=1e-6)
    assert out["num_pos"].item() == 1 and out["num_neg"].item() == 1

    out = terms(LossConfig(neg_pos_ratio=2.0, min_negatives=1), logits, bbox, labels, targets)
    assert out["loss_cls"].item() == pytest.approx(CE[0] + CE[2] + CE[3], rel=1e-6)


def test_l1_and_huber_delta():
    logits, bbox, labels, targets = _tiny()
    l1 = terms(LossConfig(box_loss="l1"), logits, bbox, labels, targets)
    assert l1["loss_box"].item() == pytest.approx(0.5 + 2.0 + 0.0 + 1.5)
    huber = terms(LossConfig(huber_delta=0.5), logits, bbox, labels, targets)
    # delta 0.5: 0.5 * 0.5^2 = 0.125; 0.5 * (2 - 0.25) = 0.875; 0; 0.5 * (1.5 - 0.25) = 0.625
    assert huber["loss_box"].item() == pytest.approx(1.625)


def test_normalised_by_number_of_positives():
    logits = torch.zeros(2, 6, 2)
    labels = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    bbox = torch.ones(2, 6, 4)
    out = terms(LossConfig(neg_pos_ratio=0.0, box_loss="l1"), logits, bbox, labels, torch.zeros(2, 6, 4))
    assert out["loss_cls"].item() == pytest.approx(12 * math.log(2) / 3)  # all 12 anchors, 3 positives
    assert out["loss_box"].item() == pytest.approx(3 * 4 / 3)


def _anchored_batch():
    """Four 20-px anchors, two images: one face on anchor 0, one on anchor 3."""
    anchors = torch.tensor([[0.0, 0, 20, 20], [20, 0, 40, 20], [0, 20, 20, 40], [20, 20, 40, 40]])
    gt = [torch.tensor([[1.0, 1, 19, 21]]), torch.tensor([[21.0, 19, 41, 39]])]
    g = torch.Generator().manual_seed(0)
    outputs = {"cls_logits": torch.randn(2, 4, 2, generator=g), "bbox_regression": torch.randn(2, 4, 4, generator=g)}
    return anchors, gt, outputs


@pytest.mark.parametrize("cw,bw", [(1.0, 0.05), (2.0, 1.0), (0.0, 3.0), (0.5, 0.0)])
def test_criterion_matches_then_weights_the_terms_exactly(cw, bw):
    anchors, gt, outputs = _anchored_batch()
    cfg = LossConfig(class_weight=cw, box_weight=bw, min_negatives=1)
    out = MultiBoxLoss(cfg, anchors, BoxCoder([0.1, 0.2]), match_iou=0.5)(outputs, gt, step=0)
    labels, targets, _ = MultiBoxLoss(cfg, anchors, BoxCoder([0.1, 0.2]), match_iou=0.5).match(gt)
    assert labels.tolist() == [[1, 0, 0, 0], [0, 0, 0, 1]]
    loss_cls, loss_box, num_pos, num_neg = multibox_terms(outputs["cls_logits"], outputs["bbox_regression"], labels,
                                                          targets, cfg)
    assert torch.equal(out.loss_cls, loss_cls) and torch.equal(out.loss_box, loss_box)
    assert torch.equal(out.weighted_cls, cw * loss_cls) and torch.equal(out.weighted_box, bw * loss_box)
    assert torch.equal(out.total, cw * loss_cls + bw * loss_box)
    assert (out.class_weight, out.box_weight, out.weights_ramping) == (cw, bw, False)
    assert int(out.num_pos) == 2 and int(out.num_neg) == 6  # 3:1 mining, capped at each image's 3 negatives
    values = out.values()
    # both faces fit an anchor (IoU >= 0.5), no image is empty, 6 negatives for 2 positives
    assert values == {"loss_cls": loss_cls.item(), "loss_box": loss_box.item(), "loss_total": out.total.item(),
                      "num_pos": 2.0, "face_coverage": 1.0, "empty_image_share": 0.0, "neg_per_pos": 3.0}


def test_criterion_weights_follow_the_adaptive_schedule_by_step():
    anchors, gt, outputs = _anchored_batch()
    aw = AdaptiveWeightsConfig(enabled=True, start_box_factor=0.1, ramp_start_fraction=0.1, ramp_end_fraction=0.5)
    criterion = MultiBoxLoss(LossConfig(box_weight=2.0, adaptive_weights=aw), anchors, BoxCoder([0.1, 0.2]),
                             match_iou=0.5, total_steps=100)
    early, middle, late = (criterion(outputs, gt, step) for step in (0, 30, 50))
    assert (early.class_weight, early.box_weight, early.weights_ramping) == (1.0, pytest.approx(0.2), True)
    assert middle.box_weight == pytest.approx(2.0 * (0.1 + 0.9 * 0.5)) and middle.weights_ramping
    assert (late.box_weight, late.weights_ramping) == (2.0, False)
    # The unweighted terms do not depend on the step; the total does.
    assert torch.equal(early.loss_box, late.loss_box)
    assert early.total.item() == pytest.approx(early.loss_cls.item() + 0.2 * early.loss_box.item(), rel=1e-6)


def test_build_criterion_takes_the_models_anchors_and_matching_thresholds():
    cfg = Config()
    cfg.model.input_width, cfg.model.input_height, cfg.model.match_iou, cfg.model.ignore_iou = 160, 128, 0.35, 0.2
    model = build_model(cfg.model)
    criterion = build_criterion(cfg, model, total_steps=10)
    assert criterion.anchors.data_ptr() == model.anchors.data_ptr()
    assert (criterion.match_iou, criterion.ignore_iou) == (0.35, 0.2)
    face = [torch.tensor([[40.0, 40.0, 64.0, 64.0]])]
    labels, _, _ = criterion.match(face)
    assert int((labels == 1).sum()) >= 1 and int((labels == -1).sum()) >= 1  # the ignore band is in use


def test_loss_weight_schedule_constant_when_off():
    schedule = LossWeightSchedule(AdaptiveWeightsConfig(enabled=False), 1.0, 0.05, 1000)
    assert [schedule.weights(s) for s in (0, 500, 999)] == [(1.0, 0.05)] * 3
    assert not schedule.ramping(0)


def test_loss_weight_schedule_linear_and_cosine_ramps():
    aw = AdaptiveWeightsConfig(enabled=True, start_box_factor=0.1, start_class_factor=2.0,
                               ramp_start_fraction=0.1, ramp_end_fraction=0.5)
    linear = LossWeightSchedule(aw, 1.0, 1.0, 1000)
    assert linear.weights(0) == (2.0, pytest.approx(0.1)) and linear.weights(99) == (2.0, pytest.approx(0.1))
    assert linear.weights(300) == (pytest.approx(1.5), pytest.approx(0.55))  # half way: 100 -> 500
    assert linear.weights(500) == (1.0, 1.0) and linear.ramping(499) and not linear.ramping(500)
    cosine = LossWeightSchedule(AdaptiveWeightsConfig(**{**aw.__dict__, "shape": "cosine"}), 1.0, 1.0, 1000)
    assert cosine.weights(200)[1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 - math.cos(math.pi * 0.25)))


def test_mining_keeps_ratio_times_positives_per_image_hardest_first():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 100, 2, generator=g)
    labels = torch.zeros(2, 100, dtype=torch.int64)
    labels[0, :3] = 1
    labels[1, 10:15] = 1
    out = terms(LossConfig(neg_pos_ratio=3.0, min_negatives=1), logits, torch.zeros(2, 100, 4), labels, torch.zeros(2, 100, 4))
    assert out["num_pos"].item() == 8 and out["num_neg"].item() == 9 + 15

    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1), reduction="none").view(2, 100)
    kept = mine_negatives(ce, labels > 0, 3.0, 1)
    assert kept.sum(dim=1).tolist() == [9, 15]
    for b, k in ((0, 9), (1, 15)):
        negatives = ce[b][labels[b] == 0]
        assert torch.equal(torch.sort(ce[b][kept[b]]).values, torch.sort(negatives.topk(k).values).values)
    expected = (ce[labels > 0].sum() + ce[kept].sum()) / 8
    torch.testing.assert_close(out["loss_cls"], expected)


def test_min_negatives_floor_and_fractional_ratio():
    logits = torch.randn(1, 60, 2, generator=torch.Generator().manual_seed(3))
    labels = torch.zeros(1, 60, dtype=torch.int64)
    labels[0, :3] = 1
    _, _, num_neg = classification_loss(logits, labels, neg_pos_ratio=3.0, min_negatives=16)
    assert num_neg.item() == 16  # max(3 * 3, 16)
    _, _, num_neg = classification_loss(logits, labels, neg_pos_ratio=1.5, min_negatives=1)
    assert num_neg.item() == 5  # 1.5 * 3 = 4.5, rounded up


def test_positives_are_never_mined():
    logits = torch.zeros(1, 10, 2)
    logits[0, :4, 0] = 10.0  # the positives are confidently "background": the highest CE of all
    labels = torch.zeros(1, 10, dtype=torch.int64)
    labels[0, :4] = 1
    kept = mine_negatives(torch.nn.functional.cross_entropy(logits[0], labels[0], reduction="none")[None], labels > 0, 1.0, 1)
    assert not (kept & (labels > 0)).any() and kept.sum() == 4
    # A ratio asking for more negatives than exist keeps exactly all 6 negatives, no positive.
    _, num_pos, num_neg = classification_loss(logits, labels, neg_pos_ratio=100.0, min_negatives=1)
    assert num_pos.item() == 4 and num_neg.item() == 6


def test_batch_without_positives_is_finite_and_positive():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 40, 2, generator=g, requires_grad=True)
    labels = torch.zeros(3, 40, dtype=torch.int64)
    out = terms(LossConfig(min_negatives=16), logits, torch.randn(3, 40, 4), labels, torch.full((3, 40, 4), float("nan")))
    assert torch.isfinite(out["loss_cls"] + out["loss_box"]) and out["loss_cls"].item() > 0
    assert out["loss_box"].item() == 0.0
    assert out["num_pos"].item() == 0 and out["num_neg"].item() == 3 * 16
    (out["loss_cls"] + out["loss_box"]).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


def test_ratio_zero_uses_all_negatives():
    logits = torch.randn(2, 30, 2, generator=torch.Generator().manual_seed(1))
    labels = torch.zeros(2, 30, dtype=torch.int64)
    labels[0, 0] = 1
    out = terms(LossConfig(neg_pos_ratio=0.0), logits, torch.zeros(2, 30, 4), labels, torch.zeros(2, 30, 4))
    assert out["num_neg"].item() == 59
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 2), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(out["loss_cls"], ce)


def test_terms_backprop_separately():
    logits = torch.randn(1, 20, 2, requires_grad=True)
    bbox = torch.randn(1, 20, 4, requires_grad=True)
    labels = torch.zeros(1, 20, dtype=torch.int64)
    labels[0, :2] = 1
    out = terms(LossConfig(), logits, bbox, labels, torch.zeros(1, 20, 4))
    g_logits, g_bbox = torch.autograd.grad(out["loss_box"], (logits, bbox), retain_graph=True, allow_unused=True)
    assert g_logits is None and g_bbox[0, 2:].abs().sum() == 0 and g_bbox[0, :2].abs().sum() > 0
    g_logits, g_bbox = torch.autograd.grad(out["loss_cls"], (logits, bbox), allow_unused=True)
    assert g_bbox is None and g_logits.abs().sum() > 0
    # The per-term functions return the un-normalised sums.
    assert box_regression_loss(bbox, torch.zeros(1, 20, 4), labels).item() == pytest.approx(out["loss_box"].item() * 2)


def test_ignored_anchors_get_no_loss_and_are_never_mined():
    from detlab.loss import classification_loss

    # One positive, two ignored anchors with the largest background loss, three plain negatives.
    logits = torch.tensor([[[0.0, 0.0], [-5.0, 5.0], [-5.0, 5.0], [0.0, 1.0], [0.0, 2.0], [0.0, 3.0]]])
    labels = torch.tensor([[1, -1, -1, 0, 0, 0]])
    loss, num_pos, num_neg = classification_loss(logits, labels, neg_pos_ratio=2.0, min_negatives=1)
    ce = torch.nn.functional.cross_entropy(logits[0], torch.tensor([1, 0, 0, 0, 0, 0]), reduction="none")
    # Mined: the two hardest *background* anchors (indices 5 and 4), not the ignored ones.
    assert int(num_pos) == 1 and int(num_neg) == 2
    torch.testing.assert_close(loss, ce[0] + ce[5] + ce[4])
