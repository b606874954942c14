"""Faults injected into a benchmark run through the trainer's public extension points, and the callback
that records a run's per-step signals.

A fault that a config key expresses (an lr far too high, box weight 100, ...) is a list of overrides in
``bench_diagnosis.FAULTS``. The others change the data or the model, and reach the run through
``Trainer(..., dataset_factory=..., model_factory=...)``: nothing in the package is patched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch.utils.data import Dataset

from detlab.config import Config, ModelConfig
from detlab.data import build_datasets, denormalize
from detlab.engine.callbacks import Callback
from detlab.model import SSD, build_model
from detlab.runtime.fileio import write_json

DATA_FAULTS = ("label_noise", "xywh_boxes", "most_images_empty", "not_normalised")
MODEL_FAULTS = ("frozen_backbone",)
INJECTED_FAULTS = DATA_FAULTS + MODEL_FAULTS


class FaultyDataset(Dataset):
    """A dataset whose items pass through ``corrupt``; everything else (records, collate_fn, ...) is
    the wrapped dataset's."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Any:
        item = self.dataset[index]
        return item if item is None else self.corrupt(index, *item)

    def corrupt(self, index: int, image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError


class LabelFault(FaultyDataset):
    """The training set with a label bug: 30% of the boxes shifted by up to half their size (label
    noise), boxes as xywh where xyxy is expected, or 90% of the images stripped of their faces. The
    draw is seeded by the image index, so every epoch and every run sees the same bug."""

    def __init__(self, dataset: Any, fault: str) -> None:
        if fault not in ("label_noise", "xywh_boxes", "most_images_empty"):
            raise ValueError(f"unknown label fault {fault!r}")
        super().__init__(dataset)
        self.fault = fault

    def corrupt(self, index: int, image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        boxes = target["boxes"]
        g = torch.Generator().manual_seed(index)
        if self.fault == "label_noise" and len(boxes):
            size = (boxes[:, 2:] - boxes[:, :2]).repeat(1, 2)
            noisy = torch.rand(len(boxes), generator=g) < 0.3
            shift = (torch.rand(len(boxes), 2, generator=g) - 0.5) * size[:, :2]
            boxes = torch.where(noisy[:, None], boxes + shift.repeat(1, 2), boxes)
        elif self.fault == "xywh_boxes":
            boxes = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)
        elif self.fault == "most_images_empty" and torch.rand(1, generator=g).item() < 0.9:
            boxes = boxes[:0]
            target = {**target, "labels": target["labels"][:0]}
        return image, {**target, "boxes": boxes}


class Unnormalised(FaultyDataset):
    """Raw pixels (0..255) reach the network: the dataset's ImageNet normalisation undone, as when a
    pipeline forgets to normalise."""

    def corrupt(self, index: int, image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        return denormalize(image), target


DatasetFactory = Callable[[Config], tuple[Any, Any]]
ModelFactory = Callable[[ModelConfig], SSD]


def dataset_factory(fault: Optional[str]) -> DatasetFactory:
    """``build_datasets`` with the fault's data bug: a label fault on the training set; unnormalised
    input on both sets (the network sees raw pixels in training and validation alike)."""
    if fault not in DATA_FAULTS:
        return build_datasets

    def build(cfg: Config) -> tuple[Any, Any]:
        train_set, val_set = build_datasets(cfg)
        if fault == "not_normalised":
            return Unnormalised(train_set), Unnormalised(val_set)
        return LabelFault(train_set, fault), val_set

    return build


def model_factory(fault: Optional[str]) -> ModelFactory:
    """``build_model``, with the backbone frozen for ``frozen_backbone`` (a fine-tuning bug: the
    backbone's parameters never receive a gradient)."""
    if fault != "frozen_backbone":
        return build_model

    def build(cfg: ModelConfig) -> SSD:
        model = build_model(cfg)
        for parameter in model.backbone.parameters():
            parameter.requires_grad_(False)
        return model

    return build


class SignalRecorder(Callback):
    """Keeps every step's signals (what the diagnosis sees) and writes them to ``steps.json`` at the
    end, so the detectors and the baselines can be replayed on the run without training it again."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.total_steps: Optional[int] = None
        self.steps: list[dict[str, float]] = []

    def on_build(self, trainer: Any) -> None:
        self.total_steps = int(trainer.total_steps)

    def on_step_end(self, trainer: Any, step: int, record: Any, signals: dict[str, float]) -> None:
        self.steps.append({"step": int(step), "epoch": trainer.state.epoch + 1,
                           **{k: float(v) for k, v in signals.items()}})

    def write(self) -> None:
        write_json(self.path, {"total_steps": self.total_steps, "steps": self.steps})
