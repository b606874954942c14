"""The diagnosis benchmark's injected faults (benchmarks/diagnosis/faults.py), with known answers: they
reach a run through the trainer's dataset and model factories, and the recorder keeps every step."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.diagnosis.faults import (
    FLOAT16_MAX,
    LabelFault,
    SignalRecorder,
    Unnormalised,
    dataset_factory,
    first_conv,
    layer_gradient_signals,
    model_factory,
)
from detlab.config import ModelConfig
from detlab.data import build_datasets
from detlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from detlab.engine.trainer import train


class Boxes(torch.utils.data.Dataset):
    """``n`` images with the same two faces, xyxy."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int):
        boxes = torch.tensor([[10.0, 20.0, 30.0, 60.0], [50.0, 50.0, 54.0, 58.0]])
        return torch.zeros(3, 8, 8), {"boxes": boxes, "labels": torch.ones(2, dtype=torch.int64)}


def test_xywh_fault_turns_the_corners_into_width_and_height():
    _, target = LabelFault(Boxes(1), "xywh_boxes")[0]
    assert target["boxes"].tolist() == [[10.0, 20.0, 20.0, 40.0], [50.0, 50.0, 4.0, 8.0]]


def test_flipped_boxes_swap_x1_and_x2_so_that_x2_is_left_of_x1():
    _, target = LabelFault(Boxes(1), "flipped_boxes")[0]
    assert target["boxes"].tolist() == [[30.0, 20.0, 10.0, 60.0], [54.0, 50.0, 50.0, 58.0]]
    assert bool((target["boxes"][:, 2] < target["boxes"][:, 0]).all())


def test_zero_size_boxes_collapse_to_their_centre():
    _, target = LabelFault(Boxes(1), "zero_size_boxes")[0]
    assert target["boxes"].tolist() == [[20.0, 40.0, 20.0, 40.0], [52.0, 54.0, 52.0, 54.0]]
    assert target["labels"].tolist() == [1, 1]  # the faces are still there, with boxes of no size


@pytest.mark.parametrize("fault", ["flipped_boxes", "zero_size_boxes"])
def test_degenerate_boxes_are_faces_no_anchor_covers(fault):
    """The mechanism behind the spec's expected unmatched_faces: the matcher counts these faces and
    covers none of them (face_coverage 0), while the clean boxes are covered."""
    from detlab.model import build_model
    from detlab.model.matching import match_anchors

    model = build_model(ModelConfig())
    clean = [torch.tensor([[40.0, 40.0, 72.0, 80.0], [150.0, 100.0, 198.0, 160.0]])]
    faulty = [LabelFault([(None, {"boxes": clean[0], "labels": torch.ones(2, dtype=torch.int64)})], fault)[0][1]["boxes"]]
    assert int(match_anchors(model.anchors, clean, model.box_coder, 0.35).covered) == 2
    assignment = match_anchors(model.anchors, faulty, model.box_coder, 0.35)
    assert int(assignment.covered) == 0 and int((assignment.labels == 1).sum()) == 0


def test_most_images_empty_strips_about_nine_in_ten_the_same_way_every_time():
    faulty = LabelFault(Boxes(400), "most_images_empty")
    empty = [len(faulty[i][1]["boxes"]) == 0 for i in range(400)]
    assert 0.85 < sum(empty) / 400 < 0.95
    assert empty == [len(faulty[i][1]["boxes"]) == 0 for i in range(400)]  # seeded by the index
    assert all(len(faulty[i][1]["labels"]) == 0 for i in range(400) if empty[i])


def test_label_noise_moves_some_boxes_by_at_most_half_their_size():
    faulty, clean = LabelFault(Boxes(200), "label_noise"), Boxes(1)[0][1]["boxes"]
    moved = [(faulty[i][1]["boxes"] - clean).abs() for i in range(200)]
    share = sum(int((m.sum(dim=1) > 0).sum()) for m in moved) / (2 * 200)
    assert 0.2 < share < 0.4  # 30% of the boxes
    size = (clean[:, 2:] - clean[:, :2]).repeat(1, 2)
    assert all(bool((m <= size / 2 + 1e-5).all()) for m in moved)


def test_unnormalised_input_is_raw_pixels():
    pixels = torch.tensor([0.0, 128.0, 255.0]).view(3, 1, 1).expand(3, 2, 2)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    normalised = (pixels / 255.0 - mean) / std

    class One(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return normalised, {}

    raw, _ = Unnormalised(One())[0]
    torch.testing.assert_close(raw, pixels, atol=1e-3, rtol=0)


def test_step_skipped_keeps_the_weights_the_loss_sees_at_their_start():
    """A real optimiser step changes the parameters; the next forward puts them back, so the outputs
    are those of the untrained model, again and again."""
    torch.manual_seed(0)
    model = model_factory("step_skipped")(ModelConfig())
    images = torch.randn(2, 3, 256, 320)
    model.train()
    before = model(images)["cls_logits"].detach().clone()
    start = {k: v.detach().clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    for _ in range(2):
        optimizer.zero_grad()
        model(images)["cls_logits"].float().pow(2).mean().backward()
        optimizer.step()
        assert any(not torch.equal(p, start[k]) for k, p in model.named_parameters())  # the step did move them
    model.eval()
    after = model(images)["cls_logits"]  # batch norm now uses its moved running statistics ...
    assert all(torch.equal(p, start[k]) for k, p in model.named_parameters())  # ... the weights are the start's
    model.train()
    torch.testing.assert_close(model(images)["cls_logits"], before)
    assert after.shape == before.shape


def test_fp16_overflow_puts_the_first_conv_beyond_float16_and_float32_undoes_it():
    torch.manual_seed(0)
    clean = model_factory(None)(ModelConfig())
    torch.manual_seed(0)
    faulty = model_factory("fp16_overflow")(ModelConfig())
    images = torch.randn(2, 3, 256, 320)
    with torch.no_grad():
        out = first_conv(faulty)(images)
        assert float(out.abs().median()) > FLOAT16_MAX  # most of its outputs are inf in float16 ...
        assert bool(torch.isinf(out.half()).float().mean() > 0.5)
        assert float(first_conv(clean)(images).abs().max()) < FLOAT16_MAX  # ... none of the clean model's
        # float32, training mode: the batch norm after it divides the scale out; the outputs match the clean model's
        expected, got = clean(images), faulty(images)
    for key in ("cls_logits", "bbox_regression"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="float16 autocast needs CUDA")
def test_fp16_overflow_gives_non_finite_outputs_under_cuda_autocast_only():
    """The GPU-only class's mechanism: under CUDA float16 autocast the injected model's outputs are not
    finite (the first step's loss then is not); the clean model's are."""
    torch.manual_seed(0)
    clean = model_factory(None)(ModelConfig()).cuda()
    faulty = model_factory("fp16_overflow")(ModelConfig()).cuda()
    images = torch.randn(2, 3, 256, 320, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16):
        assert not bool(torch.isfinite(faulty(images)["cls_logits"]).all())
        assert bool(torch.isfinite(clean(images)["cls_logits"]).all())


def test_layer_gradient_signals_are_autotrainers_features_over_trainable_weights():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1), torch.nn.Linear(1, 1))
    model[2].weight.requires_grad_(False)
    model[2].bias.requires_grad_(False)
    model[0].weight.grad = torch.tensor([[3.0, 0.0], [0.0, 4.0]])  # norm 5, two zeros
    model[0].bias.grad = torch.tensor([0.0, 1.0])  # one zero
    model[1].weight.grad = torch.tensor([[0.0, 2.0]])  # the last trainable kernel: norm 2, one zero
    # model[1].bias has no gradient: its one entry counts as zero; model[2] is frozen: not counted
    signals = layer_gradient_signals(model)
    assert signals == pytest.approx({"grad_norm_first_layer": 5.0, "grad_norm_last_layer": 2.0,
                                     "grad_zero_share": 5 / 9})


def test_factories_without_a_fault_are_the_package_defaults():
    from detlab.model import build_model

    assert dataset_factory(None) is build_datasets and model_factory(None) is build_model
    assert dataset_factory("frozen_backbone") is build_datasets


def test_frozen_backbone_factory_leaves_only_the_heads_trainable():
    model = model_factory("frozen_backbone")(ModelConfig())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert any(p.requires_grad for p in model.parameters())


@pytest.mark.slow
def test_recorder_keeps_every_step_of_a_run_with_an_injected_fault(tmp_path, synthetic_root):
    from conftest import compose_tiny_config

    cfg = compose_tiny_config(synthetic_root, "train.epochs=2")
    recorder = SignalRecorder(tmp_path / "steps.json")
    train(cfg, tmp_path / "run", callbacks=[recorder], dataset_factory=dataset_factory("xywh_boxes"))
    recorder.write()
    record = json.loads((tmp_path / "steps.json").read_text())
    # 20 images, batch 8, the last partial batch dropped: 2 steps an epoch
    assert record["total_steps"] == 4
    assert [(s["step"], s["epoch"]) for s in record["steps"]] == [(0, 1), (1, 1), (2, 2), (3, 2)]
    assert all("loss_total" in s and "face_coverage" in s for s in record["steps"])
    # every step samples gradients (the tiny config's diagnosis.grad_norm_every=1): AUTOTRAINER's features too
    sampled = [s for s in recorder.steps if "grad_dead_share" in s]
    assert [s["step"] for s in sampled] == [0, 1, 2, 3] and recorder.steps_per_epoch == 2
    assert {"grad_norm_first_layer", "grad_norm_last_layer", "grad_zero_share"} <= set(sampled[0])
    assert all("grad_zero_share" not in s for s in recorder.steps if "grad_dead_share" not in s)
