"""The one prediction path: model -> post-processed boxes in original pixels.

Validation, ``evaluate.py`` and the scripts all predict through ``predict_batches``: forward under
autocast, ``SSD.postprocess`` with the ``eval`` group's settings (``score_floor``, ``nms_iou``,
``pre_nms_top_k``, ``max_detections``), and ``to_original_frame`` with each target's ``scale``.
Validation adds only its losses and drawings on top. ``predict_dataset`` collects a loader's
predictions at the model's fixed input size; ``predict_original_size`` runs every image at its own
size, or keep-aspect at "longer side = N" (``eval.input_size: N``), batch of one: the SSD's anchors
depend on the input size, so one model per distinct size is built from the same weights (cached).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Optional, Sequence

import torch
from torch import nn
from torchvision.transforms import v2

from detlab.config import EvalConfig, ModelConfig

if TYPE_CHECKING:
    import numpy as np

Prediction = tuple[int, torch.Tensor, torch.Tensor]  # (image_id, boxes [K, 4] xyxy original px, scores [K])


def to_original_frame(boxes: torch.Tensor, target: Mapping[str, Any]) -> torch.Tensor:
    """Input-frame ``[K, 4]`` xyxy -> original pixels (``original = input * scale``), on the CPU."""
    sx, sy = (float(v) for v in target["scale"])
    return boxes.detach().float().cpu() * torch.tensor([sx, sy, sx, sy])


@dataclass
class BatchPrediction:
    """One batch through the prediction path."""

    images: torch.Tensor  # [B, 3, H, W] as fed to the model (on its device)
    targets: Sequence[Mapping[str, Any]]
    outputs: dict[str, torch.Tensor]  # the head's float32 ``cls_logits`` / ``bbox_regression``
    detections: list[dict[str, torch.Tensor]]  # per image: ``boxes`` (input pixels), ``scores``

    def in_original_frame(self) -> list[Prediction]:
        return [(int(target["image_id"]), to_original_frame(det["boxes"], target), det["scores"].detach().float().cpu())
                for det, target in zip(self.detections, self.targets)]


@torch.no_grad()
def predict_batches(model: nn.Module, loader: Iterable, device: torch.device, settings: EvalConfig,
                    amp: bool = False) -> Iterator[BatchPrediction]:
    """``(images, targets)`` batches -> ``BatchPrediction``s; batches left empty (every image was
    skipped as unreadable) are passed over."""
    model.eval()
    for images, targets in loader:
        if images.shape[0] == 0:
            continue
        images = images.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, enabled=amp):
            raw = model(images)
        outputs = {"cls_logits": raw["cls_logits"].float(), "bbox_regression": raw["bbox_regression"].float()}
        detections = model.postprocess(
            outputs["cls_logits"], outputs["bbox_regression"], score_floor=settings.score_floor,
            nms_iou=settings.nms_iou, pre_nms_top_k=settings.pre_nms_top_k, max_detections=settings.max_detections,
        )
        yield BatchPrediction(images=images, targets=targets, outputs=outputs, detections=detections)


def predict_dataset(model: nn.Module, loader: Iterable, device: torch.device, settings: EvalConfig,
                    amp: bool = False) -> list[Prediction]:
    """One pass over ``loader``; boxes in original pixels, CPU tensors."""
    return [p for batch in predict_batches(model, loader, device, settings, amp) for p in batch.in_original_frame()]


class OriginalSizeImages(torch.utils.data.Dataset):
    """``records`` read at their own size, or keep-aspect resized so the longer side is ``long_side``.

    Items are ``(image [3, H, W] normalised, {"image_id", "scale"})`` with ``original = input * scale``.
    With ``long_side`` the resized image is padded (bottom and right, with the normalised mean, i.e.
    zeros) to a multiple of ``pad_to`` pixels, so WIDER's many aspect ratios share a few input sizes
    (one model, i.e. one anchor set, per size).
    """

    def __init__(self, records: Sequence[Any], images_dir: Path, long_side: Optional[int] = None,
                 pad_to: int = 64, size: Optional[tuple[int, int]] = None) -> None:
        from detlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        self.records = list(records)
        self.images_dir = Path(images_dir)
        self.long_side = long_side
        self.size = size  # (W, H): stretched to a fixed input, as the training-size validation does
        self.pad_to = pad_to
        self.transform = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        from detlab.data.wider import read_image_rgb

        image, target = self.prepare(read_image_rgb(self.images_dir / self.records[index].path))
        return image, {"image_id": index, **target}

    def prepare(self, rgb: "np.ndarray") -> tuple[torch.Tensor, dict[str, Any]]:
        """RGB uint8 ``[H, W, 3]`` -> ``(normalised [3, H', W'], {"scale"})``, as ``__getitem__``."""
        import cv2

        height, width = rgb.shape[:2]
        scale = torch.ones(2)
        if self.size:
            rgb = cv2.resize(rgb, self.size, interpolation=cv2.INTER_AREA if self.size[0] < width else cv2.INTER_LINEAR)
            scale = torch.tensor([width / self.size[0], height / self.size[1]], dtype=torch.float32)
        elif self.long_side:
            factor = self.long_side / max(height, width)
            size = (max(int(round(width * factor)), 1), max(int(round(height * factor)), 1))
            interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
            rgb = cv2.resize(rgb, size, interpolation=interpolation)
            scale = torch.tensor([width / size[0], height / size[1]], dtype=torch.float32)
        image = self.transform(torch.from_numpy(rgb).permute(2, 0, 1).contiguous())
        if self.long_side and self.pad_to > 1:
            pad_h = -image.shape[1] % self.pad_to
            pad_w = -image.shape[2] % self.pad_to
            image = torch.nn.functional.pad(image, (0, pad_w, 0, pad_h))
        return image, {"scale": scale}


class ModelsBySize:
    """``models(width, height)``: the checkpoint's model built for that input size (an SSD's anchors
    depend on it) from one state dict, the ``cache_size`` most recently used ones kept."""

    def __init__(self, model_cfg: ModelConfig, state_dict: Mapping[str, torch.Tensor], device: torch.device,
                 cache_size: int = 32) -> None:
        from detlab.model import architecture_config

        self.model_cfg = architecture_config(model_cfg)  # no backbone weights read: they come with state_dict
        self.state_dict = state_dict
        self.device = device
        self.cache_size = cache_size
        self._models: "OrderedDict[tuple[int, int], nn.Module]" = OrderedDict()

    def __call__(self, width: int, height: int) -> nn.Module:
        size = (int(width), int(height))
        if size not in self._models:
            self._models[size] = self.build(*size)
            if len(self._models) > self.cache_size:
                self._models.popitem(last=False)
        self._models.move_to_end(size)
        return self._models[size]

    def build(self, width: int, height: int) -> nn.Module:
        """The model for a ``width x height`` input, on ``device``, in eval mode."""
        from dataclasses import replace

        from detlab.runtime.checkpoint import load_weights
        from detlab.model import build_model

        model = build_model(replace(self.model_cfg, input_width=width, input_height=height))
        load_weights(model, self.state_dict, f"the weights for a {width}x{height} input")
        return model.to(self.device).eval()


def predict_image(models: ModelsBySize, image: torch.Tensor, target: Mapping[str, Any], device: torch.device,
                  settings: EvalConfig, amp: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One prepared image (``OriginalSizeImages.prepare``) at its own size: ``(boxes [K, 4] original px, scores)``."""
    model = models(image.shape[-1], image.shape[-2])
    [(_, boxes, scores)] = predict_dataset(model, [(image.unsqueeze(0), [{"image_id": 0, **target}])], device,
                                           settings, amp)
    return boxes, scores


def predict_original_size(
    models: ModelsBySize,
    dataset: OriginalSizeImages,
    device: torch.device,
    settings: EvalConfig,
    amp: bool = False,
    indices: Optional[Iterable[int]] = None,
) -> list[Prediction]:
    """Each image at its own input size (``OriginalSizeImages``), batch of one, through ``models``;
    ``indices``: only those images (a process's share under torchrun), else all."""
    out: list[Prediction] = []
    for index in range(len(dataset)) if indices is None else indices:
        image, target = dataset[index]
        out.append((int(target["image_id"]), *predict_image(models, image, target, device, settings, amp)))
    return out
