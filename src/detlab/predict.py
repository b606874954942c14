"""The prediction loop shared by ``evaluate.py`` and validation: model -> NMSed boxes in original pixels.

``predict_dataset`` runs a model over a deterministic loader at the model's fixed input size and maps
the boxes back with each target's ``scale``. ``predict_original_size`` runs every image at its own
size (batch of one): the SSD's anchors depend on the input size, so one model per distinct size is
built from the same weights (kept in a small cache).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn
from torchvision.transforms import v2

from detlab.config import ModelConfig

Prediction = tuple[int, torch.Tensor, torch.Tensor]  # (image_id, boxes [K, 4] xyxy original px, scores [K])


def to_original_frame(boxes: torch.Tensor, target: Mapping[str, Any]) -> torch.Tensor:
    """Input-frame ``[K, 4]`` xyxy -> original pixels (``original = input * scale``), on the CPU."""
    sx, sy = (float(v) for v in target["scale"])
    return boxes.detach().float().cpu() * torch.tensor([sx, sy, sx, sy])


@torch.no_grad()
def predict_dataset(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    score_floor: float,
    nms_iou: float,
    max_detections: int,
    pre_nms_top_k: Optional[int] = None,
    amp: bool = False,
) -> list[Prediction]:
    """One pass over ``loader`` (``(images, targets)`` batches); boxes in original pixels, CPU tensors."""
    model.eval()
    out: list[Prediction] = []
    for images, targets in loader:
        if images.shape[0] == 0:  # every image of the batch was skipped as unreadable
            continue
        images = images.to(device, non_blocking=True)
        with torch.autocast(device_type=device.type, enabled=amp):
            raw = model(images)
        predictions = model.postprocess(
            raw["cls_logits"].float(), raw["bbox_regression"].float(), score_floor=score_floor,
            nms_iou=nms_iou, pre_nms_top_k=pre_nms_top_k, max_detections=max_detections,
        )
        for pred, target in zip(predictions, targets):
            out.append((int(target["image_id"]), to_original_frame(pred["boxes"], target),
                        pred["scores"].detach().float().cpu()))
    return out


class OriginalSizeImages(torch.utils.data.Dataset):
    """``records`` read at their own size: ``(image [3, H, W] normalised, {"image_id", "scale"=(1, 1)})``."""

    def __init__(self, records: Sequence[Any], images_dir: Path) -> None:
        from detlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD

        self.records = list(records)
        self.images_dir = Path(images_dir)
        self.transform = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, Any]]:
        from detlab.data.wider import read_image_rgb

        rgb = read_image_rgb(self.images_dir / self.records[index].path)  # [H, W, 3] uint8
        image = self.transform(torch.from_numpy(rgb).permute(2, 0, 1).contiguous())
        return image, {"image_id": index, "scale": torch.ones(2)}


@torch.no_grad()
def predict_original_size(
    model_cfg: ModelConfig,
    state_dict: Mapping[str, torch.Tensor],
    dataset: OriginalSizeImages,
    device: torch.device,
    score_floor: float,
    nms_iou: float,
    max_detections: int,
    pre_nms_top_k: Optional[int] = None,
    amp: bool = False,
    cache_size: int = 8,
) -> list[Prediction]:
    """Each image at its own size; the model for a size is rebuilt from ``state_dict`` (anchors differ)."""
    from dataclasses import replace

    from detlab.model import architecture_config, build_model

    model_cfg = architecture_config(model_cfg)  # no backbone weights read: they come with state_dict

    models: "OrderedDict[tuple[int, int], nn.Module]" = OrderedDict()
    out: list[Prediction] = []
    for index in range(len(dataset)):
        image, target = dataset[index]
        size = (int(image.shape[-1]), int(image.shape[-2]))  # (W, H)
        if size not in models:
            model = build_model(replace(model_cfg, input_width=size[0], input_height=size[1]))
            model.load_state_dict(state_dict)
            models[size] = model.to(device).eval()
            if len(models) > cache_size:
                models.popitem(last=False)
        models.move_to_end(size)
        batch = predict_dataset(models[size], [(image.unsqueeze(0), [target])], device, score_floor, nms_iou,
                                max_detections, pre_nms_top_k, amp)
        out.extend(batch)
    return out
