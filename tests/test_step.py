"""train_step: one optimisation step as a function returning plain floats."""

import math

import pytest
import torch

from detlab.config import Config
from detlab.engine.step import build_training


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
