"""train_step: one optimisation step as a function returning plain floats."""

import math

import pytest
import torch
from torch import nn

from detlab.config import Config
from detlab.engine.step import TermGradientProbe, build_training


def tiny_parts(**loss):
    torch.manual_seed(0)
    cfg = Config()
    cfg.model.input_width, cfg.model.input_height = 96, 64
    cfg.optim.name, cfg.optim.lr = "sgd", 0.01
    cfg.train.cpu_bf16 = False
    for key, value in loss.items():
        setattr(cfg.loss, key, value)
    return build_training(cfg, torch.device("cpu"), total_steps=10, steps_per_epoch=5), cfg


def batch():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 64, 96, generator=g)
    faces = [torch.tensor([[10.0, 10.0, 30.0, 34.0]]), torch.tensor([[40.0, 20.0, 56.0, 40.0], [60, 5, 90, 40]])]
    return images, faces


def test_a_step_updates_the_model_and_reports_its_numbers():
    parts, cfg = tiny_parts(box_weight=0.5)
    images, faces = batch()
    before = [p.detach().clone() for p in parts.model.parameters()]
    lr_before = parts.optimizer.param_groups[0]["lr"]
    with torch.no_grad():
        expected = parts.criterion(parts.model.train()(images), faces, 0)
    record = parts.step(images, faces, step=0, sample_gradients=True)
    assert record.updated and record.lr == lr_before
    assert record.loss_cls == pytest.approx(expected.loss_cls.item(), rel=1e-5)
    assert record.loss_total == pytest.approx(record.loss_cls + 0.5 * record.loss_box, rel=1e-5)
    assert (record.class_weight, record.box_weight, record.num_pos) == (1.0, 0.5, expected.num_pos.item())
    assert record.grad_norm > 0 and record.grad_norm_cls > 0 and record.grad_norm_box > 0
    assert 0.0 <= record.grad_dead_share < 0.3  # box-head levels without a matched face get no gradient
    assert record.empty_image_share == 0.0 and 0.0 <= record.face_coverage <= 1.0
    # the input's statistics from every 4th pixel each way (standard normal images)
    probe = images[:, :, ::4, ::4]
    assert record.input_mean == pytest.approx(probe.mean().item(), abs=1e-5)
    assert record.input_std == pytest.approx(probe.std().item(), rel=1e-5)
    assert abs(record.input_mean) < 0.1 and 0.9 < record.input_std < 1.1
    assert any(not torch.equal(a, b) for a, b in zip(before, parts.model.parameters()))
    assert parts.optimizer.param_groups[0]["lr"] != lr_before  # the warm-up schedule advanced
    signals = record.signals()
    assert {"loss_cls", "loss_box", "loss_total", "lr", "num_pos", "grad_norm", "grad_norm_cls", "grad_norm_box",
            "weights_ramping", "face_coverage", "empty_image_share", "grad_dead_share", "neg_per_pos", "input_mean",
            "input_std"} == set(signals)


def test_a_non_finite_loss_makes_no_update():
    parts, _ = tiny_parts()
    images, faces = batch()
    images[0, 0, 0, 0] = float("nan")
    before = [p.detach().clone() for p in parts.model.parameters()]
    record = parts.step(images, faces, step=0)
    assert not record.updated and not math.isfinite(record.loss_total) and math.isnan(record.grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, parts.model.parameters()))
    assert "grad_norm" not in record.signals()


def test_the_probe_reads_each_terms_gradient_on_the_shared_output_with_one_partial_backward():
    class Backbone(nn.Module):  # two maps, the coarser computed from the finer (as an SSD's extra layers)
        def __init__(self) -> None:
            super().__init__()
            self.first, self.extra = nn.Linear(2, 2), nn.Linear(2, 2, bias=False)

        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            fine = self.first(x)
            return [fine, self.extra(fine)]

    backbone = Backbone()
    cls_head, box_head = nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        backbone.first.weight.copy_(torch.eye(2))
        backbone.first.bias.zero_()
        backbone.extra.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))  # swaps: coarse = (2, 1)
        cls_head.weight.copy_(torch.tensor([[1.0, 1.0]]))
        box_head.weight.copy_(torch.tensor([[0.0, 2.0]]))
    x = torch.tensor([[1.0, 2.0]])

    def norms(cls_weight: float, box_weight: float, scale: float = 1.0) -> tuple[float, float]:
        probe = TermGradientProbe(backbone)
        fine, coarse = backbone(x)
        probe.stop_watching()
        loss_cls = cls_weight * 0.5 * cls_head(fine).pow(2).sum()  # y = 3 on the fine map only
        loss_box = box_weight * box_head(coarse).sum()  # on the coarse map only
        backbone.zero_grad()
        probe.before_backward(loss_cls, loss_box, scale)
        (scale * (loss_cls + loss_box)).backward()
        return probe.norms(scale)

    # class: on fine, y a = 3 (1, 1); on coarse, 0: |g| = 3 sqrt(2).
    # box (weight 4): on coarse, 4 b = (0, 8); on fine, through the swap, (8, 0): |g| = 8 sqrt(2)
    g_cls, g_box = norms(1.0, 4.0)
    assert g_cls == pytest.approx(3 * math.sqrt(2.0)) and g_box == pytest.approx(8 * math.sqrt(2.0))
    assert backbone.first.weight.grad is not None  # the step's backward reached the weights as usual
    # either term is measured directly (the smaller weighted loss: here the class term's 4.5 against 16, then
    # the box term's 0.04 against 4.5), the other by difference
    assert norms(1.0, 0.01) == (pytest.approx(3 * math.sqrt(2.0)), pytest.approx(0.02 * math.sqrt(2.0)))
    # a scaled backward (the gradient scaler) is unscaled; a zero-weighted term gives 0.0
    assert norms(0.0, 4.0, scale=1024.0) == (0.0, pytest.approx(8 * math.sqrt(2.0)))
    assert norms(1.0, 0.0) == (pytest.approx(3 * math.sqrt(2.0)), 0.0)
    # a class term that does not reach the maps
    probe = TermGradientProbe(backbone)
    fine, coarse = backbone(x)
    probe.stop_watching()
    loss_cls, loss_box = cls_head(fine.detach()).sum(), box_head(coarse).sum()
    probe.before_backward(loss_cls, loss_box)
    (loss_cls + loss_box).backward()
    assert probe.norms() == (0.0, pytest.approx(2 * math.sqrt(2.0)))


@pytest.mark.parametrize("model", ["ssd_slim", "ssdlite"])
def test_a_sampled_step_reports_the_terms_gradient_norms_on_the_backbones_output(model):
    """The norms the step reads with one partial backward equal two separate backwards of the weighted
    terms on the backbone's feature maps (ssd_slim's heads, and torchvision's SSDLiteHead)."""
    torch.manual_seed(0)
    cfg = Config()
    cfg.model.name = model
    cfg.model.input_width, cfg.model.input_height = 96, 64
    cfg.optim.name, cfg.optim.lr = "sgd", 0.01
    cfg.train.cpu_bf16 = False
    cfg.loss.box_weight = 0.5
    parts = build_training(cfg, torch.device("cpu"), total_steps=10, steps_per_epoch=5)
    images, faces = batch()
    features: list[torch.Tensor] = []
    hook = parts.model.backbone.register_forward_hook(lambda m, i, out: features.extend(out))
    losses = parts.criterion(parts.model.train()(images), faces, 0)
    hook.remove()
    expected = []
    for term in (losses.weighted_cls, losses.weighted_box):
        grads = torch.autograd.grad(term, features, retain_graph=True, allow_unused=True)
        expected.append(math.sqrt(sum(float(g.pow(2).sum()) for g in grads if g is not None)))
    record = parts.step(images, faces, step=0, sample_gradients=True)
    assert expected[0] > 0 and expected[1] > 0
    assert record.grad_norm_cls == pytest.approx(expected[0], rel=1e-4)
    assert record.grad_norm_box == pytest.approx(expected[1], rel=1e-4)
    unsampled = parts.step(images, faces, step=1)
    assert unsampled.grad_norm_cls is None and unsampled.grad_norm_box is None
