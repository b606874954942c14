"""train_step: one optimisation step as a function returning plain floats."""

import math

import pytest
import torch
from torch import nn

from detlab.config import Config
from detlab.engine.step import build_training, loss_term_grad_norms


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
