"""Faults injected into a benchmark run through the trainer's public extension points, and the callback
that records a run's per-step signals.

A fault that a config key expresses (an lr far too high, box weight 100, ...) is a list of overrides in
``benchmarks/diagnosis/spec.yaml``. The others (the spec's ``inject:``) change the data or the model, and
reach the run through ``Trainer(..., dataset_factory=..., model_factory=...)``: nothing in the package is
patched.

- data: ``label_noise``, ``xywh_boxes``, ``flipped_boxes`` (x2 < x1), ``zero_size_boxes``,
  ``most_images_empty`` (``LabelFault``, the training set); ``not_normalised`` (both sets);
- model: ``frozen_backbone``; ``step_skipped`` (no update ever reaches the weights); ``fp16_overflow``
  (the first convolution's output beyond float16's range, a CUDA-autocast-only failure).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import Dataset

from detlab.config import Config, ModelConfig
from detlab.data import build_datasets, denormalize
from detlab.engine.callbacks import Callback
from detlab.model import SSD, build_model
from detlab.runtime.fileio import write_json

LABEL_FAULTS = ("label_noise", "xywh_boxes", "flipped_boxes", "zero_size_boxes", "most_images_empty")
DATA_FAULTS = (*LABEL_FAULTS, "not_normalised")
MODEL_FAULTS = ("frozen_backbone", "step_skipped", "fp16_overflow")
INJECTED_FAULTS = DATA_FAULTS + MODEL_FAULTS
FLOAT16_MAX = 65504.0  # the largest finite float16
# fp16_overflow scales the first convolution's weights by this: its output (about 1e6 on normalised
# images) is inf in float16, while batch norm right after it undoes the scale in float32 and bfloat16.
OVERFLOW_SCALE = 1e6


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
    noise), boxes as xywh where xyxy is expected, x1 and x2 swapped on every box (x2 < x1), every box
    collapsed to its centre (zero size), or 90% of the images stripped of their faces. The draw is
    seeded by the image index, so every epoch and every run sees the same bug."""

    def __init__(self, dataset: Any, fault: str) -> None:
        if fault not in LABEL_FAULTS:
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
        elif self.fault == "flipped_boxes":
            boxes = boxes[:, [2, 1, 0, 3]]
        elif self.fault == "zero_size_boxes":
            centre = (boxes[:, :2] + boxes[:, 2:]) / 2
            boxes = torch.cat([centre, centre], dim=1)
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
    """``build_model`` with the fault's model bug:

    - ``frozen_backbone``: the backbone's parameters never receive a gradient (a fine-tuning bug, or,
      with pretrained weights, fine-tuning frozen on purpose);
    - ``step_skipped``: the gradients are computed but no update reaches the weights: before every
      forward the parameters are put back to their initial values (as if ``optimizer.step()`` were
      never called; batch-norm statistics still move, as they do in such a run);
    - ``fp16_overflow``: the first convolution's weights times ``OVERFLOW_SCALE``.
    """
    if fault not in MODEL_FAULTS:
        return build_model

    def build(cfg: ModelConfig) -> SSD:
        model = build_model(cfg)
        if fault == "frozen_backbone":
            for parameter in model.backbone.parameters():
                parameter.requires_grad_(False)
        elif fault == "step_skipped":
            skip_every_update(model)
        elif fault == "fp16_overflow":
            first = first_conv(model)
            with torch.no_grad():
                first.weight.mul_(OVERFLOW_SCALE)
                if first.bias is not None:
                    first.bias.mul_(OVERFLOW_SCALE)
        return model

    return build


def first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def skip_every_update(model: nn.Module) -> None:
    """Restore ``model``'s parameters to their values of now before each of its forwards."""
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}

    def restore(module: nn.Module, inputs: Any) -> None:
        with torch.no_grad():
            for name, p in module.named_parameters():
                value = initial[name]
                if value.device != p.device:
                    value = initial[name] = value.to(p.device)
                p.copy_(value)

    model.register_forward_pre_hook(restore)


class SignalRecorder(Callback):
    """Keeps every step's signals (what the diagnosis sees) and writes them to ``steps.json`` at the
    end, so the detectors and the baselines can be replayed on the run without training it again.

    On the steps that sample gradients (those with ``grad_dead_share``) it adds what AUTOTRAINER's
    gradient rules read (``layer_gradients``): the gradient norms of the first and the last trainable
    kernel (``grad_norm_first_layer``, ``grad_norm_last_layer``) and the share of zero gradient entries
    over the trainable weights (``grad_zero_share``; a weight without a gradient counts as zeros).
    One host sync on those steps only."""

    def __init__(self, path: Optional[Path] = None, layer_gradients: bool = True) -> None:
        self.path = None if path is None else Path(path)
        self.layer_gradients = layer_gradients
        self.total_steps: Optional[int] = None
        self.steps_per_epoch: Optional[int] = None
        self.steps: list[dict[str, float]] = []

    def on_build(self, trainer: Any) -> None:
        self.total_steps = int(trainer.total_steps)
        self.steps_per_epoch = int(trainer.steps_per_epoch)

    def on_step_end(self, trainer: Any, step: int, record: Any, signals: dict[str, float]) -> None:
        row = {"step": int(step), "epoch": trainer.state.epoch + 1, **{k: float(v) for k, v in signals.items()}}
        if self.layer_gradients and "grad_dead_share" in signals:
            row.update(layer_gradient_signals(trainer.model))
        self.steps.append(row)

    def write(self) -> None:
        if self.path is None:
            raise ValueError("SignalRecorder was given no path to write to")
        write_json(self.path, {"total_steps": self.total_steps, "steps": self.steps})


def layer_gradient_signals(model: nn.Module) -> dict[str, float]:
    """AUTOTRAINER's gradient features (``gradient_message_summary``) of ``model``'s current gradients,
    over its trainable parameters (Keras's ``trainable_weights``): the first and last kernel's (a
    parameter of 2 or more dimensions) gradient norms, and the share of zero gradient entries."""
    params = [p for p in getattr(model, "module", model).parameters() if p.requires_grad]
    kernels = [p for p in params if p.dim() >= 2]
    if not kernels:
        return {}
    device = kernels[0].device

    def norm(p: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(p.grad.detach().float()) if p.grad is not None else torch.zeros((), device=device)

    zeros = [(p.grad == 0).sum() if p.grad is not None else torch.tensor(p.numel(), device=device) for p in params]
    total = sum(p.numel() for p in params)
    first, last, zero = torch.stack([norm(kernels[0]), norm(kernels[-1]),
                                     torch.stack(zeros).sum().float() / total]).tolist()
    return {"grad_norm_first_layer": first, "grad_norm_last_layer": last, "grad_zero_share": zero}
