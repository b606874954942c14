"""The diagnosis benchmark's injected faults (benchmarks/diagnosis/faults.py), with known answers: they
reach a run through the trainer's dataset and model factories, and the recorder keeps every step."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.diagnosis.faults import LabelFault, SignalRecorder, Unnormalised, dataset_factory, model_factory
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
